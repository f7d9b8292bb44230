"""``simplebits prior train|bpd|ordering``: train the density prior, tabulate bpd, check the ordering."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.config import add_config_arguments, config_from_args
from pipeline.errors import UserError
from pipeline.run_folder import (
    RunFolder,
    add_register_argument,
    add_run_argument,
    path_argument,
    run_default,
    run_folder,
    with_run_tracking,
)
from pipeline.runtime.atomic import atomic_path, atomic_write_text
from pipeline.runtime.model_uri import local_weights, with_local_weights
from pipeline.tasks import DEFAULT_TASKS, task_labels, tasks_argument

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prior", help="Glow density prior: train, bpd table, ordering check")
    sub = parser.add_subparsers(dest="prior_command", required=True, metavar="ACTION")

    train = sub.add_parser("train", help="train (or resume / fine-tune) a prior")
    _add_cohort_arguments(train)
    add_config_arguments(train, "prior")
    train.add_argument("--init", help="scratch | shipped | <prior.safetensors> | an MLflow models:/ or runs:/ URI "
                                      "(overrides init)")
    add_register_argument(train)
    train.add_argument("--out", help="output folder, resumes from its checkpoint.pt (default with --run: "
                                     "DIR/prior, the cohort DIR/ingest)")
    train.set_defaults(func=run_train)

    bpd = sub.add_parser("bpd", help="per-study bpd table (deterministic midpoint mode)")
    _add_cohort_arguments(bpd)
    bpd.add_argument("--prior", help="prior .safetensors (default: the run's prior with --run, else the shipped "
                                     "prior)")
    bpd.add_argument("--size", type=int, default=None,
                     help="resize to this size (default: as stored; 128 from a manifest)")
    bpd.add_argument("--device", default="auto")
    bpd.add_argument("--tasks", type=tasks_argument, default=None, metavar="TASKS",
                     help="comma-separated tasks whose label columns the table carries and whose mean bpd "
                          "per label is logged (default: effusion,sex)")
    bpd.add_argument("--out", help="CSV: study_id, split, the tasks' label columns (effusion, sex, ...), bpd "
                                   "(default with --run: DIR/prior/bpd.csv)")
    bpd.set_defaults(func=run_bpd)

    ordering = sub.add_parser("ordering", help="noise > radiograph > blurred > flat check at 64 and 128")
    _add_cohort_arguments(ordering, run=False)
    ordering.add_argument("--prior", help="prior .safetensors (default: the shipped prior)")
    ordering.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ordering.add_argument("--reference", type=int, default=32,
                          help="number of rendered reference projections (used without a cohort)")
    ordering.add_argument("--max-studies", type=int, default=512,
                          help="test studies checked at most (a seeded sample; every variant of each is held "
                               "in memory)")
    ordering.add_argument("--out", help="write the numbers as JSON here")
    ordering.set_defaults(func=run_ordering)


def _add_cohort_arguments(parser: argparse.ArgumentParser, run: bool = True) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--ingest", help="ingest folder (store/ + manifest.csv, from simplebits ingest)")
    group.add_argument("--manifest", help="cohort manifest CSV (images are read and resized)")
    if run:
        add_run_argument(parser)


def _cohort_arguments(args: argparse.Namespace, folder: RunFolder | None) -> tuple[str | None, str | None]:
    """``(ingest, manifest)``: as given, else the run folder's ingest folder."""
    if args.ingest or args.manifest or folder is None:
        return args.ingest, args.manifest
    return str(folder.ingest), None


def run_train(args: argparse.Namespace) -> int:
    from pipeline.prior.data import load_radiographs
    from pipeline.prior.train import PriorConfig, train_prior

    folder = run_folder(args)
    config = with_run_tracking(config_from_args(PriorConfig, args, init=args.init,
                                                **{"tracking.register_as": args.register}), folder)
    config = with_local_weights(config, {"--init": "init"})
    out = path_argument(args.out, folder, lambda f: f.prior, "--out")
    ingest, manifest = _cohort_arguments(args, folder)
    radiographs = val_radiographs = None
    if ingest or manifest:
        # the mix bank's sample, taken before reading (train_prior would take the same one); the
        # validation radiographs stay lazy for an ingest folder and are streamed
        radiographs, _ = load_radiographs(ingest, manifest, split="train",
                                          max_studies=config.data.max_radiographs, seed=config.data.bank.seed)
        val_radiographs, _ = load_radiographs(ingest, manifest, split="val")
        log.info("cohort radiographs: %d train, %d val", len(radiographs), len(val_radiographs))
    summary = train_prior(config, out, radiographs, val_radiographs)
    log.info("best validation bpd %.4f; prior in %s", summary["best_val_bpd"], Path(out) / "prior.safetensors")
    return 0


def run_bpd(args: argparse.Namespace) -> int:
    from pipeline.prior import load_prior
    from pipeline.prior.data import load_radiographs
    from pipeline.prior.evaluate import bpd_table
    from pipeline.runtime.device import pick_device

    folder = run_folder(args)
    ingest, manifest = _cohort_arguments(args, folder)
    if not (ingest or manifest):
        raise UserError("prior bpd: give the cohort with --ingest, --manifest or --run")
    out = path_argument(args.out, folder, lambda f: f.prior / "bpd.csv", "--out")
    device = pick_device(args.device)
    prior = local_weights(args.prior, "--prior", folder.tracking_uri() if folder else None)
    model = load_prior(prior or run_default(folder, lambda f: f.prior_weights), device=device)
    images, frame = load_radiographs(ingest, manifest, size=args.size)  # an ingest folder: lazy
    tasks = args.tasks or list(DEFAULT_TASKS)
    table = bpd_table(model, images, frame, device=device, size=args.size, tasks=tasks)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("bpd by split:\n%s", table.groupby("split")["bpd"].agg(["count", "mean"]).to_string())
    for task in tasks:  # per label of each task (its label policy applied); unlabelled studies left out
        labels = task_labels(table, task)
        if labels.notna().any():
            summary = table.groupby(["split", labels.rename(task)])["bpd"].agg(["count", "mean"])
            log.info("bpd by split and %s label:\n%s", task, summary.to_string())
    return 0


def run_ordering(args: argparse.Namespace) -> int:
    from pipeline.prior import load_prior
    from pipeline.prior.data import load_radiographs, read_uint8, render_reference_radiographs, resize_uint8
    from pipeline.prior.evaluate import ordering_holds, simplicity_ordering

    model = load_prior(local_weights(args.prior, "--prior"))
    size = max(args.sizes)
    if args.ingest or args.manifest:
        images, _ = load_radiographs(args.ingest, args.manifest, split="test", size=size,
                                     max_studies=args.max_studies)
        images, source = resize_uint8(read_uint8(images), size), "cohort test split"
    else:
        images, source = render_reference_radiographs(args.reference, size), "rendered reference projections"
    results = simplicity_ordering(model, images, sizes=args.sizes)
    for s, means in results.items():
        log.info("%d px (%s): %s  ordering holds: %s", s, source,
                 ", ".join(f"{k} {v:.3f}" for k, v in means.items()), ordering_holds(means))
    if args.out:
        payload = {"source": source, "n": len(images), "bpd": results}
        atomic_write_text(args.out, json.dumps(payload, indent=2))
    return 0 if all(ordering_holds(m) for m in results.values()) else 1
