"""The study's photos and labels: one symlink folder over both datasets, their ground truths.

Data: ../shared/data/coco128 (YOLO labels) and ../shared/data/coco-mini (COCO json). All
photos are pre-trained on together through a folder of symlinks; labels are read only to
score. Each dataset is evaluated with its own labels (fit on train2017, score on val2017);
pair metrics use the union of both label sets, because the image KNN links photos across them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# images root and labels path of each labelled source, relative to the data folder. The
# symlink folder holds each under its name: "coco128/train2017/x.jpg" is the image
# "train2017/x.jpg" of the coco128 root.
DATASETS = {
    "coco128": ("coco128/images", "coco128/labels"),
    "coco-mini": ("coco-mini", "coco-mini/annotations"),
}


def build_image_folder(data_root: Path, dest: Path, per_folder: int | None) -> list[str]:
    """Symlink every photo (or ``per_folder`` evenly spaced ones per source folder) into
    ``dest/<dataset>/<split>/`` and return the relative paths. Idempotent."""
    from orl.images import list_images

    files = []
    for name, (img_rel, _) in DATASETS.items():
        src_root = data_root / img_rel
        by_folder: dict[str, list[str]] = {}
        for rel in list_images(src_root):
            by_folder.setdefault(str(Path(rel).parent), []).append(rel)
        for _, rels in sorted(by_folder.items()):
            if per_folder is not None and len(rels) > per_folder:
                step = len(rels) / per_folder
                rels = [rels[int(i * step)] for i in range(per_folder)]
            for rel in rels:
                link = dest / name / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to((src_root / rel).resolve())
                files.append(f"{name}/{rel}")
    return sorted(files)


def load_ground_truths(data_root: Path, files: list[str]):
    """({dataset: GroundTruth restricted to ``files``}, union GroundTruth keyed by the
    symlink-folder paths, for pair precision)."""
    from orl.labels import GroundTruth, load_labels

    keep = set(files)
    per, classes = {}, None
    objects, splits = {}, {}
    for name, (img_rel, lab_rel) in DATASETS.items():
        gt = load_labels(data_root / img_rel, data_root / lab_rel)
        if classes is None:
            classes = gt.classes
        elif gt.classes != classes:
            raise ValueError(f"{name} has other class names than {next(iter(DATASETS))}; cannot pool labels")
        sub_obj = {k: v for k, v in gt.objects.items() if f"{name}/{k}" in keep}
        sub_split = {k: v for k, v in gt.splits.items() if f"{name}/{k}" in keep}
        per[name] = GroundTruth(gt.classes, sub_obj, sub_split, gt.format, gt.images_root, gt.labels_path)
        objects.update({f"{name}/{k}": v for k, v in sub_obj.items()})
        splits.update({f"{name}/{k}": v for k, v in sub_split.items()})
    union = GroundTruth(classes, objects, splits, "union", "", "+".join(DATASETS))
    return per, union


def class_sharing_pairs(files: list[str], gt, k: int = 10, seed: int = 0) -> np.ndarray:
    """(N, k) positional partners for ``files``: for each labelled image, up to k other
    labelled images that share a ground-truth class with it (-1 pads; unlabelled rows are all
    -1). Drawn with a fixed seed from the file names alone, so every checkpoint's RoI features
    are ranked on the same image pairs: the pair AUC on these isolates RoI features from the
    image KNN (which differs between checkpoints)."""
    keys = [f if f in gt.objects else None for f in files]
    classes = [set(gt.image_classes(kk)) if kk else set() for kk in keys]
    rng = np.random.default_rng(seed)
    out = np.full((len(files), k), -1, dtype=np.int64)
    order = np.argsort(files)  # independent of the order the files come in
    for i in order:
        if not classes[i]:
            continue
        cands = np.array([j for j in order if j != i and classes[i] & classes[j]], dtype=np.int64)
        if len(cands):
            pick = rng.choice(cands, size=min(k, len(cands)), replace=False)
            out[i, : len(pick)] = pick
    return out
