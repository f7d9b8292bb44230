"""Classifier registry and files: ``create_classifier(name)`` builds one, ``load_classifier`` restores any.

Every classifier the pipeline uses is an :class:`~pipeline.models.adapter.AdaptedClassifier`: a network
behind its declared input/output adapter (pipeline/models/adapter.py), called with ``(N, 1, H, W)``
images in ``[0, 1]`` and returning two-class logits ``(N, 2)``. The registered networks here are bare
(no input normalisation of their own); this package's classifiers are trained behind
:data:`~pipeline.models.adapter.PACKAGE_ADAPTER` (``(x - 0.2) / 0.3``), which their side-car records.

The default, ``nf_wrn_16_2``, is the normaliser-free Wide-ResNet-16-2 of SimpleBits (Gen-1): no
BatchNorm, so a forward pass depends on each example alone. That keeps per-example losses, the
differentiable one-step look-ahead of joint training and gradient matching well defined. It learns the
demo cohort's effusions but hardly its sex feature (soft breast shadows), for which the batch-free
``monai_resnet18_gn`` (GroupNorm) is the sex task's network (``pipeline/tasks.py``, its ``settings``).

What ``load_classifier`` (and so ``--classifier``, ``--classifier-init``, ``--independent``) accepts:

- a package checkpoint: ``<stem>.safetensors`` plus ``<stem>.json``
  ``{"name", "kwargs", "adapter", ...}`` (:func:`save_classifier`); a side-car without ``"adapter"``
  was written before adapters were recorded and gets the package adapter;
- a plain ``state_dict`` (``.pt``/``.pth``/``.safetensors``, optionally inside ``{"state_dict": ...}``)
  of a registered network, with or without a key prefix (``module.``, ``model.``, ``net.``, ...);
- a TorchScript file (``torch.jit.load``), audit and scoring only;
- weights for any network built by a ``"module:function"`` factory (called with ``kwargs``).

The network name, kwargs and adapter come from the side-car JSON next to the weights (same stem) or from
the command line (``--classifier-arch``, ``--classifier-kwargs``, ``--classifier-input-size``,
``--classifier-channels``, ``--classifier-intensity``, ``--classifier-output``), which wins. A foreign
side-car, e.g. for a 3-output network at 96 px with ImageNet normalisation::

    {"name": "my_models.chest:build", "kwargs": {"outputs": 3},
     "adapter": {"input_size": [96, 96], "channels": 3, "intensity": "mean_std",
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "output": "sigmoid", "output_index": 1}}
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pipeline.errors import UserError
from pipeline.models.adapter import FOREIGN_DEFAULT, PACKAGE_ADAPTER, AdaptedClassifier, AdapterSpec, merged
from pipeline.models.state_dicts import fit_state_dict, read_state_dict
from pipeline.runtime.atomic import atomic_path, atomic_write_text
from pipeline.runtime.checkpoint import unwrap

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_classifier(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory ``fn(num_classes=2, in_channels=1, **kwargs) -> nn.Module`` (a bare
    network: its input convention belongs to the adapter) under its name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"classifier {fn.__name__!r} is already registered")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_classifiers() -> list[str]:
    return sorted(_REGISTRY)


def create_network(name: str, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """The bare registered network ``name`` (no adapter)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown classifier {name!r}; available: {', '.join(list_classifiers())}")
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def create_classifier(name: str, num_classes: int = 2, **kwargs: Any) -> AdaptedClassifier:
    """A new package classifier: registered network ``name`` behind the package adapter."""
    net = create_network(name, num_classes=num_classes, **kwargs)
    return AdaptedClassifier(net, PACKAGE_ADAPTER, recipe={"name": name, "kwargs": kwargs}, source=name)


# --------------------------------------------------------------------------------------------------
# Building blocks


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
                 dropout: float = 0.3, activation: str = "elu", alpha: float = 0.2,
                 stem_stride: int = 1) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide-ResNet depth must be 6n+4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
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
        features = self.final_act(self.blocks(self.stem(x)))
        return self.head(features.mean(dim=(2, 3)))


class NFConvNet(nn.Module):
    """A small normaliser-free CNN (tests, quick CPU runs): stride-2 scaled-std convs, pool, linear."""

    def __init__(self, num_classes: int = 2, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64),
                 activation: str = "elu", dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_width = in_channels
        for width in widths:
            layers += [ScaledStdConv2d(in_width, width, 3, stride=2), GammaActivation(activation)]
            in_width = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(in_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x).mean(dim=(2, 3))
        return self.head(self.dropout(features))


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
def monai_densenet121(num_classes: int = 2, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """MONAI DenseNet-121 (2D); uses BatchNorm, so not for look-ahead training. Its state_dict keys are
    MONAI's own (``features.*``, ``class_layers.*``): a plain MONAI state_dict loads as it is."""
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, **kwargs)


@register_classifier
def monai_resnet18(num_classes: int = 2, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """MONAI ResNet-18 (2D); uses BatchNorm, so not for look-ahead training."""
    from monai.networks.nets import resnet18

    return resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, **kwargs)


@register_classifier
def monai_resnet18_gn(num_classes: int = 2, in_channels: int = 1, widen_factor: float = 0.25,
                      num_groups: int = 4, **kwargs: Any) -> nn.Module:
    """MONAI ResNet-18 with GroupNorm: batch-independent, so fit for look-ahead training.

    A quarter of the channels (16-128) is enough at 64 px and trains in about a second per epoch of
    560 studies on one CPU core.
    """
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes,
                   widen_factor=widen_factor, **kwargs)
    # MONAI 1.6.1's ResNet applies its ``norm`` argument to the stem only; its blocks keep BatchNorm
    return _batchnorm_to_groupnorm(net, num_groups)


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


def save_classifier(model: nn.Module, path: str | Path, name: str | None = None,
                    kwargs: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Write ``path`` (safetensors of the bare network) and a sibling ``.json`` with
    ``{name, kwargs, adapter, **meta}``; ``name``/``kwargs`` default to the model's own recipe."""
    path = Path(path)
    model = unwrap(model)
    if not isinstance(model, AdaptedClassifier) or model.recipe is None:
        raise TypeError("save_classifier needs a classifier built by create_classifier or load_classifier "
                        "from weights (not TorchScript)")
    name = name or model.recipe["name"]
    kwargs = model.recipe["kwargs"] if kwargs is None else kwargs
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    record = {"name": name, "kwargs": kwargs, "adapter": model.adapter.model_dump(mode="json"), **meta}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    return path


def read_sidecar(path: Path) -> dict[str, Any]:
    """The ``.json`` next to the weights (same stem), or ``{}``."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object with name/kwargs/adapter")
    return meta


def is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive (its zip holds ``constants.pkl``; ``torch.save`` files do not)."""
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def sidecar_adapter(path: Path, sidecar: dict[str, Any]) -> tuple[AdapterSpec, dict[str, Any]]:
    """The adapter a side-car declares and its network kwargs.

    A side-car with a network name but no ``"adapter"`` was written by :func:`save_classifier` before
    adapters were recorded: those classifiers were trained behind the package's normalisation (with
    ``mean``/``std`` kwargs, if set), so they keep it. Without a side-car nothing is assumed.
    """
    kwargs = dict(sidecar.get("kwargs", {}))
    if "adapter" in sidecar:
        try:
            return AdapterSpec.model_validate(sidecar["adapter"]), kwargs
        except ValueError as err:
            raise UserError(f"{path.with_suffix('.json')}: invalid adapter: {_one_line(err)}") from err
    if "name" in sidecar and path.suffix == ".safetensors":
        mean, std = kwargs.pop("mean", PACKAGE_ADAPTER.mean[0]), kwargs.pop("std", PACKAGE_ADAPTER.std[0])
        log.warning("%s: side-car without an adapter (written by an older version of this package): "
                    "using the package adapter, (x - %g) / %g", path.with_suffix(".json").name, mean, std)
        return PACKAGE_ADAPTER.model_copy(update={"mean": [float(mean)], "std": [float(std)]}), kwargs
    return FOREIGN_DEFAULT, kwargs


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def build_network(name: str, kwargs: dict[str, Any], adapter: AdapterSpec, source: str | Path) -> nn.Module:
    """A registered network (its ``num_classes``/``in_channels`` default to the adapter's), or
    ``module:function(**kwargs)`` for any other architecture."""
    if ":" in name:
        module_name, _, function_name = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"{source}: cannot import the classifier factory {name!r} ({err})") from err
    elif name in _REGISTRY:
        defaults = {"in_channels": adapter.channels}
        if adapter.num_outputs() is not None:
            defaults["num_classes"] = adapter.num_outputs()
        kwargs = {**defaults, **kwargs}
        factory = _REGISTRY[name]
    else:
        raise UserError(f"{source}: unknown classifier architecture {name!r}; registered: "
                        f"{', '.join(list_classifiers())}, or give MODULE:FUNCTION")
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise UserError(f"{source}: classifier kwargs {kwargs} do not fit {name!r} ({err})") from err


def load_classifier(path: str | Path, name: str | None = None, kwargs: dict[str, Any] | None = None,
                    adapter: dict[str, Any] | None = None, *, task: str | None = None,
                    trainable: bool = False) -> AdaptedClassifier:
    """Any classifier file (see the module docstring), behind its adapter, in eval mode.

    ``name``/``kwargs``: the network (registered name or ``module:function``), overriding the side-car's;
    ``adapter``: adapter fields overriding the side-car's (command line). ``task``: picks a sigmoid
    head's output by name when no index is declared. ``trainable``: the caller will train it (joint
    training), which a TorchScript file cannot be.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"classifier weights not found: {path}")
    sidecar = read_sidecar(path)
    base, sidecar_kwargs = sidecar_adapter(path, sidecar)
    try:
        spec = merged(base, dict(adapter or {}))
    except ValueError as err:
        raise UserError(f"{path}: invalid classifier adapter: {_one_line(err)}") from err
    spec = spec.for_task(task, str(path))
    if is_torchscript(path):
        if trainable:
            raise UserError(f"{path}: a TorchScript classifier is audit-only: joint training steps the "
                            "network's parameters through its Python modules; give its state_dict with "
                            "--classifier-arch, or audit it with simplify audit")
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise UserError(f"{path}: not a loadable TorchScript file ({_one_line(err)})") from err
        model = AdaptedClassifier(net, spec, recipe=None, source=str(path))
    else:
        if name is not None and name != sidecar.get("name"):
            sidecar_kwargs = {}  # another network than the side-car describes: its kwargs do not apply
        name = name or sidecar.get("name")
        if name is None:
            raise UserError(f"{path}: no {path.with_suffix('.json').name} next to it; give the network with "
                            f"--classifier-arch (registered: {', '.join(list_classifiers())}; "
                            "or MODULE:FUNCTION)")
        kwargs = {**sidecar_kwargs, **(kwargs or {})}
        net = build_network(name, kwargs, spec, path)
        fit_state_dict(net, read_state_dict(path), path, name)
        model = AdaptedClassifier(net, spec, recipe={"name": name, "kwargs": kwargs}, source=str(path))
    log.info("classifier %s: %s", path.name, spec.describe())
    return model.eval()
