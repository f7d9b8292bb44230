"""``simplebits explain``: Integrated Gradients, occlusion, Grad-CAM and latent shift maps per study."""

from __future__ import annotations

import argparse
import json

from pipeline.classifier_args import add_classifier_arguments, adapter_overrides, classifier_kwargs
from pipeline.config import add_config_arguments, config_from_args
from pipeline.errors import UserError
from pipeline.run_folder import RunFolder, add_run_argument, path_argument, run_default, run_folder
from pipeline.runtime.model_uri import with_local_weights

DESCRIPTION = """\
Explain a classifier's decisions on the studies of an ingest folder with the methods a researcher
would otherwise run: Integrated Gradients and occlusion (Captum), Grad-CAM (Captum LayerGradCam)
and latent shift (Cohen et al., "Gifsplanation"), here in the Glow prior's latent space, which
reconstructs each image exactly. Every method explains the log-odds of the task's positive class.

Writes OUT/<study_id>/<method>.npy (float32 map at working resolution) and <method>.png (overlay),
OUT/maps.csv (one row per map: label, log-odds, seconds per study, method numbers) and
OUT/config.resolved.yaml. Re-running skips maps already written; adding a method computes only it.

With --run DIR (and --task) the run folder gives what is not named: DIR/ingest, the task's
classifier DIR/classifier/<task>/, the run's prior and OUT = DIR/explain/<task>, where
`simplebits report` puts the maps beside the simplified images.
"""


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="saliency maps (IG, occlusion, Grad-CAM) and latent-shift counterfactuals per study (resumable)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ingest", help="ingest folder (from simplebits ingest; default with --run: DIR/ingest)")
    add_run_argument(parser)
    parser.add_argument("--classifier",
                        help="classifier: package .safetensors (with its .json), state_dict "
                             ".pt/.pth/.safetensors, or TorchScript (default with --run: DIR/classifier/<task>/)")
    add_classifier_arguments(parser)
    parser.add_argument("--prior", help="Glow prior .safetensors for latent_shift (default: the run's prior "
                                        "with --run, else the shipped one)")
    parser.add_argument("--task", help="task whose positive class is explained (default: the classifier's "
                                       ".json; needed with --run unless --classifier and --out are given)")
    parser.add_argument("--methods", type=_methods,
                        help="comma-separated subset of ig,occlusion,gradcam,latent_shift (default: all)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="only this split (default: all)")
    parser.add_argument("--limit", type=int, help="only the first N studies (manifest order)")
    parser.add_argument("--out", help="output folder (default with --run: DIR/explain/<task>)")
    parser.add_argument("--batch-size", type=int, help="studies per batch (default: config, 16)")
    parser.add_argument("--device", help="auto | cpu | cuda (default: config, auto)")
    add_config_arguments(parser, "explain")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # imported when the command runs, so that `simplebits --help` stays fast
    from pipeline.explain.run import ExplainConfig, run_explain

    config = config_from_args(
        ExplainConfig, args, ingest=args.ingest, classifier=args.classifier, prior=args.prior, task=args.task,
        methods=args.methods, split=args.split, limit=args.limit, out=args.out, batch_size=args.batch_size,
        device=args.device, classifier_arch=args.classifier_arch, classifier_kwargs=classifier_kwargs(args),
        classifier_adapter=adapter_overrides(args),
    )
    config = in_run_folder(config, run_folder(args))
    config = with_local_weights(config, {"--classifier": "classifier", "--prior": "prior"})
    print(json.dumps(run_explain(config), indent=2))
    return 0


def in_run_folder(config, folder: RunFolder | None):
    """``config`` with what it leaves open taken from the run folder's layout (``--run``): its ingest
    folder, the task's classifier, the run's prior (where it has one) and ``explain/<task>``."""
    if folder is None:
        return config
    task = config.task
    if task is None and (config.classifier is None or config.out is None):
        raise UserError("explain --run: give --task (which classifier/<task> of the run to explain, and "
                        "where: explain/<task>)")
    return config.model_copy(update={
        "ingest": path_argument(config.ingest, folder, lambda f: f.ingest, "--ingest"),
        "classifier": path_argument(config.classifier, folder, lambda f: f.classifier_weights(task), "--classifier"),
        "prior": config.prior or run_default(folder, lambda f: f.prior_weights),
        "out": path_argument(config.out, folder, lambda f: f.explain(task), "--out"),
    })
