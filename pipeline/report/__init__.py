"""Reports: per-study panels + JSON (``study``), cohort analysis (``cohort``) and HTML (``html``),
the radiologist review server (``review``)."""
