import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.bpd import bits_per_dim
from pipeline.prior import load_prior, read_prior_info, save_prior
from pipeline.prior.train import PriorConfig, train_prior
from pipeline.runtime.checkpoint import load_checkpoint

TINY = {
    "model": {"levels": 2, "steps_per_level": 2, "hidden_channels": 8},
    "data": {"sizes": [16, 32], "bank": {"size": 48, "volume_size": 32, "projections": 2, "slices": 2}},
    "train": {"batch_size": 4, "max_steps": 6, "steps_per_epoch": 2, "val_images": 4, "val_size": 16,
              "warmup_steps": 1, "device": "cpu"},
    "tracking": {"enabled": False},
}


def tiny_config(**train) -> PriorConfig:
    data = {**TINY, "train": {**TINY["train"], **train}}
    return PriorConfig.model_validate(data)


def saved_epochs(run_dir) -> int:
    """Engine epochs in a run's checkpoint (each is train.steps_per_epoch steps)."""
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]


def test_training_lowers_bpd_and_writes_prior(tmp_path):
    summary = train_prior(tiny_config(max_steps=30, steps_per_epoch=10, lr=3e-3), tmp_path, command="test")
    info = read_prior_info(tmp_path / "prior.safetensors")
    assert info["command"] == "test" and info["seed"] == 0
    assert info["metrics"]["val_bpd"] == summary["best_val_bpd"] and info["step"] in (10, 20, 30)
    assert (tmp_path / "config.resolved.yaml").is_file()
    assert summary["steps"] == 30 and saved_epochs(tmp_path) == 3 and not summary["time_capped"]
    # lr=0 keeps the data-initialised weights: the same validation images under the untrained flow.
    untrained = train_prior(tiny_config(max_steps=1, lr=0.0), tmp_path / "untrained")
    assert summary["best_val_bpd"] < untrained["best_val_bpd"] - 0.3


def test_checkpoint_round_trip_gives_identical_bpd(tmp_path):
    train_prior(tiny_config(max_steps=2), tmp_path / "run")
    model = load_prior(tmp_path / "run" / "prior.safetensors")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randint(0, 256, (3, 1, 16, 16)) / 255.0
    save_prior(model, tmp_path / "copy", {"note": "round trip"})
    again = load_prior(tmp_path / "copy.safetensors")
    assert torch.equal(bits_per_dim(model, x, "midpoint"), bits_per_dim(again, x, "midpoint"))
    assert read_prior_info(tmp_path / "copy.json")["note"] == "round trip"


def test_resume_continues_from_saved_step_and_matches_uninterrupted_run(tmp_path):
    train_prior(tiny_config(max_steps=6), tmp_path / "straight")
    train_prior(tiny_config(max_steps=4), tmp_path / "resumed")
    assert saved_epochs(tmp_path / "resumed") == 2  # of 2 steps each
    summary = train_prior(tiny_config(max_steps=6), tmp_path / "resumed")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 3 and summary["steps"] == 6
    assert resumed["extra"]["state"]["best"] == straight["extra"]["state"]["best"]
    for name, value in straight["models"]["glow"].items():
        assert torch.allclose(value.float(), resumed["models"]["glow"][name].float(), atol=1e-6), name


def test_time_budget_stops_early_and_still_saves(tmp_path):
    """The opt-in cap stops after the epoch that crosses it (one epoch of 2 steps here) and says so."""
    summary = train_prior(tiny_config(max_steps=10_000, max_minutes=0.0), tmp_path)
    assert saved_epochs(tmp_path) == 1 and summary["steps"] == 2
    assert summary["stopped_epoch"] == 1 and summary["time_capped"]
    assert (tmp_path / "prior.safetensors").is_file() and summary["best_val_bpd"] < 20


def test_max_steps_must_fill_whole_epochs(tmp_path):
    with pytest.raises(ValueError, match="multiple of train.steps_per_epoch"):
        train_prior(tiny_config(max_steps=5, steps_per_epoch=2), tmp_path)


def test_fine_tuning_starts_from_given_weights(tmp_path):
    train_prior(tiny_config(max_steps=2), tmp_path / "base")
    base = load_file(str(tmp_path / "base" / "prior.safetensors"))
    config = tiny_config(max_steps=1, lr=0.0, max_minutes=None)
    config.init = str(tmp_path / "base" / "prior.safetensors")
    train_prior(config, tmp_path / "tuned")
    tuned = load_checkpoint(tmp_path / "tuned" / "checkpoint.pt", models={}, restore_rng=False)
    assert tuned["step"] == 1  # one epoch of max_steps=1 step
    state = torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=True)["models"]["glow"]
    for name, value in base.items():
        assert torch.allclose(state[name].float(), value.float()), name


def test_selecting_on_radiographs_requires_them(tmp_path):
    with pytest.raises(ValueError, match="needs validation radiographs"):
        train_prior(tiny_config(select_on="val_radiograph_bpd"), tmp_path)


def test_radiographs_stream_from_an_ingest_folder_into_the_mix_and_validation(tmp_path):
    """The training bank samples at most data.max_radiographs studies; validation streams the val split."""
    import numpy as np
    import pandas as pd

    from pipeline.data.ingest import write_ingest_folder
    from pipeline.prior.data import load_radiographs

    n = 12
    ids = [f"std-{i:012x}" for i in range(n)]
    frame = pd.DataFrame({
        "study_id": ids, "patient_id": [f"pat-{i:012x}" for i in range(n)],
        "image_path": [f"{s}.png" for s in ids], "view": "PA", "sex": "F", "age": 60.0, "effusion": 0,
        "split": ["train"] * 8 + ["val"] * 4, "source": "demo",
    })
    yy = np.mgrid[:16, :16][0]
    images = np.stack([np.clip(60 + 8 * yy + 5 * i, 0, 255) for i in range(n)]).astype(np.uint8)
    ingest = write_ingest_folder(tmp_path / "ingest", frame, images)
    train, _ = load_radiographs(ingest, split="train")
    val, _ = load_radiographs(ingest, split="val")
    config = tiny_config(max_steps=2, select_on="val_radiograph_bpd")
    config.data.max_radiographs = 5
    summary = train_prior(config, tmp_path / "run", train, val)
    metrics = read_prior_info(tmp_path / "run" / "prior.safetensors")["metrics"]
    assert metrics["val_radiograph_bpd"] == summary["best_val_bpd"] and 0 < summary["best_val_bpd"] < 30
