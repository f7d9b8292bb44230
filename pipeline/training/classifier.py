"""Train and evaluate a binary classifier (effusion or sex) on images in memory.

Two entry points:

- :func:`fit_classifier` trains on tensors; no file I/O except an optional checkpoint. Used by
  ``simplebits classify train``, by retrain-on-simplified and by the matched-bpd baselines.
- :func:`train_classifier_run` is the command: ingest cache -> ``model.safetensors`` + ``model.json`` +
  ``metrics.json`` + ``predictions.csv`` in the output folder, per-epoch metrics to MLflow.

Training: AdamW (no weight decay on biases), small random affine augmentation (never a horizontal
flip: laterality matters on a radiograph), bf16 autocast on CUDA, torchrun DDP with a
DistributedSampler, checkpoint/resume every epoch, and the model with the best validation AUROC kept.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.ingest import load_task_splits
from pipeline.metrics import binary_metrics
from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.runtime.atomic import atomic_write_text
from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    shard,
)
from pipeline.runtime.progress import progress
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import Tracker, TrackingConfig, null_tracker
from pipeline.training.schedules import cosine_decay

log = logging.getLogger(__name__)

TASKS = ("effusion", "sex")
CHECKPOINT_NAME = "checkpoint.pt"


class ModelConfig(StrictModel):
    name: str = "nf_wrn_16_2"
    kwargs: dict[str, Any] = {}


class AugmentConfig(StrictModel):
    """Per-image random affine; each range is symmetric around the identity."""

    enabled: bool = True
    rotate_deg: float = 5.0
    translate: float = 0.04  # fraction of the image size
    scale: float = 0.05


class TrainConfig(StrictModel):
    epochs: int = 16
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.995)
    eval_batch_size: int = 256
    max_minutes: float | None = None  # stop after the epoch that crosses this wall-clock budget
    # cosine: per-epoch decay to min_lr_fraction * lr over the planned epochs. A quarter-width ResNet-18
    # at a constant lr swung by up to 0.25 val AUROC between consecutive late epochs; the NF-WRN needs
    # the constant lr (its loss sits at ln 2 for ~10 epochs first: 0.88 instead of 0.97 on effusion)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_fraction: float = Field(0.05, ge=0.0, le=1.0)


def epoch_lr(train: TrainConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch`` (a pure function of the epoch, so resuming needs no state)."""
    if train.lr_schedule == "constant" or train.epochs <= 1:
        return train.lr
    return cosine_decay(train.lr, epoch / (train.epochs - 1), train.min_lr_fraction)




class ClassifyConfig(StrictModel):
    task: str = "effusion"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = ModelConfig(kwargs={"stem_stride": 2, "dropout": 0.0})
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    tracking: TrackingConfig = TrackingConfig()


@dataclass
class FitResult:
    model: nn.Module
    metrics: dict[str, float]  # of the kept (best-on-validation) model
    history: list[dict[str, float]] = field(default_factory=list)
    val_probabilities: torch.Tensor | None = None


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return task


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``k`` -> float ``k/255``; float images pass through as float32."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of one epoch's augmentation stream: a resumed run replays exactly what it would have drawn."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


def random_affine(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent small rotation/scale/translation per image, border padding, back on the 8-bit grid."""
    n = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * limit

    angle = torch.deg2rad(uniform(config.rotate_deg))
    scale = 1.0 + uniform(config.scale)
    shift = torch.stack([uniform(2 * config.translate), uniform(2 * config.translate)], dim=1)  # [-1,1] coords
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.round(out.clamp(0, 1) * 255) / 255


def out_of_time(started: float, max_minutes: float | None) -> bool:
    """Whether the wall-clock budget is spent; rank 0 decides for all, so no rank is left waiting."""
    if max_minutes is None:
        return False
    return bool(broadcast_object((time.monotonic() - started) / 60 > max_minutes))


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weights and gains (tensors with >1 dim), not biases or scalars (as the paper's AdamW)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, device: torch.device | None = None,
                  batch_size: int = 256) -> torch.Tensor:
    """P(positive) per image (CPU float tensor); ``images`` float in [0,1] or uint8 ``(N,1,H,W)``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_unit_range(images[start:start + batch_size].to(device))
        with autocast(device):
            logits = model(batch)
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def distributed_predict_proba(model: nn.Module, images: torch.Tensor, device: torch.device,
                              batch_size: int) -> torch.Tensor:
    """:func:`predict_proba` with the images split over DDP ranks and the results summed back together."""
    if not dist.is_initialized():
        return predict_proba(model, images, device, batch_size)
    indices = torch.tensor(shard(range(images.shape[0]), dist.get_rank(), dist.get_world_size()), dtype=torch.long)
    full = torch.zeros(images.shape[0], device=device)
    full[indices.to(device)] = predict_proba(model, images[indices], device, batch_size).to(device)
    return all_reduce_sum(full).cpu()


def fit_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: ClassifyConfig,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    local: bool = False,
) -> FitResult:
    """Train ``config.model`` on images ``(N,1,H,W)`` (uint8 or float in [0,1]) and integer labels.

    Keeps the epoch with the best validation AUROC. With ``checkpoint_path``, a checkpoint is written
    after every epoch and an existing one is resumed (model, optimizer, epoch, RNG, best model).
    Under torchrun the caller must have initialised the process group; only rank 0 writes.
    ``local``: train in this process alone even under torchrun (evaluations that only rank 0 runs).
    """
    tracker = tracker or null_tracker()
    device = pick_device(config.device)
    distributed = dist.is_initialized() and not local
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    seed_everything(config.seed)

    model = create_classifier(config.model.name, **config.model.kwargs).to(device)
    best_model = copy.deepcopy(model)
    train_model: nn.Module = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(weight_decay_groups(model, config.train.weight_decay), lr=config.train.lr,
                                  betas=config.train.betas)

    dataset = TensorDataset(train_images, train_labels.long())
    # also in a single process: its per-epoch shuffles (seed, epoch) make a resumed run identical
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    per_rank_batch = max(1, config.train.batch_size // world)
    loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=len(dataset) > per_rank_batch)

    start_epoch, best_score, history = 0, -math.inf, []  # score: val AUROC (accuracy if single-class)
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = load_checkpoint(checkpoint_path, models={"model": model, "best": best_model},
                                optimizers={"optimizer": optimizer}, map_location=device)
        start_epoch, best_score = state["step"], state["extra"]["best_score"]
        history = list(state["extra"]["history"])
        log.info("resumed classifier training from %s at epoch %d", checkpoint_path, start_epoch)

    started = time.monotonic()
    for epoch in range(start_epoch, config.train.epochs):
        sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config.train, epoch)
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, rank))
        train_model.train()
        loss_sum = torch.zeros((), device=device)
        for images, labels in progress(loader, desc=f"classifier epoch {epoch + 1}/{config.train.epochs}",
                                       leave=False):
            images = to_unit_range(images.to(device))
            if config.augment.enabled:
                images = random_affine(images, config.augment, generator)
            with autocast(device):
                loss = F.cross_entropy(train_model(images).float(), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        if distributed:
            probabilities = distributed_predict_proba(model, val_images, device, config.train.eval_batch_size)
            train_ce = all_reduce_mean(loss_sum / max(1, len(loader)))
        else:
            probabilities = predict_proba(model, val_images, device, config.train.eval_batch_size)
            train_ce = loss_sum / max(1, len(loader))
        metrics = {"train_ce": float(train_ce),
                   **binary_metrics(val_labels, probabilities, prefix="val_")}
        metrics.pop("val_n")
        history.append({"epoch": epoch + 1, **metrics})
        tracker.log_metrics(metrics, step=epoch + 1)
        score = metrics["val_auroc"] if not math.isnan(metrics["val_auroc"]) else metrics["val_accuracy"]
        if score > best_score:
            best_score = score
            best_model.load_state_dict(model.state_dict())
        if checkpoint_path is not None and rank == 0:
            save_checkpoint(checkpoint_path, models={"model": model, "best": best_model},
                            optimizers={"optimizer": optimizer}, step=epoch + 1,
                            extra={"best_score": best_score, "history": history})
        log.info("epoch %d: train CE %.4f, val AUROC %.4f, val accuracy %.4f", epoch + 1,
                 metrics["train_ce"], metrics["val_auroc"], metrics["val_accuracy"])
        if out_of_time(started, config.train.max_minutes):
            log.info("time budget of %.1f min reached after epoch %d", config.train.max_minutes, epoch + 1)
            break

    best_model.eval()
    val_probabilities = predict_proba(best_model, val_images, device, config.train.eval_batch_size)
    final = binary_metrics(val_labels, val_probabilities, prefix="val_")
    return FitResult(model=best_model, metrics=final, history=history, val_probabilities=val_probabilities)


def train_classifier_run(ingest_dir: str | Path, out_dir: str | Path, config: ClassifyConfig,
                         force: bool = False) -> dict[str, float]:
    """``simplebits classify train``: cohort from the ingest cache -> trained model and predictions.

    Skips the work when ``metrics.json`` already exists (unless ``force``); resumes from the
    checkpoint of an interrupted run.
    """
    task = check_task(config.task)
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file() and not force:
        log.info("%s exists; classifier already trained (use --force to retrain)", metrics_path)
        return json.loads(metrics_path.read_text())

    context = init_distributed(config.device)
    cohorts = load_task_splits(ingest_dir, task)
    tracker = Tracker.from_config(out_dir, config.tracking, enabled=context.is_main)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, out_dir)
    with tracker.run(f"classify-{task}", params=config.model_dump(mode="json"), tags={"task": task}):
        result = fit_classifier(
            cohorts["train"].images, cohorts["train"].labels(task),
            cohorts["val"].images, cohorts["val"].labels(task),
            config, tracker, checkpoint_path=out_dir / CHECKPOINT_NAME,
        )
        if context.is_main:
            size = list(cohorts["train"].images.shape[-2:])
            metrics = {**result.metrics, "task": task}
            save_classifier(result.model, out_dir / "model.safetensors", config.model.name, config.model.kwargs,
                            task=task, input_size=size, metrics=result.metrics)
            predictions = predictions_frame(result.model, cohorts, task, context.device,
                                            config.train.eval_batch_size)
            atomic_write_text(out_dir / "predictions.csv", predictions.to_csv(index=False))
            tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
            atomic_write_text(metrics_path, json.dumps({**metrics, "history": result.history}, indent=2))
            tracker.log_artifact(out_dir / "model.safetensors")
            tracker.log_artifact(out_dir / "model.json")
            tracker.log_artifact(metrics_path)
    return {**result.metrics, "task": task}


def predictions_frame(model: nn.Module, cohorts: dict[str, Any], task: str, device: torch.device,
                      batch_size: int) -> pd.DataFrame:
    """``study_id, split, label, p`` for every labelled study of every split."""
    frames = []
    for split, cohort in cohorts.items():
        probabilities = predict_proba(model, cohort.images, device, batch_size)
        frames.append(pd.DataFrame({"study_id": list(cohort.study_ids), "split": split,
                                    "label": cohort.labels(task).numpy(), "p": probabilities.numpy()}))
    return pd.concat(frames, ignore_index=True)
