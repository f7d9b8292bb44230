"""``simplebits review RUN_DIR``: the radiologist review page, plus ratings export and MLflow logging."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "review", help="local review page: original vs simplified side by side, ratings saved to SQLite",
        description="Serves RUN_DIR/studies on loopback. With --export or --log-mlflow it does that and exits.",
    )
    parser.add_argument("run_dir", help="run folder with studies/ (from simplebits report)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0 = any free port)")
    parser.add_argument("--export", metavar="CSV", help="write all ratings to this CSV and exit")
    parser.add_argument("--log-mlflow", action="store_true", help="log the ratings to MLflow and exit")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in RUN_DIR)")
    parser.set_defaults(func=run_review)


def run_review(args: argparse.Namespace) -> int:
    from pipeline.report.review.store import RatingsStore

    run_dir = Path(args.run_dir)
    if args.export or args.log_mlflow:
        store = RatingsStore.for_run(run_dir)
        if args.export:
            print(f"{len(store.all())} ratings -> {store.export_csv(args.export)}")
        if args.log_mlflow:
            from pipeline.report.review.mlflow_log import log_ratings

            print(f"logged {log_ratings(run_dir, store, args.tracking_uri)} ratings to MLflow")
        return 0
    from pipeline.report.review.server import serve

    serve(run_dir, args.host, args.port)
    return 0
