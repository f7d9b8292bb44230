"""Folders as they come: a byte-identical copy, a truncated copy, a SOPInstanceUID collision, a CT
and junk are each logged and skipped, named by their path relative to the root, while every good
image reaches the manifest."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import CTImageStorage

import pipeline.io.readers
from pipeline.cli import main
from pipeline.data.manifest import read_manifest
from pipeline.data.sources import ManifestConfig
from pipeline.data.sources.folder import PROBLEM_COLUMNS, resolve_collision, scan_folder

GOOD = ["a/img1.dcm", "a/img2.dcm", "b/img3.dcm"]
# path -> (problem, kept); the truncated copy sorts before its original, so only readability decides
EXPECTED_PROBLEMS = {
    "a/img0_truncated.dcm": ("unreadable_duplicate", "a/img2.dcm"),
    "b/img3_annotated.dcm": ("uid_conflict", "b/img3.dcm"),
    "copies/img1.dcm": ("identical_copy", "a/img1.dcm"),
    "ct.dcm": ("not_radiograph", ""),
    "junk.dcm": ("unreadable", ""),
}
# the only files whose contents must be decoded: differing contents that share a SOPInstanceUID
COLLIDING_CONTENTS = {"a/img0_truncated.dcm", "a/img2.dcm", "b/img3.dcm", "b/img3_annotated.dcm"}
LOGGER = "pipeline.data.sources.folder"


def ramp(offset: int) -> np.ndarray:
    return (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) + offset) % 4096


def truncate(source: Path, target: Path) -> Path:
    """Half of ``source``: its header is whole, its pixel data ends early."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.fixture
def export(tmp_path, dicom_file) -> Path:
    root = tmp_path / "export"
    for index, name in enumerate(GOOD):
        dicom_file(f"export/{name}", ramp(100 * index), bits_stored=12)
    (root / "copies").mkdir()
    shutil.copyfile(root / "a/img1.dcm", root / "copies/img1.dcm")
    truncate(root / "a/img2.dcm", root / "a/img0_truncated.dcm")
    original = pydicom.dcmread(root / "b/img3.dcm", stop_before_pixels=True)
    dicom_file("export/b/img3_annotated.dcm", ramp(7), bits_stored=12,
               SOPInstanceUID=original.SOPInstanceUID, StudyInstanceUID=original.StudyInstanceUID)
    dicom_file("export/ct.dcm", ramp(9).astype(np.int16), modality="CT", sop_class=CTImageStorage)
    (root / "junk.dcm").write_text("exported by a PACS that was not asked\n" * 20)
    return root


def config(root: Path, out: Path) -> ManifestConfig:
    return ManifestConfig.model_validate({"format": "folder", "root": str(root), "out": str(out)})


def relative(paths: pd.Series, root: Path) -> list[str]:
    return sorted(Path(p).relative_to(root.resolve()).as_posix() for p in paths)


def by_path(problems: pd.DataFrame) -> dict[str, tuple[str, str]]:
    return {row.path: (row.problem, row.kept) for row in problems.itertuples(index=False)}


def test_good_images_kept_and_each_problem_logged_by_relative_path(export, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    scan = scan_folder(export, config(export, tmp_path / "m.csv"))

    assert relative(scan.records["image_path"], export) == GOOD
    assert scan.records["study_id"].is_unique
    assert list(scan.problems.columns) == list(PROBLEM_COLUMNS)
    assert by_path(scan.problems) == EXPECTED_PROBLEMS
    reasons = dict(zip(scan.problems["path"], scan.problems["reason"]))
    assert "cannot decode pixel data" in reasons["a/img0_truncated.dcm"]
    assert "modality CT" in reasons["ct.dcm"]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    for path, (problem, kept) in EXPECTED_PROBLEMS.items():
        line = next(m for m in messages if m.startswith(f"{path}: skipped, {problem}: "))
        assert line.endswith(f"; kept {kept}") == bool(kept), line


def test_only_differing_contents_that_share_a_uid_are_decoded(export, tmp_path, monkeypatch):
    decoded = []
    read = pipeline.io.readers.read_radiograph

    def counting_read(path, *args, **kwargs):
        decoded.append(Path(path).relative_to(export).as_posix())
        return read(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.io.readers, "read_radiograph", counting_read)
    scan_folder(export, config(export, tmp_path / "m.csv"))
    assert sorted(decoded) == sorted(COLLIDING_CONTENTS)


def test_collision_without_a_readable_file_drops_every_copy(tmp_path, dicom_file):
    whole = dicom_file("whole.dcm", ramp(0), bits_stored=12)
    files = {
        "x/cut_early.dcm": truncate(whole, tmp_path / "cut_early.dcm"),
        "y/cut_late.dcm": tmp_path / "cut_late.dcm",
    }
    files["y/cut_late.dcm"].write_bytes(whole.read_bytes()[:-100])
    skipped = resolve_collision(files)
    assert {(s.path, s.problem, s.kept) for s in skipped} == {
        ("x/cut_early.dcm", "unreadable", ""), ("y/cut_late.dcm", "unreadable", "")
    }


def test_cli_exits_0_and_writes_the_problems_table_without_identifiers(export, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    out = tmp_path / "manifests" / "cohort.csv"
    assert main(["manifest", "--format", "folder", "--root", str(export), "--out", str(out)]) == 0

    assert relative(read_manifest(out)["image_path"], export) == GOOD
    table = out.parent / "cohort.problems.csv"
    problems = pd.read_csv(table, dtype=str, keep_default_na=False)
    assert by_path(problems) == EXPECTED_PROBLEMS
    dicoms = [path for path in export.rglob("*.dcm") if path.name != "junk.dcm"]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in dicoms]
    identifiers = {"Doe", "Jane", "MRN-0042"}
    identifiers |= {str(h.get(tag)) for h in headers for tag in ("SOPInstanceUID", "StudyInstanceUID")}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (table.read_text(), logged):
        assert not [secret for secret in identifiers if secret in text]
