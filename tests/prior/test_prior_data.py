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


class CountingImages:
    """uint8 images that count the rows read through them (a stand-in for a lazy store view)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.rows_read = images, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        batch = self.images[key]
        self.rows_read += len(batch)
        return batch


def test_radiograph_bank_is_a_bounded_seeded_sample():
    images = np.arange(50, dtype=np.uint8)[:, None, None, None] * np.ones((1, 1, 8, 8), np.uint8)
    config = PriorDataConfig(mode="in_domain", max_radiographs=8)
    source = CountingImages(images)
    bank = build_bank(config, source).radiograph
    assert bank.shape == (8, 8, 8) and source.rows_read == 8  # only the sampled rows are read
    picked = np.rint(bank[:, 0, 0] * 255).astype(int)
    assert len(set(picked)) == 8 and list(picked) == sorted(picked)
    assert np.array_equal(build_bank(config, images).radiograph, bank)  # seeded by bank.seed
    other_seed = config.model_copy(update={"bank": BankConfig(seed=1)})
    assert not np.array_equal(build_bank(other_seed, images).radiograph, bank)
    whole = build_bank(config.model_copy(update={"max_radiographs": 50}), images).radiograph
    assert np.array_equal(np.rint(whole[:, 0, 0] * 255), np.arange(50))  # a small cohort is used whole


def test_load_radiographs_from_an_ingest_folder_is_lazy_and_samples(tmp_path):
    import pandas as pd

    from pipeline.data.ingest import write_ingest_folder
    from pipeline.data.store import StoredImages
    from pipeline.prior.data import load_radiographs

    ids = [f"std-{i:012x}" for i in range(10)]
    frame = pd.DataFrame({
        "study_id": ids, "patient_id": [f"pat-{i:012x}" for i in range(10)],
        "image_path": [f"{s}.png" for s in ids], "view": "PA", "sex": "M", "age": 50.0, "effusion": 1,
        "split": ["train"] * 8 + ["val"] * 2, "source": "demo",
    })
    images = np.arange(10, dtype=np.uint8)[:, None, None] * np.ones((1, 16, 16), np.uint8)
    ingest = write_ingest_folder(tmp_path / "ingest", frame, images)
    train, train_frame = load_radiographs(ingest, split="train")
    assert isinstance(train, StoredImages) and len(train) == 8 and train_frame["study_id"].tolist() == ids[:8]
    sample, sample_frame = load_radiographs(ingest, split="train", max_studies=3, seed=5)
    values = np.asarray(sample[0:3])[:, 0, 0, 0]
    assert len(sample) == 3 and list(values) == [int(s[-1], 16) for s in sample_frame["study_id"]]
    again, _ = load_radiographs(ingest, split="train", max_studies=3, seed=5)
    assert np.array_equal(np.asarray(again[0:3]), np.asarray(sample[0:3]))
