"""Ratings into MLflow, in a ``review`` run: counts per verdict over the current ratings (one per study
and reader), the current ratings as ``ratings.csv``, every submission as ``ratings_history.csv``, and
the per-study table (``studies.json``: the cohort report's table, else the study reports' fields) with
each study's ratings as columns, so that the MLflow UI shows verdicts beside the numbers they judge."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.report.review.server import STUDY_FIELDS
from pipeline.report.review.store import KEEPS_FINDING, SIGNS, Rating, RatingsStore
from pipeline.report.study import REPORT_NAME
from pipeline.runtime.tracking import Tracker, without_identifying_columns

STUDY_TABLE = Path("cohort_report") / "studies.parquet"


def ratings_per_study(ratings: Sequence[Rating]) -> pd.DataFrame:
    """One row per rated study: how many readers rated it, how many gave each verdict and marked each
    sign, and the readers (sorted, ``;``-joined). Free-text comments stay out: a reader may type
    anything there, and they are in ``ratings.csv``."""
    rows: dict[str, dict[str, object]] = {}
    for rating in ratings:
        row = rows.setdefault(rating.study_id, {"study_id": rating.study_id, "readers": set(),
                                                **{f"keeps_finding_{k}": 0 for k in KEEPS_FINDING},
                                                **{f"sign_{s}": 0 for s in SIGNS}})
        row["readers"].add(rating.reader)
        row[f"keeps_finding_{rating.keeps_finding}"] += 1
        for sign in rating.signs:
            row[f"sign_{sign}"] += 1
    columns = ["study_id", "readers", *(f"keeps_finding_{k}" for k in KEEPS_FINDING), *(f"sign_{s}" for s in SIGNS)]
    table = pd.DataFrame(list(rows.values()), columns=columns)
    table.insert(1, "n_readers", table["readers"].map(len).astype(int))
    table["readers"] = table["readers"].map(lambda names: ";".join(sorted(names)))
    return table


def reported_studies(run_dir: Path) -> pd.DataFrame:
    """The run's per-study table: its cohort report's (identifying columns dropped), else the fields
    of the study reports the review page shows (``studies/<id>/report.json``)."""
    if (run_dir / STUDY_TABLE).is_file():
        return without_identifying_columns(pd.read_parquet(run_dir / STUDY_TABLE))
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "studies").glob(f"*/{REPORT_NAME}"))]
    return pd.DataFrame([{k: r.get(k) for k in STUDY_FIELDS} for r in records], columns=list(STUDY_FIELDS))


def study_table_with_ratings(run_dir: Path, ratings: Sequence[Rating]) -> pd.DataFrame:
    """The run's per-study table (:func:`reported_studies`) with the rating columns; unrated studies
    get zero counts."""
    rated = ratings_per_study(ratings)
    table = reported_studies(run_dir).merge(rated, on="study_id", how="left")
    counts = [c for c in rated.columns if c not in ("study_id", "readers")]
    table[counts] = table[counts].fillna(0).astype(int)
    table["readers"] = table["readers"].fillna("")
    return table


def log_ratings(run_dir: str | Path, store: RatingsStore, uri: str | None = None) -> int:
    """Log the ratings; returns how many are current. Only pseudonymous study ids, readers and answers."""
    ratings = store.current()
    verdicts = Counter(r.keeps_finding for r in ratings)
    signs = Counter(s for r in ratings for s in r.signs)
    metrics = {"ratings": len(ratings), "readers": len({r.reader for r in ratings}),
               **{f"keeps_finding.{k}": verdicts[k] for k in KEEPS_FINDING},
               **{f"sign.{s}": signs[s] for s in SIGNS}}
    tracker = Tracker(run_dir, uri=uri)
    with tracker.run("review"), tempfile.TemporaryDirectory() as tmp:
        tracker.log_metrics(metrics)
        tracker.log_artifact(store.export_csv(Path(tmp) / "ratings.csv"), "review")
        tracker.log_artifact(store.export_csv(Path(tmp) / "ratings_history.csv", history=True), "review")
        tracker.log_table(study_table_with_ratings(Path(run_dir), ratings), "studies.json")
    return len(ratings)
