"""The input/output adapter between the pipeline and any classifier network.

Everything in the pipeline calls a classifier the same way: ``(N, 1, H, W)`` images in ``[0, 1]`` at
the cohort's working resolution in, two-class logits ``(N, 2)`` out (``softmax(...)[:, 1]`` is
P(positive); the audit's KL and evidence matching use their log-softmax). Networks trained elsewhere
expect something else, so each classifier declares once (in its side-car JSON, ``"adapter"``, or on
the command line) how to get from one to the other:

``input_size``   ``[H, W]`` the network was trained at; images are resized bilinearly (antialiased when
                 shrinking), which is differentiable, so the simplifier's gradients flow through it.
                 ``null``: the working resolution as it is.
``channels``     1, or 3 (the grey image repeated, e.g. ImageNet-pretrained networks).
``intensity``    ``unit`` (``[0, 1]`` as is), ``mean_std`` (``(x - mean) / std``, one value or one per
                 channel, e.g. ImageNet's), or ``range`` (``[0, 1]`` mapped linearly onto
                 ``[low, high]``, e.g. torchxrayvision's ``[-1024, 1024]``).
``output``       ``softmax2`` (two logits, class 1 positive), ``logit`` (one logit), or ``sigmoid`` (a
                 multi-label head: ``output_index``, or ``output_name`` looked up in ``output_names``;
                 with neither, the task's name is looked up).

Order: resize, repeat channels, intensity, network, output. A single logit ``z`` becomes ``[0, z]``,
whose softmax is ``[1 - sigmoid(z), sigmoid(z)]``: the same P(positive) and binary log-probabilities.

The package's own classifiers were always trained behind ``(x - 0.2) / 0.3``; that is their recorded
adapter (:data:`PACKAGE_ADAPTER`), never a default for weights from elsewhere (:data:`FOREIGN_DEFAULT`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from pipeline.config import StrictModel
from pipeline.errors import UserError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# the fields that describe one aspect: an override of the aspect (command line) replaces all of them
INTENSITY_FIELDS = ("intensity", "mean", "std", "range")
OUTPUT_FIELDS = ("output", "output_index", "output_name")


class AdapterSpec(StrictModel):
    """How the pipeline's ``[0, 1]`` grey images reach a network and how its output becomes 2 logits."""

    input_size: tuple[int, int] | None = None
    channels: Literal[1, 3] = 1
    intensity: Literal["unit", "mean_std", "range"] = "unit"
    mean: list[float] = [0.0]
    std: list[float] = [1.0]
    range: tuple[float, float] = (0.0, 1.0)
    output: Literal["softmax2", "logit", "sigmoid"] = "softmax2"
    output_index: int | None = Field(None, ge=0)
    output_name: str | None = None
    output_names: list[str] | None = None  # the sigmoid head's outputs, in order (for output_name)

    @model_validator(mode="after")
    def _check(self) -> AdapterSpec:
        if self.intensity == "mean_std":
            for field, values in (("mean", self.mean), ("std", self.std)):
                if len(values) not in (1, self.channels):
                    raise ValueError(f"adapter {field}: give 1 value or one per channel ({self.channels})")
            if any(s <= 0 for s in self.std):
                raise ValueError(f"adapter std must be positive, got {self.std}")
        if self.intensity == "range" and not self.range[0] < self.range[1]:
            raise ValueError(f"adapter range must be [low, high] with low < high, got {list(self.range)}")
        if self.output != "sigmoid" and (self.output_index is not None or self.output_name is not None):
            raise ValueError("adapter output_index/output_name only apply to output: sigmoid")
        return self

    def for_task(self, task: str | None, source: str) -> AdapterSpec:
        """This adapter with a sigmoid head's output index resolved (by name, else by the task's name)."""
        if self.output != "sigmoid" or self.output_index is not None:
            return self
        name = self.output_name or task
        if name is None or not self.output_names or name not in self.output_names:
            known = f"; its outputs: {', '.join(self.output_names)}" if self.output_names else ""
            raise UserError(f"{source}: sigmoid output needs output_index, or output_name found in "
                            f"output_names (looked for {name!r}{known}); e.g. --classifier-output sigmoid:1")
        return self.model_copy(update={"output_index": self.output_names.index(name)})

    def num_outputs(self) -> int | None:
        """How many outputs the network's head must have, where the adapter says (None: not known)."""
        if self.output == "softmax2":
            return 2
        if self.output == "logit":
            return 1
        return len(self.output_names) if self.output_names else None

    def describe(self) -> str:
        """One line for the log: what the network receives and what is read from it."""
        size = "x".join(map(str, self.input_size)) if self.input_size else "working size"
        intensity = {"unit": "[0,1]", "mean_std": f"(x-{self.mean})/{self.std}",
                     "range": f"[{self.range[0]:g},{self.range[1]:g}]"}[self.intensity]
        output = self.output + (f"[{self.output_index}]" if self.output == "sigmoid" else "")
        return f"{size}, {self.channels} channel(s), intensity {intensity}, output {output}"


# what this package's classifiers were trained behind (placeholder radiograph statistics, as the paper
# uses for MIMIC-CXR); recorded in every side-car save_classifier writes
PACKAGE_ADAPTER = AdapterSpec(intensity="mean_std", mean=[0.2], std=[0.3])
# weights from elsewhere: nothing is assumed beyond what the user declares
FOREIGN_DEFAULT = AdapterSpec()


def merged(base: AdapterSpec, overrides: dict[str, Any]) -> AdapterSpec:
    """``base`` with ``overrides`` (partial ``AdapterSpec`` fields); an overridden intensity or output
    kind replaces that aspect's other fields, so a sidecar's ImageNet mean never leaks into a range."""
    values = base.model_dump()
    for group in (INTENSITY_FIELDS, OUTPUT_FIELDS):
        if group[0] in overrides:
            for field in group:
                values.pop(field)
    return AdapterSpec.model_validate({**values, **overrides})


# --------------------------------------------------------------------------------------------------
# Command-line values -> partial AdapterSpec fields


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: not a comma-separated list of numbers: {text!r}") from None


def parse_input_size(text: str) -> dict[str, Any]:
    """``96`` or ``224x192`` (H x W)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--classifier-input-size: expected N or HxW, got {text!r}")
    sizes = [int(p) for p in parts]
    return {"input_size": [sizes[0], sizes[-1]]}


def parse_intensity(text: str) -> dict[str, Any]:
    """``unit`` | ``imagenet`` | ``mean_std:MEAN:STD`` (comma lists) | ``range:LOW:HIGH``."""
    kind, *args = text.split(":")
    flag = "--classifier-intensity"
    if kind == "unit" and not args:
        return {"intensity": "unit"}
    if kind == "imagenet" and not args:
        return {"intensity": "mean_std", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    if kind == "mean_std" and len(args) == 2:
        return {"intensity": "mean_std", "mean": _floats(args[0], flag), "std": _floats(args[1], flag)}
    if kind == "range" and len(args) == 2:
        return {"intensity": "range", "range": [_floats(args[0], flag)[0], _floats(args[1], flag)[0]]}
    raise UserError(f"{flag}: expected unit, imagenet, mean_std:MEAN:STD or range:LOW:HIGH, got {text!r}")


def parse_output(text: str) -> dict[str, Any]:
    """``softmax2`` | ``logit`` | ``sigmoid`` | ``sigmoid:INDEX`` | ``sigmoid:NAME``."""
    kind, _, which = text.partition(":")
    if kind in ("softmax2", "logit") and not which:
        return {"output": kind}
    if kind == "sigmoid":
        if not which:
            return {"output": "sigmoid"}
        if which.isdigit():
            return {"output": "sigmoid", "output_index": int(which)}
        return {"output": "sigmoid", "output_name": which}
    raise UserError(f"--classifier-output: expected softmax2, logit, sigmoid, sigmoid:INDEX or sigmoid:NAME, "
                    f"got {text!r}")


# --------------------------------------------------------------------------------------------------
# The module


class NetworkInput(nn.Identity):
    """Marks the tensor the wrapped network receives. The audit matches evidence here when the network's
    own layers cannot be hooked (TorchScript): gradient x input instead of per-layer evidence."""


def adapt_input(x: torch.Tensor, spec: AdapterSpec) -> torch.Tensor:
    """``[0, 1]`` grey ``(N, 1, H, W)`` -> what the network expects (differentiable)."""
    if spec.input_size is not None and tuple(x.shape[-2:]) != tuple(spec.input_size):
        shrinking = x.shape[-2] > spec.input_size[0] or x.shape[-1] > spec.input_size[1]
        x = F.interpolate(x, size=tuple(spec.input_size), mode="bilinear", align_corners=False,
                          antialias=shrinking)
    if spec.channels != x.shape[1]:
        x = x.expand(-1, spec.channels, -1, -1)
    if spec.intensity == "mean_std":
        # python scalars for one value: the exact arithmetic of the package's former Normalize module
        if len(spec.mean) == 1 and len(spec.std) == 1:
            return (x - spec.mean[0]) / spec.std[0]
        mean = x.new_tensor(spec.mean).view(1, -1, 1, 1)
        return (x - mean) / x.new_tensor(spec.std).view(1, -1, 1, 1)
    if spec.intensity == "range":
        low, high = spec.range
        return x * (high - low) + low
    return x


def binary_logits(outputs: torch.Tensor, spec: AdapterSpec, source: str) -> torch.Tensor:
    """The network's outputs -> ``(N, 2)`` logits whose softmax is ``[P(negative), P(positive)]``."""
    if outputs.ndim != 2:
        raise UserError(f"{source}: the network returned shape {tuple(outputs.shape)}, expected (N, outputs)")
    if spec.output == "softmax2":
        if outputs.shape[1] != 2:
            raise UserError(f"{source}: the network has {outputs.shape[1]} outputs but the adapter's output "
                            "is softmax2; declare --classifier-output logit or sigmoid:INDEX")
        return outputs
    if spec.output == "logit":
        if outputs.shape[1] != 1:
            raise UserError(f"{source}: the network has {outputs.shape[1]} outputs but the adapter's output "
                            "is one logit; declare --classifier-output softmax2 or sigmoid:INDEX")
        logit = outputs
    else:
        if spec.output_index is None or spec.output_index >= outputs.shape[1]:
            raise UserError(f"{source}: sigmoid output index {spec.output_index} but the network has "
                            f"{outputs.shape[1]} outputs")
        logit = outputs[:, spec.output_index : spec.output_index + 1]
    return torch.cat([torch.zeros_like(logit), logit], dim=1)


class AdaptedClassifier(nn.Module):
    """A network behind its adapter: ``[0, 1]`` grey images in, two-class logits out.

    ``recipe``: how to rebuild the network (``{"name", "kwargs"}``; ``None`` for TorchScript), recorded
    by :func:`~pipeline.models.classifiers.save_classifier` with the adapter. ``source``: names the
    classifier in error messages (its file).
    """

    def __init__(self, net: nn.Module, adapter: AdapterSpec, recipe: dict[str, Any] | None = None,
                 source: str = "classifier") -> None:
        super().__init__()
        self.net = net
        self.network_input = NetworkInput()
        self.adapter = adapter
        self.recipe = recipe
        self.source = source

    @property
    def scripted(self) -> bool:
        return isinstance(self.net, torch.jit.ScriptModule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.net(self.network_input(adapt_input(x, self.adapter)))
        return binary_logits(outputs, self.adapter, self.source)
