"""``simplebits classify train``: the classifier of any registered task (effusion, sex, cardiomegaly, ...)
on original images; the task's own settings (pipeline/tasks.py, e.g. sex's network) are applied."""

from __future__ import annotations

import argparse
import json

from pipeline.config import add_config_arguments
from pipeline.run_folder import add_register_argument, add_run_argument, path_argument, run_folder, with_run_tracking
from pipeline.tasks import stage_config_from_args, task_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("classify", help="train a classifier on original images")
    actions = parser.add_subparsers(dest="classify_command", required=True, metavar="ACTION")
    register_train(actions)


def register_train(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "train",
        help="train on the ingest cache; writes model.safetensors, model.json, metrics.json, predictions.csv",
    )
    parser.add_argument("--ingest", help="ingest folder (from simplebits ingest; default with --run: DIR/ingest)")
    parser.add_argument("--task", type=task_argument, metavar="TASK",
                        help="label to predict: any registered task, e.g. effusion, sex, cardiomegaly "
                             "(default: config task)")
    parser.add_argument("--out", help="output folder (default with --run: DIR/classifier/<task>)")
    add_run_argument(parser)
    parser.add_argument("--force", action="store_true", help="retrain even if metrics.json exists")
    add_register_argument(parser)
    add_config_arguments(parser, "classify")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    # imported when the command runs, so that `simplebits --help` stays fast
    from pipeline.training.classifier import ClassifyConfig, train_classifier_run

    folder = run_folder(args)
    config = stage_config_from_args(ClassifyConfig, args, "classify", task=args.task,
                                    **{"tracking.register_as": args.register})
    config = with_run_tracking(config, folder)
    ingest = path_argument(args.ingest, folder, lambda f: f.ingest, "--ingest")
    out = path_argument(args.out, folder, lambda f: f.classifier(config.task), "--out")
    metrics = train_classifier_run(ingest, out, config, force=args.force)
    print(json.dumps(metrics, indent=2))
    return 0
