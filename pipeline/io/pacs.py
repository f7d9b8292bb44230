"""Send a run's Secondary Captures to a PACS, then confirm that the PACS holds them.

The files are ``RUN_DIR/dicom_sc/<study_id>/*.dcm`` (:mod:`pipeline.io.dicom_write`): the simplified
series and, in the de-identified layout, the de-identified original. The URL picks the protocol:

* ``http(s)://HOST[:PORT]/PATH`` (a DICOMweb root, e.g. ``.../dicom-web``): STOW-RS, then QIDO-RS;
* ``dicom://AET@HOST[:PORT]``: DIMSE C-STORE, then C-FIND, on one association.

A PACS's answer to a store is not trusted on its own: Orthanc, for one, reports success for an instance
that a filter then drops. So every instance sent is looked up again in its series, and only an instance
that the PACS lists counts as confirmed. ``RUN_DIR/pacs_sent.csv`` (rewritten atomically after each
study) records per file and PACS what was confirmed or refused, and why; a re-run skips the files already
confirmed there unchanged. Re-sending is harmless anyway: the instances keep their UIDs (keyed hashes,
see :mod:`pipeline.io.dicom_deid`), so a PACS files them as the same instances.

Logs name studies by the run's pseudonymous study ids only, never by a DICOM attribute.
"""

from __future__ import annotations

import hashlib
import io
import logging
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import pydicom

from pipeline.errors import UserError
from pipeline.runtime.atomic import atomic_write_text

log = logging.getLogger(__name__)

SC_FOLDER = "dicom_sc"
LOG_FILE = "pacs_sent.csv"
LOG_COLUMNS = ("pacs", "study_id", "file", "sha256", "status", "reason", "study_instance_uid",
               "series_instance_uid", "sop_instance_uid", "checked_at")
CONFIRMED, REFUSED, UNREADABLE = "confirmed", "refused", "unreadable"
NOT_LISTED = "sent, but the PACS does not list it afterwards (dropped or refused)"
DEFAULT_CALLING_AET = "SIMPLEBITS"
DEFAULT_DIMSE_PORT = 104
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Capture:
    """One readable file of ``dicom_sc/``: where it is and which instance it holds."""

    path: Path
    study_id: str
    file: str  # relative to dicom_sc/, the log's key
    sha256: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    transfer_syntax: str
    deidentified: bool


class Pacs(Protocol):
    """What sending needs from a PACS, whatever the protocol."""

    def store(self, captures: list[Capture]) -> dict[str, str]:
        """Send the files; returns the refusal reason of each instance the PACS refused outright."""

    def instances(self, study_uid: str, series_uid: str) -> set[str]:
        """The SOP Instance UIDs the PACS lists in that series."""

    def close(self) -> None: ...


def public_url(url: str) -> str:
    """The URL without a password, for logs and the log file."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def open_pacs(url: str, calling_aet: str = DEFAULT_CALLING_AET, timeout: float = DEFAULT_TIMEOUT_S,
              captures: Iterable[Capture] = ()) -> Pacs:
    """A connected PACS for ``url`` (:class:`UserError` if the URL is malformed or the PACS unreachable).
    ``captures`` are the files to be sent (C-STORE negotiates a context per SOP class and encoding)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return DicomWebPacs(url, timeout)
    if scheme == "dicom":
        return DimsePacs(url, calling_aet, timeout, captures)
    raise UserError(f"{public_url(url)}: not a PACS URL; give a DICOMweb root (http(s)://HOST/dicom-web) "
                    "or a DIMSE address (dicom://AET@HOST:PORT)")


class DicomWebPacs:
    """STOW-RS and QIDO-RS (dicomweb-client)."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S):
        import requests
        from dicomweb_client.api import DICOMwebClient

        # dicomweb-client logs every request at INFO with its UIDs; our own lines say what happened.
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
        self.url = public_url(url)
        self._host = urlsplit(url).netloc.rpartition("@")[2]
        self._session = requests.Session()
        self._client = DICOMwebClient(url.rstrip("/"), session=self._session, timeout=timeout)
        # dicomweb-client retries any failure, a refused connection included, 5 times over 30 s by
        # default; two quick retries cover a busy PACS (429/503) without stalling on a wrong address.
        self._client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
        with self._http("answer a QIDO-RS query"):
            self._client.search_for_studies(limit=1)  # reachable, and a DICOMweb service at this path

    @contextmanager
    def _http(self, doing: str) -> Iterator[None]:
        import requests

        try:
            yield
        except (requests.ConnectionError, requests.Timeout) as err:
            raise UserError(f"{self.url}: cannot reach {self._host} ({type(err).__name__})") from err
        except requests.HTTPError as err:
            raise UserError(f"{self.url}: the PACS did not {doing}: {_http_reason(err.response)}") from err

    def store(self, captures: list[Capture]) -> dict[str, str]:
        import requests

        datasets = [pydicom.dcmread(c.path) for c in captures]
        with self._http("accept STOW-RS"):
            try:
                answer = self._client.store_instances(datasets)
            except requests.HTTPError as err:
                # The service is missing or closed to us: every study would fail the same way.
                if err.response is None or err.response.status_code in (401, 403, 404, 405):
                    raise
                return {c.sop_uid: f"STOW-RS {_http_reason(err.response)}" for c in captures}
            except ValueError as err:  # a partial failure, answered in a media type it cannot read
                return {c.sop_uid: f"STOW-RS: {err}" for c in captures}
        failed = answer.get("FailedSOPSequence", [])
        return {str(i.ReferencedSOPInstanceUID): f"STOW-RS FailureReason 0x{i.get('FailureReason', 0):04X}"
                for i in failed}

    def instances(self, study_uid: str, series_uid: str) -> set[str]:
        import requests

        with self._http("answer a QIDO-RS query"):
            try:
                found = self._client.search_for_instances(study_uid, series_uid, fields=["SOPInstanceUID"],
                                                          get_remaining=True)
            except requests.HTTPError as err:
                if err.response is not None and err.response.status_code == 404:  # no such series (yet)
                    return set()
                raise
        return {value for item in found for value in item.get("00080018", {}).get("Value", [])}

    def close(self) -> None:
        self._session.close()


class DimsePacs:
    """C-STORE and C-FIND (pynetdicom) on one association."""

    def __init__(self, url: str, calling_aet: str, timeout: float, captures: Iterable[Capture]):
        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        # pynetdicom logs every PDU at INFO/DEBUG (identifiers included) and each failure over several
        # ERROR lines; what went wrong is reported here, in one line.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        self.url = url
        parts = urlsplit(url)
        try:
            port = parts.port or DEFAULT_DIMSE_PORT
        except ValueError as err:
            raise UserError(f"{url}: bad port ({err})") from err
        called = parts.username or ""
        if not called or not parts.hostname:
            raise UserError(f"{url}: a DIMSE address names the PACS's AE title and host, "
                            "dicom://AET@HOST:PORT")
        self._where = f"{parts.hostname}:{port}"
        try:  # pynetdicom does not say why a connection failed
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
        except OSError as err:
            raise UserError(f"{url}: cannot connect to {self._where} ({err.strerror or err})") from err
        ae = AE(ae_title=calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        # One presentation context per SOP class and encoding to send, so that nothing is transcoded.
        contexts = sorted({(c.sop_class, c.transfer_syntax) for c in captures})
        if len(contexts) > 126:
            raise UserError(f"{url}: {len(contexts)} SOP class/transfer syntax pairs exceed one association")
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self._find_model = StudyRootQueryRetrieveInformationModelFind
        self._assoc = ae.associate(parts.hostname, port, ae_title=called)
        if not self._assoc.is_established:
            # A PACS that refuses a caller sends A-ASSOCIATE-RJ and closes the socket at once; on a
            # busy machine pynetdicom can see the close before it reads the RJ and reports an abort
            # instead. Either way the likely cause is the same, so both say what to check.
            why = "was rejected" if self._assoc.is_rejected else \
                "was aborted during negotiation" if self._assoc.is_aborted else "got no answer"
            if self._assoc.is_rejected or self._assoc.is_aborted:
                why += ": check both AE titles and that the PACS accepts this caller"
            raise UserError(f"{url}: association with {self._where} as {calling_aet} -> {called} {why}")

    def _lost(self) -> UserError:
        return UserError(f"{self.url}: connection to {self._where} lost")

    def store(self, captures: list[Capture]) -> dict[str, str]:
        refused = {}
        for capture in captures:
            try:
                status = self._assoc.send_c_store(capture.path)
            except ValueError as err:  # e.g. the PACS accepted no context for its SOP class and encoding
                refused[capture.sop_uid] = f"C-STORE not attempted: {err}"
                continue
            except RuntimeError as err:  # the association is gone
                raise self._lost() from err
            if "Status" not in status:
                raise self._lost()
            # 0x0000 success; 0xB000, 0xB006, 0xB007 are warnings, and the instance is stored
            if status.Status not in (0x0000, 0xB000, 0xB006, 0xB007):
                comment = f" ({status.ErrorComment})" if status.get("ErrorComment") else ""
                refused[capture.sop_uid] = f"C-STORE status 0x{status.Status:04X}{comment}"
        return refused

    def instances(self, study_uid: str, series_uid: str) -> set[str]:
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID, query.SeriesInstanceUID, query.SOPInstanceUID = study_uid, series_uid, ""
        found = set()
        try:
            responses = list(self._assoc.send_c_find(query, self._find_model))
        except RuntimeError as err:
            raise self._lost() from err
        for status, identifier in responses:
            if "Status" not in status:
                raise self._lost()
            if status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found.add(str(identifier.get("SOPInstanceUID", "")))
            elif status.Status != 0x0000:
                raise UserError(f"{self.url}: the PACS refused C-FIND (status 0x{status.Status:04X}), so "
                                "nothing sent can be confirmed; allow C-FIND from this AE title")
        return found

    def close(self) -> None:
        if self._assoc.is_established:
            self._assoc.release()


def _http_reason(response) -> str:
    if response is None:
        return "no response"
    body = " ".join(response.text.split())[:200]
    return f"HTTP {response.status_code} {response.reason}" + (f": {body}" if body else "")


def scan_captures(sc_dir: Path) -> tuple[list[Capture], list[dict]]:
    """The readable Secondary Captures under ``sc_dir``, and a log row for each unreadable file."""
    captures, unreadable = [], []
    for path in sorted(sc_dir.glob("*/*.dcm")):
        data = path.read_bytes()
        file, study_id = path.relative_to(sc_dir).as_posix(), path.parent.name
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            uids = [str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
            encoding = [str(ds.get("SOPClassUID", "")), str(ds.file_meta.get("TransferSyntaxUID", ""))]
            if not all(uids + encoding):
                raise ValueError("no Study/Series/SOP Instance UID, SOP Class UID or transfer syntax")
        except Exception as err:  # noqa: BLE001 - any unreadable file is recorded; the others go on
            reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
            log.warning("%s: unreadable, not sent (%s)", file, reason)
            unreadable.append({"study_id": study_id, "file": file, "sha256": _sha256(data),
                               "status": UNREADABLE, "reason": reason})
            continue
        captures.append(Capture(path, study_id, file, _sha256(data), *uids, *encoding,
                                deidentified=str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"))
    return captures, unreadable


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_log(path: Path):
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame(columns=list(LOG_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _write_log(path: Path, rows: dict[tuple[str, str], dict]) -> None:
    import pandas as pd

    table = pd.DataFrame(list(rows.values()), columns=list(LOG_COLUMNS)).fillna("")
    atomic_write_text(path, table.sort_values(["pacs", "file"]).to_csv(index=False))


def send_run(run_dir: str | Path, url: str, allow_identity: bool = False, resend: bool = False,
             calling_aet: str = DEFAULT_CALLING_AET, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Send ``RUN_DIR/dicom_sc/`` to the PACS at ``url`` and confirm each instance; returns counts.

    Files already confirmed at this PACS (same file, same content) are skipped unless ``resend``.
    Files that carry patient identity (written with ``allow_identity``) are sent only if
    ``allow_identity`` is set here too.
    """
    run_dir = Path(run_dir)
    sc_dir = run_dir / SC_FOLDER
    if not sc_dir.is_dir():
        raise UserError(f"{sc_dir}: no Secondary Captures to send; write them first "
                        f"(simplebits report {run_dir} --dicom)")
    captures, unreadable = scan_captures(sc_dir)
    identified = [c.file for c in captures if not c.deidentified]
    if identified and not allow_identity:
        raise UserError(f"{sc_dir / identified[0]}: carries patient identity (PatientIdentityRemoved is not "
                        f"YES; {len(identified)} such files); pass --allow-identity to send them to "
                        f"{public_url(url)}")
    shown = public_url(url).rstrip("/")  # the log's key: one PACS, however its URL was typed
    log_path = run_dir / LOG_FILE
    rows = {(r["pacs"], r["file"]): r for r in read_log(log_path).to_dict("records")}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for row in unreadable:
        rows[(shown, row["file"])] = {**row, "pacs": shown, "checked_at": now}
    if unreadable:
        _write_log(log_path, rows)
    confirmed = {key: r["sha256"] for key, r in rows.items() if r["status"] == CONFIRMED}
    pending = [c for c in captures if resend or confirmed.get((shown, c.file)) != c.sha256]
    counts = {"pacs": shown, "log": str(log_path), "already_confirmed": len(captures) - len(pending),
              CONFIRMED: 0, REFUSED: 0, UNREADABLE: len(unreadable)}
    if pending:
        pacs = open_pacs(url, calling_aet, timeout, pending)
        try:
            # captures come sorted by path, so each study's files are adjacent
            for _, study in groupby(pending, key=lambda c: c.study_id):
                for row in _send_study(pacs, list(study), captures):
                    rows[(shown, row["file"])] = {**row, "pacs": shown}
                    counts[row["status"]] += 1
                _write_log(log_path, rows)
        finally:
            pacs.close()
    log.info("PACS %s: %d confirmed, %d already confirmed, %d refused, %d unreadable (%s)", shown,
             counts[CONFIRMED], counts["already_confirmed"], counts[REFUSED], counts[UNREADABLE], log_path)
    return counts


def _send_study(pacs: Pacs, study: list[Capture], everything: list[Capture]) -> list[dict]:
    """Send one study's files, then look each series up again; one log row per file."""
    refused = pacs.store(study)
    rows = []
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for series_uid in dict.fromkeys(c.series_uid for c in study):
        members = [c for c in study if c.series_uid == series_uid]
        listed = pacs.instances(members[0].study_uid, series_uid)
        ours = {c.sop_uid for c in everything if c.series_uid == series_uid}
        if listed and len(listed) != len(ours):
            log.warning("%s: a series holds %d instances in the PACS, %d in this run", members[0].study_id,
                        len(listed), len(ours))
        for capture in members:
            ok = capture.sop_uid in listed
            rows.append({"study_id": capture.study_id, "file": capture.file,
                         "sha256": capture.sha256, "status": CONFIRMED if ok else REFUSED,
                         "reason": "" if ok else refused.get(capture.sop_uid, NOT_LISTED),
                         "study_instance_uid": capture.study_uid, "series_instance_uid": capture.series_uid,
                         "sop_instance_uid": capture.sop_uid, "checked_at": now})
    refusals = [r for r in rows if r["status"] == REFUSED]
    log.info("%s: %d of %d instances confirmed by the PACS%s", study[0].study_id, len(rows) - len(refusals),
             len(rows), "".join(f"; {r['file']} refused: {r['reason']}" for r in refusals))
    return rows
