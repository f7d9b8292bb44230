"""Demo renders in the folder layouts of the real datasets: CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14.

What a new user brings is a download of one of these datasets, not our demo folder. These writers
put demo radiographs (read from the demo's DICOMs as the pipeline reads them, then written as 8-bit
JPEG or PNG) into each dataset's own files and label tables, with labels from the demo's ground
truth, so that ``simplebits manifest --format <layout>`` and ``simplebits run --manifest`` can be
tried end to end without the real data. Header lines are those of the real files (the copies shipped
in the torchxrayvision wheel, and the MIMIC-CXR-JPG 2.0.0 / MIMIC-IV documentation).

Labels from the demo ground truth:

- ``Pleural Effusion`` (NIH: ``Effusion``): the rendered effusion;
- ``Support Devices`` (CheXpert, MIMIC): the demo's ``support_devices`` finding, a burned-in marker or
  text tag present (its stand-in for a device); NIH has no such label;
- ``No Finding``: no effusion (the demo's only pathology);
- sex and age from the demo patient, view PA; every other finding is left blank (not mentioned).

The demo's patient-level splits become official splits where a dataset has them (CheXpert
``valid.csv`` = the demo's test split; MIMIC ``split.csv``: train / validate / test).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.runtime.atomic import atomic_write_bytes

#: Layout names, as ``simplebits manifest --format`` spells them.
LAYOUTS = ("chexpert", "mimic-cxr-jpg", "nih")

#: CheXpert ``train.csv``/``valid.csv`` header (torchxrayvision's ``chexpert_train.csv.gz``).
CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
    "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
#: ``mimic-cxr-2.0.0-chexpert.csv.gz`` header.
MIMIC_LABEL_COLUMNS = (
    "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
    "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
#: ``mimic-cxr-2.0.0-metadata.csv.gz`` header.
MIMIC_METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
MIMIC_SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
#: MIMIC-IV ``hosp/patients.csv.gz`` header.
MIMIC_PATIENT_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod")
#: ``Data_Entry_2017.csv`` header: the 2017 file's, whose lines end in a comma (an empty last column)
#: and whose two bracketed headers hold a comma each, as released.
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")

_MIMIC_SPLITS = {"train": "train", "val": "validate", "test": "test"}
_PIXEL_SPACING_MM = 0.143


@dataclass(frozen=True)
class DemoStudy:
    """One demo radiograph with what the dataset tables need; no demo identifier is kept."""

    image: np.ndarray  # H x W uint8, display orientation
    patient: int  # 1, 2, ... in order of first appearance
    visit: int  # 0, 1, ... within the patient, in study order
    split: str  # train / val / test (patient level)
    sex: str  # M / F
    age: int
    effusion: int
    support_devices: int


# ------------------------------------------------------------------------------------------ demo side


def read_demo_studies(cohort_dir: str | Path) -> list[DemoStudy]:
    """The studies of a rendered demo cohort (``generate_cohort``'s folder), images read as ingest reads them."""
    from pipeline.io.readers import read_radiograph

    cohort_dir = Path(cohort_dir)
    manifest = pd.read_csv(cohort_dir / "manifest.csv", dtype={"study_id": str, "patient_id": str})
    patients = {pid: number for number, pid in enumerate(dict.fromkeys(manifest["patient_id"]), start=1)}
    visits: dict[str, int] = {}
    studies = []
    for row in manifest.itertuples(index=False):
        display, _ = read_radiograph(cohort_dir / row.image_path)
        visit = visits[row.patient_id] = visits.get(row.patient_id, -1) + 1
        studies.append(DemoStudy(
            image=np.round(display * 255).astype(np.uint8), patient=patients[row.patient_id], visit=visit,
            split=row.split, sex=row.sex, age=int(row.age), effusion=int(row.effusion),
            support_devices=int(row.support_devices),
        ))
    return studies


def write_demo_layout(layout: str, out_dir: str | Path, config=None, cohort_dir: str | Path | None = None) -> Path:
    """Render a demo cohort (``config``, a :class:`DemoCohortConfig`; burned-in marks independent of the
    label by default) or reuse a rendered one (``cohort_dir``), and write it in ``layout`` under ``out_dir``.
    The rendered DICOMs (which carry synthetic identities) stay out of ``out_dir``."""
    from pipeline.data.demo.cohort import DemoCohortConfig, generate_cohort

    if layout not in WRITERS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if cohort_dir is not None:
        return WRITERS[layout](read_demo_studies(cohort_dir), Path(out_dir))
    config = config or DemoCohortConfig(distractor={"mode": "independent"})
    with tempfile.TemporaryDirectory(prefix="demo-layout-") as tmp:
        generate_cohort(config, tmp, show_progress=False)
        return WRITERS[layout](read_demo_studies(tmp), Path(out_dir))


# ------------------------------------------------------------------------------------------- writers


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "L").save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _csv_bytes(frame: pd.DataFrame, compress: bool) -> bytes:
    text = frame.to_csv(index=False, lineterminator="\n").encode()
    return gzip.compress(text, mtime=0) if compress else text


def write_chexpert(studies: Iterable[DemoStudy], root: Path) -> Path:
    """CheXpert-v1.0-small: ``train.csv`` / ``valid.csv`` (the demo's test split) and
    ``{train,valid}/patientNNNNN/studyN/view1_frontal.jpg``; ``root`` is the folder holding ``train.csv``."""
    rows: dict[str, list[dict]] = {"train": [], "valid": []}
    for study in studies:
        folder = "valid" if study.split == "test" else "train"
        relative = f"{folder}/patient{study.patient:05d}/study{study.visit + 1}/view1_frontal.jpg"
        atomic_write_bytes(root / relative, _encode(study.image, "JPEG"))
        row = dict.fromkeys(CHEXPERT_COLUMNS, "")
        row.update({
            "Path": f"CheXpert-v1.0-small/{relative}", "Sex": "Male" if study.sex == "M" else "Female",
            "Age": study.age, "Frontal/Lateral": "Frontal", "AP/PA": "PA",
            "No Finding": 1.0 if not study.effusion else "",
            "Pleural Effusion": float(study.effusion), "Support Devices": float(study.support_devices),
        })
        rows[folder].append(row)
    for folder, table in rows.items():
        atomic_write_bytes(root / f"{folder}.csv", _csv_bytes(pd.DataFrame(table, columns=CHEXPERT_COLUMNS), False))
    return root


def _mimic_dicom_id(subject: int, study: int) -> str:
    """A MIMIC-style dicom_id (five dash-separated 8-hex groups), stable per study."""
    digest = hashlib.sha256(f"demo-layout:{subject}:{study}".encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def write_mimic(studies: Iterable[DemoStudy], root: Path) -> Path:
    """MIMIC-CXR-JPG 2.0.0: ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg``, the three gzipped tables and a
    MIMIC-IV ``patients.csv.gz``. Dates are shifted into the 22nd century as in MIMIC; the age at a
    study is ``anchor_age`` + (study year − ``anchor_year``), so the study year carries the demo's age."""
    labels, metadata, split, patients = [], [], [], {}
    for number, study in enumerate(studies):
        subject, study_id = 10_000_000 + study.patient, 50_000_000 + number
        anchor_year = 2150 + study.patient % 40
        dicom_id = _mimic_dicom_id(subject, study_id)
        relative = f"files/p{str(subject)[:2]}/p{subject}/s{study_id}/{dicom_id}.jpg"
        atomic_write_bytes(root / relative, _encode(study.image, "JPEG"))
        patient = patients.setdefault(subject, {
            "subject_id": subject, "gender": study.sex, "anchor_age": study.age, "anchor_year": anchor_year,
            "anchor_year_group": "2014 - 2016", "dod": ""})
        study_year = anchor_year + study.age - patient["anchor_age"]
        label = dict.fromkeys(MIMIC_LABEL_COLUMNS, "")
        label.update({"subject_id": subject, "study_id": study_id,
                      "No Finding": 1.0 if not study.effusion else "",
                      "Pleural Effusion": float(study.effusion), "Support Devices": float(study.support_devices)})
        labels.append(label)
        rows, columns = study.image.shape
        metadata.append({
            "dicom_id": dicom_id, "subject_id": subject, "study_id": study_id,
            "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": "PA", "Rows": rows,
            "Columns": columns, "StudyDate": f"{study_year}{min(study.visit, 11) + 1:02d}15",
            "StudyTime": "101530.000", "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
            "ViewCodeSequence_CodeMeaning": "postero-anterior", "PatientOrientationCodeSequence_CodeMeaning": "Erect",
        })
        split.append({"dicom_id": dicom_id, "study_id": study_id, "subject_id": subject,
                      "split": _MIMIC_SPLITS[study.split]})
    tables = {
        "mimic-cxr-2.0.0-chexpert.csv.gz": pd.DataFrame(labels, columns=MIMIC_LABEL_COLUMNS),
        "mimic-cxr-2.0.0-metadata.csv.gz": pd.DataFrame(metadata, columns=MIMIC_METADATA_COLUMNS),
        "mimic-cxr-2.0.0-split.csv.gz": pd.DataFrame(split, columns=MIMIC_SPLIT_COLUMNS),
        "patients.csv.gz": pd.DataFrame(list(patients.values()), columns=MIMIC_PATIENT_COLUMNS),
    }
    for name, table in tables.items():
        atomic_write_bytes(root / name, _csv_bytes(table, True))
    return root


def write_nih(studies: Iterable[DemoStudy], root: Path) -> Path:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` and ``images/<patient:08d>_<follow-up:03d>.png``."""
    lines = [NIH_HEADER]
    for study in studies:
        name = f"{study.patient:08d}_{study.visit:03d}.png"
        atomic_write_bytes(root / "images" / name, _encode(study.image, "PNG"))
        rows, columns = study.image.shape
        findings = "Effusion" if study.effusion else "No Finding"
        lines.append(f"{name},{findings},{study.visit},{study.patient},{study.age},{study.sex},PA,"
                     f"{columns},{rows},{_PIXEL_SPACING_MM},{_PIXEL_SPACING_MM},")
    atomic_write_bytes(root / "Data_Entry_2017.csv", ("\n".join(lines) + "\n").encode())
    return root


WRITERS: dict[str, Callable[[Iterable[DemoStudy], Path], Path]] = {
    "chexpert": write_chexpert, "mimic-cxr-jpg": write_mimic, "nih": write_nih,
}
