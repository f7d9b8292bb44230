"""Throughput of post-hoc explanations, side by side in one run: studies per second for

- amortized SimpleBits simplification (one simplifier forward pass per study),
- per-study SimpleBits optimisation (``simplify_study``; ``--steps`` Adam steps on logit pixels),
- Captum Integrated Gradients (``--ig-steps`` interpolation steps) on the same classifier,

at 64x64 and 128x128 (or ``--sizes``). Weights are untrained: throughput does not depend on them.
Prints one table and the ratios amortized / per-study and amortized / IG.

    OMP_NUM_THREADS=1 python benchmarks/simplify.py --sizes 64 128 --studies 16 --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.classifiers import create_classifier
from pipeline.models.glow import Glow
from pipeline.models.simplifier import create_simplifier
from pipeline.prior import SHIPPED_PRIOR, load_prior
from pipeline.runtime.device import autocast, pick_device
from pipeline.simplebits.audit import AuditConfig, simplify_study


def timed(fn, repeats: int = 1) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` in seconds (CUDA synchronised)."""
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def prior_for(device: torch.device) -> torch.nn.Module:
    if SHIPPED_PRIOR.is_file():
        return load_prior(device=device)
    return Glow(levels=4, steps_per_level=6, hidden_channels=64).eval().requires_grad_(False).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--studies", type=int, default=16, help="studies per amortized / IG batch")
    parser.add_argument("--steps", type=int, default=20, help="per-study optimisation steps")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--classifier", default="nf_wrn_16_2")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from captum.attr import IntegratedGradients

    device = pick_device(args.device)
    torch.manual_seed(0)
    classifier = (
        create_classifier(args.classifier, stem_stride=2, dropout=0.0).to(device).eval().requires_grad_(False)
    )
    simplifier = create_simplifier(base_channels=16, levels=4, max_channels=128).to(device).eval()
    with torch.no_grad():
        simplifier.alpha.fill_(0.1)  # not the identity shortcut: the U-Net output is used
    prior = prior_for(device)
    config = AuditConfig.model_validate(
        {"device": str(device), "per_study": {"steps": args.steps}, "tracking": {"enabled": False}}
    )
    ig = IntegratedGradients(classifier)
    print(
        f"device {device}, threads {torch.get_num_threads()}, classifier {args.classifier}, "
        f"per-study steps {args.steps}, IG steps {args.ig_steps}"
    )
    print(
        f"{'size':>5} {'amortized/s':>12} {'per-study/s':>12} {'IG/s':>10} "
        f"{'amort/per-study':>16} {'amort/IG':>10}"
    )
    for size in args.sizes:
        x = torch.rand(args.studies, 1, size, size, device=device)

        def amortized() -> None:
            with torch.no_grad(), autocast(device):
                simplifier(x)

        def per_study() -> None:
            simplify_study(x[:1], classifier, prior, config)

        def integrated_gradients() -> None:
            with autocast(device):
                target = classifier(x).argmax(1)
            ig.attribute(x, target=target, n_steps=args.ig_steps, internal_batch_size=args.ig_steps)

        amortized()  # warm-up
        rate_amortized = args.studies / timed(amortized, repeats=3)
        rate_per_study = 1.0 / timed(per_study, repeats=2)
        rate_ig = args.studies / timed(integrated_gradients, repeats=2)
        print(
            f"{size:>5} {rate_amortized:>12.2f} {rate_per_study:>12.3f} {rate_ig:>10.2f} "
            f"{rate_amortized / rate_per_study:>16.0f} {rate_amortized / rate_ig:>10.1f}"
        )


if __name__ == "__main__":
    main()
