"""Demo cohort orchestration: deterministic study plan, rendering, and the files of a cohort folder.

Every random draw of study ``i`` comes from generators seeded with ``(seed, i)`` (patients likewise),
so a study does not depend on the cohort size or on which studies were already rendered; a resumed
run skips finished studies and re-derives the tables from the plan.

Outputs under ``out_dir``: ``dicom/<study_id>.dcm``, ``masks/<study_id>.npz`` (``fluid``, ``lung``,
``breast``, ``distractor``), ``manifest.csv`` (project schema; findings ``effusion`` and
``support_devices``, the burned-in marker or tag present or absent), ``ground_truth.csv`` (no PHI) and
``config.resolved.yaml``.

Options (all off by default; the default cohort's files do not change with them):

- ``devices.kinds``: support devices placed in the CT before projection (:mod:`.devices`), each with
  its own masks (``<kind>`` at the cohort size, ``<kind>_<n>`` at each of ``devices.mask_sizes``, and
  the union ``devices``); presence per study in ``ground_truth.csv`` (one column per kind) and in the
  manifest's ``support_devices`` (any device or burned-in mark). ``devices.contamination`` makes them
  follow the label in the train split only.
- ``counterfactuals``: every study also rendered without each of its devices, without its
  effusion and without its breasts (the sex task's sign), ``counterfactuals/no_<feature>/<study_id>.dcm``,
  same acquisition and noise (see :func:`pipeline.data.demo.render.detect_coupled`); :mod:`.reliance`
  scores a classifier on them.
- ``effusion.volume_ml``: e.g. ``(50, 300)`` for the fine-detail cohort, where the only sign is a
  blunted costophrenic angle or a thin meniscus.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator
from pydicom.uid import generate_uid

from pipeline.config import StrictModel, save_resolved_config
from pipeline.data.demo.breast import BREAST_ATTENUATION, BreastAnchors, breast_anchors, breast_edits
from pipeline.data.demo.ct import DEFAULT_CACHE_DIR, PreparedCT, prepare_ct
from pipeline.data.demo.devices import (
    DEVICE_KINDS, DeviceAnchors, DeviceCloud, DeviceParams, build_device, device_anchors,
    sample_device_params,
)
from pipeline.data.demo.dicom import (
    EncodingVariant, StudyHeader, encode_pixels, sample_variant, tone_lut, write_dicom,
)
from pipeline.data.demo.distractors import Distractor, distractor_mask, sample_distractor
from pipeline.data.demo.effusion import CACHE_VERSION, FLUID_ATTENUATION, LungSide, lung_side
from pipeline.data.demo.identities import REFERRERS, accession_number, patient_identity
from pipeline.data.demo.render import (
    Detector, Exposure, Pose, area_mean, detect, detect_coupled, detection_window, process, project,
    sample_volume, smooth_displacement, splat_thickness, tone_curve, warp,
)
from pipeline.data.manifest import assign_patient_splits, write_manifest
from pipeline.data.pseudonym import patient_pseudonym, study_pseudonym
from pipeline.runtime.atomic import atomic_write_bytes
from pipeline.runtime.device import pick_device
from pipeline.runtime.progress import progress

log = logging.getLogger(__name__)
MASK_NAMES = ("fluid", "lung", "breast", "distractor")
COUNTERFACTUALS_DIR = "counterfactuals"


# ----------------------------------------------------------------------------------------------- config
class EffusionConfig(StrictModel):
    prevalence: float = Field(0.5, ge=0, le=1)
    side_weights: dict[Literal["left", "right", "both"], float] = {"left": 0.4, "right": 0.4, "both": 0.2}
    # Per-side volume, log-uniform: skewed towards small, subtle effusions.
    volume_ml: tuple[float, float] = (80.0, 1000.0)


class SexConfig(StrictModel):
    female_fraction: float = Field(0.5, ge=0, le=1)
    breast_size: tuple[float, float] = (0.05, 0.8)  # uniform, female patients
    # Male anterior chest-wall soft tissue (adiposity, gynaecomastia): small, overlapping the
    # smallest breasts so that sex is not perfectly separable.
    male_breast_size: tuple[float, float] = (0.0, 0.15)
    age_years: tuple[float, float] = (25.0, 90.0)


class NuisanceConfig(StrictModel):
    rotation_deg: float = 5.0  # uniform ± per axis
    translation_mm: float = 25.0  # uniform ± in x and z
    # Body habitus per axis (x, y, z), uniform 1 ± value; z also stands in for the depth of inspiration.
    scale: tuple[float, float, float] = (0.08, 0.06, 0.10)
    # Amplitude of a smooth in-plane deformation: anatomical variety the single CT lacks.
    warp_mm: tuple[float, float] = (3.0, 18.0)
    source_to_detector_mm: tuple[float, float] = (1700.0, 1900.0)
    isocenter_to_detector_mm: tuple[float, float] = (130.0, 190.0)
    photons_per_mm2: tuple[float, float] = (800.0, 15000.0)  # log-uniform
    scatter_fraction: tuple[float, float] = (0.15, 0.5)
    blur_px: tuple[float, float] = (0.4, 1.0)
    edge_enhance: tuple[float, float] = (0.0, 1.0)
    gamma: tuple[float, float] = (0.7, 1.4)


class DistractorConfig(StrictModel):
    mode: Literal["none", "independent", "correlated"] = "none"
    p_present: float = Field(0.5, ge=0, le=1)  # independent mode, and val/test of correlated mode
    p_match: float = Field(0.9, ge=0, le=1)  # correlated mode, train split: P(present | effusion=1)
    unsaturated_level: tuple[float, float] = (0.82, 0.95)  # log-image value of unsaturated marks


class DeviceConfig(StrictModel):
    """Support devices rendered in 3D (:mod:`pipeline.data.demo.devices`); none by default."""

    kinds: list[Literal["chest_drain", "ecg", "pacemaker"]] = []
    # Train split: P(device | positive) = contamination, P(device | negative) = 1 - contamination, for
    # each kind independently. None: every split draws at base_rate, independent of the label.
    contamination: float | None = Field(None, ge=0, le=1)
    follows: Literal["effusion", "sex"] = "effusion"  # the label contamination follows (sex: M positive)
    base_rate: float = Field(0.5, ge=0, le=1)  # P(device) on val/test, and everywhere without contamination
    # A pixel belongs to a device where it changes the projected attenuation by at least this many
    # water-equivalent mm (2 mm: ~4% of the primary beam at mu_water 0.02/mm).
    mask_threshold_mm: float = Field(2.0, gt=0)
    # Working resolutions that get their own device masks (the area mean of the device's line integral
    # at that detector size: thin devices vanish from a downsampled binary mask, not from the image).
    mask_sizes: list[int] = [32, 64]


class RenderConfig(StrictModel):
    field_of_view_mm: float = 360.0
    n_points: int = Field(96, ge=8)
    bone_multiplier: float = 2.0
    mu_water_per_mm: float = 0.02
    # A pixel belongs to a structure where the projected path through it is at least this long.
    mask_threshold_mm: dict[Literal["fluid", "lung", "breast"], float] = {
        "fluid": 10.0, "lung": 10.0, "breast": 5.0,
    }
    device: str = "auto"
    num_threads: int | None = None  # torch intra-op threads; None leaves the process default


class DemoCohortConfig(StrictModel):
    n: int = Field(200, ge=1)
    size: int = Field(128, ge=16)
    seed: int = 0
    split_fractions: dict[Literal["train", "val", "test"], float] = {"train": 0.7, "val": 0.15, "test": 0.15}
    studies_per_patient_weights: tuple[float, ...] = (0.7, 0.2, 0.1)  # P(1), P(2), P(3) studies
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    effusion: EffusionConfig = EffusionConfig()
    sex: SexConfig = SexConfig()
    nuisance: NuisanceConfig = NuisanceConfig()
    distractor: DistractorConfig = DistractorConfig()
    devices: DeviceConfig = DeviceConfig()
    # Also render each study without each of its devices and without its effusion (for reliance).
    counterfactuals: bool = False
    render: RenderConfig = RenderConfig()

    @model_validator(mode="after")
    def _check(self) -> "DemoCohortConfig":
        low, high = self.effusion.volume_ml
        if not 0 < low <= high:
            raise ValueError(f"effusion.volume_ml must satisfy 0 < low <= high, got {(low, high)}")
        return self


# ------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StudyPlan:
    """Everything needed to render and write one study; ``header`` holds the synthetic PHI."""

    index: int
    study_id: str
    patient_id: str
    split: str
    sex: str
    age: float
    effusion_side: str  # none / left / right / both
    volume_left_ml: float
    volume_right_ml: float
    breast_size: float
    breast_offset_mm: tuple[float, float]
    breast_asymmetry: float
    pose: Pose
    warp_mm: float
    exposure: Exposure
    distractor: Distractor | None
    distractor_level: float
    variant: EncodingVariant
    header: StudyHeader
    encoding_seed: int
    correlated: bool = field(default=False)
    device_kinds: tuple[str, ...] = ()  # the kinds this cohort renders (config), present or not
    devices: tuple[str, ...] = ()  # the kinds present in this study
    device_params: DeviceParams | None = None
    device_correlated: bool = False  # devices drawn with the train split's contamination

    @property
    def effusion(self) -> int:
        return int(self.effusion_side != "none")

    @property
    def support_devices(self) -> int:
        """The positive control's label: 1 where a burned-in marker or text tag is drawn (the
        ``distractor`` mask), else 0. An audit of a classifier for it must keep what the other
        tasks' audits remove. With 3D devices: a mark or any device."""
        return int(self.distractor is not None or bool(self.devices))


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def plan_cohort(config: DemoCohortConfig) -> list[StudyPlan]:
    """The deterministic per-study parameters of a cohort (splits assigned before any rendering)."""
    patients = []  # (patient index, sex, identity, study dates)
    n_studies = 0
    weights = np.asarray(config.studies_per_patient_weights, dtype=float)
    while n_studies < config.n:
        index = len(patients)
        rng = np.random.default_rng([config.seed, 0, index])
        sex = "F" if rng.random() < config.sex.female_fraction else "M"
        count = int(rng.choice(len(weights), p=weights / weights.sum())) + 1
        first = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3000)))
        dates = sorted(first + dt.timedelta(days=int(d)) for d in [0, *rng.integers(1, 700, size=count - 1)])
        identity = patient_identity(rng, index, config.seed, sex, _uniform(rng, config.sex.age_years), first)
        breast = _uniform(rng, config.sex.breast_size if sex == "F" else config.sex.male_breast_size)
        # Truncate only after all draws, so a smaller cohort is a prefix of a larger one.
        dates = dates[: config.n - n_studies]
        patients.append((sex, identity, dates, breast))
        n_studies += len(dates)

    rows = []
    for sex, identity, dates, breast in patients:
        for date in dates:
            rows.append((len(rows), sex, identity, date, breast))
    splits = assign_patient_splits(
        pd.DataFrame({"patient_id": [patient_pseudonym(r[2].mrn) for r in rows]}),
        dict(config.split_fractions), seed=config.seed,
    )["split"].tolist()
    return [_plan_study(config, *row, split) for row, split in zip(rows, splits)]


def _plan_study(config: DemoCohortConfig, index: int, sex: str, identity, date: dt.date, breast: float,
                split: str) -> StudyPlan:
    rng = np.random.default_rng([config.seed, 1, index])
    eff, nui = config.effusion, config.nuisance
    side = "none"
    if rng.random() < eff.prevalence:
        names = list(eff.side_weights)
        p = np.asarray([eff.side_weights[k] for k in names], dtype=float)
        side = names[int(rng.choice(len(names), p=p / p.sum()))]
    volume_left = _log_uniform(rng, eff.volume_ml) if side in ("left", "both") else 0.0
    volume_right = _log_uniform(rng, eff.volume_ml) if side in ("right", "both") else 0.0

    sdd = _uniform(rng, nui.source_to_detector_mm)
    idd = _uniform(rng, nui.isocenter_to_detector_mm)
    pose = Pose(
        rotation_deg=tuple(float(v) for v in rng.uniform(-nui.rotation_deg, nui.rotation_deg, 3)),
        translation_mm=(_uniform(rng, (-nui.translation_mm, nui.translation_mm)), 0.0,
                        _uniform(rng, (-nui.translation_mm, nui.translation_mm))),
        scale=tuple(float(v) for v in 1.0 + rng.uniform(-1.0, 1.0, 3) * np.asarray(nui.scale)),
        source_to_isocenter_mm=sdd - idd,
        isocenter_to_detector_mm=idd,
    )
    warp_mm = _uniform(rng, nui.warp_mm)
    exposure = Exposure(
        photons_per_mm2=_log_uniform(rng, nui.photons_per_mm2),
        mu_water_per_mm=config.render.mu_water_per_mm,
        scatter_fraction=_uniform(rng, nui.scatter_fraction),
        blur_px=_uniform(rng, nui.blur_px),
        edge_enhance=_uniform(rng, nui.edge_enhance),
        gamma=_uniform(rng, nui.gamma),
    )

    mode = config.distractor.mode
    correlated = mode == "correlated" and split == "train"
    if correlated:
        p_present = config.distractor.p_match if side != "none" else 1.0 - config.distractor.p_match
    else:
        p_present = config.distractor.p_present if mode != "none" else 0.0
    present = bool(rng.random() < p_present)
    candidate = sample_distractor(rng)
    level = _uniform(rng, config.distractor.unsaturated_level)

    variant = sample_variant(rng)
    study_uid = generate_uid(entropy_srcs=[str(config.seed), str(index), "study"])
    age = (date - identity.birth_date).days / 365.25
    header = StudyHeader(
        patient_name=identity.name, patient_id=identity.mrn,
        patient_birth_date=identity.birth_date.strftime("%Y%m%d"), patient_sex=sex,
        study_date=date.strftime("%Y%m%d"),
        study_time="".join(f"{int(v):02d}" for v in (rng.integers(7, 20), *rng.integers(0, 60, 2))),
        accession_number=accession_number(config.seed, index), institution_name=identity.institution,
        referring_physician=REFERRERS[int(rng.integers(len(REFERRERS)))],
        study_uid=study_uid,
        series_uid=generate_uid(entropy_srcs=[str(config.seed), str(index), "series"]),
        sop_uid=generate_uid(entropy_srcs=[str(config.seed), str(index), "sop"]),
        pixel_spacing_mm=config.render.field_of_view_mm / config.size,
        source_to_detector_mm=sdd, source_to_patient_mm=sdd - idd - 120.0,
        kvp=float(rng.choice([110, 115, 120, 125])), exposure_mas=exposure.photons_per_mm2 / 1000.0,
        # PS3.3 C.7.6.1 defines BurnedInAnnotation as text enough to identify the patient and the date;
        # the demo's marks (laterality letters, technique tags such as ERECT) carry neither, so every
        # demo study may have its de-identified original beside the simplified series in a PACS.
        burned_in_annotation=False,
    )
    plan = StudyPlan(
        index=index, study_id=study_pseudonym(study_uid), patient_id=patient_pseudonym(identity.mrn),
        split=split, sex=sex, age=round(age, 1), effusion_side=side,
        volume_left_ml=round(volume_left, 1), volume_right_ml=round(volume_right, 1),
        breast_size=round(breast, 3), breast_offset_mm=tuple(float(v) for v in rng.uniform(-10, 10, 2)),
        breast_asymmetry=float(rng.uniform(-0.1, 0.1)), pose=pose, warp_mm=warp_mm, exposure=exposure,
        distractor=candidate if present else None, distractor_level=level, variant=variant, header=header,
        encoding_seed=int(rng.integers(2**32)), correlated=correlated,
    )
    return _plan_devices(config, plan) if config.devices.kinds else plan


def _plan_devices(config: DemoCohortConfig, plan: StudyPlan) -> StudyPlan:
    """Which devices a study has, from its own generator (the other draws of the plan are untouched)."""
    devices = config.devices
    rng = np.random.default_rng([config.seed, 3, plan.index])
    contaminated = devices.contamination is not None and plan.split == "train"
    if contaminated:
        positive = plan.effusion == 1 if devices.follows == "effusion" else plan.sex == "M"
        p_present = devices.contamination if positive else 1.0 - devices.contamination
    else:
        p_present = devices.base_rate
    kinds = tuple(k for k in DEVICE_KINDS if k in devices.kinds)
    # one draw per known kind whether enabled or not: a study's ECG does not change when drains are added
    draws = dict(zip(DEVICE_KINDS, rng.random(len(DEVICE_KINDS))))
    present = tuple(k for k in kinds if draws[k] < p_present)
    return replace(plan, device_kinds=kinds, devices=present, device_params=sample_device_params(rng),
                   device_correlated=contaminated)


# ---------------------------------------------------------------------------------------------- render
@dataclass(frozen=True)
class RenderedStudy:
    display: np.ndarray  # (size, size) float32 in [0, 1], bright = attenuating
    log_image: np.ndarray  # before the tone curve
    masks: dict[str, np.ndarray]  # MASK_NAMES (and device masks) -> bool (size, size) or (n, n)
    # "no_<feature>" -> (display, log_image) of the same study without that device or the effusion
    counterfactuals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def inplane_voxels_for(size: int) -> int:
    """CT resolution for a detector size: voxels no coarser than about half a detector pixel."""
    return 128 if size <= 64 else 256


class DemoScene:
    """The prepared CT on the render device plus everything precomputed once per cohort."""

    def __init__(self, config: DemoCohortConfig, device: torch.device | None = None):
        self.config = config
        self.device = device or pick_device(config.render.device)
        inplane = inplane_voxels_for(config.size)
        assets = _scene_assets(inplane, config.render.bone_multiplier, config.cache_dir)
        self.ct, self.sides, self.anchors, (self.lung_points, self.lung_weights, self.lung_extent) = assets
        self.pristine = self.ct.attenuation
        self.volume = self.pristine.clone().to(self.device)
        self.detector = Detector(config.size, config.render.field_of_view_mm)

    def render(self, plan: StudyPlan) -> RenderedStudy:
        ct, thresholds = self.ct, self.config.render.mask_threshold_mm
        clouds = {kind: build_device(kind, self.anchors_for_devices, plan.device_params)
                  for kind in plan.devices}
        projected = self._project(plan, clouds)

        rng = np.random.default_rng([self.config.seed, 2, plan.index])
        # One in-plane deformation for the image and its masks, so they stay registered.
        displacement = smooth_displacement(rng, self.config.size, plan.warp_mm / self.detector.pixel_mm)
        counterfactuals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        excess: dict[str, np.ndarray] = {}
        if not self.coupled:
            log_image, display = detect(warp(projected.line_integral, displacement), plan.exposure,
                                        self.detector.pixel_mm, rng)
        else:
            quantiles = rng.random(projected.line_integral.shape)

            def acquire(line_integral: np.ndarray) -> np.ndarray:
                return detect_coupled(line_integral, plan.exposure, self.detector.pixel_mm, quantiles)

            # Line integrals are linear in the volume: the device layers add to the anatomy's, after
            # the same warp, so a variant without a device differs from the study by that layer only.
            base = warp(projected.line_integral, displacement)
            excess = {k: warp(v, displacement) for k, v in projected.device_excess.items()}
            bare = acquire(base)
            # One window for every variant (the study's own without devices), so that removing a
            # feature changes only the pixels it covers, not the whole image's windowing.
            window = detection_window(bare)
            full = acquire(base + sum(excess.values())) if excess else bare
            log_image, display = process(full, plan.exposure, window)
            if self.config.counterfactuals:

                def variant(line_integral: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                    log_variant, display_variant = process(acquire(line_integral), plan.exposure, window)
                    return display_variant, log_variant

                for kind in excess:
                    others = sum((v for k, v in excess.items() if k != kind), np.zeros_like(base))
                    counterfactuals[f"no_{kind}"] = variant(base + others)

                def without(**feature: bool) -> tuple[np.ndarray, np.ndarray]:
                    other = self._project(plan, clouds, **feature)
                    return variant(warp(other.line_integral, displacement) + sum(
                        (warp(v, displacement) for v in other.device_excess.values()), np.zeros_like(base)))

                if plan.effusion:
                    counterfactuals["no_effusion"] = without(effusion=False)
                if projected.breast_points:  # the sex task's anatomical sign (male breasts can be nil)
                    counterfactuals["no_breast"] = without(breast=False)

        voxel = (ct.spacing[2], ct.spacing[0])
        thickness = {
            "fluid": self._mask(projected.fluid_points, projected.fluid_weights, plan.pose, voxel),
            "lung": self._mask([self.lung_points], [self.lung_weights], plan.pose, self.lung_extent),
            "breast": self._mask(projected.breast_points, projected.breast_weights, plan.pose, voxel),
        }
        masks = {name: warp(map_, displacement) >= thresholds[name] for name, map_ in thickness.items()}
        masks["distractor"] = np.zeros((self.config.size,) * 2, dtype=bool)
        if plan.device_kinds:
            masks.update(self._device_masks(plan, excess))
        if plan.distractor is not None:
            mark = distractor_mask(plan.distractor, self.config.size)
            level = 1.0 if plan.distractor.saturated else plan.distractor_level
            for variant_display, variant_log in [(display, log_image), *counterfactuals.values()]:
                variant_log[mark] = level
                variant_display[mark] = tone_curve(np.float32(level), plan.exposure.gamma)
            masks["distractor"] = mark
        return RenderedStudy(display, log_image, masks, counterfactuals)

    @property
    def coupled(self) -> bool:
        """Whether studies are rendered as sets of variants with common noise (devices or counterfactuals)."""
        return bool(self.config.devices.kinds) or self.config.counterfactuals

    @functools.cached_property
    def anchors_for_devices(self) -> DeviceAnchors:
        return _device_anchors(inplane_voxels_for(self.config.size), self.config.render.bone_multiplier,
                               self.config.cache_dir)

    def _project(self, plan: StudyPlan, clouds: dict[str, DeviceCloud], effusion: bool = True,
                 breast: bool = True) -> _Projection:
        """Line integral of the study's volume (with or without its effusion and its breasts) and, read
        from that same volume, each device's excess attenuation splatted onto the detector."""
        ct, volume = self.ct, self.volume
        edited: list[tuple[slice, ...]] = []
        fluid_points, fluid_weights = [], []
        device_excess = {}
        try:
            for side, ml in (("left", plan.volume_left_ml), ("right", plan.volume_right_ml)):
                if ml > 0 and effusion:
                    lung = self.sides[side]
                    fraction = lung.fraction_for_volume(ml)
                    self._blend(lung.box, fraction, FLUID_ATTENUATION)
                    edited.append(lung.box)
                    points, weights = _box_sources(ct, lung.box, fraction)
                    fluid_points.append(points)
                    fluid_weights.append(weights)
            breast_points, breast_weights = [], []
            edits = breast_edits(ct, self.anchors, plan.breast_size, plan.breast_offset_mm,
                                 plan.breast_asymmetry) if breast else []
            for edit in edits:
                self._blend(edit.box, edit.fraction, BREAST_ATTENUATION)
                edited.append(edit.box)
                points, weights = _box_sources(ct, edit.box, edit.fraction)
                breast_points.append(points)
                breast_weights.append(weights)
            line_integral = project(volume, ct.half_extent, plan.pose, self.detector,
                                    self.config.render.n_points).cpu().numpy()
            for kind, cloud in clouds.items():
                # the device displaces the tissue it occupies: what it adds is its excess attenuation
                tissue = sample_volume(volume, ct.half_extent, cloud.points)
                weights = (cloud.attenuation - tissue) * cloud.volume_mm3
                device_excess[kind] = splat_thickness(cloud.points, weights, plan.pose, self.detector)
        finally:
            for box in edited:
                volume[box] = self.pristine[box].to(self.device)
        return _Projection(line_integral, fluid_points, fluid_weights, breast_points, breast_weights,
                           device_excess)

    def _device_masks(self, plan: StudyPlan, excess: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``<kind>`` at the cohort size and ``<kind>_<n>`` at each working size, plus their unions
        ``devices``/``devices_<n>``: pixels whose (area-mean) excess line integral reaches the threshold."""
        size, threshold = self.config.size, self.config.devices.mask_threshold_mm
        sizes = [size, *sorted(n for n in set(self.config.devices.mask_sizes) if n < size)]
        masks: dict[str, np.ndarray] = {}
        for n in sizes:
            suffix = "" if n == size else f"_{n}"
            union = np.zeros((n, n), dtype=bool)
            for kind in plan.device_kinds:
                layer = excess.get(kind)
                mask = np.zeros((n, n), dtype=bool) if layer is None else (
                    np.abs(layer if n == size else area_mean(layer, n)) >= threshold)
                masks[f"{kind}{suffix}"] = mask
                union |= mask
            masks[f"devices{suffix}"] = union
        return masks

    def _blend(self, box: tuple[slice, ...], fraction: np.ndarray, attenuation: float) -> None:
        f = torch.from_numpy(fraction).to(self.device)
        self.volume[box] = f * attenuation + (1.0 - f) * self.volume[box]

    def _mask(self, points: list[np.ndarray], weights: list[np.ndarray], pose: Pose,
              extent_mm: tuple[float, float]) -> np.ndarray:
        if not points:
            return np.zeros((self.config.size,) * 2, dtype=np.float32)
        return splat_thickness(np.concatenate(points), np.concatenate(weights), pose, self.detector,
                               extent_mm)


@dataclass(frozen=True)
class _Projection:
    line_integral: np.ndarray
    fluid_points: list[np.ndarray]
    fluid_weights: list[np.ndarray]
    breast_points: list[np.ndarray]
    breast_weights: list[np.ndarray]
    device_excess: dict[str, np.ndarray]  # kind -> (size, size) excess line integral, before the warp


@functools.lru_cache(maxsize=2)
def _device_anchors(inplane_voxels: int, bone_multiplier: float, cache_dir: str) -> DeviceAnchors:
    ct, sides, _, _ = _scene_assets(inplane_voxels, bone_multiplier, cache_dir)
    return device_anchors(ct, sides, cache_dir or None)


@functools.lru_cache(maxsize=2)
def _scene_assets(inplane_voxels: int, bone_multiplier: float, cache_dir: str
                  ) -> tuple[PreparedCT, dict[str, LungSide], BreastAnchors, tuple]:
    """CT, lung fields, breast anchors and lung splat sources; kept per process (seconds to build)."""
    cache = Path(cache_dir) if cache_dir else None
    ct = prepare_ct(inplane_voxels, bone_multiplier, cache_dir=cache)
    sides = {}
    for side in ("left", "right"):
        table = cache / f"lung-{side}-{inplane_voxels}-v{CACHE_VERSION}.npz" if cache else None
        sides[side] = lung_side(ct, side, table)
    return ct, sides, breast_anchors(ct), _coarse_sources(ct, ct.lung_left | ct.lung_right)


def _box_sources(ct: PreparedCT, box: tuple[slice, ...], fraction: np.ndarray, minimum: float = 0.02
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Voxel centres (volume mm) and volumes (mm³ × fraction) of a box-shaped fraction field."""
    keep = fraction > minimum
    index = np.stack(np.nonzero(keep), axis=1) + [s.start for s in box]  # (n, 3) as (z, y, x)
    sz, sy, sx = ct.spacing
    hx, hy, hz = ct.half_extent
    centers = np.stack([(index[:, 2] + 0.5) * sx - hx, (index[:, 1] + 0.5) * sy - hy,
                        (index[:, 0] + 0.5) * sz - hz], axis=1)
    return centers, fraction[keep].astype(np.float64) * float(np.prod(ct.spacing))


def _coarse_sources(ct: PreparedCT, mask: np.ndarray, factor: int = 2
                    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """``mask`` pooled in ``factor``³ blocks: block centres, tissue volume per block, (x, z) block size."""
    pads = [(0, (-s) % factor) for s in mask.shape]
    padded = np.pad(mask, pads).astype(np.float32)
    z, y, x = (s // factor for s in padded.shape)
    counts = padded.reshape(z, factor, y, factor, x, factor).sum(axis=(1, 3, 5))
    zi, yi, xi = np.nonzero(counts)
    sz, sy, sx = ct.spacing
    hx, hy, hz = ct.half_extent
    points = np.stack([(xi + 0.5) * factor * sx - hx, (yi + 0.5) * factor * sy - hy,
                       (zi + 0.5) * factor * sz - hz], axis=1)
    return points, counts[zi, yi, xi] * float(np.prod(ct.spacing)), (factor * sx, factor * sz)


# --------------------------------------------------------------------------------------------- writing
def study_paths(out_dir: Path, plan: StudyPlan) -> tuple[Path, Path]:
    return out_dir / "dicom" / f"{plan.study_id}.dcm", out_dir / "masks" / f"{plan.study_id}.npz"


def write_study(out_dir: Path, plan: StudyPlan, rendered: RenderedStudy) -> None:
    """Masks first, DICOM last: a study counts as finished when its DICOM exists."""
    dicom_path, mask_path = study_paths(out_dir, plan)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **rendered.masks)
    atomic_write_bytes(mask_path, buffer.getvalue())
    lut = tone_lut(lambda x: tone_curve(x, plan.exposure.gamma))
    for name, (display, log_image) in rendered.counterfactuals.items():
        # the same encoding (variant and its random draws) as the study, under instance UIDs of its own
        stored, attributes = encode_pixels(display, log_image, lut, plan.variant,
                                           np.random.default_rng(plan.encoding_seed))
        header = replace(plan.header, **{
            key: generate_uid(entropy_srcs=[getattr(plan.header, key), name])
            for key in ("series_uid", "sop_uid")
        })
        path = counterfactual_path(out_dir, name, plan.study_id)
        write_dicom(path, stored, attributes, plan.variant, header)
    rng = np.random.default_rng(plan.encoding_seed)
    stored, attributes = encode_pixels(rendered.display, rendered.log_image, lut, plan.variant, rng)
    write_dicom(dicom_path, stored, attributes, plan.variant, plan.header)


def counterfactual_path(out_dir: Path, name: str, study_id: str) -> Path:
    """``counterfactuals/<name>/<study_id>.dcm``; ``name`` is ``no_<device kind>``, ``no_effusion`` or
    ``no_breast``."""
    return Path(out_dir) / COUNTERFACTUALS_DIR / name / f"{study_id}.dcm"


def manifest_frame(plans: list[StudyPlan]) -> pd.DataFrame:
    return pd.DataFrame({
        "study_id": [p.study_id for p in plans],
        "patient_id": [p.patient_id for p in plans],
        "image_path": [f"dicom/{p.study_id}.dcm" for p in plans],
        "view": "PA",
        "sex": [p.sex for p in plans],
        "age": [p.age for p in plans],
        "effusion": [p.effusion for p in plans],
        "split": [p.split for p in plans],
        "source": "demo",
        "support_devices": [p.support_devices for p in plans],  # derived from what is drawn: no new draw
    })


def ground_truth_frame(plans: list[StudyPlan]) -> pd.DataFrame:
    """Per-study simulation parameters, keyed by pseudonym; contains no header identifiers."""
    rows = []
    for p in plans:
        d = p.distractor
        rows.append({
            "study_id": p.study_id, "split": p.split, "effusion": p.effusion,
            "effusion_side": p.effusion_side,
            "volume_left_ml": p.volume_left_ml, "volume_right_ml": p.volume_right_ml, "sex": p.sex,
            "breast_size": p.breast_size,
            "distractor_kind": d.kind if d else "", "distractor_text": d.text if d else "",
            "distractor_present": int(d is not None), "distractor_saturated": int(bool(d and d.saturated)),
            "distractor_correlated": int(p.correlated),
            **({kind: int(kind in p.devices) for kind in p.device_kinds}),
            **({"chest_drain_side": p.device_params.drain_side if "chest_drain" in p.devices else ""}
               if "chest_drain" in p.device_kinds else {}),
            **({"device_correlated": int(p.device_correlated)} if p.device_kinds else {}),
            **{f"rotation_{a}_deg": round(v, 3) for a, v in zip("xyz", p.pose.rotation_deg)},
            "translation_x_mm": round(p.pose.translation_mm[0], 2),
            "translation_z_mm": round(p.pose.translation_mm[2], 2),
            **{f"scale_{a}": round(v, 4) for a, v in zip("xyz", p.pose.scale)},
            "source_to_detector_mm": round(p.pose.source_to_detector_mm, 1),
            "magnification": round(p.pose.source_to_detector_mm / p.pose.source_to_isocenter_mm, 4),
            "isocenter_to_detector_mm": round(p.pose.isocenter_to_detector_mm, 1),
            "warp_mm": round(p.warp_mm, 2),
            **{k: round(v, 4) for k, v in asdict(p.exposure).items()},
            "encoding": p.variant.label(), "modality": p.variant.modality,
            "photometric": p.variant.photometric,
            "voi": p.variant.voi, "rescale": int(p.variant.rescale), "transfer": p.variant.transfer,
        })
    return pd.DataFrame(rows)


def generate_cohort(config: DemoCohortConfig, out_dir: str | Path, show_progress: bool = True
                    ) -> pd.DataFrame:
    """Render (or resume) a demo cohort into ``out_dir``; returns the manifest frame."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.render.num_threads is not None:
        torch.set_num_threads(config.render.num_threads)
    save_resolved_config(config, out_dir)
    plans = plan_cohort(config)
    todo = [p for p in plans if not all(path.is_file() for path in study_paths(out_dir, p))]
    log.info("demo cohort: %d studies, %d to render, into %s", len(plans), len(todo), out_dir)
    if todo:
        scene = DemoScene(config)
        for plan in progress(todo, desc="demo cohort", disable=not show_progress):
            write_study(out_dir, plan, scene.render(plan))
    manifest = manifest_frame(plans)
    write_manifest(manifest, out_dir / "manifest.csv")
    truth = ground_truth_frame(plans)
    atomic_write_bytes(out_dir / "ground_truth.csv", truth.to_csv(index=False, lineterminator="\n").encode())
    return manifest
