"""The shared steps of every builder: finding columns, required labels (a task's label policy),
official splits, parsing helpers, config checks."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.data.manifest import ManifestError
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.data.sources import (
    ManifestConfig,
    SplitPolicy,
    assign_splits,
    finding_columns,
    label_codes,
    normalise_sex,
    normalise_view,
    parse_ages,
    require_labels,
)
from pipeline.tasks import TaskSpec, task_labels

# effusion code, No Finding code for six images
CODES = [(1.0, np.nan), (0.0, 1.0), (0.0, np.nan), (-1.0, np.nan), (np.nan, 1.0), (np.nan, np.nan)]


def records() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "study_id": [study_pseudonym(i) for i in range(len(CODES))],
            "patient_id": [patient_pseudonym(i // 2) for i in range(len(CODES))],
            "effusion_code": [c for c, _ in CODES],
            "no_finding_code": [n for _, n in CODES],
        }
    )


def labels_after(**policy) -> list:
    """The effusion task's labels under ``policy`` on the raw codes, -9 for a row the policy leaves
    unlabeled that was not blank (formerly dropped from the manifest), None for a blank one."""
    manifest = finding_columns(records())
    labels = task_labels(manifest, TaskSpec(name="t", column="effusion", **policy))
    blank = manifest["effusion"].isna()
    return [None if pd.isna(v) and b else -9 if pd.isna(v) else int(v) for v, b in zip(labels, blank)]


@pytest.mark.parametrize(
    "policy, expected",  # -9 marks an unlabeled row that was not blank, None a blank one
    [
        ({}, [1, 0, 0, -9, None, None]),
        ({"uncertain": "positive"}, [1, 0, 0, 1, None, None]),
        ({"uncertain": "negative"}, [1, 0, 0, 0, None, None]),
        ({"blank": "negative"}, [1, 0, 0, -9, 0, 0]),
        ({"negative_requires": ["no_finding"]}, [1, 0, -9, -9, None, None]),
        ({"negative_requires": ["no_finding"], "uncertain": "negative"}, [1, 0, -9, -9, None, None]),
        ({"negative_requires": ["no_finding"], "blank": "negative"}, [1, 0, -9, -9, 0, None]),
    ],
)
def test_label_policy_table(policy, expected):
    assert labels_after(**policy) == expected


def test_finding_columns_keep_raw_codes_and_other_columns():
    out = finding_columns(records())
    assert out["effusion"].dtype == "Int64" and out["no_finding"].dtype == "Int64"
    assert out["effusion"].tolist()[:4] == [1, 0, 0, -1]
    assert out["study_id"].tolist() == records()["study_id"].tolist()
    assert "effusion_code" not in out.columns
    blank = finding_columns(records().assign(no_finding_code=np.nan, edema_code=np.nan))
    assert "no_finding" not in blank.columns and "edema" not in blank.columns  # the source has no such label
    assert "effusion" in blank.columns  # always written


def test_require_labels_keeps_rows_the_tasks_label():
    manifest = finding_columns(records()).assign(sex=["M", "F", "", "M", "F", "M"])
    kept = require_labels(manifest, ["effusion_paper"])
    assert kept.index.tolist() == [0, 1]  # positive; negative with No Finding
    assert require_labels(manifest, ["effusion", "sex"]).index.tolist() == [0, 1]
    assert require_labels(manifest, []).index.tolist() == list(range(6))


def test_official_split_divides_trainval_per_patient():
    df = pd.DataFrame(
        {
            "study_id": [study_pseudonym(i) for i in range(400)],
            "patient_id": [patient_pseudonym(i // 2) for i in range(400)],
            "official_split": ["test"] * 100 + ["trainval"] * 290 + [""] * 10,
        }
    )
    out = assign_splits(df, SplitPolicy(mode="official", fractions={"train": 0.6, "val": 0.2, "test": 0.2}))
    assert len(out) == 390  # images in no official list are dropped
    assert (out["split"].iloc[:100] == "test").all()
    share = (out["split"].iloc[100:] == "train").mean()
    assert 0.6 < share < 0.9  # expected 0.75 = 0.6 / (0.6 + 0.2), 145 patients
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()
    with pytest.raises(ManifestError, match="no official split"):
        assign_splits(df.assign(official_split=""), SplitPolicy(mode="official"))


def test_parsers():
    ages = parse_ages(pd.Series(["058Y", "6M", "14D", "2W", 71, 68.0, "413", "", None, "old"], dtype=object))
    expected = [58.0, 0.5, 14 / 365.25, 14 / 365.25, 71.0, 68.0, np.nan, np.nan, np.nan, np.nan]
    np.testing.assert_allclose(ages.to_numpy(), expected, equal_nan=True)
    sexes = normalise_sex(pd.Series(["Male", "female", "F", "O", "Unknown", None]))
    assert sexes.tolist() == ["M", "F", "F", "", "", ""]
    views = normalise_view(pd.Series([" ap ", "pa", "AP  axial", None]))
    assert views.tolist() == ["AP", "PA", "AP AXIAL", ""]
    codes = label_codes(pd.Series(["1.0", "-1", "", None, "0"]), Path("x.csv"), "Pleural Effusion")
    np.testing.assert_array_equal(codes.to_numpy(), [1.0, -1.0, np.nan, np.nan, 0.0])
    with pytest.raises(ManifestError, match=r"x.csv: column 'Pleural Effusion' has values \['yes'\]"):
        label_codes(pd.Series(["1", "yes"]), Path("x.csv"), "Pleural Effusion")


def test_config_rejects_bad_values():
    base = {"format": "nih", "root": "/data", "out": "m.csv"}
    assert ManifestConfig.model_validate({**base, "views": ["pa", " ap"]}).views == ["PA", "AP"]
    assert ManifestConfig.model_validate({**base, "balance": "cardiomegaly"}).balance == "cardiomegaly"
    for bad in (
        {"split": {"fractions": {"train": 0.9, "val": 0.2}}},
        {"split": {"fractions": {"train": 0.5, "dev": 0.5}}},
        {"labels": {"uncertain": "maybe"}},  # the label policy is the task's now
        {"format": "padchest"},
        {"balance": "age"},
        {"require_labels": ["effusion", "cardiomegally"]},
        {"typo": 1},
    ):
        with pytest.raises(ValidationError):
            ManifestConfig.model_validate({**base, **bad})
