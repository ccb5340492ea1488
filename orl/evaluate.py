"""Frozen-feature evaluation of a backbone against ground-truth labels.

Two protocols, both on features of a frozen network (eval mode, no gradients), because
they measure what self-supervision learned without any fine-tuning confound:

* **object probe**: every ground-truth box is cut out, warped to the model's image size
  and embedded (pooled res5, L2-normalised). Train-split crops fit a kNN classifier and a
  logistic-regression probe; val-split crops score them. ORL claims better object-level
  features, and this is the most direct check of that claim.
* **VOC07-style SVM** (the authors' image-classification benchmark): the whole image is
  squashed to S x S, its res5 map average-pooled to 2 x 2 cells, and one linear SVM per
  class is trained on train images and scored by average precision on val images.

Lower-level functions take a backbone module directly (benchmarks call them);
:func:`evaluate_checkpoint` wires everything to a checkpoint file.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from orl.augment import crop_patch, squash_transform, to_tensor_batch
from orl.images import ImageError, load_rgb
from orl.labels import GroundTruth, load_labels
from orl.models.backbones import Backbone

KNN_K = 20
KNN_TEMPERATURE = 0.07
MIN_BOX_SIDE = 32.0
LINEAR_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
LINEAR_CV_FOLDS = 3
LINEAR_MAX_ITER = 300
SVM_COSTS = (1.0, 10.0, 100.0)
SVM_FOLDS = 3


# -- feature extraction ---------------------------------------------------------------------
@contextmanager
def frozen(module: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` in eval mode with gradients off; restore its mode after.

    Eval mode makes BatchNorm use its running statistics, so a crop's feature does not
    depend on the other crops in its batch. The module stays on ``device`` afterwards.
    """
    was_training = module.training
    module.to(device).eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C) globally average-pooled res5 features, L2-normalised."""
    return F.normalize(backbone(x).float(), dim=1)


def pooled_2x2_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 4C): the VOC07 SVM feature, L2-normalised.

    The res5 map (B, C, H, W) is average-pooled with kernel (H-1, W-1) and stride 1, which
    leaves exactly 2 x 2 overlapping cells (ResNet-50 at 224: 7 x 7 map, 6 x 6 kernel,
    2 x 2 x 2048 = 8192 dims), then flattened channel-major. Needs H, W >= 2, so S >= 64.
    """
    fmap = cast(Backbone, backbone).forward_features(x).float()  # or any module with forward_features
    h, w = fmap.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"res5 map is {h}x{w}; the 2x2 SVM pooling needs an image size >= 64")
    cells = F.avg_pool2d(fmap, kernel_size=(h - 1, w - 1), stride=1)
    return F.normalize(cells.flatten(1), dim=1)


def recompute_bn_stats(
    backbone: nn.Module,
    images_root: str | os.PathLike,
    paths: list[str],
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_images: int | None = None,
) -> int:
    """Re-estimate every BatchNorm's running mean / variance on real images; returns the
    number of images used.

    Why: a freshly initialised network has running statistics 0 / 1, so in eval mode its
    BatchNorm layers do not normalise at all and activations blow up or vanish with depth.
    Such a network is not "random weights with data statistics", the fair untrained
    baseline; this makes it one (and refreshes a trained network's statistics for a new
    image set).

    How: each BatchNorm's running stats are reset and its momentum set to None (a
    cumulative average); the images (``images_root / path``, squashed to ``image_size``
    squared by :func:`orl.augment.squash_transform`, as in evaluation) are passed forward in
    train mode without gradients, so every layer sees inputs normalised by batch statistics,
    as in training. The result is the mean over batches of each batch's mean and unbiased
    variance (PyTorch's momentum=None rule); batches are made near-equal in size
    (``ceil(n / batch_size)`` batches differing by at most one image), so that this is
    close to the per-image average. Weights are untouched; each module's train/eval mode
    and each BatchNorm's momentum are restored afterwards, and the module stays on
    ``device``. With ``max_images``, that many paths evenly spaced over ``paths`` are used.
    Unreadable images are skipped; if none is readable (or on an error) the original
    statistics are put back and 0 is returned. A module without BatchNorm gives 0.
    """
    bns = [m for m in backbone.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    paths = list(paths)
    if max_images is not None and len(paths) > max_images:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max(0, max_images)).round().astype(int)]
    if not bns or not paths:
        return 0
    modes = {m: m.training for m in backbone.modules()}
    momenta = [m.momentum for m in bns]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    tf = squash_transform(image_size)
    used = 0
    try:
        backbone.to(device)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        backbone.train()
        with torch.no_grad():
            for chunk in np.array_split(np.arange(len(paths)), math.ceil(len(paths) / batch_size)):
                images = [im for im in (_load_or_none(Path(images_root) / paths[i]) for i in chunk) if im is not None]
                if images:
                    backbone(to_tensor_batch(images, tf).to(device))
                    used += len(images)
    except BaseException:
        used = 0
        raise
    finally:
        for m, mom, state in zip(bns, momenta, saved, strict=True):
            m.momentum = mom
            if used == 0:
                m.load_state_dict(state)
        for mod, was in modes.items():
            mod.training = was
    return used


def _load_or_none(path: Path) -> Image.Image | None:
    try:
        return load_rgb(path)
    except ImageError:
        return None


def embed_gt_crops(
    backbone: nn.Module,
    gt: GroundTruth,
    paths: list[str],
    image_size: int,
    min_box_side: float = MIN_BOX_SIDE,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Embed every ground-truth box of ``paths`` whose sides are both >= ``min_box_side``.

    The default of 32 px leaves out boxes too small to carry their class once warped up
    (a 16 px box is a few pixels of res5 context); they made the probe a test of tiny-box
    noise and pushed every method toward the majority class.

    Each box is cut from the original image and warped to ``image_size`` squared (the
    aspect ratio is not kept, as in the mining stage). Returns (N, C) float32 L2-normalised
    features, (N,) int64 class ids, and counts {kept, skipped_small, skipped_images}.
    Boxes are batched across images; each image is decoded once.
    """
    tf = squash_transform(image_size)
    feats: list[np.ndarray] = []
    labels: list[int] = []
    batch: list[Image.Image] = []
    batch_labels: list[int] = []
    counts = {"kept": 0, "skipped_small": 0, "skipped_images": 0}

    def flush() -> None:
        if batch:
            x = to_tensor_batch(batch, tf).to(device)
            feats.append(pooled_features(backbone, x).cpu().numpy())
            labels.extend(batch_labels)
            batch.clear()
            batch_labels.clear()

    with frozen(backbone, device):
        for rel in paths:
            obj = gt[rel]
            wh = obj.boxes[:, 2:] - obj.boxes[:, :2]
            ok = (wh >= min_box_side).all(axis=1)
            counts["skipped_small"] += int((~ok).sum())
            if not ok.any():
                continue
            image = _load_or_none(Path(gt.images_root) / rel)
            if image is None:
                counts["skipped_images"] += 1
                continue
            for box, cls in zip(obj.boxes[ok], obj.class_ids[ok], strict=True):
                batch.append(crop_patch(image, box, image_size))
                batch_labels.append(int(cls))
                if len(batch) >= batch_size:
                    flush()
        flush()
    counts["kept"] = len(labels)
    dim = getattr(backbone, "out_channels", 0)
    x = np.concatenate(feats) if feats else np.zeros((0, dim), dtype=np.float32)
    return x.astype(np.float32), np.asarray(labels, dtype=np.int64), counts


def embed_images_2x2(
    backbone: nn.Module,
    images_root: str | os.PathLike,
    paths: list[str],
    image_size: int = 224,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, list[str]]:
    """Whole images squashed to ``image_size`` squared -> (N, 4C) 2x2-pooled features.

    Returns the features and the paths they belong to (unreadable images are left out).
    """
    tf = squash_transform(image_size)
    feats: list[np.ndarray] = []
    kept: list[str] = []
    batch: list[Image.Image] = []

    def flush() -> None:
        if batch:
            x = to_tensor_batch(batch, tf).to(device)
            feats.append(pooled_2x2_features(backbone, x).cpu().numpy())
            batch.clear()

    with frozen(backbone, device):
        for rel in paths:
            image = _load_or_none(Path(images_root) / rel)
            if image is None:
                continue
            batch.append(image)
            kept.append(rel)
            if len(batch) >= batch_size:
                flush()
        flush()
    x = np.concatenate(feats) if feats else np.zeros((0, 4 * getattr(backbone, "out_channels", 0)))
    return x.astype(np.float32), kept


# -- classifiers on features ----------------------------------------------------------------
def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = KNN_K,
    weighting: str = "similarity",
    temperature: float = KNN_TEMPERATURE,
) -> np.ndarray:
    """Cosine kNN: (N, D), (N,), (M, D) -> (M,) predicted labels.

    Features are L2-normalised here, so the dot product is the cosine similarity. Each of
    the k most similar train samples votes for its label: with weight 1 ("majority") or
    with weight exp(s / temperature) ("similarity", the weighted vote of Wu et al. 2018;
    it is positive for any s, unlike raw s, and lets the nearest samples dominate; computed
    as exp((s - 1) / temperature), the same vote up to a constant, without overflow). Ties go
    to the smallest label. k is capped at the number of train samples.
    """
    if weighting not in ("majority", "similarity"):
        raise ValueError("weighting must be 'majority' or 'similarity'")
    tr = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    te = test_x / np.maximum(np.linalg.norm(test_x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(tr))
    sim = te @ tr.T  # (M, N)
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (M, k)
    top_sim = np.take_along_axis(sim, top, axis=1)
    w = np.ones_like(top_sim) if weighting == "majority" else np.exp((top_sim - 1.0) / temperature)
    classes, y_idx = np.unique(train_y, return_inverse=True)
    votes = np.zeros((len(te), len(classes)))
    np.add.at(votes, (np.repeat(np.arange(len(te)), k), y_idx[top].reshape(-1)), w.reshape(-1))
    return classes[votes.argmax(axis=1)]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Single-threaded BLAS / OpenMP for small fits: on a shared machine, threads fighting
    over cores made an lbfgs fit of a 1,000 x 512 problem 30x slower than one thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1), warnings.catch_warnings():
        from sklearn.exceptions import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)
        # sklearn's "more unique classes than half the samples" hint: a probe on a handful
        # of crops (tests, the quick study) is legitimately like that.
        warnings.filterwarnings("ignore", message="The number of unique classes", category=UserWarning)
        yield


def _logreg(C: float, max_iter: int, seed: int, warm_start: bool = False) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed, warm_start=warm_start)


def linear_probe_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, seed: int = 0, max_iter: int = 1000,
    C: float = 1.0,
) -> np.ndarray:
    """Multinomial logistic regression on standardised features -> (M,) predicted labels.

    Standardising (train mean / std) puts every dimension on one scale, so an L2 strength
    ``C`` means the same for any backbone (:func:`linear_probe_cv` picks it). lbfgs is
    deterministic; the seed is passed for completeness.
    """
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    with _one_thread():
        clf = _logreg(C, max_iter, seed).fit(scaler.transform(train_x), train_y)
        return clf.predict(scaler.transform(test_x))


def stratified_folds(y: np.ndarray, folds: int) -> np.ndarray:
    """(N,) labels -> (N,) fold ids in [0, folds): deterministic, stratified, and defined for
    any class size.

    Samples of each class, in index order, are dealt to folds round-robin, each class
    starting one fold after the previous class, so classes with one or two samples are
    spread over the folds instead of all landing in fold 0. (sklearn's StratifiedKFold
    refuses or warns when a class has fewer samples than folds; object labels always have
    such classes.)
    """
    y = np.asarray(y)
    out = np.empty(len(y), dtype=np.int64)
    for c_idx, c in enumerate(np.unique(y)):
        members = np.flatnonzero(y == c)
        out[members] = (np.arange(len(members)) + c_idx) % folds
    return out


def linear_probe_cv(
    train_x: np.ndarray, train_y: np.ndarray, c_grid: Sequence[float] = LINEAR_C_GRID, folds: int = LINEAR_CV_FOLDS,
    seed: int = 0, max_iter: int = LINEAR_MAX_ITER,
) -> dict[str, Any]:
    """Choose the logistic-regression C by ``folds``-fold cross-validation on TRAIN only.

    Folds from :func:`stratified_folds`; the scaler is fit on each fold's training part.
    The score of a C is the accuracy pooled over all held-out samples (a held-out sample
    whose class is absent from its fold's training part is wrong for every C, so it shifts
    all scores alike). The C grid is fitted in ascending order with warm starts (the
    solution at one C starts the next). Highest score wins, ties to the smaller C (stronger
    regularisation). Returns {"C", "cv": True, "cv_acc": {str(C): acc}}; with no usable
    fold (fewer samples than folds, or a fold leaving one class) C = 1.0 and ``cv`` False.
    """
    from sklearn.preprocessing import StandardScaler

    grid = sorted(float(c) for c in c_grid)
    fold = stratified_folds(train_y, folds)
    correct = {c: 0 for c in grid}
    scored = 0
    with _one_thread():
        for f in range(folds):
            tr, te = fold != f, fold == f
            if te.sum() == 0 or len(np.unique(train_y[tr])) < 2:
                continue
            scaler = StandardScaler().fit(train_x[tr])
            xtr, xte = scaler.transform(train_x[tr]), scaler.transform(train_x[te])
            clf = _logreg(grid[0], max_iter, seed, warm_start=True)
            for c in grid:
                clf.set_params(C=c).fit(xtr, train_y[tr])
                correct[c] += int((clf.predict(xte) == train_y[te]).sum())
            scored += int(te.sum())
    if scored == 0:
        return {"C": 1.0, "cv": False, "cv_acc": {}}
    acc = {c: correct[c] / scored for c in grid}
    best = max(grid, key=lambda c: (acc[c], -c))
    return {"C": best, "cv": True, "cv_acc": {str(c): v for c, v in acc.items()}}


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float | None:
    """Mean per-class recall over the classes present in ``y_true``; None for no samples.

    Unlike accuracy it does not reward predicting the frequent classes: every class present
    weighs the same. Chance for it is 1 / (number of classes present), see
    :func:`probe_scores`.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return None
    classes, inv = np.unique(y_true, return_inverse=True)
    hits = np.bincount(inv, weights=(y_true == y_pred).astype(np.float64), minlength=len(classes))
    return float(np.mean(hits / np.bincount(inv, minlength=len(classes))))


def probe_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
    k: int = KNN_K, seed: int = 0, n_boot: int = 1000, c_grid: Sequence[float] = LINEAR_C_GRID,
    cv_folds: int = LINEAR_CV_FOLDS,
) -> dict[str, Any]:
    """kNN (both votes) and linear-probe accuracy of val samples on train samples, with
    balanced accuracies, chance levels and bootstrap intervals.

    Val samples whose class never occurs in train cannot be classified correctly by any
    method; they are left out of every figure and counted as ``val_unseen_class``.

    Figures, each on the L scored val samples' classes:
    ``*_acc``: accuracy. ``*_balanced_acc``: mean per-class recall over the L classes
    (:func:`balanced_accuracy`). ``majority_acc``: accuracy of always answering the most
    frequent train class (ties: the smallest id), the chance level of accuracy: a probe
    must beat it to show any class information (with skewed classes it can exceed every
    kNN score). ``balanced_chance`` = 1 / L: any predictor that ignores its input, answering
    class c with probability q_c, has expected recall q_c on class c and so expected
    balanced accuracy (1 / L) * sum of q_c over the L classes <= 1 / L, with equality when
    it only answers val classes; a constant answer (the majority predictor included, if its
    class occurs in val) gets exactly 1 / L. So 1 / L is the chance of balanced accuracy,
    whatever the class frequencies. ``majority_balanced_acc`` is the majority predictor's.

    ``<figure>_ci95``: percentile bootstrap interval over val samples (``n_boot``
    resamples, seed ``seed``; crops of one image are treated as independent, so the
    intervals are a little narrow). The linear probe's C comes from
    :func:`linear_probe_cv` on the train samples only (``linear_C``, ``linear_cv_acc``).
    Accuracies are None when there is nothing to score or fewer than 2 train classes.
    """
    from orl.metrics import bootstrap_ci, bootstrap_ci_stat

    seen = np.isin(test_y, train_y)
    test_x, test_y = test_x[seen], test_y[seen]
    n_cls = len(np.unique(train_y))
    n_val_cls = int(len(np.unique(test_y)))
    names = ("knn_acc", "knn_acc_majority", "linear_acc", "knn_balanced_acc", "knn_majority_balanced_acc",
             "linear_balanced_acc", "majority_acc", "majority_balanced_acc")
    out: dict[str, Any] = {
        "train_crops": int(len(train_y)), "val_crops": int(len(test_y)),
        "val_unseen_class": int((~seen).sum()), "train_classes": n_cls,
        "val_classes": n_val_cls, "knn_k": int(min(k, len(train_y))),
        **{n: None for n in names}, **{f"{n}_ci95": [None, None] for n in names},
        "majority_class": None, "balanced_chance": 1.0 / n_val_cls if n_val_cls else None,
        "linear_C": None, "linear_cv": False, "linear_cv_acc": {}, "n_boot": n_boot,
    }
    if len(test_y) == 0 or n_cls < 2:
        return out
    cv = linear_probe_cv(train_x, train_y, c_grid, cv_folds, seed)
    ids, counts = np.unique(train_y, return_counts=True)
    majority = int(ids[np.argmax(counts)])
    preds = {
        "knn": knn_predict(train_x, train_y, test_x, k, "similarity"),
        "knn_majority": knn_predict(train_x, train_y, test_x, k, "majority"),
        "linear": linear_probe_predict(train_x, train_y, test_x, seed, LINEAR_MAX_ITER, cv["C"]),
        "majority": np.full(len(test_y), majority),
    }
    acc_names = {"knn": "knn_acc", "knn_majority": "knn_acc_majority", "linear": "linear_acc",
                 "majority": "majority_acc"}
    _, inv = np.unique(test_y, return_inverse=True)

    def resampled_balanced(hit: np.ndarray) -> Callable[[np.ndarray], float]:
        def stat(idx: np.ndarray) -> float:  # balanced accuracy over the classes present in the resample
            total = np.bincount(inv[idx], minlength=n_val_cls)
            hits = np.bincount(inv[idx], weights=hit[idx], minlength=n_val_cls)
            return float(np.mean(hits[total > 0] / total[total > 0]))
        return stat

    for m, pred in preds.items():
        hit = (pred == test_y).astype(np.float64)
        bal = f"{m}_balanced_acc"
        out[acc_names[m]] = float(hit.mean())
        out[bal] = balanced_accuracy(test_y, pred)
        out[f"{acc_names[m]}_ci95"] = list(bootstrap_ci(hit, n_boot, seed))
        out[f"{bal}_ci95"] = list(bootstrap_ci_stat(resampled_balanced(hit), len(test_y), n_boot, seed))
    out.update(majority_class=majority, linear_C=cv["C"], linear_cv=cv["cv"], linear_cv_acc=cv["cv_acc"])
    return out


def object_probe(
    backbone: nn.Module, gt: GroundTruth, image_size: int, min_box_side: float = MIN_BOX_SIDE,
    batch_size: int = 32, device: str | torch.device = "cpu", k: int = KNN_K, seed: int = 0,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Object-level probe: embed GT crops of train and val images, then :func:`probe_scores`."""
    tr_x, tr_y, tr_n = embed_gt_crops(backbone, gt, gt.images("train"), image_size,
                                      min_box_side, batch_size, device)
    va_x, va_y, va_n = embed_gt_crops(backbone, gt, gt.images("val"), image_size,
                                      min_box_side, batch_size, device)
    out = probe_scores(tr_x, tr_y, va_x, va_y, k, seed, n_boot)
    out.update(image_size=int(image_size), min_box_side=float(min_box_side),
               skipped_small_boxes=tr_n["skipped_small"] + va_n["skipped_small"],
               skipped_images=tr_n["skipped_images"] + va_n["skipped_images"])
    return out


# -- VOC07 SVM ------------------------------------------------------------------------------
def _svm(cost: float, seed: int) -> Any:
    from sklearn.svm import LinearSVC

    # Positives weigh twice the negatives, as in the authors' VOC07 SVM benchmark.
    return LinearSVC(C=cost, class_weight={1: 2.0, 0: 1.0}, loss="squared_hinge", penalty="l2",
                     tol=1e-4, max_iter=2000, dual="auto", random_state=seed)


def _fit_svm(x: np.ndarray, y: np.ndarray, cost: float, seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _svm(cost, seed).fit(x, y)


def _cv_ap(x: np.ndarray, y: np.ndarray, cost: float, folds: int, seed: int) -> float:
    """Mean average precision of a ``folds``-fold stratified cross-validation on train."""
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedKFold

    aps = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = _fit_svm(x[tr], y[tr], cost, seed)
        aps.append(average_precision_score(y[te], clf.decision_function(x[te])))
    return float(np.mean(aps))


def svm_one_class(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
    costs: Sequence[float] = SVM_COSTS, folds: int = SVM_FOLDS, seed: int = 0,
) -> dict[str, Any]:
    """One binary class: pick C by CV AP on train, refit on all train, AP on val.

    train_y / val_y are (N,) {0, 1}. With fewer than ``folds`` positives or negatives in
    train, stratified CV cannot put one of each in every fold; then C = ``costs[0]`` is
    used without CV (``cv`` False), the strongest regularisation, a safe choice for very
    few examples.
    """
    from sklearn.metrics import average_precision_score

    n_pos = int(train_y.sum())
    cv = min(n_pos, len(train_y) - n_pos) >= folds
    cv_ap = {c: _cv_ap(train_x, train_y, c, folds, seed) for c in costs} if cv else {}
    cost = max(cv_ap, key=lambda c: (cv_ap[c], -c)) if cv else costs[0]
    clf = _fit_svm(train_x, train_y, cost, seed)
    ap = average_precision_score(val_y, clf.decision_function(val_x))
    return {"ap": float(ap), "cost": float(cost), "cv": cv,
            "cv_ap": {str(c): v for c, v in cv_ap.items()},
            "train_pos": n_pos, "val_pos": int(val_y.sum())}


def voc07_svm(
    train_x: np.ndarray, train_labels: np.ndarray, val_x: np.ndarray, val_labels: np.ndarray,
    class_names: list[str] | None = None, costs: Sequence[float] = SVM_COSTS, folds: int = SVM_FOLDS, seed: int = 0,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Per-class linear SVMs on (N, D) features with (N, K) {0, 1} multi-label targets.

    A class is fit when both train and val hold at least one positive and one negative
    image (otherwise AP is undefined or no SVM can be fit); the others are listed under
    ``skipped`` with the reason. Small classes (fewer than ``folds`` train positives or
    negatives) cannot be cross-validated: they are fit with C = ``costs[0]`` and scored,
    but kept out of the headline ``map``, because one or two examples give a very noisy
    AP. ``map`` is the mean AP over cross-validated classes, ``map_all`` over every fit
    class; either is None when it has no class. AP is sklearn's non-interpolated average
    precision (the authors' VOC07 code uses its own AP routine, so absolute numbers may
    differ slightly; comparisons between backbones do not depend on it).

    ``n_jobs`` > 1 fits classes in that many processes. The classes are independent and
    liblinear is single-threaded, so this is the only way the SVM (most of an evaluation's
    time) uses more than one core; results are identical to ``n_jobs=1``.
    """
    names = class_names or [str(i) for i in range(train_labels.shape[1])]
    per_class, skipped, todo = {}, {}, []
    for c, name in enumerate(names):
        ytr, yva = train_labels[:, c].astype(np.int64), val_labels[:, c].astype(np.int64)
        reason = _svm_skip_reason(ytr, yva)
        if reason:
            skipped[name] = reason
        else:
            todo.append((name, ytr, yva))
    if n_jobs > 1 and len(todo) > 1:
        from joblib import Parallel, delayed

        fits = Parallel(n_jobs=n_jobs)(delayed(svm_one_class)(train_x, ytr, val_x, yva, costs, folds, seed)
                                       for _, ytr, yva in todo)
    else:
        fits = [svm_one_class(train_x, ytr, val_x, yva, costs, folds, seed) for _, ytr, yva in todo]
    per_class = {name: r for (name, _, _), r in zip(todo, fits, strict=True)}
    cv_aps = [v["ap"] for v in per_class.values() if v["cv"]]
    all_aps = [v["ap"] for v in per_class.values()]
    return {"map": _mean_or_none(cv_aps), "map_all": _mean_or_none(all_aps),
            "classes_evaluated": len(cv_aps), "classes_small": len(all_aps) - len(cv_aps),
            "ap": {k: v["ap"] for k, v in per_class.items()}, "per_class": per_class,
            "skipped": skipped, "costs": [float(c) for c in costs], "folds": folds}


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _svm_skip_reason(ytr: np.ndarray, yva: np.ndarray) -> str | None:
    for split, y in (("train", ytr), ("val", yva)):
        if y.sum() == 0:
            return f"no positive {split} image"
        if y.sum() == len(y):
            return f"no negative {split} image"
    return None


def multi_hot(gt: GroundTruth, paths: list[str]) -> np.ndarray:
    """(N, K) uint8: entry [i, c] is 1 when image i holds an object of class c."""
    y = np.zeros((len(paths), len(gt.classes)), dtype=np.uint8)
    for i, p in enumerate(paths):
        y[i, gt[p].class_ids] = 1
    return y


def image_svm(
    backbone: nn.Module, gt: GroundTruth, image_size: int = 224, batch_size: int = 32,
    device: str | torch.device = "cpu", seed: int = 0, n_jobs: int = 1,
) -> dict[str, Any]:
    """The VOC07 SVM protocol on the labelled train / val images of ``gt``."""
    tr_x, tr_p = embed_images_2x2(backbone, gt.images_root, gt.images("train"), image_size,
                                  batch_size, device)
    va_x, va_p = embed_images_2x2(backbone, gt.images_root, gt.images("val"), image_size,
                                  batch_size, device)
    out = voc07_svm(tr_x, multi_hot(gt, tr_p), va_x, multi_hot(gt, va_p), gt.classes, seed=seed,
                    n_jobs=n_jobs)
    out.update(image_size=int(image_size), feature_dim=int(tr_x.shape[1]),
               train_images=len(tr_p), val_images=len(va_p))
    return out


# -- whole evaluation -----------------------------------------------------------------------
def evaluate_backbone(
    backbone: nn.Module, gt: GroundTruth, image_size: int, svm_image_size: int | None = None,
    batch_size: int = 32, device: str | torch.device = "cpu", seed: int = 0,
    min_box_side: float = MIN_BOX_SIDE,
) -> dict[str, Any]:
    """Both protocols on one backbone; returns {object_probe, svm, counts, timings_s}.

    ``image_size`` is the crop size of the object probe (use the training resolution);
    ``svm_image_size`` (default: ``image_size``) is S of the SVM protocol.
    """
    t0 = time.perf_counter()
    probe = object_probe(backbone, gt, image_size, min_box_side, batch_size, device, seed=seed)
    t1 = time.perf_counter()
    svm = image_svm(backbone, gt, svm_image_size or image_size, batch_size, device, seed)
    t2 = time.perf_counter()
    return {"counts": gt.summary(), "object_probe": probe, "svm": svm,
            "timings_s": {"object_probe": t1 - t0, "svm": t2 - t1}}


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    images_root: str | os.PathLike,
    labels_path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    image_size: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the online backbone of a checkpoint; return (and write to ``out``) a dict.

    ``image_size`` defaults to the checkpoint's training resolution
    (``config.augment.image_size``: 224 for the paper preset, 64 for tiny) and is used for
    both the crop probe and the SVM's S. The result is JSON-serialisable (NaN -> null).
    """
    from orl.checkpoint import load_model

    t0 = time.perf_counter()
    model, cfg, ckpt = load_model(checkpoint, map_location="cpu")
    gt = load_labels(images_root, labels_path)
    size = int(image_size or cfg.augment.image_size)
    t1 = time.perf_counter()
    torch.manual_seed(seed)
    result = evaluate_backbone(model.backbone, gt, size, size, batch_size, device, seed)
    result = {
        "checkpoint": str(checkpoint), "stage": ckpt.get("stage"), "preset": cfg.preset,
        "backbone": cfg.model.backbone, "position": ckpt.get("position"),
        "images_root": str(images_root), "labels_path": str(labels_path),
        "label_format": gt.format, "image_size": size, "device": str(device), "seed": seed,
        **result,
    }
    result["timings_s"].update(load=t1 - t0, total=time.perf_counter() - t0)
    result = to_jsonable(result)
    if out is not None:
        _write_json(result, Path(out))
    return result


def to_jsonable(x: Any) -> Any:
    """Plain python types only: numpy scalars/arrays converted, NaN and inf -> None."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
