"""Cohort inference: one batch, a cohort in one process, resuming after a finished or killed run, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.ingest import load_cohort, write_ingest_folder
from pipeline.data.store import CohortStore, StoredImages
from pipeline.inference import (
    PART_COLUMNS,
    ApplyConfig,
    apply_to_cohort,
    merge_parts,
    part_path,
    read_part_rows,
    read_predictions,
    simplified_images,
    simplified_store_path,
    simplify_batch,
)
from pipeline.models.bpd import bits_per_dim
from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.models.glow import Glow
from pipeline.models.simplifier import Simplifier, save_simplifier
from pipeline.prior import save_prior

SIZE = 16
NUM_STUDIES = 11  # odd, so that two ranks get unequal shards


def make_ingest_dir(root: Path, num_studies: int = NUM_STUDIES, seed: int = 0) -> Path:
    """An ingest folder as ``simplebits ingest`` leaves it: ``store/``, ``status.csv``, ``manifest.csv``."""
    rng = np.random.default_rng(seed)
    rows, images = [], []
    for i in range(num_studies):
        # smooth blobs plus noise: images a random Glow and a small CNN give varied numbers for
        yy, xx = np.mgrid[:SIZE, :SIZE]
        blob = 120 + 80 * np.exp(-((yy - rng.uniform(4, 12)) ** 2 + (xx - rng.uniform(4, 12)) ** 2) / 12.0)
        images.append(np.clip(blob + rng.normal(0, 20, (SIZE, SIZE)), 0, 255).astype(np.uint8))
        rows.append({"study_id": f"std-{i:08x}", "patient_id": f"pat-{i:08x}", "image_path": f"/data/{i}.png",
                     "view": "PA", "sex": "MF"[i % 2] if i != 3 else "", "age": 50.0,
                     "effusion": "" if i == 5 else str(int(i % 3 == 0)), "split": ("val", "test")[i % 2],
                     "source": "demo"})
    return write_ingest_folder(root / "ingest", pd.DataFrame(rows), np.stack(images))


def tiny_models(seed: int = 0, alpha: float = 0.0) -> tuple[Simplifier, torch.nn.Module, Glow]:
    """Small random models; ``alpha=0`` keeps the simplifier at its identity initialisation."""
    torch.manual_seed(seed)
    simplifier = Simplifier(base_channels=4, levels=2, max_channels=8, init="zero_alpha")
    with torch.no_grad():
        simplifier.alpha.fill_(alpha)
    classifier = create_classifier("nf_cnn", widths=(4, 8))
    prior = Glow(levels=2, steps_per_level=1, hidden_channels=8)
    with torch.no_grad():  # away from the identity-like init, so that the bpd depends on the image
        for p in prior.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return simplifier.eval(), classifier.eval(), prior.eval()


def save_models(root: Path, seed: int = 0, alpha: float = 1.0) -> dict[str, Path]:
    simplifier, classifier, prior = tiny_models(seed, alpha)
    paths = {"simplifier": root / "models" / "simplifier.safetensors",
             "classifier": root / "models" / "classifier.safetensors",
             "prior": root / "models" / "prior.safetensors"}
    save_simplifier(simplifier, paths["simplifier"])
    save_classifier(classifier, paths["classifier"], "nf_cnn", {"widths": [4, 8]}, task="effusion")
    save_prior(prior, paths["prior"])
    return paths


def batch_of(cohort) -> torch.Tensor:
    return cohort.float()  # the whole (tiny) cohort as one batch: the reference for the streamed run


def simplified_of(out: Path, study_ids) -> torch.Tensor:
    return simplified_images(out, study_ids).load()


def part_ids(out: Path) -> list[str]:
    return [row[0] for row in read_part_rows(part_path(out, 0))]


def drop_part_row(out: Path, study_id: str) -> None:
    """Remove a study's row from part-0: what a kill between writing its slot and its row leaves."""
    part = part_path(out, 0)
    part.write_text("".join(line for line in part.read_text().splitlines(keepends=True)
                            if not line.startswith(f"{study_id},")))


# --- one batch --------------------------------------------------------------------------------------


def test_identity_simplifier_changes_nothing(tmp_path):
    cohort = load_cohort(make_ingest_dir(tmp_path))
    out = simplify_batch(*tiny_models(alpha=0.0), batch_of(cohort))
    assert out["simplified"].dtype == torch.uint8
    assert torch.equal(out["simplified"], cohort.images.load())
    assert torch.equal(out["p_simpl"], out["p_orig"])
    assert torch.equal(out["bpd_simpl"], out["bpd_orig"])
    assert torch.equal(out["bits_saved"], torch.zeros(len(cohort)))
    assert out["p_orig"].std() > 0 and out["bpd_orig"].std() > 0  # the models do look at the images


def test_scores_belong_to_the_saved_simplified_image(tmp_path):
    cohort = load_cohort(make_ingest_dir(tmp_path))
    simplifier, classifier, prior = tiny_models(alpha=1.0)
    x01 = batch_of(cohort)
    out = simplify_batch(simplifier, classifier, prior, x01)
    assert not torch.equal(out["simplified"], cohort.images.load())
    simplified01 = out["simplified"].float() / 255.0
    with torch.no_grad():
        expected_p = torch.softmax(classifier(simplified01), dim=1)[:, 1]
        expected_bpd = bits_per_dim(prior, simplified01, dequantize="midpoint")
        expected_bpd_orig = bits_per_dim(prior, x01, dequantize="midpoint")
    torch.testing.assert_close(out["p_simpl"], expected_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["bpd_simpl"], expected_bpd, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["bpd_orig"], expected_bpd_orig, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["bits_saved"], (out["bpd_orig"] - out["bpd_simpl"]) * SIZE * SIZE)


def test_simplify_batch_rejects_colour_images():
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        simplify_batch(*tiny_models(), torch.rand(2, 3, SIZE, SIZE))


# --- a cohort, resuming ---------------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path):
    cohort = load_cohort(make_ingest_dir(tmp_path))
    models = tiny_models(alpha=1.0)
    out = tmp_path / "apply"
    computed = apply_to_cohort(cohort, *models, out, batch_size=4)
    return cohort, models, out, computed


def test_cohort_outputs_match_one_big_batch(finished_run):
    cohort, models, out, computed = finished_run
    assert sorted(computed) == sorted(cohort.study_ids)
    expected = simplify_batch(*models, batch_of(cohort))
    predictions = merge_parts(out, cohort.study_ids)
    assert list(predictions.columns) == list(PART_COLUMNS)
    assert predictions.study_id.tolist() == sorted(cohort.study_ids)
    by_id = predictions.set_index("study_id").loc[cohort.study_ids]
    for column in ("p_orig", "p_simpl", "bpd_orig", "bpd_simpl"):
        np.testing.assert_allclose(by_id[column].to_numpy(), expected[column].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_id["bits_saved"].to_numpy(), expected["bits_saved"].numpy(),
                               rtol=0, atol=1e-5 * SIZE * SIZE)
    saved = simplified_of(out, cohort.study_ids)
    assert saved.dtype == torch.uint8 and saved.shape == (len(cohort), 1, SIZE, SIZE)
    assert torch.equal(saved, expected["simplified"])
    # the images are one store, not a file per study
    assert not [p for p in out.rglob("*.npy") if p.parent != simplified_store_path(out)]
    # labels and splits come from the manifest, unknowns stay unknown
    frame = cohort.frame.set_index("study_id").loc[cohort.study_ids]
    assert by_id["split"].tolist() == frame["split"].tolist()
    assert by_id["sex"].tolist() == frame["sex"].tolist()
    assert by_id["effusion"].isna().tolist() == frame["effusion"].isna().tolist()
    assert by_id["effusion"].dropna().tolist() == frame["effusion"].dropna().tolist()
    # predictions.csv reads back as written
    pd.testing.assert_frame_equal(read_predictions(out / "predictions.csv"), predictions)


def test_streams_the_cohort_batch_by_batch(tmp_path, monkeypatch):
    """No read of more than one batch, nothing materialised; DataLoader workers give the same results."""
    cohort = load_cohort(make_ingest_dir(tmp_path))
    models = tiny_models(alpha=1.0)
    reads: list[int] = []
    read = CohortStore.read

    def counted_read(store, slots):
        reads.append(len(slots))
        return read(store, slots)

    def refuse(*_):
        raise AssertionError("the whole cohort was loaded")

    monkeypatch.setattr(CohortStore, "read", counted_read)
    monkeypatch.setattr(StoredImages, "load", refuse)
    monkeypatch.setattr(type(cohort), "float", refuse)
    apply_to_cohort(cohort, *models, tmp_path / "in-process", batch_size=4)
    assert reads == [4, 4, 3]
    apply_to_cohort(cohort, *models, tmp_path / "workers", batch_size=4, num_workers=2)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(merge_parts(tmp_path / "workers", cohort.study_ids),
                                  merge_parts(tmp_path / "in-process", cohort.study_ids))
    assert torch.equal(simplified_of(tmp_path / "workers", cohort.study_ids),
                       simplified_of(tmp_path / "in-process", cohort.study_ids))


def test_rerun_recomputes_nothing(finished_run):
    cohort, models, out, _ = finished_run

    def files() -> dict[Path, tuple[bytes, int]]:
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    assert apply_to_cohort(cohort, *models, out, batch_size=4) == []
    assert files() == before  # not even rewritten: the part file was clean


def test_rows_repeated_in_another_part_are_pruned(finished_run):
    """Part files of an earlier run with more ranks: a study's later row in part-1 is dropped."""
    cohort, models, out, _ = finished_run
    before = merge_parts(out, cohort.study_ids)
    lines = part_path(out, 0).read_text().splitlines(keepends=True)
    part_path(out, 1).write_text(lines[0] + lines[3] + lines[0])  # header, a repeat, a stray header
    assert apply_to_cohort(cohort, *models, out, batch_size=4) == []
    assert part_path(out, 1).read_text() == lines[0]
    assert sorted(part_ids(out)) == sorted(cohort.study_ids)
    pd.testing.assert_frame_equal(merge_parts(out, cohort.study_ids), before)


def test_slot_without_row_is_recomputed(finished_run):
    """A kill after a study's slot was written but before its row: the slot is not trusted."""
    cohort, models, out, _ = finished_run
    before = merge_parts(out, cohort.study_ids)
    expected = simplified_of(out, cohort.study_ids)
    lost = cohort.study_ids[6]
    store = CohortStore.open(simplified_store_path(out))
    store.write(store.slot(lost), np.full((SIZE, SIZE), 7, np.uint8))  # half-written pixels
    drop_part_row(out, lost)
    again = apply_to_cohort(cohort, *models, out, batch_size=4)
    assert again == [lost]
    assert sorted(part_ids(out)) == sorted(cohort.study_ids)
    pd.testing.assert_frame_equal(merge_parts(out, cohort.study_ids), before, rtol=0, atol=1e-6)
    assert torch.equal(simplified_of(out, cohort.study_ids), expected)


def test_lost_store_recomputes_everything_once(finished_run):
    cohort, models, out, _ = finished_run
    before = merge_parts(out, cohort.study_ids)
    shutil.rmtree(simplified_store_path(out))
    again = apply_to_cohort(cohort, *models, out, batch_size=4)
    assert sorted(again) == sorted(cohort.study_ids)
    assert sorted(part_ids(out)) == sorted(cohort.study_ids)  # the void rows were dropped, not repeated
    pd.testing.assert_frame_equal(merge_parts(out, cohort.study_ids), before, rtol=0, atol=1e-6)


def test_row_torn_by_a_kill_is_dropped_and_recomputed(finished_run):
    cohort, models, out, _ = finished_run
    part = part_path(out, 0)
    text = part.read_text()
    last_study = text.rstrip("\n").rsplit("\n", 1)[1].split(",")[0]
    part.write_text(text.rstrip("\n")[:-7])  # the kill hit in the middle of the last number
    again = apply_to_cohort(cohort, *models, out, batch_size=4)
    assert again == [last_study]
    assert sorted(part_ids(out)) == sorted(cohort.study_ids)


def test_another_split_later_adds_only_its_studies(tmp_path):
    ingest = make_ingest_dir(tmp_path)
    models = tiny_models(alpha=1.0)
    out = tmp_path / "apply"
    val = load_cohort(ingest, split="val")
    assert sorted(apply_to_cohort(val, *models, out, batch_size=4)) == sorted(val.study_ids)
    everything = load_cohort(ingest)
    again = apply_to_cohort(everything, *models, out, batch_size=4)
    assert sorted(again) == sorted(load_cohort(ingest, split="test").study_ids)
    expected = simplify_batch(*models, batch_of(everything))
    assert torch.equal(simplified_of(out, everything.study_ids), expected["simplified"])
    by_id = merge_parts(out, everything.study_ids).set_index("study_id").loc[everything.study_ids]
    np.testing.assert_allclose(by_id["p_simpl"].to_numpy(), expected["p_simpl"].numpy(), rtol=0, atol=1e-5)


def test_merge_refuses_an_incomplete_run(finished_run):
    cohort, _, out, _ = finished_run
    drop_part_row(out, cohort.study_ids[0])
    with pytest.raises(RuntimeError, match="1 studies have no finished row"):
        merge_parts(out, cohort.study_ids)


# --- config and command ---------------------------------------------------------------------------


def test_config_rejects_unknown_split_and_bad_sizes():
    with pytest.raises(ConfigError, match="split"):
        load_config(ApplyConfig, overrides=["split=validation"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(ApplyConfig, overrides=["batch_size=0"])
    with pytest.raises(ConfigError, match="num_workers"):
        load_config(ApplyConfig, overrides=["num_workers=-1"])


def test_cli_end_to_end_with_mlflow_and_model_guard(tmp_path, capsys):
    ingest = make_ingest_dir(tmp_path)
    paths = save_models(tmp_path)
    out = tmp_path / "apply"
    args = ["apply", "--ingest", str(ingest), "--simplifier", str(paths["simplifier"]),
            "--classifier", str(paths["classifier"]), "--prior", str(paths["prior"]), "--out", str(out),
            "--split", "val", "--batch-size", "3", "--num-workers", "1", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    val_ids = load_cohort(ingest, split="val").study_ids
    predictions = read_predictions(out / "predictions.csv")
    assert predictions.study_id.tolist() == sorted(val_ids)
    assert set(predictions.split) == {"val"}
    assert summary["n_studies"] == len(val_ids)
    assert summary["num_dims"] == SIZE * SIZE
    assert summary["n_labelled"] == predictions.effusion.notna().sum()  # task read from classifier.json
    assert summary["bits_saved_mean"] == pytest.approx(predictions.bits_saved.mean())
    assert json.loads((out / "metrics.json").read_text())["task"] == "effusion"
    for name in ("config.resolved.yaml", "inputs.json", "mlflow.db", "mlflow_run.json"):
        assert (out / name).is_file(), name

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("simplebits").experiment_id])[0]
    assert run.info.run_id == json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert run.data.metrics["bits_saved_mean"] == pytest.approx(summary["bits_saved_mean"])
    # how it ran is a tag (a resumed run may change it), what it computed a param
    assert run.data.tags["batch_size"] == "3" and "batch_size" not in run.data.params
    assert run.data.params["split"] == "val"

    # other weights into the same folder would mix two models' results: refused
    other = tiny_models(seed=1)[1]
    save_classifier(other, paths["classifier"], "nf_cnn", {"widths": [4, 8]}, task="effusion")
    assert main(args + ["--no-mlflow"]) == 2  # a user error: one line, exit status 2
    assert "classifier.safetensors" in capsys.readouterr().err


def test_part_tables_carry_the_label_columns_of_the_task(tmp_path):
    from pipeline.inference import finished_ids, label_columns, part_columns, summarize
    from pipeline.tasks import task_labels

    ingest = make_ingest_dir(tmp_path)
    manifest = pd.read_csv(ingest / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["cardiomegaly"] = ["1", "0", "-1", ""] * 2 + ["1", "0", "0"]  # raw codes, as a builder writes them
    ingest = write_ingest_folder(tmp_path / "with-findings", manifest, load_cohort(ingest).images.load())
    cohort = load_cohort(ingest)
    labels = label_columns("cardiomegaly")
    assert labels == ("effusion", "sex", "cardiomegaly") and label_columns(None) == ("effusion", "sex")
    out = tmp_path / "apply"
    apply_to_cohort(cohort, *tiny_models(alpha=1.0), out, batch_size=4, labels=labels)
    predictions = merge_parts(out, cohort.study_ids, labels)
    assert list(predictions.columns) == list(part_columns(labels))
    assert predictions["cardiomegaly"].dtype == "Int64"
    back = read_predictions(out / "predictions.csv")
    assert list(back.columns) == list(predictions.columns)
    expected = task_labels(manifest.set_index("study_id").loc[back["study_id"]], "cardiomegaly")
    assert task_labels(back, "cardiomegaly").tolist() == pytest.approx(expected.tolist(), nan_ok=True)
    assert summarize(back, "cardiomegaly", num_dims=SIZE * SIZE)["n_labelled"] == expected.notna().sum()
    assert finished_ids(out, labels) == set(cohort.study_ids)
    assert finished_ids(out) == set()  # rows of other label columns are not this run's: recomputed
