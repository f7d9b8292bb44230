"""SimpleBits setting (b): dataset condensation by gradient matching, with a bpd penalty.

Dataset condensation (Zhao, Mopuri & Bilen, ICLR 2021) as SimpleBits uses it (simplebits-method.md §4):

- the cohort is area-downsampled to ``image_size`` (32, as the paper's MIMIC-CXR condensation) for
  condensation and evaluation alike, batch by batch as images are read (:class:`DownsampledImages`);
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

The outer iterations run on the shared :class:`~pipeline.training.engine.Engine`: one engine epoch is
one outer iteration (one generated step), the synthetic logits are its model, so checkpoint/resume,
the opt-in time cap and MLflow logging are the engine's. Real batches are read from the store per
class and round, never the whole cohort.

Under torchrun the work that scales with the cohort is split, and the algorithm stays the one of a
single process with the same global batch: every rank draws the same real batch of each class (a
generator of the seed and iteration only), reads and back-propagates only its contiguous share of it,
and the per-class real gradients are summed over ranks (each share's summed loss is divided by the
global batch size, so the sum is the global batch's mean gradient). Averaging each rank's *matching
loss* instead would change the objective with the number of ranks: ``1 - cos`` is not linear in the
real gradient. The synthetic side (a few images) is computed on every rank, and the gradient of the
synthetic images is still averaged over ranks so that float differences between devices can never
let the ranks' images drift apart.

Evaluation (:func:`evaluate_condensed`): fresh ConvNets trained on the condensed set only, and on the
full training set for reference (on the engine, DDP over the store), tested on the real validation
studies (accuracy, AUROC) streamed and sharded over ranks.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.dataset import CohortDataset, Images
from pipeline.data.ingest import Cohort, load_task_splits
from pipeline.metrics import accuracy, auroc
from pipeline.models.bpd import glow_input_bpd, quantize_8bit, to_glow_input
from pipeline.prior import load_prior
from pipeline.runtime.atomic import atomic_write_npy, atomic_write_text
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.distributed import (
    all_reduce_mean, all_reduce_sum, barrier, broadcast_object, init_distributed, rank_range, world_info,
)
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import RUN_ID_NAME, Tracker, null_tracker
from pipeline.simplebits.evaluate import MappedImages, as_float_images, deterministic_bpd
from pipeline.training.classifier import TrackingConfig, check_task, fitting_batch_size, predict_proba
from pipeline.training.engine import Engine, StepContext, stream_seed
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
    # opt-in wall-clock cap (checked after each outer iteration, recorded as stopped_iteration): results
    # then depend on the machine's load, so the default runs all iterations
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
    history: list[dict[str, float]] = field(default_factory=list)  # one row per outer iteration
    stopped_iteration: int = 0  # == condense.iterations unless the opt-in time cap stopped the run
    time_capped: bool = False


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
    images: Images, indices: list[torch.Tensor], config: CondenseLoopConfig, generator: torch.Generator
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


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """The random stream of one outer iteration, the same on every rank (not the engine's per-rank one).

    It draws the fresh network, the global real batches, the bpd dequantization noise and the
    inner-loop order, so that every rank condenses the same images as a single process would.
    """
    return torch.Generator().manual_seed(stream_seed(seed, iteration))


def fresh_convnet(config: CondenseConfig, image_size: int, seed: int, num_classes: int = 2) -> ConvNet:
    """A ConvNet with weights drawn from ``seed`` alone (the global torch stream is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConvNet(image_size, num_classes, config.network.width, config.network.depth)


def real_gradients(
    net: nn.Module, images: Images, picks: list[torch.Tensor], device: torch.device
) -> list[list[torch.Tensor]]:
    """Per class, the gradient of the mean cross-entropy over that class's global real batch ``picks[c]``.

    Each rank reads and back-propagates only its contiguous share of every batch (a share may be
    empty); summing the shares' gradients over ranks, each share's loss divided by the global batch
    size, gives the global batch's mean gradient. One all-reduce per call, the same on every rank.
    """
    params = list(net.parameters())
    flat = []
    for c, pick in enumerate(picks):
        mine = rank_range(len(pick))
        share = pick[mine.start : mine.stop]
        if len(share) == 0:
            flat.append(torch.zeros(sum(p.numel() for p in params), device=device))
            continue
        real = as_float_images(images[share]).to(device)
        with autocast(device):
            logits = net(real).float()
        target = torch.full((len(share),), c, device=device)
        loss = F.cross_entropy(logits, target, reduction="sum") / len(pick)
        flat.append(torch.cat([g.detach().float().flatten() for g in torch.autograd.grad(loss, params)]))
    summed = all_reduce_sum(torch.stack(flat))
    return [[g.view_as(p) for g, p in zip(row.split([p.numel() for p in params]), params)] for row in summed]


def matching_loss(
    net: nn.Module, syn: torch.Tensor, syn_labels: torch.Tensor, grads_real: list[list[torch.Tensor]]
) -> torch.Tensor:
    """``sum_c D_c``: synthetic class-``c`` gradients against the real ones (differentiable in ``syn``)."""
    params = list(net.parameters())
    device = syn.device
    ipc = syn.shape[1]
    match = syn.new_zeros(())
    for c, real in enumerate(grads_real):
        with autocast(device):
            loss_syn = F.cross_entropy(net(syn[c]).float(), syn_labels[c * ipc : (c + 1) * ipc])
        grads_syn = [g.float() for g in torch.autograd.grad(loss_syn, params, create_graph=True)]
        match = match + gradient_distance(real, grads_syn)
    return match


def prior_bpd(prior: nn.Module, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean uniform-dequantized bpd of ``images01``, the noise drawn on the CPU from ``generator``."""
    noise = torch.rand(images01.shape, generator=generator).to(images01.device)
    return glow_input_bpd(prior, to_glow_input(images01, noise)).mean()


def condense(
    images: Images,
    labels: torch.Tensor,
    prior: nn.Module,
    config: CondenseConfig,
    lam: float,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    num_classes: int = 2,
) -> CondenseResult:
    """Condense ``images`` (uint8 or [0,1], ``(N,1,H,W)``, read per batch) into ``ipc`` images per class.

    With ``checkpoint_path`` the engine checkpoints after every outer iteration and resumes an existing
    checkpoint. Under torchrun every rank must call this (see the module docstring).
    """
    tracker = tracker or null_tracker()
    device = pick_device(config.device)
    loop = config.condense
    seed_everything(config.seed)
    prior = prior.to(device).eval().requires_grad_(False)
    indices = _class_indices(labels, num_classes)
    start = initial_logits(images, indices, loop, torch.Generator().manual_seed(config.seed))
    synthetic = nn.ParameterDict({"logits": nn.Parameter(start.to(device))})
    logits = synthetic["logits"]
    optimizer = torch.optim.Adam([logits], lr=loop.lr_images, betas=(0.5, 0.99), eps=1e-6)
    w_match, w_bpd = loss_weights(lam, num_classes)
    size = int(images.shape[-1])
    syn_labels = torch.arange(num_classes, device=device).repeat_interleave(loop.ipc)

    def step(iteration: int, ctx: StepContext) -> dict[str, float]:
        lr = image_lr(loop, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = iteration_generator(config.seed, iteration)
        net = fresh_convnet(config, size, int(torch.randint(2**62, (1,), generator=generator)), num_classes)
        net = net.to(device)
        net_optimizer = torch.optim.SGD(net.parameters(), lr=loop.lr_net, momentum=0.5)
        match_sum, bpd_sum = 0.0, 0.0
        for round_ in range(loop.outer_loop):
            picks = [idx[torch.randperm(len(idx), generator=generator)[: loop.batch_real]] for idx in indices]
            grads_real = real_gradients(net, images, picks, device)
            syn = synthetic_images(logits)
            match = matching_loss(net, syn, syn_labels, grads_real)
            loss = w_match * match
            bpd = logits.new_zeros(())
            if w_bpd > 0:
                bpd = prior_bpd(prior, syn.flatten(0, 1).float(), generator)
                if torch.isfinite(bpd):
                    loss = loss + w_bpd * bpd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            logits.grad = all_reduce_mean(logits.grad)
            if torch.isfinite(logits.grad).all():
                optimizer.step()
            match_sum += float(match.detach())
            bpd_sum += float(bpd.detach())
            if round_ < loop.outer_loop - 1:
                train_network(net, net_optimizer, synthetic_images(logits).detach().flatten(0, 1), syn_labels,
                              loop.inner_loop, batch_size=256, generator=generator)
        return {"match": match_sum / loop.outer_loop, "bpd": bpd_sum / loop.outer_loop, "lr_images": lr}

    engine = Engine(
        f"condense lam={lam:g}", epochs=loop.iterations, seed=config.seed, device=device,
        models={"logits": synthetic}, optimizers={"images": optimizer}, checkpoint_path=checkpoint_path,
        tracker=tracker, max_minutes=loop.max_minutes, log_every_steps=None,
    )
    # one engine epoch = one outer iteration = one generated step
    run = engine.fit(step, batches=lambda epoch, ctx: [epoch], steps_per_epoch=1)
    with torch.no_grad():
        final = torch.round(synthetic_images(logits).flatten(0, 1) * 255).to(torch.uint8).cpu()
    history = [{"iteration": row["epoch"],
                **{key.removeprefix("train_"): value for key, value in row.items() if key != "epoch"}}
               for row in run.history]
    return CondenseResult(final, syn_labels.cpu(), history, run.stopped_epoch, run.time_capped)


def train_network(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Plain cross-entropy epochs of ``net`` on a synthetic set held in memory (uint8 or [0,1]).

    Only for the few condensed images (the inner loop, and the networks that evaluate a condensed
    set); it runs in this process alone. Networks trained on the cohort use the engine.
    """
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


def evaluation_lr(config: CondenseEvalConfig, epoch: int, epochs: int) -> float:
    """DC's schedule for the evaluation networks: ``lr``, times 0.1 from half of the epochs on."""
    return config.lr if epoch < max(1, epochs // 2) else config.lr * 0.1


def evaluation_optimizer(net: nn.Module, config: CondenseEvalConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def train_on_condensed(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: CondenseEvalConfig,
                       epochs: int, seed: int) -> nn.Module:
    """A network trained on the condensed set, replicated on every rank (same seed: same network)."""
    optimizer = evaluation_optimizer(net, config)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = evaluation_lr(config, epoch, epochs)
        train_network(net, optimizer, images, labels, 1, config.batch_size, generator)
    return net


def train_on_cohort(net: nn.Module, images: Images, labels: torch.Tensor, config: CondenseEvalConfig,
                    epochs: int, seed: int) -> nn.Module:
    """A reference network trained on the real training set on the engine (DDP under torchrun)."""
    device = next(net.parameters()).device
    world = world_info()[1]
    model: nn.Module = DistributedDataParallel(net) if world > 1 else net
    optimizer = evaluation_optimizer(net, config)

    def step(batch: list[torch.Tensor], ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y, _ = batch
        for group in optimizer.param_groups:
            group["lr"] = evaluation_lr(config, ctx.epoch, epochs)
        with autocast(device):
            loss = F.cross_entropy(model(as_float_images(x).to(device)).float(), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"ce": loss.detach()}

    engine = Engine("condense reference network", epochs=epochs, seed=seed, device=device,
                    models={"net": net}, optimizers={"sgd": optimizer}, log_every_steps=None)
    engine.fit(step, dataset=CohortDataset(images, labels),
               batch_size=fitting_batch_size(config.batch_size, len(labels), world))
    return net.eval()


def fresh_network_scores(
    train_images: Images,
    train_labels: torch.Tensor,
    val_images: Images,
    val_labels: torch.Tensor,
    config: CondenseConfig,
    epochs: int,
    networks: int,
    seed: int,
    on_cohort: bool = False,
) -> dict[str, float]:
    """Mean, std of val accuracy and AUROC of ``networks`` fresh ConvNets trained on the given set.

    ``on_cohort``: the training set is the (lazy, large) cohort, trained on the engine; else a
    condensed set in memory. The validation studies are scored in batches, sharded over ranks.
    """
    device = pick_device(config.device)
    ev = config.evaluate
    train = train_on_cohort if on_cohort else train_on_condensed
    accs, aucs = [], []
    for k in range(networks):
        net = fresh_convnet(config, int(train_images.shape[-1]), seed + k).to(device)
        net = train(net, train_images, train_labels, ev, epochs, seed + k)
        p = predict_proba(net, val_images, device, ev.batch_size, sharded=True)
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
    """Networks trained on the condensed set vs on the full set, on real validation studies; bpd of both.

    Every rank must call this under torchrun; the validation split is streamed from the store.
    """
    task = config.task
    ev = config.evaluate
    val_labels = cohort_val.labels(task)
    condensed_scores = fresh_network_scores(condensed, condensed_labels, cohort_val.images, val_labels,
                                            config, ev.epochs, ev.networks, config.seed)
    metrics = {f"condensed_{k}": v for k, v in condensed_scores.items()}
    if full_reference is None:
        full_scores = fresh_network_scores(cohort_train.images, cohort_train.labels(task), cohort_val.images,
                                           val_labels, config, ev.full_epochs, ev.networks, config.seed,
                                           on_cohort=True)
        full_reference = {f"full_{k}": v for k, v in full_scores.items()}
    metrics.update(full_reference)
    metrics["bpd_condensed"] = float(deterministic_bpd(prior, condensed, sharded=True).mean())
    metrics["bpd_real"] = float(deterministic_bpd(prior, cohort_val.images, sharded=True).mean())
    return metrics


# --------------------------------------------------------------------------------------------------
# The command


def area_downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(n, 1, H, W)`` -> uint8 ``(n, 1, size, size)``, area-averaged and rounded to the 8-bit grid."""
    small = F.interpolate(as_float_images(images), size=(size, size), mode="area")
    return torch.round(small * 255.0).clamp(0, 255).to(torch.uint8)


class DownsampledImages(MappedImages):
    """A lazy view of uint8 images ``(N, 1, H, W)`` at ``size`` x ``size``: rows are read, then downsampled.

    A :class:`~pipeline.simplebits.evaluate.MappedImages` whose transform changes the image size, so
    its shape is its own; training and scoring stream through it without the cohort ever being held
    at either resolution.
    """

    def __init__(self, images: Images, size: int) -> None:
        super().__init__(images, functools.partial(area_downsample, size=int(size)))
        self.side = int(size)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.images), 1, self.side, self.side))

    def subset(self, positions) -> DownsampledImages:
        return DownsampledImages(super().subset(positions).images, self.side)


def downsample_cohort(cohort: Cohort, size: int | None) -> Cohort:
    """``cohort`` with its images area-averaged to ``size`` x ``size`` (8-bit grid); unchanged if not smaller.

    Area averaging (not strided sampling) so that every real pixel contributes, as a lower-resolution
    acquisition would; the result is rounded back to uint8 so real and condensed images share the grid
    the bpd is defined on. The images are downsampled lazily, batch by batch as they are read.
    """
    height, width = cohort.images.shape[-2:]
    if size is None or (size >= height and size >= width):
        return cohort
    return Cohort(DownsampledImages(cohort.images, size), cohort.frame, list(cohort.study_ids))


def condense_command(
    ingest_dir: str | Path, out_dir: str | Path, config: CondenseConfig, force: bool = False
) -> list[dict[str, Any]]:
    """``simplebits simplify condense``: one run or a lam sweep (``lam-<v>/`` folders and ``sweep.csv``).

    Per run: ``condensed.npy`` (uint8 ``(C*ipc, H, W)``), ``condensed_labels.npy``, ``metrics.json``.
    Finished runs are skipped unless ``force``; interrupted ones resume from ``checkpoint.pt`` (and
    their MLflow run). Under torchrun every rank runs all of it; rank 0 writes.
    """
    task = check_task(config.task)
    out_dir = Path(out_dir)
    context = init_distributed(config.device)
    lams = config.condense.lam if isinstance(config.condense.lam, list) else [config.condense.lam]
    is_sweep = isinstance(config.condense.lam, list)
    cohorts = load_task_splits(ingest_dir, task)
    # the evaluation networks see the validation studies at the resolution the set was condensed at
    train, val = (downsample_cohort(cohorts[split], config.condense.image_size) for split in ("train", "val"))
    prior = load_prior(config.prior, device=context.device)
    tracker = Tracker.from_config(out_dir, config.tracking, enabled=context.is_main)
    summaries: list[dict[str, Any]] = []
    full_reference: dict[str, float] | None = None
    for lam in lams:
        run_config = config.model_copy(
            update={"condense": config.condense.model_copy(update={"lam": float(lam)})}
        )
        run_dir = out_dir / f"lam-{lam:g}" if is_sweep else out_dir
        metrics_path = run_dir / "metrics.json"
        if broadcast_object(metrics_path.is_file()) and not force:  # rank 0 decides: one answer for all
            log.info("%s exists; skipping lam=%g (use --force to redo)", metrics_path, lam)
            summaries.append(json.loads(metrics_path.read_text()))
            continue
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(run_config, run_dir)
        with tracker.run(
            f"simplify-condense-{task}-ipc{config.condense.ipc}-lam-{lam:g}",
            params=run_config.model_dump(mode="json"),
            tags={"task": task, "setting": "condense"},
            resume_file=run_dir / RUN_ID_NAME,
        ):
            result = condense(train.images, train.labels(task), prior, run_config, float(lam), tracker,
                              checkpoint_path=run_dir / CHECKPOINT_NAME)
            metrics = evaluate_condensed(result.images, result.labels, train, val, prior, run_config,
                                         full_reference)
            full_reference = {k: v for k, v in metrics.items() if k.startswith("full_")}
            tracker.log_metrics({f"final_{k}": v for k, v in metrics.items() if math.isfinite(v)})
            summary = {"task": task, "lam": float(lam), "ipc": config.condense.ipc, **metrics,
                       "stopped_iteration": result.stopped_iteration, "time_capped": result.time_capped}
            if context.is_main:
                write_condensed(run_dir, result, summary, tracker)
        summaries.append(summary)
    if is_sweep and context.is_main:
        table = pd.DataFrame([{k: v for k, v in s.items() if k != "history"} for s in summaries])
        atomic_write_text(out_dir / "sweep.csv", table.to_csv(index=False))
    barrier()
    return summaries


def write_condensed(run_dir: Path, result: CondenseResult, summary: dict[str, Any], tracker: Tracker) -> None:
    """The run's files (rank 0): condensed images and labels, metrics with the per-iteration history."""
    atomic_write_npy(run_dir / "condensed.npy", result.images[:, 0].numpy())
    atomic_write_npy(run_dir / "condensed_labels.npy", result.labels.numpy())
    atomic_write_text(run_dir / "metrics.json", json.dumps({**summary, "history": result.history}, indent=2))
    for name in ("condensed.npy", "condensed_labels.npy", "metrics.json"):
        tracker.log_artifact(run_dir / name)
