import math

import pytest
import torch

from pipeline.models.bpd import bits_per_dim, quantize_8bit, to_glow_input
from pipeline.models.glow import Glow


def identity_like_glow(levels: int = 2) -> Glow:
    """Untrained, eval mode: ActNorm at identity, additive couplings start at zero shift, the 1×1
    convolutions are orthogonal and the priors standard normal, so the flow is an orthogonal map."""
    torch.manual_seed(0)
    return Glow(levels=levels, steps_per_level=2, hidden_channels=8, coupling="additive").eval()


def test_bpd_matches_standard_normal_by_hand():
    model = identity_like_glow()
    x = torch.randint(0, 256, (3, 1, 8, 8)).float() / 255.0
    g = x * 255 / 256 - 0.5 + 0.5 / 256
    d = 64
    log_p = -0.5 * d * math.log(2 * math.pi) - 0.5 * (g**2).flatten(1).sum(1)
    expected = (-log_p + d * math.log(256)) / (d * math.log(2))
    assert torch.allclose(bits_per_dim(model, x, dequantize="midpoint"), expected, atol=1e-4)


def test_midpoint_is_deterministic_and_uniform_is_noisy():
    model = identity_like_glow()
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(bits_per_dim(model, x, "midpoint"), bits_per_dim(model, x, "midpoint"))
    gen = torch.Generator().manual_seed(0)
    a = bits_per_dim(model, x, "uniform", generator=gen)
    b = bits_per_dim(model, x, "uniform", generator=gen)
    assert not torch.equal(a, b)
    assert torch.equal(a, bits_per_dim(model, x, "uniform", generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="dequantize"):
        bits_per_dim(model, x, "gaussian")


def test_glow_input_range_is_one_bin_per_grey_level():
    black, white = torch.zeros(1), torch.ones(1)
    assert float(to_glow_input(black, 0.0)) == -0.5
    assert float(to_glow_input(white, 1.0)) == pytest.approx(0.5)
    step = to_glow_input(torch.tensor([1 / 255]), 0.0) - to_glow_input(black, 0.0)
    assert float(step) == pytest.approx(1 / 256)


@pytest.mark.parametrize("fill", ["black", "white", "noise"])
def test_gradients_are_finite(fill):
    torch.manual_seed(0)
    model = Glow(levels=2, steps_per_level=2, hidden_channels=8)
    model.train()
    model.log_prob(torch.rand(4, 1, 16, 16) - 0.5)  # data-dependent init on generic data
    model.eval()
    x = {"black": torch.zeros(2, 1, 16, 16), "white": torch.ones(2, 1, 16, 16),
         "noise": torch.randint(0, 256, (2, 1, 16, 16)) / 255.0}[fill].requires_grad_(True)
    bpd = bits_per_dim(model, quantize_8bit(x))
    bpd.sum().backward()
    assert torch.isfinite(bpd).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_quantize_8bit_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.0, 0.3, 0.5011, 1.0], requires_grad=True)
    q = quantize_8bit(x)
    assert torch.equal(q, torch.round(x.detach() * 255) / 255)
    (q * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))
