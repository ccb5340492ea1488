import numpy as np
import pytest

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
