import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orl.labels import load_labels, split_of_path

COCO128 = Path("/work/shared/data/coco128")
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"  # bundled coco128 subset


def _img(path: Path, w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 120, 150)).save(path)


@pytest.fixture
def yolo_tree(tmp_path):
    """images/{train,val}/ with a labels/ mirror, a classes.yaml above labels/."""
    _img(tmp_path / "images/train/a.jpg", 200, 100)
    _img(tmp_path / "images/train/b.jpg", 100, 100)  # missing txt: no objects
    _img(tmp_path / "images/val/c.png", 50, 40)
    _img(tmp_path / "images/val/deep/d.jpg", 80, 80)  # mirrored sub-folder
    _img(tmp_path / "images/extra/e.jpg", 64, 64)  # no label folder at all: unlabeled
    lab = tmp_path / "labels"
    (lab / "train").mkdir(parents=True)
    (lab / "val/deep").mkdir(parents=True)
    (lab / "train/a.txt").write_text("1 0.5 0.5 0.5 0.5\n0 0.25 0.25 0.1 0.2\n\n")
    (lab / "val/c.txt").write_text("")  # empty: no objects
    (lab / "val/deep/d.txt").write_text("2 0.1 0.1 0.5 0.1 0.5 0.6\n")  # polygon
    (tmp_path / "classes.yaml").write_text("names:\n  0: cat\n  1: dog\n  2: car\n")
    return tmp_path


def test_yolo_boxes_names_and_splits(yolo_tree):
    gt = load_labels(yolo_tree / "images", yolo_tree / "labels")
    assert gt.format == "yolo"
    assert gt.classes == ["cat", "dog", "car"]
    a = gt["train/a.jpg"]
    assert a.names == ("dog", "cat")
    np.testing.assert_allclose(a.boxes, [[50, 25, 150, 75], [40, 15, 60, 35]])
    assert a.size == (200, 100)
    assert len(gt["train/b.jpg"]) == 0 and len(gt["val/c.png"]) == 0
    d = gt["val/deep/d.jpg"]
    np.testing.assert_allclose(d.boxes, [[8, 8, 40, 48]])  # polygon bbox * 80 px
    assert list(d)[0][0] == "car"
    assert gt.unlabeled == ["extra/e.jpg"]
    assert gt.images("train") == ["train/a.jpg", "train/b.jpg"]
    assert gt.images("val") == ["val/c.png", "val/deep/d.jpg"]
    assert gt.image_classes("train/a.jpg") == {0, 1}
    assert gt.summary()["objects"] == 3


def test_yolo_from_parent_root_and_split_root(yolo_tree):
    # images_root one level up: labels/train/a.txt still pairs with images/train/a.jpg
    gt = load_labels(yolo_tree, yolo_tree / "labels")
    assert len(gt["images/train/a.jpg"]) == 2
    # images_root is the split folder itself, labels_root the parent labels folder
    gt = load_labels(yolo_tree / "images/train", yolo_tree / "labels")
    assert len(gt["a.jpg"]) == 2 and len(gt["b.jpg"]) == 0


def test_yolo_without_names_uses_ids(yolo_tree):
    (yolo_tree / "classes.yaml").unlink()
    gt = load_labels(yolo_tree / "images", yolo_tree / "labels")
    assert gt.classes == ["0", "1", "2"]
    assert gt["train/a.jpg"].names == ("1", "0")


def test_yolo_bad_line_and_unknown_id(yolo_tree):
    (yolo_tree / "labels/train/a.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(ValueError, match="a.txt:1"):
        load_labels(yolo_tree / "images", yolo_tree / "labels")
    (yolo_tree / "labels/train/a.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match=r"\[7\]"):
        load_labels(yolo_tree / "images", yolo_tree / "labels")


def _coco(path: Path, images, anns, cats=((1, "person"), (3, "car"))):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [{"id": n, "image_id": i, "bbox": b, "category_id": c, "iscrowd": cr}
                        for n, (i, b, c, cr) in enumerate(anns)],
        "categories": [{"id": c, "name": n} for c, n in cats],
    }))


def test_coco_file_and_folder(tmp_path):
    _img(tmp_path / "imgs/train2017/x.jpg", 100, 80)
    _img(tmp_path / "imgs/val2017/y.jpg", 60, 60)
    _img(tmp_path / "imgs/val2017/x.jpg", 60, 60)  # same name as a train image
    _img(tmp_path / "imgs/unlabeled/z.jpg", 60, 60)
    ann = tmp_path / "ann"
    _coco(ann / "instances_train2017.json", [(1, "train2017/x.jpg", 100, 80)],
          [(1, [10, 20, 30, 40], 3, 0), (1, [0, 0, 50, 50], 1, 1)])  # second is a crowd box
    _coco(ann / "instances_val2017.json", [(5, "y.jpg", 60, 60), (6, "x.jpg", 60, 60)],
          [(5, [50, 50, 20, 20], 1, 0)])
    gt = load_labels(tmp_path / "imgs", ann)
    assert gt.format == "coco" and gt.classes == ["person", "car"]
    x = gt["train2017/x.jpg"]
    assert x.names == ("car",)
    np.testing.assert_allclose(x.boxes, [[10, 20, 40, 60]])
    np.testing.assert_allclose(gt["val2017/y.jpg"].boxes, [[50, 50, 60, 60]])  # clipped
    assert len(gt["val2017/x.jpg"]) == 0  # from the val json, not the train one
    assert gt.unlabeled == ["unlabeled/z.jpg"]
    assert gt.images("train") == ["train2017/x.jpg"]
    one = load_labels(tmp_path / "imgs", ann / "instances_train2017.json")
    assert list(one) == ["train2017/x.jpg"]
    # no width/height in the json: the size comes from the image header
    data = json.loads((ann / "instances_train2017.json").read_text())
    del data["images"][0]["width"], data["images"][0]["height"]
    (tmp_path / "nosize.json").write_text(json.dumps(data))
    assert load_labels(tmp_path / "imgs", tmp_path / "nosize.json")["train2017/x.jpg"].size == (100, 80)


def test_errors_name_the_problem(tmp_path):
    _img(tmp_path / "imgs/a.jpg", 10, 10)
    with pytest.raises(FileNotFoundError, match="labels not found"):
        load_labels(tmp_path / "imgs", tmp_path / "nope")
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="COCO instances"):
        load_labels(tmp_path / "imgs", tmp_path / "labels.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="YOLO label folder"):
        load_labels(tmp_path / "imgs", tmp_path / "empty")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO instances json"):
        load_labels(tmp_path / "imgs", tmp_path / "bad.json")
    _coco(tmp_path / "unknown_cat.json", [(1, "a.jpg", 10, 10)], [(1, [0, 0, 5, 5], 99, 0)])
    with pytest.raises(ValueError, match="malformed COCO"):
        load_labels(tmp_path / "imgs", tmp_path / "unknown_cat.json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/zzz.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ValueError, match="belong together"):
        load_labels(tmp_path / "imgs", tmp_path / "other")  # a txt for another image only
    with pytest.raises(FileNotFoundError):
        load_labels(tmp_path / "missing", tmp_path / "bad.json")


def test_split_rule_is_stable():
    assert split_of_path("train2017/a.jpg") == "train"
    assert split_of_path("x/Val/a.jpg") == "val"
    assert split_of_path("test-set/a.jpg") == "val"
    assert split_of_path("trainval.jpg") in ("train", "val")  # file names are not looked at
    flat = [split_of_path(f"img_{i}.jpg") for i in range(400)]
    assert flat == [split_of_path(f"img_{i}.jpg") for i in range(400)]
    assert 150 < flat.count("train") < 250


@pytest.mark.skipif(not COCO128.exists(), reason="coco128 not available")
def test_real_coco128():
    gt = load_labels(COCO128 / "images", COCO128 / "labels")
    assert len(gt.classes) == 80 and gt.classes[0] == "person"
    nine = gt["train2017/000000000009.jpg"]
    assert len(nine) == 8 and nine.names.count("orange") == 4
    assert nine.size == (640, 480)
    assert len(gt["train2017/000000000250.jpg"]) == 0  # no label file: no objects
    assert gt.summary()["train"] == 128 and gt.summary()["val"] == 128


@pytest.mark.skipif(not (SAMPLE / "classes.yaml").exists(), reason="bundled sample not available")
def test_bundled_sample():
    gt = load_labels(SAMPLE / "images", SAMPLE / "labels")
    assert len(gt["train2017/000000000009.jpg"]) == 8
    assert gt.summary()["train"] == 16 and gt.summary()["val"] == 16
