"""MLflow tracking: embedded SQLite in the run folder by default, any tracking URI by config/env.

Only the main process logs (DDP ranks > 0 get a no-op tracker). Nothing identifying is logged
here by construction: callers pass pseudonymous study ids and resolved configs only.

Resolution order for the tracking URI: explicit ``uri`` argument (from config) >
``MLFLOW_TRACKING_URI`` env > ``sqlite:///<run_dir>/mlflow.db``. Artifacts of a SQLite store live
in ``mlartifacts/`` beside the database file, so a run folder is self-contained and portable.

Stages launched by the pipeline orchestrator (possibly in other processes, e.g. under torchrun)
nest their runs under its parent run through ``SIMPLEBITS_MLFLOW_PARENT_RUN_ID``.

Beyond params/metrics/tags: trained networks as MLflow Models (``LoggedModel``s of the pytorch
flavour with an input example, a signature and the run's final metrics linked; optionally registered
in the Model Registry, see :meth:`Tracker.log_model` and :mod:`pipeline.runtime.mlflow_model`),
per-study results as MLflow tables, pandas tables as MLflow dataset inputs, and per-study report
folders under ``studies/<study_id>/``. Values shaped like a DICOM person name (``FAMILY^GIVEN``) are
refused as params, tags, model names and table cells; identifying columns are refused in tables.

Resumable runs: ``Tracker.run(..., resume_file=out_dir / "mlflow_run.json")`` records the run id in
the stage's output folder. A command re-run after a kill (even ``kill -9``, which leaves the run
RUNNING) reopens that run, so its metric history stays one series; the ``resumed_count`` tag counts
the reopenings and ``resumed_from_status`` says how the previous attempt ended. A FINISHED run named
in the file is not reopened: re-running a completed command makes a new run. While such a run is
open, SIGTERM unwinds the process (exit status 143) so the run ends KILLED rather than RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import StrictModel
from pipeline.runtime.atomic import atomic_write_text
from pipeline.runtime.distributed import is_main_process

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "simplebits"
_MAX_PARAM_LEN = 6000  # MLflow's param value limit
PARENT_RUN_ENV = "SIMPLEBITS_MLFLOW_PARENT_RUN_ID"
#: A DICOM person name ("FAMILY^GIVEN"): such a value in a param or tag means an identifier leaked.
_PERSON_NAME = re.compile(r"[A-Za-z][A-Za-z' .-]*\^[A-Za-z]")
STUDIES_ARTIFACT_DIR = "studies"
RESUMED_COUNT_TAG = "resumed_count"
RESUMED_FROM_STATUS_TAG = "resumed_from_status"
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
_MODEL_NAME_FORBIDDEN = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a LoggedModel's name
#: Columns that identify a patient or point at their files: never in a table logged to MLflow.
IDENTIFYING_COLUMNS = frozenset({"patient_id", "patient_name", "image_path", "path", "accession_number",
                                 "birth_date", "source_path", "study_instance_uid", "sop_instance_uid"})


RUN_ID_NAME = "mlflow_run.json"  # in a stage's output folder: its run, reopened when a killed run resumes


class TrackingConfig(StrictModel):
    """The ``tracking`` section every command's config shares."""

    enabled: bool = True
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<output folder>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    # register the trained network(s) in the Model Registry under this name (None: logged, not registered;
    # ``--register NAME`` of the training commands). ``simplebits run`` registers each stage's network as
    # <register_as>-<stage>-<task>. (Not ``register``: that would shadow the ABC method of pydantic models.)
    register_as: str | None = None


class IdentifierLeakError(ValueError):
    """A value about to be logged looks like a patient name; refused rather than stored."""


class ParamConflictError(ValueError):
    """A param already logged on the run (e.g. before an interruption) would get a different value."""


class RunTerminated(SystemExit):
    """SIGTERM arrived inside a resumable run: unwinds like ``sys.exit(143)``; the run ends KILLED."""


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
    # nor draw download progress bars into the logs of batch jobs (model logging reads artifacts back)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _read_resume_file(path: Path) -> str | None:
    """The run id a resume file names, or None (absent, unreadable or malformed: a new run is made)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); starting a new MLflow run", path, exc)
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        log.warning("%s: names no MLflow run id; starting a new MLflow run", path)
        return None
    return run_id


def _end_status(exc: BaseException | None) -> str:
    """MLflow run status for a run left normally (None) or by ``exc``."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, RunTerminated)):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "FINISHED"
    return "FAILED"


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While open, SIGTERM raises :class:`RunTerminated` so ``finally`` blocks (set_terminated) run.

    Only from the main thread and only where SIGTERM still has its default action: a handler the
    program (or a launcher) installed is left alone, as is an enclosing one of these. A forked child
    (e.g. a DataLoader worker) inheriting the handler keeps the default action; a second SIGTERM kills.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != owner:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise RunTerminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
        resume_file: str | Path | None = None,
    ) -> Iterator[Tracker]:
        """Start a run nested under the currently open run if any, or reopen one.

        ``run_id`` reopens that run. ``resume_file`` (a JSON file in the stage's output folder)
        reopens the run it names when that run is in this store and experiment, has this ``name``
        and is not FINISHED (an interrupted attempt); otherwise a new run is made and its id written
        there atomically. A reopened run keeps its id, so metrics continue one history; params
        already logged are skipped when equal and raise :class:`ParamConflictError` when not.
        The run ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.
        A disabled tracker (DDP ranks > 0) reads and writes nothing.
        """
        if not self.enabled:
            yield self
            return
        if run_id is not None and resume_file is not None:
            raise ValueError("pass run_id or resume_file, not both")
        if run_id is not None and run_id in self._stack:
            raise RuntimeError(f"MLflow run {run_id} is already open")
        all_tags = dict(tags or {})
        refuse_person_names(all_tags)
        flat = flatten(params or {})
        refuse_person_names(flat)
        parent = self._stack[-1] if self._stack else os.environ.get(PARENT_RUN_ENV)
        resume_path = None if resume_file is None else Path(resume_file)
        existing = self.client.get_run(run_id) if run_id is not None else None
        if resume_path is not None:
            existing = self._resumable_run(resume_path, name)
        with _sigterm_unwinds() if resume_path is not None else contextlib.nullcontext():
            if existing is not None:
                run_id = existing.info.run_id
                pending = self._params_to_log(existing.data.params, flat, run_id)
                self._reopen(existing, all_tags, parent)
            else:
                if parent:
                    all_tags["mlflow.parentRunId"] = parent
                all_tags["mlflow.runName"] = name
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
                pending = flat
            self._stack.append(run_id)
            self.run_id = run_id
            error: BaseException | None = None
            try:
                if existing is None and resume_path is not None:
                    payload = {"run_id": run_id, "run_name": name, "experiment_id": self.experiment_id}
                    atomic_write_text(resume_path, json.dumps(payload, indent=2) + "\n")
                if pending:
                    self._log_flat_params(pending)
                yield self
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.client.set_terminated(run_id, status=_end_status(error))
                self._stack.pop()
                self.run_id = self._stack[-1] if self._stack else None

    def _resumable_run(self, resume_file: Path, name: str) -> Any:
        """The interrupted run ``resume_file`` names, or None when a new run is due."""
        from mlflow.exceptions import MlflowException

        run_id = _read_resume_file(resume_file)
        if run_id is None:
            return None
        if run_id in self._stack:
            raise RuntimeError(f"{resume_file}: MLflow run {run_id} is already open")
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            log.warning("%s: run %s is not in %s; starting a new MLflow run", resume_file, run_id, self.uri)
            return None
        info = run.info
        same_run = info.experiment_id == self.experiment_id and info.run_name == name
        if info.lifecycle_stage != "active" or not same_run:
            log.warning("%s: run %s is deleted, in another experiment or not named %r; "
                        "starting a new MLflow run", resume_file, run_id, name)
            return None
        if info.status == "FINISHED":
            log.info("%s: run %s finished; starting a new MLflow run", resume_file, run_id)
            return None
        return run

    def _reopen(self, run: Any, tags: dict[str, str], parent: str | None) -> None:
        """Mark ``run`` RUNNING again, count the reopening, refresh tags and the parent link."""
        run_id, status = run.info.run_id, run.info.status
        try:
            count = int(run.data.tags.get(RESUMED_COUNT_TAG, "0")) + 1
        except ValueError:
            count = 1
        log.info("reopening MLflow run %s (%s, left %s; reopened %d time(s))",
                 run_id, run.info.run_name, status, count)
        if status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        tags = {**tags, RESUMED_COUNT_TAG: str(count), RESUMED_FROM_STATUS_TAG: status}
        if parent and parent != run_id and run.data.tags.get("mlflow.parentRunId") != parent:
            tags["mlflow.parentRunId"] = parent  # nest under the parent run of this attempt
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    @staticmethod
    def _params_to_log(logged: Mapping[str, str], flat: Mapping[str, str], run_id: str) -> dict[str, str]:
        """``flat`` less the params ``run_id`` already has; a different value for one is an error."""
        for key, value in flat.items():
            if key in logged and logged[key] != value:
                raise ParamConflictError(
                    f"param {key!r} is {value!r} but MLflow run {run_id} already logged {logged[key]!r}; "
                    "MLflow cannot change a logged param: keep the original value or start a new run")
        return {k: v for k, v in flat.items() if k not in logged}

    def _log_flat_params(self, flat: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params; ones the run already has are skipped, or refused if the value differs."""
        if self.enabled and self.run_id:
            flat = flatten(params)
            refuse_person_names(flat)
            pending = self._params_to_log(self.client.get_run(self.run_id).data.params, flat, self.run_id)
            if pending:
                self._log_flat_params(pending)

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

    def log_model(self, kind: str, weights: str | Path, name: str, register: str | None = None,
                  tags: Mapping[str, str] | None = None) -> Any:
        """The network in ``weights`` (+ side-car ``.json``) as the MLflow Model ``name`` of the open run.

        ``kind``: classifier, simplifier or prior (:mod:`pipeline.runtime.mlflow_model`). The model is a
        ``LoggedModel`` of the pytorch flavour with a synthetic input example and its signature; MLflow
        links it to the run's params and to the metrics the run logged at step 0 (the final ones: log
        them first). ``register``: also a new version of that registered model. Returns MLflow's
        ``ModelInfo`` (None when disabled).
        """
        from pipeline.runtime.mlflow_model import LoggedNetwork, example_and_signature, package_files

        files = package_files(weights)  # a missing file fails alike with and without tracking
        if not (self.enabled and self.run_id):
            return None
        tags = {"kind": kind, **(tags or {})}
        refuse_person_names({"name": name, "register": register or "", **tags})
        name = _MODEL_NAME_FORBIDDEN.sub("_", name)  # e.g. the run name's "lam-0.5"
        import mlflow.pytorch

        network = LoggedNetwork(kind, weights)
        example, signature = example_and_signature(network.network, files[0])
        with fluent_store(self.uri, self.experiment_id), _quiet_pickle_warning():
            info = mlflow.pytorch.log_model(
                network, name=name, run_id=self.run_id, input_example=example, signature=signature,
                extra_files=[str(f) for f in files], pip_requirements=_model_requirements(),
                serialization_format="pickle", registered_model_name=register, tags=tags, model_type=kind)
        log.info("logged %s %r as MLflow model %s%s", kind, name, info.model_uri,
                 f", registered as {register!r} version {info.registered_model_version}" if register else "")
        return info

    def log_table(self, table: pd.DataFrame, artifact_file: str) -> None:
        """Per-study results as an MLflow table (``artifact_file``, ``.json``) the UI shows and
        ``mlflow.load_table`` reads. Identifying columns and person-name-shaped cells are refused."""
        if not (self.enabled and self.run_id):
            return
        refuse_identifying_columns(table, artifact_file)
        self.client.log_table(self.run_id, table, artifact_file)

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


def refuse_identifying_columns(table: pd.DataFrame, name: str) -> None:
    """Raise :class:`IdentifierLeakError` for a table with an identifying column or a person-name cell."""
    found = sorted(IDENTIFYING_COLUMNS & {str(c).lower() for c in table.columns})
    if found:
        raise IdentifierLeakError(f"refusing to log table {name!r}: identifying column(s) {found}")
    for column in table.columns:
        if table[column].dtype.kind not in "biufcmM" and table[column].astype(str).str.contains(_PERSON_NAME).any():
            raise IdentifierLeakError(f"refusing to log table {name!r}: column {column!r} holds a value "
                                      "that looks like a DICOM person name")


def without_identifying_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` less the columns of :data:`IDENTIFYING_COLUMNS` (e.g. a study table's ``patient_id``
    pseudonym, which links a patient's studies): what a per-study MLflow table may hold."""
    return table.drop(columns=[c for c in table.columns if str(c).lower() in IDENTIFYING_COLUMNS])


@contextlib.contextmanager
def fluent_store(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API at ``uri`` for the block: model logging and ``models:/`` downloads read
    the global tracking (and so registry) URI whatever client they are given, and with no active run a
    LoggedModel goes to the default experiment unless ``MLFLOW_EXPERIMENT_ID`` names ours. Everything is
    restored after, including ``MLFLOW_TRACKING_URI``, which MLflow's own ``_use_tracking_uri`` unsets on
    exit (the pipeline's stages read it)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")
    saved_env, saved_uri = {name: os.environ.get(name) for name in names}, utils._tracking_uri
    mlflow.set_tracking_uri(uri)
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _model_requirements() -> list[str]:
    """What a logged model needs to load: this package (its loaders rebuild the network) and its torch.
    Given explicitly, so that MLflow does not load the model in a subprocess to guess them."""
    from importlib.metadata import version

    import torch

    return [f"simplebits-cxr=={version('simplebits-cxr')}", f"torch=={torch.__version__.split('+')[0]}"]


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    """Mute MLflow's generic warning about pickled models while ours is logged: our pickle holds only
    the package's weights files and a reference to its loader (pipeline/runtime/mlflow_model.py)."""
    logger = logging.getLogger("mlflow.pytorch")

    def not_the_pickle_warning(record: logging.LogRecord) -> bool:
        return "Pickle or CloudPickle" not in record.getMessage()

    logger.addFilter(not_the_pickle_warning)
    try:
        yield
    finally:
        logger.removeFilter(not_the_pickle_warning)


def null_tracker() -> Tracker:
    """A tracker that logs nothing (tests, ``tracking.enabled: false``)."""
    return Tracker(run_dir=".", uri="sqlite:///:memory:", enabled=False)
