"""Dataset condensation (setting b): gradient matching plus bpd, on a synthetic task with a tiny prior."""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.data.ingest as ingest_module
from pipeline.data.ingest import Cohort
from pipeline.models.bpd import bits_per_dim
from pipeline.prior import save_prior
from pipeline.simplebits.condense import (
    CondenseConfig,
    CondenseLoopConfig,
    ConvNet,
    condense,
    DownsampledImages,
    area_downsample,
    condense_command,
    downsample_cohort,
    evaluate_condensed,
    gradient_distance,
    image_lr,
    loss_weights,
)

from toy_tasks import SIZE, tiny_prior
TASK = "effusion"


def square_cohort(n: int, seed: int, split: str = "train") -> Cohort:
    """Label = a square darker (0) or brighter (1) than grey, on mild texture."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + 0.1 * (torch.rand(n, 1, SIZE, SIZE, generator=g) - 0.5)
    x[:, :, 8:24, 8:24] = (0.3 + 0.4 * y.float()).view(n, 1, 1, 1)
    frame = pd.DataFrame(
        {"study_id": [f"std-{split}-{i:04d}" for i in range(n)], TASK: y.numpy(), "split": split}
    )
    return Cohort(torch.round(x * 255).to(torch.uint8), frame)


def tiny_config(lam, iterations: int = 8) -> CondenseConfig:
    return CondenseConfig.model_validate(
        {
            "task": TASK,
            "device": "cpu",
            "network": {"width": 8},
            "condense": {
                "ipc": 2,
                "iterations": iterations,
                "outer_loop": 2,
                "inner_loop": 1,
                "batch_real": 32,
                "lam": lam,
            },
            "evaluate": {"networks": 2, "epochs": 30, "full_epochs": 2},
            "tracking": {"enabled": False},
        }
    )


@pytest.fixture(scope="module")
def prior():
    return tiny_prior()


@pytest.fixture(scope="module")
def cohorts():
    return square_cohort(128, 0), square_cohort(64, 1, "val")


@pytest.fixture(scope="module")
def condensed(prior, cohorts):
    train, _ = cohorts
    return {
        lam: condense(train.images, train.labels(TASK), prior, tiny_config(lam), lam) for lam in (0.0, 100.0)
    }


def test_gradient_distance_is_zero_for_equal_gradients_and_ignores_biases():
    grads = [torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(2, 16)]
    assert float(gradient_distance(grads, grads)) == pytest.approx(0.0, abs=1e-5)
    flipped = [-grads[0], grads[1], grads[2]]
    assert float(gradient_distance(grads, flipped)) == pytest.approx(2.0 * 4, abs=1e-4)  # 4 rows, cos = -1
    changed_bias = [grads[0], torch.randn(4), grads[2]]
    assert float(gradient_distance(grads, changed_bias)) == pytest.approx(0.0, abs=1e-5)


def test_loss_weights_follow_the_paper():
    assert loss_weights(0.0, 2) == (20.0, 0.0)
    match, bpd = loss_weights(100.0, 2)
    assert match == pytest.approx(20 / 101) and bpd == pytest.approx(200 / 101)


def test_image_lr_decays_from_lr_images_towards_zero():
    cosine = CondenseLoopConfig(iterations=10, lr_images=0.1)
    rates = [image_lr(cosine, i) for i in range(10)]
    assert rates[0] == pytest.approx(0.1) and rates[5] == pytest.approx(0.05)
    assert all(a > b for a, b in itertools.pairwise(rates)) and 0 < rates[-1] < 0.01
    constant = CondenseLoopConfig(iterations=10, lr_images=0.1, lr_schedule="constant")
    assert {image_lr(constant, i) for i in range(10)} == {0.1}


def test_downsample_cohort_area_averages_on_the_8bit_grid(cohorts):
    train, _ = cohorts
    small = downsample_cohort(train, SIZE // 2)
    assert small.images.dtype == torch.uint8 and small.images.shape == (len(train), 1, SIZE // 2, SIZE // 2)
    first = small.images[0]
    assert first.dtype == torch.uint8 and first.shape == (1, SIZE // 2, SIZE // 2)
    block = train.images[0, 0, :2, :2].float().mean()
    assert abs(int(first[0, 0, 0]) - float(block)) <= 0.5
    assert small.study_ids == train.study_ids
    assert downsample_cohort(train, SIZE) is train and downsample_cohort(train, None) is train


def test_downsampled_view_reads_only_the_rows_asked_for(cohorts):
    """The view resizes per batch: indexing reads just those rows of the underlying images."""
    train, _ = cohorts

    class CountingImages:
        def __init__(self, images):
            self.images, self.rows_read = images, 0
            self.shape = images.shape

        def __len__(self):
            return len(self.images)

        def __getitem__(self, key):
            batch = self.images[key]
            self.rows_read += len(batch) if batch.ndim == 4 else 1
            return batch

    source = CountingImages(train.images)
    view = DownsampledImages(source, SIZE // 2)
    assert len(view) == len(train) and source.rows_read == 0
    picked = view[np.array([5, 2, 9])]
    assert source.rows_read == 3
    assert torch.equal(picked, area_downsample(train.images[[5, 2, 9]], SIZE // 2))
    assert torch.equal(view[4:7], area_downsample(train.images[4:7], SIZE // 2))


def test_convnet_uses_per_example_normalisation():
    net = ConvNet(SIZE, width=8).eval()
    x = torch.rand(4, 1, SIZE, SIZE)
    assert torch.allclose(net(x)[:1], net(x[:1]), atol=1e-5)  # no batch statistics
    with pytest.raises(ValueError, match="at least 8 pixels"):
        ConvNet(4, width=8)


def test_condensation_matches_gradients_better_over_iterations(condensed):
    result = condensed[0.0]
    images, labels, history = result.images, result.labels, result.history
    assert result.stopped_iteration == 8 and not result.time_capped
    assert images.dtype == torch.uint8 and images.shape == (4, 1, SIZE, SIZE)
    assert labels.tolist() == [0, 0, 1, 1]
    assert len(history) == 8
    first = np.mean([h["match"] for h in history[:2]])
    last = np.mean([h["match"] for h in history[-2:]])
    assert last < first


def test_bpd_term_lowers_the_bits_of_the_condensed_images(condensed, prior):
    def mean_bpd(images):
        return float(bits_per_dim(prior, images.float() / 255, "midpoint").mean())

    assert mean_bpd(condensed[100.0].images) < 0.5 * mean_bpd(condensed[0.0].images)


def test_condensed_images_carry_the_task(condensed, prior, cohorts):
    train, val = cohorts
    result = condensed[100.0]
    metrics = evaluate_condensed(result.images, result.labels, train, val, prior, tiny_config(100.0))
    assert metrics["condensed_accuracy_mean"] >= 0.9
    assert metrics["condensed_auroc_mean"] >= 0.9
    assert {"full_accuracy_mean", "full_auroc_mean", "bpd_condensed", "bpd_real"} <= set(metrics)
    assert metrics["bpd_condensed"] < metrics["bpd_real"]


def test_condense_command_sweep_writes_outputs_and_resumes(prior, cohorts, tmp_path, monkeypatch):
    train, val = cohorts
    parts = {"train": train, "val": val, "test": val}
    monkeypatch.setattr(ingest_module, "load_cohorts", lambda ingest, splits, task: {s: parts[s] for s in splits})
    config = tiny_config([0.0, 100.0], iterations=2).model_copy(
        update={"prior": str(save_prior(prior, tmp_path / "p"))}
    )
    out = tmp_path / "condense"
    summaries = condense_command("unused", out, config)
    assert [s["lam"] for s in summaries] == [0.0, 100.0]
    sweep = pd.read_csv(out / "sweep.csv")
    assert list(sweep["lam"]) == [0.0, 100.0] and "bpd_condensed" in sweep.columns
    images = np.load(out / "lam-100" / "condensed.npy")
    assert images.dtype == np.uint8 and images.shape == (4, SIZE, SIZE)
    assert json.loads((out / "lam-100" / "metrics.json").read_text())["ipc"] == 2
    # a longer run resumes from the checkpoint of the short one
    longer = tiny_config(100.0, iterations=3).model_copy(update={"prior": config.prior})
    resumed = condense(
        train.images,
        train.labels(TASK),
        prior,
        longer,
        100.0,
        checkpoint_path=out / "lam-100" / "checkpoint.pt",
    )
    assert [h["iteration"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == json.loads((out / "lam-100" / "metrics.json").read_text())["history"]


def test_shipped_config_matches_the_defaults():
    from pipeline.config import default_config_path, load_config

    assert load_config(CondenseConfig, default_config_path("simplify_condense")) == CondenseConfig()
