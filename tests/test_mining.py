"""Stage 2: KNN against brute force, pair selection by hand, RoI modes, json round trip."""

import json

import numpy as np
import pytest

from orl.config import get_preset
from orl.correspondence import Correspondence
from orl.mining import (
    _drop_self,
    _knn_torch,
    embed_rois,
    knn_search,
    load_roi_features,
    select_pairs,
)
from orl.roi_features import write_npz


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_matches_brute_force_and_torch_path():
    emb = _unit(50, 16)
    idx, sim = knn_search(emb, 10)
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    want = np.argsort(-s, axis=1)[:, :10]
    assert np.array_equal(idx, want)
    assert np.allclose(sim, np.take_along_axis(s, want, 1), atol=1e-5)
    assert not (idx == np.arange(50)[:, None]).any()
    # the GPU code path (run here on the CPU) gives the same neighbours
    ts, ti = _knn_torch(emb, 11, "cpu")
    t_idx, t_sim = _drop_self(ti, ts, 10)
    assert np.array_equal(t_idx, idx) and np.allclose(t_sim, sim, atol=1e-5)


def test_knn_small_sets():
    emb = _unit(3, 4)
    idx, _ = knn_search(emb, 10)
    assert idx.shape == (3, 2)
    idx, _ = knn_search(emb[:1], 10)
    assert idx.shape == (1, 0)


def test_drop_self_when_ties_hide_it():
    idx = np.array([[1, 0, 2], [0, 2, 1]])  # row 0 lists itself second (a tie)
    sims = np.array([[1.0, 1.0, 0.5], [0.9, 0.8, 0.7]])
    i, s = _drop_self(idx, sims, 2)
    assert i.tolist() == [[1, 2], [0, 2]]


def test_select_pairs_hand_computed():
    # 10 query boxes -> keep max(1, int(0.1 * 10)) = 1 pair; 20 -> 2 pairs
    fq = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 3, 3, 0, 1]]  # only row 2 is e2
    fk = np.array([[0.6, 0.8, 0, 0], [0, 0, 1, 0], [0.8, 0.6, 0, 0]], dtype=np.float32)
    ij, s = select_pairs(fq, fk, 0.1)
    assert ij.tolist() == [[2, 1]] and np.allclose(s, [1.0])
    # hand matrix: the top 2 of the flattened 20 x 3 matrix
    fq2 = np.zeros((20, 2), np.float32)
    fq2[:, 0] = 1
    fq2[3] = [0.6, 0.8]
    fq2[7] = [0.96, 0.28]
    fk2 = np.array([[0, 1], [0.28, 0.96]], dtype=np.float32)
    ij, s = select_pairs(fq2, fk2, 0.1)
    # q3.k1 = 0.936, q3.k0 = 0.8, q7.k1 = 0.5376, others <= 0.28
    assert ij.tolist() == [[3, 1], [3, 0]]
    assert np.allclose(s, [0.936, 0.8], atol=1e-6)
    # one query box: at least one pair
    ij, _ = select_pairs(fq[:1], fk, 0.1)
    assert len(ij) == 1


def test_roi_modes_shapes_and_forward_counts(sample_images):
    from orl.images import load_rgb
    from orl.models import build_model

    cfg = get_preset("tiny")
    model = build_model(cfg.model, "byol").eval()
    img = load_rgb(sorted(sample_images.glob("train2017/*.jpg"))[0])
    boxes = np.array([[0, 0, 200, 200], [100, 50, 400, 300], [300, 200, 600, 420]], dtype=float)
    from dataclasses import replace

    f_crop, n_crop = embed_rois(model.backbone, img, boxes, cfg.mine, "cpu")
    f_ra, n_ra = embed_rois(model.backbone, img, boxes, replace(cfg.mine, roi_mode="roi_align"), "cpu")
    assert f_crop.shape == f_ra.shape == (3, model.backbone.out_channels)
    assert (n_crop, n_ra) == (3, 1)
    assert np.allclose(np.linalg.norm(f_crop, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="valid: crop, roi_align"):
        embed_rois(model.backbone, img, boxes, replace(cfg.mine, roi_mode="nope"), "cpu")


def _toy_corr():
    boxes = [np.array([[0, 0, 100, 120.5], [10, 10, 200, 200]]), np.array([[5, 5, 150, 150]]), np.zeros((0, 4))]
    knn = np.array([[1, 2], [0, 2], [0, 1]])
    pairs = [[np.array([[0, 0, 100, 120.5, 5, 5, 150, 150]]), np.zeros((0, 8))],
             [np.array([[5, 5, 150, 150, 10, 10, 200, 200]]), np.zeros((0, 8))],
             [np.zeros((0, 8)), np.zeros((0, 8))]]
    scores = [[np.array([0.9]), np.zeros(0)], [np.array([0.8]), np.zeros(0)], [np.zeros(0), np.zeros(0)]]
    return Correspondence(["a.jpg", "sub/b.jpg", "c.png"], np.array([[640, 480], [320, 240], [100, 100]]), boxes,
                          knn, np.array([[0.5, 0.4], [0.5, 0.3], [0.4, 0.3]]), pairs, scores, {"knn_image_num": 2})


def test_roi_features_round_trip_keeps_images_without_boxes(tmp_path):
    feats = [_unit(3, 8), np.zeros((0, 8), np.float32), _unit(2, 8, seed=1)]
    write_npz(tmp_path / "f.npz", ["a.jpg", "b.jpg", "c.jpg"], feats)
    files, back = load_roi_features(tmp_path / "f.npz")
    assert files == ["a.jpg", "b.jpg", "c.jpg"]
    assert [f.shape for f in back] == [(3, 8), (0, 8), (2, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(feats, back, strict=True))


def test_official_json_round_trip(tmp_path):
    corr = _toy_corr()
    corr.save(tmp_path / "correspondence.json")
    data = json.loads((tmp_path / "correspondence.json").read_text())
    ann = data["pseudo_annotations"]
    # the authors' layout: xywh boxes, positional neighbour ids, 8-number pair rows
    assert data["images"]["file_name"] == ["a.jpg", "sub/b.jpg", "c.png"]
    assert ann["bbox"][0][0] == [0, 0, 100, 120.5]
    assert ann["knn_image_id"][0] == [1, 2]
    assert ann["knn_bbox_pair"][0][0] == [[0, 0, 100, 120.5, 5, 5, 145, 145]]
    back = Correspondence.load(tmp_path)
    assert back.files == corr.files and back.num_pairs == corr.num_pairs == 2
    for a, b in zip(back.boxes, corr.boxes, strict=True):
        assert np.allclose(a, b)
    assert np.array_equal(back.knn, corr.knn)
    assert np.allclose(back.pairs[0][0], corr.pairs[0][0])
    assert np.allclose(back.pair_scores[1][0], [0.8])
    assert np.allclose(back.sizes, corr.sizes)


def test_official_json_without_scores_loads(tmp_path):
    data = _toy_corr().to_official()
    for extra in ("knn_image_sim", "knn_bbox_pair_score", "image_size"):
        del data["pseudo_annotations"][extra]
    (tmp_path / "c.json").write_text(json.dumps(data))
    back = Correspondence.load(tmp_path / "c.json")
    assert back.num_pairs == 2 and np.isnan(back.pair_scores[0][0]).all()


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "correspondence.json").write_text("{\"images\": 3}")
    with pytest.raises(ValueError, match="not a valid ORL correspondence"):
        Correspondence.load(tmp_path)
