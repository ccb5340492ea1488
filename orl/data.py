"""Training datasets for stage 1 (two global views) and stage 3 (global + intra + inter).

A file that fails to decode mid-run is not fatal: the sample is replaced by the next
readable one, and the file is recorded with its reason in the run's skip log
(``RUN_DIR/skipped_images.csv``, see :class:`SkipLog`) and the logger. Pre-run scans already
drop files whose header is refused. In stage 3 an image whose size is no longer the size it
was mined at (replaced since) is skipped too: its boxes would not fit it.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orl.augment import byol_pipeline, crop_patch
from orl.boxes import jitter_box
from orl.config import AugmentConfig, TrainConfig
from orl.correspondence import Correspondence
from orl.images import ImageError, load_rgb

log = logging.getLogger(__name__)

# One sample, or one batch: per branch ("global", "intra", "inter") a pair of views, or None
# where the branch has nothing (no box, no mined pair; in a batch: fewer than 2 samples).
Views = dict[str, tuple[torch.Tensor, torch.Tensor] | None]


class SkipLog:
    """Append-only CSV (file, reason) of images skipped while training; any process may append.

    Data-loader workers are separate processes with their own copy of the dataset, so each
    appends what it finds (one short line per write, with O_APPEND: lines do not interleave)
    and readers de-duplicate. It survives a killed run, and a resumed run appends to it.
    """

    HEADER = "file,reason\n"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def create(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(self.HEADER)

    def add(self, file: str, reason: str) -> None:
        import io

        buf = io.StringIO()
        csv.writer(buf).writerow([file, reason])
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, buf.getvalue().encode())
        finally:
            os.close(fd)

    def read(self) -> dict[str, str]:
        """{file: first reason recorded}, in the order first seen."""
        if not self.path.exists():
            return {}
        out: dict[str, str] = {}
        with self.path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("file") and row["file"] not in out:
                    out[row["file"]] = row.get("reason") or ""
        return out


class _Robust(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], files: list[str] | None = None):
        self.paths = paths
        self.files = files if files is not None else paths  # names in the skip log
        self.bad: set[int] = set()
        self.skip_log: SkipLog | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> Views:
        """Sample ``key``: an index, whose draws come from torch's RNG as it stands, or
        (index, seed) from :class:`SeededKeys`, whose draws come from that seed alone."""
        if isinstance(key, tuple):
            i, seed = key
            # Forked so that, in the main process (num_workers=0), the run's own RNG stream is
            # left as it was: the checkpointed RNG state then does not depend on the worker count.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._first_readable(i)
        return self._first_readable(key)

    def _first_readable(self, i: int) -> Views:
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            if j in self.bad:
                continue
            try:
                return self.sample(j)
            except ImageError as exc:
                self.bad.add(j)
                log.warning("skipping unreadable image %s: %s", self.paths[j], exc)
                if self.skip_log is not None:
                    self.skip_log.add(self.files[j], str(exc))
        raise RuntimeError("no readable image left in the dataset")

    def sample(self, i: int) -> Views:
        raise NotImplementedError


class BYOLDataset(_Robust):
    """Two augmented global views of each image: {"global": (v1, v2)}."""

    def __init__(self, paths: list[str], aug: AugmentConfig, files: list[str] | None = None):
        super().__init__(paths, files)
        self.t1 = byol_pipeline(1, aug.image_size, aug.min_scale)
        self.t2 = byol_pipeline(2, aug.image_size, aug.min_scale)

    def sample(self, i: int) -> Views:
        img = load_rgb(self.paths[i])
        return {"global": (self.t1(img), self.t2(img))}


class ORLDataset(_Robust):
    """Stage-3 samples, as the authors build them.

    For image x: two global views; an intra-RoI pair (one random filtered box of x and a
    jittered copy); an inter-RoI pair (one random mined pair between x and one random
    neighbour that has pairs). Patches are cut from the original images and warped to
    patch_size, then augmented with the BYOL pipelines minus the random crop. An image
    without boxes yields no intra pair; one without mined pairs yields no inter pair: it
    still trains through the other branches.
    """

    def __init__(self, root: str | Path, corr: Correspondence, aug: AugmentConfig, train: TrainConfig):
        super().__init__([str(Path(root) / f) for f in corr.files], list(corr.files))
        self.corr = corr
        self.aug = aug
        self.train_cfg = train
        self.t1 = byol_pipeline(1, aug.image_size, aug.min_scale)
        self.t2 = byol_pipeline(2, aug.image_size, aug.min_scale)
        self.p1 = byol_pipeline(1, aug.patch_size, random_crop=False)
        self.p2 = byol_pipeline(2, aug.patch_size, random_crop=False)

    def sample(self, i: int) -> Views:
        # One numpy Generator per sample, drawn from torch's RNG (seeded per sample in training,
        # see SeededKeys), so the box choice and jitter are reproducible for a given run seed.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        img = load_rgb(self.paths[i])
        self._check_size(i, img)
        out: Views = {"global": (self.t1(img), self.t2(img)), "intra": None, "inter": None}
        boxes = self.corr.boxes[i]
        if len(boxes):
            b = boxes[rng.integers(len(boxes))]
            jb = jitter_box(b, img.size, rng, self.train_cfg.jitter_tries, self.train_cfg.jitter_min_iou)
            s = self.aug.patch_size
            out["intra"] = (self.p1(crop_patch(img, b, s)), self.p2(crop_patch(img, jb, s)))
        with_pairs = [k for k, p in enumerate(self.corr.pairs[i]) if len(p)]
        if with_pairs:
            k = with_pairs[rng.integers(len(with_pairs))]
            pair = self.corr.pairs[i][k][rng.integers(len(self.corr.pairs[i][k]))]
            j = int(self.corr.knn[i, k])
            try:
                other = load_rgb(self.paths[j])
                self._check_size(j, other)
                s = self.aug.patch_size
                out["inter"] = (self.p1(crop_patch(img, pair[:4], s)), self.p2(crop_patch(other, pair[4:], s)))
            except ImageError as exc:  # a bad neighbour costs only this inter pair
                log.warning("neighbour %s unreadable: %s", self.paths[j], exc)
        return out


    def _check_size(self, i: int, img: Image.Image) -> None:
        """Refuse an image whose size differs from the mined one (sizes of 0: not recorded)."""
        w, h = (int(v) for v in self.corr.sizes[i]) if i < len(self.corr.sizes) else (0, 0)
        if w > 0 and h > 0 and img.size != (w, h):
            raise ImageError(f"image is {img.width} x {img.height} px now but was {w} x {h} when mined: the file "
                             "changed since, so its boxes do not fit; mine the folder again")


def collate_views(batch: list[Views]) -> Views:
    """Stack each branch's pairs; a branch with fewer than 2 samples is None (BN needs 2)."""
    out: Views = {}
    for key in batch[0]:
        items = [v for v in (b[key] for b in batch) if v is not None]
        out[key] = (torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])) if len(items) >= 2 else None
    return out


def sample_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """The seed of one training sample's draws: a function of its place in the run only (the
    ``position``-th sample of rank ``rank`` in epoch ``epoch``), never of the worker that makes it."""
    return int(np.random.SeedSequence([seed, rank, epoch, position, 1]).generate_state(1, np.uint64)[0] >> 1)


class SeededKeys(torch.utils.data.Sampler[tuple[int, int]]):
    """A :class:`ResumableSampler`'s indices, each with the seed of its sample: (index, seed).

    Why: with DataLoader workers, torch seeds each worker once per loader and the worker's
    random stream then runs on through the samples it is given, so a sample's augmentations
    depended on the worker count and, after a mid-epoch resume (workers started afresh at the
    resume point), differed from an uninterrupted run's. Seeded by its position, a sample is
    the same whichever process makes it and whenever the run was resumed. The position and
    the epoch are read from ``sampler`` at each iteration, so one DataLoader kept across epochs
    (persistent workers) follows :meth:`ResumableSampler.set_position` too.
    """

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sampler
        first = s.start_step * s.batch_size
        for k, i in enumerate(s):
            yield i, sample_seed(s.seed, s.rank, s.epoch, first + k)

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A per-epoch seeded permutation that can start mid-epoch, sharded over ranks.

    The permutation depends only on (seed, epoch), so a resumed run sees exactly the
    remaining indices of the interrupted epoch: no sample lost or repeated.

    Sharding: each rank gets ceil(n / world) indices. The permutation is padded to a multiple
    of ``world`` by repeating its first indices (as torch's DistributedSampler and the authors'
    sampler do), and rank r takes every world-th index from r. Every rank therefore runs the
    same number of steps with the same batch sizes, which DDP and SyncBN need.

    Batches: full batches, then the partial last batch, which the authors keep, so
    steps_per_epoch = ceil(n_per_rank / batch). A last batch of a single sample is dropped
    (that sample is skipped this epoch) because BatchNorm in train mode needs at least 2
    samples. ``drop_last=True`` drops any partial last batch instead (the old behaviour).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0

    def per_rank(self) -> int:
        """Indices each rank is given per epoch (padded): ceil(n / world)."""
        return -(-self.n // self.world)

    def _usable(self) -> int:
        m, b = self.per_rank(), self.batch_size
        if self.drop_last:
            return m // b * b
        return m - 1 if m % b == 1 and b > 1 else m

    def steps_per_epoch(self) -> int:
        return -(-self._usable() // self.batch_size)

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank() * self.world
        perm = (perm * -(-total // max(1, self.n)))[:total]  # pad by wrapping around
        mine = perm[self.rank :: self.world]
        return iter(mine[self.start_step * self.batch_size : self._usable()])

    def __len__(self) -> int:
        return max(0, self._usable() - self.start_step * self.batch_size)
