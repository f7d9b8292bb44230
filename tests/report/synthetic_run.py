"""A small synthetic run folder in the layout of ARCHITECTURE.md, for the report/review tests (helpers + fixtures).

Imported by name (``from synthetic_run import ...``) rather than from ``conftest``: several conftest modules
exist in this test tree, and ``import conftest`` would pick whichever pytest loaded last.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
from dicom_helpers import write_dicom
from scipy.ndimage import gaussian_filter, zoom

from pipeline.data.ingest import write_ingest_folder
from pipeline.data.store import write_images
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym

SIMPLIFY_NAME = "joint-effusion"
SOURCE_SIZE = 256  # side of the source DICOMs, 8x the working size: what the review page shows
SOURCE_WINDOW = (1900.0, 2400.0)  # WindowCenter, WindowWidth of the source DICOMs (12-bit values)


def synthetic_radiograph(rng: np.random.Generator, size: int, effusion: bool) -> np.ndarray:
    """A chest-like uint8 image: bright mediastinum/soft tissue, two dark lungs, optional basal fluid."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 0.75 + 0.05 * rng.standard_normal((size, size))
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1
        image[lung] -= 0.45
    if effusion:
        fluid = (((xx - 0.7) / 0.16) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1) & (yy > 0.68 - 0.05 * (xx - 0.7))
        image[fluid] += 0.35
    image = gaussian_filter(image, 0.8)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def write_source_dicom(path: Path, working: np.ndarray, rng: np.random.Generator) -> Path:
    """The study's source: a 12-bit ``SOURCE_SIZE`` DX whose working-resolution view is ``working``,
    with a window that clips (so that a served image shows whether the window was applied) and the
    identifying attributes :func:`write_dicom` sets (so that a leak would show)."""
    factor = SOURCE_SIZE / working.shape[0]
    values = zoom(working.astype(np.float64) * 16.0, factor, order=3) + rng.normal(0, 20, (SOURCE_SIZE,) * 2)
    pixels = np.clip(np.round(values), 0, 4095).astype(np.uint16)
    center, width = SOURCE_WINDOW
    return write_dicom(path, pixels, bits_stored=12, WindowCenter=center, WindowWidth=width)


def make_run_folder(root: Path, n_studies: int = 12, size: int = 32, seed: int = 0) -> Path:
    """``root`` gets ingest/{manifest.csv,store/} and simplify/joint-effusion/{predictions.csv,simplified/}.

    ``predictions.csv`` has the columns ``simplebits apply`` writes (the task's label column ``effusion``
    instead of ``label``, plus ``sex`` and ``bits_saved``); the last study is unlabelled. Every study but
    the last has a source DICOM in ``sources/`` (the manifest's ``image_path``); the last one's source
    is gone, as after a move of the source archive.
    """
    rng = np.random.default_rng(seed)
    source_rng = np.random.default_rng([seed, 1])  # its own stream: the other values stay as they were
    sim_dir = root / "simplify" / SIMPLIFY_NAME
    sim_dir.mkdir(parents=True)
    manifest, predictions, originals, simplified_images = [], [], [], []
    for i in range(n_studies):
        sid, pid = study_pseudonym(f"study-{seed}-{i}"), patient_pseudonym(f"patient-{seed}-{i}")
        effusion = i % 2
        original = synthetic_radiograph(rng, size, bool(effusion))
        simplified = (np.round(gaussian_filter(original.astype(float), 1.5) / 32) * 32).clip(0, 255).astype(np.uint8)
        originals.append(original)
        simplified_images.append(simplified)
        split = "test" if i % 3 == 0 else "train"
        source = root / "sources" / f"s{i}.dcm"
        if i < n_studies - 1:
            write_source_dicom(source, original, source_rng)
        manifest.append({"study_id": sid, "patient_id": pid, "image_path": str(source),
                         "view": ["PA", "AP"][i % 2 if i < 6 else (i // 2) % 2], "sex": "FM"[(i // 2) % 2],
                         "age": 25 + 6 * i, "effusion": effusion, "split": split, "source": "demo"})
        p_orig = float(np.clip(0.2 + 0.6 * effusion + rng.normal(0, 0.15), 0.01, 0.99))
        bpd_orig, bpd_simpl = 4.0 + rng.normal(0, 0.2), 1.5 + rng.normal(0, 0.2)
        predictions.append({"study_id": sid, "split": split, "effusion": effusion if i < n_studies - 1 else None,
                            "sex": manifest[-1]["sex"], "p_orig": p_orig,
                            "p_simpl": float(np.clip(p_orig + rng.normal(0, 0.1), 0.01, 0.99)),
                            "bpd_orig": bpd_orig, "bpd_simpl": bpd_simpl, "bits_saved": (bpd_orig - bpd_simpl) * size * size})
    write_ingest_folder(root / "ingest", pd.DataFrame(manifest), np.stack(originals))
    write_images(sim_dir / "simplified", [m["study_id"] for m in manifest], np.stack(simplified_images))
    pd.DataFrame(predictions).to_csv(sim_dir / "predictions.csv", index=False)
    (sim_dir / "metrics.json").write_text(json.dumps({"auroc_simpl": 0.9}))
    return root


def make_sweep() -> pd.DataFrame:
    """A λ trade-off table in the columns the cohort report expects."""
    rows = [{"method": "simplebits", "lam": lam, "mean_bpd": bpd, "auroc": auc, "auroc_orig": 0.93}
            for lam, bpd, auc in [(0.1, 3.6, 0.92), (1.0, 2.4, 0.9), (10.0, 1.2, 0.84)]]
    rows += [{"method": "blur", "strength": s, "mean_bpd": bpd, "auroc": auc}
             for s, bpd, auc in [(1.0, 3.1, 0.88), (2.0, 2.2, 0.8), (4.0, 1.4, 0.66)]]
    return pd.DataFrame(rows)


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    return make_run_folder(tmp_path / "run")


@pytest.fixture
def reported_run(run_folder: Path) -> Path:
    """The synthetic run folder with per-study reports written (what the review server serves)."""
    from pipeline.report.study import write_run_study_reports

    write_run_study_reports(run_folder, SIMPLIFY_NAME)
    return run_folder


def request(base: str, method: str, path: str, body: object = None, host: str | None = None) -> tuple[int, bytes]:
    """A raw HTTP request (http.client sends the path exactly as given, unlike browsers)."""
    netloc = urlsplit(base).netloc
    conn = http.client.HTTPConnection(netloc, timeout=10)
    headers = {"Host": host or netloc}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    status, payload = response.status, response.read()
    conn.close()
    return status, payload


@contextlib.contextmanager
def running_review_server(run_dir: Path, port: int = 0) -> Iterator[str]:
    """The review server in a background thread; yields its base URL, shuts down afterwards."""
    from pipeline.report.review.server import make_server

    server = make_server(run_dir, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


EXPLAIN_METHODS = ("ig", "gradcam")


def add_explain_maps(root: Path, methods: tuple[str, ...] = EXPLAIN_METHODS, limit: int = 3) -> list[str]:
    """Saliency maps of the first ``limit`` test studies, as ``simplebits explain --run`` writes them into
    ``explain/effusion/`` (an untrained tiny classifier saved where the run keeps its classifier);
    returns the study ids that have maps."""
    from pipeline.cli import main
    from pipeline.explain.run import read_map_rows
    from pipeline.models.classifiers import create_classifier, save_classifier
    from pipeline.run_folder import RunFolder

    folder = RunFolder(root)
    save_classifier(create_classifier("nf_cnn", widths=[8, 16, 32]), folder.classifier_weights("effusion"),
                    task="effusion")
    assert main(["explain", "--run", str(root), "--task", "effusion", "--split", "test", "--limit", str(limit),
                 "--methods", ",".join(methods), "--set", "ig.steps=4", "--device", "cpu"]) == 0
    return sorted({row["study_id"] for row in read_map_rows(folder.explain("effusion"))})


@pytest.fixture
def explained_run(run_folder: Path) -> Path:
    """The synthetic run folder with maps of a few test studies and its per-study reports written."""
    from pipeline.report.study import write_run_study_reports

    add_explain_maps(run_folder)
    write_run_study_reports(run_folder, SIMPLIFY_NAME)
    return run_folder
