"""SimpleBits setting (c): post-hoc audit of a frozen classifier (Gen-2 evidence matching).

What minimal image content still gives a frozen classifier (possibly trained elsewhere) the same
decision *for the same internal reasons*? Objective per batch (simplebits-method.md §3.2.3, §5.2)::

    d_i   = mean over classifiers and layers of the grad x activation distance (matching.py)
    w_i   = 1[d_i < tau] * 1[every classifier's simplified decision is kept]      (detached gate)
    KL_i  = KL(f(x_i) || f(x~_i))
    L     = (match_weight * mean d_i + kl_weight * mean KL_i + lam * sum_i w_i bpd(x~_i) / B)
            / (match_weight + kl_weight + lam)

Output matching alone is not enough: a prototype trained on KL only erased the lung fields while
the frozen classifier's output stayed put (adversarial cues). Guards against such solutions: the
internal-evidence match, an ensemble of frozen classifiers (all must agree), Gaussian input noise
on the simplified image before each classifier, and random affine augmentation during training.
Every audit is then checked with an *independent* classifier (another seed and architecture,
trained on originals only): if it still scores the simplified images, the kept content carries
the task for more than the audited network.

Two forms:

- **amortized** (:func:`run_audit`): a residual U-Net simplifier trained over the cohort, so that any
  study simplifies in one forward pass;
- **per-study** (:func:`simplify_study`): one study's simplified image optimised directly (logit
  pixels), for deep dives into single decisions such as misclassifications.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.ingest import Cohort, load_cohort, load_task_splits
from pipeline.models.bpd import bits_per_dim, quantize_8bit
from pipeline.models.classifiers import load_classifier
from pipeline.models.simplifier import Simplifier, create_simplifier, save_simplifier, soft_clamp
from pipeline.prior import load_prior
from pipeline.runtime.atomic import atomic_write_npy, atomic_write_text
from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runtime.device import autocast, pick_device
from pipeline.runtime.distributed import all_reduce_mean, init_distributed, shard
from pipeline.runtime.progress import progress
from pipeline.runtime.seeding import seed_everything
from pipeline.runtime.tracking import Tracker, null_tracker
from pipeline.simplebits.evaluate import (
    as_float_images,
    classification_summary,
    deterministic_bpd,
)
from pipeline.simplebits.joint import SimplifierConfig, apply_gradients, simplify_images
from pipeline.simplebits.matching import Reference, gate, match_evidence, reference_evidence
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
    TrackingConfig,
    check_task,
    out_of_time,
    predict_proba,
    random_affine,
)
from pipeline.training.clipping import PercentileClip
from pipeline.training.schedules import cosine_decay

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


class ClassifierSpec(StrictModel):
    """A frozen classifier: weights file plus (for models trained elsewhere) the registered network name."""

    path: str
    name: str | None = None  # None: read from the sibling .json written by save_classifier
    kwargs: dict[str, Any] = {}


class AuditObjectiveConfig(StrictModel):
    # bpd weight. Demo cohort, scale_space simplifier, 20 epochs: lam 8 / tau 0.1 gave bpd 4.06 -> 1.95
    # at AUROC 0.976 (orig 0.972); lam 4 / tau 0.15 gave 1.68 but the independent check fell to 0.94x
    lam: float = 8.0
    distance: Literal["normed_sse", "cosine"] = "normed_sse"
    # gate: bits are charged only where the evidence distance is below tau, so tau bounds how far the
    # evidence may drift (the distance settles just under it); see lam for the demo-cohort trade-off
    tau: float = 0.1
    gate_margin: float = 1e-5  # ramp width of the gate (tiny: a step)
    gate_on: Literal["consistent", "correct"] = "consistent"  # keep the decision, or require the true label
    match_weight: float = 1.0
    kl_weight: float = 1.0
    input_noise: float = 0.01  # std of Gaussian noise on x~ before each classifier (against adversarial cues)


class AuditTrainConfig(StrictModel):
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3  # with the zero_head init; 3e-3 overshot (broken images after one epoch, demo cohort)
    min_lr_fraction: float = 0.1  # cosine decay of the lr to this fraction over all planned steps
    lam_warmup_fraction: float = 0.0  # lam ramps linearly from 0 over this fraction of the steps
    betas: tuple[float, float] = (0.5, 0.99)
    weight_decay: float = 5e-5
    clip_percentile: float | None = 80.0  # gradient norm clipped to this percentile of the last 400
    eval_batch_size: int = 128
    max_minutes: float | None = None  # a safety cap; the schedules follow the planned epochs


def scheduled(train: AuditTrainConfig, lam: float, step: int, total_steps: int) -> tuple[float, float]:
    """``(lr, lam)`` at optimizer ``step`` of ``total_steps``: cosine lr decay and linear lam warm-up.

    A function of the step alone (no scheduler state), so a resumed run follows the same schedule.
    The decay lets the simplifier settle where evidence matching and bits balance instead of
    oscillating around that point at the full lr.
    """
    lr = cosine_decay(train.lr, step / max(1, total_steps), train.min_lr_fraction)
    warmup = train.lam_warmup_fraction * total_steps
    return lr, lam * (min(1.0, step / warmup) if warmup > 0 else 1.0)


class PerStudyConfig(StrictModel):
    steps: int = 300
    lr: float = 0.05  # Adam on logit pixels
    eps: float = 0.05  # logit squeeze, as the simplifier's: saturated pixels stay editable


class AuditConfig(StrictModel):
    task: str = "effusion"
    seed: int = 0
    device: str = "auto"
    prior: str | None = None
    classifiers: list[ClassifierSpec] = []  # the frozen ensemble; the first is the one reported
    simplifier: SimplifierConfig = SimplifierConfig()
    audit: AuditObjectiveConfig = AuditObjectiveConfig()
    train: AuditTrainConfig = AuditTrainConfig()
    per_study: PerStudyConfig = PerStudyConfig()
    augment: AugmentConfig = AugmentConfig()
    independent: IndependentConfig = IndependentConfig()
    evaluate: OutcomesConfig = OutcomesConfig()
    tracking: TrackingConfig = TrackingConfig()


@dataclass
class AuditResult:
    simplifier: Simplifier
    metrics: dict[str, float]  # validation metrics after the last epoch
    history: list[dict[str, float]] = field(default_factory=list)
    independent: nn.Module | None = None


@dataclass
class StudyAudit:
    """Per-study result: the simplified image (uint8 ``(1, 1, H, W)``) and its optimisation trace."""

    simplified: torch.Tensor
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Frozen classifiers


def load_frozen_classifiers(specs: Sequence[ClassifierSpec], device: torch.device) -> list[nn.Module]:
    """Load each spec in eval mode with gradients off (inputs still receive gradients)."""
    if not specs:
        raise ValueError("an audit needs at least one classifier (--classifier)")
    return [freeze(load_classifier(spec.path, spec.name, **spec.kwargs)).to(device) for spec in specs]


def freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# The objective


def references_for(
    classifiers: Sequence[nn.Module], x: torch.Tensor, device: torch.device
) -> list[Reference]:
    """Each frozen classifier's evidence for its own decision on ``x``."""
    with autocast(device):
        return [reference_evidence(c, x) for c in classifiers]


def audit_losses(
    x_simple: torch.Tensor,
    references: Sequence[Reference],
    classifiers: Sequence[nn.Module],
    prior: nn.Module,
    objective: AuditObjectiveConfig,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Every term of the audit objective for a batch of simplified images; ``"total"`` is minimised.

    Also returns per-example ``distance``, ``consistent``, ``weights`` and ``bpd`` (the latter 0 where
    the gate is closed, since bits are not computed there).
    """
    if objective.gate_on == "correct" and labels is None:
        raise ValueError("gate_on='correct' needs the labels")
    device = x_simple.device
    distances, kls, consistent = [], [], torch.ones(x_simple.shape[0], dtype=torch.bool, device=device)
    for classifier, reference in zip(classifiers, references):
        x_in = x_simple
        if objective.input_noise > 0:
            noise = torch.randn(x_simple.shape, generator=generator, device="cpu").to(device)
            x_in = x_simple + objective.input_noise * noise
        with autocast(device):
            match = match_evidence(classifier, x_in, reference, objective.distance)
        distances.append(match.distance)
        kls.append(
            F.kl_div(
                F.log_softmax(match.logits, 1),
                F.log_softmax(reference.logits, 1),
                log_target=True,
                reduction="none",
            ).sum(1)
        )
        target = labels if objective.gate_on == "correct" else reference.targets
        consistent &= match.logits.argmax(1) == target
    distance = torch.stack(distances).mean(0)
    kl = torch.stack(kls).mean(0)
    weights = gate(distance, consistent, objective.tau, objective.gate_margin)
    bpd = x_simple.new_zeros(x_simple.shape[0])
    gated = weights > 0
    if objective.lam > 0 and bool(gated.any()):
        # fp32 outside autocast: Glow log-determinants are too delicate for bf16
        bpd = bpd.index_put((gated.nonzero()[:, 0],), bits_per_dim(prior, x_simple[gated].float(), "uniform"))
    loss_bpd = (weights * bpd).sum() / x_simple.shape[0]
    total = (
        objective.match_weight * distance.mean() + objective.kl_weight * kl.mean() + objective.lam * loss_bpd
    ) / (objective.match_weight + objective.kl_weight + objective.lam)
    return {
        "total": total,
        "match": distance.mean(),
        "kl": kl.mean(),
        "bpd": loss_bpd,
        "gate": weights.mean(),
        "distance": distance.detach(),
        "consistent": consistent,
        "weights": weights,
        "bpd_each": bpd.detach(),
    }


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evidence_distances(
    classifiers: Sequence[nn.Module],
    originals: torch.Tensor,
    simplified: torch.Tensor,
    kind: str,
    device: torch.device,
    batch_size: int = 128,
) -> torch.Tensor:
    """Mean (over classifiers) evidence distance per study, for reporting."""
    out = []
    for start in range(0, originals.shape[0], batch_size):
        x = as_float_images(originals[start : start + batch_size]).to(device)
        xs = as_float_images(simplified[start : start + batch_size]).to(device)
        refs = references_for(classifiers, x, device)
        with autocast(device):
            out.append(
                torch.stack([match_evidence(c, xs, r, kind).distance for c, r in zip(classifiers, refs)])
                .mean(0)
                .float()
                .cpu()
            )
    return torch.cat(out) if out else torch.empty(0)


def evaluate_audit(
    simplifier: nn.Module,
    classifiers: Sequence[nn.Module],
    prior: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AuditConfig,
    device: torch.device,
    bpd_orig: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics of the primary (first) classifier on originals vs simplified, bits, evidence distance."""
    batch_size = config.train.eval_batch_size
    simplified = simplify_images(simplifier, images, device, batch_size)
    arrays = {
        "simplified": simplified,
        "p_orig": predict_proba(classifiers[0], images, device, batch_size),
        "p_simpl": predict_proba(classifiers[0], simplified, device, batch_size),
        "bpd_orig": deterministic_bpd(prior, images, batch_size) if bpd_orig is None else bpd_orig,
        "bpd_simpl": deterministic_bpd(prior, simplified, batch_size),
        "distance": evidence_distances(
            classifiers, images, simplified, config.audit.distance, device, batch_size
        ),
    }
    metrics = {
        **classification_summary(labels, arrays["p_orig"], arrays["p_simpl"]),
        "bpd_orig": float(arrays["bpd_orig"].mean()),
        "bpd_simpl": float(arrays["bpd_simpl"].mean()),
        "evidence_distance": float(arrays["distance"].mean()),
        "matched_fraction": float((arrays["distance"] < config.audit.tau).float().mean()),
    }
    return metrics, arrays


# --------------------------------------------------------------------------------------------------
# Amortized audit


def run_audit(
    cohort_train: Cohort,
    cohort_val: Cohort,
    classifiers: nn.Module | Sequence[nn.Module],
    prior: nn.Module,
    config: AuditConfig,
    tracker: Tracker | None = None,
    checkpoint_path: str | Path | None = None,
    independent: nn.Module | None = None,
) -> AuditResult:
    """Train an amortized simplifier that keeps the frozen ``classifiers``' evidence while bits fall.

    ``classifiers``: one frozen model or an ensemble (the first is the one whose AUROC is reported).
    ``independent``: a check classifier; ``None`` builds one from ``config.independent``.
    """
    task = check_task(config.task)
    tracker = tracker or null_tracker()
    device = pick_device(config.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    classifiers = [
        freeze(c).to(device) for c in ([classifiers] if isinstance(classifiers, nn.Module) else classifiers)
    ]
    if not classifiers:
        raise ValueError("run_audit needs at least one frozen classifier")
    seed_everything(config.seed)
    prior = prior.to(device).eval().requires_grad_(False)
    simplifier = create_simplifier(**config.simplifier.model_dump()).to(device)
    optimizer = torch.optim.Adam(
        simplifier.parameters(),
        lr=config.train.lr,
        betas=config.train.betas,
        weight_decay=config.train.weight_decay,
    )
    clip = PercentileClip(config.train.clip_percentile) if config.train.clip_percentile is not None else None
    start_epoch, history = 0, []
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = load_checkpoint(
            checkpoint_path,
            models={"simplifier": simplifier},
            optimizers={"simplifier": optimizer},
            map_location=device,
        )
        start_epoch, history = state["step"], list(state["extra"]["history"])
        if clip is not None:
            clip.load_state_dict(state["extra"]["clip"])
        log.info("resumed audit from %s at epoch %d", checkpoint_path, start_epoch)

    train_images, train_labels = cohort_train.images, cohort_train.labels(task)
    val_labels = cohort_val.labels(task)
    val_bpd_orig = deterministic_bpd(prior, cohort_val.images, config.train.eval_batch_size)
    params = list(simplifier.parameters())
    started = time.monotonic()
    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, config.train.epochs):
        order = torch.randperm(
            len(train_labels), generator=torch.Generator().manual_seed(config.seed + epoch)
        )
        batches = list(order.split(config.train.batch_size))
        if len(batches) > 1 and len(batches[-1]) < config.train.batch_size:
            batches = batches[:-1]
        batches = shard(batches, rank, world)
        total_steps = config.train.epochs * len(batches)
        # one stream per epoch (augmentation, input noise), so a resumed run replays the same randomness
        generator = torch.Generator().manual_seed(config.seed + 1000 * (epoch + 1))
        simplifier.train()
        sums = {"match": 0.0, "kl": 0.0, "bpd_loss": 0.0, "gate": 0.0, "skipped": 0.0}
        for batch_number, index in enumerate(progress(
            batches,
            desc=f"audit lam={config.audit.lam:g} epoch {epoch + 1}/{config.train.epochs}",
            leave=False,
        )):
            lr, lam = scheduled(config.train, config.audit.lam, epoch * len(batches) + batch_number, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            objective = config.audit.model_copy(update={"lam": lam})
            x = as_float_images(train_images[index]).to(device)
            if config.augment.enabled:
                x = random_affine(x, config.augment, generator)
            references = references_for(classifiers, x, device)
            losses = audit_losses(
                simplifier(x),
                references,
                classifiers,
                prior,
                objective,
                train_labels[index].to(device),
                generator,
            )
            grads = torch.autograd.grad(losses["total"], params, allow_unused=True)
            if not apply_gradients(params, list(grads), optimizer, clip):
                sums["skipped"] += 1.0
            sums["match"] += float(losses["match"].detach())
            sums["kl"] += float(losses["kl"].detach())
            sums["bpd_loss"] += float(losses["bpd"].detach())
            sums["gate"] += float(losses["gate"])
        n_batches = max(1, len(batches))
        train_metrics = {
            f"train_{k}": float(all_reduce_mean(torch.tensor(v / n_batches, device=device)))
            for k, v in sums.items()
        }
        val_metrics, _ = evaluate_audit(
            simplifier,
            classifiers,
            prior,
            cohort_val.images,
            val_labels,
            config,
            device,
            bpd_orig=val_bpd_orig,
        )
        metrics = {**train_metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}
        history.append({"epoch": epoch + 1, **metrics})
        tracker.log_metrics(metrics, step=epoch + 1)
        log.info(
            "audit epoch %d: val AUROC orig %.3f simplified %.3f, bpd orig %.3f simplified %.3f, "
            "distance %.3f",
            epoch + 1,
            metrics["val_auroc_orig"],
            metrics["val_auroc_simpl"],
            metrics["val_bpd_orig"],
            metrics["val_bpd_simpl"],
            metrics["val_evidence_distance"],
        )
        if checkpoint_path is not None and rank == 0:
            save_checkpoint(
                checkpoint_path,
                models={"simplifier": simplifier},
                optimizers={"simplifier": optimizer},
                step=epoch + 1,
                extra={"history": history, "clip": clip.state_dict() if clip is not None else None},
            )
        if out_of_time(started, config.train.max_minutes):
            log.info("time budget of %.1f min reached after epoch %d", config.train.max_minutes, epoch + 1)
            break
    if not metrics and history:
        metrics = {k: v for k, v in history[-1].items() if k != "epoch"}

    simplifier.eval()
    if independent is None:
        independent = independent_classifier(
            cohort_train, cohort_val, task, config.independent, config.augment, device
        )
    if independent is not None:
        batch_size = config.train.eval_batch_size
        simplified = simplify_images(simplifier, cohort_val.images, device, batch_size)
        metrics.update(
            independent_scores(independent, cohort_val.images, simplified, val_labels, device, batch_size)
        )
        tracker.log_metrics(
            {k: v for k, v in metrics.items() if k.startswith("independent_") and math.isfinite(v)}
        )
    return AuditResult(simplifier=simplifier, metrics=metrics, history=history, independent=independent)


# --------------------------------------------------------------------------------------------------
# Per-study audit


def _squeezed_logit(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.logit(eps + (1.0 - 2.0 * eps) * x)


def _from_logit(z: torch.Tensor, eps: float) -> torch.Tensor:
    return quantize_8bit(soft_clamp((torch.sigmoid(z) - eps) / (1.0 - 2.0 * eps), 0.0, 1.0))


def simplify_study(
    image: torch.Tensor,
    classifiers: nn.Module | Sequence[nn.Module],
    prior: nn.Module,
    config: AuditConfig,
    label: int | None = None,
) -> StudyAudit:
    """Optimise one study's simplified image directly (logit pixels) under the audit objective.

    ``image``: ``(1, 1, H, W)`` or ``(H, W)``, uint8 or [0,1]. Starts at the original (identity) and
    returns the lowest-bpd iterate whose gate was open (evidence matched, decision kept); if the gate
    never opened, the final iterate.
    """
    device = pick_device(config.device)
    classifiers = [
        freeze(c).to(device) for c in ([classifiers] if isinstance(classifiers, nn.Module) else classifiers)
    ]
    prior = prior.to(device).eval().requires_grad_(False)
    x = as_float_images(image)
    x = x.view(1, 1, *x.shape[-2:]).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    eps = config.per_study.eps
    logits_param = _squeezed_logit(x, eps).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits_param], lr=config.per_study.lr)
    references = references_for(classifiers, x, device)
    labels = None if label is None else torch.tensor([int(label)], device=device)
    bpd_orig = float(deterministic_bpd(prior, x))
    best: tuple[float, torch.Tensor] | None = None
    history = []
    for step in range(config.per_study.steps):
        x_simple = _from_logit(logits_param, eps)
        losses = audit_losses(x_simple, references, classifiers, prior, config.audit, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if torch.isfinite(logits_param.grad).all():
            optimizer.step()
        open_gate = bool(losses["weights"][0] > 0)
        bpd_now = float(losses["bpd_each"][0]) if open_gate else math.nan
        history.append(
            {
                "step": step,
                "match": float(losses["match"].detach()),
                "kl": float(losses["kl"].detach()),
                "gate": float(losses["gate"]),
                "bpd": bpd_now,
            }
        )
        if open_gate and (best is None or bpd_now < best[0]):
            best = (bpd_now, x_simple.detach().clone())
    with torch.no_grad():
        final = best[1] if best is not None else _from_logit(logits_param, eps)
        simplified = torch.round(final * 255).to(torch.uint8).cpu()
        p_orig = float(predict_proba(classifiers[0], x, device)[0])
        p_simpl = float(predict_proba(classifiers[0], simplified, device)[0])
        distance = float(evidence_distances(classifiers, x, simplified, config.audit.distance, device)[0])
    metrics = {
        "p_orig": p_orig,
        "p_simpl": p_simpl,
        "bpd_orig": bpd_orig,
        "bpd_simpl": float(deterministic_bpd(prior, simplified)),
        "evidence_distance": distance,
        "gate_opened": float(best is not None),
    }
    return StudyAudit(simplified=simplified, metrics=metrics, history=history)


# --------------------------------------------------------------------------------------------------
# Outputs and the command


def save_audit_outputs(
    result: AuditResult,
    classifiers: Sequence[nn.Module],
    prior: nn.Module,
    cohorts: dict[str, Cohort],
    out_dir: str | Path,
    config: AuditConfig,
    mask_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``simplifier.safetensors``, ``predictions.csv``, ``simplified/<study>.npy``, ``metrics.json``.

    ``cohorts``: ``train`` (for retraining) plus the splits to report (usually ``val`` and ``test``).
    The validation split also gets ``baselines.csv`` (matched bpd) and, with ``mask_dir`` (the demo
    cohort's ``masks/``), distractor and sign retention plus the shortcut flag.
    """
    out_dir = Path(out_dir)
    device = pick_device(config.device)
    task, ev, batch_size = config.task, config.evaluate, config.train.eval_batch_size
    frames, summary = (
        [],
        {
            "task": task,
            "lam": config.audit.lam,
            "setting": "audit",
            **{k: v for k, v in result.metrics.items() if k.startswith("independent_")},
        },
    )
    for split, cohort in cohorts.items():
        if split == "train" or len(cohort) == 0:
            continue
        labels = cohort.labels(task)
        metrics, arrays = evaluate_audit(
            result.simplifier, classifiers, prior, cohort.images, labels, config, device
        )
        frame = pd.DataFrame(
            {
                "study_id": cohort.study_ids,
                "split": split,
                "label": labels.numpy(),
                "p_orig": arrays["p_orig"].numpy(),
                "p_simpl": arrays["p_simpl"].numpy(),
                "bpd_orig": arrays["bpd_orig"].numpy(),
                "bpd_simpl": arrays["bpd_simpl"].numpy(),
                "evidence_distance": arrays["distance"].numpy(),
            }
        )
        found, frame = split_outcomes(
            cohort, frame, arrays["simplified"], prior, mask_dir, ev.shortcut_alpha, batch_size
        )
        metrics.update(found)
        if split == "val" and "train" in cohorts:
            extras, table = validation_extras(
                "simplebits-audit",
                cohorts["train"],
                cohort,
                task,
                lambda: simplify_images(result.simplifier, cohorts["train"].images, device, batch_size),
                arrays["simplified"],
                frame,
                prior,
                lambda images: predict_proba(classifiers[0], images, device, batch_size),
                ev,
                retrain_config(task, config.seed, config.device, ev, config.augment),
                independent=None
                if result.independent is None
                else lambda images: predict_proba(result.independent, images, device, batch_size),
                mask_dir=mask_dir,
            )
            metrics.update(extras)
            if len(table):
                atomic_write_text(out_dir / "baselines.csv", table.to_csv(index=False))
        summary.update({f"{split}_{k}": v for k, v in metrics.items()})
        frames.append(frame)
        for study_id, image in zip(cohort.study_ids, arrays["simplified"][:, 0].numpy()):
            atomic_write_npy(out_dir / "simplified" / f"{study_id}.npy", image)
    size = list(next(iter(cohorts.values())).images.shape[-2:])
    save_simplifier(
        result.simplifier,
        out_dir / "simplifier.safetensors",
        task=task,
        lam=config.audit.lam,
        input_size=size,
        setting="audit",
        classifiers=[c.path for c in config.classifiers],
    )
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    atomic_write_text(out_dir / "predictions.csv", predictions.to_csv(index=False))
    atomic_write_text(
        out_dir / "metrics.json", json.dumps({**summary, "history": result.history}, indent=2, default=float)
    )
    return summary


def audit_command(
    ingest_dir: str | Path,
    out_dir: str | Path,
    config: AuditConfig,
    force: bool = False,
    mask_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``simplebits simplify audit`` (amortized): cohort + frozen classifier(s) -> simplifier and outputs."""
    task = check_task(config.task)
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    if metrics_path.is_file() and not force:
        log.info("%s exists; audit already done (use --force to redo)", metrics_path)
        return json.loads(metrics_path.read_text())
    context = init_distributed(config.device)
    cohorts = load_task_splits(ingest_dir, task)
    prior = load_prior(config.prior, device=context.device)
    classifiers = load_frozen_classifiers(config.classifiers, context.device)
    tracker = Tracker.from_config(out_dir, config.tracking, enabled=context.is_main)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(config, out_dir)
    summary: dict[str, Any] = {}
    with tracker.run(
        f"simplify-audit-{task}",
        params=config.model_dump(mode="json"),
        tags={"task": task, "setting": "audit"},
    ):
        result = run_audit(
            cohorts["train"],
            cohorts["val"],
            classifiers,
            prior,
            config,
            tracker,
            checkpoint_path=out_dir / CHECKPOINT_NAME,
        )
        if context.is_main:
            summary = save_audit_outputs(result, classifiers, prior, cohorts, out_dir, config, mask_dir)
            tracker.log_metrics(
                {f"final_{k}": v for k, v in summary.items() if isinstance(v, float) and math.isfinite(v)}
            )
            for name in ("simplifier.safetensors", "simplifier.json", "metrics.json", "predictions.csv",
                         "baselines.csv"):
                if (out_dir / name).is_file():
                    tracker.log_artifact(out_dir / name)
    return summary


def audit_study_command(
    ingest_dir: str | Path, out_dir: str | Path, study_id: str, config: AuditConfig
) -> dict[str, Any]:
    """``simplebits simplify audit --per-study STUDY``: one study by direct optimisation.

    Writes ``per_study/<study>.json`` (metrics and the optimisation trace) and ``simplified/<study>.npy``.
    """
    task = check_task(config.task)
    cohort = load_cohort(ingest_dir, task=task)
    if study_id not in cohort.study_ids:
        raise ValueError(
            f"{ingest_dir}: study {study_id!r} is not in the ingest cache (or has no {task} label)"
        )
    index = cohort.study_ids.index(study_id)
    device = pick_device(config.device)
    prior = load_prior(config.prior, device=device)
    classifiers = load_frozen_classifiers(config.classifiers, device)
    label = int(cohort.labels(task)[index])
    result = simplify_study(cohort.images[index], classifiers, prior, config, label=label)
    out_dir = Path(out_dir)
    atomic_write_npy(out_dir / "simplified" / f"{study_id}.npy", result.simplified[0, 0].numpy())
    record = {
        "study_id": study_id,
        "task": task,
        "label": label,
        "lam": config.audit.lam,
        **result.metrics,
        "history": result.history,
    }
    atomic_write_text(out_dir / "per_study" / f"{study_id}.json", json.dumps(record, indent=2, default=float))
    return {k: v for k, v in record.items() if k != "history"}
