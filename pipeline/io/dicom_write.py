"""The simplified image as a DICOM Secondary Capture in the original study (highdicom).

The new instance joins the source study (same StudyInstanceUID) as a new series whose description
says it is a research output, so that a PACS/OHIF shows it next to the original. Patient identity is
copied from the source only when the user allows it; by default the patient pseudonym replaces
PatientID/PatientName and the birth date and accession number are left empty.

Pixels arrive as ``H x W`` uint8 in true radiographic orientation (rows x columns, patient right on
the viewer's left, head up; see ARCHITECTURE.md), so they are written as they are, MONOCHROME2.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom

from pipeline.runtime.atomic import atomic_write_bytes

SERIES_DESCRIPTION = "SimpleBits simplified - research, not for diagnosis"
MANUFACTURER = "SimpleBits-CXR"
DEFAULT_SERIES_NUMBER = 9901
#: Displayed orientation of every in-memory image: columns toward patient Left, rows toward Feet.
PATIENT_ORIENTATION = ("L", "F")
#: Identifying attributes that highdicom copies from the source and that are blanked by default.
_BLANKED_WITHOUT_IDENTITY = ("PatientBirthDate", "AccessionNumber", "ReferringPhysicianName")


def build_secondary_capture(
    source: pydicom.Dataset,
    pixels: np.ndarray,
    patient_pseudonym: str,
    allow_identity: bool = False,
    series_instance_uid: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    source_name: str = "source",
) -> pydicom.Dataset:
    """A Secondary Capture of ``pixels`` (``H x W`` uint8) in ``source``'s study.

    ``source_name`` only labels error messages (a file name, never an identifier).
    """
    from highdicom import UID
    from highdicom.sc import SCImage

    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"{source_name}: expected an H x W uint8 image, got shape {pixels.shape} dtype {pixels.dtype}")
    rows, cols = int(getattr(source, "Rows", 0) or 0), int(getattr(source, "Columns", 0) or 0)
    if rows and cols and rows != cols and pixels.shape[0] != pixels.shape[1]:
        # Both non-square: portrait/landscape must agree, or rows and columns were swapped somewhere.
        if (rows > cols) != (pixels.shape[0] > pixels.shape[1]):
            raise ValueError(
                f"{source_name}: image {pixels.shape} (rows x cols) is transposed relative to the "
                f"source ({rows} x {cols}); images must be in true orientation"
            )
    if "StudyInstanceUID" not in source:
        raise ValueError(f"{source_name}: source DICOM has no StudyInstanceUID; cannot place the image in its study")
    image = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid or UID(),
        series_number=series_number,
        sop_instance_uid=UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=PATIENT_ORIENTATION,
    )
    image.SeriesDescription = SERIES_DESCRIPTION
    image.ImageComments = "Derived by SimpleBits simplification. Research output, not for diagnosis."
    image.BurnedInAnnotation = "NO"
    if not allow_identity:
        image.PatientID = patient_pseudonym
        image.PatientName = patient_pseudonym
        for keyword in _BLANKED_WITHOUT_IDENTITY:
            if keyword in image:
                setattr(image, keyword, "")
        image.PatientIdentityRemoved = "YES"
    return image


def write_secondary_capture(
    source_path: str | Path,
    pixels: np.ndarray,
    out_path: str | Path,
    patient_pseudonym: str,
    allow_identity: bool = False,
    series_instance_uid: str | None = None,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
) -> Path:
    """Read the source header (no pixels), build the Secondary Capture, write it atomically."""
    source_path = Path(source_path)
    try:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise ValueError(f"{source_path}: cannot read source DICOM ({err})") from err
    image = build_secondary_capture(
        source, pixels, patient_pseudonym, allow_identity, series_instance_uid, series_number,
        instance_number, source_name=source_path.name,
    )
    buffer = io.BytesIO()
    image.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(out_path, buffer.getvalue())
    return Path(out_path)


def write_run_secondary_captures(
    run_dir: str | Path,
    simplify_name: str,
    allow_identity: bool = False,
    out_dir: str | Path | None = None,
) -> list[Path]:
    """One Secondary Capture per DICOM-sourced study of a simplification run.

    Sources come from ``ingest/manifest.csv`` (``image_path`` absolute or relative to that file);
    studies read from PNG/JPEG have no study to join and are skipped. All outputs of one call share
    one new series. Written to ``RUN_DIR/dicom_sc/<study_id>.dcm`` (outside ``studies/``, which is
    logged to MLflow, because these files may carry identity when ``allow_identity`` is set).
    """
    import pandas as pd
    from highdicom import UID

    run_dir = Path(run_dir)
    manifest_path = run_dir / "ingest" / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: ingest manifest not found")
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    from pipeline.data.store import CohortStore
    from pipeline.report.study import read_predictions

    sim_dir = run_dir / "simplify" / simplify_name
    simplified = CohortStore.open(sim_dir / "simplified")
    done = set(read_predictions(sim_dir / "predictions.csv")["study_id"])  # the slots holding pixels
    out_dir = Path(out_dir) if out_dir else run_dir / "dicom_sc"
    series_uid = UID()
    written = []
    for number, row in enumerate(manifest.itertuples(index=False), start=1):
        source = Path(row.image_path)
        source = source if source.is_absolute() else manifest_path.parent / source
        if row.study_id not in done or not source.is_file() or not pydicom.misc.is_dicom(source):
            continue
        pixels = simplified.read([simplified.slot(row.study_id)])[0]
        written.append(write_secondary_capture(
            source, pixels, out_dir / f"{row.study_id}.dcm", row.patient_id, allow_identity,
            series_instance_uid=series_uid, instance_number=number,
        ))
    return written
