"""``simplebits simplify audit`` under torchrun: two gloo ranks (one node, or two simulated nodes) against
one process with the same global batch.

The training split has 68 studies and the global batch is 4: 17 batches per epoch, an odd number, so
the old per-rank sharding of batches (9 on one rank, 8 on the other, with an all-reduce each step)
would hang or crash here; the engine's sampler gives both ranks 17 steps of 2 studies. Everything
after training runs on both ranks too: the independent classifier and retrain-on-simplified train
data-parallel, every evaluation is sharded and gathered, and both ranks write their simplified images
into the output store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.store import CohortStore
from pipeline.models.classifiers import create_classifier, save_classifier
from pipeline.prior import save_prior
from test_audit import write_distractor_ingest
from toy_tasks import tiny_prior

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SPLITS = {"train": 68, "val": 20, "test": 10}
TIMEOUT_S = 300  # a hang fails the test instead of blocking CI

TINY = [
    "device=cpu", "tracking.enabled=false",
    "simplifier.base_channels=4", "simplifier.levels=2", "simplifier.max_channels=8",
    "train.epochs=2", "train.batch_size=4", "train.eval_batch_size=8", "train.lr=3e-3",
    "audit.lam=2",
    "independent.model.name=nf_cnn", "independent.model.kwargs={widths: [4, 8]}",
    "independent.train.epochs=1", "independent.train.batch_size=4", "independent.train.eval_batch_size=8",
    "evaluate.baselines=[blur]", "evaluate.match_subsample=12", "evaluate.retrain=true",
    "evaluate.retrain_model.name=nf_cnn", "evaluate.retrain_model.kwargs={widths: [4, 8]}",
    "evaluate.retrain_train.epochs=1", "evaluate.retrain_train.batch_size=4",
    "evaluate.retrain_train.eval_batch_size=8",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "pipeline.cli"]


def finish(processes: list[subprocess.Popen]) -> None:
    """Wait for every process (killing all of them if one hangs) and require success."""
    try:
        outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]


def launch(prefix: list[str], args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(prefix + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=cwd)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_dist")
    ingest = write_distractor_ingest(root / "ingest", SPLITS)
    torch.manual_seed(0)
    frozen = create_classifier("nf_cnn", widths=[4, 8]).eval()
    classifier = save_classifier(frozen, root / "frozen.safetensors", "nf_cnn", {"widths": [4, 8]})
    prior = save_prior(tiny_prior(), root / "prior")

    def args(out: str) -> list[str]:
        overrides = [item for value in TINY for item in ("--set", value)]
        return ["simplify", "audit", "--ingest", str(ingest), "--classifier", str(classifier), "--prior",
                str(prior), "--out", str(root / out), *overrides]

    return root, args


@pytest.fixture(scope="module")
def one_node(setup) -> Path:
    """The reference torchrun run: one node, two processes."""
    root, args = setup
    finish([launch(torchrun("--standalone", "--nproc-per-node=2"), args("one_node"), root)])
    return root / "one_node"


def outputs(out: Path) -> dict:
    store = CohortStore.open(out / "simplified")
    predictions = pd.read_csv(out / "predictions.csv")
    return {
        "metrics": json.loads((out / "metrics.json").read_text()),
        "predictions": predictions,
        "baselines": pd.read_csv(out / "baselines.csv"),
        "simplifier": load_file(str(out / "simplifier.safetensors")),
        "simplified": store.read(store.slots(predictions["study_id"].tolist())),
    }


def test_two_ranks_match_one_process_with_the_same_global_batch(setup, one_node):
    """Identical in exact arithmetic: the global batches (the sampler's shuffle, split 2 + 2 over the
    ranks), each sample's augmentation and its input and dequantisation noise (all keyed by sample
    position, not drawn from a rank's stream), the initial weights, the averaged gradient (the mean of
    two rank means of 2 is the mean of 4) and the frozen classifiers. What differs is float rounding:
    the order of the gradient reduction, and convolutions over batches of 2 instead of 4, ~1e-7
    relative per step. Adam normalises each step, so after 34 steps the weights agree to ~1e-7 (bound:
    1e-5), per-study scores and bpd (~18) to ~1e-6 (bound: 1e-4), and a simplified pixel can only
    change where its value sits on a rounding edge (bound: one grey level in under 0.1% of pixels).
    AUROCs, the independent and the retrained classifiers (data-parallel, same batches) match to
    1e-6: a swapped pair of the 20 studies would move them by 0.01."""
    root, args = setup
    finish([launch([sys.executable, "-m", "pipeline.cli"], args("single"), root)])
    single, ddp = outputs(root / "single"), outputs(one_node)

    for key, value in single["simplifier"].items():
        torch.testing.assert_close(ddp["simplifier"][key], value, rtol=0, atol=1e-5, msg=key)
    pixels = np.abs(single["simplified"].astype(int) - ddp["simplified"].astype(int))
    assert pixels.max() <= 1 and (pixels > 0).mean() < 1e-3

    a, b = single["predictions"], ddp["predictions"]
    assert a["study_id"].tolist() == b["study_id"].tolist() and len(a) == SPLITS["val"] + SPLITS["test"]
    for column in ("p_orig", "p_simpl", "bpd_orig", "bpd_simpl", "evidence_distance"):
        np.testing.assert_allclose(b[column], a[column], rtol=0, atol=1e-4, err_msg=column)

    m1, m2 = single["metrics"], ddp["metrics"]
    assert m1["stopped_epoch"] == m2["stopped_epoch"] == 2 and [h["epoch"] for h in m2["history"]] == [1, 2]
    for key in ("val_bpd_orig", "val_bpd_simpl", "test_bpd_simpl", "val_evidence_distance",
                "val_fraction_of_attainable_saving"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5), key
    for key in ("val_auroc_orig", "val_auroc_simpl", "test_auroc_simpl", "independent_auroc_orig",
                "independent_auroc_simpl", "val_retrain_auroc_simpl", "val_retrain_auroc_orig"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
    for h1, h2 in zip(m1["history"], m2["history"]):
        for key in ("train_match", "train_kl", "train_bpd_loss", "train_gate", "val_bpd_simpl"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-5, abs=1e-7), key
    # the matched-bpd baseline: the same strength found on the same subsample of 12
    t1, t2 = single["baselines"], ddp["baselines"]
    assert t1["method"].tolist() == t2["method"].tolist() == ["simplebits-audit", "blur"]
    assert t2["match_sample"][1] == 12 and t2["strength"][1] == pytest.approx(t1["strength"][1], rel=1e-6)
    np.testing.assert_allclose(t2["mean_bpd"], t1["mean_bpd"], rtol=1e-5)


def test_two_nodes_match_one_node(setup, one_node):
    """Two single-process torchrun agents meeting over c10d (as two machines would) against one node
    with two processes: the same ranks draw the same streams and reduce the same two numbers, so the
    outputs are equal."""
    root, args = setup
    port = free_port()
    nodes = [
        launch(torchrun("--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=audit-two-nodes",
                        "--local-addr=127.0.0.1",
                        f"--rdzv-conf=is_host={int(rank == 0)}"), args("two_nodes"), root)
        for rank in (0, 1)
    ]
    finish(nodes)
    two, one = outputs(root / "two_nodes"), outputs(one_node)
    for key, value in two["simplifier"].items():
        assert torch.equal(value, one["simplifier"][key]), key
    assert np.array_equal(two["simplified"], one["simplified"])
    pd.testing.assert_frame_equal(two["predictions"], one["predictions"])
    pd.testing.assert_frame_equal(two["baselines"], one["baselines"])
    assert {k: v for k, v in two["metrics"].items()} == {k: v for k, v in one["metrics"].items()}
