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

Data parallel under torchrun: every rank holds the full models (same seed, same initialisation),
works on its shard of each epoch and averages gradients with an all-reduce before each optimiser
step. DistributedDataParallel is not used because its hooks do not see gradients taken with
``torch.autograd.grad`` through ``functional_call``, which the look-ahead needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.ingest import Cohort, load_task_splits
from pipeline.metrics import accuracy, auroc
from pipeline.models.bpd import bits_per_dim
from pipeline.models.classifiers import create_classifier, read_state_dict, save_classifier
from pipeline.models.simplifier import Simplifier, create_simplifier, save_simplifier
from pipeline.prior import load_prior
from pipeline.runtime.atomic import atomic_write_npy, atomic_write_text
from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.distributed import all_reduce_mean, init_distributed, shard
from pipeline.runtime.progress import progress
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import Tracker, null_tracker
from pipeline.simplebits.evaluate import deterministic_bpd
from pipeline.simplebits.outcomes import (
    IndependentConfig,
    OutcomesConfig,
    independent_classifier,
    independent_scores,
    retrain_config,
    split_outcomes,
    validation_extras,
)
from pipeline.training.classifier import (
    AugmentConfig,
    ModelConfig,
    TrackingConfig,
    check_task,
    epoch_seed,
    out_of_time,
    predict_proba,
    random_affine,
    to_unit_range,
    weight_decay_groups,
)
from pipeline.training.clipping import PercentileClip

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


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
    max_minutes: float | None = None  # stop after the epoch that crosses this wall-clock budget


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
) -> dict[str, torch.Tensor]:
    """All terms of the Gen-1 simplifier objective for one batch; ``"total"`` is ``L_S``."""
    device = x.device
    params = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    names = {p: n for n, p in params.items()}
    x_simple = simplifier(x)
    with replayed_randomness(seed, device), autocast(device):
        logits_before = functional_call(classifier, params, (x_simple,))
    loss_before = F.cross_entropy(logits_before.float(), y)
    if objective.lookahead:
        grads = torch.autograd.grad(loss_before, list(params.values()), create_graph=True, allow_unused=True)
        after = lookahead_adamw(params, dict(zip(params, grads)), classifier_optimizer, names)
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
        bpd = bits_per_dim(prior, x_simple[gated].float(), dequantize="uniform")
        loss_bpd = (weights[gated] * bpd).sum() / x.shape[0]
    total = (loss_before + loss_simple + objective.orig_weight * losses_orig.mean() + lam * loss_bpd) / (
        2.0 + objective.orig_weight + lam)
    return {"total": total, "before": loss_before, "simple": loss_simple, "orig": losses_orig.mean(),
            "bpd": loss_bpd, "gate": weights.mean()}


def average_gradients(grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Mean over DDP ranks (no-op in a single process)."""
    return [None if g is None else all_reduce_mean(g) for g in grads]


def all_finite(tensors: list[torch.Tensor | None]) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def apply_gradients(params: list[nn.Parameter], grads: list[torch.Tensor | None],
                    optimizer: torch.optim.Optimizer, clip: PercentileClip | None = None) -> bool:
    """Average over ranks, clip, then step unless any gradient is non-finite; returns whether it stepped."""
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
) -> dict[str, float]:
    """One simplifier step on ``L_S``, then one classifier step on the simplified batch.

    ``clips``: optional ``{"simplifier", "classifier"}`` percentile clippers (train.clip_percentile).
    """
    clips = clips or {}
    device = x.device
    losses = simplifier_losses(simplifier, classifier, classifier_optimizer, prior, x, y, objective, lam, seed)
    simplifier_params = list(simplifier.parameters())
    grads = torch.autograd.grad(losses["total"], simplifier_params, allow_unused=True)
    # always through apply_gradients: its all-reduce must run on every rank, finite or not
    skipped = 0.0 if apply_gradients(simplifier_params, list(grads), simplifier_optimizer,
                                     clips.get("simplifier")) else 1.0

    with torch.no_grad():
        x_simple = simplifier(x)
    with autocast(device):
        loss = F.cross_entropy(classifier(x_simple).float(), y)
        if objective.train_classifier_on_originals:
            loss = 0.5 * (loss + F.cross_entropy(classifier(x).float(), y))
    classifier_params = [p for p in classifier.parameters() if p.requires_grad]
    classifier_grads = torch.autograd.grad(loss, classifier_params, allow_unused=True)
    skipped += 0.0 if apply_gradients(classifier_params, list(classifier_grads), classifier_optimizer,
                                      clips.get("classifier")) else 1.0
    return {"ce_simpl": float(losses["before"].detach()), "ce_orig": float(losses["orig"].detach()),
            "bpd_loss": float(losses["bpd"].detach()), "gate": float(losses["gate"].detach()), "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def simplify_images(simplifier: nn.Module, images: torch.Tensor, device: torch.device,
                    batch_size: int = 128) -> torch.Tensor:
    """Simplified images as uint8 ``(N,1,H,W)`` (exactly the 8-bit grid the simplifier outputs)."""
    simplifier.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_unit_range(images[start:start + batch_size].to(device))
        out.append(torch.round(simplifier(batch) * 255).to(torch.uint8).cpu())
    return torch.cat(out) if out else torch.zeros_like(images, dtype=torch.uint8)


@torch.no_grad()
def evaluate_joint(simplifier: nn.Module, classifier: nn.Module, prior: nn.Module, images: torch.Tensor,
                   labels: torch.Tensor, device: torch.device, batch_size: int = 128,
                   bpd_orig: torch.Tensor | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics on originals and simplified images, plus the per-study arrays they come from."""
    simplified = simplify_images(simplifier, images, device, batch_size)
    arrays = {
        "simplified": simplified,
        "p_orig": predict_proba(classifier, images, device, batch_size),
        "p_simpl": predict_proba(classifier, simplified, device, batch_size),
        "bpd_orig": deterministic_bpd(prior, images, batch_size) if bpd_orig is None else bpd_orig,
        "bpd_simpl": deterministic_bpd(prior, simplified, batch_size),
    }
    metrics = {
        "auroc_orig": auroc(labels, arrays["p_orig"]), "accuracy_orig": accuracy(labels, arrays["p_orig"]),
        "auroc_simpl": auroc(labels, arrays["p_simpl"]), "accuracy_simpl": accuracy(labels, arrays["p_simpl"]),
        "bpd_orig": float(arrays["bpd_orig"].mean()), "bpd_simpl": float(arrays["bpd_simpl"].mean()),
    }
    return metrics, arrays


# --------------------------------------------------------------------------------------------------
# Training


def initialise_classifier(classifier: nn.Module, path: str | Path) -> None:
    """Load pretrained weights into the joint classifier; a different network is an error naming the file."""
    try:
        classifier.load_state_dict(read_state_dict(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the joint classifier (classifier.name/kwargs): {err}") from err


def _single_lambda(config: JointConfig) -> float:
    if isinstance(config.simplify.lam, list):
        raise ValueError("train_joint takes one simplify.lam; use run_joint/sweep for a list")
    return float(config.simplify.lam)


def train_joint(
    cohort_train: Cohort,
    cohort_val: Cohort,
    prior: nn.Module,
    config: JointConfig,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
) -> JointResult:
    """Train simplifier and classifier together on ``cohort_train``; evaluate on ``cohort_val`` per epoch.

    ``prior`` is the frozen Glow (moved to the training device here). With ``checkpoint_path`` a
    checkpoint is written after every epoch and an existing one is resumed.
    """
    task = check_task(config.task)
    lam = _single_lambda(config)
    tracker = tracker or null_tracker()
    device = pick_device(config.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    seed_everything(config.seed)

    prior = prior.to(device).eval().requires_grad_(False)
    simplifier = create_simplifier(**config.simplifier.model_dump()).to(device)
    classifier = create_classifier(config.classifier.name, **config.classifier.kwargs)
    if config.classifier_init is not None:
        initialise_classifier(classifier, config.classifier_init)
    else:
        log.warning("joint training from a random classifier (no classifier_init): bits are charged only "
                    "where its cross-entropy on originals is below 0.1, which a short run may never reach "
                    "(on an H100, 8 of 10 epochs had a closed gate and bpd rose to 12-51); pass "
                    "--classifier-init <classify train's model.safetensors>")
    classifier = classifier.to(device)
    train_cfg = config.train
    simplifier_optimizer = torch.optim.Adam(simplifier.parameters(), lr=train_cfg.simplifier_lr,
                                            betas=train_cfg.simplifier_betas,
                                            weight_decay=train_cfg.simplifier_weight_decay)
    classifier_optimizer = torch.optim.AdamW(weight_decay_groups(classifier, train_cfg.classifier_weight_decay),
                                             lr=train_cfg.classifier_lr, betas=train_cfg.classifier_betas)
    models = {"simplifier": simplifier, "classifier": classifier}
    optimizers = {"simplifier": simplifier_optimizer, "classifier": classifier_optimizer}
    clips = ({name: PercentileClip(train_cfg.clip_percentile) for name in models}
             if train_cfg.clip_percentile is not None else {})

    start_epoch, history = 0, []
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = load_checkpoint(checkpoint_path, models=models, optimizers=optimizers, map_location=device)
        start_epoch, history = state["step"], list(state["extra"]["history"])
        for name, clip in clips.items():
            clip.load_state_dict(state["extra"]["clips"][name])
        log.info("resumed joint training from %s at epoch %d", checkpoint_path, start_epoch)

    train_images = cohort_train.images
    train_labels = cohort_train.labels(task)
    val_labels = cohort_val.labels(task)
    val_bpd_orig = deterministic_bpd(prior, cohort_val.images, train_cfg.eval_batch_size)
    started = time.monotonic()
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, train_cfg.epochs):
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(config.seed + epoch))
        batches = list(order.split(train_cfg.batch_size))
        if len(batches) > 1 and len(batches[-1]) < train_cfg.batch_size:
            batches = batches[:-1]
        # equal batch counts per rank: every step has collectives that all ranks must join
        batches = shard(batches[: len(batches) // world * world] or batches, rank, world)
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, rank))
        simplifier.train()
        classifier.train()
        sums = {"ce_simpl": 0.0, "ce_orig": 0.0, "bpd_loss": 0.0, "gate": 0.0, "skipped": 0.0}
        for index in progress(batches, desc=f"joint lam={lam:g} epoch {epoch + 1}/{train_cfg.epochs}", leave=False):
            x = to_unit_range(train_images[index].to(device))
            if config.augment.enabled:
                x = random_affine(x, config.augment, generator)
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            stats = joint_step(simplifier, classifier, simplifier_optimizer, classifier_optimizer, prior, x,
                               train_labels[index].to(device), config.simplify, lam, seed, clips)
            for key, value in stats.items():
                sums[key] += value

        n_batches = max(1, len(batches))
        train_metrics = {f"train_{k}": float(all_reduce_mean(torch.tensor(v / n_batches, device=device)))
                         for k, v in sums.items() if k != "skipped"}
        train_metrics["train_skipped_steps"] = float(all_reduce_mean(torch.tensor(sums["skipped"], device=device)))
        val_metrics, _ = evaluate_joint(simplifier, classifier, prior, cohort_val.images, val_labels, device,
                                        train_cfg.eval_batch_size, bpd_orig=val_bpd_orig)
        metrics = {**train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}
        history.append({"epoch": epoch + 1, **metrics})
        tracker.log_metrics(metrics, step=epoch + 1)
        log.info("lam %g epoch %d: val AUROC orig %.3f simplified %.3f, bpd orig %.3f simplified %.3f", lam,
                 epoch + 1, metrics["val_auroc_orig"], metrics["val_auroc_simpl"], metrics["val_bpd_orig"],
                 metrics["val_bpd_simpl"])
        if checkpoint_path is not None and rank == 0:
            save_checkpoint(checkpoint_path, models=models, optimizers=optimizers, step=epoch + 1,
                            extra={"history": history,
                                   "clips": {name: clip.state_dict() for name, clip in clips.items()}})
        if out_of_time(started, train_cfg.max_minutes):
            log.info("time budget of %.1f min reached after epoch %d", train_cfg.max_minutes, epoch + 1)
            break

    if not metrics and history:
        metrics = {k: v for k, v in history[-1].items() if k != "epoch"}
    return JointResult(simplifier=simplifier.eval(), classifier=classifier.eval(), metrics=metrics, history=history)


# --------------------------------------------------------------------------------------------------
# Outputs and the command


def save_joint_outputs(result: JointResult, cohorts: dict[str, Cohort], prior: nn.Module, out_dir: str | Path,
                       config: JointConfig, mask_dir: str | Path | None = None,
                       independent: nn.Module | None = None) -> dict[str, Any]:
    """Weights, ``predictions.csv``, ``simplified/<study_id>.npy`` (uint8 HxW) and ``metrics.json``.

    ``cohorts``: ``train`` (for retraining) plus the splits to report (usually val and test). The
    validation split also gets ``baselines.csv`` (matched bpd) and, with ``mask_dir`` (the demo cohort's
    ``masks/``), distractor and sign retention (pipeline/simplebits/outcomes.py); ``independent`` (the
    check classifier, trained on originals) scores originals vs simplified images.
    """
    out_dir = Path(out_dir)
    task, lam = config.task, _single_lambda(config)
    device = pick_device(config.device)
    batch_size = config.train.eval_batch_size
    ev = config.evaluate
    frames, summary = [], {"task": task, "lam": lam, "setting": "joint"}
    for split, cohort in cohorts.items():
        if split == "train" or len(cohort) == 0:
            continue
        labels = cohort.labels(task)
        metrics, arrays = evaluate_joint(result.simplifier, result.classifier, prior, cohort.images, labels,
                                         device, batch_size)
        frame = pd.DataFrame({
            "study_id": cohort.study_ids, "split": split, "label": labels.numpy(),
            "p_orig": arrays["p_orig"].numpy(), "p_simpl": arrays["p_simpl"].numpy(),
            "bpd_orig": arrays["bpd_orig"].numpy(), "bpd_simpl": arrays["bpd_simpl"].numpy(),
        })
        found, frame = split_outcomes(cohort, frame, arrays["simplified"], prior, mask_dir, ev.shortcut_alpha,
                                      batch_size)
        metrics.update(found)
        if independent is not None:
            metrics.update(independent_scores(independent, cohort.images, arrays["simplified"], labels, device,
                                              batch_size))
        if split == "val" and "train" in cohorts:
            extras, table = validation_extras(
                "simplebits-joint", cohorts["train"], cohort, task,
                lambda: simplify_images(result.simplifier, cohorts["train"].images, device, batch_size),
                arrays["simplified"], frame, prior,
                lambda images: predict_proba(result.classifier, images, device, batch_size), ev,
                retrain_config(task, config.seed, config.device, ev, config.augment),
                independent=None if independent is None
                else lambda images: predict_proba(independent, images, device, batch_size),
                mask_dir=mask_dir)
            metrics.update(extras)
            if len(table):
                atomic_write_text(out_dir / "baselines.csv", table.to_csv(index=False))
        summary.update({f"{split}_{k}": v for k, v in metrics.items()})
        frames.append(frame)
        for study_id, image in zip(cohort.study_ids, arrays["simplified"][:, 0].numpy()):
            atomic_write_npy(out_dir / "simplified" / f"{study_id}.npy", image)
    size = list(next(iter(cohorts.values())).images.shape[-2:])
    save_simplifier(result.simplifier, out_dir / "simplifier.safetensors", task=task, lam=lam, input_size=size)
    save_classifier(result.classifier, out_dir / "classifier.safetensors", config.classifier.name,
                    config.classifier.kwargs, task=task, input_size=size, trained_on="simplified", lam=lam)
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    atomic_write_text(out_dir / "predictions.csv", predictions.to_csv(index=False))
    atomic_write_text(out_dir / "metrics.json",
                      json.dumps({**summary, "history": result.history}, indent=2, default=float))
    return summary


def lambda_folder_name(lam: float) -> str:
    return f"lam-{lam:g}"


def run_joint(ingest_dir: str | Path, out_dir: str | Path, config: JointConfig, force: bool = False,
              tracker: Tracker | None = None, mask_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """``simplebits simplify train``: one run, or a sweep (one ``lam-<value>/`` sub-folder per lambda).

    Finished runs (``metrics.json`` present) are skipped unless ``force``; interrupted ones resume.
    A sweep also writes ``sweep.csv`` (``method, lam, mean_bpd, auroc, auroc_orig, mean_bpd_orig``).
    """
    task = check_task(config.task)
    out_dir = Path(out_dir)
    context = init_distributed(config.device)
    lams = config.simplify.lam if isinstance(config.simplify.lam, list) else [config.simplify.lam]
    is_sweep = isinstance(config.simplify.lam, list)
    cohorts = load_task_splits(ingest_dir, task)
    prior = load_prior(config.prior, device=context.device)
    tracker = tracker or Tracker.from_config(out_dir, config.tracking, enabled=context.is_main)
    summaries = []
    # one check classifier for every lambda of a sweep: it never sees simplified images
    independent = None
    if context.is_main:
        independent = independent_classifier(cohorts["train"], cohorts["val"], task, config.independent,
                                             config.augment, context.device)
    for lam in lams:
        run_config = config.model_copy(update={"simplify": config.simplify.model_copy(update={"lam": float(lam)})})
        run_dir = out_dir / lambda_folder_name(lam) if is_sweep else out_dir
        metrics_path = run_dir / "metrics.json"
        if metrics_path.is_file() and not force:
            log.info("%s exists; skipping lam=%g (use --force to retrain)", metrics_path, lam)
            summaries.append(json.loads(metrics_path.read_text()))
            continue
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(run_config, run_dir)
        with tracker.run(f"simplify-joint-{task}-{lambda_folder_name(lam)}",
                         params=run_config.model_dump(mode="json"), tags={"task": task, "setting": "joint"}):
            result = train_joint(cohorts["train"], cohorts["val"], prior, run_config, tracker,
                                 checkpoint_path=run_dir / CHECKPOINT_NAME)
            if context.is_main:
                summary = save_joint_outputs(result, cohorts, prior, run_dir, run_config, mask_dir, independent)
                tracker.log_metrics({f"final_{k}": v for k, v in summary.items()
                                     if isinstance(v, float) and math.isfinite(v)})
                for name in ("simplifier.safetensors", "simplifier.json", "classifier.safetensors",
                             "metrics.json", "predictions.csv", "baselines.csv"):
                    if (run_dir / name).is_file():
                        tracker.log_artifact(run_dir / name)
                summaries.append(summary)
    if is_sweep and context.is_main:
        table = pd.DataFrame([{"method": "simplebits-joint", "lam": s["lam"], "mean_bpd": s.get("val_bpd_simpl"),
                               "auroc": s.get("val_auroc_simpl"), "auroc_orig": s.get("val_auroc_orig"),
                               "mean_bpd_orig": s.get("val_bpd_orig")} for s in summaries])
        atomic_write_text(out_dir / "sweep.csv", table.to_csv(index=False))
    return summaries
