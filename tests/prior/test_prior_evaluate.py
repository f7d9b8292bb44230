import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.models.glow import Glow
from pipeline.prior.evaluate import bpd_table, images_bpd, ordering_holds, simplicity_variants


@pytest.fixture
def model() -> Glow:
    torch.manual_seed(0)
    return Glow(levels=2, steps_per_level=1, hidden_channels=8, coupling="additive").eval()


def test_bpd_table_has_one_deterministic_row_per_study(model):
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)
    frame = pd.DataFrame({"study_id": ["std-a", "std-b", "std-c"], "split": ["train", "val", "test"],
                          "effusion": pd.array([1, 0, None], dtype="Int64"), "sex": ["M", "F", ""],
                          "image_path": ["x", "y", "z"]})
    table = bpd_table(model, images, frame, batch_size=2)
    assert list(table.columns) == ["study_id", "split", "effusion", "sex", "bpd"]
    assert np.allclose(table["bpd"], images_bpd(model, images))
    assert table["bpd"].nunique() == 3
    with pytest.raises(ValueError, match="2 images but 3"):
        bpd_table(model, images[:2], frame)


def test_simplicity_variants():
    radiographs = np.random.default_rng(1).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8)
    v = simplicity_variants(radiographs)
    assert all(x.dtype == np.uint8 and x.shape == radiographs.shape for x in v.values())
    assert v["flat"].reshape(2, -1).std(1).max() == 0
    assert v["blurred"].astype(float).std() < radiographs.astype(float).std()
    assert ordering_holds({"noise": 4, "radiograph": 3, "blurred": 2, "flat": 1})
    assert not ordering_holds({"noise": 4, "radiograph": 2, "blurred": 3, "flat": 1})


def test_bpd_command_writes_a_table_from_an_ingest_folder(tmp_path, model):
    from pipeline.cli import main
    from pipeline.data.ingest import write_ingest_folder
    from pipeline.prior import save_prior

    ids = [f"std-{i:012x}" for i in range(4)]
    frame = pd.DataFrame({
        "study_id": ids, "patient_id": [f"pat-{i:012x}" for i in range(4)],
        "image_path": [f"{s}.png" for s in ids], "view": "PA", "sex": ["M", "F", "M", "F"], "age": 50.0,
        "effusion": [1, 0, 1, 0], "split": ["train", "train", "val", "test"], "source": "demo",
    })
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    write_ingest_folder(tmp_path / "ingest", frame, images)
    save_prior(model, tmp_path / "tiny")

    code = main(["prior", "bpd", "--prior", str(tmp_path / "tiny.safetensors"), "--ingest",
                 str(tmp_path / "ingest"), "--size", "16", "--device", "cpu", "--out", str(tmp_path / "bpd.csv")])
    table = pd.read_csv(tmp_path / "bpd.csv")
    assert code == 0 and table["study_id"].tolist() == ids
    assert table["split"].tolist() == ["train", "train", "val", "test"]
    assert table["bpd"].between(0, 30).all() and table["bpd"].nunique() == 4


def test_bpd_table_carries_the_label_columns_of_its_tasks(model):
    from pipeline.tasks import task_labels

    images = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)
    frame = pd.DataFrame({"study_id": ["std-a", "std-b", "std-c"], "split": ["train", "val", "test"],
                          "effusion": pd.array([1, 0, -1], dtype="Int64"), "sex": ["M", "F", ""],
                          "cardiomegaly": pd.array([0, None, 1], dtype="Int64"),
                          "no_finding": pd.array([0, 1, 0], dtype="Int64"), "age": [70.0, 50.0, None]})
    table = bpd_table(model, images, frame, tasks=["cardiomegaly", "effusion_paper", "age_65"])
    assert list(table.columns) == ["study_id", "split", "effusion", "sex", "cardiomegaly", "no_finding", "age",
                                   "bpd"]
    assert task_labels(table, "effusion_paper").tolist()[:2] == [1.0, 0.0]
    assert task_labels(table, "cardiomegaly").isna().tolist() == [False, True, False]
