"""The simplified image as a DICOM Secondary Capture, one new series per source study (highdicom).

Two consistent layouts, chosen by ``allow_identity``:

* **identity allowed**: the series joins the source study, with the source's patient and study
  modules and UIDs, so a clinical PACS files it next to the original;
* **de-identified** (default): the source is de-identified (:mod:`pipeline.io.dicom_deid`) into a
  new study under the patient pseudonym, and that study holds both the de-identified original and the
  simplified series, so a research PACS shows them side by side.

Either way the Secondary Capture names the image it was derived from (Source Image Sequence; in the
de-identified layout, the de-identified original's UID). Its own UIDs are keyed hashes of the source
UIDs, the layout and the simplifier run's name, so a re-run rewrites the same instances instead of
adding new ones.

Pixels arrive as ``H x W`` uint8 in true radiographic orientation (rows x columns, patient right on
the viewer's left, head up; see ARCHITECTURE.md), so they are written as they are, MONOCHROME2.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from pipeline.io.dicom_deid import (
    declares_no_burned_in_text, deidentify, mark_deidentified, pseudonymous_uid, remove_dates,
)
from pipeline.runtime.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "SimpleBits simplified - research, not for diagnosis"
ORIGINAL_SERIES_DESCRIPTION = "De-identified original - research copy"
MANUFACTURER = "SimpleBits-CXR"
DEFAULT_SERIES_NUMBER = 9901
DEFAULT_OUTPUT_NAME = "simplified"
SIMPLIFIED_FILE, ORIGINAL_FILE = "simplified.dcm", "original.dcm"
#: Displayed orientation of every in-memory image: columns toward patient Left, rows toward Feet.
PATIENT_ORIENTATION = ("L", "F")


class StudySeries(NamedTuple):
    """What one source study gained: the Secondary Capture, and the de-identified original if written."""

    simplified: Path
    original: Path | None


def build_secondary_capture(
    source: Dataset,
    pixels: np.ndarray,
    patient_pseudonym: str,
    allow_identity: bool = False,
    output_name: str = DEFAULT_OUTPUT_NAME,
    series_number: int = DEFAULT_SERIES_NUMBER,
    source_name: str = "source",
) -> Dataset:
    """A Secondary Capture of ``pixels`` (``H x W`` uint8), alone in a new series of ``source``'s study
    (or of its de-identified study). ``source_name`` only labels error messages (a file name, never an
    identifier)."""
    from highdicom.sc import SCImage

    _check_orientation(source, pixels, source_name)
    try:
        study = source if allow_identity else deidentify(source, patient_pseudonym)
    except ValueError as err:
        raise ValueError(f"{source_name}: {err}; cannot place the image in its study") from err
    # Keyed on the source UIDs and the layout: a re-run rewrites the same instances, while the two
    # layouts never share a series or instance UID (one series in two studies would confuse a PACS).
    layout = "identified" if allow_identity else "deidentified"
    image = SCImage.from_ref_dataset(
        ref_dataset=study,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=pseudonymous_uid(source.StudyInstanceUID, "series", layout, output_name),
        series_number=series_number,
        sop_instance_uid=pseudonymous_uid(source.SOPInstanceUID, "instance", layout, output_name),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=PATIENT_ORIENTATION,
    )
    image.SeriesDescription = SERIES_DESCRIPTION
    image.ImageComments = "Derived by SimpleBits simplification. Research output, not for diagnosis."
    image.DerivationDescription = "SimpleBits simplification of the source image"
    image.SourceImageSequence = Sequence([_source_reference(study)])
    # Type 2C in General Series: required for paired body parts; empty (unknown) unless the source says.
    image.Laterality = source.get("Laterality", "")
    # The pixels come from the source's: they carry its burned-in text, if any (unknown counts as some).
    image.BurnedInAnnotation = "NO" if declares_no_burned_in_text(source) else "YES"
    if not allow_identity:
        mark_deidentified(image)
        # When highdicom made the file (creation, content, contribution): dates like any other.
        remove_dates(image)
    return image


def write_study_series(
    source_path: str | Path,
    pixels: np.ndarray,
    study_dir: str | Path,
    patient_pseudonym: str,
    allow_identity: bool = False,
    output_name: str = DEFAULT_OUTPUT_NAME,
) -> StudySeries:
    """``STUDY_DIR/simplified.dcm`` and, de-identified and only when the source declares no burned-in
    text (the Basic Profile has no pixel cleaning here), ``STUDY_DIR/original.dcm``; written atomically."""
    source_path, study_dir = Path(source_path), Path(study_dir)
    # The pixels are read only to copy them into the de-identified original.
    try:
        source = pydicom.dcmread(source_path, stop_before_pixels=allow_identity)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise ValueError(f"{source_path}: cannot read source DICOM ({err})") from err
    image = build_secondary_capture(source, pixels, patient_pseudonym, allow_identity, output_name,
                                    source_name=source_path.name)
    simplified = _save(image, study_dir / SIMPLIFIED_FILE)
    if allow_identity:
        return StudySeries(simplified, None)
    if not declares_no_burned_in_text(source):
        log.info("%s: source does not declare BurnedInAnnotation=NO; de-identified original not written",
                 study_dir.name)
        return StudySeries(simplified, None)
    original = deidentify(source, patient_pseudonym)
    # The profile removed the source's own description (it may name a person or a site); this one says
    # what the series is, so that a PACS lists it by name beside the simplified series.
    original.SeriesDescription = ORIGINAL_SERIES_DESCRIPTION
    return StudySeries(simplified, _save(original, study_dir / ORIGINAL_FILE))


def write_run_secondary_captures(
    run_dir: str | Path,
    simplify_name: str,
    allow_identity: bool = False,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """One new series per DICOM-sourced study of a simplification run; returns the Secondary Captures.

    Sources come from ``ingest/manifest.csv`` (``image_path`` absolute or relative to that file);
    studies read from PNG/JPEG have no study to join and are skipped. Written to
    ``RUN_DIR/dicom_sc/<study_id>/`` (outside ``studies/``, which is logged to MLflow, because these
    files carry identity when ``allow_identity`` is set).
    """
    import pandas as pd

    from pipeline.data.store import CohortStore
    from pipeline.report.study import read_predictions

    run_dir = Path(run_dir)
    manifest_path = run_dir / "ingest" / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: ingest manifest not found")
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    sim_dir = run_dir / "simplify" / simplify_name
    simplified = CohortStore.open(sim_dir / "simplified")
    done = set(read_predictions(sim_dir / "predictions.csv")["study_id"])  # the slots holding pixels
    out_dir = Path(out_dir) if out_dir else run_dir / "dicom_sc"
    written = []
    for row in manifest.itertuples(index=False):
        source = Path(row.image_path)
        source = source if source.is_absolute() else manifest_path.parent / source
        if row.study_id not in done or not source.is_file() or not pydicom.misc.is_dicom(source):
            continue
        pixels = simplified.read([simplified.slot(row.study_id)])[0]
        series = write_study_series(source, pixels, out_dir / row.study_id, row.patient_id, allow_identity,
                                    output_name=simplify_name)
        written.append(series.simplified)
    return written


def _check_orientation(source: Dataset, pixels: np.ndarray, source_name: str) -> None:
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(
            f"{source_name}: expected an H x W uint8 image, got shape {pixels.shape} dtype {pixels.dtype}")
    rows, cols = int(getattr(source, "Rows", 0) or 0), int(getattr(source, "Columns", 0) or 0)
    if rows and cols and rows != cols and pixels.shape[0] != pixels.shape[1]:
        # Both non-square: portrait/landscape must agree, or rows and columns were swapped somewhere.
        if (rows > cols) != (pixels.shape[0] > pixels.shape[1]):
            raise ValueError(
                f"{source_name}: image {pixels.shape} (rows x cols) is transposed relative to the "
                f"source ({rows} x {cols}); images must be in true orientation"
            )


def _source_reference(study: Dataset) -> Dataset:
    """A Source Image Sequence item: the instance the simplified image was computed from."""
    from highdicom.sr import CodedConcept

    item = Dataset()
    item.ReferencedSOPClassUID = study.SOPClassUID
    item.ReferencedSOPInstanceUID = study.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(
        codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def _save(dataset: Dataset, path: Path) -> Path:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path
