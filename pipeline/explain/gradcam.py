"""Grad-CAM (Selvaraju et al. 2017) with Captum's ``LayerGradCam``, upsampled to the input's size.

Grad-CAM needs a convolutional layer. By default it takes the classifier's last module whose output
is still a spatial feature map (4-D, more than one pixel), found by one traced forward pass: for a
global-pooling network (every classifier in the registry, MONAI's included) that is the last
feature map before the pooling, the layer Grad-CAM was defined on. Name another with ``layer``
(a name from ``classifier.named_modules()``, e.g. ``net.layer4`` of a MONAI ResNet; the default
finds that one, and ``net.class_layers.relu`` of a MONAI DenseNet, MONAI's own recommendation).

The upsampling is Captum's and MONAI's (bilinear, cell centres at ``(j + 0.5) · stride``). Networks
whose stride-2 convolutions pad by one place cell ``j``'s centre at ``j · stride`` instead, so their
maps sit up to half a cell down and right of the evidence (3.5 px for the 8 px cells of ``nf_cnn``
at 32 px); that is what a user of either library gets, and is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import Tensor, nn

from pipeline.config import StrictModel
from pipeline.errors import UserError
from pipeline.explain.result import Explanation
from pipeline.explain.target import TaskLogit


class GradCamConfig(StrictModel):
    layer: str | None = None  # a module name of the classifier; None: the last spatial feature map


def last_feature_layer(model: nn.Module, x01: Tensor) -> str:
    """Name of the last module (in the order modules finish) whose output is a feature map > 1 px."""
    finished: list[str] = []

    def record(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor) and output.ndim == 4 and output.shape[-2:].numel() > 1:
                finished.append(name)
        return hook

    if any(isinstance(module, torch.jit.ScriptModule) for module in model.modules()):
        raise UserError("Grad-CAM hooks a layer of the classifier, and a TorchScript classifier's layers cannot "
                        "be hooked; use ig, occlusion or latent_shift for it")
    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(x01[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise UserError(f"Grad-CAM: {type(model).__name__} has no layer with a spatial feature map; "
                        "use another method")
    return finished[-1]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise UserError(f"gradcam.layer {name!r} is not a module of the classifier "
                        f"({type(model).__name__}); see classifier.named_modules()")
    return modules[name]


def gradcam(task_logit: TaskLogit, x01: Tensor, config: GradCamConfig) -> Explanation:
    """Non-negative maps (ReLU of the gradient-weighted feature maps), bilinearly upsampled."""
    name = config.layer or last_feature_layer(task_logit.classifier, x01)
    layer = find_layer(task_logit.classifier, name)
    cams = LayerGradCam(task_logit, layer).attribute(x01, relu_attributions=True)
    maps = F.interpolate(cams.detach().float(), size=x01.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        logit = task_logit(x01)
    return Explanation(maps[:, 0].cpu(), logit.cpu())
