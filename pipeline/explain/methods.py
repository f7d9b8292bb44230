"""The explanation methods by name: each takes the models and a batch and returns an :class:`Explanation`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pipeline.explain.gradcam import gradcam
from pipeline.explain.integrated_gradients import integrated_gradients
from pipeline.explain.latent_shift import latent_shift
from pipeline.explain.occlusion import occlusion
from pipeline.explain.result import Explanation
from pipeline.explain.target import TaskLogit

if TYPE_CHECKING:
    from pipeline.explain.run import ExplainConfig


@dataclass
class Models:
    """What the methods explain (the classifier's log-odds) and with what (the Glow, for latent shift)."""

    task_logit: TaskLogit
    prior: nn.Module | None = None


Method = Callable[[Models, Tensor, "ExplainConfig"], Explanation]

METHODS: dict[str, Method] = {
    "ig": lambda models, x, config: integrated_gradients(models.task_logit, x, config.ig, config.baseline),
    "occlusion": lambda models, x, config: occlusion(models.task_logit, x, config.occlusion, config.baseline),
    "gradcam": lambda models, x, config: gradcam(models.task_logit, x, config.gradcam),
    "latent_shift": lambda models, x, config: latent_shift(models.task_logit, models.prior, x,
                                                           config.latent_shift),
}
NEEDS_PRIOR = frozenset({"latent_shift"})
