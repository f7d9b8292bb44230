"""The command-line flags that say how to read a classifier file (``simplify audit``/``train``, ``apply``).

They override the side-car JSON next to the weights (pipeline/models/classifiers.py for the files
accepted, pipeline/models/adapter.py for the adapter's fields).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.errors import UserError

INTENSITY_HELP = ("input intensity the network expects: unit ([0,1], default without a side-car), imagenet, "
                  "mean_std:MEAN:STD (comma lists, e.g. mean_std:0.5:0.25), "
                  "range:LOW:HIGH (e.g. range:-1024:1024)")


def add_classifier_arguments(parser: argparse.ArgumentParser, arch_per_classifier: bool = False) -> None:
    """``--classifier-arch`` and the adapter flags. ``arch_per_classifier``: ``--classifier-arch`` may be
    repeated, one per ``--classifier`` (the audit's ensemble); the other flags apply to every one."""
    arch_help = ("network of the weights: a registered name (e.g. monai_densenet121) or MODULE:FUNCTION "
                 "(default: the side-car .json next to the weights)")
    if arch_per_classifier:
        parser.add_argument("--classifier-arch", action="append", default=[], metavar="NAME",
                            help=arch_help + "; one for all, or one per --classifier")
    else:
        parser.add_argument("--classifier-arch", metavar="NAME", help=arch_help)
    parser.add_argument("--classifier-kwargs", metavar="JSON",
                        help='network keyword arguments, e.g. \'{"init_features": 8}\'')
    parser.add_argument("--classifier-input-size", metavar="N|HxW",
                        help="input size the network expects; images are resized (bilinear, differentiable)")
    parser.add_argument("--classifier-channels", type=int, choices=(1, 3),
                        help="input channels the network expects (3: the grey image repeated)")
    parser.add_argument("--classifier-intensity", metavar="KIND", help=INTENSITY_HELP)
    parser.add_argument("--classifier-output", metavar="KIND",
                        help="what the network returns: softmax2 (2 logits), logit (1 logit), "
                             "sigmoid:INDEX or sigmoid:NAME (multi-label head; NAME needs output_names in the "
                             "side-car)")


def classifier_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--classifier-kwargs`` as a dict (None when not given)."""
    if not args.classifier_kwargs:
        return None
    try:
        value = json.loads(args.classifier_kwargs)
    except json.JSONDecodeError as err:
        raise UserError(f"--classifier-kwargs: not valid JSON ({err}): {args.classifier_kwargs!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"--classifier-kwargs: expected a JSON object, got {args.classifier_kwargs!r}")
    return value


def adapter_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """The adapter fields given on the command line (None when none is given)."""
    from pipeline.models.adapter import parse_input_size, parse_intensity, parse_output

    fields: dict[str, Any] = {}
    if args.classifier_input_size:
        fields.update(parse_input_size(args.classifier_input_size))
    if args.classifier_channels:
        fields["channels"] = args.classifier_channels
    if args.classifier_intensity:
        fields.update(parse_intensity(args.classifier_intensity))
    if args.classifier_output:
        fields.update(parse_output(args.classifier_output))
    return fields or None
