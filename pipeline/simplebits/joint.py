"""SimpleBits setting (a): train a simplifier jointly with the classifier (Gen-1 one-step look-ahead).

Per mini-batch ``(x, y)`` (simplebits-method.md §3.1.1):

1. ``x~ = S(x)``; ``L_before = CE(f_theta(x~), y)``.
2. ``theta' = theta - AdamW_step(grad L_before)``: one *differentiable* step of the classifier's own
   AdamW optimiser, with its current moment estimates and step count (the paper uses ``higher``'s
   differentiable AdamW; here :func:`lookahead_adamw` over ``torch.func.functional_call``).
   ``theta'`` depends on ``x~`` through the gradient, so the losses below reach the simplifier at
   second order; ``theta`` itself receives nothing from this step.
3. ``L_simple = CE(f_theta'(x~), y)``; ``l_i = CE(f_theta'(x_i), y_i)``; ``L_orig = mean l_i``. Dropout
   masks are replayed, so the pre- and post-step passes differ only by the parameters.
4. Gate ``w_i = clamp((tau - l_i) / tau, 0, 1)`` (detached): bits are only charged on examples the
   looked-ahead classifier already gets right on the *original* image.
5. ``L_bpd = sum_i w_i bpd(x~_i) / B`` under the frozen prior (uniform dequantisation).
6. ``L_S = (L_before + L_simple + 10 L_orig + lam L_bpd) / (12 + lam)``; one simplifier Adam step,
   skipped when a loss or gradient is non-finite.
7. The classifier takes one AdamW step on the *simplified* images only (no gradient to S);
   optionally also on the originals (``simplify.train_classifier_on_originals``).

Training runs on the shared :class:`~pipeline.training.engine.Engine` (sampling, equal steps per
rank, checkpoint/resume, MLflow). Under torchrun every rank holds the full models (same seed, same
initialisation), takes its part of each global batch and averages gradients with an all-reduce
before each optimiser step; DistributedDataParallel is not used because its hooks do not see
gradients taken with ``torch.autograd.grad`` through ``functional_call``, which the look-ahead needs.
The look-ahead step itself is taken on the gradient of the *global* batch (a differentiable
all-reduce, :func:`mean_over_ranks`), and augmentation and dequantisation noise are drawn per sample,
so two ranks compute what one process computes on the same global batch (up to float summation
order; dropout masks, if the classifier has dropout, come from each rank's own stream).

Outputs stream: simplified images go straight into a cohort store (``simplified/``), and only
per-study scalars (probabilities, bpd) are held in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.dataset import CohortDataset, Images
from pipeline.data.ingest import Cohort, load_task_splits
from pipeline.data.store import StoredImages
from pipeline.models.bpd import dequantization_offsets, glow_input_bpd, to_glow_input
from pipeline.models.classifiers import create_classifier, load_classifier, save_classifier
from pipeline.models.simplifier import Simplifier, create_simplifier, save_simplifier
from pipeline.prior import load_prior
from pipeline.runtime.atomic import atomic_write_text
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.distributed import (
    all_reduce_mean,
    broadcast_object,
    init_distributed,
    is_main_process,
    world_info,
)
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import RUN_ID_NAME, Tracker
from pipeline.simplebits.evaluate import classification_summary, deterministic_bpd
from pipeline.simplebits.outcomes import (
    IndependentConfig,
    OutcomesConfig,
    independent_classifier,
    independent_scores,
    output_store,
    retrain_config,
    split_outcomes,
    validation_extras,
    write_images,
    writes_done,
)
from pipeline.training.classifier import (
    AugmentConfig,
    ModelConfig,
    TrackingConfig,
    check_task,
    fitting_batch_size,
    predict_proba,
    random_affine,
    to_unit_range,
    weight_decay_groups,
)
from pipeline.training.clipping import PercentileClip
from pipeline.training.engine import Engine, StepContext, score_batches

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
SIMPLIFIED_DIR = "simplified"  # store of the reported splits' simplified images (read by the report)
SIMPLIFIED_TRAIN_DIR = "simplified_train"  # scratch store for retrain-on-simplified, removed after use


class SimplifierConfig(StrictModel):
    base_channels: int = 16
    levels: int = 4
    max_channels: int = 128
    # scale_space: per-pixel weights over Gaussian blurs of the logit image plus a residual; logit: the
    # paper's residual alone; additive: in intensity space (models/simplifier.py)
    mode: Literal["scale_space", "logit", "additive"] = "scale_space"
    eps: float = 0.05
    init: Literal["zero_head", "zero_alpha"] = "zero_head"  # both start as the identity (models/simplifier.py)
    scales: list[float] = [1.0, 2.0, 4.0, 8.0]  # scale_space blur sigmas, pixels of a 64 px image


class ObjectiveConfig(StrictModel):
    """The ``simplify`` section: the trade-off and the look-ahead objective."""

    # a list runs a sweep, one sub-folder per value. Demo cohort, scale_space, 10 epochs from the trained
    # classifier, independent check (ResNet-18/4) on the simplified images relative to its own AUROC:
    # lam 0.5: bpd 4.06 -> 1.99, 0.92x; lam 1: 1.70, 0.87x; lam 2: 1.48-1.72, 0.79-0.92x; lam 4: 1.37, 0.84x
    lam: float | list[float] = 0.5
    tau: float = 0.1  # gate threshold on the looked-ahead CE of the original image
    orig_weight: float = 10.0
    lookahead: bool = True  # False: L_simple/L_orig use theta itself (ablation; L_orig then ignores S)
    train_classifier_on_originals: bool = False


class JointTrainConfig(StrictModel):
    epochs: int = 10
    batch_size: int = 32
    # paper 5e-4 for both over 100 epochs; 2e-3 / 3e-3 (for short CPU runs) made the scale_space
    # simplifier diverge at lam 8 (bpd 313 after one epoch) and drifted the classifier off its originals
    classifier_lr: float = 5e-4
    classifier_betas: tuple[float, float] = (0.9, 0.995)
    classifier_weight_decay: float = 1e-5
    simplifier_lr: float = 1e-3
    simplifier_betas: tuple[float, float] = (0.5, 0.99)
    simplifier_weight_decay: float = 5e-5
    # clip each optimiser's gradient norm to this percentile of its last 400 norms (authors' HEAD: 80);
    # null: no clipping
    clip_percentile: float | None = 80.0
    eval_batch_size: int = 128
    # opt-in wall-clock cap (stop after the epoch that crosses it; recorded as stopped_epoch): results
    # then depend on the machine's load, so the default trains the configured epochs
    max_minutes: float | None = None
    num_workers: int = 0  # DataLoader processes reading the store
    checkpoint_every_steps: int | None = None  # also checkpoint mid-epoch (long epochs at cohort scale)


class JointOutcomesConfig(OutcomesConfig):
    # the classifier trained jointly has only seen simplified images, so the fair comparison with the
    # baselines is retraining a fresh network on each (the paper's protocol): on by default here
    retrain: bool = True


class JointConfig(StrictModel):
    task: str = "effusion"
    seed: int = 0
    device: str = "auto"
    prior: str | None = None  # None: the shipped prior
    classifier: ModelConfig = ModelConfig(kwargs={"stem_stride": 2, "dropout": 0.0})
    # weights of the same network trained on originals (classify train's model.safetensors): the bpd
    # gate then opens from the first epoch, which short CPU runs need; None trains f from scratch (paper)
    classifier_init: str | None = None
    # adapter fields over classifier_init's side-car (pipeline/models/adapter.py); a file without a
    # side-car gets none but these (never the package's own normalisation)
    classifier_adapter: dict[str, Any] = {}
    simplifier: SimplifierConfig = SimplifierConfig()
    simplify: ObjectiveConfig = ObjectiveConfig()
    train: JointTrainConfig = JointTrainConfig()
    augment: AugmentConfig = AugmentConfig()
    independent: IndependentConfig = IndependentConfig()
    evaluate: JointOutcomesConfig = JointOutcomesConfig()
    tracking: TrackingConfig = TrackingConfig()


@dataclass
class JointResult:
    simplifier: Simplifier
    classifier: nn.Module
    metrics: dict[str, float]  # the last epoch's train_* and val_* metrics
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_epoch: int = 0  # epochs trained (fewer than configured only under the opt-in time cap)


# --------------------------------------------------------------------------------------------------
# The objective


def lookahead_adamw(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None],
                    optimizer: torch.optim.AdamW, names: dict[nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """``theta'`` after one AdamW step from the optimiser's current state, differentiable in ``grads``.

    Same update as ``torch.optim.AdamW`` (decoupled weight decay, bias-corrected moments); the only
    change is ``sqrt(v + 1e-20)``: exact zeros in ``v`` would otherwise give an infinite derivative.
    """
    updated = dict(params)
    for group in optimizer.param_groups:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for param in group["params"]:
            name = names[param]
            grad = grads.get(name)
            if grad is None:
                continue
            state = optimizer.state.get(param, {})
            step = float(state["step"]) + 1 if "step" in state else 1.0
            exp_avg = state.get("exp_avg", torch.zeros_like(param)).detach()
            exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(param)).detach()
            exp_avg = beta1 * exp_avg + (1 - beta1) * grad
            exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
            m_hat = exp_avg / (1 - beta1**step)
            v_hat = exp_avg_sq / (1 - beta2**step)
            updated[name] = params[name] * (1 - lr * weight_decay) - lr * m_hat / (torch.sqrt(v_hat + 1e-20) + eps)
    return updated


class _MeanOverRanks(torch.autograd.Function):
    """All-reduce mean whose backward is the all-reduce mean of the incoming gradients.

    Forward ``y = mean_r x_r``, the same on every rank. Every rank's loss depends on ``y`` and ``y``
    on every rank's ``x_r``, so the gradient that reaches ``x_r`` is the mean over ranks of the
    gradients arriving at ``y``. Averaging the ranks' local results (:func:`apply_gradients`) then
    gives exactly the gradient of the mean loss, as in one process with the whole batch.
    """

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(flat)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_mean(grad)


def mean_over_ranks(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Differentiable mean of ``tensors`` over DDP ranks (identity in a single process).

    One all-reduce of all of them flattened, so every rank runs exactly one collective here and one
    in the backward, in the same order. Which entries are None must agree across ranks (it does for
    gradients: it is a property of the network, not of the batch).
    """
    present = [t for t in tensors if t is not None]
    if world_info()[1] == 1 or not present:
        return tensors
    flat = _MeanOverRanks.apply(torch.cat([t.reshape(-1) for t in present]))
    parts = iter(flat.split([t.numel() for t in present]))
    return [None if t is None else next(parts).view_as(t) for t in tensors]


@contextlib.contextmanager
def replayed_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with a fixed RNG seed (same dropout masks) without disturbing the global stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def gate_weights(losses_orig: torch.Tensor, tau: float) -> torch.Tensor:
    """``clamp((tau - l_i) / tau, 0, 1)``, detached: full bpd weight only for confidently right examples."""
    return ((tau - losses_orig.detach()) / tau).clamp(0.0, 1.0)


def simplifier_losses(
    simplifier: nn.Module,
    classifier: nn.Module,
    classifier_optimizer: torch.optim.AdamW,
    prior: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: ObjectiveConfig,
    lam: float,
    seed: int,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All terms of the Gen-1 simplifier objective for one batch; ``"total"`` is ``L_S``.

    ``seed``: the replayed dropout masks. ``noise``: the uniform dequantisation offsets of the bpd
    term, shaped like ``x`` (:func:`dequantization_noise`); None draws them from the global stream.
    Under torchrun the look-ahead step uses the gradient of the global batch (:func:`mean_over_ranks`).
    """
    device = x.device
    params = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    names = {p: n for n, p in params.items()}
    x_simple = simplifier(x)
    with replayed_randomness(seed, device), autocast(device):
        logits_before = functional_call(classifier, params, (x_simple,))
    loss_before = F.cross_entropy(logits_before.float(), y)
    if objective.lookahead:
        grads = torch.autograd.grad(loss_before, list(params.values()), create_graph=True, allow_unused=True)
        after = lookahead_adamw(params, dict(zip(params, mean_over_ranks(list(grads)))), classifier_optimizer,
                                names)
    else:
        after = {n: p.detach() for n, p in params.items()}
    with replayed_randomness(seed, device), autocast(device):
        logits_simple = functional_call(classifier, after, (x_simple,))
    with replayed_randomness(seed, device), autocast(device):
        logits_orig = functional_call(classifier, after, (x,))
    loss_simple = F.cross_entropy(logits_simple.float(), y)
    losses_orig = F.cross_entropy(logits_orig.float(), y, reduction="none")
    weights = gate_weights(losses_orig, objective.tau)
    loss_bpd = x.new_zeros(())
    gated = weights > 0
    if lam > 0 and bool(gated.any()):
        # fp32 outside autocast: Glow log-determinants are too delicate for bf16
        x_gated = x_simple[gated].float()
        u = dequantization_offsets(x_gated, "uniform") if noise is None else noise[gated].to(x_gated)
        bpd = glow_input_bpd(prior, to_glow_input(x_gated, u))
        loss_bpd = (weights[gated] * bpd).sum() / x.shape[0]
    total = (loss_before + loss_simple + objective.orig_weight * losses_orig.mean() + lam * loss_bpd) / (
        2.0 + objective.orig_weight + lam)
    return {"total": total, "before": loss_before, "simple": loss_simple, "orig": losses_orig.mean(),
            "bpd": loss_bpd, "gate": weights.mean()}


def dequantization_noise(ctx: StepContext, positions: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Uniform dequantisation offsets ``(B, *shape)`` for the bpd term, one stream per sample: a sample
    gets the same noise whichever rank takes it, so two ranks and one process with the same global
    batch compute the same ``L_bpd``."""
    return torch.stack([torch.rand(tuple(shape), generator=g) for g in ctx.sample_generators(positions)])


def average_gradients(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Mean over DDP ranks (no-op in a single process)."""
    return [None if g is None else all_reduce_mean(g) for g in grads]


def all_finite(tensors: list[torch.Tensor | None]) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def apply_gradients(params: list[nn.Parameter], grads: list[torch.Tensor | None],
                    optimizer: torch.optim.Optimizer, clip: PercentileClip | None = None) -> bool:
    """Average over ranks, clip, then step unless any gradient is non-finite; returns whether it stepped.

    Every rank must call this at every step (the engine gives all ranks equal steps): the average is
    a collective. A non-finite gradient on one rank makes the average non-finite on all, so all skip.
    """
    grads = average_gradients(grads)
    if not all_finite(grads):
        return False
    if clip is not None:
        grads = clip(grads)
    for param, grad in zip(params, grads):
        param.grad = None if grad is None else grad.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def joint_step(
    simplifier: nn.Module,
    classifier: nn.Module,
    simplifier_optimizer: torch.optim.Optimizer,
    classifier_optimizer: torch.optim.AdamW,
    prior: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: ObjectiveConfig,
    lam: float,
    seed: int,
    clips: dict[str, PercentileClip] | None = None,
    noise: torch.Tensor | None = None,
) -> dict[str, float]:
    """One simplifier step on ``L_S``, then one classifier step on the simplified batch.

    ``clips``: optional ``{"simplifier", "classifier"}`` percentile clippers (train.clip_percentile).
    ``seed``, ``noise``: see :func:`simplifier_losses`.
    """
    clips = clips or {}
    device = x.device
    losses = simplifier_losses(simplifier, classifier, classifier_optimizer, prior, x, y, objective, lam,
                               seed, noise)
    simplifier_params = list(simplifier.parameters())
    grads = torch.autograd.grad(losses["total"], simplifier_params, allow_unused=True)
    # always through apply_gradients: its all-reduce must run on every rank, finite or not
    simplifier_stepped = apply_gradients(simplifier_params, list(grads), simplifier_optimizer,
                                         clips.get("simplifier"))

    with torch.no_grad():
        x_simple = simplifier(x)
    with autocast(device):
        loss = F.cross_entropy(classifier(x_simple).float(), y)
        if objective.train_classifier_on_originals:
            loss = 0.5 * (loss + F.cross_entropy(classifier(x).float(), y))
    classifier_params = [p for p in classifier.parameters() if p.requires_grad]
    classifier_grads = torch.autograd.grad(loss, classifier_params, allow_unused=True)
    classifier_stepped = apply_gradients(classifier_params, list(classifier_grads), classifier_optimizer,
                                         clips.get("classifier"))
    return {"ce_simpl": float(losses["before"].detach()), "ce_orig": float(losses["orig"].detach()),
            "bpd_loss": float(losses["bpd"].detach()), "gate": float(losses["gate"].detach()),
            # per-epoch means: the fraction of steps each optimiser skipped (non-finite gradients)
            "skipped_simplifier": float(not simplifier_stepped),
            "skipped_classifier": float(not classifier_stepped)}


# --------------------------------------------------------------------------------------------------
# Evaluation: batch by batch, each rank its share; only per-study scalars are gathered


@contextlib.contextmanager
def evaluation_mode(*models: nn.Module) -> Iterator[None]:
    """Models in eval mode for a block, then back in the mode they were in (training resumes)."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


@torch.no_grad()
def simplify_batch(simplifier: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Simplified images as CPU uint8 ``(B,1,H,W)``: exactly the 8-bit grid the simplifier outputs.

    The simplifier must be in eval mode (:func:`evaluation_mode`). As ``partial(simplify_batch,
    simplifier, device=device)`` it is the ``Simplify`` of pipeline/simplebits/outcomes.py.
    """
    return torch.round(simplifier(to_unit_range(batch.to(device))) * 255).to(torch.uint8).cpu()


def joint_scores(
    simplifier: nn.Module,
    classifier: nn.Module,
    prior: nn.Module,
    images: Images,
    device: torch.device,
    batch_size: int = 128,
    bpd_orig: torch.Tensor | None = None,
    target: StoredImages | None = None,
) -> dict[str, torch.Tensor]:
    """``p_orig, p_simpl, bpd_orig, bpd_simpl`` (midpoint) per study, in cohort order, on every rank.

    Each rank simplifies and scores its share batch by batch (every rank must call this). ``target``:
    slots aligned with ``images`` that receive the simplified images (each rank writes its share; the
    caller waits for all shares, :func:`writes_done`, before reading them back). ``bpd_orig``: already known (it does not change while
    the simplifier trains).
    """

    def score(positions: np.ndarray, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        simplified = simplify_batch(simplifier, batch, device)
        if target is not None:
            write_images(target, positions, simplified)
        out = {"p_orig": predict_proba(classifier, batch, device, len(batch)),
               "p_simpl": predict_proba(classifier, simplified, device, len(batch)),
               "bpd_simpl": deterministic_bpd(prior, simplified, len(batch))}
        if bpd_orig is None:
            out["bpd_orig"] = deterministic_bpd(prior, batch, len(batch))
        return out

    with evaluation_mode(simplifier, classifier):
        scores = score_batches(images, score, batch_size)
    if bpd_orig is not None:
        scores["bpd_orig"] = bpd_orig
    return scores


def evaluate_joint(
    simplifier: nn.Module,
    classifier: nn.Module,
    prior: nn.Module,
    images: Images,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int = 128,
    bpd_orig: torch.Tensor | None = None,
    target: StoredImages | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics on originals vs simplified images, and the per-study scores (:func:`joint_scores`)."""
    scores = joint_scores(simplifier, classifier, prior, images, device, batch_size, bpd_orig, target)
    metrics = {**classification_summary(labels, scores["p_orig"], scores["p_simpl"]),
               "bpd_orig": float(scores["bpd_orig"].mean()), "bpd_simpl": float(scores["bpd_simpl"].mean())}
    return metrics, scores


# --------------------------------------------------------------------------------------------------
# Training


def _single_lambda(config: JointConfig) -> float:
    if isinstance(config.simplify.lam, list):
        raise ValueError("train_joint takes one simplify.lam; use run_joint/sweep for a list")
    return float(config.simplify.lam)


def joint_models(config: JointConfig, device: torch.device) -> tuple[Simplifier, nn.Module]:
    """The simplifier (identity at start) and the classifier (``classifier_init`` or random), seeded."""
    seed_everything(config.seed)
    simplifier = create_simplifier(**config.simplifier.model_dump()).to(device)
    if config.classifier_init is not None:
        # the configured network, with classifier_init's weights (any key prefix) and adapter
        classifier = load_classifier(config.classifier_init, config.classifier.name, config.classifier.kwargs,
                                     config.classifier_adapter, task=config.task, trainable=True)
    else:
        classifier = create_classifier(config.classifier.name, **config.classifier.kwargs)
        log.warning("joint training from a random classifier (no classifier_init): bits are charged only "
                    "where its cross-entropy on originals is below 0.1, which a short run may never reach "
                    "(on an H100, 8 of 10 epochs had a closed gate and bpd rose to 12-51); pass "
                    "--classifier-init <classify train's model.safetensors>")
    return simplifier, classifier.to(device)


def train_joint(
    cohort_train: Cohort,
    cohort_val: Cohort,
    prior: nn.Module,
    config: JointConfig,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
) -> JointResult:
    """Train simplifier and classifier together on ``cohort_train``; evaluate on ``cohort_val`` per epoch.

    ``prior`` is the frozen Glow (moved to the training device here). With ``checkpoint_path`` the
    engine checkpoints both models, both optimisers and the clippers, and resumes an existing
    checkpoint. Under torchrun every rank calls this (``train.batch_size`` is the global batch).
    """
    task = check_task(config.task)
    lam = _single_lambda(config)
    device = pick_device(config.device)
    train_cfg = config.train
    prior = prior.to(device).eval().requires_grad_(False)
    simplifier, classifier = joint_models(config, device)
    simplifier_optimizer = torch.optim.Adam(simplifier.parameters(), lr=train_cfg.simplifier_lr,
                                            betas=train_cfg.simplifier_betas,
                                            weight_decay=train_cfg.simplifier_weight_decay)
    classifier_optimizer = torch.optim.AdamW(weight_decay_groups(classifier, train_cfg.classifier_weight_decay),
                                             lr=train_cfg.classifier_lr, betas=train_cfg.classifier_betas)
    clips = ({name: PercentileClip(train_cfg.clip_percentile) for name in ("simplifier", "classifier")}
             if train_cfg.clip_percentile is not None else {})
    engine = Engine(
        f"joint lam={lam:g}", epochs=train_cfg.epochs, seed=config.seed, device=device,
        models={"simplifier": simplifier, "classifier": classifier},
        optimizers={"simplifier": simplifier_optimizer, "classifier": classifier_optimizer},
        state=dict(clips), checkpoint_path=checkpoint_path, tracker=tracker,
        max_minutes=train_cfg.max_minutes, checkpoint_every_steps=train_cfg.checkpoint_every_steps,
        num_workers=train_cfg.num_workers,
    )

    def step(batch: list[torch.Tensor], ctx: StepContext) -> dict[str, float]:
        images, labels, positions = batch
        x = to_unit_range(images.to(device))
        if config.augment.enabled:
            x = random_affine(x, config.augment, uniforms=ctx.uniform(positions, 4))
        dropout_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        noise = dequantization_noise(ctx, positions, x.shape[1:]).to(device)
        return joint_step(simplifier, classifier, simplifier_optimizer, classifier_optimizer, prior, x,
                          labels.to(device), config.simplify, lam, dropout_seed, clips, noise)

    val_labels = cohort_val.labels(task)
    val_bpd_orig = deterministic_bpd(prior, cohort_val.images, train_cfg.eval_batch_size, sharded=True)

    def evaluate(epoch: int) -> dict[str, float]:
        metrics, _ = evaluate_joint(simplifier, classifier, prior, cohort_val.images, val_labels, device,
                                    train_cfg.eval_batch_size, bpd_orig=val_bpd_orig)
        return {f"val_{k}": v for k, v in metrics.items()}

    train_labels = cohort_train.labels(task)
    batch_size = fitting_batch_size(train_cfg.batch_size, len(train_labels), engine.world_size)
    run = engine.fit(step, dataset=CohortDataset(cohort_train.images, train_labels), batch_size=batch_size,
                     evaluate=evaluate)
    return JointResult(simplifier=simplifier.eval(), classifier=classifier.eval(), metrics=run.last,
                       history=run.history, stopped_epoch=run.stopped_epoch)


# --------------------------------------------------------------------------------------------------
# Outputs and the command


def reported_splits(cohorts: dict[str, Cohort]) -> dict[str, Cohort]:
    """The splits whose studies get scores and simplified images: all but train, if not empty."""
    return {split: cohort for split, cohort in cohorts.items() if split != "train" and len(cohort)}


def save_joint_outputs(result: JointResult, cohorts: dict[str, Cohort], prior: nn.Module, out_dir: str | Path,
                       config: JointConfig, mask_dir: str | Path | None = None,
                       independent: nn.Module | None = None) -> dict[str, Any]:
    """Weights, ``predictions.csv``, the ``simplified/`` store and ``metrics.json``; returns the summary.

    ``cohorts``: ``train`` (for retraining) plus the splits to report (usually val and test). The
    validation split also gets ``baselines.csv`` (matched bpd) and, with ``mask_dir`` (the demo cohort's
    ``masks/``), distractor and sign retention (pipeline/simplebits/outcomes.py); ``independent`` (the
    check classifier, trained on originals) scores originals vs simplified images.

    Every rank calls this and scores its share of each split (the summary is returned on every
    rank); only rank 0 writes files. ``metrics.json`` is written last: it marks the run finished.
    """
    out_dir = Path(out_dir)
    task, lam = config.task, _single_lambda(config)
    reported = reported_splits(cohorts)
    size = next(iter(cohorts.values())).image_size
    reported_ids = [study_id for cohort in reported.values() for study_id in cohort.study_ids]
    store = output_store(out_dir / SIMPLIFIED_DIR, reported_ids, size)
    frames, baselines = [], pd.DataFrame()
    summary: dict[str, Any] = {"task": task, "lam": lam, "setting": "joint"}
    for split, cohort in reported.items():
        simplified = StoredImages(store, store.slots(cohort.study_ids))
        metrics, frame = report_split(result, split, cohort, simplified, prior, config, mask_dir, independent)
        if split == "val" and "train" in cohorts:
            extras, baselines = joint_validation_extras(result, cohorts["train"], cohort, simplified, frame,
                                                        prior, out_dir, config, mask_dir, independent)
            metrics.update(extras)
        summary.update({f"{split}_{k}": v for k, v in metrics.items()})
        frames.append(frame)
    if is_main_process():
        save_simplifier(result.simplifier, out_dir / "simplifier.safetensors", task=task, lam=lam,
                        input_size=size)
        save_classifier(result.classifier, out_dir / "classifier.safetensors", task=task, input_size=size,
                        trained_on="simplified", lam=lam)
        if len(baselines):
            atomic_write_text(out_dir / "baselines.csv", baselines.to_csv(index=False))
        predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        atomic_write_text(out_dir / "predictions.csv", predictions.to_csv(index=False))
        atomic_write_text(out_dir / "metrics.json",
                          json.dumps({**summary, "history": result.history}, indent=2, default=float))
    return summary


def report_split(result: JointResult, split: str, cohort: Cohort, simplified: StoredImages, prior: nn.Module,
                 config: JointConfig, mask_dir: str | Path | None,
                 independent: nn.Module | None) -> tuple[dict[str, Any], pd.DataFrame]:
    """One split: its simplified images into ``simplified`` (store slots), its metrics and per-study rows."""
    device, batch_size = pick_device(config.device), config.train.eval_batch_size
    labels = cohort.labels(config.task)
    metrics, scores = evaluate_joint(result.simplifier, result.classifier, prior, cohort.images, labels,
                                     device, batch_size, target=simplified)
    writes_done(simplified)  # every rank's share of the split is written before any rank reads it
    frame = pd.DataFrame({"study_id": cohort.study_ids, "split": split, "label": labels.numpy(),
                          **{k: scores[k].numpy() for k in ("p_orig", "p_simpl", "bpd_orig", "bpd_simpl")}})
    found, frame = split_outcomes(cohort, frame, simplified, prior, mask_dir, config.evaluate.shortcut_alpha,
                                  batch_size)
    metrics.update(found)
    if independent is not None:
        metrics.update(independent_scores(independent, cohort.images, simplified, labels, device, batch_size))
    return metrics, frame


def joint_validation_extras(result: JointResult, cohort_train: Cohort, cohort_val: Cohort,
                            simplified_val: StoredImages, scored_val: pd.DataFrame, prior: nn.Module,
                            out_dir: Path, config: JointConfig, mask_dir: str | Path | None,
                            independent: nn.Module | None) -> tuple[dict[str, float], pd.DataFrame]:
    """Retrain-on-simplified and the matched-bpd baselines (:func:`validation_extras`), on every rank.

    Retraining simplifies the train split into a scratch store under ``out_dir`` (removed after).
    """
    device = pick_device(config.device)
    batch_size, ev = config.train.eval_batch_size, config.evaluate

    def scorer(model: nn.Module) -> Callable[[Images], torch.Tensor]:
        return partial(predict_proba, model, device=device, batch_size=batch_size, sharded=True)

    retrain = retrain_config(config.task, config.seed, config.device, ev, config.augment)
    return validation_extras(
        "simplebits-joint", cohort_train, cohort_val, config.task,
        partial(simplify_batch, result.simplifier.eval(), device=device), simplified_val, scored_val, prior,
        scorer(result.classifier), ev, retrain,
        independent=None if independent is None else scorer(independent), mask_dir=mask_dir,
        scratch_dir=out_dir / SIMPLIFIED_TRAIN_DIR, batch_size=batch_size, seed=config.seed)


def lambda_folder_name(lam: float) -> str:
    return f"lam-{lam:g}"


def finished_summary(metrics_path: Path, force: bool) -> dict[str, Any] | None:
    """The saved summary of a finished run (rank 0 reads it, every rank gets it); None: (re)train."""
    summary = None
    if is_main_process() and not force and metrics_path.is_file():
        log.info("%s exists; skipping (use --force to retrain)", metrics_path)
        summary = json.loads(metrics_path.read_text())
    return broadcast_object(summary)


def run_joint(ingest_dir: str | Path, out_dir: str | Path, config: JointConfig, force: bool = False,
              tracker: Tracker | None = None, mask_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """``simplebits simplify train``: one run, or a sweep (one ``lam-<value>/`` sub-folder per lambda).

    Finished runs (``metrics.json`` present) are skipped unless ``force``; interrupted ones resume.
    A sweep also writes ``sweep.csv`` (``method, lam, mean_bpd, auroc, auroc_orig, mean_bpd_orig``).
    Under torchrun every rank runs all of it (training, the independent check, evaluation); only
    rank 0 writes files and logs to MLflow. Returns the summaries on every rank.
    """
    task = check_task(config.task)
    out_dir = Path(out_dir)
    context = init_distributed(config.device)
    is_sweep = isinstance(config.simplify.lam, list)
    lams = [float(lam) for lam in (config.simplify.lam if is_sweep else [config.simplify.lam])]
    run_dirs = [out_dir / lambda_folder_name(lam) if is_sweep else out_dir for lam in lams]
    finished = [finished_summary(run_dir / "metrics.json", force) for run_dir in run_dirs]
    cohorts = load_task_splits(ingest_dir, task)
    prior = load_prior(config.prior, device=context.device)
    tracker = tracker or Tracker.from_config(out_dir, config.tracking, enabled=context.is_main)
    # one check classifier for every lambda of a sweep (it never sees simplified images), trained by
    # every rank together, and only if some lambda still needs it
    independent = None
    if any(summary is None for summary in finished):
        independent = independent_classifier(cohorts["train"], cohorts["val"], task, config.independent,
                                             config.augment, context.device)
    summaries = []
    for lam, run_dir, summary in zip(lams, run_dirs, finished):
        if summary is None:
            objective = config.simplify.model_copy(update={"lam": lam})
            summary = run_one_lambda(cohorts, prior, config.model_copy(update={"simplify": objective}),
                                     run_dir, tracker, mask_dir, independent)
        summaries.append(summary)
    if is_sweep and context.is_main:
        table = pd.DataFrame([{"method": "simplebits-joint", "lam": s["lam"],
                               "mean_bpd": s.get("val_bpd_simpl"), "auroc": s.get("val_auroc_simpl"),
                               "auroc_orig": s.get("val_auroc_orig"), "mean_bpd_orig": s.get("val_bpd_orig")}
                              for s in summaries])
        atomic_write_text(out_dir / "sweep.csv", table.to_csv(index=False))
    return summaries


def run_one_lambda(cohorts: dict[str, Cohort], prior: nn.Module, config: JointConfig, run_dir: Path,
                   tracker: Tracker, mask_dir: str | Path | None,
                   independent: nn.Module | None) -> dict[str, Any]:
    """Train one lambda (resuming its checkpoint) and save its outputs under ``run_dir``."""
    task, lam = config.task, _single_lambda(config)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, run_dir)
    name = f"simplify-joint-{task}-{lambda_folder_name(lam)}"
    with tracker.run(name, params=config.model_dump(mode="json"), tags={"task": task, "setting": "joint"},
                     resume_file=run_dir / RUN_ID_NAME):
        result = train_joint(cohorts["train"], cohorts["val"], prior, config, tracker,
                             checkpoint_path=run_dir / CHECKPOINT_NAME)
        summary = save_joint_outputs(result, cohorts, prior, run_dir, config, mask_dir, independent)
        tracker.log_metrics({f"final_{k}": v for k, v in summary.items()
                             if isinstance(v, float) and math.isfinite(v)})
        if is_main_process():
            # the simplifier and the classifier trained with it; a sweep registers one version per lambda
            register = config.tracking.register_as
            tags = {"task": task, "setting": "joint", "lam": f"{lam:g}"}
            tracker.log_model("simplifier", run_dir / "simplifier.safetensors", name=name, register=register,
                              tags=tags)
            tracker.log_model("classifier", run_dir / "classifier.safetensors", name=f"{name}-classifier",
                              register=register and f"{register}-classifier", tags=tags)
            tracker.log_table(pd.read_csv(run_dir / "predictions.csv", dtype={"study_id": str}), "predictions.json")
        for file in ("metrics.json", "predictions.csv", "baselines.csv"):
            if (run_dir / file).is_file():
                tracker.log_artifact(run_dir / file)
    return summary
