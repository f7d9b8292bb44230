"""Physically grounded demo cohort: DRRs of one real chest CT with simulated effusion, breasts, distractors.

Entry point: :func:`pipeline.data.demo.cohort.generate_cohort` (CLI: ``simplebits demo-cohort``).
Modules: ``ct`` (load, de-contrast, resample; cached), ``effusion`` (lamellar pleural fluid),
``breast`` (sex signal), ``render`` (PA projection, projected masks, detector), ``distractors``
(burned-in marks), ``devices`` (chest drain, ECG, pacemaker placed in the CT), ``dicom`` (DX/CR header
and encoding variants), ``identities`` (synthetic PHI), ``cohort`` (plan, render, write), ``reliance``
(a classifier's reliance on a feature, from the renders without it), ``contact_sheet`` (look at them).
"""

from pipeline.data.demo.cohort import DemoCohortConfig, DemoScene, generate_cohort, plan_cohort

__all__ = ["DemoCohortConfig", "DemoScene", "generate_cohort", "plan_cohort"]
