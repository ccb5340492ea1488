"""Ground-truth boxes for an images folder, used only to *evaluate* what was learned.

The pipeline itself is self-supervised and never reads labels. This module turns one of
two common layouts into a single in-memory form, :class:`GroundTruth`:

* a **YOLO label folder** (``class cx cy w h`` per line, normalised to [0, 1]); image
  ``<images_root>/<sub>/<stem>.jpg`` pairs with ``<labels_root>/<sub>/<stem>.txt``;
* a **COCO instances json** file (``bbox`` as [x, y, w, h] pixels), or a folder holding
  ``instances_*.json`` files; images are matched by the basename of ``file_name``.

Boxes come out as float xyxy in original pixels, the library's one box convention.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

from orl.boxes import clip_boxes, xywh_to_xyxy
from orl.images import ImageError, image_size, list_images

ACCEPTED_FORMATS = (
    "a YOLO label folder of <stem>.txt files ('class cx cy w h' normalised, mirroring the "
    "image sub-folders), a COCO instances .json file, or a folder holding instances_*.json files"
)
CLASS_FILES = ("classes.yaml", "data.yaml", "classes.yml", "data.yml")


@dataclass(frozen=True)
class ImageObjects:
    """The objects of one labelled image.

    boxes:     (N, 4) float64 xyxy in original pixels, clipped to the image
    class_ids: (N,) int64 indices into ``GroundTruth.classes``
    names:     N class names, ``names[i] == classes[class_ids[i]]``
    size:      (width, height) of the image the boxes refer to
    """

    boxes: np.ndarray
    class_ids: np.ndarray
    names: tuple[str, ...]
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.class_ids)

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (class name, (4,) xyxy box) per object."""
        return iter(zip(self.names, self.boxes, strict=True))


class GroundTruth(Mapping):
    """Image relative path -> :class:`ImageObjects`, for the labelled images only.

    An image is *labelled* when the label source covers it, even with zero objects (an
    empty or missing YOLO txt in a label folder that exists; a COCO ``images`` entry with
    no annotation). Images the source does not cover are *unlabeled*: they keep a split
    but are left out of every label metric. ``splits`` covers every image under the root.
    """

    def __init__(self, classes: Iterable[str], objects: Mapping[str, ImageObjects], splits: Mapping[str, str],
                 fmt: str, images_root: str | os.PathLike, labels_path: str | os.PathLike) -> None:
        self.classes: list[str] = list(classes)
        self.objects: dict[str, ImageObjects] = dict(objects)
        self.splits: dict[str, str] = dict(splits)
        self.format: str = fmt  # "yolo" | "coco"
        self.images_root = str(images_root)
        self.labels_path = str(labels_path)

    def __getitem__(self, path: str) -> ImageObjects:
        return self.objects[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.objects)

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def unlabeled(self) -> list[str]:
        return sorted(p for p in self.splits if p not in self.objects)

    def images(self, split: str | None = None) -> list[str]:
        """Sorted labelled image paths, optionally of one split ("train" | "val")."""
        return sorted(p for p in self.objects if split is None or self.splits[p] == split)

    def image_classes(self, path: str) -> set[int]:
        """The set of class ids present in one labelled image (its multi-label target)."""
        return set(int(c) for c in self.objects[path].class_ids)

    def summary(self) -> dict:
        n_obj = sum(len(o) for o in self.objects.values())
        return {
            "format": self.format,
            "images": len(self.splits),
            "labelled": len(self.objects),
            "unlabeled": len(self.splits) - len(self.objects),
            "train": len(self.images("train")),
            "val": len(self.images("val")),
            "objects": n_obj,
            "classes": len(self.classes),
        }


# -- splits ---------------------------------------------------------------------------------
def split_of_path(rel_path: str) -> str:
    """"train" | "val" for one image relative path.

    The first *folder* component (top-down) starting with "train" gives "train"; one starting
    with "val" or "test" gives "val" (case-insensitive; the file name itself is not looked
    at). With neither, a stable 50/50 split from the SHA-1 of the posix path, so the same
    image lands in the same split on every machine and run (Python's ``hash`` is salted).
    """
    for part in PurePosixPath(rel_path).parts[:-1]:
        low = part.lower()
        if low.startswith("train"):
            return "train"
        if low.startswith(("val", "test")):
            return "val"
    digest = hashlib.sha1(PurePosixPath(rel_path).as_posix().encode("utf-8")).digest()
    return "train" if digest[0] % 2 == 0 else "val"


# -- entry point ----------------------------------------------------------------------------
def load_labels(images_root: str | os.PathLike, labels_path: str | os.PathLike) -> GroundTruth:
    """Load the ground truth for every image under ``images_root``.

    ``labels_path`` is a YOLO label folder, a COCO instances json, or a folder of
    ``instances_*.json``; the kind is detected (a folder with top-level instances_*.json is
    COCO, a folder with any .txt below it is YOLO). Raises FileNotFoundError for a missing
    path and ValueError for a layout it cannot read or when no image gets a label (usually
    an images/labels pairing mistake); both messages name the path and the accepted formats.
    """
    images_root, labels_path = Path(images_root), Path(labels_path)
    if not labels_path.exists():
        raise FileNotFoundError(f"labels not found: {labels_path}; expected {ACCEPTED_FORMATS}")
    images = list_images(images_root)
    if not images:
        raise ValueError(f"no images under {images_root}")
    fmt, sources = _detect_format(labels_path)
    if fmt == "coco":
        classes, objects = _load_coco(images_root, images, sources)
    else:
        classes, objects = _load_yolo(images_root, images, labels_path)
    if not objects:
        raise ValueError(
            f"no image under {images_root} has a label in {labels_path} ({fmt} format); check "
            f"that the two paths belong together. Accepted label formats: {ACCEPTED_FORMATS}"
        )
    splits = {p: split_of_path(p) for p in images}
    return GroundTruth(classes, objects, splits, fmt, images_root, labels_path)


def _detect_format(labels_path: Path) -> tuple[str, list[Path]]:
    if labels_path.is_file():
        if labels_path.suffix.lower() == ".json":
            return "coco", [labels_path]
        raise ValueError(f"cannot read labels from {labels_path}: expected {ACCEPTED_FORMATS}")
    jsons = sorted(labels_path.glob("instances_*.json"))
    if jsons:
        return "coco", jsons
    if any(f.endswith(".txt") for _, _, files in os.walk(labels_path) for f in files):
        return "yolo", []
    raise ValueError(f"no label files found in {labels_path}: expected {ACCEPTED_FORMATS}")


def _objects(boxes: npt.ArrayLike, class_ids: npt.ArrayLike, classes: list[str], size: tuple[int, int]) -> ImageObjects:
    """Clip to the image and drop boxes left with no area."""
    boxes = clip_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), size)
    class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, class_ids = boxes[keep], class_ids[keep]
    names = tuple(classes[c] for c in class_ids)
    return ImageObjects(boxes, class_ids, names, (int(size[0]), int(size[1])))


# -- YOLO -----------------------------------------------------------------------------------
def _load_yolo(images_root: Path, images: list[str], labels_root: Path) -> tuple[list[str], dict[str, ImageObjects]]:
    """Pair each image with its txt; returns (classes, {path: ImageObjects})."""
    names = _yolo_class_names(labels_root)
    txt_dirs: dict[Path, bool] = {}
    raw: dict[str, list[tuple[int, np.ndarray]]] = {}
    for rel in images:
        txt = _yolo_txt_for(rel, labels_root, txt_dirs, images_root.resolve().name)
        if txt is None:
            continue
        raw[rel] = _parse_yolo_txt(txt) if txt.is_file() else []
    if not any(rows or _has_file(rel, labels_root, txt_dirs, images_root) for rel, rows in raw.items()):
        return [], {}  # not one image has its own txt: these labels are for other images
    classes, index = _yolo_classes(names, raw)
    objects: dict[str, ImageObjects] = {}
    for rel, rows in raw.items():
        try:
            size = image_size(images_root / rel)
        except ImageError:
            continue  # an unreadable image cannot be evaluated; treat it as unlabeled
        w, h = size
        boxes = [_yolo_to_xyxy(r, w, h) for _, r in rows]
        objects[rel] = _objects(boxes, [index[c] for c, _ in rows], classes, size)
    return classes, objects


def _has_file(rel: str, labels_root: Path, txt_dirs: dict[Path, bool], images_root: Path) -> bool:
    txt = _yolo_txt_for(rel, labels_root, txt_dirs, images_root.resolve().name)
    return txt is not None and txt.is_file()


def _yolo_txt_for(rel: str, labels_root: Path, txt_dirs: dict[Path, bool], root_name: str) -> Path | None:
    """The label file path of one image, or None when no label folder covers it.

    Candidates mirror the image's folders under ``labels_root`` and then drop leading
    folders one at a time (so images_root=coco128 with labels_root=coco128/labels maps
    ``images/train2017/x.jpg`` to ``labels/train2017/x.txt``); the bare ``labels_root`` is a
    candidate only for images directly under ``images_root``. Last, the images folder's own
    name is prefixed (images_root=images/train2017 with labels_root=labels). A candidate
    folder counts when it holds at least one .txt; the file itself may be missing (= no
    objects).
    """
    p = PurePosixPath(rel)
    dirs = p.parts[:-1]
    subs: list[tuple[str, ...]] = [dirs[k:] for k in range(len(dirs))] if dirs else [()]
    subs.append((root_name, *dirs))
    for sub in subs:
        d = labels_root.joinpath(*sub)
        if d not in txt_dirs:
            txt_dirs[d] = d.is_dir() and any(f.suffix == ".txt" for f in d.iterdir())
        if txt_dirs[d]:
            return d / (p.stem + ".txt")
    return None


def _parse_yolo_txt(path: Path) -> list[tuple[int, np.ndarray]]:
    """Rows of (class id, values): 4 values for a box, or 2K >= 6 for a YOLO polygon."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls = int(float(parts[0]))
            vals = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a YOLO label line: {line!r}") from None
        if len(vals) != 4 and (len(vals) < 6 or len(vals) % 2):
            raise ValueError(f"{path}:{n}: expected 'class cx cy w h' (or a polygon), got {line!r}")
        rows.append((cls, vals))
    return rows


def _yolo_to_xyxy(vals: np.ndarray, w: int, h: int) -> np.ndarray:
    if len(vals) == 4:
        cx, cy, bw, bh = vals
        box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
    else:  # polygon x1 y1 x2 y2 ...: its bounding box
        xs, ys = vals[0::2], vals[1::2]
        box = [xs.min(), ys.min(), xs.max(), ys.max()]
    return np.asarray(box) * np.array([w, h, w, h], dtype=np.float64)


def _yolo_class_names(labels_root: Path) -> dict[int, str] | None:
    """Names from classes.yaml / data.yaml in the label folder or up to 3 folders above."""
    for d in [labels_root, *list(labels_root.resolve().parents)[:3]]:
        for name in CLASS_FILES:
            f = d / name
            if f.is_file():
                return _read_names_yaml(f)
    return None


def _read_names_yaml(path: Path) -> dict[int, str]:
    import yaml  # pyyaml: only needed for YOLO class files

    try:
        data = yaml.safe_load(path.read_text())
        names = data["names"] if isinstance(data, dict) and "names" in data else data
        if isinstance(names, list):
            return {i: str(n) for i, n in enumerate(names)}
        return {int(k): str(v) for k, v in names.items()}
    except Exception as exc:
        raise ValueError(f"cannot read class names from {path} (expected 'names:' as a list "
                         f"or an id -> name mapping): {exc}") from exc


def _yolo_classes(names: dict[int, str] | None,
                  raw: dict[str, list[tuple[int, np.ndarray]]]) -> tuple[list[str], dict[int, int]]:
    """(class list, YOLO id -> index in that list).

    With a names file the list is its names in id order; without, the ids seen, sorted
    numerically, as strings. An id the names file lacks is an error: the file and the
    labels disagree, and silently naming it would corrupt the metrics.
    """
    seen = sorted({c for rows in raw.values() for c, _ in rows})
    if names is None:
        return [str(c) for c in seen], {c: i for i, c in enumerate(seen)}
    missing = [c for c in seen if c not in names]
    if missing:
        raise ValueError(f"label class ids {missing[:10]} are not in the class names file")
    ids = sorted(names)
    return [names[i] for i in ids], {c: k for k, c in enumerate(ids)}


# -- COCO -----------------------------------------------------------------------------------
def _read_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        _ = data["images"], data["annotations"]
        _ = [(c["id"], c["name"]) for c in data["categories"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a COCO instances json (needs 'images', 'annotations' "
                         f"and 'categories'); accepted formats: {ACCEPTED_FORMATS}") from exc
    return data


def _load_coco(images_root: Path, images: list[str], sources: list[Path]) -> tuple[list[str], dict[str, ImageObjects]]:
    """Match images by basename; returns (classes, {path: ImageObjects}).

    Several json files may share one category list (the usual train/val pair). The class
    list is every category, ordered by COCO id then name, merged by name across files.
    Crowd annotations (``iscrowd`` = 1) cover groups, not single objects, and are dropped.
    """
    datas = [_read_coco(p) for p in sources]
    cats = sorted({(c["id"], c["name"]) for d in datas for c in d["categories"]})
    classes = list(dict.fromkeys(name for _, name in cats))
    index = {name: i for i, name in enumerate(classes)}
    tags = [p.stem[len("instances_"):] if p.stem.startswith("instances_") else None for p in sources]
    entries = [_coco_entries(d, index, p) for d, p in zip(datas, sources, strict=True)]
    objects: dict[str, ImageObjects] = {}
    claimed: set[tuple[int, str]] = set()
    for rel in sorted(images, key=lambda r: _tag_of(r, tags) is None):
        src = _tag_of(rel, tags)
        base = PurePosixPath(rel).name
        order = [src] if src is not None else range(len(datas))
        for s in order:
            if base in entries[s] and (s, base) not in claimed:
                claimed.add((s, base))
                size, boxes, ids = entries[s][base]
                size = size or _size_or_none(images_root / rel)
                if size is not None:
                    objects[rel] = _objects(boxes, ids, classes, size)
                break
    return classes, objects


def _size_or_none(path: Path) -> tuple[int, int] | None:
    """Header size for a json entry without width/height; None (= unlabeled) if unreadable."""
    try:
        return image_size(path)
    except ImageError:
        return None


def _tag_of(rel: str, tags: list[str | None]) -> int | None:
    """Index of the json whose split tag (``instances_<tag>.json``) names a folder of ``rel``.

    An image in ``val2017/`` is looked up only in ``instances_val2017.json``, so files with
    the same name in two splits never borrow each other's boxes.
    """
    dirs = set(PurePosixPath(rel).parts[:-1])
    for i, t in enumerate(tags):
        if t and t in dirs:
            return i
    return None


def _coco_entries(data: dict, index: dict[str, int], path: Path) -> dict[str, tuple]:
    """basename -> ((w, h) or None, (N, 4) xyxy boxes, (N,) class indices) for one json."""
    try:
        cat_name = {c["id"]: c["name"] for c in data["categories"]}
        per_image: dict[int, list] = {im["id"]: [] for im in data["images"]}
        for a in data["annotations"]:
            if a.get("iscrowd", 0) or a["image_id"] not in per_image:
                continue
            per_image[a["image_id"]].append((a["bbox"], index[cat_name[a["category_id"]]]))
        out = {}
        for im in data["images"]:
            anns = per_image[im["id"]]
            boxes = xywh_to_xyxy(np.asarray([b for b, _ in anns], dtype=np.float64)) if anns else np.zeros((0, 4))
            size = (int(im["width"]), int(im["height"])) if "width" in im and "height" in im else None
            out[PurePosixPath(im["file_name"]).name] = (size, boxes, [c for _, c in anns])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: malformed COCO instances json ({type(exc).__name__}: {exc}); "
                         "each image needs id and file_name, each annotation image_id, bbox "
                         "[x, y, w, h] and a category_id listed in categories") from exc
    return out
