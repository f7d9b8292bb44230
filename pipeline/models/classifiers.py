"""Classifier registry: ``create_classifier(name)`` builds a network, ``load_classifier`` restores one.

Every classifier takes ``(N, 1, H, W)`` images in ``[0, 1]`` and returns logits ``(N, num_classes)``;
input normalisation is part of the model so that callers never have to know a dataset's statistics.

The default, ``nf_wrn_16_2``, is the normaliser-free Wide-ResNet-16-2 of SimpleBits (Gen-1): no
BatchNorm, so a forward pass depends on each example alone. That keeps per-example losses, the
differentiable one-step look-ahead of joint training and gradient matching well defined. It learns the
demo cohort's effusions but hardly its sex feature (soft breast shadows), for which the batch-free
``monai_resnet18_gn`` (GroupNorm) is the run's default (``configs/run.yaml``, ``task_overrides``).

Saved models are ``<stem>.safetensors`` plus ``<stem>.json`` (``{name, kwargs, ...}``), so a model can be
rebuilt without pickles. Models trained elsewhere load from a state_dict given the network name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.runtime.atomic import atomic_path, atomic_write_text
from pipeline.runtime.checkpoint import unwrap

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Placeholder radiograph statistics, as the paper uses for MIMIC-CXR (mean 0.2, std 0.3).
DEFAULT_MEAN = 0.2
DEFAULT_STD = 0.3


def register_classifier(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory ``fn(num_classes=2, **kwargs) -> nn.Module`` under its name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"classifier {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_classifiers() -> list[str]:
    return sorted(_REGISTRY)


def create_classifier(name: str, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown classifier {name!r}; available: {', '.join(list_classifiers())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------
# Building blocks


class Normalize(nn.Module):
    """``(x - mean) / std`` with fixed scalars; the model owns its input normalisation."""

    def __init__(self, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ScaledStdConv2d(nn.Conv2d):
    """Conv with scaled weight standardisation and a learnable per-output-channel gain (NF-ResNets).

    The weight is standardised per output channel and scaled by ``gain / sqrt(fan_in)``, so the
    activations keep unit variance without any batch statistics.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, bias: bool = True, eps: float = 1e-6) -> None:
        padding = kernel_size // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1))
        self.eps = eps
        nn.init.xavier_uniform_(self.weight, gain=math.sqrt(2.0))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def standardized_weight(self) -> torch.Tensor:
        fan_in = self.weight[0].numel()
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self.gain * (self.weight - mean) / torch.sqrt(var * fan_in + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


class GammaActivation(nn.Module):
    """A nonlinearity times the gain that keeps unit-Gaussian inputs at unit variance (NF-Nets).

    ``elu`` (x1.2716, Gen-1) or ``shifted_softplus`` (softplus(x) - softplus(0), Gen-2).
    """

    GAMMAS = {"elu": 1.2716, "shifted_softplus": 1.9203}

    def __init__(self, kind: str = "elu") -> None:
        super().__init__()
        if kind not in self.GAMMAS:
            raise ValueError(f"unknown activation {kind!r}; choose from {sorted(self.GAMMAS)}")
        self.kind = kind
        self.gamma = self.GAMMAS[kind]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elu":
            return F.elu(x) * self.gamma
        return (F.softplus(x) - math.log(2.0)) * self.gamma


class NFBlock(nn.Module):
    """Wide-ResNet basic block without normalisation: ``shortcut(x) + alpha * conv(act(conv(act(x))))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str,
                 dropout: float, alpha: float) -> None:
        super().__init__()
        self.act1 = GammaActivation(activation)
        self.conv1 = ScaledStdConv2d(in_channels, out_channels, 3, stride=stride)
        self.dropout = nn.Dropout(dropout)
        self.act2 = GammaActivation(activation)
        self.conv2 = ScaledStdConv2d(out_channels, out_channels, 3)
        self.alpha = alpha
        self.shortcut = (
            ScaledStdConv2d(in_channels, out_channels, 1, stride=stride)
            if stride != 1 or in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(x))
        out = self.conv2(self.act2(self.dropout(out)))
        return self.shortcut(x) + self.alpha * out


class NFWideResNet(nn.Module):
    """Normaliser-free Wide-ResNet (depth ``6n+4``, widen factor ``k``), global average pool, linear head.

    ``stem_stride=2`` halves the resolution in the first conv: at 64x64 the network then works at the
    paper's 32x32 feature size for a quarter of the compute.
    """

    def __init__(self, depth: int = 16, widen_factor: int = 2, num_classes: int = 2, in_channels: int = 1,
                 dropout: float = 0.3, activation: str = "elu", alpha: float = 0.2, stem_stride: int = 1,
                 mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.stem = ScaledStdConv2d(in_channels, widths[0], 3, stride=stem_stride)
        layers: list[nn.Module] = []
        in_width = widths[0]
        for stage, width in enumerate(widths[1:]):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(NFBlock(in_width, width, stride, activation, dropout, alpha))
                in_width = width
        self.blocks = nn.Sequential(*layers)
        self.final_act = GammaActivation(activation)
        self.head = nn.Linear(in_width, num_classes)
        nn.init.xavier_uniform_(self.head.weight, gain=math.sqrt(2.0))
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.final_act(self.blocks(self.stem(self.normalize(x))))
        return self.head(features.mean(dim=(2, 3)))


class NFConvNet(nn.Module):
    """A small normaliser-free CNN (tests, quick CPU runs): stride-2 scaled-std convs, pool, linear."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64),
                 activation: str = "elu", dropout: float = 0.0,
                 mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        in_width = in_channels
        for width in widths:
            layers += [ScaledStdConv2d(in_width, width, 3, stride=2), GammaActivation(activation)]
            in_width = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(self.normalize(x)).mean(dim=(2, 3))
        return self.head(self.dropout(features))


class NormalizedClassifier(nn.Module):
    """Any ``(N,1,H,W) -> (N,K)`` network behind the shared input normalisation (MONAI networks)."""

    def __init__(self, net: nn.Module, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# --------------------------------------------------------------------------------------------------
# Registered networks


@register_classifier
def nf_wrn_16_2(num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """SimpleBits' default: normaliser-free Wide-ResNet-16-2 (ELU x1.2716, alpha 0.2, dropout 0.3)."""
    return NFWideResNet(depth=16, widen_factor=2, num_classes=num_classes, **kwargs)


@register_classifier
def nf_cnn(num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """Three stride-2 normaliser-free convs: fast enough for unit tests and CPU smoke runs."""
    return NFConvNet(num_classes=num_classes, **kwargs)


@register_classifier
def monai_densenet121(num_classes: int = 2, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD,
                      **kwargs: Any) -> nn.Module:
    """MONAI DenseNet-121 (2D, one input channel); uses BatchNorm, so not for look-ahead training."""
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes, **kwargs)
    return NormalizedClassifier(net, mean, std)


@register_classifier
def monai_resnet18(num_classes: int = 2, mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD,
                   **kwargs: Any) -> nn.Module:
    """MONAI ResNet-18 (2D, one input channel); uses BatchNorm, so not for look-ahead training."""
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_classes, **kwargs)
    return NormalizedClassifier(net, mean, std)


@register_classifier
def monai_resnet18_gn(num_classes: int = 2, widen_factor: float = 0.25, num_groups: int = 4,
                      mean: float = DEFAULT_MEAN, std: float = DEFAULT_STD, **kwargs: Any) -> nn.Module:
    """MONAI ResNet-18 with GroupNorm: batch-independent, so fit for look-ahead training.

    A quarter of the channels (16-128) is enough at 64 px and trains in about a second per epoch of
    560 studies on one CPU core.
    """
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_classes, widen_factor=widen_factor,
                   **kwargs)
    # MONAI 1.6.1's ResNet applies its ``norm`` argument to the stem only; its blocks keep BatchNorm
    return NormalizedClassifier(_batchnorm_to_groupnorm(net, num_groups), mean, std)


def _batchnorm_to_groupnorm(module: nn.Module, num_groups: int) -> nn.Module:
    """Every ``BatchNorm2d`` in ``module`` replaced, in place, by a fresh ``GroupNorm`` (weight 1, bias 0)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(min(num_groups, child.num_features), child.num_features))
        else:
            _batchnorm_to_groupnorm(child, num_groups)
    return module


# --------------------------------------------------------------------------------------------------
# Saving and loading


def save_classifier(model: nn.Module, path: str | Path, name: str, kwargs: dict[str, Any] | None = None,
                    **meta: Any) -> Path:
    """Write ``path`` (safetensors) and a sibling ``.json`` with ``{name, kwargs, **meta}``."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    record = {"name": name, "kwargs": kwargs or {}, **meta}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a torch file (``weights_only=True``: no arbitrary pickles).

    Also accepts a checkpoint dict with a ``state_dict``/``model`` entry and strips the ``module.``
    prefix that DataParallel/DDP adds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for foreign or pickled content
            raise ValueError(f"{path}: not a weights-only torch state_dict ({err})") from err
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: does not contain a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_classifier(path: str | Path, name: str | None = None, **kwargs: Any) -> nn.Module:
    """Rebuild a classifier from its weights, in eval mode.

    ``name``/``kwargs`` default to the sibling ``.json`` written by :func:`save_classifier`; pass them
    for a model trained elsewhere (the network must be registered and take ``(N,1,H,W)`` in [0,1]).
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if name is None:
        if not meta_path.is_file():
            raise ValueError(f"{path}: no {meta_path.name} next to it; pass the network name explicitly")
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["name"], {**meta.get("kwargs", {}), **kwargs}
    model = create_classifier(name, **kwargs)
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit classifier {name!r}: {err}") from err
    return model.eval()
