"""Train and evaluate a binary classifier (any registered task: effusion, sex, ...) on images in memory.

Two entry points:

- :func:`fit_classifier` trains on tensors; no file I/O except an optional checkpoint. Used by
  ``simplebits classify train``, by retrain-on-simplified and by the matched-bpd baselines.
- :func:`train_classifier_run` is the command: ingest cache -> ``model.safetensors`` + ``model.json`` +
  ``metrics.json`` + ``predictions.csv`` in the output folder, per-epoch metrics to MLflow.

Training: AdamW (no weight decay on biases), small random affine augmentation (never a horizontal
flip: laterality matters on a radiograph), bf16 autocast on CUDA, the model with the best validation
AUROC kept. Sampling, DDP, checkpoint/resume, progress and MLflow belong to the shared
:class:`~pipeline.training.engine.Engine`; images stream from the cohort store.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.dataset import CohortDataset, Images
from pipeline.data.ingest import load_task_splits
from pipeline.metrics import binary_metrics
from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.runtime.atomic import atomic_write_text
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.distributed import init_distributed, world_info
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import RUN_ID_NAME, Tracker, TrackingConfig, null_tracker
from pipeline.tasks import check_task_name
from pipeline.training.engine import Engine, StepContext, score_batches
from pipeline.training.schedules import cosine_decay

log = logging.getLogger(__name__)

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
    # opt-in wall-clock cap (stop after the epoch that crosses it; recorded as stopped_epoch): results
    # then depend on the machine's load, so the default trains the configured epochs
    max_minutes: float | None = None
    num_workers: int = 0  # DataLoader processes reading the store
    checkpoint_every_steps: int | None = None  # also checkpoint mid-epoch (long epochs at cohort scale)
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
    # stem_stride 2: 64 px inputs give the paper's 32x32 feature maps, 4-8x cheaper on CPU; dropout 0:
    # measured on the demo cohort, dropout slowed a 16-epoch CPU run without helping
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
    stopped_epoch: int = 0


def check_task(task: str) -> str:
    """``task`` if the registry (:mod:`pipeline.tasks`) knows it, else a one-line UserError."""
    return check_task_name(task)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``k`` -> float ``k/255``; float images pass through as float32."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def random_affine(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Independent small rotation/scale/translation per image, border padding, back on the 8-bit grid.

    ``uniforms``: optional ``(N, 4)`` values in [0, 1) that fix each image's transform (per-sample
    randomness from the engine, identical under any DDP sharding); else drawn from ``generator``.
    """
    n = x.shape[0]
    u = uniforms if uniforms is not None else torch.rand(n, 4, generator=generator)
    span = (u * 2 - 1).float()  # [-1, 1)
    angle = torch.deg2rad(span[:, 0] * config.rotate_deg)
    scale = 1.0 + span[:, 1] * config.scale
    shift = span[:, 2:4] * 2 * config.translate  # [-1,1] grid coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.round(out.clamp(0, 1) * 255) / 255


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weights and gains (tensors with >1 dim), not biases or scalars (as the paper's AdamW)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def predict_proba(model: nn.Module, images: Images, device: torch.device | None = None,
                  batch_size: int = 256, sharded: bool = False) -> torch.Tensor:
    """P(positive) per image (CPU float tensor), batch by batch; ``images`` uint8 or float in [0,1].

    ``sharded``: under torchrun each rank scores its share and all ranks get the whole result
    (every rank must call it then).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()

    def score(_: Any, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(device):
            logits = model(to_unit_range(batch.to(device)))
        return {"p": torch.softmax(logits.float(), dim=1)[:, 1]}

    out = score_batches(images, score, batch_size, sharded=sharded).get("p", torch.empty(0))
    model.train(was_training)
    return out.float()


class BestModel:
    """The weights of the epoch with the best validation score so far (checkpointed with the run)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.score = -math.inf

    def update(self, score: float, model: nn.Module) -> None:
        if score > self.score:
            self.score = score
            self.model.load_state_dict(model.state_dict())

    def state_dict(self) -> dict[str, float]:
        return {"score": self.score}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.score = float(state["score"])


def fit_classifier(
    train_images: Images,
    train_labels: torch.Tensor,
    val_images: Images,
    val_labels: torch.Tensor,
    config: ClassifyConfig,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    local: bool = False,
) -> FitResult:
    """Train ``config.model`` on images ``(N,1,H,W)`` (uint8 or float in [0,1]) and integer labels.

    Keeps the epoch with the best validation AUROC. With ``checkpoint_path``, checkpoints are
    written by the engine and an existing one is resumed. Under torchrun the caller must have
    initialised the process group and every rank calls this; only rank 0 writes.
    ``local``: train in this process alone even under torchrun.
    """
    tracker = tracker or null_tracker()
    device = pick_device(config.device)
    seed_everything(config.seed)
    model = create_classifier(config.model.name, **config.model.kwargs).to(device)
    best = BestModel(model)
    world = 1 if local else world_info()[1]
    train_model: nn.Module = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(weight_decay_groups(model, config.train.weight_decay), lr=config.train.lr,
                                  betas=config.train.betas)
    engine = Engine(
        "classifier", epochs=config.train.epochs, seed=config.seed, device=device,
        models={"model": model, "best": best.model}, optimizers={"optimizer": optimizer}, state={"best": best},
        checkpoint_path=checkpoint_path, tracker=tracker, max_minutes=config.train.max_minutes,
        num_workers=config.train.num_workers, local=local,
        checkpoint_every_steps=config.train.checkpoint_every_steps,
    )

    def step(batch: list[torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        images, labels, positions = batch
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(config.train, ctx.epoch)
        x = to_unit_range(images.to(device))
        if config.augment.enabled:
            x = random_affine(x, config.augment, uniforms=ctx.uniform(positions, 4))
        with autocast(device):
            loss = F.cross_entropy(train_model(x).float(), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"ce": loss.detach()}

    def evaluate(epoch: int) -> dict[str, float]:
        probabilities = predict_proba(model, val_images, device, config.train.eval_batch_size, sharded=not local)
        metrics = binary_metrics(val_labels, probabilities, prefix="val_")
        metrics.pop("val_n")
        best.update(metrics["val_auroc"] if not math.isnan(metrics["val_auroc"]) else metrics["val_accuracy"], model)
        return metrics

    batch_size = fitting_batch_size(config.train.batch_size, len(train_labels), world)
    run = engine.fit(step, dataset=CohortDataset(train_images, train_labels), batch_size=batch_size,
                     evaluate=evaluate)
    best_model = best.model.eval()
    val_probabilities = predict_proba(best_model, val_images, device, config.train.eval_batch_size,
                                      sharded=not local)
    final = binary_metrics(val_labels, val_probabilities, prefix="val_")
    return FitResult(model=best_model, metrics=final, history=run.history, val_probabilities=val_probabilities,
                     stopped_epoch=run.stopped_epoch)


def fitting_batch_size(batch_size: int, n: int, world: int) -> int:
    """The configured global batch, shrunk (to a multiple of the ranks) only for a cohort smaller than it."""
    if n >= batch_size:
        return batch_size
    fitted = max(world, n // world * world)
    log.warning("only %d training studies: batch size %d -> %d", n, batch_size, fitted)
    return fitted


def train_classifier_run(ingest_dir: str | Path, out_dir: str | Path, config: ClassifyConfig,
                         force: bool = False, name: str | None = None) -> dict[str, float]:
    """``simplebits classify train``: cohort from the ingest cache -> trained model and predictions.

    Skips the work when ``metrics.json`` already exists (unless ``force``); resumes from the
    checkpoint of an interrupted run. ``name``: of the MLflow run and of its logged model, saying what
    ran (default ``classify-<task>``; the pipeline's check classifier is ``independent-check-<task>``).
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
    name = name or f"classify-{task}"
    with tracker.run(name, params=config.model_dump(mode="json"), tags={"task": task},
                     resume_file=out_dir / RUN_ID_NAME):
        result = fit_classifier(
            cohorts["train"].images, cohorts["train"].labels(task),
            cohorts["val"].images, cohorts["val"].labels(task),
            config, tracker, checkpoint_path=out_dir / CHECKPOINT_NAME,
        )
        # every rank scores its share of every split; rank 0 writes
        predictions = predictions_frame(result.model, cohorts, task, context.device, config.train.eval_batch_size)
        if context.is_main:
            size = cohorts["train"].image_size
            metrics = {**result.metrics, "task": task, "stopped_epoch": result.stopped_epoch}
            save_classifier(result.model, out_dir / "model.safetensors", config.model.name, config.model.kwargs,
                            task=task, input_size=size, metrics=result.metrics)
            atomic_write_text(out_dir / "predictions.csv", predictions.to_csv(index=False))
            tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
            atomic_write_text(metrics_path, json.dumps({**metrics, "history": result.history}, indent=2))
            tracker.log_model("classifier", out_dir / "model.safetensors", name=name,
                              register=config.tracking.register_as, tags={"task": task})
            tracker.log_table(predictions, "predictions.json")
            tracker.log_artifact(metrics_path)
    return {**result.metrics, "task": task}


def predictions_frame(model: nn.Module, cohorts: dict[str, Any], task: str, device: torch.device,
                      batch_size: int) -> pd.DataFrame:
    """``study_id, split, label, p`` for every labelled study of every split."""
    frames = []
    for split, cohort in cohorts.items():
        probabilities = predict_proba(model, cohort.images, device, batch_size, sharded=True)
        frames.append(pd.DataFrame({"study_id": list(cohort.study_ids), "split": split,
                                    "label": cohort.labels(task).numpy(), "p": probabilities.numpy()}))
    return pd.concat(frames, ignore_index=True)
