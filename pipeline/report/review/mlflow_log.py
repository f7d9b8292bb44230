"""Ratings into MLflow: the CSV as an artifact plus counts per verdict, in a ``review`` run."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from pipeline.report.review.store import KEEPS_FINDING, SIGNS, RatingsStore
from pipeline.runtime.tracking import Tracker


def log_ratings(run_dir: str | Path, store: RatingsStore, uri: str | None = None) -> int:
    """Log all ratings; returns how many. Only pseudonymous study ids and the readers' answers."""
    ratings = store.all()
    verdicts = Counter(r.keeps_finding for r in ratings)
    signs = Counter(s for r in ratings for s in r.signs)
    metrics = {"ratings": len(ratings), **{f"keeps_finding.{k}": verdicts[k] for k in KEEPS_FINDING},
               **{f"sign.{s}": signs[s] for s in SIGNS}}
    tracker = Tracker(run_dir, uri=uri)
    with tracker.run("review"), tempfile.TemporaryDirectory() as tmp:
        tracker.log_metrics(metrics)
        tracker.log_artifact(store.export_csv(Path(tmp) / "ratings.csv"), "review")
    return len(ratings)
