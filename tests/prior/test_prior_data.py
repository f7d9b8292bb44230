import numpy as np
import pytest

from pipeline.prior.data import (
    AugmentConfig, BankConfig, ImageBank, PriorDataConfig, PriorImageSampler, build_bank,
    render_reference_radiographs, resize_uint8,
)


@pytest.fixture(scope="module")
def small_config() -> PriorDataConfig:
    return PriorDataConfig(bank=BankConfig(size=64, volume_size=48, projections=3, slices=3))


@pytest.fixture(scope="module")
def bank(small_config) -> ImageBank:
    return build_bank(small_config)


def test_bank_holds_radiograph_like_projections_and_slices(bank, small_config):
    assert bank.projection.shape == (3, 64, 64) and bank.slice.shape == (3, 64, 64)
    for images in (bank.projection, bank.slice):
        assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
    # Projections: air outside the body is dark, the dense mediastinum (centre column) bright.
    centre = bank.projection[:, 16:48, 28:36].mean()
    assert centre > bank.projection[:, :, :4].mean()


def test_bank_is_deterministic(small_config, bank):
    again = build_bank(small_config)
    assert np.array_equal(again.projection, bank.projection)


def test_images_depend_only_on_seed_step_and_index(bank, small_config):
    sampler = PriorImageSampler(bank, small_config, seed=3)
    full = sampler.batch(step=5, indices=range(6), size=32)
    assert full.shape == (6, 1, 32, 32) and full.dtype == np.uint8
    even, odd = sampler.batch(5, [0, 2, 4], 32), sampler.batch(5, [1, 3, 5], 32)
    assert np.array_equal(full[0::2], even) and np.array_equal(full[1::2], odd)
    assert not np.array_equal(full, sampler.batch(6, range(6), 32))
    assert sampler.size_for_step(5) in small_config.sizes


def test_mix_covers_smooth_and_detailed_images(bank, small_config):
    sampler = PriorImageSampler(bank, small_config, seed=0)
    images = sampler.batch(0, range(200), 32).astype(float)
    spread = images.reshape(200, -1).std(1)
    assert (spread == 0).sum() >= 3  # flat images are part of the mix
    assert (spread > 20).sum() >= 50


def test_in_domain_uses_only_radiographs():
    radiographs = np.full((4, 1, 40, 40), 77, np.uint8)
    augment = AugmentConfig(blur_probability=0.0, noise_probability=0.0)
    config = PriorDataConfig(mode="in_domain", augment=augment)
    sampler = PriorImageSampler(build_bank(config, radiographs), config, seed=0)
    assert sampler.sources == ["radiograph"]
    images = sampler.batch(0, range(8), 32)
    # gamma/contrast change the grey level, but an image of one grey stays one grey
    assert all(len(np.unique(img)) <= 2 for img in images)
    with pytest.raises(ValueError, match="in_domain needs demo radiographs"):
        build_bank(config, None)


def test_reference_radiographs_and_resize():
    refs = render_reference_radiographs(2, 32, config=PriorDataConfig(bank=BankConfig(volume_size=48)))
    assert refs.shape == (2, 1, 32, 32) and refs.dtype == np.uint8 and refs.std() > 10
    assert resize_uint8(refs, 16).shape == (2, 1, 16, 16)
