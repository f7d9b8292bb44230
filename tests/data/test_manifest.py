import numpy as np
import pandas as pd
import pytest

from pipeline.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    assign_patient_splits,
    balance_classes,
    read_manifest,
    resolve_image_paths,
    unit_hash,
    validate_manifest,
    write_manifest,
)
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym


def make_manifest(n_images: int = 12, images_per_patient: int = 2) -> pd.DataFrame:
    rows = []
    for i in range(n_images):
        rows.append(
            {
                "study_id": study_pseudonym(f"image-{i}"),
                "patient_id": patient_pseudonym(f"patient-{i // images_per_patient}"),
                "image_path": f"images/{i}.png",
                "view": ["PA", "AP", "LATERAL"][i % 3],
                "sex": ["M", "F", ""][i % 3],
                "age": [40.5, np.nan, 71.0][i % 3],
                "effusion": [1, 0, pd.NA, 0][i % 4],
                "split": "train",
                "source": "demo",
            }
        )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def test_round_trip_keeps_values_dtypes_and_empty_cells(tmp_path):
    df = make_manifest()
    path = write_manifest(df, tmp_path / "cohort" / "manifest.csv")
    text = path.read_text().splitlines()
    assert text[0] == ",".join(MANIFEST_COLUMNS)
    assert text[3].split(",")[4:7] == ["", "71.0", ""]  # unknown sex, age 71, unlabeled effusion

    back = read_manifest(path)
    assert list(back.columns) == list(MANIFEST_COLUMNS)
    assert back["effusion"].dtype == "Int64" and back["age"].dtype == "float64"
    assert back["image_path"].tolist() == df["image_path"].tolist()  # kept as written
    assert back["effusion"].isna().tolist() == df["effusion"].isna().tolist()
    assert back["effusion"].dropna().tolist() == df["effusion"].dropna().astype(int).tolist()
    np.testing.assert_array_equal(back["age"].to_numpy(), df["age"].to_numpy(dtype=float))
    assert back["sex"].tolist() == df["sex"].tolist()


def test_validate_normalises_case_and_whitespace():
    df = make_manifest(3)
    df["view"] = [" pa", "ap ", "lateral"]
    df["sex"] = ["m", "f", None]
    out = validate_manifest(df)
    assert out["view"].tolist() == ["PA", "AP", "LATERAL"]
    assert out["sex"].tolist() == ["M", "F", ""]


def test_missing_columns_named_with_source():
    df = make_manifest().drop(columns=["effusion", "split"])
    with pytest.raises(ManifestError, match=r"/x/cohort.csv: missing columns \['effusion', 'split'\]"):
        validate_manifest(df, source="/x/cohort.csv")


@pytest.mark.parametrize(
    "column, value, reason",
    [
        ("study_id", "10000032", "pseudonym"),  # a raw dataset id must never pass
        ("patient_id", "pat-Jane Doe", "pseudonym"),
        ("sex", "X", "sex has values"),
        ("split", "validate", "split has values"),
        ("source", "padchest", "source has values"),
        ("effusion", 2, r"effusion must be 1, 0, -1 \(uncertain\) or empty"),
        ("effusion", "yes", "effusion is not a number"),
        ("age", -3, "negative age"),
        ("image_path", "", "empty image_path"),
        ("view", "PA/AP", "view must be upper-case"),
    ],
)
def test_bad_values_rejected(column, value, reason):
    df = make_manifest()
    df[column] = df[column].astype(object)
    df.loc[1, column] = value
    with pytest.raises(ManifestError, match=reason):
        validate_manifest(df, source="m.csv")


def test_duplicate_study_and_patient_split_leak_rejected():
    df = make_manifest()
    df.loc[1, "study_id"] = df.loc[0, "study_id"]
    with pytest.raises(ManifestError, match="not unique"):
        validate_manifest(df)
    df = make_manifest()
    df.loc[1, "split"] = "test"  # image 1 shares patient 0 with image 0 (train)
    with pytest.raises(ManifestError, match="more than one split"):
        validate_manifest(df)


def test_extra_columns_only_when_declared(tmp_path):
    df = make_manifest().assign(note="x")
    with pytest.raises(ManifestError, match=r"undocumented extra columns \['note'\]"):
        validate_manifest(df)
    path = write_manifest(df, tmp_path / "m.csv", extra_columns=["note"])
    assert read_manifest(path, extra_columns=["note"]).columns[-1] == "note"


def test_read_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="nope.csv: manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ManifestError, match="empty.csv: not a readable CSV"):
        read_manifest(empty)


def test_resolve_image_paths_relative_to_manifest(tmp_path):
    df = make_manifest(2)
    df.loc[1, "image_path"] = "/abs/x.png"
    resolved = resolve_image_paths(df, tmp_path / "sub" / "m.csv")
    assert resolved.tolist() == [str(tmp_path.resolve() / "sub" / "images" / "0.png"), "/abs/x.png"]


def many_patients(n_patients: int, images_per_patient: int = 3) -> pd.DataFrame:
    return make_manifest(n_patients * images_per_patient, images_per_patient)


def test_patient_splits_are_patient_level_deterministic_and_near_fractions():
    df = many_patients(3000)
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    a = assign_patient_splits(df, fractions, seed=3)
    b = assign_patient_splits(df.sample(frac=1.0, random_state=1), fractions, seed=3).sort_index()
    assert a["split"].tolist() == b["split"].tolist()  # row order does not matter
    assert (a.groupby("patient_id")["split"].nunique() == 1).all()
    share = a.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    for name, fraction in fractions.items():
        assert abs(share[name] - fraction) < 0.03  # binomial sd at n=3000 is < 0.01
    other_seed = assign_patient_splits(df, fractions, seed=4)
    assert (other_seed["split"] != a["split"]).mean() > 0.3
    validate_manifest(a)


def test_adding_patients_does_not_move_existing_ones():
    df = many_patients(400)
    before = assign_patient_splits(df.iloc[:600], seed=0)
    after = assign_patient_splits(df, seed=0)
    assert after["split"].iloc[:600].tolist() == before["split"].tolist()


def test_split_fraction_errors_and_zero_fraction():
    df = many_patients(200)
    with pytest.raises(ValueError, match="sum to 1"):
        assign_patient_splits(df, {"train": 0.5, "val": 0.2})
    with pytest.raises(ValueError, match="unknown split names"):
        assign_patient_splits(df, {"train": 0.5, "holdout": 0.5})
    two_way = assign_patient_splits(df, {"train": 0.8, "test": 0.2})
    assert set(two_way["split"]) == {"train", "test"}


def test_unit_hash_is_stable_and_uniformish():
    keys = [f"k{i}" for i in range(5000)]
    values = unit_hash(keys, seed=0)
    assert np.array_equal(values[:10], unit_hash(keys[:10], seed=0))
    assert ((values >= 0) & (values < 1)).all()
    assert abs(values.mean() - 0.5) < 0.02


def test_balance_classes_equalises_each_split_and_drops_unknown():
    df = assign_patient_splits(many_patients(600), seed=0)
    df["effusion"] = pd.array(np.where(np.arange(len(df)) % 5 == 0, 1, 0), dtype="Int64")
    df.loc[df.index % 7 == 0, "effusion"] = pd.NA
    balanced = balance_classes(df, "effusion", seed=0)
    counts = balanced.groupby(["split", "effusion"]).size().unstack()
    assert (counts[0] == counts[1]).all()
    expected = df.dropna(subset=["effusion"]).groupby(["split", "effusion"]).size().unstack().min(axis=1)
    assert counts[1].tolist() == expected.loc[counts.index].tolist()
    assert balanced["effusion"].notna().all()
    again = balance_classes(df.sample(frac=1.0, random_state=2), "effusion", seed=0)
    assert sorted(again["study_id"]) == sorted(balanced["study_id"])
    by_sex = balance_classes(df, "sex", seed=0)
    assert set(by_sex["sex"]) == {"M", "F"}
    assert (by_sex.groupby(["split", "sex"]).size().unstack().nunique(axis=1) == 1).all()


def test_finding_columns_are_optional_raw_codes_in_canonical_order(tmp_path):
    df = make_manifest()
    df.insert(2, "support_devices", [1, 0, "-1", ""] * 3)  # anywhere in the input ...
    df["no_finding"] = [np.nan, 1.0, 0.0] * 4
    df.loc[2, "effusion"] = -1  # uncertain is kept as written: the task's policy decides
    path = write_manifest(df, tmp_path / "m.csv")
    assert path.read_text().splitlines()[0] == ",".join([*MANIFEST_COLUMNS, "no_finding", "support_devices"])
    back = read_manifest(path)  # ... written after the schema columns, in FINDINGS order
    assert back["support_devices"].dtype == "Int64"
    assert back["support_devices"].tolist()[:4] == [1, 0, -1, pd.NA]
    assert back["effusion"].tolist()[2] == -1
    old = read_manifest(write_manifest(make_manifest(), tmp_path / "old.csv"))  # effusion only: still valid
    assert list(old.columns) == list(MANIFEST_COLUMNS)


def test_unknown_finding_column_and_bad_code_rejected():
    df = make_manifest().assign(cardiomegally=1)
    with pytest.raises(ManifestError, match=r"undocumented extra columns \['cardiomegally'\]"):
        validate_manifest(df, source="m.csv")
    df = make_manifest().assign(cardiomegaly=["1", "0.5"] * 6)
    with pytest.raises(ManifestError, match=r"m.csv: cardiomegaly must be 1, 0, -1 \(uncertain\) or empty"):
        validate_manifest(df, source="m.csv")


def test_balance_on_any_task_uses_its_label_policy():
    df = assign_patient_splits(many_patients(600), seed=0)
    df["cardiomegaly"] = pd.array(np.resize([1, 0, 0, -1, pd.NA], len(df)), dtype="Int64")
    balanced = balance_classes(df, "cardiomegaly", seed=0)
    assert set(balanced["cardiomegaly"].astype(int)) == {0, 1}  # uncertain and blank dropped
    counts = balanced.groupby(["split", "cardiomegaly"]).size().unstack()
    assert (counts[0] == counts[1]).all()
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="unknown task 'cardio'"):
        balance_classes(df, "cardio")
