"""What the prior says: per-study bpd tables and the simplicity ordering check.

The ordering check is the prior's acceptance test: white noise > radiographs > the same radiographs
blurred (σ = 2 px) > flat grey, at every working size. A prior that ranks a blurred or flat image
above the original would reward the simplifier for keeping detail.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from pipeline.models.bpd import bits_per_dim
from pipeline.models.glow import Glow
from pipeline.prior.data import RadiographImages, resize_uint8, to_uint8
from pipeline.runtime.device import autocast
from pipeline.tasks import DEFAULT_TASKS, label_columns
from pipeline.training.engine import score_batches

TABLE_COLUMNS = ("study_id", "split", "effusion", "sex", "bpd")  # of the default tasks


@torch.no_grad()
def images_bpd(
    model: Glow, images: RadiographImages, batch_size: int = 32, device: str | torch.device = "cpu",
    size: int | None = None,
) -> np.ndarray:
    """Deterministic (midpoint) bpd of uint8 images ``(N, 1, H, W)``, float64 ``(N,)``.

    Read batch by batch (a lazy store view streams from disk); ``size``: each batch is first resized
    to ``size`` x ``size`` (:func:`~pipeline.prior.data.resize_uint8`). Runs in this process alone.
    """
    device = torch.device(device)

    def score(_: Any, batch: Any) -> dict[str, torch.Tensor]:
        batch = np.asarray(batch, dtype=np.uint8)
        x = torch.from_numpy(batch if size is None else resize_uint8(batch, size)).to(device).float() / 255.0
        with autocast(device):
            return {"bpd": bits_per_dim(model, x, dequantize="midpoint").double()}

    return score_batches(images, score, batch_size, sharded=False).get("bpd", torch.zeros(0)).numpy()


def bpd_table(model: Glow, images: RadiographImages, frame: pd.DataFrame, batch_size: int = 32,
              device: str | torch.device = "cpu", size: int | None = None,
              tasks: Iterable[str] = DEFAULT_TASKS) -> pd.DataFrame:
    """One row per study: ``study_id, split``, the label columns of ``tasks`` (effusion and sex
    always, then e.g. ``cardiomegaly``; raw manifest values, so :func:`pipeline.tasks.task_labels`
    gives each task's labels from the table) and ``bpd`` (midpoint, streamed: :func:`images_bpd`)."""
    if len(images) != len(frame):
        raise ValueError(f"{len(images)} images but {len(frame)} manifest rows")
    columns = ["study_id", "split", *label_columns(tasks)]
    table = frame.reindex(columns=columns).reset_index(drop=True)
    table["bpd"] = images_bpd(model, images, batch_size, device, size)
    return table


def simplicity_variants(
    radiographs: np.ndarray, blur_sigma: float = 2.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """uint8 ``noise`` (white), ``radiograph``, ``blurred`` (Gaussian σ px), ``flat`` (image mean)."""
    rng = np.random.default_rng(seed)
    x = radiographs.astype(np.float32) / 255.0
    sigma = (0, blur_sigma, blur_sigma)
    blurred = np.stack([ndimage.gaussian_filter(img, sigma=sigma, mode="reflect") for img in x])
    flat = np.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape)
    return {
        "noise": rng.integers(0, 256, radiographs.shape, dtype=np.uint8),
        "radiograph": radiographs,
        "blurred": to_uint8(blurred),
        "flat": to_uint8(np.ascontiguousarray(flat)),
    }


def simplicity_ordering(model: Glow, radiographs: np.ndarray, sizes=(64, 128), blur_sigma: float = 2.0,
                        device: str | torch.device = "cpu") -> dict[int, dict[str, float]]:
    """Mean bpd of each variant at each size, e.g. ``{64: {"noise": 8.1, "radiograph": 3.2, ...}}``."""
    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        variants = simplicity_variants(resize_uint8(radiographs, size), blur_sigma)
        results[size] = {name: float(images_bpd(model, imgs, device=device).mean())
                         for name, imgs in variants.items()}
    return results


def ordering_holds(means: dict[str, float]) -> bool:
    return means["noise"] > means["radiograph"] > means["blurred"] > means["flat"]
