"""``simplebits run``: the whole pipeline end to end (the README's main command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="the whole pipeline: cohort (demo or --manifest), ingest, prior, classifiers, SimpleBits, "
             "reports, MLflow",
        description="Runs every stage into one run folder, resuming finished stages. Without --manifest it "
                    "renders the synthetic demo cohort. Stage settings are sections of configs/run.yaml "
                    "(override with --set ingest.size=128).",
    )
    parser.add_argument("--manifest", help="cohort manifest CSV (from simplebits manifest); default: the demo "
                                           "cohort")
    parser.add_argument("--tasks", help="comma-separated tasks to classify, audit and train jointly, e.g. "
                                        "effusion,cardiomegaly,sex (default: config tasks, effusion,sex)")
    parser.add_argument("--joint-tasks", help="comma-separated tasks for joint training (default: --tasks, "
                                              "else config joint_tasks)")
    parser.add_argument("--out", help="run folder (default: config out, reports/demo)")
    add_config_arguments(parser, "run")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.tasks import explicit_keys, parse_tasks
    from pipeline.workflow import RunConfig, print_where_to_look, run_pipeline

    # Names are checked by RunConfig, which also knows the tasks that --set task_definitions=... adds.
    tasks = parse_tasks(args.tasks, check=False) if args.tasks else None
    joint_tasks = parse_tasks(args.joint_tasks, check=False) if args.joint_tasks else None
    if joint_tasks is None and tasks is not None and "joint_tasks" not in explicit_keys(args.overrides):
        joint_tasks = tasks  # joint training and the audit per task, unless the user said otherwise
    # absolute, so that the resolved config resumes the run from any working folder
    manifest = str(Path(args.manifest).resolve()) if args.manifest else None
    config = config_from_args(RunConfig, args, out=args.out, manifest=manifest, tasks=tasks,
                              joint_tasks=joint_tasks)
    summary = run_pipeline(config)
    print(json.dumps(summary, indent=2, default=str))
    print_where_to_look(summary)
    return 0
