"""NIH ChestX-ray14 builder against the real ``Data_Entry_2017_v2020.csv`` from the torchxrayvision wheel."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.manifest import ManifestError
from pipeline.data.sources import ManifestConfig, build_manifest, manifest_from_records, read_source
from pipeline.tasks import NIH_FINDINGS, task_labels

IMAGES = 112_120  # published size of ChestX-ray14
EFFUSION_IMAGES = 13_317  # published count of images labelled Effusion


def xrv_data_file(name: str) -> Path:
    """A label file from the torchxrayvision wheel, located without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision wheel (label CSVs) not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def config_for(root: Path, **settings) -> ManifestConfig:
    config = {"format": "nih", "root": str(root), "out": str(root / "m.csv"), **settings}
    return ManifestConfig.model_validate(config)


@pytest.fixture(scope="module")
def labels() -> pd.DataFrame:
    return pd.read_csv(xrv_data_file("Data_Entry_2017_v2020.csv.gz"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih")
    (root / "Data_Entry_2017_v2020.csv.gz").symlink_to(xrv_data_file("Data_Entry_2017_v2020.csv.gz"))
    return root


@pytest.fixture(scope="module")
def records(root) -> pd.DataFrame:
    return read_source(config_for(root))


@pytest.fixture(scope="module")
def manifest(root, records) -> pd.DataFrame:
    return manifest_from_records(records, config_for(root))


def test_counts_match_plain_pandas_and_published_numbers(labels, manifest):
    findings = labels["Finding Labels"].str.split("|")
    effusion = findings.map(lambda f: "Effusion" in f)
    assert len(labels) == IMAGES and effusion.sum() == EFFUSION_IMAGES
    frontal = labels["View Position"].isin(["PA", "AP"])
    assert frontal.all()  # ChestX-ray14 is frontal only, so the default view filter keeps everything
    assert len(manifest) == IMAGES
    assert (manifest["effusion"] == 1).sum() == (effusion & frontal).sum()
    assert (manifest["effusion"] == 0).sum() == (~effusion & frontal).sum()
    assert manifest["effusion"].notna().all()  # NIH has no blank or uncertain labels


def test_demographics_ids_and_splits(labels, manifest):
    assert manifest["patient_id"].nunique() == labels["Patient ID"].nunique()
    assert (manifest["sex"] == "F").sum() == (labels["Patient Gender"] == "F").sum()
    assert manifest["age"].tolist()[:3] == labels["Patient Age"].astype(float).tolist()[:3]
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert not manifest["study_id"].str.contains("png").any()
    assert manifest["image_path"].iloc[0].endswith("/images/00000001_000.png")


def test_splits_deterministic_and_seeded(root, records, manifest):
    again = manifest_from_records(records, config_for(root))
    assert again["split"].tolist() == manifest["split"].tolist()
    reseeded = manifest_from_records(records, config_for(root, split={"seed": 1}))
    assert (reseeded["split"] != manifest["split"]).mean() > 0.3


def test_all_findings_mapped_as_plain_pandas_counts(labels, manifest):
    findings = labels["Finding Labels"].str.split("|").map(set)
    for label, column in NIH_FINDINGS.items():
        expected = findings.map(lambda f, label=label: f == {"No Finding"} if label == "No Finding" else label in f)
        assert (manifest[column] == 1).sum() == expected.sum(), label
        assert (manifest[column] == 0).sum() == (~expected).sum(), label
    assert manifest["pleural_thickening"].sum() == 3385 and manifest["hernia"].sum() == 227


def test_unknown_finding_label_is_an_error(tmp_path, labels):
    subset = labels.head(5).copy()
    subset.loc[subset.index[2], "Finding Labels"] = "Effusion|Pleural Thickening"
    subset.to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(ManifestError, match=r"Finding Labels has labels \['Pleural Thickening'\]"):
        build_manifest(config_for(tmp_path))


def test_no_finding_negatives_and_balance(root, records, labels):
    manifest = manifest_from_records(records, config_for(root))
    paper = task_labels(manifest, "effusion_paper")  # the paper's policy: negatives need No Finding
    no_finding = labels["Finding Labels"] == "No Finding"
    assert (paper == 0).sum() == no_finding.sum()
    assert (paper == 1).sum() == EFFUSION_IMAGES
    strict = manifest_from_records(records, config_for(root, require_labels=["effusion_paper"]))
    assert len(strict) == no_finding.sum() + EFFUSION_IMAGES  # effusion-free images with findings dropped

    balanced = manifest_from_records(records, config_for(root, balance="effusion_paper"))
    counts = balanced.groupby(["split", "effusion"]).size().unstack()
    minority = strict.groupby(["split", "effusion"]).size().unstack().min(axis=1)
    assert (counts[0] == minority).all() and (counts[1] == minority).all()
    assert (balanced.loc[balanced["effusion"] == 0, "no_finding"] == 1).all()
    by_cardiomegaly = manifest_from_records(records, config_for(root, balance="cardiomegaly"))
    counts = by_cardiomegaly.groupby(["split", "cardiomegaly"]).size().unstack()
    assert (counts[0] == counts[1]).all() and counts[1].sum() == (manifest["cardiomegaly"] == 1).sum()


def write_2017_variant(labels: pd.DataFrame, path: Path) -> None:
    """The original 2017 layout: trailing comma (empty last column) and ``058Y``-style ages."""
    old = labels.copy()
    old["Patient Age"] = old["Patient Age"].map(lambda a: f"{a:03d}Y")
    old.loc[old.index[1], "Patient Age"] = "413Y"  # the 2017 file has such entry errors
    text = old.to_csv(index=False, lineterminator="\n")
    path.write_text("\n".join(line + "," for line in text.strip().split("\n")) + "\n")


def test_2017_header_variant_images_and_official_split(tmp_path, labels):
    subset = labels.head(60)
    write_2017_variant(subset, tmp_path / "Data_Entry_2017.csv")
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    (tmp_path / "images_001" / "images" / subset["Image Index"].iloc[0]).write_bytes(b"")
    is_test = subset["Patient ID"] >= subset["Patient ID"].iloc[40]  # the official lists split by patient
    assert 5 < is_test.sum() < 50
    (tmp_path / "test_list.txt").write_text("\n".join(subset["Image Index"][is_test]) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(subset["Image Index"][~is_test]) + "\n")

    manifest = build_manifest(config_for(tmp_path, split={"mode": "official"}))
    assert len(manifest) == 60
    assert manifest["age"].iloc[0] == float(subset["Patient Age"].iloc[0])
    assert pd.isna(manifest["age"].iloc[1])  # 413 years -> unknown
    names = subset["Image Index"]
    assert manifest["image_path"].iloc[0] == str(tmp_path.resolve() / "images_001/images" / names.iloc[0])
    assert manifest["image_path"].iloc[1] == str(tmp_path.resolve() / "images" / names.iloc[1])
    assert (manifest["split"][is_test.to_numpy()] == "test").all()
    assert set(manifest["split"][~is_test.to_numpy()]) <= {"train", "val"}


def test_official_split_needs_list_files(tmp_path, labels):
    labels.head(10).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(ManifestError, match="no official split"):
        build_manifest(config_for(tmp_path, split={"mode": "official"}))


def test_missing_column_is_a_clear_error(tmp_path, labels):
    labels.head(10).drop(columns=["Patient ID"]).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    with pytest.raises(ManifestError, match=r"Data_Entry_2017_v2020.csv: missing columns \['Patient ID'\]"):
        build_manifest(config_for(tmp_path))
    (tmp_path / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(ManifestError, match="no Data_Entry_2017"):
        build_manifest(config_for(tmp_path))
