"""``simplebits apply`` under torchrun with two gloo ranks equals a single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.ingest import load_cohort
from pipeline.inference import VALUE_COLUMNS, part_files, read_part_rows, read_predictions, simplified_path
from test_inference import SIZE, make_ingest_dir, save_models

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_cli(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_gloo_ranks_match_one_process_and_share_the_work(tmp_path):
    ingest = make_ingest_dir(tmp_path)
    paths = save_models(tmp_path)
    common = ["apply", "--ingest", str(ingest), "--simplifier", str(paths["simplifier"]),
              "--classifier", str(paths["classifier"]), "--prior", str(paths["prior"]),
              "--batch-size", "4", "--device", "cpu", "--no-mlflow"]
    run_cli([sys.executable, "-m", "pipeline.cli", *common, "--out", str(tmp_path / "single")], tmp_path)
    run_cli([str(TORCHRUN), "--standalone", "--nproc-per-node=2", "-m", "pipeline.cli", *common,
             "--out", str(tmp_path / "ddp")], tmp_path)

    single = read_predictions(tmp_path / "single" / "predictions.csv")
    ddp = read_predictions(tmp_path / "ddp" / "predictions.csv")
    assert ddp.study_id.tolist() == single.study_id.tolist()
    assert len(single) == len(set(single.study_id))
    for column in ("split", "sex", "effusion"):
        assert ddp[column].astype(str).tolist() == single[column].astype(str).tolist()
    for column in VALUE_COLUMNS:
        # bits saved is a bpd difference times D: its tolerance scales with D
        atol = 1e-5 * (SIZE * SIZE if column == "bits_saved" else 1)
        np.testing.assert_allclose(ddp[column].to_numpy(), single[column].to_numpy(), rtol=0, atol=atol,
                                   err_msg=column)
    for study_id in single.study_id:
        np.testing.assert_array_equal(np.load(simplified_path(tmp_path / "ddp", study_id)),
                                      np.load(simplified_path(tmp_path / "single", study_id)))

    # every study was processed exactly once, by the rank whose round-robin shard holds it
    parts = part_files(tmp_path / "ddp")
    assert [p.name for p in parts] == ["part-0.csv", "part-1.csv"]
    per_rank = [[row[0] for row in read_part_rows(p)] for p in parts]
    assert sorted(per_rank[0] + per_rank[1]) == single.study_id.tolist()
    manifest_order = load_cohort(ingest).study_ids
    assert [sorted(ids) for ids in per_rank] == [sorted(manifest_order[0::2]), sorted(manifest_order[1::2])]
