"""Radiologist ratings in SQLite (``RUN_DIR/review/ratings.sqlite``): append-only, per reader, WAL mode.

Every submission is a new row of ``rating_history`` (study, reader, answers, timestamp), written in
its own transaction and committed before the HTTP response goes out, so a rating the reader saw
confirmed survives a crash or restart and is never overwritten, by another reader or by a later
change of mind. A reader's *current* rating of a study is their latest row (highest ``id``: the
insertion order, which timestamps cannot break ties on). Connections are opened per operation,
which keeps the store safe to use from the threads of the review server.
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.runtime.atomic import atomic_write_text
from pipeline.runtime.csv_log import neutralise_cell

RATINGS_PATH = Path("review") / "ratings.sqlite"
KEEPS_FINDING = ("yes", "partly", "no")
SIGNS = ("blunted_costophrenic_angle", "meniscus", "basal_opacity", "other")
STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_COMMENT = 4000
MAX_READER = 64
#: Reader of the rows kept from a store made before ratings had readers.
LEGACY_READER = "unnamed (before readers)"
CSV_COLUMNS = ("study_id", "reader", "keeps_finding", "signs", "comment", "updated_at")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rating_history (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id      TEXT NOT NULL,
    reader        TEXT NOT NULL,
    keeps_finding TEXT NOT NULL CHECK (keeps_finding IN ('yes', 'partly', 'no')),
    signs         TEXT NOT NULL,
    comment       TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rating_history_current ON rating_history (study_id, reader, id);
"""
_COLUMNS = ", ".join(CSV_COLUMNS)
#: The latest row per (study, reader).
_CURRENT = f"""
SELECT {_COLUMNS} FROM rating_history
WHERE id IN (SELECT MAX(id) FROM rating_history GROUP BY study_id, reader)
"""


@dataclass(frozen=True)
class Rating:
    """One reader's verdict on one simplified study."""

    study_id: str
    keeps_finding: str
    signs: tuple[str, ...] = ()
    comment: str = ""
    reader: str = ""
    updated_at: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["signs"] = list(self.signs)
        return out

    def csv_row(self) -> list[object]:
        """The row in ``CSV_COLUMNS`` order, free text neutralised for spreadsheets."""
        row = (self.study_id, self.reader, self.keeps_finding, ";".join(self.signs), self.comment,
               self.updated_at)
        return [neutralise_cell(cell) for cell in row]


def valid_study_id(study_id: str) -> bool:
    """Pseudonymous ids only: letters, digits, ``_.-``; never ``..``."""
    return bool(STUDY_ID.match(study_id)) and ".." not in study_id


def parse_reader(reader: object) -> str:
    """A reader's name as typed (trimmed): printable text of 1 to ``MAX_READER`` characters."""
    if not isinstance(reader, str) or not reader.strip():
        raise ValueError("reader is required: the name the ratings are saved under")
    reader = reader.strip()
    if len(reader) > MAX_READER or not reader.isprintable():
        raise ValueError(f"reader must be printable text of at most {MAX_READER} characters")
    return reader


def parse_rating(study_id: str, payload: Mapping[str, Any]) -> Rating:
    """Validate a submitted form; ``ValueError`` says which field is wrong."""
    if not valid_study_id(study_id):
        raise ValueError("invalid study id")
    reader = parse_reader(payload.get("reader"))
    keeps = payload.get("keeps_finding")
    if keeps not in KEEPS_FINDING:
        raise ValueError(f"keeps_finding must be one of {', '.join(KEEPS_FINDING)}")
    signs = payload.get("signs", [])
    if not isinstance(signs, list) or any(s not in SIGNS for s in signs):
        raise ValueError(f"signs must be a list drawn from {', '.join(SIGNS)}")
    comment = payload.get("comment", "")
    if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
        raise ValueError(f"comment must be text of at most {MAX_COMMENT} characters")
    ordered = tuple(s for s in SIGNS if s in signs)
    return Rating(study_id, keeps, ordered, comment.strip(), reader)


class RatingsStore:
    """Append/get/list/export ratings: the full history, and each reader's current rating per study."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            self._migrate(conn)

    @classmethod
    def for_run(cls, run_dir: str | Path) -> RatingsStore:
        return cls(Path(run_dir) / RATINGS_PATH)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Move the rows of the old one-row-per-study table into the history (no reader was recorded)."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='ratings'").fetchone():
            conn.execute(f"INSERT INTO rating_history ({_COLUMNS}) SELECT study_id, ?, keeps_finding, signs, "
                         "comment, updated_at FROM ratings ORDER BY updated_at", (LEGACY_READER,))
            conn.execute("DROP TABLE ratings")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            conn.execute("PRAGMA synchronous=FULL")  # a confirmed rating must survive power loss
            with conn:  # one transaction: commits on success, rolls back on error
                yield conn
        finally:
            conn.close()

    def save(self, rating: Rating) -> Rating:
        """Append the rating, stamped now (UTC); earlier rows, by anyone, stay as they are."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        stamped = Rating(rating.study_id, rating.keeps_finding, rating.signs, rating.comment,
                         parse_reader(rating.reader), now)
        with self._connect() as conn:
            conn.execute(f"INSERT INTO rating_history ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                         (stamped.study_id, stamped.reader, stamped.keeps_finding, ";".join(stamped.signs),
                          stamped.comment, stamped.updated_at))
        return stamped

    @staticmethod
    def _row(row: tuple) -> Rating:
        study_id, reader, keeps, signs, comment, updated = row
        return Rating(study_id, keeps, tuple(s for s in signs.split(";") if s), comment, reader, updated)

    def get(self, study_id: str, reader: str) -> Rating | None:
        """The reader's current rating of the study (their latest), or None."""
        with self._connect() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM rating_history WHERE study_id = ? AND reader = ? "
                               "ORDER BY id DESC LIMIT 1", (study_id, reader)).fetchone()
        return self._row(row) if row else None

    def current(self, reader: str | None = None) -> list[Rating]:
        """Current ratings, one per (study, reader), of every reader or of one."""
        query, args = _CURRENT, ()
        if reader is not None:
            query, args = query + " AND reader = ?", (reader,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY study_id, reader", args).fetchall()
        return [self._row(r) for r in rows]

    all = current  # what the export and the command line count

    def history(self) -> list[Rating]:
        """Every submission, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM rating_history ORDER BY id").fetchall()
        return [self._row(r) for r in rows]

    def to_csv(self, history: bool = False) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(r.csv_row() for r in (self.history() if history else self.current()))
        return buffer.getvalue()

    def export_csv(self, path: str | Path, history: bool = False) -> Path:
        """Current ratings per (study, reader), or with ``history`` every submission, as CSV."""
        atomic_write_text(path, self.to_csv(history))
        return Path(path)
