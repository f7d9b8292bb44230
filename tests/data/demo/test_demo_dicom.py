"""Every DICOM encoding variant reads back with pydicom and decodes to the intended display image."""

from __future__ import annotations

import itertools

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1

from pipeline.data.demo.dicom import EncodingVariant, StudyHeader, encode_pixels, tone_lut, write_dicom
from pipeline.data.demo.render import tone_curve

GAMMA = 1.1


def display_from_dataset(ds: pydicom.Dataset) -> np.ndarray:
    """The standard display chain: modality LUT -> VOI (LUT or window) -> MONOCHROME1 inversion."""
    stored = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    modality = stored * slope + intercept
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        data = item.LUTData
        table = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data)
        shown = table[np.clip(modality.astype(int) - item.LUTDescriptor[1], 0, len(table) - 1)] / 4095.0
    elif "WindowCenter" in ds:
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        shown = np.clip((modality - (center - width / 2)) / width, 0, 1)
    else:
        shown = (modality - intercept) / (slope * 4095.0)
    return 1.0 - shown if ds.PhotometricInterpretation == "MONOCHROME1" else shown


def _header(sex: str = "F") -> StudyHeader:
    return StudyHeader(
        patient_name="Doe^Jane", patient_id="1234567", patient_birth_date="19600101", patient_sex=sex,
        study_date="20200202", study_time="101010", accession_number="ACC12345678",
        institution_name="Riverside Medical Center", referring_physician="Dr^Who",
        study_uid=pydicom.uid.generate_uid(entropy_srcs=["study"]),
        series_uid=pydicom.uid.generate_uid(entropy_srcs=["series"]),
        sop_uid=pydicom.uid.generate_uid(entropy_srcs=["sop"]),
        pixel_spacing_mm=2.8125, source_to_detector_mm=1800.0, source_to_patient_mm=1530.0, kvp=120.0,
        exposure_mas=3.0, burned_in_annotation=False,
    )


VARIANTS = [
    EncodingVariant(modality, photometric, voi, rescale, transfer)
    for modality, photometric, voi, rescale, transfer in itertools.product(
        ("DX", "CR"), ("MONOCHROME2", "MONOCHROME1"), ("none", "window", "lut"), (False, True),
        ("explicit-le", "jpeg-lossless"),
    )
    if not (voi == "lut" and rescale)
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label())
def test_variant_round_trip(tmp_path, variant):
    rng = np.random.default_rng(0)
    log_image = rng.random((40, 48)).astype(np.float32)
    display = tone_curve(log_image, GAMMA).astype(np.float32)
    stored, attributes = encode_pixels(display, log_image, tone_lut(lambda x: tone_curve(x, GAMMA)), variant,
                                       np.random.default_rng(1))
    path = write_dicom(tmp_path / "x.dcm", stored, attributes, variant, _header())

    ds = pydicom.dcmread(path)
    expected_syntax = JPEGLosslessSV1 if variant.transfer == "jpeg-lossless" else ExplicitVRLittleEndian
    assert ds.file_meta.TransferSyntaxUID == expected_syntax
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (ds.Rows, ds.Columns) == (40, 48)
    assert ds.Modality == variant.modality and ds.PhotometricInterpretation == variant.photometric
    assert ds.ViewPosition == "PA" and ds.PatientSex == "F"
    assert [float(v) for v in ds.ImagerPixelSpacing] == [2.8125, 2.8125]
    assert ("VOILUTSequence" in ds) == (variant.voi == "lut")
    assert ("WindowCenter" in ds) == (variant.voi == "window")
    assert ("RescaleSlope" in ds) == variant.rescale
    assert np.array_equal(ds.pixel_array, stored)
    assert ds.pixel_array.max() <= 4095
    np.testing.assert_allclose(display_from_dataset(ds), display, atol=2.5 / 4095 / 0.6)


def test_monochrome1_stores_inverted_values(tmp_path):
    display = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    lut = tone_lut(lambda x: x)
    mono2, _ = encode_pixels(display, display, lut, EncodingVariant("DX", "MONOCHROME2", "none", False,
                                                                    "explicit-le"), np.random.default_rng(0))
    mono1, _ = encode_pixels(display, display, lut, EncodingVariant("DX", "MONOCHROME1", "none", False,
                                                                    "explicit-le"), np.random.default_rng(0))
    assert np.array_equal(mono1.astype(int), 4095 - mono2.astype(int))
