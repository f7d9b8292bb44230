"""``simplebits export RUN_DIR --pacs URL``: the run's Secondary Captures to a PACS, confirmed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.io.pacs import DEFAULT_CALLING_AET, DEFAULT_TIMEOUT_S, LOG_FILE

    parser = subparsers.add_parser(
        "export", help="send the run's DICOM Secondary Captures to a PACS (STOW-RS or C-STORE), confirmed",
        description="Sends RUN_DIR/dicom_sc/ (from simplebits report --dicom) to a PACS, then queries the "
                    f"PACS (QIDO-RS or C-FIND) for every instance sent. RUN_DIR/{LOG_FILE} records what was "
                    "confirmed or refused; a re-run skips files already confirmed.",
    )
    parser.add_argument("run_dir", help="run folder (e.g. reports/demo)")
    parser.add_argument("--pacs", required=True, metavar="URL",
                        help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web (STOW-RS/QIDO-RS), or "
                             "dicom://AET@HOST:PORT (C-STORE/C-FIND)")
    parser.add_argument("--allow-identity", action="store_true",
                        help="also send Secondary Captures that carry patient identity "
                             "(written by report --allow-identity)")
    parser.add_argument("--resend", action="store_true",
                        help="send files already confirmed at this PACS again")
    parser.add_argument("--calling-aet", default=DEFAULT_CALLING_AET, help="our AE title for dicom:// URLs")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds per network operation")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pipeline.io.pacs import REFUSED, UNREADABLE, send_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    summary = send_run(run_dir, args.pacs, allow_identity=args.allow_identity, resend=args.resend,
                       calling_aet=args.calling_aet, timeout=args.timeout)
    print(json.dumps(summary, indent=2))
    # Partly refused is not a user error (nothing to fix in the command), but it is not a success either.
    return 1 if summary[REFUSED] or summary[UNREADABLE] else 0
