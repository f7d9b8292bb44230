"""torchrun DDP helpers: process-group setup, rank-0 guard, sharding and reductions.

Launch with ``torchrun --standalone --nproc-per-node=N simplebits ...``; without torchrun every
helper degrades to the single-process case, so the same code path serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from pipeline.runtime.device import pick_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_preference)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (returns the input unchanged without a process group)."""
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Contiguous-free round-robin shard: item i goes to rank i % world_size (balanced, stable)."""
    return [item for i, item in enumerate(items) if i % world_size == rank]


def broadcast_object(obj: T, src: int = 0) -> T:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_range(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's contiguous share of ``range(n)`` for evaluation: no study twice, none lost.

    Shares differ by at most one item; evaluation loops hold no collectives, so that is safe.
    """
    if rank is None or world_size is None:
        rank, world_size = world_info()
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
