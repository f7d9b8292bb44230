"""``simplebits demo-layout``: demo radiographs in a real dataset's folder layout (CheXpert, MIMIC, NIH)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args

LAYOUT_CHOICES = ("chexpert", "mimic-cxr-jpg", "nih")  # pipeline.data.demo.dataset_layouts.LAYOUTS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo-layout",
        help="write demo radiographs as a CheXpert, MIMIC-CXR-JPG or NIH folder (JPEG/PNG + label tables)",
        description="Render a demo cohort and write it in a real dataset's layout, labels from the demo's "
                    "ground truth (effusion, sex, age; burned-in marks as Support Devices), so that "
                    "`simplebits manifest --format FORMAT --root DIR` and `simplebits run --manifest` can be "
                    "tried without the real data.",
    )
    parser.add_argument("--format", required=True, choices=LAYOUT_CHOICES, help="dataset layout")
    parser.add_argument("--out", type=Path, required=True, help="dataset root folder to write")
    parser.add_argument("--n", type=int, default=None, help="number of studies (default: config, 200)")
    parser.add_argument("--size", type=int, default=None, help="image rows = columns (default: config, 128)")
    parser.add_argument("--seed", type=int, default=None, help="cohort seed")
    parser.add_argument("--cohort", type=Path, help="an already rendered demo cohort folder to use instead")
    add_config_arguments(parser, "demo_cohort")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.demo.cohort import DemoCohortConfig
    from pipeline.data.demo.dataset_layouts import write_demo_layout

    # burned-in marks independent of the label by default: they are the Support Devices label
    config = config_from_args(DemoCohortConfig, args, n=args.n, size=args.size, seed=args.seed,
                              **{"distractor.mode": None if _sets(args, "distractor.mode") else "independent"})
    root = write_demo_layout(args.format, args.out, config, cohort_dir=args.cohort)
    print(f"{args.format} layout in {root}; next: simplebits manifest --format {args.format} --root {root} "
          f"--out {root / 'manifest.csv'}")
    return 0


def _sets(args: argparse.Namespace, key: str) -> bool:
    return any(item.split("=", 1)[0].strip() == key for item in args.overrides)
