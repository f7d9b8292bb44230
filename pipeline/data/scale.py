"""Scale cohort: a large ingest folder derived from a small one, for tests and benchmarks.

Rendering DRRs takes ~0.15 s per study, far too slow for the 100k-study cohorts that memory and
throughput checks need. Instead each new study copies a source study's pixels with small changes:

* an integer translation of at most ``max_shift_px`` pixels (edges replicated, so no black bars a
  classifier could key on);
* with probability ``blend_probability``, a blend with another source study of the *same labels*
  (sex and every finding column, e.g. effusion, support_devices), the partner weighted ``blend_weight``;
* a per-study intensity curve ``gain * x**gamma + offset`` (one 256-entry lookup table per study).

Never a horizontal flip: laterality matters in a chest radiograph (effusion side, heart).

New patients each stand for one source patient and draw their 1..k studies from that patient's
studies, so sex stays consistent within a patient; labels, view, age and the ``source`` column are
copied from the source row. Ids are fresh pseudonyms, splits are patient-level
(:func:`~pipeline.data.manifest.assign_patient_splits`). ``image_path`` is
``derived-from/<source study id>``: it names no file (there is none), so nothing downstream mistakes
the pixels for the source's DICOM. ``provenance.csv`` records how each study was made.

All random draws happen up front from one generator (a few floats per study), and the pixels are
then made chunk by chunk with numpy and written as contiguous store blocks, so the output depends
only on the source, the seed and the settings (not on ``chunk``), and memory is bounded by a chunk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.ingest import MANIFEST_NAME, STATUS_NAME, StatusWriter, open_store, store_path
from pipeline.data.manifest import (
    FINDING_COLUMNS,
    MANIFEST_COLUMNS,
    SPLITS,
    assign_patient_splits,
    read_manifest,
    write_manifest,
)
from pipeline.data.pseudonym import pseudonym
from pipeline.data.store import DEFAULT_SHARD_ROWS, CohortStore
from pipeline.data.transforms import validate_size
from pipeline.errors import UserError
from pipeline.runtime.progress import progress
from pipeline.tasks import FINDINGS

log = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.csv"


class ScaleCohortConfig(StrictModel):
    """``configs/scale_cohort.yaml``; ``source`` and ``out`` usually come from the command line."""

    source: str | None = None
    out: str | None = None
    n: int = Field(10_000, ge=1)
    seed: int = 0
    size: int | None = None  # None: the source's image size
    split_fractions: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
    studies_per_patient_weights: list[float] = [0.6, 0.25, 0.15]  # P(1 study), P(2), ...
    max_shift_px: int = Field(3, ge=0)
    gamma: float = Field(1.15, ge=1)  # gamma log-uniform in [1/gamma, gamma]
    gain: float = Field(0.05, ge=0, le=1)  # gain uniform in [1 - gain, 1 + gain]
    offset: float = Field(0.03, ge=0, le=1)  # offset uniform in [-offset, offset], as a fraction of full scale
    blend_probability: float = Field(0.3, ge=0, le=1)
    blend_weight: tuple[float, float] = (0.2, 0.5)  # the partner's weight, uniform in this range
    chunk: int = Field(4096, ge=1)  # studies per vectorised block (memory ~ chunk x pixels x a few bytes)
    shard_rows: int = Field(DEFAULT_SHARD_ROWS, ge=1)

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int | None) -> int | None:
        return None if value is None else validate_size(value)

    @field_validator("split_fractions")
    @classmethod
    def _check_fractions(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(SPLITS))
        if unknown or any(v < 0 for v in value.values()) or not np.isclose(sum(value.values()), 1.0):
            raise ValueError(f"split_fractions must map {list(SPLITS)} to non-negative numbers "
                             f"summing to 1, got {value}")
        return value

    @field_validator("studies_per_patient_weights")
    @classmethod
    def _check_weights(cls, value: list[float]) -> list[float]:
        if not value or any(v < 0 for v in value) or sum(value) <= 0:
            raise ValueError(f"studies_per_patient_weights must be non-negative with a positive sum, "
                             f"got {value}")
        return value


@dataclass(frozen=True)
class ScaleSummary:
    studies: int
    patients: int
    size: int
    seconds: float
    splits: dict[str, int]


# --- the plan: every random draw, up front ----------------------------------------------------


def _pick_within(groups: np.ndarray, wanted: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row positions: for each ``wanted`` group code, a member of that group chosen by ``u`` in [0, 1)."""
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order[starts[wanted] + np.minimum((u * counts[wanted]).astype(np.int64), counts[wanted] - 1)]


def plan_studies(source: pd.DataFrame, config: ScaleCohortConfig) -> pd.DataFrame:
    """One row per new study: manifest columns plus how to make its pixels (source row, partner, ...)."""
    rng = np.random.default_rng(config.seed)
    n = config.n
    # patients: each new patient stands for one source patient and has 1..k studies
    weights = np.asarray(config.studies_per_patient_weights, dtype=np.float64)
    per_patient = rng.choice(np.arange(1, len(weights) + 1), size=n, p=weights / weights.sum())
    ends = np.cumsum(per_patient)
    n_patients = int(np.searchsorted(ends, n) + 1)
    patient_of_study = np.repeat(np.arange(n_patients), per_patient[:n_patients])[:n]

    source_patient, _ = pd.factorize(source["patient_id"])
    chosen_patient = rng.integers(0, source_patient.max() + 1, size=n_patients)[patient_of_study]
    rows = _pick_within(source_patient, chosen_patient, rng.random(n))

    findings = [c for c in FINDINGS if c in source.columns]  # effusion, and any other finding the source has
    labels = source["sex"].astype(str)
    for column in findings:
        labels = source[column].astype("string").fillna("") + "|" + labels
    label_group, _ = pd.factorize(labels)
    blended = rng.random(n) < config.blend_probability
    partners = _pick_within(label_group, label_group[rows], rng.random(n))
    blend_weight = np.where(blended, rng.uniform(*config.blend_weight, size=n), 0.0)

    shift = rng.integers(-config.max_shift_px, config.max_shift_px + 1, size=(n, 2))
    log_gamma = np.log(config.gamma)
    gamma = np.exp(rng.uniform(-log_gamma, log_gamma, size=n))
    gain = rng.uniform(1 - config.gain, 1 + config.gain, size=n)
    offset = rng.uniform(-config.offset, config.offset, size=n)

    base = source.iloc[rows].reset_index(drop=True)
    # n is part of the key: cohorts of other sizes draw differently, so they must not share ids
    key = f"scale-cohort:{config.seed}:{n}"
    patient_ids = np.asarray([pseudonym(f"{key}:{p}", "patient", length=16) for p in range(n_patients)],
                             dtype=object)
    plan = pd.DataFrame({
        "study_id": [pseudonym(f"{key}:{i}", "study", length=16) for i in range(n)],
        "patient_id": patient_ids[patient_of_study],
    })
    plan["image_path"] = "derived-from/" + base["study_id"]
    for column in ("view", "sex", "age", "effusion", "source", *(c for c in findings if c != "effusion")):
        plan[column] = base[column].to_numpy()
    plan = assign_patient_splits(plan, config.split_fractions, seed=config.seed)
    plan["source_row"] = rows
    plan["source_study_id"] = base["study_id"].to_numpy()
    plan["blend_row"] = np.where(blended, partners, -1)
    plan["blend_study_id"] = np.where(blended, source["study_id"].to_numpy()[partners], "")
    plan["blend_weight"] = blend_weight
    plan["shift_y"], plan["shift_x"] = shift[:, 0], shift[:, 1]
    plan["gamma"], plan["gain"], plan["offset"] = gamma, gain, offset
    if plan["study_id"].duplicated().any():  # 64-bit pseudonyms: practically never
        raise RuntimeError("study pseudonym collision; choose another seed")
    return plan


# --- pixels ---------------------------------------------------------------------------------------


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = torch.from_numpy(images).float()[:, None]
    mode = "area" if size < images.shape[-1] else "bilinear"
    x = torch.nn.functional.interpolate(x, size=(size, size), mode=mode)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _shift(images: np.ndarray, shift: np.ndarray, max_shift: int) -> np.ndarray:
    """Translate image i by ``shift[i] = (dy, dx)`` pixels, replicating edges into the gap."""
    if max_shift == 0:
        return images
    h, w = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)), mode="edge")
    out = np.empty_like(images)
    # one slice copy per distinct shift ((2 s + 1)^2 of them) instead of a per-pixel gather
    codes = (shift[:, 0] + max_shift) * (2 * max_shift + 1) + (shift[:, 1] + max_shift)
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        dy, dx = shift[members[0]]
        top, left = max_shift - dy, max_shift - dx
        out[members] = padded[members, top:top + h, left:left + w]
    return out


def _intensity(images: np.ndarray, gamma: np.ndarray, gain: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Per-study ``gain * x**gamma + offset`` on the 8-bit grid, via one lookup table per study."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    curves = gain[:, None] * levels[None, :] ** gamma[:, None] + offset[:, None]
    tables = np.clip(np.rint(curves * 255.0), 0, 255).astype(np.uint8)
    out = np.empty_like(images)
    for i, table in enumerate(tables):  # per study: a vectorised gather would need 8-byte indices per pixel
        np.take(table, images[i], out=out[i])
    return out


def make_pixels(plan: pd.DataFrame, store: CohortStore, source_slots: np.ndarray, size: int,
                max_shift: int) -> np.ndarray:
    """``uint8 (len(plan), size, size)`` for a chunk of the plan."""
    rows = plan["source_row"].to_numpy()
    partners = plan["blend_row"].to_numpy()
    blended = partners >= 0
    needed, inverse = np.unique(np.concatenate([rows, partners[blended]]), return_inverse=True)
    pictures = _resize(store.read(source_slots[needed]), size)  # each distinct source read once
    images = pictures[inverse[:len(rows)]]
    if blended.any():
        weight = plan["blend_weight"].to_numpy()[blended].astype(np.float32)[:, None, None]
        mixed = (1 - weight) * images[blended] + weight * pictures[inverse[len(rows):]]
        images[blended] = np.rint(mixed).astype(np.uint8)
    images = _shift(images, plan[["shift_y", "shift_x"]].to_numpy(), max_shift)
    return _intensity(images, plan["gamma"].to_numpy(), plan["gain"].to_numpy(), plan["offset"].to_numpy())


# --- the run ------------------------------------------------------------------------------------------

PROVENANCE_COLUMNS = ("study_id", "source_study_id", "blend_study_id", "blend_weight", "shift_y", "shift_x",
                      "gamma", "gain", "offset")


def build_scale_cohort(config: ScaleCohortConfig) -> ScaleSummary:
    """Write the ingest folder ``config.out`` (store, status.csv, manifest.csv, provenance.csv)."""
    if not config.source or not config.out:
        raise UserError("scale-cohort needs a source ingest folder and an output folder")
    start = time.perf_counter()
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        # a fresh folder every time: a half-written or other-seed store must never be mixed in
        raise FileExistsError(f"{out}: output folder is not empty; use a new --out folder")
    source = read_manifest(Path(config.source) / MANIFEST_NAME)
    if source.empty:
        raise UserError(f"{config.source}: the source ingest folder has no ok studies")
    source_store = open_store(config.source)
    source_slots = source_store.slots(source["study_id"].tolist())
    size = config.size or source_store.width
    if source_store.height != source_store.width:
        raise UserError(f"{config.source}: source images are {source_store.height}x{source_store.width}, "
                         "expected square")
    config = config.model_copy(update={"size": size})

    plan = plan_studies(source, config)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, out)
    store = CohortStore.create(store_path(out), plan["study_id"].tolist(), size, shard_rows=config.shard_rows)
    # a fresh store gives slot i to study i, so chunks are contiguous slot ranges
    with StatusWriter(out / STATUS_NAME) as status:
        for begin in progress(range(0, config.n, config.chunk), desc="scale-cohort",
                              total=-(-config.n // config.chunk), unit="chunk"):
            part = plan.iloc[begin:begin + config.chunk]
            store.write_block(begin, make_pixels(part, source_store, source_slots, size, config.max_shift_px))
            # status rows only after the pixels are in place: status.csv is the commit log
            status.write_rows([sid, "ok", "", "0.0000"] for sid in part["study_id"])
    plan.loc[:, list(PROVENANCE_COLUMNS)].to_csv(out / PROVENANCE_NAME, index=False, float_format="%.6g")
    findings = [c for c in FINDING_COLUMNS if c in plan.columns]  # the source's other findings
    write_manifest(plan.loc[:, [*MANIFEST_COLUMNS, *findings]], out / MANIFEST_NAME)
    seconds = time.perf_counter() - start
    summary = ScaleSummary(
        studies=config.n, patients=int(plan["patient_id"].nunique()), size=size, seconds=seconds,
        splits={s: int((plan["split"] == s).sum()) for s in SPLITS},
    )
    log.info("scale-cohort: %d studies of %d patients at %dx%d in %.1f s -> %s (splits %s)",
             summary.studies, summary.patients, size, size, seconds, out, summary.splits)
    return summary
