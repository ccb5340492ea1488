"""Label-free signals of whether a network is learning, for the checkpoints of a run.

Labels say how good features are; these say, without any, whether training does anything
at all, so a run can be checked on images that have no labels, and a flat labelled metric
can be told apart from a network that never moved:

* **view retrieval** (:func:`view_retrieval_top1`): two BYOL views of each of N fixed
  images; the share of view-1 embeddings whose nearest view-2 embedding is their own
  image's. It is the instance-discrimination task self-supervision optimises, scored on
  frozen pooled features. Chance is 1 / N; a collapsed network (every embedding equal)
  scores exactly 1 / N.
* **effective rank** (:func:`effective_rank`): how many dimensions the embeddings of the
  same images spread over (Roy & Vetterli 2007; used as a collapse monitor by RankMe,
  Garrido et al. 2023). Collapse drives it toward 1 (or 0 for identical embeddings).

Both use a fixed image set and a fixed augmentation seed, so values of different
checkpoints are comparable. A random-init network evaluated in eval mode uses BatchNorm
running statistics of 0 / 1; for a "random weights with data statistics" baseline call
:func:`orl.evaluate.recompute_bn_stats` on it first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch import nn

from orl.augment import byol_pipeline, squash_transform, to_tensor_batch
from orl.evaluate import frozen, pooled_features
from orl.images import ImageError, load_rgb


def _as_images(images: Iterable[Image.Image | str | os.PathLike]) -> list[Image.Image]:
    """PIL images pass through; paths are decoded with :func:`orl.images.load_rgb`."""
    return [im if isinstance(im, Image.Image) else load_rgb(im) for im in images]


def _embed(backbone: nn.Module, x: torch.Tensor, batch_size: int, device: str | torch.device) -> np.ndarray:
    """(N, 3, S, S) -> (N, C) float32 pooled L2-normalised features of the frozen backbone."""
    out = []
    with frozen(backbone, device):
        for s in range(0, len(x), batch_size):
            out.append(pooled_features(backbone, x[s : s + batch_size].to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def two_views(images: list[Image.Image], image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) view-1 and view-2 tensors of N PIL images under the BYOL pipelines.

    The views are drawn under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``,
    so they are the same on every call (and for every checkpoint) and the caller's global
    torch RNG state is left exactly as it was (torchvision's random transforms draw from it).
    """
    t1, t2 = byol_pipeline(1, image_size), byol_pipeline(2, image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        v1 = torch.stack([t1(im) for im in images])
        v2 = torch.stack([t2(im) for im in images])
    return v1, v2


def retrieval_top1(z1: np.ndarray, z2: np.ndarray) -> float:
    """(N, D), (N, D) L2-normalised -> share of rows i whose most similar row of ``z2`` is i.

    A tie at the maximum counts 1 / (number tied) when row i is among them, the expected
    score under random tie-breaking, so identical embeddings score exactly 1 / N (chance)
    rather than 1 or 0.
    """
    sim = np.asarray(z1, dtype=np.float64) @ np.asarray(z2, dtype=np.float64).T
    top = sim.max(axis=1, keepdims=True)
    at_max = sim == top
    own = np.diagonal(at_max)
    return float(np.mean(own / at_max.sum(axis=1)))


def view_retrieval_top1(
    backbone: nn.Module, images: Iterable[Image.Image | str | os.PathLike], image_size: int, seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 retrieval of an image's second BYOL view from its first; chance 1 / N.

    images: N >= 2 PIL images or paths (decoded once each). View 1 of every image (BYOL
    view-1 pipeline) and view 2 (view-2 pipeline) are drawn with a fixed seed
    (:func:`two_views`), embedded by the frozen backbone (eval mode, globally pooled res5,
    L2-normalised: :func:`orl.evaluate.pooled_features`), and scored by
    :func:`retrieval_top1`. A network that learns invariance to the augmentations scores
    higher; the value does not depend on labels.
    """
    ims = _as_images(images)
    if len(ims) < 2:
        raise ValueError("view retrieval needs at least 2 images")
    v1, v2 = two_views(ims, image_size, seed)
    return retrieval_top1(_embed(backbone, v1, batch_size, device), _embed(backbone, v2, batch_size, device))


def effective_rank(x: npt.ArrayLike) -> float:
    """Effective rank of an (N, D) matrix: exp of the Shannon entropy of its normalised
    singular values after centring the columns (Roy & Vetterli 2007).

    With singular values s_k of the centred matrix and p_k = s_k / sum(s), it is
    exp(-sum p_k log p_k): D for D equal singular values, 1 for rank 1, and in between
    it counts the dimensions the rows spread over, weighted by their spread. Centring
    removes the mean embedding (a shared offset is not a dimension of variation), so N
    rows have at most N - 1 dimensions: ``min(N - 1, D)`` bounds it. Scale-invariant.
    Singular values below the usual numerical-rank tolerance (max(N, D) * eps * s_max)
    are treated as 0; identical rows (nothing to spread) give 0.0.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {x.shape}")
    if x.size == 0:
        return 0.0
    xc = x - x.mean(axis=0, keepdims=True)
    s = np.linalg.svd(xc, compute_uv=False)
    scale = max(np.linalg.norm(x), np.finfo(np.float64).tiny)
    if len(s) == 0 or s[0] <= 1e-12 * scale:
        return 0.0
    s = s[s > s[0] * max(x.shape) * np.finfo(np.float64).eps]
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def evenly_spaced(paths: Iterable[str | os.PathLike], n: int) -> list[str]:
    """``n`` paths evenly spaced over the sorted paths (all when n >= their number): a
    subset that depends only on the set of paths, so it is the same for every checkpoint."""
    paths = sorted(str(p) for p in paths)
    if n >= len(paths):
        return paths
    idx = np.unique(np.linspace(0, len(paths) - 1, max(n, 0)).round().astype(np.int64))
    return [paths[i] for i in idx]


def label_free_signals(
    backbone: nn.Module, paths: Iterable[str | os.PathLike], image_size: int, seed: int = 0, n_images: int = 128,
    device: str | torch.device = "cpu", batch_size: int = 64,
) -> dict[str, Any]:
    """View retrieval and effective rank of one backbone on a fixed image set.

    paths: image files (str or PathLike); ``n_images`` of them evenly spaced over the sorted
    list are used (:func:`evenly_spaced`), each decoded once; unreadable ones are skipped and
    counted. Returns:

    ``view_top1`` (:func:`view_retrieval_top1`) and ``view_top1_chance`` = 1 / images;
    ``effective_rank`` (:func:`effective_rank`) of the (images, embedding_dim) pooled,
    L2-normalised features of the un-augmented images (squashed to ``image_size`` squared,
    as in evaluation, so augmentation noise does not enter it) and its ceiling
    ``effective_rank_max`` = min(images - 1, embedding_dim); ``embedding_dim``; ``images``
    (used); ``unreadable``; ``seed``; ``image_size``.
    """
    ims, bad = [], 0
    for p in evenly_spaced([os.fspath(p) for p in paths], n_images):
        try:
            ims.append(load_rgb(p))
        except ImageError:
            bad += 1
    if len(ims) < 2:
        raise ValueError(f"label-free signals need at least 2 readable images, got {len(ims)}")
    top1 = view_retrieval_top1(backbone, ims, image_size, seed, batch_size, device)
    z = _embed(backbone, to_tensor_batch(ims, squash_transform(image_size)), batch_size, device)
    return {
        "view_top1": top1,
        "view_top1_chance": 1.0 / len(ims),
        "effective_rank": effective_rank(z),
        "effective_rank_max": int(min(len(ims) - 1, z.shape[1])),
        "embedding_dim": int(z.shape[1]),
        "images": len(ims),
        "unreadable": bad,
        "seed": seed,
        "image_size": int(image_size),
    }
