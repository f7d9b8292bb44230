"""Devices rendered in 3D, counterfactual renders, contamination, reliance; the default cohort unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from pipeline.data.demo.cohort import DemoCohortConfig, DemoScene, generate_cohort, plan_cohort
from pipeline.data.demo.devices import DEVICE_KINDS
from pipeline.data.manifest import read_manifest
from pipeline.data.transforms import to_working_resolution

# The digest of the default cohort's first renders (pixels and masks), computed with the code before
# the device options existed: the options must leave the default cohort byte-for-byte unchanged.
DEFAULT_RENDER_DIGEST = "830841a5033cedbcfd53e4385fda6a6337d2577429fc8720a0c15cde1c691b52"


def _device_config(**kwargs) -> DemoCohortConfig:
    values = dict(n=4, size=64, seed=2, counterfactuals=True, render={"n_points": 48, "device": "cpu"},
                  devices={"kinds": list(DEVICE_KINDS), "base_rate": 1.0, "mask_sizes": [32]})
    values.update(kwargs)
    return DemoCohortConfig.model_validate(values)


@pytest.fixture(scope="module")
def rendered():
    config = _device_config()
    plan = plan_cohort(config)[0]
    scene = DemoScene(config)
    return config, plan, scene.render(plan), scene.render(plan)


def test_device_renders_are_deterministic(rendered):
    _, plan, first, second = rendered
    assert plan.devices == DEVICE_KINDS  # base rate 1: every device present
    assert np.array_equal(first.display, second.display) and np.array_equal(first.log_image, second.log_image)
    assert first.masks.keys() == second.masks.keys()
    assert all(np.array_equal(first.masks[k], second.masks[k]) for k in first.masks)
    expected = ({f"no_{k}" for k in DEVICE_KINDS} | ({"no_effusion"} if plan.effusion else set())
                | ({"no_breast"} if first.masks["breast"].any() else set()))
    assert set(first.counterfactuals) == expected
    for name, (display, log_image) in first.counterfactuals.items():
        assert np.array_equal(display, second.counterfactuals[name][0])


def test_device_difference_lies_in_its_mask_and_fills_it(rendered):
    """With and without a device differ where its mask is (within the detector blur and unsharp-mask
    halo, 2 px), and inside the mask the images differ (except where the window clips both)."""
    _, plan, study, _ = rendered
    for kind in plan.devices:
        mask = study.masks[kind]
        assert mask.sum() > 20, kind
        difference = np.abs(study.log_image - study.counterfactuals[f"no_{kind}"][1])
        visible = difference > 0.02
        assert visible.sum() > 10, kind
        near = ndimage.binary_dilation(mask, iterations=2)
        assert (visible & near).sum() >= 0.99 * visible.sum(), kind
        assert (difference[mask] > 0).mean() >= 0.8, kind
        # elsewhere the common-noise variants differ only by the device's share of the (broad) scatter
        # and float rounding: typically nothing at all
        assert np.median(difference[~near]) < 1e-4 and np.quantile(difference[~near], 0.99) < 0.01, kind


def test_working_resolution_masks_agree_with_downsampled_masks(rendered):
    _, plan, study, _ = rendered
    for kind in plan.devices:
        working = study.masks[f"{kind}_32"]
        downsampled = to_working_resolution(study.masks[kind], 32, kind="mask").astype(bool)
        assert working.shape == (32, 32) and downsampled.any()
        assert (working & downsampled).sum() >= 0.75 * downsampled.sum(), kind
        assert (working & ndimage.binary_dilation(downsampled)).sum() >= 0.9 * working.sum(), kind
    union = np.logical_or.reduce([study.masks[f"{k}_32"] for k in DEVICE_KINDS])
    assert np.array_equal(study.masks["devices_32"], union)


def test_absent_device_leaves_image_and_masks_empty():
    config = _device_config(devices={"kinds": ["ecg"], "base_rate": 0.0})
    plan = plan_cohort(config)[0]
    study = DemoScene(config).render(plan)
    assert plan.devices == () and not study.masks["ecg"].any() and not study.masks["ecg_32"].any()
    assert not any(name.startswith("no_ecg") for name in study.counterfactuals)


def test_contamination_follows_label_in_train_only():
    config = DemoCohortConfig(n=3000, seed=4, devices={"kinds": ["chest_drain", "ecg"], "contamination": 0.8})
    plans = plan_cohort(config)
    frame = pd.DataFrame({"split": p.split, "effusion": p.effusion, "correlated": p.device_correlated,
                          **{k: k in p.devices for k in ("chest_drain", "ecg")}} for p in plans)
    assert (frame.correlated == (frame.split == "train")).all()
    for kind in ("chest_drain", "ecg"):
        rate = frame.groupby(["split", "effusion"])[kind].mean()
        assert abs(rate["train", 1] - 0.8) < 0.04 and abs(rate["train", 0] - 0.2) < 0.04, kind
        held_out = frame[frame.split != "train"]  # ~900 studies: 0.1 is about 3 standard errors
        by_label = held_out.groupby("effusion")[kind].mean()
        assert abs(by_label[1] - by_label[0]) < 0.1 and abs(held_out[kind].mean() - 0.5) < 0.06, kind
    # kinds are drawn independently: among train positives, P(ecg | drain) ~ P(ecg)
    positives = frame[(frame.split == "train") & (frame.effusion == 1)]
    assert abs(positives[positives.chest_drain].ecg.mean() - positives.ecg.mean()) < 0.06
    # a kind's presence does not depend on which other kinds are enabled
    ecg_only = plan_cohort(DemoCohortConfig(n=3000, seed=4, devices={"kinds": ["ecg"], "contamination": 0.8}))
    assert [("ecg" in p.devices) for p in ecg_only] == frame.ecg.tolist()
    # the device draws leave every other draw of the plan as it was
    plain = plan_cohort(DemoCohortConfig(n=3000, seed=4))
    assert [p.header for p in plain] == [p.header for p in plans]
    assert [p.effusion_side for p in plain] == [p.effusion_side for p in plans]


def _render_digest(config: DemoCohortConfig, count: int) -> str:
    digest = hashlib.sha256()
    scene = DemoScene(config)
    for plan in plan_cohort(config)[:count]:
        study = scene.render(plan)
        for array in (study.display, study.log_image, *(study.masks[k] for k in sorted(study.masks))):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_default_cohort_is_unchanged():
    config = DemoCohortConfig(n=3, size=32, seed=5, render={"n_points": 48, "device": "cpu"})
    assert _render_digest(config, 3) == DEFAULT_RENDER_DIGEST


class _MeanBrightness(torch.nn.Module):
    """P(positive) rises with the mean image intensity: bright devices push it up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 40.0 * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(score), score], dim=1)


class _Blind(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 2) + torch.tensor([0.0, 0.3])


def test_reliance_is_zero_for_a_blind_classifier_and_positive_for_one_that_sees_devices(tmp_path):
    from pipeline.data.demo.reliance import reliance_table, summarise_reliance
    from pipeline.data.ingest import IngestConfig, ingest

    cohort = tmp_path / "cohort"
    generate_cohort(_device_config(n=3, size=32, devices={"kinds": ["ecg", "pacemaker"], "base_rate": 1.0,
                                                           "mask_sizes": []}),
                    cohort, show_progress=False)
    ingest(IngestConfig(manifest=str(cohort / "manifest.csv"), out=str(tmp_path / "ingest"), size=32))
    manifest = read_manifest(cohort / "manifest.csv")
    assert manifest.support_devices.tolist() == [1, 1, 1]
    truth = pd.read_csv(cohort / "ground_truth.csv")
    assert truth.ecg.tolist() == [1, 1, 1] and truth.pacemaker.tolist() == [1, 1, 1]

    seeing = summarise_reliance(reliance_table(cohort, tmp_path / "ingest", _MeanBrightness(), split=None))
    blind = summarise_reliance(reliance_table(cohort, tmp_path / "ingest", _Blind(), split=None))
    assert set(seeing.feature) == ({"ecg", "pacemaker"} | ({"effusion"} if truth.effusion.any() else set())
                                   | ({"breast"} if truth.breast_size.gt(0).any() else set()))
    assert (blind.reliance == 0).all() and (blind.reliance_log_odds == 0).all()
    devices = seeing.set_index("feature").loc[["ecg", "pacemaker"]]
    assert (devices.n == 3).all()
    assert (devices.reliance > 0.005).all() and (devices["shift"] > 0).all()
    assert (devices.reliance_log_odds > 0).all()

    # the command: a TorchScript classifier file, loaded as simplebits apply loads one
    from pipeline.cli import main

    torch.jit.save(torch.jit.script(_MeanBrightness()), str(tmp_path / "bright.pt"))
    code = main(["reliance", "--cohort", str(cohort), "--ingest", str(tmp_path / "ingest"), "--classifier",
                 str(tmp_path / "bright.pt"), "--split", "all", "--out", str(tmp_path / "reliance.csv")])
    assert code == 0
    from_cli = summarise_reliance(pd.read_csv(tmp_path / "reliance.csv")).set_index("feature").reliance
    np.testing.assert_allclose(from_cli, seeing.set_index("feature").reliance, rtol=1e-5)


def test_log_odds_reliance_sees_a_saturated_classifier():
    """P = 1.0 in float32 for every input, yet the feature moves the log-odds by 10: reliance on
    probabilities reads 0, on log-odds 10."""
    from pipeline.data.demo.reliance import summarise_reliance

    table = pd.DataFrame({"study_id": ["a", "b"], "feature": ["ecg", "ecg"], "p": [1.0, 1.0],
                          "p_without": [1.0, 1.0], "log_odds": [40.0, 50.0], "log_odds_without": [30.0, 40.0]})
    summary = summarise_reliance(table).set_index("feature")
    assert summary.loc["ecg", "reliance"] == 0 and summary.loc["ecg", "reliance_log_odds"] == 10
    old = summarise_reliance(table[["study_id", "feature", "p", "p_without"]])  # a CSV from before
    assert "reliance_log_odds" not in old


def test_effusion_counterfactual_removes_only_the_fluid():
    """Fine-detail effusion (50-300 mL): the render without it differs from the study near its fluid
    mask. The mask keeps fluid paths of 10 mm or more; the thinner rim of the sheet still changes the
    image a little (< 0.05), so visible changes are required near the mask, not all change."""
    config = DemoCohortConfig(n=12, size=64, seed=1, counterfactuals=True, effusion={"volume_ml": [50, 300]},
                              render={"n_points": 48, "device": "cpu"})
    plan = next(p for p in plan_cohort(config) if p.effusion)
    assert 50 <= max(plan.volume_left_ml, plan.volume_right_ml) <= 300
    study = DemoScene(config).render(plan)
    assert "no_effusion" in study.counterfactuals
    assert not any(f"no_{k}" in study.counterfactuals for k in DEVICE_KINDS)
    difference = np.abs(study.log_image - study.counterfactuals["no_effusion"][1])
    near = ndimage.binary_dilation(study.masks["fluid"], iterations=3)
    visible = difference > 0.02
    assert visible.sum() > 5  # there is a sign ...
    assert (visible & near).sum() >= 0.9 * visible.sum()  # ... where the fluid is
    assert difference[~near].max() < 0.05


def test_breast_counterfactual_removes_only_the_breasts():
    """The sex task's sign: a female study rendered without its breasts differs from it near the
    breast mask (threshold 5 mm of tissue; the thinner margin changes the image a little)."""
    config = DemoCohortConfig(n=12, size=64, seed=1, counterfactuals=True,
                              render={"n_points": 48, "device": "cpu"})
    plan = max((p for p in plan_cohort(config) if p.sex == "F"), key=lambda p: p.breast_size)
    study = DemoScene(config).render(plan)
    assert "no_breast" in study.counterfactuals and study.masks["breast"].any()
    difference = np.abs(study.log_image - study.counterfactuals["no_breast"][1])
    near = ndimage.binary_dilation(study.masks["breast"], iterations=3)
    visible = difference > 0.02
    assert visible.sum() > 20
    assert (visible & near).sum() >= 0.9 * visible.sum()
    assert difference[~near].max() < 0.05


def test_cli_options_and_contact_sheet(tmp_path, capsys):
    from pipeline.cli import main

    code = main(["demo-cohort", "--contact-sheet", str(tmp_path / "sheet.png"), "--n", "4",
                 "--size", "32", "--devices", "chest_drain,pacemaker", "--effusion-volume", "50", "300",
                 "--set", "render.n_points=32", "--set", "render.device=cpu"])
    assert code == 0
    from PIL import Image

    with Image.open(tmp_path / "sheet.png") as sheet:
        assert sheet.width > 200 and sheet.height > 200
    assert main(["demo-cohort", "--out", str(tmp_path / "x"), "--devices", "drain", "--print-config"]) == 2
    assert "devices.kinds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo-cohort", "--out", str(tmp_path / "x"), "--devices", "ecg",
              "--device-contamination", "0.8", "--print-config"])
    printed = capsys.readouterr().out
    assert "contamination: 0.8" in printed and "- ecg" in printed
