"""MIMIC-CXR-JPG builder on small label files written in the exact 2.0.0 / MIMIC-IV layouts."""

import gzip
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.manifest import ManifestError
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.data.sources import ManifestConfig, build_manifest
from pipeline.tasks import CHEXPERT_FINDINGS, TaskSpec, task_labels

CHEXPERT_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
    "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,"
    "Support Devices"
)
METADATA_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,"
    "StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
# dicom, subject, study, view, study date, official split
IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "21800506", "train"),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", "21800506", "train"),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "21800626", "train"),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "AP", "21330101", "validate"),
    ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "10000764", "50000001", "PA", "21330202", "validate"),
    ("8959e402-2175d68d-edba5a6c-520b6a1b-b4b5e4b0", "10000898", "50000002", "PA", "21450101", "test"),
    ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "10000898", "50000003", "PA", "21450707", "test"),
    ("f9a3b5c2-1d2e3f40-5a6b7c8d-9e0f1a2b-3c4d5e6f", "11000011", "50000004", "", "21900101", "test"),
]
# study -> (No Finding, Pleural Effusion); study 50000003 has no label row at all
LABELS = {
    "50414267": ("", "1.0"),
    "53189527": ("", "-1.0"),
    "57375967": ("", "0.0"),
    "50000001": ("1.0", ""),
    "50000002": ("1.0", "0.0"),
    "50000004": ("", "1.0"),
}
# other findings of some studies (every other cell blank, as "not mentioned" in the real file)
OTHER_FINDINGS = {
    "50414267": {"Cardiomegaly": "1.0", "Support Devices": "-1.0", "Lung Opacity": "0.0"},
    "57375967": {"Edema": "0.0", "Support Devices": "1.0", "Fracture": "1.0"},
}
PATIENTS = (
    "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n"
    "10000032,F,52,2180,2014 - 2016,2180-09-09\n"
    "10000764,M,86,2132,2014 - 2016,\n"
    "10000898,F,33,2145,2008 - 2010,\n"
)
DICOM = {name: IMAGES[i][0] for i, name in enumerate("A B C D E F G H".split())}


def write_mimic(root: Path, gzip_labels: bool = False, drop_label_column: str | None = None) -> Path:
    """MIMIC-CXR-JPG 2.0.0 label files (plus MIMIC-IV patients.csv) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    metadata = [METADATA_HEADER] + [
        f"{d},{s},{st},CHEST (PA AND LAT),{v},3056,2544,{date},213014.531,CHEST (PA AND LAT),"
        f"{'postero-anterior' if v == 'PA' else ''},Erect"
        for d, s, st, v, date, _ in IMAGES
    ]
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text("\n".join(metadata) + "\n")
    split = ["dicom_id,study_id,subject_id,split"] + [f"{d},{st},{s},{sp}" for d, s, st, _, _, sp in IMAGES]
    (root / "mimic-cxr-2.0.0-split.csv").write_text("\n".join(split) + "\n")
    subject_of = {st: s for _, s, st, _, _, _ in IMAGES}
    rows = []
    for study, (no_finding, effusion) in LABELS.items():
        values = dict.fromkeys(CHEXPERT_HEADER.split(",")[2:], "")
        values.update({"No Finding": no_finding, "Pleural Effusion": effusion, **OTHER_FINDINGS.get(study, {})})
        rows.append({"subject_id": subject_of[study], "study_id": study, **values})
    labels = pd.DataFrame(rows, columns=CHEXPERT_HEADER.split(","))
    if drop_label_column:
        labels = labels.drop(columns=[drop_label_column])
    text = labels.to_csv(index=False, lineterminator="\n")
    if gzip_labels:
        (root / "mimic-cxr-2.0.0-chexpert.csv.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (root / "mimic-cxr-2.0.0-chexpert.csv").write_text(text)
    (root / "patients.csv").write_text(PATIENTS)
    return root


def build(root: Path, **settings) -> pd.DataFrame:
    config = ManifestConfig.model_validate(
        {"format": "mimic-cxr-jpg", "root": str(root), "out": str(root / "m.csv"), **settings}
    )
    return build_manifest(config).set_index("study_id")


def row(manifest: pd.DataFrame, image: str) -> pd.Series:
    return manifest.loc[study_pseudonym(DICOM[image])]


def test_default_joins_view_filter_and_keeps_raw_codes(tmp_path):
    root = write_mimic(tmp_path / "mimic", gzip_labels=True)
    manifest = build(root)
    # PA/AP only (B lateral, H blank view out); C uncertain kept as -1 (the task drops it); E, G unlabeled
    assert sorted(manifest.index) == sorted(study_pseudonym(DICOM[i]) for i in "ACDEFG")
    assert [row(manifest, i)["effusion"] for i in "ACDF"] == [1, -1, 0, 0]
    assert pd.isna(row(manifest, "E")["effusion"]) and pd.isna(row(manifest, "G")["effusion"])
    effusion = task_labels(manifest, "effusion")
    assert effusion.isna().sum() == 3 and pd.isna(effusion[study_pseudonym(DICOM["C"])])
    a = row(manifest, "A")
    assert a["patient_id"] == patient_pseudonym("10000032")
    assert a["image_path"] == str(root.resolve() / "files/p10/p10000032/s50414267" / f"{DICOM['A']}.jpg")
    assert (manifest["source"] == "mimic-cxr-jpg").all()


def test_all_fourteen_findings_mapped_per_study(tmp_path):
    manifest = build(write_mimic(tmp_path / "mimic"), views=[])
    # columns of findings some image has a value for; the others (never mentioned) are left out
    mentioned = {"no_finding", "effusion", "cardiomegaly", "support_devices", "lung_opacity", "edema", "fracture"}
    assert {c for c in CHEXPERT_FINDINGS.values() if c in manifest.columns} == mentioned
    a, b, d = row(manifest, "A"), row(manifest, "B"), row(manifest, "D")  # B: A's study, lateral
    assert (a["cardiomegaly"], a["support_devices"], a["lung_opacity"]) == (1, -1, 0)
    assert (b["cardiomegaly"], b["support_devices"]) == (1, -1)  # labels are per study
    assert (d["edema"], d["support_devices"], d["fracture"]) == (0, 1, 1)
    assert pd.isna(d["cardiomegaly"]) and pd.isna(row(manifest, "G")["support_devices"])
    devices = task_labels(manifest, "support_devices")
    assert devices[study_pseudonym(DICOM["D"])] == 1.0 and pd.isna(devices[study_pseudonym(DICOM["A"])])
    u_ones = TaskSpec(name="devices_u1", column="support_devices", uncertain="positive", blank="negative")
    assert task_labels(manifest, u_ones)[study_pseudonym(DICOM["A"])] == 1.0
    assert task_labels(manifest, u_ones)[study_pseudonym(DICOM["G"])] == 0.0


def test_sex_and_age_at_study_from_patients_csv(tmp_path):
    manifest = build(write_mimic(tmp_path / "mimic"), views=[])
    assert (row(manifest, "A")["sex"], row(manifest, "A")["age"]) == ("F", 52.0)
    assert (row(manifest, "D")["sex"], row(manifest, "D")["age"]) == ("M", 87.0)  # 86 at 2132, study 2133
    not_in_patients = row(manifest, "H")
    assert (not_in_patients["sex"], pd.isna(not_in_patients["age"])) == ("", True)
    assert row(manifest, "B")["view"] == "LATERAL" and row(manifest, "H")["view"] == ""


def test_without_patients_csv_sex_and_age_are_unknown(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    (root / "patients.csv").unlink()
    manifest = build(root)
    assert (manifest["sex"] == "").all() and manifest["age"].isna().all()
    moved = tmp_path / "hosp" / "patients.csv"
    moved.parent.mkdir()
    moved.write_text(PATIENTS)
    assert row(build(root, mimic={"patients_csv": str(moved)}), "A")["sex"] == "F"


def test_label_policies_and_the_papers_mimic_policy(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    manifest = build(root)
    c = study_pseudonym(DICOM["C"])
    assert task_labels(manifest, TaskSpec(name="u1", column="effusion", uncertain="positive"))[c] == 1.0
    assert task_labels(manifest, TaskSpec(name="u0", column="effusion", uncertain="negative"))[c] == 0.0
    paper = task_labels(manifest, "effusion_paper")
    # D is negative without No Finding -> unlabeled; F keeps its negative; C, E, G unlabeled
    assert sorted(paper.dropna().index) == sorted(study_pseudonym(DICOM[i]) for i in "AF")
    strict = build(root, require_labels=["effusion_paper"])  # the paper's cohort: only those images
    assert sorted(strict.index) == sorted(study_pseudonym(DICOM[i]) for i in "AF")


def test_official_split_maps_validate_to_val(tmp_path):
    manifest = build(write_mimic(tmp_path / "mimic"), views=[], split={"mode": "official"})
    expected = {"A": "train", "B": "train", "D": "val", "E": "val", "F": "test", "G": "test", "H": "test"}
    assert {i: row(manifest, i)["split"] for i in expected} == expected
    patient_split = build(write_mimic(tmp_path / "mimic"), views=[])
    assert (patient_split.groupby("patient_id")["split"].nunique() == 1).all()


def test_missing_label_column_and_missing_file_are_clear_errors(tmp_path):
    root = write_mimic(tmp_path / "mimic", drop_label_column="Pleural Effusion")
    expected = r"mimic-cxr-2.0.0-chexpert.csv: missing columns \['Pleural Effusion'\]"
    with pytest.raises(ManifestError, match=expected):
        build(root)
    root = write_mimic(tmp_path / "other")
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(ManifestError, match="mimic-cxr-2.0.0-split.csv: label file not found"):
        build(root)


def test_unknown_official_split_value_is_an_error(tmp_path):
    root = write_mimic(tmp_path / "mimic")
    path = root / "mimic-cxr-2.0.0-split.csv"
    path.write_text(path.read_text().replace(",test\n", ",holdout\n"))
    with pytest.raises(ManifestError, match=r"split.csv: unknown split values \['holdout'\]"):
        build(root)
