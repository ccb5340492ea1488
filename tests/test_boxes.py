"""Property tests for box geometry, the official filter and the intra-RoI jitter."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from orl.boxes import filter_boxes, iou_matrix, jitter_box, xywh_to_xyxy, xyxy_to_xywh

coord = st.floats(0, 1000, allow_nan=False, allow_infinity=False)
size = st.floats(1, 500, allow_nan=False, allow_infinity=False)


@st.composite
def xyxy_boxes(draw, max_n=30):
    n = draw(st.integers(1, max_n))
    rows = [[x, y, x + w, y + h] for x, y, w, h in
            (draw(st.tuples(coord, coord, size, size)) for _ in range(n))]
    return np.array(rows, dtype=np.float64)


@given(xyxy_boxes())
def test_xywh_round_trip(b):
    assert np.allclose(xywh_to_xyxy(xyxy_to_xywh(b)), b)
    wh = xyxy_to_xywh(b)[:, 2:]
    assert (wh > 0).all()


@given(xyxy_boxes(), xyxy_boxes())
def test_iou_symmetric_and_bounded(a, b):
    m = iou_matrix(a, b)
    assert m.shape == (len(a), len(b))
    assert np.allclose(m, iou_matrix(b, a).T)
    assert (m >= 0).all() and (m <= 1 + 1e-12).all()
    assert np.allclose(np.diag(iou_matrix(a, a)), 1.0)


def test_iou_known_value():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10]])  # overlap 50, union 150
    assert np.isclose(iou_matrix(a, b)[0, 0], 50 / 150)


@settings(max_examples=200)
@given(xyxy_boxes(max_n=60), st.integers(1, 20))
def test_filter_properties(b, max_boxes):
    kept = filter_boxes(b, 96, 3.0, 0.5, max_boxes)
    assert 1 <= len(kept) <= max_boxes
    w, h = kept[:, 2] - kept[:, 0], kept[:, 3] - kept[:, 1]
    passing = ((w >= 96) & (h >= 96) & (w / h <= 3) & (h / w <= 3))
    if passing.all():
        m = iou_matrix(kept, kept)
        np.fill_diagonal(m, 0)
        assert (m <= 0.5).all()
        # kept boxes come in proposal order: each is a row of the input, indices increasing
        idx = [int(np.flatnonzero((b == k).all(1))[0]) for k in kept]
        assert idx == sorted(idx)
    else:
        # the authors' fallback: nothing passed, so the first raw box is kept
        assert len(kept) == 1 and np.array_equal(kept[0], b[0])


def test_filter_order_and_fallback():
    boxes = np.array([
        [0, 0, 50, 50],        # too small
        [0, 0, 200, 200],      # kept
        [10, 10, 210, 210],    # IoU with previous > 0.5: dropped
        [0, 0, 400, 100],      # aspect 4: dropped
        [300, 300, 500, 500],  # kept
    ], dtype=float)
    kept = filter_boxes(boxes)
    assert np.array_equal(kept, boxes[[1, 4]])
    assert np.array_equal(filter_boxes(boxes, max_boxes=1), boxes[[1]])
    assert np.array_equal(filter_boxes(boxes[:1]), boxes[:1])  # fallback


@settings(max_examples=200)
@given(st.integers(100, 2000), st.integers(100, 2000), st.floats(0, 1), st.floats(0, 1),
       st.floats(0.05, 1), st.floats(0.05, 1), st.integers(0, 2**32 - 1))
def test_jitter_inside_overlapping_integer_and_absolute_aspect(W, H, fx, fy, fw, fh, seed):
    w, h = fw * W, fh * H
    x, y = fx * (W - w), fy * (H - h)
    box = np.array([x, y, x + w, y + h])
    out = jitter_box(box, (W, H), np.random.default_rng(seed))
    if np.array_equal(out, box):
        return  # fell back to the original box
    assert out[0] >= 0 and out[1] >= 0 and out[2] <= W and out[3] <= H
    assert iou_matrix(out[None], box[None])[0, 0] > 0.5
    assert np.array_equal(out, np.round(out)), "corner and size are integer pixels"
    nw, nh = out[2] - out[0], out[3] - out[1]
    # w' = round(sqrt(A r)), h' = round(sqrt(A / r)) with r in [0.5, 2] and A in [0.5, 2] x area:
    # true up to the rounding of each side by at most half a pixel.
    s_lo, s_hi = np.sqrt(0.5 * 0.5 * w * h), np.sqrt(2 * 2 * w * h)
    assert s_lo - 0.5 <= min(nw, nh) and max(nw, nh) <= s_hi + 0.5
    assert (nw - 0.5) / (nh + 0.5) <= 2 and (nh - 0.5) / (nw + 0.5) <= 2


def test_jitter_aspect_is_absolute_not_relative():
    """A 3:1 box's jitters have aspects in [0.5, 2] (a factor on its own aspect would give 1.5..6)."""
    box = np.array([100.0, 150.0, 400.0, 250.0])  # 300 x 100
    rng = np.random.default_rng(0)
    outs = [jitter_box(box, (640, 480), rng) for _ in range(300)]
    jittered = [o for o in outs if not np.array_equal(o, box)]
    assert len(jittered) > 100
    for o in jittered:
        assert np.array_equal(o, np.round(o))
        aspect = (o[2] - o[0]) / (o[3] - o[1])
        # sides are >= 86 px here, so rounding moves the aspect by under 1.2%
        assert 0.5 / 1.012 <= aspect <= 2 * 1.012, o


class _FixedDraws:
    """A stand-in Generator whose uniform() returns preset values (checked against the bounds)."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, lo, hi):
        v = self.values.pop(0)
        assert lo <= v <= hi
        return v


def test_jitter_known_value_and_rounding():
    box = np.array([100.0, 100.0, 300.0, 200.0])  # 200 x 100, area 20000, centre (200, 150)
    # area factor 1, log aspect 0 (r = 1: a square, whatever the box's own aspect), no shift:
    # side round(sqrt(20000)) = round(141.42) = 141; corner round(200 - 70.5) = round(129.5) = 130
    # and round(150 - 70.5) = round(79.5) = 80 (half to even, as Python's round).
    # IoU = 141 * 100 / (20000 + 141 * 141 - 141 * 100) = 0.547 > 0.5: accepted.
    out = jitter_box(box, (640, 480), _FixedDraws([1.0, 0.0, 0.0, 0.0]))
    assert out.tolist() == [130.0, 80.0, 271.0, 221.0]
    # outside the image on the first try (shifted left by half the width), then accepted
    out = jitter_box(box, (640, 480), _FixedDraws([1.0, 0.0, -0.5, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert out.tolist() == [130.0, 80.0, 271.0, 221.0]


def test_jitter_is_seeded_and_varies():
    box = np.array([100.0, 100.0, 300.0, 260.0])
    a = jitter_box(box, (640, 480), np.random.default_rng(1))
    b = jitter_box(box, (640, 480), np.random.default_rng(1))
    c = jitter_box(box, (640, 480), np.random.default_rng(2))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, box)


def test_jitter_falls_back_when_impossible():
    box = np.array([0.0, 0.0, 640.0, 480.0])  # the whole image: larger or shifted boxes leave it
    out = jitter_box(box, (640, 480), np.random.default_rng(0), max_tries=5, min_iou=0.99)
    assert np.array_equal(out, box)
