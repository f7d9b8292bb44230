"""Localisation scores on hand-made maps and masks whose answers follow from the construction."""

import numpy as np
import pytest

from pipeline.explain.localisation import (
    area_matched_iou,
    localisation_scores,
    pointing_game,
    relevance,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)

METRICS = [relevance_mass_accuracy, relevance_rank_accuracy, pointing_game, area_matched_iou]


def box_mask(shape=(20, 30), rows=slice(4, 9), cols=slice(10, 22)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_a_map_that_is_the_mask_scores_one(metric):
    mask = box_mask()
    assert metric(mask.astype(float), mask) == pytest.approx(1.0)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_a_uniform_map_scores_the_mask_area_fraction(metric):
    mask = box_mask()
    fraction = mask.sum() / mask.size  # 60 / 600
    assert metric(np.full(mask.shape, 0.37), mask) == pytest.approx(fraction)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.__name__)
def test_a_map_entirely_outside_the_mask_scores_zero(metric):
    mask = box_mask()
    assert metric((~mask).astype(float), mask) == pytest.approx(0.0)


def test_relevance_mass_is_the_share_of_mass_inside():
    mask = box_mask()
    attribution = np.zeros(mask.shape)
    attribution[mask] = 3.0  # 60 pixels x 3 = 180 inside
    attribution[0, :10] = 2.0  # 10 pixels x 2 = 20 outside
    assert relevance_mass_accuracy(attribution, mask) == pytest.approx(180 / 200)


def test_rank_accuracy_counts_the_top_k_inside():
    mask = box_mask(shape=(10, 10), rows=slice(0, 2), cols=slice(0, 5))  # K = 10
    attribution = np.zeros(mask.shape)
    # the 10 largest values: 7 inside the mask, 3 outside
    attribution[0, :5] = 10.0
    attribution[1, :2] = 9.0
    attribution[5, :3] = 8.0
    attribution[1, 2:] = 1.0  # inside, but below the top 10
    assert relevance_rank_accuracy(attribution, mask) == pytest.approx(7 / 10)


def test_rank_accuracy_shares_ties_at_the_cut():
    mask = box_mask(shape=(4, 4), rows=slice(0, 1), cols=slice(0, 4))  # K = 4
    attribution = np.zeros(mask.shape)
    attribution[0, :2] = 5.0  # 2 inside, surely in the top 4
    attribution[0, 2] = 1.0  # 1 inside and 3 outside tie for the last 2 places
    attribution[2, :3] = 1.0
    assert relevance_rank_accuracy(attribution, mask) == pytest.approx((2 + 2 * 1 / 4) / 4)


def test_pointing_game_hits_only_at_the_maximum():
    mask = box_mask()
    attribution = np.random.default_rng(0).uniform(0, 1, mask.shape)
    attribution[6, 15] = 2.0  # inside
    assert pointing_game(attribution, mask) == 1.0
    attribution[15, 2] = 3.0  # outside, now the maximum
    assert pointing_game(attribution, mask) == 0.0


def test_area_matched_iou_of_a_shifted_box():
    mask = box_mask(shape=(20, 20), rows=slice(0, 4), cols=slice(0, 5))  # 20 pixels
    attribution = np.zeros(mask.shape)
    attribution[2:6, 0:5] = 1.0  # same area, half of it overlapping: IoU = 10 / 30
    attribution += np.linspace(0, 1e-3, mask.size).reshape(mask.shape) * (attribution == 0)  # no ties
    assert area_matched_iou(attribution, mask) == pytest.approx(10 / 30)


def test_signed_maps_are_scored_on_their_magnitude_or_their_positive_part():
    mask = box_mask()
    attribution = np.where(mask, -1.0, 0.0)  # all evidence inside, all of it against
    assert localisation_scores(attribution, mask, kind="abs")["relevance_mass_accuracy"] == 1.0
    assert np.isnan(localisation_scores(attribution, mask, kind="positive")["relevance_mass_accuracy"])
    with pytest.raises(ValueError, match="non-negative"):
        relevance_mass_accuracy(attribution, mask)
    assert (relevance(attribution, "positive") == 0).all()


def test_undefined_cases_are_nan_and_bad_inputs_are_errors():
    mask = box_mask()
    assert all(np.isnan(v) for v in localisation_scores(np.ones(mask.shape), np.zeros_like(mask)).values())
    with pytest.raises(ValueError, match="shape"):
        pointing_game(np.ones((3, 3)), mask)
    with pytest.raises(ValueError, match="non-finite"):
        pointing_game(np.full(mask.shape, np.nan), mask)
