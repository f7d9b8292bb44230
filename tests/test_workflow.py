"""The README's main job on a tiny config: every stage runs, outputs land, and no PHI escapes.

The demo DICOMs carry synthetic but realistic patient names, IDs and birth dates in their headers;
none of them may appear in any output (reports, tables, logs, the MLflow store and its artifacts,
Secondary Captures, review API responses).
"""

import io
import json
import logging
import sqlite3
from pathlib import Path

import pydicom
import pytest
from cohort_fixtures import TINY_RUN_BASICS

from pipeline.config import default_config_path, load_config
from pipeline.workflow import RunConfig, run_pipeline

TINY = [
    "tasks=[effusion]",
    "joint_tasks=[effusion]",
    "cohort.n=48",
    "cohort.size=64",
    "cohort.seed=3",
    *TINY_RUN_BASICS,
    "joint.train.epochs=1",
    "audit.train.epochs=1",
    "audit.independent.train.epochs=1",
    "audit.evaluate.baselines=[blur]",
    "explain.enabled=true",  # off by default; here on so that its outputs are checked for PHI too
    "explain.methods=[ig,gradcam]",
    "explain.limit=2",
    "explain.ig.steps=4",
    "tracking.register_as=tiny",  # each stage's network registered as tiny-<stage>-<task>
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Runs the pipeline once; returns (run folder, summary, everything logged while it ran)."""
    out = tmp_path_factory.mktemp("run")
    config = load_config(RunConfig, default_config_path("run"), [*TINY, f"out={out}"])
    log_text = io.StringIO()
    handler = logging.StreamHandler(log_text)
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.DEBUG)
    try:
        summary = run_pipeline(config)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    return out, summary, log_text.getvalue()


@pytest.mark.slow
def test_every_stage_writes_its_outputs(tiny_run):
    out, summary, _ = tiny_run
    for rel in [
        "config.resolved.yaml", "mlflow.db", "cohort/manifest.csv", "ingest/status.csv",
        "prior/prior.safetensors", "prior/bpd.csv", "classifier/effusion/model.safetensors",
        "simplify/joint-effusion/metrics.json", "simplify/audit-effusion/predictions.csv",
        "cohort_report/index.html", "cohort_report/studies.parquet",
    ]:
        assert (out / rel).is_file(), rel
    panels = list((out / "studies").glob("*/panel.png"))
    assert panels, "no per-study panels"
    assert set(summary["stage_seconds"]) >= {"cohort", "ingest", "prior", "explain-effusion", "reports"}
    assert (out / "explain" / "effusion" / "maps.csv").is_file()
    assert len(list((out / "studies").glob("*/explain.png"))) == 2  # the 2 explained test studies
    assert 'id="saliency-maps"' in (out / "cohort_report" / "index.html").read_text()


@pytest.mark.slow
def test_mlflow_has_parent_and_nested_stage_runs(tiny_run):
    out, _, _ = tiny_run
    with sqlite3.connect(out / "mlflow.db") as db:
        runs = dict(db.execute("select run_uuid, name from runs").fetchall())
        parents = dict(db.execute("select run_uuid, value from tags where key='mlflow.parentRunId'").fetchall())
        metrics = db.execute("select count(*) from metrics").fetchone()[0]
        models = dict(db.execute("select name, source_run_id from logged_models").fetchall())
        registered = {name for (name,) in db.execute("select name from registered_models")}
    (parent_id,) = [k for k, v in runs.items() if v == "simplebits-pipeline"]
    children = {runs[k] for k, v in parents.items() if v == parent_id}
    assert any(name.startswith("prior") for name in children), children
    # the classifier and its independent check say which is which
    assert {"classify-effusion", "independent-check-effusion"} <= children, children
    # every trained network is an MLflow Model of the run that trained it
    for name in ("classify-effusion", "independent-check-effusion", "simplify-audit-effusion"):
        assert runs[models[name]] == name, (name, models)
    assert runs[models["prior"]] in ("prior", "prior-bpd")  # its fine-tune, or the shipped prior used as is
    assert any(name.startswith("simplify-joint-effusion") and name.endswith("-classifier") for name in models)
    assert registered == {"tiny-prior", "tiny-classify-effusion", "tiny-independent-check-effusion",
                          "tiny-joint-effusion", "tiny-joint-effusion-classifier", "tiny-audit-effusion"}
    assert any("joint" in name for name in children), children
    assert any("audit" in name for name in children), children
    assert "explain-effusion" in children, children
    assert metrics > 0


def _phi_strings(dicom_dir: Path) -> set[str]:
    values: set[str] = set()
    for path in dicom_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.PatientName)
        values |= {name, str(ds.PatientID), str(ds.PatientBirthDate)}
        values |= {part for part in name.split("^") if len(part) >= 4}
    return {v for v in values if v and v != "None"}


@pytest.mark.slow
def test_no_phi_reaches_any_output(tiny_run):
    out, summary, log_text = tiny_run
    phi = _phi_strings(out / "cohort" / "dicom")
    assert len(phi) > 10, "the demo DICOMs must carry synthetic identities for this test to mean anything"
    haystacks = [json.dumps(summary, default=str).encode()]
    for path in out.rglob("*"):
        if path.is_file() and "cohort/dicom" not in path.as_posix():
            haystacks.append(path.read_bytes())
    haystacks.append(log_text.encode())
    leaks = {value for value in phi for blob in haystacks if value.encode() in blob}
    assert not leaks, f"identifiers leaked into outputs: {sorted(leaks)[:5]}"


def test_resolved_config_loads_back(tmp_path):
    config = load_config(RunConfig, default_config_path("run"), [f"out={tmp_path}"])
    assert config.cohort.distractor.mode == "independent"
    assert config.prior.settings.init == "shipped"


def test_task_settings_apply_to_their_task_only(tmp_path):
    # a change to a registered task's settings (task_definitions) merges onto its registry entry
    config = load_config(RunConfig, default_config_path("run"),
                         [f"out={tmp_path}", "task_definitions.sex.settings.audit.audit.lam=2.5"])
    sex, effusion = config.for_task("sex"), config.for_task("effusion")
    # a new network replaces the old spec whole (the NF-WRN's kwargs would not fit a ResNet) ...
    assert sex.classify.model.name == "monai_resnet18_gn" and sex.classify.model.kwargs == {}
    assert sex.independent.model.name == "monai_densenet121"
    # ... other settings merge, and joint training uses the task's classifier network
    assert sex.classify.train.lr_schedule == "cosine" and sex.classify.train.epochs == config.classify.train.epochs
    assert sex.joint.classifier == sex.classify.model
    assert sex.audit.audit.lam == 2.5 and sex.audit.audit.tau == 0.01 and sex.audit.train == config.audit.train
    assert effusion.classify == config.classify and effusion.audit == config.audit
    assert effusion.joint.classifier == config.classify.model
    assert RunConfig(out=str(tmp_path)).for_task("sex").audit.audit.lam == 0.5  # the registry's own value


def test_standalone_commands_use_the_task_settings_of_the_run():
    # one place for per-task settings: the registry; classify train --task sex needs no config file
    from pipeline.simplebits.audit import AuditConfig
    from pipeline.simplebits.joint import JointConfig
    from pipeline.tasks import apply_stage_settings
    from pipeline.training.classifier import ClassifyConfig

    run = RunConfig().for_task("sex")
    assert apply_stage_settings(ClassifyConfig(task="sex"), "classify") == run.classify.model_copy(
        update={"task": "sex"})
    joint = apply_stage_settings(JointConfig(task="sex"), "joint")
    assert joint.classifier == run.classify.model and joint.independent == run.independent
    audit = apply_stage_settings(AuditConfig(task="sex"), "audit")
    assert audit.audit == run.audit.audit and audit.independent == run.independent
    assert apply_stage_settings(ClassifyConfig(), "classify") == ClassifyConfig()  # effusion: none


def test_unknown_task_is_a_config_error(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="unknown task 'cardiomegally'; known tasks: no_finding"):
        load_config(RunConfig, default_config_path("run"), [f"out={tmp_path}", "tasks=[effusion,cardiomegally]"])
    config = load_config(RunConfig, default_config_path("run"), [
        f"out={tmp_path}", "tasks=[edema_u1]", "joint_tasks=[]",
        "task_definitions={edema_u1: {column: edema, uncertain: positive}}"])
    assert config.task("edema_u1").uncertain == "positive" and config.for_task("edema_u1").classify == config.classify


@pytest.mark.slow
def test_demo_keeps_its_ground_truth_checks_and_captures(tiny_run):
    # the demo cohort is the one source with masks and DICOM files: retention, the shortcut flag and
    # Secondary Captures stay on for it (a manifest's cohort: tests/test_workflow_manifest.py)
    out, summary, _ = tiny_run
    metrics = json.loads((out / "simplify" / "audit-effusion" / "metrics.json").read_text())
    assert any("distractor_retention" in key for key in metrics) and any("shortcut" in key for key in metrics)
    assert summary["report"]["simplify"] == "audit-effusion" and summary["report"]["secondary_captures"] > 0
    page = (out / "cohort_report" / "index.html").read_text()
    assert "written as DICOM Secondary Captures" in page and "No ground-truth checks" not in page
