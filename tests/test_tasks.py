"""The task registry (pipeline/tasks.py): findings, label policies, lookup errors, user tasks, per-task settings."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import tasks
from pipeline.errors import UserError
from pipeline.tasks import (
    CHEXPERT_FINDINGS,
    FINDINGS,
    NIH_FINDINGS,
    TaskSpec,
    define_tasks,
    get_task,
    parse_tasks,
    task_labels,
    task_names,
)


def frame() -> pd.DataFrame:
    """Six studies, raw codes as read_manifest gives them (Int64) and as text (ingest folders, CSVs)."""
    return pd.DataFrame({
        "effusion": pd.array([1, 0, -1, None, 0, 1], dtype="Int64"),
        "no_finding": pd.array([0, 1, 0, 1, 0, None], dtype="Int64"),
        "cardiomegaly": ["1", "0", "-1.0", "", "0.0", "1.0"],
        "sex": ["M", "F", "", "m", "F", "U"],
        "age": [70.0, 64.9, 65.0, np.nan, 18.0, 99.0],
        "view": ["AP", "PA", "LATERAL", "", "ap", "PA"],
    })


def labels(task, data: pd.DataFrame | None = None) -> list:
    return [None if np.isnan(v) else int(v) for v in task_labels(frame() if data is None else data, task)]


def test_findings_are_chexperts_14_and_nihs_14_plus_no_finding():
    assert len(CHEXPERT_FINDINGS) == 14 and len(NIH_FINDINGS) == 15
    assert set(FINDINGS) == set(CHEXPERT_FINDINGS.values()) | set(NIH_FINDINGS.values())
    assert len(FINDINGS) == 21 and FINDINGS[0] == "no_finding" and "effusion" in FINDINGS
    assert CHEXPERT_FINDINGS["Pleural Effusion"] == NIH_FINDINGS["Effusion"] == "effusion"
    assert NIH_FINDINGS["Pleural_Thickening"] == "pleural_thickening"
    assert all(f == f.lower() and " " not in f for f in FINDINGS)
    names = task_names()
    assert set(FINDINGS) <= set(names)  # every finding is a task
    assert {"effusion_paper", "sex", "age_65", "view_ap"} <= set(names)
    assert tasks.DEFAULT_TASKS == ("effusion", "sex")


@pytest.mark.parametrize("task, expected", [
    ("effusion", [1, 0, None, None, 0, 1]),  # uncertain dropped, blank unlabeled
    ("cardiomegaly", [1, 0, None, None, 0, 1]),  # the same from text codes
    ("effusion_paper", [1, 0, None, None, None, 1]),  # negatives need No Finding == 1
    (TaskSpec(name="u1", column="effusion", uncertain="positive"), [1, 0, 1, None, 0, 1]),
    (TaskSpec(name="u0", column="effusion", uncertain="negative", blank="negative"), [1, 0, 0, 0, 0, 1]),
    (TaskSpec(name="b0", column="cardiomegaly", blank="negative", negative_requires=["no_finding"]),
     [1, 0, None, 0, None, 1]),
    ("sex", [1, 0, None, 1, 0, None]),  # M = 1, F = 0, unknown unlabeled
    ("age_65", [1, 0, 1, None, 0, 1]),  # age >= 65
    ("view_ap", [1, 0, None, None, 1, 0]),  # AP = 1, PA = 0, other views unlabeled
    (TaskSpec(name="age_40", kind="age", age_threshold=40), [1, 1, 1, None, 0, 1]),
])
def test_label_policies(task, expected):
    assert labels(task) == expected
    assert task_labels(frame(), task).dtype == np.float64


def test_labels_keep_the_frames_index_and_name_missing_columns():
    data = frame().set_index(pd.Index([f"std-{i}" for i in range(6)]))
    assert task_labels(data, "effusion").index.tolist() == data.index.tolist()
    with pytest.raises(UserError, match=r"task 'edema' needs manifest column\(s\) \['edema'\]"):
        task_labels(frame(), "edema")
    with pytest.raises(UserError, match=r"'effusion_paper' needs manifest column\(s\) \['no_finding'\]"):
        task_labels(frame().drop(columns="no_finding"), "effusion_paper")


def test_unknown_task_is_one_line_naming_the_known_ones():
    with pytest.raises(UserError) as err:
        get_task("cardiomegally")
    message = str(err.value)
    assert message.startswith("unknown task 'cardiomegally'; known tasks: no_finding, ")
    assert "\n" not in message and "effusion, " in message and "sex" in message
    with pytest.raises(UserError, match="unknown task 'x'"):
        parse_tasks("effusion,x")
    assert parse_tasks(" effusion, cardiomegaly,sex,effusion ") == ["effusion", "cardiomegaly", "sex"]
    assert parse_tasks(["sex"]) == ["sex"]
    with pytest.raises(UserError, match="no task given"):
        parse_tasks(" , ")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown task 'x'; known tasks"):
        tasks.task_argument("x")
    assert tasks.tasks_argument("effusion,view_ap") == ["effusion", "view_ap"]


def test_cli_unknown_task_exits_2_with_one_line(capsys, tmp_path):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["classify", "train", "--task", "cardiomegally", "--ingest", str(tmp_path), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --task: unknown task 'cardiomegally'; known tasks: no_finding" in err


@pytest.mark.parametrize("fields, reason", [
    ({"name": "Bad Name"}, "lower-case letters"),
    ({"name": "x", "column": "cardiomegally"}, "not a finding column"),
    ({"name": "x", "kind": "age"}, "age_threshold is required"),
    ({"name": "effusion", "age_threshold": 3}, "only for, an age task"),
    ({"name": "x", "kind": "sex", "column": "age"}, "reads column 'sex'"),
    ({"name": "x", "column": "edema", "negative_requires": ["nothing"]}, "not finding columns"),
    ({"name": "x", "kind": "view", "positive_view": "pa", "negative_view": "PA"}, "must differ"),
    ({"name": "edema", "uncertain": "maybe"}, "uncertain"),
    ({"name": "edema", "settings": {"prior": {}}}, "settings"),
])
def test_bad_definitions_are_rejected(fields, reason):
    with pytest.raises(ValueError, match=reason):
        TaskSpec.model_validate(fields)


def test_definitions_merge_onto_registered_tasks_and_add_new_ones():
    defined = define_tasks({
        "sex": {"settings": {"audit": {"audit": {"lam": 1.0}}}},
        "edema_u1": {"column": "edema", "uncertain": "positive"},
        "old": {"kind": "age", "age_threshold": 80},
    })
    sex = defined["sex"]
    assert sex.settings["audit"]["audit"] == {"lam": 1.0, "tau": 0.01}  # merged, not replaced
    assert sex.settings["classify"] == get_task("sex").settings["classify"]
    assert defined["edema_u1"].column == "edema" and defined["old"].label_names == ("age < 80", "age >= 80")
    with pytest.raises(UserError, match="unknown task 'edema_u1'"):
        get_task("edema_u1")  # defined, not registered
    assert get_task("edema_u1", defined).uncertain == "positive"
    with tasks.registered(defined):
        assert get_task("edema_u1").uncertain == "positive" and get_task("sex").settings["audit"]["audit"]["lam"] == 1.0
    assert "edema_u1" not in task_names() and get_task("sex").settings["audit"]["audit"]["lam"] == 0.5
    with pytest.raises(UserError, match=r"task 'bad': .*not a finding column"):
        define_tasks({"bad": {"column": "nothing"}})


def test_register_task_and_the_environments_task_file(tmp_path, monkeypatch):
    spec = tasks.register_task({"name": "pneumothorax_u1", "column": "pneumothorax", "uncertain": "positive"})
    try:
        assert get_task("pneumothorax_u1") is spec
        with pytest.raises(UserError, match="already registered"):
            tasks.register_task(spec.model_copy(update={"uncertain": "negative"}))
    finally:
        tasks._registry.pop("pneumothorax_u1")
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"nodule_strict": {"column": "nodule", "negative_requires": ["no_finding"]}}))
    monkeypatch.setenv(tasks.TASKS_ENV, str(path))
    try:
        assert get_task("nodule_strict").negative_requires == ["no_finding"]
        assert parse_tasks("effusion,nodule_strict") == ["effusion", "nodule_strict"]
    finally:
        monkeypatch.delenv(tasks.TASKS_ENV)
        tasks._registry.pop("nodule_strict", None)
    monkeypatch.setenv(tasks.TASKS_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="missing.yaml: task file not found"):
        task_names()
    monkeypatch.delenv(tasks.TASKS_ENV)
    task_names()  # the registry reads the (now unset) variable again


def test_names_for_readers():
    assert get_task("effusion").label_names == ("no effusion", "effusion")
    assert get_task("effusion").text == "pleural effusion"
    assert get_task("support_devices").label_names == ("no support devices", "support devices")
    assert get_task("sex").label_names == ("female", "male") and get_task("sex").text == "the patient's sex"
    assert get_task("view_ap").label_names == ("PA", "AP")
    assert get_task("no_finding").label_names == ("some finding", "no finding")
    assert tasks.label_columns(["cardiomegaly", "effusion_paper", "age_65"]) == (
        "effusion", "sex", "cardiomegaly", "no_finding", "age")


def test_per_task_settings_for_single_step_commands():
    from pipeline.simplebits.audit import AuditConfig
    from pipeline.training.classifier import ClassifyConfig

    sex = tasks.apply_stage_settings(ClassifyConfig(task="sex"), "classify")
    assert sex.model.name == "monai_resnet18_gn" and sex.model.kwargs == {}  # the NF-WRN's kwargs gone
    assert (sex.train.lr, sex.train.lr_schedule, sex.train.epochs) == (5e-3, "cosine", ClassifyConfig().train.epochs)
    kept = tasks.apply_stage_settings(ClassifyConfig(task="sex"), "classify", explicit=["train.lr", "model.name"])
    assert kept.train.lr == ClassifyConfig().train.lr and kept.model.name == "nf_wrn_16_2"
    assert kept.train.lr_schedule == "cosine"
    audit = tasks.apply_stage_settings(AuditConfig(task="sex"), "audit")
    assert (audit.audit.lam, audit.audit.tau) == (0.5, 0.01) and audit.independent.model.name == "monai_densenet121"
    assert tasks.stage_settings("effusion", "joint") == {}


def test_classify_command_picks_up_the_task_settings(capsys, tmp_path):
    from pipeline.cli import main

    def resolved(*argv: str) -> dict:
        with pytest.raises(SystemExit) as exit_:
            main(["classify", "train", "--ingest", str(tmp_path), "--out", str(tmp_path), "--print-config", *argv])
        assert exit_.value.code == 0
        return yaml.safe_load(capsys.readouterr().out)

    sex = resolved("--task", "sex")
    assert sex["task"] == "sex" and sex["model"] == {"name": "monai_resnet18_gn", "kwargs": {}}
    assert sex["train"]["lr_schedule"] == "cosine" and sex["train"]["lr"] == 5e-3
    assert resolved("--task", "sex", "--set", "train.lr=0.001")["train"]["lr"] == 0.001  # --set wins
    own = tmp_path / "mine.yaml"
    own.write_text("model: {name: nf_cnn, kwargs: {}}\n")
    assert resolved("--task", "sex", "--config", str(own))["model"]["name"] == "nf_cnn"  # so does your file
    assert resolved("--task", "effusion")["model"]["name"] == "nf_wrn_16_2"


def test_readme_task_definitions_example_loads(tmp_path):
    from pipeline.config import load_config
    from pipeline.workflow import RunConfig

    example = {"tasks": ["effusion", "edema_u1", "sex"],
               "task_definitions": {"edema_u1": {"column": "edema", "uncertain": "positive", "blank": "negative"},
                                    "sex": {"settings": {"audit": {"audit": {"lam": 1.0}}}}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(example))
    config = load_config(RunConfig, path, [f"out={tmp_path}"])
    assert config.for_task("sex").audit.audit.lam == 1.0
    assert config.for_task("sex").classify.model.name == "monai_resnet18_gn"
    assert config.task("edema_u1").blank == "negative"
