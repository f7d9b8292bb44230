"""The run folder: where every stage of one run writes (ARCHITECTURE.md, "Run folder").

``simplebits run`` writes all its stages here; the single-step commands do too when given
``--run DIR``, so the report, the review page and the run's one MLflow store see the same layout
whichever way a run was built. Light on purpose (no torch, no pandas): the commands import it when
they register their arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.runtime.tracking import resolve_tracking_uri

#: Settings in the order a report prefers them when no simplification run is named: the audit is
#: what ``simplebits run`` reports, joint training the other per-study setting.
REPORT_SETTINGS = ("audit", "joint")


class RunFolder:
    """Paths of one run's stages."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.cohort = self.root / "cohort"
        self.ingest = self.root / "ingest"
        self.prior = self.root / "prior"

    @property
    def masks(self) -> Path:
        """The demo cohort's ground-truth masks (absent for a cohort read from a manifest)."""
        return self.cohort / "masks"

    def classifier(self, task: str) -> Path:
        return self.root / "classifier" / task

    def classifier_weights(self, task: str) -> Path:
        return self.classifier(task) / "model.safetensors"

    def independent(self, task: str) -> Path:
        return self.root / "classifier" / f"{task}-independent"

    def independent_weights(self, task: str) -> Path:
        return self.independent(task) / "model.safetensors"

    def simplify(self, setting: str, task: str) -> Path:
        return self.root / "simplify" / f"{setting}-{task}"

    def apply(self, task: str) -> Path:
        return self.root / "apply" / task

    def explain(self, task: str) -> Path:
        """``simplebits explain``'s maps of the task's classifier (``<study>/<method>.npy``, ``maps.csv``)."""
        return self.root / "explain" / task

    @property
    def prior_weights(self) -> Path:
        return self.prior / "prior.safetensors"

    def tracking_uri(self, configured: str | None = None) -> str:
        """The run's one MLflow store: ``configured`` if set, else ``sqlite:///<root>/mlflow.db``
        (``MLFLOW_TRACKING_URI`` when set, as for every command)."""
        return resolve_tracking_uri(self.root, configured)

    def finished_simplifications(self) -> list[str]:
        """``<setting>-<task>`` names of the simplification runs a report can show (per-study
        predictions and simplified images written), in :data:`REPORT_SETTINGS` preference."""
        names = [p.name for p in (self.root / "simplify").glob("*-*")
                 if (p / "predictions.csv").is_file() and (p / "simplified").is_dir()]

        def rank(name: str) -> tuple[int, str]:
            setting = name.rpartition("-")[0]
            order = REPORT_SETTINGS.index(setting) if setting in REPORT_SETTINGS else len(REPORT_SETTINGS)
            return order, name

        return sorted(names, key=rank)

    def pick_simplification(self, preferred: str | None = None) -> str:
        """``preferred`` if given (and finished), else the first finished run; a :class:`UserError`
        naming the folder when there is none."""
        finished = self.finished_simplifications()
        if preferred is not None:
            if preferred not in finished:
                have = ", ".join(finished) or "none"
                raise UserError(f"{self.root / 'simplify' / preferred}: no finished simplification run "
                                f"(predictions.csv and simplified/); finished here: {have}")
            return preferred
        if not finished:
            raise UserError(f"{self.root / 'simplify'}: no finished simplification run to report; run "
                            f"`simplebits simplify audit --run {self.root} --task TASK` first")
        return finished[0]


# ------------------------------------------------------------------------------ command-line plumbing


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    """``--run DIR``: write into that run folder's layout and log to its MLflow store."""
    parser.add_argument("--run", metavar="DIR",
                        help="run folder (e.g. reports/mimic): default inputs and output come from its "
                             "layout, and MLflow logs to its one store (DIR/mlflow.db)")


def add_register_argument(parser: argparse.ArgumentParser) -> None:
    """``--register NAME``: a training command also registers what it trained in the MLflow Model Registry."""
    parser.add_argument("--register", metavar="NAME",
                        help="also register the trained network in the MLflow Model Registry as NAME (a new "
                             "version each time; config: tracking.register_as)")


def run_folder(args: argparse.Namespace) -> RunFolder | None:
    return RunFolder(args.run) if getattr(args, "run", None) else None


def path_argument(value: str | None, folder: RunFolder | None, default: Callable[[RunFolder], Path],
                  flag: str) -> str:
    """A required path: the flag's ``value``, else the run folder's ``default`` path, else a
    :class:`UserError` naming the flag."""
    if value is not None:
        return value
    if folder is None:
        raise UserError(f"{flag} is required (or give --run DIR to take it from a run folder)")
    return str(default(folder))


def run_default(folder: RunFolder | None, default: Callable[[RunFolder], Path]) -> str | None:
    """An optional input from the run folder: its ``default`` path where that exists (e.g. the run's
    prior once it has one), else None. A flag or config value the user gave comes first."""
    if folder is None:
        return None
    path = default(folder)
    return str(path) if path.exists() else None


def with_run_tracking(config: Any, folder: RunFolder | None) -> Any:
    """``config`` logging to the run's MLflow store (unless its ``tracking.uri`` names another)."""
    if folder is None:
        return config
    tracking = config.tracking.model_copy(update={"uri": folder.tracking_uri(config.tracking.uri)})
    return config.model_copy(update={"tracking": tracking})
