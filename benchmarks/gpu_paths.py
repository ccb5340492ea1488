#!/usr/bin/env python
"""The CUDA code paths of stage 2 against the CPU, on real photos and their real proposals.

CPU and CUDA convolutions round differently, so features are compared with a tolerance and
the discrete outputs (neighbour indices, pairs) are compared exactly. Needs no faiss: the
KNN reference is an exact numpy argsort. Writes a JSON report; exits 1 if a check fails.

  python benchmarks/gpu_paths.py --images .gpu/data/coco128/images \
      --proposals .gpu/work/proposals/ss500.jsonl --out gpu_paths.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def knn_check(n: int = 5000, dim: int = 256, k: int = 10) -> dict:
    from orl.mining import knn_search

    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    ref = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    t = time.perf_counter()
    idx, s = knn_search(x, k, "cuda")
    secs = time.perf_counter() - t
    return {"rows": n, "identical_indices": float((idx == ref).mean()),
            "max_sim_diff": float(np.abs(s - np.take_along_axis(sim, ref, 1)).max()), "cuda_seconds": secs,
            "ok": bool((idx == ref).mean() > 0.999)}


def roi_checks(images: Path, proposals: Path, n_images: int) -> dict:
    import torch

    from orl.config import get_preset
    from orl.images import load_rgb
    from orl.mining import embed_rois, select_pairs
    from orl.models import build_model

    # boxes from the selective-search cache, keyed "coco128/<split>/<name>"
    recs = [json.loads(line) for line in proposals.read_text().splitlines()[1:]]
    recs = [r for r in recs if r["file"].startswith("coco128/") and r["ok"] and r["boxes"]][:n_images]
    out = {}
    for mode in ("crop", "roi_align"):
        cfg = get_preset("cpu").override(**{"mine.roi_mode": mode})
        torch.manual_seed(0)
        model = build_model(cfg.model, "byol").eval()
        feats, secs = {}, {}
        for dev in ("cpu", "cuda"):
            m = model.to(dev)
            t = time.perf_counter()
            feats[dev] = [embed_rois(m.backbone, load_rgb(images / r["file"][len("coco128/"):]),
                                     np.asarray(r["boxes"], np.float64), cfg.mine, dev)[0] for r in recs]
            if dev == "cuda":
                torch.cuda.synchronize()
            secs[dev] = time.perf_counter() - t
        diff = max(float(np.abs(a - b).max()) for a, b in zip(feats["cpu"], feats["cuda"], strict=True))
        same_pairs, total = 0, 0
        for q in range(len(recs) - 1):  # each photo against the next, as query and neighbour
            pc, _ = select_pairs(feats["cpu"][q], feats["cpu"][q + 1], cfg.mine.pair_ratio, "cpu")
            pg, _ = select_pairs(feats["cuda"][q], feats["cuda"][q + 1], cfg.mine.pair_ratio, "cuda")
            same_pairs += len({tuple(p) for p in pc} & {tuple(p) for p in pg})
            total += len(pc)
        out[mode] = {"images": len(recs), "boxes": int(sum(len(f) for f in feats["cpu"])),
                     "max_feature_diff": diff, "pairs_identical_share": same_pairs / max(total, 1),
                     "cpu_seconds": secs["cpu"], "cuda_seconds": secs["cuda"],
                     # features are L2-normalised: 1e-3 is far below the gaps between neighbours
                     "ok": bool(diff < 1e-3 and same_pairs / max(total, 1) > 0.95)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="coco128's images folder")
    p.add_argument("--proposals", required=True, help="selective-search cache (the study's ss500.jsonl)")
    p.add_argument("--images-checked", type=int, default=12)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "knn": knn_check(),
           **roi_checks(Path(args.images), Path(args.proposals), args.images_checked)}
    res["ok"] = all(v["ok"] for k, v in res.items() if isinstance(v, dict))
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
