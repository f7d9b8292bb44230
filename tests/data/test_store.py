"""CohortStore and StoredImages: layout, extension, read order, shard boundaries, errors, processes."""

from __future__ import annotations

import json
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.store import CohortStore, StoredImages, is_store, shard_name

H, W = 6, 5


def ids(n: int, prefix: str = "std") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (n, H, W), dtype=np.uint8)  # never all-zero


def filled(root, n: int, shard_rows: int = 4, seed: int = 0) -> tuple[CohortStore, np.ndarray]:
    """A store of ``n`` written slots (slot i holds ``pixels[i]``)."""
    store = CohortStore.create(root, ids(n), (H, W), shard_rows=shard_rows)
    pixels = images(n, seed)
    for slot, image in enumerate(pixels):
        store.write(slot, image)
    return store, pixels


def write_slots(store: CohortStore, slots: list[int], pixels: np.ndarray) -> int:
    for slot, image in zip(slots, pixels):
        store.write(slot, image)
    return len(slots)


# --- create / extend --------------------------------------------------------------------------


def test_create_lays_out_sparse_npy_shards_and_an_index(tmp_path):
    store = CohortStore.create(tmp_path / "s", ids(10), (H, W), shard_rows=4)
    assert is_store(tmp_path / "s") and len(store) == 10 and store.image_shape == (H, W)
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*.npy")) == [shard_name(i) for i in range(3)]
    index = pd.read_parquet(tmp_path / "s" / "index.parquet")
    assert index.study_id.tolist() == ids(10)
    assert index.shard.tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert index.row.tolist() == [0, 1, 2, 3] * 2 + [0, 1]
    meta = json.loads((tmp_path / "s" / "store.json").read_text())
    assert meta == {"size": [H, W], "shard_rows": 4, "count": 10}
    shard = np.load(tmp_path / "s" / shard_name(2), mmap_mode="r")  # plain numpy can read a shard
    assert shard.shape == (4, H, W) and shard.dtype == np.uint8 and not shard.any()  # unwritten: zeros
    assert store.slot("std-0005") == 5 and store.slots(["std-0009", "std-0000"]).tolist() == [9, 0]
    with pytest.raises(KeyError, match="no slot"):
        store.slot("std-9999")


def test_square_size_and_refusals(tmp_path):
    assert CohortStore.create(tmp_path / "sq", ids(2), 8).image_shape == (8, 8)
    with pytest.raises(ValueError, match="unique"):
        CohortStore.create(tmp_path / "dup", ["std-a", "std-a"], 8)
    with pytest.raises(ValueError, match="8x8 images, asked for 16x16"):
        CohortStore.create(tmp_path / "sq", ids(2), 16)
    with pytest.raises(FileNotFoundError, match="not a cohort store"):
        CohortStore.open(tmp_path / "nowhere")


def test_extend_keeps_slots_and_pixels_and_adds_shards(tmp_path):
    store, pixels = filled(tmp_path / "s", 5, shard_rows=4)
    same = CohortStore.create(tmp_path / "s", ids(5)[::-1], (H, W))  # known ids, any order: unchanged
    assert same.study_ids == ids(5)
    extended = CohortStore.create(tmp_path / "s", ids(3) + ids(6, "new"), (H, W), shard_rows=99)
    assert extended.shard_rows == 4  # the existing layout wins
    assert extended.study_ids == ids(5) + ids(6, "new") and len(list((tmp_path / "s").glob("shard-*"))) == 3
    np.testing.assert_array_equal(extended.read(np.arange(5)), pixels)
    assert not extended.read(np.arange(5, 11)).any()
    extended.write(10, pixels[0])
    np.testing.assert_array_equal(CohortStore.open(tmp_path / "s").read([10])[0], pixels[0])


# --- read / write -----------------------------------------------------------------------------


def test_read_returns_the_requested_order_across_shard_boundaries(tmp_path):
    store, pixels = filled(tmp_path / "s", 11, shard_rows=4)
    for order in ([3, 4, 5, 6, 7, 8], [10, 0, 7, 7, 3, 4], [9, 8, 2, 1], list(range(11))[::-1], [4]):
        np.testing.assert_array_equal(store.read(order), pixels[order], err_msg=str(order))
    assert store.read([]).shape == (0, H, W)
    for shard in range(3):  # every row landed in its own shard file at its own row
        on_disk = np.load(tmp_path / "s" / shard_name(shard))
        rows = pixels[shard * 4: shard * 4 + 4]
        np.testing.assert_array_equal(on_disk[: len(rows)], rows)


def test_write_refuses_a_wrong_shape_and_overwrites_in_place(tmp_path):
    store, pixels = filled(tmp_path / "s", 3)
    with pytest.raises(ValueError, match="does not fit"):
        store.write(0, np.zeros((W, H), dtype=np.uint8))
    store.write(1, pixels[2])
    np.testing.assert_array_equal(store.read([0, 1, 2]), pixels[[0, 2, 2]])


def test_a_truncated_shard_is_a_short_read_error(tmp_path):
    store, _ = filled(tmp_path / "s", 8, shard_rows=4)
    path = tmp_path / "s" / shard_name(1)
    path.write_bytes(path.read_bytes()[: -(H * W // 2)])  # the last row loses half its bytes
    reopened = CohortStore.open(tmp_path / "s")
    reopened.read([4, 5, 6])  # intact rows still read
    with pytest.raises(OSError, match="short read"):
        reopened.read([6, 7])


# --- processes --------------------------------------------------------------------------------


def test_pickles_as_its_path(tmp_path):
    store, pixels = filled(tmp_path / "s", 6)
    store.read([0])  # opens a descriptor, which must not travel
    blob = pickle.dumps(store)
    assert len(blob) < 300
    clone = pickle.loads(blob)
    assert clone.root == store.root and clone.study_ids == store.study_ids
    np.testing.assert_array_equal(clone.read(np.arange(6)), pixels)


def test_worker_processes_write_their_own_slots(tmp_path):
    store = CohortStore.create(tmp_path / "s", ids(12), (H, W), shard_rows=5)
    store.read([0])  # the parent holds a descriptor before the fork
    pixels = images(12, seed=3)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = [list(range(0, 12, 2)), list(range(1, 12, 2))]  # interleaved: both write every shard
        written = list(pool.map(write_slots, [store, store], parts, [pixels[p] for p in parts]))
    assert written == [6, 6]
    np.testing.assert_array_equal(store.read(np.arange(12)), pixels)


# --- StoredImages -----------------------------------------------------------------------------


def test_stored_images_index_like_an_image_tensor(tmp_path):
    store, pixels = filled(tmp_path / "s", 9, shard_rows=4)
    view = StoredImages(store, [8, 1, 4, 6, 2])  # positions 0..4 -> these slots
    expected = torch.from_numpy(pixels[[8, 1, 4, 6, 2]])[:, None]
    assert len(view) == 5 and view.shape == (5, 1, H, W) and view.size(0) == 5 and view.size() == view.shape
    assert view.dtype == torch.uint8
    assert torch.equal(view[0], expected[0]) and view[0].shape == (1, H, W)
    assert torch.equal(view[np.int64(-1)], expected[-1])
    assert torch.equal(view[1:4], expected[1:4]) and torch.equal(view[::2], expected[::2])
    assert torch.equal(view[[3, 0, 3]], expected[[3, 0, 3]])
    assert torch.equal(view[np.array([4, 2])], expected[[4, 2]])
    assert torch.equal(view[torch.tensor([2, 1])], expected[[2, 1]])
    assert torch.equal(view[np.array([True, False, True, False, False])], expected[[0, 2]])
    assert torch.equal(view.load(), expected)
    with pytest.raises(TypeError, match="cannot be indexed"):
        view[0, 0]
    sub = view.subset([4, 0])
    assert sub.slots.tolist() == [2, 8] and torch.equal(sub.load(), expected[[4, 0]])
    batches = list(view.batches(2, start=1))
    assert [positions.tolist() for positions, _ in batches] == [[1, 2], [3, 4]]
    assert torch.equal(torch.cat([batch for _, batch in batches]), expected[1:])
    assert len(StoredImages(store, [])) == 0 and StoredImages(store, []).load().shape == (0, 1, H, W)
