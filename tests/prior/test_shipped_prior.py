"""Acceptance test of the shipped default prior: bpd must mean simplicity at the working sizes."""

import numpy as np
import pytest
import torch

from pipeline.models.bpd import bits_per_dim
from pipeline.prior import SHIPPED_PRIOR, load_prior, read_prior_info
from pipeline.prior.data import render_reference_radiographs
from pipeline.prior.evaluate import simplicity_ordering

pytestmark = pytest.mark.skipif(not SHIPPED_PRIOR.is_file(), reason="shipped prior weights not present")


@pytest.fixture(scope="module")
def prior():
    return load_prior()


@pytest.fixture(scope="module")
def ordering(prior):
    radiographs = render_reference_radiographs(6, 128, seed=2024)
    return simplicity_ordering(prior, radiographs, sizes=(64, 128))


@pytest.mark.parametrize("size", [64, 128])
def test_noise_above_radiographs_above_blurred_above_flat(ordering, size):
    means = ordering[size]
    assert means["noise"] > means["radiograph"] > means["blurred"] > means["flat"], means
    assert means["radiograph"] - means["flat"] > 0.3, means


def test_shipped_prior_is_frozen_and_documented(prior):
    assert not prior.training and not any(p.requires_grad for p in prior.parameters())
    info = read_prior_info()
    assert info["command"].startswith("simplebits prior train") and "seed" in info


def test_bpd_is_differentiable_through_the_shipped_prior(prior):
    x = (torch.from_numpy(render_reference_radiographs(1, 64, seed=5)).float() / 255).requires_grad_(True)
    bits_per_dim(prior, x, dequantize="midpoint").sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert np.isfinite(float(bits_per_dim(prior, x.detach(), dequantize="uniform")))
