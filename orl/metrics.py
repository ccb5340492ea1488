"""How good are the stage-2 correspondences? Measured against ground-truth boxes.

Stage 2 claims two things: its image-level KNN finds images with common content, and its
RoI pairs link boxes around objects of the same kind. Both are checked here with labels
that the pipeline itself never sees, and each figure comes with a random baseline drawn
from the same candidates, so a number means something only relative to chance.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np

from orl.boxes import iou_matrix
from orl.correspondence import Correspondence
from orl.labels import GroundTruth, ImageObjects


RULES = ("iou", "ioa")


def overlap(boxes: np.ndarray, gt_boxes: np.ndarray, rule: str = "iou") -> np.ndarray:
    """(P, 4), (G, 4) xyxy -> (P, G) overlap under a matching rule.

    ``iou``: intersection over union (the box frames the object).
    ``ioa``: intersection over the proposal's own area (the box lies on the object: whole
    objects and object parts both count, as the paper describes its pairs).
    """
    if rule == "iou":
        return iou_matrix(boxes, gt_boxes)
    if rule == "ioa":
        lt = np.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
        rb = np.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
        wh = np.clip(rb - lt, 0, None)
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        return wh[..., 0] * wh[..., 1] / np.maximum(area, 1e-9)[:, None]
    raise ValueError(f"unknown matching rule {rule!r}; valid: {', '.join(RULES)}")


def matched_classes(boxes: np.ndarray, obj: ImageObjects, num_classes: int, iou_threshold: float,
                    rule: str = "iou") -> np.ndarray:
    """(P, 4) xyxy boxes -> (P, K) bool: [p, c] when box p overlaps some ground-truth object
    of class c in ``obj`` by at least the threshold under ``rule`` (see ``overlap``). A box
    may match several classes."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.zeros((len(boxes), num_classes), dtype=bool)
    if len(boxes) == 0 or len(obj) == 0:
        return out
    hit = overlap(boxes, obj.boxes, rule) >= iou_threshold  # (P, G)
    onehot = np.zeros((len(obj), num_classes), dtype=bool)
    onehot[np.arange(len(obj)), obj.class_ids] = True
    return (hit.astype(np.int64) @ onehot.astype(np.int64)) > 0


def pairs_correct(q_boxes, n_boxes, q_obj: ImageObjects, n_obj: ImageObjects,
                  num_classes: int, iou_threshold: float, rule: str = "iou") -> np.ndarray:
    """(P, 4) query boxes and (P, 4) neighbour boxes -> (P,) bool: row p is correct when
    one class c is matched by query box p in the query image and by neighbour box p in the
    neighbour image."""
    mq = matched_classes(q_boxes, q_obj, num_classes, iou_threshold, rule)
    mn = matched_classes(n_boxes, n_obj, num_classes, iou_threshold, rule)
    return (mq & mn).any(axis=1)


def _resolve(corr: Correspondence, gt: GroundTruth) -> list[str | None]:
    """The labelled ground-truth key of each correspondence image, or None.

    An exact relative path wins; a path unknown to ``gt`` falls back to its basename when
    that basename is unique among ``gt``'s images (mining and evaluation may have been run
    on different roots of the same images).
    """
    by_base: dict[str, list[str]] = {}
    for p in gt.splits:
        by_base.setdefault(PurePosixPath(p).name, []).append(p)
    keys = []
    for f in corr.files:
        if f not in gt.splits:
            cands = by_base.get(PurePosixPath(f).name, [])
            f = cands[0] if len(cands) == 1 else None
        keys.append(f if f in gt.objects else None)
    return keys


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _image_pair_share(pairs: list[tuple[int, int]], keys, gt: GroundTruth) -> dict[str, Any]:
    """Share of (query, neighbour) image pairs with at least one class in common."""
    shared = sum(bool(gt.image_classes(keys[i]) & gt.image_classes(keys[j])) for i, j in pairs)
    return {"image_pairs": len(pairs), "shared": shared, "share": _ratio(shared, len(pairs))}


def _random_image_pairs(pairs, labelled: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """For each counted KNN pair (i, j), one random partner of i among the other labelled
    images: the share of chance, with the same query images as the KNN figure."""
    out = []
    if len(labelled) < 2:
        return out
    pool = np.asarray(labelled)
    for i, _ in pairs:
        j = i
        while j == i:
            j = int(pool[rng.integers(len(pool))])
        out.append((i, j))
    return out


def correspondence_precision(
    corr: Correspondence, gt: GroundTruth, iou_threshold: float = 0.5, seed: int = 0, rule: str = "iou"
) -> dict[str, Any]:
    """Precision of mined RoI pairs and quality of the image KNN, each against chance.

    Matching rule. A box *matches* a ground-truth object when their IoU is at least
    ``iou_threshold`` (``rule="iou"``; with ``rule="ioa"`` the intersection over the box's
    own area is used instead, so a box lying on part of an object matches it too). A mined pair (query box in image i, neighbour box in image j) is
    *correct* when there is a class c such that the query box matches a class-c object of
    image i and the neighbour box matches a class-c object of image j. Only pairs whose
    two images are both labelled count (a labelled image with no objects makes every pair
    in it wrong; an unlabeled image is left out).

    Random baseline. For every (i, j) with P counted mined pairs, P box pairs are drawn
    uniformly with replacement from ``corr.boxes[i]`` x ``corr.boxes[j]`` (the filtered
    proposals mining chose from) with ``np.random.default_rng(seed)``, and judged by the
    same rule. ``lift`` = precision / random precision.

    KNN quality: the share of (image, KNN neighbour) pairs, both labelled, whose images
    have at least one class in common; its baseline replaces each neighbour by a random
    other labelled image. ``top1_precision`` counts only the best-scored pair per
    neighbour (rank 0).

    Raises ValueError when no correspondence image is labelled (wrong labels for these
    images, or a different images root).
    """
    rng = np.random.default_rng(seed)
    keys = _resolve(corr, gt)
    labelled = [i for i, k in enumerate(keys) if k is not None]
    if not labelled:
        raise ValueError("no image of the correspondence file has ground-truth labels; check "
                         "that the labels belong to the images that were mined")
    K = len(gt.classes)
    mined = _counts()
    top1 = _counts()
    rand = _counts()
    knn_pairs = []
    for i in labelled:
        for k, j in enumerate(corr.knn[i]):
            j = int(j)
            if j < 0 or keys[j] is None:
                continue
            knn_pairs.append((i, j))
            arr = corr.pairs[i][k].reshape(-1, 8)
            if len(arr) == 0:
                continue
            ok = pairs_correct(arr[:, :4], arr[:, 4:], gt[keys[i]], gt[keys[j]], K, iou_threshold, rule)
            _add(mined, ok)
            _add(top1, ok[:1])
            _add(rand, _random_pairs_correct(corr, i, j, len(arr), gt[keys[i]], gt[keys[j]],
                                             K, iou_threshold, rng, rule))
    return {
        "iou_threshold": float(iou_threshold),
        "rule": rule,
        "seed": seed,
        "images": {"total": len(corr), "labelled": len(labelled)},
        "pairs_total": corr.num_pairs,
        "pairs": mined["n"],
        "correct": mined["correct"],
        "precision": _ratio(mined["correct"], mined["n"]),
        "top1_precision": _ratio(top1["correct"], top1["n"]),
        "random": {"pairs": rand["n"], "correct": rand["correct"],
                   "precision": _ratio(rand["correct"], rand["n"])},
        "lift": _lift(mined, rand),
        "knn": _image_pair_share(knn_pairs, keys, gt),
        "knn_random": _image_pair_share(_random_image_pairs(knn_pairs, labelled, rng), keys, gt),
    }


def _counts() -> dict[str, int]:
    return {"n": 0, "correct": 0}


def _add(c: dict[str, int], ok: np.ndarray) -> None:
    c["n"] += int(len(ok))
    c["correct"] += int(np.sum(ok))


def _lift(mined, rand) -> float | None:
    p, r = _ratio(mined["correct"], mined["n"]), _ratio(rand["correct"], rand["n"])
    return p / r if p is not None and r else None


def _random_pairs_correct(corr, i, j, n, q_obj, n_obj, K, thr, rng, rule="iou") -> np.ndarray:
    """(n,) bool for n random (box of image i, box of image j) pairs; empty if either
    image has no filtered boxes."""
    bi, bj = np.asarray(corr.boxes[i]).reshape(-1, 4), np.asarray(corr.boxes[j]).reshape(-1, 4)
    if len(bi) == 0 or len(bj) == 0:
        return np.zeros(0, dtype=bool)
    qa = bi[rng.integers(len(bi), size=n)]
    na = bj[rng.integers(len(bj), size=n)]
    return pairs_correct(qa, na, q_obj, n_obj, K, thr, rule)
