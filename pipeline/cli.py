"""The ``simplebits`` command.

Every pipeline step is one subcommand. Each module in :mod:`pipeline.commands` exposes
``register(subparsers)``; modules are discovered so that adding a step never touches this file.
Subcommands are thin: parse, load config, call one function.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from pipeline import __version__, commands
from pipeline.errors import USER_ERROR_EXIT, UserError
from pipeline.runtime.distributed import shutdown_distributed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simplebits",
        description="SimpleBits for chest radiographs: ingest, density prior, simplifier, reports.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a user error (bad path, value or file)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.debug:
            raise
        # one line naming the file or value and the reason; the traceback only with --debug
        print(f"simplebits: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USER_ERROR_EXIT
    finally:
        # Under torchrun, exiting with a live gloo/NCCL group aborts the process ("terminate called
        # without an active exception"); tear it down cleanly after every command.
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
