"""Multiscale Glow (Kingma & Dhariwal 2018) for single-channel radiographs.

Layout per level: 2×2 squeeze, ``K`` flow steps (ActNorm → invertible 1×1 conv (LU) → affine
coupling), then, except on the last level, half of the channels leave the flow as a latent whose
Gaussian prior is predicted from the kept half. The last level's latent has a learned per-channel
Gaussian. Everything is convolutional, so one set of weights serves any ``H, W`` divisible by
``2**levels``.

The flow itself runs in float32 even under bf16 autocast: log-determinants and the inverse need the
precision. Only the coupling networks (the bulk of the compute) follow the caller's autocast.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision tensors (from autocast regions) back to float32; float64 stays (for exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def squeeze2x2(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2), space to depth."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze2x2(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    x = x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c // 4, h * 2, w * 2)


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Per-sample sum of diagonal Gaussian log densities (natural log)."""
    log_density = -0.5 * (LOG_2PI + 2 * log_std + ((z - mean) * torch.exp(-log_std)) ** 2)
    return log_density.flatten(1).sum(1)


class ActNorm(nn.Module):
    """Per-channel ``(x + bias) * exp(log_scale)``, initialised so that the first batch has unit variance."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # A buffer, so that loaded weights are never re-initialised from data.
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        x = x.float()
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self._initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvertibleConv1x1(nn.Module):
    """Invertible 1×1 conv, ``W = P L (U + diag(sign · exp(log_s)))``: log|det W| is ``sum(log_s)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        weight = torch.linalg.qr(torch.randn(channels, channels))[0]
        p, lower, upper = torch.linalg.lu(weight)
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p)
        self.register_buffer("sign_s", torch.sign(diag))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(diag)))

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            x = at_least_fp32(x)
            y = F.conv2d(x, self.weight().to(x.dtype)[:, :, None, None])
        logdet = self.log_s.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def reverse(self, y: Tensor) -> Tensor:
        with torch.autocast(y.device.type, enabled=False):
            y = at_least_fp32(y)
            inverse = torch.linalg.inv(self.weight().double()).to(y.dtype)
            return F.conv2d(y, inverse[:, :, None, None])


class ZeroConv2d(nn.Module):
    """3×3 conv starting at exactly zero output, with a learned output log-scale (Glow's ``Conv2dZeros``)."""

    def __init__(self, in_channels: int, out_channels: int, log_scale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.log_scale_factor = log_scale_factor

    def forward(self, x: Tensor) -> Tensor:
        return at_least_fp32(self.conv(x)) * torch.exp(self.log_scale * self.log_scale_factor)


class CouplingNetwork(nn.Module):
    """conv3×3 → ActNorm → ReLU → conv1×1 → ActNorm → ReLU → zero-initialised conv3×3."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden_channels)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False)
        self.norm2 = ActNorm(hidden_channels)
        self.out = ZeroConv2d(hidden_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.norm1(self.conv1(x))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        return self.out(h)


class AffineCoupling(nn.Module):
    """``y_b = (x_b + shift(x_a)) * scale(x_a)`` with ``scale = sigmoid(raw + 2)`` bounded in (0, 1).

    The bounded scale (as in the SimpleBits/invglow code) keeps training stable; the zero-initialised
    last conv makes every coupling start at ``scale = sigmoid(2)``, ``shift = 0``.
    ``coupling="additive"`` drops the scale (volume preserving).
    """

    def __init__(self, channels: int, hidden_channels: int, coupling: str = "affine") -> None:
        super().__init__()
        if coupling not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        self.affine = coupling == "affine"
        self.split = channels // 2
        out = 2 * (channels - self.split) if self.affine else channels - self.split
        self.net = CouplingNetwork(self.split, hidden_channels, out)

    def _shift_scale(self, x_a: Tensor) -> tuple[Tensor, Tensor | None]:
        h = at_least_fp32(self.net(x_a))
        if not self.affine:
            return h, None
        shift, raw = h[:, 0::2], h[:, 1::2]
        return shift, torch.sigmoid(raw + 2.0) + 1e-6

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, scale = self._shift_scale(x_a)
        y_b = x_b + shift
        if scale is None:
            return torch.cat([x_a, y_b], 1), x.new_zeros(x.shape[0])
        return torch.cat([x_a, y_b * scale], 1), torch.log(scale).flatten(1).sum(1)

    def reverse(self, y: Tensor) -> Tensor:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, scale = self._shift_scale(y_a)
        x_b = y_b if scale is None else y_b / scale
        return torch.cat([y_a, x_b - shift], 1)


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden_channels: int, coupling: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ActNorm(channels), InvertibleConv1x1(channels),
             AffineCoupling(channels, hidden_channels, coupling)]
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def reverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.reverse(y)
        return y


class Glow(nn.Module):
    """Multiscale Glow over ``(N, in_channels, H, W)`` inputs in Glow range (``[-0.5, 0.5)`` plus noise).

    ``forward`` returns the per-level latents and the flow's log|det J| (per sample);
    ``log_prob`` adds the priors: the natural-log density of the input, per sample.
    """

    def __init__(
        self,
        in_channels: int = 1,
        levels: int = 3,
        steps_per_level: int = 4,
        hidden_channels: int = 64,
        coupling: str = "affine",
    ) -> None:
        super().__init__()
        if levels < 1 or steps_per_level < 1:
            raise ValueError(f"levels and steps_per_level must be >= 1, got {levels}, {steps_per_level}")
        self.hparams: dict[str, Any] = {
            "in_channels": in_channels,
            "levels": levels,
            "steps_per_level": steps_per_level,
            "hidden_channels": hidden_channels,
            "coupling": coupling,
        }
        self.levels = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        channels = in_channels
        for level in range(levels):
            channels *= 4
            self.levels.append(nn.ModuleList(FlowStep(channels, hidden_channels, coupling)
                                             for _ in range(steps_per_level)))
            if level < levels - 1:
                kept = channels // 2
                self.split_priors.append(ZeroConv2d(kept, 2 * (channels - kept)))
                channels = kept
        self.top_mean = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.top_log_std = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @property
    def divisor(self) -> int:
        """``H`` and ``W`` must be multiples of this."""
        return 2 ** len(self.levels)

    def check_input(self, x: Tensor) -> None:
        expected = self.hparams["in_channels"]
        if x.ndim != 4 or x.shape[1] != expected:
            raise ValueError(f"Glow expects (N, {expected}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.divisor or x.shape[3] % self.divisor:
            raise ValueError(
                f"Glow with {len(self.levels)} levels needs H, W divisible by {self.divisor}, "
                f"got {tuple(x.shape[2:])}"
            )

    def _split_prior(self, level: int, kept: Tensor) -> tuple[Tensor, Tensor]:
        h = self.split_priors[level](kept)
        return h[:, 0::2], h[:, 1::2]

    def _encode(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Latents, flow log|det J| and prior log density, each per sample."""
        self.check_input(x)
        h = at_least_fp32(x)
        logdet = h.new_zeros(h.shape[0])
        prior = h.new_zeros(h.shape[0])
        zs: list[Tensor] = []
        for level, steps in enumerate(self.levels):
            h = squeeze2x2(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level < len(self.levels) - 1:
                kept = h.shape[1] // 2
                h, z = h[:, :kept], h[:, kept:]
                mean, log_std = self._split_prior(level, h)
                prior = prior + gaussian_log_prob(z, mean, log_std)
                zs.append(z)
        zs.append(h)
        prior = prior + gaussian_log_prob(h, self.top_mean, self.top_log_std)
        return zs, logdet, prior

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        zs, logdet, _ = self._encode(x)
        return zs, logdet

    def log_prob(self, x: Tensor) -> Tensor:
        """Natural-log density of ``x`` (Glow range, continuous), per sample."""
        _, logdet, prior = self._encode(x)
        return logdet + prior

    def reverse(self, zs: list[Tensor]) -> Tensor:
        """Inverse of ``forward``: latents (as returned by ``forward``) -> input."""
        if len(zs) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} latents, got {len(zs)}")
        h = at_least_fp32(zs[-1])
        for level in range(len(self.levels) - 1, -1, -1):
            if level < len(self.levels) - 1:
                h = torch.cat([h, at_least_fp32(zs[level])], 1)
            for step in reversed(self.levels[level]):
                h = step.reverse(h)
            h = unsqueeze2x2(h)
        return h

    @torch.no_grad()
    def sample(self, n: int, height: int, width: int, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` inputs in Glow range from the model (latents scaled by ``temperature``)."""
        device = self.top_mean.device
        top_shape = (n, self.top_mean.shape[1], height // self.divisor, width // self.divisor)
        h = self.top_mean + temperature * torch.exp(self.top_log_std) * torch.randn(top_shape, device=device)
        for level in range(len(self.levels) - 1, -1, -1):
            if level < len(self.levels) - 1:
                mean, log_std = self._split_prior(level, h)
                h = torch.cat([h, mean + temperature * torch.exp(log_std) * torch.randn_like(mean)], 1)
            for step in reversed(self.levels[level]):
                h = step.reverse(h)
            h = unsqueeze2x2(h)
        return h
