"""Checkpoints that resume exactly: model, optimizer, step, RNG state; all loadable with weights_only=True.

Written atomically, so a run killed mid-save resumes from the previous checkpoint instead of a
corrupt one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.runtime.atomic import atomic_write_bytes
from pipeline.runtime.seeding import rng_state, set_rng_state


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers, for state_dicts that load anywhere."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    state = {
        "step": int(step),
        "models": {name: unwrap(m).state_dict() for name, m in models.items()},
        "optimizers": {name: o.state_dict() for name, o in (optimizers or {}).items()},
        "rng": rng_state(),
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Restore in place; returns ``{"step": ..., "extra": ...}``."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    for name, model in models.items():
        unwrap(model).load_state_dict(state["models"][name])
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(state["optimizers"][name])
    if restore_rng:
        set_rng_state(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
