"""Review server: whitelisted routes only, traversal refused, ratings durable across restarts and per reader,
writes same-origin JSON only, stalled requests timed out, exports safe to open in a spreadsheet."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from synthetic_run import SIMPLIFY_NAME, SOURCE_SIZE, request, running_review_server
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.report.review.server import STUDY_ATTRIBUTES, STUDY_FIELDS, ReviewHandler
from pipeline.report.review.store import RatingsStore, parse_rating


def study_ids(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "studies").iterdir())


def test_page_and_study_list(reported_run):
    with running_review_server(reported_run) as base:
        status, page = request(base, "GET", "/")
        assert status == 200 and b"SimpleBits review" in page
        assert request(base, "GET", "/static/app.js")[0] == 200
        status, body = request(base, "GET", "/api/studies")
        studies = json.loads(body)["studies"]
    assert [s["study_id"] for s in studies] == study_ids(reported_run)
    for study in studies:
        assert set(study) == {*STUDY_FIELDS, "attributes", "rating", "maps", "original_url"}
        assert study["maps"] == []  # no simplebits explain in this run
        assert set(study["attributes"]) <= set(STUDY_ATTRIBUTES)
    assert b"image_path" not in body and b"sources" not in body and b".dcm" not in body


def test_study_images_served(reported_run):
    sid = study_ids(reported_run)[0]
    with running_review_server(reported_run) as base:
        status, png = request(base, "GET", f"/studies/{sid}/simplified.png")
    assert status == 200 and png == (reported_run / "studies" / sid / "simplified.png").read_bytes()


def test_paths_outside_the_whitelist_are_refused(reported_run, tmp_path):
    sid = study_ids(reported_run)[0]
    secret = (reported_run / "ingest" / "manifest.csv").read_bytes()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "original.png").write_bytes(b"outside the run folder")
    # Symlinks that lead out of studies/: a file and a whole study folder.
    evil = reported_run / "studies" / "std-evil"
    evil.mkdir()
    os.symlink(reported_run / "ingest" / "manifest.csv", evil / "original.png")
    os.symlink(outside, reported_run / "studies" / "std-linked")
    forbidden = [
        "/studies/../ingest/manifest.csv",
        "/studies/%2e%2e/ingest/manifest.csv",
        "/studies/%2E%2E/ingest/manifest.csv",
        "/studies/%252e%252e/ingest/manifest.csv",
        f"/studies/{sid}/..%2F..%2Fingest%2Fmanifest.csv",
        "/static/..%5C..%5Cconfig.py",
        "/studies//etc/passwd",
        "/studies/%2Fetc%2Fpasswd/original.png",
        "/studies/%2e%2e/original_full.png",
        f"/studies/{sid}/original_full.png/../../../ingest/manifest.csv",
    ]
    not_found = [
        "/etc/passwd",
        "//etc/passwd",  # the stdlib collapses the leading "//" (open-redirect guard): a plain unknown route
        "/ingest/manifest.csv",
        "/mlflow.db",
        "/review/ratings.sqlite",
        f"/studies/{sid}/report.json",
        "/studies/std-evil/original.png",
        "/studies/std-linked/original.png",
        "/studies/std-evil/original_full.png",
        "/studies/std-linked/original_full.png",
        "/static/server.py",
    ]
    with running_review_server(reported_run) as base:
        for path in forbidden:
            status, body = request(base, "GET", path)
            assert status == 403, path
            assert secret not in body
        for path in not_found:
            status, body = request(base, "GET", path)
            assert status == 404, path
            assert secret not in body and b"outside the run folder" not in body
        status, _ = request(base, "GET", "/api/studies", host="attacker.example:80")
        assert status == 403  # DNS rebinding: a loopback server answers loopback names only
    assert not (outside / "original_full.png").exists()  # nothing written through a symlinked study folder


def dicom_window(path: Path) -> np.ndarray:
    """The source's grey values under its linear WindowCenter/Width (PS3.3 C.11.2.1.2.1), by hand."""
    ds = pydicom.dcmread(path)
    x, c, w = ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255


def test_full_resolution_original_is_the_source_under_its_dicom_window(reported_run):
    manifest = pd.read_csv(reported_run / "ingest" / "manifest.csv", dtype={"study_id": str})
    sources = dict(zip(manifest["study_id"], manifest["image_path"].map(Path)))
    with_source = next(sid for sid in study_ids(reported_run) if sources[sid].is_file())
    without = next(sid for sid in study_ids(reported_run) if not sources[sid].is_file())
    with running_review_server(reported_run) as base:
        listed = {s["study_id"]: s["original_url"] for s in json.loads(request(base, "GET", "/api/studies")[1])["studies"]}
        status, png = request(base, "GET", listed[with_source])
        assert request(base, "GET", f"/studies/{without}/original_full.png")[0] == 404
        assert request(base, "GET", f"/studies/{with_source}/original_full.png")[1] == png  # from the cache
    assert listed[with_source] == f"/studies/{with_source}/original_full.png"
    assert listed[without] == f"/studies/{without}/original.png"  # source gone: the working-resolution cache
    image = Image.open(io.BytesIO(png))
    assert status == 200 and image.size == (SOURCE_SIZE, SOURCE_SIZE)  # native, not the 32 px working size
    served, expected = np.asarray(image).astype(np.float64), dicom_window(sources[with_source])
    assert np.abs(served - expected).max() <= 1.0
    stored = pydicom.dcmread(sources[with_source]).pixel_array.astype(np.float64)
    assert np.abs(served - stored / 4095 * 255).mean() > 20  # the window, not the plain 12-bit range
    assert (reported_run / "studies" / with_source / "original_full.png").read_bytes() == png
    # Pixels only: no text chunks, none of the identity the source DICOM carries.
    assert not {k for k in image.info if k not in ("dpi",)} and b"Doe" not in png and b"MRN-0042" not in png


def test_ratings_persist_across_restart(reported_run):
    first, second = study_ids(reported_run)[:2]
    dr_a = {"reader": "Dr A"}
    with running_review_server(reported_run) as base:
        status, body = request(base, "PUT", f"/api/ratings/{first}",
                               {**dr_a, "keeps_finding": "partly", "signs": ["meniscus", "blunted_costophrenic_angle"],
                                "comment": "fluid line softer"})
        assert status == 200, body
        assert request(base, "PUT", f"/api/ratings/{second}", {**dr_a, "keeps_finding": "no"})[0] == 200
        assert request(base, "PUT", f"/api/ratings/{second}", {**dr_a, "keeps_finding": "yes"})[0] == 200
        assert request(base, "PUT", f"/api/ratings/{second}", {"reader": "Dr B", "keeps_finding": "no"})[0] == 200
        assert request(base, "PUT", f"/api/ratings/{first}", {**dr_a, "keeps_finding": "maybe"})[0] == 400
        assert request(base, "PUT", f"/api/ratings/{first}", {**dr_a, "keeps_finding": "yes", "signs": ["x"]})[0] == 400
        assert request(base, "PUT", f"/api/ratings/{first}", {"keeps_finding": "yes"})[0] == 400  # no reader
        assert request(base, "PUT", f"/api/ratings/{first}", {"reader": " ", "keeps_finding": "yes"})[0] == 400
        assert request(base, "PUT", "/api/ratings/std-unknown", {**dr_a, "keeps_finding": "yes"})[0] == 404
    with running_review_server(reported_run) as base:  # a fresh server process state, same run folder
        status, body = request(base, "GET", f"/api/ratings/{first}?reader=Dr%20A")
        rating = json.loads(body)
        assert status == 200
        assert rating["keeps_finding"] == "partly" and rating["comment"] == "fluid line softer"
        assert rating["signs"] == ["blunted_costophrenic_angle", "meniscus"] and rating["reader"] == "Dr A"
        assert request(base, "GET", f"/api/ratings/{first}")[0] == 400  # whose rating? a reader is required
        assert request(base, "GET", f"/api/ratings/{first}?reader=Dr%20B")[0] == 404
        studies = {s["study_id"]: s for s in json.loads(request(base, "GET", "/api/studies?reader=Dr%20A")[1])["studies"]}
        of_b = {s["study_id"]: s for s in json.loads(request(base, "GET", "/api/studies?reader=Dr%20B")[1])["studies"]}
    assert studies[second]["rating"]["keeps_finding"] == "yes"  # Dr A's latest, not Dr B's later "no"
    assert of_b[second]["rating"]["keeps_finding"] == "no" and of_b[first]["rating"] is None
    assert sum(s["rating"] is not None for s in studies.values()) == 2
    history = RatingsStore.for_run(reported_run).history()
    assert [(r.study_id, r.reader, r.keeps_finding) for r in history] == [
        (first, "Dr A", "partly"), (second, "Dr A", "no"), (second, "Dr A", "yes"), (second, "Dr B", "no")]


def test_concurrent_readers_lose_no_rating(reported_run):
    """20 readers x 25 ratings on the same few studies, all at once: every submission is kept."""
    studies = study_ids(reported_run)[:5]
    readers, per_reader = 20, 25
    errors: list[object] = []
    start = threading.Barrier(readers)

    def rate(reader: int, base: str) -> None:
        start.wait()
        for k in range(per_reader):
            sid = studies[(reader + k) % len(studies)]
            body = {"reader": f"reader-{reader:02d}", "keeps_finding": "yes", "comment": f"r{reader} k{k}"}
            status, answer = request(base, "PUT", f"/api/ratings/{sid}", body)
            if status != 200:
                errors.append((status, answer))

    with running_review_server(reported_run) as base:
        threads = [threading.Thread(target=rate, args=(r, base)) for r in range(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert errors == []
        current = json.loads(request(base, "GET", "/api/ratings")[1])["ratings"]
    store = RatingsStore.for_run(reported_run)
    history = store.history()
    assert len(history) == readers * per_reader
    assert {r.comment for r in history} == {f"r{r} k{k}" for r in range(readers) for k in range(per_reader)}
    # Each reader's current rating of a study is their last submission for it.
    assert len(current) == readers * len(studies)
    for reader in range(readers):
        for sid in studies:
            last = max(k for k in range(per_reader) if studies[(reader + k) % len(studies)] == sid)
            assert store.get(sid, f"reader-{reader:02d}").comment == f"r{reader} k{last}"


def raw_request(base: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    netloc = urlsplit(base).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    conn.request(method, path, body=body, headers={"Host": netloc, **headers})
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, payload


def test_only_same_origin_json_writes_are_accepted(reported_run):
    sid = study_ids(reported_run)[0]
    body = json.dumps({"reader": "Dr A", "keeps_finding": "no"}).encode()
    evil = "http://attacker.example"
    with running_review_server(reported_run) as base:
        own = base  # "http://127.0.0.1:<port>", the page's own origin
        refused = [
            ("POST", {"Content-Type": "text/plain", "Origin": evil}),  # a cross-site "simple" request: no preflight
            ("POST", {"Content-Type": "text/plain"}),
            ("PUT", {"Content-Type": "application/x-www-form-urlencoded", "Origin": own}),
            ("PUT", {"Content-Type": "application/json", "Origin": evil}),
            ("PUT", {"Content-Type": "application/json", "Origin": "http://127.0.0.1:1"}),  # another local port
            ("PUT", {"Content-Type": "application/json", "Origin": "null"}),  # sandboxed frame / file://
            ("PUT", {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}),
            ("PUT", {"Content-Type": "application/json", "Origin": own, "Sec-Fetch-Site": "same-site"}),
        ]
        for method, headers in refused:
            status, answer = raw_request(base, method, f"/api/ratings/{sid}", body, headers)
            assert status == 403, (headers, answer)
        assert RatingsStore.for_run(reported_run).history() == []
        # What the page sends (fetch from its own origin) and what a script sends (no Origin) still work.
        page = {"Content-Type": "application/json; charset=utf-8", "Origin": own, "Sec-Fetch-Site": "same-origin"}
        assert raw_request(base, "PUT", f"/api/ratings/{sid}", body, page)[0] == 200
        assert raw_request(base, "POST", f"/api/ratings/{sid}", body, {"Content-Type": "application/json"})[0] == 200
    assert len(RatingsStore.for_run(reported_run).history()) == 2


def test_a_short_body_times_out_and_others_are_served(reported_run, monkeypatch):
    monkeypatch.setattr(ReviewHandler, "timeout", 1)
    sid = study_ids(reported_run)[0]
    with running_review_server(reported_run) as base:
        netloc = urlsplit(base).netloc
        stalled = socket.create_connection((urlsplit(base).hostname, urlsplit(base).port), timeout=15)
        stalled.sendall(f"PUT /api/ratings/{sid} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n"
                        "Content-Length: 5000\r\n\r\n{\"reader\": ".encode())
        began = time.monotonic()
        assert request(base, "GET", "/api/studies")[0] == 200  # served while the other request waits
        answer = b""
        while chunk := stalled.recv(4096):  # the server answers 408 and closes; a stuck thread never would
            answer += chunk
        stalled.close()
        assert time.monotonic() - began < 10
        assert answer.startswith(b"HTTP/1.0 408") or answer.startswith(b"HTTP/1.1 408"), answer[:80]
        # A stalled header block is dropped too, and an oversized body is refused without reading it.
        slow = socket.create_connection((urlsplit(base).hostname, urlsplit(base).port), timeout=15)
        slow.sendall(b"GET /api/stud")
        assert slow.recv(4096) == b""  # closed after the timeout
        slow.close()
        big = raw_request(base, "PUT", f"/api/ratings/{sid}", b"{}", {"Content-Type": "application/json",
                                                                     "Content-Length": str(10**9)})
        assert big[0] == 400
        assert request(base, "PUT", f"/api/ratings/{sid}", {"reader": "Dr A", "keeps_finding": "yes"})[0] == 200


def test_exported_cells_cannot_run_as_formulas(reported_run, tmp_path):
    """Ratings CSV and ingest status.csv: text starting with = + - @ tab or CR gets a leading quote."""
    from pipeline.data.ingest import StatusWriter, StudyResult, read_status

    sid = study_ids(reported_run)[0]
    store = RatingsStore.for_run(reported_run)
    store.save(parse_rating(sid, {"reader": "=cmd|' /C calc'!A0", "keeps_finding": "no",
                                  "comment": "=HYPERLINK(\"http://x\")"}))
    store.save(parse_rating(sid, {"reader": "@SUM(1)", "keeps_finding": "yes", "comment": "-2+3"}))
    store.save(parse_rating(sid, {"reader": "Dr A", "keeps_finding": "yes", "comment": "fine, = later"}))
    for history in (False, True):
        with open(store.export_csv(tmp_path / f"ratings-{history}.csv", history=history), newline="") as fh:
            rows = list(csv.DictReader(fh))
        cells = {(row["reader"], row["comment"]) for row in rows}
        assert cells == {("'=cmd|' /C calc'!A0", "'=HYPERLINK(\"http://x\")"), ("'@SUM(1)", "'-2+3"),
                         ("Dr A", "fine, = later")}
    status_path = tmp_path / "status.csv"
    with StatusWriter(status_path) as writer:
        writer.write(StudyResult("std-1", "error", "=1+1.dcm: not a DICOM file", 0.5))
        writer.write(StudyResult("std-2", "error", "\tx.dcm: empty file", 0.25))
        writer.write(StudyResult("std-3", "ok", "", 0.125))
    with open(status_path, newline="") as fh:
        reasons = [row["reason"] for row in csv.DictReader(fh)]
    assert reasons == ["'=1+1.dcm: not a DICOM file", "'\tx.dcm: empty file", ""]
    assert read_status(status_path)["seconds"].tolist() == [0.5, 0.25, 0.125]  # numbers stay numbers


def test_export_and_mlflow_logging(reported_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sid = study_ids(reported_run)[0]
    store = RatingsStore.for_run(reported_run)
    assert store.path == reported_run / "review" / "ratings.sqlite"
    store.save(parse_rating(sid, {"reader": "Dr A", "keeps_finding": "yes"}))
    store.save(parse_rating(sid, {"reader": "Dr A", "keeps_finding": "no", "signs": ["other"],
                                  "comment": "lost, a, comma"}))
    out = tmp_path / "ratings.csv"
    assert main(["review", str(reported_run), "--export", str(out)]) == 0
    exported = pd.read_csv(out)
    assert [r | {"updated_at": None} for r in exported.to_dict("records")] == [{
        "study_id": sid, "reader": "Dr A", "keeps_finding": "no", "signs": "other", "comment": "lost, a, comma",
        "updated_at": None}]
    assert main(["review", str(reported_run), "--log-mlflow"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{reported_run.resolve() / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("simplebits").experiment_id])[0]
    assert run.data.metrics["ratings"] == 1 and run.data.metrics["keeps_finding.no"] == 1
    assert run.data.metrics["readers"] == 1
    assert [a.path for a in client.list_artifacts(run.info.run_id, "review")] == [
        "review/ratings.csv", "review/ratings_history.csv"]
    history = pd.read_csv(client.download_artifacts(run.info.run_id, "review/ratings_history.csv", str(tmp_path)))
    assert history["keeps_finding"].tolist() == ["yes", "no"]
    # the per-study table: every reported study, one row each, the current verdicts as columns
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "studies.json", str(tmp_path))).read_text())
    rows = pd.DataFrame(table["data"], columns=table["columns"]).set_index("study_id")
    assert sorted(rows.index) == sorted(study_ids(reported_run))
    assert rows.loc[sid, ["n_readers", "keeps_finding_yes", "keeps_finding_no", "sign_other"]].tolist() == [1, 0, 1, 1]
    assert rows.loc[sid, "readers"] == "Dr A" and {"p_orig", "p_simpl"} <= set(rows.columns)
    assert (rows.drop(index=sid)["n_readers"] == 0).all() and "comment" not in rows.columns

    # with a cohort report, its table (the pseudonymous patient link dropped) carries the ratings
    from pipeline.report.html import write_run_cohort_report

    write_run_cohort_report(reported_run, SIMPLIFY_NAME)
    assert main(["review", str(reported_run), "--log-mlflow"]) == 0
    latest = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])[0]
    table = json.loads(Path(client.download_artifacts(latest.info.run_id, "studies.json", str(tmp_path / "2")))
                       .read_text())
    rows = pd.DataFrame(table["data"], columns=table["columns"]).set_index("study_id")
    assert {"split", "age_band", "bits_saved", "keeps_finding_no"} <= set(rows.columns)
    assert "patient_id" not in rows.columns and rows.loc[sid, "keeps_finding_no"] == 1


def test_server_needs_study_reports(tmp_path):
    from pipeline.report.review.server import make_server

    with pytest.raises(FileNotFoundError, match="studies"):
        make_server(tmp_path, port=0)
