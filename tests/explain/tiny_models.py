"""Tiny models for the explain tests: a classifier trained to look at one known square, and a Glow.

Imported by name (tests/ and tests/explain/ are on sys.path through pytest's rootdir conftest).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.classifiers import create_classifier
from pipeline.models.glow import Glow

SIZE = 32
# the only place where the label shows: rows 18-25, columns 4-11 (lower left)
SQUARE = (slice(18, 26), slice(4, 12))


def square_mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[SQUARE] = True
    return mask


def square_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, SIZE, SIZE)`` on the 8-bit grid and labels: positives carry a checkerboard at SQUARE.

    The checkerboard has zero mean, so the image's brightness says nothing about the label (a
    global-pooling network would otherwise read the square's extra brightness anywhere); the only
    evidence is the pattern inside the square.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    labels[:2] = torch.tensor([1, 0])  # both classes, whatever the seed
    # brightness and noise vary from image to image, so that nothing outside the square predicts the label
    brightness = 0.25 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = 0.02 + 0.05 * torch.rand(n, 1, 1, 1, generator=generator)
    images = brightness + noise * torch.randn(n, 1, SIZE, SIZE, generator=generator)
    rows, cols = SQUARE
    checkerboard = 0.25 * (1 - 2 * ((torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2)).float()
    images[labels == 1, :, rows, cols] += checkerboard[rows, cols]
    return torch.round(images.clamp(0, 1) * 255) / 255, labels


def trained_square_classifier(seed: int = 0, steps: int = 150) -> nn.Module:
    """An ``nf_cnn`` trained to tell square from no square (a few seconds on one CPU core)."""
    torch.manual_seed(seed)
    model = create_classifier("nf_cnn", widths=[8, 16, 32])
    images, labels = square_images(256, seed=seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = torch.randperm(len(images), generator=torch.Generator().manual_seed(step))[:64]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def randomised_classifier(seed: int = 1) -> nn.Module:
    """The same architecture with fresh random weights (Adebayo et al.'s model randomisation)."""
    torch.manual_seed(seed)
    return create_classifier("nf_cnn", widths=[8, 16, 32]).eval()


def tiny_glow(size: int = SIZE, seed: int = 0) -> Glow:
    """2 levels x 2 steps, 16 hidden channels, ActNorm set on smooth images (as benchmarks/scale.py's)."""
    torch.manual_seed(seed)
    glow = Glow(in_channels=1, levels=2, steps_per_level=2, hidden_channels=16)
    glow.train()
    with torch.no_grad():
        smooth = 0.5 + 0.03 * F.interpolate(torch.randn(16, 1, 4, 4), size=size, mode="bilinear")
        glow.log_prob(smooth * 255 / 256 - 0.5 + 1 / 512)
    return glow.eval().requires_grad_(False)
