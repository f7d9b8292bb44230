"""Folder builder on tiny DICOMs (with identifying header fields) and PNGs, plus the CLI end to end."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from pipeline.cli import main
from pipeline.data.manifest import ManifestError, read_manifest
from pipeline.data.pseudonym import patient_pseudonym
from pipeline.data.sources import ManifestConfig, build_manifest

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-4417-XYZ"
STUDY_ONE = generate_uid()
STUDY_TWO = generate_uid()


def write_dicom(path: Path, study_uid: str, view: str, sex: str = "F", age: str = "063Y") -> str:
    """A tiny DX file with a preamble; returns its SOPInstanceUID."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientSex = sex
    ds.PatientAge = age
    ds.ViewPosition = view
    ds.Modality = "DX"
    ds.Rows, ds.Columns = 16, 16  # the smallest a radiograph may be
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


@pytest.fixture
def folder(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "cohort"
    uids = [
        write_dicom(root / "effusion" / "img001.dcm", STUDY_ONE, "PA"),
        write_dicom(root / "effusion" / "img002.dcm", STUDY_ONE, "LL"),  # same study, second image
        write_dicom(root / "no_effusion" / "img003", STUDY_TWO, "AP", sex="M", age="006M"),  # no extension
    ]
    (root / "unsorted").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / "unsorted" / "img004.png")
    (root / "notes.txt").write_text(f"{PATIENT_NAME} {PATIENT_ID}")
    (root / ".cache").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(root / ".cache" / "thumb.png")
    return root, uids


def build(root: Path, **settings) -> pd.DataFrame:
    config = {"format": "folder", "root": str(root), "out": str(root / "m.csv"), **settings}
    return build_manifest(ManifestConfig.model_validate(config))


def by_file(manifest: pd.DataFrame) -> dict[str, pd.Series]:
    return {Path(p).name: row for p, (_, row) in zip(manifest["image_path"], manifest.iterrows())}


def test_headers_folder_labels_and_views(folder):
    root, _ = folder
    rows = by_file(build(root, views=[]))
    assert sorted(rows) == ["img001.dcm", "img002.dcm", "img003", "img004.png"]  # hidden and .txt skipped
    assert [rows[n]["effusion"] for n in ("img001.dcm", "img002.dcm", "img003")] == [1, 1, 0]
    assert pd.isna(rows["img004.png"]["effusion"])
    first = rows["img001.dcm"]
    assert (first["view"], first["sex"], first["age"]) == ("PA", "F", 63.0)
    assert (rows["img003"]["view"], rows["img003"]["sex"], rows["img003"]["age"]) == ("AP", "M", 0.5)
    assert rows["img001.dcm"]["patient_id"] == rows["img003"]["patient_id"] == patient_pseudonym(PATIENT_ID)
    assert rows["img001.dcm"]["study_id"] != rows["img002.dcm"]["study_id"]  # one row per image
    assert rows["img004.png"]["patient_id"] != rows["img001.dcm"]["patient_id"]
    assert sorted(by_file(build(root))) == ["img001.dcm", "img003"]  # default PA/AP filter


def test_labels_csv_overrides_and_matches_by_name(folder, tmp_path):
    root, _ = folder
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "filename,effusion,sex,view,patient_id\n"
        "img004.png,1,F,PA,site-patient-7\n"
        "no_effusion/img003,-1,,,\n"
        "missing.png,0,M,PA,x\n"
    )
    settings = {"views": [], "folder": {"labels_csv": str(labels)}}
    rows = by_file(build(root, **settings))
    png = rows["img004.png"]
    assert (png["effusion"], png["sex"], png["view"]) == (1, "F", "PA")
    assert png["patient_id"] == patient_pseudonym("site-patient-7")
    assert rows["img003"]["effusion"] == -1  # the CSV's raw -1 (uncertain) wins over the no_effusion folder
    assert rows["img003"]["sex"] == "M"  # blank CSV cell keeps the header value


def test_labels_csv_errors(folder, tmp_path):
    root, _ = folder
    labels = tmp_path / "labels.csv"
    labels.write_text("name,effusion\nimg004.png,1\n")
    with pytest.raises(ManifestError, match=r"labels.csv: missing columns \['filename'\]"):
        build(root, views=[], folder={"labels_csv": str(labels)})
    labels.write_text("filename,effusion\nimg004.png,maybe\n")
    with pytest.raises(ManifestError, match="labels.csv: column 'effusion' has values"):
        build(root, views=[], folder={"labels_csv": str(labels)})


def test_no_raw_identifier_in_manifest_or_config(folder, tmp_path):
    root, sop_uids = folder
    out = tmp_path / "out" / "manifest.csv"
    argv = ["manifest", "--format", "folder", "--root", str(root), "--out", str(out), "--all-views"]
    assert main(argv) == 0
    written = out.read_text() + (out.parent / "manifest.config.resolved.yaml").read_text()
    for secret in ["Doe", "Jane", PATIENT_ID, STUDY_ONE, STUDY_TWO, *sop_uids]:
        assert secret not in written
    manifest = read_manifest(out)
    assert len(manifest) == 4 and (manifest["source"] == "folder").all()


def test_cli_writes_resolved_config_and_reports_errors(folder, tmp_path, capsys):
    root, _ = folder
    out = tmp_path / "m" / "cohort.csv"
    argv = ["manifest", "--format", "folder", "--root", str(root), "--out", str(out),
            "--views", "PA,AP", "--seed", "5", "--require-label"]
    assert main(argv) == 0
    config = yaml.safe_load((out.parent / "cohort.config.resolved.yaml").read_text())
    assert config["views"] == ["PA", "AP"] and config["split"]["seed"] == 5
    assert config["require_labels"] == ["effusion"]
    assert len(read_manifest(out)) == 2

    assert main(["manifest", "--format", "folder", "--root", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "dataset root is not a folder" in capsys.readouterr().err
    only_png = tmp_path / "pngs"
    only_png.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(only_png / "a.png")
    assert main(["manifest", "--format", "folder", "--root", str(only_png), "--out", str(out)]) == 2
    assert "use --all-views" in capsys.readouterr().err
    assert main(["manifest", "--format", "folder", "--root", str(root), "--out", str(out),
                 "--require-label", "effusion_paper", "--all-views"]) == 2
    assert "needs manifest column(s) ['no_finding']" in capsys.readouterr().err
