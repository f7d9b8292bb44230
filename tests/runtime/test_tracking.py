"""MLflow tracking against the embedded SQLite default and a real ``mlflow server`` on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline.models.classifiers import create_classifier, load_classifier, save_classifier
from pipeline.runtime.model_uri import local_weights
from pipeline.runtime.tracking import IdentifierLeakError, Tracker


def write_classifier(folder: Path) -> Path:
    """A tiny package classifier: ``.safetensors`` weights and their side-car ``.json``."""
    torch.manual_seed(0)
    return save_classifier(create_classifier("nf_cnn", widths=[4, 8]), folder / "model.safetensors",
                           input_size=[16, 16])


def exercise_tracker(tracker: Tracker, tmp_path: Path) -> None:
    """Parent + nested runs, params, metrics, dataset input, model files, study reports; then check all."""
    weights = write_classifier(tmp_path)
    studies = tmp_path / "studies"
    for sid in ("std-aaa", "std-bbb"):
        (studies / sid).mkdir(parents=True)
        (studies / sid / "report.json").write_text(json.dumps({"study_id": sid}))
    manifest = pd.DataFrame({"study_id": ["std-aaa", "std-bbb"], "effusion": [0, 1], "split": ["train", "test"]})
    with tracker.run("pipeline", params={"run": {"seed": 1}}) as parent:
        parent_id = parent.run_id
        parent.log_dataset(manifest, name="cohort", context="training", targets="effusion")
        with tracker.run("classifier", params={"train": {"lr": 1e-3}}) as child:
            child_id = child.run_id
            for step in range(3):
                child.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            model_uri = child.log_model("classifier", weights, name="classifier").model_uri
        assert tracker.run_id == parent_id
        assert tracker.log_study_reports(studies) == 2

    client = MlflowClient(tracking_uri=tracker.uri)
    child_run, parent_run = client.get_run(child_id), client.get_run(parent_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent_id
    assert child_run.info.status == "FINISHED" and parent_run.info.status == "FINISHED"
    assert child_run.data.params["train.lr"] == "0.001"
    history = client.get_metric_history(child_id, "loss")
    assert [m.step for m in history] == [0, 1, 2] and history[-1].value == pytest.approx(1 / 3)
    inputs = parent_run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "cohort"
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"
    assert sorted(a.path for a in client.list_artifacts(parent_id, "studies")) == ["studies/std-aaa", "studies/std-bbb"]
    assert [a.path for a in client.list_artifacts(parent_id, "studies/std-aaa")] == ["studies/std-aaa/report.json"]

    # the model resolves to the weights that were logged, and those load into the same network
    local = Path(local_weights(model_uri, "--classifier", tracker.uri))
    assert local.read_bytes() == weights.read_bytes()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(local)(x), load_classifier(weights)(x))


def test_sqlite_default_lives_in_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(tmp_path / "run")
    assert tracker.uri == f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}"
    exercise_tracker(tracker, tmp_path)
    assert (tmp_path / "run" / "mlflow.db").is_file()
    logged = list((tmp_path / "run" / "mlartifacts").rglob("model.safetensors"))
    assert len(logged) == 1  # the logged model's copy, in the run folder's artifact store


@pytest.mark.slow
def test_real_mlflow_server_on_loopback(tmp_path, mlflow_server):
    tracker = Tracker(tmp_path / "run", uri=mlflow_server, experiment="server-test")
    exercise_tracker(tracker, tmp_path)
    assert not (tmp_path / "run" / "mlflow.db").exists()


def test_person_name_values_are_refused(tmp_path):
    tracker = Tracker(tmp_path / "run", uri=f"sqlite:///{tmp_path / 'guard.db'}")
    with tracker.run("guard"):
        with pytest.raises(IdentifierLeakError):
            tracker.log_params({"data": {"who": "DOE^JANE"}})
        with pytest.raises(IdentifierLeakError):
            tracker.set_tags({"note": "Smith^John"})
        tracker.log_params({"pattern": "^std-[0-9a-f]+$"})  # a regex is not a name
    client = MlflowClient(tracking_uri=tracker.uri)
    run = client.search_runs([tracker.experiment_id])[0]
    assert "data.who" not in run.data.params and run.data.params["pattern"] == "^std-[0-9a-f]+$"


def test_disabled_tracker_logs_nothing(tmp_path):
    weights = write_classifier(tmp_path)
    tracker = Tracker(tmp_path / "run", enabled=False)
    with tracker.run("noop"):
        assert tracker.log_model("classifier", weights, name="m") is None
        tracker.log_dataset(pd.DataFrame({"a": [1]}), "d", "training")
    assert not (tmp_path / "run" / "mlflow.db").exists()
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):  # a missing file fails alike with and without tracking
        tracker.log_model("classifier", tmp_path / "missing.safetensors", name="m")


def test_person_name_in_run_params_is_refused_before_a_run_is_made(tmp_path):
    tracker = Tracker(tmp_path / "run", uri=f"sqlite:///{tmp_path / 'guard.db'}")
    with pytest.raises(IdentifierLeakError, match="data.who"):
        with tracker.run("guard", params={"data": {"who": "DOE^JANE"}}, resume_file=tmp_path / "mlflow_run.json"):
            pytest.fail("the run must not open")
    assert tracker.client.search_runs([tracker.experiment_id]) == []
    assert not (tmp_path / "mlflow_run.json").exists() and tracker.run_id is None
