"""The shared training engine: equal steps per rank, exact resume (also mid-epoch and after SIGKILL),
opt-in time cap, and DDP that matches one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import pipeline.training.engine as engine_module
from pipeline.data.dataset import CohortDataset
from pipeline.training.engine import Engine, StepContext

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from cohort_fixtures import write_square_ingest  # noqa: E402


def toy_run(tmp_path: Path | None, epochs: int = 3, every: int | None = None, **engine) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = (images.float().mean((1, 2, 3)) > 127).long()
    run = Engine("toy", epochs=epochs, seed=3, device=torch.device("cpu"), models={"model": model},
                 optimizers={"optimizer": optimizer}, log_every_steps=None, checkpoint_every_steps=every,
                 checkpoint_path=None if tmp_path is None else tmp_path / "checkpoint.pt", **engine)

    def step(batch, ctx: StepContext):
        x, y, positions = batch
        noise = torch.randn(x.shape, generator=ctx.generator)  # the rank's stream
        x = x.float() / 255 + 0.01 * noise + 0.01 * ctx.uniform(positions, 1).view(-1, 1, 1, 1)
        loss = nn.functional.cross_entropy(model(x), y)  # dropout: the global stream
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    result = run.fit(step, dataset=CohortDataset(images, labels), batch_size=8)
    return model, result.history


def test_kill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    straight, history = toy_run(None)
    assert len(history) == 3  # 50 studies, batch 8: 6 steps per epoch, the last 2 studies dropped
    saves = iter(range(100))
    real_save = Engine._save

    def save_then_die(self, epoch, step, *rest):  # dies right after a mid-epoch checkpoint of epoch 2
        real_save(self, epoch, step, *rest)
        if step and next(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path, every=2)
    monkeypatch.undo()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert (state["step"], state["extra"]["step_in_epoch"]) == (1, 2)  # mid-epoch: epoch 2, after step 2
    resumed, resumed_history = toy_run(tmp_path, every=2)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert resumed_history == history  # the epoch means too, although epoch 2 was split over two processes


def test_time_cap_is_opt_in_and_recorded(tmp_path):
    _, history = toy_run(None, epochs=3, max_minutes=0)
    assert len(history) == 1
    assert Engine.__dataclass_fields__["max_minutes"].default is None


def test_batch_size_must_split_over_ranks():
    run = Engine("toy", epochs=1, seed=0, device=torch.device("cpu"), models={})
    run.world_size = 2
    with pytest.raises(ValueError, match="batch size 7 must be divisible by the 2 ranks"):
        run._loader(CohortDataset(torch.zeros(20, 1, 4, 4, dtype=torch.uint8)), 7, 0, 0)


@pytest.mark.parametrize("n", [50, 51, 97])
def test_every_rank_takes_the_same_number_of_steps(n):
    """The gloo crash at step 9 of 9: 17 batches sharded 9/8. Ranks must never differ in steps."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    counts, seen = [], []
    for rank in (0, 1):
        run = Engine("toy", epochs=1, seed=0, device=torch.device("cpu"), models={})
        run.rank, run.world_size = rank, 2
        loader, steps = run._loader(CohortDataset(images), 8, epoch=0, skip=0)
        batches = [b[2].tolist() for b in loader]
        counts.append((steps, len(batches)))
        seen += [i for b in batches for i in b]
    assert counts[0] == counts[1] == ((n // 2) // 4, (n // 2) // 4)
    assert len(seen) == len(set(seen))  # no study twice within an epoch


def cli(*args: str, torchrun: int = 0, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
                if torchrun else [sys.executable])
    done = subprocess.run([*launcher, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


CLASSIFY = ["classify", "train", "--task", "effusion", "--set", "device=cpu", "--set", "model.name=nf_cnn",
            "--set", "model.kwargs={}", "--set", "train.epochs=2", "--set", "train.batch_size=8", "--set", "tracking.enabled=false"]


@pytest.mark.dist
@pytest.mark.slow
def test_classify_train_under_torchrun_matches_one_process(tmp_path):
    """37 training studies, global batch 8: 4 steps for one process; 18 per rank -> 2 x 4 per rank.

    Same global batches (the DistributedSampler interleaves one permutation), per-sample augmentation
    and DDP's gradient mean: only float summation order differs, hence the 1e-4 tolerance."""
    ingest = write_square_ingest(tmp_path / "ingest", {"train": 37, "val": 21, "test": 9}, size=16)
    cli(*CLASSIFY, "--ingest", str(ingest), "--out", str(tmp_path / "one"))
    cli(*CLASSIFY, "--ingest", str(ingest), "--out", str(tmp_path / "two"), torchrun=2)
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert len(one["history"]) == len(two["history"]) == 2
    for a, b in zip(one["history"], two["history"]):
        for key in ("train_ce", "val_auroc", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    import pandas as pd

    p_one = pd.read_csv(tmp_path / "one" / "predictions.csv")
    p_two = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert p_one.study_id.tolist() == p_two.study_id.tolist() and len(p_one) == 67
    assert (p_one.p - p_two.p).abs().max() < 1e-4


KILLER = """
import os, signal, sys
import pipeline.training.engine as engine
real_save = engine.Engine._save
def save_then_sigkill(self, epoch, step, *rest):
    real_save(self, epoch, step, *rest)
    if epoch == 1 and step == 2:  # mid-epoch 2, right after its checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
engine.Engine._save = save_then_sigkill
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_model(tmp_path):
    ingest = write_square_ingest(tmp_path / "ingest", {"train": 40, "val": 16, "test": 4}, size=16)
    args = [*CLASSIFY, "--ingest", str(ingest), "--set", "train.checkpoint_every_steps=2"]
    cli(*args, "--out", str(tmp_path / "straight"))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = subprocess.run([sys.executable, str(killer), *args, "--out", str(tmp_path / "killed")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    cli(*args, "--out", str(tmp_path / "killed"))
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
