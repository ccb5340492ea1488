"""The 2-D embedding map: PCA on known inputs, UMAP when installed and the PCA fallback when it
is not, and per-image labels from CSV, YOLO and COCO sources."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from orl.embedding_map import (
    NO_OBJECTS,
    UMAP_MIN_POINTS,
    LayoutError,
    dominant_class,
    image_labels,
    layout_2d,
    match_labels,
    pca_2d,
    read_label_csv,
    umap_available,
)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- PCA -----------------------------------------------------------------------------------------
def test_pca_recovers_a_known_plane_and_is_sign_stable():
    rng = np.random.default_rng(0)
    # Points in a 2-D plane of R^16, stretched 3:1 along its axes: PCA gives back the plane
    # coordinates (up to sign), the long axis first.
    basis, _ = np.linalg.qr(rng.normal(size=(16, 2)))
    coords = rng.normal(size=(40, 2)) * [3.0, 1.0]
    coords -= coords.mean(axis=0)
    xy = pca_2d(coords @ basis.T + 5.0)  # an offset changes nothing: PCA centres first
    assert xy.shape == (40, 2)
    assert xy[:, 0].std() > 2 * xy[:, 1].std()
    # Distances between points are kept exactly (a rotation/reflection of the plane).
    d_in = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    d_out = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.testing.assert_allclose(d_out, d_in, atol=1e-9)
    # Same input, same output; the axes' signs are fixed, so negated inputs give the negated map
    # (SVD alone may flip an axis and mirror it).
    np.testing.assert_array_equal(pca_2d(coords @ basis.T), pca_2d(coords @ basis.T))
    np.testing.assert_allclose(pca_2d(-(coords @ basis.T)), -pca_2d(coords @ basis.T), atol=1e-9)


def test_pca_degenerate_inputs():
    assert pca_2d(np.ones((1, 8))).tolist() == [[0.0, 0.0]]
    line = np.outer(np.arange(5.0), np.ones(4))  # every point on one line: no second axis
    xy = pca_2d(line)
    assert np.allclose(xy[:, 1], 0) and np.ptp(xy[:, 0]) > 0
    assert np.allclose(pca_2d(np.ones((6, 3))), 0)  # all the same point
    with pytest.raises(LayoutError, match=r"\(N, D\)"):
        pca_2d(np.ones(5))


# -- method choice -------------------------------------------------------------------------------
def test_auto_falls_back_to_pca_without_umap(monkeypatch):
    emb = _unit_rows(np.random.default_rng(1), 30, 8)
    # As on a machine where umap-learn is not installed: its import fails.
    monkeypatch.setitem(sys.modules, "umap", None)
    monkeypatch.setattr("orl.embedding_map.umap_available", lambda: False)
    lay = layout_2d(emb, "auto")
    assert lay.method == "pca" and "umap-learn is not installed" in lay.reason
    np.testing.assert_array_equal(lay.xy, pca_2d(emb))
    with pytest.raises(LayoutError, match="umap-learn is not installed.*'pca'"):
        layout_2d(emb, "umap")
    with pytest.raises(LayoutError, match="auto, umap, pca"):
        layout_2d(emb, "tsne")


def test_auto_uses_pca_for_too_few_points():
    emb = _unit_rows(np.random.default_rng(2), UMAP_MIN_POINTS - 1, 8)
    lay = layout_2d(emb, "auto")
    assert lay.method == "pca" and f"at least {UMAP_MIN_POINTS}" in lay.reason
    if umap_available():
        with pytest.raises(LayoutError, match="at least"):
            layout_2d(emb, "umap")


@pytest.mark.slow  # umap-learn compiles its numba code on first use: about a minute on 2 shared cores
@pytest.mark.skipif(not umap_available(), reason="umap-learn is not installed")
def test_umap_keeps_clusters_apart_and_repeats_with_a_seed():
    rng = np.random.default_rng(3)
    centres = _unit_rows(rng, 3, 32)
    emb = np.concatenate([c + 0.05 * rng.normal(size=(20, 32)) for c in centres])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    lay = layout_2d(emb, "auto", seed=7, n_neighbors=10)
    assert lay.method == "umap" and lay.reason == "" and lay.xy.shape == (60, 2) and np.isfinite(lay.xy).all()
    # Each point's nearest map neighbour comes from its own cluster.
    d = np.linalg.norm(lay.xy[:, None] - lay.xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    cluster = np.repeat(np.arange(3), 20)
    assert (cluster[d.argmin(axis=1)] == cluster).mean() == 1.0
    np.testing.assert_array_equal(layout_2d(emb, "umap", seed=7, n_neighbors=10).xy, lay.xy)


# -- labels --------------------------------------------------------------------------------------
def test_label_csv_header_matching_and_errors(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("image,label\nval2017/a.jpg,cat\nb.jpg, dog \nc.jpg,\n\n")
    assert read_label_csv(f) == {"val2017/a.jpg": "cat", "b.jpg": "dog"}
    paths = ["val2017/a.jpg", "train2017/a.jpg", "train2017/b.jpg"]
    # By relative path; by file name only when one image has it.
    assert match_labels({"val2017/a.jpg": "cat", "b.jpg": "dog"}, paths) == {"val2017/a.jpg": "cat",
                                                                             "train2017/b.jpg": "dog"}
    assert match_labels({"a.jpg": "x"}, paths) == {}  # two images are called a.jpg
    assert match_labels({"b.jpg": "x", "train2017/b.jpg": "y"}, paths) == {"train2017/b.jpg": "y"}
    (tmp_path / "twice.csv").write_text("a.jpg,cat\na.jpg,dog\n")
    with pytest.raises(ValueError, match="'cat' on line 1 and 'dog' on line 2"):
        read_label_csv(tmp_path / "twice.csv")
    (tmp_path / "one.csv").write_text("a.jpg\n")
    with pytest.raises(ValueError, match="line 1: expected 'image,label'"):
        read_label_csv(tmp_path / "one.csv")


def test_dominant_class_is_the_largest_area():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 8, 8], [0, 0, 2, 2]], dtype=float)
    # person: 100 + 25, car: 64 + 4
    assert dominant_class(("person", "person", "car", "car"), boxes) == "person"
    assert dominant_class(("b", "a"), np.array([[0, 0, 2, 2], [0, 0, 2, 2]])) == "a"  # a tie: by name
    assert dominant_class((), np.zeros((0, 4))) == NO_OBJECTS


def test_image_labels_from_yolo_and_coco(eight_images, tmp_path):
    images = eight_images / "images"
    rel = sorted(str(p.relative_to(images)) for p in images.rglob("*.jpg"))
    yolo, fmt = image_labels(images, eight_images / "labels", rel)
    assert fmt == "yolo" and set(yolo) <= set(rel) and len(yolo) >= 6
    # The sample's classes.yaml names the ids: labels are class names, not numbers.
    assert all(not v.isdigit() for v in yolo.values()), yolo
    # The same boxes as a COCO json give the same labels.
    from orl.labels import load_labels

    gt = load_labels(images, eight_images / "labels")
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(gt.classes)]}
    for k, (path, objs) in enumerate(gt.objects.items()):
        coco["images"].append({"id": k, "file_name": path.split("/")[-1], "width": objs.size[0],
                               "height": objs.size[1]})
        coco["annotations"] += [{"id": len(coco["annotations"]) + j, "image_id": k, "category_id": int(c),
                                 "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "iscrowd": 0}
                                for j, (c, b) in enumerate(zip(objs.class_ids, objs.boxes, strict=True))]
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    from_coco, fmt = image_labels(images, tmp_path / "instances.json", rel)
    assert fmt == "coco" and from_coco == yolo
    with pytest.raises(FileNotFoundError, match="CSV file"):
        image_labels(images, tmp_path / "missing.csv", rel)
