"""Atomic writes: the target is the old file or the new one, never a half-written one."""

import numpy as np
import pytest

from orl.fileio import atomic_path, atomic_write_bytes, atomic_write_text


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert target.read_text() == "new" and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unique_temporaries_keep_the_suffix_for_np_save(tmp_path):
    target = tmp_path / "7.npy"
    with atomic_path(target, unique=True) as a, atomic_path(target, unique=True) as b:
        assert a != b and a.suffix == b.suffix == ".npy" and a.name.startswith(".")
        np.save(a, np.ones(3, np.float32))
        np.save(b, np.zeros(3, np.float32))
    assert np.array_equal(np.load(target), np.ones(3)) and [p.name for p in tmp_path.iterdir()] == ["7.npy"]
