"""RoI features on disk, so that stage 2 never holds them all in RAM.

Each image's (B_i, C) L2-normalised features are appended, image after image, to raw shard
files and read back as read-only memory maps: the operating system pages in what pair
selection touches and drops it again under memory pressure. For scale: COCO train2017 has
118k images of ~45 filtered boxes, 2048 channels for a ResNet-50, i.e. 43 GB as float32.

float16 halves that. It is enough for ranking by cosine similarity: a feature of unit norm
rounds to float16 with a relative error of at most 2^-11 per element, so a similarity moves
by at most about 1e-3, and only pairs within that of the top-k cut-off can change
(``tests/test_mining_speed.py`` counts them on the sample photos). ``mine.roi_dtype=float32``
keeps the exact features.

Layout of a store folder::

    index.json        {"format": 1, "dtype": "float16", "dim": C, "files": [...],
                       "counts": [B_i ...], "shard": [s_i ...], "start": [first row ...],
                       "shard_rows": [rows of shard 0, ...]}
    shard-00000.bin   (rows, C) row-major values of dtype, images never split across shards

``roi_features.npz`` (``files``, ``counts``, ``features`` float32) is the older single-file
layout that ``mine(save_features=True)`` still writes for the tools that read it;
:func:`load_roi_features` reads either.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, overload

import numpy as np

from orl.fileio import atomic_path, atomic_write_text

FORMAT = 1
INDEX = "index.json"
DTYPES = ("float16", "float32")
SHARD_BYTES = 256 << 20  # a shard file grows to about this before the next one starts


class RoiFeatureWriter:
    """Appends each image's features to shards in ``folder`` (replaced if it exists).

    ``append`` in the order of the images; ``close(files)`` writes the index and returns the
    store. Only the open shard's file handle is held, never the features.
    """

    def __init__(self, folder: str | Path, dim: int, dtype: str = "float16", shard_bytes: int = SHARD_BYTES):
        if dtype not in DTYPES:
            raise ValueError(f"RoI feature dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.folder, self.dim, self.dtype = Path(folder), int(dim), np.dtype(dtype)
        self.shard_bytes = int(shard_bytes)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.counts: list[int] = []
        self.shard: list[int] = []
        self.start: list[int] = []
        self.shard_rows: list[int] = []
        self._fh: IO[bytes] | None = None

    def _open_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self.shard_rows.append(0)
        self._fh = (self.folder / f"shard-{len(self.shard_rows) - 1:05d}.bin").open("wb")

    def append(self, feats: np.ndarray) -> None:
        """One image's (B, C) features (B may be 0), cast to the store's dtype."""
        f = np.asarray(feats).reshape(-1, self.dim) if len(feats) else np.zeros((0, self.dim))
        row_bytes = self.dim * self.dtype.itemsize
        if self._fh is None or (self.shard_rows[-1] and (self.shard_rows[-1] + len(f)) * row_bytes > self.shard_bytes):
            self._open_shard()
        assert self._fh is not None
        self.counts.append(len(f))
        self.shard.append(len(self.shard_rows) - 1)
        self.start.append(self.shard_rows[-1])
        self._fh.write(np.ascontiguousarray(f, dtype=self.dtype).tobytes())
        self.shard_rows[-1] += len(f)

    def close(self, files: Sequence[str]) -> RoiFeatureStore:
        if len(files) != len(self.counts):
            raise ValueError(f"{len(files)} file names for {len(self.counts)} appended images")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        index = {"format": FORMAT, "dtype": self.dtype.name, "dim": self.dim, "files": list(files),
                 "counts": self.counts, "shard": self.shard, "start": self.start, "shard_rows": self.shard_rows}
        atomic_write_text(self.folder / INDEX, json.dumps(index))
        return RoiFeatureStore(self.folder)


class RoiFeatureStore(Sequence[np.ndarray]):
    """Read-only view of a store folder: ``store[i]`` is image i's (B_i, C) features (a memory
    map of the stored dtype; cast with ``np.asarray(f, np.float32)`` to compute with it)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.folder} is not a RoI feature store (no readable {INDEX}): {exc}") from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: RoI feature store format {index.get('format')!r}, expected {FORMAT}")
        self.files: list[str] = [str(f) for f in index["files"]]
        self.dim = int(index["dim"])
        self.dtype = np.dtype(index["dtype"])
        self._counts, self._shard, self._start = index["counts"], index["shard"], index["start"]
        self._maps = [np.memmap(self.folder / f"shard-{s:05d}.bin", dtype=self.dtype, mode="r", shape=(rows, self.dim))
                      if rows else np.zeros((0, self.dim), self.dtype) for s, rows in enumerate(index["shard_rows"])]

    def __len__(self) -> int:
        return len(self._counts)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of a store of {len(self)}")
        i %= len(self)
        n = self._counts[i]
        if n == 0:
            return np.zeros((0, self.dim), self.dtype)
        start = self._start[i]
        return self._maps[self._shard[i]][start : start + n]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def counts(self) -> list[int]:
        return list(self._counts)

    def remove(self) -> None:
        """Delete the folder (the memory maps of this object must not be used afterwards)."""
        self._maps = []
        shutil.rmtree(self.folder, ignore_errors=True)


def write_npz(path: str | Path, files: Sequence[str], feats: Sequence[np.ndarray]) -> None:
    """The single-file layout (``files``, ``counts``, ``features`` (sum B_i, C) float32), written
    image by image into the zip, atomically; ``feats`` may be a :class:`RoiFeatureStore`."""
    dim = next((f.shape[1] for f in feats if np.ndim(f) == 2), 0)
    if isinstance(feats, RoiFeatureStore):
        dim = feats.dim
    counts = np.array([len(f) for f in feats], dtype=np.int64)
    with atomic_path(Path(path)) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for name, arr in (("files", np.array(list(files))), ("counts", counts)):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)
        with zf.open("features.npy", "w", force_zip64=True) as fh:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (int(counts.sum()), dim)}
            np.lib.format.write_array_header_2_0(fh, header)
            for f in feats:
                if len(f):
                    fh.write(np.ascontiguousarray(f, dtype=np.float32).reshape(-1, dim).tobytes())


def load_roi_features(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """(files, per-image (B_i, C) L2-normalised RoI features), in the order of the
    correspondence's files and boxes. ``path``: a ``roi_features.npz`` (loaded into memory) or
    a store folder (memory maps)."""
    p = Path(path)
    if p.is_dir():
        store = RoiFeatureStore(p)
        return store.files, list(store)
    z = np.load(p)
    splits = np.cumsum(z["counts"])[:-1]
    return [str(f) for f in z["files"]], np.split(z["features"], splits) if len(z["counts"]) else []
