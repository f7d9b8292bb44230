"""The simplifier: a residual image-to-image U-Net that is the identity at initialisation.

Output, for grey ``x`` in ``[0, 1]`` (SimpleBits Gen-1 ``WrapResidualIdentityUnet``, with a fix)::

    c      = eps + (1 - 2 eps) x                       # squeeze [0,1] into [eps, 1-eps]
    x_tilde = (sigmoid(logit(c) + alpha u(x)) - eps) / (1 - 2 eps)
    out    = quantize_8bit(soft_clamp(x_tilde, 0, 1))  # straight-through, values k/255

``u`` is the U-Net, ``alpha`` a learned scalar initialised to 0, so ``out == x`` exactly on the 8-bit
grid at initialisation. The paper clamps ``x`` to ``[1e-3, 1-1e-3]`` instead; a saturated white
marker then sits where the sigmoid's slope is ~0.001, and gradient descent cannot remove it. The
affine squeeze with a large ``eps`` (default 0.05) keeps the slope at saturated pixels within ~5x
of mid-grey while the inverse affine maps the identity back onto the input exactly. The edit is
still multiplicative-like in logit space: small changes near black/white, large in mid-tones.

``mode="additive"`` is the simpler alternative ``x + alpha u(x)`` (same clamp and quantisation).

``mode="scale_space"`` (the default) lets the U-Net choose, per pixel, how much detail to keep. With
``z = logit(c)`` and ``z_k`` its Gaussian blurs at ``scales`` (pixels at 64 px, scaled with the image)::

    z_tilde = z + alpha (u(x) + sum_k w_k(x) (z_k - z))

where the U-Net outputs ``u`` and the per-pixel weights ``w_k`` (1 + K channels). ``w_k = 1`` on a
region replaces it by its blur at scale k, ``w_k = 0`` keeps it, so flattening the upper lung fields
while keeping the costophrenic angles, or painting out a burned-in marker, is a smooth weight map
rather than the pixel-exact negative of the detail that the logit form has to learn. The identity at
initialisation is exact as before (zero head or zero alpha).

Single channel in and out: a radiograph stays grey (the paper's Gen-2 greyscale projection is
unnecessary by construction). No BatchNorm: a per-channel affine (``AffineOnChannels``) like the
paper's, so an image's simplification never depends on the rest of its batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import PathNotFoundError
from pipeline.models.bpd import quantize_8bit
from pipeline.runtime.atomic import atomic_path, atomic_write_text
from pipeline.runtime.checkpoint import unwrap

SIMPLIFIER_MODES = ("scale_space", "logit", "additive")
DEFAULT_SCALES = (1.0, 2.0, 4.0, 8.0)  # Gaussian sigmas in pixels of a 64 px image
SIMPLIFIER_INITS = ("zero_head", "zero_alpha")


def soft_clamp(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Clamp in the forward pass, identity gradient (straight-through), as the paper's ``soft_clamp``."""
    return x + (x.clamp(low, high) - x).detach()


class AffineOnChannels(nn.Module):
    """Learnable per-channel scale and shift (init 1, 0): normalisation without data statistics."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class UNetLevel(nn.Module):
    """One pix2pix level: 4x4 stride-2 conv down, the inner levels, 4x4 stride-2 transposed conv up, skip."""

    def __init__(self, in_channels: int, channels: int, inner: UNetLevel | None) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), AffineOnChannels(channels), nn.ELU()
        )
        self.inner = inner
        # an inner level returns as many channels as it takes, so the skip concatenation doubles them
        up_in = channels if inner is None else 2 * channels
        self.up = nn.Sequential(
            nn.ConvTranspose2d(up_in, in_channels, 4, stride=2, padding=1), AffineOnChannels(in_channels), nn.ELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        if self.inner is not None:
            h = torch.cat([self.inner(h), h], dim=1)
        return self.up(h)


class UNet(nn.Module):
    """pix2pix-like U-Net with ``levels`` stride-2 levels; channels double per level up to ``max_channels``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32, levels: int = 4,
                 max_channels: int = 256) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"U-Net needs at least one level, got {levels}")
        widths = [min(base_channels * 2**i, max_channels) for i in range(levels)]
        self.levels = levels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base_channels, 3, padding=1), nn.ELU())
        inner: UNetLevel | None = None
        for i in reversed(range(levels)):
            level_in = base_channels if i == 0 else widths[i - 1]
            inner = UNetLevel(level_in, widths[i], inner)
        self.body = inner
        self.head = nn.Conv2d(2 * base_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2**self.levels or x.shape[-2] % 2**self.levels:
            raise ValueError(f"U-Net with {self.levels} levels needs H, W divisible by {2**self.levels}, "
                             f"got {tuple(x.shape[-2:])}")
        h = self.stem(x)
        return self.head(torch.cat([self.body(h), h], dim=1))


def gaussian_blur_2d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` with reflect padding (radius ``ceil(3 sigma)``), differentiable."""
    radius = min(math.ceil(3.0 * sigma), min(x.shape[-2:]) - 1)
    if sigma <= 0 or radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(-1, 1, 1, 2 * radius + 1),
                 groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(-1, 1, 2 * radius + 1, 1),
                    groups=x.shape[1])


class Simplifier(nn.Module):
    """Residual U-Net simplifier: identity (on the 8-bit grid) at init, 8-bit grey output in [0, 1]."""

    def __init__(self, base_channels: int = 32, levels: int = 4, max_channels: int = 256,
                 mode: str = "scale_space", eps: float = 0.05, init: str = "zero_head",
                 scales: tuple[float, ...] | list[float] = DEFAULT_SCALES) -> None:
        super().__init__()
        if mode not in SIMPLIFIER_MODES:
            raise ValueError(f"simplifier mode must be one of {SIMPLIFIER_MODES}, got {mode!r}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
        if init not in SIMPLIFIER_INITS:
            raise ValueError(f"simplifier init must be one of {SIMPLIFIER_INITS}, got {init!r}")
        self.scales = tuple(float(v) for v in scales) if mode == "scale_space" else ()
        self.config: dict[str, Any] = {"base_channels": base_channels, "levels": levels,
                                       "max_channels": max_channels, "mode": mode, "eps": eps, "init": init,
                                       "scales": list(self.scales)}
        self.unet = UNet(1, 1 + len(self.scales), base_channels, levels, max_channels)
        self.alpha = nn.Parameter(torch.zeros(()))
        if init == "zero_head":
            # Identity either way. With alpha = 0 (the paper's init) only alpha gets a gradient at
            # first, so Adam spends ~1/lr steps growing it before the U-Net learns anything; a zero
            # output conv with alpha = 1 lets every weight learn from the first step.
            with torch.no_grad():
                nn.init.zeros_(self.unet.head.weight)
                nn.init.zeros_(self.unet.head.bias)
                self.alpha.fill_(1.0)
        self.mode = mode
        self.eps = eps

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous simplified image before clamping and quantisation."""
        out = self.unet(2.0 * x - 1.0)
        u = out[:, :1]
        if self.mode == "additive":
            return x + self.alpha * u
        z = torch.logit(self.eps + (1.0 - 2.0 * self.eps) * x)
        if self.mode == "scale_space":
            pixels_per_unit = min(x.shape[-2:]) / 64.0
            for k, sigma in enumerate(self.scales, start=1):
                u = u + out[:, k:k + 1] * (gaussian_blur_2d(z, sigma * pixels_per_unit) - z)
        mixed = torch.sigmoid(z + self.alpha * u)
        return (mixed - self.eps) / (1.0 - 2.0 * self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"simplifier expects grey images (N, 1, H, W), got {tuple(x.shape)}")
        x_tilde = self.edit(x.float())
        return quantize_8bit(soft_clamp(x_tilde, 0.0, 1.0))


def create_simplifier(**config: Any) -> Simplifier:
    """``Simplifier(**config)``; the config is what ``simplifier.json`` stores under ``kwargs``."""
    return Simplifier(**config)


def save_simplifier(simplifier: Simplifier, path: str | Path, **meta: Any) -> Path:
    """``path`` (safetensors) plus a sibling ``.json`` with the constructor kwargs and ``meta``."""
    path = Path(path)
    module = unwrap(simplifier)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    record = {"kwargs": module.config, **meta}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    return path


def load_simplifier(path: str | Path) -> Simplifier:
    """Rebuild a simplifier saved by :func:`save_simplifier`, in eval mode."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise PathNotFoundError(f"simplifier weights or {meta_path.name} missing: {path}")
    simplifier = create_simplifier(**json.loads(meta_path.read_text())["kwargs"])
    simplifier.load_state_dict(load_file(str(path)))
    return simplifier.eval()
