"""``simplebits manifest``: build a cohort manifest from MIMIC-CXR-JPG, CheXpert, NIH or a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import ConfigError, add_config_arguments, config_from_args, save_resolved_config
from pipeline.data.manifest import ManifestError, write_manifest
from pipeline.data.sources import FORMATS, ManifestConfig, build_manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "manifest",
        help="build a cohort manifest CSV from dataset label files or an image folder",
        description="Build a validated, pseudonymised cohort manifest (schema: data_manifests/README.md).",
    )
    parser.add_argument("--format", choices=sorted(FORMATS), help="dataset format")
    parser.add_argument("--root", help="dataset root folder")
    parser.add_argument("--out", help="output manifest CSV; the resolved config is written beside it")
    parser.add_argument("--views", help="comma-separated views to keep (default PA,AP)")
    parser.add_argument("--all-views", action="store_const", const=True, help="keep every view")
    parser.add_argument("--uncertain", choices=["drop", "positive", "negative"],
                        help="uncertain (-1) effusion labels: drop (default), positive, negative")
    parser.add_argument("--require-label", action="store_const", const=True,
                        help="drop images without an effusion label instead of keeping them unlabeled")
    parser.add_argument("--negative-requires-no-finding", action="store_const", const=True,
                        help="negative only if Pleural Effusion == 0 and No Finding == 1")
    parser.add_argument("--split", choices=["patient", "official"],
                        help="patient-level hash split (default) or the dataset's official split")
    parser.add_argument("--seed", type=int, help="split and balancing seed (default 0)")
    parser.add_argument("--balance", choices=["effusion", "sex"],
                        help="downsample the majority class within each split")
    parser.add_argument("--labels", help="folder format: labels CSV (filename, effusion, sex, patient_id)")
    parser.add_argument("--patients", help="mimic-cxr-jpg: MIMIC-IV patients.csv(.gz) for sex and age")
    parser.add_argument("--data-entry", help="nih: Data_Entry_2017*.csv to use")
    add_config_arguments(parser, "manifest")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.all_views and args.views:
        print("error: --views and --all-views exclude each other", file=sys.stderr)
        return 2
    views = [] if args.all_views else (args.views.split(",") if args.views else None)
    try:
        config = config_from_args(
            ManifestConfig,
            args,
            **{
                "format": args.format,
                "root": args.root,
                "out": args.out,
                "views": views,
                "labels.uncertain": args.uncertain,
                "labels.require_label": args.require_label,
                "labels.negative_requires_no_finding": args.negative_requires_no_finding,
                "split.mode": args.split,
                "split.seed": args.seed,
                "balance": args.balance,
                "folder.labels_csv": args.labels,
                "mimic.patients_csv": args.patients,
                "nih.data_entry_csv": args.data_entry,
            },
        )
        out = write_cohort_manifest(config)
    except (ConfigError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def write_cohort_manifest(config: ManifestConfig) -> Path:
    """Build, write the manifest and its resolved config (``<stem>.config.resolved.yaml``) beside it."""
    manifest = build_manifest(config)
    out = write_manifest(manifest, config.out)
    save_resolved_config(config, out.parent, name=f"{out.stem}.config.resolved.yaml")
    print(summarise(manifest).to_string())
    return out


def summarise(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images per split: effusion positive/negative/unlabeled, female/male, patients."""
    effusion = manifest["effusion"].map({1: "positive", 0: "negative"}).fillna("unlabeled")
    table = pd.crosstab(manifest["split"], effusion)
    for column in ("positive", "negative", "unlabeled"):
        if column not in table.columns:
            table[column] = 0
    table["female"] = manifest.groupby("split")["sex"].apply(lambda s: int((s == "F").sum()))
    table["male"] = manifest.groupby("split")["sex"].apply(lambda s: int((s == "M").sum()))
    table["patients"] = manifest.groupby("split")["patient_id"].nunique()
    return table[["positive", "negative", "unlabeled", "female", "male", "patients"]]
