"""``--run DIR``: single-step commands build the same run-folder layout, and log to one MLflow store,
as ``simplebits run``; ``report`` picks a finished simplification run or says in one line that none exists."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.run_folder import RunFolder


def _finished(root: Path, *names: str) -> None:
    """Mark simplification runs as finished the way the report reads them (predictions + simplified store)."""
    for name in names:
        (root / "simplify" / name / "simplified").mkdir(parents=True)
        (root / "simplify" / name / "predictions.csv").write_text("study_id\n")


def test_report_prefers_the_audit(tmp_path):
    _finished(tmp_path, "joint-effusion", "audit-sex", "audit-effusion")
    (tmp_path / "simplify" / "joint-sex").mkdir()  # started, never finished
    folder = RunFolder(tmp_path)
    assert folder.finished_simplifications() == ["audit-effusion", "audit-sex", "joint-effusion"]
    assert folder.pick_simplification() == "audit-effusion"
    assert folder.pick_simplification("joint-effusion") == "joint-effusion"
    with pytest.raises(UserError, match="joint-sex: no finished simplification run.*finished here: audit-effusion"):
        folder.pick_simplification("joint-sex")


def test_only_an_audit(tmp_path):
    _finished(tmp_path, "audit-cardiomegaly")
    assert RunFolder(tmp_path).pick_simplification() == "audit-cardiomegaly"


def test_report_without_a_simplification_is_one_line(tmp_path, capsys):
    (tmp_path / "ingest").mkdir()
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no finished simplification run" in err and str(tmp_path) in err


@pytest.mark.parametrize("argv, flag", [
    (["classify", "train", "--task", "effusion"], "--ingest"),
    (["ingest", "--manifest", "m.csv"], "--out"),
    (["simplify", "audit", "--task", "effusion", "--classifier", "w.safetensors"], "--ingest"),
])
def test_missing_paths_without_run_are_one_line(argv, flag, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{flag} is required (or give --run DIR" in err


@pytest.mark.slow
def test_single_steps_build_the_run_layout(demo_renders, tmp_path):
    from pipeline.data.demo.dataset_layouts import write_demo_layout
    from pipeline.report.review.server import ReviewApp

    root = write_demo_layout("nih", tmp_path / "nih", cohort_dir=demo_renders)
    manifest = tmp_path / "manifest.csv"
    assert main(["manifest", "--format", "nih", "--root", str(root), "--out", str(manifest)]) == 0
    run = tmp_path / "run"
    steps = [
        ["ingest", "--manifest", str(manifest), "--size", "32"],
        ["prior", "bpd"],
        ["classify", "train", "--task", "effusion", "--set", "train.epochs=1"],
        ["simplify", "train", "--task", "effusion", "--set", "train.epochs=1", "--set", "evaluate.baselines=[blur]",
         "--set", "evaluate.retrain=false", "--set", "independent.train.epochs=1"],
        ["simplify", "audit", "--task", "effusion", "--set", "train.epochs=1", "--set", "evaluate.baselines=[blur]",
         "--set", "independent.train.epochs=1"],
        ["apply", "--task", "effusion", "--num-workers", "0"],
        ["report"],  # picks the audit over joint training
    ]
    for argv in steps:
        assert main([*argv, "--run", str(run)]) == 0, argv
    folder = RunFolder(run)
    for path in [folder.ingest / "status.csv", folder.prior / "bpd.csv", folder.classifier_weights("effusion"),
                 folder.simplify("audit", "effusion") / "predictions.csv", folder.apply("effusion") / "metrics.json",
                 run / "cohort_report" / "index.html"]:
        assert path.is_file(), path
    # joint training started from, and the audit explained, the weights the classifier step wrote
    for setting in ("joint", "audit"):
        resolved = (folder.simplify(setting, "effusion") / "config.resolved.yaml").read_text()
        assert str(folder.classifier_weights("effusion")) in resolved, setting
    assert yaml.safe_load((run / "cohort_report" / "report.config.yaml").read_text())["simplify"] == "audit-effusion"
    assert ReviewApp(run).studies()
    # one MLflow store for every step
    assert [p.relative_to(run) for p in run.rglob("mlflow.db")] == [Path("mlflow.db")]
    with sqlite3.connect(run / "mlflow.db") as db:
        names = {name for (name,) in db.execute("select name from runs")}
    assert {"apply", "report-audit-effusion"} <= names
    assert any("classif" in n for n in names) and any("audit" in n for n in names if n != "report-audit-effusion")
