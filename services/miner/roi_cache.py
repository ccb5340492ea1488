"""RoI features on the artifacts volume: each image's boxes are encoded once, then reused.

Layout: ``<ORL_ARTIFACTS_DIR>/roi_cache/ckpt-<checkpoint id>/<params_key>/<roi_key>/<image id>.npy``,
a (B, C) L2-normalised array (``mine.roi_dtype``: float16 by default, as orl.roi_features keeps
them) whose row b is the feature of proposal ``ord = b``. The key holds everything the features
depend on (weights, boxes, RoI mode, size and dtype), so any worker on any host may read a file
another one wrote. Writes are atomic (temp file + rename): a worker
killed mid-write leaves no half file, and two workers computing the same image both write the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orl.fileio import atomic_path


class RoiCache:
    def __init__(self, artifacts_dir: Path, checkpoint_id: int, params_key: str, roi_key: str,
                 dtype: str = "float32"):
        self.dir = Path(artifacts_dir) / "roi_cache" / f"ckpt-{checkpoint_id}" / params_key / roi_key
        self.dtype = np.dtype(dtype)

    def path(self, image_id: int) -> Path:
        return self.dir / f"{int(image_id)}.npy"

    def get(self, image_id: int, n_boxes: int) -> np.ndarray | None:
        """The cached features, or None if absent or not matching ``n_boxes`` (stale / damaged)."""
        p = self.path(image_id)
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.ndim != 2 or len(arr) != n_boxes or arr.dtype != self.dtype:
            return None
        return arr

    def put(self, image_id: int, feats: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # A unique temp name: two workers may write the same image at once.
        with atomic_path(self.path(image_id), unique=True) as tmp:
            np.save(tmp, np.ascontiguousarray(feats, dtype=self.dtype), allow_pickle=False)
