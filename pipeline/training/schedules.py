"""Learning-rate schedules as pure functions of progress, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def cosine_decay(lr: float, done: float, floor_fraction: float = 0.0) -> float:
    """``lr`` decayed along a half cosine to ``floor_fraction * lr`` as ``done`` goes from 0 to 1."""
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, done))))
    return lr * (floor_fraction + (1.0 - floor_fraction) * cosine)
