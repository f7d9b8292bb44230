"""Cohort store: working images in a few large ``uint8`` ``.npy`` shards plus an index table.

Layout of a store folder (``<ingest>/store/`` for an ingest folder, ``simplified/`` for outputs)::

    shard-00000.npy   uint8 (shard_rows, H, W), a plain .npy file (np.load(..., mmap_mode="r") opens it)
    shard-00001.npy   ...
    index.parquet     study_id, shard, row        (one row per slot, in slot order)
    store.json        {"size": [H, W], "shard_rows": N, "count": slots}

Why this shape (and not one ``.npy`` per study, zarr or WebDataset): at MIMIC scale (377k studies)
one file per study means 377k inodes in a folder and a syscall storm per epoch; zarr adds a
dependency and chunk codecs we do not need for uint8 pixels; tar shards stream sequentially but
training samples randomly. A preallocated ``.npy`` per shard is random-access, readable by plain
numpy anywhere, and each slot has a fixed byte offset, so decode processes write their own rows in
place (``os.pwrite``) without shipping pixels back to the parent.

Reads use ``os.pread`` rather than a long-lived ``np.memmap``: pages touched through a mapping count
in the process's resident set, so an epoch over a memory-mapped 100k-study store would grow RSS by
the whole store; ``pread`` goes through the shared page cache (just as fast once warm) and leaves
RSS flat in cohort size.

Which slots hold valid pixels is not the store's business: the writer's status table (ingest's
``status.csv``) is the commit log. A slot becomes valid only after its row is written, and a status
row is appended only after that, so a killed writer never leaves a slot that a resumed run trusts.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.runtime.atomic import atomic_write_bytes, atomic_write_text

INDEX_NAME = "index.parquet"
META_NAME = "store.json"
DEFAULT_SHARD_ROWS = 8192  # 32 MiB per shard at 64², 128 MiB at 128²


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


def _npy_header(rows: int, height: int, width: int) -> bytes:
    """The exact header ``np.save`` writes for a C-ordered uint8 (rows, H, W) array."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|u1", "fortran_order": False, "shape": (rows, height, width)}
    )
    return buffer.getvalue()


def is_store(path: str | Path) -> bool:
    path = Path(path)
    return (path / META_NAME).is_file() and (path / INDEX_NAME).is_file()


class CohortStore:
    """Random-access ``uint8`` images keyed by ``study_id``; safe to share across processes.

    Open with :meth:`create` (writers) or :meth:`open` (readers). Objects pickle as their folder
    path, so DataLoader workers and decode processes reopen their own file descriptors.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not is_store(self.root):
            raise FileNotFoundError(f"{self.root}: not a cohort store (no {META_NAME} / {INDEX_NAME})")
        meta = json.loads((self.root / META_NAME).read_text())
        self.height, self.width = (int(v) for v in meta["size"])
        self.shard_rows = int(meta["shard_rows"])
        index = pd.read_parquet(self.root / INDEX_NAME, columns=["study_id"])
        self.study_ids: list[str] = index["study_id"].astype(str).tolist()
        self._row_of: dict[str, int] | None = None
        self._header = len(_npy_header(self.shard_rows, self.height, self.width))
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> CohortStore:
        return cls(root)

    @classmethod
    def create(
        cls,
        root: str | Path,
        study_ids: Sequence[str],
        size: tuple[int, int] | int,
        shard_rows: int = DEFAULT_SHARD_ROWS,
    ) -> CohortStore:
        """A store with one slot per ``study_ids`` entry; an existing store gains slots for new ids.

        Shard files are preallocated sparse (no disk is used until rows are written). An existing
        store must have the same image size; its slots keep their rows, so resuming is exact.
        """
        root = Path(root)
        height, width = (size, size) if isinstance(size, int) else size
        ids = [str(s) for s in study_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{root}: study ids must be unique to create a store")
        existing: list[str] = []
        if is_store(root):
            store = cls(root)
            if (store.height, store.width) != (height, width):
                raise ValueError(f"{root}: store holds {store.height}x{store.width} images, asked for "
                                 f"{height}x{width}; use a new output folder")
            shard_rows, existing = store.shard_rows, store.study_ids
        known = set(existing)
        slots = existing + [s for s in ids if s not in known]
        if existing and len(slots) == len(existing):
            return cls(root)
        root.mkdir(parents=True, exist_ok=True)
        n_shards = max(1, -(-len(slots) // shard_rows))
        header = _npy_header(shard_rows, height, width)
        for shard in range(n_shards):
            path = root / shard_name(shard)
            if path.is_file():
                continue
            tmp = path.with_suffix(".npy.tmp")
            with open(tmp, "wb") as fh:
                fh.write(header)
                fh.truncate(len(header) + shard_rows * height * width)  # sparse: zeros until written
            os.replace(tmp, path)
        rows = np.arange(len(slots))
        index = pd.DataFrame({"study_id": slots, "shard": rows // shard_rows, "row": rows % shard_rows})
        import io

        buffer = io.BytesIO()
        index.to_parquet(buffer, index=False)
        atomic_write_text(root / META_NAME, json.dumps(
            {"size": [height, width], "shard_rows": shard_rows, "count": len(slots)}))
        atomic_write_bytes(root / INDEX_NAME, buffer.getvalue())  # last: the store exists once this does
        return cls(root)

    # --- pickling: reopen descriptors in the receiving process ------------------------------

    def __getstate__(self) -> dict:
        return {"root": str(self.root)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    # --- addressing -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.study_ids)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def slot(self, study_id: str) -> int:
        if self._row_of is None:
            self._row_of = {sid: i for i, sid in enumerate(self.study_ids)}
        try:
            return self._row_of[study_id]
        except KeyError:
            raise KeyError(f"{self.root}: study {study_id!r} has no slot in this store") from None

    def slots(self, study_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self.slot(s) for s in study_ids), dtype=np.int64, count=len(study_ids))

    def _fd(self, shard: int, writable: bool = False) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; reopen ours
            self._fds, self._pid = {}, os.getpid()
        key = shard * 2 + int(writable)
        fd = self._fds.get(key)
        if fd is None:
            flags = os.O_RDWR if writable else os.O_RDONLY
            fd = os.open(self.root / shard_name(shard), flags)
            self._fds[key] = fd
        return fd

    def _offset(self, slot: int) -> tuple[int, int]:
        shard, row = divmod(int(slot), self.shard_rows)
        return shard, self._header + row * self.height * self.width

    # --- I/O ---------------------------------------------------------------------------------------

    def write(self, slot: int, image: np.ndarray) -> None:
        """Write one image into its slot (any process may write any slot)."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.shape != (self.height, self.width):
            raise ValueError(f"{self.root}: image of shape {image.shape} does not fit slots of "
                             f"{(self.height, self.width)}")
        shard, offset = self._offset(slot)
        os.pwrite(self._fd(shard, writable=True), image.tobytes(), offset)

    def write_block(self, start_slot: int, images: np.ndarray) -> None:
        """Write ``uint8 (n, H, W)`` into slots ``start_slot .. start_slot + n - 1``.

        For bulk writers (the scale cohort): one ``pwrite`` per shard the block touches instead of
        one per image.
        """
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 3 or images.shape[1:] != (self.height, self.width):
            raise ValueError(f"{self.root}: block of shape {images.shape} does not fit slots of "
                             f"{(self.height, self.width)}")
        start_slot = int(start_slot)
        if start_slot < 0 or start_slot + len(images) > len(self):
            raise IndexError(f"{self.root}: slots {start_slot}..{start_slot + len(images) - 1} "
                             f"outside the store's {len(self)} slots")
        done = 0
        while done < len(images):
            shard, offset = self._offset(start_slot + done)
            rows = min(len(images) - done, self.shard_rows - (start_slot + done) % self.shard_rows)
            data = memoryview(images[done:done + rows]).cast("B")
            while len(data):  # pwrite may write less than asked for large buffers
                written = os.pwrite(self._fd(shard, writable=True), data, offset)
                data, offset = data[written:], offset + written
            done += rows

    def read(self, slots: Sequence[int] | np.ndarray) -> np.ndarray:
        """``uint8 (n, H, W)`` for the given slots, in the given order; adjacent slots are read at once."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)
        pixels = self.height * self.width
        out = np.empty((len(slots), self.height, self.width), dtype=np.uint8)
        if len(slots) == 0:
            return out
        order = np.argsort(slots, kind="stable")
        sorted_slots = slots[order]
        flat = out.reshape(len(slots), pixels)
        start = 0
        while start < len(sorted_slots):  # one pread per run of consecutive slots within a shard
            end = start + 1
            shard = sorted_slots[start] // self.shard_rows
            while (end < len(sorted_slots) and sorted_slots[end] == sorted_slots[end - 1] + 1
                   and sorted_slots[end] // self.shard_rows == shard):
                end += 1
            _, offset = self._offset(sorted_slots[start])
            data = os.pread(self._fd(shard), (end - start) * pixels, offset)
            if len(data) != (end - start) * pixels:
                raise OSError(f"{self.root / shard_name(shard)}: short read (file truncated?)")
            flat[order[start:end]] = np.frombuffer(data, dtype=np.uint8).reshape(end - start, pixels)
            start = end
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self) -> None:  # pragma: no cover - best effort
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


def write_images(root: str | Path, study_ids: Sequence[str], images: np.ndarray) -> CohortStore:
    """A store at ``root`` holding ``images`` (``uint8 (N, H, W)`` or ``(N, 1, H, W)``) by study id."""
    array = np.asarray(images, dtype=np.uint8)
    array = array.reshape(len(study_ids), *array.shape[-2:])
    store = CohortStore.create(root, list(study_ids), tuple(array.shape[-2:]))
    for slot, image in zip(store.slots(list(study_ids)), array):
        store.write(int(slot), image)
    return store


def image_loader(root: str | Path) -> Callable[[str], np.ndarray]:
    """``study_id -> uint8 (H, W)`` from the store at ``root``, opened at the first call (a run whose
    outputs all exist never needs it); errors name the store and the study."""
    store: CohortStore | None = None

    def load(study_id: str) -> np.ndarray:
        nonlocal store
        if store is None:
            store = CohortStore.open(root)
        return store.read([store.slot(study_id)])[0]

    return load


class StoredImages:
    """A lazy ``uint8 (N, 1, H, W)`` view of some slots of a store; indexing reads from disk.

    Quacks like the image tensor the training code used to hold (``len``, ``shape``, ``[i]``,
    ``[a:b]``, ``[index_tensor]``), so batch-wise code streams without change, while nothing holds
    the whole cohort in memory. :meth:`load` materialises it on purpose (small cohorts, tests).
    """

    dtype = torch.uint8

    def __init__(self, store: CohortStore, slots: np.ndarray) -> None:
        self.store = store
        self.slots = np.asarray(slots, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.slots), 1, self.store.height, self.store.width))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return torch.from_numpy(self.store.read(self.slots[[key]]))  # (1, H, W)
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, slice) or isinstance(key, (list, np.ndarray)):
            return torch.from_numpy(self.store.read(self.slots[key]))[:, None]
        raise TypeError(f"StoredImages cannot be indexed with {type(key).__name__}")

    def subset(self, positions: Sequence[int] | np.ndarray) -> StoredImages:
        return StoredImages(self.store, self.slots[np.asarray(positions, dtype=np.int64)])

    def load(self) -> torch.Tensor:
        return self[slice(None)]

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        """``(positions, uint8 batch)`` over ``[start, stop)`` in order."""
        stop = len(self) if stop is None else stop
        for begin in range(start, stop, batch_size):
            end = min(stop, begin + batch_size)
            yield np.arange(begin, end), self[begin:end]
