import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from orl.checkpoint import save_checkpoint
from orl.config import get_preset
from orl.evaluate import (
    embed_gt_crops,
    evaluate_checkpoint,
    knn_predict,
    linear_probe_predict,
    pooled_2x2_features,
    probe_scores,
    voc07_svm,
)
from orl.labels import load_labels
from orl.models import build_model

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"  # bundled coco128 subset
COCO128 = Path("/work/shared/data/coco128")
PHOTOS = SAMPLE if (SAMPLE / "classes.yaml").exists() else COCO128


class MapBackbone(nn.Module):
    """Returns a fixed res5 map, to check the pooling arithmetic."""

    def __init__(self, fmap):
        super().__init__()
        self.fmap = fmap

    def forward_features(self, x):
        return self.fmap.expand(len(x), -1, -1, -1)


def test_2x2_pooling_values_and_dims():
    # C=2, 3x3 map: kernel 2x2 stride 1 gives 4 overlapping cells per channel
    fmap = torch.arange(18, dtype=torch.float32).reshape(1, 2, 3, 3)
    f = pooled_2x2_features(MapBackbone(fmap), torch.zeros(2, 3, 96, 96))
    cells = torch.tensor([2.0, 3.0, 5.0, 6.0, 11.0, 12.0, 14.0, 15.0])  # channel-major
    assert f.shape == (2, 8)
    torch.testing.assert_close(f[0], cells / cells.norm())
    with pytest.raises(ValueError, match="image size >= 64"):
        pooled_2x2_features(MapBackbone(torch.ones(1, 2, 1, 1)), torch.zeros(1, 3, 32, 32))


def test_2x2_pooling_on_resnet18():
    backbone = build_model(get_preset("tiny").model, "byol").backbone.eval()
    with torch.no_grad():
        for size in (64, 96):  # 2x2 and 3x3 res5 maps
            f = pooled_2x2_features(backbone, torch.randn(2, 3, size, size))
            assert f.shape == (2, 4 * backbone.out_channels)
            torch.testing.assert_close(f.norm(dim=1), torch.ones(2))


def _clusters(rng, n_per, centers, noise=0.3):
    x = np.concatenate([c + noise * rng.standard_normal((n_per, len(c))) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per)
    return x.astype(np.float32), y


def test_knn_and_linear_probe_on_separable_clusters():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16) * 3
    tr_x, tr_y = _clusters(rng, 25, centers)
    te_x, te_y = _clusters(rng, 10, centers)
    for weighting in ("majority", "similarity"):
        assert (knn_predict(tr_x, tr_y, te_x, k=20, weighting=weighting) == te_y).mean() == 1.0
    assert (linear_probe_predict(tr_x, tr_y, te_x, seed=0) == te_y).mean() == 1.0
    # a val class absent from train is left out and counted
    r = probe_scores(tr_x, tr_y, np.concatenate([te_x, te_x[:3]]), np.r_[te_y, [9, 9, 9]])
    assert r["knn_acc"] == 1.0 and r["linear_acc"] == 1.0 and r["val_unseen_class"] == 3
    assert r["train_classes"] == 4 and r["val_crops"] == 40 and r["knn_k"] == 20


def test_knn_similarity_vote_beats_majority_when_nearest_is_right():
    # one very close sample of class 1 against two far ones of class 0
    tr_x = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    tr_y = np.array([1, 0, 0])
    q = np.array([[1.0, 0.05]])
    assert knn_predict(tr_x, tr_y, q, k=3, weighting="majority")[0] == 0
    assert knn_predict(tr_x, tr_y, q, k=3, weighting="similarity")[0] == 1


def _multilabel(rng, n, k=3, p=0.35):
    y = (rng.random((n, k)) < p).astype(np.uint8)
    y[y.sum(1) == 0, 0] = 1  # every image holds something
    return y


def test_svm_separable_map_is_one():
    rng = np.random.default_rng(0)
    ytr, yva = _multilabel(rng, 60), _multilabel(rng, 60)
    feat = lambda y: np.hstack([y * 2.0, 0.1 * rng.standard_normal((len(y), 13))])  # noqa: E731
    r = voc07_svm(feat(ytr), ytr, feat(yva), yva, ["a", "b", "c"])
    assert r["classes_evaluated"] == 3 and r["skipped"] == {}
    assert r["map"] > 0.99 and r["map_all"] == r["map"]
    assert all(v["cv"] for v in r["per_class"].values())
    assert r["per_class"]["a"]["cost"] in (1.0, 10.0, 100.0)


def test_svm_parallel_classes_give_identical_results():
    rng = np.random.default_rng(3)
    ytr, yva = _multilabel(rng, 60), _multilabel(rng, 40)
    x = rng.standard_normal((100, 16)) + np.r_[ytr, yva] @ rng.standard_normal((3, 16))
    one = voc07_svm(x[:60], ytr, x[60:], yva, ["a", "b", "c"])
    two = voc07_svm(x[:60], ytr, x[60:], yva, ["a", "b", "c"], n_jobs=2)
    assert one == two and list(two["per_class"]) == ["a", "b", "c"]


def test_svm_shuffled_labels_near_chance():
    rng = np.random.default_rng(1)
    ytr, yva = _multilabel(rng, 120), _multilabel(rng, 200)
    x = lambda n: rng.standard_normal((n, 32))  # noqa: E731 - features carry no label signal
    r = voc07_svm(x(120), ytr, x(200), yva)
    chance = yva.mean(axis=0).mean()  # AP of a random ranking is about the positive rate
    assert abs(r["map"] - chance) < 0.12


def test_svm_small_and_missing_classes():
    rng = np.random.default_rng(2)
    ytr = np.zeros((30, 3), dtype=np.uint8)
    yva = np.zeros((20, 3), dtype=np.uint8)
    ytr[:2, 0] = 1  # two train positives: too few for 3-fold CV
    yva[:3, 0] = 1
    ytr[:10, 1] = 1  # no val positive
    ytr[:, 2] = 1  # no train negative
    yva[:5, 2] = 1
    x = np.hstack([np.r_[ytr, yva] * 3.0, rng.standard_normal((50, 5))])
    r = voc07_svm(x[:30], ytr, x[30:], yva, ["few", "noval", "all"])
    assert r["per_class"]["few"]["cv"] is False and r["per_class"]["few"]["cost"] == 1.0
    assert r["per_class"]["few"]["ap"] == pytest.approx(1.0)
    assert r["skipped"] == {"noval": "no positive val image", "all": "no negative train image"}
    assert r["classes_small"] == 1 and r["classes_evaluated"] == 0
    assert r["map"] is None and r["map_all"] == pytest.approx(1.0)


# -- end to end on real photographs ----------------------------------------------------------
TRAIN = ["000000000009", "000000000036", "000000000064", "000000000074"]
VAL = ["000000000139", "000000000724", "000000000785", "000000001425"]


@pytest.fixture
def tiny_set(tmp_path):
    if not (PHOTOS / "classes.yaml").exists():
        pytest.skip("no coco128 photographs available")
    for split, stems in (("train2017", TRAIN), ("val2017", VAL)):
        for d in ("images", "labels"):
            (tmp_path / d / split).mkdir(parents=True)
        for s in stems:
            shutil.copy(PHOTOS / "images" / split / f"{s}.jpg", tmp_path / "images" / split)
            lab = PHOTOS / "labels" / split / f"{s}.txt"
            if lab.exists():
                shutil.copy(lab, tmp_path / "labels" / split)
    shutil.copy(PHOTOS / "classes.yaml", tmp_path / "classes.yaml")
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg.model, "byol")
    save_checkpoint({"stage": "byol", "config": cfg.to_dict(), "model": model.state_dict()},
                    tmp_path / "ckpt.pt")
    return tmp_path


def test_crops_skip_small_boxes(tiny_set):
    gt = load_labels(tiny_set / "images", tiny_set / "labels")
    backbone = build_model(get_preset("tiny").model, "byol").backbone
    backbone.train()
    paths = gt.images("train")[:1]  # 000000000009: 8 boxes, all wider than 40 px
    x, y, n = embed_gt_crops(backbone, gt, paths, 64, min_box_side=16)
    assert x.shape == (8, 512) and n == {"kept": 8, "skipped_small": 0, "skipped_images": 0}
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert sorted(gt.classes[c] for c in set(y)) == ["bowl", "broccoli", "orange"]
    # two oranges are under 60 px high (46.5 and 46.7 px)
    _, y60, n = embed_gt_crops(backbone, gt, paths, 64, min_box_side=60)
    assert n["kept"] == 6 and n["skipped_small"] == 2 and len(y60) == 6
    assert backbone.training  # mode restored


def test_evaluate_checkpoint_end_to_end(tiny_set):
    t0 = time.perf_counter()
    out = tiny_set / "eval/result.json"
    r = evaluate_checkpoint(tiny_set / "ckpt.pt", tiny_set / "images", tiny_set / "labels",
                            out=out, batch_size=16)
    assert time.perf_counter() - t0 < 60
    assert json.loads(out.read_text()) == r
    assert r["stage"] == "byol" and r["backbone"] == "resnet18" and r["image_size"] == 64
    assert r["counts"]["train"] == 4 and r["counts"]["val"] == 4
    probe = r["object_probe"]
    assert probe["train_crops"] > 10 and probe["val_crops"] > 5
    assert 0.0 <= probe["knn_acc"] <= 1.0 and 0.0 <= probe["linear_acc"] <= 1.0
    svm = r["svm"]
    assert svm["feature_dim"] == 4 * 512 and svm["train_images"] == 4
    # 4 train images: no class has 3 positives for CV, so only map_all exists
    assert svm["map"] is None and svm["classes_small"] >= 3
    assert 0.0 <= svm["map_all"] <= 1.0 and "person" in svm["ap"]
    assert set(svm["ap"]) <= set(load_labels(tiny_set / "images", tiny_set / "labels").classes)
    assert {"load", "object_probe", "svm", "total"} <= set(r["timings_s"])
    # same seed, same numbers
    again = evaluate_checkpoint(tiny_set / "ckpt.pt", tiny_set / "images", tiny_set / "labels")
    assert again["object_probe"] == r["object_probe"] and again["svm"]["ap"] == r["svm"]["ap"]
