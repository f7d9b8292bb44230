"""``simplebits ingest``: manifest -> working-resolution image store, status table and ok-manifest."""

from __future__ import annotations

import argparse
import logging

from pipeline.config import add_config_arguments, config_from_args
from pipeline.run_folder import add_run_argument, path_argument, run_folder

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="read, validate and store a manifest's images at working resolution",
        description="Read every image of a manifest, store it as uint8 at working resolution and "
        "record ok/error per study in status.csv. Re-running skips finished studies. "
        "Works under torchrun (one shard per rank).",
    )
    parser.add_argument("--manifest", required=True, help="manifest CSV (see data_manifests/README.md)")
    parser.add_argument("--out", help="ingest folder: store/, status.csv, manifest.csv (default with --run: "
                                     "DIR/ingest)")
    add_run_argument(parser)
    parser.add_argument("--size", type=int, default=None, help="working resolution, 32..256 (default 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decode processes; they exit with this one (default 0: in-process)")
    parser.add_argument("--retry-errors", action="store_true", default=None,
                        help="re-try studies that failed in an earlier run")
    add_config_arguments(parser, "ingest")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.data.ingest import IngestConfig, ingest
    from pipeline.runtime.distributed import init_distributed, shutdown_distributed

    out = path_argument(args.out, run_folder(args), lambda f: f.ingest, "--out")
    config = config_from_args(
        IngestConfig, args, manifest=args.manifest, out=out, size=args.size,
        workers=args.workers, retry_errors=args.retry_errors,
    )
    context = init_distributed("cpu")  # decoding is CPU work; gloo is enough to share the status
    try:
        summary = ingest(config)
    finally:
        shutdown_distributed()
    if context.is_main:
        log.info(
            "ingest: %d studies, %d ok, %d error (%d processed now, %d skipped as finished) -> %s",
            summary.total, summary.ok, summary.error, summary.processed, summary.skipped, config.out,
        )
    # Bad files are expected and listed in status.csv; only a run with nothing usable fails.
    return 0 if summary.ok > 0 or summary.total == 0 else 1
