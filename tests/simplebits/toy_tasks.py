"""Tiny tasks and models shared by the SimpleBits tests (imported by name, like tests/report/synthetic_run).

The distractor task: 32×32 images whose label is a small square darker (0) or brighter (1) than
grey on the left, while the right half carries a random texture unrelated to the label.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.data.ingest import Cohort
from pipeline.models.glow import Glow

SIZE = 32


def distractor_cohort(n: int, seed: int, split: str = "train", task: str = "effusion") -> Cohort:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, SIZE, SIZE), 0.5)
    x[:, :, 5:11, 5:11] = (0.3 + 0.4 * y.float()).view(n, 1, 1, 1)
    x[:, :, :, SIZE // 2 :] = 0.2 + 0.6 * torch.rand(n, 1, SIZE, SIZE // 2, generator=g)
    frame = pd.DataFrame({"study_id": [f"std-{split}-{i:04d}" for i in range(n)], task: y.numpy(), "split": split})
    return Cohort(torch.round(x * 255).to(torch.uint8), frame)


def tiny_prior() -> Glow:
    """A small random Glow whose ActNorm was initialised on near-flat images (so bpd is finite)."""
    torch.manual_seed(0)
    glow = Glow(in_channels=1, levels=2, steps_per_level=2, hidden_channels=16)
    smooth = 0.5 + 0.03 * F.interpolate(torch.randn(16, 1, 4, 4), size=SIZE, mode="bilinear")
    glow.train()
    with torch.no_grad():  # data-dependent ActNorm init
        glow.log_prob(smooth * 255 / 256 - 0.5 + 1 / 512)
    return glow.eval().requires_grad_(False)
