#!/usr/bin/env python
"""Training throughput: our stage-1 and stage-3 steps against the bare forward + backward.

One run, one machine. Per preset (default tiny and cpu) and stage (byol = stage 1, orl = stage 3):

* **full step**, per variant: samples/s of ``orl.train.train`` (data, augmentation, forward,
  backward, SGD, EMA update, losses, metrics.csv, epoch-end checkpoints), timed between its
  ``on_progress`` callbacks over ``--steps`` steps after ``--warmup`` steps (the store filling
  and the first epoch's worker start-up are before the first timed step; later epochs' are in).
  Variants: ``pil`` (the PIL pipeline, the preset's data-loader workers, rebuilt each epoch:
  the default path), ``pil-w0`` (no workers), ``pil-persistent`` (2 workers kept across
  epochs), ``tensor`` (the image store and batched augmentation on the device), and
  ``tensor-compile`` (the same with ``train.compile``; opt in: compiling takes minutes on 2 cores),
  ``tensor-bf16`` (the same with bf16 autocast, ``train.cpu_amp`` on the CPU; opt in: it pays only
  on CPUs with bf16 units, such as Intel AMX; its "of bare" is against the fp32 bare step).
* **bare**: the same networks' forward + backward of one batch of view tensors (online forward
  and backward, target forward, the losses), repeated: the limit a data path can approach.
* **lightly** (stage 1 only): the peer, lightly's BYOL building blocks (PyPI ``lightly``:
  ``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``,
  ``update_momentum``, and its ``BYOLTransform`` views in a DataLoader with the preset's
  workers) on the same torchvision backbone, head sizes, batch and view size, with its own
  training loop as its BYOL example writes it. A stage-1 sample is two views for both, so
  samples/s compare per view processed (views/s = 2 x samples/s). Benchmarks only: install it
  with ``pip install -r requirements-bench.txt``; without it the run says "peer not installed"
  and goes on.

Every variant runs once per repeat, interleaved (the order rotated each repeat); medians are
reported, with the load average (``os.getloadavg``) before and after each measurement. A run
whose load average went above half the cores is marked ``loaded``: its numbers are not results.
Stage 3 uses a synthetic correspondence (boxes and pairs on a grid of each photo): the step's
cost does not depend on where the boxes are. Mid-epoch checkpoints are off (epoch-end ones stay).

Writes benchmarks/results/train_throughput.{json,md} (``--out`` for another place).

  python benchmarks/train_throughput.py --repeats 5                      # a quiet machine
  python benchmarks/train_throughput.py --repeats 1 --steps 2 --presets tiny --out /tmp/tt.json
  python benchmarks/train_throughput.py --device cuda --presets paper --set augment.image_size=160 \\
      --set augment.patch_size=96 --set train.batch_size=256 --variants pil,tensor      # a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orl.batch_data import batch_seed, store_data  # noqa: E402
from orl.config import Config, apply_overrides, get_preset  # noqa: E402
from orl.correspondence import Correspondence  # noqa: E402
from orl.device import resolve_device, set_threads  # noqa: E402
from orl.images import image_size, list_images  # noqa: E402
from orl.train import _autocast, _networks, _to_device, train  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "coco128" / "images"
SAMPLE = REPO / "data" / "sample" / "images"
RESULTS = REPO / "benchmarks" / "results" / "train_throughput.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "pil": {"augment.backend": "pil"},
    "pil-w0": {"augment.backend": "pil", "train.num_workers": 0},
    "pil-persistent": {"augment.backend": "pil", "train.num_workers": 2, "train.persistent_workers": True},
    "tensor": {"augment.backend": "tensor"},
    "tensor-compile": {"augment.backend": "tensor", "train.compile": True},
    # bf16 autocast on either device (train.amp on CUDA is the default already).
    "tensor-bf16": {"augment.backend": "tensor", "train.cpu_amp": True, "train.amp": True},
}
PEER = "lightly"  # a variant too: its own step, not orl.train, so no config overrides of its own


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=str(SHARED if SHARED.exists() else SAMPLE))
    p.add_argument("--photos", type=int, default=256, help="photos used (the first N of the folder)")
    p.add_argument("--presets", default="tiny,cpu")
    p.add_argument("--stages", default="byol,orl")
    p.add_argument("--variants", default=f"pil,pil-w0,pil-persistent,tensor,{PEER}",
                   help=f"of {', '.join([*VARIANTS, PEER])}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config overrides for every run (e.g. train.batch_size=32)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch / BLAS threads (default: every core)")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS), help="results json; the .md is written beside it")
    return p.parse_args()


def synthetic_corr(root: Path, files: list[str], k: int = 2) -> Correspondence:
    """Four boxes on a 2 x 2 grid of each photo (at least 96 px a side where the photo allows),
    the next k photos as neighbours, and two pairs per neighbour."""
    sizes = np.array([image_size(root / f) for f in files], dtype=np.int64)
    boxes = []
    for w, h in sizes:
        bw, bh = max(w // 2, min(96, w)), max(h // 2, min(96, h))
        boxes.append(np.array([[x, y, min(w, x + bw), min(h, y + bh)] for x in (0, w - bw) for y in (0, h - bh)],
                              dtype=np.float64))
    n = len(files)
    knn = np.array([[(i + d) % n for d in range(1, k + 1)] for i in range(n)])
    pairs = [[np.concatenate([boxes[i][:2], boxes[j][1:3]], axis=1) for j in knn[i]] for i in range(n)]
    scores = [[np.ones(2) for _ in row] for row in pairs]
    return Correspondence(files, sizes, boxes, knn, np.ones((n, k)), pairs, scores)


def full_step(cfg: Config, stage: str, root: Path, files: list[str], corr: Correspondence | None, work: Path,
              store: Path, device: str, warmup: int, steps: int) -> dict[str, Any]:
    """samples/s of train() over ``steps`` steps after ``warmup`` ones."""
    marks: list[tuple[float, int]] = []

    def progress(m: dict[str, Any]) -> None:
        marks.append((time.perf_counter(), m["global_step"]))

    out = Path(tempfile.mkdtemp(dir=work))
    data = {"files": files} if stage == "byol" else {"corr": corr}
    s = train(stage, root, out, cfg, device=device, show_progress=False, on_progress=progress,
              max_steps=warmup + steps, image_store=store, **data)
    if s["global_step"] < warmup + steps or len(marks) < warmup + steps:
        raise RuntimeError(f"the run stopped after {s['global_step']} steps; give more photos or epochs")
    batch = s["batch_size"]
    t0, t1 = marks[warmup - 1][0] if warmup else marks[0][0], marks[-1][0]
    timed = steps if warmup else steps - 1
    return {"samples_per_s": timed * batch / (t1 - t0), "seconds": t1 - t0, "steps": timed, "batch_size": batch}


def bare_step(cfg: Config, stage: str, root: Path, files: list[str], corr: Correspondence | None, store: Path,
              device: str, steps: int) -> dict[str, Any]:
    """samples/s of forward + backward alone, on one batch of the same views, through the same networks."""
    dev = resolve_device(device)
    data = store_data(stage, root, cfg.augment, cfg.train, files=files if stage == "byol" else None,
                      corr=corr if stage == "orl" else None, store_root=store)
    data.prepare(dev)
    batch = min(cfg.train.batch_size, len(files))
    model, net, amp = _networks(cfg, stage, dev, 1, init_from=None)
    weights = {"global": cfg.train.w_global, "intra": cfg.train.w_intra, "inter": cfg.train.w_inter}
    views = _to_device(data.batch(list(range(batch)), batch_seed(0, 0, 0, 0)), dev, amp and dev.type == "cuda")
    net.train()

    def once() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(amp, dev):
            losses = net({b: v for b, v in views.items() if weights[b] > 0})
        sum(weights[b] * v for b, v in losses.items()).backward()  # type: ignore[union-attr]

    once()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(steps):
        once()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t
    return {"samples_per_s": steps * batch / secs, "seconds": secs, "steps": steps, "batch_size": batch}


def peer_installed() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


def peer_step(cfg: Config, root: Path, files: list[str], device: str, warmup: int, steps: int) -> dict[str, Any]:
    """samples/s of lightly's BYOL (stage 1) over ``steps`` steps after ``warmup`` ones: data
    (decode, lightly's transforms, DataLoader), forward of both views through the online and
    the momentum networks, the symmetric loss, backward, SGD, momentum update."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform

    from orl.images import load_rgb
    from orl.models.backbones import build_backbone

    dev = resolve_device(device)
    mc, ac, tc = cfg.model, cfg.augment, cfg.train
    backbone = build_backbone(mc.backbone)  # the torchvision ResNet ours trains, pooled output
    projector = BYOLProjectionHead(backbone.out_channels, mc.proj_hidden, mc.proj_out)
    online = torch.nn.Sequential(backbone, projector).to(dev)
    predictor = BYOLPredictionHead(mc.proj_out, mc.pred_hidden, mc.proj_out).to(dev)
    target = copy.deepcopy(online)
    deactivate_requires_grad(target)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=0.05, momentum=tc.momentum,
                                weight_decay=tc.weight_decay)
    amp = tc.amp if dev.type == "cuda" else tc.cpu_amp  # as ours
    transform = BYOLTransform(BYOLView1Transform(input_size=ac.image_size, min_scale=ac.min_scale),
                              BYOLView2Transform(input_size=ac.image_size, min_scale=ac.min_scale))
    paths = [root / f for f in files]

    class Photos(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> list[torch.Tensor]:
            return cast(list[torch.Tensor], transform(load_rgb(paths[i])))  # tensors: its views end in ToTensor

    batch = min(tc.batch_size, len(paths))
    loader = torch.utils.data.DataLoader(Photos(), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=tc.num_workers, pin_memory=dev.type == "cuda")
    marks: list[float] = []
    online.train()
    target.train()
    while len(marks) < warmup + steps:
        for x0, x1 in loader:
            x0, x1 = x0.to(dev, non_blocking=True), x1.to(dev, non_blocking=True)
            update_momentum(online, target, m=tc.ema_base)
            with _autocast(amp, dev):
                p0, p1 = predictor(online(x0)), predictor(online(x1))
                with torch.no_grad():
                    z0, z1 = target(x0), target(x1)
                loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the step is done when its loss is known (ours logs it every step too)
            marks.append(time.perf_counter())
            if len(marks) >= warmup + steps:
                break
    t0 = marks[warmup - 1] if warmup else marks[0]
    timed = steps if warmup else steps - 1
    secs = marks[-1] - t0
    return {"samples_per_s": timed * batch / secs, "seconds": secs, "steps": timed, "batch_size": batch}


def overrides_of(args: argparse.Namespace) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in args.set)


def machine(dev: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(dev),
            "nice": os.nice(0)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = ["# Training throughput", "",
             f"`{res['command']}`", "",
             f"{m.get('gpu') or m['processor'] or m['platform']}; {m['cpu_count']} cores, torch {m['torch']} with "
             f"{m['torch_threads']} threads, device {m['device']}; {res['photos']} photos; medians of "
             f"{res['repeats']} interleaved repeats of {res['steps']} steps; load average "
             f"{res['load']['min']:.1f} to {res['load']['max']:.1f}.", ""]
    if res["loaded"]:
        lines += ["**LOADED MACHINE: the load average went above half the cores during this run, so these numbers "
                  "say nothing about the code; run again on a quiet machine.**", ""]
    peer = res.get("peer") or {}
    if not peer.get("installed"):
        lines += [f"Peer ({peer.get('name', PEER)}): not installed in this run.", ""]
    else:
        lines += [f"Peer: {peer['name']} {peer.get('version')}, stage 1 only (its BYOL building blocks, its own "
                  "loop and transforms; same backbone, batch and view size).", ""]
    lines += ["| preset | stage | variant | samples/s | views/s | of bare | of pil |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in res["results"]:
        of_pil = "" if r["of_pil"] is None else f"{r['of_pil']:.2f}x"
        views = "" if r.get("views_per_s") is None else f"{r['views_per_s']:.2f}"
        lines.append(f"| {r['preset']} | {r['stage']} | {r['variant']} | {r['median']:.2f} | {views} | "
                     f"{100 * r['of_bare']:.0f}% | {of_pil} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.threads:
        set_threads(args.threads)
    dev = resolve_device(args.device)
    root = Path(args.images)
    files = list_images(root)[: args.photos]
    # Whole batches only: a partial last batch would count as a full one in samples/s.
    for preset in args.presets.split(","):
        b = min(apply_overrides(get_preset(preset), overrides_of(args)).train.batch_size, len(files))
        if len(files) % b:
            sys.exit(f"{len(files)} photos is not a multiple of {preset}'s batch size {b}: set --photos")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {*VARIANTS, PEER}
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; valid: {', '.join([*VARIANTS, PEER])}")
    peer = PEER in variants and peer_installed()
    if PEER in variants and not peer:
        print(f"peer not installed: {PEER} (pip install -r requirements-bench.txt); going on without it", flush=True)
    variants = [v for v in variants if v != PEER or peer]
    overrides = overrides_of(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="train_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "image_store"
    corr = synthetic_corr(root, files)
    loads: list[float] = []
    samples: dict[tuple[str, str, str], list[float]] = {}
    runs: list[dict[str, Any]] = []
    jobs = [(p, s, v) for p in args.presets.split(",") for s in args.stages.split(",") for v in variants + ["bare"]
            if v != PEER or s == "byol"]  # the peer has no stage 3
    for rep in range(args.repeats):
        shift = rep % len(jobs)
        for preset, stage, variant in jobs[shift:] + jobs[:shift]:
            base = apply_overrides(get_preset(preset), {"train.epochs": 1000, "train.checkpoint_every_steps": 0,
                                                        **overrides})
            cfg = apply_overrides(base, VARIANTS.get(variant, {}))
            before = os.getloadavg()[0]
            if variant == "bare":
                r = bare_step(cfg, stage, root, files, corr, store, str(dev), args.steps)
            elif variant == PEER:
                r = peer_step(cfg, root, files, str(dev), args.warmup, args.steps)
            else:
                r = full_step(cfg, stage, root, files, corr, work, store, str(dev), args.warmup, args.steps)
            after = os.getloadavg()[0]
            loads += [before, after]
            r.update(preset=preset, stage=stage, variant=variant, repeat=rep, load_before=before, load_after=after)
            runs.append(r)
            samples.setdefault((preset, stage, variant), []).append(r["samples_per_s"])
            print(f"[{rep}] {preset} {stage} {variant}: {r['samples_per_s']:.2f} samples/s (load {before:.1f} -> "
                  f"{after:.1f})", flush=True)
    results = []
    for (preset, stage, variant), vals in samples.items():
        med = statistics.median(vals)
        bare = statistics.median(samples[(preset, stage, "bare")])
        pil = samples.get((preset, stage, "pil"))
        results.append({"preset": preset, "stage": stage, "variant": variant, "median": med, "runs": vals,
                        "of_bare": med / bare, "of_pil": None if pil is None or variant in ("pil", "bare")
                        else med / statistics.median(pil),
                        # Stage 1: two global views per sample, ours and the peer's alike.
                        "views_per_s": 2 * med if stage == "byol" else None})
    res = {"command": "python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
           "machine": machine(dev), "photos": len(files), "images": str(root), "repeats": args.repeats,
           "steps": args.steps, "warmup": args.warmup, "overrides": overrides,
           "load": {"min": min(loads), "max": max(loads)},
           "peer": {"name": PEER, "installed": peer_installed(), "version": _version(PEER)},
           "loaded": max(loads) > 0.5 * (os.cpu_count() or 1), "results": results, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
