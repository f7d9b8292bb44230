"""Bits per dimension of 8-bit images under a Glow: the SimpleBits code length.

Paper convention (SimpleBits, ``get_bpd``): an image ``x`` in ``[0, 1]`` on the grid ``k/255`` enters
the Glow as ``g = x·255/256 − 0.5 + u/256``, so one grey level is a bin of width ``1/256``.
``u ~ U(0, 1)`` (uniform dequantization, an upper bound on the 8-bit code length in expectation) or
``u = 0.5`` (``"midpoint"``: deterministic, the same image always gets the same bpd). Then

    bpd = (−ln p(g) + D·ln 256) / (D·ln 2)

with ``D`` the number of pixels. Everything is differentiable with respect to ``x``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DEQUANTIZE_MODES = ("uniform", "midpoint")


def quantize_8bit(x01: Tensor) -> Tensor:
    """Round to the 8-bit grid ``k/255`` in the forward pass, identity gradient (straight-through)."""
    return x01 + (torch.round(x01 * 255.0) / 255.0 - x01).detach()


def to_glow_input(x01: Tensor, u: Tensor | float) -> Tensor:
    """``x·255/256 − 0.5 + u/256``: ``u`` in ``[0, 1)`` picks the position inside the grey-level bin."""
    return x01 * (255.0 / 256.0) - 0.5 + u / 256.0


def dequantization_offsets(
    x01: Tensor, dequantize: str = "uniform", generator: torch.Generator | None = None
) -> Tensor | float:
    """``u`` for :func:`to_glow_input`: uniform noise, or ``0.5`` (bin centre) for ``"midpoint"``."""
    if dequantize == "midpoint":
        return 0.5
    if dequantize == "uniform":
        return torch.rand(x01.shape, generator=generator, device=x01.device, dtype=x01.dtype)
    raise ValueError(f"dequantize must be one of {DEQUANTIZE_MODES}, got {dequantize!r}")


def bpd_from_log_prob(log_prob: Tensor, num_dims: int) -> Tensor:
    """Continuous log density in Glow range (natural log) -> bits per dimension of the 8-bit image."""
    return (-log_prob + num_dims * math.log(256.0)) / (num_dims * math.log(2.0))


def glow_input_bpd(model: nn.Module, glow_input: Tensor) -> Tensor:
    """bpd per sample of an already dequantized Glow input ``(N, C, H, W)``."""
    num_dims = glow_input[0].numel()
    return bpd_from_log_prob(model.log_prob(glow_input), num_dims)


def bits_per_dim(
    model: nn.Module,
    x01: Tensor,
    dequantize: str = "uniform",
    generator: torch.Generator | None = None,
) -> Tensor:
    """bpd per sample ``Tensor[N]`` of images ``x01`` ``(N, C, H, W)`` in ``[0, 1]`` on the 8-bit grid.

    ``x01`` is used as given (quantize first with :func:`quantize_8bit` if it is not on the grid);
    gradients flow to ``x01`` and, unless frozen, to the model.
    """
    if x01.ndim != 4:
        raise ValueError(f"bits_per_dim expects (N, C, H, W) images, got shape {tuple(x01.shape)}")
    u = dequantization_offsets(x01, dequantize, generator)
    return glow_input_bpd(model, to_glow_input(x01, u))
