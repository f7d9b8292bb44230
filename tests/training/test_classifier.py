import json

import pandas as pd
import pytest
import torch

import pipeline.training.classifier as classifier_module
from pipeline.config import load_config
from pipeline.data.ingest import Cohort
from pipeline.models.classifiers import load_classifier
from pipeline.training.classifier import (
    AugmentConfig,
    ClassifyConfig,
    TrainConfig,
    epoch_lr,
    fit_classifier,
    predict_proba,
    random_affine,
    train_classifier_run,
    weight_decay_groups,
)

SIZE = 32


def square_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1: a bright square at a random place in the lower half; label 0: none. Noisy background."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.4 + 0.05 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    for i in torch.nonzero(y).flatten().tolist():
        r, c = torch.randint(14, 24, (2,), generator=g).tolist()
        x[i, :, r:r + 8, c:c + 8] += 0.4
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8), y


def cohort(n: int, seed: int, split: str) -> Cohort:
    images, labels = square_images(n, seed)
    frame = pd.DataFrame({"study_id": [f"std-{split}-{i:03d}" for i in range(n)], "effusion": labels.numpy(),
                          "split": split})
    return Cohort(images, frame)


def tiny_config(epochs: int = 6, **train) -> ClassifyConfig:
    return load_config(ClassifyConfig, None, [
        "device=cpu", "model.name=nf_cnn", f"train.epochs={epochs}", "train.batch_size=32", "train.lr=3e-3",
        "tracking.enabled=false", *[f"train.{k}={v}" for k, v in train.items()],
    ])


def test_fit_learns_a_simple_task_and_keeps_the_best_epoch():
    x, y = square_images(256, 0)
    vx, vy = square_images(128, 1)
    result = fit_classifier(x, y, vx, vy, tiny_config())
    assert result.metrics["val_auroc"] > 0.9
    best = max(h["val_auroc"] for h in result.history)
    assert result.metrics["val_auroc"] == pytest.approx(best, abs=1e-9)
    assert torch.allclose(result.val_probabilities, predict_proba(result.model, vx), atol=1e-6)
    assert not result.model.training


def test_resume_gives_the_same_model(tmp_path, monkeypatch):
    """A run stopped after its second of three epochs and resumed ends with the uninterrupted model."""
    import pipeline.training.engine as engine_module

    x, y = square_images(96, 2)
    vx, vy = square_images(32, 3)
    straight = fit_classifier(x, y, vx, vy, tiny_config(epochs=3))
    checkpoint = tmp_path / "checkpoint.pt"
    saves = iter(range(100))
    real_save = engine_module.Engine._save

    def save_then_die(self, *args):  # the process "dies" right after the second epoch's checkpoint
        real_save(self, *args)
        if next(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine_module.Engine, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit_classifier(x, y, vx, vy, tiny_config(epochs=3), checkpoint_path=checkpoint)
    monkeypatch.undo()
    resumed = fit_classifier(x, y, vx, vy, tiny_config(epochs=3), checkpoint_path=checkpoint)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_augmentation_stays_on_the_grid_and_never_mirrors():
    x = torch.zeros(64, 1, SIZE, SIZE)
    x[:, :, 8:24, 2:12] = 1.0  # mass on the image's left side
    out = random_affine(x, AugmentConfig(), torch.Generator().manual_seed(0))
    assert torch.allclose(out * 255, torch.round(out * 255))
    left, right = out[..., : SIZE // 2].sum(dim=(1, 2, 3)), out[..., SIZE // 2:].sum(dim=(1, 2, 3))
    assert bool((left > 4 * right).all())
    assert not torch.equal(out, x)


def test_cosine_lr_decays_from_lr_to_its_floor_over_the_planned_epochs():
    train = TrainConfig(epochs=5, lr=1e-3, lr_schedule="cosine", min_lr_fraction=0.1)
    lrs = [epoch_lr(train, e) for e in range(5)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    constant = train.model_copy(update={"lr_schedule": "constant"})
    assert {epoch_lr(constant, e) for e in range(5)} == {1e-3}


def test_no_weight_decay_on_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(2, 2))
    decay, rest = weight_decay_groups(model, 0.1)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in rest["params"])
    assert rest["weight_decay"] == 0.0 and len(decay["params"]) + len(rest["params"]) == 4


def test_command_writes_model_metrics_and_predictions(tmp_path, monkeypatch):
    cohorts = {"train": cohort(128, 4, "train"), "val": cohort(64, 5, "val"), "test": cohort(32, 6, "test")}
    monkeypatch.setattr(classifier_module, "load_task_splits", lambda ingest, task: cohorts)
    config = tiny_config(epochs=2).model_copy(update={"tracking": tiny_config().tracking.model_copy(
        update={"enabled": True})})
    out = tmp_path / "classifier" / "effusion"
    metrics = train_classifier_run("unused-ingest-dir", out, config)

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val_auroc"] == pytest.approx(metrics["val_auroc"]) and len(saved["history"]) == 2
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["study_id", "split", "label", "p"]
    assert len(predictions) == 224 and set(predictions["split"]) == {"train", "val", "test"}
    model = load_classifier(out / "model.safetensors")
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "effusion" and meta["input_size"] == [SIZE, SIZE]
    val = predictions[predictions["split"] == "val"]
    assert torch.allclose(predict_proba(model, cohorts["val"].images), torch.tensor(val["p"].to_numpy()).float(),
                          atol=1e-5)
    assert (out / "config.resolved.yaml").is_file() and (out / "mlflow.db").is_file()

    mtime = (out / "metrics.json").stat().st_mtime_ns
    train_classifier_run("unused-ingest-dir", out, config)
    assert (out / "metrics.json").stat().st_mtime_ns == mtime


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'age'"):
        train_classifier_run(tmp_path, tmp_path / "out", tiny_config().model_copy(update={"task": "age"}))


DIST_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_classifier import square_images, tiny_config
from pipeline.runtime.distributed import init_distributed, shutdown_distributed
from pipeline.training.classifier import fit_classifier

context = init_distributed("cpu")
x, y = square_images(96, 2)
vx, vy = square_images(32, 3)
result = fit_classifier(x, y, vx, vy, tiny_config(epochs=2))
torch.save({{"model": result.model.state_dict(), "history": result.history}}, {out!r} + f"/rank{{context.rank}}.pt")
shutdown_distributed()
"""


@pytest.mark.dist
@pytest.mark.slow
def test_two_gloo_ranks_train_one_model(tmp_path):
    """DistributedSampler shards + DDP gradient averaging: both ranks end with the same weights and the
    same (all-reduced) metrics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "classifier_dist.py"
    script.write_text(DIST_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", str(script)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, value in rank0["model"].items():
        assert torch.allclose(value, rank1["model"][name], atol=1e-6), name
    assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 2


def test_shipped_yaml_equals_the_code_defaults():
    """Function-API callers (retrain-on-simplified, baselines) get what the command gets."""
    from pipeline.config import default_config_path

    assert load_config(ClassifyConfig, default_config_path("classify")) == ClassifyConfig()


def test_time_cap_is_opt_in_and_recorded():
    x, y = square_images(64, 7)
    capped = fit_classifier(x, y, x, y, tiny_config(epochs=5, max_minutes=0))
    assert len(capped.history) == 1 and capped.stopped_epoch == 1
    assert TrainConfig().max_minutes is None
    assert fit_classifier(x, y, x, y, tiny_config(epochs=2)).stopped_epoch == 2
