"""Pair renderings: geometry of render_pair, and the PNG writers on real coco128 photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orl.correspondence import Correspondence
from orl.images import image_size
from orl.render import GAP, PALETTE, render_image_pairs, render_pair, render_top_pairs

COCO = str(Path(__file__).resolve().parents[1] / "data" / "sample" / "images" / "train2017")
FILES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]


def _has(arr: np.ndarray, colour) -> bool:
    return bool(np.all(arr == np.asarray(colour, dtype=arr.dtype), axis=-1).any())


# -- render_pair ---------------------------------------------------------------------------
def test_render_pair_size_and_boxes_in_both_halves():
    q = Image.new("RGB", (200, 100), (128, 128, 128))  # scaled x1.2 at height 120
    n = Image.new("RGB", (150, 300), (90, 90, 90))  # scaled x0.4
    colour = (0, 120, 255)
    out = render_pair(q, n, [20, 10, 100, 60], [50, 100, 125, 250], 0.8731, rank=2,
                      height=120, colour=colour)
    assert out.mode == "RGB"
    assert out.width == 240 + GAP + 60
    assert out.height > 120  # caption strip below the images
    a = np.asarray(out)
    # Query box (24, 12)-(120, 72) after scaling: its top edge and left edge are coloured.
    assert tuple(a[12, 70]) == colour and tuple(a[40, 24]) == colour
    # Neighbour box (20, 40)-(50, 100) after scaling, shifted by the query width + gap.
    x_off = 240 + GAP
    assert tuple(a[40, x_off + 35]) == colour and tuple(a[70, x_off + 50]) == colour
    # Inside the boxes and elsewhere the images are untouched.
    assert tuple(a[40, 70]) == (128, 128, 128)
    assert tuple(a[110, 200]) == (128, 128, 128)
    assert tuple(a[70, x_off + 35]) == (90, 90, 90)
    # The box colour appears only in the two boxes and the caption swatch (left of the text).
    img_part = a[:120]
    ys, xs = np.nonzero(np.all(img_part == colour, axis=-1))
    in_q = (xs >= 22) & (xs <= 122) & (ys >= 10) & (ys <= 74)
    in_n = (xs >= x_off + 18) & (xs <= x_off + 52) & (ys >= 38) & (ys <= 102)
    assert np.all(in_q | in_n) and in_q.any() and in_n.any()


def test_render_pair_line_is_thick_and_boxes_share_a_colour():
    q = Image.new("RGB", (400, 400), (128, 128, 128))
    out = np.asarray(render_pair(q, q, [100, 100, 300, 300], [0, 0, 400, 400], 0.5, height=400))
    red = PALETTE[0]
    column = np.all(out[:400, 200] == red, axis=-1)  # vertical cut through the query box
    assert column[100:103].all()  # at least 3 px wide top edge
    assert _has(out[:400, :400], red) and _has(out[:400, 400 + GAP :], red)
    # A box on the image border is clipped, not lost.
    assert np.all(out[200, 400 + GAP : 400 + GAP + 3] == red)


def test_render_pair_rejects_bad_boxes():
    q = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="xyxy"):
        render_pair(q, q, [0, 0, 5], [0, 0, 5, 5], 0.1)
    with pytest.raises(ValueError, match="xyxy"):
        render_pair(q, q, [0, 0, 5, float("nan")], [0, 0, 5, 5], 0.1)


# -- a small hand-built correspondence over real photos ---------------------------------------
def _pairs(*rows):
    return np.asarray(rows, dtype=np.float64).reshape(-1, 8)


@pytest.fixture()
def corr_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    files = [FILES[0], FILES[1], "sub/" + FILES[2]]
    for src, dst in zip(FILES, files, strict=True):
        shutil.copy(f"{COCO}/{src}", root / dst)
    sizes = np.asarray([image_size(root / f) for f in files])
    boxes = [np.asarray([[10, 20, 200, 220.0], [300, 100, 500, 300]]),
             np.asarray([[50, 50, 300, 250.0]]), np.asarray([[100, 100, 300, 400.0]])]
    knn = np.asarray([[1, 2], [0, -1], [0, 1]])
    knn_sim = np.asarray([[0.9, 0.8], [0.9, np.nan], [0.8, 0.7]])
    pairs = [
        [_pairs([10, 20, 200, 220, 50, 50, 300, 250], [300, 100, 500, 300, 60, 60, 200, 200]),
         _pairs([10, 20, 200, 220, 100, 100, 300, 400])],
        [_pairs([400, 250, 600, 400, 10, 20, 200, 220]), _pairs()],
        [_pairs(), _pairs([100, 100, 300, 400, 50, 50, 300, 250])],
    ]
    scores = [[np.asarray([0.91, 0.7]), np.asarray([0.85])],
              [np.asarray([0.97]), np.zeros(0)],
              [np.zeros(0), np.asarray([0.5])]]
    corr = Correspondence(files, sizes, boxes, knn, knn_sim, pairs, scores)
    return corr, root


def test_render_image_pairs_writes_one_row_per_pair(corr_root, tmp_path):
    corr, root = corr_root
    out = render_image_pairs(corr, root, 0, tmp_path / "out" / "q0.png", max_pairs=8, height=200)
    assert out == tmp_path / "out" / "q0.png"
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.format == "PNG"
        a = np.asarray(png.convert("RGB"))
    # 3 pairs for image 0 -> 3 rows of at least 200 px each.
    assert a.shape[0] > 3 * 200
    for c in range(3):  # each pair in its own colour
        assert _has(a, PALETTE[c])
    assert not _has(a, PALETTE[3])
    # max_pairs keeps the best ones only.
    out1 = render_image_pairs(corr, root, 0, tmp_path / "q0_1.png", max_pairs=1, height=200)
    with Image.open(out1) as png:
        one = np.asarray(png.convert("RGB"))
    assert 200 < one.shape[0] < 2 * 200
    # The best pair of image 0 is (0 -> 1, rank 0): query box (10, 20)-(200, 220) in red.
    # Its top edge is the topmost red row (the caption swatch is below the photos).
    s = 200 / 480  # image 0 is 640x480
    red = np.all(one == PALETTE[0], axis=-1)
    top = int(np.nonzero(red.any(axis=1))[0].min())
    xs = np.nonzero(red[top, : round(640 * s)])[0]
    assert abs(xs.min() - 10 * s) <= 2 and abs(xs.max() - 200 * s) <= 2


def test_render_image_pairs_without_pairs_and_bad_index(corr_root, tmp_path):
    corr, root = corr_root
    corr.pairs[1][0] = _pairs()
    corr.pair_scores[1][0] = np.zeros(0)
    out = render_image_pairs(corr, root, 1, tmp_path / "none.png")
    with Image.open(out) as png:
        png.verify()
    with pytest.raises(IndexError):
        render_image_pairs(corr, root, 3, tmp_path / "x.png")


def test_render_refuses_images_whose_size_changed(corr_root, tmp_path):
    corr, root = corr_root
    Image.open(root / FILES[1]).resize((320, 213)).save(root / FILES[1])
    with pytest.raises(ValueError, match="when mined"):
        render_image_pairs(corr, root, 0, tmp_path / "x.png")


def test_render_top_pairs_best_first(corr_root, tmp_path):
    corr, root = corr_root
    paths = render_top_pairs(corr, root, tmp_path / "top", n=2, height=160)
    assert [p.name for p in paths] == ["top_001.png", "top_002.png"]
    for p in paths:
        with Image.open(p) as png:
            png.verify()
    # The best pair overall (0.97) is image 1's: query box (400, 250)-(600, 400) of a 640x426
    # photo, i.e. its lower right; the second best (0.91) is image 0's upper-left box.
    with Image.open(paths[0]) as png:
        a = np.asarray(png.convert("RGB"))
    s = 160 / 426
    ys, xs = np.nonzero(np.all(a[:160, : round(640 * s)] == PALETTE[0], axis=-1))
    assert abs(xs.min() - 400 * s) <= 3 and abs(ys.min() - 250 * s) <= 3
    # All pairs when n exceeds them; NaN scores are ranked last.
    corr.pair_scores[2][1] = np.asarray([np.nan])
    everything = render_top_pairs(corr, root, tmp_path / "all", n=100, height=64)
    assert len(everything) == corr.num_pairs == 5
    assert render_top_pairs(corr, root, tmp_path / "zero", n=0) == []
