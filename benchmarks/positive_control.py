"""Positive control of the audit: does it keep the burned-in marker when the marker *is* the task?

On the demo cohort every study may carry a burned-in marker or text tag, independent of effusion and
sex. The ``support_devices`` task is that marker's presence. An audit of a ``support_devices``
classifier must therefore keep the marks (issue 11: retention >= 0.6), while the audit of an effusion
classifier, for which the marks are distractors, must remove them (<= 0.25). Retention is the marks'
local contrast in the simplified image over that in the original (``distractor_retention``,
pipeline/simplebits/evaluate.py), averaged over the split's studies with a mark.

Given a finished ``make demo`` run folder, this trains the ``support_devices`` classifier if the
folder has none, then audits both tasks at each gate threshold ``tau`` and simplifier form, and prints
one row per audit:

    python benchmarks/positive_control.py reports/demo --taus 0.1,0.03 --modes scale_space,logit

Each audit goes to ``RUN/positive_control/<task>-tau<tau>-<mode>/`` (an audit already done there is
reused). Every audit runs the same number of epochs (``--epochs``); retraining, the independent check
and the baselines are off, as retention needs none of them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COLUMNS = ("val_auroc_orig", "val_auroc_simpl", "val_bpd_orig", "val_bpd_simpl",
           "val_mean_distractor_retention", "test_mean_distractor_retention")


def simplebits(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pipeline.cli", *args], check=True, stdout=subprocess.DEVNULL)


def audit(run: Path, task: str, tau: float, mode: str, epochs: int) -> tuple[dict[str, float], float]:
    """The audit's metrics and its wall seconds (0 when reused)."""
    out = run / "positive_control" / f"{task}-tau{tau:g}-{mode}"
    metrics = out / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text()), 0.0
    started = time.perf_counter()
    simplebits("simplify", "audit", "--run", str(run), "--task", task, "--out", str(out), "--force",
               "--set", f"train.epochs={epochs}", "--set", f"audit.tau={tau}",
               "--set", f"simplifier.mode={mode}", "--set", "evaluate.retrain=false",
               "--set", "evaluate.baselines=[]", "--set", "independent.enabled=false")
    return json.loads(metrics.read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished make demo / simplebits run folder")
    parser.add_argument("--taus", default="0.1", help="comma list of audit gate thresholds")
    parser.add_argument("--modes", default="scale_space", help="comma list of simplifier forms")
    parser.add_argument("--tasks", default="support_devices,effusion")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()

    if not (args.run / "classifier" / "support_devices" / "model.safetensors").exists():
        simplebits("classify", "train", "--run", str(args.run), "--task", "support_devices")
    print("task,tau,mode," + ",".join(COLUMNS) + ",seconds", flush=True)
    for mode in args.modes.split(","):
        for tau in (float(v) for v in args.taus.split(",")):
            for task in args.tasks.split(","):
                metrics, seconds = audit(args.run, task, tau, mode, args.epochs)
                values = ",".join(f"{metrics[c]:.3f}" for c in COLUMNS)
                print(f"{task},{tau:g},{mode},{values},{seconds:.0f}", flush=True)


if __name__ == "__main__":
    main()
