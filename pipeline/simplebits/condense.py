"""SimpleBits setting (b): dataset condensation by gradient matching, with a bpd penalty.

Dataset condensation (Zhao, Mopuri & Bilen, ICLR 2021) as SimpleBits uses it (simplebits-method.md §4):

- the cohort is area-downsampled to ``image_size`` (32, as the paper's MIMIC-CXR condensation) for
  condensation and evaluation alike;
- ``ipc`` synthetic images per class, ``s = quantize_8bit(sigmoid(alpha))`` (straight-through), ``alpha``
  initialised to ``init_scale * N(0, 1)`` (grey plus a little noise) or from real images;
- every outer iteration draws a **fresh random ConvNet** (conv3x3 -> instance norm (GroupNorm with one
  group per channel) -> ReLU -> 2x2 average pool, three times, then linear);
- for ``outer_loop`` rounds: per class ``c`` the distance between the network's parameter gradients
  on a batch of real class-``c`` images and on the synthetic class-``c`` images,
  ``D_c = sum over weight tensors and output rows of (1 - cos)``; the synthetic images take one Adam
  step on ``10 C/(1+lam) * sum_c D_c + 2 lam/(1+lam) * mean bpd(s)``; then (except in the last round)
  the network trains ``inner_loop`` epochs on the current synthetic set;
- the Adam lr of the images follows a cosine decay over the outer iterations (an addition to the
  paper, see ``CondenseLoopConfig.lr_schedule``).

Evaluation (:func:`evaluate_condensed`): fresh ConvNets trained on the condensed set only, and on the
full training set for reference, tested on the real validation studies (accuracy, AUROC).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.ingest import Cohort, load_task_splits
from pipeline.metrics import accuracy, auroc
from pipeline.models.bpd import bits_per_dim, quantize_8bit
from pipeline.prior import load_prior
from pipeline.runtime.atomic import atomic_write_npy, atomic_write_text
from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.progress import progress
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import Tracker, null_tracker
from pipeline.simplebits.evaluate import as_float_images, deterministic_bpd
from pipeline.training.classifier import TrackingConfig, check_task
from pipeline.training.schedules import cosine_decay

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class ConvNetConfig(StrictModel):
    # DC uses 128 channels; 64 at 32x32 made a condensation iteration ~3x cheaper on one CPU core
    # (measured 5.8 s vs 1.9 s; the real-image gradients dominate the cost)
    width: int = 64
    depth: int = 3


class CondenseLoopConfig(StrictModel):
    ipc: int = 1  # synthetic images per class
    iterations: int = 100  # outer iterations (fresh network each); the paper: 1000. ~2-3 s each on one core
    outer_loop: int = 5
    inner_loop: int = 5
    batch_real: int = 128  # real images per class per matching step
    lr_images: float = 0.1
    # Cosine decay of lr_images over the outer iterations. At a constant lr every Adam step moves each
    # logit pixel by up to lr (~6 grey levels at lr 0.1), so the images never settle and that jitter
    # alone keeps the bpd near 4.5 however large lam is; decaying the lr lets them converge.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_net: float = 0.01
    init: Literal["noise", "real"] = "noise"
    init_scale: float = 0.2
    # bpd weight; a list runs a sweep (lam-<v>/ folders). 1e4 is the top of the paper's MIMIC grid; on the
    # demo cohort (32x32, 100 iterations) lam=100 only took the bpd from ~6 to ~2.7, 1e4 to ~1.05
    lam: float | list[float] = 10000.0
    max_minutes: float | None = None
    # Condense (and evaluate) at this resolution: train and val images are area-downsampled to it
    # when the cohort is larger. The paper condensed MIMIC-CXR at 32x32; on CPU it also makes every
    # matching step about 5x cheaper than at 64x64. None keeps the ingest resolution.
    image_size: int | None = 32


class CondenseEvalConfig(StrictModel):
    networks: int = 5  # fresh networks trained on the condensed set
    epochs: int = 300
    full_epochs: int = 20  # epochs for the reference networks trained on the full training set
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256


class CondenseConfig(StrictModel):
    task: str = "effusion"
    seed: int = 0
    device: str = "auto"
    prior: str | None = None
    network: ConvNetConfig = ConvNetConfig()
    condense: CondenseLoopConfig = CondenseLoopConfig()
    evaluate: CondenseEvalConfig = CondenseEvalConfig()
    tracking: TrackingConfig = TrackingConfig()


@dataclass
class CondenseResult:
    images: torch.Tensor  # uint8 (C * ipc, 1, H, W), class-major
    labels: torch.Tensor  # (C * ipc,)
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Network and gradient distance


class ConvNet(nn.Module):
    """DC's ConvNet: ``depth`` x [conv3x3(width) -> instance norm -> ReLU -> avgpool 2], then linear.

    Instance norm as GroupNorm with one group per channel (affine), so nothing depends on the batch.
    Input ``(N, 1, H, W)`` in [0, 1], centred to [-0.5, 0.5] as the paper feeds the Glow range.
    """

    def __init__(self, image_size: int, num_classes: int = 2, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = 1, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(),
                nn.AvgPool2d(2),
            ]
            channels, size = width, size // 2
        if size < 1:
            raise ValueError(
                f"ConvNet of depth {depth} needs images of at least {2**depth} pixels, got {image_size}"
            )
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5).flatten(1))


def gradient_distance(grads_real: list[torch.Tensor], grads_syn: list[torch.Tensor]) -> torch.Tensor:
    """DC's distance: sum over weight tensors and output rows of ``1 - cos`` (1-D tensors skipped)."""
    total = grads_syn[0].new_zeros(())
    for real, syn in zip(grads_real, grads_syn):
        if real.ndim < 2:
            continue
        real, syn = real.flatten(1), syn.flatten(1)
        cos = (real * syn).sum(1) / (real.norm(dim=1) * syn.norm(dim=1) + 1e-6)
        total = total + (1.0 - cos).sum()
    return total


def synthetic_images(logits: torch.Tensor) -> torch.Tensor:
    """``(C, ipc, 1, H, W)`` logits -> 8-bit images, straight-through."""
    return quantize_8bit(torch.sigmoid(logits))


def loss_weights(lam: float, num_classes: int) -> tuple[float, float]:
    """(match, bpd) weights ``10 C/(1+lam)`` and ``2 lam/(1+lam)`` (simplebits-method.md §4.2)."""
    return 10.0 * num_classes / (1.0 + lam), 2.0 * lam / (1.0 + lam)


def image_lr(config: CondenseLoopConfig, iteration: int) -> float:
    """Learning rate of the synthetic images in outer iteration ``iteration`` (0-based)."""
    if config.lr_schedule == "constant":
        return config.lr_images
    return cosine_decay(config.lr_images, iteration / config.iterations)


def _class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    indices = [torch.nonzero(labels == c)[:, 0] for c in range(num_classes)]
    empty = [c for c, idx in enumerate(indices) if len(idx) == 0]
    if empty:
        raise ValueError(f"condensation needs training images of every class; none of class {empty}")
    return indices


def initial_logits(
    images: torch.Tensor, indices: list[torch.Tensor], config: CondenseLoopConfig, generator: torch.Generator
) -> torch.Tensor:
    """``(C, ipc, 1, H, W)`` logits: small noise around grey, or the logits of random real images."""
    h, w = images.shape[-2:]
    if config.init == "noise":
        return config.init_scale * torch.randn(len(indices), config.ipc, 1, h, w, generator=generator)
    picks = [idx[torch.randint(len(idx), (config.ipc,), generator=generator)] for idx in indices]
    real = torch.stack([as_float_images(images[p]) for p in picks])
    return torch.logit(real.clamp(0.02, 0.98))


# --------------------------------------------------------------------------------------------------
# Condensation


def condense(
    images: torch.Tensor,
    labels: torch.Tensor,
    prior: nn.Module,
    config: CondenseConfig,
    lam: float,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    num_classes: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, float]]]:
    """Condense ``images`` (uint8 or [0,1], ``(N,1,H,W)``) into ``ipc`` images per class.

    Returns ``(images uint8 (C*ipc,1,H,W), labels, history)``. Checkpoints (logits, optimiser, iteration,
    RNG) are written every ``max(1, iterations // 10)`` iterations and resumed.
    """
    tracker = tracker or null_tracker()
    device = pick_device(config.device)
    loop = config.condense
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    prior = prior.to(device).eval().requires_grad_(False)
    indices = _class_indices(labels, num_classes)
    logits = initial_logits(images, indices, loop, generator).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=loop.lr_images, betas=(0.5, 0.99), eps=1e-6)
    logits_module = nn.ParameterDict({"logits": logits})  # checkpoint helpers take modules
    start, history = 0, []
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = load_checkpoint(
            checkpoint_path,
            models={"logits": logits_module},
            optimizers={"images": optimizer},
            map_location=device,
        )
        start, history = state["step"], list(state["extra"]["history"])
        log.info("resumed condensation from %s at iteration %d", checkpoint_path, start)
    w_match, w_bpd = loss_weights(lam, num_classes)
    size = int(images.shape[-1])
    syn_labels = torch.arange(num_classes, device=device).repeat_interleave(loop.ipc)
    save_every = max(1, loop.iterations // 10)
    started = time.monotonic()
    for iteration in progress(
        range(start, loop.iterations), desc=f"condense lam={lam:g}", initial=start, total=loop.iterations
    ):
        for group in optimizer.param_groups:
            group["lr"] = image_lr(loop, iteration)
        net = ConvNet(size, num_classes, config.network.width, config.network.depth).to(device)
        net_params = list(net.parameters())
        net_optimizer = torch.optim.SGD(net_params, lr=loop.lr_net, momentum=0.5)
        match_sum, bpd_sum = 0.0, 0.0
        for round_ in range(loop.outer_loop):
            syn = synthetic_images(logits)
            match = logits.new_zeros(())
            for c, idx in enumerate(indices):
                pick = idx[torch.randperm(len(idx), generator=generator)[: loop.batch_real]]
                real = as_float_images(images[pick]).to(device)
                target = torch.full((len(pick),), c, device=device)
                with autocast(device):
                    loss_real = F.cross_entropy(net(real).float(), target)
                grads_real = [g.detach().float() for g in torch.autograd.grad(loss_real, net_params)]
                with autocast(device):
                    loss_syn = F.cross_entropy(
                        net(syn[c]).float(), syn_labels[c * loop.ipc : (c + 1) * loop.ipc]
                    )
                grads_syn = [g.float() for g in torch.autograd.grad(loss_syn, net_params, create_graph=True)]
                match = match + gradient_distance(grads_real, grads_syn)
            loss = w_match * match
            bpd = logits.new_zeros(())
            if w_bpd > 0:
                bpd = bits_per_dim(prior, syn.flatten(0, 1).float(), "uniform").mean()
                if torch.isfinite(bpd):
                    loss = loss + w_bpd * bpd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if torch.isfinite(logits.grad).all():
                optimizer.step()
            match_sum += float(match.detach())
            bpd_sum += float(bpd.detach())
            if round_ < loop.outer_loop - 1:
                train_network(
                    net,
                    net_optimizer,
                    synthetic_images(logits).detach().flatten(0, 1),
                    syn_labels,
                    loop.inner_loop,
                    batch_size=256,
                )
        record = {
            "iteration": iteration + 1,
            "match": match_sum / loop.outer_loop,
            "bpd": bpd_sum / loop.outer_loop,
            "lr_images": image_lr(loop, iteration),
        }
        history.append(record)
        tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=iteration + 1)
        last = iteration + 1 == loop.iterations
        out_of_time = loop.max_minutes is not None and (time.monotonic() - started) / 60 > loop.max_minutes
        if checkpoint_path is not None and ((iteration + 1) % save_every == 0 or last or out_of_time):
            save_checkpoint(
                checkpoint_path,
                models={"logits": logits_module},
                optimizers={"images": optimizer},
                step=iteration + 1,
                extra={"history": history},
            )
        if out_of_time:
            log.info("time budget of %.1f min reached after iteration %d", loop.max_minutes, iteration + 1)
            break
    with torch.no_grad():
        final = torch.round(synthetic_images(logits).flatten(0, 1) * 255).to(torch.uint8).cpu()
    return final, syn_labels.cpu(), history


def train_network(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Plain cross-entropy epochs of ``net`` on ``images`` (uint8 or [0,1]) and ``labels``."""
    device = next(net.parameters()).device
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for batch in order.split(batch_size):
            x = as_float_images(images[batch]).to(device)
            with autocast(device):
                loss = F.cross_entropy(net(x).float(), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval()


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _probabilities(net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    device = next(net.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast(device):
            logits = net(as_float_images(images[start : start + batch_size]).to(device))
        out.append(torch.softmax(logits.float(), 1)[:, 1].cpu())
    return torch.cat(out)


def fresh_network_scores(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    config: CondenseConfig,
    epochs: int,
    networks: int,
    seed: int,
) -> dict[str, float]:
    """Mean, std of val accuracy and AUROC of ``networks`` fresh ConvNets trained on the given set."""
    device = pick_device(config.device)
    ev = config.evaluate
    accs, aucs = [], []
    for k in range(networks):
        torch.manual_seed(seed + k)
        net = ConvNet(int(train_images.shape[-1]), 2, config.network.width, config.network.depth).to(device)
        optimizer = torch.optim.SGD(
            net.parameters(), lr=ev.lr, momentum=ev.momentum, weight_decay=ev.weight_decay
        )
        # DC's schedule: lr x 0.1 after half of the epochs
        half = max(1, epochs // 2)
        generator = torch.Generator().manual_seed(seed + k)
        train_network(net, optimizer, train_images, train_labels, half, ev.batch_size, generator)
        for group in optimizer.param_groups:
            group["lr"] = ev.lr * 0.1
        train_network(net, optimizer, train_images, train_labels, epochs - half, ev.batch_size, generator)
        p = _probabilities(net, val_images)
        accs.append(accuracy(val_labels, p))
        aucs.append(auroc(val_labels, p))
    return {
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "auroc_mean": float(np.nanmean(aucs)) if not all(math.isnan(a) for a in aucs) else math.nan,
        "auroc_std": float(np.nanstd(aucs)) if not all(math.isnan(a) for a in aucs) else math.nan,
    }


def evaluate_condensed(
    condensed: torch.Tensor,
    condensed_labels: torch.Tensor,
    cohort_train: Cohort,
    cohort_val: Cohort,
    prior: nn.Module,
    config: CondenseConfig,
    full_reference: dict[str, float] | None = None,
) -> dict[str, float]:
    """Networks trained on the condensed set vs on the full set, on real validation studies; bpd of both."""
    task = config.task
    ev = config.evaluate
    val_labels = cohort_val.labels(task)
    metrics = {
        f"condensed_{k}": v
        for k, v in fresh_network_scores(
            condensed,
            condensed_labels,
            cohort_val.images,
            val_labels,
            config,
            ev.epochs,
            ev.networks,
            config.seed,
        ).items()
    }
    if full_reference is None:
        full_reference = {
            f"full_{k}": v
            for k, v in fresh_network_scores(
                cohort_train.images,
                cohort_train.labels(task),
                cohort_val.images,
                val_labels,
                config,
                ev.full_epochs,
                ev.networks,
                config.seed,
            ).items()
        }
    metrics.update(full_reference)
    metrics["bpd_condensed"] = float(deterministic_bpd(prior, condensed).mean())
    metrics["bpd_real"] = float(deterministic_bpd(prior, cohort_val.images).mean())
    return metrics


# --------------------------------------------------------------------------------------------------
# The command


def downsample_cohort(cohort: Cohort, size: int | None) -> Cohort:
    """``cohort`` with its images area-averaged to ``size`` x ``size`` (8-bit grid); unchanged if not smaller.

    Area averaging (not strided sampling) so that every real pixel contributes, as a lower-resolution
    acquisition would; the result is rounded back to uint8 so real and condensed images share the grid
    the bpd is defined on.
    """
    height, width = cohort.images.shape[-2:]
    if size is None or (size >= height and size >= width):
        return cohort
    small = F.interpolate(as_float_images(cohort.images), size=(size, size), mode="area")
    images = torch.round(small * 255.0).clamp(0, 255).to(torch.uint8)
    return Cohort(images, cohort.frame, list(cohort.study_ids))


def condense_command(
    ingest_dir: str | Path, out_dir: str | Path, config: CondenseConfig, force: bool = False
) -> list[dict[str, Any]]:
    """``simplebits simplify condense``: one run or a lam sweep (``lam-<v>/`` folders and ``sweep.csv``).

    Per run: ``condensed.npy`` (uint8 ``(C*ipc, H, W)``), ``condensed_labels.npy``, ``metrics.json``.
    Finished runs are skipped unless ``force``; interrupted ones resume from ``checkpoint.pt``.
    """
    task = check_task(config.task)
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    lams = config.condense.lam if isinstance(config.condense.lam, list) else [config.condense.lam]
    is_sweep = isinstance(config.condense.lam, list)
    cohorts = load_task_splits(ingest_dir, task)
    # the evaluation networks see the validation studies at the resolution the set was condensed at
    train, val = (downsample_cohort(cohorts[split], config.condense.image_size) for split in ("train", "val"))
    prior = load_prior(config.prior, device=device)
    tracker = Tracker.from_config(out_dir, config.tracking)
    summaries: list[dict[str, Any]] = []
    full_reference: dict[str, float] | None = None
    for lam in lams:
        run_config = config.model_copy(
            update={"condense": config.condense.model_copy(update={"lam": float(lam)})}
        )
        run_dir = out_dir / f"lam-{lam:g}" if is_sweep else out_dir
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file() and not force:
            log.info("%s exists; skipping lam=%g (use --force to redo)", metrics_path, lam)
            summaries.append(json.loads(metrics_path.read_text()))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(run_config, run_dir)
        with tracker.run(
            f"simplify-condense-{task}-ipc{config.condense.ipc}-lam-{lam:g}",
            params=run_config.model_dump(mode="json"),
            tags={"task": task, "setting": "condense"},
        ):
            images, labels, history = condense(
                train.images,
                train.labels(task),
                prior,
                run_config,
                float(lam),
                tracker,
                checkpoint_path=run_dir / CHECKPOINT_NAME,
            )
            metrics = evaluate_condensed(images, labels, train, val, prior, run_config, full_reference)
            full_reference = {k: v for k, v in metrics.items() if k.startswith("full_")}
            tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if math.isfinite(v)})
            atomic_write_npy(run_dir / "condensed.npy", images[:, 0].numpy())
            atomic_write_npy(run_dir / "condensed_labels.npy", labels.numpy())
            summary = {"task": task, "lam": float(lam), "ipc": config.condense.ipc, **metrics}
            atomic_write_text(metrics_path, json.dumps({**summary, "history": history}, indent=2))
            for name in ("condensed.npy", "condensed_labels.npy", "metrics.json"):
                tracker.log_artifact(run_dir / name)
        summaries.append(summary)
    if is_sweep:
        table = pd.DataFrame([{k: v for k, v in s.items() if k != "history"} for s in summaries])
        atomic_write_text(out_dir / "sweep.csv", table.to_csv(index=False))
    return summaries
