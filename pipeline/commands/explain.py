"""``simplebits explain``: Integrated Gradients, occlusion, Grad-CAM and latent shift maps per study."""

from __future__ import annotations

import argparse
import json

from pipeline.classifier_args import add_classifier_arguments, adapter_overrides, classifier_kwargs
from pipeline.config import add_config_arguments, config_from_args

DESCRIPTION = """\
Explain a classifier's decisions on the studies of an ingest folder with the methods a researcher
would otherwise run: Integrated Gradients and occlusion (Captum), Grad-CAM (Captum LayerGradCam)
and latent shift (Cohen et al., "Gifsplanation"), here in the Glow prior's latent space, which
reconstructs each image exactly. Every method explains the log-odds of the task's positive class.

Writes OUT/<study_id>/<method>.npy (float32 map at working resolution) and <method>.png (overlay),
OUT/maps.csv (one row per map: label, log-odds, seconds per study, method numbers) and
OUT/config.resolved.yaml. Re-running skips maps already written; adding a method computes only it.
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
    parser.add_argument("--ingest", required=True, help="ingest folder (from simplebits ingest)")
    parser.add_argument("--classifier", required=True,
                        help="classifier: package .safetensors (with its .json), state_dict "
                             ".pt/.pth/.safetensors, or TorchScript")
    add_classifier_arguments(parser)
    parser.add_argument("--prior", help="Glow prior .safetensors for latent_shift (default: the shipped one)")
    parser.add_argument("--task", help="task whose positive class is explained (default: the classifier's "
                                       ".json)")
    parser.add_argument("--methods", type=_methods,
                        help="comma-separated subset of ig,occlusion,gradcam,latent_shift (default: all)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="only this split (default: all)")
    parser.add_argument("--limit", type=int, help="only the first N studies (manifest order)")
    parser.add_argument("--out", required=True, help="output folder, e.g. reports/<run>/explain/<task>")
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
    print(json.dumps(run_explain(config), indent=2))
    return 0
