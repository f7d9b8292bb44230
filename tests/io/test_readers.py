"""RadiographReader / read_radiograph against hand-computed pixels, one test per branch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.io.readers import (
    RadiographReader,
    RadiographReadError,
    apply_window,
    read_radiograph,
)

SC_SOP = "1.2.840.10008.5.1.4.1.1.7"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"
BT601 = np.array([0.299, 0.587, 0.114])
PYDICOM_CR_FILES = sorted(
    (Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "77654033").glob("CR*/*")
)


def ramp12(rows: int = 24, cols: int = 32) -> np.ndarray:
    """Distinct 12-bit values, asymmetric so that any transpose or flip shows."""
    return (np.arange(rows * cols).reshape(rows, cols) * 5 % 4096).astype(np.uint16)


def voi_lut_item(first_mapped: int, bits: int, data: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(data), first_mapped, bits])
    item.add_new("LUTData", "US", [int(v) for v in data])
    return item


# --- DICOM pixel pipeline --------------------------------------------------------------------


def test_12_bit_in_16_masks_garbage_high_bits(dicom_file):
    values = ramp12()
    stored = values | np.uint16(0xA000)  # garbage above BitsStored must be ignored
    path = dicom_file("g.dcm", stored, bits_stored=12)
    image, meta = read_radiograph(path)
    np.testing.assert_allclose(image, values / 4095.0, atol=1e-6)
    assert image.dtype == np.float32 and image.shape == values.shape
    assert meta["voi"] == "none" and meta["BitsStored"] == 12


def test_signed_pixels_use_the_signed_range(dicom_file):
    values = np.array([[-2048, -1, 0], [2047, 100, -100]] * 8, dtype=np.int16).repeat(6, axis=1)
    image, _ = read_radiograph(dicom_file("s.dcm", values, bits_stored=12))
    np.testing.assert_allclose(image, (values + 2048) / 4095.0, atol=1e-6)


def test_window_linear_by_hand(dicom_file):
    # c=2048, w=1024: 0 at x <= 1536, 1 at x > 2559, else (x - 2047.5) / 1023 + 0.5
    row = np.array([1000, 1536, 1537, 2048, 2559, 2560, 4000] * 3, dtype=np.uint16)
    pixels = np.tile(row, (16, 1))
    path = dicom_file("w.dcm", pixels, bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    image, meta = read_radiograph(path)
    expected = [0.0, 0.0, (1537 - 2047.5) / 1023 + 0.5, 0.5 / 1023 + 0.5, 1.0, 1.0, 1.0] * 3
    np.testing.assert_allclose(image[0], expected, atol=1e-6)
    assert meta["voi"] == "window"


def test_rescale_precedes_window(dicom_file):
    # HU-like rescale: v = 2 s - 1000; window c=0, w=2001 in rescaled units covers [-1000, 1000].
    stored = np.tile(np.array([0, 250, 500, 750, 1000], dtype=np.uint16), (16, 4))
    path = dicom_file("r.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-1000,
                      WindowCenter=0, WindowWidth=2001)
    image, _ = read_radiograph(path)
    rescaled = 2.0 * stored - 1000
    expected = np.clip((rescaled + 0.5) / 2000 + 0.5, 0, 1)
    expected[rescaled <= -0.5 - 1000] = 0
    expected[rescaled > -0.5 + 1000] = 1
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_rescale_without_voi_maps_the_rescaled_range(dicom_file):
    stored = ramp12()
    path = dicom_file("n.dcm", stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095)
    image, _ = read_radiograph(path)
    # slope -1: range [0, 4095] reversed, so display value = (4095 - s) / 4095
    np.testing.assert_allclose(image, (4095 - stored) / 4095.0, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_functions_match_pydicom(function):
    from pydicom.pixels import apply_windowing

    values = np.linspace(-50, 4200, 200)
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation = 12, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1800.0, 900.0, function
    reference = apply_windowing(values.copy(), ds) / 4095.0  # pydicom's output spans [0, 2**12 - 1]
    np.testing.assert_allclose(apply_window(values, 1800.0, 900.0, function), reference, atol=1e-9)


def test_monochrome1_without_voi_inverts_stored_range(dicom_file):
    values = ramp12()
    image, _ = read_radiograph(dicom_file("m1.dcm", values, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_allclose(image, 1.0 - values / 4095.0, atol=1e-6)


def test_monochrome1_with_window_inverts_after_windowing(dicom_file):
    row = np.array([1000, 1537, 2048, 3000], dtype=np.uint16)
    pixels = np.tile(row, (16, 4))
    path = dicom_file("m1w.dcm", pixels, bits_stored=12, photometric="MONOCHROME1",
                      WindowCenter=2048, WindowWidth=1024)
    image, _ = read_radiograph(path)
    windowed = [0.0, (1537 - 2047.5) / 1023 + 0.5, 0.5 / 1023 + 0.5, 1.0]
    np.testing.assert_allclose(image[0, :4], [1.0 - w for w in windowed], atol=1e-6)


def test_monochrome1_with_voi_lut_inverts_in_the_lut_output_range(dicom_file):
    # 8-bit LUT starting at 100: x < 100 -> lut[0], x > 355 -> lut[255]. MONOCHROME1 flips within
    # [0, 255] (not within the 12-bit stored range, the classic bug).
    lut = (np.arange(256) // 2 + 60).astype(np.uint16)  # output 60..187
    pixels = np.tile(np.array([0, 100, 101, 300, 355, 4000], dtype=np.uint16), (16, 3))
    path = dicom_file("lut.dcm", pixels, bits_stored=12, photometric="MONOCHROME1",
                      VOILUTSequence=DicomSequence([voi_lut_item(100, 8, lut)]),
                      WindowCenter=2048, WindowWidth=1024)
    image, meta = read_radiograph(path)
    lut_out = np.array([lut[0], lut[0], lut[1], lut[200], lut[255], lut[255]], dtype=float)
    np.testing.assert_allclose(image[0, :6], 1.0 - lut_out / 255.0, atol=1e-6)
    assert meta["voi"] == "lut"


def test_voi_modes_choose_lut_window_or_nothing(dicom_file):
    lut = np.arange(4096, dtype=np.uint16) // 4  # 10-bit output
    pixels = ramp12()
    path = dicom_file("modes.dcm", pixels, bits_stored=12,
                      VOILUTSequence=DicomSequence([voi_lut_item(0, 10, lut)]),
                      WindowCenter=1000, WindowWidth=500)
    by_lut, m_lut = read_radiograph(path, voi="auto")
    by_window, m_window = read_radiograph(path, voi="window")
    raw, m_none = read_radiograph(path, voi="none")
    np.testing.assert_allclose(by_lut, (pixels // 4) / 1023.0, atol=1e-6)
    np.testing.assert_allclose(by_window, apply_window(pixels.astype(float), 1000, 500), atol=1e-6)
    np.testing.assert_allclose(raw, pixels / 4095.0, atol=1e-6)
    assert (m_lut["voi"], m_window["voi"], m_none["voi"]) == ("lut", "window", "none")
    with pytest.raises(ValueError, match="voi must be one of"):
        read_radiograph(path, voi="lut")


@pytest.mark.parametrize("syntax", ["jpeg-lossless-sv1", "jpeg-lossless"])
def test_jpeg_lossless_decodes_exactly(dicom_file, gdcm_transcode, tmp_path, syntax):
    values = ramp12(48, 40)
    src = dicom_file("plain.dcm", values, bits_stored=12, photometric="MONOCHROME1")
    dst = gdcm_transcode(src, tmp_path / f"{syntax}.dcm", syntax)
    uid = pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID
    expected_uid = {"jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70", "jpeg-lossless": "1.2.840.10008.1.2.4.57"}
    assert uid == expected_uid[syntax]
    image, _ = read_radiograph(dst)
    np.testing.assert_allclose(image, 1.0 - values / 4095.0, atol=1e-6)


def test_jpeg_baseline_decodes_closely(dicom_file, gdcm_transcode, tmp_path):
    values = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint8)
    dst = gdcm_transcode(dicom_file("b.dcm", values), tmp_path / "baseline.dcm", "jpeg-baseline")
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    image, _ = read_radiograph(dst)
    np.testing.assert_allclose(image, values / 255.0, atol=0.02)  # lossy


def test_jpeg2000_lossy_decodes_closely(dicom_file, tmp_path):
    values = (np.add.outer(np.arange(48), np.arange(64)) * 30 % 4096).astype(np.uint16)
    ds = pydicom.dcmread(dicom_file("j.dcm", values, bits_stored=12))
    ds.compress("1.2.840.10008.1.2.4.91", values, j2k_psnr=[60])
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    image, _ = read_radiograph(tmp_path / "j2k.dcm")
    np.testing.assert_allclose(image, values / 4095.0, atol=0.05)  # lossy
    assert np.abs(image - values / 4095.0).mean() < 0.005


@pytest.mark.parametrize(
    "uid", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"],
    ids=["rle", "jpeg2000-lossless", "jpeg-ls-lossless"],
)
def test_pydicom_encoded_syntaxes_decode_exactly(dicom_file, tmp_path, uid):
    values = ramp12(40, 48)
    path = dicom_file("c.dcm", values, bits_stored=12)
    ds = pydicom.dcmread(path)
    ds.compress(uid, values)
    ds.save_as(tmp_path / "compressed.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == uid
    image, _ = read_radiograph(tmp_path / "compressed.dcm")
    np.testing.assert_allclose(image, values / 4095.0, atol=1e-6)


def test_rgb_secondary_capture_becomes_luminance(dicom_file):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = dicom_file("sc.dcm", rgb, photometric="RGB", modality="OT", sop_class=SC_SOP)
    image, meta = read_radiograph(path)
    np.testing.assert_allclose(image, rgb @ BT601 / 255.0, atol=1e-6)
    assert meta["PhotometricInterpretation"] == "RGB"


@pytest.mark.parametrize("path", PYDICOM_CR_FILES, ids=[p.parent.name for p in PYDICOM_CR_FILES])
def test_pydicom_bundled_cr_files(path):
    from pydicom.pixels import apply_modality_lut, apply_windowing

    assert PYDICOM_CR_FILES, "pydicom's bundled CR test files not found"
    ds = pydicom.dcmread(path)
    rescaled = apply_modality_lut(ds.pixel_array, ds)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    low, high = sorted((0 * slope + intercept, 4095 * slope + intercept))
    reference = 1.0 - (apply_windowing(rescaled, ds) - low) / (high - low)  # MONOCHROME1
    image, meta = read_radiograph(path)
    np.testing.assert_allclose(image, reference, atol=1e-6)
    assert meta["Modality"] == "CR" and meta["PhotometricInterpretation"] == "MONOCHROME1"
    assert meta["PixelSpacing"] == (0.1, 0.1)


# --- PNG / JPEG ------------------------------------------------------------------------------


def test_16_bit_png(tmp_path):
    values = (np.arange(30 * 20).reshape(30, 20) * 97 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    image, meta = read_radiograph(tmp_path / "x.png")
    np.testing.assert_allclose(image, values / 65535.0, atol=1e-6)
    assert meta["format"] == "png" and meta["original_shape"] == (30, 20)


def test_rgba_png_drops_alpha(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(18, 26, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image, _ = read_radiograph(tmp_path / "rgba.png")
    np.testing.assert_allclose(image, rgba[..., :3] @ BT601 / 255.0, atol=1e-6)


def test_grey_jpeg(tmp_path):
    values = np.zeros((32, 48), np.uint8)
    values[:8, :8] = 255
    Image.fromarray(values).save(tmp_path / "x.jpg", quality=100)
    image, meta = read_radiograph(tmp_path / "x.jpg")
    assert meta["format"] == "jpeg" and image.shape == (32, 48)
    np.testing.assert_allclose(image, values / 255.0, atol=0.05)


# --- metadata and MONAI ----------------------------------------------------------------------


def test_metadata_keeps_only_safe_fields(dicom_file):
    path = dicom_file("meta.dcm", ramp12(), bits_stored=12, ImagerPixelSpacing=[0.139, 0.15],
                      PixelSpacing=[0.2, 0.2])
    ds = pydicom.dcmread(path)
    _, meta = read_radiograph(path)
    assert meta["PixelSpacing"] == (0.139, 0.15)  # ImagerPixelSpacing wins for projection images
    kept = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "ViewPosition",
            "PatientSex")
    for tag in kept:
        assert meta[tag] == str(ds[tag].value)
    assert meta["original_shape"] == (24, 32)
    text = repr(meta)
    for secret in ("Doe", "MRN-0042", "19700101", "20240102"):
        assert secret not in text
    assert not any(key.startswith("Patient") and key != "PatientSex" for key in meta)


def test_load_imaged_keeps_rows_by_columns(dicom_file):
    from monai.transforms import LoadImaged

    values = ramp12(24, 40)
    values[:4, :6] = 4095  # a bright top-left corner
    path = dicom_file("o.dcm", values, bits_stored=12)
    load = LoadImaged(keys="image", reader=RadiographReader(), image_only=True)
    loaded = load({"image": str(path)})["image"]
    assert tuple(loaded.shape) == (24, 40)
    np.testing.assert_allclose(loaded.numpy(), values / 4095.0, atol=1e-6)
    assert loaded.meta["Modality"] == "DX" and loaded.meta["original_channel_dim"] == "no_channel"
    assert "PatientName" not in loaded.meta


# --- bad input -------------------------------------------------------------------------------


def test_errors_name_file_and_reason(tmp_path, dicom_file):
    values = ramp12()
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "notes.dcm"
    text.write_text("this is not a radiograph\n" * 20)
    whole = dicom_file("whole.dcm", values, bits_stored=12)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    header_only = tmp_path / "header-only.dcm"
    header_only.write_bytes(whole.read_bytes()[:420])
    sr = dicom_file("sr.dcm", None, modality="SR", sop_class=SR_SOP)
    ct = dicom_file("ct.dcm", values.astype(np.int16), modality="CT", sop_class=CT_SOP)
    palette = dicom_file("pal.dcm", values.astype(np.uint8), photometric="PALETTE COLOR")
    frames = dicom_file("mf.dcm", np.concatenate([values, values]), bits_stored=12, NumberOfFrames=2,
                        Rows=24)
    ot_not_sc = dicom_file("ot.dcm", values, bits_stored=12, modality="OT")
    cases = {
        empty: "empty file",
        text: "not a DICOM file",
        truncated: "cannot decode pixel data",
        header_only: "truncated file?",
        sr: "no pixel data",
        ct: "modality CT is not a projection radiograph",
        palette: "unsupported PhotometricInterpretation PALETTE COLOR",
        frames: "multi-frame (2 frames)",
        ot_not_sc: "modality OT without a Secondary Capture SOP class",
    }
    for path, reason in cases.items():
        with pytest.raises(RadiographReadError) as info:
            read_radiograph(path)
        assert isinstance(info.value, ValueError)
        assert str(info.value).startswith(f"{path}: "), str(info.value)
        assert reason in info.value.reason, (path.name, info.value.reason)


def test_non_finite_pixels_are_rejected(dicom_file):
    path = dicom_file("nan.dcm", ramp12(), bits_stored=12, RescaleSlope="NaN")
    with pytest.raises(RadiographReadError, match="NaN or infinity"):
        read_radiograph(path)
