"""Box geometry. One convention inside the library: float xyxy in original-image pixels.

Conversions to other layouts (official ORL json is xywh) happen only at the edges.
Everything here is numpy only.
"""

from __future__ import annotations

import math

import numpy as np


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """(N, 4) xywh -> (N, 4) float xyxy."""
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(b: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N, 4) float xywh."""
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def areas(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) xyxy -> (N, M) IoU in [0, 1]; 0 where both boxes are empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = areas(a)[:, None] + areas(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def filter_boxes(
    boxes: np.ndarray,
    min_side_px: float = 96.0,
    max_aspect: float = 3.0,
    max_iou: float = 0.5,
    max_boxes: int = 100,
) -> np.ndarray:
    """The official ORL box filter, applied in proposal order.

    Drops boxes with a side under ``min_side_px`` or an aspect ratio above ``max_aspect``
    either way, then greedily drops any box whose IoU with an already kept box exceeds
    ``max_iou``, and keeps the first ``max_boxes`` survivors. If nothing survives, the first
    raw box is kept, as the authors do, so every image with proposals has at least one box.

    boxes: (N, 4) xyxy. Returns (K, 4) xyxy, K <= max_boxes, K >= 1 when N >= 1.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (w >= min_side_px) & (h >= min_side_px) & (w / h <= max_aspect) & (h / w <= max_aspect)
    kept: list[int] = []
    cand = boxes[ok]
    for i in range(len(cand)):
        if len(kept) >= max_boxes:
            break
        if kept and iou_matrix(cand[i : i + 1], cand[kept]).max() > max_iou:
            continue
        kept.append(i)
    if not kept:
        return boxes[:1].copy()
    return cand[kept]


def jitter_box(
    box: np.ndarray,
    image_wh: tuple[int, int],
    rng: np.random.Generator,
    max_tries: int = 200,
    min_iou: float = 0.5,
) -> np.ndarray:
    """Spatially jitter one xyxy box, as the authors' intra-RoI augmentation does.

    Each try draws, in this order: an area factor U(0.5, 2) (new area = factor x the box's
    area); an ABSOLUTE aspect ratio r = exp(U(ln 0.5, ln 2)), not a factor on the box's own
    aspect; and a centre shift U(-0.5, 0.5) x the box's width and height. The new size is
    integer, w' = round(sqrt(area' r)), h' = round(sqrt(area' / r)), and so is the corner,
    x' = round(cx' - w' / 2), y' = round(cy' - h' / 2) (Python's round, half to even, as
    the authors'). A try is accepted when the new box lies fully inside the image and its
    IoU with the original exceeds ``min_iou``; after ``max_tries`` failures the original box
    is returned unchanged. An accepted box therefore has integer coordinates and an aspect
    within [0.5, 2] up to rounding, whatever the original's aspect.
    """
    box = np.asarray(box, dtype=np.float64).reshape(4)
    img_w, img_h = image_wh
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    cx, cy = x1 + 0.5 * w, y1 + 0.5 * h
    log_lo, log_hi = math.log(0.5), math.log(2.0)
    for _ in range(max_tries):
        area = float(rng.uniform(0.5, 2.0)) * w * h
        ratio = math.exp(float(rng.uniform(log_lo, log_hi)))
        nw = int(round(math.sqrt(area * ratio)))
        nh = int(round(math.sqrt(area / ratio)))
        ncx = cx + float(rng.uniform(-0.5, 0.5)) * w
        ncy = cy + float(rng.uniform(-0.5, 0.5)) * h
        nx, ny = int(round(ncx - 0.5 * nw)), int(round(ncy - 0.5 * nh))
        if nx < 0 or ny < 0 or nx + nw > img_w or ny + nh > img_h:
            continue
        cand = np.array([nx, ny, nx + nw, ny + nh], dtype=np.float64)
        if iou_matrix(cand[None], box[None])[0, 0] > min_iou:
            return cand
    return box.copy()


def clip_boxes(b: np.ndarray, image_wh: tuple[int, int]) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, image_wh[0])
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, image_wh[1])
    return b
