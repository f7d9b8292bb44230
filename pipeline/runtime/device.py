"""Device choice and mixed precision: CUDA with bf16 autocast where present, CPU float32 otherwise."""

from __future__ import annotations

import contextlib
import os

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` -> the local CUDA device (respecting torchrun's LOCAL_RANK) if present, else CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {preference!r} requested but CUDA is not available")
    if preference == "auto" or preference == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(preference)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaler needed); a no-op on CPU where fp32 is both exact and fast."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
