"""What every explanation explains: the classifier's log-odds of the positive class, one number per image.

Classifiers return logits ``(N, 2)`` with P(positive) = softmax[:, 1] (ARCHITECTURE.md). The
log-odds ``logit_1 − logit_0`` is the logit of that probability, so it is the one scalar the
decision depends on; a single class logit is not (softmax ignores a shift common to both). Every
method attributes this scalar, so their maps are comparable and IG's completeness reads
``Σ attributions = log-odds(x) − log-odds(baseline)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.runtime.device import autocast

POSITIVE, NEGATIVE = 1, 0

BaselineKind = Literal["black", "mean"]


class TaskLogit(nn.Module):
    """``(N, 1, H, W)`` images in ``[0, 1]`` -> ``(N,)`` float32 log-odds of the positive class.

    ``bf16``: run the classifier under bf16 autocast on CUDA (a no-op on CPU). The output is
    float32 either way, so that sums over many attribution steps do not round.
    """

    def __init__(self, classifier: nn.Module, bf16: bool = True) -> None:
        super().__init__()
        self.classifier = classifier
        self.bf16 = bf16

    def forward(self, x01: Tensor) -> Tensor:
        with autocast(x01.device, enabled=self.bf16):
            logits = self.classifier(x01)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"classifier must return logits (N, 2), got {tuple(logits.shape)}")
        logits = logits.float()
        return logits[:, POSITIVE] - logits[:, NEGATIVE]


def baseline_images(x01: Tensor, kind: BaselineKind) -> Tensor:
    """The reference image of IG and the fill of occlusion: black, or each image's mean grey.

    Black (0) is Captum's default and the literature's; a flat mean grey adds no dark edge where a
    patch is occluded, which matters for a classifier that reacts to edges.
    """
    if kind == "black":
        return torch.zeros_like(x01)
    if kind == "mean":
        return x01.mean(dim=(1, 2, 3), keepdim=True).expand_as(x01).contiguous()
    raise ValueError(f"baseline must be 'black' or 'mean', got {kind!r}")
