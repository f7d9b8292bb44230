import pytest
import torch

from pipeline.models.simplifier import (
    Simplifier,
    UNet,
    gaussian_blur_2d,
    load_simplifier,
    save_simplifier,
    soft_clamp,
)


def grid_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images that include both extremes 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g).float() / 255
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    return x


@pytest.mark.parametrize("mode", ["scale_space", "logit", "additive"])
@pytest.mark.parametrize("size", [32, 64])
def test_identity_on_the_8bit_grid_at_init(mode, size):
    simplifier = Simplifier(base_channels=8, levels=3, mode=mode)
    x = grid_images(3, size)
    out = simplifier(x)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_output_is_on_the_8bit_grid_in_range_after_an_edit():
    simplifier = Simplifier(base_channels=8, levels=3, init="zero_alpha")  # a random U-Net output to scale
    with torch.no_grad():
        simplifier.alpha.fill_(3.0)
    x = grid_images(2, 32)
    out = simplifier(x)
    assert not torch.equal(out, x)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.allclose(out * 255, torch.round(out * 255), atol=1e-4)


def test_gradients_pass_the_quantisation_and_clamp():
    simplifier = Simplifier(base_channels=8, levels=2, init="zero_alpha")
    x = grid_images(2, 16)
    simplifier(x).mean().backward()
    assert simplifier.alpha.grad is not None and simplifier.alpha.grad.abs() > 0


def test_soft_clamp_is_straight_through():
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = soft_clamp(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.5, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def marker_after_flattening(steps: int, mode: str = "logit", eps: float = 0.05, init: str = "zero_alpha") -> float:
    """Optimise the simplifier to flatten a textured image with a saturated white marker to grey 0.4.

    The texture competes with the marker for the shared parameters, as the bpd term does in training;
    returns the mean of the marker region afterwards (1.0 = untouched, 0.4 = removed).
    """
    torch.manual_seed(0)
    noise = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    x = torch.round((0.4 + 0.15 * noise).clamp(0, 1) * 255) / 255
    x[:, :, 8:16, 8:16] = 1.0
    target = torch.full_like(x, 0.4)
    simplifier = Simplifier(base_channels=8, levels=3, mode=mode, eps=eps, init=init)
    optimizer = torch.optim.Adam(simplifier.parameters(), lr=3e-3, betas=(0.5, 0.99))
    for _ in range(steps):
        loss = ((simplifier(x) - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(simplifier(x)[:, :, 8:16, 8:16].mean())


@pytest.mark.parametrize("mode", ["scale_space", "logit", "additive"])
def test_a_saturated_marker_can_be_removed(mode):
    assert marker_after_flattening(100, mode) < 0.4 + 0.1


def test_paper_clamp_leaves_the_marker_where_large_eps_removes_it():
    """The prototype's pitfall (paper init, alpha = 0): with eps=1/512 the marker sits where the sigmoid is flat."""
    assert marker_after_flattening(40, eps=1 / 512) > 0.9
    assert marker_after_flattening(40, eps=0.05) < 0.7


def test_default_init_removes_a_saturated_marker():
    assert marker_after_flattening(40, init="zero_head") < 0.7


def test_scale_space_weight_one_replaces_the_image_by_its_blur():
    """w_k = 1 everywhere (and u = 0) must give exactly the Gaussian blur of the logit image at scale k."""
    simplifier = Simplifier(base_channels=8, levels=3, mode="scale_space", scales=(1.0, 4.0))
    with torch.no_grad():
        simplifier.unet.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # channels: u, w_1, w_4
    x = grid_images(2, 32)
    z = torch.logit(0.05 + 0.9 * x)
    expected = (torch.sigmoid(gaussian_blur_2d(z, 4.0 * 32 / 64)) - 0.05) / 0.9
    assert torch.allclose(simplifier(x), torch.round(expected.clamp(0, 1) * 255) / 255, atol=1.5 / 255)


def test_gaussian_blur_keeps_flat_images_and_the_mean():
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur_2d(flat, 2.0), flat)
    x = grid_images(1, 32)
    blurred = gaussian_blur_2d(x, 1.5)
    assert blurred.std() < x.std()
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02)


def test_unet_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="divisible by 8"):
        UNet(levels=3, base_channels=4)(torch.zeros(1, 1, 36, 36))


def test_rejects_colour_images():
    with pytest.raises(ValueError, match="grey"):
        Simplifier(base_channels=4, levels=2)(torch.zeros(1, 3, 16, 16))


def test_save_and_load_round_trip(tmp_path):
    simplifier = Simplifier(base_channels=8, levels=2, eps=0.04, init="zero_alpha")
    with torch.no_grad():
        simplifier.alpha.fill_(0.7)
    path = save_simplifier(simplifier, tmp_path / "simplifier.safetensors", task="effusion", lam=1.0)
    loaded = load_simplifier(path)
    x = grid_images(2, 16)
    assert loaded.eps == 0.04
    assert torch.equal(loaded(x), simplifier.eval()(x))
