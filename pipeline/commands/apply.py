"""``simplebits apply``: a trained simplifier over a whole cohort, sharded over torchrun ranks, resumable."""

from __future__ import annotations

import argparse
import json

from pipeline.classifier_args import add_classifier_arguments, adapter_overrides, classifier_kwargs
from pipeline.config import add_config_arguments, config_from_args
from pipeline.run_folder import add_run_argument, path_argument, run_default, run_folder
from pipeline.runtime.model_uri import with_local_weights
from pipeline.tasks import task_argument

DESCRIPTION = """\
Simplify every study of an ingest folder (or one split) and score original and simplified images
(the models: files, or MLflow URIs models:/NAME/VERSION or runs:/RUN_ID/PATH):
P(positive) of the classifier, bits per dimension under the prior (midpoint dequantization) and
bits saved per study. Writes OUT/simplified/ (a cohort store: one uint8 slot per study),
OUT/parts/part-<rank>.csv, OUT/predictions.csv and OUT/metrics.json. Re-running skips finished
studies, also with another number of processes or nodes.

Several processes on one machine (one per GPU, or CPU processes with gloo):
  torchrun --standalone --nproc-per-node=N -m pipeline.cli apply --ingest DIR ...

Several machines (DIR and OUT on a file system every node mounts at the same path), e.g. two
nodes with 8 GPUs each: the same command on every node; NODE0 is node 0's address, the node that
hosts the rendezvous (the c10d backend assigns ranks itself; add --local-addr=THIS_NODE if the
nodes cannot resolve each other's host names):
  torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=NODE0:29400 \\
      --rdzv-id=apply-RUN -m pipeline.cli apply --ingest DIR ...
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "apply",
        help="simplify and score a cohort with trained models (torchrun-shardable, resumable)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ingest", help="ingest folder (from simplebits ingest; default with --run: DIR/ingest)")
    add_run_argument(parser)
    parser.add_argument("--simplifier", help="simplifier .safetensors (with its .json; default with --run: "
                                             "DIR/simplify/audit-<task>/)")
    parser.add_argument("--classifier", help="classifier: package .safetensors (with its .json), state_dict "
                                             ".pt/.pth/.safetensors, or TorchScript (default with --run: "
                                             "DIR/classifier/<task>/)")
    add_classifier_arguments(parser)
    parser.add_argument("--prior", help="prior .safetensors (default: config prior, else the run's prior with "
                                        "--run, else the shipped prior)")
    parser.add_argument("--out", help="output folder (default with --run: DIR/apply/<task>)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="only this split (default: all)")
    parser.add_argument("--task", type=task_argument, metavar="TASK",
                        help="label to score in metrics.json: any registered task (default: the task in the "
                             "classifier's .json); its label columns are carried in predictions.csv")
    parser.add_argument("--batch-size", type=int, help="studies per batch and rank (default: config, 64)")
    parser.add_argument("--num-workers", type=int,
                        help="DataLoader processes per rank reading the store ahead (default: config, 2)")
    parser.add_argument("--device", help="auto | cpu | cuda (default: config, auto)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    add_config_arguments(parser, "apply")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # imported when the command runs, so that `simplebits --help` stays fast
    from pipeline.inference import ApplyConfig, run_apply

    config = config_from_args(
        ApplyConfig, args, ingest=args.ingest, simplifier=args.simplifier, classifier=args.classifier,
        prior=args.prior, out=args.out, split=args.split, task=args.task, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, classifier_arch=args.classifier_arch,
        classifier_kwargs=classifier_kwargs(args), classifier_adapter=adapter_overrides(args),
        **{"tracking.enabled": False if args.no_mlflow else None},
    )
    config = in_run_folder(config, run_folder(args))
    config = with_local_weights(config, {"--simplifier": "simplifier", "--classifier": "classifier",
                                         "--prior": "prior"})
    summary = run_apply(config)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def in_run_folder(config, folder):
    """``config`` with what it leaves open taken from the run folder's layout (``--run``): the
    task's classifier and audit simplifier, the run's prior, ``apply/<task>`` and the run's MLflow store."""
    if folder is None:
        return config
    from pipeline.errors import UserError
    from pipeline.run_folder import with_run_tracking

    if config.task is None and (config.classifier is None or config.simplifier is None or config.out is None):
        raise UserError("apply --run: give --task (which classifier/<task> and simplify/audit-<task> of the run)")
    task = config.task
    return with_run_tracking(config.model_copy(update={
        "ingest": path_argument(config.ingest, folder, lambda f: f.ingest, "--ingest"),
        "classifier": path_argument(config.classifier, folder, lambda f: f.classifier_weights(task), "--classifier"),
        "simplifier": path_argument(config.simplifier, folder,
                                    lambda f: f.simplify("audit", task) / "simplifier.safetensors", "--simplifier"),
        "prior": config.prior or run_default(folder, lambda f: f.prior_weights),
        "out": path_argument(config.out, folder, lambda f: f.apply(task), "--out"),
    }), folder)
