"""Shared fixtures: synthetic DICOM files built with pydicom, and gdcm transcoding."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_helpers import CR_SOP, CT_SOP, DX_SOP, SC_SOP, SR_SOP, write_dicom  # noqa: F401 (re-exported for tests)


@pytest.fixture
def dicom_file(tmp_path: Path) -> Callable[..., Path]:
    """``dicom_file("a.dcm", pixels, **kwargs)`` -> path of :func:`write_dicom` output in tmp_path."""

    def make(name: str, pixels: np.ndarray | None, **kwargs: Any) -> Path:
        return write_dicom(tmp_path / name, pixels, **kwargs)

    return make


@pytest.fixture
def gdcm_transcode() -> Callable[[Path, Path, str], Path]:
    """``gdcm_transcode(src, dst, syntax)``, see :func:`transcode_with_gdcm`."""
    return transcode_with_gdcm


def transcode_with_gdcm(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode ``src`` with python-gdcm; ``syntax``: ``jpeg-lossless-sv1`` (.70), ``jpeg-lossless`` (.57)
    or ``jpeg-baseline`` (.50). pydicom 3 has no JPEG encoders, gdcm does.
    """
    import gdcm

    syntaxes = {
        "jpeg-lossless-sv1": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
        "jpeg-lossless": gdcm.TransferSyntax.JPEGLosslessProcess14,
        "jpeg-baseline": gdcm.TransferSyntax.JPEGBaselineProcess1,  # 8-bit only
    }
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntaxes[syntax]))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm cannot transcode {src} to {syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {dst}")
    return dst


@pytest.fixture(scope="session")
def demo_renders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small rendered demo cohort (60 studies, 64 px, burned-in marks independent of the label),
    rendered once per session: the images and ground truth of the dataset-layout fixtures."""
    from pipeline.data.demo.cohort import DemoCohortConfig, generate_cohort

    out = tmp_path_factory.mktemp("demo_renders")
    config = DemoCohortConfig(n=60, size=64, seed=3, distractor={"mode": "independent"}, render={"n_points": 48})
    generate_cohort(config, out, show_progress=False)
    return out
