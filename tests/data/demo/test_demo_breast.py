"""Breast tissue edits on the prepared CT: in front of the chest wall, over the lower lungs, size-scaled."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.demo.breast import breast_anchors, breast_edits
from pipeline.data.demo.ct import prepare_ct


@pytest.fixture(scope="module")
def ct_and_anchors():
    ct = prepare_ct(128)
    return ct, breast_anchors(ct)


def test_size_zero_adds_nothing(ct_and_anchors):
    assert breast_edits(*ct_and_anchors, size=0.0) == []


def test_breasts_fill_only_air_in_front_of_the_chest_and_grow_with_size(ct_and_anchors):
    ct, anchors = ct_and_anchors
    volumes = []
    for size in (0.1, 0.5, 0.9):
        edits = breast_edits(ct, anchors, size)
        assert len(edits) == 2
        total = 0.0
        for edit in edits:
            assert not (edit.fraction[ct.body[edit.box]] > 0).any()
            assert edit.fraction.max() > 0.9
            total += edit.fraction.sum() * ct.voxel_ml
            full = np.zeros(ct.shape, dtype=bool)
            full[edit.box] = edit.fraction > 0.5
            centre = ct.voxel_centers(full).mean(axis=0)
            lung = ct.voxel_centers(ct.lung_left | ct.lung_right)
            assert centre[1] > np.percentile(lung[:, 1], 99)  # anterior to the lungs
            assert np.percentile(lung[:, 2], 1) < centre[2] < np.median(lung[:, 2])  # lower lung zones
        volumes.append(total)
    assert volumes[0] < volumes[1] < volumes[2]
    assert volumes[0] > 10  # mL: even the smallest size leaves a trace
