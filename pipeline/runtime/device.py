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
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if preference in ("auto", "cuda") \
        else torch.device(preference)
    if device.type == "cuda":
        # PyTorch runs fp32 convolutions in TF32 by default. The Glow's bpd is kept in fp32 on purpose:
        # on an H100, TF32 moved per-image bpd by up to 0.6% against the CPU (under 2e-6 with it off).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaler needed); a no-op on CPU where fp32 is both exact and fast."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
