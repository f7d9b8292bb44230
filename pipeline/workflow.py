"""The whole pipeline in one command (``simplebits run``): cohort (the demo, or the user's manifest) →
ingest → prior → classifiers → SimpleBits (joint and audit) → saliency maps (optional) → reports,
all tracked under one MLflow parent run.

Each stage is the same function its own subcommand calls, writes into its folder of the run
(ARCHITECTURE.md), and is skipped when its outputs already exist, so an interrupted run resumes
where it stopped. Stage configs are sections of one :class:`RunConfig`; the fully resolved config is
written to the run folder before anything runs.

The data source is part of the config: the rendered demo cohort (``manifest: null``) or any cohort
manifest (``simplebits manifest``). Only the demo has ground truth (``cohort/masks``), so only its
runs get the stages that need it: ground-truth retention and the shortcut flag. Everything else runs
on any cohort.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import Field, model_validator

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.demo.cohort import DemoCohortConfig, generate_cohort
from pipeline.data.ingest import IngestConfig, ingest
from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError
from pipeline.explain.run import ExplainConfig
from pipeline.prior import load_prior
from pipeline.prior.train import PriorConfig
from pipeline.run_folder import RunFolder
from pipeline.runtime.tracking import (
    PARENT_RUN_ENV,
    RUN_ID_NAME,
    Tracker,
    TrackingConfig,
    resolve_tracking_uri,
    without_identifying_columns,
)
from pipeline.simplebits.audit import AuditConfig, ClassifierSpec
from pipeline.simplebits.joint import JointConfig
from pipeline.simplebits.outcomes import IndependentConfig
from pipeline.tasks import (
    DEFAULT_TASKS,
    TaskDefinitions,
    TaskSpec,
    check_task_name,
    get_task,
    merge_settings,
    registered,
    task_labels,
)
from pipeline.training.classifier import ClassifyConfig

log = logging.getLogger(__name__)


class PriorStageConfig(StrictModel):
    """The shipped prior, optionally fine-tuned on the cohort's training radiographs."""

    finetune: bool = True
    settings: PriorConfig = PriorConfig(init="shipped")


class ExplainStageConfig(ExplainConfig):
    """``simplebits explain`` per task after the audits, on the first ``limit`` studies of ``split``
    (the report shows them beside the simplified images). Off by default: even a few studies add
    minutes on a CPU. Every key of ``simplebits explain``'s config (methods, ig.steps, ...) except
    the paths and the task, which come from the run."""

    enabled: bool = False
    split: str | None = "test"
    limit: int | None = Field(8, ge=1)

    @model_validator(mode="after")
    def _paths_come_from_the_run(self) -> "ExplainStageConfig":
        given = [key for key in RUN_EXPLAIN_KEYS if getattr(self, key) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: set by the run (its ingest, classifier/<task>, prior, "
                             "explain/<task> and task), not in the explain section")
        return self


#: ExplainConfig keys the explain stage fills in from the run folder.
RUN_EXPLAIN_KEYS = ("ingest", "classifier", "prior", "out", "task")


class ReportStageConfig(StrictModel):
    # the simplification run whose studies get panels and the cohort report, <setting>-<task>;
    # None: the audit of the first task (joint training of the first joint task if no audit ran)
    simplify: str | None = None
    dicom_secondary_capture: bool = True  # where sources are DICOM (JPEG/PNG have no study to join)
    allow_identity: bool = False  # copy patient identity into the Secondary Captures (off: pseudonyms)
    # send the Secondary Captures to this PACS and confirm them (simplebits export): a DICOMweb root
    # http(s)://HOST/dicom-web or dicom://AET@HOST:PORT; None: keep them on disk only
    pacs_url: str | None = None

    @model_validator(mode="after")
    def _pacs_needs_captures(self) -> "ReportStageConfig":
        if self.pacs_url and not self.dicom_secondary_capture:
            raise ValueError("report.pacs_url needs report.dicom_secondary_capture: true (nothing to send)")
        return self


class RunConfig(StrictModel):
    out: str = "reports/demo"
    # the cohort: a manifest CSV (simplebits manifest), or None to render the demo cohort (``cohort``)
    manifest: str | None = None
    # task names of the registry (pipeline/tasks.py) or of task_definitions below
    tasks: list[str] = list(DEFAULT_TASKS)  # classifiers and audits
    joint_tasks: list[str] = list(DEFAULT_TASKS)
    cohort: DemoCohortConfig = DemoCohortConfig()  # the demo cohort, used without a manifest
    ingest: IngestConfig = IngestConfig()
    prior: PriorStageConfig = PriorStageConfig()
    classify: ClassifyConfig = ClassifyConfig()
    # the check classifier of every SimpleBits run (another seed and architecture, originals only),
    # trained once per task and handed to joint training and the audit by path
    independent: IndependentConfig = IndependentConfig()
    joint: JointConfig = JointConfig()
    audit: AuditConfig = AuditConfig()
    explain: ExplainStageConfig = ExplainStageConfig()  # saliency maps per task (enabled: false)
    # tasks beyond the registry's, or changes to a registered task (merged onto it), e.g.
    # {sex: {settings: {audit: {audit: {lam: 1.0}}}}} or {edema_u1: {column: edema, uncertain: positive}}.
    # Per-task stage settings live in the task (pipeline/tasks.py, TaskSpec.settings): for_task merges
    # them into the four sections above; joint training always uses the task's classify.model, since it
    # starts from that classifier's weights
    task_definitions: TaskDefinitions = {}
    report: ReportStageConfig = ReportStageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _report_run_is_run(self) -> "RunConfig":
        # checked before anything runs, not after an hour of training
        if self.report.simplify:
            setting, _, task = self.report.simplify.rpartition("-")
            runs = {"audit": self.tasks, "joint": self.joint_tasks}
            if task not in runs.get(setting, ()):
                raise ValueError(f"report.simplify {self.report.simplify!r} is not a run of this config "
                                 f"(audits: {list(self.tasks)}, joint: {list(self.joint_tasks)})")
        return self

    @model_validator(mode="after")
    def _known_tasks(self) -> "RunConfig":
        for name in (*self.tasks, *self.joint_tasks):
            check_task_name(name, self.task_definitions)
        return self

    def task(self, task: str) -> TaskSpec:
        """The task's definition: from ``task_definitions``, else the registry."""
        return get_task(task, self.task_definitions)

    def for_task(self, task: str) -> "RunConfig":
        """This config with the task's settings (``TaskSpec.settings``) merged into its sections
        (validated again)."""
        merged = merge_settings(self.model_dump(), self.task(task).settings)
        merged["joint"]["classifier"] = merged["classify"]["model"]
        return RunConfig.model_validate(merged)


@contextlib.contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the previous values."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    log.info("── stage %s", name)
    start = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - start, 1)
    log.info("── stage %s done in %.1f s", name, timings[name])


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns a summary with stage timings and headline metrics."""
    check_manifest(config)  # before anything is written or trained
    folder = RunFolder(config.out)
    folder.root.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, folder.root)
    uri = resolve_tracking_uri(folder.root, config.tracking.uri)
    tracker = Tracker(folder.root, uri=uri, experiment=config.tracking.experiment,
                      enabled=config.tracking.enabled)
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"run": str(folder.root), "tracking_uri": uri}

    # resumed after a kill: the parent run (and with it every stage run) continues where it stopped
    with tracker.run("simplebits-pipeline", params=config.model_dump(mode="json"),
                     resume_file=folder.root / RUN_ID_NAME) as parent:
        # Every stage builds its own Tracker; these make them log to this run's store, nested under the parent.
        with _environment({"MLFLOW_TRACKING_URI": uri, PARENT_RUN_ENV: parent.run_id}):
            with registered(config.task_definitions):  # the stages look tasks up by name
                _run_stages(config, folder, tracker, timings, summary)
        tracker.log_metrics({f"stage_seconds_{k}": v for k, v in timings.items()})
    summary["stage_seconds"] = timings
    return summary


def check_manifest(config: RunConfig) -> None:
    """A user's manifest exists and has the columns every task reads (the demo's always has them)."""
    if not config.manifest:
        return
    path = Path(config.manifest)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found (build one with simplebits manifest)")
    columns = set(pd.read_csv(path, nrows=0).columns)
    for name in dict.fromkeys([*config.tasks, *config.joint_tasks]):
        missing = [c for c in config.task(name).columns if c not in columns]
        if missing:
            raise UserError(f"{path}: task {name!r} needs column(s) {missing}, which this manifest lacks "
                            "(a dataset without that label, or a manifest built before it was mapped)")


def cohort_manifest(config: RunConfig, folder: RunFolder) -> Path:
    """The manifest ingest reads: the user's, or the demo cohort's in the run folder."""
    return Path(config.manifest) if config.manifest else folder.cohort / "manifest.csv"


def ground_truth_masks(config: RunConfig, folder: RunFolder) -> Path | None:
    """The demo cohort's masks, for the stages that need ground truth; None for a manifest's cohort
    (masks left in the folder by an earlier demo run do not belong to it)."""
    return None if config.manifest else folder.masks


def _run_stages(config: RunConfig, folder: RunFolder, tracker: Tracker, timings: dict[str, float],
                summary: dict[str, Any]) -> None:
    manifest = cohort_manifest(config, folder)
    if config.manifest is None:
        with _stage("cohort", timings):
            generate_cohort(config.cohort, folder.cohort)
    # without image_path: real datasets' paths embed their patient and study identifiers
    cohort = read_manifest(manifest).drop(columns=["image_path"])
    target = config.task(config.tasks[0]).column if config.tasks else None
    tracker.log_dataset(cohort, "demo-cohort" if config.manifest is None else "manifest", context="cohort",
                        targets=target if target in cohort.columns else None)
    masks = ground_truth_masks(config, folder)

    with _stage("ingest", timings):
        ingest_config = config.ingest.model_copy(update={"manifest": str(manifest), "out": str(folder.ingest)})
        result = ingest(ingest_config)
        summary["ingest"] = {"ok": result.ok, "error": result.error, "total": result.total}

    with _stage("prior", timings):
        prior_config = config.prior.model_copy(update={"settings": _registered(config.prior.settings, config, "prior")})
        summary["prior"] = _prior_stage(prior_config, folder, tracker, labels=[*config.tasks, *config.joint_tasks])

    prior_path = str(folder.prior_weights)
    for task in config.tasks:
        with _stage(f"classify-{task}", timings):
            from pipeline.training.classifier import train_classifier_run

            task_config = config.for_task(task).classify.model_copy(update={"task": task})
            task_config = _registered(task_config, config, f"classify-{task}")
            summary[f"classifier_{task}"] = _scalars(
                train_classifier_run(folder.ingest, folder.classifier(task), task_config))

    def trained_here(task: str) -> bool:  # else: the user's own check classifier, or none
        spec = config.for_task(task).independent
        return spec.enabled and spec.path is None

    for task in dict.fromkeys([*config.tasks, *config.joint_tasks]):
        if trained_here(task):
            with _stage(f"independent-{task}", timings):
                from pipeline.training.classifier import train_classifier_run

                task_config = config.for_task(task)
                spec = task_config.independent
                independent_config = task_config.classify.model_copy(update={
                    "task": task, "seed": spec.seed, "model": spec.model, "train": spec.train})
                name = f"independent-check-{task}"  # its MLflow run and model say it is not the classifier
                summary[f"independent_{task}"] = _scalars(train_classifier_run(
                    folder.ingest, folder.independent(task), _registered(independent_config, config, name),
                    name=name))

    def independent(task: str) -> IndependentConfig:
        if not trained_here(task):
            return config.for_task(task).independent
        return IndependentConfig(path=str(folder.independent_weights(task)))

    for task in config.joint_tasks:
        with _stage(f"joint-{task}", timings):
            from pipeline.simplebits.joint import run_joint

            # Starting from the trained classifier lets the bpd gate open from the first epochs, which
            # is what makes joint training fit the CPU budget (from scratch it barely simplifies).
            init = folder.classifier_weights(task)
            joint = config.for_task(task).joint
            joint_config = _registered(joint.model_copy(update={
                "task": task, "prior": prior_path, "independent": independent(task),
                "classifier_init": str(init) if init.is_file() else joint.classifier_init}), config, f"joint-{task}")
            summary[f"joint_{task}"] = [_scalars(s) for s in run_joint(
                folder.ingest, folder.simplify("joint", task), joint_config, mask_dir=masks)]

    for task in config.tasks:
        with _stage(f"audit-{task}", timings):
            from pipeline.simplebits.audit import audit_command

            audit_config = _registered(config.for_task(task).audit.model_copy(update={
                "task": task, "prior": prior_path, "independent": independent(task),
                "classifiers": [ClassifierSpec(path=str(folder.classifier_weights(task)))],
            }), config, f"audit-{task}")
            summary[f"audit_{task}"] = _scalars(audit_command(
                folder.ingest, folder.simplify("audit", task), audit_config, mask_dir=masks))

    for task in config.tasks:  # the audited tasks: their classifiers are the run's
        explain = config.for_task(task).explain
        if explain.enabled:
            with _stage(f"explain-{task}", timings):
                summary[f"explain_{task}"] = _explain_stage(explain, folder, task, tracker)

    with _stage("reports", timings):
        summary["report"] = _report_stage(config, folder, tracker)


def _explain_stage(config: ExplainStageConfig, folder: RunFolder, task: str, tracker: Tracker) -> dict[str, Any]:
    """The saliency maps of the task's classifier into ``explain/<task>`` (resumed map by map), with
    each method's seconds per study logged to MLflow."""
    from pipeline.explain.run import MAPS_NAME, run_explain

    paths = {"ingest": folder.ingest, "classifier": folder.classifier_weights(task), "prior": folder.prior_weights,
             "out": folder.explain(task)}
    explain_config = ExplainConfig.model_validate({
        **config.model_dump(exclude={"enabled"}), **{k: str(v) for k, v in paths.items()}, "task": task})
    summary = run_explain(explain_config)
    with tracker.run(f"explain-{task}", params=explain_config.model_dump(mode="json", exclude=set(paths)),
                     tags={"stage": "explain"}):
        tracker.log_metrics({f"seconds_per_study_{method}": numbers["seconds_per_study"]
                             for method, numbers in summary["methods"].items()})
        tracker.log_artifact(folder.explain(task) / MAPS_NAME)
    return _scalars(summary)


def _prior_stage(config: PriorStageConfig, folder: RunFolder, tracker: Tracker,
                 labels: Iterable[str] = ()) -> dict[str, Any]:
    """The run's prior (shipped, or fine-tuned on the cohort) and its per-study bpd table (carrying the
    label columns of the tasks ``labels``), with the mean bpd per label of each of those tasks, its
    label policy applied (e.g. ``mean_bpd_effusion_1``, ``mean_bpd_sex_0``)."""
    from pipeline.prior import read_prior_info, save_prior
    from pipeline.prior.data import load_radiographs
    from pipeline.prior.evaluate import bpd_table
    from pipeline.prior.train import train_prior
    from pipeline.runtime.device import pick_device

    if not folder.prior_weights.is_file():
        if config.finetune:
            radiographs, _ = load_radiographs(folder.ingest, split="train")
            val_radiographs, _ = load_radiographs(folder.ingest, split="val")
            train_prior(config.settings, folder.prior, radiographs, val_radiographs,
                        command="simplebits run (prior stage: fine-tune of the shipped prior)")
        else:
            save_prior(load_prior(None), folder.prior_weights,
                       {**read_prior_info(None), "note": "the shipped prior, used as is (prior.finetune: false)"})
    table_path = folder.prior / "bpd.csv"
    if not table_path.is_file():
        device = pick_device()
        images, frame = load_radiographs(folder.ingest)
        bpd_table(load_prior(folder.prior_weights, device=device), images, frame, device=device,
                  tasks=labels).to_csv(table_path, index=False)
    table = pd.read_csv(table_path)
    metrics = {"mean_bpd": float(table["bpd"].mean())}
    for task in dict.fromkeys(labels):
        if not set(get_task(task).columns) <= set(table.columns):  # a table of an earlier run's tasks
            continue
        for value, mean in table.groupby(task_labels(table, task))["bpd"].mean().items():  # unlabelled left out
            metrics[f"mean_bpd_{task}_{_value_name(value)}"] = float(mean)
    with tracker.run("prior-bpd", params={"finetune": config.finetune}, tags={"stage": "prior"}):
        tracker.log_metrics(metrics)
        if not config.finetune:  # the shipped prior used as is (a fine-tune is logged by its own run)
            tracker.log_model("prior", folder.prior_weights, name="prior",
                              register=config.settings.tracking.register_as)
        tracker.log_table(table, "bpd.json")
        tracker.log_artifact(table_path)
    return metrics


def _registered(section: Any, config: RunConfig, stage: str) -> Any:
    """A stage's config registering its network as ``<tracking.register_as>-<stage>`` when the run's
    ``tracking.register_as`` is set (unchanged otherwise)."""
    if not config.tracking.register_as:
        return section
    tracking = section.tracking.model_copy(update={"register_as": f"{config.tracking.register_as}-{stage}"})
    return section.model_copy(update={"tracking": tracking})


def _value_name(value: Any) -> str:
    """A label value as a metric-name part: 1.0 -> "1", "M" -> "M"."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def report_simplification(config: RunConfig) -> str:
    """The simplification run the report shows: the configured one, else the first task's audit, else
    the first joint task's joint run."""
    if config.report.simplify:
        return config.report.simplify
    if config.tasks:
        return f"audit-{config.tasks[0]}"
    if config.joint_tasks:
        return f"joint-{config.joint_tasks[0]}"
    raise UserError("report: no simplification run to show (tasks and joint_tasks are both empty)")


def _report_stage(config: RunConfig, folder: RunFolder, tracker: Tracker) -> dict[str, Any]:
    from pipeline.report.html import write_run_cohort_report
    from pipeline.report.study import write_run_study_reports

    name = folder.pick_simplification(report_simplification(config))
    write_run_study_reports(folder.root, name)
    captures = None
    if config.report.dicom_secondary_capture:
        from pipeline.io.dicom_write import write_run_secondary_captures

        captures = write_run_secondary_captures(folder.root, name, allow_identity=config.report.allow_identity)
    write_run_cohort_report(folder.root, name, sweep=_tradeoff_table(folder.root / "simplify" / name, name),
                            secondary_captures=captures)
    tracker.log_study_reports(folder.root / "studies")
    tracker.log_artifact(folder.root / "cohort_report", "cohort_report")
    table = pd.read_parquet(folder.root / "cohort_report" / "studies.parquet")
    tracker.log_dataset(table, f"study-table-{name}", context="analysis")
    tracker.log_table(without_identifying_columns(table), "studies.json")
    summary = {"simplify": name, "secondary_captures": None if captures is None else len(captures)}
    if config.report.pacs_url:
        from pipeline.io.pacs import send_run

        summary["pacs"] = send_run(folder.root, config.report.pacs_url,
                                   allow_identity=config.report.allow_identity)
    return summary


def _tradeoff_table(sim_dir: Path, name: str) -> pd.DataFrame | None:
    """bpd vs AUROC for the report's trade-off plot: the run (or its lambda sweep) and the baselines
    matched to its bpd (``method, lam|strength, mean_bpd, auroc, auroc_orig``)."""
    metrics_path = sim_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    sweep_path = sim_dir / "sweep.csv"
    rows = [pd.read_csv(sweep_path)] if sweep_path.is_file() else [pd.DataFrame([{
        "method": f"simplebits-{name.split('-')[0]}", "lam": metrics.get("lam"),
        "mean_bpd": metrics.get("val_bpd_simpl"), "auroc": metrics.get("val_auroc_simpl")}])]
    baselines_path = sim_dir / "baselines.csv"
    if baselines_path.is_file():
        baselines = pd.read_csv(baselines_path)
        # the table's own SimpleBits row is the run itself, already in ``rows``
        keep = baselines["reached"].astype(bool) & ~baselines["method"].str.startswith("simplebits")
        rows.append(baselines.loc[keep, ["method", "strength", "mean_bpd", "auroc"]])
    table = pd.concat(rows, ignore_index=True)
    table["auroc_orig"] = metrics.get("val_auroc_orig")
    return table


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers only (no per-epoch history) for the printed summary."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and k != "history"}


def print_where_to_look(summary: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    root = Path(summary["run"])
    echo("")
    echo(f"Done: {root}")
    echo(f"  cohort report : {root / 'cohort_report' / 'index.html'}")
    echo(f"  study panels  : {root / 'studies'}/<study>/panel.png")
    if any(key.startswith("explain_") for key in summary):
        echo(f"  saliency maps : {root / 'studies'}/<study>/explain.png (all maps: {root / 'explain'}/<task>/)")
    echo(f"  MLflow UI     : .venv/bin/mlflow ui --backend-store-uri {summary['tracking_uri']} --port 5000")
    echo(f"  review page   : .venv/bin/simplebits review {root}")
    if shutil.which("xdg-open"):
        echo(f"  open report   : xdg-open {root / 'cohort_report' / 'index.html'}")
