"""Ratings into MLflow, in a ``review`` run: counts per verdict over the current ratings (one per study
and reader), the current ratings as ``ratings.csv`` and every submission as ``ratings_history.csv``."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from pipeline.report.review.store import KEEPS_FINDING, SIGNS, RatingsStore
from pipeline.runtime.tracking import Tracker


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
    return len(ratings)
