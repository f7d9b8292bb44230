"""Faithfulness against the field (issue 12): SimpleBits vs blur at matched bpd, IG, occlusion, Grad-CAM
and latent shift, on a demo cohort with ground truth that can tell them apart.

``--task effusion`` (default) or ``--task sex``: the classifiers' task, which the devices follow in
training; the task's own sign is the fluid (effusion) or the breasts (sex, M positive: the demo
cohort's only sex sign is the breast shadow over the lung bases). Its rows are named after it
(``rma_fluid`` or ``rma_breast``, ``R_effusion`` or ``R_breast``), and a sex table is written as
``faithfulness_<preset>_sex.csv``.

For every contamination level L and seed s the script builds one *run*, each step a ``simplebits``
subprocess writing into the kept ``--work`` folder (a finished step is skipped on a re-run, so a killed
benchmark resumes where it stopped):

1. ``demo-cohort``: the fine-detail cohort: small effusions (50-300 mL), a chest drain and ECG leads
   rendered in 3D, counterfactual renders without each feature; in train P(device | positive) = L
   (mirror rate for negatives), val/test at the base rate 0.5 (device independent of the label);
2. ``ingest``, ``classify train`` (the task, seed s);
3. ``reliance`` on the test split: the true reliance R = mean |P(x) - P(x without X)| for X = each
   device, the effusion and the breasts;
4. ``explain`` (test split): IG, occlusion, Grad-CAM, latent shift (in the Glow prior's latent space);
5. ``simplify audit`` per simplifier form (``--forms``; ``scale_space`` is the default form,
   ``logit`` the paper's logit residual): the SimpleBits audit of the classifier, its simplified
   val/test images in ``audit-<form>/simplified``;
6. on the first ``--sanity-runs`` runs, the same classifier with *randomised weights* (every module
   re-initialised, seed 1000 + s): ``explain`` and ``simplify audit`` again (sanity check);
7. in this process: blur at the bpd of each audit's test images (bisection, as the audit's
   ``baselines.csv``), and every score below.

Maps. Saliency maps are scored as relevance ``|A|``. SimpleBits, blur and the original image (the
"keep everything" reference) get the same map, the local detail their image still holds,
``|x̃ - G_σ x̃|`` with σ = 2 px at 64 px (pipeline/explain/faithfulness.py says why this and not
``|x - x̃|``, which marks what was removed, i.e. what the classifier did *not* need). The
``<method>/relative`` rows divide that by the original's own detail (``relative_detail_map``: the
share of the local detail kept), which takes the anatomy's edges out of the map; the
``<audit>/beyond_blur`` rows keep only the detail the audit holds beyond blur at its own bpd
(``detail_beyond``: what a classifier-blind rewrite at the same bits would have lost). Their emphasis
on a feature is the map's RMA.

Scores, over the test studies of every run:

- localisation: relevance mass accuracy (RMA) and area-matched IoU on the finding's mask (the studies
  where it is visible: effusion positives, studies with breasts) and
  on the device mask (union of drain and ECG, studies with a device);
- emphasis on a feature, per run: saliency maps: mean RMA on the feature's mask over the studies that
  have it; simplifiers: the ground-truth retention, i.e. the local contrast kept inside the mask
  (``distractor_retention`` of the audit; ``sign_retention`` for the fluid or breasts against the rest
  of the lung field), the map's RMA beside it
  (``*_map`` columns);
- reliance tracking: Spearman between the emphasis and R across runs (levels x seeds), per device,
  pooled over both devices, and for the finding (NaN with fewer than 3 points); the
  ``tracking_*_log_odds`` columns use R on the log-odds scale instead (``reliance_log_odds``), which
  still moves for a classifier whose P has saturated at 1 on every study;
- sanity (MPRT-style, full randomisation): mean over test studies of the Spearman rank correlation
  between the trained and the randomised classifier's map (1 = the explanation ignores the model);
- cost: seconds per test study. Saliency maps: explain's own timing per batch. SimpleBits: the whole
  audit command (training included) divided by the studies it simplified (val + test), i.e. all-in
  for a cohort of this size. Blur: bpd matching plus applying, per test study.

Writes ``benchmarks/results/faithfulness_<preset>.csv`` (one row per method) and
``faithfulness_<preset>_points.csv`` (one row per run and method: R and emphasis, the tracking points),
and prints the table. With one cohort seed the val/test studies (and their devices) are the same at
every contamination level (the demo cohort draws study i from (seed, i); contamination changes the
train split only), so the runs of a seed differ only in what the classifier learnt.

Commands (the quick preset took 22 minutes on 2 CPU cores shared with other jobs, load average ~10;
the medium preset 35 minutes on 2 idle cores, 8 more for ``--forms scale_space logit`` on top of it,
27 more for a third seed with both forms; the sex table 51 minutes)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/faithfulness.py --preset quick --work /tmp/faith-quick
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/faithfulness.py --preset medium --work /tmp/faith-medium \
        --seeds 0 1 2 --forms scale_space logit
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/faithfulness.py --preset medium --task sex \
        --work /tmp/faith-sex --forms scale_space logit
    OMP_NUM_THREADS=16 .venv/bin/python benchmarks/faithfulness.py --preset full --work /data/faith-full \
        --device cuda

``--preset full`` is the issue's protocol (128 px, 3000 studies per cohort, levels 0.5/0.8/0.95,
3 seeds, both simplifier forms, the shipped classifier and audit settings); it is sized for a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pipeline.cli"]
RESULTS = ROOT / "benchmarks" / "results"
DEVICES = ("chest_drain", "ecg")
SALIENCY = ("ig", "occlusion", "gradcam", "latent_shift")


@dataclass(frozen=True)
class Finding:
    """The task's own sign: its name in ``reliance.csv`` (counterfactual ``no_<feature>``) and its mask."""

    feature: str
    mask: str


# effusion: the fluid (its retention is the fluid-vs-lung contrast kept); sex (M positive): the
# breasts, whose shadow over the lung bases is the demo cohort's only sex sign (breast-vs-lung contrast)
FINDINGS = {"effusion": Finding("effusion", "fluid"), "sex": Finding("breast", "breast")}
DETAIL_SIGMA_AT_64 = 2.0


@dataclass(frozen=True)
class Preset:
    n: int
    size: int
    levels: tuple[float, ...]
    seeds: tuple[int, ...]
    forms: tuple[str, ...]
    sanity_runs: int
    classify: tuple[str, ...]
    audit: tuple[str, ...]
    explain: tuple[str, ...] = ()
    split_fractions: str = "{train: 0.6, val: 0.1, test: 0.3}"


PRESETS = {
    # tiny, for a smoke test on 2 CPU cores: 2 levels x 1 seed (tracking has too few points to mean
    # anything; its per-device Spearman is NaN by design), small models, few epochs
    "quick": Preset(
        n=120, size=64, levels=(0.5, 0.95), seeds=(0,), forms=("scale_space",), sanity_runs=1,
        classify=("model.name=monai_resnet18", "model.kwargs={widen_factor: 0.25}", "train.epochs=12",
                  "augment.enabled=false", "tracking.enabled=false"),
        audit=("train.epochs=4", "simplifier.base_channels=8", "simplifier.levels=3",
               "simplifier.max_channels=32", "independent.enabled=false", "evaluate.baselines=[]",
               "evaluate.retrain=false", "tracking.enabled=false"),
        explain=("ig.steps=16",),
    ),
    # 35 minutes on 2 idle CPU cores (measured, scale_space only): enough studies that the classifiers
    # learn (the quick preset's did not: R <= 0.006), three contamination levels x two seeds (6 tracking
    # points per device), at 64 px rather than the 128 px; the same small models as quick
    "medium": Preset(
        n=800, size=64, levels=(0.5, 0.8, 0.95), seeds=(0, 1), forms=("scale_space",), sanity_runs=1,
        classify=("model.name=monai_resnet18", "model.kwargs={widen_factor: 0.25}", "train.epochs=16",
                  "tracking.enabled=false"),
        audit=("train.epochs=6", "simplifier.base_channels=8", "simplifier.levels=3",
               "simplifier.max_channels=32", "independent.enabled=false", "evaluate.baselines=[]",
               "evaluate.retrain=false", "tracking.enabled=false"),
        explain=("ig.steps=16",),
        split_fractions="{train: 0.7, val: 0.1, test: 0.2}",
    ),
    # the sizes: fine-detail cohort at 128 px, three contamination levels, three seeds
    "full": Preset(
        n=3000, size=128, levels=(0.5, 0.8, 0.95), seeds=(0, 1, 2), forms=("scale_space", "logit"),
        sanity_runs=3,
        classify=("tracking.enabled=false",),
        audit=("independent.enabled=false", "evaluate.baselines=[]", "evaluate.retrain=false",
               "tracking.enabled=false"),
    ),
}


# --------------------------------------------------------------------------------------------------
# Steps


def step(name: str, command: list[str], done: Path, log_dir: Path) -> float:
    """Run ``command`` unless the marker ``done`` exists; returns its wall seconds (recorded in the
    marker, so a resumed benchmark still reports the cost of a step it skipped)."""
    if done.is_file():
        return float(json.loads(done.read_text()).get("seconds", math.nan))
    print("$ " + shlex.join(command), flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "\n    ".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{name} failed (exit {rc}); last lines of {log_path}:\n    {tail}")
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"seconds": seconds, "command": command}))
    print(f"  {name}: {seconds:.1f} s", flush=True)
    return seconds


def sets(items) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def randomised_classifier(trained: Path, out: Path, seed: int) -> Path:
    """The trained classifier's architecture and adapter with every module re-initialised."""
    if out.is_file():
        return out
    import torch

    from pipeline.models.classifiers import load_classifier, read_sidecar, save_classifier

    model = load_classifier(trained)
    torch.manual_seed(seed)
    for module in model.net.modules():
        if hasattr(module, "reset_parameters") and module is not model.net:
            module.reset_parameters()
    meta = {k: v for k, v in read_sidecar(trained).items() if k not in ("name", "kwargs", "adapter")}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out, **meta, randomised_from=str(trained), randomised_seed=seed)
    return out


@dataclass
class Run:
    level: float
    seed: int
    folder: Path
    sanity: bool
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"L{self.level:g}_s{self.seed}"


def build_run(run: Run, preset: Preset, prior: str | None, device: str, task: str) -> None:
    f, logs, done = run.folder, run.folder / "logs", run.folder / "done"
    cohort, ingest, classifier = f / "cohort", f / "ingest", f / "classifier" / "model.safetensors"
    prior_args = ["--prior", prior] if prior else []
    step("demo-cohort", [*CLI, "demo-cohort", "--n", str(preset.n), "--size", str(preset.size),
                         "--seed", str(run.seed), "--out", str(cohort), "--devices", ",".join(DEVICES),
                         "--device-contamination", str(run.level), "--effusion-volume", "50", "300",
                         "--counterfactuals", "--set", f"split_fractions={preset.split_fractions}",
                         "--set", f"devices.follows={task}"],
         done / "demo-cohort", logs)
    step("ingest", [*CLI, "ingest", "--manifest", str(cohort / "manifest.csv"), "--out", str(ingest),
                    "--size", str(preset.size)], done / "ingest", logs)
    step("classify", [*CLI, "classify", "train", "--ingest", str(ingest), "--task", task,
                      "--out", str(classifier.parent), *sets([f"seed={run.seed}", f"device={device}",
                                                              *preset.classify])],
         done / "classify", logs)
    step("reliance", [*CLI, "reliance", "--cohort", str(cohort), "--ingest", str(ingest), "--classifier",
                      str(classifier), "--split", "test", "--out", str(f / "reliance.csv"), "--device", device],
         done / "reliance", logs)
    classifiers = {"": classifier}
    if run.sanity:
        classifiers["-random"] = randomised_classifier(classifier, f / "classifier-random" / "model.safetensors",
                                                       1000 + run.seed)
    for suffix, weights in classifiers.items():
        run.seconds[f"explain{suffix}"] = step(
            f"explain{suffix}", [*CLI, "explain", "--ingest", str(ingest), "--classifier", str(weights),
                                 *prior_args, "--split", "test", "--out", str(f / f"explain{suffix}"),
                                 "--device", device, *sets(preset.explain)],
            done / f"explain{suffix}", logs)
        for form in preset.forms:
            name = f"audit-{form}{suffix}"
            run.seconds[name] = step(
                name, [*CLI, "simplify", "audit", "--ingest", str(ingest), "--task", task,
                       "--classifier", str(weights),
                       *prior_args, "--masks", str(cohort / "masks"), "--out", str(f / name),
                       *sets([f"seed={run.seed}", f"device={device}", f"simplifier.mode={form}",
                              *preset.audit])],
                done / name, logs)


# --------------------------------------------------------------------------------------------------
# Scoring one run


def study_masks(mask_path: Path, size: int) -> dict[str, np.ndarray]:
    """fluid, lung, breast, chest_drain, ecg and their device union at working ``size`` (bool)."""
    from pipeline.data.transforms import to_working_resolution

    out = {}
    with np.load(mask_path, allow_pickle=False) as data:
        for key in ("fluid", "lung", "breast", *DEVICES, "devices"):
            if f"{key}_{size}" in data.files:  # device masks rendered at the working size
                out[key] = data[f"{key}_{size}"].astype(bool)
            elif key in data.files:
                m = data[key]
                out[key] = (m.astype(bool) if m.shape == (size, size)
                            else to_working_resolution(m.astype(np.uint8), size, kind="mask").astype(bool))
            else:
                out[key] = np.zeros((size, size), dtype=bool)
    return out


def blur_images(run: Run, form: str, suffix: str, originals, target_bpd: float, prior) -> tuple[np.ndarray, float]:
    """Blur of the test originals at the audit's bpd; cached as ``blur-<form><suffix>.npz``."""
    cache = run.folder / f"blur-{form}{suffix}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return data["images"], float(data["seconds"])
    import torch

    from pipeline.simplebits.baselines import match_bpd

    start = time.perf_counter()
    torch.set_grad_enabled(False)
    out, strength, achieved = match_bpd(originals, target_bpd, "blur", prior, batch_size=64)
    images = out.load()[:, 0].numpy()
    seconds = (time.perf_counter() - start) / len(images)
    np.savez(cache, images=images, seconds=seconds, strength=strength, achieved=achieved, target=target_bpd)
    print(f"  {run.name} blur@{form}{suffix}: sigma {strength:.3f} px, bpd {achieved:.3f} "
          f"(target {target_bpd:.3f})", flush=True)
    return images, seconds


def score_run(run: Run, preset: Preset, prior, task: str) -> tuple[pd.DataFrame, dict[str, float], pd.DataFrame]:
    """Per (method, test study) scores, seconds per study per method, and the reliance summary."""
    from pipeline.data.demo.reliance import summarise_reliance
    from pipeline.data.ingest import load_cohort
    from pipeline.data.store import CohortStore, StoredImages
    from pipeline.explain.faithfulness import detail_beyond, detail_share, kept_detail_map, map_rank_correlation
    from pipeline.explain.localisation import area_matched_iou, relevance_mass_accuracy
    from pipeline.simplebits.evaluate import distractor_retention, sign_retention

    f = run.folder
    finding_mask = FINDINGS[task].mask
    cohort = load_cohort(f / "ingest", split="test", task=task)
    ids, labels = cohort.study_ids, cohort.labels(task).numpy()
    originals = cohort.images.load()
    x = originals[:, 0].numpy().astype(np.float64) / 255.0
    sigma = DETAIL_SIGMA_AT_64 * preset.size / 64
    masks = [study_masks(f / "cohort" / "masks" / f"{sid}.npz", preset.size) for sid in ids]

    def explained(suffix: str, method: str) -> list[np.ndarray]:
        return [np.abs(np.load(f / f"explain{suffix}" / sid / f"{method}.npy")).astype(np.float64) for sid in ids]

    def simplified(suffix: str, form: str) -> np.ndarray:
        store = CohortStore.open(f / f"audit-{form}{suffix}" / "simplified")
        return StoredImages(store, store.slots(ids)).load()[:, 0].numpy().astype(np.float64) / 255.0

    def test_bpd(suffix: str, form: str) -> float:
        p = pd.read_csv(f / f"audit-{form}{suffix}" / "predictions.csv")
        return float(p.loc[p["split"] == "test", "bpd_simpl"].mean())

    seconds: dict[str, float] = {}
    maps: dict[str, dict[str, list[np.ndarray]]] = {}  # method -> suffix -> per-study maps
    images: dict[str, np.ndarray] = {}  # simplifier method -> its test images (trained classifier)
    suffixes = ["", "-random"] if run.sanity else [""]
    explain_rows = pd.read_csv(f / "explain" / "maps.csv")
    for method in SALIENCY:
        maps[method] = {s: explained(s, method) for s in suffixes}
        seconds[method] = float(explain_rows.loc[explain_rows["method"] == method, "seconds"].mean())
    maps["original"] = {s: [kept_detail_map(im, sigma) for im in x] for s in suffixes}
    seconds["original"] = 0.0
    for form in preset.forms:
        audit = f"simplebits_{form}"
        blur = f"blur@{form}"
        maps[audit], maps[blur], maps[f"{audit}/relative"], maps[f"{blur}/relative"] = {}, {}, {}, {}
        maps[f"{audit}/beyond_blur"] = {}
        for s in suffixes:
            simple = simplified(s, form)
            blurred, blur_seconds = blur_images(run, form, s, originals, test_bpd(s, form), prior)
            blurred = blurred.astype(np.float64) / 255.0
            maps[audit][s] = [kept_detail_map(im, sigma) for im in simple]
            maps[blur][s] = [kept_detail_map(im, sigma) for im in blurred]
            # the same detail relative to the original's own (its rows' emphasis is the map's RMA)
            for method in (audit, blur):
                maps[f"{method}/relative"][s] = [detail_share(kept, detail) for kept, detail
                                                 in zip(maps[method][s], maps["original"][""])]
            # the detail the audit keeps beyond blur at its own bits (each classifier's audit against
            # the blur matched to that audit): the part of the map the classifier caused
            maps[f"{audit}/beyond_blur"][s] = [detail_beyond(kept, blurred_kept) for kept, blurred_kept
                                               in zip(maps[audit][s], maps[blur][s])]
            if s == "":
                images[audit], images[blur] = simple, blurred
                n_simplified = len(pd.read_csv(f / f"audit-{form}" / "predictions.csv"))
                seconds[audit] = run.seconds[f"audit-{form}"] / n_simplified
                seconds[blur] = blur_seconds

    rows = []
    for method, by_suffix in maps.items():
        for i, sid in enumerate(ids):
            a, m = by_suffix[""][i], masks[i]
            row = {"run": run.name, "level": run.level, "seed": run.seed, "method": method, "study_id": sid,
                   "label": int(labels[i]), **{f"has_{k}": bool(m[k].any()) for k in (finding_mask, *DEVICES, "devices")}}
            for key in (finding_mask, "devices", *DEVICES):
                row[f"rma_{key}"] = relevance_mass_accuracy(a, m[key]) if m[key].any() else math.nan
                row[f"iou_{key}"] = area_matched_iou(a, m[key]) if m[key].any() else math.nan
            if method in images:  # a simplifier: ground-truth retention (kept contrast in the mask)
                out = images[method][i]
                for key in DEVICES:
                    row[f"retention_{key}"] = distractor_retention(x[i], out, m[key]) if m[key].any() else math.nan
                # the finding's contrast against the rest of the lung field, kept
                row[f"retention_{finding_mask}"] = (sign_retention(x[i], out, m[finding_mask], m["lung"])
                                                    if m[finding_mask].any()
                                                    else math.nan)
            if "-random" in by_suffix:
                row["sanity_rank_correlation"] = map_rank_correlation(a, by_suffix["-random"][i])
            rows.append(row)
    reliance = summarise_reliance(pd.read_csv(f / "reliance.csv"))
    return pd.DataFrame(rows), seconds, reliance


# --------------------------------------------------------------------------------------------------
# The table


def emphasis_points(per_study: pd.DataFrame, reliance: dict[str, pd.DataFrame], finding: Finding) -> pd.DataFrame:
    """One row per (run, method): R and the emphasis on each feature (the tracking points)."""
    from pipeline.explain.faithfulness import finite_mean

    rows = []
    for (run, method), g in per_study.groupby(["run", "method"], sort=False):
        summary = reliance[run].set_index("feature")
        r = summary["reliance"]
        rz = summary["reliance_log_odds"] if "reliance_log_odds" in summary else pd.Series(dtype=float)
        row = {"run": run, "level": g["level"].iloc[0], "seed": g["seed"].iloc[0], "method": method}
        for feature, mask in (*((d, d) for d in DEVICES), (finding.feature, finding.mask)):
            have = g[f"has_{mask}"].to_numpy(dtype=bool)
            row[f"R_{feature}"] = float(r.get(feature, math.nan))
            row[f"Rz_{feature}"] = float(rz.get(feature, math.nan))
            row[f"emphasis_{feature}_map"] = finite_mean(g.loc[have, f"rma_{mask}"])
            if f"retention_{mask}" in g and g[f"retention_{mask}"].notna().any():
                row[f"emphasis_{feature}"] = finite_mean(g.loc[have, f"retention_{mask}"])
            else:
                row[f"emphasis_{feature}"] = row[f"emphasis_{feature}_map"]
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(per_study: pd.DataFrame, points: pd.DataFrame, seconds: dict[str, list[float]],
                  finding: Finding) -> pd.DataFrame:
    from pipeline.explain.faithfulness import finite_mean, tracking_spearman

    sanity_runs = (per_study.loc[per_study["sanity_rank_correlation"].notna(), "run"].unique()
                   if "sanity_rank_correlation" in per_study else [])
    rows = []
    for method, g in per_study.groupby("method", sort=False):
        p = points[points["method"] == method]
        shown = g[g[f"has_{finding.mask}"]]  # studies where the finding is visible (effusion: positives)
        row = {"method": method, "n_runs": p["run"].nunique(), "n_test_studies": len(g),
               f"rma_{finding.mask}": finite_mean(shown[f"rma_{finding.mask}"]),
               f"iou_{finding.mask}": finite_mean(shown[f"iou_{finding.mask}"]),
               "rma_device": finite_mean(g["rma_devices"]), "iou_device": finite_mean(g["iou_devices"])}
        for suffix in ("", "_map"):
            for feature in (*DEVICES, finding.feature):
                rho, n = tracking_spearman(p[f"emphasis_{feature}{suffix}"], p[f"R_{feature}"])
                row[f"tracking_{feature}{suffix}"], row[f"tracking_n_{feature}"] = rho, n
                # against R on the log-odds scale, which a saturated classifier's R on P cannot show
                row[f"tracking_{feature}{suffix}_log_odds"] = tracking_spearman(
                    p[f"emphasis_{feature}{suffix}"], p[f"Rz_{feature}"])[0]
            emphasis = np.concatenate([p[f"emphasis_{d}{suffix}"] for d in DEVICES])
            rel = np.concatenate([p[f"R_{d}"] for d in DEVICES])
            row[f"tracking_devices_pooled{suffix}"], row["tracking_n_devices_pooled"] = tracking_spearman(emphasis, rel)
        row["emphasis_kind"] = ("retention (kept contrast in mask)" if method.startswith(("simplebits", "blur"))
                                and "/" not in method else "relevance mass accuracy")
        sanity = g["sanity_rank_correlation"] if "sanity_rank_correlation" in g else pd.Series(dtype=float)
        row["sanity_rank_correlation"] = finite_mean(sanity)
        # studies of the sanity runs where the correlation is defined: a map that is constant for the
        # randomised model (Grad-CAM's ReLU can zero it everywhere) has no ranks; it did change, but
        # a rank correlation cannot say by how much
        row["sanity_n_defined"] = int(np.isfinite(sanity.to_numpy(dtype=float)).sum())
        row["sanity_n_studies"] = int(g["run"].isin(sanity_runs).sum())
        row["seconds_per_study"] = finite_mean(seconds.get(method, []))
        rows.append(row)
    return pd.DataFrame(rows)


def print_table(table: pd.DataFrame, points: pd.DataFrame, finding: Finding) -> None:
    def cell(v: float) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    print("\nreliance on the log-odds scale per run: " + "; ".join(
        f"{r['run']}: drain {r['Rz_chest_drain']:.2f}, ecg {r['Rz_ecg']:.2f}, "
        f"{finding.feature} {r[f'Rz_{finding.feature}']:.2f}"
        for _, r in points.drop_duplicates("run").iterrows()))
    print("tracking against it (drain / ecg / finding): " + "; ".join(
        f"{r.method} {cell(r.tracking_chest_drain_log_odds)} / {cell(r.tracking_ecg_log_odds)} / "
        f"{cell(r[f'tracking_{finding.feature}_log_odds'])}" for _, r in table.iterrows()))
    print("\nreliance R per run (test split): " + "; ".join(
        f"{r['run']}: drain {r['R_chest_drain']:.3f}, ecg {r['R_ecg']:.3f}, "
        f"{finding.feature} {r[f'R_{finding.feature}']:.3f}"
        for _, r in points.drop_duplicates("run").iterrows()))
    short = finding.mask[:3]
    head = (f"{'method':<36} {'RMA ' + short:>7} {'IoU ' + short:>7} {'RMA dev':>7} {'IoU dev':>7} {'trk drn':>7} "
            f"{'trk ecg':>7} {'trk pool':>8} {'trk ' + short:>7} {'sanity':>7} {'def/n':>7} {'s/study':>8}")
    print(head + "\n" + "-" * len(head))
    for _, r in table.iterrows():
        print(f"{r.method:<36} {cell(r[f'rma_{finding.mask}']):>7} {cell(r[f'iou_{finding.mask}']):>7} "
              f"{cell(r.rma_device):>7} {cell(r.iou_device):>7} {cell(r.tracking_chest_drain):>7} "
              f"{cell(r.tracking_ecg):>7} {cell(r.tracking_devices_pooled):>8} "
              f"{cell(r[f'tracking_{finding.feature}']):>7} {cell(r.sanity_rank_correlation):>7} "
              f"{r.sanity_n_defined:>3}/{r.sanity_n_studies:<3} {cell(r.seconds_per_study):>8}")
    n = table.iloc[0]
    print(f"tracking points: {n.tracking_n_chest_drain} runs per device, {n.tracking_n_devices_pooled} pooled "
          "(Spearman NaN below 3 points; the pooled one mixes the two devices' scales, read the per-device "
          "ones where there are enough runs). Simplifiers' emphasis = kept contrast in the mask; saliency = "
          "RMA. sanity = mean rank correlation trained vs randomised map over the studies where it is "
          "defined (def/n; lower = the explanation depends on the model).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--task", choices=sorted(FINDINGS), default="effusion",
                        help="the classifiers' task; the devices follow its label in training (default effusion)")
    parser.add_argument("--work", type=Path, required=True, help="working folder, kept (re-runs resume)")
    parser.add_argument("--prior", help="Glow prior .safetensors (default: the shipped one)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto for every step")
    parser.add_argument("--levels", type=float, nargs="+", help="override the preset's contamination levels")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--forms", nargs="+", help="override the preset's simplifier forms (scale_space, logit)")
    parser.add_argument("--out", type=Path, help="CSV (default benchmarks/results/faithfulness_<preset>.csv)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    preset = PRESETS[args.preset]
    preset = replace(preset, **{k: tuple(v) for k, v in (("levels", args.levels), ("seeds", args.seeds),
                                                         ("forms", args.forms)) if v})
    args.work.mkdir(parents=True, exist_ok=True)
    # a work folder holds one task's runs (its steps are cached by name)
    marker = args.work / "task.txt"
    if marker.is_file() and marker.read_text().strip() != args.task:
        raise SystemExit(f"{args.work} holds the {marker.read_text().strip()} benchmark; use another --work for {args.task}")
    marker.write_text(args.task + "\n")
    finding = FINDINGS[args.task]
    start = time.perf_counter()

    runs = [Run(level, seed, args.work / f"L{level:g}_s{seed}", False)
            for seed in preset.seeds for level in preset.levels]
    for run in runs[:preset.sanity_runs]:
        run.sanity = True
    for run in runs:
        print(f"== run {run.name}", flush=True)
        build_run(run, preset, args.prior, args.device, args.task)

    import torch

    from pipeline.prior import load_prior

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    prior = load_prior(args.prior)
    frames, reliance, seconds = [], {}, {}
    for run in runs:
        per_study, run_seconds, run_reliance = score_run(run, preset, prior, args.task)
        frames.append(per_study)
        reliance[run.name] = run_reliance
        for method, value in run_seconds.items():
            seconds.setdefault(method, []).append(value)
    per_study = pd.concat(frames, ignore_index=True)
    points = emphasis_points(per_study, reliance, finding)
    table = summary_table(per_study, points, seconds, finding)
    table.insert(0, "preset", args.preset)

    out = args.out or RESULTS / f"faithfulness_{args.preset}{'' if args.task == 'effusion' else '_' + args.task}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    points.to_csv(out.with_name(out.stem + "_points.csv"), index=False, float_format="%.4f")
    per_study.to_csv(args.work / "per_study.csv", index=False, float_format="%.4f")
    print_table(table, points, finding)
    print(f"\nwrote {out} and {out.with_name(out.stem + '_points.csv')} "
          f"({time.perf_counter() - start:.0f} s in this invocation)")


if __name__ == "__main__":
    main()
