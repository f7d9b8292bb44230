"""Radiologist ratings in SQLite (``RUN_DIR/review/ratings.sqlite``): durable on submit, WAL mode.

Every save is its own transaction, committed before the HTTP response goes out, so a rating the
reader saw confirmed survives a crash or restart. Connections are opened per operation, which keeps
the store safe to use from the threads of the review server.
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

RATINGS_PATH = Path("review") / "ratings.sqlite"
KEEPS_FINDING = ("yes", "partly", "no")
SIGNS = ("blunted_costophrenic_angle", "meniscus", "basal_opacity", "other")
STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_COMMENT = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    study_id      TEXT PRIMARY KEY,
    keeps_finding TEXT NOT NULL CHECK (keeps_finding IN ('yes', 'partly', 'no')),
    signs         TEXT NOT NULL,
    comment       TEXT NOT NULL,
    updated_at    TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Rating:
    """One reader's verdict on one simplified study."""

    study_id: str
    keeps_finding: str
    signs: tuple[str, ...] = ()
    comment: str = ""
    updated_at: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["signs"] = list(self.signs)
        return out


def valid_study_id(study_id: str) -> bool:
    """Pseudonymous ids only: letters, digits, ``_.-``; never ``..``."""
    return bool(STUDY_ID.match(study_id)) and ".." not in study_id


def parse_rating(study_id: str, payload: Mapping[str, Any]) -> Rating:
    """Validate a submitted form; ``ValueError`` says which field is wrong."""
    if not valid_study_id(study_id):
        raise ValueError("invalid study id")
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
    return Rating(study_id, keeps, ordered, comment.strip())


class RatingsStore:
    """Upsert/get/list/export ratings; one row per study (the latest submission wins)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    @classmethod
    def for_run(cls, run_dir: str | Path) -> RatingsStore:
        return cls(Path(run_dir) / RATINGS_PATH)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            conn.execute("PRAGMA synchronous=FULL")  # a confirmed rating must survive power loss
            with conn:  # commits on success, rolls back on error
                yield conn
        finally:
            conn.close()

    def save(self, rating: Rating) -> Rating:
        stamped = Rating(rating.study_id, rating.keeps_finding, rating.signs, rating.comment,
                         datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO ratings VALUES (?, ?, ?, ?, ?) ON CONFLICT(study_id) DO UPDATE SET "
                "keeps_finding=excluded.keeps_finding, signs=excluded.signs, comment=excluded.comment, "
                "updated_at=excluded.updated_at",
                (stamped.study_id, stamped.keeps_finding, ";".join(stamped.signs), stamped.comment,
                 stamped.updated_at),
            )
        return stamped

    @staticmethod
    def _row(row: tuple) -> Rating:
        study_id, keeps, signs, comment, updated = row
        return Rating(study_id, keeps, tuple(s for s in signs.split(";") if s), comment, updated)

    def get(self, study_id: str) -> Rating | None:
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM ratings WHERE study_id = ?", (study_id,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[Rating]:
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM ratings ORDER BY study_id").fetchall()
        return [self._row(r) for r in rows]

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["study_id", "keeps_finding", "signs", "comment", "updated_at"])
        for r in self.all():
            writer.writerow([r.study_id, r.keeps_finding, ";".join(r.signs), r.comment, r.updated_at])
        return buffer.getvalue()

    def export_csv(self, path: str | Path) -> Path:
        atomic_write_text(path, self.to_csv())
        return Path(path)
