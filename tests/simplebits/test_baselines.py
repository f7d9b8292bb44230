"""Matched-bpd baselines: blur, JPEG, downsampling, and the bisection that matches their bits."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.bpd import bits_per_dim
from pipeline.models.glow import Glow
from pipeline.simplebits.baselines import (
    apply_baseline,
    baseline_images,
    downsample,
    gaussian_blur,
    jpeg,
    match_bpd,
)

SIZE = 32


@pytest.fixture(scope="module")
def prior() -> Glow:
    """A tiny Glow whose ActNorm is initialised on near-flat grey: detail costs bits."""
    torch.manual_seed(0)
    glow = Glow(in_channels=1, levels=2, steps_per_level=2, hidden_channels=16)
    smooth = 0.5 + 0.03 * F.interpolate(torch.randn(16, 1, 4, 4), size=SIZE, mode="bilinear")
    glow.train()
    with torch.no_grad():
        glow.log_prob(smooth * 255 / 256 - 0.5 + 1 / 512)
    return glow.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(
        torch.rand(8, 1, 8, 8, generator=g), size=SIZE, mode="bilinear", align_corners=False
    )
    x = 0.3 + 0.4 * smooth + 0.15 * (torch.rand(8, 1, SIZE, SIZE, generator=g) - 0.5)
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def mean_bpd(prior, x):
    return float(bits_per_dim(prior, x, "midpoint").mean())


@pytest.mark.parametrize("kind", ["blur", "jpeg", "downsample"])
def test_identity_strength_returns_the_input_and_outputs_are_8bit(images, kind):
    weakest = {"blur": 0.0, "jpeg": 0.0, "downsample": 1.0}[kind]
    out = apply_baseline(images, kind, weakest)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.equal(torch.round(out * 255), out * 255)  # on the 8-bit grid
    if kind != "jpeg":  # JPEG at quality 100 is still lossy
        assert torch.equal(out, images.float() / 255)


def high_frequency(x: torch.Tensor) -> float:
    return float((x - F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean())


def test_each_baseline_removes_detail(images):
    detail = high_frequency(images.float() / 255)
    for out in (gaussian_blur(images, 2.0), jpeg(images, 5), downsample(images, 4.0)):
        assert high_frequency(out) < 0.6 * detail


@pytest.mark.parametrize(
    "kind, strengths", [("blur", [0.0, 0.5, 1.0, 2.0, 4.0]), ("downsample", [1.0, 2.0, 4.0, 8.0])]
)
def test_bpd_falls_monotonically_with_strength(prior, images, kind, strengths):
    bpds = [mean_bpd(prior, apply_baseline(images, kind, s)) for s in strengths]
    assert all(a > b for a, b in zip(bpds, bpds[1:])), bpds


@pytest.mark.parametrize("kind", ["blur", "downsample", "jpeg"])
def test_bisection_hits_the_target_bpd(prior, images, kind):
    original = mean_bpd(prior, images.float() / 255)
    strongest = mean_bpd(
        prior, apply_baseline(images, kind, {"blur": 8.0, "jpeg": 99.0, "downsample": 32.0}[kind])
    )
    target = strongest + 0.5 * (original - strongest)
    out, strength, achieved = match_bpd(images, target, kind, prior, tol=0.02 * original, batch_size=3)
    assert achieved == pytest.approx(mean_bpd(prior, out.load().float() / 255), rel=1e-5)
    # blur is continuous: within tolerance; JPEG qualities and downsampled sizes are integers, so the
    # best reachable setting is at most one step away
    tolerance = 0.02 * original if kind == "blur" else 0.15 * (original - strongest)
    assert abs(achieved - target) <= tolerance, (achieved, target)
    assert strength > 0


def test_targets_out_of_reach_give_the_ends_of_the_range(prior, images):
    original = mean_bpd(prior, images.float() / 255)
    out, strength, achieved = match_bpd(images, original + 5.0, "blur", prior)
    assert strength == 0.0 and torch.equal(out.load(), images)
    out, strength, achieved = match_bpd(images, -1e6, "blur", prior)
    assert strength == SIZE / 4 and achieved > -1e6
    # a target just beyond the strongest setting: the end nearer the target (the strongest) comes back
    strongest = mean_bpd(prior, apply_baseline(images, "blur", SIZE / 4))
    out, strength, achieved = match_bpd(images, strongest - 0.5, "blur", prior, tol=0.01)
    assert strength == SIZE / 4 and achieved == pytest.approx(strongest, rel=1e-5)


def test_bad_parameters_are_refused(images):
    with pytest.raises(ValueError, match="quality"):
        jpeg(images, 0)
    with pytest.raises(ValueError, match="factor"):
        downsample(images, 0.5)
    with pytest.raises(ValueError, match="kind"):
        apply_baseline(images, "median", 1.0)


@pytest.mark.parametrize("kind, strength", [("blur", 1.5), ("jpeg", 60.0), ("downsample", 3.0)])
def test_the_lazy_view_degrades_whatever_is_read(images, kind, strength):
    """``baseline_images`` indexes like a store; every read equals the baseline of those images."""
    view = baseline_images(images, kind, strength)
    whole = torch.round(apply_baseline(images, kind, strength) * 255).to(torch.uint8)
    assert len(view) == len(images) and view.shape == images.shape and view.dtype == torch.uint8
    assert torch.equal(view.load(), whole)
    assert torch.equal(view[2:5], whole[2:5])
    assert torch.equal(view[torch.tensor([6, 1])], whole[[6, 1]])
    assert torch.equal(view[np.array([3])], whole[[3]])
    assert torch.equal(view[4], whole[4])
    assert torch.equal(view.subset([7, 0]).load(), whole[[7, 0]])
    assert torch.equal(pickle.loads(pickle.dumps(view)).load(), whole)  # DataLoader workers get a copy
    with pytest.raises(ValueError, match="kind"):
        baseline_images(images, "median", 1.0)
