"""Evaluation metrics on hand-made arrays: bits, retention of distractor and effusion sign, shortcut flag."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.store import CohortStore, StoredImages
from pipeline.models.glow import Glow
from pipeline.simplebits.baselines import apply_baseline
from pipeline.simplebits.evaluate import (
    MappedImages,
    baselines_at_matched_bpd,
    bits_summary,
    classification_summary,
    deterministic_bpd,
    distractor_pull,
    distractor_retention,
    flat_bpd,
    flat_images,
    load_masks,
    local_contrast,
    mask_retention_table,
    match_sample,
    retention_summary,
    retention_table,
    retrain_on_simplified,
    sign_preference,
    sign_retention,
)
from pipeline.training.classifier import ClassifyConfig

SIZE = 32


def scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Grey background with a lung field, darker fluid at its base and a bright distractor square."""
    image = np.full((SIZE, SIZE), 0.4)
    lung = np.zeros((SIZE, SIZE), dtype=np.uint8)
    lung[4:28, 4:14] = 1
    fluid = np.zeros_like(lung)
    fluid[20:28, 4:14] = 1
    distractor = np.zeros_like(lung)
    distractor[6:10, 20:24] = 1
    image[lung == 1] = 0.2
    image[fluid == 1] = 0.6
    image[distractor == 1] = 0.9
    image += 0.01 * np.random.default_rng(0).standard_normal(image.shape)
    return image, {"lung": lung, "fluid": fluid, "distractor": distractor}


def test_unchanged_image_keeps_everything_and_a_flattened_one_nothing():
    image, masks = scene()
    assert distractor_retention(image, image, masks["distractor"]) == pytest.approx(1.0)
    assert sign_retention(image, image, masks["fluid"], masks["lung"]) == pytest.approx(1.0)
    flat = np.full_like(image, image.mean())
    assert distractor_retention(image, flat, masks["distractor"]) == pytest.approx(0.0, abs=1e-9)
    assert sign_retention(image, flat, masks["fluid"], masks["lung"]) == pytest.approx(0.0, abs=1e-9)


def test_retention_scales_with_the_contrast_kept():
    image, masks = scene()
    d = masks["distractor"] == 1
    background = 0.4  # the distractor sits on the 0.4 background
    half, erased = image.copy(), image.copy()
    half[d] = background + 0.5 * (image[d] - background)
    erased[d] = background
    assert distractor_retention(image, half, masks["distractor"]) == pytest.approx(0.5, abs=0.05)
    assert distractor_retention(image, erased, masks["distractor"]) < 0.05
    # inverting the fluid contrast gives a negative sign retention
    inverted = image.copy()
    inverted[masks["fluid"] == 1] = 0.0
    assert sign_retention(image, inverted, masks["fluid"], masks["lung"]) < 0


def test_retention_follows_the_anatomy_under_the_mark():
    """A tag across a body edge: erasing the tag must read as ~0 kept, not as the edge's own contrast."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    # dark air | bright body: a vertical edge, blurred as the detector blurs it, plus a slow gradient
    anatomy = 0.15 + 0.6 / (1 + np.exp(-(cols - 15.5) / 1.5)) + 0.005 * rows
    tag = np.zeros((SIZE, SIZE), dtype=bool)
    tag[10:14, 11:21] = True  # straddles the edge
    tag[11:13, 13:19] = False  # hollow, like a letter
    image = anatomy.copy()
    image[tag] = 0.98
    assert local_contrast(image, tag) == pytest.approx(np.abs(0.98 - anatomy[tag]).mean(), rel=0.1)
    assert distractor_retention(image, anatomy, tag) < 0.1
    # a smooth version of the anatomy alone (what a good simplifier leaves) keeps little too
    from scipy.ndimage import gaussian_filter

    assert distractor_retention(image, gaussian_filter(anatomy, 1.0), tag) < 0.2


@pytest.mark.slow
def test_retention_measures_rendered_marks_against_ground_truth():
    """Demo studies rendered with and without their mark, at the pipeline's 128 -> 64 px geometry.

    The measured contrast matches the true one (marked minus mark-free render). A mark-free render reads
    as little kept: what remains is the render's own noise and texture under the mask, which a smooth
    (simplified-looking) mark-free image mostly lacks.
    """
    from dataclasses import replace

    from scipy.ndimage import gaussian_filter

    from pipeline.data.demo.cohort import DemoCohortConfig, DemoScene, plan_cohort
    from pipeline.data.transforms import to_working_resolution

    config = DemoCohortConfig.model_validate({
        "n": 40, "size": 128, "seed": 3, "distractor": {"mode": "independent"}, "render": {"n_points": 48},
    })
    scene = DemoScene(config)
    measured, true, kept_noisy, kept_smooth = [], [], [], []
    for plan in [p for p in plan_cohort(config) if p.distractor is not None][:8]:
        marked, clean = scene.render(plan), scene.render(replace(plan, distractor=None))
        marked64, clean64 = (d.display.reshape(64, 2, 64, 2).mean(axis=(1, 3)) for d in (marked, clean))
        mask = to_working_resolution(marked.masks["distractor"], 64, kind="mask").astype(bool)
        measured.append(local_contrast(marked64, mask))
        true.append(np.abs(marked64 - clean64)[mask].mean())
        kept_noisy.append(distractor_retention(marked64, clean64, mask))
        kept_smooth.append(distractor_retention(marked64, gaussian_filter(clean64, 1.0), mask))
    assert np.mean(measured) == pytest.approx(np.mean(true), rel=0.15)
    assert np.median(kept_noisy) < 0.3
    assert np.mean(kept_smooth) < 0.2


def test_sign_preference_compares_fluid_and_lung_contrast_kept():
    image, masks = scene()
    lung, fluid = masks["lung"] == 1, masks["fluid"] == 1
    assert sign_preference(image, image, masks["fluid"], masks["lung"]) == pytest.approx(1.0)
    # flatten the rest of the lung field's texture to half, keep the fluid
    rest = lung & ~fluid
    flattened = image.copy()
    flattened[rest] = image[rest].mean() + 0.5 * (image[rest] - image[rest].mean())
    assert sign_preference(image, flattened, masks["fluid"], masks["lung"]) == pytest.approx(2.0, rel=0.05)
    # the opposite: fluid flattened towards the lung, lung texture kept
    washed = image.copy()
    washed[fluid] = image[rest].mean()
    assert sign_preference(image, washed, masks["fluid"], masks["lung"]) < 0.5


def test_undefined_retentions_are_nan():
    image, masks = scene()
    empty = np.zeros_like(masks["lung"])
    assert math.isnan(distractor_retention(image, image, empty))
    assert math.isnan(sign_retention(image, image, empty, masks["lung"]))
    assert math.isnan(local_contrast(image, np.ones_like(empty)))  # no background ring


def test_mask_retention_table_and_summary():
    image, masks = scene()
    originals = torch.from_numpy(np.stack([image, image]))[:, None].float()
    kept = originals.clone()
    erased = originals.clone()
    erased[1, 0][torch.from_numpy(masks["distractor"] == 1)] = 0.4
    table = mask_retention_table(
        ["std-a", "std-b", "std-c"],
        torch.cat([originals, originals[:1]]),
        torch.cat([kept[:1], erased[1:], kept[:1]]),
        {"std-a": masks, "std-b": masks},
    )
    assert list(table["study_id"]) == ["std-a", "std-b"]
    assert table["distractor_retention"].iloc[0] == pytest.approx(1.0)
    assert table["distractor_retention"].iloc[1] < 0.05
    summary = retention_summary(table)
    assert summary["mean_sign_retention"] == pytest.approx(1.0)
    assert summary["mean_sign_preference"] == pytest.approx(1.0)


def test_retention_table_streams_the_split_with_masks_read_per_batch(tmp_path):
    """Batch by batch, masks read per batch, studies without masks left out: the same as all at once."""
    image, masks = scene()
    rng = np.random.default_rng(1)
    originals = torch.from_numpy(np.stack([np.clip(image + 0.02 * rng.standard_normal(image.shape), 0, 1)
                                           for _ in range(7)]))[:, None]
    originals = torch.round(originals * 255).to(torch.uint8)
    simplified = originals.clone()
    simplified[::2, 0][:, torch.from_numpy(masks["distractor"] == 1)] = 102  # erase the mark in some
    ids = [f"std-{i}" for i in range(7)]
    for study_id in ids[:3] + ids[4:6]:  # std-3 and std-6 have no masks
        np.savez(tmp_path / f"{study_id}.npz", **masks)
    streamed = retention_table(ids, originals, simplified, tmp_path, batch_size=2)
    at_once = mask_retention_table(ids, originals, simplified, load_masks(tmp_path, ids, SIZE))
    assert list(streamed["study_id"]) == ["std-0", "std-1", "std-2", "std-4", "std-5"]
    pd.testing.assert_frame_equal(streamed, at_once)
    assert streamed["distractor_retention"].iloc[0] < 0.1 < 0.9 < streamed["distractor_retention"].iloc[1]
    assert retention_table(ids[3:4], originals[3:4], simplified[3:4], tmp_path).empty


def test_load_masks_maps_to_the_working_resolution(tmp_path):
    _, masks = scene()
    big = {k: np.kron(v, np.ones((4, 4), dtype=np.uint8)).astype(bool) for k, v in masks.items()}
    np.savez(tmp_path / "std-a.npz", breast=np.zeros_like(big["lung"]), **big)
    loaded = load_masks(tmp_path, ["std-a", "std-missing"], SIZE)
    assert list(loaded) == ["std-a"]
    for key in ("fluid", "lung", "distractor"):
        assert loaded["std-a"][key].shape == (SIZE, SIZE)
        assert np.array_equal(loaded["std-a"][key], masks[key])
    np.savez(tmp_path / "std-bad.npz", lung=big["lung"])
    with pytest.raises(ValueError, match="std-bad.npz.*lacks"):
        load_masks(tmp_path, ["std-bad"], SIZE)


def test_bits_summary_and_attainable_fraction():
    summary = bits_summary([4.0, 6.0], [3.0, 2.0], [2.0, 2.0], num_dims=100)
    assert summary["bpd_orig"] == 5.0 and summary["bpd_simpl"] == 2.5
    assert summary["bits_saved_per_study"] == pytest.approx(250.0)
    assert summary["fraction_of_attainable_saving"] == pytest.approx((0.5 + 1.0) / 2)


def test_classification_summary():
    labels = [0, 0, 1, 1]
    summary = classification_summary(labels, [0.1, 0.2, 0.8, 0.9], [0.6, 0.2, 0.8, 0.4])
    assert summary["auroc_orig"] == 1.0 and summary["accuracy_orig"] == 1.0
    assert summary["accuracy_simpl"] == 0.5 and summary["decision_agreement"] == 0.5


@pytest.fixture(scope="module")
def prior() -> Glow:
    torch.manual_seed(0)
    glow = Glow(in_channels=1, levels=2, steps_per_level=2, hidden_channels=16)
    smooth = 0.5 + 0.03 * F.interpolate(torch.randn(16, 1, 4, 4), size=SIZE, mode="bilinear")
    glow.train()
    with torch.no_grad():
        glow.log_prob(smooth * 255 / 256 - 0.5 + 1 / 512)
    return glow.eval().requires_grad_(False)


def labelled_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + 0.2 * (torch.rand(n, 1, SIZE, SIZE, generator=g) - 0.5)
    x[:, :, 8:24, 8:24] += (0.25 * (2 * y.float() - 1)).view(n, 1, 1, 1)
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8), y


def test_flat_images_cost_fewer_bits(prior):
    images, _ = labelled_images(8, 0)
    flat = flat_images(images)
    assert torch.allclose(flat.mean(dim=(1, 2, 3)), images.float().mean(dim=(1, 2, 3)) / 255, atol=1 / 255)
    assert (deterministic_bpd(prior, flat) < deterministic_bpd(prior, images)).all()


def centre_brightness(x) -> torch.Tensor:
    """A fixed "classifier" on lazy uint8 images: is the centre brighter than grey?"""
    return (x[:].float()[:, 0, 8:24, 8:24].mean(dim=(1, 2)) > 127.5).float()


def test_baselines_table_at_matched_bpd(prior):
    images, labels = labelled_images(16, 1)
    original = float(deterministic_bpd(prior, images).mean())
    target = 0.6 * original
    seen = []

    def extra(kind, strength, degraded):
        seen.append((kind, degraded))
        return {"retrain_auroc_simpl": 0.5}

    table = baselines_at_matched_bpd(
        prior, images, labels, target, centre_brightness, kinds=("blur", "downsample"), extra_columns=extra,
        batch_size=5,
    )
    assert list(table["method"]) == ["blur", "downsample"]
    assert (table["mean_bpd"] < original).all() and (table["strength"] > 0).all()
    assert table.loc[0, "mean_bpd"] == pytest.approx(target, abs=0.05 * original)
    assert bool(table.loc[0, "reached"]) == (abs(table.loc[0, "mean_bpd"] - target) <= 0.02)
    assert table["auroc"].between(0, 1).all() and (table["retrain_auroc_simpl"] == 0.5).all()
    assert (table["match_sample"] == 16).all()
    # the extra columns get the whole split degraded at the strength found
    blurred = torch.round(apply_baseline(images, "blur", table.loc[0, "strength"]) * 255).to(torch.uint8)
    assert [kind for kind, _ in seen] == ["blur", "downsample"] and torch.equal(seen[0][1].load(), blurred)


def test_baselines_match_on_a_subsample_and_degrade_the_whole_split(prior):
    """The strength is found on a seeded subsample; the row reports the whole split at that strength."""
    images, labels = labelled_images(40, 4)
    target = 0.6 * float(deterministic_bpd(prior, images).mean())
    table = baselines_at_matched_bpd(prior, images, labels, target, centre_brightness, kinds=("blur",),
                                     subsample=12, seed=3, batch_size=5)
    row = table.iloc[0]
    assert row["match_sample"] == 12
    sample = match_sample(40, 12, 3)
    assert len(sample) == 12 and np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, match_sample(40, 12, 3))
    assert not np.array_equal(sample, match_sample(40, 12, 4))
    # bisection on the sample alone lands on the same strength
    alone = baselines_at_matched_bpd(prior, images[torch.as_tensor(sample)], labels[sample], target,
                                     centre_brightness, kinds=("blur",), batch_size=5)
    assert row["strength"] == alone.iloc[0]["strength"]
    blurred = torch.round(apply_baseline(images, "blur", row["strength"]) * 255).to(torch.uint8)
    assert row["mean_bpd"] == pytest.approx(float(deterministic_bpd(prior, blurred).mean()), rel=1e-6)
    assert bool(row["reached"]) == (abs(row["mean_bpd"] - target) <= 0.02)


def test_lazy_views_stream_a_store_batch_by_batch(prior, tmp_path):
    """``MappedImages`` over a store reads like the transformed tensor; bpd passes agree batch-wise."""
    images, _ = labelled_images(11, 5)
    ids = [f"std-{i:08x}" for i in range(11)]
    store = CohortStore.create(tmp_path / "store", ids, (SIZE, SIZE))
    store.write_block(0, images[:, 0].numpy())
    stored = StoredImages(store, store.slots(ids))
    view = MappedImages(stored, flat_images)
    expected = flat_images(images)
    assert view.dtype == torch.uint8 and view.shape == images.shape
    assert torch.equal(view[3:9].float() / 255, expected[3:9])
    assert torch.equal(view[np.array([10, 0])].float() / 255, expected[[10, 0]])
    assert torch.equal(view.subset([2, 5]).load().float() / 255, expected[[2, 5]])
    whole = deterministic_bpd(prior, images)
    assert torch.allclose(deterministic_bpd(prior, stored, batch_size=4), whole, rtol=0, atol=1e-5)
    flat = deterministic_bpd(prior, expected)
    assert torch.allclose(flat_bpd(prior, stored, batch_size=4), flat, rtol=0, atol=1e-5)


def distractor_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label: a square darker or brighter than grey on the left; random texture on the right."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, SIZE, SIZE), 0.5)
    x[:, :, 5:11, 5:11] = (0.3 + 0.4 * y.float()).view(n, 1, 1, 1)
    x[:, :, :, SIZE // 2 :] = 0.2 + 0.6 * torch.rand(n, 1, SIZE, SIZE // 2, generator=g)
    return torch.round(x * 255).to(torch.uint8), y


def test_retrain_on_simplified_scores_both_views():
    train, y_train = distractor_images(192, 2)
    val, y_val = distractor_images(64, 3)
    config = ClassifyConfig.model_validate(
        {
            "device": "cpu",
            "model": {"name": "nf_cnn", "kwargs": {}},
            "train": {"epochs": 3, "batch_size": 32},
            "augment": {"enabled": False},
            "tracking": {"enabled": False},
        }
    )
    # "simplified" = label square kept, texture flattened; the retrained model sees only that
    simple_train, simple_val = train.clone(), val.clone()
    simple_train[..., SIZE // 2 :] = 128
    simple_val[..., SIZE // 2 :] = 128
    metrics = retrain_on_simplified(simple_train, y_train, simple_val, val, y_val, config)
    assert set(metrics) == {
        "retrain_auroc_simpl",
        "retrain_accuracy_simpl",
        "retrain_auroc_orig",
        "retrain_accuracy_orig",
    }
    assert metrics["retrain_auroc_simpl"] > 0.9
    assert 0.0 <= metrics["retrain_auroc_orig"] <= 1.0


def test_distractor_pull_finds_a_mark_the_classifier_uses_and_not_one_it_ignores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    marked = rng.random(120) < 0.5  # independent of the label, as in the reported splits
    base = 0.2 + 0.6 * labels + rng.normal(0, 0.1, 120)
    pull, p_value = distractor_pull(base + 0.15 * marked, labels, marked, permutations=500)
    assert pull == pytest.approx(0.15, abs=0.05) and p_value < 0.01
    pull, p_value = distractor_pull(base, labels, marked, permutations=500)
    assert abs(pull) < 0.05 and p_value > 0.05
    # the label's own effect is stratified away even when marks cluster in one label
    skewed = labels.astype(bool) & (rng.random(120) < 0.9) | ~labels.astype(bool) & (rng.random(120) < 0.1)
    assert distractor_pull(base, labels, skewed, permutations=500)[1] > 0.01
    assert all(math.isnan(v) for v in distractor_pull(base, labels, np.zeros(120, dtype=bool)))
