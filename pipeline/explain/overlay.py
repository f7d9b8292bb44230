"""Overlay PNG of an attribution map: the radiograph in grey, the map as a semi-transparent colormap.

Composed with numpy + PIL from matplotlib's colormaps (as the study panels are), not one matplotlib
figure per study: figures cost ~100x more, and a cohort has hundreds of studies per method. The
opacity grows with the map's magnitude, so the anatomy stays visible where the map is ~0. Signed
maps use a diverging colormap centred on 0 (red: evidence for the positive class, blue: against);
non-negative maps (Grad-CAM) a sequential one. Small working images are enlarged with nearest
neighbour so that the reader sees the pixels the classifier saw.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

MAX_ALPHA = 0.7
MIN_SIDE = 256  # enlarge to at least this many pixels per side (integer factor)


@lru_cache(maxsize=4)
def _lut(name: str) -> np.ndarray:
    """256 x 3 colour table of a matplotlib colormap."""
    from matplotlib import colormaps

    return colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32) * 255.0


def overlay_rgb(image_u8: np.ndarray, attribution: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)``: ``image_u8`` ``(H, W)`` under ``attribution`` ``(H, W)`` (module docstring)."""
    if image_u8.shape != attribution.shape or image_u8.ndim != 2:
        raise ValueError(f"image {image_u8.shape} and map {attribution.shape} must be equal H x W arrays")
    a = np.nan_to_num(np.asarray(attribution, dtype=np.float32))
    signed = bool((a < 0).any())
    limit = float(np.abs(a).max()) or 1.0
    if signed:
        index = np.round((a / limit + 1.0) * 127.5)
        colour = _lut("RdBu_r")[np.clip(index, 0, 255).astype(np.uint8)]
    else:
        colour = _lut("inferno")[np.clip(np.round(a / limit * 255.0), 0, 255).astype(np.uint8)]
    alpha = (MAX_ALPHA * np.abs(a) / limit)[..., None]
    grey = np.repeat(image_u8[..., None].astype(np.float32), 3, axis=-1)
    return np.clip(np.round(grey * (1 - alpha) + colour * alpha), 0, 255).astype(np.uint8)


def overlay_png(image_u8: np.ndarray, attribution: np.ndarray) -> bytes:
    """The overlay as PNG bytes, enlarged by an integer factor to at least :data:`MIN_SIDE` px."""
    rgb = Image.fromarray(overlay_rgb(image_u8, attribution), "RGB")
    factor = max(1, -(-MIN_SIDE // max(rgb.size)))
    rgb = rgb.resize((rgb.width * factor, rgb.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()
