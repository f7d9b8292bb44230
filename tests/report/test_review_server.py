"""Review server: whitelisted routes only, traversal refused, ratings durable across restarts."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from synthetic_run import running_review_server
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.report.review.server import STUDY_ATTRIBUTES, STUDY_FIELDS
from pipeline.report.review.store import RatingsStore


def request(base: str, method: str, path: str, body: object = None, host: str | None = None) -> tuple[int, bytes]:
    """A raw HTTP request (http.client sends the path exactly as given, unlike browsers)."""
    netloc = urlsplit(base).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    headers = {"Host": host or netloc}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, payload


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
        assert set(study) == {*STUDY_FIELDS, "attributes", "rating"}
        assert set(study["attributes"]) <= set(STUDY_ATTRIBUTES)
    assert b"image_path" not in body and b"/data/p" not in body


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


def test_ratings_persist_across_restart(reported_run):
    first, second = study_ids(reported_run)[:2]
    with running_review_server(reported_run) as base:
        status, body = request(base, "PUT", f"/api/ratings/{first}",
                               {"keeps_finding": "partly", "signs": ["meniscus", "blunted_costophrenic_angle"],
                                "comment": "fluid line softer"})
        assert status == 200, body
        assert request(base, "PUT", f"/api/ratings/{second}", {"keeps_finding": "no"})[0] == 200
        assert request(base, "PUT", f"/api/ratings/{second}", {"keeps_finding": "yes"})[0] == 200  # latest wins
        assert request(base, "PUT", f"/api/ratings/{first}", {"keeps_finding": "maybe"})[0] == 400
        assert request(base, "PUT", f"/api/ratings/{first}", {"keeps_finding": "yes", "signs": ["x"]})[0] == 400
        assert request(base, "PUT", "/api/ratings/std-unknown", {"keeps_finding": "yes"})[0] == 404
    with running_review_server(reported_run) as base:  # a fresh server process state, same run folder
        status, body = request(base, "GET", f"/api/ratings/{first}")
        rating = json.loads(body)
        assert status == 200
        assert rating["keeps_finding"] == "partly" and rating["comment"] == "fluid line softer"
        assert rating["signs"] == ["blunted_costophrenic_angle", "meniscus"]
        studies = {s["study_id"]: s for s in json.loads(request(base, "GET", "/api/studies")[1])["studies"]}
    assert studies[second]["rating"]["keeps_finding"] == "yes"
    assert sum(s["rating"] is not None for s in studies.values()) == 2


def test_export_and_mlflow_logging(reported_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sid = study_ids(reported_run)[0]
    store = RatingsStore.for_run(reported_run)
    assert store.path == reported_run / "review" / "ratings.sqlite"
    from pipeline.report.review.store import parse_rating

    store.save(parse_rating(sid, {"keeps_finding": "no", "signs": ["other"], "comment": "lost, a, comma"}))
    out = tmp_path / "ratings.csv"
    assert main(["review", str(reported_run), "--export", str(out)]) == 0
    exported = pd.read_csv(out)
    assert exported.to_dict("records")[0] | {"updated_at": None} == {
        "study_id": sid, "keeps_finding": "no", "signs": "other", "comment": "lost, a, comma", "updated_at": None}
    assert main(["review", str(reported_run), "--log-mlflow"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{reported_run.resolve() / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("simplebits").experiment_id])[0]
    assert run.data.metrics["ratings"] == 1 and run.data.metrics["keeps_finding.no"] == 1
    assert [a.path for a in client.list_artifacts(run.info.run_id, "review")] == ["review/ratings.csv"]


def test_server_needs_study_reports(tmp_path):
    from pipeline.report.review.server import make_server

    with pytest.raises(FileNotFoundError, match="studies"):
        make_server(tmp_path, port=0)
