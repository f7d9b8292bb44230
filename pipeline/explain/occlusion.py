"""Occlusion (Zeiler & Fergus 2014) with Captum's ``Occlusion``: the log-odds drop when a patch is filled."""

from __future__ import annotations

import torch
from captum.attr import Occlusion
from pydantic import Field
from torch import Tensor

from pipeline.config import StrictModel
from pipeline.explain.result import Explanation
from pipeline.explain.target import BaselineKind, TaskLogit, baseline_images


class OcclusionConfig(StrictModel):
    # patch side and step as fractions of the image side, so one setting serves every working
    # resolution: 8 px patches every 4 px at 64 px
    window_fraction: float = Field(0.125, gt=0, le=1)
    stride_fraction: float = Field(0.0625, gt=0, le=1)
    perturbations_per_eval: int = Field(16, ge=1)  # occluded copies per forward pass (per image)


def occlusion(task_logit: TaskLogit, x01: Tensor, config: OcclusionConfig,
              baseline: BaselineKind = "black") -> Explanation:
    """Per pixel, the mean log-odds drop over the patches that cover it (positive: evidence for)."""
    height, width = x01.shape[-2:]
    def pixels(fraction: float) -> tuple[int, int, int]:
        return 1, max(1, round(fraction * height)), max(1, round(fraction * width))

    window, stride = pixels(config.window_fraction), pixels(config.stride_fraction)
    with torch.no_grad():
        maps = Occlusion(task_logit).attribute(
            x01, sliding_window_shapes=window, strides=stride, baselines=baseline_images(x01, baseline),
            perturbations_per_eval=config.perturbations_per_eval)
        logit = task_logit(x01)
    return Explanation(maps[:, 0].float().cpu(), logit.cpu())
