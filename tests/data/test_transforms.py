"""Ingest transform chain, mask alignment and training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.transforms import (
    AsUint8,
    LoadRadiographd,
    QuantizeTo8Bit,
    SquarePad,
    augment_batch,
    ingest_transforms,
    to_working_resolution,
    training_augmentation,
    validate_size,
)


def asymmetric_image(rows: int = 48, cols: int = 96) -> np.ndarray:
    """12-bit, wider than tall, bright block top-left, mid-grey block bottom-right."""
    image = np.full((rows, cols), 200, dtype=np.uint16)
    image[: rows // 4, : cols // 6] = 4000
    image[-rows // 4 :, -cols // 3 :] = 2000
    return image


def test_chain_keeps_orientation_from_file(dicom_file):
    pixels = asymmetric_image()
    path = dicom_file("asym.dcm", pixels, bits_stored=12)
    out = ingest_transforms(size=32)({"image": str(path)})["image"]
    assert out.dtype == torch.uint8 and tuple(out.shape) == (1, 32, 32)
    array = out[0].numpy()
    # 48x96 -> padded to 96x96 with 24 rows above and below -> 32x32: the image spans rows 8..23.
    assert (array[:8] == 0).all() and (array[24:] == 0).all()
    assert array[8, 0] == 255  # bright block: top-left of the image content
    assert array[8, 31] < 20 and array[23, 0] < 20
    assert 110 < array[23, 31] < 145  # bottom-right mid-grey block (2000 on a 200..4000 scale)


def test_chain_from_file_equals_in_memory_geometry(dicom_file):
    pixels = asymmetric_image(40, 70)
    path = dicom_file("same.dcm", pixels, bits_stored=12)
    cached = ingest_transforms(size=64)({"image": str(path)})["image"][0].numpy()
    in_memory = to_working_resolution(pixels / 4095.0, size=64, kind="image")
    np.testing.assert_array_equal(cached, np.round(in_memory * 255).astype(np.uint8))


def test_mask_stays_aligned_with_image():
    image = np.zeros((60, 100))
    image[10:30, 20:50] = 1.0
    mask = image > 0
    working = to_working_resolution(image, size=50, kind="image")
    working_mask = to_working_resolution(mask, size=50, kind="mask")
    assert working_mask.dtype == np.uint8 and set(np.unique(working_mask)) == {0, 1}
    np.testing.assert_array_equal(working_mask, (working >= 0.5).astype(np.uint8))
    # 60x100 padded by 20 rows on top; scale 0.5: rows (10+20)/2..(30+20)/2, cols 10..25
    assert working_mask[15:25, 10:25].all() and working_mask.sum() == 10 * 15


def test_mask_must_be_binary():
    with pytest.raises(ValueError, match="binary"):
        to_working_resolution(np.array([[0, 2], [1, 0]] * 20), size=32, kind="mask")
    with pytest.raises(ValueError, match="kind"):
        to_working_resolution(np.zeros((40, 40)), size=32, kind="label")


@pytest.mark.parametrize("mode", ["min", "edge"])
def test_square_pad_centres_and_uses_background(mode):
    image = torch.arange(3 * 8, dtype=torch.float32).reshape(1, 3, 8) + 5
    padded = SquarePad(mode)(image)
    assert tuple(padded.shape) == (1, 8, 8)
    # 5 extra rows: 2 above, 3 below
    torch.testing.assert_close(padded[:, 2:5], image)
    if mode == "min":
        assert (padded[:, :2] == 5).all() and (padded[:, 5:] == 5).all()
    else:
        torch.testing.assert_close(padded[0, 0], image[0, 0])
        torch.testing.assert_close(padded[0, 7], image[0, 2])


def test_quantize_and_uint8_roundtrip():
    x = torch.tensor([[-0.1, 0.0, 0.5, 1 / 255 * 0.49, 1 / 255 * 0.51, 0.999, 1.2]])
    q = QuantizeTo8Bit()(x)
    k = AsUint8()(q)
    torch.testing.assert_close(k, torch.tensor([[0, 0, 128, 0, 1, 255, 255]], dtype=torch.uint8))
    torch.testing.assert_close(q, k.float() / 255)


@pytest.mark.parametrize("bad", [31, 257, 64.0, True, "64"])
def test_size_is_validated(bad):
    with pytest.raises(ValueError, match="working size"):
        validate_size(bad)
    assert validate_size(32) == 32 and validate_size(256) == 256


def test_augmentation_is_light_without_flips_and_on_the_grid():
    base = torch.full((1, 1, 32, 32), 0.2)
    base[..., :, :10] = 0.9  # bright left side
    images = base.repeat(16, 1, 1, 1)
    augmented = augment_batch(images, training_augmentation(size=32, prob=1.0, seed=3))
    assert augmented.shape == images.shape and augmented.dtype == torch.float32
    torch.testing.assert_close(augmented * 255, torch.round(augmented * 255))
    assert not torch.equal(augmented, images)  # it does move pixels
    left, right = augmented[..., :, :8].mean(dim=(1, 2, 3)), augmented[..., :, -8:].mean(dim=(1, 2, 3))
    assert (left > right + 0.4).all()  # a horizontal flip would swap them
    again = augment_batch(images, training_augmentation(size=32, prob=1.0, seed=3))
    torch.testing.assert_close(augmented, again)


def test_load_radiographd_never_falls_back_to_other_readers(dicom_file):
    from monai.transforms import LoadImaged

    from pipeline.io.readers import RadiographReader, RadiographReadError

    ct = dicom_file("ct.dcm", asymmetric_image().astype(np.int16), modality="CT",
                    sop_class="1.2.840.10008.5.1.4.1.1.2")
    # The pitfall: MONAI's LoadImaged catches our rejection and lets PydicomReader load the CT.
    plain = LoadImaged(keys="image", reader=RadiographReader(), image_only=True)
    assert plain({"image": str(ct)})["image"].numel()
    with pytest.raises(RadiographReadError, match="modality CT is not a projection radiograph"):
        LoadRadiographd(keys="image")({"image": str(ct)})
