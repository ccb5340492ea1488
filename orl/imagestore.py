"""Decode once: photos decoded at a working size into memory-mapped files, shared by runs.

The "tensor" augmentation backend (``augment.backend=tensor``) reads its photos from here
instead of decoding each one per sample. Each photo is decoded once (through
:func:`orl.images.decode_image`, so with every check and conversion of the library; a JPEG in
libjpeg's draft mode, which scales by 1/2, 1/4 or 1/8 while decoding as long as both sides stay
at least the working size), resized (PIL bilinear, antialiased) so that its shorter side is
the working size (never enlarged), and written as uint8 in channel-first layout, (3, H, W), to
``ROOT/s{size}/{sha1[:2]}/{sha1}.npy``.

The key is the file's SHA-1 and the working size, so the same photo is decoded once for every
epoch, run, stage and folder that holds it, and a changed file is a new entry. ``index.jsonl``
in ROOT records, one JSON line each, (1) a file's path, byte size, mtime and inode with its
SHA-1, so that a later run does not hash it again, and (2) an entry's original (upright) size
and its shape in the store, so that boxes (in original pixels) can be scaled into store pixels
without opening the file. Lines are appended with O_APPEND by whichever process finishes an
image, entries are written to a temporary file and renamed, so concurrent runs (or DDP ranks)
sharing a store at worst decode a photo twice; readers take the last line of each key.

Memory: a photo takes 3 x S x S x (long side / short side) bytes, S the working size (see
docs/ARCHITECTURE.md, "Decoded-image store"). Entries are opened with ``np.load(mmap_mode="r")``:
pages come from the OS page cache, so a store larger than RAM is read from disk as needed,
never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from orl.images import ImageError, decode_image

log = logging.getLogger(__name__)

STORE_ENV = "ORL_IMAGE_STORE"
INDEX = "index.jsonl"


def default_store_root() -> Path:
    """``ORL_IMAGE_STORE`` when set, else ``$XDG_CACHE_HOME/orl/image_store`` (``~/.cache/...``)."""
    env = os.environ.get(STORE_ENV, "").strip()
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(cache) / "orl" / "image_store"


@dataclass(frozen=True)
class StoredImage:
    """One photo in the store. ``orig_*``: the upright photo (boxes refer to it); ``height`` /
    ``width``: the stored array, (3, height, width) uint8."""

    sha1: str
    orig_w: int
    orig_h: int
    height: int
    width: int
    path: Path

    @property
    def nbytes(self) -> int:
        return 3 * self.height * self.width

    @property
    def scale(self) -> tuple[float, float]:
        """(x, y) factors from original pixels to store pixels."""
        return self.width / self.orig_w, self.height / self.orig_h


def stored_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) of a w x h photo in a store of working size ``size``: the shorter side
    ``size`` (the other rounded, kept at least 1), or the photo's own size when it is smaller."""
    short = min(w, h)
    if short <= size:
        return w, h
    f = size / short
    return (size, max(1, round(h * f))) if w <= h else (max(1, round(w * f)), size)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_entry(path: str, sha1: str, size: int, dest: str) -> dict[str, Any]:
    """Decode ``path`` (refused unless its bytes still hash to ``sha1``) into ``dest``: the
    entry's index record. Top level, so that a process pool can run it."""
    img, info = decode_image(path, expected_sha1=sha1, draft_px=size)
    w, h = stored_size(info.width, info.height, size)
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    out = Path(dest)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"entry": f"{sha1}:{size}", "orig": [info.width, info.height], "shape": [h, w]}


def _refusal(path: Path) -> str:
    """The reason a file that cannot be stat'ed or opened as a regular file is refused."""
    try:
        decode_image(path)
    except ImageError as exc:
        return str(exc)
    return "cannot read file"


def _decode_job(job: tuple[str, str, int, str]) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return _write_entry(*job), None
    except ImageError as exc:
        return None, str(exc)


class ImageStore:
    """Photos decoded once at working size ``size`` under ``root`` (default: :func:`default_store_root`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, size: int = 224):
        if size < 1:
            raise ValueError(f"working size must be at least 1 px, got {size}")
        self.root = Path(root) if root is not None else default_store_root()
        self.size = int(size)
        self._files: dict[str, str] = {}  # stat key -> sha1
        self._entries: dict[str, dict[str, Any]] = {}  # "sha1:size" -> record
        self._read_index()

    # -- index ------------------------------------------------------------------------------
    def _read_index(self) -> None:
        path = self.root / INDEX
        if not path.exists():
            return
        with path.open() as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by a killed writer
                    continue
                if "file" in rec and "sha1" in rec:
                    self._files[rec["file"]] = rec["sha1"]
                elif "entry" in rec:
                    self._entries[rec["entry"]] = rec

    def _append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            for rec in records:  # one write per line: lines of concurrent writers do not interleave
                os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
        finally:
            os.close(fd)

    def entry_path(self, sha1: str) -> Path:
        return self.root / f"s{self.size}" / sha1[:2] / f"{sha1}.npy"

    def _stored(self, sha1: str) -> StoredImage | None:
        rec = self._entries.get(f"{sha1}:{self.size}")
        path = self.entry_path(sha1)
        if rec is None or not path.exists():
            return None
        (ow, oh), (h, w) = rec["orig"], rec["shape"]
        return StoredImage(sha1, int(ow), int(oh), int(h), int(w), path)

    # -- building ---------------------------------------------------------------------------
    def ensure(self, paths: Sequence[str | os.PathLike[str]], workers: int = 0,
               progress: Callable[[int, int], None] | None = None) -> tuple[list[StoredImage | None], dict[int, str]]:
        """Every photo of ``paths`` in the store, decoding those not there yet.

        Returns (per path its StoredImage or None, {index: reason} for photos that could not be
        read: the :class:`ImageError` message). ``workers`` > 1 decodes in that many processes.
        ``progress(done, total)`` is called as new photos are decoded.
        """
        out: list[StoredImage | None] = [None] * len(paths)
        failed: dict[int, str] = {}
        sha1s: dict[int, str] = {}
        new_files: list[dict[str, Any]] = []
        for i, raw in enumerate(paths):
            p = Path(raw)
            try:
                st = p.stat()
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    raise OSError("not a regular, non-empty file")
                key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
                sha1 = self._files.get(key)
                if sha1 is None:
                    sha1 = _sha1(p)
                    self._files[key] = sha1
                    new_files.append({"file": key, "sha1": sha1})
            except OSError:
                failed[i] = _refusal(p)  # missing, a FIFO, empty...: decode_image words why
                continue
            sha1s[i] = sha1
            out[i] = self._stored(sha1)
        self._append(new_files)
        # What is not stored yet, each content once (the same bytes may sit under two names).
        todo: dict[str, int] = {}
        for i, sha1 in sha1s.items():
            if out[i] is None:
                todo.setdefault(sha1, i)
        jobs = [(str(paths[i]), sha1, self.size, str(self.entry_path(sha1))) for sha1, i in todo.items()]
        reasons: dict[str, str] = {}
        records = []
        for job, (rec, reason) in zip(jobs, self._run(jobs, workers, progress), strict=True):
            if rec is None:
                reasons[job[1]] = reason or "cannot decode image"
            else:
                self._entries[rec["entry"]] = rec
                records.append(rec)
        self._append(records)
        for i, sha1 in sha1s.items():
            if out[i] is None:
                out[i] = self._stored(sha1)
                if out[i] is None:
                    failed[i] = reasons.get(sha1, "cannot decode image")
        if jobs:
            log.info("image store %s: decoded %d photos at %d px (%d refused)", self.root, len(jobs), self.size,
                     len(reasons))
        return out, failed

    @staticmethod
    def _run(jobs: list[tuple[str, str, int, str]], workers: int,
             progress: Callable[[int, int], None] | None) -> list[tuple[dict[str, Any] | None, str | None]]:
        results: list[tuple[dict[str, Any] | None, str | None]] = []
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for res in pool.map(_decode_job, jobs, chunksize=4):
                    results.append(res)
                    if progress:
                        progress(len(results), len(jobs))
            return results
        for job in jobs:
            results.append(_decode_job(job))
            if progress:
                progress(len(results), len(jobs))
        return results

    # -- reading ----------------------------------------------------------------------------
    @staticmethod
    def array(entry: StoredImage) -> np.ndarray:
        """The (3, H, W) uint8 pixels of an entry, memory-mapped (read-only)."""
        try:
            arr = np.load(entry.path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ImageError(f"image store entry {entry.path} is damaged ({exc}); delete it to decode the photo "
                             "again") from None
        if arr.shape != (3, entry.height, entry.width) or arr.dtype != np.uint8:
            raise ImageError(f"image store entry {entry.path} is damaged (shape {arr.shape}); delete it to decode "
                             "the photo again")
        return arr
