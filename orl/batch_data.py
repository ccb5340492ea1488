"""The "tensor" backend's data: photos from the image store, views made per batch on the device.

Stage 1 and stage 3 samples are the ones :class:`orl.data.BYOLDataset` and
:class:`orl.data.ORLDataset` make (two global views; an intra-RoI pair of a random box and its
jittered copy; an inter-RoI pair of a random mined pair with a random neighbour), with the same
random choices, but a batch at a time and without a DataLoader: the photos come decoded from
the :class:`orl.imagestore.ImageStore`, the crops of the whole batch are cut by one
``roi_align`` per output size, and the rest of the pipeline runs as batched tensor operations
(:mod:`orl.tensor_augment`) on the training device.

Boxes are drawn in original pixels (the random resized crop on the photo's original size,
jitter_box on it, the mined boxes as recorded) and scaled into the store's pixels only when
the crops are cut, so they follow the PIL pipeline's distributions whatever the working size.

Every random draw of a batch comes from one generator seeded by the batch's position in the
run (seed, rank, epoch, step), so a resumed run makes the same views as an uninterrupted one,
whatever the worker count.

A photo that cannot be decoded, or (stage 3) whose size is not the mined one, is found when the
store is filled, before the first step: it is recorded in the skip log and replaced by the next
readable photo, as the PIL datasets do when they meet it.

Where the pixels live: on a CUDA device, the whole store is copied to device memory when it
takes at most a quarter of the free memory (then a batch needs no host work but the
parameters); otherwise, and on the CPU, each batch is gathered from the memory-mapped entries.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orl.augment import clip_patch_box
from orl.boxes import jitter_box
from orl.config import AugmentConfig, TrainConfig
from orl.correspondence import Correspondence
from orl.data import SkipLog, Views
from orl.imagestore import ImageStore, StoredImage
from orl.tensor_augment import ViewParams, augment, cut, draw_crops, draw_view_params

log = logging.getLogger(__name__)

# The store goes to device memory when it takes at most this share of the free memory.
DEVICE_SHARE = 0.25


def batch_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """The seed of one batch's draws: a function of its position only."""
    return int(np.random.SeedSequence([seed, rank, epoch, step]).generate_state(1, np.uint64)[0] >> 1)


# A crop: (photo index, xyxy box in the photo's original pixels).
Crop = tuple[int, np.ndarray]


@dataclass(frozen=True)
class BatchPlan:
    """Every random choice of one batch, before any pixel is touched.

    ``images``: the photos of the samples (unusable ones already replaced); ``crops``: their
    view-1 and view-2 random resized crops, (B, 4) xyxy in original pixels; ``views``: the
    parameters of the two global view pipelines; ``pairs``: per branch, the (first, second)
    patch crops of the samples that have one (branches with fewer than 2 pairs are empty);
    ``patch_views``: the patch pipelines' parameters over the intra pairs, then the inter pairs.
    """

    images: list[int]
    crops: tuple[np.ndarray, np.ndarray]
    views: tuple[ViewParams, ViewParams]
    pairs: dict[str, list[tuple[Crop, Crop]]]
    patch_views: tuple[ViewParams, ViewParams]


class _HostPixels:
    """Batches gathered from the memory-mapped store entries (CPU, or CUDA when it does not fit)."""

    def __init__(self, store: ImageStore, entries: Sequence[StoredImage | None], device: torch.device):
        self.store, self.entries, self.device = store, entries, device
        self._cpu_buffer = torch.empty(0)

    def canvas(self, ids: list[int]) -> torch.Tensor:
        ents = [self.entries[i] for i in ids]
        hc = max(e.height for e in ents if e) + 1
        wc = max(e.width for e in ents if e) + 1
        cpu = self.device.type == "cpu"
        shape = (len(ids), 3, hc, wc)
        if cpu:
            # Straight into float (one pass over the pixels), in a buffer kept from batch to batch:
            # a fresh one of this size would cost its page faults every step. The canvas is used
            # only until render() returns, so the next batch may overwrite it.
            need = shape[0] * shape[1] * shape[2] * shape[3]
            if self._cpu_buffer.numel() < need:
                self._cpu_buffer = torch.empty(need, dtype=torch.float32)
            buf = self._cpu_buffer[:need].view(shape)
        else:
            # A pinned uint8 canvas (a quarter of the bytes of float to copy), made float on the
            # device. torch's caching host allocator reuses pinned blocks only once their copy is done.
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        arr = buf.numpy()
        for k, e in enumerate(ents):
            assert e is not None
            h, w = e.height, e.width
            slot = arr[k]
            slot[:, :h, :w] = self.store.array(e)
            slot[:, h, :w] = slot[:, h - 1, :w]
            slot[:, : h + 1, w] = slot[:, : h + 1, w - 1]
        return buf if cpu else buf.to(self.device, non_blocking=True).float()


class _DevicePixels:
    """The whole store in device memory, one flat uint8 tensor; batches gathered there."""

    def __init__(self, store: ImageStore, entries: Sequence[StoredImage | None], device: torch.device):
        self.entries, self.device = entries, device
        sizes = [e.nbytes if e else 0 for e in entries]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.flat = torch.empty(int(self.offsets[-1]), dtype=torch.uint8, device=device)
        for i, e in enumerate(entries):
            if e is not None:
                src = torch.from_numpy(np.array(store.array(e))).reshape(-1)  # a writable copy
                self.flat[int(self.offsets[i]) : int(self.offsets[i + 1])].copy_(src.pin_memory(), non_blocking=True)
        torch.cuda.synchronize(device)

    def canvas(self, ids: list[int]) -> torch.Tensor:
        ents = [self.entries[i] for i in ids]
        hc = max(e.height for e in ents if e) + 1
        wc = max(e.width for e in ents if e) + 1
        buf = torch.empty((len(ids), 3, hc, wc), dtype=torch.uint8, device=self.device)
        for k, (i, e) in enumerate(zip(ids, ents, strict=True)):
            assert e is not None
            img = self.flat[int(self.offsets[i]) : int(self.offsets[i + 1])].view(3, e.height, e.width)
            _place(buf[k], img, e)
        return buf.float()


def _place(slot: torch.Tensor, img: torch.Tensor, e: StoredImage) -> None:
    """Copy a (3, h, w) image into the top-left of its canvas slot, with one replicated row and
    column (as the host canvas does): roi_align's bilinear samples within half a pixel of the
    right or bottom edge read the next pixel, which must be the edge pixel, as PIL clamps at
    the edge. Nothing beyond is ever read: every box lies within its photo."""
    h, w = e.height, e.width
    slot[:, :h, :w] = img
    slot[:, h, :w] = slot[:, h - 1, :w]
    slot[:, : h + 1, w] = slot[:, : h + 1, w - 1]


class StoreData:
    """Stage ``byol`` (global views) or ``orl`` (global + intra + inter) samples, made a batch at a time.

    ``paths``: the photos (for ``orl``: ``root / f`` for the correspondence's files, in its
    order); ``files``: their names in the skip log. Call :meth:`prepare` once before
    :meth:`batch`.
    """

    def __init__(self, stage: str, paths: list[str], aug: AugmentConfig, train: TrainConfig, *,
                 files: list[str] | None = None, corr: Correspondence | None = None,
                 store_root: str | os.PathLike[str] | None = None):
        if stage not in ("byol", "orl"):
            raise ValueError(f"unknown stage {stage!r}; valid: byol, orl")
        if stage == "orl" and corr is None:
            raise ValueError("stage orl needs a correspondence")
        self.stage, self.paths, self.aug, self.train_cfg, self.corr = stage, paths, aug, train, corr
        self.files = files if files is not None else paths
        self.store = ImageStore(store_root, aug.working_size())
        self.entries: list[StoredImage | None] = []
        self.bad: set[int] = set()
        self.skip_log: SkipLog | None = None
        self.pixels: _HostPixels | _DevicePixels | None = None

    def __len__(self) -> int:
        return len(self.paths)

    # -- before the first step --------------------------------------------------------------
    def prepare(self, device: torch.device, workers: int = 0) -> None:
        """Fill the store (decoding new photos, ``workers`` processes), skip what cannot be
        used, and put the pixels where the batches are gathered."""
        self.entries, failed = self.store.ensure(self.paths, workers)
        for i, reason in failed.items():
            self._skip(i, reason)
        if self.corr is not None:
            for i, e in enumerate(self.entries):
                if e is not None and i < len(self.corr.sizes):
                    w, h = (int(v) for v in self.corr.sizes[i])
                    if w > 0 and h > 0 and (e.orig_w, e.orig_h) != (w, h):
                        self._skip(i, f"image is {e.orig_w} x {e.orig_h} px now but was {w} x {h} when mined: the "
                                      "file changed since, so its boxes do not fit; mine the folder again")
        if len(self.bad) == len(self.paths):
            raise RuntimeError("no readable image left in the dataset")
        self.pixels = self._pixels(device)

    def _pixels(self, device: torch.device) -> _HostPixels | _DevicePixels:
        if device.type == "cuda":
            need = sum(e.nbytes for i, e in enumerate(self.entries) if e is not None and i not in self.bad)
            free, _ = torch.cuda.mem_get_info(device)
            if need <= DEVICE_SHARE * free:
                log.info("image store on %s: %.1f MB of %.1f MB free", device, need / 1e6, free / 1e6)
                return _DevicePixels(self.store, self._good_entries(), device)
            log.info("image store %.1f MB > %.0f%% of free %s memory: batches from the memory map", need / 1e6,
                     100 * DEVICE_SHARE, device)
        return _HostPixels(self.store, self._good_entries(), device)

    def _good_entries(self) -> list[StoredImage | None]:
        return [None if i in self.bad else e for i, e in enumerate(self.entries)]

    def _skip(self, i: int, reason: str) -> None:
        if i in self.bad:
            return
        self.bad.add(i)
        log.warning("skipping unreadable image %s: %s", self.paths[i], reason)
        if self.skip_log is not None:
            self.skip_log.add(self.files[i], reason)

    def _usable(self, i: int) -> int:
        """``i``, or the next usable photo after it (wrapping), as the PIL datasets replace one."""
        n = len(self.paths)
        for k in range(n):
            j = (i + k) % n
            if j not in self.bad:
                return j
        raise RuntimeError("no readable image left in the dataset")

    # -- one batch --------------------------------------------------------------------------
    def plan(self, indices: Sequence[int], seed: int) -> BatchPlan:
        """Every random choice of the batch of samples ``indices``, drawn from ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        idx = [self._usable(int(i)) for i in indices]
        orig = np.array([[self._entry(i).orig_w, self._entry(i).orig_h] for i in idx], dtype=np.int64).reshape(-1, 2)
        crops = (draw_crops(orig, self.aug.min_scale, g), draw_crops(orig, self.aug.min_scale, g))
        views = (draw_view_params(len(idx), 1, g), draw_view_params(len(idx), 2, g))
        pairs: dict[str, list[tuple[Crop, Crop]]] = {"intra": [], "inter": []}
        if self.stage == "orl":
            # A branch with fewer than 2 pairs is left out (BatchNorm needs 2), as collate_views does.
            pairs = {b: p if len(p) >= 2 else [] for b, p in self._patch_boxes(idx, g).items()}
        n = len(pairs["intra"]) + len(pairs["inter"])
        patch_views = (draw_view_params(n, 1, g), draw_view_params(n, 2, g))
        return BatchPlan(idx, crops, views, pairs, patch_views)

    def render(self, plan: BatchPlan) -> Views:
        """The views of a plan, on the device: crops of each output size by one roi_align call,
        then the view pipelines over the batch."""
        if self.pixels is None:
            raise RuntimeError("call prepare() before making batches")
        pairs = [pr for b in ("intra", "inter") for pr in plan.pairs[b]]
        # The canvas holds each photo once: the batch's, then the neighbours of its inter pairs.
        images = list(dict.fromkeys(plan.images + [j for _, (j, _) in plan.pairs["inter"]]))
        slot = {img: k for k, img in enumerate(images)}
        canvas = self.pixels.canvas(images)
        b = len(plan.images)
        rois = [(i, c[k]) for c in plan.crops for k, i in enumerate(plan.images)]
        crops = cut(canvas, self._roi_tensor(rois, slot, canvas.device), self.aug.image_size).div_(255)
        out: Views = {"global": (augment(crops[:b], plan.views[0]), augment(crops[b:], plan.views[1]))}
        if self.stage != "orl":
            return out
        out["intra"] = out["inter"] = None
        if pairs:
            n = len(pairs)
            rois = [a for a, _ in pairs] + [s for _, s in pairs]
            patches = cut(canvas, self._roi_tensor(rois, slot, canvas.device), self.aug.patch_size).div_(255)
            v1, v2 = augment(patches[:n], plan.patch_views[0]), augment(patches[n:], plan.patch_views[1])
            ni = len(plan.pairs["intra"])
            if ni:
                out["intra"] = (v1[:ni], v2[:ni])
            if n > ni:
                out["inter"] = (v1[ni:], v2[ni:])
        return out

    def batch(self, indices: Sequence[int], seed: int) -> Views:
        """The views of the samples ``indices``, on the device, from the draws of ``seed``."""
        return self.render(self.plan(indices, seed))

    def _entry(self, i: int) -> StoredImage:
        e = self.entries[i]
        if e is None:
            raise RuntimeError("call prepare() before making batches")
        return e

    def _roi_tensor(self, rois: list[Crop], slot: dict[int, int], dev: torch.device) -> torch.Tensor:
        """(K, 5) roi_align rows: canvas slot, then the box scaled from original to store pixels."""
        rows = np.empty((len(rois), 5), dtype=np.float64)
        for k, (i, box) in enumerate(rois):
            sx, sy = self._entry(i).scale
            rows[k] = (slot[i], box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        return torch.from_numpy(rows).to(dev, dtype=torch.float32, non_blocking=True)

    def _patch_boxes(self, idx: list[int], g: torch.Generator) -> dict[str, list[tuple[Crop, Crop]]]:
        """Per sample, as ORLDataset draws them: an intra pair (a random box of the image, its
        jittered copy) where the image has boxes, an inter pair (a random mined pair with a
        random neighbour that has pairs) where it has pairs and the neighbour is usable. Boxes
        in original pixels, clipped as the PIL patch crop clips them."""
        corr = self.corr
        assert corr is not None
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=g).item()))
        tc = self.train_cfg
        intra: list[tuple[Crop, Crop]] = []
        inter: list[tuple[Crop, Crop]] = []
        for i in idx:
            e = self._entry(i)
            boxes = corr.boxes[i]
            if len(boxes):
                box = boxes[rng.integers(len(boxes))]
                jb = jitter_box(box, (e.orig_w, e.orig_h), rng, tc.jitter_tries, tc.jitter_min_iou)
                intra.append(((i, self._clipped(i, box)), (i, self._clipped(i, jb))))
            with_pairs = [k for k, p in enumerate(corr.pairs[i]) if len(p)]
            if with_pairs:
                k = with_pairs[rng.integers(len(with_pairs))]
                pair = corr.pairs[i][k][rng.integers(len(corr.pairs[i][k]))]
                j = int(corr.knn[i, k])
                if j not in self.bad:  # an unusable neighbour costs only this inter pair
                    inter.append(((i, self._clipped(i, pair[:4])), (j, self._clipped(j, pair[4:]))))
        return {"intra": intra, "inter": inter}

    def _clipped(self, i: int, box: np.ndarray) -> np.ndarray:
        e = self._entry(i)
        return np.asarray(clip_patch_box(box, e.orig_w, e.orig_h), dtype=np.float64)


def store_data(stage: str, images_root: str | Path, aug: AugmentConfig, train: TrainConfig, *,
               files: list[str] | None = None, corr: Correspondence | None = None,
               store_root: str | os.PathLike[str] | None = None) -> StoreData:
    """The StoreData of stage ``byol`` on ``files`` or ``orl`` on ``corr``, photos under ``images_root``."""
    root = Path(images_root)
    names = list(files) if stage == "byol" and files is not None else list(corr.files) if corr is not None else []
    return StoreData(stage, [str(root / f) for f in names], aug, train, files=names, corr=corr,
                     store_root=store_root)
