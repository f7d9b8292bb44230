"""Ingest on a folder of good and bad files: reasons, store, resume, interruption, kills, load_cohort."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pipeline.data.ingest as ingest_module
from pipeline.cli import main
from pipeline.data.ingest import (
    IngestConfig,
    StatusWriter,
    StudyResult,
    ingest,
    load_cohort,
    open_store,
    read_status,
    store_path,
)
from pipeline.data.manifest import MANIFEST_COLUMNS
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym

CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
SIZE = 32

# file name -> expected status and a phrase of the reason
EXPECTED = {
    "good-dx.dcm": ("ok", ""),
    "good-cr-mono1.dcm": ("ok", ""),
    "good-rgba.png": ("ok", ""),
    "truncated.dcm": ("error", "cannot decode pixel data"),
    "report-sr.dcm": ("error", "no pixel data"),
    "slice-ct.dcm": ("error", "modality CT is not a projection radiograph"),
    "empty.dcm": ("error", "empty file"),
    "notes.dcm": ("error", "not a DICOM file"),
    "missing.dcm": ("error", "cannot open"),
}


@pytest.fixture
def cohort_folder(tmp_path, dicom_file) -> Path:
    """``tmp_path/in/manifest.csv`` with relative image paths to good and bad files."""
    rng = np.random.default_rng(0)
    pixels = np.full((40, 56), 1000, dtype=np.uint16)  # flat blocks: area resizing keeps their values
    pixels[:20, :28], pixels[20:, 28:], pixels[5:15, 35:50] = 100, 4000, 2500
    dicom_file("in/images/good-dx.dcm", pixels, bits_stored=12)
    dicom_file("in/images/good-cr-mono1.dcm", pixels, bits_stored=12, photometric="MONOCHROME1",
               modality="CR", sop_class=CR_SOP, PatientSex="M")
    rgba = rng.integers(0, 256, size=(30, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "in/images/good-rgba.png")
    whole = dicom_file("in/whole.dcm", pixels, bits_stored=12).read_bytes()
    (tmp_path / "in/images/truncated.dcm").write_bytes(whole[: len(whole) * 2 // 3])
    dicom_file("in/images/report-sr.dcm", None, modality="SR", sop_class=SR_SOP)
    dicom_file("in/images/slice-ct.dcm", pixels.astype(np.int16), modality="CT", sop_class=CT_SOP)
    (tmp_path / "in/images/empty.dcm").write_bytes(b"")
    (tmp_path / "in/images/notes.dcm").write_text("radiology notes, not pixels\n" * 10)

    names = list(EXPECTED)
    manifest = pd.DataFrame({
        "study_id": [study_pseudonym(n) for n in names],
        "patient_id": [patient_pseudonym(n) for n in names],
        "image_path": [f"images/{n}" for n in names],
        "view": "PA",
        "sex": ["F", "M", "", "F", "M", "F", "M", "F", "M"],
        "age": 50,
        "effusion": ["1", "0", "1", "", "0", "1", "0", "1", "0"],
        "split": ["train", "test", "train", "train", "val", "train", "val", "test", "train"],
        "source": "folder",
    })[list(MANIFEST_COLUMNS)]
    manifest.to_csv(tmp_path / "in/manifest.csv", index=False)
    return tmp_path / "in"


def config_for(folder: Path, out: Path, **kwargs) -> IngestConfig:
    return IngestConfig(manifest=str(folder / "manifest.csv"), out=str(out), size=SIZE, **kwargs)


def sid(name: str) -> str:
    return study_pseudonym(name)


def stored(out: Path, study_id: str) -> np.ndarray:
    """The ``(H, W)`` image in a study's store slot."""
    store = open_store(out)
    return store.read([store.slot(study_id)])[0]


def test_ingest_stores_good_files_and_explains_bad_ones(cohort_folder, tmp_path):
    out = tmp_path / "ingest"
    summary = ingest(config_for(cohort_folder, out))
    assert (summary.total, summary.ok, summary.error, summary.processed) == (9, 3, 6, 9)
    status = read_status(out / "status.csv").set_index("study_id")
    for name, (expected_status, phrase) in EXPECTED.items():
        row = status.loc[sid(name)]
        assert row.status == expected_status, (name, row.reason)
        if expected_status == "error":
            assert row.reason.startswith(f"{name}: ") and phrase in row.reason, row.reason
            assert str(cohort_folder) not in row.reason  # only the file name, never the folder
            assert not stored(out, sid(name)).any()  # its slot exists but was never written
        else:
            image = stored(out, sid(name))
            assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
            assert image.min() == 0 and image.max() == 255
    assert open_store(out).study_ids == [sid(name) for name in EXPECTED]  # one slot per manifest row
    written = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(written.columns) == list(MANIFEST_COLUMNS)
    assert set(written.study_id) == {sid("good-dx.dcm"), sid("good-cr-mono1.dcm"), sid("good-rgba.png")}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in written.image_path)
    assert (out / "config.resolved.yaml").is_file()


def test_monochrome1_is_stored_inverted(cohort_folder, tmp_path):
    out = tmp_path / "ingest"
    ingest(config_for(cohort_folder, out))
    mono2 = stored(out, sid("good-dx.dcm")).astype(int)
    mono1 = stored(out, sid("good-cr-mono1.dcm")).astype(int)
    content = slice(6, 26)  # 40x56 padded to 56x56: content rows 8..48 -> 32 px rows ~4.6..27.4
    assert np.abs(mono1[content] - (255 - mono2[content])).max() <= 1


def test_second_run_skips_finished_and_retry_redoes_errors(cohort_folder, tmp_path):
    out = tmp_path / "ingest"
    ingest(config_for(cohort_folder, out))
    lines = (out / "status.csv").read_text().splitlines()
    again = ingest(config_for(cohort_folder, out))
    assert (again.processed, again.skipped, again.ok, again.error) == (0, 9, 3, 6)
    assert (out / "status.csv").read_text().splitlines() == lines
    retried = ingest(config_for(cohort_folder, out, retry_errors=True))
    assert (retried.processed, retried.ok, retried.error) == (6, 3, 6)
    before = stored(out, sid("good-dx.dcm"))
    shutil.rmtree(store_path(out))  # a lost store is redone, not read back as blank slots
    redone = ingest(config_for(cohort_folder, out))
    assert (redone.processed, redone.ok, redone.error) == (9, 3, 6)
    assert (out / "status.orphaned.csv").is_file() and len(read_status(out / "status.csv")) == 9
    np.testing.assert_array_equal(stored(out, sid("good-dx.dcm")), before)


def test_new_manifest_rows_extend_the_store(cohort_folder, tmp_path):
    out = tmp_path / "ingest"
    full = pd.read_csv(cohort_folder / "manifest.csv", dtype=str, keep_default_na=False)
    full.iloc[:4].to_csv(cohort_folder / "first.csv", index=False)
    ingest(IngestConfig(manifest=str(cohort_folder / "first.csv"), out=str(out), size=SIZE))
    first_ids = open_store(out).study_ids
    kept = stored(out, sid("good-dx.dcm"))
    summary = ingest(config_for(cohort_folder, out))
    assert (summary.processed, summary.skipped, summary.ok) == (5, 4, 3)
    assert open_store(out).study_ids[:4] == first_ids  # old slots keep their place
    np.testing.assert_array_equal(stored(out, sid("good-dx.dcm")), kept)


def test_resuming_with_other_pixel_settings_is_refused(cohort_folder, tmp_path):
    out = tmp_path / "ingest"
    ingest(config_for(cohort_folder, out))
    with pytest.raises(ValueError, match=r"size: 32 -> 64"):
        ingest(IngestConfig(manifest=str(cohort_folder / "manifest.csv"), out=str(out), size=64))
    with pytest.raises(ValueError, match=r"voi: 'auto' -> 'none'"):
        ingest(config_for(cohort_folder, out, voi="none"))
    assert ingest(config_for(cohort_folder, out, workers=1)).processed == 0  # workers do not change pixels


def test_interrupted_run_resumes_without_redoing_work(cohort_folder, tmp_path, monkeypatch):
    out = tmp_path / "ingest"
    real = ingest_module.process_study
    calls: list[str] = []

    def killed_after_four(*job):
        if len(calls) == 4:
            raise KeyboardInterrupt  # not an Exception: a kill, not a bad file
        calls.append(job[0])
        return real(*job)

    monkeypatch.setattr(ingest_module, "process_study", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        ingest(config_for(cohort_folder, out))
    assert set(read_status(out / "status.csv").study_id) == set(calls)

    resumed: list[str] = []
    monkeypatch.setattr(ingest_module, "process_study", lambda *job: resumed.append(job[0]) or real(*job))
    summary = ingest(config_for(cohort_folder, out))
    assert not set(resumed) & set(calls) and len(resumed) == 9 - 4
    assert (summary.ok, summary.error, summary.skipped) == (3, 6, 4)


def test_status_table_survives_a_torn_line(tmp_path):
    path = tmp_path / "status.csv"
    with StatusWriter(path) as writer:
        writer.write(StudyResult("std-aaaaaaaaaaaa", "ok", "", 0.5))
    with open(path, "a") as fh:
        fh.write("std-bbbbbbbbbbbb,o")  # killed mid-line
    assert read_status(path).study_id.tolist() == ["std-aaaaaaaaaaaa"]
    with StatusWriter(path) as writer:
        writer.write(StudyResult("std-cccccccccccc", "error", "x.dcm: empty file", 0.1))
    status = read_status(path)
    assert status.study_id.tolist() == ["std-aaaaaaaaaaaa", "std-cccccccccccc"]
    assert status.reason.tolist() == ["", "x.dcm: empty file"]


def test_worker_pool_gives_the_same_pixels(cohort_folder, tmp_path):
    serial, pooled = tmp_path / "serial", tmp_path / "pooled"
    ingest(config_for(cohort_folder, serial))
    summary = ingest(config_for(cohort_folder, pooled, workers=2))
    assert (summary.ok, summary.error) == (3, 6)
    for name in ("good-dx.dcm", "good-cr-mono1.dcm", "good-rgba.png"):
        np.testing.assert_array_equal(stored(serial, sid(name)), stored(pooled, sid(name)))

    def outcome(folder):
        table = read_status(folder / "status.csv").sort_values("study_id")
        return table[["study_id", "status", "reason"]].reset_index(drop=True)

    pd.testing.assert_frame_equal(outcome(serial), outcome(pooled))


def test_load_cohort(cohort_folder, tmp_path):
    out = tmp_path / "ingest"
    ingest(config_for(cohort_folder, out))
    cohort = load_cohort(out)
    assert cohort.images.dtype == torch.uint8 and tuple(cohort.images.shape) == (3, 1, SIZE, SIZE)
    expected_ids = [sid("good-dx.dcm"), sid("good-cr-mono1.dcm"), sid("good-rgba.png")]
    assert cohort.study_ids == cohort.frame.study_id.tolist() == expected_ids
    for i, study in enumerate(cohort.study_ids):
        np.testing.assert_array_equal(cohort.images[i][0].numpy(), stored(out, study))
    floats = cohort.float()
    assert floats.dtype == torch.float32 and floats.min() >= 0 and floats.max() == 1
    torch.testing.assert_close(floats * 255, cohort.images.load().float())
    assert cohort.labels("effusion").tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="no sex label"):
        cohort.labels("sex")  # the PNG has no sex
    by_sex = load_cohort(out, task="sex")
    assert by_sex.study_ids == [sid("good-dx.dcm"), sid("good-cr-mono1.dcm")]
    assert by_sex.labels("sex").tolist() == [0, 1] and by_sex.labels("sex").dtype == torch.int64
    train = load_cohort(out, split="train")
    assert train.study_ids == [sid("good-dx.dcm"), sid("good-rgba.png")]
    torch.testing.assert_close(train.images[1], cohort.images[2])
    with pytest.raises(ValueError, match=r"task 'cardiomegaly' needs manifest column\(s\) \['cardiomegaly'\]"):
        cohort.labels("cardiomegaly")  # a known task, but this cohort has no such column
    with pytest.raises(ValueError, match="unknown task 'cardiomegally'; known tasks: no_finding, "):
        cohort.labels("cardiomegally")


def test_cli_ingest(cohort_folder, tmp_path):
    out = tmp_path / "cli"
    assert main(["ingest", "--manifest", str(cohort_folder / "manifest.csv"), "--out", str(out),
                 "--size", "48", "--set", "voi=none"]) == 0
    assert stored(out, sid("good-dx.dcm")).shape == (48, 48)
    resolved = (out / "config.resolved.yaml").read_text()
    assert "size: 48" in resolved and "voi: none" in resolved


def child_pids(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc; psutil is not a dependency)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = process_stat(int(entry.name))
            if fields and int(fields[1]) == pid and fields[0] != "Z":
                children.add(int(entry.name))
    return children


def process_stat(pid: int) -> list[str] | None:
    """``[state, ppid, ...]`` of ``/proc/<pid>/stat``, None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces


def is_running(pid: int) -> bool:
    fields = process_stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie holds no memory and waits to be reaped


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_killed_ingest_takes_its_workers_along_and_resumes(tmp_path, dicom_file):
    rng = np.random.default_rng(1)
    sources = 3  # a few distinct images, many studies: a slot written for the wrong study shows
    for k in range(sources):  # 2048 px: ~25 ms a study, so 120 studies outlast the kill by a second
        dicom_file(f"in/images/big-{k}.dcm", rng.integers(0, 4096, (2048, 2048), dtype=np.uint16),
                   bits_stored=12)
    studies = 120
    manifest = pd.DataFrame({
        "study_id": [study_pseudonym(f"big-{i}") for i in range(studies)],
        "patient_id": [patient_pseudonym(f"big-{i}") for i in range(studies)],
        "image_path": [f"images/big-{i % sources}.dcm" for i in range(studies)],
        "view": "PA", "sex": "F", "age": 50, "effusion": "1", "split": "train", "source": "folder",
    })[list(MANIFEST_COLUMNS)]
    manifest.to_csv(tmp_path / "in/manifest.csv", index=False)
    manifest.iloc[:sources].to_csv(tmp_path / "in/reference.csv", index=False)
    out, log_file = tmp_path / "killed", tmp_path / "killed.log"
    manifest_file = str(tmp_path / "in/manifest.csv")
    command = [sys.executable, "-m", "pipeline.cli", "ingest", "--manifest", manifest_file,
               "--out", str(out), "--size", str(SIZE), "--workers", "2"]
    with open(log_file, "wb") as log:
        parent = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=log)
    try:
        def decoding() -> bool:
            assert parent.poll() is None, f"ingest ended before the kill: {log_file.read_text()[-2000:]}"
            return len(child_pids(parent.pid)) >= 2 and len(read_status(out / "status.csv")) >= 2

        wait_for(decoding, 120, "two decode workers with studies done")
        workers = child_pids(parent.pid)  # the decode workers and any helper process: none may outlive it
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    try:
        wait_for(lambda: not any(is_running(pid) for pid in workers), 5, f"workers {workers} to exit")
    finally:
        for pid in filter(is_running, workers):  # orphans would outlive the test run
            os.kill(pid, signal.SIGKILL)

    committed = len(read_status(out / "status.csv"))
    assert 0 < committed < studies, "the kill came too late to interrupt the run"
    summary = ingest(IngestConfig(manifest=manifest_file, out=str(out), size=SIZE, workers=2))
    assert (summary.ok, summary.error, summary.skipped) == (studies, 0, committed)
    reference = tmp_path / "reference"
    ingest(IngestConfig(manifest=str(tmp_path / "in/reference.csv"), out=str(reference), size=SIZE))
    expected = open_store(reference).read(np.arange(sources))
    resumed = open_store(out)
    np.testing.assert_array_equal(resumed.read(resumed.slots(manifest.study_id.tolist())),
                                  expected[np.arange(studies) % sources])


def test_config_rejects_bad_values(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="working size"):
        IngestConfig(size=300)
    with pytest.raises(ValidationError):
        IngestConfig(workers=-1)
    with pytest.raises(ValidationError):
        IngestConfig(voi="lut")


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_shards_merge_into_one_status(cohort_folder, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "pipeline.cli", "ingest",
               "--manifest", str(cohort_folder / "manifest.csv"), "--out", str(out), "--size", str(SIZE)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob("status.part-*.csv"))
    status = read_status(out / "status.csv")
    assert len(status) == 9 and (status.status == "ok").sum() == 3
    assert len(pd.read_csv(out / "manifest.csv")) == 3
