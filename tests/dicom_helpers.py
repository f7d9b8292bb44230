"""Synthetic DICOM files built with pydicom, for tests in any folder (imported by name:
``from dicom_helpers import write_dicom``; fixtures around it live in ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
