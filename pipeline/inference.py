"""Cohort inference with a trained simplifier: ``simplebits apply``, sharded over torchrun ranks, resumable.

For every study: the simplified image, P(positive) of the classifier on the original and on the
simplified image, the bits per dimension of both under the prior (deterministic midpoint
dequantization, so the same image always gets the same number) and the bits saved,
``(bpd_orig - bpd_simpl) * D``.

Layout of the output folder::

    simplified/                 cohort store (pipeline.data.store), one slot per study: exactly the
                                uint8 image that p_simpl and bpd_simpl were computed on
    parts/part-<rank>.csv       one row per finished study (part_columns: ids, the task's label columns,
                                VALUE_COLUMNS), appended and flushed per batch
    predictions.csv             all parts merged by rank 0, sorted by study_id
    metrics.json                cohort summary (also logged to MLflow)
    inputs.json                 SHA-256 of the model files and the ingest config: a resumed run must match
    mlflow_run.json             the MLflow run, reopened by a resumed run
    config.resolved.yaml

Nothing holds the cohort in memory: batches stream from the ingest store (DataLoader workers read
ahead), simplified images go straight into their slots, and only per-study numbers are kept.

Sharding: every rank takes a contiguous share of the unfinished studies (shares differ by at most
one study; the loop has no collectives, so unequal batch counts are safe). Contiguous shares read
runs of adjacent slots at once, and each rank writes its own run of the simplified store. On several
nodes, the ingest and output folders must be on a file system that every node mounts.

Resuming: the part rows are the commit log. A study's row is appended only after its slot is
written, so a killed run leaves at worst a written slot without a row (recomputed) or a torn last
line (dropped); a slot is trusted only with its row. Rank 0 first rewrites the part files without
torn or repeated rows (and, if the simplified store is gone, without any row), then creates the
store; every rank reads the same finished set and takes its share of the rest. Part files of an
earlier run with another number of ranks are read like any other, so the world size (nodes,
processes per node) and the batch size may change between runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline import tasks
from pipeline.config import RESOLVED_CONFIG_NAME, StrictModel, save_resolved_config
from pipeline.data.dataset import CohortDataset
from pipeline.data.ingest import Cohort, load_cohort
from pipeline.data.manifest import SplitName
from pipeline.data.store import CohortStore, StoredImages, is_store
from pipeline.errors import UserError
from pipeline.models.bpd import bits_per_dim
from pipeline.runtime.atomic import atomic_path, atomic_write_text
from pipeline.runtime.csv_log import AppendOnlyCsv
from pipeline.runtime.device import autocast
from pipeline.runtime.distributed import (
    barrier,
    init_distributed,
    rank_range,
    shutdown_distributed,
    world_info,
)
from pipeline.runtime.progress import progress
from pipeline.runtime.tracking import RUN_ID_NAME, Tracker, TrackingConfig
from pipeline.tasks import TaskName
from pipeline.training.engine import uint8_collate

log = logging.getLogger(__name__)

SIMPLIFIED_DIR = "simplified"
PARTS_DIR = "parts"
PREDICTIONS_NAME = "predictions.csv"
METRICS_NAME = "metrics.json"
INPUTS_NAME = "inputs.json"
# manifest columns every part table carries (the default tasks'); a task reading others (cardiomegaly,
# no_finding for effusion_paper, age ...) adds them (label_columns), so its labels can be recomputed
LABEL_COLUMNS = DEFAULT_LABEL_COLUMNS = ("effusion", "sex")
VALUE_COLUMNS = ("p_orig", "p_simpl", "bpd_orig", "bpd_simpl", "bits_saved")
PART_COLUMNS = ("study_id", "split", *LABEL_COLUMNS, *VALUE_COLUMNS)  # of the default tasks
PART_HEADER = (",".join(PART_COLUMNS) + "\n").encode()
# how the run is executed, not what it computes: may change when a killed run is resumed, so they
# are MLflow tags (overwritable) rather than params (fixed once logged)
EXECUTION_SETTINGS = ("batch_size", "num_workers", "device")


# --- config -----------------------------------------------------------------------------------


class ApplyConfig(StrictModel):
    """``configs/apply.yaml``; paths usually come from the command line."""

    ingest: str | None = None
    simplifier: str | None = None
    classifier: str | None = None  # any file load_classifier reads (pipeline/models/classifiers.py)
    classifier_arch: str | None = None  # registered name or module:function; None: the side-car .json's
    classifier_kwargs: dict[str, Any] = {}  # network kwargs over the side-car's
    classifier_adapter: dict[str, Any] = {}  # adapter fields over the side-car's (pipeline/models/adapter.py)
    prior: str | None = None  # None: the shipped prior
    out: str | None = None
    split: SplitName | None = None  # None: every split of the ingest folder
    task: TaskName | None = None  # label scored in metrics.json; None: the "task" in the classifier's .json
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)  # DataLoader processes reading batches from the store ahead of the models
    device: str = "auto"
    tracking: TrackingConfig = TrackingConfig()


# --- one batch ----------------------------------------------------------------------------------


@torch.no_grad()
def simplify_batch(
    simplifier: nn.Module, classifier: nn.Module, prior: nn.Module, x01: Tensor
) -> dict[str, Tensor]:
    """Simplify a batch ``(N, 1, H, W)`` in ``[0, 1]`` and score both versions.

    Returns ``simplified`` (uint8 ``(N, 1, H, W)``) and float32 ``(N,)`` tensors ``p_orig``,
    ``p_simpl``, ``bpd_orig``, ``bpd_simpl``, ``bits_saved``, all on ``x01``'s device. The
    simplified image is snapped to the 8-bit grid before it is scored, so the numbers belong to
    exactly the image that is saved.
    """
    if x01.ndim != 4 or x01.shape[1] != 1:
        raise ValueError(f"simplify_batch expects grey images (N, 1, H, W), got {tuple(x01.shape)}")
    x01 = x01.float()
    n = x01.shape[0]
    with autocast(x01.device):
        simplified = simplifier(x01)
    simplified_u8 = torch.round(simplified.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    both = torch.cat([x01, simplified_u8.float() / 255.0])
    # one pass over originals and simplified images together: a larger batch, and both go
    # through identical kernels
    with autocast(x01.device):
        logits = classifier(both)
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1]
    # the prior stays in float32 even on CUDA: bits saved is a difference of bpds times D, and bf16
    # coupling networks would put noise of whole bits into it
    bpd = bits_per_dim(prior, both, dequantize="midpoint").float()
    num_dims = x01[0].numel()
    return {
        "simplified": simplified_u8,
        "p_orig": probabilities[:n],
        "p_simpl": probabilities[n:],
        "bpd_orig": bpd[:n],
        "bpd_simpl": bpd[n:],
        "bits_saved": (bpd[:n] - bpd[n:]) * num_dims,
    }


# --- part tables --------------------------------------------------------------------------------


def part_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"part-{rank}.csv"


def simplified_store_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / SIMPLIFIED_DIR


def simplified_images(out_dir: str | Path, study_ids: Sequence[str]) -> StoredImages:
    """The simplified images of ``study_ids`` (lazy ``uint8 (N, 1, H, W)``), e.g. those of predictions.csv.

    Only studies with a row in ``predictions.csv`` hold valid pixels; other slots may be empty.
    """
    store = CohortStore.open(simplified_store_path(out_dir))
    return StoredImages(store, store.slots(list(study_ids)))


def part_files(out_dir: str | Path) -> list[Path]:
    """Every rank's part file, in rank order (numerically: part-10 after part-9)."""
    files = [p for p in Path(out_dir, PARTS_DIR).glob("part-*.csv") if p.stem.removeprefix("part-").isdigit()]
    return sorted(files, key=lambda p: int(p.stem.removeprefix("part-")))


def _is_number(text: str) -> bool:
    try:
        float(text)  # "nan" too: a model's NaN is a finished value, not a torn one
    except ValueError:
        return False
    return True


def label_columns(task: str | None) -> tuple[str, ...]:
    """The label columns of the part tables of an apply run scoring ``task``: the default tasks'
    (effusion, sex) and any other manifest column the task's labels are computed from."""
    return tasks.label_columns([task] if task else [], base=tasks.DEFAULT_TASKS)


def part_columns(labels: Sequence[str] = LABEL_COLUMNS) -> tuple[str, ...]:
    return ("study_id", "split", *labels, *VALUE_COLUMNS)


def _is_complete_row(row: Sequence[str], columns: Sequence[str] = PART_COLUMNS) -> bool:
    return (len(row) == len(columns) and bool(row[0]) and tuple(row) != tuple(columns)
            and all(_is_number(v) for v in row[len(columns) - len(VALUE_COLUMNS):]))


def read_part_rows(path: str | Path, labels: Sequence[str] = LABEL_COLUMNS) -> Iterator[list[str]]:
    """Complete rows of one part file, streamed; a last line without its newline (torn by a kill),
    short rows, repeated headers and rows of other label columns (an earlier run scoring a task that
    reads other columns: recomputed) are dropped."""
    columns = part_columns(labels)
    with open(path, encoding="utf-8", newline="") as fh:
        whole_lines = (line for line in fh if line.endswith("\n"))
        yield from (row for row in csv.reader(whole_lines) if _is_complete_row(row, columns))


class _CommittedRows:
    """The part files' committed rows, file by file in rank order: complete, the first row of their
    study, and with a slot in the simplified store (without a store no row is trusted: its image is
    gone). Streamed, so that only the study ids seen so far are held."""

    def __init__(self, out_dir: Path, labels: Sequence[str] = LABEL_COLUMNS) -> None:
        store_root = simplified_store_path(out_dir)
        self.slotted = frozenset(CohortStore.open(store_root).study_ids if is_store(store_root) else ())
        self.files = part_files(out_dir)
        self.labels = tuple(labels)
        self.seen: set[str] = set()

    def of(self, path: Path) -> Iterator[list[str]]:
        for row in read_part_rows(path, self.labels):
            if row[0] in self.slotted and row[0] not in self.seen:
                self.seen.add(row[0])
                yield row

    def __iter__(self) -> Iterator[list[str]]:
        for path in self.files:
            yield from self.of(path)


def finished_ids(out_dir: str | Path, labels: Sequence[str] = LABEL_COLUMNS) -> set[str]:
    """Study ids with a committed part row."""
    committed = _CommittedRows(Path(out_dir), labels)
    for _ in committed:
        pass
    return committed.seen


def _is_clean(path: Path, committed: int, header_line: bytes = PART_HEADER) -> bool:
    """Whether ``path`` is its header plus ``committed`` rows, with nothing torn, stale or repeated."""
    with open(path, "rb") as fh:
        header = fh.readline()
        lines, last = 1, header[-1:]
        for block in iter(lambda: fh.read(1 << 20), b""):
            lines, last = lines + block.count(b"\n"), block[-1:]
    return header == header_line and last == b"\n" and lines == committed + 1


def prune_parts(out_dir: str | Path, labels: Sequence[str] = LABEL_COLUMNS) -> None:
    """Rewrite the part files with their committed rows only, if any file holds more.

    Run by rank 0 alone, before any rank reads or appends and before the store is (re)created, so
    that every later row of a study is the only one (the merge never has to choose between two).
    """
    out_dir = Path(out_dir)
    columns = part_columns(labels)
    header = (",".join(columns) + "\n").encode()
    committed = _CommittedRows(out_dir, labels)
    if all(_is_clean(path, sum(1 for _ in committed.of(path)), header) for path in committed.files):
        return
    committed = _CommittedRows(out_dir, labels)
    for path in committed.files:
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(committed.of(path))


class PartWriter(AppendOnlyCsv):
    """Appends rows to ``parts/part-<rank>.csv`` and flushes each batch, so finished work survives a kill."""

    def __init__(self, path: str | Path, labels: Sequence[str] = LABEL_COLUMNS) -> None:
        super().__init__(path, part_columns(labels))

    def write(self, rows: Iterable[Sequence[str]]) -> None:
        self.write_rows(rows)


def typed_frame(frame: pd.DataFrame, labels: Sequence[str] = LABEL_COLUMNS) -> pd.DataFrame:
    """The part columns, typed: labels as in the manifest (``Int64`` findings such as effusion,
    float64 age, ``str`` sex and view), float64 values."""
    frame = frame[list(part_columns(labels))].reset_index(drop=True)
    for column in labels:
        if column in tasks.FINDINGS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
        elif column == "age":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(np.float64)
    for column in VALUE_COLUMNS:
        frame[column] = frame[column].astype(np.float64)
    return frame


def finished_frame(out_dir: str | Path, labels: Sequence[str] = LABEL_COLUMNS) -> pd.DataFrame:
    """The committed part rows as a typed table, built column by column (numbers parsed on the way)."""
    columns = part_columns(labels)
    text_columns = columns[:len(columns) - len(VALUE_COLUMNS)]
    texts: dict[str, list[str]] = {c: [] for c in text_columns}
    values: dict[str, array] = {c: array("d") for c in VALUE_COLUMNS}
    interned: dict[str, str] = {}  # one object per distinct split or label, not one per study
    for row in _CommittedRows(Path(out_dir), labels):
        texts["study_id"].append(row[0])
        for column, text in zip(text_columns[1:], row[1:len(text_columns)]):
            texts[column].append(interned.setdefault(text, text))
        for column, text in zip(VALUE_COLUMNS, row[len(text_columns):]):
            values[column].append(float(text))
    return typed_frame(pd.DataFrame({**texts, **{c: np.frombuffer(v) for c, v in values.items()}}), labels)


def _label_text(value: object) -> str:
    return "" if pd.isna(value) else str(value)


def _part_rows(frame: pd.DataFrame, positions: Sequence[int], result: dict[str, Tensor],
               labels: Sequence[str] = LABEL_COLUMNS) -> list[list[str]]:
    """Part rows of the studies at ``positions`` of the cohort ``frame``, in batch order (a label
    column the cohort lacks is left empty)."""
    meta = frame.iloc[list(positions)]
    values = np.stack([result[c].double().numpy() for c in VALUE_COLUMNS], axis=1)
    label_values = [meta[c] if c in meta.columns else [""] * len(meta) for c in labels]
    return [[str(sid), str(split), *(_label_text(v) for v in row_labels), *(repr(float(v)) for v in row)]
            for sid, split, *row_labels, row in zip(meta["study_id"], meta["split"], *label_values, values)]


# --- a cohort -----------------------------------------------------------------------------------


def _todo_share(study_ids: Sequence[str], done: set[str]) -> np.ndarray:
    """Cohort positions of this rank's contiguous share of the unfinished studies."""
    todo = np.fromiter((i for i, sid in enumerate(study_ids) if sid not in done), dtype=np.int64)
    share = rank_range(len(todo))
    return todo[share.start:share.stop]


def _study_batches(images, positions: np.ndarray, batch_size: int, num_workers: int,
                   pin_memory: bool) -> DataLoader:
    """``[uint8 images, labels, cohort positions]`` batches of ``positions``, read from the store in order.

    ``num_workers`` processes read ahead, so the models never wait for the disk.
    """
    batches = [positions[i:i + batch_size].tolist() for i in range(0, len(positions), batch_size)]
    return DataLoader(CohortDataset(images), batch_sampler=batches, num_workers=num_workers if batches else 0,
                      collate_fn=uint8_collate, pin_memory=pin_memory)


def apply_to_cohort(
    cohort: Cohort,
    simplifier: nn.Module,
    classifier: nn.Module,
    prior: nn.Module,
    out_dir: str | Path,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    labels: Sequence[str] = LABEL_COLUMNS,
) -> list[str]:
    """Simplify and score this rank's share of the cohort's unfinished studies; returns their study ids.

    Writes the studies' slots of ``simplified/`` and appends to ``parts/part-<rank>.csv`` (see the
    module docstring). Under torchrun every rank must call this with the same cohort; it
    synchronises the ranks itself (no-op barriers without a process group). Models must already be
    on ``device`` (default: the device of the classifier's parameters) and in eval mode. ``labels``:
    the manifest columns each row carries (:func:`label_columns`).
    """
    out_dir = Path(out_dir)
    device = device or next(classifier.parameters()).device
    rank, _ = world_info()
    if rank == 0:
        prune_parts(out_dir, labels)  # judged against the store as it was: a lost store voids every row
        CohortStore.create(simplified_store_path(out_dir), cohort.study_ids, tuple(cohort.image_size))
    barrier()  # parts are pruned and the store has a slot per study before anyone reads them
    done = finished_ids(out_dir, labels)
    barrier()  # everyone has the same finished set before anyone appends
    mine = _todo_share(cohort.study_ids, done)
    log.info("rank %d: %d of %d studies finished earlier, %d to do here", rank, len(done.intersection(
        cohort.study_ids)), len(cohort), len(mine))

    store = CohortStore.open(simplified_store_path(out_dir))
    slots = store.slots(cohort.study_ids)
    loader = _study_batches(cohort.images, mine, batch_size, num_workers, pin_memory=device.type == "cuda")
    computed: list[str] = []
    with PartWriter(part_path(out_dir, rank), labels) as writer:
        for images, _, positions in progress(loader, desc="apply", total=len(loader), unit="batch"):
            x01 = images.to(device, non_blocking=True).float() / 255.0
            result = {k: v.cpu() for k, v in simplify_batch(simplifier, classifier, prior, x01).items()}
            for image, position in zip(result["simplified"][:, 0].numpy(), positions.tolist()):
                store.write(int(slots[position]), image)
            rows = _part_rows(cohort.frame, positions.tolist(), result, labels)
            writer.write(rows)  # after the slots: the rows commit them
            computed += [row[0] for row in rows]
    return computed


def merge_parts(out_dir: str | Path, study_ids: Sequence[str], labels: Sequence[str] = LABEL_COLUMNS
                ) -> pd.DataFrame:
    """Write ``predictions.csv``: finished rows of ``study_ids`` by study_id; raises if one is missing."""
    out_dir = Path(out_dir)
    rows = finished_frame(out_dir, labels).set_index("study_id")
    missing = [sid for sid in study_ids if sid not in rows.index]
    if missing:
        raise RuntimeError(f"{out_dir / PARTS_DIR}: {len(missing)} studies have no finished row, "
                           f"e.g. {missing[:3]}")
    frame = rows.loc[sorted(study_ids)].reset_index()
    with atomic_path(out_dir / PREDICTIONS_NAME) as tmp:
        frame.to_csv(tmp, index=False, na_rep="", lineterminator="\n")
    return frame


def read_predictions(path: str | Path) -> pd.DataFrame:
    """``predictions.csv`` with the dtypes :func:`merge_parts` wrote it with (label columns: those
    between ``split`` and the values)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("study_id", "split", *VALUE_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    names = list(frame.columns)
    labels = names[names.index("split") + 1:names.index(VALUE_COLUMNS[0])]
    return typed_frame(frame, labels)


def summarize(predictions: pd.DataFrame, task: str | None, num_dims: int) -> dict[str, float]:
    """Means of bpd and bits saved, decision agreement, and AUROC/accuracy on ``task``'s labelled rows."""
    from pipeline.simplebits.evaluate import classification_summary

    summary: dict[str, float] = {
        "n_studies": float(len(predictions)),
        "num_dims": float(num_dims),
        "bpd_orig": float(predictions["bpd_orig"].mean()),
        "bpd_simpl": float(predictions["bpd_simpl"].mean()),
        "bits_saved_mean": float(predictions["bits_saved"].mean()),
        "bits_saved_median": float(predictions["bits_saved"].median()),
        "decision_agreement": float(np.mean((predictions["p_orig"] >= 0.5)
                                            == (predictions["p_simpl"] >= 0.5))),
    }
    if task is not None:
        labels = tasks.task_labels(predictions, task)
        known = labels.notna().to_numpy()
        scored = classification_summary(labels[known].to_numpy(), predictions.loc[known, "p_orig"].to_numpy(),
                                         predictions.loc[known, "p_simpl"].to_numpy())
        summary.update({k: v for k, v in scored.items() if k != "decision_agreement"})
        summary["n_labelled"] = float(known.sum())
    return summary


# --- the command ----------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprints(config: ApplyConfig) -> dict[str, str]:
    """SHA-256 of the model files (weights and .json side-cars) and of the ingest folder's resolved config.

    The ingest config pins the pixels (size, VOI, padding): a re-ingested folder with other settings
    keeps its study ids, and must not be mixed with results on the old pixels.
    """
    from pipeline.prior import SHIPPED_PRIOR

    prior = Path(config.prior or SHIPPED_PRIOR)
    prior = prior.with_suffix(".safetensors") if prior.suffix in ("", ".json") else prior
    files = {"simplifier": Path(config.simplifier), "classifier": Path(config.classifier), "prior": prior}
    fingerprints = {}
    for name, path in files.items():
        for file in (path, path.with_suffix(".json")):
            if file.is_file():
                fingerprints[f"{name}{file.suffix}"] = file_sha256(file)
    declared = {"arch": config.classifier_arch, "kwargs": config.classifier_kwargs,
                "adapter": config.classifier_adapter}
    if any(declared.values()):  # how the classifier file is read changes its outputs as much as the file
        encoded = json.dumps(declared, sort_keys=True).encode()
        fingerprints["classifier.declared"] = hashlib.sha256(encoded).hexdigest()
    ingest_config = Path(config.ingest) / RESOLVED_CONFIG_NAME
    if ingest_config.is_file():
        fingerprints[f"ingest/{RESOLVED_CONFIG_NAME}"] = file_sha256(ingest_config)
    return fingerprints


def check_same_models(out_dir: Path, fingerprints: dict[str, str]) -> None:
    """Refuse to resume into a folder whose finished rows came from other models or other pixels."""
    recorded = out_dir / INPUTS_NAME
    if not recorded.is_file():
        return
    before = json.loads(recorded.read_text())
    changed = sorted(k for k in {*before, *fingerprints} if before.get(k) != fingerprints.get(k))
    if changed:
        raise UserError(f"{recorded}: this folder holds results of other inputs (changed: "
                        f"{', '.join(changed)}); use a new --out folder")


def classifier_task(classifier_path: str | Path) -> str | None:
    """The ``task`` recorded in the classifier's .json side-car, if any."""
    meta = Path(classifier_path).with_suffix(".json")
    if not meta.is_file():
        return None
    task = json.loads(meta.read_text()).get("task")
    return task if isinstance(task, str) and task in tasks.task_names() else None


def tracking_params(config: ApplyConfig) -> tuple[dict, dict[str, str]]:
    """MLflow params (what defines the results) and tags (how this attempt runs them)."""
    params = config.model_dump(mode="json", exclude=set(EXECUTION_SETTINGS))
    tags = {key: str(getattr(config, key)) for key in EXECUTION_SETTINGS}
    return params, {**tags, "world_size": str(world_info()[1])}


def run_apply(config: ApplyConfig) -> dict[str, float]:
    """``simplebits apply``: load cohort and models, run this rank's share, merge and summarise on rank 0.

    Returns the summary on rank 0 and an empty dict on other ranks.
    """
    from pipeline.models.classifiers import load_classifier
    from pipeline.models.simplifier import load_simplifier
    from pipeline.prior import load_prior

    for key in ("ingest", "simplifier", "classifier", "out"):
        if not getattr(config, key):
            raise UserError(f"apply needs --{key}")
    out_dir = Path(config.out)
    fingerprints = input_fingerprints(config)
    check_same_models(out_dir, fingerprints)
    cohort = load_cohort(config.ingest, split=config.split)
    if len(cohort) == 0:
        where = f" in split {config.split!r}" if config.split else ""
        raise UserError(f"{config.ingest}: no studies{where}")
    task = config.task or classifier_task(config.classifier)

    context = init_distributed(config.device)
    try:
        device = context.device
        simplifier = load_simplifier(config.simplifier).to(device).eval()
        classifier = load_classifier(config.classifier, config.classifier_arch, config.classifier_kwargs,
                                     config.classifier_adapter, task=task).to(device).eval()
        prior = load_prior(config.prior, device=device)
        if context.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(config, out_dir)
            atomic_write_text(out_dir / INPUTS_NAME, json.dumps(fingerprints, indent=2) + "\n")
        tracker = Tracker.from_config(out_dir, config.tracking, enabled=context.is_main)
        params, tags = tracking_params(config)
        with tracker.run("apply", params=params, tags={**tags, "task": task or ""},
                         resume_file=out_dir / RUN_ID_NAME):
            computed = apply_to_cohort(cohort, simplifier, classifier, prior, out_dir, config.batch_size,
                                       config.num_workers, device, labels=label_columns(task))
            log.info("rank %d: %d studies simplified in this run", context.rank, len(computed))
            barrier()  # every part is complete before rank 0 merges
            if not context.is_main:
                return {}
            predictions = merge_parts(out_dir, cohort.study_ids, label_columns(task))
            summary = summarize(predictions, task, num_dims=math.prod(cohort.image_size))
            atomic_write_text(out_dir / METRICS_NAME, json.dumps({**summary, "task": task}, indent=2) + "\n")
            tracker.log_metrics({k: v for k, v in summary.items() if not math.isnan(v)})
            tracker.log_table(predictions, "predictions.json")
            tracker.log_artifact(out_dir / PREDICTIONS_NAME)
            tracker.log_artifact(out_dir / METRICS_NAME)
            return summary
    finally:
        shutdown_distributed()
