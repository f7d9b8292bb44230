"""``simplebits simplify <setting>``: the SimpleBits settings, one sub-subcommand each.

Each setting adds one ``register_<setting>(actions)`` function (and its ``run_<setting>``) below and one
call in :func:`register`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TypeVar

from pipeline.classifier_args import adapter_overrides, add_classifier_arguments, classifier_kwargs
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
from pipeline.runtime.model_uri import local_weights, with_local_weights
from pipeline.tasks import stage_config_from_args, task_argument

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
    add_input_arguments(parser)
    parser.add_argument("--task", type=task_argument, metavar="TASK",
                        help="label to keep: any registered task (default: config task)")
    add_prior_argument(parser)
    parser.add_argument("--classifier-init", help="start the classifier from these weights (classify train's "
                        "model.safetensors, or a state_dict of the network --classifier-arch / the config's "
                        "classifier names; not TorchScript; or an MLflow models:/NAME/VERSION or runs:/ URI; "
                        "default with --run: DIR/classifier/<task>/ if trained)")
    add_classifier_arguments(parser)  # how to read --classifier-init (network, adapter)
    add_check_arguments(parser)
    add_out_argument(parser, "joint")
    parser.add_argument("--force", action="store_true", help="retrain even if metrics.json exists")
    add_register_argument(parser)  # the simplifier as NAME, the classifier trained with it as NAME-classifier
    add_config_arguments(parser, "simplify_joint")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    # imported when the command runs, so that `simplebits --help` stays fast
    from pipeline.simplebits.joint import JointConfig, run_joint

    folder = run_folder(args)
    config = stage_config_from_args(JointConfig, args, "joint", task=args.task, **{
        "classifier.name": args.classifier_arch, "classifier.kwargs": classifier_kwargs(args),
        "classifier_adapter": adapter_overrides(args), "tracking.register_as": args.register})
    config = with_run_tracking(config.model_copy(update={
        "prior": args.prior or config.prior or run_default(folder, lambda f: f.prior_weights),
        "classifier_init": args.classifier_init or config.classifier_init
        or run_default(folder, lambda f: f.classifier_weights(config.task))}), folder)
    config = with_independent(config, independent_path(args, folder, config))
    config = with_local_weights(config, {"--prior": "prior", "--classifier-init": "classifier_init",
                                         "--independent": "independent.path"})
    summaries = run_joint(path_argument(args.ingest, folder, lambda f: f.ingest, "--ingest"),
                          output_folder(args, folder, "joint", config.task), config, force=args.force,
                          mask_dir=args.masks or run_default(folder, lambda f: f.masks))
    print(json.dumps([{k: v for k, v in s.items() if k != "history"} for s in summaries], indent=2))
    return 0


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ingest`` and ``--run``: the cohort, and the run folder whose layout gives the defaults."""
    parser.add_argument("--ingest", help="ingest folder (from simplebits ingest; default with --run: DIR/ingest)")
    add_run_argument(parser)


def add_prior_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", help="prior .safetensors or an MLflow models:/NAME/VERSION or runs:/ URI "
                                        "(default: config prior, else the run's prior with --run, else the "
                                        "shipped prior)")


def add_out_argument(parser: argparse.ArgumentParser, setting: str) -> None:
    parser.add_argument("--out", help=f"output folder (default with --run: DIR/simplify/{setting}-<task>)")


def output_folder(args: argparse.Namespace, folder: RunFolder | None, setting: str, task: str) -> str:
    return path_argument(args.out, folder, lambda f: f.simplify(setting, task), "--out")


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation inputs joint training and the audit share (pipeline/simplebits/outcomes.py)."""
    parser.add_argument("--independent", metavar="WEIGHTS",
                        help="independent check classifier trained on originals, a file or an MLflow "
                             "models:/ or runs:/ URI (default: the run's "
                             "classifier/<task>-independent/ with --run, else train one)")
    parser.add_argument("--masks", help="ground-truth masks folder (demo cohort: <run>/cohort/masks, the "
                                        "default with --run where it exists)")


def independent_path(args: argparse.Namespace, folder: RunFolder | None, config: Any) -> str | None:
    """``--independent``, else (unless the config names one) the run's check classifier of the task."""
    if args.independent or config.independent.path or not config.independent.enabled:
        return args.independent
    return run_default(folder, lambda f: f.independent_weights(config.task))


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
    add_input_arguments(parser)
    parser.add_argument("--task", type=task_argument, metavar="TASK",
                        help="label to keep: any registered task (default: config task)")
    parser.add_argument("--classifier", action="append", default=[], metavar="WEIGHTS",
                        help="frozen classifier: package .safetensors, state_dict .pt/.pth/.safetensors, or "
                             "TorchScript, or an MLflow models:/NAME/VERSION or runs:/ URI; repeat for an ensemble "
                             "(default with --run: DIR/classifier/<task>/)")
    add_classifier_arguments(parser, arch_per_classifier=True)
    add_prior_argument(parser)
    add_check_arguments(parser)
    parser.add_argument("--per-study", metavar="STUDY_ID", help="audit one study by direct optimisation")
    add_out_argument(parser, "audit")
    parser.add_argument("--force", action="store_true", help="redo even if metrics.json exists")
    add_register_argument(parser)
    add_config_arguments(parser, "simplify_audit")
    parser.set_defaults(func=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    from pipeline.simplebits.audit import AuditConfig, ClassifierSpec, audit_command, audit_study_command

    folder = run_folder(args)
    config = stage_config_from_args(AuditConfig, args, "audit", task=args.task,
                                    **{"tracking.register_as": args.register})
    config = with_run_tracking(config.model_copy(update={
        "prior": args.prior or config.prior or run_default(folder, lambda f: f.prior_weights)}), folder)
    if not args.classifier and not config.classifiers and folder is not None:
        args.classifier = [path_argument(None, folder, lambda f: f.classifier_weights(config.task), "--classifier")]
    if args.classifier:
        archs = args.classifier_arch or [None]
        if len(archs) == 1:
            archs = archs * len(args.classifier)
        if len(archs) != len(args.classifier):
            raise UserError(f"--classifier-arch: give one name for all or one per --classifier "
                            f"({len(args.classifier)}), got {len(archs)}")
        declared = {"kwargs": classifier_kwargs(args) or {}, "adapter": adapter_overrides(args) or {}}
        config = config.model_copy(update={"classifiers": [ClassifierSpec(path=p, name=a, **declared)
                                                           for p, a in zip(args.classifier, archs)]})
    config = with_independent(config, independent_path(args, folder, config))
    config = with_local_weights(config, {"--prior": "prior", "--independent": "independent.path"})
    config = config.model_copy(update={"classifiers": [
        spec.model_copy(update={"path": local_weights(spec.path, "--classifier", config.tracking.uri)})
        for spec in config.classifiers]})
    if not config.classifiers:
        raise UserError("simplify audit: give the frozen classifier with --classifier "
                        "(or classifiers: in the config)")
    ingest = path_argument(args.ingest, folder, lambda f: f.ingest, "--ingest")
    out = output_folder(args, folder, "audit", config.task)
    if args.per_study:
        summary = audit_study_command(ingest, out, args.per_study, config)
    else:
        summary = audit_command(ingest, out, config, force=args.force,
                                mask_dir=args.masks or run_default(folder, lambda f: f.masks))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=float))
    return 0


def register_condense(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "condense",
        help="setting (b): dataset condensation by gradient matching plus bpd",
        description="Setting (b). --set condense.lam=[0,10000] runs a sweep with one lam-<value>/ folder each.",
    )
    add_input_arguments(parser)
    parser.add_argument("--task", type=task_argument, metavar="TASK",
                        help="label to condense: any registered task (default: config task)")
    add_prior_argument(parser)
    parser.add_argument("--ipc", type=int, choices=(1, 10), help="synthetic images per class")
    add_out_argument(parser, "condense")
    parser.add_argument("--force", action="store_true", help="redo even if metrics.json exists")
    add_config_arguments(parser, "simplify_condense")
    parser.set_defaults(func=run_condense)


def run_condense(args: argparse.Namespace) -> int:
    from pipeline.simplebits.condense import CondenseConfig, condense_command

    folder = run_folder(args)
    config = config_from_args(CondenseConfig, args, task=args.task, **{"condense.ipc": args.ipc})
    config = with_run_tracking(config.model_copy(update={
        "prior": args.prior or config.prior or run_default(folder, lambda f: f.prior_weights)}), folder)
    config = with_local_weights(config, {"--prior": "prior"})
    summaries = condense_command(path_argument(args.ingest, folder, lambda f: f.ingest, "--ingest"),
                                 output_folder(args, folder, "condense", config.task), config, force=args.force)
    print(json.dumps([{k: v for k, v in s.items() if k != "history"} for s in summaries], indent=2))
    return 0
