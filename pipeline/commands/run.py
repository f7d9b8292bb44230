"""``simplebits run``: the whole pipeline end to end (the README's main command)."""

from __future__ import annotations

import argparse
import json

from pipeline.config import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="the whole pipeline: demo cohort, ingest, prior, classifiers, SimpleBits, reports, MLflow",
        description="Runs every stage into one run folder, resuming finished stages. "
                    "Stage settings are sections of configs/run.yaml (override with --set cohort.n=500).",
    )
    parser.add_argument("--out", help="run folder (default: config out, reports/demo)")
    add_config_arguments(parser, "run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.workflow import RunConfig, print_where_to_look, run_pipeline

    config = config_from_args(RunConfig, args, out=args.out)
    summary = run_pipeline(config)
    print(json.dumps(summary, indent=2, default=str))
    print_where_to_look(summary)
    return 0
