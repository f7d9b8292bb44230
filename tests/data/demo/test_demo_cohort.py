"""End to end: a tiny demo cohort on disk (determinism, files, masks, splits, distractors, PHI)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from pipeline.cli import main
from pipeline.data.demo.cohort import DemoCohortConfig, DemoScene, generate_cohort, plan_cohort
from pipeline.data.manifest import read_manifest

PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "InstitutionName",
)


def _config(**kwargs) -> DemoCohortConfig:
    values = dict(n=10, size=32, seed=5, distractor={"mode": "independent"}, render={"n_points": 48})
    values.update(kwargs)
    return DemoCohortConfig.model_validate(values)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = _config()
    generate_cohort(config, out, show_progress=False)
    return out, config


def test_manifest_validates_and_points_at_readable_dicoms(cohort):
    out, config = cohort
    manifest = read_manifest(out / "manifest.csv")
    assert len(manifest) == config.n and manifest.study_id.is_unique
    assert set(manifest.source) == {"demo"} and set(manifest.view) == {"PA"}
    assert set(manifest.effusion.astype(int)) <= {0, 1} and set(manifest.sex) <= {"M", "F"}
    for row in manifest.itertuples():
        ds = pydicom.dcmread(out / row.image_path)
        assert ds.PatientSex == row.sex and ds.ViewPosition == "PA" and ds.Modality in ("DX", "CR")
        assert ds.pixel_array.shape == (config.size, config.size)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
    assert (out / "config.resolved.yaml").is_file()


def test_patients_keep_sex_and_split(cohort):
    manifest = read_manifest(cohort[0] / "manifest.csv")
    per_patient = manifest.groupby("patient_id").agg(sexes=("sex", "nunique"), splits=("split", "nunique"))
    assert (per_patient.sexes == 1).all() and (per_patient.splits == 1).all()


def test_masks_match_ground_truth(cohort):
    out, config = cohort
    truth = pd.read_csv(out / "ground_truth.csv")
    for row in truth.itertuples():
        with np.load(out / "masks" / f"{row.study_id}.npz") as masks:
            assert set(masks.files) == {"fluid", "lung", "breast", "distractor"}
            for name in masks.files:
                assert masks[name].shape == (config.size, config.size) and masks[name].dtype == bool
            assert masks["fluid"].any() == bool(row.effusion)
            assert masks["lung"].mean() > 0.1
            if row.sex == "F":
                assert masks["breast"].any()
            if row.breast_size == 0:
                assert not masks["breast"].any()
            assert masks["distractor"].any() == bool(row.distractor_present)
            if row.effusion:
                assert (masks["fluid"] & masks["lung"]).sum() > 0.5 * masks["fluid"].sum()


def test_saturated_distractors_reach_the_maximum_display_value(cohort):
    out, config = cohort
    scene = DemoScene(config)
    plans = [p for p in plan_cohort(config) if p.distractor is not None]
    assert plans, "this seed must contain distractors"
    for plan in plans[:3]:
        rendered = scene.render(plan)
        marked = rendered.display[rendered.masks["distractor"]]
        if plan.distractor.saturated:
            assert np.all(marked == 1.0)
        else:
            assert np.all(marked < 1.0) and np.all(marked > 0.5)


def test_same_seed_gives_identical_pixels_and_other_seed_differs(cohort, tmp_path):
    out, config = cohort
    generate_cohort(_config(n=3), tmp_path / "again", show_progress=False)
    generate_cohort(_config(n=3, seed=6), tmp_path / "other", show_progress=False)
    first = read_manifest(out / "manifest.csv").head(3)
    again = read_manifest(tmp_path / "again" / "manifest.csv")
    other = read_manifest(tmp_path / "other" / "manifest.csv")
    assert list(again.study_id) == list(first.study_id)
    assert not set(other.study_id) & set(first.study_id)
    for a, b in zip(first.image_path, again.image_path):
        assert pydicom.dcmread(out / a).PixelData == pydicom.dcmread(tmp_path / "again" / b).PixelData
    pixels = [pydicom.dcmread(out / a).pixel_array for a in first.image_path]
    others = [pydicom.dcmread(tmp_path / "other" / b).pixel_array for b in other.image_path]
    assert not any(np.array_equal(p, q) for p, q in zip(pixels, others))


def test_rerun_skips_finished_studies(cohort):
    out, config = cohort
    dicoms = sorted((out / "dicom").glob("*.dcm"))
    before = {p: p.stat().st_mtime_ns for p in dicoms}
    generate_cohort(config, out, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in dicoms} == before


def test_phi_is_in_dicom_headers_but_not_in_tables(cohort):
    out, _ = cohort
    values: dict[str, set[str]] = {k: set() for k in PHI_KEYWORDS}
    uids = set()
    for path in (out / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in PHI_KEYWORDS:
            assert str(ds.get(keyword, "")).strip(), f"{path.name}: {keyword} empty"
            values[keyword].add(str(ds.get(keyword)))
        uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyDate"):
        assert len(values[keyword]) > 2, f"{keyword} is not varied"
    tables = (out / "manifest.csv").read_text() + (out / "ground_truth.csv").read_text()
    for value in set().union(*values.values()) | uids:
        needle = value.split("^")[0]
        assert needle not in tables, f"PHI {value!r} leaked into a table"


def test_correlated_distractor_follows_label_in_train_only():
    config = DemoCohortConfig(n=3000, seed=2, distractor={"mode": "correlated", "p_match": 0.9})
    plans = pd.DataFrame(
        {"split": p.split, "effusion": p.effusion, "present": p.distractor is not None, "flag": p.correlated}
        for p in plan_cohort(config)
    )
    assert (plans.flag == (plans.split == "train")).all()
    rate = plans.groupby(["split", "effusion"]).present.mean()
    assert rate["train", 1] > 0.85 and rate["train", 0] < 0.15
    held_out = plans[plans.split != "train"]  # ~900 studies: 0.12 is about 3.5 standard errors
    held_out_rate = held_out.groupby("effusion").present.mean()
    assert abs(held_out_rate[1] - held_out_rate[0]) < 0.12
    assert 0.4 < held_out.present.mean() < 0.6


def test_no_distractors_in_mode_none():
    assert all(p.distractor is None for p in plan_cohort(DemoCohortConfig(n=200, seed=1)))


def test_cli_writes_a_cohort(tmp_path):
    out = tmp_path / "cli"
    code = main(["demo-cohort", "--n", "2", "--size", "32", "--seed", "9", "--out", str(out),
                 "--set", "render.n_points=32"])
    assert code == 0
    assert len(read_manifest(out / "manifest.csv")) == 2
    assert len(list((out / "dicom").glob("*.dcm"))) == 2 and len(list((out / "masks").glob("*.npz"))) == 2


def test_support_devices_label_is_the_drawn_marker(cohort):
    """The positive control: ``support_devices`` is 1 exactly where a burned-in marker or tag is drawn."""
    from pipeline.tasks import task_labels

    out, config = cohort
    manifest = read_manifest(out / "manifest.csv").set_index("study_id")
    truth = pd.read_csv(out / "ground_truth.csv").set_index("study_id").loc[manifest.index]
    drawn = []
    for study_id in manifest.index:
        with np.load(out / "masks" / f"{study_id}.npz") as masks:
            drawn.append(int(masks["distractor"].any()))
    assert manifest["support_devices"].tolist() == drawn == truth["distractor_present"].tolist()
    assert set(drawn) == {0, 1}  # independent mode: both classes in a cohort of 10
    assert task_labels(manifest, "support_devices").tolist() == [float(d) for d in drawn]
    # a column added, nothing else changed: the existing labels are the plan's as before
    plans = {p.study_id: p for p in plan_cohort(config)}
    assert manifest["effusion"].tolist() == [plans[s].effusion for s in manifest.index]
    assert list(manifest.columns)[-1] == "support_devices"
