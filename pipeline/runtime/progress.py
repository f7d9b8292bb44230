"""Progress bars for long work, shown on the main process only (one bar, not one per rank)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

from pipeline.runtime.distributed import is_main_process

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kwargs) -> Iterable[T]:
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        disable=not is_main_process() or kwargs.pop("disable", False),
        dynamic_ncols=True,
        file=sys.stderr,
        **kwargs,
    )
