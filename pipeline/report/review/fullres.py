"""The source radiograph of a study at its native resolution, for the review page's original viewer.

The working-resolution cache (e.g. 64 px) is what the classifier saw, not what a radiologist reads.
So the original is decoded again from the study's source file (``image_path`` of the ingest
manifest) with the reader and VOI mode ingest used (:func:`pipeline.io.readers.read_radiograph`),
and cached as an 8-bit grey PNG in ``studies/<study_id>/original_full.png``. The DICOM's VOI (VOI LUT,
else WindowCenter/Width) is thus already applied: the page's default window/level shows exactly the
DICOM's default presentation, and the reader's window/level adjusts from there.

The PNG carries pixels only: Pillow writes no text chunks unless given some, so no DICOM identity
reaches the served file; logs name the pseudonymous study id, never the source path.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.config import RESOLVED_CONFIG_NAME
from pipeline.io.readers import VOI_MODES, RadiographReadError, read_radiograph
from pipeline.report.study import png_bytes, read_manifest
from pipeline.runtime.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

FULL_ORIGINAL_NAME = "original_full.png"


def source_paths(run_dir: Path) -> dict[str, Path]:
    """Study id -> source image file, from ``ingest/manifest.csv`` (ingest made the paths absolute)."""
    manifest = read_manifest(run_dir)
    if manifest is None or "image_path" not in manifest.columns:
        return {}
    rows = manifest[["study_id", "image_path"]].dropna()
    return {str(sid): Path(str(path)) for sid, path in zip(rows["study_id"], rows["image_path"])}


def ingest_voi(run_dir: Path) -> str:
    """The VOI mode the run's ingest decoded with (its resolved config), else the reader's default."""
    resolved = run_dir / "ingest" / RESOLVED_CONFIG_NAME
    try:
        voi = (yaml.safe_load(resolved.read_text()) or {}).get("voi", "auto")
    except (OSError, yaml.YAMLError):  # no resolved config (a fixture's folder) or an unreadable one
        voi = "auto"
    return voi if voi in VOI_MODES else "auto"


def full_original_grey(source: Path, voi: str) -> np.ndarray:
    """The radiograph as displayed after the modality LUT and VOI, rows x columns as stored, as uint8."""
    image, _meta = read_radiograph(source, voi=voi)  # _meta: safe tags only, and not needed here
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


class FullOriginals:
    """Makes ``original_full.png`` of a study on first request; later requests read the cached file."""

    def __init__(self, run_dir: Path, studies_dir: Path) -> None:
        self.studies_dir = studies_dir
        self.sources = source_paths(run_dir)
        self.voi = ingest_voi(run_dir)
        self._lock = threading.Lock()  # one decode at a time: a source may be tens of megabytes

    def available(self, study_id: str) -> bool:
        """Whether a full-resolution original is (or can be) served for the study."""
        source = self.sources.get(study_id)
        cached = (self.studies_dir / study_id / FULL_ORIGINAL_NAME).is_file()
        return cached or bool(source and source.is_file())

    def ensure(self, study_id: str) -> None:
        """Write the cached PNG if it is missing and the source can be read (the caller validated
        ``study_id`` and that its folder lies inside ``studies/``)."""
        self._make(study_id)

    def load(self, study_id: str) -> np.ndarray | None:
        """The study's full-resolution original as a uint8 array (made and cached first), else None."""
        made = self._make(study_id)
        if made is not None:
            return made
        path = self.studies_dir / study_id / FULL_ORIGINAL_NAME
        if not path.is_file():
            return None
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))

    def _make(self, study_id: str) -> np.ndarray | None:
        """Decode and cache the original if it is not cached yet; returns what it decoded (None when
        the cache existed or the source cannot be read)."""
        target = self.studies_dir / study_id / FULL_ORIGINAL_NAME
        source = self.sources.get(study_id)
        if target.is_file() or source is None or not source.is_file():
            return None
        with self._lock:
            if target.is_file():  # another request made it while this one waited
                return None
            try:
                grey = full_original_grey(source, self.voi)
                atomic_write_bytes(target, png_bytes(Image.fromarray(grey, "L")))
                return grey
            except (RadiographReadError, OSError) as err:
                reason = err.reason if isinstance(err, RadiographReadError) else type(err).__name__
                log.warning("study %s: full-resolution original not available (%s)", study_id, reason)
                return None
