"""The cohort manifest: one CSV per cohort, one row per image (= study), fixed columns in fixed order.

Schema (documented for users in ``data_manifests/README.md``):

==============  ==========================================================================
``study_id``    pseudonym ``std-<hex>``, unique per row
``patient_id``  pseudonym ``pat-<hex>``
``image_path``  absolute, or relative to the manifest file; kept exactly as written
``view``        upper case (``PA``, ``AP``, ``LATERAL``, ``LL``, ...), empty if unknown
``sex``         ``M``, ``F`` or empty
``age``         years (float), empty if unknown
``effusion``    ``1``, ``0``, ``-1`` (uncertain) or empty (not mentioned / unlabeled)
``split``       ``train``, ``val`` or ``test``; a patient is never in two splits
``source``      ``mimic-cxr-jpg``, ``chexpert``, ``nih``, ``folder`` or ``demo``
==============  ==========================================================================

then, optionally, one column per other finding of :data:`pipeline.tasks.FINDINGS` the cohort has
(``no_finding``, ``cardiomegaly``, ..., ``support_devices``, ...), in that order, with the same
values as ``effusion``. Finding columns hold the source's *raw* codes: the label policy (uncertain,
blank) is the task's, applied when labels are read (:func:`pipeline.tasks.task_labels`). Manifests
written before these columns existed (``effusion`` only, 1/0/empty) stay valid.

In memory (what :func:`read_manifest` and :func:`validate_manifest` return): ``view``, ``sex``,
``split``, ``source`` and the ids are ``str`` with ``""`` for unknown (so ``df.sex == "M"`` needs no
NA handling), ``age`` is ``float64`` with NaN for unknown, finding columns are pandas ``Int64`` with
``<NA>`` for blank.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import AfterValidator

from pipeline.errors import UserError
from pipeline.runtime.atomic import atomic_path
from pipeline.tasks import FINDINGS, TaskSpec, get_task, task_labels

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "study_id", "patient_id", "image_path", "view", "sex", "age", "effusion", "split", "source",
)
#: Finding columns a manifest may carry after :data:`MANIFEST_COLUMNS` (``effusion`` is always there).
FINDING_COLUMNS: tuple[str, ...] = tuple(c for c in FINDINGS if c not in MANIFEST_COLUMNS)
#: Values of a finding column: positive, negative, uncertain (empty: blank / not mentioned).
FINDING_CODES: tuple[float, ...] = (1.0, 0.0, -1.0)
SPLITS: tuple[str, ...] = ("train", "val", "test")
SOURCES: tuple[str, ...] = ("mimic-cxr-jpg", "chexpert", "nih", "folder", "demo")
SEXES: tuple[str, ...] = ("M", "F")
DEFAULT_SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}

_STUDY_ID = re.compile(r"^std-[0-9a-f]{8,64}$")
_PATIENT_ID = re.compile(r"^pat-[0-9a-f]{8,64}$")
_STRING_COLUMNS = ("study_id", "patient_id", "image_path", "view", "sex", "split", "source")


def check_split(value: str) -> str:
    if value not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {value!r}")
    return value


#: A config field naming a split (checked when the config is validated).
SplitName = Annotated[str, AfterValidator(check_split)]


class ManifestError(UserError):
    """A manifest or label file that breaks the schema; the message names the file and the reason."""


def require_columns(df: pd.DataFrame, columns: Iterable[str], source: str | Path) -> None:
    """Raise ``ManifestError: <source>: missing columns [...]`` unless all ``columns`` are present."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing columns {missing}")


def validate_manifest(
    df: pd.DataFrame, source: str | Path = "<manifest>", extra_columns: Iterable[str] = ()
) -> pd.DataFrame:
    """Check ``df`` against the schema and return a normalised copy (column order, dtypes).

    ``source`` names where ``df`` came from in error messages. The optional finding columns
    (:data:`FINDING_COLUMNS`) present are kept after :data:`MANIFEST_COLUMNS`, in their canonical
    order; other columns are errors unless listed in ``extra_columns`` (they are then kept, last).
    Normalisation is limited to what cannot change meaning: stripping whitespace, upper-casing
    ``view`` and ``sex``, parsing ``age`` and the findings as numbers.
    """
    require_columns(df, MANIFEST_COLUMNS, source)
    extra = list(extra_columns)
    findings = [c for c in FINDING_COLUMNS if c in df.columns]
    unexpected = [c for c in df.columns if c not in MANIFEST_COLUMNS and c not in findings and c not in extra]
    if unexpected:
        raise ManifestError(f"{source}: undocumented extra columns {unexpected} (finding columns: "
                            f"{', '.join(FINDINGS)})")

    extra_present = [c for c in extra if c in df.columns and c not in findings]
    out = df.loc[:, [*MANIFEST_COLUMNS, *findings, *extra_present]].copy()
    out.index = pd.RangeIndex(len(out))
    for column in _STRING_COLUMNS:
        out[column] = _as_text(out[column])
    out["view"] = out["view"].str.upper()
    out["sex"] = out["sex"].str.upper()
    out["age"] = _as_float(out["age"], "age", source)
    for column in ("effusion", *findings):
        out[column] = _as_code(out[column], column, source)

    _check_pattern(out, "study_id", _STUDY_ID, source)
    _check_pattern(out, "patient_id", _PATIENT_ID, source)
    duplicated = out["study_id"][out["study_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ManifestError(f"{source}: study_id not unique, e.g. {duplicated[:5]}")
    empty_paths = out.index[out["image_path"] == ""].tolist()
    if empty_paths:
        raise ManifestError(f"{source}: empty image_path in rows {empty_paths[:5]}")
    _check_values(out, "sex", (*SEXES, ""), source)
    _check_values(out, "split", SPLITS, source)
    _check_values(out, "source", SOURCES, source)
    bad_views = out.index[out["view"].str.contains(r"[^A-Z0-9 _]", regex=True)].tolist()
    if bad_views:
        raise ManifestError(f"{source}: view must be upper-case words, rows {bad_views[:5]}")
    negative_age = out.index[out["age"] < 0].tolist()
    if negative_age:
        raise ManifestError(f"{source}: negative age in rows {negative_age[:5]}")
    splits_per_patient = out.groupby("patient_id")["split"].nunique()
    leaking = splits_per_patient.index[splits_per_patient > 1].tolist()
    if leaking:
        raise ManifestError(f"{source}: patients in more than one split, e.g. {leaking[:5]}")
    return out


def read_manifest(path: str | Path, extra_columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read and validate a manifest CSV. ``image_path`` is returned as written (not resolved)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable CSV ({err})") from err
    return validate_manifest(df, source=path, extra_columns=extra_columns)


def write_manifest(df: pd.DataFrame, path: str | Path, extra_columns: Iterable[str] = ()) -> Path:
    """Validate ``df`` and write it atomically; unknown values become empty cells."""
    path = Path(path)
    out = validate_manifest(df, source=path, extra_columns=extra_columns)
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, na_rep="", lineterminator="\n")
    return path


def resolve_image_paths(df: pd.DataFrame, manifest_path: str | Path) -> pd.Series:
    """Absolute image paths: relative entries are taken relative to the manifest's folder."""
    base = Path(manifest_path).resolve().parent
    return df["image_path"].map(lambda p: str(Path(p) if Path(p).is_absolute() else base / p))


def unit_hash(keys: Iterable[str], seed: int) -> np.ndarray:
    """A stable number in [0, 1) per key, from SHA-256 of ``"<seed>:<key>"``.

    Independent of row order, of the other keys and of Python's hash randomisation, so a key's
    value never changes when keys are added or removed.
    """
    values = [
        int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()[:8], "big") / 2.0**64
        for key in keys
    ]
    return np.asarray(values, dtype=np.float64)


def assign_patient_splits(
    df: pd.DataFrame, fractions: Mapping[str, float] | None = None, seed: int = 0
) -> pd.DataFrame:
    """Return a copy with ``split`` set per patient from a hash of ``patient_id`` and ``seed``.

    Each patient gets a stable number in [0, 1) (:func:`unit_hash`); the splits take consecutive
    intervals of lengths ``fractions`` (in the order train, val, test). Adding patients therefore
    never moves existing ones, and all images of a patient land in the same split. Split sizes
    follow ``fractions`` only in expectation, so tiny cohorts may get an empty split (logged).
    """
    fractions = dict(DEFAULT_SPLIT_FRACTIONS if fractions is None else fractions)
    unknown = [name for name in fractions if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected a subset of {list(SPLITS)}")
    if any(value < 0 for value in fractions.values()):
        raise ValueError(f"split fractions must be non-negative, got {fractions}")
    if not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {fractions}")

    names = [name for name in SPLITS if fractions.get(name, 0.0) > 0]
    edges = np.cumsum([fractions[name] for name in names])
    edges[-1] = 1.0  # float round-off must not leave patients beyond the last edge
    patients = pd.unique(df["patient_id"])
    positions = np.searchsorted(edges, unit_hash(patients, seed), side="right")
    by_patient = dict(zip(patients, np.asarray(names, dtype=object)[positions]))

    out = df.copy()
    out["split"] = out["patient_id"].map(by_patient).astype(object)
    empty = [name for name in names if not (out["split"] == name).any()]
    if empty and len(out):
        log.warning("splits %s are empty (%d patients); consider other fractions", empty, len(patients))
    return out


def balance_classes(df: pd.DataFrame, task: str | TaskSpec, seed: int = 0) -> pd.DataFrame:
    """Downsample the majority class of ``task`` (any registered task) within each split to the
    minority's size.

    Rows without a label for the task (its label policy applied: blank, uncertain, unknown sex ...)
    are dropped, since they belong to no class. Which rows are kept is decided by :func:`unit_hash`
    of ``study_id``, so it is deterministic and does not depend on row order. A split with a single
    class keeps no rows of it (nothing to balance against) and is logged.
    """
    spec = get_task(task)
    labels = task_labels(df, spec)
    labelled = df.loc[labels.notna()].copy()
    labelled["_label"] = labels[labels.notna()]
    labelled["_rank"] = unit_hash(labelled["study_id"], seed)
    kept = []
    for split, rows in labelled.groupby("split", sort=False):
        counts = rows["_label"].value_counts()
        if len(counts) < 2:
            log.warning("split %r has a single %s class; no rows kept when balancing", split, spec.name)
            continue
        per_class = int(counts.min())
        for _, members in rows.groupby("_label", sort=False):
            kept.append(members.nsmallest(per_class, "_rank"))
    if not kept:
        return df.iloc[0:0].copy()
    return pd.concat(kept).sort_index().drop(columns=["_label", "_rank"])


def _as_text(values: pd.Series) -> pd.Series:
    """Stripped strings with ``""`` for missing values (None, NaN, NA)."""
    return values.astype(object).where(values.notna(), "").astype(str).str.strip().astype(object)


def _as_float(values: pd.Series, column: str, source: str | Path) -> pd.Series:
    text = _as_text(values)
    parsed = pd.to_numeric(text.replace("", np.nan), errors="coerce").astype("float64")
    bad = text.index[(text != "") & parsed.isna()].tolist()
    if bad:
        raise ManifestError(f"{source}: {column} is not a number in rows {bad[:5]}")
    return parsed


def _as_code(values: pd.Series, column: str, source: str | Path) -> pd.Series:
    parsed = _as_float(values, column, source)
    bad = parsed.index[parsed.notna() & ~parsed.isin(FINDING_CODES)].tolist()
    if bad:
        raise ManifestError(f"{source}: {column} must be 1, 0, -1 (uncertain) or empty, rows {bad[:5]}")
    return parsed.astype("Int64")


def _check_pattern(df: pd.DataFrame, column: str, pattern: re.Pattern[str], source: str | Path) -> None:
    bad = df.index[~df[column].str.fullmatch(pattern.pattern)].tolist()
    if bad:
        raise ManifestError(
            f"{source}: {column} must be a pseudonym matching {pattern.pattern}, rows {bad[:5]}"
        )


def _check_values(df: pd.DataFrame, column: str, allowed: tuple[str, ...], source: str | Path) -> None:
    bad = sorted(set(df[column]) - set(allowed))
    if bad:
        raise ManifestError(f"{source}: {column} has values {bad[:5]}; allowed {list(allowed)}")
