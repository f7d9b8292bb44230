"""Local review server: a single-page app, a small JSON API, and the per-study PNGs of one run folder.

Standard library only (``ThreadingHTTPServer``): the page is static and the API has four routes, so a
web framework would add dependencies without adding safety. Safety comes from a whitelist instead:

- routes: ``/``, ``/static/<app file>``, ``/api/studies``, ``/api/ratings[/<study_id>]``,
  ``/studies/<study_id>/<original|simplified|panel>.png``; everything else is 404;
- any ``..``, backslash, NUL, absolute or doubled path (raw or percent-decoded) is refused with 403;
- study files are resolved (following symlinks) and must stay inside ``RUN_DIR/studies``;
- bound to loopback by default, and the ``Host`` header must then name loopback (DNS rebinding);
- the API returns whitelisted, pseudonymous fields of ``report.json`` only.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipeline.report.review.store import KEEPS_FINDING, SIGNS, RatingsStore, parse_rating, valid_study_id

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
STUDY_FILES = ("original.png", "simplified.png", "panel.png")
#: ``report.json`` fields the API may expose (all pseudonymous or derived numbers).
STUDY_FIELDS = ("study_id", "task", "setting", "label", "label_name", "positive_name", "p_orig", "p_simpl",
                "bpd_orig", "bpd_simpl", "bits_saved", "correct_orig", "correct_simpl")
STUDY_ATTRIBUTES = ("view", "sex", "age_band", "split")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_BODY = 64 * 1024
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}
_UNSAFE = re.compile(r"\.\.|\\|\x00|//")


class ReviewApp:
    """What the handler needs: the run folder, its studies and the ratings store."""

    def __init__(self, run_dir: str | Path, loopback_only: bool = True) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.studies_dir = self.run_dir / "studies"
        if not self.studies_dir.is_dir():
            raise FileNotFoundError(f"{self.studies_dir}: no per-study reports; run `simplebits report` first")
        self.store = RatingsStore.for_run(self.run_dir)
        self.loopback_only = loopback_only

    def studies(self) -> list[dict[str, Any]]:
        """The study list for the page, with each study's rating (if any)."""
        ratings = {r.study_id: r.to_dict() for r in self.store.all()}
        out = []
        for report_path in sorted(self.studies_dir.glob("*/report.json")):
            if not valid_study_id(report_path.parent.name):
                continue
            try:
                record = json.loads(report_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                log.warning("%s: skipped, unreadable report (%s)", report_path, err)
                continue
            item = {k: record.get(k) for k in STUDY_FIELDS}
            item["study_id"] = report_path.parent.name
            attributes = record.get("attributes") or {}
            item["attributes"] = {k: attributes[k] for k in STUDY_ATTRIBUTES if k in attributes}
            item["rating"] = ratings.get(item["study_id"])
            out.append(item)
        return out

    def study_file(self, study_id: str, name: str) -> Path | None:
        """The file if it is a whitelisted study file that really lies inside ``studies/``."""
        if not valid_study_id(study_id) or name not in STUDY_FILES:
            return None
        path = (self.studies_dir / study_id / name).resolve()
        if not path.is_relative_to(self.studies_dir) or not path.is_file():
            return None
        return path


class ReviewHandler(BaseHTTPRequestHandler):
    server_version = "SimpleBitsReview"
    sys_version = ""
    app: ReviewApp  # set on the subclass made by make_server

    # -- plumbing -----------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "private, max-age=60" if cache else "no-store")
        for key, value in _SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _path(self) -> str | None:
        """The request path after the safety checks, or None (a 403 has been sent)."""
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        if self.app.loopback_only and host not in LOOPBACK_NAMES:
            self._error(HTTPStatus.FORBIDDEN, "host not allowed")
            return None
        raw = self.path.split("?", 1)[0].split("#", 1)[0]  # not urlsplit: it would read "//x/y" as host x
        decoded = unquote(unquote(raw))  # double-decoding catches %252e%252e as well
        if not raw.startswith("/") or _UNSAFE.search(raw) or _UNSAFE.search(decoded) or decoded != unquote(raw):
            self._error(HTTPStatus.FORBIDDEN, "path not allowed")
            return None
        return decoded

    # -- routes -------------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self._path()
        if path is None:
            return
        parts = [p for p in path.split("/") if p]
        if not parts:
            parts = ["static", "index.html"]
        if parts[0] == "static" and len(parts) == 2 and parts[1] in STATIC_FILES:
            self._send(HTTPStatus.OK, (STATIC_DIR / parts[1]).read_bytes(), STATIC_FILES[parts[1]])
        elif parts == ["api", "studies"]:
            self._json(HTTPStatus.OK, {"studies": self.app.studies(), "keeps_finding": KEEPS_FINDING,
                                       "signs": SIGNS})
        elif parts == ["api", "ratings"]:
            self._json(HTTPStatus.OK, {"ratings": [r.to_dict() for r in self.app.store.all()]})
        elif len(parts) == 3 and parts[:2] == ["api", "ratings"]:
            rating = self.app.store.get(parts[2]) if valid_study_id(parts[2]) else None
            if rating is None:
                self._error(HTTPStatus.NOT_FOUND, "no rating")
            else:
                self._json(HTTPStatus.OK, rating.to_dict())
        elif len(parts) == 3 and parts[0] == "studies" and (file := self.app.study_file(parts[1], parts[2])):
            self._send(HTTPStatus.OK, file.read_bytes(), "image/png", cache=True)
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET

    def do_PUT(self) -> None:  # noqa: N802 (stdlib name)
        path = self._path()
        if path is None:
            return
        parts = [p for p in path.split("/") if p]
        if len(parts) != 3 or parts[:2] != ["api", "ratings"]:
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        study_id = parts[2]
        if not valid_study_id(study_id) or not (self.app.studies_dir / study_id / "report.json").is_file():
            self._error(HTTPStatus.NOT_FOUND, "unknown study")
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            self._error(HTTPStatus.BAD_REQUEST, "body missing or too large")
            return
        try:
            payload = json.loads(self.rfile.read(length))
            rating = parse_rating(study_id, payload if isinstance(payload, dict) else {})
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
            return
        self._json(HTTPStatus.OK, self.app.store.save(rating).to_dict())

    do_POST = do_PUT


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (see ``server.server_address``)."""
    app = ReviewApp(run_dir, loopback_only=host in LOOPBACK_NAMES)
    handler = type("BoundReviewHandler", (ReviewHandler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(run_dir, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"Review page: http://{'localhost' if host in LOOPBACK_NAMES else bound_host}:{bound_port}/  "
          "(Ctrl-C to stop)", flush=True)
    if host not in LOOPBACK_NAMES:
        log.warning("review server bound to %s: reachable from other machines; there is no login", host)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
