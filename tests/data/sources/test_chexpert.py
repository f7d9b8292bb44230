"""CheXpert builder against the real CheXpert ``train.csv`` shipped in the torchxrayvision wheel."""

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.manifest import ManifestError, validate_manifest
from pipeline.data.sources import ManifestConfig, build_manifest, manifest_from_records, read_source
from pipeline.tasks import CHEXPERT_FINDINGS, TaskSpec, task_labels

FRONTAL_ROWS = 191_027  # published size of CheXpert's frontal training images


def xrv_data_file(name: str) -> Path:
    """A label file from the torchxrayvision wheel, located without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None:
        pytest.skip("torchxrayvision wheel (label CSVs) not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / name


@pytest.fixture(scope="module")
def labels() -> pd.DataFrame:
    return pd.read_csv(xrv_data_file("chexpert_train.csv.gz"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chexpert")
    (root / "train.csv.gz").symlink_to(xrv_data_file("chexpert_train.csv.gz"))
    return root


def config_for(root: Path, **settings) -> ManifestConfig:
    return ManifestConfig.model_validate(
        {"format": "chexpert", "root": str(root), "out": str(root / "m.csv"), **settings}
    )


@pytest.fixture(scope="module")
def records(root) -> pd.DataFrame:
    """Every image, read once; the policy tests below apply their own settings to it."""
    return read_source(config_for(root))


@pytest.fixture(scope="module")
def default_manifest(root, records) -> pd.DataFrame:
    return manifest_from_records(records, config_for(root))


STRICT = TaskSpec(name="effusion_strict", column="effusion", uncertain="positive",
                  negative_requires=["no_finding"])


@pytest.fixture(scope="module")
def strict_all_views_manifest(root, records) -> pd.DataFrame:
    from pipeline.tasks import registered

    with registered({STRICT.name: STRICT}):  # a user-defined task, as the run config's task_definitions
        return manifest_from_records(records, config_for(root, views=[], require_labels=[STRICT.name]))


def test_default_policy_counts_match_plain_pandas(labels, default_manifest):
    assert (labels["Frontal/Lateral"] == "Frontal").sum() == FRONTAL_ROWS
    frontal = labels[labels["AP/PA"].isin(["PA", "AP"])]  # default views; 17 frontal LL/RL rows excluded
    effusion = frontal["Pleural Effusion"]
    counts = default_manifest["effusion"].value_counts(dropna=False)
    assert counts[1] == (effusion == 1.0).sum()
    assert counts[0] == (effusion == 0.0).sum()
    assert counts[-1] == (effusion == -1.0).sum()  # raw codes: uncertain kept, the task drops it
    assert default_manifest["effusion"].isna().sum() == effusion.isna().sum()
    assert len(default_manifest) == len(frontal)
    assert task_labels(default_manifest, "effusion").notna().sum() == effusion.isin([0.0, 1.0]).sum()
    assert set(default_manifest["view"]) == {"PA", "AP"}
    assert (default_manifest["source"] == "chexpert").all()


def test_all_fourteen_findings_keep_their_raw_codes(labels, default_manifest):
    frontal = labels[labels["AP/PA"].isin(["PA", "AP"])]
    for header, column in CHEXPERT_FINDINGS.items():
        expected = frontal[header].fillna(9.0).value_counts().to_dict()  # 9: blank
        got = default_manifest[column].astype("float64").fillna(9.0).value_counts().to_dict()
        assert got == expected, header
    devices = task_labels(default_manifest, "support_devices")
    assert (devices == 1).sum() == (frontal["Support Devices"] == 1.0).sum()
    assert devices.isna().sum() == (frontal["Support Devices"].isna() | (frontal["Support Devices"] == -1.0)).sum()


def test_strict_policy_counts_match_plain_pandas(labels, strict_all_views_manifest):
    manifest = strict_all_views_manifest
    effusion, no_finding = labels["Pleural Effusion"], labels["No Finding"]
    positive = effusion.isin([1.0, -1.0])  # U-Ones
    negative = (effusion == 0.0) & (no_finding == 1.0)
    strict = task_labels(manifest, STRICT)
    assert (strict == 1).sum() == positive.sum()
    assert (strict == 0).sum() == negative.sum()
    assert len(manifest) == positive.sum() + negative.sum()  # require_label: no unlabeled rows
    frontal = labels["Frontal/Lateral"] == "Frontal"
    assert (manifest["view"] != "LATERAL").sum() == (frontal & (positive | negative)).sum()


def test_all_frontal_rows_reach_the_manifest(root, records, labels):
    manifest = manifest_from_records(records, config_for(root, views=[]))
    assert len(manifest) == len(labels)
    assert (manifest["view"] != "LATERAL").sum() == FRONTAL_ROWS


def test_ids_demographics_and_paths(labels, default_manifest, root):
    first = labels.iloc[0]  # patient00001/study1/view1_frontal.jpg, Female, 68
    row = default_manifest.iloc[0]
    assert row["image_path"] == str(root.resolve() / "train/patient00001/study1/view1_frontal.jpg")
    assert (row["sex"], row["age"]) == ({"Female": "F", "Male": "M"}[first["Sex"]], float(first["Age"]))
    assert default_manifest["study_id"].is_unique
    patients = labels["Path"].str.extract(r"(patient\d+)/")[0]
    frontal = labels["AP/PA"].isin(["PA", "AP"])
    assert default_manifest["patient_id"].nunique() == patients[frontal].nunique()
    assert not default_manifest["patient_id"].str.contains("patient").any()
    assert set(default_manifest["sex"]) <= {"M", "F", ""}


def test_splits_patient_level_and_stable_across_policies(default_manifest, strict_all_views_manifest):
    assert (default_manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(default_manifest["split"]) == {"train", "val", "test"}
    both = default_manifest.merge(strict_all_views_manifest, on="study_id", suffixes=("_a", "_b"))
    assert len(both) > 10_000
    assert (both["split_a"] == both["split_b"]).all()


def test_official_split_train_val_from_train_csv_and_test_from_valid(tmp_path, labels):
    subset = labels.head(300)
    subset.to_csv(tmp_path / "train.csv", index=False)
    valid = labels.iloc[300:340].copy()
    valid["Path"] = valid["Path"].str.replace("/train/", "/valid/").str.replace("patient", "patient9")
    valid.to_csv(tmp_path / "valid.csv", index=False)
    config = ManifestConfig.model_validate(
        {"format": "chexpert", "root": str(tmp_path), "out": str(tmp_path / "m.csv"), "views": [],
         "split": {"mode": "official"}}
    )
    manifest = validate_manifest(build_manifest(config))
    from_valid = manifest["image_path"].str.contains("/valid/")
    assert from_valid.sum() == len(valid)
    assert (manifest.loc[from_valid, "split"] == "test").all()
    assert set(manifest.loc[~from_valid, "split"]) == {"train", "val"}


def test_missing_column_is_a_clear_error(tmp_path, labels):
    labels.head(50).drop(columns=["Pleural Effusion"]).to_csv(tmp_path / "train.csv", index=False)
    config = ManifestConfig(format="chexpert", root=str(tmp_path), out=str(tmp_path / "m.csv"))
    with pytest.raises(ManifestError, match=r"train.csv: missing columns \['Pleural Effusion'\]"):
        build_manifest(config)


def test_bad_label_code_and_bad_path_are_clear_errors(tmp_path, labels):
    broken = labels.head(20).copy()
    broken.loc[3, "Pleural Effusion"] = 2.0
    broken.to_csv(tmp_path / "train.csv", index=False)
    config = ManifestConfig(format="chexpert", root=str(tmp_path), out=str(tmp_path / "m.csv"))
    with pytest.raises(ManifestError, match=r"train.csv: column 'Pleural Effusion' has values \['2.0'\]"):
        build_manifest(config)
    broken = labels.head(20).copy()
    broken.loc[2, "Path"] = "somewhere/image.jpg"
    broken.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ManifestError, match="train.csv: Path must contain patientNNNNN"):
        build_manifest(config)
