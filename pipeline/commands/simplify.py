"""``simplebits simplify <setting>``: the SimpleBits settings, one sub-subcommand each.

Each setting adds one ``register_<setting>(actions)`` function (and its ``run_<setting>``) below and one
call in :func:`register`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TypeVar

from pipeline.config import add_config_arguments, config_from_args

TASK_CHOICES = ("effusion", "sex")
ConfigT = TypeVar("ConfigT", bound=Any)  # a JointConfig or AuditConfig (both have ``independent``)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("simplify", help="SimpleBits simplification (joint training, audit, condensation)")
    actions = parser.add_subparsers(dest="simplify_command", required=True, metavar="SETTING")
    register_train(actions)
    register_audit(actions)
    register_condense(actions)


def register_train(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "train",
        help="setting (a): train simplifier and classifier jointly (one-step look-ahead)",
        description="Setting (a). --set simplify.lam=[0,1,2,4] runs a sweep with one lam-<value>/ folder each.",
    )
    parser.add_argument("--ingest", required=True, help="ingest folder (from simplebits ingest)")
    parser.add_argument("--task", choices=TASK_CHOICES, help="label to keep (default: config task)")
    parser.add_argument("--prior", help="prior .safetensors (default: config prior, else the shipped prior)")
    parser.add_argument("--classifier-init", help="start the classifier from these weights (classify train's "
                        "model.safetensors; same network as the config's classifier)")
    add_check_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder, e.g. reports/<run>/simplify/joint-<task>")
    parser.add_argument("--force", action="store_true", help="retrain even if metrics.json exists")
    add_config_arguments(parser, "simplify_joint")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    # imported when the command runs, so that `simplebits --help` stays fast
    from pipeline.simplebits.joint import JointConfig, run_joint

    config = config_from_args(JointConfig, args, task=args.task, prior=args.prior,
                              classifier_init=args.classifier_init)
    summaries = run_joint(args.ingest, args.out, with_independent(config, args.independent), force=args.force,
                          mask_dir=args.masks)
    print(json.dumps([{k: v for k, v in s.items() if k != "history"} for s in summaries], indent=2))
    return 0


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation inputs joint training and the audit share (pipeline/simplebits/outcomes.py)."""
    parser.add_argument("--independent", metavar="WEIGHTS",
                        help="independent check classifier trained on originals (default: train one)")
    parser.add_argument("--masks", help="ground-truth masks folder (demo cohort: <run>/cohort/masks)")


def with_independent(config: ConfigT, path: str | None) -> ConfigT:
    """``config`` with its ``independent`` check classifier loaded from ``path`` (if given)."""
    if not path:
        return config
    return config.model_copy(update={"independent": config.independent.model_copy(
        update={"enabled": True, "path": path})})


def register_audit(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "audit",
        help="setting (c): post-hoc audit of frozen classifier(s) by evidence matching",
        description="Setting (c). Amortized by default (a simplifier over the cohort); --per-study STUDY_ID "
                    "optimises one study's image directly.",
    )
    parser.add_argument("--ingest", required=True, help="ingest folder (from simplebits ingest)")
    parser.add_argument("--task", choices=TASK_CHOICES, help="label to keep (default: config task)")
    parser.add_argument("--classifier", action="append", default=[], metavar="WEIGHTS",
                        help="frozen classifier weights (.safetensors or state_dict .pt); "
                             "repeat for an ensemble")
    parser.add_argument("--classifier-arch", action="append", default=[], metavar="NAME",
                        help="registered network name of each --classifier (one for all, or one each; "
                             "default: the .json next to the weights)")
    parser.add_argument("--prior", help="prior .safetensors (default: config prior, else the shipped prior)")
    add_check_arguments(parser)
    parser.add_argument("--per-study", metavar="STUDY_ID", help="audit one study by direct optimisation")
    parser.add_argument("--out", required=True,
                        help="output folder, e.g. reports/<run>/simplify/audit-<task>")
    parser.add_argument("--force", action="store_true", help="redo even if metrics.json exists")
    add_config_arguments(parser, "simplify_audit")
    parser.set_defaults(func=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    from pipeline.simplebits.audit import AuditConfig, ClassifierSpec, audit_command, audit_study_command

    config = config_from_args(AuditConfig, args, task=args.task, prior=args.prior)
    if args.classifier:
        archs = args.classifier_arch or [None]
        if len(archs) == 1:
            archs = archs * len(args.classifier)
        if len(archs) != len(args.classifier):
            raise SystemExit(f"--classifier-arch: give one name for all or one per --classifier "
                             f"({len(args.classifier)}), got {len(archs)}")
        config = config.model_copy(update={"classifiers": [ClassifierSpec(path=p, name=a)
                                                           for p, a in zip(args.classifier, archs)]})
    config = with_independent(config, args.independent)
    if not config.classifiers:
        raise SystemExit("simplify audit: give the frozen classifier with --classifier "
                         "(or classifiers: in the config)")
    if args.per_study:
        summary = audit_study_command(args.ingest, args.out, args.per_study, config)
    else:
        summary = audit_command(args.ingest, args.out, config, force=args.force, mask_dir=args.masks)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=float))
    return 0


def register_condense(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "condense",
        help="setting (b): dataset condensation by gradient matching plus bpd",
        description="Setting (b). --set condense.lam=[0,10000] runs a sweep with one lam-<value>/ folder each.",
    )
    parser.add_argument("--ingest", required=True, help="ingest folder (from simplebits ingest)")
    parser.add_argument("--task", choices=TASK_CHOICES, help="label to condense (default: config task)")
    parser.add_argument("--prior", help="prior .safetensors (default: config prior, else the shipped prior)")
    parser.add_argument("--ipc", type=int, choices=(1, 10), help="synthetic images per class")
    parser.add_argument("--out", required=True,
                        help="output folder, e.g. reports/<run>/simplify/condense-<task>")
    parser.add_argument("--force", action="store_true", help="redo even if metrics.json exists")
    add_config_arguments(parser, "simplify_condense")
    parser.set_defaults(func=run_condense)


def run_condense(args: argparse.Namespace) -> int:
    from pipeline.simplebits.condense import CondenseConfig, condense_command

    config = config_from_args(CondenseConfig, args, task=args.task, prior=args.prior,
                              **{"condense.ipc": args.ipc})
    summaries = condense_command(args.ingest, args.out, config, force=args.force)
    print(json.dumps([{k: v for k, v in s.items() if k != "history"} for s in summaries], indent=2))
    return 0
