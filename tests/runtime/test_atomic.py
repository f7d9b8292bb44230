import pytest

from pipeline.runtime.atomic import atomic_path, atomic_write_text


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp debris


def test_atomic_write_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "x")
    assert target.read_text() == "x"


def test_atomic_files_get_normal_permissions(tmp_path):
    import os

    target = tmp_path / "weights.bin"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
