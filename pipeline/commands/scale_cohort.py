"""``simplebits scale-cohort``: a large ingest folder derived from a small one (tests, benchmarks)."""

from __future__ import annotations

import argparse

from pipeline.config import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "scale-cohort",
        help="derive an N-study ingest folder from an existing one (no rendering; for scale tests)",
        description="Write a complete ingest folder of N studies into DIR, each a source study with a "
        "small translation, intensity/gamma jitter and sometimes a blend with a same-label study "
        "(never flipped). New pseudonyms, patient-level splits, labels kept from the source rows. "
        "100k studies at 64x64 take about a minute on 2 cores.",
    )
    parser.add_argument("--source", required=True, help="source ingest folder (from simplebits ingest)")
    parser.add_argument("--n", type=int, default=None, help="number of studies (default: config, 10000)")
    parser.add_argument("--out", required=True, help="new, empty output ingest folder DIR")
    parser.add_argument("--seed", type=int, default=None, help="same seed and source -> identical folder")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the source's)")
    add_config_arguments(parser, "scale_cohort")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.scale import ScaleCohortConfig, build_scale_cohort

    config = config_from_args(ScaleCohortConfig, args, source=args.source, out=args.out, n=args.n,
                              seed=args.seed, size=args.size)
    summary = build_scale_cohort(config)
    print(f"scale cohort: {summary.studies} studies ({summary.patients} patients, splits {summary.splits}) "
          f"at {summary.size}x{summary.size} in {summary.seconds:.1f} s -> {config.out}")
    return 0
