"""Ingest: manifest -> validated, working-resolution ``uint8`` cache + status table; resumable.

Layout of the ingest folder::

    cache/<study_id>.npy     uint8 (size, size), written atomically
    status.csv               study_id, status (ok|error), reason, seconds; appended as studies finish
    manifest.csv             the manifest rows of ok studies (image_path made absolute)
    config.resolved.yaml

The cache is our own one-``.npy``-per-study folder rather than MONAI's ``PersistentDataset``:
files are keyed by the study pseudonym (PersistentDataset names them by a hash of the transform
chain and input dict), hold no metadata (its pickles would carry the DICOM UIDs), load with plain
numpy anywhere, and pair one-to-one with status rows, which is what makes resuming exact.

Resuming: ok studies whose cache file exists and (unless ``retry_errors``) failed studies are
skipped. A status row is written only after its cache file is in place and is flushed at once, so
a killed run loses at most the study in flight. Under torchrun each rank appends to
``status.part-<rank>.csv``; rank 0 folds the parts into ``status.csv`` (also leftovers of a killed
run, at the next start).

Privacy: rows are keyed by the study pseudonym and a failure's reason names only the image's
*file name* (never its folder); for the demo cohort file names are pseudonyms. For user data the
file name is the user's own (it may be identifying, e.g. an accession number): the status table
stays in the local ingest folder and must not be logged to MLflow or copied into reports.
"""

from __future__ import annotations

import csv
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from pydantic import field_validator

from pipeline.config import RESOLVED_CONFIG_NAME, StrictModel, save_resolved_config
from pipeline.data.manifest import read_manifest, resolve_image_paths, write_manifest
from pipeline.data.transforms import DEFAULT_SIZE, ingest_transforms, validate_size
from pipeline.io.readers import RadiographReadError
from pipeline.runtime.atomic import atomic_save
from pipeline.runtime.csv_log import AppendOnlyCsv
from pipeline.runtime.distributed import barrier, shard
from pipeline.runtime.progress import progress

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
STATUS_NAME = "status.csv"
MANIFEST_NAME = "manifest.csv"
STATUS_COLUMNS = ("study_id", "status", "reason", "seconds")
TASKS = ("effusion", "sex")


class IngestConfig(StrictModel):
    """``configs/ingest.yaml``; ``manifest`` and ``out`` usually come from the command line."""

    manifest: str | None = None
    out: str | None = None
    size: int = DEFAULT_SIZE
    voi: Literal["auto", "window", "none"] = "auto"
    pad_mode: Literal["min", "edge"] = "min"
    workers: int = 0
    retry_errors: bool = False

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int) -> int:
        return validate_size(value)

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"workers must be >= 0 (0 = decode in this process), got {value}")
        return value


@dataclass(frozen=True)
class StudyResult:
    study_id: str
    status: Literal["ok", "error"]
    reason: str
    seconds: float


@dataclass(frozen=True)
class IngestSummary:
    total: int  # studies in the manifest
    ok: int  # ok after this run (including earlier runs)
    error: int
    processed: int  # studies this rank worked on in this run
    skipped: int  # finished in an earlier run


def cache_path(ingest_dir: str | Path, study_id: str) -> Path:
    return Path(ingest_dir) / CACHE_DIR / f"{study_id}.npy"


# --- one study ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _chain(size: int, voi: str, pad_mode: str):
    return ingest_transforms(size=size, voi=voi, pad_mode=pad_mode)


def process_study(
    study_id: str, image_path: str, cache_file: str, size: int, voi: str, pad_mode: str
) -> StudyResult:
    """Read, validate and transform one image and cache it; never raises for a bad file."""
    start = time.perf_counter()
    try:
        image = _chain(size, voi, pad_mode)({"image": image_path})["image"]
        array = np.asarray(image.detach().cpu())[0]
        if array.shape != (size, size) or array.dtype != np.uint8:
            raise ValueError(
                f"transform chain returned {array.dtype} {array.shape}, expected uint8 {(size, size)}"
            )
        atomic_save(cache_file, lambda fh: np.save(fh, array, allow_pickle=False))
        return StudyResult(study_id, "ok", "", time.perf_counter() - start)
    except Exception as err:  # one bad file must never stop the run; its reason goes to the table
        return StudyResult(study_id, "error", failure_reason(err, image_path), time.perf_counter() - start)


def failure_reason(err: BaseException, image_path: str | Path) -> str:
    """``"<file name>: <reason>"``, from the reader's error if MONAI wrapped it, without folders."""
    name = Path(image_path).name
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    for item in chain:
        if isinstance(item, RadiographReadError):
            return f"{name}: {item.reason}"
    innermost = chain[-1]
    message = str(innermost).replace(str(Path(image_path).parent), "").replace(str(image_path), name)
    return f"{name}: {type(innermost).__name__}: {message}".replace("\n", " ")[:500]


def _worker_init() -> None:
    # Each worker decodes one image at a time; intra-op threads would only fight over 2 cores.
    torch.set_num_threads(1)


def _run_studies(jobs: Sequence[tuple], workers: int) -> Iterator[StudyResult]:
    if workers == 0:
        for job in jobs:
            yield process_study(*job)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
    try:
        yield from pool.map(process_study, *zip(*jobs), chunksize=1) if jobs else ()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- status table ---------------------------------------------------------------------------


class StatusWriter(AppendOnlyCsv):
    """Appends status rows, one flushed line per study; repairs a line torn by a kill."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, STATUS_COLUMNS)

    def write(self, result: StudyResult) -> None:
        self.write_rows([[result.study_id, result.status, result.reason, f"{result.seconds:.4f}"]])


def read_status(path: str | Path) -> pd.DataFrame:
    """The status table, last row per study winning; rows torn by a kill are ignored."""
    rows: dict[str, list[str]] = {}
    path = Path(path)
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if len(row) == len(STATUS_COLUMNS) and row[1] in ("ok", "error") and _is_number(row[3]):
                    rows[row[0]] = row
    frame = pd.DataFrame(list(rows.values()), columns=list(STATUS_COLUMNS))
    frame["seconds"] = frame["seconds"].astype(float)
    return frame


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def merge_status_parts(ingest_dir: Path) -> None:
    """Fold per-rank ``status.part-<rank>.csv`` files into ``status.csv`` and remove them."""
    parts = sorted(ingest_dir.glob("status.part-*.csv"))
    if not parts:
        return
    with StatusWriter(ingest_dir / STATUS_NAME) as writer:
        for part in parts:
            for row in read_status(part).itertuples(index=False):
                writer.write(StudyResult(row.study_id, row.status, row.reason, row.seconds))
    for part in parts:
        part.unlink()


def finished_studies(status: pd.DataFrame, ingest_dir: Path, retry_errors: bool) -> set[str]:
    ok_ids = status.loc[status.status == "ok", "study_id"]
    ok = {sid for sid in ok_ids if cache_path(ingest_dir, sid).exists()}
    errors = set() if retry_errors else set(status.loc[status.status == "error", "study_id"])
    return ok | errors


# --- the run ----------------------------------------------------------------------------------


CACHE_DEFINING_KEYS = ("size", "voi", "pad_mode")  # settings that change the cached pixels


def check_cache_compatible(ingest_dir: Path, config: IngestConfig) -> None:
    """Refuse to resume into a folder whose cache was made with other pixel settings.

    Skipping "finished" studies is only correct if they were cached the same way; otherwise a
    folder would silently mix, say, 64 and 128 pixel images.
    """
    resolved = ingest_dir / RESOLVED_CONFIG_NAME
    if not resolved.is_file():
        return
    before = yaml.safe_load(resolved.read_text()) or {}
    changed = {k: (before.get(k), getattr(config, k)) for k in CACHE_DEFINING_KEYS
               if before.get(k) != getattr(config, k)}
    if changed:
        detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"{resolved}: this ingest folder was cached with other settings ({detail}); "
                         "use a new --out folder")


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ingest(config: IngestConfig) -> IngestSummary:
    """Cache every manifest study not finished before; returns counts (see :class:`IngestSummary`).

    Under torchrun (process group initialised by the caller) each rank takes a round-robin shard.
    """
    if not config.manifest or not config.out:
        raise ValueError("ingest needs both a manifest and an output folder")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    manifest = read_manifest(config.manifest)
    manifest["image_path"] = resolve_image_paths(manifest, config.manifest)

    check_cache_compatible(out, config)
    if rank == 0:
        merge_status_parts(out)
        save_resolved_config(config, out)
    barrier()
    done = finished_studies(read_status(out / STATUS_NAME), out, config.retry_errors)
    todo = [
        (sid, path, str(cache_path(out, sid)), config.size, config.voi, config.pad_mode)
        for sid, path in zip(manifest.study_id, manifest.image_path)
        if sid not in done
    ]
    mine = shard(todo, rank, world)
    status_file = out / (STATUS_NAME if world == 1 else f"status.part-{rank}.csv")
    with StatusWriter(status_file) as writer:
        for result in progress(_run_studies(mine, config.workers), desc="ingest", total=len(mine)):
            writer.write(result)
            if result.status == "error":
                log.warning("%s: %s", result.study_id, result.reason)
    barrier()

    if rank == 0:
        merge_status_parts(out)
        merged = read_status(out / STATUS_NAME)
        ok_ids = set(merged.loc[merged.status == "ok", "study_id"])
        write_manifest(manifest[manifest.study_id.isin(ok_ids)], out / MANIFEST_NAME)
    barrier()
    status = read_status(out / STATUS_NAME)
    in_manifest = status[status.study_id.isin(set(manifest.study_id))]
    return IngestSummary(
        total=len(manifest),
        ok=int((in_manifest.status == "ok").sum()),
        error=int((in_manifest.status == "error").sum()),
        processed=len(mine),
        skipped=len(manifest) - len(todo),
    )


# --- downstream access ------------------------------------------------------------------------


@dataclass
class Cohort:
    """Cached working images with their manifest rows, aligned by position.

    ``images``: uint8 ``(N, 1, H, W)``; ``frame``: manifest rows (RangeIndex); ``study_ids``: list.
    """

    images: torch.Tensor
    frame: pd.DataFrame
    study_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.study_ids:
            self.study_ids = self.frame["study_id"].tolist()
        if not len(self.images) == len(self.frame) == len(self.study_ids):
            raise ValueError(
                f"cohort parts disagree: {len(self.images)} images, {len(self.frame)} rows, "
                f"{len(self.study_ids)} study ids"
            )

    def __len__(self) -> int:
        return len(self.frame)

    def float(self) -> torch.Tensor:
        """Images as float32 in [0, 1] on the 8-bit grid (``k/255``)."""
        return self.images.float() / 255.0

    def labels(self, task: str) -> torch.Tensor:
        """``(N,)`` int64 labels: effusion 1/0; sex M=1, F=0. Raises if any row lacks the label."""
        values = task_labels(self.frame, task)
        missing = int(values.isna().sum())
        if missing:
            raise ValueError(
                f"{missing} of {len(self)} studies have no {task} label; "
                f"load with load_cohort(..., task={task!r}) to drop them"
            )
        return torch.as_tensor(values.to_numpy(dtype=np.int64))

    def select(self, keep: Iterable[bool] | np.ndarray) -> Cohort:
        """The sub-cohort where ``keep`` (one bool per study) is true, order preserved."""
        mask = np.asarray(list(keep) if not isinstance(keep, np.ndarray) else keep, dtype=bool)
        if mask.shape != (len(self),):
            raise ValueError(f"select needs one bool per study ({len(self)}), got shape {mask.shape}")
        index = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)
        frame = self.frame[mask].reset_index(drop=True)
        return Cohort(self.images[index], frame, frame["study_id"].tolist())


def task_labels(frame: pd.DataFrame, task: str) -> pd.Series:
    """Per-row label as float (1.0 / 0.0) with NaN where unknown, for ``task`` in :data:`TASKS`."""
    if task == "effusion":
        return pd.to_numeric(frame["effusion"], errors="coerce").astype(float)
    if task == "sex":
        return frame["sex"].map({"M": 1.0, "F": 0.0}).astype(float)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def load_cohort(ingest_dir: str | Path, split: str | None = None, task: str | None = None) -> Cohort:
    """Load the ok studies of an ingest folder, optionally one split and only rows labelled for ``task``."""
    ingest_dir = Path(ingest_dir)
    frame = read_manifest(ingest_dir / MANIFEST_NAME)
    if split is not None:
        frame = frame[frame["split"] == split]
    if task is not None:
        frame = frame[task_labels(frame, task).notna().to_numpy()]
    frame = frame.reset_index(drop=True)
    arrays = [_load_cached(cache_path(ingest_dir, sid)) for sid in frame["study_id"]]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{ingest_dir / CACHE_DIR}: cached images differ in shape {sorted(shapes)}")
    if arrays:
        images = torch.from_numpy(np.stack(arrays))[:, None]
    else:
        images = torch.zeros((0, 1, 0, 0), dtype=torch.uint8)
    return Cohort(images=images, frame=frame, study_ids=frame["study_id"].tolist())


def load_task_splits(ingest_dir: str | Path, task: str) -> dict[str, Cohort]:
    """``{"train", "val", "test"}`` cohorts labelled for ``task``; training needs train and val non-empty."""
    cohorts = {split: load_cohort(ingest_dir, split=split, task=task) for split in ("train", "val", "test")}
    if len(cohorts["train"]) == 0 or len(cohorts["val"]) == 0:
        raise ValueError(f"{ingest_dir}: need labelled train and val studies for task {task!r}")
    return cohorts


def _load_cached(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cached image missing; re-run simplebits ingest")
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"{path}: expected a 2D uint8 image, got {array.dtype} {array.shape}")
    return array
