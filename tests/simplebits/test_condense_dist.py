"""``simplebits simplify condense`` under torchrun with two gloo ranks equals a single process.

Every rank draws the same global real batch per class and back-propagates only its share; the
real gradients are summed over ranks, so two ranks run the single-process algorithm up to float
reduction order (see pipeline/simplebits/condense.py). The per-class real batch (9) and the
reference networks' batches (50 studies / 16 = 3) are odd, so the ranks' shares are uneven where
they may be (real batches: 5 and 4 studies) and equal where a collective follows each step (the
engine's DDP batches: drop_last).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.data.ingest import write_ingest_folder
from pipeline.prior import save_prior
from test_condense import square_cohort
from toy_tasks import tiny_prior

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TORCHRUN = Path(sys.executable).with_name("torchrun")
N_TRAIN, N_VAL = 50, 15


def run_cli(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def make_ingest_dir(root: Path) -> Path:
    """The square task (32 px) as an ingest folder: the command reads it from the store."""
    cohorts = [square_cohort(N_TRAIN, 0, "train"), square_cohort(N_VAL, 1, "val")]
    frame = pd.concat([c.frame for c in cohorts], ignore_index=True)
    n = len(frame)
    frame = frame.assign(study_id=[f"std-{i:08x}" for i in range(n)],
                         patient_id=[f"pat-{i:08x}" for i in range(n)],
                         image_path=[f"/data/{i}.png" for i in range(n)], view="PA", sex="F", age=50.0,
                         source="demo")
    images = torch.cat([c.images for c in cohorts])
    return write_ingest_folder(root / "ingest", frame, images)


def write_config(root: Path) -> Path:
    config = {
        "task": "effusion", "device": "cpu", "prior": str(save_prior(tiny_prior(), root / "prior")),
        "network": {"width": 8},
        # condensed at 16 px: the 32 px store is area-downsampled batch by batch
        "condense": {"ipc": 1, "iterations": 3, "outer_loop": 2, "inner_loop": 1, "batch_real": 9,
                     "lam": 100.0, "image_size": 16},
        "evaluate": {"networks": 1, "epochs": 10, "full_epochs": 2, "batch_size": 16},
        "tracking": {"enabled": False},
    }
    path = root / "condense.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_gloo_ranks_condense_like_one_process(tmp_path):
    ingest, config = make_ingest_dir(tmp_path), write_config(tmp_path)
    common = ["simplify", "condense", "--ingest", str(ingest), "--config", str(config)]
    run_cli([sys.executable, "-m", "pipeline.cli", *common, "--out", str(tmp_path / "single")], tmp_path)
    run_cli([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "pipeline.cli", *common,
             "--out", str(tmp_path / "ddp")], tmp_path)

    single, ddp = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("single", "ddp"))
    assert single["stopped_iteration"] == ddp["stopped_iteration"] == 3 and not ddp["time_capped"]
    # the synthetic logits: float reduction order only (measured: 4e-7 apart)
    logits = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["models"]["logits"]["logits"]
              for run in ("single", "ddp")]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    images = [np.load(tmp_path / run / "condensed.npy").astype(int) for run in ("single", "ddp")]
    assert images[0].shape == (2, 16, 16)
    # a logit at a rounding boundary may move a pixel by one level (measured: none did)
    assert np.abs(images[0] - images[1]).max() <= 1 and (images[0] == images[1]).mean() >= 0.99
    for a, b in zip(single["history"], ddp["history"]):
        assert a["iteration"] == b["iteration"]
        assert a["match"] == pytest.approx(b["match"], abs=1e-4)
        assert a["bpd"] == pytest.approx(b["bpd"], abs=1e-4)
    # the same condensed set and the same val studies (sharded scoring) give the same bits
    assert ddp["bpd_real"] == pytest.approx(single["bpd_real"], abs=1e-5)
    assert ddp["bpd_condensed"] == pytest.approx(single["bpd_condensed"], abs=1e-3)
    # reference networks: DDP over the same global batches with SGD; at most one val study may flip
    for key in ("condensed_accuracy_mean", "full_accuracy_mean"):
        assert abs(ddp[key] - single[key]) <= 1 / N_VAL + 1e-9, key
    assert ddp["full_auroc_mean"] == pytest.approx(single["full_auroc_mean"], abs=0.05)
