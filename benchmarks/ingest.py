"""Ingest throughput: DICOM -> 128x128 working image, our reader + chain vs a bare pydicom loop.

Generates its own synthetic 12-bit radiographs (half uncompressed, half JPEG lossless .70 via
python-gdcm) in a temporary folder, then times, side by side in one process:

* floor:  ``pydicom.dcmread`` + ``pixel_array`` + float + area resize (``adaptive_avg_pool2d``);
* chain:  :func:`pipeline.data.transforms.ingest_transforms` (reader with modality LUT/VOI/
          MONOCHROME handling and checks, square pad, area resize, scaling, 8-bit quantisation);
* ingest: :func:`pipeline.data.ingest.ingest` end to end (manifest, atomic cache writes, status).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ingest.py [--studies 24] [--side 1024] [--size 128]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def synthetic_radiograph(rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth chest-like 12-bit image plus quantum noise (so that lossless JPEG has work to do)."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    image = 2600 - 1400 * np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    image -= 1400 * np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    image += rng.normal(0, 40, size=image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, monochrome1: bool) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def to_jpeg_lossless(src: Path, dst: Path) -> None:
    """pydicom has no JPEG-lossless encoder; gdcm does (transfer syntax 1.2.840.10008.1.2.4.70)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read(), src
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change(), src
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write(), dst


def make_cohort(folder: Path, studies: int, side: int) -> pd.DataFrame:
    from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym

    rng = np.random.default_rng(0)
    rows = []
    for i in range(studies):
        path = folder / f"image-{i:03d}.dcm"
        write_dicom(path, synthetic_radiograph(rng, side), monochrome1=i % 4 == 1)
        if i % 2 == 1:
            to_jpeg_lossless(path, path)
        rows.append({"study_id": study_pseudonym(i), "patient_id": patient_pseudonym(i),
                     "image_path": path.name, "view": "PA", "sex": "F", "age": 60, "effusion": i % 2,
                     "split": "train", "source": "folder"})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(folder / "manifest.csv", index=False)
    return manifest


def bare_pydicom(path: Path, size: int) -> torch.Tensor:
    import pydicom

    pixels = pydicom.dcmread(path).pixel_array.astype(np.float32)
    return torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(pixels)[None], size)


def studies_per_second(candidates: dict, paths: list[Path], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` throughput per candidate; passes alternate so that load spikes on a shared
    machine hit every candidate alike."""
    for fn in candidates.values():
        fn(paths[0])  # warm-up: imports, plugin discovery, first allocation
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for path in paths:
                fn(path)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(paths) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--side", type=int, default=1024, help="synthetic image side in pixels")
    parser.add_argument("--size", type=int, default=128, help="working resolution")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pipeline.data.ingest import IngestConfig, ingest
    from pipeline.data.transforms import ingest_transforms

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_cohort(folder, args.studies, args.side)
        paths = sorted(folder.glob("image-*.dcm"))
        chain = ingest_transforms(size=args.size)
        rates = studies_per_second(
            {"floor": lambda p: bare_pydicom(p, args.size), "ours": lambda p: chain({"image": str(p)})},
            paths, args.repeats,
        )
        floor, ours = rates["floor"], rates["ours"]

        end_to_end = 0.0
        for repeat in range(args.repeats):  # a fresh folder each time, so nothing is skipped
            start = time.perf_counter()
            summary = ingest(IngestConfig(manifest=str(folder / "manifest.csv"),
                                          out=str(folder / f"out-{repeat}"), size=args.size))
            end_to_end = max(end_to_end, summary.processed / (time.perf_counter() - start))
            assert summary.ok == args.studies, summary

    print(f"{args.studies} synthetic {args.side}x{args.side} 12-bit DICOMs (half JPEG lossless .70) -> "
          f"{args.size}x{args.size}, 1 thread, best of {args.repeats}")
    print(f"  bare pydicom decode + area resize (floor): {floor:7.2f} studies/s")
    print(f"  RadiographReader + ingest chain:           {ours:7.2f} studies/s   "
          f"ratio to floor {ours / floor:.2f}")
    print(f"  ingest() end to end (cache + status):      {end_to_end:7.2f} studies/s   "
          f"ratio to floor {end_to_end / floor:.2f}")


if __name__ == "__main__":
    main()
