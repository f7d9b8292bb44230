"""Pleural effusion in the CT, before projection ("lamellar" model for an upright patient).

Free fluid lines the pleural space and thickens towards the base. For every lung voxel of one side,
with ``d`` its distance (mm) to the pleural surface and ``z`` its height (mm) above that lung's
lowest voxel, the fluid fraction is ``sigmoid((t(z) - d) / 2 mm)`` (minus its value at ``t = 0``)
with sheet thickness
``t(z) = 15 mm · exp(-(z - h) / 35 mm)``. The sheet fills the base and, seen edge-on at the lateral
chest wall, projects as a meniscus. ``h`` is set from the requested volume in mL through a lookup
table built once per voxel grid. Fluid replaces lung (no compression or mediastinal shift).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.data.demo.ct import PreparedCT
from pipeline.runtime.atomic import atomic_write_bytes

FLUID_ATTENUATION = 1.01  # 10 HU, water-equivalent
SIDES = ("left", "right")
_EDGE_MM = 2.0
_SHEET_MM = 15.0
_DECAY_MM = 35.0
_LUT_HEIGHTS_MM = np.arange(-120.0, 260.0, 2.0)
CACHE_VERSION = 1  # bump when the model above changes, so cached tables are rebuilt


@dataclass(frozen=True)
class LungSide:
    """One lung's bounding box and, inside it, distance to the pleura and height above the base."""

    box: tuple[slice, slice, slice]
    mask: np.ndarray  # bool, box-shaped
    distance_mm: np.ndarray  # float32, box-shaped
    height_mm: np.ndarray  # float32, box-shaped (broadcast along y, x)
    lut_heights_mm: np.ndarray
    lut_volumes_ml: np.ndarray  # increasing with height

    def fraction_at(self, h_mm: float) -> np.ndarray:
        thickness = _SHEET_MM * np.exp(-(self.height_mm - h_mm) / _DECAY_MM)
        fraction = 1.0 / (1.0 + np.exp(-(thickness - self.distance_mm) / _EDGE_MM))
        # Subtract the zero-thickness limit so that the soft edge alone adds no fluid rind.
        rind = 1.0 / (1.0 + np.exp(self.distance_mm / _EDGE_MM))
        fraction = np.clip((fraction - rind) / (1.0 - rind), 0.0, 1.0)
        return np.where(self.mask, fraction, 0.0).astype(np.float32)

    def height_for_volume(self, volume_ml: float) -> float:
        if not self.lut_volumes_ml[0] <= volume_ml <= self.lut_volumes_ml[-1]:
            raise ValueError(
                f"effusion volume {volume_ml:.0f} mL outside the modelled range "
                f"[{self.lut_volumes_ml[0]:.0f}, {self.lut_volumes_ml[-1]:.0f}] mL"
            )
        return float(np.interp(volume_ml, self.lut_volumes_ml, self.lut_heights_mm))

    def fraction_for_volume(self, volume_ml: float) -> np.ndarray:
        return self.fraction_at(self.height_for_volume(volume_ml))


def lung_side(ct: PreparedCT, side: str, cache: str | Path | None = None) -> LungSide:
    """Distance/height fields and the volume(h) table for the ``side`` lung of ``ct``.

    The distance transform and the table take seconds; with ``cache`` (an ``.npz`` path that must be
    specific to ``ct``) they are computed once and reloaded afterwards.
    """
    if side not in SIDES:
        raise ValueError(f"unknown effusion side {side!r}; expected one of {SIDES}")
    lung = ct.lung_left if side == "left" else ct.lung_right
    found = ndimage.find_objects(lung.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in found)
    mask = lung[box]
    z_index = np.arange(mask.shape[0], dtype=np.float32)
    base = np.nonzero(mask.any(axis=(1, 2)))[0][0]
    height = ((z_index - base) * ct.spacing[0])[:, None, None].astype(np.float32)
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            if data["distance_mm"].shape == mask.shape:
                distance, volumes = data["distance_mm"], data["lut_volumes_ml"]
                return LungSide(box, mask, distance, height, _LUT_HEIGHTS_MM, volumes)

    distance = ndimage.distance_transform_edt(mask, sampling=ct.spacing).astype(np.float32)
    side_fields = LungSide(box, mask, distance, height, _LUT_HEIGHTS_MM, np.zeros_like(_LUT_HEIGHTS_MM))
    volumes = np.array([side_fields.fraction_at(h).sum() * ct.voxel_ml for h in _LUT_HEIGHTS_MM])
    volumes = np.maximum.accumulate(volumes)
    if cache is not None:
        buffer = io.BytesIO()
        np.savez(buffer, distance_mm=distance, lut_volumes_ml=volumes)
        atomic_write_bytes(cache, buffer.getvalue())
    return LungSide(box, mask, distance, height, _LUT_HEIGHTS_MM, volumes)
