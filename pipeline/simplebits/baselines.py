"""Simplification baselines at matched bits: Gaussian blur, JPEG, downsampling.

Each baseline has one strength knob whose increase throws away more detail (blur ``sigma`` in
pixels, JPEG ``100 - quality``, downsampling ``factor``). :func:`match_bpd` finds the strength whose
outputs have a given mean bpd under the prior (deterministic, midpoint dequantisation) by bisection,
so every method is compared with SimpleBits at the same code length, as in the paper's rebuttal.
All outputs are back on the 8-bit grid. :func:`baseline_images` is the lazy form over a whole split:
it degrades each batch when it is read, so nothing degraded is ever held for the whole split.
"""

from __future__ import annotations

import io
import logging
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.dataset import Images
from pipeline.models.simplifier import gaussian_blur_2d
from pipeline.simplebits.evaluate import MappedImages, as_float_images, deterministic_bpd

log = logging.getLogger(__name__)

KINDS = ("blur", "jpeg", "downsample")


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel radius ``ceil(3 sigma)``, reflect padding; ``sigma <= 0``: identity."""
    return _on_grid(gaussian_blur_2d(as_float_images(images), sigma))


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip through Pillow at ``quality`` (1..100), grey images."""
    from PIL import Image

    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must lie in 1..100, got {quality}")
    x = as_float_images(images)
    pixels = torch.round(x[:, 0] * 255).to(torch.uint8).cpu().numpy()
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        out.append(np.asarray(Image.open(buffer).convert("L")))
    return torch.from_numpy(np.stack(out)).float().div(255.0)[:, None].to(x.device)


def downsample(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Area downsampling by ``factor`` (>= 1), then bilinear upsampling back to the input size."""
    if factor < 1:
        raise ValueError(f"downsampling factor must be >= 1, got {factor}")
    x = as_float_images(images)
    h, w = x.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    if small == (h, w):
        return _on_grid(x)
    down = F.interpolate(x, size=small, mode="area")
    return _on_grid(F.interpolate(down, size=(h, w), mode="bilinear", align_corners=False))


def strength_range(kind: str, size: int) -> tuple[float, float]:
    """(weakest = identity, strongest) strength of a baseline for ``size``-pixel images."""
    if kind == "blur":
        return 0.0, size / 4.0
    if kind == "jpeg":
        return 0.0, 99.0  # strength = 100 - quality
    if kind == "downsample":
        return 1.0, float(size)
    raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")


def apply_baseline(images: torch.Tensor, kind: str, strength: float) -> torch.Tensor:
    """``kind`` at ``strength`` (see :func:`strength_range`); JPEG strength is ``100 - quality``."""
    if kind == "blur":
        return gaussian_blur(images, strength)
    if kind == "jpeg":
        return jpeg(images, int(round(100 - strength)))
    if kind == "downsample":
        return downsample(images, strength)
    raise ValueError(f"baseline kind must be one of {KINDS}, got {kind!r}")


def baseline_images(images: Images | torch.Tensor, kind: str, strength: float) -> MappedImages:
    """``images`` with ``kind`` at ``strength`` applied batch by batch when read (uint8, lazy)."""
    strength_range(kind, 1)  # refuse an unknown kind now rather than at the first read
    return MappedImages(images, partial(apply_baseline, kind=kind, strength=strength))


def match_bpd(
    images: Images | torch.Tensor,
    target_bpd: float,
    kind: str,
    prior: nn.Module,
    tol: float = 0.02,
    max_iter: int = 24,
    batch_size: int = 128,
    sharded: bool = False,
) -> tuple[MappedImages, float, float]:
    """Bisection on the strength so that the mean deterministic bpd of the outputs is ``target_bpd``.

    Returns ``(images_out, strength, achieved_bpd)``; ``images_out`` is the lazy uint8 view
    (:func:`baseline_images`) at the strength returned. Every bpd pass streams ``images`` batch by
    batch (``sharded``: over torchrun ranks, all of which must call). Stops within ``tol`` bits of the
    target or when the strength interval can no longer change the output (JPEG quality and
    downsampling sizes are integers); then the end of the final interval nearer the target is
    returned. A target at or above the weakest setting's bpd gives the weakest (the identity, except
    for JPEG). A target below the strongest setting's bpd cannot be reached: then whichever end is
    nearer the target is returned, with a warning (JPEG can even *add* bits: block artefacts are
    expensive under a smooth prior).
    """
    size = int(images.shape[-1])
    low, high = strength_range(kind, size)

    def evaluate(strength: float) -> tuple[MappedImages, float]:
        out = baseline_images(images, kind, strength)
        return out, float(deterministic_bpd(prior, out, batch_size, sharded=sharded).mean())

    out_low, bpd_low = evaluate(low)
    if bpd_low <= target_bpd + tol:
        return out_low, low, bpd_low
    out_high, bpd_high = evaluate(high)
    if bpd_high >= target_bpd - tol:
        if bpd_high <= target_bpd + tol:
            return out_high, high, bpd_high
        log.warning(
            "%s cannot reach %.3f bpd (weakest gives %.3f, strongest %.3f)",
            kind,
            target_bpd,
            bpd_low,
            bpd_high,
        )
        return (out_low, low, bpd_low) if bpd_low <= bpd_high else (out_high, high, bpd_high)
    for _ in range(max_iter):
        if high - low <= (1.0 if kind == "jpeg" else 1e-3 * max(1.0, high)):
            break
        middle = 0.5 * (low + high)
        if kind == "jpeg":
            middle = float(round(middle))
            if middle in (low, high):
                break
        out_mid, bpd_mid = evaluate(middle)
        if abs(bpd_mid - target_bpd) <= tol:
            return out_mid, middle, bpd_mid
        if bpd_mid > target_bpd:
            low, out_low, bpd_low = middle, out_mid, bpd_mid
        else:
            high, out_high, bpd_high = middle, out_mid, bpd_mid
    if abs(bpd_low - target_bpd) <= abs(bpd_high - target_bpd):
        return out_low, low, bpd_low
    return out_high, high, bpd_high
