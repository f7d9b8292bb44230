"""Support devices placed in the CT before projection: a chest drain, ECG electrodes with leads, a pacemaker.

Each device is built per study as a dense point cloud (0.5 mm spacing) in patient coordinates
(volume mm: x to patient right, y anterior, z superior), every point carrying the linear attenuation
of its material and its volume. The device *replaces* the tissue it occupies, so what is projected
is the excess attenuation ``mu_device - mu_tissue`` (tissue read from the edited CT), splatted onto
the detector with the study's pose and magnification. Splatting integrates over each detector pixel,
so a 1 mm radio-opaque stripe or a 0.7 mm copper wire is neither missed nor aliased, which a ray march
with ~10 mm steps between sample planes would do.

Positions come from the TotalSegmentator label map of the one CT (cached once per CT grid):

- **chest drain**: enters the skin of the lateral chest wall at the mid-axillary line, mid-to-lower
  thorax, crosses the chest wall horizontally into the pleural space, then runs in the pleural space
  (a shell 3-8 mm inside the lung surface) posteriorly, down and medially, its tip above the posterior
  costophrenic recess (lower, the tip would project under the dome, where the abdomen saturates).
  The outside segment hangs down and out of the field. Silicone tube (28 Fr), air lumen, a barium
  stripe along one side that stops at the last side hole (the "sentinel eye").
- **ECG**: 3-5 monitoring electrodes on the anterior skin (right and left infraclavicular, left and
  right lower costal margin, one precordial); each a foam pad, a hydrogel disc and a steel snap;
  leads (copper in PVC) draped on the skin, converging to a trunk cable leaving the field below.
- **pacemaker**: a titanium can in a subcutaneous pocket below the left clavicle, its lead through the
  left brachiocephalic vein and the superior vena cava, across the right atrium to the right
  ventricular apex.

Attenuations are water-equivalent (water = 1) at the ~60 keV effective energy of a 120 kVp chest
exposure, from NIST XCOM mass attenuation coefficients times density: copper 1.59 cm²/g x 8.96 g/cm³
over water's 0.206 /cm = 69; steel (iron 1.21 x 7.9) = 46; titanium (0.27 x 4.5) = 6; a barium
sulfate-filled stripe (~40% BaSO4) ~ 25; silicone or PVC tubing ~ 1.5.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import interpolate, ndimage

from pipeline.data.demo.ct import PreparedCT, label_map
from pipeline.data.demo.effusion import LungSide

log = logging.getLogger(__name__)

DEVICE_KINDS = ("chest_drain", "ecg", "pacemaker")
STEP_MM = 0.5  # point spacing of the device clouds: well below the finest detector pixel (1.4 mm at 256)

AIR, FOAM, HYDROGEL, TUBING = 0.0, 0.1, 1.0, 1.5
BARIUM_STRIPE, TITANIUM, STEEL, COPPER = 25.0, 6.0, 46.0, 69.0
EPOXY = 1.3  # pacemaker header
BATTERY = 9.0  # lithium-iodine cell in a steel case, averaged over its thickness
LEAD_COIL = 18.0  # MP35N coil, ~40% metal fill of the conductor's cross-section

HEART, SVC, BRACHIOCEPHALIC_VEIN_LEFT, CLAVICLE_LEFT = 51, 62, 59, 73


@dataclass(frozen=True)
class DeviceCloud:
    """Points ``(n, 3)`` (volume mm), their material attenuation and volume (mm³)."""

    points: np.ndarray
    attenuation: np.ndarray
    volume_mm3: np.ndarray

    @staticmethod
    def join(parts: Sequence[DeviceCloud]) -> DeviceCloud:
        parts = [p for p in parts if len(p.points)]
        if not parts:
            return DeviceCloud(np.zeros((0, 3)), np.zeros(0), np.zeros(0))
        return DeviceCloud(*(np.concatenate([getattr(p, f) for p in parts])
                             for f in ("points", "attenuation", "volume_mm3")))


@dataclass(frozen=True)
class DeviceParams:
    """The random choices of one study's devices (drawn in the plan; geometry is rebuilt from them)."""

    drain_side: str  # "left" / "right"
    drain_entry: float  # entry height as a fraction of the lung's height above its base
    drain_stripe_angle: float  # radians, where the stripe runs around the tube
    ecg_electrodes: int  # 3..5
    ecg_offsets_mm: tuple[tuple[float, float], ...]  # (x, z) jitter per electrode site
    ecg_trunk_x: float  # fraction of the half chest width, where the leads converge
    pacemaker_offset_mm: tuple[float, float]  # (x, z) jitter of the pocket


def sample_device_params(rng: np.random.Generator) -> DeviceParams:
    return DeviceParams(
        drain_side=("left", "right")[int(rng.integers(2))],
        drain_entry=float(rng.uniform(0.35, 0.5)),
        drain_stripe_angle=float(rng.uniform(0, 2 * np.pi)),
        ecg_electrodes=int(rng.integers(3, 6)),
        ecg_offsets_mm=tuple((float(x), float(z)) for x, z in rng.uniform(-15, 15, size=(5, 2))),
        ecg_trunk_x=float(rng.uniform(-0.5, 0.3)),
        pacemaker_offset_mm=tuple(float(v) for v in rng.uniform(-10, 10, 2)),
    )


# --------------------------------------------------------------------------------------------- anchors
@dataclass(frozen=True)
class DeviceAnchors:
    """Where devices attach in this CT, all in volume mm."""

    skin_y: np.ndarray  # (Z, X) anterior skin y per (z, x) column; off the body, the nearest column's
    body: np.ndarray  # (Z, Y, X) bool
    pleural_shell: dict[str, np.ndarray]  # side -> (n, 3) points 3-8 mm inside the lung surface
    lung_extent: dict[str, np.ndarray]  # side -> [[xmin, ymin, zmin], [xmax, ymax, zmax]]
    heart: np.ndarray  # (n, 3)
    svc: np.ndarray
    brachiocephalic_left: np.ndarray
    clavicle_left: np.ndarray
    spacing: tuple[float, float, float]
    half_extent: np.ndarray

    def skin_at(self, x: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Anterior skin y (mm) under points (x, z) (off the body: of the nearest column with body)."""
        return self.skin_y[self._index(z, 2, 0), self._index(x, 0, 2)]

    def lateral_skin_x(self, point: np.ndarray, sign: float) -> float:
        """x (mm) where the body ends walking from ``point`` outwards (``sign`` +1: to patient right)."""
        zi, yi, xi = self._index(point[2], 2, 0), self._index(point[1], 1, 1), self._index(point[0], 0, 2)
        row = self.body[zi, yi]
        step = 1 if sign > 0 else -1
        inside = lambda i: 0 <= i + step < row.shape[0]  # noqa: E731
        while inside(xi) and not row[xi + step]:  # out of the aerated lung ...
            xi += step
        while inside(xi) and row[xi + step]:  # ... and through the chest wall to the air
            xi += step
        return float((xi + 1.0 if sign > 0 else xi) * self.spacing[2] - self.half_extent[0])

    def _index(self, mm, axis_xyz: int, axis_zyx: int):
        size = self.body.shape[axis_zyx]
        spacing = self.spacing[axis_zyx]
        index = np.floor((np.asarray(mm) + self.half_extent[axis_xyz]) / spacing).astype(int)
        return np.clip(index, 0, size - 1)


@functools.lru_cache(maxsize=2)
def _labels(inplane_voxels: int) -> np.ndarray:
    return label_map(inplane_voxels)


def device_anchors(ct: PreparedCT, sides: dict[str, LungSide], cache_dir: str | Path | None) -> DeviceAnchors:
    """Skin, pleural shells and the structures the pacemaker lead follows; label points cached as .npz."""
    inplane = ct.shape[2]
    cache = Path(cache_dir) / f"device-anchors-{inplane}-v1.npz" if cache_dir else None
    names = ("heart", "svc", "brachiocephalic_left", "clavicle_left")
    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            structures = {n: data[n] for n in names}
    else:
        labels = _labels(inplane)
        if labels.shape != ct.shape:
            raise ValueError(f"label map {labels.shape} does not match the prepared CT {ct.shape}")
        structures = {n: ct.voxel_centers(labels == v)
                      for n, v in zip(names, (HEART, SVC, BRACHIOCEPHALIC_VEIN_LEFT, CLAVICLE_LEFT))}
        if cache is not None:
            import io

            from pipeline.runtime.atomic import atomic_write_bytes

            buffer = io.BytesIO()
            np.savez(buffer, **structures)
            atomic_write_bytes(cache, buffer.getvalue())

    # Anterior skin: the most anterior body voxel of each (z, x) column.
    body = ct.body
    has_body = body.any(axis=1)
    front = body.shape[1] - 1 - np.argmax(body[:, ::-1, :], axis=1)
    skin_y = (front + 1.0) * ct.spacing[1] - ct.half_extent[1]
    # off the body (a lead leaving the field) keep the height of the nearest skin
    nearest = ndimage.distance_transform_edt(~has_body, return_distances=False, return_indices=True)
    skin_y = skin_y[tuple(nearest)]

    shells, extents = {}, {}
    for side, lung in sides.items():
        inset = lung.mask & (lung.distance_mm >= 3.0) & (lung.distance_mm <= 8.0)
        full = np.zeros(ct.shape, dtype=bool)
        full[lung.box] = inset
        shells[side] = ct.voxel_centers(full)
        points = ct.voxel_centers(ct.lung_left if side == "left" else ct.lung_right)
        extents[side] = np.stack([points.min(axis=0), points.max(axis=0)])
    return DeviceAnchors(skin_y.astype(np.float32), body, shells, extents, structures["heart"],
                         structures["svc"], structures["brachiocephalic_left"], structures["clavicle_left"],
                         ct.spacing, ct.half_extent)


# ------------------------------------------------------------------------------------------ primitives
def smooth_path(waypoints: np.ndarray, step: float = STEP_MM) -> np.ndarray:
    """A smooth curve through ``waypoints`` ``(m, 3)`` (cubic in chord length), a point every ``step`` mm."""
    chord = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(waypoints, axis=0), axis=1))])
    spline = interpolate.make_interp_spline(chord, waypoints, k=min(3, len(waypoints) - 1))
    dense = spline(np.linspace(0.0, chord[-1], max(int(chord[-1] / step * 4), 2)))
    length = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    return interpolate.interp1d(length, dense, axis=0)(np.arange(0.0, length[-1], step))


def _frames(path: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit normals per path point, rotation-minimising (parallel transport of the first)."""
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    reference = np.array([0.0, 1.0, 0.0]) if abs(tangent[0, 1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    normal = np.empty_like(path)
    normal[0] = np.cross(tangent[0], reference)
    normal[0] /= np.linalg.norm(normal[0])
    for i in range(1, len(path)):
        n = normal[i - 1] - tangent[i] * (normal[i - 1] @ tangent[i])
        normal[i] = n / np.linalg.norm(n)
    return normal, np.cross(tangent, normal)


def tube(path: np.ndarray, layers: Sequence[tuple[float, float]],
         stripe: tuple[float, float, float, float] | None = None,
         stripe_gaps: Sequence[tuple[float, float]] = (), step: float = STEP_MM) -> DeviceCloud:
    """A tube along ``path`` (resampled every ``step`` mm) with concentric ``layers`` of ``(outer
    radius mm, attenuation)`` from the inside out. ``stripe``: ``(angle, half width mm, depth mm,
    attenuation)``, a band of the outer layer at that angle, absent at arc lengths in ``stripe_gaps``."""
    radius = layers[-1][0]
    grid = np.arange(-radius + step / 2, radius, step)
    u, v = (a.ravel() for a in np.meshgrid(grid, grid))
    r = np.hypot(u, v)
    keep = r <= radius
    u, v, r = u[keep], v[keep], r[keep]
    mu = np.full(r.shape, layers[-1][1])
    for outer, value in reversed(layers[:-1]):
        mu[r <= outer] = value
    normal, binormal = _frames(path)
    points = (path[:, None, :] + u[None, :, None] * normal[:, None, :]
              + v[None, :, None] * binormal[:, None, :])
    attenuation = np.broadcast_to(mu, (len(path), len(mu))).copy()
    if stripe is not None:
        angle, half_width, depth, value = stripe
        across = np.abs(-u * np.sin(angle) + v * np.cos(angle))
        along = u * np.cos(angle) + v * np.sin(angle)
        in_stripe = (across <= half_width) & (along >= radius - depth)
        arc = np.arange(len(path)) * step
        covered = np.ones(len(path), dtype=bool)
        for start, stop in stripe_gaps:
            covered &= ~((arc >= start) & (arc < stop))
        attenuation[np.ix_(covered, in_stripe)] = value
    volume = np.full(attenuation.size, step**3)
    return DeviceCloud(points.reshape(-1, 3), attenuation.ravel(), volume)


def disc(center: np.ndarray, layers: Sequence[tuple[float, float, float, float]], step: float = STEP_MM
         ) -> DeviceCloud:
    """Stacked discs facing +y (anterior) at ``center``: ``(radius, y from, y to, attenuation)`` each,
    later layers overriding earlier ones where they overlap."""
    radius = max(layer[0] for layer in layers)
    y_low, y_high = min(layer[1] for layer in layers), max(layer[2] for layer in layers)
    g = np.arange(-radius + step / 2, radius, step)
    h = np.arange(y_low + step / 2, y_high, step)
    x, y, z = (a.ravel() for a in np.meshgrid(g, h, g, indexing="ij"))
    r = np.hypot(x, z)
    mu = np.full(r.shape, np.nan)
    for rad, lo, hi, value in layers:
        mu[(r <= rad) & (y >= lo) & (y < hi)] = value
    keep = ~np.isnan(mu)
    points = np.stack([x[keep], y[keep], z[keep]], axis=1) + center
    return DeviceCloud(points, mu[keep], np.full(int(keep.sum()), step**3))


def slab(center: np.ndarray, half_size: tuple[float, float, float], attenuation, corner_mm: float,
         step: float = STEP_MM) -> DeviceCloud:
    """A rounded box (half sizes x, y, z; corners of radius ``corner_mm`` in the x-z plane);
    ``attenuation(x, z)`` of the local coordinates gives the material inside."""
    axes = [np.arange(-s + step / 2, s, step) for s in half_size]
    x, y, z = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    hx, _, hz = half_size
    dx, dz = np.maximum(np.abs(x) - (hx - corner_mm), 0.0), np.maximum(np.abs(z) - (hz - corner_mm), 0.0)
    keep = np.hypot(dx, dz) <= corner_mm
    x, y, z = x[keep], y[keep], z[keep]
    return DeviceCloud(np.stack([x, y, z], axis=1) + center, attenuation(x, z), np.full(len(x), step**3))


# ------------------------------------------------------------------------------------------- devices
def chest_drain(anchors: DeviceAnchors, params: DeviceParams) -> DeviceCloud:
    side = params.drain_side
    sign = 1.0 if side == "right" else -1.0  # +x is the patient's right
    shell = anchors.pleural_shell[side]
    low, high = anchors.lung_extent[side][:, 2]
    z_entry = low + params.drain_entry * (high - low)

    def band(z_from: float, z_to: float) -> np.ndarray:
        return shell[(shell[:, 2] >= z_from) & (shell[:, 2] <= z_to)]

    entry_band = band(z_entry - 4.0, z_entry + 4.0)
    pleural_entry = entry_band[np.argmax(sign * entry_band[:, 0])]  # most lateral: mid-axillary line
    skin = pleural_entry.copy()
    skin[0] = anchors.lateral_skin_x(pleural_entry, sign)
    lateral_band = band(low + 70.0, low + 90.0)
    lateral_band = lateral_band[sign * lateral_band[:, 0] > sign * np.median(shell[:, 0])]
    posterolateral = lateral_band[np.argmin(lateral_band[:, 1] - 0.5 * sign * lateral_band[:, 0])]
    tip_band = band(low + 50.0, low + 70.0)
    tip_band = tip_band[sign * tip_band[:, 0] < sign * np.median(shell[:, 0])]
    tip = tip_band[np.argmin(tip_band[:, 1])]  # posterior pleural space above the recess, towards the spine
    outside = [skin + [sign * 60.0, 0.0, -250.0], skin + [sign * 30.0, 0.0, -70.0],
               skin + [sign * 8.0, 0.0, -8.0]]
    path = smooth_path(np.array([*outside, skin, pleural_entry, posterolateral, tip]))[::-1]  # tip first
    # 28 Fr (9.3 mm): 1.5 mm silicone wall around an air lumen; a 1.6 mm barium stripe filling the outer
    # wall, interrupted over the last side hole 15-25 mm from the tip.
    return tube(path, layers=[(3.2, AIR), (4.7, TUBING)],
                stripe=(params.drain_stripe_angle, 0.8, 1.5, BARIUM_STRIPE), stripe_gaps=[(15.0, 25.0)])


def ecg(anchors: DeviceAnchors, params: DeviceParams) -> DeviceCloud:
    right, left = anchors.lung_extent["right"], anchors.lung_extent["left"]
    half_width = (right[1, 0] - left[0, 0]) / 2.0
    top, base_left, base_right = min(right[1, 2], left[1, 2]), left[0, 2], right[0, 2]
    sites = [  # RA, LA, LL, RL, V (x, z)
        (0.6 * half_width, top - 35.0), (-0.6 * half_width, top - 35.0),
        (-0.6 * half_width, base_left + 10.0), (0.6 * half_width, base_right + 10.0),
        (-0.15 * half_width, (top + base_left) / 2.0 - 20.0),
    ][: params.ecg_electrodes]
    parts = []
    trunk = np.array([params.ecg_trunk_x * half_width, base_left - 60.0])
    for (x, z), (dx, dz) in zip(sites, params.ecg_offsets_mm):
        x, z = x + dx, z + dz
        skin = float(anchors.skin_at(np.array([x]), np.array([z]))[0])
        center = np.array([x, skin, z])
        # foam pad, gel, and the steel snap (stud plus eyelet) standing on it
        parts.append(disc(center, [(18.0, 0.0, 1.0, FOAM), (9.0, 0.0, 1.0, HYDROGEL),
                                   (4.5, 1.0, 1.5, STEEL), (2.3, 1.5, 4.5, STEEL)]))
        # the lead clips onto the snap and drapes on the skin towards the trunk cable below the field
        xz = np.array([[x, z], [x + 0.3 * (trunk[0] - x), z - 20.0], trunk, trunk + [10.0, -200.0]])
        path = smooth_path(np.column_stack([xz[:, 0], np.zeros(len(xz)), xz[:, 1]]))
        path[:, 1] = anchors.skin_at(path[:, 0], path[:, 2]) + 6.0
        parts.append(tube(path, layers=[(0.5, COPPER), (1.5, TUBING)]))  # 1 mm stranded copper in PVC
    return DeviceCloud.join(parts)


def pacemaker(anchors: DeviceAnchors, params: DeviceParams) -> DeviceCloud:
    left = anchors.lung_extent["left"]
    half_width = (anchors.lung_extent["right"][1, 0] - left[0, 0]) / 2.0
    x = -0.5 * half_width + params.pacemaker_offset_mm[0]
    clavicle = anchors.clavicle_left
    near = clavicle[np.abs(clavicle[:, 0] - x) < 10.0]
    z = float(near[:, 2].min()) - 40.0 + params.pacemaker_offset_mm[1]
    skin = float(anchors.skin_at(np.array([x]), np.array([z]))[0])
    center = np.array([x, skin - 8.0, z])  # a pocket in front of pectoralis, 4 mm under the skin

    def can_material(u: np.ndarray, w: np.ndarray) -> np.ndarray:
        # header (epoxy) on top, electronics in the middle, the battery at the bottom
        return np.where(w > 14.0, EPOXY, np.where(w < -2.0, BATTERY, TITANIUM))

    can = slab(center, (24.0, 3.5, 24.0), can_material, corner_mm=10.0)
    heart = anchors.heart
    right_atrium = heart[heart[:, 0] > np.quantile(heart[:, 0], 0.8)]
    right_atrium = right_atrium[right_atrium[:, 2] > np.median(right_atrium[:, 2])].mean(axis=0)
    low = heart[:, 2] < np.quantile(heart[:, 2], 0.15)
    low_anterior = low & (heart[:, 1] > np.quantile(heart[:, 1], 0.6))
    apex = heart[low_anterior]
    apex = apex[np.argsort(apex[:, 0])[: max(len(apex) // 4, 1)]].mean(axis=0)  # leftmost: the apex
    svc = anchors.svc
    waypoints = np.array([
        center + [12.0, 0.0, 24.0],  # out of the header
        center + [25.0, -5.0, 40.0],
        [x + 25.0, skin - 30.0, float(near[:, 2].min()) - 5.0],  # into the subclavian vein under the clavicle
        anchors.brachiocephalic_left.mean(axis=0),
        svc[svc[:, 2] > np.quantile(svc[:, 2], 0.8)].mean(axis=0),
        svc[svc[:, 2] < np.quantile(svc[:, 2], 0.2)].mean(axis=0),
        right_atrium,
        (right_atrium + apex) / 2.0 + [0.0, 10.0, 0.0],  # across the tricuspid valve
        apex,
    ])
    lead = tube(smooth_path(waypoints), layers=[(0.9, LEAD_COIL), (1.3, TUBING)])
    return DeviceCloud.join([can, lead])


BUILDERS = {"chest_drain": chest_drain, "ecg": ecg, "pacemaker": pacemaker}


def build_device(kind: str, anchors: DeviceAnchors, params: DeviceParams) -> DeviceCloud:
    if kind not in BUILDERS:
        raise ValueError(f"unknown device {kind!r}; expected one of {DEVICE_KINDS}")
    return BUILDERS[kind](anchors, params)
