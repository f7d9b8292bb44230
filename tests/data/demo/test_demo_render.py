"""Projection geometry, projected masks and the detector model of the demo renderer."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.data.demo.render import (
    Detector, Exposure, Pose, detect, project, smooth_displacement, splat_thickness, tone_curve, warp,
)

SHAPE = (24, 24, 24)  # (z, y, x) voxels of 10 mm
SPACING = 10.0


def _cube_volume() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A dense cube in the patient's upper right (x > 0 is patient right, z > 0 superior)."""
    volume = torch.zeros(SHAPE)
    volume[16:20, 10:14, 16:20] = 1.0  # z high, x high
    half = np.array([SHAPE[2], SHAPE[1], SHAPE[0]]) * SPACING / 2
    zi, yi, xi = np.nonzero(volume.numpy())
    points = np.stack([(xi + 0.5) * SPACING - half[0], (yi + 0.5) * SPACING - half[1],
                       (zi + 0.5) * SPACING - half[2]], axis=1)
    return volume, half, points


def test_patient_right_and_head_appear_top_left_in_projection_and_splat():
    volume, half, points = _cube_volume()
    detector = Detector(32, field_of_view_mm=300.0)
    image = project(volume, half, Pose(), detector, n_points=64).numpy()
    row, col = np.unravel_index(np.argmax(image), image.shape)
    assert row < 16 and col < 16, "patient right must be on the viewer's left, head at the top"

    thickness = splat_thickness(points, SPACING**3, Pose(), detector)
    mask_rows, mask_cols = np.nonzero(thickness > 5.0)
    assert mask_rows.mean() < 16 and mask_cols.mean() < 16
    # The projected mask and the rendered cube overlap.
    assert (image[thickness > 5.0] > 5.0).mean() > 0.9


def test_line_integral_matches_path_length_through_a_slab():
    volume = torch.zeros(SHAPE)
    volume[:, 8:16, :] = 1.0  # 80 mm of water-equivalent material along y
    half = np.array([SHAPE[2], SHAPE[1], SHAPE[0]]) * SPACING / 2
    image = project(volume, half, Pose(), Detector(16, 100.0), n_points=200).numpy()
    np.testing.assert_allclose(image[6:10, 6:10], 80.0, rtol=0.05)


def test_splat_conserves_projected_volume():
    _, _, points = _cube_volume()
    pose = Pose()
    detector = Detector(64, 300.0)
    thickness = splat_thickness(points, SPACING**3, pose, detector, voxel_extent_mm=(SPACING, SPACING))
    magnification = pose.source_to_detector_mm / (pose.source_to_isocenter_mm + points[:, 1].mean())
    projected_volume = thickness.sum() * detector.pixel_mm**2 / magnification**2
    np.testing.assert_allclose(projected_volume, len(points) * SPACING**3, rtol=0.02)


def test_pose_moves_the_image():
    volume, half, _ = _cube_volume()
    detector = Detector(32, 300.0)
    still = project(volume, half, Pose(), detector, n_points=64).numpy()
    shifted = project(volume, half, Pose(translation_mm=(-60.0, 0.0, 0.0)), detector, n_points=64).numpy()
    # Moving the patient to their left (-x) moves the image to the viewer's right.
    assert np.argmax(shifted.sum(axis=0)) > np.argmax(still.sum(axis=0))


def test_detect_is_deterministic_bounded_and_noisier_at_low_dose():
    line = np.tile(np.linspace(50.0, 300.0, 32, dtype=np.float32), (32, 1))
    a = detect(line, Exposure(), 2.0, np.random.default_rng(1))
    b = detect(line, Exposure(), 2.0, np.random.default_rng(1))
    assert np.array_equal(a[1], b[1])
    for image in a:
        assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.corrcoef(line.ravel(), a[1].ravel())[0, 1] > 0.9  # attenuating = bright

    def roughness(photons: float) -> float:
        exposure = Exposure(photons_per_mm2=photons, blur_px=0.0, edge_enhance=0.0)
        _, display = detect(line, exposure, 2.0, np.random.default_rng(2))
        return float(np.abs(np.diff(display, axis=0)).mean())

    assert roughness(50.0) > 2 * roughness(50000.0)


def test_tone_curve_maps_unit_interval_onto_itself_monotonically():
    x = np.linspace(0, 1, 101)
    for gamma in (0.8, 1.0, 1.25):
        y = tone_curve(x, gamma)
        assert abs(y[0]) < 1e-6 and abs(y[-1] - 1) < 1e-6
        assert np.all(np.diff(y) > 0)


def test_zero_displacement_is_identity_and_random_field_is_smooth():
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    still = smooth_displacement(np.random.default_rng(1), 32, 0.0)
    assert np.array_equal(warp(image, still), image)
    # 1 px at 32 px is the default's ratio (10 mm over a 360 mm field is 0.9 px).
    field = smooth_displacement(np.random.default_rng(1), 32, 1.0)
    assert field.shape == (2, 32, 32)
    assert 0.3 < np.abs(field).mean() < 3.0
    assert np.abs(np.diff(field, axis=1)).max() < 0.5  # no folding: neighbours move together
