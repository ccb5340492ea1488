"""The positive control: a supervised backbone trained on ground-truth crops.

Every metric of the study is only worth something if it can rise above chance when the
features are known to be good. This trains the study's backbone (same architecture, same
resolution) as a classifier on the ground-truth object crops of the train2017 splits
(val2017 labels are never seen), with augmentation, and saves it as an ordinary ORL
checkpoint, so that it is mined with the same ``orl.mining.mine`` and scored with the
same metrics as the self-supervised checkpoints. Its pair AUC is the ceiling they are
measured against; if it were not clearly above the random-init network's, the metrics or
the mining would be suspect, not the self-supervised method.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# A crop is cut with some context around its box, as a detector's RoI sees it: side x U(1.0,
# 1.3), centre shifted by U(-0.1, 0.1) of the side, then warped to the training size.
CONTEXT = (1.0, 1.3)
SHIFT = 0.1
MIN_TRAIN_SIDE_PX = 16.0  # train on small objects too; the probe scores boxes >= 32 px


class _Crops(torch.utils.data.Dataset):
    def __init__(self, images: list, items: list[tuple[int, np.ndarray, int]], size: int, train: bool):
        from torchvision import transforms as T

        from orl.augment import IMAGENET_MEAN, IMAGENET_STD

        self.images, self.items, self.size, self.train = images, items, size, train
        aug = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
               T.RandomGrayscale(p=0.2)] if train else []
        self.tf = T.Compose(aug + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from orl.augment import crop_patch

        k, box, cls = self.items[i]
        image = self.images[k]
        if self.train:
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            s = float(torch.empty(()).uniform_(*CONTEXT))
            cx = (x1 + x2) / 2 + float(torch.empty(()).uniform_(-SHIFT, SHIFT)) * w
            cy = (y1 + y2) / 2 + float(torch.empty(()).uniform_(-SHIFT, SHIFT)) * h
            box = np.array([cx - s * w / 2, cy - s * h / 2, cx + s * w / 2, cy + s * h / 2])
        return self.tf(crop_patch(image, box, self.size)), cls


def _crops(gts: dict, split: str, min_side: float) -> tuple[list, list[tuple[int, np.ndarray, int]]]:
    """Decode each labelled image of ``split`` once; (images, [(image index, xyxy box, class)])."""
    from orl.images import ImageError, load_rgb

    images, items = [], []
    for gt in gts.values():
        for rel in gt.images(split):
            obj = gt[rel]
            wh = obj.boxes[:, 2:] - obj.boxes[:, :2]
            ok = (wh >= min_side).all(axis=1)
            if not ok.any():
                continue
            try:
                images.append(load_rgb(Path(gt.images_root) / rel))
            except ImageError:
                continue
            items += [(len(images) - 1, b, int(c)) for b, c in zip(obj.boxes[ok], obj.class_ids[ok], strict=True)]
    return images, items


def train_control(cfg, gts: dict, out: Path, epochs: int, seed: int, device, batch_size: int = 64,
                  lr: float = 0.1, num_workers: int = 2) -> dict[str, Any]:
    """Train ``cfg.model.backbone`` + a linear classifier on train2017 GT crops; save the
    backbone inside an ORL checkpoint at ``out`` (stage "byol", untrained heads, so mine
    with ``mine.knn_features="backbone"``). Returns the training record (per-epoch loss,
    classifier accuracy on the val2017 crops of at least 32 px, for reference)."""
    from orl.checkpoint import save_checkpoint
    from orl.models import build_model

    torch.manual_seed(seed)
    size = cfg.augment.image_size
    images, items = _crops(gts, "train", MIN_TRAIN_SIDE_PX)
    val_images, val_items = _crops(gts, "val", 32.0)
    n_classes = max(len(g.classes) for g in gts.values())
    model = build_model(cfg.model, "byol")
    backbone = model.backbone
    head = nn.Linear(backbone.out_channels, n_classes)
    net = nn.Sequential(backbone, head).to(device)
    loader = torch.utils.data.DataLoader(_Crops(images, items, size, True), batch_size=batch_size, shuffle=True,
                                         num_workers=num_workers, drop_last=True, persistent_workers=num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    losses, t0 = [], time.perf_counter()
    for _ in range(epochs):
        net.train()
        run = []
        for x, y in loader:
            loss = F.cross_entropy(net(x.to(device)), y.to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run.append(loss.item())
        losses.append(float(np.mean(run)))
    train_s = time.perf_counter() - t0
    acc, bal = _classifier_accuracy(net, val_images, val_items, size, device)
    save_checkpoint({"stage": "byol", "config": cfg.to_dict(), "model": model.state_dict(),
                     "position": {"epoch": epochs, "step_in_epoch": 0, "global_step": steps,
                                  "total_steps": steps, "finished": True},
                     "metrics": {"supervised_control": True}, "images": len(images)}, out)
    train_classes = {c for _, _, c in items}
    return {"epochs": epochs, "steps": steps, "train_crops": len(items), "train_images": len(images),
            "train_classes": len(train_classes), "val_crops": len(val_items), "loss": losses,
            "train_seconds": train_s, "classifier_val_acc": acc, "classifier_val_balanced_acc": bal,
            "val_majority_acc": _majority(items, val_items)}


@torch.no_grad()
def _classifier_accuracy(net, images, items, size, device) -> tuple[float | None, float | None]:
    """Top-1 and balanced (mean per-class) accuracy of the classifier on val crops."""
    if not items:
        return None, None
    net.eval()
    loader = torch.utils.data.DataLoader(_Crops(images, items, size, False), batch_size=128)
    pred = torch.cat([net(x.to(device)).argmax(1).cpu() for x, _ in loader]).numpy()
    y = np.array([c for _, _, c in items])
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return float((pred == y).mean()), float(np.mean(recalls))


def _majority(train_items, val_items) -> float | None:
    if not train_items or not val_items:
        return None
    top = np.bincount([c for _, _, c in train_items]).argmax()
    return float(np.mean([c == top for _, _, c in val_items]))
