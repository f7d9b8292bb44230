"""``simplebits classify train``: the effusion or sex classifier on original images."""

from __future__ import annotations

import argparse
import json

from pipeline.config import add_config_arguments, config_from_args

TASK_CHOICES = ("effusion", "sex")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("classify", help="train a classifier on original images")
    actions = parser.add_subparsers(dest="classify_command", required=True, metavar="ACTION")
    register_train(actions)


def register_train(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "train",
        help="train on the ingest cache; writes model.safetensors, model.json, metrics.json, predictions.csv",
    )
    parser.add_argument("--ingest", required=True, help="ingest folder (from simplebits ingest)")
    parser.add_argument("--task", choices=TASK_CHOICES, help="label to predict (default: config task)")
    parser.add_argument("--out", required=True, help="output folder, e.g. reports/<run>/classifier/<task>")
    parser.add_argument("--force", action="store_true", help="retrain even if metrics.json exists")
    add_config_arguments(parser, "classify")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    # imported when the command runs, so that `simplebits --help` stays fast
    from pipeline.training.classifier import ClassifyConfig, train_classifier_run

    config = config_from_args(ClassifyConfig, args, task=args.task)
    metrics = train_classifier_run(args.ingest, args.out, config, force=args.force)
    print(json.dumps(metrics, indent=2))
    return 0
