"""Scoring helpers of the faithfulness benchmark (``benchmarks/faithfulness.py``).

Three things the localisation metrics (:mod:`pipeline.explain.localisation`) do not cover:

- a **map for a simplifier** (SimpleBits, blur at matched bpd), so that it can be scored like a saliency
  map: :func:`kept_detail_map`, the same relative to the original's own detail,
  :func:`relative_detail_map`, and the detail kept beyond blur at the same bits, :func:`detail_beyond`;
- **reliance tracking**: a rank correlation between a method's emphasis on a feature and the
  classifier's measured reliance on it, across classifiers: :func:`tracking_spearman`;
- the **model-randomisation sanity check** (Adebayo et al. 2018, MPRT): the rank correlation between
  the map of the trained classifier and that of the same architecture with re-initialised weights:
  :func:`map_rank_correlation`.

Why ``kept_detail_map`` is the simplifier's relevance. A saliency map marks where the evidence is;
a SimpleBits image *keeps* the evidence and flattens the rest (that is its objective: as few bits as
possible under the prior while the classifier's internal evidence is kept). So the natural map is
"what the simplified image still holds beyond a locally smooth image": the magnitude of its local
detail, ``|x̃ − G_σ * x̃|`` (a Gaussian high-pass, σ a few pixels). A region the classifier needs keeps
its edges and texture (high), a region it does not need is flattened (zero). The difference
``|x − x̃|`` is the opposite: it marks what was *removed*, i.e. what the classifier did not need, so
it is not used as relevance. The same definition is applied to blur at matched bpd and to the
original image (the reference "keep everything"), so the rows differ only in what each kept.
The kept-detail map is dominated by the anatomy: edges the original has are edges its simplification
keeps, whatever the classifier (on the medium benchmark its trained-vs-randomised rank correlation
was 0.78). :func:`relative_detail_map` divides by the original's own detail, ``|x̃ − G x̃| / (|x − G x|
+ floor)``: the fraction of the local detail that survived, so that what is left is where the
simplifier chose to keep more than elsewhere, which is what depends on the classifier. ``floor`` (the
original's median detail) keeps flat regions, where both are near zero, from dominating.
That still failed the sanity check (0.78): where detail is cheap to keep under the prior does not
depend on the classifier. :func:`detail_beyond` subtracts a classifier-blind simplification at the
same bits, blur matched to the audit's bpd: ``max(kept(x̃) − kept(blur), 0)`` is the detail the audit
holds that a rewrite ignorant of the classifier would not, i.e. the part of the map that the
classifier caused.
For the scalar emphasis on a feature the benchmark uses the ground-truth retention of the audit
(kept local contrast inside the mask, :func:`pipeline.simplebits.evaluate.distractor_retention`),
and reports the map-based relevance mass accuracy beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats


def kept_detail_map(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """``|image − G_sigma * image|``: the local detail an image holds (non-negative, same shape).

    ``image`` is a grey image (any scale; the benchmark passes ``[0, 1]``); ``sigma`` in pixels.
    A flat image maps to zeros; borders reflect, so a flat image has no edge artefacts.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"kept_detail_map needs a 2-D image, got shape {image.shape}")
    return np.abs(image - ndimage.gaussian_filter(image, sigma, mode="reflect"))


def relative_detail_map(original: np.ndarray, simplified: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """``kept_detail(simplified) / (kept_detail(original) + floor)``: the share of the original's local
    detail that the simplified image keeps (non-negative; ~1 where all of it was kept, 0 where it was
    flattened). ``floor`` is the median of the original's detail (a tiny constant for a flat original).
    """
    original = np.asarray(original, dtype=np.float64)
    simplified = np.asarray(simplified, dtype=np.float64)
    if original.shape != simplified.shape:
        raise ValueError(f"original {original.shape} and simplified {simplified.shape} differ in shape")
    return detail_share(kept_detail_map(simplified, sigma), kept_detail_map(original, sigma))


def detail_share(kept: np.ndarray, original_detail: np.ndarray) -> np.ndarray:
    """:func:`relative_detail_map` from the two kept-detail maps, for a caller that has them already."""
    floor = max(float(np.median(original_detail)), 1e-6)
    return np.asarray(kept, dtype=np.float64) / (original_detail + floor)


def detail_beyond(kept: np.ndarray, reference_kept: np.ndarray) -> np.ndarray:
    """``max(kept − reference_kept, 0)``: local detail a simplified image holds beyond a reference
    simplification at the same bits (the benchmark's: blur matched to the audit's bpd); both are
    :func:`kept_detail_map` outputs of the same shape."""
    kept, reference_kept = np.asarray(kept, dtype=np.float64), np.asarray(reference_kept, dtype=np.float64)
    if kept.shape != reference_kept.shape:
        raise ValueError(f"maps differ in shape: {kept.shape} vs {reference_kept.shape}")
    return np.maximum(kept - reference_kept, 0.0)


def map_rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps over their pixels (NaN if either is constant).

    The MPRT score of one study: 1 = the randomised model's explanation ranks pixels exactly as the
    trained model's (the method ignores the model), near 0 = unrelated. Ties get average ranks.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size}")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def tracking_spearman(emphasis: Sequence[float], reliance: Sequence[float]) -> tuple[float, int]:
    """Spearman correlation between a method's emphasis and the measured reliance, over the points
    where both are finite; returns ``(rho, n)``. NaN with fewer than 3 points or a constant side
    (with 2 points a rank correlation is only the sign of one difference; the benchmark still shows
    ``n`` so such a figure is not read as evidence)."""
    e, r = np.asarray(emphasis, dtype=np.float64), np.asarray(reliance, dtype=np.float64)
    if e.shape != r.shape:
        raise ValueError(f"emphasis ({e.size}) and reliance ({r.size}) differ in length")
    keep = np.isfinite(e) & np.isfinite(r)
    e, r = e[keep], r[keep]
    n = int(keep.sum())
    if n < 3 or np.ptp(e) == 0 or np.ptp(r) == 0:
        return math.nan, n
    return float(stats.spearmanr(e, r).statistic), n


def finite_mean(values: Sequence[float]) -> float:
    """Mean over the finite values (NaN if none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan
