"""Selective-search region proposals: the only place that touches cv2.ximgproc.

Proposers (``mine.ss_mode``): OpenCV's selective search in its ``fast`` (the authors'),
``quality`` and ``single`` (one segmentation, one grouping strategy) settings, and
``felzenszwalb``: the bounding boxes of Felzenszwalb-Huttenlocher graph segments at a few
scales, without selective search's hierarchical grouping (several times faster, fewer large
boxes). None is assumed better: benchmarks/mining_benchmark.py reports each one's ground-truth
recall, time and pair quality.

OpenCV's selective search is fragile: it can assert on unusual aspect ratios and takes
minutes on very large images. So each image is proposed in a worker process with a time
limit; a timeout, an exception or a crash becomes a per-image failure record with its reason,
and the run goes on. Images are downscaled to ``max_side_px`` first (None keeps full
resolution, the authors' path) and boxes are mapped back to original pixels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import IO, Any

import numpy as np

from orl.boxes import filter_boxes
from orl.config import SS_MODES, MineConfig
from orl.device import single_thread_env

# Felzenszwalb segmentation scales (OpenCV's k: larger k, larger segments), coarse first, with
# sigma 0.8 as selective search uses; each segment smaller than k / 2 pixels is merged away.
FELZENSZWALB_K = (1000, 500, 200)
FELZENSZWALB_SIGMA = 0.8


@dataclass
class ProposalResult:
    """Outcome for one image. ``boxes``: (K, 4) float xyxy in original pixels, filtered."""

    path: str
    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0
    n_raw: int = 0
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    seconds: float = 0.0
    # The file itself is refused (orl.images.ImageError), not just selective search: callers
    # drop the image from every later step.
    image_failed: bool = False

    def to_record(self) -> dict:
        d = asdict(self)
        d["n_boxes"] = len(self.boxes)
        del d["boxes"]
        return d


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's rand(), which OpenCV's selective search uses to rank regions.

    Without this the proposal ORDER (and so which boxes survive the first-100 filter)
    depends on how many images the process handled before, i.e. on worker scheduling; with
    it, every image gets the same proposals in any process, on any run.
    """
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else ctypes.CDLL(None)
    _LIBC.srand(ctypes.c_uint(seed))


_LIBC: ctypes.CDLL | None = None


def selective_search(rgb: np.ndarray, mode: str = "fast", max_side_px: int | None = None, seed: int = 0) -> np.ndarray:
    """Raw region proposals in the proposer's order. (H, W, 3) uint8 RGB -> (N, 4) float xyxy.

    ``mode``: one of ``orl.config.SS_MODES`` (module docstring). With ``max_side_px`` the image
    is downscaled (INTER_AREA) so its longer side is at most that, and the boxes are scaled
    back to original pixels. ``seed`` fixes OpenCV's pseudo-random region ranking, so the
    result depends on the image alone.
    """
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the worker processes, not OpenCV threads
    if mode not in SS_MODES:
        raise ValueError(f"unknown selective search mode {mode!r}; valid: {', '.join(SS_MODES)}")
    h, w = rgb.shape[:2]
    scale = 1.0
    img = rgb
    if max_side_px is not None and max(h, w) > max_side_px:
        scale = max_side_px / max(h, w)
        img = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(img[:, :, ::-1])
    if mode == "felzenszwalb":
        rects = felzenszwalb_rects(bgr)
    else:
        ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        ss.setBaseImage(bgr)
        strategy: dict[str, Callable[[], None]] = {"fast": ss.switchToSelectiveSearchFast,
                                                   "quality": ss.switchToSelectiveSearchQuality,
                                                   "single": ss.switchToSingleStrategy}
        strategy[mode]()
        _seed_c_rand(seed)
        rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)  # x, y, w, h
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1) / scale
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    return boxes


def felzenszwalb_rects(bgr: np.ndarray) -> np.ndarray:
    """Bounding boxes of graph segments, (N, 4) float x, y, w, h in the image's pixels.

    One segmentation per ``FELZENSZWALB_K``, coarse first; within one, larger segments first,
    so the box filter's first-``max_boxes`` cut keeps the object-sized ones. Deterministic.
    """
    import cv2

    out = []
    h, w = bgr.shape[:2]
    ys, xs = np.divmod(np.arange(h * w), w)
    for k in FELZENSZWALB_K:
        seg = cv2.ximgproc.segmentation.createGraphSegmentation(FELZENSZWALB_SIGMA, float(k), max(1, k // 2))
        labels = np.asarray(seg.processImage(bgr), dtype=np.int64).reshape(-1)
        n = int(labels.max()) + 1
        x1 = np.full(n, w, np.int64)
        y1 = np.full(n, h, np.int64)
        x2 = np.full(n, -1, np.int64)
        y2 = np.full(n, -1, np.int64)
        np.minimum.at(x1, labels, xs)
        np.minimum.at(y1, labels, ys)
        np.maximum.at(x2, labels, xs)
        np.maximum.at(y2, labels, ys)
        area = np.bincount(labels, minlength=n)
        order = np.argsort(-area, kind="stable")
        order = order[area[order] > 0]
        out.append(np.stack([x1[order], y1[order], x2[order] - x1[order] + 1, y2[order] - y1[order] + 1], axis=1))
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 4))


def proposal_params(cfg: MineConfig) -> dict:
    """What ``propose_image`` reads: the selective-search options and the official box filter.

    Equal dicts mean equal boxes, so callers key caches of proposals on it.
    """
    return {"mode": cfg.ss_mode, "max_side_px": cfg.ss_max_side_px, "min_side_px": cfg.min_side_px,
            "max_aspect": cfg.max_aspect, "max_iou": cfg.max_iou, "max_boxes": cfg.max_boxes}


def propose_image(path: str, params: dict, root: str | None = None,
                  expected_sha1: str | None = None) -> ProposalResult:
    """Decode, run selective search, apply the official filter. Never raises for a bad image.

    The image is decoded upright (EXIF applied) by orl.images and handed to OpenCV as an array:
    OpenCV never reads the file, so its own EXIF handling cannot matter, and the boxes refer to
    the upright image, like every other output. ``root`` / ``expected_sha1``: see orl.images.decode_image.
    An ok result's reason lists the conversions applied and the filter fallback, if any.
    """
    from orl.images import ImageError, decode_image

    t0 = time.perf_counter()
    try:
        img, info = decode_image(path, root=root, expected_sha1=expected_sha1)
    except ImageError as exc:
        return ProposalResult(path, False, str(exc), seconds=time.perf_counter() - t0, image_failed=True)
    w, h = img.size
    try:
        raw = selective_search(np.asarray(img), params.get("mode", "fast"), params.get("max_side_px"))
    except Exception as exc:  # cv2.error and friends: record, do not stop the run
        return ProposalResult(path, False, f"selective search failed: {type(exc).__name__}: {exc}".strip(),
                              w, h, seconds=time.perf_counter() - t0)
    if len(raw) == 0:
        return ProposalResult(path, False, "selective search returned no regions", w, h,
                              seconds=time.perf_counter() - t0)
    kept = filter_boxes(raw, params.get("min_side_px", 96.0), params.get("max_aspect", 3.0),
                        params.get("max_iou", 0.5), params.get("max_boxes", 100))
    kw, kh = kept[0, 2] - kept[0, 0], kept[0, 3] - kept[0, 1]
    min_side = params.get("min_side_px", 96.0)
    notes = list(info.notes)
    aspect = max(kw / max(kh, 1e-9), kh / max(kw, 1e-9))
    if len(kept) == 1 and (min(kw, kh) < min_side or aspect > params.get("max_aspect", 3.0)):
        notes.append("no region passed the box filter; kept the first raw region (the authors' fallback)")
    return ProposalResult(path, True, "; ".join(notes), w, h, len(raw), kept, time.perf_counter() - t0)


def _read_msg(stream: IO[bytes]) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("worker pipe closed")
    body = stream.read(int.from_bytes(head, "little"))
    return pickle.loads(body)


def _write_msg(stream: IO[bytes], obj: Any) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(body).to_bytes(8, "little") + body)
    stream.flush()


def worker_main() -> None:
    """Body of ``python -m orl.proposals``: read (idx, path, params, checks), write (idx, result)."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # keep the protocol pipe clean of stray prints
    while True:
        try:
            msg = _read_msg(sys.stdin.buffer)
        except EOFError:
            return
        if msg is None:
            return
        idx, path, params, checks = msg
        _write_msg(out, (idx, propose_image(path, params, **checks)))


class _Worker:
    """A selective-search worker: a fresh interpreter (``python -m orl.proposals``) on pipes.

    A plain subprocess, not multiprocessing: it neither re-imports the caller's __main__
    nor inherits torch/CUDA state, and daemonic processes (Celery's prefork pool) may start
    it, which they may not do with multiprocessing.
    """

    def __init__(self) -> None:
        # One thread each: the parallelism is the number of workers (orl.device.plan_threads).
        env = dict(single_thread_env(), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "orl.proposals"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.task: tuple[int, str] | None = None
        self.deadline = 0.0
        self.started = 0.0

    def send(self, msg: Any) -> None:
        _write_msg(self.stdin, msg)

    def recv(self) -> Any:
        return _read_msg(self.stdout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.send(None)
            self.stdin.close()
            self.proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            self.kill()


def run_proposals(
    paths: Iterable[str],
    params: dict,
    workers: int = 2,
    timeout_s: float = 60.0,
    root: str | None = None,
    checksums: Sequence[str | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> Iterator[tuple[int, ProposalResult]]:
    """Propose every image; yields (index, result) as results arrive (not in order).

    ``workers=0`` runs in this process (no time limit, no crash isolation): for callers
    that are already sandboxed, e.g. daemonic Celery pool processes that cannot fork.
    ``root``: refuse files that resolve outside it; ``checksums[i]``: the sha1 path i must still
    have (see orl.images.decode_image).
    ``should_stop`` (a service's cancel check) is polled every ``poll_s`` while an image is in
    work: when it says so, the selective-search subprocesses are killed at once and the
    iteration ends. Without it a cancel waited for the image in hand, up to ``timeout_s``
    (a large photo at full resolution takes tens of seconds).
    """
    items = list(enumerate(paths))
    sums = list(checksums) if checksums is not None else [None] * len(items)

    def checks(idx: int) -> dict[str, str | None]:
        return {"root": root, "expected_sha1": sums[idx]}

    if workers <= 0:
        for idx, p in items:
            yield idx, propose_image(p, params, **checks(idx))
        return
    pool = [_Worker() for _ in range(min(workers, max(1, len(items))))]
    todo = list(reversed(items))
    stopped = False
    try:
        while todo or any(w.task for w in pool):
            if should_stop is not None and should_stop():
                stopped = True
                return
            for w in pool:
                if w.task is None and todo:
                    idx, p = todo.pop()
                    w.task, w.started = (idx, p), time.monotonic()
                    w.deadline = w.started + timeout_s
                    w.send((idx, p, params, checks(idx)))
            busy = [w for w in pool if w.task]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            if should_stop is not None:
                wait_s = min(wait_s, poll_s)
            ready = mp_wait([w.stdout.fileno() for w in busy], timeout=wait_s)
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                idx, p = w.task
                reason = None
                if w.stdout.fileno() in ready:
                    try:
                        got_idx, result = w.recv()
                        w.task = None
                        yield got_idx, result
                        continue
                    except (EOFError, OSError, pickle.UnpicklingError):
                        code = w.proc.wait(5)
                        reason = f"selective search worker crashed (exit code {code})"
                elif time.monotonic() >= w.deadline:
                    reason = f"selective search timed out after {timeout_s:g} s"
                if reason:
                    w.kill()
                    pool[i] = _Worker()
                    yield idx, ProposalResult(p, False, reason, seconds=time.monotonic() - w.started)
    finally:
        for w in pool:
            if stopped:
                w.kill()  # mid-image: it would not read the end message before finishing
            else:
                w.close()


if __name__ == "__main__":
    # Import by name so pickled results reference orl.proposals, not __main__.
    from orl.proposals import worker_main as _main

    _main()
