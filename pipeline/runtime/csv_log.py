"""Append-only CSV tables that survive a kill: one flushed write per finished unit of work.

Resumable steps (ingest status, per-rank inference parts) record each finished study as it
completes, so an interrupted run loses at most the row in flight; a line torn by the kill is
closed off on reopening so the next row starts cleanly.

Text that people open in a spreadsheet goes through ``neutralise_cell`` first (CSV/formula injection).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path


#: A spreadsheet treats a cell starting with one of these as a formula (OWASP "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    """``value`` with a leading single quote if it is text a spreadsheet would run as a formula.

    Only text is changed: numbers (``-0.5``) are written by us and stay numbers. The quote makes
    Excel/LibreOffice/Sheets show the cell as literal text; applying it twice changes nothing more.
    """
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


class AppendOnlyCsv:
    def __init__(self, path: str | Path, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        torn = not new and _last_byte(self.path) != b"\n"
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        if torn:
            self._fh.write("\n")
        self._writer = csv.writer(self._fh, lineterminator="\n")
        if new:
            self._writer.writerow(columns)
        self._fh.flush()

    def write_rows(self, rows: Iterable[Sequence[object]]) -> None:
        self._writer.writerows(rows)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> AppendOnlyCsv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, 2)
        return fh.read(1)
