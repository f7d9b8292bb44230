"""``simplebits apply`` under torchrun with two gloo ranks equals a single-process run, also resumed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distributed_helpers import run_cli, run_torchrun
from pipeline.data.ingest import load_cohort
from pipeline.inference import VALUE_COLUMNS, part_files, read_part_rows, read_predictions, simplified_images
from test_inference import SIZE, make_ingest_dir, save_models

pytestmark = [pytest.mark.dist, pytest.mark.slow]

# 13 studies in batches of 3: one process takes 5 batches; two ranks take shares of 7 and 6 studies,
# 3 and 2 batches, so the ranks run unequal numbers of batches (and the count does not divide by 2)
NUM_STUDIES = 13
BATCH_SIZE = 3


def apply_args(models: dict[str, Path], ingest: Path, out: Path, *extra: str) -> list[str]:
    return ["apply", "--ingest", str(ingest), "--simplifier", str(models["simplifier"]),
            "--classifier", str(models["classifier"]), "--prior", str(models["prior"]), "--out", str(out),
            "--batch-size", str(BATCH_SIZE), "--num-workers", "0", "--device", "cpu", "--no-mlflow", *extra]


def assert_same_outputs(out: Path, reference: Path) -> None:
    """predictions.csv equal (values to 1e-5: per-study results do not depend on the batch but for
    float summation order) and identical simplified images."""
    single = read_predictions(reference / "predictions.csv")
    other = read_predictions(out / "predictions.csv")
    assert other.study_id.tolist() == single.study_id.tolist()
    assert len(single) == len(set(single.study_id))
    for column in ("split", "sex", "effusion"):
        assert other[column].astype(str).tolist() == single[column].astype(str).tolist()
    for column in VALUE_COLUMNS:
        # bits saved is a bpd difference times D: its tolerance scales with D
        atol = 1e-5 * (SIZE * SIZE if column == "bits_saved" else 1)
        np.testing.assert_allclose(other[column].to_numpy(), single[column].to_numpy(), rtol=0, atol=atol,
                                   err_msg=column)
    ids = single.study_id.tolist()
    assert torch.equal(simplified_images(out, ids).load(), simplified_images(reference, ids).load())


def rows_per_part(out: Path) -> list[list[str]]:
    return [[row[0] for row in read_part_rows(p)] for p in part_files(out)]


def test_two_gloo_ranks_match_one_process_and_share_the_work(tmp_path):
    ingest, models = make_ingest_dir(tmp_path, num_studies=NUM_STUDIES), save_models(tmp_path)
    run_cli(apply_args(models, ingest, tmp_path / "single"), tmp_path)
    run_torchrun(apply_args(models, ingest, tmp_path / "ddp"), tmp_path, nproc_per_node=2)
    assert_same_outputs(tmp_path / "ddp", tmp_path / "single")

    # every study was processed exactly once, by the rank whose contiguous share holds it
    assert [p.name for p in part_files(tmp_path / "ddp")] == ["part-0.csv", "part-1.csv"]
    order = load_cohort(ingest).study_ids
    assert rows_per_part(tmp_path / "ddp") == [order[:7], order[7:]]


def test_two_ranks_resume_what_one_process_began(tmp_path):
    """One process did the test split (6 studies); two ranks then share only the rest (7 val studies:
    4 and 3, in 2 and 1 batches)."""
    ingest, models = make_ingest_dir(tmp_path, num_studies=NUM_STUDIES), save_models(tmp_path)
    run_cli(apply_args(models, ingest, tmp_path / "single"), tmp_path)
    out = tmp_path / "resumed"
    run_cli(apply_args(models, ingest, out, "--split", "test"), tmp_path)
    run_torchrun(apply_args(models, ingest, out), tmp_path, nproc_per_node=2)
    assert_same_outputs(out, tmp_path / "single")

    test = load_cohort(ingest, split="test").study_ids
    rest = [sid for sid in load_cohort(ingest).study_ids if sid not in set(test)]
    assert len(rest) == 7
    assert rows_per_part(out) == [test + rest[:4], rest[4:]]
