"""PA projection of the attenuation volume, projected masks, and a simple detector model.

Geometry (world mm, RAS+: x to patient right, y anterior, z superior, isocentre at the volume
centre): the source is behind the patient at ``y = -source_to_isocenter``, the detector plane in
front at ``y = isocenter_to_detector``. Image columns run from patient right to patient left and rows
from head to feet, the standard display of a PA radiograph. Patient pose (rotation, translation,
anisotropic scale) moves the volume, not the imaging chain.

Rendering is a trilinear ray march (``grid_sample``), which on this volume matches exact Siddon
tracing at 64–256 px at a fraction of the cost. Masks are instead obtained by *splatting* the voxels
of a structure onto the detector, giving its projected thickness in mm without another ray march.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.runtime.device import autocast


@dataclass(frozen=True)
class Pose:
    """Patient placement: Euler angles (deg, about x/y/z), translation (mm), per-axis scale, geometry."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    source_to_isocenter_mm: float = 1650.0
    isocenter_to_detector_mm: float = 150.0

    @property
    def source_to_detector_mm(self) -> float:
        return self.source_to_isocenter_mm + self.isocenter_to_detector_mm

    def rotation_matrix(self) -> np.ndarray:
        ax, ay, az = np.deg2rad(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def patient_to_world(self, points: np.ndarray) -> np.ndarray:
        """Volume coordinates ``(n, 3)`` -> world coordinates after scale, rotation and translation."""
        return (points * np.asarray(self.scale)) @ self.rotation_matrix().T + np.asarray(self.translation_mm)

    def world_to_patient(self, points: torch.Tensor, directions: bool = False) -> torch.Tensor:
        """World -> volume coordinates (inverse of :meth:`patient_to_world`); ``directions`` skip the shift."""
        inverse = torch.as_tensor(self.rotation_matrix(), dtype=points.dtype, device=points.device)
        if not directions:
            points = points - torch.as_tensor(self.translation_mm, dtype=points.dtype, device=points.device)
        return (points @ inverse) / torch.as_tensor(self.scale, dtype=points.dtype, device=points.device)


@dataclass(frozen=True)
class Detector:
    """Square detector of ``size`` pixels covering ``field_of_view_mm`` at the detector plane."""

    size: int
    field_of_view_mm: float = 360.0

    @property
    def pixel_mm(self) -> float:
        return self.field_of_view_mm / self.size

    def pixel_centers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """World x (per column) and z (per row) of pixel centres: column 0 = patient right, row 0 = head."""
        offsets = (torch.arange(self.size, device=device, dtype=torch.float32) + 0.5) * self.pixel_mm
        half = self.field_of_view_mm / 2.0
        return half - offsets, half - offsets


def project(
    volume: torch.Tensor, half_extent: np.ndarray, pose: Pose, detector: Detector, n_points: int = 96
) -> torch.Tensor:
    """Line integrals ``(size, size)`` (water-equivalent mm) through ``volume`` ``(Z, Y, X)``.

    Each ray is sampled at ``n_points`` equally spaced planes of constant ``y`` spanning the (posed)
    volume; the step length along the ray is the plane spacing divided by the ray's cosine.
    """
    device = volume.device
    xs, zs = detector.pixel_centers(device)
    source = torch.tensor([0.0, -pose.source_to_isocenter_mm, 0.0], device=device)
    det_y = pose.isocenter_to_detector_mm
    reach = float(np.linalg.norm(half_extent * np.asarray(pose.scale)))
    y_planes = torch.linspace(-reach, reach, n_points, device=device)
    # Fraction of the way from source to detector at each plane; same for every ray.
    t = (y_planes - source[1]) / (det_y - source[1])
    rays = torch.stack(
        [xs[None, :].expand(detector.size, -1), torch.full((detector.size,) * 2, det_y, device=device),
         zs[:, None].expand(-1, detector.size)], dim=-1,
    ) - source  # (rows, cols, 3)
    # The pose is affine, so map the source and the ray directions once, in grid units (-1..1),
    # and build the (rows, cols, n, 3) sample grid with a single broadcast.
    half = torch.as_tensor(half_extent, dtype=torch.float32, device=device)
    source_grid = pose.world_to_patient(source[None])[0] / half
    rays_grid = pose.world_to_patient(rays, directions=True) / half
    grid = (source_grid + t[None, None, :, None] * rays_grid[:, :, None, :])[None]
    with autocast(device):
        samples = F.grid_sample(volume[None, None], grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
    step = (y_planes[1] - y_planes[0]) * rays.norm(dim=-1) / rays[..., 1]
    return samples[0, 0].float().sum(dim=-1) * step


def splat_thickness(points_mm: np.ndarray, volume_mm3: np.ndarray | float, pose: Pose, detector: Detector,
                    voxel_extent_mm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Projected thickness (mm) on the detector of voxels at ``points_mm`` (volume coordinates).

    Each voxel contributes its volume divided by the detector-pixel footprint at its depth,
    spread bilinearly over the four nearest pixels and then over its own (x, z) extent
    ``voxel_extent_mm`` (a Gaussian with sigma half the projected voxel size), so that voxels
    coarser than a pixel leave no gaps between their rows.
    """
    size = detector.size
    out = np.zeros(size * size, dtype=np.float64)
    if len(points_mm) == 0:
        return out.reshape(size, size).astype(np.float32)
    world = pose.patient_to_world(points_mm)
    sy = -pose.source_to_isocenter_mm
    magnification = (pose.isocenter_to_detector_mm - sy) / (world[:, 1] - sy)
    half = detector.field_of_view_mm / 2.0
    col = (half - world[:, 0] * magnification) / detector.pixel_mm - 0.5
    row = (half - world[:, 2] * magnification) / detector.pixel_mm - 0.5
    weight = np.broadcast_to(volume_mm3, col.shape) * magnification**2 / detector.pixel_mm**2
    c0, r0 = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
    fc, fr = col - c0, row - r0
    corners = ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc))
    for dr, dc, w in corners:
        r, c = r0 + dr, c0 + dc
        inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        out += np.bincount(r[inside] * size + c[inside], weights=(weight * w)[inside], minlength=size * size)
    magnification_mean = float(magnification.mean())
    sigma = [e * magnification_mean / detector.pixel_mm / 2.0 for e in voxel_extent_mm[::-1]]
    return ndimage.gaussian_filter(out.reshape(size, size), sigma).astype(np.float32)


@dataclass(frozen=True)
class Exposure:
    """Detector and processing parameters of one acquisition."""

    photons_per_mm2: float = 5000.0  # unattenuated fluence; sets the quantum noise
    mu_water_per_mm: float = 0.02  # effective attenuation of water at chest-radiograph energies
    scatter_fraction: float = 0.3  # scatter added as a heavily blurred copy of the primary
    blur_px: float = 0.6  # detector point-spread function (Gaussian sigma, pixels)
    edge_enhance: float = 0.3  # unsharp-mask amount of the vendor processing
    gamma: float = 1.0  # tone-curve exponent


def detect(line_integral: np.ndarray, exposure: Exposure, pixel_mm: float, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Simulated acquisition and vendor processing.

    Returns ``(log_image, display)``: the normalised log image before the tone curve and the
    display image ``tone(log_image)``, both in [0, 1] with bright = attenuating (bone white).
    """
    expected, fluence = expected_counts(line_integral, exposure, pixel_mm)
    attenuation = -np.log(np.maximum(rng.poisson(expected), 1.0) / fluence)
    return process(attenuation, exposure, detection_window(attenuation))


def expected_counts(line_integral: np.ndarray, exposure: Exposure, pixel_mm: float
                    ) -> tuple[np.ndarray, float]:
    """Mean detected quanta per pixel (primary through the detector blur plus scatter), and the
    unattenuated count per pixel."""
    size = line_integral.shape[0]
    primary = np.exp(-exposure.mu_water_per_mm * line_integral.astype(np.float64))
    primary = ndimage.gaussian_filter(primary, exposure.blur_px)
    scatter = ndimage.gaussian_filter(primary, 0.1 * size) * exposure.scatter_fraction
    fluence = exposure.photons_per_mm2 * pixel_mm**2
    return (primary + scatter) * fluence, fluence


def detect_coupled(line_integral: np.ndarray, exposure: Exposure, pixel_mm: float, quantiles: np.ndarray
                   ) -> np.ndarray:
    """Attenuation image (``-log`` of counts over fluence) with Poisson noise drawn by inverse CDF from
    fixed ``quantiles`` (uniform in (0, 1), one per pixel).

    Common random numbers: two renders of one study that differ by a feature (a device, an
    effusion) get the same noise wherever the feature leaves the expected counts unchanged, so their
    difference is the feature and not a new noise draw. Each pixel is still exactly Poisson.
    """
    from scipy import stats

    expected, fluence = expected_counts(line_integral, exposure, pixel_mm)
    return -np.log(np.maximum(stats.poisson.ppf(quantiles, expected), 1.0) / fluence)


def detection_window(attenuation: np.ndarray) -> tuple[float, float]:
    """The auto-windowing of the vendor processing: the 1st and 99.5th percentile of the attenuation."""
    low, high = np.percentile(attenuation, [1.0, 99.5])
    return low, high


def process(attenuation: np.ndarray, exposure: Exposure, window: tuple[float, float]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Vendor processing of an attenuation image within ``window``: normalise, unsharp mask, clip, tone.

    Returns ``(log_image, display)`` as :func:`detect` does.
    """
    size = attenuation.shape[0]
    low, high = window
    normalised = (attenuation - low) / max(high - low, 1e-6)
    normalised += exposure.edge_enhance * (normalised - ndimage.gaussian_filter(normalised, 0.04 * size))
    log_image = np.clip(normalised, 0.0, 1.0)
    return log_image.astype(np.float32), tone_curve(log_image, exposure.gamma).astype(np.float32)


def sample_volume(volume: torch.Tensor, half_extent: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Trilinear values of ``volume`` ``(Z, Y, X)`` at ``points_mm`` ``(n, 3)`` (volume x, y, z mm);
    zero outside the volume, as the projector sees it."""
    if len(points_mm) == 0:
        return np.zeros(0, dtype=np.float32)
    grid = torch.as_tensor(points_mm / half_extent, dtype=torch.float32, device=volume.device)
    values = F.grid_sample(volume[None, None].float(), grid[None, None, None], mode="bilinear",
                           padding_mode="zeros", align_corners=False)
    return values.reshape(-1).cpu().numpy()


def area_mean(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` averaged over the pixels of a coarser ``size``² detector (the ingest chain's "area"
    resize), i.e. what a detector of that pixel size integrates."""
    pooled = F.adaptive_avg_pool2d(torch.as_tensor(image, dtype=torch.float64)[None, None], size)
    return pooled[0, 0].numpy()


def tone_curve(x: np.ndarray, gamma: float) -> np.ndarray:
    """S-shaped display curve with an exponent: lifts lung contrast the way vendor LUTs do."""
    s = 1.0 / (1.0 + np.exp(-6.0 * (np.power(np.clip(x, 0.0, 1.0), gamma) - 0.5)))
    lo, hi = 1.0 / (1.0 + np.exp(3.0)), 1.0 / (1.0 + np.exp(-3.0))
    return (s - lo) / (hi - lo)


def smooth_displacement(rng: np.random.Generator, size: int, amplitude_px: float, control_points: int = 5
                        ) -> np.ndarray:
    """A random smooth displacement field ``(2, size, size)`` in pixels (rows, cols).

    Gaussian displacements on a coarse ``control_points``² grid, interpolated linearly and then
    smoothed (no spline overshoot): a low-frequency deformation standing in for the anatomical
    variety a single CT lacks.
    """
    coarse = rng.normal(0.0, amplitude_px, size=(2, control_points, control_points))
    zoom = size / control_points
    fields = [ndimage.zoom(c, zoom, order=1, mode="nearest", grid_mode=True)[:size, :size] for c in coarse]
    return np.stack([ndimage.gaussian_filter(f, zoom / 2.0, mode="nearest") for f in fields])


def warp(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Resample ``image`` at ``identity + displacement`` (bilinear, edges extended)."""
    size = image.shape[0]
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + displacement
    return ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(image.dtype)
