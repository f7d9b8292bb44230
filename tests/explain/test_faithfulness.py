"""Scoring helpers of the faithfulness benchmark, each on a case with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.explain.faithfulness import (
    detail_beyond,
    finite_mean,
    kept_detail_map,
    map_rank_correlation,
    relative_detail_map,
    tracking_spearman,
)
from pipeline.explain.localisation import relevance_mass_accuracy


def test_kept_detail_of_a_flat_image_is_zero():
    assert np.allclose(kept_detail_map(np.full((16, 16), 0.4)), 0.0)


def test_kept_detail_sits_on_the_detail():
    image = np.full((32, 32), 0.5)
    image[10:13, 20] = 1.0  # a thin bright line, like a drain's stripe
    mask = np.zeros_like(image, dtype=bool)
    mask[10:13, 20] = True
    detail = kept_detail_map(image, sigma=2.0)
    assert detail.shape == image.shape and detail.min() >= 0
    assert np.unravel_index(detail.argmax(), detail.shape)[1] == 20
    # most of the map's mass lies on the line or next to it, none far away
    near = np.zeros_like(mask)
    near[4:19, 14:27] = True
    assert relevance_mass_accuracy(detail, near) > 0.95
    # blurring the image removes detail: the blurred image's map has less mass on the line
    from scipy import ndimage

    blurred = kept_detail_map(ndimage.gaussian_filter(image, 1.5), sigma=2.0)
    assert blurred[mask].sum() < detail[mask].sum()


def test_relative_detail_shows_where_detail_was_kept_not_where_the_image_has_it():
    rng = np.random.default_rng(0)
    original = 0.5 + 0.2 * rng.standard_normal((32, 32))  # strong texture on the left half
    original[:, 16:] = 0.5 + 0.05 * rng.standard_normal((32, 16))  # a quarter of it on the right
    simplified = original.copy()
    simplified[:, :16] = 0.5 + 0.3 * (original[:, :16] - 0.5)  # the left keeps 30% of its detail, the right all
    kept, relative = kept_detail_map(simplified), relative_detail_map(original, simplified)
    assert relative.shape == original.shape and relative.min() >= 0
    # the kept-detail map still ranks the left above the right: it follows the image's own texture
    assert kept[:, :16].mean() > kept[:, 16:].mean()
    # the relative map ranks the half that kept all its detail above the half that lost 70%
    assert relative[:, 16:].mean() > 1.5 * relative[:, :16].mean()
    # nothing removed: d / (d + median d), which is 1/2 at the median pixel
    assert np.median(relative_detail_map(original, original)) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError):
        relative_detail_map(original, original[:8])


def test_map_rank_correlation_known_answers():
    rng = np.random.default_rng(0)
    a = rng.random((8, 8))
    assert map_rank_correlation(a, a) == pytest.approx(1.0)
    assert map_rank_correlation(a, 2 * a + 3) == pytest.approx(1.0)  # ranks only
    assert map_rank_correlation(a, -a) == pytest.approx(-1.0)
    assert math.isnan(map_rank_correlation(a, np.zeros_like(a)))  # a constant map has no ranks
    with pytest.raises(ValueError):
        map_rank_correlation(a, a[:4])


def test_tracking_spearman_known_answers():
    reliance = [0.01, 0.05, 0.2, 0.4]
    assert tracking_spearman([0.1, 0.2, 0.3, 0.9], reliance) == (pytest.approx(1.0), 4)
    assert tracking_spearman([0.9, 0.3, 0.2, 0.1], reliance) == (pytest.approx(-1.0), 4)
    # non-finite points are dropped; then only three remain
    rho, n = tracking_spearman([0.1, math.nan, 0.3, 0.9], reliance)
    assert n == 3 and rho == pytest.approx(1.0)
    # two points: a rank correlation would only be the sign of one difference
    rho, n = tracking_spearman([0.1, 0.2], [0.3, 0.4])
    assert math.isnan(rho) and n == 2
    assert math.isnan(tracking_spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3])[0])


def test_finite_mean():
    assert finite_mean([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(finite_mean([math.nan]))
    assert math.isnan(finite_mean([]))


def test_detail_beyond_blur_marks_only_what_the_simplifier_kept_and_blur_lost():
    from scipy import ndimage

    image = np.full((32, 32), 0.5)
    image[8, 4:28] = 1.0  # two thin lines: the simplifier keeps the first, blurs the second as blur does
    image[24, 4:28] = 1.0
    blurred = ndimage.gaussian_filter(image, 1.5)
    simplified = blurred.copy()
    simplified[6:11, :] = image[6:11, :]
    beyond = detail_beyond(kept_detail_map(simplified), kept_detail_map(blurred))
    assert beyond.min() >= 0 and beyond.shape == image.shape
    first, second = np.zeros_like(image, dtype=bool), np.zeros_like(image, dtype=bool)
    first[5:12, :], second[21:28, :] = True, True
    assert beyond[second].max() < 1e-12  # kept as blur keeps it: nothing beyond
    assert relevance_mass_accuracy(beyond, first) > 0.95
    assert np.allclose(detail_beyond(kept_detail_map(blurred), kept_detail_map(blurred)), 0.0)
    with pytest.raises(ValueError):
        detail_beyond(beyond, beyond[:8])
