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
    # boxes under 32 px (the default min_box_side) are left out: 16 train and 4 val crops
    assert probe["train_crops"] > 10 and probe["val_crops"] >= 4 and probe["min_box_side"] == 32.0
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


# -- balanced accuracy, chance levels, intervals, C by cross-validation ------------------------
from orl.evaluate import (  # noqa: E402
    LINEAR_C_GRID,
    balanced_accuracy,
    linear_probe_cv,
    recompute_bn_stats,
    stratified_folds,
)


def test_balanced_accuracy_hand_example():
    y = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 0])
    # recalls: class 0 3/4, class 1 1/2, class 2 0/1 -> mean 5/12 (accuracy 4/7)
    assert balanced_accuracy(y, pred) == pytest.approx(5 / 12)
    assert balanced_accuracy(y, np.zeros(7)) == pytest.approx(1 / 3)  # constant: 1 / classes
    assert balanced_accuracy(y, y) == 1.0 and balanced_accuracy([], []) is None


def test_probe_chance_levels_on_uninformative_features():
    rng = np.random.default_rng(0)
    tr_y = rng.choice(4, 600, p=[0.55, 0.25, 0.15, 0.05])
    va_y = rng.choice(4, 600, p=[0.55, 0.25, 0.15, 0.05])
    x = lambda n: rng.standard_normal((n, 16)).astype(np.float32)  # noqa: E731
    r = probe_scores(x(600), tr_y, x(600), va_y, n_boot=300)
    assert r["majority_class"] == 0
    assert r["majority_acc"] == pytest.approx(float((va_y == 0).mean()))
    assert r["balanced_chance"] == 0.25 and r["majority_balanced_acc"] == 0.25
    # no method can beat chance here; the skewed classes let accuracy look high
    for name in ("knn_balanced_acc", "linear_balanced_acc"):
        lo, hi = r[f"{name}_ci95"]
        assert lo - 0.02 < 0.25 < hi + 0.02 and r[name] < 0.32
    assert r["knn_acc"] > 0.4  # the trap the majority baseline exposes
    for name in ("knn_acc", "knn_acc_majority", "linear_acc", "majority_acc", "knn_balanced_acc"):
        lo, hi = r[f"{name}_ci95"]
        assert lo <= r[name] <= hi and hi - lo < 0.15
    assert r["linear_C"] in LINEAR_C_GRID and set(r["linear_cv_acc"]) == {str(c) for c in LINEAR_C_GRID}


def test_probe_balanced_accuracy_and_intervals_on_clusters():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16) * 3
    tr_x, tr_y = _clusters(rng, 25, centers)
    te_x, te_y = _clusters(rng, 10, centers)
    r = probe_scores(tr_x, tr_y, te_x, te_y, n_boot=200)
    assert r["knn_balanced_acc"] == 1.0 and r["linear_balanced_acc"] == 1.0
    assert r["knn_acc_ci95"] == [1.0, 1.0] and r["majority_acc"] == 0.25
    assert r["linear_cv"] is True
    assert r == probe_scores(tr_x, tr_y, te_x, te_y, n_boot=200)  # deterministic
    # more val data, narrower interval (noisy clusters, so accuracy is not 1)
    tr_x, tr_y = _clusters(rng, 40, centers, noise=2.0)
    small = probe_scores(tr_x, tr_y, *_clusters(rng, 10, centers, noise=2.0), n_boot=300)
    large = probe_scores(tr_x, tr_y, *_clusters(rng, 250, centers, noise=2.0), n_boot=300)
    width = lambda r, k: r[f"{k}_ci95"][1] - r[f"{k}_ci95"][0]  # noqa: E731
    assert width(large, "knn_acc") < width(small, "knn_acc") / 2
    assert width(large, "linear_balanced_acc") < width(small, "linear_balanced_acc") / 2


def test_stratified_folds_cope_with_tiny_classes():
    y = np.array([5] * 9 + [7] + [8] + [9] * 2)
    f = stratified_folds(y, 3)
    assert f.tolist() == stratified_folds(y, 3).tolist() and set(f) == {0, 1, 2}
    assert np.bincount(f[y == 5], minlength=3).tolist() == [3, 3, 3]
    assert f[y == 7][0] != f[y == 8][0]  # singletons spread over folds
    assert len(set(f[y == 9])) == 2


def test_linear_probe_cv_picks_c_on_train_and_handles_singletons():
    rng = np.random.default_rng(0)
    centers = np.eye(3, 16) * 3
    x, y = _clusters(rng, 20, centers)
    x = np.vstack([x, rng.standard_normal((1, 16))]).astype(np.float32)
    y = np.r_[y, 3]  # a class with a single train sample
    cv = linear_probe_cv(x, y)
    assert cv["cv"] is True and cv["C"] in LINEAR_C_GRID
    assert max(cv["cv_acc"].values()) > 0.9 and cv == linear_probe_cv(x, y)
    # the chosen C is the one with the best held-out score, ties going to the smaller C
    best = max(cv["cv_acc"].values())
    assert cv["cv_acc"][str(cv["C"])] == best
    assert min(c for c in LINEAR_C_GRID if cv["cv_acc"][str(c)] == best) == cv["C"]
    assert linear_probe_cv(x[:2], y[:2])["cv"] is False  # too few samples for 3 folds


# -- BatchNorm statistics ------------------------------------------------------------------------
def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1),
                         nn.BatchNorm2d(2, momentum=0.3))


def test_recompute_bn_stats_matches_direct_computation(sample_images):
    from orl.augment import squash_transform
    from orl.images import load_rgb

    paths = sorted(p.relative_to(sample_images).as_posix() for p in sample_images.glob("train2017/*.jpg"))[:5]
    net = _bn_net().eval()
    bn1, bn2 = net[1], net[4]
    assert torch.all(bn1.running_mean == 0) and torch.all(bn1.running_var == 1)
    n = recompute_bn_stats(net, sample_images, paths, 24, batch_size=2)
    assert n == 5 and not net.training and bn2.momentum == 0.3 and bn1.momentum == 0.1
    assert not torch.allclose(bn1.running_mean, torch.zeros(4))
    # by hand: 3 near-equal batches (2, 2, 1); each layer's input normalised by its batch
    tf = squash_transform(24)
    x = torch.stack([tf(load_rgb(sample_images / p)) for p in paths])
    means1, vars1, means2, vars2 = [], [], [], []
    with torch.no_grad():
        for b in (x[:2], x[2:4], x[4:]):
            h = net[0](b)
            means1.append(h.mean(dim=(0, 2, 3)))
            vars1.append(h.var(dim=(0, 2, 3), unbiased=True))
            h = torch.relu((h - h.mean(dim=(0, 2, 3), keepdim=True))
                           / torch.sqrt(h.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn1.eps))
            h = net[3](h)
            means2.append(h.mean(dim=(0, 2, 3)))
            vars2.append(h.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(bn1.running_mean, torch.stack(means1).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn1.running_var, torch.stack(vars1).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn2.running_mean, torch.stack(means2).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn2.running_var, torch.stack(vars2).mean(0), rtol=1e-4, atol=1e-5)
    assert int(bn1.num_batches_tracked) == 3


def test_recompute_bn_stats_subset_mode_and_failures(sample_images, tmp_path):
    paths = sorted(p.relative_to(sample_images).as_posix() for p in sample_images.glob("*/*.jpg"))
    net = _bn_net().train()
    assert recompute_bn_stats(net, sample_images, paths, 24, max_images=3) == 3
    assert net.training  # mode restored
    before = {k: v.clone() for k, v in net.state_dict().items()}
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert recompute_bn_stats(net, tmp_path, ["bad.jpg"], 24) == 0
    for k, v in net.state_dict().items():  # nothing readable: the old statistics stay
        torch.testing.assert_close(v, before[k])
    assert recompute_bn_stats(nn.Linear(3, 2), sample_images, paths, 24) == 0


def test_recompute_bn_stats_on_random_resnet(sample_images):
    backbone = build_model(get_preset("tiny").model, "byol").backbone
    paths = sorted(p.relative_to(sample_images).as_posix() for p in sample_images.glob("*/*.jpg"))[:8]
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.running_var == 1) for m in bns)
    assert recompute_bn_stats(backbone, sample_images, paths, 64, batch_size=4) == 8
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
