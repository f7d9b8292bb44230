"""No PHI in any output: DICOM inputs carry a patient name, id and birth date; none may reach the reports,
the logs, the MLflow database and artifacts, or the review API. (The lead extends this to the full pipeline.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from synthetic_run import SIMPLIFY_NAME, running_review_server, synthetic_radiograph
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from skimage.transform import resize
from test_review_server import request

from pipeline.cli import main
from pipeline.data.ingest import write_ingest_folder
from pipeline.data.store import write_images
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.io.readers import read_radiograph

PATIENTS = [("ZZPHITEST^QUINCY", "PHIID4242", "19290817"), ("YYPHITEST^BEATRIX", "PHIID9191", "19411203")]
SIZE = 32


def write_dicom(path: Path, name: str, patient_id: str, birth_date: str, effusion: bool, seed: int) -> str:
    """A DX radiograph with identity in the header; returns its StudyInstanceUID."""
    pixels = synthetic_radiograph(np.random.default_rng(seed), 96, effusion).astype(np.uint16) * 16
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, patient_id, birth_date, "F"
    ds.AccessionNumber, ds.StudyDate, ds.Modality, ds.ViewPosition = f"ACC{patient_id}", "20240101", "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def build_run_from_dicoms(root: Path) -> tuple[Path, list[str]]:
    """DICOM sources (in folders named after the patient id, as PACS exports often are) -> run folder."""
    run = root / "run"
    sim = run / "simplify" / SIMPLIFY_NAME
    sim.mkdir(parents=True)
    manifest, predictions, uids, originals = [], [], [], []
    for i, (name, pid, birth) in enumerate(PATIENTS * 2):
        source = root / "pacs" / pid / f"{name.replace('^', '_')}_{i}.dcm"
        uids.append(write_dicom(source, name, pid, birth, effusion=bool(i % 2), seed=i))
        image, meta = read_radiograph(source)
        sid = study_pseudonym(meta["StudyInstanceUID"])
        cached = (resize(image, (SIZE, SIZE), anti_aliasing=True) * 255).round().astype(np.uint8)
        originals.append(cached)
        manifest.append({"study_id": sid, "patient_id": patient_pseudonym(pid), "image_path": str(source),
                         "view": meta["ViewPosition"], "sex": meta["PatientSex"], "age": 60 + i,
                         "effusion": i % 2, "split": "test", "source": "folder"})
        predictions.append({"study_id": sid, "split": "test", "label": i % 2, "p_orig": 0.3 + 0.4 * (i % 2),
                            "p_simpl": 0.35 + 0.3 * (i % 2), "bpd_orig": 4.0, "bpd_simpl": 2.0})
    write_ingest_folder(run / "ingest", pd.DataFrame(manifest), np.stack(originals))
    write_images(sim / "simplified", [m["study_id"] for m in manifest], np.stack(originals) // 64 * 64)
    pd.DataFrame(predictions).to_csv(sim / "predictions.csv", index=False)
    return run, uids


def secrets() -> list[bytes]:
    out = []
    for name, pid, birth in PATIENTS:
        out += [name.encode(), name.split("^")[0].encode(), name.split("^")[1].encode(), pid.encode(), birth.encode()]
    return out


@pytest.mark.slow
def test_no_identifier_in_any_output(tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.DEBUG)
    run, study_uids = build_run_from_dicoms(tmp_path)
    assert main(["report", str(run), "--dicom"]) == 0
    with running_review_server(run) as base:
        sid = json.loads(request(base, "GET", "/api/studies")[1])["studies"][0]["study_id"]
        rating = {"reader": "Dr A", "keeps_finding": "yes", "signs": ["meniscus"]}
        assert request(base, "PUT", f"/api/ratings/{sid}", rating)[0] == 200
        api = [request(base, "GET", path)[1]
               for path in ("/api/studies?reader=Dr%20A", "/api/ratings", f"/api/ratings/{sid}?reader=Dr%20A")]
    assert main(["review", str(run), "--export", str(run / "review" / "ratings.csv")]) == 0
    assert main(["review", str(run), "--log-mlflow"]) == 0

    outputs = [p for p in run.rglob("*") if p.is_file() and "ingest" not in p.relative_to(run).parts]
    names = {p.relative_to(run).parts[0] for p in outputs}
    assert {"studies", "cohort_report", "mlflow.db", "mlartifacts", "review", "dicom_sc"} <= names
    assert any(p.suffix == ".parquet" for p in outputs) and any(p.name == "ratings.sqlite" for p in outputs)
    captured = capsys.readouterr()
    texts = {"stdout": captured.out.encode(), "stderr": captured.err.encode(), "log": caplog.text.encode(),
             **{f"api{i}": body for i, body in enumerate(api)}}
    texts.update({str(p.relative_to(run)): p.read_bytes() for p in outputs})
    for where, data in texts.items():
        for secret in secrets():
            assert secret not in data, f"{secret!r} found in {where}"
        for uid in study_uids:
            assert uid.encode() not in data, f"StudyInstanceUID found in {where}"
    # The Secondary Captures are in new, de-identified studies and carry the pseudonym instead of the identity.
    captures = sorted((run / "dicom_sc").glob("*/simplified.dcm"))
    assert len(captures) == len(study_uids)
    for path in captures:
        sc = pydicom.dcmread(path)
        assert sc.StudyInstanceUID not in study_uids and sc.PatientID.startswith("pat-")
