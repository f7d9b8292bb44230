"""``simplebits manifest``: build a cohort manifest from MIMIC-CXR-JPG, CheXpert, NIH or a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline.config import add_config_arguments, config_from_args, save_resolved_config
from pipeline.data.manifest import write_manifest
from pipeline.data.sources import FORMATS, ManifestConfig, build_manifest, manifest_from_records
from pipeline.data.sources.folder import scan_folder
from pipeline.errors import UserError
from pipeline.runtime.atomic import atomic_write_text
from pipeline.tasks import get_task, parse_tasks, task_argument


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
    parser.add_argument("--require-label", nargs="?", const="effusion", metavar="TASKS",
                        help="drop images without a label for these tasks (comma-separated, their label "
                             "policy applied; default effusion) instead of keeping them unlabeled")
    # label policies belong to the task now (pipeline/tasks.py): the manifest keeps the raw codes
    for moved in ("--uncertain", "--negative-requires-no-finding"):
        parser.add_argument(moved, nargs="?", const=True, help=argparse.SUPPRESS,
                            dest=moved[2:].replace("-", "_"))
    parser.add_argument("--split", choices=["patient", "official"],
                        help="patient-level hash split (default) or the dataset's official split")
    parser.add_argument("--seed", type=int, help="split and balancing seed (default 0)")
    parser.add_argument("--balance", type=task_argument, metavar="TASK",
                        help="downsample the majority class of this task (e.g. effusion, sex, cardiomegaly, "
                             "effusion_paper) within each split")
    parser.add_argument("--labels", help="folder format: labels CSV (filename, effusion, sex, patient_id)")
    parser.add_argument("--patients", help="mimic-cxr-jpg: MIMIC-IV patients.csv(.gz) for sex and age")
    parser.add_argument("--data-entry", help="nih: Data_Entry_2017*.csv to use")
    add_config_arguments(parser, "manifest")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.all_views and args.views:
        raise UserError("--views and --all-views exclude each other")
    views = [] if args.all_views else (args.views.split(",") if args.views else None)
    if args.uncertain is not None or args.negative_requires_no_finding is not None:
        raise UserError("--uncertain and --negative-requires-no-finding are now the task's label policy: "
                        "the manifest keeps every raw code (1, 0, -1, blank); train the task effusion_paper "
                        "(the paper's MIMIC policy) or define one (pipeline/tasks.py), and build its cohort "
                        "with --balance effusion_paper or --require-label effusion_paper")
    config = config_from_args(
        ManifestConfig,
        args,
        **{
            "format": args.format,
            "root": args.root,
            "out": args.out,
            "views": views,
            "require_labels": parse_tasks(args.require_label) if args.require_label else None,
            "split.mode": args.split,
            "split.seed": args.seed,
            "balance": args.balance,
            "folder.labels_csv": args.labels,
            "mimic.patients_csv": args.patients,
            "nih.data_entry_csv": args.data_entry,
        },
    )
    out = write_cohort_manifest(config)
    print(f"wrote {out}")
    return 0


def write_cohort_manifest(config: ManifestConfig) -> Path:
    """Build, write the manifest and its resolved config (``<stem>.config.resolved.yaml``) beside it.

    For a folder, ``<stem>.problems.csv`` beside it lists each file left out (path relative to the
    root, problem, reason, file kept instead) so the user can audit what was dropped. It holds no
    identifiers beyond those relative paths, which are the user's own file names.
    """
    scan = scan_folder(Path(config.root), config) if config.format == "folder" else None
    manifest = manifest_from_records(scan.records, config) if scan is not None else build_manifest(config)
    out = write_manifest(manifest, config.out)
    save_resolved_config(config, out.parent, name=f"{out.stem}.config.resolved.yaml")
    if scan is not None:
        problems = out.with_name(f"{out.stem}.problems.csv")
        atomic_write_text(problems, scan.problems.to_csv(index=False, lineterminator="\n"))
        print(f"skipped {len(scan.problems)} files, listed in {problems}")
    print(summarise(manifest, config.balance or "effusion").to_string())
    return out


def summarise(manifest: pd.DataFrame, task: str = "effusion") -> pd.DataFrame:
    """Images per split: ``task`` (default effusion) positive/negative/unlabeled (its label policy
    applied), female/male, patients."""
    labels = get_task(task).labels(manifest)
    table = pd.crosstab(manifest["split"], labels.map({1.0: "positive", 0.0: "negative"}).fillna("unlabeled"))
    for column in ("positive", "negative", "unlabeled"):
        if column not in table.columns:
            table[column] = 0
    table["female"] = manifest.groupby("split")["sex"].apply(lambda s: int((s == "F").sum()))
    table["male"] = manifest.groupby("split")["sex"].apply(lambda s: int((s == "M").sum()))
    table["patients"] = manifest.groupby("split")["patient_id"].nunique()
    return table[["positive", "negative", "unlabeled", "female", "male", "patients"]]
