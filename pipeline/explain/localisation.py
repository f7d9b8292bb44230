"""Localisation scores of an attribution map against a ground-truth mask (one image at a time).

Definitions (shared/notes/faithfulness-anchors.md; ``A`` a non-negative map, ``M`` a boolean mask,
``N`` pixels, ``K = |M|``):

- relevance mass accuracy (Arras et al., Quantus ``RelevanceMassAccuracy``): ``Σ(A·M) / ΣA``;
- relevance rank accuracy (Quantus ``RelevanceRankAccuracy``): ``|top-K(A) ∩ M| / K``;
- pointing game (Zhang et al.; Quantus ``PointingGame``): ``1[argmax A ∈ M]``;
- area-matched IoU (Cohen et al., Gifsplanation): keep the pixels at or above the ``1 − K/N``
  quantile of ``A``, then IoU with ``M``.

Quantus is not installed in this project, and its README warns that its implementations were not
verified by the metrics' authors, so these are plain numpy. Ties are resolved *fairly* rather
than by array order: where top-K or the maximum is a tie, each tied pixel gets an equal share.
That makes every score of a constant map equal to the mask's area fraction (chance level), instead
of depending on where the mask happens to lie in raster order.

Signed maps (IG, occlusion, a latent-shift difference) become relevance with :func:`relevance`
(absolute value by default: evidence for and against both count as "the model looked here").
A score is NaN when it is undefined (empty mask, a map with no mass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

RelevanceKind = Literal["abs", "positive"]


def relevance(attribution: np.ndarray, kind: RelevanceKind = "abs") -> np.ndarray:
    """A signed attribution map as non-negative relevance: ``|A|`` or its positive part ``max(A, 0)``."""
    attribution = np.asarray(attribution, dtype=np.float64)
    if kind == "abs":
        return np.abs(attribution)
    if kind == "positive":
        return np.maximum(attribution, 0.0)
    raise ValueError(f"relevance kind must be 'abs' or 'positive', got {kind!r}")


def _checked(attribution: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(attribution, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    if a.shape != m.shape:
        raise ValueError(f"attribution {a.shape} and mask {m.shape} differ in shape")
    if not np.all(np.isfinite(a)):
        raise ValueError("attribution map has non-finite values")
    if np.any(a < 0):
        raise ValueError("attribution map must be non-negative; convert it with relevance() first")
    return a.ravel(), m.ravel()


def relevance_mass_accuracy(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total relevance that falls inside the mask."""
    a, m = _checked(attribution, mask)
    total = a.sum()
    if total <= 0 or not m.any():
        return float("nan")
    return float(a[m].sum() / total)


def relevance_rank_accuracy(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the ``K = |M|`` highest-relevance pixels that lie inside the mask (ties shared)."""
    a, m = _checked(attribution, mask)
    k = int(m.sum())
    if k == 0:
        return float("nan")
    threshold = np.partition(a, a.size - k)[a.size - k]  # the K-th largest value
    above = a > threshold
    tied = a == threshold
    # the top-K holds every pixel above the threshold and K - |above| of the tied ones; a tied
    # pixel is in it with equal probability, so the tied pixels inside the mask count pro rata
    from_ties = (k - above.sum()) * (tied & m).sum() / tied.sum()
    return float(((above & m).sum() + from_ties) / k)


def pointing_game(attribution: np.ndarray, mask: np.ndarray) -> float:
    """1 if the map's maximum lies in the mask, 0 if not; with tied maxima, the share inside it."""
    a, m = _checked(attribution, mask)
    if not m.any():
        return float("nan")
    peak = a == a.max()
    return float((peak & m).sum() / peak.sum())


def area_matched_iou(attribution: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the mask with the map thresholded to the mask's area (at the ``1 − K/N`` quantile)."""
    a, m = _checked(attribution, mask)
    k = int(m.sum())
    if k == 0:
        return float("nan")
    kept = a >= np.quantile(a, 1.0 - k / a.size)
    return float((kept & m).sum() / (kept | m).sum())


LOCALISATION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "relevance_mass_accuracy": relevance_mass_accuracy,
    "relevance_rank_accuracy": relevance_rank_accuracy,
    "pointing_game": pointing_game,
    "area_matched_iou": area_matched_iou,
}


def localisation_scores(attribution: np.ndarray, mask: np.ndarray,
                        kind: RelevanceKind = "abs") -> dict[str, float]:
    """Every localisation score of one (possibly signed) attribution map against one mask."""
    a = relevance(attribution, kind)
    return {name: metric(a, mask) for name, metric in LOCALISATION_METRICS.items()}
