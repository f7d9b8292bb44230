"""Evaluations shared by every SimpleBits run on the validation split.

Core functions take arrays and return plain dicts or DataFrames; no file or MLflow I/O happens here
except in :func:`load_masks`, which reads the demo cohort's ground-truth masks. Whole splits are
never held in memory: functions over a split take lazy images (a cohort's ``StoredImages``, or a
:class:`MappedImages` view that transforms them batch by batch) and stream them; with
``sharded=True`` each torchrun rank scores its share and every rank gets the whole result (every
rank must then call).

- :func:`classification_summary`: AUROC and accuracy on originals and simplified images.
- :func:`bits_summary`: mean bpd, bits saved per study (``bpd x D``), and the fraction of the
  attainable saving ``(orig - simplified) / (orig - flat grey)``.
- :func:`retrain_on_simplified`: a fresh classifier trained on simplified train images, tested on
  simplified and original validation images.
- :func:`baselines_at_matched_bpd`: blur / JPEG / downsampling at the simplified images' mean bpd
  (strength found on a fixed subsample, then applied to the whole split batch by batch).
- :func:`distractor_retention`, :func:`sign_retention`, :func:`sign_preference`,
  :func:`mask_retention_table`, :func:`retention_table`, :func:`distractor_pull`: what happens to the
  ground-truth distractor and effusion sign.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch import nn

from pipeline.data.dataset import Images
from pipeline.metrics import accuracy, auroc
from pipeline.models.bpd import bits_per_dim
from pipeline.training.engine import score_batches

if TYPE_CHECKING:  # the training stack is imported only where retraining runs
    from pipeline.training.classifier import ClassifyConfig

MASK_KEYS = ("fluid", "lung", "distractor")


def as_float_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``k`` -> ``k/255``; float stays float; always a float32 tensor."""
    images = torch.as_tensor(images)
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images on the 8-bit grid (float ``k/255`` or uint8) as uint8 ``k``."""
    if images.dtype == torch.uint8:
        return images
    return torch.round(images.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


class MappedImages:
    """A lazy view of ``images`` with ``transform`` (uint8 batch -> uint8 batch) applied on indexing.

    Indexes like :class:`~pipeline.data.store.StoredImages` (``len``, ``shape``, ``[i]``, ``[a:b]``,
    ``[index array or tensor]``), so scoring, retention and training stream through it batch by batch
    while no transformed split exists anywhere. ``transform`` must keep the shape and treat images
    independently (a batch's result may not depend on which images share it). It is pickled with the
    view (DataLoader workers), so give a module-level function or a ``functools.partial`` of one.
    """

    dtype = torch.uint8

    def __init__(self, images: Images, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.images.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self[[int(key)]][0]
        return to_uint8(self.transform(self.images[key]))

    def subset(self, positions: Sequence[int] | np.ndarray) -> MappedImages:
        positions = np.asarray(positions, dtype=np.int64)
        inner = self.images.subset(positions) if hasattr(self.images, "subset") else self.images[positions]
        return MappedImages(inner, self.transform)

    def load(self) -> torch.Tensor:
        return self[slice(None)]


# --------------------------------------------------------------------------------------------------
# Classification and bits


def classification_summary(labels: Any, p_orig: Any, p_simpl: Any) -> dict[str, float]:
    """``auroc_orig, accuracy_orig, auroc_simpl, accuracy_simpl`` and the agreement of the decisions."""
    agree = (
        float(np.mean((np.asarray(p_orig) >= 0.5) == (np.asarray(p_simpl) >= 0.5)))
        if len(p_orig)
        else math.nan
    )
    return {
        "auroc_orig": auroc(labels, p_orig),
        "accuracy_orig": accuracy(labels, p_orig),
        "auroc_simpl": auroc(labels, p_simpl),
        "accuracy_simpl": accuracy(labels, p_simpl),
        "decision_agreement": agree,
    }


@torch.no_grad()
def deterministic_bpd(prior: nn.Module, images: Images | torch.Tensor, batch_size: int = 128,
                      sharded: bool = False) -> torch.Tensor:
    """Midpoint-dequantised bpd per image on the prior's device (uint8 or [0,1] input), CPU result.

    Streams ``images`` batch by batch; ``sharded``: split over torchrun ranks (all must call).
    """
    device = next(prior.parameters()).device

    def score(_: np.ndarray, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"bpd": bits_per_dim(prior, as_float_images(batch).to(device), "midpoint")}

    return score_batches(images, score, batch_size, sharded=sharded).get("bpd", torch.empty(0)).float()


def flat_images(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its own mean grey level (8-bit grid): the simplest image it can become."""
    x = as_float_images(images)
    mean = torch.round(x.mean(dim=(1, 2, 3), keepdim=True) * 255.0) / 255.0
    return mean.expand_as(x).contiguous()


def flat_bpd(prior: nn.Module, images: Images, batch_size: int = 128, sharded: bool = True) -> torch.Tensor:
    """bpd of every image flattened to its mean grey (:func:`flat_images`), batch by batch."""
    return deterministic_bpd(prior, MappedImages(images, flat_images), batch_size, sharded=sharded)


def bits_summary(bpd_orig: Any, bpd_simpl: Any, bpd_flat: Any, num_dims: int) -> dict[str, float]:
    """Mean bpd of originals and simplified images, bits saved per study and the attainable fraction.

    ``bpd_flat`` is the bpd of each study flattened to its mean grey (:func:`flat_images`); the
    fraction is computed per study and averaged over studies whose attainable saving is positive.
    """
    orig, simpl, flat = (
        np.asarray(torch.as_tensor(v).cpu(), dtype=np.float64) for v in (bpd_orig, bpd_simpl, bpd_flat)
    )
    attainable = orig - flat
    ok = attainable > 0
    fraction = float(np.mean((orig[ok] - simpl[ok]) / attainable[ok])) if ok.any() else math.nan
    return {
        "bpd_orig": float(orig.mean()),
        "bpd_simpl": float(simpl.mean()),
        "bpd_flat": float(flat.mean()),
        "bits_saved_per_study": float(np.mean((orig - simpl) * num_dims)),
        "fraction_of_attainable_saving": fraction,
    }


# --------------------------------------------------------------------------------------------------
# Retrain-on-simplified and matched-bpd baselines


def retrain_on_simplified(
    train_simplified: Images,
    train_labels: torch.Tensor,
    val_simplified: Images,
    val_original: Images,
    val_labels: torch.Tensor,
    config: ClassifyConfig,
) -> dict[str, float]:
    """Train a fresh classifier (``config``: a ``ClassifyConfig``) on simplified train images only.

    Model selection uses the simplified validation images; the kept model is then also scored on the
    original validation images: does what survives simplification still carry the task? Images are
    lazy (a store or a :class:`MappedImages` view) and stream; under torchrun every rank calls this
    and the classifier trains data-parallel.
    """
    from pipeline.training.classifier import fit_classifier, predict_proba

    result = fit_classifier(train_simplified, train_labels, val_simplified, val_labels, config)
    p_orig = predict_proba(result.model, val_original, batch_size=config.train.eval_batch_size, sharded=True)
    return {
        "retrain_auroc_simpl": float(result.metrics["val_auroc"]),
        "retrain_accuracy_simpl": float(result.metrics["val_accuracy"]),
        "retrain_auroc_orig": auroc(val_labels, p_orig),
        "retrain_accuracy_orig": accuracy(val_labels, p_orig),
    }


def match_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subsample of ``size`` of ``n`` studies (all when ``n <= size``)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def baselines_at_matched_bpd(
    prior: nn.Module,
    images: Images,
    labels: torch.Tensor,
    target_bpd: float,
    predict: Callable[[Images], torch.Tensor],
    kinds: Sequence[str] = ("blur", "jpeg", "downsample"),
    extra_columns: Callable[[str, float, Images], dict[str, float]] | None = None,
    tol: float = 0.02,
    subsample: int = 2000,
    seed: int = 0,
    batch_size: int = 128,
    sharded: bool = True,
) -> pd.DataFrame:
    """One row per baseline: strength found by bisection to ``target_bpd``, achieved bpd, AUROC.

    The bisection runs on a fixed seeded ``subsample`` of the split (each step costs a bpd pass, and
    the mean bpd of 2000 studies is within ~0.01 bits of the split's); the strength found is then
    applied to the whole split batch by batch (a lazy view). ``mean_bpd`` is that of the whole
    split, and ``reached`` is false where it is not within ``tol`` bits of the target (integer JPEG
    qualities and image sizes, or a target outside its range); compare such rows with care.
    ``match_sample`` is the number of studies the strength was matched on.

    ``predict(images) -> P(positive)`` scores the degraded images with the classifier under audit;
    ``extra_columns(kind, strength, degraded)`` optionally adds more scores of the degraded split
    (other classifiers, retrain-on-degraded with the protocol of :func:`retrain_on_simplified`).
    With ``sharded`` every torchrun rank must call this; all ranks get the same table.
    """
    from pipeline.simplebits.baselines import baseline_images, match_bpd

    positions = match_sample(len(images), subsample, seed)
    whole = len(positions) == len(images)
    # a fixed-size sample in memory (8 MB at 2000 x 64 x 64): the bisection reads it a dozen times
    sample = images if whole else images[torch.as_tensor(positions)]
    rows = []
    for kind in kinds:
        _, strength, achieved = match_bpd(sample, target_bpd, kind, prior, tol=tol, batch_size=batch_size,
                                          sharded=sharded)
        degraded = baseline_images(images, kind, strength)
        if not whole:
            achieved = float(deterministic_bpd(prior, degraded, batch_size, sharded=sharded).mean())
        p = predict(degraded)
        row = {
            "method": kind,
            "strength": strength,
            "target_bpd": target_bpd,
            "mean_bpd": achieved,
            "reached": abs(achieved - target_bpd) <= tol,
            "match_sample": len(positions),
            "auroc": auroc(labels, p),
            "accuracy": accuracy(labels, p),
        }
        if extra_columns is not None:
            row.update(extra_columns(kind, strength, degraded))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Ground-truth masks: distractor and effusion sign


def load_masks(mask_dir: str | Path, study_ids: Sequence[str], size: int) -> dict[str, dict[str, np.ndarray]]:
    """``{study_id: {fluid, lung, distractor}}`` uint8 masks at working ``size``; missing files skipped."""
    from pipeline.data.transforms import to_working_resolution

    out: dict[str, dict[str, np.ndarray]] = {}
    for study_id in study_ids:
        path = Path(mask_dir) / f"{study_id}.npz"
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in MASK_KEYS if k not in data.files]
            if missing:
                raise ValueError(f"{path}: mask file lacks {missing}")
            out[study_id] = {
                k: to_working_resolution(data[k].astype(np.uint8), size, kind="mask") for k in MASK_KEYS
            }
    return out


def local_background(image: np.ndarray, mask: np.ndarray, guard: int = 1, margin: int = 4) -> np.ndarray | None:
    """``image`` as it would look without the mark: biharmonic inpainting of ``mask`` from its surroundings.

    An inpainted background follows the anatomy under the mark (a body edge, a rib), where the median
    of a surrounding ring does not: on rendered pairs with and without a text tag the ring median left
    the tag-free image 65% of the tag's contrast, the inpainted one 13%. ``mask`` is grown by ``guard``
    pixels first because a thresholded, resized mask leaves the anti-aliased stroke edges outside it,
    and those must not count as background. Only a ``margin``-pixel box around the mask is solved.
    Returns None when the mask leaves no background to inpaint from.
    """
    from skimage.restoration import inpaint_biharmonic

    grown = ndimage.binary_dilation(mask, iterations=guard) if guard else mask
    if grown.all():
        return None
    box = ndimage.binary_dilation(grown, iterations=margin)
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    background = np.asarray(image, dtype=np.float64).copy()
    background[crop] = inpaint_biharmonic(background[crop], grown[crop])
    return background


def local_contrast(image: np.ndarray, mask: np.ndarray, guard: int = 1) -> float:
    """Mean ``|image - background|`` inside ``mask``, background from :func:`local_background`."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return math.nan
    background = local_background(image, mask, guard)
    if background is None:
        return math.nan
    return float(np.mean(np.abs(np.asarray(image, dtype=np.float64)[mask] - background[mask])))


def _ratio(kept: float, original: float, min_original: float) -> float:
    if math.isnan(kept) or math.isnan(original) or abs(original) < min_original:
        return math.nan
    return kept / original


def distractor_retention(
    original: np.ndarray,
    simplified: np.ndarray,
    mask: np.ndarray,
    guard: int = 1,
    min_contrast: float = 1e-3,
) -> float:
    """Local contrast of the distractor in the simplified image relative to the original (1 kept, 0 gone)."""
    return _ratio(local_contrast(simplified, mask, guard), local_contrast(original, mask, guard), min_contrast)


def fluid_contrast(image: np.ndarray, fluid: np.ndarray, lung: np.ndarray) -> float:
    """Mean inside the projected fluid minus mean of the rest of the lung field (nan if either is empty)."""
    fluid, lung = np.asarray(fluid, dtype=bool), np.asarray(lung, dtype=bool)
    rest = lung & ~fluid
    if not fluid.any() or not rest.any():
        return math.nan
    image = np.asarray(image, dtype=np.float64)
    return float(image[fluid].mean() - image[rest].mean())


def sign_retention(
    original: np.ndarray,
    simplified: np.ndarray,
    fluid: np.ndarray,
    lung: np.ndarray,
    min_contrast: float = 1e-3,
) -> float:
    """Fluid-vs-lung contrast kept by the simplified image relative to the original (1 kept, 0 gone)."""
    return _ratio(
        fluid_contrast(simplified, fluid, lung), fluid_contrast(original, fluid, lung), min_contrast
    )


def texture_contrast(image: np.ndarray, region: np.ndarray) -> float:
    """Mean ``|image - region mean|`` inside ``region``: its internal detail (texture, noise, edges)."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return math.nan
    values = np.asarray(image, dtype=np.float64)[region]
    return float(np.abs(values - values.mean()).mean())


def sign_preference(
    original: np.ndarray,
    simplified: np.ndarray,
    fluid: np.ndarray,
    lung: np.ndarray,
    min_contrast: float = 1e-3,
) -> float:
    """Fluid contrast kept divided by the contrast kept in the rest of the lung field.

    Numerator: :func:`sign_retention` (fluid vs rest-of-lung mean, kept = simplified / original);
    denominator: the rest of the lung field's :func:`texture_contrast`, kept likewise. Above 1: the
    simplification preserved the effusion sign preferentially while flattening lung detail.
    """
    rest = np.asarray(lung, dtype=bool) & ~np.asarray(fluid, dtype=bool)
    kept_rest = _ratio(texture_contrast(simplified, rest), texture_contrast(original, rest), min_contrast)
    return _ratio(sign_retention(original, simplified, fluid, lung, min_contrast), kept_rest, 1e-6)


RETENTION_COLUMNS = ("distractor_retention", "sign_retention", "sign_preference")


def mask_retention_table(
    study_ids: Sequence[str],
    originals: torch.Tensor,
    simplified: torch.Tensor,
    masks: dict[str, dict[str, np.ndarray]],
    guard: int = 1,
) -> pd.DataFrame:
    """``study_id, distractor_retention, sign_retention, sign_preference`` per study with masks (nan: n/a).

    One batch of images in memory; :func:`retention_table` streams a whole split through it.
    """
    orig, simpl = as_float_images(originals)[:, 0].numpy(), as_float_images(simplified)[:, 0].numpy()
    rows = []
    for i, study_id in enumerate(study_ids):
        if study_id not in masks:
            continue
        m = masks[study_id]
        rows.append(
            {
                "study_id": study_id,
                "distractor_retention": distractor_retention(orig[i], simpl[i], m["distractor"], guard),
                "sign_retention": sign_retention(orig[i], simpl[i], m["fluid"], m["lung"]),
                "sign_preference": sign_preference(orig[i], simpl[i], m["fluid"], m["lung"]),
            }
        )
    return pd.DataFrame(rows, columns=["study_id", *RETENTION_COLUMNS])


def retention_table(
    study_ids: Sequence[str],
    originals: Images,
    simplified: Images,
    mask_dir: str | Path,
    batch_size: int = 128,
    sharded: bool = True,
) -> pd.DataFrame:
    """:func:`mask_retention_table` over a whole split, batch by batch (masks read per batch too).

    ``simplified`` is aligned with ``originals`` (a store's slots or a :class:`MappedImages` view).
    With ``sharded`` each rank measures its share (biharmonic inpainting is the slow part) and every
    rank gets the whole table.
    """
    size = int(originals.shape[-1])

    def score(positions: np.ndarray, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = [study_ids[i] for i in positions]
        kept = simplified[int(positions[0]):int(positions[-1]) + 1]  # eval batches are contiguous
        table = mask_retention_table(ids, batch, kept, load_masks(mask_dir, ids, size)).set_index("study_id")
        has_masks = torch.as_tensor(np.isin(ids, table.index.to_numpy()))
        table = table.reindex(ids)  # studies without masks: nan rows, dropped below
        return {"has_masks": has_masks,
                **{c: torch.tensor(table[c].to_numpy(dtype=np.float64)) for c in RETENTION_COLUMNS}}

    found = score_batches(originals, score, batch_size, sharded=sharded)
    if not found:
        return pd.DataFrame(columns=["study_id", *RETENTION_COLUMNS])
    frame = pd.DataFrame({"study_id": list(study_ids), **{c: found[c].numpy() for c in RETENTION_COLUMNS}})
    return frame[found["has_masks"].numpy()].reset_index(drop=True)


def distractor_pull(
    p: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    marked: Sequence[bool] | np.ndarray,
    permutations: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """How much a burned-in mark moves the classifier, and whether that is more than chance.

    ``pull``: mean P(positive) of studies with the mark minus those without, within each true label,
    averaged over labels (stratifying removes the label's own, much larger, effect on P). ``p_value``:
    two-sided, from ``permutations`` shuffles of the marks within each label. On splits where the mark
    is independent of the label, a significant pull means the classifier responds to the mark itself.
    Returns ``(nan, nan)`` when no label has studies both with and without the mark.
    """
    p, labels, marked = np.asarray(p, dtype=np.float64), np.asarray(labels), np.asarray(marked, dtype=bool)
    strata = [np.flatnonzero(labels == y) for y in np.unique(labels)]
    strata = [idx for idx in strata if marked[idx].any() and (~marked[idx]).any()]
    if not strata:
        return math.nan, math.nan

    def pull(mask: np.ndarray) -> float:
        return float(np.mean([p[idx][mask[idx]].mean() - p[idx][~mask[idx]].mean() for idx in strata]))

    observed = pull(marked)
    rng = np.random.default_rng(seed)
    shuffled = marked.copy()
    null = np.empty(permutations)
    for i in range(permutations):
        for idx in strata:
            shuffled[idx] = rng.permutation(marked[idx])
        null[i] = pull(shuffled)
    return observed, float((np.sum(np.abs(null) >= abs(observed)) + 1) / (permutations + 1))


def retention_summary(retention: pd.DataFrame) -> dict[str, float]:
    """Means over studies where each retention is defined."""
    out = {}
    for column in ("distractor_retention", "sign_retention", "sign_preference"):
        values = retention[column].to_numpy(dtype=np.float64) if column in retention else np.array([])
        values = values[np.isfinite(values)]
        out[f"mean_{column}"] = float(values.mean()) if values.size else math.nan
    return out
