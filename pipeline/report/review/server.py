"""Local review server: a single-page app, a small JSON API, and the per-study PNGs of one run folder.

Standard library only (``ThreadingHTTPServer``): the page is static and the API has four routes, so a
web framework would add dependencies without adding safety. Safety comes from a whitelist instead:

- routes: ``/``, ``/static/<app file>``, ``/api/studies``, ``/api/ratings[/<study_id>]``,
  ``/studies/<study_id>/<original|original_full|simplified|panel|explain>.png`` and the saliency overlays
  ``/studies/<study_id>/map-<method>.png`` of the known methods; everything else is 404;
- any ``..``, backslash, NUL, absolute or doubled path (raw or percent-decoded) is refused with 403;
- study files are resolved (following symlinks) and must stay inside ``RUN_DIR/studies``; the
  full-resolution original is decoded from the source file the ingest manifest names for the study
  id (never from a path in the URL), see :mod:`pipeline.report.review.fullres`;
- bound to loopback by default, and the ``Host`` header must then name loopback (DNS rebinding);
- the API returns whitelisted, pseudonymous fields of ``report.json`` only;
- writes (``PUT``/``POST``) must be same-origin JSON: ``Content-Type: application/json`` (a cross-site
  form or ``text/plain`` fetch cannot send that without a CORS preflight, which is never granted), an
  ``Origin`` naming this server (when sent, as browsers do on every write) and no cross-site
  ``Sec-Fetch-Site``; anything else is 403 (CSRF);
- every connection has a socket timeout, so a client that sends less body than its ``Content-Length``
  (or dribbles its headers) gets 408 and is dropped instead of holding a server thread forever;
  bodies are capped at ``MAX_BODY``.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pipeline.report.maps import EXPLAIN_PANEL_NAME, METHOD_TITLES, map_file_name, method_title
from pipeline.report.review.fullres import FULL_ORIGINAL_NAME, FullOriginals
from pipeline.report.review.store import (
    KEEPS_FINDING,
    SIGNS,
    RatingsStore,
    parse_rating,
    parse_reader,
    valid_study_id,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
#: Saliency overlays by file name (``map-<method>.png``): only methods simplebits explain knows.
MAP_FILES = {map_file_name(method): method for method in METHOD_TITLES}
STUDY_FILES = ("original.png", FULL_ORIGINAL_NAME, "simplified.png", "panel.png", EXPLAIN_PANEL_NAME,
               *MAP_FILES)
#: ``report.json`` fields the API may expose (all pseudonymous or derived numbers).
STUDY_FIELDS = ("study_id", "task", "setting", "label", "label_name", "positive_name", "p_orig", "p_simpl",
                "bpd_orig", "bpd_simpl", "bits_saved", "correct_orig", "correct_simpl")
STUDY_ATTRIBUTES = ("view", "sex", "age_band", "split")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10  # seconds a connection may sit idle mid-request
JSON_TYPE = "application/json"
#: Fetch-metadata values of a request the page itself made (``none``: typed into the address bar).
SAME_SITE_FETCH = {"same-origin", "none"}
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
        self.full_originals = FullOriginals(self.run_dir, self.studies_dir)

    def studies(self, reader: str | None = None) -> list[dict[str, Any]]:
        """The study list for the page, with the reader's current rating of each (none without a reader)."""
        ratings = {r.study_id: r.to_dict() for r in self.store.current(reader)} if reader else {}
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
            item["maps"] = self.study_maps(item["study_id"])
            item["original_url"] = self.original_url(item["study_id"])
            out.append(item)
        return out

    def study_maps(self, study_id: str) -> list[dict[str, str]]:
        """The study's saliency overlays that the server would serve, in tile order, as
        ``{method, title, url}`` (none where simplebits explain made no maps for it)."""
        return [{"method": method, "title": method_title(method),
                 "url": f"/studies/{study_id}/{name}"}
                for name, method in MAP_FILES.items() if self.study_file(study_id, name)]

    def original_url(self, study_id: str) -> str:
        """The original the page shows: the source at native resolution where the run can still
        read it, else the working-resolution cache."""
        full = self.full_originals.available(study_id)
        return f"/studies/{study_id}/{FULL_ORIGINAL_NAME if full else 'original.png'}"

    def _is_study(self, study_id: str) -> bool:
        """A reported study whose folder really lies inside ``studies/`` (nothing is written through a
        symlinked folder)."""
        folder = (self.studies_dir / study_id).resolve()
        return folder.is_relative_to(self.studies_dir) and (folder / "report.json").is_file()

    def study_file(self, study_id: str, name: str) -> Path | None:
        """The file if it is a whitelisted study file that really lies inside ``studies/``
        (the full-resolution original is made on first request)."""
        if not valid_study_id(study_id) or name not in STUDY_FILES:
            return None
        if name == FULL_ORIGINAL_NAME and self._is_study(study_id):
            self.full_originals.ensure(study_id)
        path = (self.studies_dir / study_id / name).resolve()
        if not path.is_relative_to(self.studies_dir) or not path.is_file():
            return None
        return path


class ReviewHandler(BaseHTTPRequestHandler):
    server_version = "SimpleBitsReview"
    sys_version = ""
    app: ReviewApp  # set on the subclass made by make_server
    timeout = REQUEST_TIMEOUT  # StreamRequestHandler puts it on the socket: reads cannot block forever

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

    def _query(self, name: str) -> str | None:
        """One query parameter (the last if repeated), or None."""
        values = parse_qs(urlsplit(self.path).query).get(name)
        return values[-1] if values else None

    def _reader(self) -> str | None:
        """The ``?reader=`` of the request, validated, or None (a 400 has been sent)."""
        try:
            return parse_reader(self._query("reader"))
        except ValueError as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
            return None

    def _same_origin_json(self) -> bool:
        """True for a write the page itself could have made; otherwise a 403 has been sent."""
        content_type = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        origin = self.headers.get("Origin")
        fetch_site = (self.headers.get("Sec-Fetch-Site") or "").lower()
        if content_type != JSON_TYPE:
            reason = "writes must be application/json"
        elif origin is not None and not self._own_origin(origin):
            reason = "cross-origin request refused"
        elif fetch_site and fetch_site not in SAME_SITE_FETCH:
            reason = "cross-site request refused"
        else:
            return True
        self._error(HTTPStatus.FORBIDDEN, reason)
        return False

    def _own_origin(self, origin: str) -> bool:
        """``Origin`` is this server: the Host the request was sent to, on the port it listens on.

        The Host itself was checked against loopback names in ``_path`` (a DNS-rebinding page has a
        foreign Host), so "Origin equals Host" leaves only pages served by this server.
        """
        port = self.server.server_address[1]
        parts = urlsplit(origin)
        return (parts.scheme == "http" and parts.netloc.lower() == (self.headers.get("Host") or "").lower()
                and (parts.port or 80) == port)

    def _body(self) -> bytes | None:
        """The request body (at most ``MAX_BODY``), or None (an error has been sent)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_BODY:
            self.close_connection = True  # the unread body must not be parsed as the next request
            self._error(HTTPStatus.BAD_REQUEST, "body missing or too large")
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body = b""
        if len(body) < length:  # the client sent less than it announced and went quiet (or hung up)
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_TIMEOUT, "body shorter than Content-Length")
            return None
        return body

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
            reader = self._query("reader")
            self._json(HTTPStatus.OK, {"studies": self.app.studies(reader), "keeps_finding": KEEPS_FINDING,
                                       "signs": SIGNS})
        elif parts == ["api", "ratings"]:  # every reader's current ratings
            self._json(HTTPStatus.OK, {"ratings": [r.to_dict() for r in self.app.store.current()]})
        elif len(parts) == 3 and parts[:2] == ["api", "ratings"]:
            if (reader := self._reader()) is None:
                return
            rating = self.app.store.get(parts[2], reader) if valid_study_id(parts[2]) else None
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
        if path is None or not self._same_origin_json():
            return
        parts = [p for p in path.split("/") if p]
        if len(parts) != 3 or parts[:2] != ["api", "ratings"]:
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        study_id = parts[2]
        if not valid_study_id(study_id) or not (self.app.studies_dir / study_id / "report.json").is_file():
            self._error(HTTPStatus.NOT_FOUND, "unknown study")
            return
        if (body := self._body()) is None:
            return
        try:
            payload = json.loads(body)
            rating = parse_rating(study_id, payload if isinstance(payload, dict) else {})
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            self._error(HTTPStatus.BAD_REQUEST, str(err))
            return
        self._json(HTTPStatus.OK, self.app.store.save(rating).to_dict())

    do_POST = do_PUT


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 drops connections when a few readers save at once


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (see ``server.server_address``)."""
    app = ReviewApp(run_dir, loopback_only=host in LOOPBACK_NAMES)
    handler = type("BoundReviewHandler", (ReviewHandler,), {"app": app})
    return ReviewServer((host, port), handler)


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
