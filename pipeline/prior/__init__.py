"""The density prior: training data, training, bpd tables, and loading the shipped weights.

A prior is stored as two files side by side: ``<name>.safetensors`` (tensors only, no pickle) and
``<name>.json`` (``{"model": Glow keyword arguments, ...provenance and measured numbers}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PathNotFoundError, UserError
from pipeline.models.glow import Glow
from pipeline.runtime.atomic import atomic_path, atomic_write_text
from pipeline.runtime.checkpoint import unwrap

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
SHIPPED_PRIOR = WEIGHTS_DIR / "prior_cxr_broad.safetensors"


def _weight_and_config_paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


def save_prior(model: torch.nn.Module, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` + ``<path>.json`` atomically; returns the safetensors path."""
    from safetensors.torch import save_file

    glow = unwrap(model)
    weights_path, config_path = _weight_and_config_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in glow.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp))
    atomic_write_text(config_path, json.dumps({"model": glow.hparams, **(info or {})}, indent=2) + "\n")
    return weights_path


def read_prior_info(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON side-car of a prior (``None``: the shipped one)."""
    _, config_path = _weight_and_config_paths(path or SHIPPED_PRIOR)
    if not config_path.is_file():
        raise PathNotFoundError(f"prior config not found: {config_path} (expected next to the .safetensors)")
    return json.loads(config_path.read_text())


def load_prior(path: str | Path | None = None, device: str | torch.device = "cpu") -> Glow:
    """A frozen Glow in eval mode. ``path=None`` loads the shipped ``pipeline/weights/prior_cxr_broad``."""
    from safetensors.torch import load_file

    weights_path, _ = _weight_and_config_paths(path or SHIPPED_PRIOR)
    if not weights_path.is_file():
        raise PathNotFoundError(f"prior weights not found: {weights_path}")
    info = read_prior_info(weights_path)
    try:
        model = Glow(**info["model"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{weights_path.with_suffix('.json')}: bad 'model' section: {err}") from err
    state = load_file(str(weights_path), device="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{weights_path}: weights do not match its config: {err}") from err
    model.eval().requires_grad_(False)
    return model.to(device)
