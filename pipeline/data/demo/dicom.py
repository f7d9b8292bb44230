"""Realistic DX/CR DICOM files for the demo cohort, in the header variants real archives contain.

Every variant stores 12 bits in 16 and is built so that a reader applying the standard chain
(modality LUT -> VOI LUT or window -> MONOCHROME1 inversion) recovers the same display image up to
quantisation:

* ``photometric``: MONOCHROME2, or MONOCHROME1 (stored values inverted);
* ``voi``: ``none`` (stored values are the display image), ``window`` (WindowCenter/Width select a
  sub-range of the stored values) or ``lut`` (stored values are the log image and a VOI LUT
  Sequence carries the tone curve);
* ``rescale``: RescaleSlope/Intercept present with a non-trivial mapping;
* ``transfer``: explicit VR little endian, or JPEG lossless (1.2.840.10008.1.2.4.70, encoded with
  GDCM because pydicom has no encoder for it).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, JPEGLosslessSV1

from pipeline.runtime.atomic import atomic_path

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
MAX_STORED = 4095  # 12 bits stored


@dataclass(frozen=True)
class EncodingVariant:
    modality: str  # "DX" or "CR"
    photometric: str  # "MONOCHROME2" or "MONOCHROME1"
    voi: str  # "none", "window" or "lut"
    rescale: bool
    transfer: str  # "explicit-le" or "jpeg-lossless"

    def label(self) -> str:
        return "/".join([self.modality, self.photometric, self.voi, "rescale" if self.rescale else "identity",
                         self.transfer])


@dataclass(frozen=True)
class StudyHeader:
    """Identifying and acquisition attributes of one synthetic study (PHI on purpose)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str  # YYYYMMDD
    patient_sex: str
    study_date: str  # YYYYMMDD
    study_time: str  # HHMMSS
    accession_number: str
    institution_name: str
    referring_physician: str
    study_uid: str
    series_uid: str
    sop_uid: str
    pixel_spacing_mm: float
    source_to_detector_mm: float
    source_to_patient_mm: float
    kvp: float
    exposure_mas: float
    burned_in_annotation: bool


def sample_variant(rng: np.random.Generator) -> EncodingVariant:
    modality = "DX" if rng.random() < 0.6 else "CR"
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    voi = ("none", "window", "lut")[int(rng.choice(3, p=[0.25, 0.45, 0.30]))]
    rescale = voi != "lut" and rng.random() < 0.4
    transfer = "jpeg-lossless" if rng.random() < 0.4 else "explicit-le"
    return EncodingVariant(modality, photometric, voi, rescale, transfer)


def encode_pixels(display: np.ndarray, log_image: np.ndarray, lut: np.ndarray, variant: EncodingVariant,
                  rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Stored ``uint16`` pixels and the pixel-describing attributes for ``variant``.

    ``display`` and ``log_image`` are in [0, 1]; ``lut`` maps 0..4095 to the display tone curve
    (used only by the ``lut`` variant, whose stored data is the log image).
    """
    attributes: dict = {}
    if variant.voi == "lut":
        stored = np.round(log_image * MAX_STORED)
        table = lut if variant.photometric == "MONOCHROME2" else MAX_STORED - lut[::-1]
        item = Dataset()
        item.LUTDescriptor = [MAX_STORED + 1, 0, 12]
        item.LUTExplanation = "SIMPLEBITS DEMO TONE"
        item.LUTData = np.asarray(table, dtype="<u2").tobytes()  # OW in explicit VR
        attributes["VOILUTSequence"] = Sequence([item])
        window_low, window_width = None, None
    elif variant.voi == "window":
        low, span = rng.uniform(0.02, 0.15), rng.uniform(0.6, 0.85)
        stored = np.round((low + span * display) * MAX_STORED)
        window_low, window_width = low * MAX_STORED, span * MAX_STORED
    else:
        stored = np.round(display * MAX_STORED)
        window_low, window_width = None, None

    if variant.photometric == "MONOCHROME1":
        stored = MAX_STORED - stored
        if window_low is not None:
            window_low = MAX_STORED - (window_low + window_width)

    slope, intercept = (1.0, 0.0)
    if variant.rescale:
        slope, intercept = float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([-1024.0, 0.0, 100.0]))
        attributes["RescaleSlope"] = f"{slope:g}"
        attributes["RescaleIntercept"] = f"{intercept:g}"
        attributes["RescaleType"] = "US"
    if window_low is not None:
        center = slope * (window_low + window_width / 2.0) + intercept
        attributes["WindowCenter"] = f"{center:.1f}"
        attributes["WindowWidth"] = f"{slope * window_width:.1f}"
        attributes["VOILUTFunction"] = "LINEAR"
    return np.clip(stored, 0, MAX_STORED).astype(np.uint16), attributes


def write_dicom(path: str | Path, stored: np.ndarray, pixel_attributes: dict, variant: EncodingVariant,
                header: StudyHeader) -> Path:
    """Write one radiograph atomically; JPEG lossless files are transcoded by GDCM and decoded back."""
    path = Path(path)
    dataset = _dataset(stored, pixel_attributes, variant, header)
    with atomic_path(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
        if variant.transfer == "jpeg-lossless":
            _transcode_jpeg_lossless(tmp, stored, dataset)
    return path


def tone_lut(tone) -> np.ndarray:
    """``tone`` (a [0,1] -> [0,1] curve) tabulated over all 12-bit stored values."""
    return np.round(tone(np.arange(MAX_STORED + 1) / MAX_STORED) * MAX_STORED).astype(np.uint16)


def _dataset(stored: np.ndarray, pixel_attributes: dict, variant: EncodingVariant, header: StudyHeader
             ) -> FileDataset:
    sop_class = DX_PRESENTATION_STORAGE if variant.modality == "DX" else CR_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = header.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = header.sop_uid
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.Modality = variant.modality
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = header.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = header.study_time
    ds.AccessionNumber = header.accession_number
    ds.InstitutionName = header.institution_name
    ds.ReferringPhysicianName = header.referring_physician
    ds.Manufacturer = "SimpleBits Demo"
    ds.ManufacturerModelName = "DRR-1"
    ds.StudyDescription = "XR CHEST PA"
    ds.SeriesDescription = "CHEST PA"
    ds.StudyID = header.accession_number[-6:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = header.patient_sex
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # columns towards patient left, rows towards the feet
    ds.KVP = f"{header.kvp:.0f}"
    ds.Exposure = int(round(header.exposure_mas))
    ds.DistanceSourceToDetector = f"{header.source_to_detector_mm:.1f}"
    ds.DistanceSourceToPatient = f"{header.source_to_patient_mm:.1f}"
    ds.ImagerPixelSpacing = [f"{header.pixel_spacing_mm:.4f}"] * 2
    ds.BurnedInAnnotation = "YES" if header.burned_in_annotation else "NO"
    if variant.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if variant.photometric == "MONOCHROME2" else -1
        ds.DetectorType = "SCINTILLATOR"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = variant.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    for keyword, value in pixel_attributes.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds


def _transcode_jpeg_lossless(path: Path, expected: np.ndarray, original: Dataset) -> None:
    """Re-encode ``path`` in place as JPEG lossless SV1 with GDCM, then check it decodes losslessly.

    GDCM adds an identity Rescale Slope/Intercept to CR images; those are removed again so that the
    file carries exactly the header variant that was asked for.
    """
    import gdcm
    import pydicom

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise OSError(f"{path}: GDCM could not read the uncompressed file it should transcode")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise OSError(f"{path}: GDCM failed to encode JPEG lossless")
    with tempfile.NamedTemporaryFile(suffix=".dcm", dir=path.parent, delete=False) as handle:
        encoded = Path(handle.name)
    try:
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(encoded))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise OSError(f"{path}: GDCM failed to write the JPEG lossless file")
        check = pydicom.dcmread(encoded)
        lossless = np.array_equal(check.pixel_array, expected)
        if check.file_meta.TransferSyntaxUID != JPEGLosslessSV1 or not lossless:
            raise OSError(f"{path}: JPEG lossless round trip did not reproduce the pixels")
        rescale = ("RescaleSlope", "RescaleIntercept", "RescaleType")
        added = [k for k in rescale if k in check and k not in original]
        for keyword in added:
            delattr(check, keyword)
        if added:
            check.save_as(encoded)
        encoded.replace(path)
    finally:
        encoded.unlink(missing_ok=True)

