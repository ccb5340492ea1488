#!/usr/bin/env python
"""Stage-2 benchmark: our miner against the paper-faithful reference path, side by side.

One run, one stage-1 checkpoint, one machine:
1. Our miner over the whole folder (default ../shared/data/coco128, 256 photos), once per
   proposer (``--proposals``: selective search fast at max side 320, 500 and full resolution,
   single-strategy selective search, Felzenszwalb segments) and once with roi_align: wall
   time and images/s of every stage-2 step, CNN forwards, pairs, and against the ground truth
   (labels are read only here, to score): the proposals' recall of labelled objects (IoU 0.5),
   the pair ranking AUC (orl.metrics.pair_ranking_auc) and pair precision. Every proposer is
   also run on the extra labelled sets (``--extra-sets``, default ../shared/data/coco-mini with
   its COCO json), for recall, time and pair quality on photos the checkpoint never saw.
2. The reference path, as the authors' code does it, on a subset of query images:
   full-resolution selective search, and for every query its own boxes plus each of its
   K neighbours' boxes re-cropped and re-encoded, one process. Our per-image cost on the
   same images is measured in the same process (downscaled selective search, each image's
   boxes encoded once). Both are repeated --repeats times, interleaved; medians reported.
Writes benchmarks/results/mining_<dataset>_<device>.json and a .md summary beside it.
``--threads N`` gives the cores (orl.device.plan_threads: torch, BLAS, decoding and
selective-search processes); ``--limit N`` mines only the first N images of each set (a quick
check of the script, not a result).

Usage: python benchmarks/mining_benchmark.py [--images DIR --labels DIR] [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orl.checkpoint import load_model  # noqa: E402
from orl.config import get_preset  # noqa: E402
from orl.correspondence import Correspondence  # noqa: E402
from orl.device import ThreadPlan, apply_threads, plan_threads, resolve_device  # noqa: E402
from orl.images import list_images, load_rgb  # noqa: E402
from orl.labels import GroundTruth, load_labels  # noqa: E402
from orl.metrics import box_recall, correspondence_precision, pair_ranking_auc  # noqa: E402
from orl.mining import embed_images, embed_rois, knn_search, load_roi_features, mine, select_pairs  # noqa: E402
from orl.proposals import proposal_params, propose_image  # noqa: E402
from orl.train import train  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "coco128"
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
PROPOSALS = "fast@320,fast@500,fast@full,single@500,felzenszwalb@500"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=str(SHARED / "images"))
    p.add_argument("--labels", default=str(SHARED / "labels"))
    p.add_argument("--checkpoint", help="stage-1 checkpoint; default: train one (--preset, --epochs)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--proposals", default=PROPOSALS,
                   help="proposers to compare, MODE@MAX_SIDE (mine.ss_mode @ mine.ss_max_side_px, 'full' for "
                        "full resolution), comma-separated")
    p.add_argument("--extra-sets", default=f"coco-mini={COCO_MINI}:{COCO_MINI / 'annotations'}",
                   help="more labelled sets for the proposers, NAME=IMAGES:LABELS, comma-separated ('' for none)")
    p.add_argument("--limit", type=int, help="only the first N images of each set (a check of the script)")
    p.add_argument("--ref-queries", type=int, default=6, help="query images for the reference path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="cores to use (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work"))
    p.add_argument("--out", help="results json (default benchmarks/results/mining_<dataset>_<device>.json)")
    return p.parse_args()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return f"cpu{torch.get_num_threads()}t"


def restrict(corr: Correspondence, keep: set[int]) -> Correspondence:
    """Same correspondence with pairs only for the query images in ``keep``."""
    pairs = [row if i in keep else [np.zeros((0, 8)) for _ in row] for i, row in enumerate(corr.pairs)]
    scores = [row if i in keep else [np.zeros(0) for _ in row] for i, row in enumerate(corr.pair_scores)]
    return dataclasses.replace(corr, pairs=pairs, pair_scores=scores)


def ss_params(mc, max_side):
    return proposal_params(dataclasses.replace(mc, ss_max_side_px=max_side))


def parse_proposers(spec: str) -> list[tuple[str, int | None]]:
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        mode, _, side = item.partition("@")
        out.append((mode, None if side in ("", "full") else int(side)))
    return out


def parse_sets(spec: str) -> list[tuple[str, Path, Path]]:
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, paths = item.partition("=")
        images, _, labels = paths.partition(":")
        out.append((name, Path(images), Path(labels)))
    return out


def mine_variant(model, images: Path, files: list[str], gt: GroundTruth, out: Path, mc, dev,
                 threads: ThreadPlan) -> dict:
    """One mining run from scratch, timed, scored against the labels."""
    if (out / "proposals.jsonl").exists():
        (out / "proposals.jsonl").unlink()  # time selective search afresh
    t0 = time.perf_counter()
    corr, stats = mine(model, images, files, out, mc, dev, threads=threads, save_features=True)
    wall = time.perf_counter() - t0
    feats = load_roi_features(out / "roi_features.npz")[1]
    n = len(files)
    prec = correspondence_precision(corr, gt)
    part = correspondence_precision(corr, gt, rule="ioa")
    auc = pair_ranking_auc(corr, feats, gt, rule="ioa")
    recall = box_recall(corr, gt, 0.5, mc.min_side_px)
    ss_times = [json.loads(line)["seconds"] for line in (out / "proposals.jsonl").read_text().splitlines()[1:]]
    return {
        "ss_mode": mc.ss_mode, "ss_max_side_px": mc.ss_max_side_px, "roi_mode": mc.roi_mode, "images": n,
        "wall_seconds": wall, "wall_seconds_per_image": wall / max(1, n),
        "images_per_s": {k: n / v if v > 0 else None for k, v in stats["seconds"].items()},
        "seconds": stats["seconds"], "cnn_forwards": stats["cnn_forwards"], "threads": stats["threads"],
        "pairs": stats["pairs"], "failed_images": stats["failed_images"],
        "precision": prec["precision"], "top1_precision": prec["top1_precision"],
        "random_precision": prec["random"]["precision"],
        "ioa_precision": part["precision"], "ioa_random_precision": part["random"]["precision"],
        "pair_auc": auc["auc"], "pair_auc_ci95": auc["ci95"], "pair_auc_area_matched": auc["auc_area_matched"],
        "pair_auc_image_pairs": auc["image_pairs"],
        "recall": recall["recall"], "recall_ci95": recall["ci95"], "reachable_recall": recall["reachable_recall"],
        "gt_objects": recall["objects"], "reachable_objects": recall["reachable_objects"],
        "ss_seconds_per_image_median": statistics.median(ss_times) if ss_times else None,
        "boxes_per_image_mean": float(np.mean([len(b) for b in corr.boxes])),
        "knn_share_same_class": prec["knn"],
        "knn_random_share": prec["knn_random"],
    }


def reference_query(model, mc, paths, q, nbrs, boxes_full, dev):
    """The authors' per-query work: encode the query's and every neighbour's boxes anew."""
    fwd = 0
    fq, n = embed_rois(model.backbone, load_rgb(paths[q]), boxes_full[q], mc, dev)
    fwd += n
    pairs = []
    for j in nbrs:
        fk, n = embed_rois(model.backbone, load_rgb(paths[j]), boxes_full[j], mc, dev)
        fwd += n
        ij, s = select_pairs(fq, fk, mc.pair_ratio, dev)
        pairs.append((np.concatenate([boxes_full[q][ij[:, 0]], boxes_full[j][ij[:, 1]]], 1) if len(ij)
                      else np.zeros((0, 8)), s))
    return fwd, pairs


def main():
    args = parse_args()
    torch.manual_seed(0)
    dev = resolve_device(args.device)
    threads = plan_threads(args.threads)
    apply_threads(threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = list_images(args.images)[: args.limit]
    gt = load_labels(args.images, args.labels)
    dname = device_name(dev)
    results = {"dataset": str(args.images), "images": len(files), "device": dname,
               "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
               "threads": threads.to_dict(), "command": " ".join(sys.argv), "limit": args.limit,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    # -- checkpoint -------------------------------------------------------------------
    ckpt = args.checkpoint
    if ckpt is None:
        run = work / f"stage1_{args.preset}_{args.epochs}ep"
        t0 = time.perf_counter()
        train("byol", args.images, run, get_preset(args.preset).override(**{"train.epochs": args.epochs}),
              files=files, device=str(dev), show_progress=False)
        results["stage1_train_seconds"] = time.perf_counter() - t0
        ckpt = run / "last.pt"
    model, cfg, ck = load_model(ckpt)
    model = model.to(dev).eval()
    results["checkpoint"] = {"path": str(ckpt), "preset": cfg.preset, "backbone": cfg.model.backbone,
                             "stage": ck["stage"], "epochs": ck["position"]["epoch"],
                             "images": ck.get("images"), "last_loss": ck.get("metrics", {}).get("loss")}
    base = dataclasses.replace(cfg.mine, ss_workers=None)  # this machine's cores, not the checkpoint's

    # -- 1. our miner over each whole folder, per proposer, and with roi_align -------------
    proposers = parse_proposers(args.proposals)
    default = (base.ss_mode, base.ss_max_side_px)
    if default not in proposers:  # the reference comparison needs the default run
        proposers.append(default)
    sets = [("main", Path(args.images), files, gt)]
    for name, images, labels in parse_sets(args.extra_sets):
        sets.append((name, images, list_images(images)[: args.limit], load_labels(images, labels)))
    runs: dict[str, dict] = {}
    for set_name, images, set_files, set_gt in sets:
        variants = [(m, side, "crop") for m, side in proposers]
        if set_name == "main":
            variants.append((*default, "roi_align"))
        for mode, side, roi_mode in variants:
            mc = dataclasses.replace(base, ss_mode=mode, ss_max_side_px=side, roi_mode=roi_mode)
            name = f"{set_name}/{mode}{side or 'full'}_{roi_mode}"
            r = mine_variant(model, images, set_files, set_gt, work / f"mine_{name.replace('/', '_')}", mc, dev,
                             threads)
            runs[name] = {"set": set_name, "images_root": str(images), **r}
            print(f"{name}: {r['wall_seconds']:.1f} s, {r['pairs']} pairs, recall {_f(r['recall'])}, "
                  f"pair AUC {_f(r['pair_auc'])}", flush=True)
    results["miner"] = runs

    # -- 2. reference path vs ours, per query image, same process -----------------------
    default_name = f"main_{default[0]}{default[1] or 'full'}_crop"
    ours = Correspondence.load(work / f"mine_{default_name}")
    paths = [str(Path(args.images) / f) for f in ours.files]
    emb, _ = embed_images(model, paths, base, dev)
    knn, _ = knn_search(emb, base.knn_k, dev)
    rng = np.random.default_rng(0)
    queries = sorted(rng.choice(len(paths), size=min(args.ref_queries, len(paths)), replace=False).tolist())
    involved = sorted(set(queries) | {int(j) for q in queries for j in knn[q]})
    ref_mc = dataclasses.replace(base, roi_mode="crop")
    per_rep = {"ref": [], "ours": []}
    ref_forwards = ours_forwards = 0
    ref_pairs = {}
    for rep in range(args.repeats):
        # reference: full-resolution selective search once per involved image (the authors
        # precompute it in a separate pass), then per-query re-encoding
        t0 = time.perf_counter()
        full = {i: propose_image(paths[i], ss_params(base, None)) for i in involved}
        ss_full_s = {i: r.seconds for i, r in full.items()}
        boxes_full = {i: (r.boxes if r.ok else np.zeros((0, 4))) for i, r in full.items()}
        enc_s, fwd_total = [], 0
        for q in queries:
            t1 = time.perf_counter()
            fwd, pairs = reference_query(model, ref_mc, paths, q, [int(j) for j in knn[q]], boxes_full, dev)
            enc_s.append(time.perf_counter() - t1)
            fwd_total += fwd
            ref_pairs[q] = pairs
        ref_per_query = statistics.mean(ss_full_s[q] for q in queries) + statistics.mean(enc_s)
        ref_forwards = fwd_total / len(queries)
        # ours: downscaled selective search, each image's boxes encoded once, embedding forward
        t0 = time.perf_counter()
        ours_s = []
        fwd_total = 0
        for q in queries:
            t1 = time.perf_counter()
            r = propose_image(paths[q], ss_params(base, base.ss_max_side_px))
            f, n = embed_rois(model.backbone, load_rgb(paths[q]), r.boxes, base, dev)
            ours_s.append(time.perf_counter() - t1)
            fwd_total += n + 1  # + the image-embedding forward
        ours_forwards = fwd_total / len(queries)
        per_rep["ref"].append(ref_per_query)
        per_rep["ours"].append(statistics.mean(ours_s))
        print(f"repeat {rep}: reference {ref_per_query:.2f} s/query, ours {statistics.mean(ours_s):.2f} s/image",
              flush=True)
    # precision of the reference pairs on those queries, and of ours on the same queries
    ref_corr = dataclasses.replace(
        ours,
        boxes=[boxes_full.get(i, np.zeros((0, 4))) for i in range(len(ours))],
        knn=knn,
        pairs=[[p for p, _ in ref_pairs[i]] if i in ref_pairs else [np.zeros((0, 8))] * knn.shape[1]
               for i in range(len(ours))],
        pair_scores=[[s for _, s in ref_pairs[i]] if i in ref_pairs else [np.zeros(0)] * knn.shape[1]
                     for i in range(len(ours))],
    )
    ref_prec = correspondence_precision(ref_corr, gt)
    our_prec = correspondence_precision(restrict(ours, set(queries)), gt)
    ref_part = correspondence_precision(ref_corr, gt, rule="ioa")
    our_part = correspondence_precision(restrict(ours, set(queries)), gt, rule="ioa")
    med_ref, med_ours = statistics.median(per_rep["ref"]), statistics.median(per_rep["ours"])
    results["reference_vs_ours"] = {
        "queries": [ours.files[q] for q in queries], "repeats": args.repeats,
        "reference_seconds_per_query": per_rep["ref"], "ours_seconds_per_image": per_rep["ours"],
        "median_reference_s": med_ref, "median_ours_s": med_ours, "speedup_median": med_ref / med_ours,
        "cnn_forwards_per_image": {"reference": ref_forwards, "ours": ours_forwards,
                                   "ratio": ref_forwards / max(1e-9, ours_forwards)},
        "precision_on_queries": {"reference": ref_prec["precision"], "ours": our_prec["precision"],
                                 "reference_random": ref_prec["random"]["precision"],
                                 "ours_random": our_prec["random"]["precision"],
                                 "reference_pairs": ref_prec["pairs"], "ours_pairs": our_prec["pairs"],
                                 "reference_ioa": ref_part["precision"], "ours_ioa": our_part["precision"],
                                 "reference_ioa_random": ref_part["random"]["precision"],
                                 "ours_ioa_random": our_part["random"]["precision"]},
        "note": "per-image costs in one process; ours additionally runs selective search in parallel "
                "worker processes in the full run (see miner.*.wall_seconds)",
    }
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    name = f"mining_{Path(args.images).parent.name}_{dname}.json"
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(summary_md(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _f(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def summary_md(r: dict) -> str:
    lines = [f"# Mining benchmark: {r['dataset']} ({r['images']} images), device {r['device']}", "",
             f"Checkpoint: stage {r['checkpoint']['stage']}, {r['checkpoint']['preset']} preset, "
             f"{r['checkpoint']['backbone']}, {r['checkpoint']['epochs']} epochs on "
             f"{r['checkpoint']['images']} images. "
             f"Generated by `benchmarks/mining_benchmark.py` on {r['finished']}: `{r.get('command', '')}`. "
             f"Cores: {r['threads']}." + (f" **Only the first {r['limit']} images of each set: a check of the "
                                          "script, not a result.**" if r.get("limit") else ""), "",
             "## Proposers: ground-truth recall, time and pair quality", "",
             "Recall: share of labelled objects framed by a mined box (after the box filter) at IoU >= 0.5; "
             "'reachable': objects at least the filter's min side on both sides (no proposer can keep a "
             "smaller box). Pair AUC: pair ranking AUC of RoI cosine similarity over all candidate box pairs "
             "of each KNN image pair, positive when both boxes lie on objects of one class (IoA >= 0.5; chance "
             "0.5), and its area-matched form. s/img: median selective-search seconds per image in a "
             "worker; wall/img: the whole `mine` run per image.", "",
             "| set | proposer | max side | s/img | wall/img | boxes/img | recall [95% CI] | reachable | "
             "pair AUC [95% CI] | area-matched AUC | IoA prec. | random |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in r["miner"].values():
        if v["roi_mode"] != "crop":
            continue
        ci, aci = v["recall_ci95"], v["pair_auc_ci95"]
        lines.append(f"| {v['set']} | {v['ss_mode']} | {v['ss_max_side_px'] or 'full'} | "
                     f"{_f(v['ss_seconds_per_image_median'], 2)} | {v['wall_seconds_per_image']:.2f} | "
                     f"{v['boxes_per_image_mean']:.1f} | {_f(v['recall'])} [{_f(ci[0])}, {_f(ci[1])}] | "
                     f"{_f(v['reachable_recall'])} | {_f(v['pair_auc'])} [{_f(aci[0])}, {_f(aci[1])}] | "
                     f"{_f(v['pair_auc_area_matched'])} | {_f(v['ioa_precision'])} | "
                     f"{_f(v['ioa_random_precision'])} |")
    lines += ["", "## Our miner over the whole folder", "",
              "Precision: both boxes match a ground-truth object of one class; IoU >= 0.5 (strict) or "
              "intersection over the box's own area >= 0.5 (IoA: object parts count). 'random' draws the "
              "same number of box pairs from the same neighbour images. KNN: share of neighbour images "
              "sharing a class with the query, against random images.", "",
              "| variant | wall s | SS s/img (median) | boxes/img | SS img/s | RoI img/s | RoI forwards | pairs | "
              "IoU prec. | random | IoA prec. | random | KNN same-class | random img |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["miner"].items():
        ips = v["images_per_s"]
        lines.append(f"| {name} | {v['wall_seconds']:.1f} | {_f(v['ss_seconds_per_image_median'], 2)} | "
                     f"{v['boxes_per_image_mean']:.1f} | {_f(ips.get('selective_search'), 2)} | "
                     f"{_f(ips.get('embed_rois'), 2)} | {v['cnn_forwards']['embed_rois']} | "
                     f"{v['pairs']} | {_f(v['precision'])} | {_f(v['random_precision'])} | "
                     f"{_f(v['ioa_precision'])} | {_f(v['ioa_random_precision'])} | "
                     f"{_f(v['knn_share_same_class']['share'])} | {_f(v['knn_random_share']['share'])} |")
    c = r["reference_vs_ours"]
    lines += ["", "## Reference path (authors' code) against ours, per query image", "",
              f"{len(c['queries'])} query images, {c['repeats']} interleaved repeats, medians.", "",
              "| | reference | ours | ratio |", "|---|---|---|---|",
              f"| seconds per image | {c['median_reference_s']:.2f} | {c['median_ours_s']:.2f} | "
              f"{c['speedup_median']:.1f}x |",
              f"| CNN forwards per image | {c['cnn_forwards_per_image']['reference']:.0f} | "
              f"{c['cnn_forwards_per_image']['ours']:.0f} | {c['cnn_forwards_per_image']['ratio']:.1f}x |",
              f"| pair precision on these queries | {_f(c['precision_on_queries']['reference'])} | "
              f"{_f(c['precision_on_queries']['ours'])} | |",
              f"| random-pair precision, same images | {_f(c['precision_on_queries']['reference_random'])} | "
              f"{_f(c['precision_on_queries']['ours_random'])} | |",
              f"| IoA pair precision on these queries | {_f(c['precision_on_queries']['reference_ioa'])} | "
              f"{_f(c['precision_on_queries']['ours_ioa'])} | |",
              f"| IoA random-pair precision | {_f(c['precision_on_queries']['reference_ioa_random'])} | "
              f"{_f(c['precision_on_queries']['ours_ioa_random'])} | |", "", c["note"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
