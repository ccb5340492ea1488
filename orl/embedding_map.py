"""A 2-D map of image embeddings, and one label per image to colour it by.

The layout is UMAP (McInnes et al. 2018, PyPI ``umap-learn``) when it is installed, else PCA:
UMAP keeps local neighbourhoods, so images the KNN calls near stay near on the map, which is
what a person checks the neighbours and pairs against; PCA (two principal axes, numpy only)
keeps only the global spread but always works. ``layout_2d`` says which one it used and why,
so a stored map can be traced back.

Labels are for colour only (the pipeline never reads them): a COCO instances json or a YOLO
label folder, read by ``orl.labels``, gives each image the class that covers most of its box
area; a CSV of ``image,label`` rows gives image-level labels directly.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from orl.labels import ACCEPTED_FORMATS, load_labels

METHODS = ("auto", "umap", "pca")
# Below this many points UMAP's graph is too small to lay out (its spectral start fails and the
# result is noise); "auto" uses PCA there instead.
UMAP_MIN_POINTS = 5
NO_OBJECTS = "(no objects)"
LABEL_FORMATS = f"a CSV file of 'image,label' rows, or {ACCEPTED_FORMATS}"
_CSV_HEADERS = {"image", "file", "file_name", "filename", "path", "rel_path"}


class LayoutError(ValueError):
    """The map cannot be computed as asked; the message says what to change."""


@dataclass(frozen=True)
class Layout:
    """xy: (N, 2) float64; method: "umap" | "pca" (what ran); reason: why auto chose it, or ""."""

    xy: np.ndarray
    method: str
    reason: str = ""


def umap_available() -> bool:
    """Whether umap-learn can be imported here (checked without importing it: that takes seconds)."""
    return importlib.util.find_spec("umap") is not None


def pca_2d(emb: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): the rows projected on their two principal axes (centred; SVD).

    Each axis' sign is fixed so that the largest loading is positive: the SVD's signs are
    arbitrary, and without this the same embeddings could come out mirrored on another BLAS.
    Fewer than two distinct directions give zero columns.
    """
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise LayoutError(f"embeddings must be (N, D), got shape {x.shape}")
    out = np.zeros((len(x), 2), dtype=np.float64)
    if len(x) < 2:
        return out
    x = x - x.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, len(s))
    for i in range(k):
        if s[i] <= 1e-12 * max(1.0, float(s[0])):
            break  # no spread left along this axis
        axis = vt[i] * np.sign(vt[i][np.argmax(np.abs(vt[i]))])
        out[:, i] = x @ axis
    return out


def umap_2d(emb: np.ndarray, seed: int, n_neighbors: int, min_dist: float) -> np.ndarray:
    """(N, D) L2-normalised -> (N, 2) with UMAP, cosine metric (the KNN's similarity).

    A fixed ``seed`` makes it repeatable (umap-learn then runs single-threaded).
    ``n_neighbors`` is capped at N - 1.
    """
    import warnings

    import umap

    n = len(emb)
    with warnings.catch_warnings():
        # "n_jobs overridden by setting random_state" and the spectral-start fallback on small
        # graphs are expected here; they say nothing a user can act on.
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, n - 1)), min_dist=min_dist,
                            metric="cosine", random_state=seed)
        xy = reducer.fit_transform(np.asarray(emb, dtype=np.float32))
    return np.asarray(xy, dtype=np.float64)


def layout_2d(emb: np.ndarray, method: str = "auto", *, seed: int = 0, n_neighbors: int = 15,
              min_dist: float = 0.1) -> Layout:
    """(N, D) embeddings -> a 2-D ``Layout``.

    ``method``: "umap" (fails with LayoutError when umap-learn is missing or N is too small),
    "pca", or "auto" (UMAP when it is installed and N >= UMAP_MIN_POINTS, else PCA, with the
    reason recorded).
    """
    if method not in METHODS:
        raise LayoutError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    emb = np.asarray(emb)
    n = len(emb)
    if method == "pca":
        return Layout(pca_2d(emb), "pca")
    why_not = ("umap-learn is not installed" if not umap_available()
               else f"UMAP needs at least {UMAP_MIN_POINTS} images, there are {n}" if n < UMAP_MIN_POINTS else "")
    if why_not:
        if method == "umap":
            raise LayoutError(f"cannot run UMAP: {why_not}; use method 'pca' or 'auto'"
                              + (" (or pip install umap-learn)" if not umap_available() else ""))
        return Layout(pca_2d(emb), "pca", f"{why_not}: PCA instead")
    return Layout(umap_2d(emb, seed, n_neighbors, min_dist), "umap")


# -- labels -------------------------------------------------------------------------------------
def read_label_csv(path: str | os.PathLike) -> dict[str, str]:
    """``image,label`` rows -> {image: label}. A first row whose first cell is a column name
    (image, file, file_name, path ...) is a header; blank labels are skipped; the same image
    with two different labels is an error naming both lines."""
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0]:
                continue
            if line_no == 1 and cells[0].lower() in _CSV_HEADERS:
                continue
            if len(cells) < 2:
                raise ValueError(f"{path}, line {line_no}: expected 'image,label', got {','.join(row)!r}")
            image, label = cells[0], cells[1]
            if not label:
                continue
            if image in out and out[image] != label:
                raise ValueError(f"{path}: image {image!r} has label {out[image]!r} on line {first_line[image]} "
                                 f"and {label!r} on line {line_no}; keep one")
            out[image], first_line[image] = label, first_line.get(image, line_no)
    if not out:
        raise ValueError(f"{path} holds no 'image,label' rows")
    return out


def match_labels(labels: dict[str, str], rel_paths: list[str]) -> dict[str, str]:
    """{rel path: label} for the images ``labels`` names: by the path relative to the dataset
    folder, else by the file name when exactly one image has it (CSV files often list names)."""
    paths = set(rel_paths)
    by_name: dict[str, list[str]] = defaultdict(list)
    for p in rel_paths:
        by_name[PurePosixPath(p).name].append(p)
    out: dict[str, str] = {}
    for raw, label in labels.items():
        key = raw.replace("\\", "/").removeprefix("./")
        hits = by_name.get(PurePosixPath(key).name, [])
        if key in paths:
            out[key] = label  # an exact path wins over a file-name match of another row
        elif "/" not in key and len(hits) == 1:
            out.setdefault(hits[0], label)
    return out


def dominant_class(names: tuple[str, ...], boxes: np.ndarray) -> str:
    """The class whose boxes ((N, 4) xyxy) cover the most area in total; NO_OBJECTS when N = 0.
    Ties go to the class named first alphabetically, so the choice is repeatable."""
    if not len(names):
        return NO_OBJECTS
    area: dict[str, float] = defaultdict(float)
    for name, b in zip(names, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), strict=True):
        area[name] += float(max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]))
    return min(area, key=lambda c: (-area[c], c))


def image_labels(images_root: str | os.PathLike, labels_path: str | os.PathLike,
                 rel_paths: list[str]) -> tuple[dict[str, str], str]:
    """({rel path: label} for the labelled ones of ``rel_paths``, format "csv" | "coco" | "yolo").

    A ``.csv`` file is read as image-level labels; anything else goes to ``orl.labels.load_labels``
    (COCO json, a folder of instances_*.json, or a YOLO folder) and each image gets its
    ``dominant_class``. Raises FileNotFoundError / ValueError naming the path and the formats.
    """
    path = Path(labels_path)
    if not path.exists():
        raise FileNotFoundError(f"labels not found: {path}; expected {LABEL_FORMATS}")
    if path.is_file() and path.suffix.lower() == ".csv":
        return match_labels(read_label_csv(path), rel_paths), "csv"
    gt = load_labels(images_root, path)
    wanted = set(rel_paths)
    return {p: dominant_class(o.names, o.boxes) for p, o in gt.objects.items() if p in wanted}, gt.format
