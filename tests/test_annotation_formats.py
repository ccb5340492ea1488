"""Mined pairs as Label Studio tasks and COCO detections (``orl export-pairs``), read back by each
format's reader: pycocotools always, the Label Studio import rules always, label-studio-sdk and
FiftyOne when they are importable (see tests/annotation_readers.py for why they are not pinned)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from orl import annotation_formats as af
from orl.cli import main
from orl.correspondence import Correspondence
from tests import annotation_readers as readers

SIZES = [(640, 480), (300, 500), (1024, 768)]


@pytest.fixture
def mined_dir(tmp_path):
    """A correspondence.json over three real image files of different sizes: image 0 pairs with 1
    (two pairs) and 2 (one pair), image 2 with 0 (one pair, a box touching the image's corner)."""
    images = tmp_path / "images"
    (images / "sub dir").mkdir(parents=True)
    files = ["a.jpg", "sub dir/b.jpg", "c.jpg"]
    for f, (w, h) in zip(files, SIZES, strict=True):
        PILImage.new("RGB", (w, h), (90, 120, 150)).save(images / f)
    e = np.zeros((0, 8))
    pairs = [[np.array([[10, 20, 110, 220, 5, 6, 55, 66], [0, 0, 640, 480, 1, 2, 299, 499]], float),
              np.array([[300.5, 100.25, 400, 300, 900, 700, 1024, 768]])],
             [e, e], [np.array([[0, 0, 1024, 768, 600, 400, 640, 480]], float), e]]
    scores = [[np.array([0.9, 0.8]), np.array([-0.2])], [np.zeros(0), np.zeros(0)], [np.array([0.5]), np.zeros(0)]]
    corr = Correspondence(files=files, sizes=np.array(SIZES), boxes=[np.zeros((0, 4))] * 3,
                          knn=np.array([[1, 2], [0, 2], [0, 1]]), knn_sim=np.full((3, 2), 0.5),
                          pairs=pairs, pair_scores=scores, info={"knn_image_num": 2})
    (tmp_path / "m").mkdir()
    corr.save(tmp_path / "m" / "correspondence.json")
    return tmp_path, images, corr


def _expected(corr: Correspondence) -> dict[int, tuple]:
    """pair id (1.. in file order) -> (query image id, neighbour image id, q box, n box, score)."""
    out, n = {}, 0
    for i, j, _rank, q, b, s in corr.iter_pairs():
        n += 1
        out[n] = (i + 1, j + 1, tuple(q), tuple(b), s)
    return out


def _same(back: dict[int, readers.Back], want: dict[int, tuple]) -> None:
    assert sorted(back) == sorted(want)
    for pid, (qi, ni, qb, nb, s) in want.items():
        got = back[pid]
        assert (got.query_image_id, got.neighbor_image_id) == (qi, ni)
        assert got.query_box == pytest.approx(qb, abs=1e-6) and got.neighbor_box == pytest.approx(nb, abs=1e-6)
        assert got.score == pytest.approx(s) and got.verdict == af.UNREVIEWED


def test_percent_box_round_trip_and_bounds():
    v = af.percent_box((64.0, 48.0, 640.0, 480.0), 640, 480)
    assert v == {"x": 10.0, "y": 10.0, "width": 90.0, "height": 90.0, "rotation": 0}
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(x) for x in rng.integers(1, 5000, 2))
        x1, x2 = sorted(rng.uniform(0, w, 2))
        y1, y2 = sorted(rng.uniform(0, h, 2))
        p = af.percent_box((x1, y1, x2, y2), w, h)
        assert 0 <= p["x"] and p["x"] + p["width"] <= 100 + 1e-9 and p["y"] + p["height"] <= 100 + 1e-9
        assert p["x"] * w / 100 == pytest.approx(x1) and (p["y"] + p["height"]) * h / 100 == pytest.approx(y2)
    # a box past the edge (a rounding error) is clipped to the image
    assert af.percent_box((-0.001, 0, 640.0000001, 480), 640, 480) == {"x": 0.0, "y": 0.0, "width": 100.0,
                                                                        "height": 100.0, "rotation": 0}
    with pytest.raises(ValueError, match="image size 0x480"):
        af.percent_box((0, 0, 1, 1), 0, 480)


def test_coco_export_loads_in_pycocotools(mined_dir, capsys):
    tmp, images, corr = mined_dir
    out = tmp / "pairs.coco.json"
    assert main(["export-pairs", "--pairs", str(tmp / "m"), "--format", "coco", "--out", str(out), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out) == {"coco": str(out), "images": 3, "pairs": 4}
    back = readers.coco_back_pycocotools(out)
    _same(back, _expected(corr))
    data = json.loads(out.read_text())
    assert [i["file_name"] for i in data["images"]] == corr.files and data["images"][1]["width"] == 300
    assert data["info"]["knn_image_num"] == 2  # the run's parameters come along
    ann = {a["id"]: a for a in data["annotations"]}
    assert ann[2]["bbox"] == [10.0, 20.0, 100.0, 200.0] and ann[2]["area"] == 100.0 * 200.0
    assert ann[3]["partner_annotation_id"] == 2 and ann[3]["role"] == "neighbor"


def test_labelstudio_export_follows_the_import_rules(mined_dir, capsys):
    tmp, images, corr = mined_dir
    out = tmp / "tasks.json"
    assert main(["export-pairs", "--pairs", str(tmp / "m"), "--format", "labelstudio", "--out", str(out),
                 "--quiet"]) == 0
    written = json.loads(capsys.readouterr().out)
    config = (tmp / "tasks.labelstudio.xml").read_text()
    assert written["labeling_config"] == str(tmp / "tasks.labelstudio.xml") and config == af.LABELSTUDIO_CONFIG
    tasks = json.loads(out.read_text())
    assert readers.labelstudio_rule_errors(config, tasks) == []
    _same(readers.labelstudio_back(tasks), _expected(corr))
    t = tasks[0]
    assert t["data"]["neighbor_image"] == "/data/local-files/?d=sub%20dir/b.jpg"  # a path with a space, quoted
    assert tasks[2]["predictions"][0]["score"] == 0.0 and tasks[2]["data"]["score"] == pytest.approx(-0.2)
    assert "annotations" not in t  # no reviews in a correspondence.json
    # the rules catch what Label Studio would refuse
    bad = json.loads(out.read_text())
    bad[0]["predictions"][0]["result"][0]["value"]["x"] = 95.0
    bad[1]["predictions"][0]["result"][2]["to_id"] = "nowhere"
    del bad[2]["data"]["query_image"]
    errs = readers.labelstudio_rule_errors(config, bad)
    assert len(errs) == 3 and "not inside its image" in errs[0] and "query_image" in errs[1] + errs[2]


def test_export_pairs_refuses_bad_options(mined_dir, capsys):
    tmp, _, _ = mined_dir
    assert main(["export-pairs", "--pairs", str(tmp / "m"), "--format", "coco", "--out", str(tmp / "x.json"),
                 "--image-url-prefix", "http://x/", "--quiet"]) == 2
    assert "--format labelstudio only" in capsys.readouterr().err
    assert main(["export-pairs", "--pairs", str(tmp / "nowhere"), "--format", "coco", "--out", str(tmp / "x.json"),
                 "--quiet"]) == 2
    assert "no correspondence file" in capsys.readouterr().err and not (tmp / "x.json").exists()


def test_labelstudio_export_passes_the_sdk_validator(mined_dir):
    pytest.importorskip("label_studio_sdk", reason="label-studio-sdk is not installed (not pinned: see "
                                                   "tests/annotation_readers.py)")
    tmp, _, corr = mined_dir
    out = tmp / "tasks.json"
    assert main(["export-pairs", "--pairs", str(tmp / "m"), "--format", "labelstudio", "--out", str(out),
                 "--quiet"]) == 0
    tasks = json.loads(out.read_text())
    assert readers.labelstudio_sdk_errors(af.LABELSTUDIO_CONFIG, tasks) == []
    tasks[0]["predictions"][0]["result"][1]["value"]["width"] = 250.0
    assert any("out of bounds" in e for e in readers.labelstudio_sdk_errors(af.LABELSTUDIO_CONFIG, tasks))


def test_coco_export_loads_in_fiftyone(mined_dir):
    pytest.importorskip("fiftyone", reason="fiftyone is not installed (not pinned: see tests/annotation_readers.py)")
    tmp, images, corr = mined_dir
    out = tmp / "pairs.coco.json"
    assert main(["export-pairs", "--pairs", str(tmp / "m"), "--format", "coco", "--out", str(out), "--quiet"]) == 0
    back, samples = readers.coco_back_fiftyone(out, images)
    assert samples == 3
    _same(back, _expected(corr))
