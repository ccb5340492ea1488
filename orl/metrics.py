"""How good are the stage-2 correspondences? Measured against ground-truth boxes.

Stage 2 claims two things: its image-level KNN finds images with common content, and its
RoI pairs link boxes around objects of the same kind. Both are checked here with labels
that the pipeline itself never sees, and each figure comes with a random baseline drawn
from the same candidates, so a number means something only relative to chance.

Two kinds of figure: :func:`correspondence_precision` judges the pairs mining kept (a few
per image pair, so its counts are small; its baselines match the image pairs and, with
``random_area_matched``, the box sizes); :func:`pair_ranking_auc` judges the RoI
similarity itself over every candidate pair (chance exactly 0.5), which has far more
statistical power. Every figure carries a bootstrap interval over image pairs
(:func:`bootstrap_ci`, :func:`bootstrap_ratio_cis`): a difference between two runs means
something only when it is larger than that noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import PurePosixPath
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from orl.boxes import iou_matrix
from orl.correspondence import Correspondence
from orl.labels import GroundTruth, ImageObjects

RULES = ("iou", "ioa")

# One image's candidate boxes grouped by area bin (see _bin_index).
BinIndex = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


# -- statistics -------------------------------------------------------------------------------
def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float | None:
    """ROC-AUC of (N,) scores against (N,) binary labels; None when only one class occurs.

    The Mann-Whitney statistic U / (n+ n-), U counting, over all (positive, negative)
    pairs, 1 when the positive scores higher and 1/2 when the two are tied; this equals
    (R+ - n+ (n+ + 1) / 2) / (n+ n-) with R+ the positives' rank sum under average ranks
    for ties. It is the chance that a random positive outscores a random negative, so
    chance is exactly 0.5 and a constant score gives exactly 0.5. Threshold-free and
    independent of the positive rate, which is why it is used where the precision of a few
    top pairs has no power. Computed by sorting one class and binary-searching the other
    (O(N log N), seconds for 10^7 scores).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be binary (bool or 0/1)")
        y = y.astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    if len(pos) <= len(neg):  # sort the larger class, search the smaller one in it
        ref, qry, sign = np.sort(neg), pos, 1.0
    else:
        ref, qry, sign = np.sort(pos), neg, -1.0
    below = np.searchsorted(ref, qry, side="left")  # ref values strictly below each query
    ties = np.searchsorted(ref, qry, side="right") - below
    u = below.sum() + 0.5 * ties.sum()  # wins of qry over ref, ties 1/2
    auc = u / (len(pos) * len(neg))
    return float(auc if sign > 0 else 1.0 - auc)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion ``successes / n``; None when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible for small ``n`` and
    for proportions near 0 or 1 (10 of 10 correct gives about [0.72, 1.0], not [1.0, 1.0]), which
    is what a reviewed sample of a few dozen mined pairs looks like.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(stats: np.ndarray, level: float) -> tuple[float | None, float | None]:
    stats = np.asarray(stats, dtype=np.float64)
    stats = stats[np.isfinite(stats)]
    if len(stats) == 0:
        return (None, None)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return (float(lo), float(hi))


def _index_chunks(rng: np.random.Generator, n: int, n_boot: int, max_cells: int = 2_000_000) -> Iterator[np.ndarray]:
    """Yield (b, n) int index arrays, b * n <= max_cells, n_boot rows in all."""
    step = max(1, max_cells // max(n, 1))
    for s in range(0, n_boot, step):
        yield rng.integers(n, size=(min(step, n_boot - s), n))


def bootstrap_ci(values: npt.ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean of (N,) values.

    ``n_boot`` resamples of N values with replacement, drawn by
    ``np.random.default_rng(seed)`` (so the interval is reproducible); the interval is the
    ((1 - level) / 2, (1 + level) / 2) quantiles of the resampled means. It describes the
    sampling noise of the units that were resampled (image pairs, crops), treating them as
    independent. (None, None) for no values; (v, v) for one.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        return (None, None)
    rng = np.random.default_rng(seed)
    means = np.concatenate([v[idx].mean(axis=1) for idx in _index_chunks(rng, len(v), n_boot)])
    return _interval(means, level)


def bootstrap_ci_stat(statistic: Callable[[np.ndarray], float | None], n: int, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of any statistic of N units.

    ``statistic(idx)`` receives an (N,) int array of unit indices drawn with replacement and
    returns a float, or None / NaN when it is undefined for that resample (such resamples are
    left out). Use it for figures that are not a mean of per-unit values: a balanced
    accuracy, a pooled ratio. Same RNG and quantile convention as :func:`bootstrap_ci`.
    """
    if n <= 0:
        return (None, None)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        v = statistic(rng.integers(n, size=n))
        stats.append(np.nan if v is None else float(v))
    return _interval(np.asarray(stats), level)


def bootstrap_ratio_cis(columns: dict[str, tuple[np.ndarray, np.ndarray]], n_boot: int = 1000,
                        seed: int = 0, level: float = 0.95, ratios_of: dict[str, tuple[str, str]] | None = None
                        ) -> dict[str, tuple[float | None, float | None]]:
    """Cluster bootstrap of pooled ratios sum(num) / sum(den) over N units, all resampled together.

    ``columns`` maps a name to ((N,) numerators, (N,) denominators) per unit (e.g. correct
    pairs and pairs per image pair): the pooled precision is a ratio estimator, so the
    image pair, not the box pair, is the unit that is resampled (the pairs of one image
    pair are not independent). Every column sees the same resamples, so ``ratios_of``
    {name: (a, b)} adds a paired interval of ratio(a) / ratio(b) (a lift) whose noise is
    that of the comparison, not of two independent figures. Resamples where a ratio is
    undefined (zero denominator) are left out of that interval.
    """
    names = list(columns)
    n = len(next(iter(columns.values()))[0]) if columns else 0
    ratios_of = ratios_of or {}
    if n == 0:
        return {k: (None, None) for k in [*names, *ratios_of]}
    num = np.stack([np.asarray(columns[k][0], dtype=np.float64) for k in names])  # (C, N)
    den = np.stack([np.asarray(columns[k][1], dtype=np.float64) for k in names])
    rng = np.random.default_rng(seed)
    parts = []
    for idx in _index_chunks(rng, n, n_boot, max_cells=2_000_000 // len(names)):
        # one (b, N) resample shared by every column
        with np.errstate(divide="ignore", invalid="ignore"):
            parts.append(num[:, idx].sum(axis=2) / den[:, idx].sum(axis=2))  # (C, b)
    r = np.concatenate(parts, axis=1)
    out = {k: _interval(r[c], level) for c, k in enumerate(names)}
    for k, (a, b) in ratios_of.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            out[k] = _interval(r[names.index(a)] / r[names.index(b)], level)
    return out


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


def pairs_correct(q_boxes: np.ndarray, n_boxes: np.ndarray, q_obj: ImageObjects, n_obj: ImageObjects,
                  num_classes: int, iou_threshold: float, rule: str = "iou") -> np.ndarray:
    """(P, 4) query boxes and (P, 4) neighbour boxes -> (P,) bool: row p is correct when
    one class c is matched by query box p in the query image and by neighbour box p in the
    neighbour image."""
    mq = matched_classes(q_boxes, q_obj, num_classes, iou_threshold, rule)
    mn = matched_classes(n_boxes, n_obj, num_classes, iou_threshold, rule)
    return (mq & mn).any(axis=1)


def _resolve(corr: Correspondence, gt: GroundTruth) -> dict[int, str]:
    """Index of each labelled correspondence image -> its ground-truth key, in index order.

    An exact relative path wins; a path unknown to ``gt`` falls back to its basename when
    that basename is unique among ``gt``'s images (mining and evaluation may have been run
    on different roots of the same images).
    """
    by_base: dict[str, list[str]] = {}
    for p in gt.splits:
        by_base.setdefault(PurePosixPath(p).name, []).append(p)
    keys: dict[int, str] = {}
    for i, f in enumerate(corr.files):
        key: str | None = f
        if f not in gt.splits:
            cands = by_base.get(PurePosixPath(f).name, [])
            key = cands[0] if len(cands) == 1 else None
        if key is not None and key in gt.objects:
            keys[i] = key
    return keys


def box_recall(corr: Correspondence, gt: GroundTruth, iou_threshold: float = 0.5, min_side_px: float = 0.0,
               n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How many ground-truth objects the proposals frame: the share of labelled objects with a
    box of ``corr.boxes`` at IoU >= ``iou_threshold`` (the mined boxes, after the box filter).

    ``reachable_recall`` counts only objects with both sides >= ``min_side_px``: the filter
    (``mine.min_side_px``) keeps no smaller box, so smaller objects are missed by every
    proposer alike. Intervals: cluster bootstrap over labelled images.
    """
    keys = _resolve(corr, gt)
    if not keys:
        raise ValueError("no image of the correspondence file has ground-truth labels; check "
                         "that the labels belong to the images that were mined")
    hit, n, hit_r, n_r = [], [], [], []
    for i, key in keys.items():
        obj = gt[key]
        boxes = np.asarray(corr.boxes[i], dtype=np.float64).reshape(-1, 4)
        found = np.zeros(len(obj), dtype=bool)
        if len(boxes) and len(obj):
            found = np.asarray((iou_matrix(boxes, obj.boxes) >= iou_threshold).any(axis=0))
        side = np.minimum(obj.boxes[:, 2] - obj.boxes[:, 0], obj.boxes[:, 3] - obj.boxes[:, 1])
        reach = side >= min_side_px
        hit.append(int(found.sum()))
        n.append(len(obj))
        hit_r.append(int(found[reach].sum()))
        n_r.append(int(reach.sum()))
    cis = bootstrap_ratio_cis({"recall": (np.array(hit), np.array(n)), "reachable": (np.array(hit_r), np.array(n_r))},
                              n_boot, seed)
    return {"recall": _ratio(sum(hit), sum(n)), "ci95": list(cis["recall"]), "objects": sum(n),
            "reachable_recall": _ratio(sum(hit_r), sum(n_r)), "reachable_ci95": list(cis["reachable"]),
            "reachable_objects": sum(n_r), "images": len(keys), "iou_threshold": float(iou_threshold),
            "min_side_px": float(min_side_px)}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _image_pair_share(pairs: list[tuple[int, int]], keys: dict[int, str], gt: GroundTruth) -> dict[str, Any]:
    """Share of (query, neighbour) image pairs with at least one class in common."""
    shared = sum(bool(gt.image_classes(keys[i]) & gt.image_classes(keys[j])) for i, j in pairs)
    return {"image_pairs": len(pairs), "shared": shared, "share": _ratio(shared, len(pairs))}


def _random_image_pairs(pairs: list[tuple[int, int]], labelled: list[int],
                        rng: np.random.Generator) -> list[tuple[int, int]]:
    """For each counted KNN pair (i, j), one random partner of i among the other labelled
    images: the share of chance, with the same query images as the KNN figure."""
    out: list[tuple[int, int]] = []
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
    corr: Correspondence, gt: GroundTruth, iou_threshold: float = 0.5, seed: int = 0, rule: str = "iou",
    area_bins: int = 5, n_boot: int = 1000,
) -> dict[str, Any]:
    """Precision of mined RoI pairs and quality of the image KNN, each against chance.

    Matching rule. A box *matches* a ground-truth object when their IoU is at least
    ``iou_threshold`` (``rule="iou"``; with ``rule="ioa"`` the intersection over the box's
    own area is used instead, so a box lying on part of an object matches it too). A mined
    pair (query box in image i, neighbour box in image j) is *correct* when there is a class
    c such that the query box matches a class-c object of image i and the neighbour box
    matches a class-c object of image j. Only pairs whose two images are both labelled count
    (a labelled image with no objects makes every pair in it wrong; an unlabeled image is
    left out).

    Random baseline. For every (i, j) with P counted mined pairs, P box pairs are drawn
    uniformly with replacement from ``corr.boxes[i]`` x ``corr.boxes[j]`` (the filtered
    proposals mining chose from) with ``np.random.default_rng(seed)``, and judged by the
    same rule. ``lift`` = precision / random precision.

    Area-matched random baseline (``random_area_matched``, ``lift_area_matched``). Box size
    alone changes the chance of a match (under IoU large boxes match more often; under IoA
    small ones do), and mining prefers some sizes, so the uniform baseline can make a pure
    size preference look like a lift. Here the log areas of all candidate boxes of the
    labelled images are cut into ``area_bins`` quantile bins (:func:`area_bin_edges`), and
    each mined pair (q, n) of (i, j) is replaced by one random candidate pair whose query
    box is a box of ``corr.boxes[i]`` in q's bin and whose neighbour box is a box of
    ``corr.boxes[j]`` in n's bin (:func:`area_matched_pairs`; the mined pair itself always
    qualifies, so a bin is never empty when the mined boxes are candidates; otherwise the
    nearest non-empty bin is used and counted in ``fallbacks``). Drawn with its own
    generator, ``default_rng([seed, 1])``, so the other figures are those of earlier versions.

    ``shared_class``: the same figures restricted to image pairs whose two images hold at
    least one common ground-truth class; on the other image pairs no pair can be correct,
    so this separates "the KNN found the wrong images" from "the pairs are wrong".

    Intervals (``*_ci95``): percentile bootstrap over image pairs (the unit: the pairs of one
    image pair are not independent), ``n_boot`` resamples, the same resamples for every
    figure, so lift intervals are paired. ``knn_share_ci95`` resamples KNN image pairs.

    KNN quality: the share of (image, KNN neighbour) pairs, both labelled, whose images
    have at least one class in common; its baseline replaces each neighbour by a random
    other labelled image. ``top1_precision`` counts only the best-scored pair per
    neighbour (rank 0).

    Raises ValueError when no correspondence image is labelled (wrong labels for these
    images, or a different images root).
    """
    rng = np.random.default_rng(seed)
    rng_area = np.random.default_rng([seed, 1])
    keys = _resolve(corr, gt)
    labelled = list(keys)
    if not labelled:
        raise ValueError("no image of the correspondence file has ground-truth labels; check "
                         "that the labels belong to the images that were mined")
    K = len(gt.classes)
    edges = area_bin_edges([corr.boxes[i] for i in labelled], area_bins)
    mined = _counts()
    top1 = _counts()
    rand = _counts()
    area = _counts()
    fallbacks = 0
    bin_index: dict[int, BinIndex] = {}
    knn_pairs: list[tuple[int, int]] = []
    rows = []  # per image pair with counted pairs: mined n, correct; random n, c; area n, c; top1 n, c
    shared_rows = []
    for i in labelled:
        for k, j in enumerate(corr.knn[i]):
            j = int(j)
            if j < 0 or j not in keys:
                continue
            knn_pairs.append((i, j))
            arr = corr.pairs[i][k].reshape(-1, 8)
            if len(arr) == 0:
                continue
            q_obj, n_obj = gt[keys[i]], gt[keys[j]]
            ok = pairs_correct(arr[:, :4], arr[:, 4:], q_obj, n_obj, K, iou_threshold, rule)
            rnd = _random_pairs_correct(corr, i, j, len(arr), q_obj, n_obj, K, iou_threshold, rng, rule)
            for m in (i, j):
                if m not in bin_index:
                    bin_index[m] = _bin_index(corr.boxes[m], edges)
            qa, na, fb = area_matched_pairs(arr[:, :4], arr[:, 4:], bin_index[i], bin_index[j],
                                            edges, rng_area)
            fallbacks += fb
            am = pairs_correct(qa, na, q_obj, n_obj, K, iou_threshold, rule) if len(qa) else np.zeros(0, bool)
            for c, v in ((mined, ok), (top1, ok[:1]), (rand, rnd), (area, am)):
                _add(c, v)
            rows.append((len(ok), ok.sum(), len(rnd), rnd.sum(), len(am), am.sum(), 1, ok[0]))
            shared_rows.append(bool(gt.image_classes(keys[i]) & gt.image_classes(keys[j])))
    rows_arr = np.asarray(rows, dtype=np.float64).reshape(-1, 8)
    shared_arr = np.asarray(shared_rows, dtype=bool)
    ci = _precision_cis(rows_arr, n_boot, seed)
    sub = rows_arr[shared_arr]
    ci_sub = _precision_cis(sub, n_boot, seed)
    s = [int(v) for v in (sub.sum(axis=0) if len(sub) else np.zeros(8))]
    shared_share = np.asarray([bool(gt.image_classes(keys[i]) & gt.image_classes(keys[j]))
                               for i, j in knn_pairs], dtype=np.float64)
    rand_pairs = _random_image_pairs(knn_pairs, labelled, rng)
    rand_share = np.asarray([bool(gt.image_classes(keys[i]) & gt.image_classes(keys[j]))
                             for i, j in rand_pairs], dtype=np.float64)
    return {
        "iou_threshold": float(iou_threshold),
        "rule": rule,
        "seed": seed,
        "images": {"total": len(corr), "labelled": len(labelled)},
        "pairs_total": corr.num_pairs,
        "pairs": mined["n"],
        "correct": mined["correct"],
        "precision": _ratio(mined["correct"], mined["n"]),
        "precision_ci95": ci["precision"],
        "top1_precision": _ratio(top1["correct"], top1["n"]),
        "top1_precision_ci95": ci["top1"],
        "random": {"pairs": rand["n"], "correct": rand["correct"],
                   "precision": _ratio(rand["correct"], rand["n"]), "precision_ci95": ci["random"]},
        "lift": _lift(mined, rand),
        "lift_ci95": ci["lift"],
        "random_area_matched": {"pairs": area["n"], "correct": area["correct"],
                                "precision": _ratio(area["correct"], area["n"]),
                                "precision_ci95": ci["area"], "fallbacks": fallbacks},
        "lift_area_matched": _lift(mined, area),
        "lift_area_matched_ci95": ci["lift_area"],
        "area_bins": int(len(edges) + 1),
        "area_bin_edges_px2": [float(e) for e in np.exp(edges)],
        "shared_class": {
            "image_pairs": int(len(sub)), "pairs": s[0], "correct": s[1],
            "precision": _ratio(s[1], s[0]), "precision_ci95": ci_sub["precision"],
            "random_precision": _ratio(s[3], s[2]), "random_precision_ci95": ci_sub["random"],
            "random_area_matched_precision": _ratio(s[5], s[4]),
            "random_area_matched_precision_ci95": ci_sub["area"],
            "lift": _lift({"n": s[0], "correct": s[1]}, {"n": s[2], "correct": s[3]}),
            "lift_ci95": ci_sub["lift"],
            "lift_area_matched": _lift({"n": s[0], "correct": s[1]}, {"n": s[4], "correct": s[5]}),
            "lift_area_matched_ci95": ci_sub["lift_area"],
        },
        "knn": _image_pair_share(knn_pairs, keys, gt),
        "knn_share_ci95": list(bootstrap_ci(shared_share, n_boot, seed)),
        "knn_random": _image_pair_share(rand_pairs, keys, gt),
        "knn_random_share_ci95": list(bootstrap_ci(rand_share, n_boot, seed)),
        "n_boot": n_boot,
    }


def _precision_cis(rows: np.ndarray, n_boot: int, seed: int) -> dict[str, list]:
    """Bootstrap intervals over image pairs from (M, 8) per-image-pair counts
    [mined n, correct, random n, correct, area-matched n, correct, top-1 n, correct]."""
    cols = {"precision": (rows[:, 1], rows[:, 0]), "random": (rows[:, 3], rows[:, 2]),
            "area": (rows[:, 5], rows[:, 4]), "top1": (rows[:, 7], rows[:, 6])}
    out = bootstrap_ratio_cis(cols, n_boot, seed,
                              ratios_of={"lift": ("precision", "random"), "lift_area": ("precision", "area")})
    return {k: list(v) for k, v in out.items()}


# -- box-size bins --------------------------------------------------------------------------
def _log_area(boxes: npt.ArrayLike) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    wh = np.clip(b[:, 2:] - b[:, :2], 0, None)
    return np.log(np.maximum(wh[:, 0] * wh[:, 1], 1e-6))


def area_bin_edges(boxes_list: Sequence[npt.ArrayLike], n_bins: int = 5) -> np.ndarray:
    """(n_bins - 1,) inner edges, in log pixel area, of ``n_bins`` quantile bins of the areas
    of all boxes in ``boxes_list`` (arrays (B_i, 4) xyxy). Equal-count bins adapt to the
    proposals' size distribution. Empty input gives no edges (a single bin)."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    la = np.concatenate([_log_area(b) for b in boxes_list]) if len(boxes_list) else np.zeros(0)
    if len(la) == 0 or n_bins == 1:
        return np.zeros(0)
    return np.quantile(la, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])


def area_bin(boxes: npt.ArrayLike, edges: np.ndarray) -> np.ndarray:
    """(B, 4) xyxy -> (B,) int bin index in [0, len(edges)] of each box's log area."""
    return np.searchsorted(edges, _log_area(boxes), side="right")


def _bin_index(cands: npt.ArrayLike, edges: np.ndarray) -> BinIndex:
    """Candidates grouped by area bin, built once per image: ((B, 4) boxes, (B,) candidate
    order sorted by bin, (n_bins,) counts, (n_bins,) start of each bin in that order)."""
    cands = np.asarray(cands, dtype=np.float64).reshape(-1, 4)
    cb = area_bin(cands, edges)
    counts = np.bincount(cb, minlength=len(edges) + 1)
    return cands, np.argsort(cb, kind="stable"), counts, np.r_[0, np.cumsum(counts)[:-1]]


def _draw_same_bin(boxes: np.ndarray, index: BinIndex, edges: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One uniform random candidate per box, from the candidates in that box's area bin.
    Returns ((P, 4) drawn boxes, number of boxes whose bin had no candidate: those draw from
    the nearest non-empty bin, the lower one on a tie)."""
    cands, order, counts, starts = index
    target = area_bin(boxes, edges)
    empty = counts[target] == 0
    if empty.any():
        full = np.flatnonzero(counts)
        target = target.copy()
        target[empty] = full[np.abs(full[None, :] - target[empty][:, None]).argmin(axis=1)]
    pick = order[starts[target] + rng.integers(0, counts[target])]
    return cands[pick], int(empty.sum())


def area_matched_pairs(q_boxes: npt.ArrayLike, n_boxes: npt.ArrayLike, q_cands: npt.ArrayLike | BinIndex,
                       n_cands: npt.ArrayLike | BinIndex, edges: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """For P mined pairs ((P, 4) query boxes, (P, 4) neighbour boxes), P random candidate
    pairs from ``q_cands`` x ``n_cands`` ((Bq, 4), (Bk, 4) xyxy) with the same area bins:
    the drawn query box is uniform among the query candidates in the mined query box's bin,
    the drawn neighbour box likewise, independently. Returns ((P, 4), (P, 4), fallbacks),
    fallbacks counting boxes (query and neighbour) drawn from a neighbouring bin because
    theirs held no candidate; empty arrays when either candidate set is empty.
    ``q_cands`` / ``n_cands`` may also be ``_bin_index`` tuples (built once per image)."""
    q_idx = q_cands if isinstance(q_cands, tuple) else _bin_index(q_cands, edges)
    n_idx = n_cands if isinstance(n_cands, tuple) else _bin_index(n_cands, edges)
    q_boxes = np.asarray(q_boxes, dtype=np.float64).reshape(-1, 4)
    n_boxes = np.asarray(n_boxes, dtype=np.float64).reshape(-1, 4)
    if len(q_idx[0]) == 0 or len(n_idx[0]) == 0 or len(q_boxes) == 0:
        return np.zeros((0, 4)), np.zeros((0, 4)), 0
    qa, fq = _draw_same_bin(q_boxes, q_idx, edges, rng)
    na, fn = _draw_same_bin(n_boxes, n_idx, edges, rng)
    return qa, na, fq + fn


def _counts() -> dict[str, int]:
    return {"n": 0, "correct": 0}


def _add(c: dict[str, int], ok: np.ndarray) -> None:
    c["n"] += int(len(ok))
    c["correct"] += int(np.sum(ok))


def _lift(mined: dict[str, int], rand: dict[str, int]) -> float | None:
    p, r = _ratio(mined["correct"], mined["n"]), _ratio(rand["correct"], rand["n"])
    return p / r if p is not None and r else None


def _random_pairs_correct(corr: Correspondence, i: int, j: int, n: int, q_obj: ImageObjects, n_obj: ImageObjects,
                          K: int, thr: float, rng: np.random.Generator, rule: str = "iou") -> np.ndarray:
    """(n,) bool for n random (box of image i, box of image j) pairs; empty if either
    image has no filtered boxes."""
    bi, bj = np.asarray(corr.boxes[i]).reshape(-1, 4), np.asarray(corr.boxes[j]).reshape(-1, 4)
    if len(bi) == 0 or len(bj) == 0:
        return np.zeros(0, dtype=bool)
    qa = bi[rng.integers(len(bi), size=n)]
    na = bj[rng.integers(len(bj), size=n)]
    return pairs_correct(qa, na, q_obj, n_obj, K, thr, rule)


# -- pair ranking ---------------------------------------------------------------------------
@contextmanager
def _single_thread_blas() -> Iterator[None]:
    """One BLAS thread for many tiny (40 x 512) @ (512 x 40) products: on a busy machine a
    multi-threaded BLAS made pair_ranking_auc 5-15x slower than a single thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def pair_ranking_auc(
    corr: Correspondence, feats: list[np.ndarray], gt: GroundTruth, rule: str = "ioa",
    threshold: float = 0.5, n_boot: int = 1000, seed: int = 0, knn: np.ndarray | None = None,
    area_bins: int = 5, keep_per_pair: bool = False,
) -> dict[str, Any]:
    """How well RoI similarity ranks same-class box pairs above the rest: ROC-AUC, chance 0.5.

    Why: the mined pairs are the top few of each Bq x Bk similarity matrix, so their
    precision rests on a handful of pairs and cannot tell two backbones apart. This scores
    the whole matrix instead. For every (query image i, neighbour j = knn[i, k]) with both
    images labelled, every candidate pair (a, b) of ``corr.boxes[i]`` x ``corr.boxes[j]`` is
    scored by the cosine similarity ``feats[i][a] @ feats[j][b]`` and is *positive* when one
    class c is matched (:func:`matched_classes` under ``rule`` and ``threshold``) by box a in
    image i and by box b in image j. Per image pair, the AUC is the chance that a positive
    candidate outscores a negative one (ties 1/2, :func:`roc_auc`).

    feats: N arrays (B_i, C), L2-normalised, row-aligned with ``corr.boxes`` (as
    :func:`orl.mining.load_roi_features` returns them). knn: (N, K) neighbour indices, -1 for
    none; default ``corr.knn``, pass another to score the same features on other image pairs.

    Returns a dict:
    ``auc`` the mean per-image-pair AUC over ``image_pairs`` kept image pairs (those with
    both a positive and a negative candidate; the others have no AUC), each image pair
    weighing the same; ``ci95`` its percentile bootstrap interval over kept image pairs;
    ``ci95_by_query`` the same resampling query images with all their image pairs (a pair
    (i, j) and (j, i) are not independent, nor are the K pairs of one query: the honest,
    wider interval); ``image_pairs_labelled`` every KNN pair with both images labelled;
    ``candidates`` / ``positives`` / ``positive_rate`` over the candidate pairs of all
    labelled image pairs, and ``candidates_kept`` / ``positives_kept`` over kept ones;
    ``pooled_auc`` one AUC over all labelled candidates pooled, for reference only (it
    mixes the similarity scales of different image pairs, and image pairs with many boxes
    dominate); ``queries`` the query images with at least one kept pair.
    ``auc_area_matched`` (with ``ci95_area_matched`` and ``image_pairs_area_matched``): the
    same, but a positive is compared only with negatives whose two boxes fall in the same
    area bins as its own (``area_bins`` quantile bins of log area over all labelled images'
    boxes), i.e. the AUC within each (query bin, neighbour bin) cell, weighted by the cell's
    positive x negative count. Box size alone decides much of both the label (a small box
    lies on an object more often under IoA) and the similarity (large boxes share scene
    context), so a network can score off 0.5 on size alone; this one cannot.

    ``keep_per_pair`` adds ``per_pair``: {"query", "neighbour", "auc", "auc_area_matched"},
    one entry per kept image pair (area-matched None where no area cell holds both a positive
    and a negative), for :func:`paired_auc_difference`: two networks scored on the same image
    pairs and the same boxes differ by much less noise than their two intervals suggest.

    Raises ValueError when no correspondence image is labelled or ``feats`` is not aligned
    with ``corr.boxes``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown matching rule {rule!r}; valid: {', '.join(RULES)}")
    keys = _resolve(corr, gt)
    labelled = list(keys)
    if not labelled:
        raise ValueError("no image of the correspondence file has ground-truth labels; check "
                         "that the labels belong to the images that were mined")
    if len(feats) != len(corr):
        raise ValueError(f"{len(feats)} feature arrays for {len(corr)} correspondence images")
    knn = np.asarray(corr.knn if knn is None else knn, dtype=np.int64).reshape(len(corr), -1)
    K = len(gt.classes)
    matched: dict[int, np.ndarray] = {}
    unit: dict[int, np.ndarray] = {}
    for i in labelled:  # once per image, not once per image pair
        b = np.asarray(corr.boxes[i], dtype=np.float64).reshape(-1, 4)
        f = np.asarray(feats[i], dtype=np.float32)
        if f.ndim != 2 or len(f) != len(b):
            raise ValueError(f"features of image {i} ({corr.files[i]}) have shape {f.shape}, "
                             f"but it has {len(b)} boxes")
        matched[i] = matched_classes(b, gt[keys[i]], K, threshold, rule).astype(np.float32)
        unit[i] = f
    edges = area_bin_edges([corr.boxes[i] for i in labelled], area_bins)
    bins = {i: area_bin(np.asarray(corr.boxes[i], dtype=np.float64).reshape(-1, 4), edges) for i in labelled}
    n_cells = len(edges) + 1
    aucs, queries, all_s, all_y, area_aucs = [], [], [], [], []
    neighbours: list[int] = []
    area_per_pair: list[float | None] = []
    n_labelled = n_cand_kept = n_pos_kept = 0
    with _single_thread_blas():
        for i in labelled:
            for j in knn[i]:
                j = int(j)
                if j < 0 or j not in keys:
                    continue
                n_labelled += 1
                if len(unit[i]) == 0 or len(unit[j]) == 0:
                    continue
                pos = (matched[i] @ matched[j].T) > 0  # (Bi, Bj): one class in common
                s = unit[i] @ unit[j].T
                all_s.append(s.reshape(-1))
                all_y.append(pos.reshape(-1))
                auc = roc_auc(s, pos)
                if auc is not None:
                    aucs.append(auc)
                    queries.append(i)
                    neighbours.append(j)
                    n_cand_kept += pos.size
                    n_pos_kept += int(pos.sum())
                    a = _stratified_auc(s, pos, bins[i][:, None] * n_cells + bins[j][None, :])
                    area_per_pair.append(a)
                    if a is not None:
                        area_aucs.append(a)
    s_all = np.concatenate(all_s) if all_s else np.zeros(0)
    y_all = np.concatenate(all_y) if all_y else np.zeros(0, dtype=bool)
    aucs_arr, q_arr = np.asarray(aucs), np.asarray(queries, dtype=np.int64)
    _, q_inv = np.unique(q_arr, return_inverse=True)
    q_sum = np.bincount(q_inv, weights=aucs_arr) if len(aucs) else np.zeros(0)
    q_cnt = np.bincount(q_inv).astype(np.float64) if len(aucs) else np.zeros(0)
    by_query = bootstrap_ratio_cis({"auc": (q_sum, q_cnt)}, n_boot, seed)["auc"]
    n_pos = int(y_all.sum())
    extra: dict[str, Any] = {}
    if keep_per_pair:
        extra["per_pair"] = {"query": queries, "neighbour": neighbours, "auc": [float(a) for a in aucs],
                             "auc_area_matched": area_per_pair}
    return {
        "rule": rule,
        "threshold": float(threshold),
        "auc": float(aucs_arr.mean()) if len(aucs) else None,
        "ci95": list(bootstrap_ci(aucs_arr, n_boot, seed)),
        "ci95_by_query": list(by_query),
        "image_pairs": len(aucs),
        "image_pairs_labelled": n_labelled,
        "queries": len(q_sum),
        "candidates": int(len(y_all)),
        "positives": n_pos,
        "positive_rate": _ratio(n_pos, len(y_all)),
        "candidates_kept": n_cand_kept,
        "positives_kept": n_pos_kept,
        "pooled_auc": roc_auc(s_all, y_all) if len(y_all) else None,
        "auc_area_matched": float(np.mean(area_aucs)) if area_aucs else None,
        "ci95_area_matched": list(bootstrap_ci(np.asarray(area_aucs), n_boot, seed)),
        "image_pairs_area_matched": len(area_aucs),
        "area_bins": int(area_bins),
        "n_boot": n_boot,
        "seed": seed,
        **extra,
    }


def paired_auc_difference(a: dict[str, Any], b: dict[str, Any], n_boot: int = 1000, seed: int = 0
                          ) -> dict[str, Any]:
    """Network A minus network B on the image pairs both scored: the paired comparison.

    ``a`` and ``b`` are ``per_pair`` dicts of :func:`pair_ranking_auc` computed on the same
    image pairs and the same boxes (fixed image pairs, one selective search), so each image
    pair's difference removes what the two share (how hard that pair is) and leaves what the
    features change. Returns, for ``auc`` and ``auc_area_matched``: ``diff`` the mean
    difference over the image pairs both have (area-matched: both defined), ``ci95`` its
    percentile bootstrap interval resampling query images with all their image pairs (the K
    pairs of one query are not independent: the honest interval), ``ci95_by_pair``
    resampling image pairs, ``pairs``, and ``a_higher`` the share of pairs where A scores
    higher. A ``diff`` whose ``ci95`` excludes 0 is a difference beyond the sampling noise of
    the image pairs (not of training: one seed says nothing about another).
    """
    def index(p: dict[str, Any], field: str) -> dict[tuple[int, int], float]:
        return {(int(q), int(k)): float(v) for q, k, v in zip(p["query"], p["neighbour"], p[field], strict=True)
                if v is not None}

    out: dict[str, Any] = {}
    for field in ("auc", "auc_area_matched"):
        ia, ib = index(a, field), index(b, field)
        keys = sorted(set(ia) & set(ib))
        d = np.asarray([ia[k] - ib[k] for k in keys], dtype=np.float64)
        q = np.asarray([k[0] for k in keys], dtype=np.int64)
        if len(d) == 0:
            out[field] = {"diff": None, "ci95": [None, None], "ci95_by_pair": [None, None], "pairs": 0,
                          "a_higher": None}
            continue
        _, q_inv = np.unique(q, return_inverse=True)
        per_query = (np.bincount(q_inv, weights=d), np.bincount(q_inv).astype(np.float64))
        by_query = bootstrap_ratio_cis({"d": per_query}, n_boot, seed)["d"]
        out[field] = {"diff": float(d.mean()), "ci95": list(by_query),
                      "ci95_by_pair": list(bootstrap_ci(d, n_boot, seed)), "pairs": len(d),
                      "a_higher": float(np.mean(d > 0))}
    return out


def _stratified_auc(scores: np.ndarray, labels: np.ndarray, cells: np.ndarray) -> float | None:
    """AUC counting only (positive, negative) comparisons within the same cell: the sum over
    cells of AUC_c x P_c x N_c, over the sum of P_c x N_c. None when no cell holds both."""
    scores, labels, cells = scores.reshape(-1), labels.reshape(-1), cells.reshape(-1)
    num = den = 0.0
    for c in np.unique(cells[labels]):
        m = cells == c
        y = labels[m]
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        auc = roc_auc(scores[m], y) if n_pos and n_neg else None
        if auc is not None:
            num += auc * n_pos * n_neg
            den += n_pos * n_neg
    return num / den if den else None
