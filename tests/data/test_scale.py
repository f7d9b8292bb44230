"""Scale cohort (pipeline/data/scale.py): a valid ingest folder derived from a tiny source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.data.ingest import STATUS_NAME, load_cohort, open_store, read_status, write_ingest_folder
from pipeline.data.manifest import read_manifest
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.data.scale import PROVENANCE_NAME, ScaleCohortConfig, build_scale_cohort
from pipeline.data.store import CohortStore

SOURCE_SIZE = 32


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 studies of 6 patients (sex per patient), effusion 1 / 0 / unlabeled, random pixels."""
    rng = np.random.default_rng(0)
    rows = [{"study_id": study_pseudonym(i), "patient_id": patient_pseudonym(i // 2), "image_path": f"{i}.dcm",
             "view": "PA", "sex": "MF"[(i // 2) % 2] if i < 10 else "", "age": 40 + i,
             "effusion": (1, 0, None)[i % 3], "split": "train", "source": "demo"} for i in range(12)]
    images = rng.integers(0, 256, size=(12, SOURCE_SIZE, SOURCE_SIZE), dtype=np.uint8)
    return write_ingest_folder(tmp_path_factory.mktemp("source"), pd.DataFrame(rows), images)


def build(source: Path, out: Path, **settings) -> Path:
    settings = {"n": 300, "chunk": 64, "shard_rows": 100, **settings}  # several chunks and shards
    build_scale_cohort(ScaleCohortConfig(source=str(source), out=str(out), **settings))
    return out


def test_scale_cohort_is_a_valid_ingest_folder(source: Path, tmp_path: Path) -> None:
    out = build(source, tmp_path / "scale")
    cohort = load_cohort(out)
    assert len(cohort) == 300
    assert cohort.image_size == [SOURCE_SIZE, SOURCE_SIZE]
    assert cohort.images.load().shape == (300, 1, SOURCE_SIZE, SOURCE_SIZE)
    status = read_status(out / STATUS_NAME)
    assert len(status) == 300 and (status.status == "ok").all()
    assert (out / "config.resolved.yaml").is_file()

    frame = cohort.frame
    assert frame.study_id.is_unique
    assert not set(frame.study_id) & set(read_manifest(source / "manifest.csv").study_id)
    assert (frame.groupby("patient_id").split.nunique() == 1).all()  # patient-level splits
    assert set(frame.split) == {"train", "val", "test"}
    assert frame.patient_id.nunique() < len(frame)  # some patients have several studies
    assert (frame.groupby("patient_id").sex.nunique() == 1).all()


def test_labels_come_from_the_source_rows(source: Path, tmp_path: Path) -> None:
    out = build(source, tmp_path / "scale", blend_probability=0.5)
    frame = read_manifest(out / "manifest.csv")
    provenance = pd.read_csv(out / PROVENANCE_NAME, dtype={"blend_study_id": str}, keep_default_na=False)
    assert provenance.study_id.tolist() == frame.study_id.tolist()
    labels = read_manifest(source / "manifest.csv").set_index("study_id")[["effusion", "sex"]]
    mine = frame[["effusion", "sex"]].reset_index(drop=True)
    from_source = labels.loc[provenance.source_study_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, from_source)
    blended = provenance[provenance.blend_study_id != ""]
    assert 0 < len(blended) < len(provenance)
    partner = labels.loc[blended.blend_study_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(partner, labels.loc[blended.source_study_id].reset_index(drop=True))


def test_deterministic_given_the_seed(source: Path, tmp_path: Path) -> None:
    a, b = build(source, tmp_path / "a"), build(source, tmp_path / "b")
    c = build(source, tmp_path / "c", seed=1)
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert np.array_equal(load_cohort(a).images.load(), load_cohort(b).images.load())
    assert not np.array_equal(load_cohort(a).images.load(), load_cohort(c).images.load())
    # chunking is a memory setting only
    d = build(source, tmp_path / "d", chunk=1000)
    assert np.array_equal(load_cohort(a).images.load(), load_cohort(d).images.load())


def test_identity_settings_copy_and_shift_never_flips(source: Path, tmp_path: Path) -> None:
    identity = {"gamma": 1.0, "gain": 0.0, "offset": 0.0, "blend_probability": 0.0}
    originals = open_store(source)

    def pairs(out: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        provenance = pd.read_csv(out / PROVENANCE_NAME, keep_default_na=False)
        derived = load_cohort(out).images.load()[:, 0].numpy()
        return derived, originals.read(originals.slots(provenance.source_study_id.tolist())), provenance

    derived, sources, _ = pairs(build(source, tmp_path / "copy", max_shift_px=0, **identity))
    assert np.array_equal(derived, sources)

    derived, sources, provenance = pairs(build(source, tmp_path / "shift", max_shift_px=2, **identity))
    for image, original, dy, dx in zip(derived, sources, provenance.shift_y, provenance.shift_x):
        # content moves by (dy, dx); the inner window (away from replicated edges) matches exactly
        assert np.array_equal(image[2 + dy:SOURCE_SIZE - 2 + dy, 2 + dx:SOURCE_SIZE - 2 + dx],
                              original[2:SOURCE_SIZE - 2, 2:SOURCE_SIZE - 2])


def test_size_and_empty_output_folder(source: Path, tmp_path: Path) -> None:
    out = build(source, tmp_path / "big", n=20, size=48)
    assert load_cohort(out).images.load().shape == (20, 1, 48, 48)
    with pytest.raises(FileExistsError, match="not empty"):
        build(source, out, n=20)


def test_write_block_spans_shards(tmp_path: Path) -> None:
    ids = [study_pseudonym(i) for i in range(10)]
    store = CohortStore.create(tmp_path / "store", ids, 8, shard_rows=4)
    block = np.random.default_rng(0).integers(0, 256, size=(7, 8, 8), dtype=np.uint8)
    store.write_block(2, block)  # slots 2..8: shards 0, 1 and 2
    assert np.array_equal(store.read(np.arange(2, 9)), block)
    assert not store.read([0, 1, 9]).any()
    with pytest.raises(IndexError):
        store.write_block(5, block)


def test_cli(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["scale-cohort", "--source", str(source), "--n", "50", "--out", str(out), "--seed", "3",
                 "--set", "max_shift_px=1"]) == 0
    assert "50 studies" in capsys.readouterr().out
    assert len(load_cohort(out)) == 50
    resolved = (out / "config.resolved.yaml").read_text()
    assert "n: 50" in resolved and "seed: 3" in resolved and "max_shift_px: 1" in resolved
    assert f"size: {SOURCE_SIZE}" in resolved
