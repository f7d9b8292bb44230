"""The saliency maps of ``simplebits explain`` beside the simplified images (issue 12).

The maps live where the explain command wrote them, ``RUN_DIR/explain/<task>/<study>/<method>.npy``
with ``maps.csv``; the reports read them from there. Light on purpose (numpy only at import): the
explain module, with torch and Captum, is imported only for a run that has an explain folder, and
the review server imports only the names below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

#: Second panel of a study with maps: original | simplified | one overlay per method, same scale.
EXPLAIN_PANEL_NAME = "explain.png"

#: Per method: its title and how to read its colours (``{positive}``: the task's positive class).
#: The order is the order of the tiles; a method not listed here keeps its name and goes last.
METHOD_TITLES: dict[str, tuple[str, str]] = {
    "ig": ("Integrated Gradients", "red: for {positive}, blue: against"),
    "occlusion": ("Occlusion", "red: for {positive}, blue: against"),
    "gradcam": ("Grad-CAM", "brighter: more weight for {positive}"),
    "latent_shift": ("Latent shift", "counterfactual: red brighter, blue darker"),
}


def method_title(method: str) -> str:
    return METHOD_TITLES.get(method, (method, ""))[0]


def method_key(method: str, positive_name: str) -> str:
    return METHOD_TITLES.get(method, (method, ""))[1].format(positive=positive_name)


def map_file_name(method: str) -> str:
    """The study folder's overlay of one method (``studies/<study>/map-<method>.png``)."""
    return f"map-{method}.png"


def ordered_methods(methods: Iterable[str]) -> list[str]:
    """``methods`` in tile order: :data:`METHOD_TITLES` first, then the rest by name."""
    known = list(METHOD_TITLES)
    return sorted(set(methods), key=lambda m: (known.index(m) if m in known else len(known), m))


#: ``(study_id, image shape) -> {method: map}``
StudyMaps = Callable[[str, tuple[int, ...]], dict[str, np.ndarray]]


def no_maps(study_id: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {}


def methods_by_study(explain_dir: str | Path) -> dict[str, list[str]]:
    """``study_id -> methods`` (in tile order) of the finished maps in ``explain_dir``; empty when
    the folder does not exist."""
    explain_dir = Path(explain_dir)
    if not explain_dir.is_dir():
        return {}
    from pipeline.explain.run import finished_maps

    by_study: dict[str, list[str]] = {}
    for study_id, method in finished_maps(explain_dir):
        by_study.setdefault(study_id, []).append(method)
    return {study_id: ordered_methods(methods) for study_id, methods in by_study.items()}


def maps_loader(explain_dir: str | Path) -> StudyMaps:
    """``(study_id, shape) -> {method: map}`` of the finished maps in ``explain_dir``, in tile order
    (empty for a study without maps, and for every study when the folder does not exist). A map of
    another shape than the study's image is a :class:`UserError` naming its file: drawn over the
    image it would point at the wrong anatomy."""
    explain_dir = Path(explain_dir)
    by_study = methods_by_study(explain_dir)
    if not by_study:
        return no_maps
    from pipeline.explain.run import map_path

    def load(study_id: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        maps = {}
        for method in by_study.get(study_id, ()):
            path = map_path(explain_dir, study_id, method)
            maps[method] = np.load(path)
            if maps[method].shape != tuple(shape):
                raise UserError(f"{path}: map of shape {maps[method].shape} for an image of {tuple(shape)} "
                                "(explained on another ingest folder? re-run simplebits explain --run)")
        return maps

    return load


def maps_cost(explain_dir: str | Path) -> pd.DataFrame | None:
    """Mean seconds per study per method from ``maps.csv`` (``method, title, studies, seconds``), or
    None without maps. Seconds are timed per batch by simplebits explain, so the methods of one
    run compare side by side."""
    explain_dir = Path(explain_dir)
    if not explain_dir.is_dir():
        return None
    import pandas as pd

    from pipeline.explain.run import method_summary, read_map_rows

    methods = ordered_methods(row["method"] for row in read_map_rows(explain_dir))
    if not methods:
        return None
    summary = method_summary(explain_dir, methods)
    return pd.DataFrame([{"method": m, "title": method_title(m), "studies": int(summary[m]["n_maps"]),
                          "seconds": summary[m]["seconds_per_study"]} for m in methods])


@dataclass(frozen=True)
class CohortMaps:
    """What the cohort report shows of a run's maps: which studies have them, and their cost."""

    studies: dict[str, list[str]]  # study_id -> methods, in tile order
    cost: pd.DataFrame  # maps_cost


def cohort_maps(explain_dir: str | Path) -> CohortMaps | None:
    """The maps of ``explain_dir`` for the cohort report; None where there are none."""
    studies = methods_by_study(explain_dir)
    cost = maps_cost(explain_dir)
    return CohortMaps(studies, cost) if studies and cost is not None else None
