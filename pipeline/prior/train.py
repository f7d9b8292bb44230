"""Train the Glow density prior: DDP-ready, resumable, time-budgeted, best weights on validation bpd.

Run folder (``--out``): ``checkpoint.pt`` (latest: model, optimizer, step, RNG, best val bpd, MLflow
run id), ``prior.safetensors`` + ``prior.json`` (best weights so far), ``config.resolved.yaml``,
``mlflow.db``. Re-running the same command resumes from ``checkpoint.pt``.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import StrictModel, save_resolved_config
from pipeline.models.bpd import glow_input_bpd, to_glow_input
from pipeline.models.glow import Glow
from pipeline.prior import SHIPPED_PRIOR, load_prior, save_prior
from pipeline.prior.data import PriorDataConfig, PriorImageSampler, build_bank, dequantization_noise
from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runtime.device import autocast
from pipeline.runtime.distributed import (
    DistContext, all_reduce_mean, barrier, broadcast_object, init_distributed, shard,
)
from pipeline.runtime.progress import progress
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import Tracker, TrackingConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
PRIOR_NAME = "prior"
VALIDATION_SEED_OFFSET = 1_000_003  # validation images come from a stream no training step uses


class GlowConfig(StrictModel):
    levels: int = 4
    steps_per_level: int = 6
    hidden_channels: int = 64
    coupling: Literal["affine", "additive"] = "affine"


class TrainConfig(StrictModel):
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32  # global, split over DDP ranks
    optimizer: Literal["adamax", "adamw"] = "adamax"
    lr: float = 1e-3
    weight_decay: float = 5e-5
    warmup_steps: int = 200
    grad_clip: float = 50.0
    max_steps: int = 20000
    max_minutes: float | None = None
    steps_per_epoch: int = 250
    val_images: int = 128
    val_size: int = 64
    # Which validation figure picks the best weights; val_radiograph_bpd needs held-out radiographs.
    select_on: Literal["val_bpd", "val_radiograph_bpd"] = "val_bpd"




class PriorConfig(StrictModel):
    init: str = "scratch"  # scratch | shipped | <path to a .safetensors prior>
    model: GlowConfig = GlowConfig()
    data: PriorDataConfig = PriorDataConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()


class BpdObjective(nn.Module):
    """``forward(glow_input) -> mean bpd``: DDP wraps this so that gradients synchronise."""

    def __init__(self, glow: Glow) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, glow_input: Tensor) -> Tensor:
        return glow_input_bpd(self.glow, glow_input).mean()


def build_model(config: PriorConfig) -> Glow:
    """A fresh Glow, or the weights named by ``config.init`` (``shipped`` or a path) for fine-tuning."""
    if config.init == "scratch":
        return Glow(in_channels=1, **config.model.model_dump())
    model = load_prior(SHIPPED_PRIOR if config.init == "shipped" else config.init)
    return model.train().requires_grad_(True)


def glow_batch(sampler: PriorImageSampler, seed: int, step: int, indices: list[int], size: int) -> Tensor:
    """Dequantized Glow inputs for images ``indices`` of ``step`` (noise seeded per image)."""
    x01 = torch.from_numpy(sampler.batch(step, indices, size)).float() / 255.0
    return to_glow_input(x01, dequantization_noise(seed, step, indices, (1, size, size)))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamax":
        return torch.optim.Adamax(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"train.optimizer must be 'adamax' or 'adamw', got {config.optimizer!r}")


@torch.no_grad()
def validation_bpd(
    model: Glow, images: Tensor, noise: Tensor, device: torch.device, batch: int = 64
) -> float:
    """Mean bpd (uniform dequantization with fixed noise) of uint8 ``images`` ``(N, 1, H, W)``."""
    was_training = model.training
    model.eval()
    values = []
    for i in range(0, len(images), batch):
        g = to_glow_input(images[i : i + batch].float() / 255.0, noise[i : i + batch]).to(device)
        with autocast(device):
            values.append(glow_input_bpd(model, g).float().cpu())
    model.train(was_training)
    return float(torch.cat(values).mean())


def train_prior(
    config: PriorConfig,
    out_dir: str | Path,
    radiographs: np.ndarray | None = None,
    val_radiographs: np.ndarray | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) a prior in ``out_dir``; returns the summary also written to ``prior.json``.

    ``radiographs`` / ``val_radiographs``: uint8 ``(N, 1, H, W)`` demo radiographs for the training
    mix and for an in-domain validation figure.
    """
    start = time.monotonic()  # train.max_minutes covers setup (bank rendering) too
    out_dir = Path(out_dir)
    ctx = init_distributed(config.train.device)
    tc = config.train
    seed_everything(tc.seed)
    if tc.batch_size % ctx.world_size:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {ctx.world_size} ranks")
    if tc.select_on == "val_radiograph_bpd" and (val_radiographs is None or not len(val_radiographs)):
        raise ValueError("train.select_on=val_radiograph_bpd needs validation radiographs (--ingest/--manifest)")
    sampler = PriorImageSampler(build_bank(config.data, radiographs), config.data, seed=tc.seed)
    val_seed = tc.seed + VALIDATION_SEED_OFFSET
    val_sampler = PriorImageSampler(sampler.bank, config.data, seed=val_seed)
    val_images = torch.from_numpy(val_sampler.batch(0, range(tc.val_images), tc.val_size))
    val_noise = dequantization_noise(val_seed, 0, range(tc.val_images), (1, tc.val_size, tc.val_size))

    model = build_model(config)
    if config.init == "scratch":
        # ActNorm's data-dependent init sees the full first global batch on every rank, so all
        # ranks (and a single process) start from identical weights.
        model.train()
        with torch.no_grad():
            size = sampler.size_for_step(0)
            model.log_prob(glow_batch(sampler, tc.seed, 0, list(range(tc.batch_size)), size))
    model.to(ctx.device)
    optimizer = make_optimizer(model, tc)

    checkpoint_path = out_dir / CHECKPOINT_NAME
    step, best_val, run_id = 0, math.inf, None
    if checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, models={"glow": model}, optimizers={"opt": optimizer},
                                map_location=ctx.device)
        step, best_val = state["step"], state["extra"].get("best_val_bpd", math.inf)
        run_id = state["extra"].get("mlflow_run_id")
        log.info("resuming %s at step %d (best val bpd %.4f)", checkpoint_path, step, best_val)

    objective: nn.Module = BpdObjective(model)
    if ctx.is_distributed:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    tracker = Tracker.from_config(out_dir, config.tracking, enabled=ctx.is_main)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, out_dir)
    info: dict[str, Any] = {
        "command": command or shlex.join(["simplebits", *sys.argv[1:]]),
        "seed": tc.seed,
        "world_size": ctx.world_size,
        "config": config.model_dump(mode="json"),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    with tracker.run("prior", params=None if run_id else config.model_dump(mode="json"), run_id=run_id):
        run_id = tracker.run_id
        epoch_losses: list[float] = []
        bar = progress(range(step, tc.max_steps), desc="prior", total=tc.max_steps, initial=step)
        for step in bar:
            size = sampler.size_for_step(step)
            indices = shard(list(range(tc.batch_size)), ctx.rank, ctx.world_size)
            g = glow_batch(sampler, tc.seed, step, indices, size).to(ctx.device)
            for group in optimizer.param_groups:
                group["lr"] = tc.lr * min(1.0, (step + 1) / max(tc.warmup_steps, 1))
            with autocast(ctx.device):
                loss = objective(g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if torch.isfinite(grad_norm):
                optimizer.step()
            epoch_losses.append(float(all_reduce_mean(loss.detach())))
            bar.set_postfix(bpd=f"{epoch_losses[-1]:.3f}", size=size)
            done = step + 1
            out_of_time = _out_of_time(start, tc.max_minutes, ctx)
            if done % tc.steps_per_epoch == 0 or done == tc.max_steps or out_of_time:
                best_val = _end_of_epoch(
                    model, optimizer, tc, done, epoch_losses, best_val, val_images, val_noise,
                    val_radiographs, ctx, tracker, out_dir, info, run_id,
                )
                epoch_losses = []
            if out_of_time:
                log.info("train.max_minutes=%s reached at step %d", tc.max_minutes, done)
                break
        bar.close()
        if ctx.is_main:
            tracker.log_artifact(out_dir / f"{PRIOR_NAME}.safetensors")
            tracker.log_artifact(out_dir / f"{PRIOR_NAME}.json")
    barrier()
    return {**info, "best_val_bpd": best_val}


def _out_of_time(start: float, max_minutes: float | None, ctx: DistContext) -> bool:
    """True on every rank as soon as any rank's clock is past the budget: all ranks stop at one step."""
    if max_minutes is None:
        return False
    flag = torch.tensor(float(time.monotonic() - start > 60.0 * max_minutes), device=ctx.device)
    return bool(all_reduce_mean(flag) > 0)


def _end_of_epoch(
    model: Glow,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    step: int,
    losses: list[float],
    best_val: float,
    val_images: Tensor,
    val_noise: Tensor,
    val_radiographs: np.ndarray | None,
    ctx: DistContext,
    tracker: Tracker,
    out_dir: Path,
    info: dict[str, Any],
    run_id: str | None,
) -> float:
    """Validate, keep the best weights, checkpoint and log (main process; the others wait)."""
    if ctx.is_main:
        metrics = {
            "train_bpd": float(np.mean(losses)),
            "val_bpd": validation_bpd(model, val_images, val_noise, ctx.device),
        }
        if val_radiographs is not None and len(val_radiographs):
            images = torch.from_numpy(val_radiographs)
            shape = tuple(images.shape[1:])
            noise = dequantization_noise(VALIDATION_SEED_OFFSET, 0, range(len(images)), shape)
            metrics["val_radiograph_bpd"] = validation_bpd(model, images, noise, ctx.device)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        tracker.log_metrics(metrics, step=step)
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        selected = metrics[config.select_on]
        if selected < best_val:
            best_val = selected
            save_prior(model, out_dir / PRIOR_NAME, {**info, "step": step, "metrics": metrics})
        save_checkpoint(out_dir / CHECKPOINT_NAME, models={"glow": model}, optimizers={"opt": optimizer},
                        step=step, extra={"best_val_bpd": best_val, "mlflow_run_id": run_id})
    barrier()
    return broadcast_object(best_val)
