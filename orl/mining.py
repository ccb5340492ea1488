"""Stage 2: correspondence discovery.

Steps, each a function so services can run them separately (per shard, per queue):
1. ``embed_images``: projector output of Resize + CenterCrop images, L2-normalised.
2. ``knn_search``: exact cosine KNN, self excluded (faiss on CPU, torch on CUDA).
3. ``run_proposals`` (orl.proposals): selective search + the official box filter.
4. ``embed_rois``: one feature per filtered box, each image's boxes encoded ONCE and reused
   by every query that retrieves the image (the authors re-encode them per query).
5. ``select_pairs``: top max(1, int(ratio * B_query)) entries of the flattened RoI
   similarity matrix, per (query, neighbour).
``mine`` runs them all for a folder and returns a ``Correspondence``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from orl.augment import IMAGENET_MEAN, IMAGENET_STD, crop_patch, eval_transform, squash_transform
from orl.config import MineConfig
from orl.correspondence import Correspondence, official_info
from orl.images import ImageError, load_rgb
from orl.models import ORLModel
from orl.models.backbones import Backbone
from orl.proposals import ProposalResult, run_proposals

ProgressFn = Callable[[str, int, int], None]


def _noop(stage: str, done: int, total: int) -> None:
    pass


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], tf: Callable[[Image.Image], torch.Tensor], root: str | Path | None = None,
                 checksums: list[str | None] | None = None):
        self.paths, self.tf, self.root = paths, tf, root
        self.checksums = checksums if checksums is not None else [None] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.tf(load_rgb(self.paths[i], root=self.root, expected_sha1=self.checksums[i])), ""
        except ImageError as exc:
            return i, None, str(exc)


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]
             ) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    x = torch.stack([x for _, x in ok]) if ok else None
    return idx, x, bad


@torch.no_grad()
def embed_images(
    model: ORLModel,
    paths: list[str],
    cfg: MineConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: ProgressFn = _noop,
    root: str | Path | None = None,
    checksums: list[str | None] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Image embeddings. Returns ((N, D) float32 L2-normalised, {index: failure reason}).

    D is the projector's output size, or the backbone's channels with
    ``cfg.knn_features == "backbone"``.
    Rows of images that failed to decode are zero. ``root`` / ``checksums``: files outside
    ``root``, or whose sha1 is no longer ``checksums[i]``, are refused (orl.images.decode_image).
    """
    model.eval()
    loader = torch.utils.data.DataLoader(
        _EvalImages(paths, eval_transform(cfg.embed_resize, cfg.embed_crop), root, checksums),
        batch_size=cfg.batch_size, num_workers=num_workers, collate_fn=_collate)
    use_backbone = cfg.knn_features == "backbone"
    dim = model.backbone.out_channels if use_backbone else model.cfg.proj_out
    out = np.zeros((len(paths), dim), dtype=np.float32)
    failed: dict[int, str] = {}
    done = 0
    for idx, x, bad in loader:
        failed.update(dict(bad))
        if x is not None:
            x = x.to(device)
            z = F.normalize((model.backbone(x) if use_backbone else model.embed(x)).float(), dim=1)
            out[idx.numpy()] = z.cpu().numpy()
        done += len(idx) + len(bad)
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
    """
    if len(boxes) == 0:
        return np.zeros((0, backbone.out_channels), np.float32), 0
    if cfg.roi_mode == "crop":
        tf = squash_transform(cfg.roi_size)
        feats = []
        for s in range(0, len(boxes), cfg.batch_size):
            x = torch.stack([tf(crop_patch(image, b, cfg.roi_size)) for b in boxes[s : s + cfg.batch_size]])
            feats.append(backbone(x.to(device)).float())
        f = torch.cat(feats)
        n_fwd = len(boxes)
    elif cfg.roi_mode == "roi_align":
        scale = min(1.0, cfg.roi_align_max_side_px / max(image.size))
        w, h = max(32, round(image.width * scale)), max(32, round(image.height * scale))
        pixels = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        t = torch.from_numpy(pixels).permute(2, 0, 1)
        t = (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        fmap = backbone.forward_features(t[None].to(device)).float()
        sx, sy = fmap.shape[3] / image.width, fmap.shape[2] / image.height
        b = torch.as_tensor(boxes, dtype=torch.float32, device=device) * torch.tensor([sx, sy, sx, sy], device=device)
        rois = torch.cat([torch.zeros(len(b), 1, device=device), b], dim=1)
        f = roi_align(fmap, rois, output_size=7, spatial_scale=1.0, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
        n_fwd = 1
    else:
        raise ValueError(f"unknown roi_mode {cfg.roi_mode!r}; valid: crop, roi_align")
    return F.normalize(f, dim=1).cpu().numpy(), n_fwd


def select_pairs(fq: np.ndarray, fk: np.ndarray, ratio: float,
                 device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The authors' pair rule for one (query, neighbour) image pair.

    fq (Bq, C), fk (Bk, C) L2-normalised. The Bq x Bk cosine matrix is flattened and its top
    max(1, int(ratio * Bq)) entries kept, best first. Returns ((P, 2) int [query box,
    neighbour box], (P,) float32 scores). A query box may pair with several neighbour boxes.
    """
    if len(fq) == 0 or len(fk) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    sim = torch.from_numpy(fq).to(device) @ torch.from_numpy(fk).to(device).T
    n = min(max(1, int(ratio * len(fq))), sim.numel())
    scores, flat = sim.flatten().topk(n)
    top = flat.cpu().numpy()
    return np.stack([top // len(fk), top % len(fk)], axis=1), scores.cpu().numpy().astype(np.float32)


def mine(
    model: ORLModel,
    images_root: str | Path,
    files: list[str],
    out_dir: str | Path,
    cfg: MineConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
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
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(images_root)
    paths = [str(root / f) for f in files]
    stats: dict = {"params": asdict(cfg), "images": len(files), "seconds": {}, "cnn_forwards": {}}
    model = model.to(device).eval()

    # 1-2. image embeddings and KNN
    t0 = time.perf_counter()
    emb, failed = embed_images(model, paths, cfg, device, num_workers, progress)
    stats["seconds"]["embed_images"] = time.perf_counter() - t0
    stats["cnn_forwards"]["embed_images"] = len(paths) - len(failed)

    # 3. proposals (cached per image: a killed run restarts where it stopped)
    t0 = time.perf_counter()
    props = _proposals_cached(paths, files, cfg, out / "proposals.jsonl", progress)
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

    # 4. RoI features, each image once
    t0 = time.perf_counter()
    feats: list[np.ndarray] = []
    n_fwd = 0
    for n, i in enumerate(keep):
        boxes = props[i].boxes if props[i].ok else np.zeros((0, 4))
        f = np.zeros((0, model.backbone.out_channels), np.float32)
        if len(boxes):
            try:
                f, c = embed_rois(model.backbone, load_rgb(paths[i]), boxes, cfg, device)
                n_fwd += c
            except ImageError as exc:  # gone or changed since it was proposed: no boxes, recorded
                failed[i] = str(exc)
                props[i] = ProposalResult(props[i].path, False, str(exc), props[i].width, props[i].height,
                                          image_failed=True)
        feats.append(f)
        progress("embed_rois", n + 1, len(keep))
    stats["seconds"]["embed_rois"] = time.perf_counter() - t0
    stats["cnn_forwards"]["embed_rois"] = n_fwd
    if save_features:
        _save_roi_features(out / "roi_features.npz", [files[i] for i in keep], feats)

    # 5. pairs per (query, neighbour)
    t0 = time.perf_counter()
    pairs, scores = [], []
    for q in range(len(keep)):
        row_p, row_s = [], []
        for j in knn_local[q]:
            ij, s = select_pairs(feats[q], feats[j], cfg.pair_ratio, device)
            bq = props[keep[q]].boxes
            bn = props[keep[j]].boxes
            row_p.append(np.concatenate([bq[ij[:, 0]], bn[ij[:, 1]]], axis=1) if len(ij) else np.zeros((0, 8)))
            row_s.append(s)
        pairs.append(row_p)
        scores.append(row_s)
    stats["seconds"]["select_pairs"] = time.perf_counter() - t0

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


def _save_roi_features(path: Path, files: list[str], feats: list[np.ndarray]) -> None:
    dim = max((f.shape[1] for f in feats if f.ndim == 2), default=0)
    flat = np.concatenate([f.reshape(-1, dim) for f in feats]) if feats else np.zeros((0, dim), np.float32)
    np.savez(path, files=np.array(files), counts=np.array([len(f) for f in feats], dtype=np.int64),
             features=flat.astype(np.float32))


def load_roi_features(path: str | Path) -> tuple[list[str], list[np.ndarray]]:
    """(files, per-image (B_i, C) L2-normalised RoI features) saved by ``mine(save_features=True)``,
    in the order of the correspondence's files and boxes."""
    z = np.load(path)
    splits = np.cumsum(z["counts"])[:-1]
    return [str(f) for f in z["files"]], np.split(z["features"], splits) if len(z["counts"]) else []


def _proposals_cached(paths: list[str], files: list[str], cfg: MineConfig, cache: Path,
                      progress: ProgressFn) -> dict[int, ProposalResult]:
    params = {"mode": cfg.ss_mode, "max_side_px": cfg.ss_max_side_px, "min_side_px": cfg.min_side_px,
              "max_aspect": cfg.max_aspect, "max_iou": cfg.max_iou, "max_boxes": cfg.max_boxes}
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
        for k, res in run_proposals([paths[i] for i in todo], params, cfg.ss_workers, cfg.ss_timeout_s):
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
