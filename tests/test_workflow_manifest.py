"""``simplebits run --manifest`` as a new user runs it, on the three real dataset layouts.

Each layout (demo renders written as CheXpert, MIMIC-CXR-JPG or NIH files, tests/conftest.py
``demo_renders``) gets one ``simplebits manifest`` and one ``simplebits run --manifest`` with tiny
settings; the run must give the cohort report, the review page's data and one MLflow store, with
tasks effusion, sex and one more finding, and no dataset identifier in what it reports or logs.
Every layout runs every stage for every task (about 40 s each on two cores at 32 px, one epoch).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cohort_fixtures import TINY_RUN_BASICS

from pipeline.cli import main
from pipeline.data.demo.dataset_layouts import write_demo_layout
from pipeline.report.review.server import ReviewApp

#: The third task per layout: the demo's burned-in mark as Support Devices; NIH has no such label,
#: and No Finding is the one other finding the demo's ground truth decides there.
THIRD_TASK = {"chexpert": "support_devices", "mimic-cxr-jpg": "support_devices", "nih": "no_finding"}
TINY = [
    *TINY_RUN_BASICS,
    "independent.train.epochs=1",
    "joint.train.epochs=1",
    "joint.evaluate.retrain_train.epochs=1",
    "joint.evaluate.baselines=[blur]",
    "audit.train.epochs=1",
    "audit.evaluate.retrain_train.epochs=1",
    "audit.evaluate.baselines=[blur]",
]


def _identifiers(layout: str, root: Path) -> set[str]:
    """The dataset's own patient/study/image identifiers, as they appear in its label files."""
    if layout == "chexpert":
        paths = pd.read_csv(root / "train.csv")["Path"]
        return {m for p in paths for m in re.findall(r"patient\d{5}", p)}
    if layout == "mimic-cxr-jpg":
        meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", dtype=str)
        return set(meta["dicom_id"]) | {f"p{s}" for s in meta["subject_id"]} | {f"s{s}" for s in meta["study_id"]}
    return set(pd.read_csv(root / "Data_Entry_2017.csv", index_col=False)["Image Index"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(THIRD_TASK))
def test_manifest_then_run(layout, demo_renders, tmp_path, capsys):
    root = write_demo_layout(layout, tmp_path / layout, cohort_dir=demo_renders)
    manifest = tmp_path / "manifest.csv"
    assert main(["manifest", "--format", layout, "--root", str(root), "--out", str(manifest)]) == 0
    capsys.readouterr()

    out = tmp_path / "run"
    tasks = ["effusion", "sex", THIRD_TASK[layout]]
    overrides = [arg for item in TINY for arg in ("--set", item)]
    assert main(["run", "--manifest", str(manifest), "--tasks", ",".join(tasks), "--out", str(out), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nDone: ")[0])
    assert "cohort" not in summary["stage_seconds"], "a manifest's cohort is not rendered"
    assert summary["ingest"]["ok"] == summary["ingest"]["total"] == len(pd.read_csv(manifest))
    # the prior's mean bpd per label of each task
    assert {f"mean_bpd_{task}_{label}" for task in tasks for label in (0, 1)} <= set(summary["prior"])

    # every task: a classifier, its independent check, joint training (--tasks sets joint_tasks too) and an audit
    for task in tasks:
        assert (out / "classifier" / task / "metrics.json").is_file(), task
        assert (out / "classifier" / f"{task}-independent" / "model.safetensors").is_file(), task
        metrics = json.loads((out / "simplify" / f"audit-{task}" / "metrics.json").read_text())
        assert "val_auroc_orig" in metrics
        # no ground truth for a manifest's cohort: no retention, no shortcut flag
        assert not any("retention" in key or "shortcut" in key for key in metrics), task
    assert sorted(p.name for p in (out / "simplify").glob("joint-*")) == sorted(f"joint-{t}" for t in tasks)

    # the cohort report, for the first task's audit, saying why there are no Secondary Captures
    page = (out / "cohort_report" / "index.html").read_text()
    assert "classifier task: effusion" in page and "audit simplification" in page
    assert "JPEG/PNG files" in page and "No ground-truth checks" in page
    assert not (out / "dicom_sc").exists()
    assert summary["report"] == {"simplify": "audit-effusion", "secondary_captures": 0}

    # the review page's data: one record per reported study
    studies = ReviewApp(out).studies()
    reported = pd.read_csv(out / "simplify" / "audit-effusion" / "predictions.csv")
    assert sorted(s["study_id"] for s in studies) == sorted(reported["study_id"])
    assert {s["task"] for s in studies} == {"effusion"}

    # one MLflow store, the run's, with every stage nested under the pipeline run
    assert [p.relative_to(out) for p in out.rglob("mlflow.db")] == [Path("mlflow.db")]
    with sqlite3.connect(out / "mlflow.db") as db:
        names = dict(db.execute("select run_uuid, name from runs").fetchall())
        parents = dict(db.execute("select run_uuid, value from tags where key='mlflow.parentRunId'").fetchall())
    (parent,) = [run for run, name in names.items() if name == "simplebits-pipeline"]
    assert set(parents.values()) == {parent} and set(parents) == set(names) - {parent}

    # the dataset's identifiers reach neither the reports nor MLflow
    identifiers = _identifiers(layout, root)
    assert identifiers
    outputs = [out / "mlflow.db", *(p for d in ("mlartifacts", "cohort_report", "studies")
                                    for p in (out / d).rglob("*") if p.is_file())]
    leaks = {i for path in outputs for i in identifiers if i.encode() in path.read_bytes()}
    assert not leaks, sorted(leaks)[:5]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("simplebits: error: ") and "\n" not in err, err
    return err


def test_missing_manifest_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--manifest", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert "nope.csv: manifest not found" in _one_line_error(capsys)
    assert not out.exists(), "nothing is written before the inputs are checked"


def test_task_without_its_column_is_one_line(demo_renders, tmp_path, capsys):
    root = write_demo_layout("nih", tmp_path / "nih", cohort_dir=demo_renders)
    manifest = tmp_path / "manifest.csv"
    assert main(["manifest", "--format", "nih", "--root", str(root), "--out", str(manifest)]) == 0
    out = tmp_path / "run"
    # NIH has no Support Devices label
    assert main(["run", "--manifest", str(manifest), "--tasks", "effusion,support_devices", "--out", str(out)]) == 2
    assert "task 'support_devices' needs column(s) ['support_devices']" in _one_line_error(capsys)
    assert not out.exists()


def test_report_of_a_run_that_is_not_run_is_a_config_error(tmp_path, capsys):
    assert main(["run", "--tasks", "sex", "--set", "report.simplify=audit-effusion", "--out", str(tmp_path)]) == 2
    assert "report.simplify 'audit-effusion' is not a run of this config" in _one_line_error(capsys)


def test_tasks_flag_takes_a_task_that_the_config_defines(tmp_path, capsys):
    # --tasks is checked against the registry *and* the run's task_definitions (here from --set)
    defined = ["--set", "task_definitions={edema_u1: {column: edema, uncertain: positive}}"]
    with pytest.raises(SystemExit) as exit_:  # --print-config exits like --help
        main(["run", "--tasks", "edema_u1", *defined, "--out", str(tmp_path), "--print-config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tasks"] == ["edema_u1"] and printed["joint_tasks"] == ["edema_u1"]
    assert main(["run", "--tasks", "edema_u2", *defined, "--out", str(tmp_path), "--print-config"]) == 2
    assert "unknown task 'edema_u2'" in _one_line_error(capsys)
