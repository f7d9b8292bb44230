"""Binary classification metrics shared by every stage: AUROC and accuracy.

Plain NumPy on purpose: the same functions score classifiers, simplified images, baselines and
subgroups, so they take anything array-like (lists, NumPy arrays, CPU or CUDA tensors).
AUROC is computed exactly from ranks (Mann-Whitney U with mid-ranks for ties), which equals the
area under the empirical ROC curve including its diagonal segments for tied scores.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata


def _as_1d(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values")
    return array


def _binary_labels(labels: Any) -> np.ndarray:
    y = _as_1d(labels, "labels")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return y.astype(np.int64)


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve; ``nan`` when only one class is present (undefined, not 0.5)."""
    y = _binary_labels(labels)
    s = _as_1d(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties
    u_statistic = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u_statistic / (n_pos * n_neg))


def accuracy(labels: Any, probabilities: Any, threshold: float = 0.5) -> float:
    """Fraction correct when P(positive) >= ``threshold`` predicts the positive class."""
    y = _binary_labels(labels)
    p = _as_1d(probabilities, "probabilities")
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and probabilities ({p.size}) differ in length")
    if y.size == 0:
        return math.nan
    return float(np.mean((p >= threshold).astype(np.int64) == y))


def binary_metrics(labels: Any, probabilities: Any, prefix: str = "") -> dict[str, float]:
    """``{prefix+"auroc", prefix+"accuracy", prefix+"n"}`` for one set of predictions."""
    return {
        f"{prefix}auroc": auroc(labels, probabilities),
        f"{prefix}accuracy": accuracy(labels, probabilities),
        f"{prefix}n": float(_as_1d(labels, "labels").size),
    }
