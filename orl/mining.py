"""Stage 2: correspondence discovery.

Steps, each a function so services can run them separately (per shard, per queue):
1. ``embed_images``: projector output of Resize + CenterCrop images, L2-normalised.
2. ``knn_search``: exact cosine KNN, self excluded (faiss on CPU, torch on CUDA).
3. ``run_proposals`` (orl.proposals): selective search + the official box filter.
4. ``embed_rois_batched``: one feature per filtered box, each image's boxes encoded ONCE and
   reused by every query that retrieves the image (the authors re-encode them per query);
   images decoded in parallel threads, the boxes of many images in one forward.
   ``embed_rois`` is the same for one image, one image at a time (the reference path).
5. ``select_pairs``: top max(1, int(ratio * B_query)) entries of the flattened RoI
   similarity matrix, per (query, neighbour).
``mine`` runs them all for a folder and returns a ``Correspondence``. Between steps 4 and 5 the
RoI features stream to memory-mapped shards on disk (orl.roi_features), never all in RAM.

Decoding threads and forwards take turns on a CPU device (each then has every core given;
orl.device); on CUDA the next wave of images is decoded while the GPU works on this one.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from orl.augment import IMAGENET_MEAN, IMAGENET_STD, crop_patch, eval_transform, squash_transform
from orl.config import MineConfig
from orl.correspondence import Correspondence, official_info
from orl.device import ThreadPlan, plan_threads
from orl.images import ImageError, decode_image, load_rgb
from orl.models import ORLModel
from orl.models.backbones import Backbone
from orl.proposals import ProposalResult, proposal_params, run_proposals
from orl.roi_features import RoiFeatureStore, RoiFeatureWriter, load_roi_features, write_npz

__all__ = ["load_roi_features"]  # re-exported: its home is orl.roi_features

ProgressFn = Callable[[str, int, int], None]
T = TypeVar("T")
R = TypeVar("R")


def _noop(stage: str, done: int, total: int) -> None:
    pass


def decode_waves(waves: Iterable[Sequence[T]], fn: Callable[[T], R], threads: int,
                 overlap: bool = False) -> Iterator[list[R]]:
    """``fn`` over every item of each wave in a pool of ``threads`` threads; yields each wave's
    results in order. Pillow decodes and resizes with the GIL released, so threads decode in
    parallel without copying pixels between processes.

    ``overlap=False`` (a CPU device): the next wave starts only when the caller asks for it,
    i.e. after its forward, so decoding and torch's threads never compete for the cores.
    ``overlap=True`` (CUDA): the next wave decodes while the caller works on this one.
    """
    it = iter(waves)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="orl-decode") as pool:
        def submit() -> list[Future[R]] | None:
            wave = next(it, None)
            return None if wave is None else [pool.submit(fn, x) for x in wave]

        pending = submit()
        while pending is not None:
            ahead = submit() if overlap else None
            results = [f.result() for f in pending]
            yield results
            pending = ahead if overlap else submit()


def _chunks(items: Sequence[T], n: int) -> list[Sequence[T]]:
    return [items[s : s + n] for s in range(0, len(items), n)]


def _default_decode_threads() -> int:
    return torch.get_num_threads()  # the cores the caller gave torch (orl.device.apply_threads)


@torch.no_grad()
def embed_images(
    model: ORLModel,
    paths: list[str],
    cfg: MineConfig,
    device: torch.device | str = "cpu",
    decode_threads: int | None = None,
    progress: ProgressFn = _noop,
    root: str | Path | None = None,
    checksums: list[str | None] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Image embeddings. Returns ((N, D) float32 L2-normalised, {index: failure reason}).

    D is the projector's output size, or the backbone's channels with
    ``cfg.knn_features == "backbone"``. Images are decoded in ``decode_threads`` threads
    (default: torch's thread count) and embedded ``cfg.batch_size`` per forward; with
    ``cfg.decode_draft`` JPEGs decode at the smallest DCT scale that still covers the resize.
    Rows of images that failed to decode are zero. ``root`` / ``checksums``: files outside
    ``root``, or whose sha1 is no longer ``checksums[i]``, are refused (orl.images.decode_image).
    ``cfg.embedding_params()`` lists the options read here that change the values (cache keys).
    """
    model.eval()
    tf = eval_transform(cfg.embed_resize, cfg.embed_crop)
    sums = checksums if checksums is not None else [None] * len(paths)
    draft = cfg.embed_resize if cfg.decode_draft else None

    def load(i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, tf(load_rgb(paths[i], draft, root=root, expected_sha1=sums[i])), ""
        except ImageError as exc:
            return i, None, str(exc)

    use_backbone = cfg.knn_features == "backbone"
    dim = model.backbone.out_channels if use_backbone else model.cfg.proj_out
    out = np.zeros((len(paths), dim), dtype=np.float32)
    failed: dict[int, str] = {}
    done = 0
    overlap = torch.device(device).type == "cuda"
    for batch in decode_waves(_chunks(range(len(paths)), cfg.batch_size), load,
                              decode_threads or _default_decode_threads(), overlap):
        failed.update({i: reason for i, x, reason in batch if x is None})
        ok = [(i, x) for i, x, _ in batch if x is not None]
        if ok:
            x = torch.stack([x for _, x in ok]).to(device)
            z = F.normalize((model.backbone(x) if use_backbone else model.embed(x)).float(), dim=1)
            out[[i for i, _ in ok]] = z.cpu().numpy()
        done += len(batch)
        progress("embed", done, len(paths))
    return out, failed


def knn_search(emb: np.ndarray, k: int, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine KNN over L2-normalised rows, self excluded.

    (N, D) -> (indices (N, k') int64, similarities (N, k') float32), best first, where
    k' = min(k, N - 1). faiss IndexFlatIP on CPU; a chunked matmul + topk on CUDA; both exact.
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    if torch.device(device).type == "cuda":
        sims, idx = _knn_torch(emb, k_eff + 1, device)
    else:
        import faiss

        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        sims, idx = index.search(emb, k_eff + 1)
    return _drop_self(idx, sims, k_eff)


def _knn_torch(emb: np.ndarray, k: int, device: torch.device | str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(emb).to(device)
    sims, idx = [], []
    for s in range(0, len(x), chunk):
        v, i = (x[s : s + chunk] @ x.T).topk(k, dim=1)
        sims.append(v.cpu())
        idx.append(i.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def _drop_self(idx: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index (wherever ties put it); else drop the last column."""
    n = len(idx)
    out_i = np.empty((n, k), np.int64)
    out_s = np.empty((n, k), np.float32)
    for r in range(n):
        keep = idx[r] != r
        if keep.all():
            keep[-1] = False
        out_i[r] = idx[r][keep][:k]
        out_s[r] = sims[r][keep][:k]
    return out_i, out_s


def _roi_align_input(image: Image.Image, cfg: MineConfig, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, h, w) normalised pixels for the roi_align pass: longer side roi_align_max_side_px.
    ``size``: the image's full (width, height) when ``image`` is a smaller draft decode."""
    full_w, full_h = size or image.size
    scale = min(1.0, cfg.roi_align_max_side_px / max(full_w, full_h))
    w, h = max(32, round(full_w * scale)), max(32, round(full_h * scale))
    pixels = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    t = torch.from_numpy(pixels).permute(2, 0, 1)
    return (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _roi_align_draft_px(cfg: MineConfig, size: tuple[int, int]) -> int:
    """The shorter side the roi_align pass needs: a draft decode at least this large loses nothing
    the resize would keep (the aspect ratio is the same, so the longer side is covered too)."""
    scale = min(1.0, cfg.roi_align_max_side_px / max(size))
    return max(32, round(min(size) * scale))


def _pool_rois(fmap: torch.Tensor, boxes: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """RoIAlign (7 x 7, averaged) of each image's boxes on its row of ``fmap`` (N, C, h, w).
    boxes[n]: (B_n, 4) xyxy in the pixels of an image of size sizes[n] = (width, height)."""
    rois = []
    for n, (b, (w, h)) in enumerate(zip(boxes, sizes, strict=True)):
        sx, sy = fmap.shape[3] / w, fmap.shape[2] / h
        scale = torch.tensor([sx, sy, sx, sy], device=fmap.device)
        t = torch.as_tensor(b, dtype=torch.float32, device=fmap.device) * scale
        rois.append(torch.cat([torch.full((len(t), 1), float(n), device=fmap.device), t], dim=1))
    f = roi_align(fmap, torch.cat(rois), output_size=7, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return list(f.mean(dim=(2, 3)).split([len(b) for b in boxes]))


def _crops(image: Image.Image, boxes: np.ndarray, cfg: MineConfig) -> torch.Tensor:
    """(B, 3, roi_size, roi_size): each box cut from the original image and warped."""
    tf = squash_transform(cfg.roi_size)
    return torch.stack([tf(crop_patch(image, b, cfg.roi_size)) for b in boxes])


def _forward_crops(backbone: Backbone, x: torch.Tensor, batch_size: int, device: torch.device | str) -> torch.Tensor:
    """(N, 3, S, S) crops -> (N, C) pooled res5 features, batch_size crops per forward."""
    return torch.cat([backbone(x[s : s + batch_size].to(device)).float() for s in range(0, len(x), batch_size)])


@torch.no_grad()
def embed_rois(
    backbone: Backbone,
    image: Image.Image,
    boxes: np.ndarray,
    cfg: MineConfig,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, int]:
    """RoI features of one image. (B, 4) xyxy -> ((B, C) float32 L2-normalised, CNN forwards).

    ``crop`` (faithful): each box is cut from the original image, warped to roi_size x
    roi_size, and the pooled res5 vector is its feature; B forwards.
    ``roi_align``: one backbone pass over the image (longer side roi_align_max_side_px),
    RoIAlign (7 x 7) on the res5 map, averaged; 1 forward for all boxes.
    One image at a time, the reference for :func:`embed_rois_batched` (and what the authors'
    path in benchmarks/mining_benchmark.py re-encodes per query).
    """
    if len(boxes) == 0:
        return np.zeros((0, backbone.out_channels), np.float32), 0
    if cfg.roi_mode == "crop":
        f = _forward_crops(backbone, _crops(image, boxes, cfg), cfg.batch_size, device)
        n_fwd = len(boxes)
    elif cfg.roi_mode == "roi_align":
        fmap = backbone.forward_features(_roi_align_input(image, cfg)[None].to(device)).float()
        f = _pool_rois(fmap, [boxes], [image.size])[0]
        n_fwd = 1
    else:
        raise ValueError(f"unknown roi_mode {cfg.roi_mode!r}; valid: crop, roi_align")
    return F.normalize(f, dim=1).cpu().numpy(), n_fwd


@dataclass(frozen=True)
class RoiImage:
    """One image whose boxes :func:`embed_rois_batched` encodes. ``boxes`` (B, 4) float xyxy in
    the upright image's pixels; ``root`` / ``expected_sha1``: see orl.images.decode_image."""

    path: str | Path
    boxes: np.ndarray
    root: str | Path | None = None
    expected_sha1: str | None = None


def roi_forwards(cfg: MineConfig, n_boxes: int) -> int:
    """CNN forwards (images through the backbone) that encoding n_boxes boxes of one image costs."""
    if n_boxes == 0:
        return 0
    return n_boxes if cfg.roi_mode == "crop" else 1


@torch.no_grad()
def embed_rois_batched(
    backbone: Backbone,
    images: Sequence[RoiImage],
    cfg: MineConfig,
    device: torch.device | str = "cpu",
    decode_threads: int | None = None,
) -> Iterator[tuple[int, np.ndarray, str]]:
    """:func:`embed_rois` for many images: yields (index, (B_i, C) float32 L2-normalised,
    failure reason or "") in the order of ``images``; a failed image yields (0, C) features.

    Images are decoded (and, in crop mode, cropped) in ``decode_threads`` threads (default
    torch's thread count), and the backbone sees many images per forward: crop mode fills each
    batch of ``cfg.batch_size`` crops across images; roi_align stacks up to
    ``cfg.roi_align_batch_images`` images whose resized sizes are equal (no padding, which
    would change the features near the edges). Features equal the one-image path up to
    floating-point summation order (tests/test_mining_speed.py).
    """
    if cfg.roi_mode not in ("crop", "roi_align"):
        raise ValueError(f"unknown roi_mode {cfg.roi_mode!r}; valid: crop, roi_align")
    dim = backbone.out_channels
    threads = decode_threads or _default_decode_threads()
    crop = cfg.roi_mode == "crop"

    def load(k: int) -> tuple[int, torch.Tensor | None, tuple[int, int], str]:
        job = images[k]
        try:
            if crop:
                img = load_rgb(job.path, root=job.root, expected_sha1=job.expected_sha1)
                return k, _crops(img, job.boxes, cfg), img.size, ""
            draft = None
            if cfg.decode_draft:
                from orl.images import inspect_image

                info = inspect_image(job.path, root=job.root)
                draft = _roi_align_draft_px(cfg, (info.width, info.height))
            img, info = decode_image(job.path, root=job.root, expected_sha1=job.expected_sha1, draft_px=draft)
            size = (info.width, info.height)
            return k, _roi_align_input(img, cfg, size), size, ""
        except ImageError as exc:
            return k, None, (0, 0), str(exc)

    todo = [k for k in range(len(images)) if len(images[k].boxes)]
    if crop:  # a wave: images whose crops fill at least one batch
        waves: list[Sequence[int]] = []
        cur: list[int] = []
        n = 0
        for k in todo:
            cur.append(k)
            n += len(images[k].boxes)
            if n >= cfg.batch_size:
                waves.append(cur)
                cur, n = [], 0
        waves += [cur] if cur else []
    else:
        waves = _chunks(todo, max(cfg.roi_align_batch_images, threads))
    overlap = torch.device(device).type == "cuda"
    empty = np.zeros((0, dim), np.float32)
    nxt = 0  # the next index to yield: images without boxes are yielded in their place
    for results in decode_waves(waves, load, threads, overlap):
        feats = _forward_wave(backbone, results, images, cfg, device)
        for k, _, _, reason in results:
            while nxt < k:
                yield nxt, empty, ""
                nxt += 1
            yield k, feats.get(k, empty), reason
            nxt = k + 1
    while nxt < len(images):
        yield nxt, empty, ""
        nxt += 1


def _forward_wave(backbone: Backbone, results: list[tuple[int, torch.Tensor | None, tuple[int, int], str]],
                  images: Sequence[RoiImage], cfg: MineConfig, device: torch.device | str) -> dict[int, np.ndarray]:
    """The features of one decoded wave, {index: (B, C) float32 L2-normalised}."""
    ok = [(k, x, size) for k, x, size, _ in results if x is not None]
    if not ok:
        return {}
    if cfg.roi_mode == "crop":
        f = _forward_crops(backbone, torch.cat([x for _, x, _ in ok]), cfg.batch_size, device)
        parts = f.split([len(x) for _, x, _ in ok])
        return {k: F.normalize(p, dim=1).cpu().numpy() for (k, _, _), p in zip(ok, parts, strict=True)}
    out: dict[int, np.ndarray] = {}
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor, tuple[int, int]]]] = {}
    for item in ok:
        by_shape.setdefault(tuple(item[1].shape), []).append(item)
    for group in by_shape.values():
        for chunk in _chunks(group, cfg.roi_align_batch_images):
            fmap = backbone.forward_features(torch.stack([x for _, x, _ in chunk]).to(device)).float()
            pooled = _pool_rois(fmap, [images[k].boxes for k, _, _ in chunk], [size for _, _, size in chunk])
            out.update({k: F.normalize(p, dim=1).cpu().numpy() for (k, _, _), p in zip(chunk, pooled, strict=True)})
    return out


def select_pairs(fq: np.ndarray, fk: np.ndarray, ratio: float,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The authors' pair rule for one (query, neighbour) image pair.

    fq (Bq, C), fk (Bk, C) L2-normalised. The Bq x Bk cosine matrix is flattened and its top
    max(1, int(ratio * Bq)) entries kept, best first. Returns ((P, 2) int [query box,
    neighbour box], (P,) float32 scores). A query box may pair with several neighbour boxes.
    """
    if len(fq) == 0 or len(fk) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    sim = torch.from_numpy(_float32(fq)).to(device) @ torch.from_numpy(_float32(fk)).to(device).T
    n = min(max(1, int(ratio * len(fq))), sim.numel())
    scores, flat = sim.flatten().topk(n)
    top = flat.cpu().numpy()
    return np.stack([top // len(fk), top % len(fk)], axis=1), scores.cpu().numpy().astype(np.float32)


def _float32(f: np.ndarray) -> np.ndarray:
    """A writable float32 array (features may be float16 or read-only memory maps)."""
    a = np.asarray(f, dtype=np.float32)
    return a if a.flags.writeable else a.copy()


def mine(
    model: ORLModel,
    images_root: str | Path,
    files: list[str],
    out_dir: str | Path,
    cfg: MineConfig,
    device: torch.device | str = "cpu",
    threads: ThreadPlan | None = None,
    progress: ProgressFn = _noop,
    info: dict | None = None,
    save_features: bool = False,
    refused: dict[str, str] | None = None,
) -> tuple[Correspondence, dict]:
    """Run stage 2 over ``files`` (relative to images_root). Writes to out_dir:

    correspondence.json (official layout + scores), image_status.csv (every image: ok or
    failed with the reason), proposals.jsonl (a resumable cache of selective search),
    mine_stats.json (timings, forward counts, parameters). Returns (correspondence, stats).
    With ``save_features``, also roi_features.npz (see :func:`load_roi_features`), so other
    pair rules can be tried on the same boxes without re-encoding them. ``refused``: files a
    pre-scan (orl.images.scan_images) left out, {file: reason}; they are listed as failed.
    ``threads``: how the cores are spent (orl.device.plan_threads); default: every core of the
    machine for selective search unless ``cfg.ss_workers`` says otherwise, and torch's thread
    count for decoding. RoI features live in ``out_dir/roi_store`` (``cfg.roi_dtype``) while
    pairs are selected, and are deleted at the end.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(images_root)
    paths = [str(root / f) for f in files]
    plan = threads or plan_threads(None, ss_processes=cfg.ss_workers)
    decode_threads = plan.threads if threads else _default_decode_threads()
    stats: dict = {"params": asdict(cfg), "images": len(files), "seconds": {}, "cnn_forwards": {},
                   "threads": {**plan.to_dict(), "decode_threads": decode_threads}}
    model = model.to(device).eval()

    # 1-2. image embeddings and KNN
    t0 = time.perf_counter()
    emb, failed = embed_images(model, paths, cfg, device, decode_threads, progress)
    stats["seconds"]["embed_images"] = time.perf_counter() - t0
    stats["cnn_forwards"]["embed_images"] = len(paths) - len(failed)

    # 3. proposals (cached per image: a killed run restarts where it stopped)
    t0 = time.perf_counter()
    props = _proposals_cached(paths, files, cfg, out / "proposals.jsonl", plan.ss_processes, progress)
    stats["seconds"]["selective_search"] = time.perf_counter() - t0
    for i, r in props.items():
        if not r.ok and i not in failed and r.image_failed:
            failed[i] = r.reason
    refused = refused or {}

    keep = [i for i in range(len(files)) if i not in failed]
    if not keep:
        _write_status(out / "image_status.csv", files, props, failed, refused)
        raise ValueError(f"none of the {len(files)} images could be decoded; see {out / 'image_status.csv'}")
    t0 = time.perf_counter()
    knn_local, knn_sim = knn_search(emb[keep], cfg.knn_k, device)
    stats["seconds"]["knn"] = time.perf_counter() - t0

    # 4. RoI features, each image once, streamed to disk
    t0 = time.perf_counter()
    feats = _embed_rois_to_store(model.backbone, [paths[i] for i in keep], [props[i] for i in keep], cfg, device,
                                 decode_threads, out / "roi_store", [files[i] for i in keep], progress)
    for k, i in enumerate(keep):
        if feats.failures.get(k):  # gone or changed since it was proposed: no boxes, recorded
            failed[i] = feats.failures[k]
            props[i] = ProposalResult(props[i].path, False, failed[i], props[i].width, props[i].height,
                                      image_failed=True)
    stats["seconds"]["embed_rois"] = time.perf_counter() - t0
    stats["cnn_forwards"]["embed_rois"] = feats.forwards
    store = feats.store
    if save_features:
        write_npz(out / "roi_features.npz", store.files, store)

    # 5. pairs per (query, neighbour)
    t0 = time.perf_counter()
    pairs, scores = [], []
    for q in range(len(keep)):
        row_p, row_s = [], []
        fq = _float32(store[q])
        bq = props[keep[q]].boxes
        for j in knn_local[q]:
            ij, s = select_pairs(fq, store[j], cfg.pair_ratio, device)
            bn = props[keep[j]].boxes
            row_p.append(np.concatenate([bq[ij[:, 0]], bn[ij[:, 1]]], axis=1) if len(ij) else np.zeros((0, 8)))
            row_s.append(s)
        pairs.append(row_p)
        scores.append(row_s)
    stats["seconds"]["select_pairs"] = time.perf_counter() - t0
    store.remove()

    corr = Correspondence(
        files=[files[i] for i in keep],
        sizes=np.array([[props[i].width, props[i].height] for i in keep], dtype=np.int64).reshape(-1, 2),
        boxes=[props[i].boxes if props[i].ok else np.zeros((0, 4)) for i in keep],
        knn=knn_local, knn_sim=knn_sim, pairs=pairs, pair_scores=scores,
        info=official_info(cfg, info),
    )
    corr.save(out / "correspondence.json")
    _write_status(out / "image_status.csv", files, props, failed, refused)
    stats["failed_images"] = len(failed) + len(refused)
    stats["images_without_boxes"] = sum(1 for i in keep if not props[i].ok)
    stats["pairs"] = corr.num_pairs
    (out / "mine_stats.json").write_text(json.dumps(stats, indent=2))
    return corr, stats


@dataclass
class _StoredRois:
    store: RoiFeatureStore
    forwards: int
    failures: dict[int, str]


def _embed_rois_to_store(backbone: Backbone, paths: list[str], props: list[ProposalResult], cfg: MineConfig,
                         device: torch.device | str, decode_threads: int, folder: Path, files: list[str],
                         progress: ProgressFn) -> _StoredRois:
    """Step 4: every image's RoI features appended to a store (orl.roi_features) as they come."""
    jobs = [RoiImage(p, r.boxes if r.ok else np.zeros((0, 4))) for p, r in zip(paths, props, strict=True)]
    writer = RoiFeatureWriter(folder, backbone.out_channels, cfg.roi_dtype)
    forwards, failures = 0, {}
    for k, f, reason in embed_rois_batched(backbone, jobs, cfg, device, decode_threads):
        if reason:
            failures[k] = reason
        else:
            forwards += roi_forwards(cfg, len(jobs[k].boxes))
        writer.append(f)
        progress("embed_rois", k + 1, len(jobs))
    return _StoredRois(writer.close(files), forwards, failures)


def _proposals_cached(paths: list[str], files: list[str], cfg: MineConfig, cache: Path, workers: int,
                      progress: ProgressFn) -> dict[int, ProposalResult]:
    params = proposal_params(cfg)
    done: dict[int, ProposalResult] = {}
    index = {f: i for i, f in enumerate(files)}
    if cache.exists():
        lines = cache.read_text().splitlines()
        if lines and json.loads(lines[0]).get("params") == params:
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except ValueError:  # a half-written last line from a killed run
                    continue
                if rec["file"] in index:
                    done[index[rec["file"]]] = _from_record(rec, paths[index[rec["file"]]])
        else:
            cache.unlink()
    if not cache.exists():
        cache.write_text(json.dumps({"params": params}) + "\n")
    todo = [i for i in range(len(files)) if i not in done]
    with cache.open("a") as fh:
        for k, res in run_proposals([paths[i] for i in todo], params, workers, cfg.ss_timeout_s):
            i = todo[k]
            done[i] = res
            rec = res.to_record()
            rec.pop("path")
            rec.update(file=files[i], boxes=np.round(res.boxes, 2).tolist())
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            progress("selective_search", len(done), len(files))
    return done


def _from_record(rec: dict, path: str) -> ProposalResult:
    return ProposalResult(path, rec["ok"], rec["reason"], rec["width"], rec["height"], rec["n_raw"],
                          np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4), rec["seconds"],
                          # caches written before the field existed: their decode failures said so
                          rec.get("image_failed", not rec["ok"] and rec["reason"].startswith("cannot decode")))


def _write_status(path: Path, files: list[str], props: dict[int, ProposalResult], failed: dict[int, str],
                  refused: dict[str, str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "status", "reason", "width", "height", "n_proposals", "n_boxes", "ss_seconds"])
        for f, reason in refused.items():
            w.writerow([f, "failed", reason, 0, 0, 0, 0, ""])
        for i, f in enumerate(files):
            if i in failed:
                p = props.get(i)
                w.writerow([f, "failed", failed[i], p.width if p else 0, p.height if p else 0, 0, 0, ""])
                continue
            r = props[i]  # an image that did not fail has its proposals
            if not r.ok:
                w.writerow([f, "no_boxes", r.reason, r.width, r.height, r.n_raw, 0, f"{r.seconds:.3f}"])
            else:
                w.writerow([f, "ok", r.reason, r.width, r.height, r.n_raw, len(r.boxes), f"{r.seconds:.3f}"])
