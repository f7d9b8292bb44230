"""Secondary Capture export: same study, new research series, identity policy, pixels as given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.io.dicom_write import SERIES_DESCRIPTION, write_secondary_capture

PATIENT_NAME, PATIENT_ID, BIRTH_DATE, ACCESSION = "DOE^JANE", "MRN-778899", "19530704", "ACC-4455"
PSEUDONYM = "pat-0123456789ab"


def write_source_dicom(path: Path, rows: int = 40, cols: int = 30) -> pydicom.Dataset:
    """A minimal DX image with patient identity, like a PACS export."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray, for presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "F"
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = ACCESSION, "1", "20200101", "101010"
    ds.ReferringPhysicianName = "WHO^DR"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    path = tmp_path / "source.dcm"
    return path, write_source_dicom(path)


def test_secondary_capture_joins_study_with_pseudonym_by_default(tmp_path, source):
    path, ref = source
    pixels = np.arange(20 * 15, dtype=np.uint8).reshape(20, 15)  # portrait like the source, asymmetric content
    out = write_secondary_capture(path, pixels, tmp_path / "sc.dcm", PSEUDONYM)
    sc = pydicom.dcmread(out)
    assert sc.StudyInstanceUID == ref.StudyInstanceUID
    assert sc.SeriesInstanceUID != ref.SeriesInstanceUID and sc.SOPInstanceUID != ref.SOPInstanceUID
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert "research, not for diagnosis" in sc.SeriesDescription and sc.SeriesDescription == SERIES_DESCRIPTION
    assert sc.PatientID == PSEUDONYM and str(sc.PatientName) == PSEUDONYM
    assert sc.PatientBirthDate == "" and sc.AccessionNumber == ""
    raw = out.read_bytes()
    for secret in (PATIENT_NAME, PATIENT_ID, BIRTH_DATE, ACCESSION, "WHO^DR"):
        assert secret.encode() not in raw
    assert sc.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_array_equal(sc.pixel_array, pixels)


def test_identity_copied_only_when_allowed(tmp_path, source):
    path, ref = source
    pixels = np.full((20, 15), 7, np.uint8)
    sc = pydicom.dcmread(write_secondary_capture(path, pixels, tmp_path / "sc.dcm", PSEUDONYM, allow_identity=True))
    assert sc.PatientID == PATIENT_ID and str(sc.PatientName) == PATIENT_NAME and sc.PatientBirthDate == BIRTH_DATE


def test_identity_allowed_but_absent_in_source_stays_absent(tmp_path):
    path = tmp_path / "anon.dcm"
    ds = write_source_dicom(path)
    ds.PatientName, ds.PatientBirthDate = "", ""
    ds.save_as(path, enforce_file_format=True)
    sc = pydicom.dcmread(write_secondary_capture(path, np.zeros((4, 3), np.uint8), tmp_path / "sc.dcm",
                                                 PSEUDONYM, allow_identity=True))
    assert str(sc.PatientName) == "" and sc.PatientBirthDate == ""


def test_transposed_or_malformed_pixels_are_refused(tmp_path, source):
    path, _ = source
    with pytest.raises(ValueError, match="transposed"):
        write_secondary_capture(path, np.zeros((15, 20), np.uint8), tmp_path / "sc.dcm", PSEUDONYM)
    with pytest.raises(ValueError, match="uint8"):
        write_secondary_capture(path, np.zeros((20, 15), np.float32), tmp_path / "sc.dcm", PSEUDONYM)
    assert not (tmp_path / "sc.dcm").exists()


def test_unreadable_source_names_the_file(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom")
    with pytest.raises(ValueError, match="broken.dcm"):
        write_secondary_capture(bad, np.zeros((4, 4), np.uint8), tmp_path / "sc.dcm", PSEUDONYM)
