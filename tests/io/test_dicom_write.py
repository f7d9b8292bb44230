"""Secondary Capture export: one new series per study, in the source study (identity allowed) or in a
de-identified study next to the de-identified original (default); red-teamed for identity; dciodvfy-clean.

The sources are the demo cohort's DICOMs (several encodings, JPEG lossless included) with identity
planted everywhere a PACS export puts it: patient module, institution, physicians, accession, study
and series descriptions, comments, request sequences, LUT explanation and a private block.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from pipeline.data.demo.dicom import EncodingVariant, StudyHeader, encode_pixels, write_dicom
from pipeline.data.ingest import write_ingest_folder
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.data.store import write_images
from pipeline.io.dicom_write import (
    ORIGINAL_FILE, ORIGINAL_SERIES_DESCRIPTION, SERIES_DESCRIPTION, SIMPLIFIED_FILE, build_secondary_capture,
    write_run_secondary_captures, write_study_series,
)

SIMPLIFY_NAME = "scale_space-lam0.3"
SHAPE = (40, 48)  # rows x columns, landscape like nothing else, so a transposition cannot pass
#: (name, MRN, birth date) of two patients with two studies each.
PATIENTS = [("QZPHITEST^QUINCY", "7700123", "19290817"), ("BXPHITEST^BEATRIX", "7700456", "19411203")]
#: (study date, study time, accession, institution) per study of a patient, and its encoding.
STUDIES = [("20190311", "081512", "ACC91827364", "Northfield University Hospital"),
           ("20210627", "173045", "ACC55443322", "Mercy West Radiology")]
VARIANTS = [EncodingVariant("DX", "MONOCHROME2", "window", False, "jpeg-lossless"),
            EncodingVariant("CR", "MONOCHROME1", "lut", False, "explicit-le"),
            EncodingVariant("DX", "MONOCHROME1", "none", True, "explicit-le"),
            EncodingVariant("CR", "MONOCHROME2", "window", True, "jpeg-lossless")]
#: Free-text identity planted in attributes that no allowlisted attribute can hold.
PLANTED = {
    "InstitutionAddress": "12 Canary Wharf Road, Springfield", "InstitutionalDepartmentName": "CANARYDEPT",
    "StationName": "CANARYSTATION", "DeviceSerialNumber": "SN-CANARY-77",
    "PerformingPhysicianName": "Canary^Perf", "OperatorsName": "Canary^Operator",
    "PhysiciansOfRecord": "Canary^Record", "OtherPatientIDs": "OTHERID-5511",
    "PatientAddress": "7 Canary Lane", "PatientComments": "lives with CANARYFAMILY",
    "ImageComments": "call Dr Canary on 555-0199",
}
DATE_VRS = ("DA", "DT", "TM")


def _source_dataset(path: Path, patient: int, study: int) -> tuple[Path, dict]:
    """One demo DICOM with identity planted; returns its path and the identifiers it carries."""
    name, mrn, birth = PATIENTS[patient]
    date, time, accession, institution = STUDIES[study]
    index = 2 * patient + study
    variant = VARIANTS[index]
    rng = np.random.default_rng(index)
    log_image = rng.random(SHAPE).astype(np.float32)
    lut = np.arange(4096, dtype=np.uint16)
    stored, pixel_attributes = encode_pixels(log_image, log_image, lut, variant, rng)
    # Fixed UIDs: a short secret (a time, a study id) could otherwise turn up inside a random UID's digits.
    uids = {k: generate_uid(entropy_srcs=[str(index), k])
            for k in ("study", "series", "sop", "frame", "event", "pps")}
    header = StudyHeader(
        patient_name=name, patient_id=mrn, patient_birth_date=birth, patient_sex="F", study_date=date,
        study_time=time, accession_number=accession, institution_name=institution,
        referring_physician="Canary^Referrer", study_uid=uids["study"], series_uid=uids["series"],
        sop_uid=uids["sop"], pixel_spacing_mm=0.2, source_to_detector_mm=1800.0, source_to_patient_mm=1600.0,
        kvp=120.0, exposure_mas=3.0, burned_in_annotation=index == 3,  # one source declares burned-in text
    )
    write_dicom(path, stored, pixel_attributes, variant, header)
    ds = pydicom.dcmread(path)
    for keyword, value in PLANTED.items():
        setattr(ds, keyword, value)
    ds.StudyDescription = ds.SeriesDescription = f"CHEST for {name.split('^')[0]}"
    ds.AcquisitionDateTime = f"{date}{time}"
    ds.FrameOfReferenceUID, ds.IrradiationEventUID = uids["frame"], uids["event"]
    request = Dataset()
    request.AccessionNumber, request.RequestedProcedureID = accession, f"RP{accession}"
    request.ScheduledProcedureStepStartDate = date
    ds.RequestAttributesSequence = Sequence([request])
    pps = Dataset()
    pps.ReferencedSOPClassUID, pps.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.3", uids["pps"]
    ds.ReferencedPerformedProcedureStepSequence = Sequence([pps])
    if "VOILUTSequence" in ds:
        ds.VOILUTSequence[0].LUTExplanation = f"tone for {mrn}"
    block = ds.private_block(0x0009, "CANARY VENDOR", create=True)
    block.add_new(0x01, "LO", f"{name} {mrn}")
    ds.save_as(path)
    secrets = [name, *name.split("^"), mrn, birth, date, time, accession, accession[-6:], institution,
               "Canary", "CANARY", "555-0199", "OTHERID", *uids.values()]
    return path, {"patient": mrn, "study_uid": uids["study"], "sop_uid": uids["sop"], "secrets": secrets}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """A run folder whose four studies (two patients) were read from the planted DICOMs and simplified."""
    root = tmp_path_factory.mktemp("dicom_run")
    run_dir, sources, manifest = root / "run", [], []
    for patient in range(len(PATIENTS)):
        for study in range(len(STUDIES)):
            folder = root / "pacs" / PATIENTS[patient][1]  # named after the MRN, as PACS exports often are
            path, source = _source_dataset(folder / f"{study}.dcm", patient, study)
            sid = study_pseudonym(source["study_uid"])
            sources.append({**source, "study_id": sid, "path": path})
            manifest.append({"study_id": sid, "patient_id": patient_pseudonym(source["patient"]),
                             "image_path": str(path), "view": "PA", "sex": "F", "age": 70.0,
                             "effusion": study, "split": "val", "source": "folder"})
    images = np.stack([np.random.default_rng(i).integers(0, 256, SHAPE, dtype=np.uint8) for i in range(4)])
    write_ingest_folder(run_dir / "ingest", pd.DataFrame(manifest), images)
    sim_dir = run_dir / "simplify" / SIMPLIFY_NAME
    write_images(sim_dir / "simplified", [s["study_id"] for s in sources], images // 32 * 32)
    pd.DataFrame({"study_id": [s["study_id"] for s in sources], "split": "val"}).to_csv(
        sim_dir / "predictions.csv", index=False)
    for source, image in zip(sources, images // 32 * 32):
        source["simplified"] = image
    return run_dir, sources


@pytest.fixture(scope="module")
def deidentified(run) -> list[Path]:
    run_dir, _ = run
    return write_run_secondary_captures(run_dir, SIMPLIFY_NAME, out_dir=run_dir / "deidentified")


@pytest.fixture(scope="module")
def identified(run) -> list[Path]:
    run_dir, _ = run
    return write_run_secondary_captures(run_dir, SIMPLIFY_NAME, allow_identity=True,
                                        out_dir=run_dir / "identified")


def _values(ds: Dataset) -> list[str]:
    """Every value in ``ds``, nested sequences and private elements included, as text."""
    out = []
    for element in ds.iterall():
        value = element.value
        out += [v.decode("latin-1") if isinstance(v, bytes) else str(v)
                for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value])
                if element.VR != "SQ"]
    return out


def test_deidentified_layout_holds_no_source_identity(run, deidentified):
    run_dir, sources = run
    assert [p.parent.name for p in deidentified] == [s["study_id"] for s in sources]
    outputs = sorted((run_dir / "deidentified").rglob("*.dcm"))
    assert len(outputs) == 2 * len(sources) - 1  # no original for the source that declares burned-in text
    for path in outputs:
        ds = pydicom.dcmread(path)
        text, raw = "\n".join(_values(ds) + _values(ds.file_meta)), path.read_bytes()
        for source in sources:
            for secret in source["secrets"]:
                assert secret not in text and secret.encode() not in raw, f"{secret!r} in {path}"
        dated = [e for e in ds.iterall() if e.VR in DATE_VRS and not e.is_empty]
        assert not dated, f"dates left in {path}: {dated}"
        assert not any(e.tag.is_private for e in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES" and ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert all(ds.get(k) == "" for k in ("StudyID", "AccessionNumber", "PatientBirthDate", "StudyDate"))
        assert "ContributingEquipmentSequence" not in ds or all(
            "InstitutionName" not in item for item in ds.ContributingEquipmentSequence)


def test_deidentified_study_per_source_study_with_both_series(run, deidentified):
    _, sources = run
    studies, patients = {}, {}
    for path, source in zip(deidentified, sources):
        sc = pydicom.dcmread(path)
        patients.setdefault(source["patient"], set()).add(sc.PatientID)
        assert sc.PatientID == patient_pseudonym(source["patient"])
        assert str(sc.PatientName).rstrip("^") == sc.PatientID
        assert studies.setdefault(sc.StudyInstanceUID, sc.PatientID) == sc.PatientID  # one patient per study
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.SeriesDescription == SERIES_DESCRIPTION
        np.testing.assert_array_equal(sc.pixel_array, source["simplified"])
        reference = sc.SourceImageSequence[0]
        original_path = path.parent / ORIGINAL_FILE
        if not original_path.exists():
            assert sc.BurnedInAnnotation == "YES"  # the source said so; no de-identified original is written
            continue
        original = pydicom.dcmread(original_path)
        assert (original.StudyInstanceUID, original.PatientID) == (sc.StudyInstanceUID, sc.PatientID)
        assert original.SeriesInstanceUID != sc.SeriesInstanceUID
        assert original.SeriesDescription == ORIGINAL_SERIES_DESCRIPTION  # named in a PACS, the source's removed
        assert reference.ReferencedSOPInstanceUID == original.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == original.SOPClassUID
        np.testing.assert_array_equal(original.pixel_array, pydicom.dcmread(source["path"]).pixel_array)
    assert len(studies) == len(sources)  # a new study per source study, none shared
    assert all(len(ids) == 1 for ids in patients.values()) and len(patients) == len(PATIENTS)
    series = [pydicom.dcmread(p).SeriesInstanceUID for p in deidentified]
    assert len(set(series)) == len(sources)  # one series per study


def test_identity_allowed_joins_the_source_study(run, identified):
    _, sources = run
    series = set()
    for path, source in zip(identified, sources):
        sc, ref = pydicom.dcmread(path), pydicom.dcmread(source["path"])
        assert sc.StudyInstanceUID == ref.StudyInstanceUID and sc.SeriesInstanceUID != ref.SeriesInstanceUID
        assert (sc.PatientID, sc.PatientName, sc.StudyDate) == (ref.PatientID, ref.PatientName, ref.StudyDate)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ref.SOPInstanceUID
        assert "PatientIdentityRemoved" not in sc and not (path.parent / ORIGINAL_FILE).exists()
        series.add(sc.SeriesInstanceUID)
    assert len(series) == len(sources)


def test_uids_are_stable_and_keyed(run, deidentified, identified, tmp_path, monkeypatch):
    """A re-run rewrites the same instances; the other layout, another simplifier run or another site
    key do not."""
    _, sources = run
    source, pixels = sources[0]["path"], sources[0]["simplified"]
    first, clinical = pydicom.dcmread(deidentified[0]), pydicom.dcmread(identified[0])
    shared = {first.SeriesInstanceUID, first.SOPInstanceUID} & {clinical.SeriesInstanceUID, clinical.SOPInstanceUID}
    assert not shared

    def uids(study_dir: str, name: str = SIMPLIFY_NAME) -> tuple[str, str, str]:
        sc = pydicom.dcmread(write_study_series(source, pixels, tmp_path / study_dir, "pat-0123456789ab",
                                                output_name=name).simplified)
        return sc.StudyInstanceUID, sc.SeriesInstanceUID, sc.SOPInstanceUID

    assert uids("again") == (first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    other = uids("other", "logit-lam1")
    assert other[0] == first.StudyInstanceUID and other[1] != first.SeriesInstanceUID
    monkeypatch.setenv("SIMPLEBITS_PSEUDONYM_KEY", "another site's secret")
    assert uids("keyed")[0] != first.StudyInstanceUID


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("layout", ["deidentified", "identified"])
def test_dciodvfy_finds_no_error(run, layout, request):
    run_dir, sources = run
    captures = request.getfixturevalue(layout)
    assert captures
    for path in captures:
        assert _dciodvfy_errors(path) == [], path
    # The de-identified original is as valid as its source: de-identification removes nothing required.
    for source in sources:
        original = run_dir / layout / source["study_id"] / ORIGINAL_FILE
        if original.exists():
            assert set(_dciodvfy_errors(original)) <= set(_dciodvfy_errors(source["path"])), original


def test_transposed_or_malformed_pixels_are_refused(run, tmp_path):
    _, sources = run
    source = pydicom.dcmread(sources[0]["path"], stop_before_pixels=True)
    with pytest.raises(ValueError, match="transposed"):
        build_secondary_capture(source, np.zeros(SHAPE[::-1], np.uint8), "pat-0123456789ab")
    with pytest.raises(ValueError, match="uint8"):
        build_secondary_capture(source, np.zeros(SHAPE, np.float32), "pat-0123456789ab")
    del source.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_secondary_capture(source, np.zeros(SHAPE, np.uint8), "pat-0123456789ab")


def test_unreadable_source_names_the_file(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not a dicom")
    with pytest.raises(ValueError, match="broken.dcm"):
        write_study_series(bad, np.zeros((4, 4), np.uint8), tmp_path / "study", "pat-0123456789ab")
    assert not (tmp_path / "study" / SIMPLIFIED_FILE).exists()
