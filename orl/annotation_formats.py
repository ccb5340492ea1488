"""Mined RoI pairs as files that annotation tools read: Label Studio tasks and COCO detections.

A pair links a box in one image (the query) to a box in another (its neighbour). Both formats
are per-image at heart, so each says how it carries the link:

- **Label Studio** (:func:`labelstudio_tasks_json`): a relation joins two regions of one task,
  so one task holds one pair and both images, side by side (:data:`LABELSTUDIO_CONFIG` is the
  labeling config to paste into the project). The mined boxes are the task's prediction (two
  ``rectanglelabels`` regions in percent of their image, and the relation between them); each
  reviewer's verdict is an annotation of the same regions plus a ``verdict`` choice.
- **COCO** (:func:`coco_json`), as FiftyOne's ``COCODetectionDataset`` and pycocotools load it:
  ``images`` are the images of the pairs, ``annotations`` two per pair (the query box and the
  neighbour box, ``bbox`` xywh in pixels, with the pair's id, score and verdict as attributes),
  and a top-level ``pairs`` list, which COCO readers keep but ignore, links annotation ids.
  Annotation ids follow from the pair id (:func:`coco_annotation_ids`), so two exports of one
  job name every box the same.

Both are written as a stream of text chunks, so a job with millions of pairs never sits in memory.
Boxes arrive in the library's convention (float xyxy in original pixels) and are converted here,
at the edge.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from orl.correspondence import Correspondence

ROI_LABEL = "roi"  # the one class of every mined box (Label Studio label, COCO category)
RELATION_LABEL = "same object"
VERDICT_CHOICES = ("correct", "wrong")
UNREVIEWED = "unreviewed"
# Label Studio's local-files URL: + a path under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.
LABELSTUDIO_LOCAL_FILES = "/data/local-files/?d="
CHUNK_CHARS = 1 << 16

Box = tuple[float, float, float, float]  # xyxy, original pixels


@dataclass(frozen=True)
class PairImage:
    """One side of a pair: the image's id, its path under the images folder and its size in pixels."""

    image_id: int
    file: str
    width: int
    height: int


@dataclass(frozen=True)
class Verdict:
    reviewer: str
    verdict: str  # one of VERDICT_CHOICES
    updated_at: str | None = None  # ISO 8601


@dataclass(frozen=True)
class PairRecord:
    """A mined pair with what the formats need: both images, both boxes (xyxy px), score and ranks,
    the reviewers' verdicts and the consensus of them (``verdict``: correct, wrong, disputed, or
    None when nobody reviewed it; the caller decides the rule)."""

    pair_id: int
    query: PairImage
    neighbor: PairImage
    query_box: Box
    neighbor_box: Box
    score: float
    neighbor_rank: int
    rank: int
    job_id: int | None = None
    reviews: tuple[Verdict, ...] = ()
    verdict: str | None = None

    @property
    def review_counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.reviews) for v in VERDICT_CHOICES}

    def reviews_json(self) -> list[dict[str, Any]]:
        return [{"reviewer": r.reviewer, "verdict": r.verdict, "updated_at": r.updated_at} for r in self.reviews]


def _chunks(parts: Iterable[str]) -> Iterator[str]:
    """Join small strings into chunks of about CHUNK_CHARS (fewer, larger writes to the socket)."""
    buf: list[str] = []
    size = 0
    for p in parts:
        buf.append(p)
        size += len(p)
        if size >= CHUNK_CHARS:
            yield "".join(buf)
            buf, size = [], 0
    if buf:
        yield "".join(buf)


def _json_array(items: Iterable[Any]) -> Iterator[str]:
    yield "["
    for n, item in enumerate(items):
        yield ("\n" if n == 0 else ",\n") + json.dumps(item)
    yield "\n]"


# -- Label Studio ------------------------------------------------------------------------------
# Two Image objects side by side in one task: a relation can only join regions of one task.
LABELSTUDIO_CONFIG = f"""<View>
  <Header value="$caption"/>
  <View style="display: flex; gap: 1em;">
    <View style="flex: 1;">
      <Image name="query" value="$query_image" zoom="true"/>
      <RectangleLabels name="query_box" toName="query">
        <Label value="{ROI_LABEL}" background="#e8590c"/>
      </RectangleLabels>
    </View>
    <View style="flex: 1;">
      <Image name="neighbor" value="$neighbor_image" zoom="true"/>
      <RectangleLabels name="neighbor_box" toName="neighbor">
        <Label value="{ROI_LABEL}" background="#1971c2"/>
      </RectangleLabels>
    </View>
  </View>
  <Relations>
    <Relation value="{RELATION_LABEL}"/>
  </Relations>
  <Choices name="verdict" toName="query" choice="single" showInline="true">
    <Choice value="{VERDICT_CHOICES[0]}"/>
    <Choice value="{VERDICT_CHOICES[1]}"/>
  </Choices>
</View>
"""


def percent_box(box: Box, width: int, height: int) -> dict[str, float]:
    """xyxy pixels -> Label Studio's rectangle value: top-left corner and size in percent of the
    image, clipped to it (Label Studio refuses a region outside its image, and a box on the edge
    may cross it by a rounding error)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}: a box in percent needs the image's width and height")

    def pct(v: float, side: int) -> float:
        return min(100.0, max(0.0, 100.0 * v / side))

    x1, y1, x2, y2 = pct(box[0], width), pct(box[1], height), pct(box[2], width), pct(box[3], height)
    return {"x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1, "rotation": 0}


def _ls_rect(region_id: str, control: str, image_name: str, img: PairImage, box: Box) -> dict[str, Any]:
    return {"id": region_id, "type": "rectanglelabels", "from_name": control, "to_name": image_name,
            "original_width": img.width, "original_height": img.height, "image_rotation": 0,
            "value": {**percent_box(box, img.width, img.height), "rectanglelabels": [ROI_LABEL]}}


def labelstudio_regions(rec: PairRecord) -> list[dict[str, Any]]:
    """The pair as Label Studio results: the query box, the neighbour box, a relation from the first to the second."""
    q_id, n_id = f"q{rec.pair_id}", f"n{rec.pair_id}"
    return [_ls_rect(q_id, "query_box", "query", rec.query, rec.query_box),
            _ls_rect(n_id, "neighbor_box", "neighbor", rec.neighbor, rec.neighbor_box),
            {"type": "relation", "from_id": q_id, "to_id": n_id, "direction": "right", "labels": [RELATION_LABEL]}]


def labelstudio_task(rec: PairRecord, image_url: Callable[[PairImage], str], model_version: str) -> dict[str, Any]:
    """One Label Studio task (import format) for one pair; ``image_url`` says where the browser finds an image."""
    regions = labelstudio_regions(rec)
    data = {"query_image": image_url(rec.query), "neighbor_image": image_url(rec.neighbor),
            "caption": f"pair {rec.pair_id}: score {rec.score:.3f}, neighbour {rec.neighbor_rank}, rank {rec.rank}",
            "pair_id": rec.pair_id, "job_id": rec.job_id, "score": rec.score, "neighbor_rank": rec.neighbor_rank,
            "rank": rec.rank, "query_image_id": rec.query.image_id, "neighbor_image_id": rec.neighbor.image_id,
            "query_path": rec.query.file, "neighbor_path": rec.neighbor.file,
            "verdict": rec.verdict or UNREVIEWED, "reviews": rec.reviews_json()}
    # Label Studio wants a prediction score in [0, 1]; a cosine similarity below 0 is clipped
    # (the raw one is data.score).
    task: dict[str, Any] = {"data": data, "predictions": [
        {"model_version": model_version, "score": min(1.0, max(0.0, rec.score)), "result": regions}]}
    if rec.reviews:
        # Label Studio users are per-instance ids, so who said what stays in data.reviews; each
        # verdict is an annotation, which Label Studio assigns to the importing user.
        task["annotations"] = [{"result": [*regions, {"id": f"v{rec.pair_id}_{i}", "type": "choices",
                                                      "from_name": "verdict", "to_name": "query",
                                                      "value": {"choices": [r.verdict]}}]}
                               for i, r in enumerate(rec.reviews)]
    return task


def labelstudio_tasks_json(records: Iterable[PairRecord], image_url: Callable[[PairImage], str],
                           model_version: str) -> Iterator[str]:
    """A Label Studio tasks file (a json list, one task per pair), as text chunks."""
    return _chunks(_json_array(labelstudio_task(r, image_url, model_version) for r in records))


# -- COCO (FiftyOne, pycocotools) ------------------------------------------------------------------
COCO_CATEGORIES = [{"id": 1, "name": ROI_LABEL, "supercategory": "object"}]


def coco_annotation_ids(pair_id: int) -> tuple[int, int]:
    """(query box, neighbour box) annotation ids of a pair: 2 id and 2 id + 1, unique and stable across exports."""
    return 2 * pair_id, 2 * pair_id + 1


def coco_image(img: PairImage) -> dict[str, Any]:
    return {"id": img.image_id, "file_name": img.file, "width": img.width, "height": img.height}


def coco_annotations(rec: PairRecord) -> list[dict[str, Any]]:
    """The pair's two boxes as COCO annotations; the extra keys become attributes of FiftyOne's
    detections (``score`` its confidence)."""
    counts = rec.review_counts
    common = {"category_id": COCO_CATEGORIES[0]["id"], "iscrowd": 0, "score": rec.score, "pair_id": rec.pair_id,
              "pair_rank": rec.rank, "neighbor_rank": rec.neighbor_rank, "verdict": rec.verdict or UNREVIEWED,
              "reviews_correct": counts["correct"], "reviews_wrong": counts["wrong"]}
    q_ann, n_ann = coco_annotation_ids(rec.pair_id)
    out = []
    for ann_id, role, img, box, other_ann, other_img in (
            (q_ann, "query", rec.query, rec.query_box, n_ann, rec.neighbor),
            (n_ann, "neighbor", rec.neighbor, rec.neighbor_box, q_ann, rec.query)):
        x1, y1, x2, y2 = box
        out.append({"id": ann_id, "image_id": img.image_id, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1), **common, "role": role,
                    "partner_annotation_id": other_ann, "partner_image_id": other_img.image_id})
    return out


def coco_pair(rec: PairRecord) -> dict[str, Any]:
    q_ann, n_ann = coco_annotation_ids(rec.pair_id)
    return {"id": rec.pair_id, "query_annotation_id": q_ann, "neighbor_annotation_id": n_ann,
            "query_image_id": rec.query.image_id, "neighbor_image_id": rec.neighbor.image_id, "score": rec.score,
            "neighbor_rank": rec.neighbor_rank, "rank": rec.rank, "verdict": rec.verdict or UNREVIEWED,
            "reviews": rec.reviews_json()}


@dataclass
class CocoSource:
    """What :func:`coco_json` reads: ``images`` (every image of the pairs, once) and ``records``,
    a function that iterates the pairs afresh (it is called twice: annotations, then pairs)."""

    images: Callable[[], Iterable[PairImage]]
    records: Callable[[], Iterable[PairRecord]]
    info: dict[str, Any] = field(default_factory=dict)


def coco_json(src: CocoSource) -> Iterator[str]:
    """A COCO detection file with a ``pairs`` list, as text chunks."""

    def parts() -> Iterator[str]:
        yield '{"info": ' + json.dumps(src.info) + ', "licenses": [], "categories": ' + json.dumps(COCO_CATEGORIES)
        yield ',\n"images": '
        yield from _json_array(coco_image(i) for i in src.images())
        yield ',\n"annotations": '
        yield from _json_array(a for r in src.records() for a in coco_annotations(r))
        yield ',\n"pairs": '
        yield from _json_array(coco_pair(r) for r in src.records())
        yield "}\n"

    return _chunks(parts())


# -- from a correspondence.json (the CLI; no reviews there) -----------------------------------------
def correspondence_images(corr: Correspondence) -> list[PairImage]:
    """Every image of ``corr``; its id is its position + 1 (COCO ids start at 1 by custom)."""
    return [PairImage(i + 1, f, int(w), int(h)) for i, (f, (w, h)) in enumerate(zip(corr.files, corr.sizes,
                                                                                    strict=True))]


def correspondence_records(corr: Correspondence) -> Iterator[PairRecord]:
    """The pairs of ``corr`` in file order (image, neighbour rank, rank); pair ids count from 1 in that order."""
    images = correspondence_images(corr)
    n = 0
    for i, row in enumerate(corr.pairs):
        for k, arr in enumerate(row):
            for rank, (p, score) in enumerate(zip(arr, corr.pair_scores[i][k], strict=False)):
                n += 1
                yield PairRecord(pair_id=n, query=images[i], neighbor=images[int(corr.knn[i, k])],
                                 query_box=_box(p[:4]), neighbor_box=_box(p[4:]), score=float(score),
                                 neighbor_rank=k, rank=rank)


def _box(b: Any) -> Box:
    x1, y1, x2, y2 = (float(v) for v in b)
    return x1, y1, x2, y2
