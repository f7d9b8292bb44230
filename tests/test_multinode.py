"""``simplebits apply`` on two torchrun nodes (simulated on loopback) equals one process."""

from __future__ import annotations

import pytest

from distributed_helpers import run_cli, run_nodes
from pipeline.data.ingest import load_cohort
from pipeline.inference import part_files
from test_inference import make_ingest_dir, save_models
from test_inference_dist import NUM_STUDIES, apply_args, assert_same_outputs, rows_per_part

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_two_nodes_match_one_process_and_share_the_work(tmp_path):
    """Two nodes of one process each: 13 studies in shares of 7 and 6 (3 and 2 batches of 3), read by
    a DataLoader worker per rank (the single process reads in-process)."""
    ingest, models = make_ingest_dir(tmp_path, num_studies=NUM_STUDIES), save_models(tmp_path)
    run_cli(apply_args(models, ingest, tmp_path / "single"), tmp_path)
    run_nodes(apply_args(models, ingest, tmp_path / "nodes", "--num-workers", "1"), tmp_path,
              nnodes=2, nproc_per_node=1)
    assert_same_outputs(tmp_path / "nodes", tmp_path / "single")

    # one part per global rank; each rank (whichever node it landed on) did its contiguous share
    assert [p.name for p in part_files(tmp_path / "nodes")] == ["part-0.csv", "part-1.csv"]
    order = load_cohort(ingest).study_ids
    assert rows_per_part(tmp_path / "nodes") == [order[:7], order[7:]]
