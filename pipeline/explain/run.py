"""``simplebits explain``: saliency maps and latent-shift counterfactuals for the studies of a cohort.

The explainers a researcher would otherwise run, batched and written where a later step finds
them. Layout of the output folder::

    <study_id>/<method>.npy     float32 (H, W) at working resolution, the method's raw (signed) map
    <study_id>/<method>.png     the radiograph in grey under the map (pipeline/explain/overlay.py)
    maps.csv                    one row per finished (study, method): label, explained log-odds,
                                seconds per study, the method's own numbers (MAP_COLUMNS)
    inputs.json                 SHA-256 of the classifier, prior, ingest config and method settings
    config.resolved.yaml

Every method explains the classifier's log-odds of the task's positive class (target.py). Resuming:
``maps.csv`` is the commit log, as the status table is for ingest: a row is appended after its
study's ``.png`` and ``.npy`` are written (atomically), and a (study, method) counts as done only
with both its row and its ``.npy``; a re-run computes the rest, also after adding a method.
One process on one device (CUDA with bf16 autocast for the classifier, else CPU).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from pipeline.config import RESOLVED_CONFIG_NAME, StrictModel, save_resolved_config
from pipeline.data.dataset import eval_batches
from pipeline.data.ingest import Cohort, load_cohort
from pipeline.data.manifest import SplitName
from pipeline.errors import UserError
from pipeline.explain.gradcam import GradCamConfig
from pipeline.explain.integrated_gradients import IntegratedGradientsConfig
from pipeline.explain.latent_shift import LatentShiftConfig
from pipeline.explain.methods import METHODS, NEEDS_PRIOR, Models
from pipeline.explain.occlusion import OcclusionConfig
from pipeline.explain.overlay import overlay_png
from pipeline.explain.result import Explanation
from pipeline.explain.target import BaselineKind, TaskLogit
from pipeline.inference import INPUTS_NAME, check_same_models, classifier_task, file_sha256
from pipeline.runtime.atomic import atomic_write_bytes, atomic_write_npy, atomic_write_text
from pipeline.runtime.csv_log import AppendOnlyCsv
from pipeline.runtime.device import pick_device
from pipeline.tasks import TaskName
from pipeline.runtime.progress import progress

log = logging.getLogger(__name__)

MAPS_NAME = "maps.csv"
EXTRA_COLUMNS = ("convergence_delta", "shift", "logit_shifted")
MAP_COLUMNS = ("study_id", "method", "label", "logit", "seconds", *EXTRA_COLUMNS)
# settings that change the maps; the others (methods, split, limit, batch size, device) only choose
# which maps are made and how fast, so they may change when a run is resumed
RESULT_SETTINGS = ("classifier_arch", "classifier_kwargs", "classifier_adapter", "task", "baseline", "bf16",
                   "ig", "occlusion", "gradcam", "latent_shift")


class ExplainConfig(StrictModel):
    """``configs/explain.yaml``; paths usually come from the command line."""

    ingest: str | None = None
    classifier: str | None = None  # any file load_classifier reads (pipeline/models/classifiers.py)
    classifier_arch: str | None = None  # registered name or module:function; None: the side-car .json's
    classifier_kwargs: dict[str, Any] = {}  # network kwargs over the side-car's
    classifier_adapter: dict[str, Any] = {}  # adapter fields over the side-car's (pipeline/models/adapter.py)
    prior: str | None = None  # None: the shipped prior (latent_shift only)
    out: str | None = None
    task: TaskName | None = None  # None: the task in the classifier's .json side-car
    methods: list[str] = ["ig", "occlusion", "gradcam", "latent_shift"]
    split: SplitName | None = None  # None: every split of the ingest folder
    limit: int | None = Field(None, ge=1)  # the first N studies of the split, in manifest order
    baseline: BaselineKind = "black"  # IG's reference image and occlusion's fill
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    bf16: bool = True  # classifier under bf16 autocast on CUDA (the Glow always runs in float32)
    ig: IntegratedGradientsConfig = IntegratedGradientsConfig()
    occlusion: OcclusionConfig = OcclusionConfig()
    gradcam: GradCamConfig = GradCamConfig()
    latent_shift: LatentShiftConfig = LatentShiftConfig()

    @field_validator("methods")
    @classmethod
    def _check_methods(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in METHODS]
        if unknown or not value:
            raise ValueError(f"methods must be a non-empty list of {sorted(METHODS)}, got {value!r}")
        return list(dict.fromkeys(value))


# --- the output folder ------------------------------------------------------------------------------


def map_path(out_dir: str | Path, study_id: str, method: str) -> Path:
    """Where the ``.npy`` map of one study and method lives (the ``.png`` is its sibling)."""
    return Path(out_dir) / study_id / f"{method}.npy"


def read_map_rows(out_dir: str | Path) -> list[dict[str, str]]:
    """The complete rows of ``maps.csv``, the last one per (study, method) (a line torn by a kill and
    repeated headers dropped)."""
    path = Path(out_dir) / MAPS_NAME
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        whole_lines = (line for line in fh if line.endswith("\n"))
        rows = {(row[0], row[1]): dict(zip(MAP_COLUMNS, row)) for row in csv.reader(whole_lines)
                if len(row) == len(MAP_COLUMNS) and row[0] != "study_id"}
    return list(rows.values())


def finished_maps(out_dir: str | Path) -> set[tuple[str, str]]:
    """(study_id, method) pairs with a row in ``maps.csv`` and their ``.npy`` on disk."""
    return {(row["study_id"], row["method"]) for row in read_map_rows(out_dir)
            if map_path(out_dir, row["study_id"], row["method"]).is_file()}


def write_study_map(out_dir: str | Path, study_id: str, method: str, image_u8: np.ndarray,
                    attribution: np.ndarray) -> None:
    """The overlay PNG, then the ``.npy`` map, each atomically."""
    npy = map_path(out_dir, study_id, method)
    atomic_write_bytes(npy.with_suffix(".png"), overlay_png(image_u8, attribution))
    atomic_write_npy(npy, attribution.astype(np.float32))


def _number(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else repr(float(value))


def map_rows(study_ids: Sequence[str], method: str, labels: Sequence[float], result: Explanation,
             seconds: float) -> list[list[str]]:
    extras = {name: values.double().tolist() for name, values in result.extras.items()}
    return [[sid, method, _number(label), _number(float(logit)), _number(seconds),
             *(_number(extras[c][k]) if c in extras else "" for c in EXTRA_COLUMNS)]
            for k, (sid, label, logit) in enumerate(zip(study_ids, labels, result.logit.double().tolist()))]


# --- a cohort -----------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def explain_cohort(cohort: Cohort, models: Models, config: ExplainConfig, out_dir: str | Path,
                   labels: Sequence[float] | None = None, device: torch.device | None = None) -> int:
    """Write every unfinished map of ``config.methods`` for the cohort's studies; returns how many.

    ``labels``: the task label per study (NaN where unknown) for ``maps.csv``; ``device``: where the
    models are (default: the classifier's). Seconds per study are timed per batch and method, with
    the device synchronised, so methods can be compared side by side in one run.
    """
    out_dir = Path(out_dir)
    device = device or next(models.task_logit.parameters()).device
    labels = [math.nan] * len(cohort) if labels is None else list(labels)
    done = finished_maps(out_dir)
    todo = np.array([any((sid, m) not in done for m in config.methods) for sid in cohort.study_ids],
                    dtype=bool)
    positions = np.flatnonzero(todo)
    batches = eval_batches(cohort.select(todo).images, config.batch_size, sharded=False)
    written = 0
    with AppendOnlyCsv(out_dir / MAPS_NAME, MAP_COLUMNS) as table:
        for batch_positions, images in progress(batches, desc="explain",
                                                total=math.ceil(len(positions) / config.batch_size)):
            cohort_positions = positions[batch_positions]
            study_ids = [cohort.study_ids[i] for i in cohort_positions]
            images_u8 = images[:, 0].numpy()
            x01 = images.to(device).float() / 255.0
            for method in config.methods:
                rows = [k for k, sid in enumerate(study_ids) if (sid, method) not in done]
                if not rows:
                    continue
                _synchronize(device)
                start = time.perf_counter()
                result = METHODS[method](models, x01[rows], config)
                _synchronize(device)
                seconds = (time.perf_counter() - start) / len(rows)
                if not torch.isfinite(result.maps).all():
                    raise RuntimeError(f"{method}: non-finite map values for studies "
                                       f"{[study_ids[k] for k in rows]}")
                for j, k in enumerate(rows):
                    write_study_map(out_dir, study_ids[k], method, images_u8[k], result.maps[j].numpy())
                table.write_rows(map_rows([study_ids[k] for k in rows], method,
                                          [labels[cohort_positions[k]] for k in rows], result, seconds))
                written += len(rows)
    return written


# --- the command ----------------------------------------------------------------------------------


def input_fingerprints(config: ExplainConfig, prior_path: Path) -> dict[str, str]:
    """SHA-256 of the model files, of the ingest folder's resolved config and of the settings that
    change the maps (RESULT_SETTINGS): a resumed run must not mix maps of other inputs."""
    classifier = Path(config.classifier)
    files = {"classifier": [classifier, classifier.with_suffix(".json")],
             "prior": [prior_path, prior_path.with_suffix(".json")],
             "ingest": [Path(config.ingest) / RESOLVED_CONFIG_NAME]}
    fingerprints = {f"{name}/{file.name}": file_sha256(file)
                    for name, paths in files.items() for file in paths if file.is_file()}
    settings = json.dumps(config.model_dump(mode="json", include=set(RESULT_SETTINGS)), sort_keys=True)
    fingerprints["settings"] = hashlib.sha256(settings.encode()).hexdigest()
    return fingerprints


def limited(cohort: Cohort, limit: int | None) -> Cohort:
    """The first ``limit`` studies (all with ``None``)."""
    if limit is None or limit >= len(cohort):
        return cohort
    return cohort.select(np.arange(len(cohort)) < limit)


def cohort_labels(cohort: Cohort, task: str | None) -> list[float]:
    if task is None:
        return [math.nan] * len(cohort)
    from pipeline.tasks import task_labels

    return task_labels(cohort.frame, task).astype(float).tolist()


def method_summary(out_dir: str | Path, methods: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per method: maps written so far and mean seconds per study."""
    rows = read_map_rows(out_dir)
    summary = {}
    for method in methods:
        seconds = [float(r["seconds"]) for r in rows if r["method"] == method]
        summary[method] = {"n_maps": float(len(seconds)),
                           "seconds_per_study": float(np.mean(seconds)) if seconds else math.nan}
    return summary


def run_explain(config: ExplainConfig) -> dict[str, object]:
    """``simplebits explain``: load the cohort and models, write the missing maps, summarise."""
    from pipeline.models.classifiers import load_classifier
    from pipeline.prior import SHIPPED_PRIOR, load_prior

    for key in ("ingest", "classifier", "out"):
        if not getattr(config, key):
            raise UserError(f"explain needs --{key}")
    out_dir = Path(config.out)
    task = config.task or classifier_task(config.classifier)
    if task is not None:
        config = config.model_copy(update={"task": task})
    prior_path = Path(config.prior or SHIPPED_PRIOR).with_suffix(".safetensors")
    fingerprints = input_fingerprints(config, prior_path)
    try:
        check_same_models(out_dir, fingerprints)  # apply's guard: same inputs.json, same rule
    except ValueError as err:
        raise UserError(str(err)) from err
    try:
        cohort = limited(load_cohort(config.ingest, split=config.split), config.limit)
    except FileNotFoundError as err:
        raise UserError(str(err)) from err
    if len(cohort) == 0:
        where = f" in split {config.split!r}" if config.split else ""
        raise UserError(f"{config.ingest}: no studies{where}")

    device = pick_device(config.device)
    classifier = load_classifier(config.classifier, config.classifier_arch, config.classifier_kwargs,
                                 config.classifier_adapter, task=task).to(device).eval()
    try:
        prior = load_prior(prior_path, device=device) if NEEDS_PRIOR & set(config.methods) else None
    except FileNotFoundError as err:
        raise UserError(f"{err} (latent_shift needs the Glow prior; give --prior)") from err
    if prior is not None and any(side % prior.divisor for side in cohort.image_size):
        raise UserError(f"{config.ingest}: working size {cohort.image_size} is not divisible by "
                        f"{prior.divisor}, which the prior {prior_path} needs for latent_shift")
    models = Models(TaskLogit(classifier, bf16=config.bf16), prior)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(config, out_dir)
    atomic_write_text(out_dir / INPUTS_NAME, json.dumps(fingerprints, indent=2) + "\n")
    written = explain_cohort(cohort, models, config, out_dir, cohort_labels(cohort, task), device)
    log.info("%d maps written to %s", written, out_dir)
    return {"out": str(out_dir), "task": task, "n_studies": len(cohort), "maps_written": written,
            "methods": method_summary(out_dir, config.methods)}
