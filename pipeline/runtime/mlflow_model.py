"""What an MLflow Model of this package holds, and how ``mlflow.pytorch.load_model`` rebuilds it.

MLflow's pytorch flavour stores its model as a pickle. Ours pickles no network class: the logged
module's ``__reduce__`` names :func:`rebuild` and carries the package's own two files (the
``.safetensors`` weights and their ``.json`` side-car) as bytes, so unpickling runs the package's loader
on exactly those files. A logged model therefore loads wherever this package is installed, gives the
loader's outputs, and survives refactoring of the network classes. The same two files also lie
unpickled in the model's ``extra_files/``, where :mod:`pipeline.runtime.model_uri` finds them when a
``models:/`` or ``runs:/`` URI is given as weights.

The input example is a synthetic grey ramp (never a patient image); the signature is inferred from it
and the rebuilt network's output on it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

KINDS = ("classifier", "simplifier", "prior")
DEFAULT_EXAMPLE_SIZE = 64  # when the side-car records no input size (the prior's does not)


class PriorDensity(nn.Module):
    """The prior as a served model: images ``(N, 1, H, W)`` in ``[0, 1]`` -> bits per dimension ``(N,)``
    (midpoint dequantisation, the pipeline's deterministic bpd). The Glow itself is ``.glow``."""

    def __init__(self, glow: nn.Module) -> None:
        super().__init__()
        self.glow = glow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pipeline.models.bpd import bits_per_dim

        return bits_per_dim(self.glow, x.float(), "midpoint")


def load_files(kind: str, weights: Path) -> nn.Module:
    """The package's loader of ``kind`` on ``weights`` (with its side-car next to it), in eval mode."""
    if kind == "classifier":
        from pipeline.models.classifiers import load_classifier

        return load_classifier(weights)
    if kind == "simplifier":
        from pipeline.models.simplifier import load_simplifier

        return load_simplifier(weights)
    if kind == "prior":
        from pipeline.prior import load_prior

        return PriorDensity(load_prior(weights)).eval()
    raise ValueError(f"unknown model kind {kind!r}; one of {', '.join(KINDS)}")


def rebuild(kind: str, files: dict[str, bytes]) -> nn.Module:
    """Unpickling entry point of a logged model: the package files written to a scratch folder and
    read back by the package's loader (it reads every tensor into memory, so the folder can go)."""
    with tempfile.TemporaryDirectory(prefix="simplebits-model-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        (weights,) = [Path(tmp) / name for name in files if name.endswith(".safetensors")]
        return load_files(kind, weights)


class LoggedNetwork(nn.Module):
    """A package network as MLflow logs it: runs like the loaded network, pickles as :func:`rebuild`."""

    def __init__(self, kind: str, weights: str | Path) -> None:
        super().__init__()
        weights = Path(weights)
        self.kind = kind
        self.files = {path.name: path.read_bytes() for path in package_files(weights)}
        self.network = rebuild(kind, self.files)  # exactly what load_model will return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def __reduce__(self) -> tuple[Any, tuple[str, dict[str, bytes]]]:
        return rebuild, (self.kind, self.files)


def package_files(weights: str | Path) -> list[Path]:
    """``weights`` and its side-car ``.json`` (both must exist)."""
    weights = Path(weights)
    files = [weights, weights.with_suffix(".json")]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model file not found")
    return files


def example_size(weights: Path) -> tuple[int, int]:
    """The image size the network was trained at (``input_size`` in its side-car), else 64 x 64."""
    size = json.loads(weights.with_suffix(".json").read_text()).get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    return DEFAULT_EXAMPLE_SIZE, DEFAULT_EXAMPLE_SIZE


def input_example(height: int, width: int) -> np.ndarray:
    """A synthetic grey ramp ``(1, 1, H, W)`` float32 on the 8-bit grid: no patient data."""
    ramp = np.add.outer(np.arange(height), np.arange(width)) / max(1, height + width - 2)
    return (np.round(ramp * 255) / 255).astype(np.float32)[None, None]


def example_and_signature(network: nn.Module, weights: Path) -> tuple[np.ndarray, Any]:
    """The input example and the signature MLflow records (batch dimension left free)."""
    from mlflow.models import infer_signature

    example = input_example(*example_size(weights))
    with torch.no_grad():
        output = network(torch.from_numpy(example)).float().numpy()
    return example, infer_signature(example, output)
