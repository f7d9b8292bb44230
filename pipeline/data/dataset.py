"""``torch.utils.data`` views of a cohort: lazy training samples and rank-sharded evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.store import StoredImages
from pipeline.runtime.distributed import rank_range

Images = torch.Tensor | StoredImages


class CohortDataset(Dataset):
    """``(uint8 image (1, H, W), label, position)`` samples over a cohort's images.

    Images are read from the store when a batch is asked for (``__getitems__``: one sorted read
    per batch instead of one per study), so DataLoader workers stream from disk and nothing holds
    the cohort in memory. ``labels`` may be ``None`` (inference): the label is then -1.
    """

    def __init__(self, images: Images, labels: torch.Tensor | None = None) -> None:
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = None if labels is None else torch.as_tensor(labels).long()

    def __len__(self) -> int:
        return len(self.images)

    def _label(self, i: int) -> torch.Tensor:
        return torch.tensor(-1) if self.labels is None else self.labels[i]

    def __getitem__(self, i: int):
        return self.images[[int(i)]][0], self._label(int(i)), torch.tensor(int(i))

    def __getitems__(self, positions: Sequence[int]) -> list:
        batch = self.images[np.asarray(positions, dtype=np.int64)]
        return [(batch[k], self._label(int(i)), torch.tensor(int(i))) for k, i in enumerate(positions)]


def eval_batches(images: Images, batch_size: int, sharded: bool = True) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(positions, uint8 batch)`` over this rank's contiguous share (all of it with ``sharded=False``).

    Evaluation is split over DDP ranks without padding, so no study is scored twice or lost; the
    caller gathers the per-study results (:func:`pipeline.runtime.distributed.all_gather_object`).
    """
    share = rank_range(len(images)) if sharded else range(len(images))
    for begin in range(share.start, share.stop, batch_size):
        end = min(share.stop, begin + batch_size)
        yield np.arange(begin, end), images[begin:end]
