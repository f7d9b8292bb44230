"""``simplebits report RUN_DIR``: per-study reports, the cohort report, optional DICOM SC export."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pydantic import Field

from pipeline.config import StrictModel, add_config_arguments, config_from_args
from pipeline.errors import UserError
from pipeline.run_folder import RunFolder, add_run_argument
from pipeline.runtime.tracking import TrackingConfig

log = logging.getLogger(__name__)


class CohortSection(StrictModel):
    families: list[str] = Field(default_factory=lambda: ["sex", "age_band", "view", "source"])
    min_subgroup_size: int = Field(1, ge=1)
    sweep: str | None = None


class DicomSection(StrictModel):
    enabled: bool = False
    allow_identity: bool = False


class ReportConfig(StrictModel):
    simplify: str | None = None  # simplify/<setting>-<task>; None: a finished one, the audit first
    splits: list[str] | None = None
    tile: int = Field(256, ge=32, le=2048)
    overwrite: bool = False
    class_names: dict[str, tuple[str, str]] = Field(default_factory=dict)
    cohort: CohortSection = Field(default_factory=CohortSection)
    dicom: DicomSection = Field(default_factory=DicomSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="per-study panels, cohort report (HTML), optional DICOM Secondary Captures",
        description="Writes RUN_DIR/studies/<id>/ and RUN_DIR/cohort_report/index.html.",
    )
    parser.add_argument("run_dir", nargs="?", help="run folder (e.g. reports/demo); or give --run")
    add_run_argument(parser)
    parser.add_argument("--simplify", help="simplify/<setting>-<task> folder name (default: config, else a "
                                           "finished run of the folder, the audit first)")
    parser.add_argument("--sweep", help="trade-off table (CSV/JSON): method, strength|lam, mean_bpd, auroc")
    parser.add_argument("--dicom", action="store_true", default=None, help="also write DICOM Secondary Captures")
    parser.add_argument("--allow-identity", action="store_true", default=None,
                        help="copy patient identity from the source DICOM into the Secondary Captures")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    add_config_arguments(parser, "report")
    parser.set_defaults(func=run_report)


def read_sweep(path: str | Path):
    """A trade-off table from CSV or JSON (records); errors name the file."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: trade-off table not found")
    return pd.read_json(path) if path.suffix.lower() == ".json" else pd.read_csv(path)


def report_run_dir(args: argparse.Namespace) -> Path:
    """The run folder, given as RUN_DIR or as --run DIR (the same folder if both)."""
    given = {str(Path(d)) for d in (args.run_dir, args.run) if d}
    if len(given) != 1:
        raise UserError("report: give the run folder once, as RUN_DIR or --run DIR" if not given else
                        f"report: RUN_DIR {args.run_dir} and --run {args.run} name different folders")
    run_dir = Path(given.pop())
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    return run_dir


def run_report(args: argparse.Namespace) -> int:
    from pipeline.config import save_resolved_config
    from pipeline.report.html import write_run_cohort_report
    from pipeline.report.study import write_run_study_reports
    from pipeline.runtime.tracking import Tracker, without_identifying_columns

    config = config_from_args(
        ReportConfig, args, simplify=args.simplify, **{
            "cohort.sweep": args.sweep, "dicom.enabled": args.dicom, "dicom.allow_identity": args.allow_identity,
        },
    )
    folder = RunFolder(report_run_dir(args))
    run_dir = folder.root
    config = config.model_copy(update={"simplify": folder.pick_simplification(config.simplify)})
    save_resolved_config(config, run_dir / "cohort_report", name="report.config.yaml")
    class_names = config.class_names or None
    studies = write_run_study_reports(run_dir, config.simplify, config.splits, class_names, config.tile,
                                      config.overwrite)
    captures = None
    if config.dicom.enabled:  # before the cohort report, which says how many there are or why none
        from pipeline.io.dicom_write import write_run_secondary_captures

        captures = write_run_secondary_captures(run_dir, config.simplify, config.dicom.allow_identity)
    sweep = None
    if config.cohort.sweep:
        sweep_path = Path(config.cohort.sweep)
        sweep = read_sweep(sweep_path if sweep_path.is_absolute() else run_dir / sweep_path)
    index = write_run_cohort_report(
        run_dir, config.simplify, sweep, tuple(config.splits) if config.splits else None, class_names,
        tuple(config.cohort.families), config.cohort.min_subgroup_size, captures,
    )
    summary = {"simplify": config.simplify, "studies": len(studies), "cohort_report": str(index)}
    if captures is not None:
        summary["secondary_captures"] = len(captures)
    if config.tracking.enabled and not args.no_mlflow:
        tracker = Tracker.from_config(run_dir, config.tracking)
        with tracker.run(f"report-{config.simplify}", params=config.model_dump(mode="json")):
            import pandas as pd

            table = pd.read_parquet(run_dir / "cohort_report" / "studies.parquet")
            tracker.log_dataset(table, name=f"studies-{config.simplify}", context="evaluation", targets="label")
            tracker.log_table(without_identifying_columns(table), "studies.json")
            tracker.log_artifact(run_dir / "cohort_report", "cohort_report")
            tracker.log_study_reports(run_dir / "studies")
    print(json.dumps(summary, indent=2))
    return 0
