"""Cohort inference with a trained simplifier: ``simplebits apply``, sharded over torchrun ranks, resumable.

For every study: the simplified image, P(positive) of the classifier on the original and on the
simplified image, the bits per dimension of both under the prior (deterministic midpoint
dequantization, so the same image always gets the same number) and the bits saved,
``(bpd_orig - bpd_simpl) * D``.

Layout of the output folder::

    simplified/<study_id>.npy   uint8 (H, W): exactly the image that p_simpl and bpd_simpl were computed on
    parts/part-<rank>.csv       one row per finished study (PART_COLUMNS), appended and flushed per batch
    predictions.csv             all parts merged by rank 0, sorted by study_id
    metrics.json                cohort summary (also logged to MLflow)
    inputs.json                 SHA-256 of the model files and the ingest config: a resumed run must match
    config.resolved.yaml

Resuming: a study is finished when its part row *and* its ``.npy`` exist. The ``.npy`` is written
before the row, so a killed run leaves at worst an image without a row (recomputed) or a torn last
line (dropped). Rank 0 first rewrites the part files without torn, stale or repeated rows; then
every rank reads the same finished set and takes its round-robin shard of the rest. Part files of
an earlier run with another number of ranks are read like any other, so the world size may change
between runs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import field_validator
from torch import Tensor, nn

from pipeline.config import RESOLVED_CONFIG_NAME, StrictModel, save_resolved_config
from pipeline.data.ingest import TASKS, Cohort, load_cohort, task_labels
from pipeline.data.manifest import SPLITS
from pipeline.models.bpd import bits_per_dim
from pipeline.runtime.atomic import atomic_path, atomic_write_npy, atomic_write_text
from pipeline.runtime.csv_log import AppendOnlyCsv
from pipeline.runtime.device import autocast
from pipeline.runtime.distributed import barrier, init_distributed, shard, shutdown_distributed
from pipeline.runtime.progress import progress
from pipeline.runtime.tracking import Tracker, TrackingConfig

log = logging.getLogger(__name__)

SIMPLIFIED_DIR = "simplified"
PARTS_DIR = "parts"
PREDICTIONS_NAME = "predictions.csv"
METRICS_NAME = "metrics.json"
INPUTS_NAME = "inputs.json"
LABEL_COLUMNS = ("effusion", "sex")
VALUE_COLUMNS = ("p_orig", "p_simpl", "bpd_orig", "bpd_simpl", "bits_saved")
PART_COLUMNS = ("study_id", "split", *LABEL_COLUMNS, *VALUE_COLUMNS)


# --- config -----------------------------------------------------------------------------------




class ApplyConfig(StrictModel):
    """``configs/apply.yaml``; paths usually come from the command line."""

    ingest: str | None = None
    simplifier: str | None = None
    classifier: str | None = None
    prior: str | None = None  # None: the shipped prior
    out: str | None = None
    split: str | None = None  # None: every split of the ingest folder
    task: str | None = None  # label scored in metrics.json; None: the "task" in the classifier's .json
    batch_size: int = 64
    device: str = "auto"
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: str | None) -> str | None:
        if value is not None and value not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or null, got {value!r}")
        return value

    @field_validator("task")
    @classmethod
    def _check_task(cls, value: str | None) -> str | None:
        if value is not None and value not in TASKS:
            raise ValueError(f"task must be one of {TASKS} or null, got {value!r}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _check_batch_size(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"batch_size must be >= 1, got {value}")
        return value


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


def simplified_path(out_dir: str | Path, study_id: str) -> Path:
    return Path(out_dir) / SIMPLIFIED_DIR / f"{study_id}.npy"


def part_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"part-{rank}.csv"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_complete_row(row: Sequence[str]) -> bool:
    return (len(row) == len(PART_COLUMNS) and bool(row[0]) and tuple(row) != PART_COLUMNS
            and all(_is_number(v) for v in row[len(PART_COLUMNS) - len(VALUE_COLUMNS):]))


def read_part_rows(path: str | Path) -> list[list[str]]:
    """Complete rows of one part file; a last line without its newline (torn by a kill) is dropped."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [row for row in csv.reader(io.StringIO(text)) if _is_complete_row(row)]


def part_files(out_dir: str | Path) -> list[Path]:
    """Every rank's part file, in rank order (numerically: part-10 after part-9)."""
    files = [p for p in Path(out_dir, PARTS_DIR).glob("part-*.csv") if p.stem.removeprefix("part-").isdigit()]
    return sorted(files, key=lambda p: int(p.stem.removeprefix("part-")))


def _rows_to_csv(rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PART_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def finished_rows(out_dir: str | Path) -> dict[str, list[str]]:
    """study_id -> its part row, for studies whose row and simplified image both exist."""
    rows: dict[str, list[str]] = {}
    for path in part_files(out_dir):
        for row in read_part_rows(path):
            if simplified_path(out_dir, row[0]).is_file():
                rows[row[0]] = row
    return rows


def prune_parts(out_dir: str | Path) -> None:
    """Rewrite part files without torn rows, rows whose image is missing, and repeats of a study.

    Run by rank 0 alone, before any rank reads or appends, so that every later row of a study is
    the only one (the merge never has to choose between two).
    """
    seen: set[str] = set()
    for path in part_files(out_dir):
        original = path.read_text(encoding="utf-8")
        kept = []
        for row in read_part_rows(path):
            if row[0] not in seen and simplified_path(out_dir, row[0]).is_file():
                kept.append(row)
                seen.add(row[0])
        pruned = _rows_to_csv(kept)
        if pruned != original:
            atomic_write_text(path, pruned)


class PartWriter(AppendOnlyCsv):
    """Appends rows to ``parts/part-<rank>.csv`` and flushes each batch, so finished work survives a kill."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, PART_COLUMNS)

    def write(self, rows: Iterable[Sequence[str]]) -> None:
        self.write_rows(rows)


def rows_to_frame(rows: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Part rows (strings) -> typed table: labels as in the manifest (``Int64`` effusion, ``str`` sex)."""
    frame = pd.DataFrame([list(r) for r in rows], columns=list(PART_COLUMNS))
    frame["effusion"] = pd.to_numeric(frame["effusion"], errors="coerce").astype("Int64")
    for column in VALUE_COLUMNS:
        frame[column] = frame[column].astype(np.float64)
    return frame


def _label_text(value: object) -> str:
    return "" if pd.isna(value) else str(value)


# --- a cohort -----------------------------------------------------------------------------------


def apply_to_cohort(
    cohort: Cohort,
    simplifier: nn.Module,
    classifier: nn.Module,
    prior: nn.Module,
    out_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> pd.DataFrame:
    """Simplify and score this rank's shard of the cohort's unfinished studies; returns the rows computed now.

    Writes ``simplified/<study_id>.npy`` and appends to ``parts/part-<rank>.csv`` (see the module
    docstring). Under torchrun every rank must call this with the same cohort; it synchronises
    the ranks itself (no-op barriers without a process group). Models must already be on ``device``
    (default: the device of the classifier's parameters) and in eval mode.
    """
    out_dir = Path(out_dir)
    device = device or next(classifier.parameters()).device
    if rank == 0:
        prune_parts(out_dir)
    barrier()  # parts are pruned before anyone reads them
    done = finished_rows(out_dir)
    barrier()  # everyone has the same finished set before anyone appends
    todo = [i for i, sid in enumerate(cohort.study_ids) if sid not in done]
    mine = shard(todo, rank, world_size)
    log.info("rank %d: %d of %d studies finished earlier, %d to do here", rank, len(cohort) - len(todo),
             len(cohort), len(mine))

    splits = cohort.frame["split"].tolist()
    labels = {c: cohort.frame[c].tolist() for c in LABEL_COLUMNS}
    new_rows: list[list[str]] = []
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    with PartWriter(part_path(out_dir, rank)) as writer:
        for batch in progress(batches, desc="apply", total=len(batches), unit="batch"):
            x01 = cohort.images[torch.as_tensor(batch)].to(device).float() / 255.0
            result = {k: v.cpu() for k, v in simplify_batch(simplifier, classifier, prior, x01).items()}
            rows = []
            for j, i in enumerate(batch):
                study_id = cohort.study_ids[i]
                image = result["simplified"][j, 0].numpy()
                atomic_write_npy(simplified_path(out_dir, study_id), image)
                rows.append([study_id, splits[i], *(_label_text(labels[c][i]) for c in LABEL_COLUMNS),
                             *(repr(float(result[c][j])) for c in VALUE_COLUMNS)])
            writer.write(rows)
            new_rows += rows
    return rows_to_frame(new_rows)


def merge_parts(out_dir: str | Path, study_ids: Sequence[str]) -> pd.DataFrame:
    """Write ``predictions.csv``: finished rows of ``study_ids`` by study_id; raises if one is missing."""
    out_dir = Path(out_dir)
    rows = finished_rows(out_dir)
    missing = [sid for sid in study_ids if sid not in rows]
    if missing:
        raise RuntimeError(f"{out_dir / PARTS_DIR}: {len(missing)} studies have no finished row, "
                           f"e.g. {missing[:3]}")
    frame = rows_to_frame([rows[sid] for sid in sorted(study_ids)])
    with atomic_path(out_dir / PREDICTIONS_NAME) as tmp:
        frame.to_csv(tmp, index=False, na_rep="", lineterminator="\n")
    return frame


def read_predictions(path: str | Path) -> pd.DataFrame:
    """``predictions.csv`` with the dtypes :func:`merge_parts` wrote it with."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in PART_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return rows_to_frame(frame[list(PART_COLUMNS)].to_numpy().tolist())


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
        labels = task_labels(predictions, task)
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
        raise ValueError(f"{recorded}: this folder holds results of other inputs (changed: "
                         f"{', '.join(changed)}); use a new --out folder")


def classifier_task(classifier_path: str | Path) -> str | None:
    """The ``task`` recorded in the classifier's .json side-car, if any."""
    meta = Path(classifier_path).with_suffix(".json")
    if not meta.is_file():
        return None
    task = json.loads(meta.read_text()).get("task")
    return task if task in TASKS else None


def run_apply(config: ApplyConfig) -> dict[str, float]:
    """``simplebits apply``: load cohort and models, run this rank's shard, merge and summarise on rank 0.

    Returns the summary on rank 0 and an empty dict on other ranks.
    """
    from pipeline.models.classifiers import load_classifier
    from pipeline.models.simplifier import load_simplifier
    from pipeline.prior import load_prior

    for key in ("ingest", "simplifier", "classifier", "out"):
        if not getattr(config, key):
            raise ValueError(f"apply needs --{key}")
    out_dir = Path(config.out)
    fingerprints = input_fingerprints(config)
    check_same_models(out_dir, fingerprints)
    cohort = load_cohort(config.ingest, split=config.split)
    if len(cohort) == 0:
        where = f" in split {config.split!r}" if config.split else ""
        raise ValueError(f"{config.ingest}: no studies{where}")
    task = config.task or classifier_task(config.classifier)

    context = init_distributed(config.device)
    try:
        device = context.device
        simplifier = load_simplifier(config.simplifier).to(device).eval()
        classifier = load_classifier(config.classifier).to(device).eval()
        prior = load_prior(config.prior, device=device)
        if context.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(config, out_dir)
            atomic_write_text(out_dir / INPUTS_NAME, json.dumps(fingerprints, indent=2) + "\n")
        computed = apply_to_cohort(cohort, simplifier, classifier, prior, out_dir, context.rank,
                                   context.world_size, config.batch_size, device)
        log.info("rank %d: %d studies simplified in this run", context.rank, len(computed))
        barrier()  # every part is complete before rank 0 merges
        if not context.is_main:
            return {}
        predictions = merge_parts(out_dir, cohort.study_ids)
        summary = summarize(predictions, task, num_dims=cohort.images[0].numel())
        atomic_write_text(out_dir / METRICS_NAME, json.dumps({**summary, "task": task}, indent=2) + "\n")
        tracker = Tracker.from_config(out_dir, config.tracking)
        with tracker.run("apply", params=config.model_dump(mode="json"), tags={"task": task or ""}):
            tracker.log_metrics({k: v for k, v in summary.items() if not math.isnan(v)})
            tracker.log_artifact(out_dir / PREDICTIONS_NAME)
            tracker.log_artifact(out_dir / METRICS_NAME)
        return summary
    finally:
        shutdown_distributed()
