"""The shared steps of every builder: label policy, official splits, parsing helpers, config checks."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.data.manifest import ManifestError
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.data.sources import (
    LabelPolicy,
    ManifestConfig,
    SplitPolicy,
    apply_label_policy,
    assign_splits,
    label_codes,
    normalise_sex,
    normalise_view,
    parse_ages,
)

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
    out = apply_label_policy(records(), LabelPolicy(**policy))
    return [None if pd.isna(v) else int(v) for v in out["effusion"].reindex(range(len(CODES)), fill_value=-9)]


@pytest.mark.parametrize(
    "policy, expected",  # -9 marks a dropped row, None an unlabeled one
    [
        ({}, [1, 0, 0, -9, None, None]),
        ({"uncertain": "positive"}, [1, 0, 0, 1, None, None]),
        ({"uncertain": "negative"}, [1, 0, 0, 0, None, None]),
        ({"require_label": True}, [1, 0, 0, -9, -9, -9]),
        ({"negative_requires_no_finding": True}, [1, 0, -9, -9, None, None]),
        ({"negative_requires_no_finding": True, "uncertain": "negative", "require_label": True},
         [1, 0, -9, -9, -9, -9]),
    ],
)
def test_label_policy_table(policy, expected):
    assert labels_after(**policy) == expected


def test_label_policy_keeps_other_columns_and_dtype():
    out = apply_label_policy(records(), LabelPolicy())
    assert out["effusion"].dtype == "Int64"
    assert out["study_id"].tolist() == records()["study_id"].drop(index=3).tolist()


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
    for bad in (
        {"split": {"fractions": {"train": 0.9, "val": 0.2}}},
        {"split": {"fractions": {"train": 0.5, "dev": 0.5}}},
        {"labels": {"uncertain": "maybe"}},
        {"format": "padchest"},
        {"balance": "age"},
        {"typo": 1},
    ):
        with pytest.raises(ValidationError):
            ManifestConfig.model_validate({**base, **bad})
