"""Ingest throughput: DICOM -> working image, ``ingest`` with 1 and 2 decode workers vs a bare loop.

Generates synthetic 12-bit radiographs (half uncompressed, half JPEG lossless .70 via python-gdcm;
a quarter MONOCHROME1) in a temporary folder, a manifest whose rows cycle through them, then times,
side by side in one run and alternating passes:

* bare:   the floor, one process: ``pydicom.dcmread`` + ``pixel_array`` + modality LUT + window +
          MONOCHROME1 inversion + square pad + area resize + 8-bit quantisation, no checks, no store;
* bare, 2 processes: the same loop in two processes at once, the most two decoders can get from
          this machine (shared cores, caches, memory bandwidth);
* chain:  :func:`pipeline.data.transforms.ingest_transforms` alone (the MONAI chain, one process);
* ingest: :func:`pipeline.data.ingest.ingest` end to end with ``workers`` 1 and 2 (manifest, store,
          status table, ok-manifest), a fresh output folder each pass.

Columns: studies/s (wall clock); per worker / bare, the figure of merit (target >= 0.8, i.e. ingest
at most 1.25x slower per study and worker than the floor); CPU ms per study, of this process and its
decode workers, and bare / CPU, the same comparison in CPU time, which other jobs on a shared
machine disturb much less than wall time. With fewer cores than workers + 1 the parent's share of
the CPU lowers the per-worker wall ratio.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ingest.py [--studies 240] [--size 64] 2>/dev/null``
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


def make_cohort(folder: Path, studies: int, side: int, files: int) -> list[Path]:
    """``files`` distinct DICOMs and a manifest of ``studies`` rows cycling through them; returns the
    rows' image paths. Repeating files keeps generation short while the cohort is large enough for
    ingest's once-per-run costs (manifest, store, pool start) to be amortised as in a real run."""
    from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym

    rng = np.random.default_rng(0)
    paths = [folder / f"image-{i:03d}.dcm" for i in range(files)]
    for i, path in enumerate(paths):
        write_dicom(path, synthetic_radiograph(rng, side), monochrome1=i % 4 == 1)
        if i % 2 == 1:
            to_jpeg_lossless(path, path)
    rows = [{"study_id": study_pseudonym(i), "patient_id": patient_pseudonym(i),
             "image_path": paths[i % files].name, "view": "PA", "sex": "F", "age": 60, "effusion": i % 2,
             "split": "train", "source": "folder"} for i in range(studies)]
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return [paths[i % files] for i in range(studies)]


def bare_decode(path: Path, size: int) -> np.ndarray:
    """The floor: what any DICOM-to-thumbnail loop must do, written as lean as we know how."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32, copy=False)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    image = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image
    side = max(image.shape)
    pad = [((side - n) // 2, side - n - (side - n) // 2) for n in image.shape]
    image = np.pad(image, pad, constant_values=float(image.min()))
    small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(image)[None], size)[0]
    return torch.round(small * 255).to(torch.uint8).numpy()


@dataclass
class Candidate:
    label: str
    workers: int  # processes that decode
    run: Callable[[], object]  # one full pass over the cohort
    wall: float = math.inf  # best seconds of a pass
    cpu: float = math.inf  # least CPU seconds of a pass, this process and its decode workers


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the decode workers, once their pool is shut
    down). Less sensitive than wall time to other jobs on a shared machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_passes(candidates: list[Candidate], repeats: int) -> None:
    """Best of ``repeats`` passes each; passes alternate so that load spikes hit every candidate alike."""
    for _ in range(repeats):
        for candidate in candidates:
            wall, cpu = time.perf_counter(), cpu_seconds()
            candidate.run()
            candidate.wall = min(candidate.wall, time.perf_counter() - wall)
            candidate.cpu = min(candidate.cpu, cpu_seconds() - cpu)


def bare_pass(paths: list[Path], size: int) -> None:
    for path in paths:
        bare_decode(path, size)


def parallel_bare_pass(paths: list[Path], size: int, processes: int) -> Callable[[], None]:
    """The bare loop in ``processes`` forked processes, each on its share of the rows: what the
    machine allows for that many decoders at once (shared cores, caches, memory bandwidth)."""
    def run() -> None:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(processes, mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            list(pool.map(bare_pass, [paths[i::processes] for i in range(processes)], [size] * processes))

    return run


def ingest_pass(folder: Path, studies: int, size: int, workers: int) -> Callable[[], None]:
    """One end-to-end :func:`ingest` into a fresh folder per call, so that nothing is skipped."""
    from pipeline.data.ingest import IngestConfig, ingest

    runs = itertools.count()

    def run() -> None:
        out = folder / f"out-w{workers}-{next(runs)}"
        summary = ingest(IngestConfig(manifest=str(folder / "manifest.csv"), out=str(out), size=size,
                                      workers=workers))
        assert summary.ok == summary.processed == studies, summary

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=240)
    parser.add_argument("--files", type=int, default=24, help="distinct DICOM files the rows cycle through")
    parser.add_argument("--side", type=int, default=1024, help="synthetic image side in pixels")
    parser.add_argument("--size", type=int, default=64, help="working resolution")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # warnings would interleave with the table

    from pipeline.data.transforms import ingest_transforms

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = make_cohort(folder, args.studies, args.side, min(args.files, args.studies))
        chain = ingest_transforms(size=args.size)
        bare_decode(paths[0], args.size)  # warm-up: imports, decoder plugins, first allocations
        chain({"image": str(paths[0])})
        candidates = [
            Candidate("bare decode + resize loop (floor)", 1,
                      lambda: [bare_decode(p, args.size) for p in paths]),
            Candidate("bare loop, 2 processes (ceiling)", 2, parallel_bare_pass(paths, args.size, 2)),
            Candidate("MONAI ingest chain alone", 1, lambda: [chain({"image": str(p)}) for p in paths]),
            *(Candidate(f"ingest, {n} worker{'s' * (n > 1)}", n,
                        ingest_pass(folder, args.studies, args.size, n)) for n in (1, 2)),
        ]
        time_passes(candidates, args.repeats)

    bare = candidates[0]
    print(f"{args.studies} studies over {args.files} synthetic {args.side}x{args.side} 12-bit DICOMs "
          f"(half JPEG lossless .70) -> {args.size}x{args.size}; {os.cpu_count()} CPUs, "
          f"1 thread per process, best of {args.repeats}")
    print(f"  {'':<36} {'studies/s':>9} {'per worker/bare':>15} {'CPU ms/study':>12} {'bare/CPU':>8}")
    for c in candidates:
        rate, cpu_ms = args.studies / c.wall, 1000 * c.cpu / args.studies
        print(f"  {c.label:<36} {rate:9.2f} {bare.wall / c.wall / c.workers:15.2f} {cpu_ms:12.2f} "
              f"{bare.cpu / c.cpu:8.2f}")


if __name__ == "__main__":
    main()
