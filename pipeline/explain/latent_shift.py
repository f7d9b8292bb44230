"""Latent shift (Cohen et al. 2021, "Gifsplanation via Latent Shift") in the Glow prior's latent space.

Gifsplanation encodes an image with an autoencoder, moves the latent along the gradient of the
classifier's output with respect to the latent, decodes, and shows what changed. An autoencoder
does not reconstruct its input, so it compares two reconstructions. Our prior is a Glow, an exact
bijection: the unshifted latent decodes to the input itself, so the map is the counterfactual
change and nothing else.

Per batch:

1. ``z = glow(x)`` (the 8-bit image at its bin centres, as ``bits_per_dim(..., "midpoint")`` sees
   it); ``x0 = glow⁻¹(z)`` (= ``x`` up to float error) and ``g = ∂ log-odds(x0) / ∂z`` over every
   level's latent;
2. a direction per image: ``s · g / rms(g)`` with ``s = ±1`` (``direction``), so that a shift of
   ``λ`` changes the latent by ``λ`` per dimension in RMS whatever the gradient's scale;
3. Gifsplanation's search, batched: ``λ`` grows geometrically from ``min_shift`` to ``max_shift``;
   each image keeps the last step that was accepted and stops at the first step that reaches
   ``target_change`` in log-odds (accepted), or that is rejected: it changes the image by more
   than ``max_pixel_change`` (mean ``|Δx|`` relative to mean ``|x|``, Gifsplanation's
   ``search_max_pixel_diff_pct``), no longer moves the log-odds the intended way, or decodes to
   non-finite values;
4. the map: ``clip(glow⁻¹(z + λ·direction), 0, 1) − x0``, signed, in grey levels of ``[0, 1]``
   (all zero, with ``shift`` 0, where even the first step was rejected).

Why the steps start small and the pixel budget matters: a Glow's inverse is badly conditioned off
its training data. On the demo run's prior, a shift of 0.01 RMS along the gradient (about 2% of
the latents' own RMS) decoded to values of 1e22 in saturated regions, and even random directions
exploded at 0.1: the affine couplings divide by scales in (0, 1) that the flow makes tiny where it
is most certain, and the gradient points exactly where the inverse is most sensitive.

The Glow runs in float32 (no autocast): its inverse needs the precision; only the classifier
follows ``bf16``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from pipeline.config import StrictModel
from pipeline.explain.result import Explanation
from pipeline.explain.target import TaskLogit
from pipeline.models.bpd import to_glow_input

MIDPOINT = 0.5  # dequantization offset: the centre of each grey level's bin


class LatentShiftConfig(StrictModel):
    # toward_other_class: lower the log-odds of images the classifier calls positive, raise it for
    # the others (a counterfactual for every study); decrease / increase: one direction for all
    direction: Literal["toward_other_class", "decrease", "increase"] = "toward_other_class"
    min_shift: float = Field(1e-4, gt=0)  # the first step: RMS change per latent dimension
    max_shift: float = Field(0.1, gt=0)  # the last step
    steps: int = Field(10, ge=1)  # step sizes tried, geometrically spaced (a decode + classify pass each)
    target_change: float = Field(2.0, gt=0)  # log-odds change that ends the search (2: p 0.88 -> 0.5)
    max_pixel_change: float = Field(0.05, gt=0)  # mean |Δx| / mean |x| a step may reach (Gifsplanation: 5%)

    @model_validator(mode="after")
    def _check_range(self) -> LatentShiftConfig:
        if self.min_shift > self.max_shift:
            raise ValueError(f"min_shift {self.min_shift} must not exceed max_shift {self.max_shift}")
        return self

    def shifts(self) -> list[float]:
        return np.geomspace(self.min_shift, self.max_shift, self.steps).tolist()


def encode(prior: nn.Module, x01: Tensor) -> list[Tensor]:
    """The Glow latents (one per level) of 8-bit images ``x01`` in ``[0, 1]``."""
    zs, _ = prior(to_glow_input(x01.float(), MIDPOINT))
    return zs


def decode(prior: nn.Module, zs: list[Tensor]) -> Tensor:
    """Images in ``[0, 1]`` (unclipped) from Glow latents; the exact inverse of :func:`encode`."""
    glow_input = prior.reverse(zs)
    return (glow_input + 0.5 - MIDPOINT / 256.0) * (256.0 / 255.0)


def _direction_sign(logit: Tensor, direction: str) -> Tensor:
    if direction == "decrease":
        return -torch.ones_like(logit)
    if direction == "increase":
        return torch.ones_like(logit)
    return torch.where(logit >= 0, -1.0, 1.0).to(logit)


def _mean_abs(x: Tensor) -> Tensor:
    return x.abs().flatten(1).mean(1)


def latent_shift(task_logit: TaskLogit, prior: nn.Module, x01: Tensor,
                 config: LatentShiftConfig) -> Explanation:
    """Signed maps ``x_shifted − x``; ``extras``: the accepted ``shift`` (0: none) and ``logit_shifted``."""
    with torch.no_grad():
        zs = [z.detach() for z in encode(prior, x01)]
    zs = [z.requires_grad_() for z in zs]
    x0 = decode(prior, zs)
    logit = task_logit(x0)
    grads = torch.autograd.grad(logit.sum(), zs)
    with torch.no_grad():
        x0, logit = x0.detach(), logit.detach()
        num_dims = sum(g[0].numel() for g in grads)
        rms = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads) / num_dims).clamp_min(1e-12)
        sign = _direction_sign(logit, config.direction)
        scale = (sign / rms).view(-1, 1, 1, 1)
        directions = [g * scale for g in grads]
        budget = config.max_pixel_change * _mean_abs(x0).clamp_min(1e-6)

        chosen, shift, logit_shifted = x0.clone(), torch.zeros_like(logit), logit.clone()
        searching = torch.ones_like(logit, dtype=torch.bool)
        for lam in config.shifts():
            decoded = decode(prior, [z + lam * d for z, d in zip(zs, directions)])
            finite = torch.isfinite(decoded).flatten(1).all(1)
            shifted = decoded.nan_to_num(0.0).clamp(0.0, 1.0)
            moved = task_logit(shifted)
            accepted = (searching & finite & (_mean_abs(shifted - x0) <= budget)
                        & (sign * (moved - logit_shifted) > 0))
            chosen[accepted], logit_shifted[accepted] = shifted[accepted], moved[accepted]
            shift[accepted] = lam
            searching = accepted & (sign * (moved - logit) < config.target_change)
            if not bool(searching.any()):
                break
    return Explanation((chosen - x0)[:, 0].float().cpu(), logit.cpu(),
                       {"shift": shift.cpu(), "logit_shifted": logit_shifted.cpu()})
