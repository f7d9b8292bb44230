"""Breast soft tissue added to the CT before projection: the physical sex signal of the demo cohort.

The example CT has no sex-specific anatomy visible on a radiograph, so female studies get two
ellipsoids of soft tissue (~40 HU, fat/glandular mix) on the anterior chest wall, over the lower
lung zones, filling only air voxels in front of the skin. ``size`` in [0, 1] scales the radii and
the protrusion and lets larger breasts sag (ptosis); size 0 adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data.demo.ct import PreparedCT

BREAST_ATTENUATION = 1.04  # 40 HU, water-equivalent
_EDGE_MM = 1.5


@dataclass(frozen=True)
class BreastAnchors:
    """Where breasts sit on this CT: per-side centre (x, z) in mm and the skin's y at any (z, x)."""

    centers_xz: dict[str, tuple[float, float]]
    skin_y_index: np.ndarray  # (Z, X) anterior-most body voxel along y, -1 where no body


@dataclass(frozen=True)
class BreastEdit:
    """Tissue fraction in a box of the volume: the edit applied before projection."""

    box: tuple[slice, slice, slice]
    fraction: np.ndarray  # float32 in [0, 1], box-shaped


def breast_anchors(ct: PreparedCT) -> BreastAnchors:
    """Centres over each lung's mid-clavicular line, at 30% of the lung height above its base."""
    skin = np.where(ct.body.any(axis=1), ct.body.shape[1] - 1 - np.argmax(ct.body[:, ::-1, :], axis=1), -1)
    centers = {}
    for side, lung in (("left", ct.lung_left), ("right", ct.lung_right)):
        points = ct.voxel_centers(lung)
        z_low, z_high = np.percentile(points[:, 2], [1, 99])
        centers[side] = (float(np.median(points[:, 0])), float(z_low + 0.3 * (z_high - z_low)))
    return BreastAnchors(centers, skin.astype(np.int32))


def breast_edits(ct: PreparedCT, anchors: BreastAnchors, size: float,
                 offset_mm: tuple[float, float] = (0.0, 0.0), asymmetry: float = 0.0) -> list[BreastEdit]:
    """Two breasts of ``size`` (0..1); ``offset_mm`` (x, z) shifts both, ``asymmetry`` scales one side."""
    if size <= 0:
        return []
    sz, sy, sx = ct.spacing
    hx, hy, hz = ct.half_extent
    edits = []
    for side, scale in (("left", 1.0 + asymmetry), ("right", 1.0 - asymmetry)):
        s = float(np.clip(size * scale, 0.0, 1.2))
        radii = np.array([40.0 + 30.0 * s, 12.0 + 55.0 * s, 35.0 + 25.0 * s])  # x, y (protrusion), z
        cx, cz = anchors.centers_xz[side]
        cx += offset_mm[0] * (1 if side == "left" else -1)
        cz += offset_mm[1] - 15.0 * s  # heavier breasts sit lower
        ix, iz = int((cx + hx) / sx), int((cz + hz) / sz)
        skin_index = anchors.skin_y_index[np.clip(iz, 0, ct.shape[0] - 1), np.clip(ix, 0, ct.shape[2] - 1)]
        cy = (skin_index + 0.5) * sy - hy - 0.35 * radii[1]
        center = np.array([cx, cy, cz])
        low = np.floor((center - radii - 2 * _EDGE_MM + [hx, hy, hz]) / [sx, sy, sz]).astype(int)
        high = np.ceil((center + radii + 2 * _EDGE_MM + [hx, hy, hz]) / [sx, sy, sz]).astype(int)
        low = np.maximum(low, 0)
        high = np.minimum(high, [ct.shape[2], ct.shape[1], ct.shape[0]])
        box = (slice(low[2], high[2]), slice(low[1], high[1]), slice(low[0], high[0]))
        zz = ((np.arange(low[2], high[2]) + 0.5) * sz - hz - center[2])[:, None, None]
        yy = ((np.arange(low[1], high[1]) + 0.5) * sy - hy - center[1])[None, :, None]
        xx = ((np.arange(low[0], high[0]) + 0.5) * sx - hx - center[0])[None, None, :]
        radius = np.sqrt((xx / radii[0]) ** 2 + (yy / radii[1]) ** 2 + (zz / radii[2]) ** 2)
        fraction = 1.0 / (1.0 + np.exp(-(1.0 - radius) * radii.min() / _EDGE_MM))
        fraction = np.where(ct.body[box], 0.0, fraction).astype(np.float32)  # only fill air
        edits.append(BreastEdit(box, fraction))
    return edits
