"""Ingest: manifest -> validated, working-resolution ``uint8`` store + status table; resumable.

Layout of the ingest folder::

    store/                   cohort store (pipeline.data.store): uint8 (size, size) per study slot
    status.csv               study_id, status (ok|error), reason, seconds; appended as studies finish
    manifest.csv             the manifest rows of ok studies (image_path made absolute)
    config.resolved.yaml

The store is ours rather than MONAI's ``PersistentDataset``: slots are keyed by the study pseudonym
(PersistentDataset names files by a hash of the transform chain and input dict), hold no metadata
(its pickles would carry the DICOM UIDs) and load with plain numpy anywhere. Rank 0 creates one
slot per manifest study before decoding starts; decode workers write their study's slot in place
and send back only a small :class:`StudyResult`.

Resuming: the status table is the commit log. A status row is appended (and flushed) only after
its study's slot is written, so a killed run loses at most the studies in flight, and a slot
without an ok row is never trusted. Ok studies with a slot in the store and (unless
``retry_errors``) failed studies are skipped; if the store itself is lost, the status table is set
aside and everything is redone. Under torchrun each rank appends to
``status.part-<rank>.csv``; rank 0 folds the parts into ``status.csv`` (also leftovers of a killed
run, at the next start). Rows are flushed, not fsynced: this survives killed processes, not a
power cut (re-run with a fresh folder after one).

Privacy: rows are keyed by the study pseudonym and a failure's reason names only the image's
*file name* (never its folder); for the demo cohort file names are pseudonyms. For user data the
file name is the user's own (it may be identifying, e.g. an accession number): the status table
stays in the local ingest folder and must not be logged to MLflow or copied into reports.
"""

from __future__ import annotations

import collections
import csv
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
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
from pydantic import Field, field_validator

from pipeline.config import RESOLVED_CONFIG_NAME, StrictModel, save_resolved_config
from pipeline.data.manifest import read_manifest, resolve_image_paths, write_manifest
from pipeline.data.store import CohortStore, StoredImages, is_store, write_images
from pipeline.data.transforms import DEFAULT_SIZE, ingest_transforms, validate_size
from pipeline.errors import PathNotFoundError, UserError
from pipeline.io.readers import RadiographReadError
from pipeline.runtime.csv_log import AppendOnlyCsv, neutralise_cell
from pipeline.runtime.distributed import barrier, shard
from pipeline.runtime.progress import progress
from pipeline.tasks import FINDINGS, task_labels  # task_labels: re-exported for the stages

log = logging.getLogger(__name__)

STORE_DIR = "store"
STATUS_NAME = "status.csv"
ORPHANED_STATUS_NAME = "status.orphaned.csv"  # a status table set aside because its store was lost
MANIFEST_NAME = "manifest.csv"
STATUS_COLUMNS = ("study_id", "status", "reason", "seconds")


class IngestConfig(StrictModel):
    """``configs/ingest.yaml``; ``manifest`` and ``out`` usually come from the command line."""

    manifest: str | None = None
    out: str | None = None
    size: int = DEFAULT_SIZE  # working resolution, square, 32..256
    # auto: the VOI LUT Sequence, else the window; window: the window only; none: no VOI step
    voi: Literal["auto", "window", "none"] = "auto"
    pad_mode: Literal["min", "edge"] = "min"  # square padding: min (background) or edge (replicate border)
    workers: int = Field(0, ge=0)  # decode processes; 0 decodes in this process
    retry_errors: bool = False  # decode again the studies that failed in an earlier run

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: int) -> int:
        return validate_size(value)


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


def store_path(ingest_dir: str | Path) -> Path:
    return Path(ingest_dir) / STORE_DIR


# --- one study ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _chain(size: int, voi: str, pad_mode: str):
    return ingest_transforms(size=size, voi=voi, pad_mode=pad_mode)


@functools.lru_cache(maxsize=4)
def _open_store(root: str) -> CohortStore:
    """One open store per process and root, so a decode worker keeps its shard descriptors."""
    return CohortStore.open(root)


def process_study(
    study_id: str, image_path: str, store_root: str, slot: int, size: int, voi: str, pad_mode: str
) -> StudyResult:
    """Read, validate and transform one image into its store slot; never raises for a bad file.

    Runs in the decode worker, which writes the pixels itself: only the small result travels back.
    """
    start = time.perf_counter()
    try:
        image = _chain(size, voi, pad_mode)({"image": image_path})["image"]
        array = np.asarray(image.detach().cpu())[0]
        if array.shape != (size, size) or array.dtype != np.uint8:
            raise ValueError(
                f"transform chain returned {array.dtype} {array.shape}, expected uint8 {(size, size)}"
            )
        _open_store(store_root).write(slot, array)
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


# --- decode workers ---------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0
IN_FLIGHT_PER_WORKER = 4  # enough queued work that no worker idles while the parent writes status


def _worker_init(parent_pid: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only fight over the cores.
    torch.set_num_threads(1)
    _without_metadata()
    _exit_with_parent(parent_pid)


def _without_metadata() -> bool:
    """Switch MONAI's MetaTensor tracking off; returns the previous setting.

    The chain's output is only pixels (nothing downstream reads the affine or the meta dict), and
    tracking costs about 1 ms of the ~6 ms CPU per 1024-px study (measured: identical uint8 output).
    """
    from monai.data import get_track_meta, set_track_meta

    before = get_track_meta()
    set_track_meta(False)
    return before


def _exit_with_parent(parent_pid: int) -> None:
    """Make this worker die with the ingest process, even when that one is killed with SIGKILL.

    A killed parent cannot shut its pool down, and idle workers wait on a queue whose write end
    they hold themselves, so without this they would live on (hundreds of MB each). Linux delivers
    SIGKILL on the parent's death (``PR_SET_PDEATHSIG``); the watchdog thread covers other systems
    and a failed ``prctl``. A parent that died before this ran is caught by the pid comparison.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still applies
    if os.getppid() != parent_pid:
        os._exit(1)
    watch = threading.Thread(target=_watch_parent, args=(parent_pid,), name="ingest-parent-watch", daemon=True)
    watch.start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented to init or a subreaper
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _pool_context():
    """``fork`` on Linux: workers inherit the imported torch/MONAI/pydicom (a spawned worker re-imports
    them for seconds) and have this process as their parent, which :func:`_exit_with_parent` watches."""
    return multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None


def _run_studies(jobs: Sequence[tuple], workers: int) -> Iterator[StudyResult]:
    """Results in job order; with workers, at most ``IN_FLIGHT_PER_WORKER`` jobs queued per worker
    (``pool.map`` would create a future per study up front: hundreds of MB at MIMIC scale)."""
    if workers == 0:
        tracked = _without_metadata()
        try:
            for job in jobs:
                yield process_study(*job)
        finally:
            from monai.data import set_track_meta

            set_track_meta(tracked)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                               initializer=_worker_init, initargs=(os.getpid(),))
    pending: collections.deque = collections.deque()
    try:
        for job in jobs:
            pending.append(pool.submit(process_study, *job))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- status table ---------------------------------------------------------------------------


class StatusWriter(AppendOnlyCsv):
    """Appends status rows, one flushed line per study; repairs a line torn by a kill."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, STATUS_COLUMNS)

    def write(self, result: StudyResult) -> None:
        # The reason quotes the user's file name, which may start with "=" (formula injection).
        reason = neutralise_cell(result.reason)
        self.write_rows([[result.study_id, result.status, reason, f"{result.seconds:.4f}"]])


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


def finished_studies(status: pd.DataFrame, store: CohortStore, retry_errors: bool) -> set[str]:
    """Studies to skip: ok ones with a slot in the store and (unless retrying) failed ones."""
    ok = set(status.loc[status.status == "ok", "study_id"]).intersection(store.study_ids)
    errors = set() if retry_errors else set(status.loc[status.status == "error", "study_id"])
    return ok | errors


def retire_status(ingest_dir: Path) -> None:
    """Set aside a status table whose store is gone: its ok rows vouch for pixels that no longer exist.

    Without this a re-created (empty) store would be trusted for every study the table calls ok.
    """
    status = ingest_dir / STATUS_NAME
    if status.is_file():
        status.replace(ingest_dir / ORPHANED_STATUS_NAME)
        log.warning("%s: no image store; the status table was moved to %s and every study is redone",
                    ingest_dir, ORPHANED_STATUS_NAME)


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
    """Decode every manifest study not finished before into the store; returns counts (see
    :class:`IngestSummary`).

    Under torchrun (process group initialised by the caller) each rank takes a round-robin shard.
    """
    if not config.manifest or not config.out:
        raise ValueError("ingest needs both a manifest and an output folder")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _rank_world()
    manifest = read_manifest(config.manifest)
    manifest["image_path"] = resolve_image_paths(manifest, config.manifest)
    study_ids = manifest["study_id"].tolist()

    check_cache_compatible(out, config)
    if rank == 0:
        merge_status_parts(out)
        if not is_store(store_path(out)):
            retire_status(out)
        save_resolved_config(config, out)
        CohortStore.create(store_path(out), study_ids, config.size)  # or extend it, keeping its slots
    barrier()
    _open_store.cache_clear()  # a store cached by an earlier run may since have been replaced
    store = CohortStore.open(store_path(out))
    done = finished_studies(read_status(out / STATUS_NAME), store, config.retry_errors)
    root = str(store.root)
    todo = [
        (sid, path, root, int(slot), config.size, config.voi, config.pad_mode)
        for sid, path, slot in zip(study_ids, manifest["image_path"], store.slots(study_ids))
        if sid not in done
    ]
    mine = shard(todo, rank, world)
    status_file = out / (STATUS_NAME if world == 1 else f"status.part-{rank}.csv")
    with StatusWriter(status_file) as writer:
        for result in progress(_run_studies(mine, config.workers), desc="ingest", total=len(mine)):
            writer.write(result)  # after the worker wrote the slot: the row commits it
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
    in_manifest = status[status.study_id.isin(set(study_ids))]
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
    """Working images with their manifest rows, aligned by position.

    ``images``: ``uint8 (N, 1, H, W)``, either lazily read from the ingest store
    (:class:`~pipeline.data.store.StoredImages`, the normal case: nothing is held in memory) or an
    in-memory tensor (small cohorts built in code). ``frame``: manifest rows (RangeIndex).
    """

    images: torch.Tensor | StoredImages
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

    @property
    def image_size(self) -> list[int]:
        return [int(v) for v in self.images.shape[-2:]]

    def float(self) -> torch.Tensor:
        """All images as float32 in [0, 1] on the 8-bit grid (``k/255``); loads the whole cohort."""
        images = self.images.load() if isinstance(self.images, StoredImages) else self.images
        return images.float() / 255.0

    def labels(self, task: str) -> torch.Tensor:
        """``(N,)`` int64 labels of a registered task (:mod:`pipeline.tasks`: a finding under its label
        policy, sex M=1/F=0, ...). Raises if any row lacks the label."""
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
        positions = np.flatnonzero(mask)
        frame = self.frame[mask].reset_index(drop=True)
        if isinstance(self.images, StoredImages):
            images = self.images.subset(positions)
        else:
            images = self.images[torch.as_tensor(positions, dtype=torch.long)]
        return Cohort(images, frame, frame["study_id"].tolist())


def open_store(ingest_dir: str | Path) -> CohortStore:
    path = store_path(ingest_dir)
    if not is_store(path):
        raise PathNotFoundError(f"{ingest_dir}: no image store ({STORE_DIR}/); run simplebits ingest first")
    return CohortStore.open(path)


def load_cohort(ingest_dir: str | Path, split: str | None = None, task: str | None = None) -> Cohort:
    """The ok studies of an ingest folder (optionally one split, only rows labelled for ``task``).

    Images stay on disk: the cohort reads them lazily from the store, batch by batch.
    """
    return load_cohorts(ingest_dir, [split], task)[split]


def load_cohorts(ingest_dir: str | Path, splits: Sequence[str | None], task: str | None = None) -> dict:
    """:func:`load_cohort` for several splits (``None``: all studies) from one read of the manifest
    and one open store; at 100k studies each read of the manifest costs ~100 MB at its peak."""
    ingest_dir = Path(ingest_dir)
    frame = read_ingested_manifest(ingest_dir / MANIFEST_NAME)
    if task is not None:
        frame = frame[task_labels(frame, task).notna().to_numpy()]
    store = open_store(ingest_dir)
    cohorts = {}
    for split in splits:
        rows = (frame if split is None else frame[frame["split"] == split]).reset_index(drop=True)
        ids = rows["study_id"].tolist()
        cohorts[split] = Cohort(images=StoredImages(store, store.slots(ids)), frame=rows, study_ids=ids)
    return cohorts


def read_ingested_manifest(path: Path) -> pd.DataFrame:
    """The ok-manifest that ingest wrote (validated then, by :func:`write_manifest`), as text columns.

    Not validated again: at 100k studies the full schema check peaks at ~160 MB, which made the
    training commands' memory grow with the cohort. ``image_path`` is left out (nothing downstream of
    ingest reads pixels from the source files; the reports read the manifest themselves).
    """
    if not path.is_file():
        raise PathNotFoundError(f"{path}: ingest manifest not found; run simplebits ingest first")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c != "image_path")
    missing = [c for c in ("study_id", "split", "sex", "effusion") if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing columns {missing}; re-run simplebits ingest")
    for column in ("age", *FINDINGS):  # numbers with NaN for unknown, as read_manifest gives them
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def load_task_splits(ingest_dir: str | Path, task: str) -> dict[str, Cohort]:
    """``{"train", "val", "test"}`` cohorts labelled for ``task``; training needs train and val non-empty."""
    cohorts = load_cohorts(ingest_dir, ("train", "val", "test"), task)
    if len(cohorts["train"]) == 0 or len(cohorts["val"]) == 0:
        counts = ", ".join(f"{split} {len(cohort)}" for split, cohort in cohorts.items())
        raise UserError(f"{ingest_dir}: task {task!r} needs labelled train and val studies, has {counts}")
    return cohorts


def write_ingest_folder(ingest_dir: str | Path, manifest: pd.DataFrame, images: np.ndarray | torch.Tensor) -> Path:
    """An ingest folder from images already at working resolution: store, status table, manifest.

    For fixtures, tests and the scale cohort (no decoding). ``images``: ``uint8 (N, H, W)`` or
    ``(N, 1, H, W)`` aligned with ``manifest`` rows (which must follow the manifest schema).
    """
    ingest_dir = Path(ingest_dir)
    array = np.asarray(images.numpy() if isinstance(images, torch.Tensor) else images)
    array = array.reshape(len(manifest), *array.shape[-2:]).astype(np.uint8, copy=False)
    ids = manifest["study_id"].astype(str).tolist()
    write_images(store_path(ingest_dir), ids, array)
    with StatusWriter(ingest_dir / STATUS_NAME) as writer:
        for sid in ids:
            writer.write(StudyResult(sid, "ok", "", 0.0))
    write_manifest(manifest, ingest_dir / MANIFEST_NAME)
    return ingest_dir
