"""One training loop for every setting: classify, joint, audit, condense and prior training.

A setting supplies only what is its own:

- its models and optimizers (checkpointed by name) and any other stateful objects
  (``state_dict``/``load_state_dict``: gradient clippers, the best model kept so far);
- its batches: a ``Dataset`` that the engine samples, or a callable ``epoch -> iterable`` for
  generated data (the prior's image mix, condensation's iterations);
- ``step(batch, ctx) -> dict`` (forward, backward, optimizer step; custom steps such as joint
  training's look-ahead are just steps), and ``evaluate(epoch) -> dict`` (called on every rank; it
  may use collectives).

The engine owns everything that drifted apart when each setting had its own loop:

- **sampling**: a ``DistributedSampler`` over the dataset with ``drop_last``, so every rank takes
  exactly the same number of steps per epoch (gradient all-reduces can never be mismatched);
- **seeding**: one generator per (seed, epoch, rank) for augmentation and noise, a seeded sampler
  and DataLoader generator, so a resumed run replays exactly the randomness it would have drawn;
- **checkpoint/resume** every epoch (and every ``checkpoint_every_steps``: a run killed mid-epoch
  resumes at that step and skips the batches it already took);
- **the stopping rule**: the configured epochs. A wall-clock cap is opt-in; when set, rank 0
  decides for all ranks and where it stopped is recorded in the metrics (``stopped_epoch``,
  ``time_capped``), because a cap makes results depend on the machine's load;
- **progress** (tqdm, rank 0) and **MLflow** (rank 0): per-epoch metrics, and per-step training
  metrics every ``log_every_steps``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import numpy as np
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from pipeline.data.dataset import eval_batches
from pipeline.runtime.checkpoint import load_checkpoint, save_checkpoint
from pipeline.runtime.distributed import all_gather_object, all_reduce_mean, broadcast_object, world_info
from pipeline.runtime.progress import progress
from pipeline.runtime.tracking import Tracker, null_tracker

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def stream_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of one epoch's random stream on one rank: a function of (seed, epoch, rank) only."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


@dataclass
class StepContext:
    """What a step may need to know; ``generator`` is this epoch's and this rank's random stream."""

    epoch: int  # 0-based
    step: int  # 0-based within the epoch
    steps_per_epoch: int
    epochs: int
    generator: torch.Generator
    device: torch.device
    rank: int
    world_size: int
    sample_table: Callable[[int], torch.Tensor] | None = None

    def uniform(self, positions: torch.Tensor, k: int) -> torch.Tensor:
        """``(len(positions), k)`` uniforms in [0, 1) keyed by (seed, epoch, sample position).

        Randomness that belongs to a sample (its augmentation) drawn from here is the same whichever
        rank takes the sample, so a DDP run and a single process with the same global batch see the
        same augmented images.
        """
        if self.sample_table is None:
            raise RuntimeError("per-sample randomness needs a dataset-driven fit")
        return self.sample_table(k)[positions.long().cpu()]

    def sample_generators(self, positions: torch.Tensor) -> list[torch.Generator]:
        """One random stream per sample, keyed like :meth:`uniform` by (seed, epoch, position), for
        noise shaped like an image (the audit's input noise, joint training's dequantisation).

        Each stream's seed is two exact 24-bit integers (float32 uniforms are multiples of 2^-24).
        """
        keys = (self.uniform(positions, 2) * 2**24).long().tolist()
        return [torch.Generator().manual_seed(high << 24 | low) for high, low in keys]

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class EngineResult:
    history: list[dict[str, float]]  # one row per finished epoch: train_* means and evaluate()'s metrics
    stopped_epoch: int  # epochs trained (== epochs unless the opt-in time cap stopped the run)
    time_capped: bool

    @property
    def last(self) -> dict[str, float]:
        return {k: v for k, v in (self.history[-1] if self.history else {}).items() if k != "epoch"}


class _SkipBatches(BatchSampler):
    """A batch sampler that leaves out its first ``skip`` batches (mid-epoch resume)."""

    def __init__(self, inner: BatchSampler, skip: int) -> None:
        self.inner, self.skip = inner, skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def uint8_collate(batch: list) -> list[torch.Tensor]:
    """Stack ``(image, label, position)`` samples; images stay uint8 until they reach the device."""
    return [torch.stack([torch.as_tensor(item[i]) for item in batch]) for i in range(len(batch[0]))]


@dataclass
class Engine:
    """The training loop; see the module docstring. Construct, then :meth:`fit`."""

    name: str
    epochs: int
    seed: int
    device: torch.device
    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    state: dict[str, Stateful] = field(default_factory=dict)
    checkpoint_path: str | Path | None = None
    tracker: Tracker | None = None
    max_minutes: float | None = None
    checkpoint_every_steps: int | None = None
    log_every_steps: int | None = 50
    num_workers: int = 0
    local: bool = False  # train in this process alone even under torchrun (no collectives)

    def __post_init__(self) -> None:
        self.tracker = self.tracker or null_tracker()
        self.rank, self.world_size = (0, 1) if self.local else world_info()

    # --- sampling --------------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, batch_size: int, epoch: int, skip: int) -> tuple[Iterable, int]:
        """This rank's batches of ``epoch``; ``batch_size`` is global (split evenly over the ranks)."""
        if batch_size % self.world_size:
            raise ValueError(f"{self.name}: batch size {batch_size} must be divisible by the "
                             f"{self.world_size} ranks")
        per_rank = batch_size // self.world_size
        n = len(dataset)  # type: ignore[arg-type]
        if n < batch_size:
            raise ValueError(f"{self.name}: {n} training studies are fewer than one batch of {batch_size}")
        # also in a single process: its (seed, epoch) shuffle is what makes resuming exact
        sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        batches = BatchSampler(sampler, per_rank, drop_last=True)  # equal steps on every rank
        loader = DataLoader(
            dataset, batch_sampler=_SkipBatches(batches, skip), num_workers=self.num_workers,
            collate_fn=uint8_collate, persistent_workers=False,
            # the DataLoader draws its worker base seed from this, never from the global stream
            generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch, self.rank) + 1),
        )
        return loader, len(batches)

    # --- checkpoints -----------------------------------------------------------------------------

    def _save(self, epoch: int, step: int, history: list, sums: dict, generator: torch.Generator) -> None:
        """Checkpoint (rank 0 writes); every rank calls this at the same step, so the gather matches."""
        if self.checkpoint_path is None:
            return
        # each rank's own stream and running sums, so that every rank resumes mid-epoch exactly
        mine = {"generator": generator.get_state(), "sums": sums}
        per_rank = [mine] if self.local else all_gather_object(mine)
        if self.rank != 0:
            return
        save_checkpoint(
            self.checkpoint_path, models=self.models, optimizers=self.optimizers, step=epoch,
            extra={"step_in_epoch": step, "history": history, "per_rank": per_rank,
                   "world_size": self.world_size,
                   "state": {k: v.state_dict() for k, v in self.state.items()}},
        )

    def _resume(self) -> tuple[int, int, list, dict, torch.Tensor | None]:
        if self.checkpoint_path is None or not Path(self.checkpoint_path).is_file():
            return 0, 0, [], {}, None
        saved = load_checkpoint(self.checkpoint_path, models=self.models, optimizers=self.optimizers,
                                map_location=self.device)
        extra = saved["extra"]
        for key, obj in self.state.items():
            obj.load_state_dict(extra["state"][key])
        epoch, step = int(saved["step"]), int(extra.get("step_in_epoch", 0))
        if step and int(extra["world_size"]) != self.world_size:
            raise ValueError(f"{self.checkpoint_path}: saved mid-epoch by {extra['world_size']} ranks; resume "
                             f"it with the same number of ranks (now {self.world_size})")
        mine = extra["per_rank"][self.rank] if step else {"sums": {}, "generator": None}
        log.info("%s: resumed from %s at epoch %d, step %d", self.name, self.checkpoint_path, epoch + 1, step)
        return epoch, step, list(extra["history"]), dict(mine["sums"]), mine["generator"]

    # --- the loop --------------------------------------------------------------------------------

    def fit(
        self,
        step: Callable[[Any, StepContext], Mapping[str, float]],
        *,
        dataset: Dataset | None = None,
        batch_size: int | None = None,
        batches: Callable[[int, StepContext], Iterable[Any]] | None = None,
        steps_per_epoch: int | None = None,
        evaluate: Callable[[int], Mapping[str, float]] | None = None,
    ) -> EngineResult:
        """Train ``self.epochs`` epochs (resuming a checkpoint if there is one).

        Either ``dataset`` + global ``batch_size`` (sampled by the engine), or ``batches(epoch, ctx)``
        + ``steps_per_epoch`` (generated batches; each rank must yield exactly that many).
        """
        if (dataset is None) == (batches is None):
            raise ValueError("fit needs either a dataset or a batches callable")
        start_epoch, start_step, history, resumed_sums, generator_state = self._resume()
        started = time.monotonic()
        time_capped = False
        for epoch in range(start_epoch, self.epochs):
            skip = start_step if epoch == start_epoch else 0
            generator = torch.Generator().manual_seed(stream_seed(self.seed, epoch, self.rank))
            if skip and generator_state is not None:
                generator.set_state(generator_state)
            if dataset is not None:
                assert batch_size is not None
                source, per_epoch = self._loader(dataset, batch_size, epoch, skip)
            else:
                assert steps_per_epoch is not None
                per_epoch = steps_per_epoch
            ctx = StepContext(epoch, skip, per_epoch, self.epochs, generator, self.device, self.rank,
                              self.world_size, self._sample_table(dataset, epoch))
            if batches is not None:
                source = itertools.islice(batches(epoch, ctx), skip, None)
            sums: dict[str, float] = dict(resumed_sums) if skip else {}
            for model in self.models.values():
                model.train()
            bar = progress(source, desc=f"{self.name} epoch {epoch + 1}/{self.epochs}", total=per_epoch,
                           initial=skip, leave=False)
            for index, batch in enumerate(bar, start=skip):
                ctx.step = index
                stats = step(batch, ctx)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                done = index + 1
                if self.log_every_steps and done % self.log_every_steps == 0:
                    self.tracker.log_metrics({f"step_{k}": float(v) for k, v in stats.items()},
                                             step=ctx.global_step + 1)
                if self.checkpoint_every_steps and done % self.checkpoint_every_steps == 0 and done < per_epoch:
                    self._save(epoch, done, history, sums, generator)
            means = {f"train_{k}": self._mean_over_ranks(v / max(1, per_epoch)) for k, v in sorted(sums.items())}
            metrics = {**means, **(dict(evaluate(epoch)) if evaluate is not None else {})}
            history.append({"epoch": epoch + 1, **metrics})
            self.tracker.log_metrics({k: v for k, v in metrics.items() if _is_finite(v)}, step=epoch + 1)
            log.info("%s epoch %d: %s", self.name, epoch + 1,
                     ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            self._save(epoch + 1, 0, history, {}, generator)
            if self._out_of_time(started) and epoch + 1 < self.epochs:
                time_capped = True
                log.warning("%s: time cap of %.1f min reached after epoch %d of %d; results now depend on "
                            "this machine's speed", self.name, self.max_minutes, epoch + 1, self.epochs)
                break
        stopped = len(history)
        self.tracker.log_metrics({"stopped_epoch": float(stopped), "time_capped": float(time_capped)})
        return EngineResult(history=history, stopped_epoch=stopped, time_capped=time_capped)

    def _mean_over_ranks(self, value: float) -> float:
        return value if self.local else float(all_reduce_mean(torch.tensor(value, dtype=torch.float64)))

    def _sample_table(self, dataset: Dataset | None, epoch: int) -> Callable[[int], torch.Tensor] | None:
        if dataset is None:
            return None
        tables: dict[int, torch.Tensor] = {}

        def table(k: int) -> torch.Tensor:  # built on first use: n x k floats (6 MB at 377k studies, k=4)
            if k not in tables:
                g = torch.Generator().manual_seed(stream_seed(self.seed, epoch, 10_000 + k))
                tables[k] = torch.rand(len(dataset), k, generator=g)  # type: ignore[arg-type]
            return tables[k]

        return table

    def _out_of_time(self, started: float) -> bool:
        if self.max_minutes is None:
            return False
        spent = (time.monotonic() - started) / 60 > self.max_minutes
        return spent if self.local else bool(broadcast_object(spent))  # rank 0 decides for all


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def score_batches(
    images: Any,
    score: Callable[[np.ndarray, torch.Tensor], Mapping[str, torch.Tensor]],
    batch_size: int,
    sharded: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-study results of ``score(positions, uint8 batch)`` over all images, in cohort order.

    With ``sharded`` (and a process group), each rank scores its contiguous share and the shares
    are gathered, so every rank returns the full result. Only per-study values travel; images
    never do. ``score`` returns tensors whose first dimension is the batch.
    """
    rank, world = world_info()
    sharded = sharded and world > 1
    parts: dict[str, list[torch.Tensor]] = {}
    for positions, batch in eval_batches(images, batch_size, sharded=sharded):
        for key, value in score(positions, batch).items():
            parts.setdefault(key, []).append(value.detach().cpu())
    local = {key: torch.cat(values) for key, values in parts.items()}
    if not sharded:
        return local
    shares = all_gather_object(local)  # contiguous shares in rank order = cohort order
    keys = next((list(s) for s in shares if s), [])
    return {key: torch.cat([s[key] for s in shares if key in s]) for key in keys}
