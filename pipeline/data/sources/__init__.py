"""Manifest builders: one module per dataset format, one shared pipeline after reading.

Each format module (``mimic_cxr_jpg``, ``chexpert``, ``nih``, ``folder``) exposes
``read_records(root, config) -> DataFrame`` with the columns :data:`RECORD_COLUMNS`: pseudonymised
ids, absolute image paths, normalised view/sex/age, and the *raw* CheXpert-style code (1.0, 0.0,
-1.0, NaN) of every finding the format knows, as ``<finding>_code`` for the finding columns of
:data:`pipeline.tasks.FINDINGS` (``effusion_code`` and ``no_finding_code`` always; NaN throughout
where the source has no such label). The codes go into the manifest as they are: the label policy
(uncertain, blank) belongs to the task that reads them (:mod:`pipeline.tasks`). Everything a format
does not decide (view filter, required labels, splits, balancing, validation) happens once, here, in
:func:`build_manifest`.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from pipeline.config import StrictModel
from pipeline.data.manifest import (
    DEFAULT_SPLIT_FRACTIONS,
    SPLITS,
    ManifestError,
    assign_patient_splits,
    balance_classes,
    validate_manifest,
)
from pipeline.tasks import FINDINGS, check_task_name, task_labels

log = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    "mimic-cxr-jpg": "mimic_cxr_jpg",
    "chexpert": "chexpert",
    "nih": "nih",
    "folder": "folder",
}
RECORD_COLUMNS: tuple[str, ...] = (
    "study_id", "patient_id", "image_path", "view", "sex", "age",
    "effusion_code", "no_finding_code", "official_split",
)
#: ``<finding>_code`` record column of each manifest finding column.
FINDING_CODE_COLUMNS: dict[str, str] = {f"{finding}_code": finding for finding in FINDINGS}
# Official split value for rows a dataset reserves for development without saying train or val
# (NIH train_val_list, CheXpert train.csv); they are divided between train and val per patient.
TRAINVAL = "trainval"
_LABEL_CODES = (1.0, 0.0, -1.0)
_MAX_PLAUSIBLE_AGE = 120.0


class SplitPolicy(StrictModel):
    mode: Literal["patient", "official"] = "patient"
    fractions: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SPLIT_FRACTIONS))
    seed: int = 0

    @field_validator("fractions")
    @classmethod
    def _known_splits(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = [name for name in value if name not in SPLITS]
        if unknown:
            raise ValueError(f"unknown split names {unknown}; expected a subset of {list(SPLITS)}")
        if any(v < 0 for v in value.values()) or not np.isclose(sum(value.values()), 1.0):
            raise ValueError(f"split fractions must be non-negative and sum to 1, got {value}")
        return value


class FolderOptions(StrictModel):
    labels_csv: str | None = None


class MimicOptions(StrictModel):
    # MIMIC-IV hosp/patients.csv(.gz); default: patients.csv(.gz) in the MIMIC-CXR-JPG root.
    patients_csv: str | None = None


class NihOptions(StrictModel):
    # default: the last Data_Entry_2017*.csv(.gz) in the root by name (v2020 sorts after 2017).
    data_entry_csv: str | None = None


class ManifestConfig(StrictModel):
    format: Literal["mimic-cxr-jpg", "chexpert", "nih", "folder"]
    root: str
    out: str
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"])  # [] keeps every view
    # tasks (pipeline/tasks.py) every kept image must have a label for, their label policy applied
    require_labels: list[str] = []
    split: SplitPolicy = Field(default_factory=SplitPolicy)
    balance: str | None = None  # a task: downsample its majority class within each split
    folder: FolderOptions = Field(default_factory=FolderOptions)
    mimic: MimicOptions = Field(default_factory=MimicOptions)
    nih: NihOptions = Field(default_factory=NihOptions)

    @field_validator("views")
    @classmethod
    def _upper_views(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value if v.strip()]

    @field_validator("require_labels")
    @classmethod
    def _known_required(cls, value: list[str]) -> list[str]:
        return [check_task_name(name) for name in value]

    @field_validator("balance")
    @classmethod
    def _known_balance(cls, value: str | None) -> str | None:
        return None if value is None else check_task_name(value)


def build_manifest(config: ManifestConfig) -> pd.DataFrame:
    """Read the dataset named by ``config.format`` and return a validated manifest frame."""
    return manifest_from_records(read_source(config), config)


def read_source(config: ManifestConfig) -> pd.DataFrame:
    """All images of the dataset as :data:`RECORD_COLUMNS` rows, before any filter or policy."""
    root = Path(config.root)
    if not root.is_dir():
        raise ManifestError(f"{root}: dataset root is not a folder")
    module = importlib.import_module(f"{__name__}.{FORMATS[config.format]}")
    records = module.read_records(root, config)
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:  # a programming error in a format module, not bad user input
        raise RuntimeError(f"{config.format} reader returned no columns {missing}")
    log.info("%s: %d images from %s", config.format, len(records), root)
    return records


def manifest_from_records(records: pd.DataFrame, config: ManifestConfig) -> pd.DataFrame:
    """View filter, finding columns, required labels, splits, validation, then optional class balancing."""
    records = filter_views(records, config.views)
    records = finding_columns(records)
    records = require_labels(records, config.require_labels)
    records = assign_splits(records, config.split)
    manifest = records.assign(source=config.format).drop(columns=["official_split"])
    manifest = validate_manifest(manifest, source=f"{config.format} manifest from {config.root}")
    if config.balance:
        manifest = balance_classes(manifest, config.balance, seed=config.split.seed)
        manifest = manifest.reset_index(drop=True)
    return manifest


def filter_views(records: pd.DataFrame, views: list[str]) -> pd.DataFrame:
    """Keep rows whose view is in ``views`` (all rows when ``views`` is empty)."""
    if not views:
        return records
    kept = records.loc[records["view"].isin(views)]
    log.info("views %s: kept %d of %d images", views, len(kept), len(records))
    if len(records) and not len(kept):
        unknown = int((records["view"] == "").sum())
        raise ManifestError(
            f"no image has a view in {views} ({len(records)} images, {unknown} with unknown view); "
            "use --all-views, or give views (e.g. a 'view' column in the folder labels CSV)"
        )
    return kept


def finding_columns(records: pd.DataFrame) -> pd.DataFrame:
    """``<finding>_code`` columns -> the manifest's finding columns (raw codes, Int64, NA = blank).

    ``effusion`` is always written; another finding only where the source gave it a value for at
    least one image (a source without that label, e.g. the folder format's ``no_finding``, leaves no
    empty column that would read as "unlabeled everywhere").
    """
    codes = {c: f for c, f in FINDING_CODE_COLUMNS.items() if c in records.columns}
    out = records.drop(columns=list(codes))
    for code, finding in codes.items():
        values = records[code].astype("float64")
        if finding == "effusion" or values.notna().any():
            out[finding] = values.astype("Int64")
    counts = {f: int((out[f] == 1).sum()) for f in FINDINGS if f in out.columns}
    log.info("findings (positive images): %s", ", ".join(f"{f} {n}" for f, n in counts.items()))
    return out


def require_labels(records: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Keep the images that every task of ``tasks`` labels (its label policy applied)."""
    if not tasks:
        return records
    keep = np.ones(len(records), dtype=bool)
    for task in tasks:
        keep &= task_labels(records, task).notna().to_numpy()
    log.info("labels required for %s: kept %d of %d images", tasks, int(keep.sum()), len(records))
    return records.loc[keep]


def assign_splits(records: pd.DataFrame, policy: SplitPolicy) -> pd.DataFrame:
    """Patient-level hash split, or the dataset's official split (``trainval`` divided per patient)."""
    if policy.mode == "patient":
        return assign_patient_splits(records, policy.fractions, seed=policy.seed)
    official = records["official_split"].fillna("").astype(str)
    if (official == "").all():
        raise ManifestError("split mode 'official': this source has no official split")
    unassigned = int((official == "").sum())
    if unassigned:
        log.warning("official split: dropping %d images listed in no split file", unassigned)
    out = records.loc[official != ""].copy()
    official = official[official != ""]
    out["split"] = official
    trainval = official == TRAINVAL
    if trainval.any():
        development = {k: policy.fractions.get(k, 0.0) for k in ("train", "val")}
        total = sum(development.values())
        if total <= 0:
            raise ManifestError("official split: fractions give train and val no share of 'trainval'")
        divided = assign_patient_splits(
            out.loc[trainval], {k: v / total for k, v in development.items()}, seed=policy.seed
        )
        out.loc[trainval, "split"] = divided["split"]
    return out


# ---- helpers shared by the format modules -------------------------------------------------------

def find_label_file(root: Path, name: str) -> Path:
    """``root/name`` or its gzipped form ``root/name.gz``; ManifestError if neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ManifestError(f"{root / name}: label file not found (also looked for {name}.gz)")


def read_label_csv(path: Path, required: list[str], **kwargs) -> pd.DataFrame:
    """Read a label CSV and check it has ``required`` columns; errors name the file."""
    try:
        df = pd.read_csv(path, **kwargs)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read label CSV ({err})") from err
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing columns {missing}")
    return df


def label_codes(values: pd.Series, path: Path, column: str) -> pd.Series:
    """CheXpert-style codes as float (1.0, 0.0, -1.0, NaN); anything else is a ManifestError."""
    codes = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = values.notna() & (values.astype(str).str.strip() != "") & ~codes.isin(_LABEL_CODES)
    if bad.any():
        examples = values[bad].astype(str).unique()[:5].tolist()
        raise ManifestError(f"{path}: column {column!r} has values {examples}; expected 1, 0, -1 or blank")
    return codes


def normalise_sex(values: pd.Series) -> pd.Series:
    """``M``/``F`` from M, F, Male, Female (any case); everything else (Unknown, O, blank) -> ``""``."""
    first = values.fillna("").astype(str).str.strip().str.upper().str[:1]
    return first.where(first.isin(["M", "F"]), "")


def normalise_view(values: pd.Series) -> pd.Series:
    """Upper case, single spaces, blank for unknown: ``" ap "`` -> ``"AP"``."""
    text = values.fillna("").astype(str).str.strip().str.upper()
    return text.str.replace(r"\s+", " ", regex=True)


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_ages(values: pd.Series) -> pd.Series:
    """Years from ``58``, ``"58"``, ``"058Y"`` or DICOM AS ``"006M"``; NaN if unknown or implausible.

    Ages above 120 years are data-entry errors (NIH 2017 has some above 400) and become unknown.
    """
    text = values.astype(object).where(values.notna(), "").astype(str)
    parts = text.str.extract(_AGE)
    number = pd.to_numeric(parts[0], errors="coerce")
    years = number * parts[1].fillna("").str.upper().map(_AGE_UNIT_YEARS)
    return years.where(years <= _MAX_PLAUSIBLE_AGE).astype("float64")


def parse_age(value: object) -> float:
    """:func:`parse_ages` for one value."""
    return float(parse_ages(pd.Series([value], dtype=object)).iloc[0])


def pseudonymise(values: pd.Series, kind: Literal["patient", "study"]) -> pd.Series:
    """Pseudonyms for a column of raw ids (each distinct id hashed once)."""
    from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym

    make = patient_pseudonym if kind == "patient" else study_pseudonym
    raw = values.astype(str)
    table = {key: make(key) for key in pd.unique(raw)}
    return raw.map(table).astype(object)
