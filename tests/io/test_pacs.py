"""``simplebits export`` against a real PACS: Debian's Orthanc with its DICOMweb plugin, on loopback.

Each test gets a fresh Orthanc (temporary storage, free HTTP and DICOM ports) and a copy of the Secondary
Captures that the writer makes from test_dicom_write's planted sources. What arrived is checked through
Orthanc's own REST API, not through the code under test. A Lua filter in Orthanc drops any instance whose
SeriesDescription is ``REFUSE_MARK`` while still answering success, as a filtering PACS can.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import requests
from cohort_fixtures import TINY_DEMO_RUN
from test_dicom_write import SIMPLIFY_NAME, run  # noqa: F401  (run: the module's planted run folder)

from pipeline.cli import main
from pipeline.io.dicom_write import SIMPLIFIED_FILE, write_run_secondary_captures
from pipeline.io.pacs import CONFIRMED, LOG_FILE, NOT_LISTED, REFUSED, UNREADABLE

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
REFUSE_MARK = "REFUSED BY TEST FILTER"
AET = "ORTHANCTEST"


def _dicomweb_plugin() -> str:
    """The plugin's path as the Debian package installed it."""
    listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout
    plugins = [line for line in listing.splitlines() if line.endswith(".so") and "plugins" in line]
    assert plugins, "orthanc-dicomweb is not installed (apt-get install orthanc-dicomweb)"
    return plugins[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Orthanc:
    def __init__(self, root: Path):
        self.http_port, self.dicom_port = _free_port(), _free_port()
        self.rest = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.rest}/dicom-web"
        self.dimse = f"dicom://{AET}@127.0.0.1:{self.dicom_port}"
        (root / "filter.lua").write_text(
            f"function ReceivedInstanceFilter(dicom, origin, info)\n"
            f"  return dicom.SeriesDescription ~= '{REFUSE_MARK}'\nend\n")
        config = {
            "Name": "simplebits-test",
            "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": AET,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,  # loopback only
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,  # from any calling AE title
            "DicomCheckCalledAet": True,  # but only when called by its own
            "Plugins": [_dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [str(root / "filter.lua")], "SaveJobs": False,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = root / "orthanc.log"
        with open(self.log, "w") as out:
            self.process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._answers():
            assert self.process.poll() is None, f"Orthanc exited: {self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"Orthanc did not answer: {self.log.read_text()[-2000:]}"
            time.sleep(0.1)
        plugins = self.get("/plugins")
        assert "dicom-web" in plugins, f"DICOMweb plugin not loaded: {plugins}"

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.rest}/system", timeout=2).ok
        except requests.ConnectionError:
            return False

    def get(self, path: str):
        response = requests.get(f"{self.rest}{path}", timeout=10)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("Content-Type", "") else response.content

    def series(self) -> dict[str, list[str]]:
        """SeriesInstanceUID -> Orthanc ids of its instances."""
        return {s["MainDicomTags"]["SeriesInstanceUID"]: s["Instances"] for s in self.get("/series?expand")}

    def studies(self) -> dict[str, list[str]]:
        """StudyInstanceUID -> Orthanc ids of its series."""
        return {s["MainDicomTags"]["StudyInstanceUID"]: s["Series"] for s in self.get("/studies?expand")}

    def sop_instance_uids(self, instance_ids: list[str] | None = None) -> set[str]:
        """The SOP Instance UIDs of these instances (Orthanc ids), or of all it holds."""
        ids = self.get("/instances") if instance_ids is None else instance_ids
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ids}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def orthanc(tmp_path_factory):
    if not ORTHANC:
        pytest.skip("Debian orthanc is not installed (make test installs orthanc orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def captures(run) -> Path:  # noqa: F811
    """The de-identified Secondary Captures of the planted run (default layout)."""
    run_dir, _ = run
    write_run_secondary_captures(run_dir, SIMPLIFY_NAME)
    return run_dir / "dicom_sc"


@pytest.fixture
def run_copy(captures, tmp_path) -> Path:
    """A run folder holding a private copy of the Secondary Captures (and so its own pacs_sent.csv)."""
    shutil.copytree(captures, tmp_path / "run" / "dicom_sc")
    return tmp_path / "run"


def _sent_files(run_dir: Path) -> dict[str, pydicom.Dataset]:
    return {p.relative_to(run_dir / "dicom_sc").as_posix(): pydicom.dcmread(p)
            for p in sorted((run_dir / "dicom_sc").glob("*/*.dcm"))}


def _send(run_dir: Path, url: str, *extra: str) -> int:
    return main(["export", str(run_dir), "--pacs", url, *extra])


def _log(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / LOG_FILE, dtype=str, keep_default_na=False).set_index("file")


PROTOCOLS = ["dicomweb", "dimse"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_series_arrives_whole_and_without_identity(protocol, orthanc, run_copy, run, caplog,
                                                          capsys):  # noqa: F811
    _, sources = run
    caplog.set_level(logging.DEBUG)
    sent = _sent_files(run_copy)
    assert _send(run_copy, getattr(orthanc, protocol)) == 0

    # Orthanc holds every series we have, each with exactly our instances, and nothing else.
    ours: dict[str, set[str]] = {}
    for ds in sent.values():
        ours.setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
    stored = orthanc.series()
    assert set(stored) == set(ours)
    for series_uid, instance_ids in stored.items():
        assert orthanc.sop_instance_uids(instance_ids) == ours[series_uid]
    # One study per source study, holding the simplified series and the de-identified original if written.
    studies = orthanc.studies()
    assert len(studies) == len(sources)
    for source in sources:
        folder = [ds for name, ds in sent.items() if name.startswith(f"{source['study_id']}/")]
        assert len(studies[folder[0].StudyInstanceUID]) == len(folder)

    # Stored tags (private and nested included) carry none of the sources' identity; pixels are ours.
    for series_uid, instance_ids in stored.items():
        for instance in instance_ids:
            tags = json.dumps(orthanc.get(f"/instances/{instance}/tags"))
            for source in sources:
                for secret in source["secrets"]:
                    assert secret.lower() not in tags.lower(), f"{secret!r} reached the PACS"
    for source in sources:
        ds = sent[f"{source['study_id']}/{SIMPLIFIED_FILE}"]
        instance = next(i for i in orthanc.get("/instances?expand")
                        if i["MainDicomTags"]["SOPInstanceUID"] == ds.SOPInstanceUID)
        stored_file = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{instance['ID']}/file")))
        np.testing.assert_array_equal(stored_file.pixel_array, source["simplified"])

    log = _log(run_copy)
    assert sorted(log.index) == sorted(sent) and set(log["status"]) == {CONFIRMED}
    # Logs and the summary name studies by pseudonymous ids, never by a name (not even the pseudonym name).
    printed = caplog.text + capsys.readouterr().out + (run_copy / LOG_FILE).read_text()
    names = {str(ds.PatientName) for ds in sent.values()} | {str(ds.PatientID) for ds in sent.values()}
    for text in [s for source in sources for s in source["secrets"]] + sorted(names):
        assert text not in printed, f"{text!r} logged"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_rerun_skips_what_was_confirmed_and_a_resend_does_not_duplicate(protocol, orthanc, run_copy,
                                                                          capsys):
    url = getattr(orthanc, protocol)
    n = len(_sent_files(run_copy))
    assert _send(run_copy, url) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first[CONFIRMED], first["already_confirmed"]) == (n, 0)
    instances = sorted(orthanc.get("/instances"))

    assert _send(run_copy, url) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again[CONFIRMED], again["already_confirmed"]) == (0, n)
    assert _send(run_copy, url, "--resend") == 0
    resent = json.loads(capsys.readouterr().out)
    assert (resent[CONFIRMED], resent["already_confirmed"]) == (n, 0)
    assert sorted(orthanc.get("/instances")) == instances  # the same instances, not new copies
    assert len(_log(run_copy)) == n

    # A changed file is sent again even though its name was confirmed.
    changed = sorted((run_copy / "dicom_sc").glob(f"*/{SIMPLIFIED_FILE}"))[0]
    ds = pydicom.dcmread(changed)
    ds.ImageComments = "edited after sending"
    ds.save_as(changed)
    assert _send(run_copy, url) == 0
    assert json.loads(capsys.readouterr().out)[CONFIRMED] == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_refused_and_an_unreadable_file_are_recorded_and_the_others_arrive(protocol, orthanc, run_copy,
                                                                              capsys):
    files = sorted((run_copy / "dicom_sc").glob("*/*.dcm"))
    broken, refused = files[0], files[-1]
    broken.write_bytes(b"not a DICOM file at all")
    ds = pydicom.dcmread(refused)
    ds.SeriesDescription = REFUSE_MARK
    ds.save_as(refused)
    good = {p.relative_to(run_copy / "dicom_sc").as_posix(): pydicom.dcmread(p).SOPInstanceUID
            for p in files if p not in (broken, refused)}

    assert _send(run_copy, getattr(orthanc, protocol)) == 1  # not all confirmed
    summary = json.loads(capsys.readouterr().out)
    assert (summary[CONFIRMED], summary[REFUSED], summary[UNREADABLE]) == (len(good), 1, 1)
    log = _log(run_copy)
    broken_name, refused_name = (p.relative_to(run_copy / "dicom_sc").as_posix() for p in (broken, refused))
    assert log.loc[broken_name, "status"] == UNREADABLE and log.loc[broken_name, "reason"]
    assert (log.loc[refused_name, "status"], log.loc[refused_name, "reason"]) == (REFUSED, NOT_LISTED)
    assert set(log.loc[list(good), "status"]) == {CONFIRMED}
    assert orthanc.sop_instance_uids() == set(good.values())


@pytest.mark.parametrize("url, host", [("http://127.0.0.1:{port}/dicom-web", "127.0.0.1:{port}"),
                                       ("dicom://PACS@127.0.0.1:{port}", "127.0.0.1:{port}")])
def test_an_unreachable_pacs_is_one_line_naming_the_host(url, host, run_copy, capsys):
    port = _free_port()  # nothing listens there
    assert _send(run_copy, url.format(port=port), "--timeout", "5") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simplebits: error:") and "\n" not in err and host.format(port=port) in err
    assert not (run_copy / LOG_FILE).exists()


def test_captures_with_identity_are_sent_only_when_allowed(run, tmp_path, capsys):  # noqa: F811
    run_dir, _ = run
    identified = tmp_path / "run"
    write_run_secondary_captures(run_dir, SIMPLIFY_NAME, allow_identity=True, out_dir=identified / "dicom_sc")
    assert _send(identified, "http://127.0.0.1:9/dicom-web") == 2
    err = capsys.readouterr().err
    assert "carries patient identity" in err and "--allow-identity" in err


def test_identified_captures_join_the_source_study_when_allowed(orthanc, run, tmp_path, capsys):  # noqa: F811
    run_dir, sources = run
    identified = tmp_path / "run"
    write_run_secondary_captures(run_dir, SIMPLIFY_NAME, allow_identity=True, out_dir=identified / "dicom_sc")
    assert _send(identified, orthanc.dicomweb, "--allow-identity") == 0
    assert set(orthanc.studies()) == {s["study_uid"] for s in sources}


def test_a_wrong_called_ae_title_is_one_line(orthanc, run_copy, capsys):
    url = orthanc.dimse.replace(AET, "NOTTHEPACS")
    assert _send(run_copy, url) == 2
    err = capsys.readouterr().err.strip()
    # Orthanc rejects the association; under load pynetdicom may report that as an abort (see pacs.py).
    assert "\n" not in err and "NOTTHEPACS" in err
    assert re.search(r"(was rejected|was aborted during negotiation): check both AE titles", err)


def test_a_peer_that_hangs_up_on_the_association_request_is_one_line(run_copy, capsys):
    """What a refusing PACS looks like when its close overtakes its A-ASSOCIATE-RJ (seen once in CI)."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def hang_up_after_the_request():
        for _ in range(2):  # the first connection is the reachability probe, the second the association
            conn, _ = listener.accept()
            conn.settimeout(10)
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.close()

    threading.Thread(target=hang_up_after_the_request, daemon=True).start()
    try:
        assert _send(run_copy, f"dicom://SOMEPACS@127.0.0.1:{port}") == 2
    finally:
        listener.close()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SOMEPACS" in err
    assert "was aborted during negotiation: check both AE titles" in err


def test_a_url_that_is_no_pacs_is_refused(run_copy, capsys):
    assert _send(run_copy, "ftp://127.0.0.1/x") == 2
    assert "not a PACS URL" in capsys.readouterr().err


def test_run_config_sends_only_captures_it_writes(tmp_path):
    from pipeline.config import ConfigError, default_config_path, load_config
    from pipeline.workflow import RunConfig

    base = [f"out={tmp_path}", "report.pacs_url=http://127.0.0.1:8042/dicom-web"]
    assert load_config(RunConfig, default_config_path("run"), base).report.pacs_url.endswith("/dicom-web")
    with pytest.raises(ConfigError, match="report.pacs_url needs report.dicom_secondary_capture"):
        load_config(RunConfig, default_config_path("run"), [*base, "report.dicom_secondary_capture=false"])


@pytest.mark.slow
def test_the_main_job_sends_its_captures_to_the_pacs_it_is_given(orthanc, tmp_path, capsys):
    """``simplebits run --set report.pacs_url=…``: the report stage writes the Secondary Captures and
    sends every one of them; the run's summary says so and Orthanc holds them, two series per study."""
    out = tmp_path / "run"
    overrides = [arg for item in (*TINY_DEMO_RUN, f"report.pacs_url={orthanc.dicomweb}") for arg in ("--set", item)]
    assert main(["run", *overrides, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\nDone: ")[0])
    written = {pydicom.dcmread(p).SOPInstanceUID for p in (out / "dicom_sc").glob("*/*.dcm")}
    assert written and orthanc.sop_instance_uids() == written
    assert summary["report"]["pacs"][CONFIRMED] == len(written)
    assert set(_log(out)["status"]) == {CONFIRMED}
    assert all(len(series) == 2 for series in orthanc.studies().values())  # de-identified original + simplified
