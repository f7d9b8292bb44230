"""``simplebits reliance``: a classifier's true reliance on each rendered feature of a demo cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.classifier_args import adapter_overrides, add_classifier_arguments, classifier_kwargs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reliance",
        help="measure a classifier's reliance on each device, the effusion and the breasts by rendering "
        "them away",
        description="R = mean |P(x) - P(x without the feature)| over the studies of one split that have "
        "the feature, from a demo cohort rendered with --counterfactuals; also on the log-odds scale "
        "(reliance_log_odds), which still moves where P has saturated at 0 or 1.",
    )
    parser.add_argument("--cohort", type=Path, required=True,
                        help="demo cohort folder (simplebits demo-cohort --counterfactuals)")
    parser.add_argument("--ingest", type=Path, required=True,
                        help="the cohort's ingest folder (its size, VOI and padding; its splits)")
    parser.add_argument("--classifier", required=True,
                        help="classifier weights (or an MLflow models:/NAME/VERSION or runs:/ URI)")
    parser.add_argument("--task", default=None, help="task name (picks a multi-label head's output)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"),
                        help="split to measure on (default test)")
    parser.add_argument("--out", type=Path, default=None, help="per-study CSV (the summary is printed)")
    parser.add_argument("--device", default="cpu")
    add_classifier_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.demo.reliance import classifier_reliance
    from pipeline.runtime.model_uri import local_weights

    table, summary = classifier_reliance(
        args.cohort, args.ingest, Path(local_weights(args.classifier, "--classifier")), split=None if args.split == "all" else args.split,
        device=args.device, name=args.classifier_arch, kwargs=classifier_kwargs(args),
        adapter=adapter_overrides(args), task=args.task,
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    print(summary.to_string(index=False))
    return 0
