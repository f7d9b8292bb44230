"""The output of one explanation method on one batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Explanation:
    """``maps``: float32 ``(N, H, W)`` at the input's resolution, on the CPU. ``logit``: the explained
    log-odds of each image ``(N,)``. ``extras``: per-image numbers a method reports about itself
    (IG's convergence delta, the latent shift's step and the shifted image's log-odds), each ``(N,)``.
    """

    maps: Tensor
    logit: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.maps.shape[0]
        extra_shapes = [tuple(v.shape) for v in self.extras.values()]
        if self.maps.ndim != 3 or self.logit.shape != (n,) or any(s != (n,) for s in extra_shapes):
            raise ValueError(f"explanation parts disagree: maps {tuple(self.maps.shape)}, logit "
                             f"{tuple(self.logit.shape)}, extras {extra_shapes}")
