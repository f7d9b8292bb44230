"""MLflow tracking: embedded SQLite in the run folder by default, any tracking URI by config/env.

Only the main process logs (DDP ranks > 0 get a no-op tracker). Nothing identifying is logged
here by construction: callers pass pseudonymous study ids and resolved configs only.

Resolution order for the tracking URI: explicit ``uri`` argument (from config) >
``MLFLOW_TRACKING_URI`` env > ``sqlite:///<run_dir>/mlflow.db``. Artifacts of a SQLite store live
in ``mlartifacts/`` beside the database file, so a run folder is self-contained and portable.

Stages launched by the pipeline orchestrator (possibly in other processes, e.g. under torchrun)
nest their runs under its parent run through ``SIMPLEBITS_MLFLOW_PARENT_RUN_ID``.

Beyond params/metrics/tags: model files (safetensors + json, no pickle) under ``models/<name>/``,
pandas tables as MLflow dataset inputs, and per-study report folders under ``studies/<study_id>/``.
Values shaped like a DICOM person name (``FAMILY^GIVEN``) are refused as params or tags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import StrictModel
from pipeline.runtime.distributed import is_main_process

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "simplebits"
_MAX_PARAM_LEN = 6000  # MLflow's param value limit
PARENT_RUN_ENV = "SIMPLEBITS_MLFLOW_PARENT_RUN_ID"
#: A DICOM person name ("FAMILY^GIVEN"): such a value in a param or tag means an identifier leaked.
_PERSON_NAME = re.compile(r"[A-Za-z][A-Za-z' .-]*\^[A-Za-z]")
MODELS_ARTIFACT_DIR = "models"
STUDIES_ARTIFACT_DIR = "studies"


class TrackingConfig(StrictModel):
    """The ``tracking`` section every command's config shares."""

    enabled: bool = True
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<output folder>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT


class IdentifierLeakError(ValueError):
    """A value about to be logged looks like a patient name; refused rather than stored."""


def refuse_person_names(values: Mapping[str, str]) -> None:
    """Raise :class:`IdentifierLeakError` for values shaped like a DICOM PatientName (``DOE^JANE``)."""
    for key, value in values.items():
        if _PERSON_NAME.search(str(value)):
            raise IdentifierLeakError(f"refusing to log {key!r}: its value looks like a DICOM person name")


def resolve_tracking_uri(run_dir: str | Path, uri: str | None = None) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def sqlite_artifact_location(uri: str) -> str | None:
    """``sqlite:////abs/run/mlflow.db`` -> ``file:///abs/run/mlartifacts``; None for other stores."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.001", ...}`` for ``log_params``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_LEN]
    return out


def _disable_telemetry() -> None:
    """MLflow phones home by default; a clinical pipeline must not (and this network is closed)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")


class Tracker:
    """A thin, rank-aware wrapper over MLflow's client API (the fluent API is not thread-safe)."""

    def __init__(
        self,
        run_dir: str | Path,
        uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        enabled: bool | None = None,
    ) -> None:
        self.enabled = is_main_process() if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(run_dir, uri)
        self.run_id: str | None = None
        self._stack: list[str] = []
        if not self.enabled:
            return
        _disable_telemetry()
        import mlflow
        from mlflow.tracking import MlflowClient

        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=sqlite_artifact_location(self.uri))
        else:
            self.experiment_id = exp.experiment_id

    @classmethod
    def from_config(cls, run_dir: str | Path, tracking: TrackingConfig, enabled: bool = True) -> Tracker:
        """The tracker a command's ``tracking`` section asks for; ``enabled=False`` e.g. on DDP ranks > 0."""
        return cls(run_dir, uri=tracking.uri, experiment=tracking.experiment, enabled=enabled and tracking.enabled)

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> Iterator[Tracker]:
        """Start (or resume, with ``run_id``) a run; nested under the currently open run if any."""
        if not self.enabled:
            yield self
            return
        if run_id is None:
            all_tags = dict(tags or {})
            refuse_person_names(all_tags)
            parent = self._stack[-1] if self._stack else os.environ.get(PARENT_RUN_ENV)
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            all_tags["mlflow.runName"] = name
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            run_id = run.info.run_id
        self._stack.append(run_id)
        self.run_id = run_id
        status = "FAILED"
        try:
            if params:
                self.log_params(params)
            yield self
            status = "FINISHED"
        finally:
            self.client.set_terminated(run_id, status=status)
            self._stack.pop()
            self.run_id = self._stack[-1] if self._stack else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled and self.run_id:
            from mlflow.entities import Param

            flat = flatten(params)
            refuse_person_names(flat)
            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled and self.run_id:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled and self.run_id:
            refuse_person_names(tags)
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled and self.run_id:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model_files(self, name: str, files: Iterable[str | Path]) -> str | None:
        """Model files (``.safetensors`` weights + ``.json`` config) as artifacts under ``models/<name>/``.

        state_dict files are the primary, loadable format (no pickle). Returns the artifact path.
        """
        files = [Path(f) for f in files]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: model file not found")
        if not (self.enabled and self.run_id):
            return None
        artifact_path = f"{MODELS_ARTIFACT_DIR}/{name}"
        for path in files:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        return artifact_path

    def download_model_files(self, name: str, dst: str | Path, run_id: str | None = None) -> Path:
        """Fetch ``models/<name>/`` of ``run_id`` (default: the open run) into ``dst``; returns the folder."""
        run_id = run_id or self.run_id
        if not (self.enabled and run_id):
            raise RuntimeError("no run to download model files from")
        Path(dst).mkdir(parents=True, exist_ok=True)
        local = self.client.download_artifacts(run_id, f"{MODELS_ARTIFACT_DIR}/{name}", str(dst))
        return Path(local)

    def log_dataset(
        self,
        df: pd.DataFrame,
        name: str,
        context: str,
        targets: str | None = None,
        source: str | None = None,
    ) -> None:
        """``df`` as an MLflow dataset input (name, digest, schema, profile) with ``context`` (e.g. "training")."""
        if not (self.enabled and self.run_id):
            return
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():
            # MLflow hints about integer columns and missing values (schema inference): not actionable here.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(df, source=source, targets=targets, name=name)
            entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def log_study_reports(self, studies_dir: str | Path, study_ids: Iterable[str] | None = None) -> int:
        """Per-study report folders as artifacts ``studies/<study_id>/...``; returns how many were logged."""
        studies_dir = Path(studies_dir)
        if not studies_dir.is_dir():
            raise FileNotFoundError(f"{studies_dir}: studies folder not found")
        wanted = None if study_ids is None else set(study_ids)
        folders = sorted(p for p in studies_dir.iterdir() if p.is_dir() and (wanted is None or p.name in wanted))
        if not (self.enabled and self.run_id):
            return 0
        if wanted is None:  # one upload of the whole tree keeps the folder-per-study layout
            self.client.log_artifacts(self.run_id, str(studies_dir), STUDIES_ARTIFACT_DIR)
            return len(folders)
        for folder in folders:
            self.client.log_artifacts(self.run_id, str(folder), f"{STUDIES_ARTIFACT_DIR}/{folder.name}")
        return len(folders)


def null_tracker() -> Tracker:
    """A tracker that logs nothing (tests, ``tracking.enabled: false``)."""
    return Tracker(run_dir=".", uri="sqlite:///:memory:", enabled=False)
