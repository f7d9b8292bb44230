import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_prior_train import TINY

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_cli(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    """DDP averages per-rank mean gradients; with equal shards that equals the global-batch mean,
    and each rank builds exactly its shard of the same images.

    Tolerance: gradients agree to float32 reduction order (~1e-8), but Adamax turns a gradient that
    is zero in exact arithmetic (e.g. coupling shift biases right after ActNorm's zero-mean init)
    into a ±lr step whose sign is float noise. So: all but <2% of the weights agree to 1e-5, none
    differs by more than 2·lr·steps, and the validation bpd agrees to 1e-3."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "max_steps": 4}}))
    common = ["prior", "train", "--config", str(config)]
    run_cli([sys.executable, "-m", "pipeline.cli", *common, "--out", str(tmp_path / "single")], tmp_path)
    run_cli([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "pipeline.cli", *common,
             "--out", str(tmp_path / "ddp")], tmp_path)
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert single["step"] == ddp["step"] == 4
    diff = torch.cat([(single["models"]["glow"][k].float() - v.float()).abs().flatten()
                      for k, v in ddp["models"]["glow"].items()])
    assert (diff > 1e-5).float().mean() < 0.02
    assert diff.max() <= 2 * 1e-3 * 4 + 1e-6
    assert abs(single["extra"]["best_val_bpd"] - ddp["extra"]["best_val_bpd"]) < 1e-3
