import pytest
import torch

from pipeline.models.glow import Glow, squeeze2x2, unsqueeze2x2


def randomized_glow(seed: int = 0, **kwargs) -> Glow:
    """A Glow whose every parameter is perturbed, so couplings and priors are far from identity."""
    torch.manual_seed(seed)
    model = Glow(**{"levels": 2, "steps_per_level": 2, "hidden_channels": 8, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_squeeze_round_trip():
    x = torch.randn(2, 3, 8, 6)
    assert squeeze2x2(x).shape == (2, 12, 4, 3)
    assert torch.equal(unsqueeze2x2(squeeze2x2(x)), x)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_forward_then_reverse_reconstructs(coupling):
    model = randomized_glow(coupling=coupling)
    x = torch.rand(3, 1, 16, 16) - 0.5
    zs, _ = model(x)
    assert sum(z[0].numel() for z in zs) == 16 * 16
    assert (model.reverse(zs) - x).abs().max() < 1e-4


def test_logdet_matches_autograd_jacobian():
    model = randomized_glow(seed=1).double()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64) - 0.5

    def flat_latents(inp):
        zs, _ = model(inp)
        return torch.cat([z.flatten() for z in zs])

    jacobian = torch.autograd.functional.jacobian(flat_latents, x).reshape(16, 16)
    _, expected = torch.linalg.slogdet(jacobian)
    _, logdet = model(x)
    assert torch.allclose(logdet[0].double(), expected, atol=1e-4), (float(logdet[0]), float(expected))


def test_actnorm_data_dependent_init_standardizes_first_batch():
    torch.manual_seed(0)
    model = Glow(levels=1, steps_per_level=1, hidden_channels=8).train()
    x = 3.0 * torch.randn(64, 1, 8, 8) + 1.0
    actnorm = model.levels[0][0].layers[0]
    model(x)
    y, _ = actnorm(squeeze2x2(x))
    assert bool(actnorm.initialized)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3)
    before = actnorm.bias.clone()
    model(x + 5.0)  # a second batch must not re-initialise
    assert torch.equal(actnorm.bias, before)


def test_fully_convolutional_and_checks_input_size():
    model = randomized_glow()
    for size in (8, 32, 48):
        assert model.log_prob(torch.rand(1, 1, size, size) - 0.5).shape == (1,)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.log_prob(torch.rand(1, 1, 10, 12))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model.log_prob(torch.rand(1, 3, 8, 8))


def test_samples_are_finite_and_invertible():
    torch.manual_seed(0)
    model = Glow(levels=2, steps_per_level=2, hidden_channels=8).train()
    model.log_prob(torch.rand(8, 1, 16, 16) - 0.5)  # ActNorm init: samples land in the data range
    model.eval()
    samples = model.sample(2, 16, 16, temperature=0.7)
    assert samples.shape == (2, 1, 16, 16)
    assert torch.isfinite(model.log_prob(samples)).all()
    assert samples.abs().max() < 5.0
