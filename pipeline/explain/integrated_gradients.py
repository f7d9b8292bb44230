"""Integrated Gradients (Sundararajan et al. 2017) with Captum's ``IntegratedGradients``."""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients
from pydantic import Field
from torch import Tensor

from pipeline.config import StrictModel
from pipeline.explain.result import Explanation
from pipeline.explain.target import BaselineKind, TaskLogit, baseline_images


class IntegratedGradientsConfig(StrictModel):
    # Captum's default is 50; Gauss-Legendre steps converge fast: at 32 the convergence delta was
    # 0.004-0.008 log-odds on the demo run's effusion classifier (log-odds differences of 0.1-5.8)
    steps: int = Field(32, ge=1)
    # images x steps per forward pass: always set, CheXNet-sized models run out of memory without
    # it (Captum issue #538)
    internal_batch_size: int = Field(256, ge=1)


def integrated_gradients(task_logit: TaskLogit, x01: Tensor, config: IntegratedGradientsConfig,
                         baseline: BaselineKind = "black") -> Explanation:
    """Signed attributions whose sum is the log-odds of ``x01`` minus that of the baseline image.

    ``extras["convergence_delta"]``: Captum's completeness error per image (sum of attributions minus
    the log-odds difference), the check that ``steps`` was enough.
    """
    attributions, delta = IntegratedGradients(task_logit).attribute(
        x01, baselines=baseline_images(x01, baseline), n_steps=config.steps,
        internal_batch_size=config.internal_batch_size, return_convergence_delta=True)
    with torch.no_grad():
        logit = task_logit(x01)
    return Explanation(attributions[:, 0].float().cpu(), logit.cpu(),
                       {"convergence_delta": delta.float().cpu()})
