"""The result of stage 2, and its exchange with the authors' json layout.

Inside the library boxes are float xyxy in original pixels. The official layout
(``correspondence.json`` of Jiahao000/ORL) stores boxes as [x, y, w, h] and neighbours as
positional indices into its image list; we write exactly that, plus extra fields
(``knn_image_sim``, ``knn_bbox_pair_score``, ``image_size``) that the authors' loader ignores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orl.boxes import xywh_to_xyxy, xyxy_to_xywh
from orl.config import MineConfig
from orl.fileio import atomic_write_text


def official_info(cfg: MineConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``info`` block of correspondence.json: the authors' keys first (their loader looks for
    them), then every mining parameter (``mine_config``), then ``extra`` (where the run came from)."""
    return {"bbox_min_size": cfg.min_side_px, "bbox_max_aspect_ratio": cfg.max_aspect,
            "bbox_max_iou": cfg.max_iou, "intra_bbox_num": cfg.max_boxes,
            "knn_image_num": cfg.knn_k, "knn_bbox_pair_ratio": cfg.pair_ratio,
            "mine_config": asdict(cfg), **(extra or {})}


@dataclass
class Correspondence:
    """Mined correspondences for N images.

    files:       N relative image paths (under the images folder)
    sizes:       (N, 2) int (width, height)
    boxes:       N arrays (B_i, 4) float xyxy: filtered proposals, in proposal order
    knn:         (N, K) int positional neighbour indices, best first; -1 pads short rows
    knn_sim:     (N, K) float cosine similarity of each neighbour
    pairs:       pairs[i][k] is (P, 8) float [q xyxy, n xyxy] for image i and its k-th neighbour,
                 ordered by score (rank = row index)
    pair_scores: pair_scores[i][k] is (P,) float cosine similarity of the two RoIs
    info:        every parameter the run used
    """

    files: list[str]
    sizes: np.ndarray
    boxes: list[np.ndarray]
    knn: np.ndarray
    knn_sim: np.ndarray
    pairs: list[list[np.ndarray]]
    pair_scores: list[list[np.ndarray]]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_pairs(self) -> int:
        return int(sum(len(p) for row in self.pairs for p in row))

    def iter_pairs(self) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray, float]]:
        """Yield (image_idx, neighbour_idx, rank, q_box xyxy, n_box xyxy, score)."""
        for i, row in enumerate(self.pairs):
            for k, arr in enumerate(row):
                j = int(self.knn[i, k])
                # strict=False: the scores of a loaded file are not checked against its pairs
                for r, (p, s) in enumerate(zip(arr, self.pair_scores[i][k], strict=False)):
                    yield i, j, r, p[:4], p[4:], float(s)

    # -- official json --------------------------------------------------------------------
    def to_official(self) -> dict[str, Any]:
        def r(x: Any) -> Any:  # round for a compact file; sub-pixel digits carry nothing
            return np.round(np.asarray(x, dtype=np.float64), 2).tolist()

        knn_ids, bbox, pairs, scores = [], [], [], []
        for i in range(len(self)):
            valid = [k for k in range(self.knn.shape[1]) if self.knn[i, k] >= 0]
            knn_ids.append([int(self.knn[i, k]) for k in valid])
            bbox.append(r(xyxy_to_xywh(self.boxes[i])) if len(self.boxes[i]) else [])
            per_n, per_s = [], []
            for k in valid:
                arr = self.pairs[i][k].reshape(-1, 8)
                per_n.append(r(np.concatenate([xyxy_to_xywh(arr[:, :4]), xyxy_to_xywh(arr[:, 4:])], 1)))
                per_s.append(np.round(self.pair_scores[i][k].astype(np.float64), 5).tolist())
            pairs.append(per_n)
            scores.append(per_s)
        return {
            "info": dict(self.info),
            "images": {"file_name": list(self.files), "id": list(range(len(self)))},
            "pseudo_annotations": {
                "image_id": list(range(len(self))),
                "bbox": bbox,
                "knn_image_id": knn_ids,
                "knn_bbox_pair": pairs,
                # Extras (ignored by the authors' loader):
                "knn_image_sim": np.round(self.knn_sim.astype(np.float64), 5).tolist(),
                "knn_bbox_pair_score": scores,
                "image_size": np.asarray(self.sizes).astype(int).tolist(),
            },
        }

    @classmethod
    def from_official(cls, data: dict[str, Any]) -> Correspondence:
        imgs = data["images"]
        files = list(imgs["file_name"]) if isinstance(imgs, dict) else [d["file_name"] for d in imgs]
        ann = data["pseudo_annotations"]
        n = len(files)
        knn_lists = ann["knn_image_id"]
        k_max = max((len(x) for x in knn_lists), default=0)
        knn = -np.ones((n, k_max), dtype=np.int64)
        sim = np.full((n, k_max), np.nan)
        sims = ann.get("knn_image_sim")
        boxes, pairs, scores = [], [], []
        for i in range(n):
            ids = knn_lists[i]
            knn[i, : len(ids)] = ids
            if sims is not None:
                sim[i, : len(ids)] = sims[i][: len(ids)]
            b = ann["bbox"][i]
            boxes.append(xywh_to_xyxy(b) if len(b) else np.zeros((0, 4)))
            row_p, row_s = [], []
            for k in range(k_max):
                if k < len(ids):
                    arr = np.asarray(ann["knn_bbox_pair"][i][k], dtype=np.float64).reshape(-1, 8)
                    arr = (np.concatenate([xywh_to_xyxy(arr[:, :4]), xywh_to_xyxy(arr[:, 4:])], 1) if len(arr)
                           else np.zeros((0, 8)))
                    sc = ann.get("knn_bbox_pair_score")
                    s = np.asarray(sc[i][k], dtype=np.float64) if sc is not None else np.full(len(arr), np.nan)
                else:
                    arr, s = np.zeros((0, 8)), np.zeros(0)
                row_p.append(arr)
                row_s.append(s)
            pairs.append(row_p)
            scores.append(row_s)
        sizes = np.asarray(ann.get("image_size", [[0, 0]] * n), dtype=np.int64).reshape(n, 2)
        return cls(files, sizes, boxes, knn, sim, pairs, scores, dict(data.get("info", {})))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_official()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Correspondence:
        path = Path(path)
        if path.is_dir():
            path = path / "correspondence.json"
        if not path.is_file():
            raise FileNotFoundError(f"no correspondence file at {path}")
        try:
            data = json.loads(path.read_text())
            return cls.from_official(data)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{path} is not a valid ORL correspondence json: {exc}") from exc
