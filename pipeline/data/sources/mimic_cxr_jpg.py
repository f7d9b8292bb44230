"""MIMIC-CXR-JPG 2.0.0: metadata, CheXpert labels and split CSVs (plain or ``.gz``) in the root.

One row per DICOM in ``mimic-cxr-2.0.0-metadata.csv``; labels are per study and joined on
(subject_id, study_id), so studies without a label row are unlabeled. All 14 CheXpert labels of
``mimic-cxr-2.0.0-chexpert.csv`` go to the manifest's finding columns as raw codes
(:data:`pipeline.tasks.CHEXPERT_FINDINGS`); the paper's effusion policy is the task
``effusion_paper``. Image:
``files/p{first two digits of subject}/p{subject_id}/s{study_id}/{dicom_id}.jpg``. Sex and age come
from MIMIC-IV ``patients.csv`` when available: age at the study = ``anchor_age`` + (study year −
``anchor_year``); both are shifted consistently in MIMIC, so the difference is real. Official
split: train/validate/test -> train/val/test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.manifest import ManifestError
from pipeline.data.sources import (
    ManifestConfig,
    find_label_file,
    label_codes,
    normalise_sex,
    normalise_view,
    pseudonymise,
    read_label_csv,
)
from pipeline.tasks import CHEXPERT_FINDINGS

log = logging.getLogger(__name__)

METADATA = "mimic-cxr-2.0.0-metadata.csv"
LABELS = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
PATIENTS = "patients.csv"
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"]
LABEL_COLUMNS = ["subject_id", "study_id", *CHEXPERT_FINDINGS]
SPLIT_COLUMNS = ["dicom_id", "split"]
PATIENT_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year"]
_OFFICIAL_SPLIT = {"train": "train", "validate": "val", "test": "test"}
_IDS = {"dicom_id": str, "subject_id": str, "study_id": str}


def read_records(root: Path, config: ManifestConfig) -> pd.DataFrame:
    metadata_path = find_label_file(root, METADATA)
    labels_path = find_label_file(root, LABELS)
    split_path = find_label_file(root, SPLIT)
    metadata = read_label_csv(metadata_path, METADATA_COLUMNS, dtype={**_IDS, "ViewPosition": str})
    labels = read_label_csv(labels_path, LABEL_COLUMNS, dtype=_IDS)
    split = read_label_csv(split_path, SPLIT_COLUMNS, dtype=_IDS)
    unique_keys = ((labels, labels_path, ["subject_id", "study_id"]), (split, split_path, ["dicom_id"]))
    for frame, path, keys in unique_keys:
        duplicated = frame.duplicated(keys)
        if duplicated.any():
            raise ManifestError(f"{path}: {int(duplicated.sum())} duplicate rows for {keys}")

    rows = metadata.merge(
        labels[LABEL_COLUMNS], on=["subject_id", "study_id"], how="left", validate="many_to_one"
    ).merge(split[SPLIT_COLUMNS], on="dicom_id", how="left", validate="one_to_one")
    unknown_split = sorted(set(rows["split"].dropna()) - set(_OFFICIAL_SPLIT))
    if unknown_split:
        raise ManifestError(f"{split_path}: unknown split values {unknown_split}")
    sex, age = demographics(rows, patients_path(root, config))
    base = root.resolve()
    return pd.DataFrame(
        {
            "study_id": pseudonymise(rows["dicom_id"], "study"),
            "patient_id": pseudonymise(rows["subject_id"], "patient"),
            "image_path": [
                str(base / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
                for s, st, d in zip(rows["subject_id"], rows["study_id"], rows["dicom_id"])
            ],
            "view": normalise_view(rows["ViewPosition"]),
            "sex": sex,
            "age": age,
            **{f"{column}_code": label_codes(rows[header], labels_path, header)
               for header, column in CHEXPERT_FINDINGS.items()},
            "official_split": rows["split"].map(_OFFICIAL_SPLIT).fillna(""),
        }
    )


def patients_path(root: Path, config: ManifestConfig) -> Path | None:
    """The configured MIMIC-IV ``patients.csv``, else one in the root, else None (sex/age unknown)."""
    if config.mimic.patients_csv:
        path = Path(config.mimic.patients_csv)
        if not path.is_file():
            raise ManifestError(f"{path}: patients file not found")
        return path
    for candidate in (root / PATIENTS, root / f"{PATIENTS}.gz"):
        if candidate.is_file():
            return candidate
    log.warning("no MIMIC-IV %s in %s and none configured: sex and age left empty", PATIENTS, root)
    return None


def demographics(rows: pd.DataFrame, path: Path | None) -> tuple[pd.Series, pd.Series]:
    """Sex (M/F/"") and age in years at the study for each row, from MIMIC-IV patients.csv."""
    if path is None:
        return pd.Series("", index=rows.index, dtype=object), pd.Series(np.nan, index=rows.index)
    patients = read_label_csv(path, PATIENT_COLUMNS, dtype={"subject_id": str, "gender": str})
    if patients["subject_id"].duplicated().any():
        raise ManifestError(f"{path}: duplicate subject_id rows")
    joined = rows[["subject_id", "StudyDate"]].merge(
        patients[PATIENT_COLUMNS], on="subject_id", how="left", validate="many_to_one"
    )
    joined.index = rows.index
    study_year = pd.to_numeric(joined["StudyDate"], errors="coerce") // 10000
    anchor_age = pd.to_numeric(joined["anchor_age"], errors="coerce")
    anchor_year = pd.to_numeric(joined["anchor_year"], errors="coerce")
    age = (anchor_age + (study_year - anchor_year)).astype("float64")
    return normalise_sex(joined["gender"]), age.where(age >= 0)
