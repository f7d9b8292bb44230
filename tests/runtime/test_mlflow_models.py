"""Trained networks as MLflow Models: logged with metrics, registered, loaded back, and used as weights by URI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.models.classifiers import create_classifier, load_classifier, save_classifier
from pipeline.models.simplifier import create_simplifier, load_simplifier, save_simplifier
from pipeline.prior import load_prior, save_prior
from pipeline.runtime.mlflow_model import PriorDensity, input_example
from pipeline.runtime.tracking import IdentifierLeakError, Tracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simplebits"))
from cohort_fixtures import write_square_ingest  # noqa: E402
from toy_tasks import tiny_prior  # noqa: E402

SIZE = 32
CLASSIFY = ["--set", "device=cpu", "--set", "model.name=nf_cnn", "--set", "train.epochs=1",
            "--set", "train.batch_size=16", "--set", "augment.enabled=false"]
AUDIT = ["--set", "device=cpu", "--set", "independent.enabled=false",
         "--set", "simplifier.base_channels=4", "--set", "simplifier.levels=2", "--set", "simplifier.max_channels=8",
         "--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "train.eval_batch_size=16",
         "--set", "evaluate.baselines=[blur]", "--set", "evaluate.match_subsample=8",
         "--set", "evaluate.retrain=false"]


def logged_model(client: MlflowClient, run_id: str, name: str):
    """The LoggedModel ``name`` whose source run is ``run_id``."""
    experiment = client.get_run(run_id).info.experiment_id
    found = [m for m in client.search_logged_models(experiment_ids=[experiment])
             if m.source_run_id == run_id and m.name == name]
    assert len(found) == 1, found
    return found[0]


def run_named(client: MlflowClient, name: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'")
    return run


@pytest.mark.slow
def test_classifier_logged_registered_and_audited_by_uri_on_a_real_server(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    ingest = write_square_ingest(tmp_path / "ingest", {"train": 32, "val": 24, "test": 8}, size=SIZE)
    classifier = tmp_path / "classifier"
    assert main(["classify", "train", "--ingest", str(ingest), "--out", str(classifier), "--task", "effusion",
                 "--register", "square-effusion", *CLASSIFY]) == 0
    trained = json.loads((classifier / "metrics.json").read_text())

    client = MlflowClient(mlflow_server)
    run = run_named(client, "classify-effusion")
    model = logged_model(client, run.info.run_id, "classify-effusion")
    linked = {m.key: m.value for m in model.metrics}
    assert linked["final_val_auroc"] == pytest.approx(trained["val_auroc"])
    assert model.params["model.name"] == "nf_cnn" and model.tags["kind"] == "classifier"
    version = client.get_model_version("square-effusion", "1")
    assert version.source == f"models:/{model.model_id}"  # the registered version is this LoggedModel
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "predictions.json", str(tmp_path))).read_text())
    assert table["columns"] == ["study_id", "split", "label", "p"] and len(table["data"]) == 64

    audit = tmp_path / "audit"
    prior = save_prior(tiny_prior(), tmp_path / "prior")
    assert main(["simplify", "audit", "--ingest", str(ingest), "--classifier", "models:/square-effusion/1",
                 "--prior", str(prior), "--out", str(audit), "--register", "square-audit", *AUDIT]) == 0
    audited = json.loads((audit / "metrics.json").read_text())
    assert audited["val_auroc_orig"] == pytest.approx(trained["val_auroc"], abs=1e-9)
    # the audit's simplifier is a model of its own run too, its per-study outcomes a table
    audit_run = run_named(client, "simplify-audit-effusion")
    assert logged_model(client, audit_run.info.run_id, "simplify-audit-effusion").tags["kind"] == "simplifier"
    assert "predictions.json" in {a.path for a in client.list_artifacts(audit_run.info.run_id)}

    # apply with the registered simplifier gives byte-identical outputs to apply with its file
    outputs = {}
    for source in (str(audit / "simplifier.safetensors"), "models:/square-audit/1"):
        out = tmp_path / f"apply-{len(outputs)}"
        assert main(["apply", "--ingest", str(ingest), "--simplifier", source, "--classifier",
                     str(classifier / "model.safetensors"), "--prior", str(prior), "--out", str(out), "--split",
                     "val", "--device", "cpu", "--num-workers", "0", "--no-mlflow"]) == 0
        outputs[source] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                           if p.is_file() and p.suffix != ".yaml"}  # (the resolved config names the paths)
    by_file, by_uri = outputs.values()
    assert {"predictions.csv", "inputs.json"} <= set(by_file) and any(k.startswith("simplified/") for k in by_file)
    assert by_file == by_uri


def test_mlflow_load_model_in_a_fresh_process_gives_the_loaders_outputs(tmp_path):
    torch.manual_seed(0)
    files = {
        "classifier": save_classifier(create_classifier("nf_cnn"), tmp_path / "c" / "model.safetensors",
                                      input_size=[SIZE, SIZE]),
        "simplifier": save_simplifier(create_simplifier(base_channels=4, levels=2, max_channels=8),
                                      tmp_path / "s" / "simplifier.safetensors", input_size=[SIZE, SIZE]),
        "prior": save_prior(tiny_prior(), tmp_path / "p" / "prior"),
    }
    tracker = Tracker(tmp_path / "run", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.run("models"):
        uris = {kind: tracker.log_model(kind, path, name=kind).model_uri for kind, path in files.items()}
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, SIZE, SIZE)) / 255).float()
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import json, sys, numpy as np, torch, mlflow.pytorch\n"
        "mlflow.set_tracking_uri(sys.argv[1]); x = torch.from_numpy(np.load(sys.argv[2]))\n"
        "for kind, uri in json.loads(sys.argv[3]).items():\n"
        "    with torch.no_grad(): np.save(f'{sys.argv[4]}/{kind}.npy', mlflow.pytorch.load_model(uri)(x).numpy())\n"
    )
    subprocess.run([sys.executable, "-c", script, tracker.uri, str(tmp_path / "x.npy"), json.dumps(uris),
                    str(tmp_path)], check=True, timeout=300)
    with torch.no_grad():
        expected = {"classifier": load_classifier(files["classifier"])(x),
                    "simplifier": load_simplifier(files["simplifier"])(x),
                    "prior": PriorDensity(load_prior(files["prior"]))(x)}
    for kind, value in expected.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"{kind}.npy"), value.numpy(), err_msg=kind)
    signature = MlflowClient(tracker.uri).get_logged_model(uris["classifier"].removeprefix("models:/"))
    assert signature.model_type == "classifier"
    assert input_example(4, 4).min() == 0.0 and input_example(4, 4).max() == 1.0  # synthetic, on the 8-bit grid


def test_weights_by_uri_resolve_and_a_bad_uri_is_one_line_with_exit_status_2(tmp_path, monkeypatch, capsys):
    from pipeline.runtime.model_uri import local_weights

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    weights = save_prior(tiny_prior(), tmp_path / "p" / "prior")
    tracker = Tracker(tmp_path / "run", uri=uri)
    with tracker.run("prior"):
        run_id = tracker.run_id
        tracker.log_model("prior", weights, name="prior", register="tiny-prior")
        tracker.log_artifact(weights)  # loose files, as runs:/ URIs name them
        tracker.log_artifact(weights.with_suffix(".json"))
    with tracker.run("no-weights"):
        empty_run = tracker.run_id
        (tmp_path / "notes.txt").write_text("no weights here")
        tracker.log_artifact(tmp_path / "notes.txt", "notes")
    # a registered version, the run's logged model by name, a loose file of the run (with its side-car)
    for value in ("models:/tiny-prior/1", f"runs:/{run_id}/prior", f"runs:/{run_id}/prior.safetensors"):
        local = Path(local_weights(value, "--prior", uri))
        assert local.read_bytes() == weights.read_bytes(), value
        assert local.with_suffix(".json").read_bytes() == weights.with_suffix(".json").read_bytes(), value
    assert local_weights(str(weights), "--prior") == str(weights)  # a path passes through

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for value, reason in [("models:/no-such-model/1", "cannot fetch it from"),
                          (f"runs:/{empty_run}/notes", "expected one .safetensors file")]:
        status = main(["prior", "bpd", "--ingest", str(tmp_path), "--prior", value, "--out", str(tmp_path / "b.csv")])
        lines = capsys.readouterr().err.strip().splitlines()  # (MLflow's own log lines before it)
        errors = [line for line in lines if line.startswith("simplebits: error:")]
        assert status == 2 and errors == lines[-1:], lines
        assert errors[0].startswith(f"simplebits: error: --prior {value}: ") and reason in errors[0]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["prior", "ordering", "--prior", "models:/tiny-prior/1"]) == 2
    assert "no MLflow store to look it up in" in capsys.readouterr().err


def test_tables_refuse_identifying_columns_and_person_names(tmp_path):
    tracker = Tracker(tmp_path / "run", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracker.run("tables"):
        run_id = tracker.run_id
        tracker.log_table(pd.DataFrame({"study_id": ["std-1"], "p": [0.5]}), "ok.json")
        with pytest.raises(IdentifierLeakError, match="patient_id"):
            tracker.log_table(pd.DataFrame({"study_id": ["std-1"], "patient_id": ["pat-1"]}), "bad.json")
        with pytest.raises(IdentifierLeakError, match="note"):
            tracker.log_table(pd.DataFrame({"study_id": ["std-1"], "note": ["DOE^JANE"]}), "bad.json")
    assert [a.path for a in tracker.client.list_artifacts(run_id)] == ["ok.json"]
