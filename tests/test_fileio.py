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


def test_a_checkpoint_that_does_not_fit_is_a_clear_error_and_keeps_the_old_one(tmp_path):
    """A full disk (here: the file size limit, EFBIG) mid-checkpoint: torch.save alone reports
    "[enforce fail at inline_container.cc] unexpected pos"; save_checkpoint names the file and
    the cause, and last.pt stays the previous, loadable checkpoint. In a subprocess, because the
    limit applies to every file the process writes."""
    import subprocess
    import sys

    script = f"""
import errno, resource, torch
from orl.checkpoint import load_checkpoint, save_checkpoint
path = {str(tmp_path / "last.pt")!r}
save_checkpoint({{"w": torch.zeros(1000)}}, path)
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
try:
    save_checkpoint({{"w": torch.ones(1_000_000)}}, path)  # 4 MB
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
    print(exc)
else:
    raise SystemExit("the write did not fail")
assert float(load_checkpoint(path)["w"].sum()) == 0.0
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    message = out.stdout.strip()
    assert message.startswith(f"[Errno 27] cannot write {tmp_path / 'last.pt'}: File too large"), message
    assert message.endswith("the previous file is unchanged"), message
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
