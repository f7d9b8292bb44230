"""Burned-in annotations (a lead-marker square with a letter, or a short text tag) with their masks.

These are the shortcut features of the demo cohort: drawn into the final pixel data, some at the
maximum pixel value (saturated), some slightly below. The texts are generic radiographer markings,
never identifiers, so burned-in pixels can never carry PHI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

KINDS = ("marker", "text")
MARKER_LETTERS = ("L", "R")
TAG_TEXTS = ("ERECT", "UPRIGHT", "PA", "STAT", "INSP")


@dataclass(frozen=True)
class Distractor:
    """What to draw: ``kind``, its label text, top-left corner as fractions of the image, height fraction."""

    kind: str
    text: str
    corner: tuple[float, float]  # (row, col) of the top-left corner, fraction of the image size
    height: float  # fraction of the image height
    saturated: bool


def sample_distractor(rng: np.random.Generator) -> Distractor:
    """A random marker or tag near one of the image corners."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    text = (MARKER_LETTERS if kind == "marker" else TAG_TEXTS)[int(rng.integers(5 if kind == "text" else 2))]
    height = float(rng.uniform(0.08, 0.12))
    width = height if kind == "marker" else height * 0.6 * len(text)
    row = float(rng.choice([rng.uniform(0.03, 0.12), rng.uniform(0.80, 0.95 - height)]))
    col = float(rng.choice([rng.uniform(0.03, 0.10), rng.uniform(0.85 - width, 0.95 - width)]))
    return Distractor(kind, text, (row, col), height, bool(rng.random() < 0.5))


def distractor_mask(distractor: Distractor, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of the drawn pixels (a square outline with a letter, or a text)."""
    height = max(int(round(distractor.height * size)), 5)
    glyphs = _text_bitmap(distractor.text, height if distractor.kind == "text" else max(height - 4, 3))
    if distractor.kind == "marker":
        stamp = np.zeros((height, height), dtype=bool)
        stamp[[0, 1, -2, -1], :] = True
        stamp[:, [0, 1, -2, -1]] = True
        gh, gw = glyphs.shape
        glyphs = glyphs[:, :min(gw, height - 4)]
        top, left = (height - gh) // 2, (height - glyphs.shape[1]) // 2
        stamp[top:top + gh, left:left + glyphs.shape[1]] |= glyphs
    else:
        stamp = glyphs
    mask = np.zeros((size, size), dtype=bool)
    r0, c0 = int(distractor.corner[0] * size), int(distractor.corner[1] * size)
    r1, c1 = min(r0 + stamp.shape[0], size), min(c0 + stamp.shape[1], size)
    mask[r0:r1, c0:c1] = stamp[: r1 - r0, : c1 - c0]
    return mask


def _text_bitmap(text: str, height: int) -> np.ndarray:
    """``text`` in PIL's built-in bitmap font, scaled (nearest) to ``height`` pixels, as a bool array."""
    font = ImageFont.load_default()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    width = max(int(round(canvas.width * height / canvas.height)), 1)
    return np.asarray(canvas.resize((width, height), Image.NEAREST)) > 127
