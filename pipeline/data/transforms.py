"""MONAI transform chains: file -> cached 8-bit working image, and light training augmentation.

Ingest chain (dictionary transforms on key ``"image"``, see :func:`ingest_transforms`)::

    LoadRadiographd                   RadiographReader only; rows x cols float in [0, 1], never transposed
    EnsureChannelFirstd               (1, H, W)
    SquarePadd                        centred pad to a square, keeps the aspect ratio
    Resized(mode="area")              (1, size, size); area = box average, no aliasing
    ScaleIntensityd(0, 1)             per-image min-max to [0, 1]
    QuantizeTo8Bitd                   values k/255 (the 8-bit grid of ARCHITECTURE.md)
    AsUint8d                          uint8 k, what the ingest cache stores

The pad adds the image's own background (its minimum, or its edge pixels) rather than a fixed
value, so the border does not become a new "structure" for the classifier or the prior.
:func:`to_working_resolution` applies the same geometry to ground-truth masks so that they stay
aligned with the cached images.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    RandAffined,
    Randomizable,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityd,
    SpatialPad,
    Transform,
)

from pipeline.io.readers import RadiographReader

MIN_SIZE, MAX_SIZE = 32, 256
DEFAULT_SIZE = 64
PAD_MODES = ("min", "edge")
MASK_THRESHOLD = 0.5  # a working pixel is "in the mask" when at least half of its area is


def validate_size(size: int) -> int:
    """The working resolution: an int in [``MIN_SIZE``, ``MAX_SIZE``]."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"working size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    return int(size)


def _as_tensor(img: Any) -> torch.Tensor:
    return img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))


class LoadRadiographd(LoadImaged):
    """``LoadImaged`` that reads with :class:`RadiographReader` and nothing else.

    A plain ``LoadImaged(reader=RadiographReader())`` catches our reader's error and falls back to
    MONAI's other readers, which accept what we reject (a CT slice loads fine with PydicomReader),
    so a bad file would silently pass. Passing the reader at call time makes MONAI use it alone.
    """

    def __init__(self, keys: KeysCollection, voi: str = "auto", allow_missing_keys: bool = False) -> None:
        self.radiograph_reader = RadiographReader(voi=voi)
        super().__init__(keys, reader=self.radiograph_reader, image_only=True,
                         allow_missing_keys=allow_missing_keys)

    def __call__(
        self, data: Mapping[Hashable, Any], reader: RadiographReader | None = None
    ) -> dict[Hashable, Any]:
        return super().__call__(data, reader=reader or self.radiograph_reader)


class SquarePad(Transform):
    """Pad a channel-first ``(C, H, W)`` image to ``(C, L, L)``, ``L = max(H, W)``, centred.

    ``mode="min"`` pads with the image minimum (the background of a radiograph display);
    ``mode="edge"`` repeats the border pixels. Masks use ``mode="min"``, i.e. zero for a mask.
    """

    def __init__(self, mode: str = "min") -> None:
        if mode not in PAD_MODES:
            raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
        self.mode = mode

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = _as_tensor(img)
        if img.ndim != 3:
            raise ValueError(f"SquarePad expects (C, H, W), got shape {tuple(img.shape)}")
        side = max(img.shape[-2:])
        if self.mode == "edge":
            pad = SpatialPad(spatial_size=(side, side), method="symmetric", mode="replicate")
        else:
            pad = SpatialPad(spatial_size=(side, side), method="symmetric", mode="constant",
                             value=float(img.min()))
        return pad(img)


class SquarePadd(MapTransform):
    """Dictionary version of :class:`SquarePad`."""

    def __init__(self, keys: KeysCollection, mode: str = "min", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pad = SquarePad(mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.pad(d[key])
        return d


class QuantizeTo8Bit(Transform):
    """Round values in [0, 1] to the nearest ``k/255`` (clipping first), dtype float32."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = _as_tensor(img)
        return torch.round(img.float().clamp(0.0, 1.0) * 255.0) / 255.0


class QuantizeTo8Bitd(MapTransform):
    """Dictionary version of :class:`QuantizeTo8Bit`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.quantize = QuantizeTo8Bit()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.quantize(d[key])
        return d


class AsUint8(Transform):
    """Values in [0, 1] -> ``uint8`` ``round(255 x)``; the inverse of ``x.float() / 255``."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = _as_tensor(img)
        return torch.round(img.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


class AsUint8d(MapTransform):
    """Dictionary version of :class:`AsUint8`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convert = AsUint8()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d


def ingest_transforms(
    size: int = DEFAULT_SIZE, voi: str = "auto", pad_mode: str = "min", keys: KeysCollection = "image"
) -> Compose:
    """File path under ``keys`` -> ``uint8`` ``(1, size, size)`` working image (see module docstring)."""
    size = validate_size(size)
    return Compose([
        LoadRadiographd(keys=keys, voi=voi),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        SquarePadd(keys=keys, mode=pad_mode),
        Resized(keys=keys, spatial_size=(size, size), mode="area"),
        ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0),
        QuantizeTo8Bitd(keys=keys),
        AsUint8d(keys=keys),
    ])


def to_working_resolution(
    array2d: np.ndarray, size: int = DEFAULT_SIZE, kind: str = "image", pad_mode: str = "min"
) -> np.ndarray:
    """The ingest chain's geometry (square pad + area resize) for an in-memory rows x cols array.

    ``kind="image"``: float32 ``(size, size)`` on the 8-bit grid, exactly what the ingest chain
    produces from a file with the same pixels (``cache / 255``).
    ``kind="mask"``: a binary mask (bool or 0/1), padded with 0, area-resized, then thresholded at
    half coverage; returns uint8 0/1 aligned pixel for pixel with the cached image.
    """
    size = validate_size(size)
    array2d = np.asarray(array2d)
    if array2d.ndim != 2:
        raise ValueError(f"expected a 2D rows x cols array, got shape {array2d.shape}")
    resize = Resize(spatial_size=(size, size), mode="area")
    if kind == "image":
        image = torch.as_tensor(array2d.astype(np.float32))[None]
        image = ScaleIntensity(minv=0.0, maxv=1.0)(resize(SquarePad(pad_mode)(image)))
        return _plain(QuantizeTo8Bit()(image))[0].numpy()
    if kind == "mask":
        values = np.unique(array2d)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"a mask must be binary (0/1 or bool), found values {values[:8].tolist()}")
        mask = torch.as_tensor(array2d.astype(np.float32))[None]
        coverage = _plain(resize(SquarePad("min")(mask)))[0]
        return (coverage >= MASK_THRESHOLD).to(torch.uint8).numpy()
    raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")


def _plain(img: torch.Tensor) -> torch.Tensor:
    return img.as_tensor() if isinstance(img, MetaTensor) else img


def training_augmentation(
    size: int = DEFAULT_SIZE,
    prob: float = 0.8,
    rotate_degrees: float = 5.0,
    translate_fraction: float = 0.04,
    scale_fraction: float = 0.05,
    keys: KeysCollection = "image",
    seed: int | None = None,
) -> Compose:
    """Light random affine on ``(1, size, size)`` images in [0, 1], re-quantized to the 8-bit grid.

    No flips: laterality matters in chest radiographs (heart on the patient's left, situs), so a
    mirrored radiograph is not a plausible one. Borders replicate edge pixels, not black.
    """
    size = validate_size(size)
    augmentation = Compose([
        RandAffined(
            keys=keys,
            prob=prob,
            rotate_range=(np.deg2rad(rotate_degrees),),
            translate_range=(translate_fraction * size, translate_fraction * size),
            scale_range=(scale_fraction, scale_fraction),
            mode="bilinear",
            padding_mode="border",
        ),
        QuantizeTo8Bitd(keys=keys),
    ])
    if seed is not None:
        augmentation.set_random_state(seed=seed)
    return augmentation


def augment_batch(
    images: torch.Tensor, augmentation: Randomizable | Compose, key: str = "image"
) -> torch.Tensor:
    """Apply a per-image dictionary ``augmentation`` to each item of an ``(N, 1, H, W)`` batch."""
    return torch.stack([_plain(augmentation({key: image})[key]) for image in images]).to(images.device)
