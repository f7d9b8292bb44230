"""Lamellar effusion model on the prepared example CT (128² grid, cached after the first run)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.demo.ct import prepare_ct
from pipeline.data.demo.effusion import lung_side


@pytest.fixture(scope="module")
def ct():
    return prepare_ct(128)


def test_prepared_ct_has_plausible_lungs(ct):
    left = ct.lung_left.sum() * ct.voxel_ml
    right = ct.lung_right.sum() * ct.voxel_ml
    assert 1400 < left < 2100 and 1600 < right < 2400 and right > left
    assert not (ct.lung_left & ct.lung_right).any()
    # RAS+: the left lung lies at negative x.
    assert ct.voxel_centers(ct.lung_left)[:, 0].mean() < 0 < ct.voxel_centers(ct.lung_right)[:, 0].mean()


@pytest.mark.parametrize("side", ["left", "right"])
def test_volume_lookup_hits_target_and_fluid_stays_in_the_lung_base(ct, side):
    lung = lung_side(ct, side)
    assert np.all(np.diff(lung.lut_volumes_ml) >= 0)
    assert lung.lut_volumes_ml[0] < 20  # no fluid rind at the lowest sheet height
    for target in (100.0, 400.0, 1000.0):
        fraction = lung.fraction_for_volume(target)
        assert fraction.sum() * ct.voxel_ml == pytest.approx(target, rel=0.03)
        assert not fraction[~lung.mask].any()
    small, large = lung.fraction_for_volume(150.0), lung.fraction_for_volume(900.0)
    z_weight = np.arange(small.shape[0])[:, None, None]
    assert (small * z_weight).sum() / small.sum() < (large * z_weight).sum() / large.sum()
    assert (small * z_weight).sum() / small.sum() < (lung.mask * z_weight).sum() / lung.mask.sum()


def test_out_of_range_volume_and_bad_side_raise(ct):
    with pytest.raises(ValueError, match="outside the modelled range"):
        lung_side(ct, "left").fraction_for_volume(10_000.0)
    with pytest.raises(ValueError, match="unknown effusion side"):
        lung_side(ct, "middle")


def test_cached_tables_reload_identically(ct, tmp_path):
    path = tmp_path / "lung-left.npz"
    built = lung_side(ct, "left", path)
    assert path.is_file()
    loaded = lung_side(ct, "left", path)
    assert np.array_equal(built.distance_mm, loaded.distance_mm)
    assert np.array_equal(built.lut_volumes_ml, loaded.lut_volumes_ml)
    assert loaded.height_for_volume(500.0) == built.height_for_volume(500.0)
