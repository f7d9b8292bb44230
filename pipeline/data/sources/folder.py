"""A folder of images: DICOM (``.dcm``, ``.dicom`` or extension-less with the ``DICM`` preamble),
PNG and JPEG, found recursively.

DICOM headers are read without pixels; PatientID and StudyInstanceUID are pseudonymised at once and
never stored (a study shared by several files gets one pseudonym per SOPInstanceUID, since the
manifest has one row per image). View, sex and age come from ViewPosition, PatientSex, PatientAge.
PNG/JPEG files are their own study and, unless the labels CSV names a ``patient_id``, their own
patient. ``image_path`` is the file's location, so file and folder names must not carry identifiers.

Labels (optional): a CSV with ``filename`` (path relative to the root, or a unique base name) and
any of ``effusion`` (1, 0, -1, blank), ``sex`` (M/F), ``view`` (PA, AP, ...), ``patient_id``; or
folder names: a path component ``effusion`` -> 1, ``no_effusion`` -> 0. The CSV wins over folder
names and DICOM headers where it gives a value. PNG/JPEG carry no view, so the default PA/AP filter
needs a ``view`` column (or ``--all-views``).
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline.data.manifest import ManifestError
from pipeline.data.sources import (
    ManifestConfig,
    label_codes,
    normalise_sex,
    normalise_view,
    parse_age,
    pseudonymise,
    read_label_csv,
)
from pipeline.runtime.progress import progress

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
FOLDER_LABELS = {"effusion": 1.0, "no_effusion": 0.0}
# labels CSV column -> working column; the CSV wins over the DICOM header where it gives a value
_CSV_FIELDS = {"sex": "csv_sex", "view": "csv_view", "patient_id": "csv_patient"}
_HEADER_TAGS = ["PatientID", "StudyInstanceUID", "SOPInstanceUID", "ViewPosition", "PatientSex", "PatientAge"]


def read_records(root: Path, config: ManifestConfig) -> pd.DataFrame:
    files = find_images(root)
    if not files:
        raise ManifestError(f"{root}: no DICOM, PNG or JPEG files found")
    rows = pd.DataFrame([describe_file(root, path) for path in progress(files, desc="headers")])
    rows["effusion_code"] = rows["relative"].map(folder_label)
    for column in _CSV_FIELDS.values():
        rows[column] = ""
    if config.folder.labels_csv:
        rows = merge_label_csv(rows, Path(config.folder.labels_csv))

    rows["sex"] = normalise_sex(rows["csv_sex"]).where(rows["csv_sex"] != "", normalise_sex(rows["sex"]))
    rows["view"] = rows["csv_view"].where(rows["csv_view"] != "", rows["view"])
    patient = rows["csv_patient"].where(rows["csv_patient"] != "", rows["patient_key"])
    patient = patient.where(patient != "", "file:" + rows["relative"])
    shared_study = rows["study_key"].duplicated(keep=False) & (rows["study_key"] != "")
    study = rows["study_key"].where(~shared_study, rows["study_key"] + "/" + rows["instance_key"])
    study = study.where(study != "", "file:" + rows["relative"])
    return pd.DataFrame(
        {
            "study_id": pseudonymise(study, "study"),
            "patient_id": pseudonymise(patient, "patient"),
            "image_path": rows["path"],
            "view": normalise_view(rows["view"]),
            "sex": rows["sex"],
            "age": rows["age"].astype("float64"),
            "effusion_code": rows["effusion_code"].astype("float64"),
            "no_finding_code": np.nan,
            "official_split": "",
        }
    )


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` in sorted order, skipping hidden files and folders."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        suffix = path.suffix.lower()
        known = suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES
        if known or (suffix == "" and has_dicom_preamble(path)):
            found.append(path)
    return found


def has_dicom_preamble(path: Path) -> bool:
    """Part 10 files carry ``DICM`` after a 128-byte preamble."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def describe_file(root: Path, path: Path) -> dict[str, object]:
    """Location plus, for DICOM, the header fields the manifest needs (raw ids stay in this dict)."""
    record: dict[str, object] = {
        "path": str(path.resolve()),
        "relative": PurePosixPath(path.relative_to(root)).as_posix(),
        "patient_key": "", "study_key": "", "instance_key": "", "view": "", "sex": "", "age": np.nan,
    }
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return record
    import pydicom  # lazy: only folders with DICOM need it
    from pydicom.errors import InvalidDicomError

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
    except (InvalidDicomError, OSError, ValueError) as err:
        raise ManifestError(f"{path}: cannot read DICOM header ({err})") from err
    record.update(
        patient_key=str(header.get("PatientID", "") or "").strip(),
        study_key=str(header.get("StudyInstanceUID", "") or "").strip(),
        instance_key=str(header.get("SOPInstanceUID", "") or "").strip(),
        view=str(header.get("ViewPosition", "") or ""),
        sex=str(header.get("PatientSex", "") or ""),
        age=parse_age(header.get("PatientAge", None) or None),
    )
    return record


def folder_label(relative: str) -> float:
    """1.0 under an ``effusion/`` folder, 0.0 under ``no_effusion/``, NaN otherwise (innermost wins)."""
    for part in reversed(PurePosixPath(relative).parts[:-1]):
        if part.lower() in FOLDER_LABELS:
            return FOLDER_LABELS[part.lower()]
    return np.nan


def merge_label_csv(rows: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Attach ``effusion``/``sex``/``view``/``patient_id`` from the labels CSV.

    Rows are matched by path relative to the root, else by base name (which must then be unique).
    """
    labels = read_label_csv(path, ["filename"], dtype=str, keep_default_na=False)
    if not {"effusion", *_CSV_FIELDS} & set(labels.columns):
        raise ManifestError(
            f"{path}: missing columns: need at least one of {['effusion', *_CSV_FIELDS]}"
        )
    labels["filename"] = labels["filename"].str.strip().str.replace("\\", "/", regex=False)
    if labels["filename"].duplicated().any():
        raise ManifestError(f"{path}: filename listed more than once")

    by_relative = rows["relative"].isin(labels["filename"])
    basename = rows["relative"].map(lambda p: PurePosixPath(p).name)
    ambiguous = basename.duplicated(keep=False) & ~by_relative & basename.isin(labels["filename"])
    if ambiguous.any():
        raise ManifestError(
            f"{path}: base names match several files ({rows.loc[ambiguous, 'relative'].head(3).tolist()}); "
            "use paths relative to the root"
        )
    key = rows["relative"].where(by_relative, basename)
    table = labels.set_index("filename")
    matched = key.isin(table.index)
    unmatched = len(labels) - int(matched.sum())
    if unmatched:
        log.warning("%s: %d label rows match no image file", path, unmatched)

    out = rows.copy()
    if "effusion" in table.columns:
        codes = label_codes(table["effusion"].replace("", np.nan), path, "effusion")
        from_csv = key.map(codes)
        out["effusion_code"] = from_csv.where(from_csv.notna(), out["effusion_code"])
    for column, target in _CSV_FIELDS.items():
        if column in table.columns:
            out[target] = key.map(table[column]).fillna("").astype(str).str.strip()
    return out
