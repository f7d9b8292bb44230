"""Tiny ingest folders on disk (store + status + manifest) for tests of the commands and of torchrun.

Imported by name (tests/ is on sys.path), like tests/report/synthetic_run.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.ingest import write_ingest_folder


def _hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def square_task_images(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Label 1: a bright square in the lower half; label 0: none. Noisy grey background, uint8."""
    labels = rng.integers(0, 2, n)
    images = 0.4 + 0.05 * rng.standard_normal((n, size, size))
    half, side = size // 2, max(2, size // 4)
    for i in np.flatnonzero(labels):
        r, c = rng.integers(half, size - side, 2)
        images[i, r:r + side, c:c + side] += 0.4
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8), labels


def write_square_ingest(root: str | Path, counts: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """An ingest folder whose splits have ``counts`` studies each; effusion = the square, sex random."""
    rng = np.random.default_rng(seed)
    n = sum(counts.values())
    images, labels = square_task_images(n, size, rng)
    splits = [split for split, count in counts.items() for _ in range(count)]
    frame = pd.DataFrame({
        "study_id": [f"std-{_hex(f'{seed}-study-{i}')}" for i in range(n)],
        "patient_id": [f"pat-{_hex(f'{seed}-patient-{i}')}" for i in range(n)],
        "image_path": [f"images/{i}.dcm" for i in range(n)],
        "view": "PA",
        "sex": rng.choice(["M", "F"], n),
        "age": rng.integers(20, 90, n),
        "effusion": labels,
        "split": splits,
        "source": "folder",
    })
    return write_ingest_folder(root, frame, images)


#: ``simplebits run`` overrides shared by the end-to-end tests: 32-px working images and a prior
#: fine-tune of a few steps (the stages run, in seconds; the numbers mean nothing).
TINY_RUN_BASICS = [
    "ingest.size=32",
    "prior.settings.train.max_steps=3",
    "prior.settings.train.steps_per_epoch=3",
    "prior.settings.train.val_images=8",
    "prior.settings.train.val_size=32",
    "prior.settings.data.sizes=[32]",
    "prior.settings.data.size_weights=[1.0]",
    "prior.settings.train.batch_size=4",
    "classify.train.epochs=1",
]

#: The whole ``simplebits run`` on the demo cohort, tiny (one task, one epoch per stage): for tests
#: of how the main job runs (from a wheel, into a PACS), not of what it finds.
TINY_DEMO_RUN = [
    *TINY_RUN_BASICS,
    "cohort.n=40",
    "tasks=[effusion]",
    "joint_tasks=[effusion]",
    "joint.train.epochs=1",
    "audit.train.epochs=1",
    "audit.independent.train.epochs=1",
    "audit.evaluate.baselines=[blur]",
    "audit.evaluate.retrain=false",
]
