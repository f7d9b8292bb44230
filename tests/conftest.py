"""Shared fixtures: synthetic DICOM files built with pydicom, and gdcm transcoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
SC_SOP = "1.2.840.10008.5.1.4.1.1.7"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    modality: str = "DX",
    sop_class: str = DX_SOP,
    **tags: Any,
) -> Path:
    """A minimal, valid little-endian DICOM file; ``pixels`` (rows, cols[, 3]) is stored as given.

    Identifying attributes (name, id, dates) are set on purpose so that tests can check that the
    reader never passes them on. ``tags`` set or override any attribute by keyword.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-0042"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240102"
    ds.PatientSex = "F"
    ds.ViewPosition = "PA"
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[:2]
        colour = pixels.ndim == 3
        ds.SamplesPerPixel = 3 if colour else 1
        if colour:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_file(tmp_path: Path) -> Callable[..., Path]:
    """``dicom_file("a.dcm", pixels, **kwargs)`` -> path of :func:`write_dicom` output in tmp_path."""

    def make(name: str, pixels: np.ndarray | None, **kwargs: Any) -> Path:
        return write_dicom(tmp_path / name, pixels, **kwargs)

    return make


@pytest.fixture
def gdcm_transcode() -> Callable[[Path, Path, str], Path]:
    """``gdcm_transcode(src, dst, syntax)``, see :func:`transcode_with_gdcm`."""
    return transcode_with_gdcm


def transcode_with_gdcm(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode ``src`` with python-gdcm; ``syntax``: ``jpeg-lossless-sv1`` (.70), ``jpeg-lossless`` (.57)
    or ``jpeg-baseline`` (.50). pydicom 3 has no JPEG encoders, gdcm does.
    """
    import gdcm

    syntaxes = {
        "jpeg-lossless-sv1": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        "jpeg-lossless": gdcm.TransferSyntax.JPEGLosslessProcess14,
        "jpeg-baseline": gdcm.TransferSyntax.JPEGBaselineProcess1,  # 8-bit only
    }
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntaxes[syntax]))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm cannot transcode {src} to {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {dst}")
    return dst


@pytest.fixture(scope="session")
def demo_renders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small rendered demo cohort (60 studies, 64 px, burned-in marks independent of the label),
    rendered once per session: the images and ground truth of the dataset-layout fixtures."""
    from pipeline.data.demo.cohort import DemoCohortConfig, generate_cohort

    out = tmp_path_factory.mktemp("demo_renders")
    config = DemoCohortConfig(n=60, size=64, seed=3, distractor={"mode": "independent"}, render={"n_points": 48})
    generate_cohort(config, out, show_progress=False)
    return out
