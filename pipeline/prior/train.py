"""Train the Glow density prior on the shared engine: DDP-ready, resumable, best weights on validation bpd.

Training is step-based on generated image mixes (:class:`~pipeline.prior.data.PriorImageSampler`):
one engine epoch is ``train.steps_per_epoch`` steps and the run is ``train.max_steps`` steps, so
``max_steps`` must be a multiple of ``steps_per_epoch`` (a run shorter than one epoch is one epoch of
``max_steps`` steps). Each step renders, on every rank, that rank's round-robin shard of the global
batch (image ``i`` of step ``s`` depends only on ``(seed, s, i)``), and DDP averages the gradients,
so two ranks train the same model as one process with the same global batch. After each epoch the
validation bpd is computed (sharded over ranks) and the best weights so far are written.

Run folder (``--out``): ``checkpoint.pt`` (the engine's: model, optimizer, epoch, RNG, best val bpd),
``prior.safetensors`` + ``prior.json`` (best weights so far), ``config.resolved.yaml``,
``mlflow_run.json`` and ``mlflow.db``. Re-running the same command resumes from ``checkpoint.pt``
and continues the same MLflow run.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.dataset import Images
from pipeline.models.bpd import glow_input_bpd, to_glow_input
from pipeline.models.glow import Glow
from pipeline.prior import SHIPPED_PRIOR, load_prior, save_prior
from pipeline.prior.data import PriorDataConfig, PriorImageSampler, build_bank, dequantization_noise
from pipeline.runtime.device import autocast
from pipeline.runtime.distributed import barrier, init_distributed, shard
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import RUN_ID_NAME, Tracker, TrackingConfig
from pipeline.training.engine import Engine, StepContext, score_batches

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
    max_steps: int = 20000  # a multiple of steps_per_epoch
    # opt-in wall-clock cap, checked after each epoch (recorded as stopped_epoch): results then depend
    # on the machine's load, so the default trains max_steps
    max_minutes: float | None = None
    steps_per_epoch: int = 250  # steps between validations / checkpoints
    val_images: int = 128
    val_size: int = 64
    # Which validation figure picks the best weights; val_radiograph_bpd needs held-out radiographs.
    select_on: Literal["val_bpd", "val_radiograph_bpd"] = "val_bpd"

    def epochs_and_steps(self) -> tuple[int, int]:
        """``(engine epochs, steps per epoch)`` covering exactly ``max_steps`` steps."""
        per_epoch = min(self.steps_per_epoch, self.max_steps)
        if per_epoch < 1 or self.max_steps % per_epoch:
            raise ValueError(f"train.max_steps={self.max_steps} must be a positive multiple of "
                             f"train.steps_per_epoch={self.steps_per_epoch}")
        return self.max_steps // per_epoch, per_epoch


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


def warmup_lr(config: TrainConfig, step: int) -> float:
    """The lr of 0-based global ``step``: linear warm-up to ``lr`` (a function of the step only)."""
    return config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))


@torch.no_grad()
def validation_bpd(
    model: Glow, images: Images, noise_seed: int, device: torch.device, batch_size: int = 64
) -> float:
    """Mean bpd of uint8 ``images`` ``(N, 1, H, W)`` under uniform dequantization noise keyed by
    ``(noise_seed, position)``, streamed in batches and sharded over ranks (every rank must call it)."""
    was_training = model.training
    model.eval()

    def score(positions: Any, batch: Tensor) -> dict[str, Tensor]:
        noise = dequantization_noise(noise_seed, 0, positions, tuple(batch.shape[1:]))
        with autocast(device):
            glow_input = to_glow_input(batch.float() / 255.0, noise).to(device)
            return {"bpd": glow_input_bpd(model, glow_input).float()}

    values = score_batches(images, score, batch_size)["bpd"]
    model.train(was_training)
    return float(values.mean())


class BestBpd:
    """The lowest selection bpd so far (engine state, so a resumed run keeps comparing against it)."""

    def __init__(self) -> None:
        self.bpd = math.inf

    def improves(self, bpd: float) -> bool:
        if bpd < self.bpd:
            self.bpd = bpd
            return True
        return False

    def state_dict(self) -> dict[str, float]:
        return {"bpd": self.bpd}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.bpd = float(state["bpd"])


def train_prior(
    config: PriorConfig,
    out_dir: str | Path,
    radiographs: Images | None = None,
    val_radiographs: Images | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) a prior in ``out_dir``; returns the summary also written to ``prior.json``.

    ``radiographs`` / ``val_radiographs``: uint8 ``(N, 1, H, W)`` demo radiographs (an array, a
    tensor or a lazy store view) for the training mix and for an in-domain validation figure. The
    mix bank holds at most ``data.max_radiographs`` of them (a seeded sample, read from the store);
    the validation radiographs are streamed. Under torchrun every rank calls this; rank 0 writes.
    """
    out_dir = Path(out_dir)
    ctx = init_distributed(config.train.device)
    tc = config.train
    epochs, steps_per_epoch = tc.epochs_and_steps()
    seed_everything(tc.seed)
    if tc.batch_size % ctx.world_size:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {ctx.world_size} ranks")
    has_val_radiographs = val_radiographs is not None and len(val_radiographs) > 0
    if tc.select_on == "val_radiograph_bpd" and not has_val_radiographs:
        raise ValueError("train.select_on=val_radiograph_bpd needs validation radiographs "
                         "(--ingest/--manifest)")
    sampler = PriorImageSampler(build_bank(config.data, radiographs), config.data, seed=tc.seed)
    val_seed = tc.seed + VALIDATION_SEED_OFFSET
    val_sampler = PriorImageSampler(sampler.bank, config.data, seed=val_seed)
    val_images = torch.from_numpy(val_sampler.batch(0, range(tc.val_images), tc.val_size))

    model = build_model(config)
    if config.init == "scratch":
        # ActNorm's data-dependent init sees the full first global batch on every rank, so all
        # ranks (and a single process) start from identical weights. A resumed run overwrites them.
        model.train()
        with torch.no_grad():
            size = sampler.size_for_step(0)
            model.log_prob(glow_batch(sampler, tc.seed, 0, list(range(tc.batch_size)), size))
    model.to(ctx.device)
    optimizer = make_optimizer(model, tc)
    objective: nn.Module = BpdObjective(model)
    if ctx.is_distributed:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    best = BestBpd()

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

    def step(global_step: int, step_ctx: StepContext) -> dict[str, Any]:
        size = sampler.size_for_step(global_step)
        indices = shard(list(range(tc.batch_size)), step_ctx.rank, step_ctx.world_size)
        g = glow_batch(sampler, tc.seed, global_step, indices, size).to(ctx.device)
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(tc, global_step)
        with autocast(ctx.device):
            loss = objective(g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
        return {"bpd": loss.detach()}

    def evaluate(epoch: int) -> dict[str, float]:
        """Validation bpd on every rank (sharded); rank 0 writes the weights when they are the best so far."""
        metrics = {"val_bpd": validation_bpd(model, val_images, val_seed, ctx.device)}
        if has_val_radiographs:
            metrics["val_radiograph_bpd"] = validation_bpd(model, val_radiographs, VALIDATION_SEED_OFFSET,
                                                           ctx.device)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        done = (epoch + 1) * steps_per_epoch
        if best.improves(metrics[tc.select_on]) and ctx.is_main:
            save_prior(model, out_dir / PRIOR_NAME, {**info, "step": done, "metrics": metrics})
        return metrics

    def epoch_steps(epoch: int, _: StepContext) -> range:
        """The epoch's global step numbers; each step renders its own shard of that step's batch (cheap to
        skip on a mid-epoch resume: nothing is rendered for a skipped step)."""
        return range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)

    engine = Engine("prior", epochs=epochs, seed=tc.seed, device=ctx.device, models={"glow": model},
                    optimizers={"opt": optimizer}, state={"best": best},
                    checkpoint_path=out_dir / CHECKPOINT_NAME, tracker=tracker, max_minutes=tc.max_minutes)
    with tracker.run("prior", params=config.model_dump(mode="json"), resume_file=out_dir / RUN_ID_NAME):
        run = engine.fit(step, batches=epoch_steps, steps_per_epoch=steps_per_epoch, evaluate=evaluate)
        weights = (out_dir / PRIOR_NAME).with_suffix(".safetensors")
        if ctx.is_main and weights.is_file():
            if math.isfinite(best.bpd):
                tracker.log_metrics({"best_val_bpd": best.bpd})  # step 0: linked to the model logged next
            tracker.log_model("prior", weights, name="prior", register=config.tracking.register_as)
    barrier()
    return {**info, "best_val_bpd": best.bpd, "steps": run.stopped_epoch * steps_per_epoch,
            "stopped_epoch": run.stopped_epoch, "time_capped": run.time_capped}
