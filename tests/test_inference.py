"""Cohort inference: one batch, a cohort in one process, resuming after a finished or killed run, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.ingest import load_cohort
from pipeline.data.manifest import write_manifest
from pipeline.inference import (
    PART_COLUMNS,
    ApplyConfig,
    apply_to_cohort,
    merge_parts,
    part_path,
    read_part_rows,
    read_predictions,
    simplified_path,
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
    """An ingest folder as ``simplebits ingest`` leaves it: ``cache/<study>.npy`` and ``manifest.csv``."""
    rng = np.random.default_rng(seed)
    ingest = root / "ingest"
    rows = []
    for i in range(num_studies):
        study_id = f"std-{i:08x}"
        # smooth blobs plus noise: images a random Glow and a small CNN give varied numbers for
        yy, xx = np.mgrid[:SIZE, :SIZE]
        blob = 120 + 80 * np.exp(-((yy - rng.uniform(4, 12)) ** 2 + (xx - rng.uniform(4, 12)) ** 2) / 12.0)
        image = np.clip(blob + rng.normal(0, 20, (SIZE, SIZE)), 0, 255).astype(np.uint8)
        (ingest / "cache").mkdir(parents=True, exist_ok=True)
        np.save(ingest / "cache" / f"{study_id}.npy", image, allow_pickle=False)
        rows.append({"study_id": study_id, "patient_id": f"pat-{i:08x}", "image_path": f"/data/{i}.png",
                     "view": "PA", "sex": "MF"[i % 2] if i != 3 else "", "age": 50.0,
                     "effusion": "" if i == 5 else str(int(i % 3 == 0)), "split": ("val", "test")[i % 2],
                     "source": "demo"})
    write_manifest(pd.DataFrame(rows), ingest / "manifest.csv")
    return ingest


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
    return cohort.images.float() / 255.0


# --- one batch --------------------------------------------------------------------------------------


def test_identity_simplifier_changes_nothing(tmp_path):
    cohort = load_cohort(make_ingest_dir(tmp_path))
    out = simplify_batch(*tiny_models(alpha=0.0), batch_of(cohort))
    assert out["simplified"].dtype == torch.uint8
    assert torch.equal(out["simplified"], cohort.images)
    assert torch.equal(out["p_simpl"], out["p_orig"])
    assert torch.equal(out["bpd_simpl"], out["bpd_orig"])
    assert torch.equal(out["bits_saved"], torch.zeros(len(cohort)))
    assert out["p_orig"].std() > 0 and out["bpd_orig"].std() > 0  # the models do look at the images


def test_scores_belong_to_the_saved_simplified_image(tmp_path):
    cohort = load_cohort(make_ingest_dir(tmp_path))
    simplifier, classifier, prior = tiny_models(alpha=1.0)
    x01 = batch_of(cohort)
    out = simplify_batch(simplifier, classifier, prior, x01)
    assert not torch.equal(out["simplified"], cohort.images)
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
    assert sorted(computed.study_id) == sorted(cohort.study_ids)
    expected = simplify_batch(*models, batch_of(cohort))
    predictions = merge_parts(out, cohort.study_ids)
    assert list(predictions.columns) == list(PART_COLUMNS)
    assert predictions.study_id.tolist() == sorted(cohort.study_ids)
    by_id = predictions.set_index("study_id").loc[cohort.study_ids]
    for column in ("p_orig", "p_simpl", "bpd_orig", "bpd_simpl"):
        np.testing.assert_allclose(by_id[column].to_numpy(), expected[column].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_id["bits_saved"].to_numpy(), expected["bits_saved"].numpy(),
                               rtol=0, atol=1e-5 * SIZE * SIZE)
    for i, study_id in enumerate(cohort.study_ids):
        saved = np.load(simplified_path(out, study_id))
        assert saved.dtype == np.uint8 and saved.shape == (SIZE, SIZE)
        np.testing.assert_array_equal(saved, expected["simplified"][i, 0].numpy())
    # labels and splits come from the manifest, unknowns stay unknown
    frame = cohort.frame.set_index("study_id").loc[cohort.study_ids]
    assert by_id["split"].tolist() == frame["split"].tolist()
    assert by_id["sex"].tolist() == frame["sex"].tolist()
    assert by_id["effusion"].isna().tolist() == frame["effusion"].isna().tolist()
    assert by_id["effusion"].dropna().tolist() == frame["effusion"].dropna().tolist()
    # predictions.csv reads back as written
    pd.testing.assert_frame_equal(read_predictions(out / "predictions.csv"), predictions)


def test_rerun_recomputes_nothing(finished_run):
    cohort, models, out, _ = finished_run
    part = part_path(out, 0).read_bytes()
    images = {sid: simplified_path(out, sid).stat().st_mtime_ns for sid in cohort.study_ids}
    again = apply_to_cohort(cohort, *models, out, batch_size=4)
    assert again.empty
    assert part_path(out, 0).read_bytes() == part
    assert {sid: simplified_path(out, sid).stat().st_mtime_ns for sid in cohort.study_ids} == images


def test_lost_image_recomputes_only_that_study(finished_run):
    cohort, models, out, _ = finished_run
    before = merge_parts(out, cohort.study_ids)
    lost = cohort.study_ids[6]
    (out / "predictions.csv").unlink()
    simplified_path(out, lost).unlink()
    again = apply_to_cohort(cohort, *models, out, batch_size=4)
    assert again.study_id.tolist() == [lost]
    rows = read_part_rows(part_path(out, 0))
    assert sorted(r[0] for r in rows) == sorted(cohort.study_ids)  # the stale row was replaced, not repeated
    pd.testing.assert_frame_equal(merge_parts(out, cohort.study_ids), before, rtol=0, atol=1e-6)


def test_row_torn_by_a_kill_is_dropped_and_recomputed(finished_run):
    cohort, models, out, _ = finished_run
    part = part_path(out, 0)
    text = part.read_text()
    last_study = text.rstrip("\n").rsplit("\n", 1)[1].split(",")[0]
    part.write_text(text.rstrip("\n")[:-7])  # the kill hit in the middle of the last number
    again = apply_to_cohort(cohort, *models, out, batch_size=4)
    assert again.study_id.tolist() == [last_study]
    assert len(read_part_rows(part)) == len(cohort)


def test_merge_refuses_an_incomplete_run(finished_run):
    cohort, _, out, _ = finished_run
    simplified_path(out, cohort.study_ids[0]).unlink()
    with pytest.raises(RuntimeError, match="1 studies have no finished row"):
        merge_parts(out, cohort.study_ids)


# --- config and command ---------------------------------------------------------------------------


def test_config_rejects_unknown_split_and_bad_batch_size():
    with pytest.raises(ConfigError, match="split"):
        load_config(ApplyConfig, overrides=["split=validation"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(ApplyConfig, overrides=["batch_size=0"])


def test_cli_end_to_end_with_mlflow_and_model_guard(tmp_path, capsys):
    ingest = make_ingest_dir(tmp_path)
    paths = save_models(tmp_path)
    out = tmp_path / "apply"
    args = ["apply", "--ingest", str(ingest), "--simplifier", str(paths["simplifier"]),
            "--classifier", str(paths["classifier"]), "--prior", str(paths["prior"]), "--out", str(out),
            "--split", "val", "--batch-size", "3", "--device", "cpu"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    val_ids = load_cohort(ingest, split="val").study_ids
    predictions = read_predictions(out / "predictions.csv")
    assert predictions.study_id.tolist() == sorted(val_ids)
    assert set(predictions.split) == {"val"}
    assert summary["n_studies"] == len(val_ids)
    assert summary["n_labelled"] == predictions.effusion.notna().sum()  # task read from classifier.json
    assert summary["bits_saved_mean"] == pytest.approx(predictions.bits_saved.mean())
    assert json.loads((out / "metrics.json").read_text())["task"] == "effusion"
    for name in ("config.resolved.yaml", "inputs.json", "mlflow.db"):
        assert (out / name).is_file(), name

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("simplebits").experiment_id])[0]
    assert run.data.metrics["bits_saved_mean"] == pytest.approx(summary["bits_saved_mean"])

    # other weights into the same folder would mix two models' results: refused
    other = tiny_models(seed=1)[1]
    save_classifier(other, paths["classifier"], "nf_cnn", {"widths": [4, 8]}, task="effusion")
    with pytest.raises(ValueError, match="classifier.safetensors"):
        main(args + ["--no-mlflow"])
