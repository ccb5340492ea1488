"""Atomic file writes: write a temporary file next to the target, then rename it over the target.

A reader (or a resumed run) sees the old file or the new one, never half of one: a process killed
mid-write leaves at most the temporary file, which the next write replaces (or, with
``unique=True``, a stray hidden file). ``os.replace`` is atomic within one file system, which is
why the temporary file lives in the target's folder.

``unique=True`` gives every write its own temporary name: for files that several processes may
write at once (the miner's RoI-feature cache), where a shared name would let one writer rename the
other's half-written file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_path(path: Path, unique: bool) -> Path:
    if unique:
        # Hidden, and ending in the target's suffix (np.save appends ".npy" to a name without it).
        return path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | os.PathLike, *, unique: bool = False) -> Iterator[Path]:
    """A temporary path to write to; renamed over ``path`` when the block ends without an error.

    For writers that want a file name (``torch.save``, ``np.save``). On an error the temporary
    file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    tmp = _temp_path(final, unique)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block raised


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, unique: bool = False) -> None:
    with atomic_path(path, unique=unique) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, unique: bool = False) -> None:
    with atomic_path(path, unique=unique) as tmp:
        tmp.write_text(text)
