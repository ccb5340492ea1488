import numpy as np
import pytest

from orl.boxes import areas
from orl.correspondence import Correspondence
from orl.labels import GroundTruth, ImageObjects
from orl.metrics import correspondence_precision, matched_classes

CLASSES = ["cat", "dog", "car"]


def _obj(boxes, ids):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ids = np.asarray(ids, dtype=np.int64)
    return ImageObjects(boxes, ids, tuple(CLASSES[i] for i in ids), (100, 100))


def _gt():
    objects = {
        "a.jpg": _obj([[0, 0, 50, 50], [50, 50, 100, 100]], [0, 2]),  # cat, car
        "b.jpg": _obj([[0, 0, 40, 40], [60, 0, 100, 40]], [0, 1]),  # cat, dog
        "c.jpg": _obj([], []),  # labelled, no objects
    }
    splits = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "val", "d.jpg": "val"}
    return GroundTruth(CLASSES, objects, splits, "yolo", "/none", "/none")


def _corr(files, boxes, knn, pairs):
    n = len(files)
    knn = np.asarray(knn, dtype=np.int64)
    scores = [[np.linspace(1, 0.5, len(p)) for p in row] for row in pairs]
    return Correspondence(files, np.full((n, 2), 100), [np.asarray(b, float) for b in boxes],
                          knn, np.ones(knn.shape), pairs, scores)


CAT_A, CAR_A = [0, 0, 50, 50], [50, 50, 100, 100]
CAT_B, DOG_B = [0, 0, 40, 40], [60, 0, 100, 40]
NOTHING = [0, 60, 30, 100]  # overlaps no ground-truth box


def test_matched_classes_threshold():
    obj = _gt()["a.jpg"]
    m = matched_classes(np.array([CAT_A, [0, 0, 50, 30], NOTHING]), obj, 3, 0.5)
    assert m.tolist() == [[True, False, False], [True, False, False], [False, False, False]]
    # IoU of [0,0,50,30] with the cat box is 0.6: matched at 0.5, not at 0.7
    assert not matched_classes(np.array([[0, 0, 50, 30]]), obj, 3, 0.7).any()


def test_precision_known_answer():
    p = lambda *rows: np.array([q + n for q, n in rows], dtype=float)  # noqa: E731
    files = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    boxes = [[CAT_A, CAR_A], [CAT_B, DOG_B], [NOTHING], [NOTHING]]
    knn = [[1, 2], [0, 3], [0, -1], [0, -1]]
    pairs = [
        # a -> b: cat/cat correct, car/dog wrong, cat/dog wrong; a -> c: c has no objects
        [p((CAT_A, CAT_B), (CAR_A, DOG_B), (CAT_A, DOG_B)), p((CAT_A, NOTHING))],
        # b -> a: cat/cat correct; b -> d: d unlabeled, not counted
        [p((CAT_B, CAT_A)), p((CAT_B, NOTHING))],
        [p((NOTHING, CAT_A)), np.zeros((0, 8))],
        [p((NOTHING, CAT_A)), np.zeros((0, 8))],  # unlabeled query, not counted
    ]
    corr = _corr(files, boxes, knn, pairs)
    r = correspondence_precision(corr, _gt(), iou_threshold=0.5, seed=0)
    assert r["pairs_total"] == 8
    assert r["pairs"] == 6 and r["correct"] == 2
    assert r["precision"] == pytest.approx(2 / 6)
    # rank-0 pairs of a->b, a->c, b->a, c->a: correct, wrong, correct, wrong
    assert r["top1_precision"] == pytest.approx(0.5)
    assert r["images"] == {"total": 4, "labelled": 3}
    # knn pairs among labelled images: a-b (cat shared), a-c, b-a (shared), c-a
    assert r["knn"] == {"image_pairs": 4, "shared": 2, "share": 0.5}
    assert r["random"]["pairs"] == 6
    assert r["knn_random"]["image_pairs"] == 4
    assert r == correspondence_precision(corr, _gt(), iou_threshold=0.5, seed=0)  # seeded


def test_random_baseline_value():
    # a and b each offer one box per class; random pairs of 2x2 boxes: cat/cat is the only
    # correct pair, so chance precision converges to 1/4, mined precision is 1.
    files = ["a.jpg", "b.jpg"]
    boxes = [[CAT_A, CAR_A], [CAT_B, DOG_B]]
    many = np.array([CAT_A + CAT_B] * 2000, dtype=float)
    corr = _corr(files, boxes, [[1], [0]], [[many], [np.zeros((0, 8))]])
    r = correspondence_precision(corr, _gt(), seed=1)
    assert r["precision"] == 1.0
    assert r["random"]["precision"] == pytest.approx(0.25, abs=0.03)
    assert r["lift"] == pytest.approx(1 / r["random"]["precision"])


def test_basename_fallback_and_no_labels_error():
    corr = _corr(["x/a.jpg", "x/b.jpg"], [[CAT_A], [CAT_B]], [[1], [0]],
                 [[np.array([CAT_A + CAT_B], float)], [np.zeros((0, 8))]])
    r = correspondence_precision(corr, _gt())
    assert r["pairs"] == 1 and r["correct"] == 1
    other = _corr(["q.jpg", "r.jpg"], [[CAT_A], [CAT_B]], [[1], [0]],
                  [[np.zeros((0, 8))], [np.zeros((0, 8))]])
    with pytest.raises(ValueError, match="no image of the correspondence"):
        correspondence_precision(other, _gt())


def test_ioa_rule_counts_object_parts():
    from orl.metrics import overlap

    gt_box = np.array([[0.0, 0.0, 200.0, 200.0]])
    part = np.array([[50.0, 50.0, 100.0, 100.0]])  # inside the object: IoU 1/16, IoA 1
    half = np.array([[100.0, 0.0, 300.0, 200.0]])  # half on it: IoU 1/3, IoA 1/2
    assert overlap(part, gt_box, "iou")[0, 0] == pytest.approx(1 / 16)
    assert overlap(part, gt_box, "ioa")[0, 0] == pytest.approx(1.0)
    assert overlap(half, gt_box, "ioa")[0, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="valid: iou, ioa"):
        overlap(part, gt_box, "dice")


# -- statistics -------------------------------------------------------------------------------
from orl.metrics import (  # noqa: E402
    area_bin,
    area_bin_edges,
    area_matched_pairs,
    bootstrap_ci,
    bootstrap_ci_stat,
    bootstrap_ratio_cis,
    pair_ranking_auc,
    paired_auc_difference,
    roc_auc,
)


def test_roc_auc_known_values_and_ties():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 (pos, neg) pairs won
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie counts 1/2: positive 1.0 ties the negative, positive 2.0 beats it
    assert roc_auc([1.0, 1.0, 2.0], [False, True, True]) == pytest.approx(0.75)
    assert roc_auc(np.full(10, 0.3), np.arange(10) % 2) == 0.5  # constant score: exactly chance
    assert roc_auc([0.1, 0.2], [1, 1]) is None and roc_auc([0.1, 0.2], [0, 0]) is None
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0.1, 0.2], [0, 2])


def test_roc_auc_matches_sklearn_with_ties_either_class_larger():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for p in (0.1, 0.5, 0.9):  # fewer positives than negatives and the reverse
        y = rng.random(3000) < p
        s = np.round(rng.standard_normal(3000) + y, 1)  # rounding makes many ties
        assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_bootstrap_ci_contains_mean_narrows_and_is_seeded():
    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(5000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert lo2 < large.mean() < hi2
    assert (hi2 - lo2) < (hi - lo) / 5  # width ~ 1 / sqrt(n): 10x narrower for 100x the data
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, level=0.5)[1] - bootstrap_ci(small, level=0.5)[0] < hi - lo
    assert bootstrap_ci([]) == (None, None) and bootstrap_ci([0.4]) == (0.4, 0.4)
    # the statistic form gives the same interval up to resampling noise
    lo3, hi3 = bootstrap_ci_stat(lambda idx: small[idx].mean(), len(small))
    assert lo3 == pytest.approx(lo, abs=0.02) and hi3 == pytest.approx(hi, abs=0.02)


def test_bootstrap_ratio_cis_pooled_and_paired():
    rng = np.random.default_rng(1)
    den = rng.integers(1, 20, 400).astype(float)
    a = rng.binomial(den.astype(int), 0.3).astype(float)
    b = rng.binomial(den.astype(int), 0.1).astype(float)
    ci = bootstrap_ratio_cis({"a": (a, den), "b": (b, den)}, ratios_of={"lift": ("a", "b")})
    assert ci["a"][0] < a.sum() / den.sum() < ci["a"][1]
    assert ci["b"][1] < ci["a"][0]  # 0.3 vs 0.1 are separated at this size
    lift = (a.sum() / den.sum()) / (b.sum() / den.sum())
    assert ci["lift"][0] < lift < ci["lift"][1] and ci["lift"][0] > 1.5
    assert bootstrap_ratio_cis({"a": (np.zeros(0), np.zeros(0))}) == {"a": (None, None)}


# -- pair ranking AUC -----------------------------------------------------------------------
def _labelled(objects):
    splits = {k: "train" for k in objects}
    return GroundTruth(CLASSES, objects, splits, "yolo", "/none", "/none")


def test_pair_ranking_auc_hand_computed():
    # a: cat, car; b: cat, dog. Features give the similarity matrix a x b
    #   [[cat.cat 0.6, cat.dog 0.8], [car.cat 0.8, car.dog 0.0]]
    # one positive (cat, cat: 0.6) against negatives 0.8, 0.8, 0.0: AUC 1/3 per image pair
    fa = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    fb = np.array([[0.6, 0.8, 0], [0.8, 0, 0.6]])
    fc = np.array([[0, 0, 1.0]])
    objects = {"a.jpg": _gt()["a.jpg"], "b.jpg": _gt()["b.jpg"],
               "c.jpg": _obj([[0, 0, 100, 100]], [2])}  # c: only a car, shares nothing with b
    corr = _corr(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], [[CAT_A, CAR_A], [CAT_B, DOG_B], [[0, 0, 100, 100]], [NOTHING]],
                 [[1, -1], [0, 2], [1, 3], [0, -1]], [[np.zeros((0, 8))] * 2] * 4)
    r = pair_ranking_auc(corr, [fa, fb, fc, np.ones((1, 3))], _labelled(objects), rule="iou")
    assert r["auc"] == pytest.approx(1 / 3)
    # labelled pairs: a-b, b-a, b-c, c-b (c-d: d unlabeled; d's own row not counted)
    assert r["image_pairs_labelled"] == 4 and r["image_pairs"] == 2 and r["queries"] == 2
    assert r["candidates"] == 4 + 4 + 2 + 2 and r["positives"] == 2
    assert r["candidates_kept"] == 8 and r["positives_kept"] == 2
    assert r["positive_rate"] == pytest.approx(2 / 12)
    assert r["ci95"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    # pooled: positives 0.6, 0.6; negatives 0.8 x4, 0.0 x2 (a-b, b-a) and b-c's 0, 0.6 twice
    # each positive: beats 0.0 x4, ties 0.6 x2, loses to 0.8 x4 -> (4 + 1) / 10
    assert r["pooled_auc"] == pytest.approx(0.5)
    # an explicit knn replaces corr.knn
    only_ab = pair_ranking_auc(corr, [fa, fb, fc, np.ones((1, 3))], _labelled(objects), rule="iou",
                               knn=[[1, -1], [-1, -1], [-1, -1], [-1, -1]])
    assert only_ab["image_pairs_labelled"] == 1 and only_ab["auc"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="boxes"):
        pair_ranking_auc(corr, [fa, fb[:1], fc, fc], _labelled(objects))


def _quadrant_world(n_img=60, k=5, boxes_per=24, seed=0):
    """Images whose four 50 px quadrants each hold one object of a random class (of 3), with
    candidate boxes lying inside one quadrant (IoA 1 with its object) or straddling two."""
    rng = np.random.default_rng(seed)
    quads = np.array([[0, 0, 50, 50], [50, 0, 100, 50], [0, 50, 50, 100], [50, 50, 100, 100]], float)
    objects, boxes, classes = {}, [], []
    for i in range(n_img):
        cls = rng.integers(0, 3, 4)
        objects[f"{i}.jpg"] = _obj(quads, cls)
        q = rng.integers(0, 4, boxes_per)
        xy = quads[q, :2] + rng.uniform(0, 25, (boxes_per, 2))
        b = np.concatenate([xy, xy + rng.uniform(10, 25, (boxes_per, 2))], 1)
        b[: boxes_per // 6] = [25, 25, 75, 75]  # straddles all four: matches no class at IoA 0.5
        boxes.append(b)
        box_cls = np.where(np.arange(boxes_per) < boxes_per // 6, -1, cls[q])
        classes.append(box_cls)
    knn = np.stack([rng.choice(np.delete(np.arange(n_img), i), k, replace=False) for i in range(n_img)])
    corr = _corr([f"{i}.jpg" for i in range(n_img)], boxes, knn, [[np.zeros((0, 8))] * k] * n_img)
    return corr, _labelled(objects), classes


def test_pair_ranking_auc_perfect_random_and_tied_features():
    corr, gt, box_cls = _quadrant_world()
    rng = np.random.default_rng(1)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    # perfect: a class direction, and a direction of its own for each box on no object
    perfect, n_bg = [], sum(int((c < 0).sum()) for c in box_cls)
    for c in box_cls:
        f = np.zeros((len(c), 3 + n_bg))
        f[c >= 0, c[c >= 0]] = 1.0
        bg = np.flatnonzero(c < 0)
        f[bg, 3 + len(perfect) * len(bg) + np.arange(len(bg))] = 1.0
        perfect.append(f)
    r = pair_ranking_auc(corr, perfect, gt)
    assert r["auc"] == 1.0 and r["pooled_auc"] == 1.0 and r["image_pairs"] > 250
    assert 0.1 < r["positive_rate"] < 0.5
    noise = [unit(rng.standard_normal((len(c), 64))) for c in box_cls]
    r = pair_ranking_auc(corr, noise, gt)
    assert abs(r["auc"] - 0.5) < 0.03 and r["ci95"][0] < 0.5 < r["ci95"][1]
    assert r["ci95_by_query"][0] < r["auc"] < r["ci95_by_query"][1] and abs(r["pooled_auc"] - 0.5) < 0.02
    tied = [np.ones((len(c), 4)) / 2 for c in box_cls]
    assert pair_ranking_auc(corr, tied, gt)["auc"] == 0.5
    # signal and noise: in between, with an interval that excludes chance
    mixed = [unit(np.hstack([0.4 * p[:, :3], n])) for p, n in zip(perfect, noise, strict=True)]
    r = pair_ranking_auc(corr, mixed, gt)
    assert 0.55 < r["auc"] < 1.0 and r["ci95"][0] > 0.5


def test_paired_auc_difference_sees_a_small_gain_that_two_intervals_miss():
    corr, gt, box_cls = _quadrant_world(n_img=80)
    rng = np.random.default_rng(3)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    onehot = [np.eye(3)[np.maximum(c, 0)] * (c >= 0)[:, None] for c in box_cls]
    noise = [rng.standard_normal((len(c), 64)) for c in box_cls]
    weak = [unit(np.hstack([0.30 * o, n])) for o, n in zip(onehot, noise, strict=True)]
    weaker = [unit(np.hstack([0.25 * o, n])) for o, n in zip(onehot, noise, strict=True)]
    ra = pair_ranking_auc(corr, weak, gt, keep_per_pair=True)
    rb = pair_ranking_auc(corr, weaker, gt, keep_per_pair=True)
    pp = ra["per_pair"]
    assert len(pp["query"]) == len(pp["neighbour"]) == len(pp["auc"]) == ra["image_pairs"]
    assert np.mean(pp["auc"]) == pytest.approx(ra["auc"])
    assert "per_pair" not in pair_ranking_auc(corr, weak, gt)  # only when asked: it is large
    d = paired_auc_difference(ra["per_pair"], rb["per_pair"])
    assert d["auc"]["pairs"] == ra["image_pairs"]
    assert d["auc"]["diff"] == pytest.approx(ra["auc"] - rb["auc"])
    # the same noise in both: the paired interval excludes 0 although the two overlap
    assert d["auc"]["ci95"][0] > 0 and d["auc"]["a_higher"] > 0.5
    assert ra["ci95"][0] < rb["ci95"][1]
    assert d["auc_area_matched"]["diff"] > 0
    # identical features: exactly no difference; swapped: the sign flips
    same = paired_auc_difference(ra["per_pair"], ra["per_pair"])["auc"]
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["a_higher"] == 0.0
    assert paired_auc_difference(rb["per_pair"], ra["per_pair"])["auc"]["diff"] == pytest.approx(-d["auc"]["diff"])
    # only the image pairs both have are compared
    half = {k: v[: len(v) // 2] for k, v in rb["per_pair"].items()}
    assert paired_auc_difference(ra["per_pair"], half)["auc"]["pairs"] == len(half["auc"])
    empty = {"query": [], "neighbour": [], "auc": [], "auc_area_matched": []}
    assert paired_auc_difference(ra["per_pair"], empty)["auc"]["diff"] is None


def test_pair_ranking_auc_area_matched_ignores_box_size():
    from orl.metrics import _stratified_auc

    # hand-made: two cells; within cell 0 the positive wins, within cell 1 it loses
    s = np.array([0.9, 0.1, 0.2, 0.8])
    y = np.array([True, False, True, False])
    cells = np.array([0, 0, 1, 1])
    assert _stratified_auc(s, y, cells) == 0.5
    assert _stratified_auc(s, y, np.zeros(4)) == 0.75  # one cell: the plain AUC (3 of 4 wins)
    assert _stratified_auc(s[:2], np.array([True, True]), np.zeros(2)) is None
    # a feature that encodes only box size: the plain AUC moves off 0.5 where size and
    # label are related; the area-matched AUC stays at chance within its interval
    corr, gt, box_cls = _quadrant_world()
    size = [np.log(areas(b))[:, None] for b in corr.boxes]
    mu = np.mean(np.concatenate(size))
    feats = [np.hstack([s_ - mu, np.ones_like(s_)]) / np.linalg.norm(np.hstack([s_ - mu, np.ones_like(s_)]),
                                                                     axis=1, keepdims=True) for s_ in size]
    r = pair_ranking_auc(corr, feats, gt)
    lo, hi = r["ci95_area_matched"]
    assert r["image_pairs_area_matched"] > 0 and lo - 0.05 < 0.5 < hi + 0.05
    assert abs(r["auc_area_matched"] - 0.5) <= abs(r["auc"] - 0.5) + 1e-9


# -- area-matched baseline and shared-class figures ------------------------------------------
SMALL_A = [[80, 0, 90, 10], [80, 20, 90, 30]]  # 10 x 10, on no object of a
SMALL_B = [[0, 60, 10, 70], [20, 60, 30, 70]]  # 10 x 10, on no object of b


def test_area_matched_draws_only_from_the_mined_boxes_bins():
    rng = np.random.default_rng(0)
    sizes = np.array([4, 5, 6, 20, 22, 25, 60, 70, 80], float)  # three clear size groups
    cands = np.stack([np.zeros(9), np.zeros(9), sizes, sizes], 1)
    edges = area_bin_edges([cands], 3)
    assert area_bin(cands, edges).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    mined = cands[[0, 4, 8, 3, 7]]
    for _ in range(200):
        q, n, fb = area_matched_pairs(mined, mined[::-1], cands, cands, edges, rng)
        assert fb == 0
        assert area_bin(q, edges).tolist() == area_bin(mined, edges).tolist()
        assert area_bin(n, edges).tolist() == area_bin(mined[::-1], edges).tolist()
    # every candidate of a bin gets drawn (uniform within the bin, not just the mined box)
    q, _, _ = area_matched_pairs(np.repeat(mined[:1], 300, 0), np.repeat(mined[:1], 300, 0), cands, cands, edges, rng)
    assert {tuple(b) for b in q} == {tuple(b) for b in cands[:3]}
    # a bin with no candidate in this image: the nearest non-empty bin, counted
    q, n, fb = area_matched_pairs(mined[:1], mined[:1], cands[3:], cands[6:], edges, rng)
    assert fb == 2 and area_bin(q, edges)[0] == 1 and area_bin(n, edges)[0] == 2
    assert area_matched_pairs(mined, mined, np.zeros((0, 4)), cands, edges, rng)[0].shape == (0, 4)


def test_area_matched_precision_differs_from_uniform_by_hand():
    # candidates: a = cat, car (2500 px2), two 10 x 10 boxes; b = cat, dog (1600 px2), two
    # small ones. Two area bins split small from large. Mined pairs are all cat/cat (large,
    # large). Uniform chance: only cat/cat of 4 x 4 is correct = 1/16; area-matched chance
    # draws from {cat, car} x {cat, dog}: 1/4.
    files = ["a.jpg", "b.jpg"]
    boxes = [[CAT_A, CAR_A, *SMALL_A], [CAT_B, DOG_B, *SMALL_B]]
    many = np.array([CAT_A + CAT_B] * 4000, dtype=float)
    corr = _corr(files, boxes, [[1], [0]], [[many], [np.zeros((0, 8))]])
    r = correspondence_precision(corr, _gt(), seed=0, area_bins=2)
    assert r["precision"] == 1.0 and r["area_bins"] == 2
    assert r["random"]["precision"] == pytest.approx(1 / 16, abs=0.015)
    assert r["random_area_matched"]["precision"] == pytest.approx(1 / 4, abs=0.025)
    assert r["random_area_matched"]["pairs"] == 4000 and r["random_area_matched"]["fallbacks"] == 0
    assert r["lift_area_matched"] == pytest.approx(1 / r["random_area_matched"]["precision"])
    assert 100 < r["area_bin_edges_px2"][0] < 1600
    # the random figures are those of the version without the area-matched baseline
    assert r["random"]["precision"] == correspondence_precision(corr, _gt(), seed=0, area_bins=5)["random"]["precision"]


def test_shared_class_restriction_and_intervals():
    p = lambda *rows: np.array([q + n for q, n in rows], dtype=float)  # noqa: E731
    objects = {"a.jpg": _gt()["a.jpg"], "b.jpg": _gt()["b.jpg"],
               "e.jpg": _obj([[0, 0, 100, 100]], [1])}  # e: a dog only, shares nothing with a
    gt = _labelled(objects)
    files = ["a.jpg", "b.jpg", "e.jpg"]
    boxes = [[CAT_A, CAR_A], [CAT_B, DOG_B], [[0, 0, 100, 100]]]
    knn = [[1, 2], [0, -1], [0, -1]]
    pairs = [[p((CAT_A, CAT_B), (CAR_A, DOG_B)), p((CAT_A, [0, 0, 100, 100]), (CAR_A, [0, 0, 100, 100]))],
             [p((CAT_B, CAT_A), (DOG_B, CAR_A)), np.zeros((0, 8))],
             [p(([0, 0, 100, 100], CAR_A)), np.zeros((0, 8))]]
    r = correspondence_precision(_corr(files, boxes, knn, pairs), gt)
    # 7 pairs, 2 correct; a-e and e-a share no class: 4 pairs of a-b and b-a remain
    assert r["pairs"] == 7 and r["correct"] == 2
    sc = r["shared_class"]
    assert sc["image_pairs"] == 2 and sc["pairs"] == 4 and sc["correct"] == 2
    assert sc["precision"] == 0.5
    # in a-b the only correct candidate pair of 2 x 2 is cat/cat: chance 1/4 either way
    assert 0 <= sc["random_precision"] <= 1 and 0 <= sc["random_area_matched_precision"] <= 1
    lo, hi = r["precision_ci95"]
    assert lo <= r["precision"] <= hi
    assert sc["precision_ci95"] == [0.5, 0.5]  # both shared image pairs have precision 1/2
    assert r["knn_share_ci95"][0] <= r["knn"]["share"] <= r["knn_share_ci95"][1]


def test_wilson_interval_known_values():
    from orl.metrics import wilson_interval

    # Published values (e.g. Newcombe 1998, method 3; Brown, Cai & DasGupta 2001).
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    lo90, hi90 = wilson_interval(8, 10, level=0.90)
    assert 0.4902 < lo90 < hi90 < 0.9433  # a lower level, a narrower interval
    assert wilson_interval(0, 0) is None
    for bad in [(3, 2), (-1, 5)]:
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="level"):
        wilson_interval(1, 2, level=1.0)


def test_box_recall_known_answer():
    from orl.metrics import box_recall

    # a: the cat framed (IoU 1), the car only half (IoU 0.5 with [50, 50, 100, 75]: 0.5); b: the
    # dog framed, the cat missed; c has no objects; d is unlabeled.
    boxes = [[CAT_A, [50, 50, 100, 75]], [DOG_B, NOTHING], [NOTHING], [CAT_A]]
    corr = _corr(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], boxes, [[1], [0], [0], [0]],
                 [[np.zeros((0, 8))]] * 4)
    r = box_recall(corr, _gt(), 0.5, n_boot=200)
    assert (r["objects"], r["images"], r["recall"]) == (4, 3, 3 / 4)
    assert box_recall(corr, _gt(), 0.6, n_boot=10)["recall"] == 2 / 4
    # only objects at least 45 px a side can be reached (the cat of b is 40 x 40)
    r = box_recall(corr, _gt(), 0.5, min_side_px=45, n_boot=200)
    assert (r["reachable_objects"], r["reachable_recall"]) == (2, 1.0)
    assert r["ci95"][0] <= r["recall"] <= r["ci95"][1]
