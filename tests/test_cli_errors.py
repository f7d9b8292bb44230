"""A user's mistake ends in one line naming the file or value, with exit status 2; no traceback.

Each case runs ``python -m pipeline.cli`` as a user would (a fresh process, the real exit status
and stderr); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cohort_fixtures import write_square_ingest
from pipeline.errors import USER_ERROR_EXIT
from pipeline.models.glow import Glow
from pipeline.prior import save_prior

pytestmark = pytest.mark.slow  # one interpreter start (torch, MLflow imports) per case

PREFIX = "simplebits: error:"


def simplebits(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def labelled_ingest(root: Path) -> str:
    write_square_ingest(root / "ingest", {"train": 8, "val": 4, "test": 4})
    return "ingest"


def ingest_without_val(root: Path) -> str:
    write_square_ingest(root / "no-val", {"train": 8, "test": 4})
    return "no-val"


def foreign_weights(root: Path) -> str:
    """A plain state_dict of another network than the one named (a DenseNet's first conv)."""
    torch.save({"features.conv0.weight": torch.zeros(3, 1, 3, 3)}, root / "foreign.pt")
    return "foreign.pt"


def mismatched_prior(root: Path) -> str:
    """A Glow whose side-car JSON describes wider layers than its weights hold."""
    path = save_prior(Glow(in_channels=1, levels=1, steps_per_level=1, hidden_channels=4), root / "prior")
    sidecar = path.with_suffix(".json")
    sidecar.write_text(sidecar.read_text().replace('"hidden_channels": 4', '"hidden_channels": 8'))
    return path.name


# case -> (builds its inputs in the working folder and returns the command, what the message must name)
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "missing config file": (
        lambda root: ["classify", "train", "--ingest", "ingest", "--out", "out",
                      "--config", "configs/clasify.yaml"],
        "configs/clasify.yaml"),
    "missing ingest folder": (
        lambda root: ["classify", "train", "--ingest", "no-such-ingest", "--out", "out"],
        "no-such-ingest"),
    "missing manifest": (
        lambda root: ["ingest", "--manifest", "no-such-manifest.csv", "--out", "out"],
        "no-such-manifest.csv"),
    "missing prior weights": (
        lambda root: ["prior", "bpd", "--prior", "no-such-prior.safetensors", "--ingest", "ingest",
                      "--out", "out"],
        "no-such-prior.safetensors"),
    "unknown task": (
        lambda root: ["classify", "train", "--ingest", "ingest", "--out", "out", "--set", "task=efusion"],
        "'efusion'"),
    "unlabeled split": (
        lambda root: ["classify", "train", "--ingest", ingest_without_val(root), "--out", "out",
                      "--task", "effusion"],
        "val 0"),
    "classifier weights that do not fit": (
        lambda root: ["simplify", "audit", "--ingest", labelled_ingest(root), "--out", "out",
                      "--classifier", foreign_weights(root), "--classifier-arch", "nf_wrn_16_2"],
        "foreign.pt"),
    "prior weights that do not fit": (
        lambda root: ["prior", "bpd", "--prior", mismatched_prior(root), "--ingest", "ingest", "--out", "o"],
        "prior.safetensors"),
}


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_and_exit_status_2(case, tmp_path):
    build, named = CASES[case]
    done = simplebits(build(tmp_path), tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == USER_ERROR_EXIT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in lines if line.startswith(PREFIX)]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr[-3000:]
    assert named in errors[0]


def test_debug_shows_the_traceback(tmp_path):
    done = simplebits(["--debug", "classify", "train", "--ingest", "no-such-ingest", "--out", "o"], tmp_path)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "no-such-ingest" in done.stderr
    assert PREFIX not in done.stderr
