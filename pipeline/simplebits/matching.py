"""Gen-2 evidence matching: does a simplified image give a frozen classifier the same internal evidence?

For every matched module ``l`` (each ``Conv2d`` and ``Linear``, the layers that own weights) and
example ``i`` (simplebits-method.md §3.2.3, HEAD's ``grad_act_match``)::

    v_l(x)  = a_l(x)  * g_l(x)        input activation times the gradient w.r.t. that input
    v_l(x~) = a_l(x~) * g_l(x)        the *original's* gradient reused for the simplified image

    d_l,i = ||v_l(x~) - v_l(x)||^2 / ||v_l(x)||^2        ("normed_sse")   or   1 - cos(v_l(x~), v_l(x))

and ``d_i`` is the mean over modules. Reusing ``g_l(x)`` makes ``v_l(x~)`` a gradient-weighted copy
of the simplified image's activations: it must reproduce the activations *where the classifier's
decision is sensitive*, and may change them freely elsewhere. Matching only the output (a KL
term) lets a simplifier find adversarial inputs that keep the logits while erasing the anatomy.

The reference gradient comes from the "expected grad" surrogate, whose logit gradient is
``(softmax + 1/K) / 2 - onehot``: unlike cross-entropy it does not vanish on confidently right
examples, so every example has evidence to match.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.adapter import NetworkInput

DISTANCES = ("normed_sse", "cosine")
_EPS = 1e-10


def matched_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose evidence is matched: every ``Conv2d`` and ``Linear`` (including subclasses).

    A TorchScript network's layers run inside its compiled graph, where hooks never fire; its evidence
    is matched at its input instead (the adapter's :class:`NetworkInput`: gradient x input).
    """
    modules = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    modules = modules or [m for m in model.modules() if isinstance(m, NetworkInput)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear module to match")
    return modules


def expected_grad_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed surrogate whose gradient w.r.t. ``logits`` is ``(softmax + 1/K)/2 - onehot`` per example.

    Summed over the batch (not averaged) so one example's evidence does not depend on its batch.
    """
    num_classes = logits.shape[1]
    with torch.no_grad():
        coefficient = 0.5 * (torch.softmax(logits.float(), dim=1) + 1.0 / num_classes)
        coefficient = coefficient - F.one_hot(targets, num_classes).to(coefficient.dtype)
    return (logits.float() * coefficient).sum()


@contextlib.contextmanager
def recorded_inputs(modules: Sequence[nn.Module]) -> Iterator[list[Tensor]]:
    """Collect each module's input tensor (in module order) during the forward passes in the block."""
    inputs: list[Tensor] = [None] * len(modules)  # type: ignore[list-item]

    def hook(index: int):
        def record(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs[index] = args[0]

        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Reference:
    """The original images' evidence under one classifier (all detached)."""

    logits: Tensor  # (N, K)
    targets: Tensor  # (N,) the class whose evidence is matched
    maps: list[Tensor]  # per module: a_l(x) * g_l(x)
    grads: list[Tensor]  # per module: g_l(x)


def reference_evidence(classifier: nn.Module, x: Tensor, targets: Tensor | None = None) -> Reference:
    """Activation x gradient maps of ``x`` under the expected-grad surrogate towards ``targets``.

    ``targets=None`` uses the classifier's own prediction: an audit explains the decision the
    classifier made, right or wrong.
    """
    modules = matched_modules(classifier)
    x = x.detach().requires_grad_(True)  # so that every module input is part of the graph
    with torch.enable_grad(), recorded_inputs(modules) as inputs:
        logits = classifier(x).float()
        if targets is None:
            targets = logits.argmax(dim=1)
        grads = torch.autograd.grad(expected_grad_loss(logits, targets), inputs)
    grads = [g.detach().float() for g in grads]
    maps = [a.detach().float() * g for a, g in zip(inputs, grads)]
    return Reference(logits=logits.detach(), targets=targets.detach(), maps=maps, grads=grads)


def map_distance(simplified: Tensor, reference: Tensor, kind: str = "normed_sse") -> Tensor:
    """Per-example distance between two ``(N, ...)`` evidence maps (0 when identical)."""
    a, b = simplified.flatten(1).float(), reference.flatten(1).float()
    if kind == "normed_sse":
        return ((a - b) ** 2).sum(1) / ((b**2).sum(1) + _EPS)
    if kind == "cosine":
        return 1.0 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + _EPS)
    raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")


@dataclass
class Match:
    """The simplified images' match to a :class:`Reference`; tensors keep the graph to ``x~``."""

    distance: Tensor  # (N,) mean over modules
    per_module: Tensor  # (M, N)
    logits: Tensor  # (N, K) of the simplified images


def match_evidence(
    classifier: nn.Module, x_simple: Tensor, reference: Reference, kind: str = "normed_sse"
) -> Match:
    """Distances of ``x_simple``'s evidence (original gradients reused) to ``reference``, per example."""
    modules = matched_modules(classifier)
    with recorded_inputs(modules) as inputs:
        logits = classifier(x_simple).float()
    per_module = torch.stack(
        [map_distance(a.float() * g, ref, kind) for a, g, ref in zip(inputs, reference.grads, reference.maps)]
    )
    return Match(distance=per_module.mean(0), per_module=per_module, logits=logits)


def evidence_distance(classifier: nn.Module, x: Tensor, x_simple: Tensor, kind: str = "normed_sse") -> Tensor:
    """Convenience: per-example distance of ``x_simple`` to ``x`` under ``classifier`` (no graph kept)."""
    reference = reference_evidence(classifier, x)
    with torch.no_grad():
        return match_evidence(classifier, x_simple, reference, kind).distance


def gate(distance: Tensor, consistent: Tensor, tau: float, margin: float = 1e-5) -> Tensor:
    """bpd weight per example: ``clamp((tau - d)/margin, 0, 1)`` where the decision is kept, else 0.

    With the default tiny ``margin`` this is a step: bits are only charged on examples whose
    evidence already matches (``d < tau``) and whose simplified prediction is still ``consistent``.
    Detached: the gate decides *where* to compress, it is not itself optimised.
    """
    weights = ((tau - distance.detach()) / margin).clamp(0.0, 1.0)
    return weights * consistent.detach().to(weights.dtype)
