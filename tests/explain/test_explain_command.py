"""``simplebits explain`` end to end on a tiny ingest folder: files, overlays, resume, errors."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.explain.run import MAPS_NAME, read_map_rows
from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.prior import save_prior
from tiny_models import tiny_glow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cohort_fixtures import write_square_ingest  # noqa: E402

METHODS = ("ig", "occlusion", "gradcam", "latent_shift")
FAST = ["--set", "ig.steps=8", "--set", "latent_shift.steps=2", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    ingest = write_square_ingest(root / "ingest", {"train": 2, "test": 5}, size=32)
    network = create_classifier("nf_cnn", widths=[8, 16, 32])
    classifier = save_classifier(network, root / "classifier" / "model.safetensors", task="effusion")
    prior = save_prior(tiny_glow(), root / "prior")
    return {"ingest": ingest, "classifier": classifier, "prior": prior}


def explain(inputs, out: Path, *extra: str) -> int:
    return main(["explain", "--ingest", str(inputs["ingest"]), "--classifier", str(inputs["classifier"]),
                 "--prior", str(inputs["prior"]), "--out", str(out), *FAST, *extra])


def test_writes_a_map_and_an_overlay_per_study_and_method_then_resumes(inputs, tmp_path, capsys):
    out = tmp_path / "explain"
    assert explain(inputs, out, "--split", "test", "--limit", "3", "--methods", "ig,gradcam") == 0
    manifest = pd.read_csv(inputs["ingest"] / "manifest.csv")
    first_three = manifest[manifest["split"] == "test"]["study_id"].tolist()[:3]
    rows = pd.DataFrame(read_map_rows(out))
    expected = [(s, m) for s in first_three for m in ("ig", "gradcam")]
    assert sorted(zip(rows["study_id"], rows["method"])) == sorted(expected)
    for study_id in first_three:
        for method in ("ig", "gradcam"):
            attribution = np.load(out / study_id / f"{method}.npy")
            assert attribution.shape == (32, 32) and attribution.dtype == np.float32
            assert np.isfinite(attribution).all()
            overlay = Image.open(out / study_id / f"{method}.png")
            assert overlay.mode == "RGB" and overlay.size[0] >= 256
    labels = manifest.set_index("study_id").loc[rows["study_id"], "effusion"].to_numpy(dtype=float)
    np.testing.assert_array_equal(rows["label"].astype(float).to_numpy(), labels)
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["task"] == "effusion" and resolved["limit"] == 3

    # a re-run with two more methods computes only those; then nothing is left to do
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/ig.npy")}
    capsys.readouterr()
    assert explain(inputs, out, "--split", "test", "--limit", "3", "--methods", ",".join(METHODS)) == 0
    assert '"maps_written": 6' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/ig.npy")} == stamps
    assert explain(inputs, out, "--split", "test", "--limit", "3") == 0
    assert '"maps_written": 0' in capsys.readouterr().out
    rows = pd.DataFrame(read_map_rows(out))
    assert len(rows) == 3 * len(METHODS) and not rows.duplicated(["study_id", "method"]).any()
    shifted = rows[rows["method"] == "latent_shift"]
    assert shifted["shift"].astype(float).gt(0).all() and shifted["logit_shifted"].ne("").all()


def test_a_map_without_its_row_is_recomputed(inputs, tmp_path):
    """A kill between writing a map and its row: the map is not trusted and is written again."""
    out = tmp_path / "explain"
    assert explain(inputs, out, "--split", "test", "--limit", "2", "--methods", "gradcam") == 0
    table = out / MAPS_NAME
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:-1]) + lines[-1].rstrip("\n")[:10])  # last row torn
    assert len(read_map_rows(out)) == 1
    assert explain(inputs, out, "--split", "test", "--limit", "2", "--methods", "gradcam") == 0
    assert len(read_map_rows(out)) == 2


def test_other_settings_in_the_same_folder_are_refused(inputs, tmp_path, capsys):
    out = tmp_path / "explain"
    assert explain(inputs, out, "--limit", "1", "--methods", "ig") == 0
    assert explain(inputs, out, "--limit", "1", "--methods", "ig", "--set", "ig.steps=9") == 2
    assert "settings" in capsys.readouterr().err


def test_an_unknown_method_is_a_user_error(inputs, tmp_path, capsys):
    assert explain(inputs, tmp_path / "x", "--methods", "ig,saliency") == 2
    assert "saliency" in capsys.readouterr().err


def test_run_folder_without_a_task_is_one_line(tmp_path, capsys):
    assert main(["explain", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "give --task" in err


def test_without_run_the_paths_are_required(tmp_path, capsys):
    assert main(["explain", "--classifier", "c.safetensors", "--out", str(tmp_path)]) == 2
    assert "--ingest" in capsys.readouterr().err
