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

Folders as they come (PACS exports hold copies and collisions): a file that cannot be used is
logged and skipped, never blocking the others, and :func:`scan_folder` returns it in a problems table
(:data:`PROBLEM_COLUMNS`, kinds in :data:`PROBLEMS`) named by its path relative to the root:

* a DICOM header that cannot be read (junk, no ``DICM`` preamble) or that ingest would reject
  (modality, frames, size, colour model: :func:`pipeline.io.readers.check_radiograph_header`);
* files sharing a SOPInstanceUID: one is kept (see :func:`resolve_collision`).

The scan stays cheap at scale: every DICOM is read header-only; only files whose SOPInstanceUIDs
collide are hashed, and only differing contents among them are decoded. A truncated file without a
duplicate is therefore not caught here but by ingest, which records it and goes on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
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
_HEADER_TAGS = [
    "PatientID", "StudyInstanceUID", "SOPInstanceUID", "ViewPosition", "PatientSex", "PatientAge",
    # what check_radiograph_header looks at
    "SOPClassUID", "Modality", "NumberOfFrames", "Rows", "Columns", "PhotometricInterpretation",
]

PROBLEM_COLUMNS: tuple[str, ...] = ("path", "problem", "reason", "kept")
PROBLEMS: dict[str, str] = {
    "unreadable": "not a DICOM file, or its header (or, for a UID collision, its pixel data) cannot be read",
    "not_radiograph": "the header shows an object ingest rejects (modality, frames, size, colour model)",
    "identical_copy": "the same bytes as the kept file",
    "unreadable_duplicate": "cannot be decoded (truncated?); a readable file has its SOPInstanceUID",
    "uid_conflict": "a different readable image with the kept file's SOPInstanceUID",
}


@dataclass(frozen=True)
class SkippedFile:
    """One file left out of the manifest; paths are relative to the root."""

    path: str
    problem: str  # a key of PROBLEMS
    reason: str
    kept: str = ""  # the file kept in its place, if any


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_folder` found: the images for the manifest and the files left out."""

    records: pd.DataFrame  # RECORD_COLUMNS, one row per usable image
    problems: pd.DataFrame  # PROBLEM_COLUMNS, one row per skipped file, sorted by path


class UnusableFile(Exception):
    """Raised by :func:`describe_file` for a file to skip; ``problem`` is a key of :data:`PROBLEMS`."""

    def __init__(self, problem: str, reason: str) -> None:
        super().__init__(reason)
        self.problem = problem
        self.reason = reason


def read_records(root: Path, config: ManifestConfig) -> pd.DataFrame:
    """The format-module entry point (see :mod:`pipeline.data.sources`): records only."""
    return scan_folder(root, config).records


def scan_folder(root: Path, config: ManifestConfig) -> FolderScan:
    """The folder's usable images as records, and the files skipped with the reason for each."""
    if not root.is_dir():
        raise ManifestError(f"{root}: dataset root is not a folder")
    files = find_images(root)
    if not files:
        raise ManifestError(f"{root}: no DICOM, PNG or JPEG files found")
    described, skipped = [], []
    for path in progress(files, desc="headers"):
        try:
            described.append(describe_file(root, path))
        except UnusableFile as err:
            skipped.append(SkippedFile(relative_path(root, path), err.problem, err.reason))
    rows = pd.DataFrame(described)
    if described:
        rows, duplicates = resolve_duplicates(rows)
        skipped += duplicates
    problems = pd.DataFrame([asdict(s) for s in skipped], columns=list(PROBLEM_COLUMNS))
    problems = problems.sort_values("path", ignore_index=True)
    log_problems(problems, root, len(files))
    if rows.empty:
        raise ManifestError(f"{root}: none of the {len(files)} image files is usable (the log names each)")
    return FolderScan(records_from_rows(rows, config), problems)


def records_from_rows(rows: pd.DataFrame, config: ManifestConfig) -> pd.DataFrame:
    """Labels from folder names and the labels CSV, pseudonymised ids: :data:`RECORD_COLUMNS`."""
    rows = rows.reset_index(drop=True)
    rows["effusion_code"] = rows["relative"].map(folder_label)
    for column in _CSV_FIELDS.values():
        rows[column] = ""
    if config.folder.labels_csv:
        rows = merge_label_csv(rows, Path(config.folder.labels_csv))

    rows["sex"] = normalise_sex(rows["csv_sex"]).where(rows["csv_sex"] != "", normalise_sex(rows["sex"]))
    rows["view"] = rows["csv_view"].where(rows["csv_view"] != "", rows["view"])
    patient = rows["csv_patient"].where(rows["csv_patient"] != "", rows["patient_key"])
    patient = patient.where(patient != "", "file:" + rows["relative"])
    # One row per image: a study with several images gets one pseudonym per image. After
    # resolve_duplicates SOPInstanceUIDs are unique; a file without one is keyed by its path.
    instance = rows["instance_key"].where(rows["instance_key"] != "", "file:" + rows["relative"])
    shared_study = rows["study_key"].duplicated(keep=False) & (rows["study_key"] != "")
    study = rows["study_key"].where(~shared_study, rows["study_key"] + "/" + instance)
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


def relative_path(root: Path, path: Path) -> str:
    return PurePosixPath(path.relative_to(root)).as_posix()


def describe_file(root: Path, path: Path) -> dict[str, object]:
    """Location plus, for DICOM, the header fields the manifest needs (raw ids stay in this dict).

    Raises :class:`UnusableFile` for a DICOM whose header cannot be read or shows a non-radiograph.
    """
    record: dict[str, object] = {
        "path": str(path.resolve()),
        "relative": relative_path(root, path),
        "patient_key": "", "study_key": "", "instance_key": "", "view": "", "sex": "", "age": np.nan,
    }
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return record
    header = read_dicom_header(path)
    record.update(
        patient_key=str(header.get("PatientID", "") or "").strip(),
        study_key=str(header.get("StudyInstanceUID", "") or "").strip(),
        instance_key=str(header.get("SOPInstanceUID", "") or "").strip(),
        view=str(header.get("ViewPosition", "") or ""),
        sex=str(header.get("PatientSex", "") or ""),
        age=parse_age(header.get("PatientAge", None) or None),
    )
    return record


def read_dicom_header(path: Path):
    """The header up to the pixel data, checked as ingest would check it; :class:`UnusableFile` if not."""
    import pydicom  # lazy: only folders with DICOM need it (and the reader imports MONAI)
    from pydicom.errors import InvalidDicomError

    from pipeline.io.readers import RadiographReadError, check_radiograph_header

    try:
        # No force=True: the reader needs the DICM preamble too, so such a file would only fail later.
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError as err:
        raise UnusableFile("unreadable", "not a DICOM file (no DICM preamble)") from err
    except Exception as err:  # pydicom raises many types (EOFError, struct.error, ...) on broken files
        raise UnusableFile("unreadable", f"cannot read DICOM header ({type(err).__name__}: {err})") from err
    try:
        check_radiograph_header(path, header)
    except RadiographReadError as err:
        raise UnusableFile("not_radiograph", err.reason) from err
    return header


def resolve_duplicates(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[SkippedFile]]:
    """Keep one file per SOPInstanceUID; ``rows`` (from :func:`describe_file`) are in sorted order.

    Only the files whose SOPInstanceUIDs collide are looked at again, so a clean folder costs
    nothing beyond its headers.
    """
    colliding = (rows["instance_key"] != "") & rows["instance_key"].duplicated(keep=False)
    skipped: list[SkippedFile] = []
    for _, group in rows.loc[colliding].groupby("instance_key", sort=False):
        skipped += resolve_collision(dict(zip(group["relative"], group["path"].map(Path))))
    dropped = rows["relative"].isin({s.path for s in skipped})
    return rows.loc[~dropped], skipped


def resolve_collision(files: dict[str, Path]) -> list[SkippedFile]:
    """The files to skip among ``files`` (relative -> absolute path, sorted) that share a SOPInstanceUID.

    Files with the same bytes are one content: copies of the kept file are ``identical_copy``. If the
    contents differ, each is decoded once with the ingest reader: one that fails (a truncated copy)
    is ``unreadable_duplicate`` and loses to a readable one, whatever the order. Of several readable
    contents the first in sorted order is kept and the others are ``uid_conflict``. Keeping both
    under distinct pseudonyms was rejected: a SOPInstanceUID names one image, so the two are versions
    of it (re-exported, annotated, re-windowed): kept both, the image would count twice in training
    and evaluation and a Secondary Capture would reference an ambiguous source. Keeping the first
    makes the choice repeatable, and the problems table names both files so the user can swap them.
    If no content can be decoded, every file is ``unreadable``.
    """
    digests = {relative: file_digest(path) for relative, path in files.items()}
    contents: dict[str, str] = {}  # digest -> first file holding it
    for relative, digest in digests.items():
        contents.setdefault(digest, relative)
    # A single content needs no decoding: whether it is readable is ingest's business, as for any file.
    failures = {} if len(contents) == 1 else {
        digest: reason for digest, first in contents.items() if (reason := decode_failure(files[first]))
    }
    readable = [first for digest, first in contents.items() if digest not in failures]
    kept = readable[0] if readable else ""
    skipped = []
    for relative, digest in digests.items():
        if relative == kept:
            continue
        if digest in failures:
            problem = "unreadable_duplicate" if kept else "unreadable"
            skipped.append(SkippedFile(relative, problem, failures[digest], kept))
        elif digest == digests[kept]:
            skipped.append(SkippedFile(relative, "identical_copy", "same bytes as the kept file", kept))
        else:
            reason = "a different image with the kept file's SOPInstanceUID"
            skipped.append(SkippedFile(relative, "uid_conflict", reason, kept))
    return skipped


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def decode_failure(path: Path) -> str:
    """Why the ingest reader cannot read ``path`` ("" if it can): the same test ingest applies."""
    from pipeline.io.readers import read_radiograph

    try:
        read_radiograph(path)
    except Exception as err:  # one bad file must never stop the scan; the reader's reason if it gave one
        return getattr(err, "reason", f"{type(err).__name__}: {err}")
    return ""


def log_problems(problems: pd.DataFrame, root: Path, n_files: int) -> None:
    """One warning per skipped file, named by its path relative to the root (no pseudonyms, no UIDs)."""
    for row in problems.itertuples(index=False):
        kept = f"; kept {row.kept}" if row.kept else ""
        log.warning("%s: skipped, %s: %s%s", row.path, row.problem, row.reason, kept)
    if len(problems):
        counts = problems["problem"].value_counts().to_dict()
        log.warning("%s: skipped %d of %d image files %s", root, len(problems), n_files, counts)


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
