#!/usr/bin/env python
"""Mining at scale: per-image time and peak memory of stage 2 at 256, 1,000 and 10,000 images, on CPU,
through the whole ``orl mine`` CLI and through the services (Celery miner workers writing to Postgres).

The question is whether the cost per image stays flat as the work grows: no step quadratic in the
number of images, no RoI feature matrix held in RAM (``orl mine`` streams the features to disk shards,
orl/roi_features.py; the services keep them per image on the artifacts volume, services/miner/roi_cache.py).

1. **The image sets.** Our photos (../shared/data/coco128/images and ../shared/data/coco-mini, 490 COCO
   photographs) are not enough, so every set is made of distinct variants of them, built once and cached
   under ``benchmarks/work/mining_scale/pool/`` (git-ignored). Variant k (k = 0, 1, ...):
   - source photo: ``perm[k % 490]``, ``perm`` a permutation of the photos (sorted by their path under
     ../shared/data) drawn with ``numpy.random.default_rng(seed)``; so the first 490 variants use each
     photo once, in a shuffled order, and a set of N images has N / 490 variants of each photo (+- 1);
   - parameters from ``numpy.random.default_rng([seed, k, attempt])``: the photo upright (EXIF orientation
     applied), a crop of a uniform 80-100% of its width and, independently, of its height at a uniform
     position; a left-right flip with probability 1/2; every pixel multiplied by a brightness factor
     uniform in [0.9, 1.1] and a per-channel (R, G, B) gain uniform in [0.95, 1.05], rounded and clipped
     to 0-255; saved as a baseline JPEG (Pillow, 4:2:0) at a quality drawn uniformly from 80-95;
   - every variant's file SHA-1 and the SHA-1 of its decoded pixels are checked against all others; on
     a clash (never seen) the variant is drawn again with ``attempt + 1``. The pool's manifest.json lists
     each variant's source, parameters and both digests.
   Set N (``--sizes``) is the folder ``benchmarks/work/mining_scale/sets/nN`` of hard links to variants
   0 .. N-1 (hard links, not symlinks: the library and the services refuse links that leave the dataset
   folder). The stage-1 checkpoint, unless ``--checkpoint`` gives one, is trained once (cached) on
   variants 0 .. ``--train-images`` - 1 (``sets/train<T>``) with ``--preset`` (tiny) for ``--epochs``.
2. **The CLI path.** For each N, in a fresh subprocess: ``python -m orl mine --images sets/nN
   --checkpoint CKPT --out work/mining_scale/cli/nN --quiet --set ...``, from an empty output folder
   (no proposal cache). Measured: wall time, each stage's seconds as the CLI reports them, peak memory
   of the whole process tree (the summed RSS, and the summed PSS, which counts pages the selective-search
   worker processes share with each other once, of the CLI process and all its descendants, sampled
   from /proc every ``--interval`` s; the descendants are looked up anew every 5th sample), the main
   process's VmHWM (its own peak RSS, from
   /proc/PID/status), the largest peak RSS of any process of the tree (``wait4``'s ru_maxrss), and the
   peak disk size of the RoI feature shards (``OUT/roi_store``, deleted by ``orl mine`` when done).
3. **The service path** (``--paths cli,service``). The stack of ``make up`` (scripts/stack.py: embedded
   PostgreSQL, Redis, the API, the cpu and gpu miner workers, the trainer; no dashboard) in its own state
   folder (``--state``, default ``.state/mining-scale``), **emptied first** (``stack.py clean``), so that
   no proposal, embedding or RoI feature is reused from an earlier run. ORL_DATA_ROOTS gets the sets
   folder. The training set is registered and a ``pretrain`` job (same preset, epochs and images as the
   CLI's checkpoint) makes the checkpoint the mining jobs use. Then for each N: the two miner workers
   are restarted (fresh processes, so their peaks belong to this N), ``sets/nN`` is registered (timed
   apart), and a ``mine`` job with the same ``--set`` settings is submitted through the REST API and
   followed to ``succeeded`` (its phases propose -> embed -> pairs timed by polling every second, the
   total also by the job's own started_at / finished_at). Meanwhile the RSS and PSS of each service's
   process tree are sampled (the miner workers, and the API and PostgreSQL for context), and afterwards
   the size of the job's RoI feature cache on the artifacts volume. Then the stack is stopped.
4. **Settings.** The mining settings are ``--set SECTION.FIELD=VALUE`` overrides, the same for both
   paths, on top of the checkpoint's preset. 10,000 images at the default 500-px selective search would
   take hours on 2 cores. The flatness question is answered by any per-image configuration, and a cheap
   one answers it in minutes: the default ``--set`` is ``mine.ss_mode=felzenszwalb
   mine.ss_max_side_px=200 mine.roi_mode=roi_align`` on the tiny preset. Its absolute per-image figures
   say nothing about the default settings; the ratios to the smallest N say whether the cost is flat.
5. ``benchmarks/results/mining_scale.json`` and ``.md`` (``--out``): per N and path, the wall time and
   seconds per image (overall, per stage, and excluding the fixed start-up), peak memory, shard / cache
   bytes, the ratios to the smallest N, the settings, the variant recipe, the command, the machine, the
   load average before and after, the niceness and the other processes that used the CPU meanwhile. A
   run below the full sizes, at a niceness above 0, on a loaded machine or beside other busy processes
   is marked as not clean.

Usage (full scale, on an otherwise idle machine; hours)::

    python benchmarks/mining_scale.py --paths cli,service

    nice -n 15 python benchmarks/mining_scale.py --sizes 32,64 --paths cli,service \\
        --out /tmp/mining_scale_check                      # a check of the script, minutes
    python benchmarks/mining_scale.py --sizes 256,1000 --set mine.ss_mode=fast   # other settings
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SOURCES = (SHARED / "coco128" / "images", SHARED / "coco-mini")
WORK = REPO / "benchmarks" / "work" / "mining_scale"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_SIZES = (256, 1000, 10000)
FAST_SETTINGS = ("mine.ss_mode=felzenszwalb", "mine.ss_max_side_px=200", "mine.roi_mode=roi_align")
VARIANT_VERSION = 1  # bump when the recipe changes: a cached pool of another version is rebuilt
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The stack's services this benchmark needs (the dashboard only costs CPU here).
STACK_SERVICES = "api,miner-cpu,miner-gpu,trainer"
MINERS = ("miner-cpu", "miner-gpu")
TERMINAL = ("succeeded", "failed", "cancelled")


# -- the image variants ---------------------------------------------------------------------------------
def source_photos(roots: Iterable[Path] = SOURCES) -> list[tuple[str, Path]]:
    """(name, path) of every photo under the roots, sorted by name: the path under ../shared/data
    (or under the root's parent, for roots elsewhere), so the order does not depend on where the
    data lies."""
    out = []
    for root in roots:
        base = SHARED if root.resolve().is_relative_to(SHARED.resolve()) else root.parent
        for p in root.rglob("*"):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                out.append((p.resolve().relative_to(base.resolve()).as_posix(), p))
    return sorted(out)


def variant_params(k: int, n_sources: int, seed: int, attempt: int = 0) -> dict[str, Any]:
    """The recipe of variant ``k`` (see the module docstring), as plain numbers; the crop is in
    fractions of the source's upright frame."""
    source = int(np.random.default_rng(seed).permutation(n_sources)[k % n_sources])
    rng = np.random.default_rng([seed, k, attempt])
    fw, fh = rng.uniform(0.8, 1.0, 2)
    return {"source": source, "attempt": attempt, "crop_w": float(fw), "crop_h": float(fh),
            "crop_x": float(rng.uniform()), "crop_y": float(rng.uniform()), "flip": bool(rng.uniform() < 0.5),
            "brightness": float(rng.uniform(0.9, 1.1)), "gains": [float(g) for g in rng.uniform(0.95, 1.05, 3)],
            "quality": int(rng.integers(80, 96))}


def render_variant(src: Path, p: dict[str, Any]) -> bytes:
    """The JPEG bytes of one variant of ``src``."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    w, h = img.size
    cw, ch = max(1, round(w * p["crop_w"])), max(1, round(h * p["crop_h"]))
    x0, y0 = round((w - cw) * p["crop_x"]), round((h - ch) * p["crop_y"])
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if p["flip"]:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) * (p["brightness"] * np.asarray(p["gains"], dtype=np.float32))
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).save(out, "JPEG", quality=p["quality"])
    return out.getvalue()


def pixel_digest(jpeg: bytes) -> str:
    """SHA-1 of the decoded pixels (and their shape): two files may differ while showing the same image."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        arr = np.asarray(im.convert("RGB"))
    return hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()


def _make_variants(job: tuple[str, list[tuple[int, dict[str, Any]]], str]) -> list[dict[str, Any]]:
    """Worker: the variants of one source photo, written to the pool folder."""
    src, todo, pool = job
    out = []
    for k, p in todo:
        data = render_variant(Path(src), p)
        name = f"{k:05d}_{Path(src).stem}.jpg"
        tmp = Path(pool) / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(Path(pool) / name)
        out.append({"k": k, "file": name, "params": p, "bytes": len(data),
                    "sha1": hashlib.sha1(data).hexdigest(), "pixels_sha1": pixel_digest(data)})
    return out


def build_pool(pool: Path, n: int, seed: int, sources: list[tuple[str, Path]], workers: int) -> list[dict[str, Any]]:
    """Variants 0 .. n-1 in ``pool`` (made once; a larger n adds to the cached ones), each with a
    distinct file and distinct pixels. Returns the manifest's variant records, in order."""
    pool.mkdir(parents=True, exist_ok=True)
    manifest_path = pool / "manifest.json"
    recipe = {"version": VARIANT_VERSION, "seed": seed, "sources": [name for name, _ in sources]}
    manifest: dict[str, Any] = {**recipe, "variants": []}
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if {k: old.get(k) for k in recipe} == recipe:
            manifest = old
        else:
            print(f"the pool in {pool} was made with another recipe: making it anew", flush=True)
            shutil.rmtree(pool)
            pool.mkdir(parents=True)
    have = [v for v in manifest["variants"] if (pool / v["file"]).is_file()]
    manifest["variants"] = have
    files, pixels = {v["sha1"] for v in have}, {v["pixels_sha1"] for v in have}
    next_k = len(have)
    while next_k < n:
        todo = {k: variant_params(k, len(sources), seed) for k in range(next_k, n)}
        made: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        while todo:
            by_source: dict[int, list[tuple[int, dict[str, Any]]]] = {}
            for k, p in todo.items():
                by_source.setdefault(p["source"], []).append((k, p))
            jobs = [(str(sources[s][1]), ks, str(pool)) for s, ks in by_source.items()]
            with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
                batch = [r for rs in ex.map(_make_variants, jobs) for r in rs]
            todo = {}
            for r in sorted(batch, key=lambda r: r["k"]):
                if r["sha1"] in files or r["pixels_sha1"] in pixels:  # a clash: draw this one again
                    p = r["params"]
                    todo[r["k"]] = variant_params(r["k"], len(sources), seed, p["attempt"] + 1)
                    continue
                files.add(r["sha1"])
                pixels.add(r["pixels_sha1"])
                r["source_name"] = sources[r["params"]["source"]][0]
                made.append(r)
        manifest["variants"] = sorted(have + made, key=lambda r: r["k"])
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest))
        tmp.replace(manifest_path)
        print(f"pool: made variants {next_k}..{n - 1} in {time.perf_counter() - t0:.0f} s", flush=True)
        next_k = n
    return manifest["variants"][:n]


def link_set(pool: Path, variants: list[dict[str, Any]], folder: Path) -> Path:
    """``folder`` holding exactly hard links to ``variants`` (rebuilt unless it already does)."""
    want = {v["file"] for v in variants}
    if folder.is_dir():
        names = {p.name for p in folder.iterdir()}
        if names == want and all((folder / f).stat().st_ino == (pool / f).stat().st_ino for f in want):
            return folder
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(want):
        os.link(pool / f, tmp / f)
    tmp.rename(folder)
    return folder


# -- sampling /proc --------------------------------------------------------------------------------------
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def scan_proc() -> dict[int, tuple[int, int, int, int]]:
    """{pid: (parent pid, process group, RSS bytes, CPU ticks)} of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after the command: state, ppid, pgrp, session, ..., utime (11), stime (12), ..., rss (21, pages)
        out[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[21]) * PAGE_BYTES,
                                int(fields[11]) + int(fields[12]))
    return out


def tree(procs: dict[int, tuple[int, int, int, int]], roots: Iterable[int]) -> set[int]:
    """The roots, their descendants, and the members of the roots' process groups (a service's
    leader may be gone while its pool processes live on)."""
    roots = set(roots)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out = {p for p in roots if p in procs} | {pid for pid, v in procs.items() if v[1] in roots}
    stack = list(out)
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def _rss_bytes(pid: int) -> int | None:
    """Resident bytes of a process (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (0 when it does not exist)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.stat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


class MemorySampler:
    """Samples, every ``interval`` s in a thread, the summed RSS and PSS of named process trees and
    the size of named folders; keeps the peaks, the main processes' VmHWM and a coarse timeline.

    ``roots()`` answers {group name: root pids} at each sample (services are restarted, pids change).
    """

    def __init__(self, roots: Callable[[], dict[str, list[int]]], interval: float = 0.2,
                 folders: dict[str, Path] | None = None, pss: bool = True, rescan_every: int = 5):
        self.roots, self.interval, self.folders, self.pss = roots, interval, folders or {}, pss
        # Finding a tree's members reads every process's stat file (this kernel has no
        # /proc/PID/task/TID/children): tens of ms on a busy machine, so it is done every
        # ``rescan_every`` samples, and in between only the known members are read.
        self.rescan_every = rescan_every
        self._members: dict[str, set[int]] = {}
        self._last_roots: dict[str, list[int]] = {}
        self.peak: dict[str, dict[str, int]] = {}
        self.hwm_kib: dict[str, int] = {}
        self.folder_peak = {name: 0 for name in self.folders}
        self.samples = 0
        self.timeline: list[dict[str, Any]] = []
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0
        self.cpu_s = 0.0

    def __enter__(self) -> MemorySampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        point: dict[str, Any] = {"t": round(time.monotonic() - self._t0, 1)}
        groups = self.roots()
        if groups != self._last_roots or self.samples % self.rescan_every == 0:
            procs = scan_proc()
            self._members = {name: tree(procs, roots) for name, roots in groups.items()}
            self._last_roots = groups
        for name, roots in groups.items():
            sizes = {p: _rss_bytes(p) for p in self._members.get(name, set())}
            members = {p for p, b in sizes.items() if b is not None}
            self.seen |= members
            rss = sum(b for b in sizes.values() if b is not None)
            pss = sum(_pss_bytes(p) for p in members) if self.pss else 0
            peak = self.peak.setdefault(name, {"rss_bytes": 0, "pss_bytes": 0, "processes": 0})
            peak["rss_bytes"] = max(peak["rss_bytes"], rss)
            peak["pss_bytes"] = max(peak["pss_bytes"], pss)
            peak["processes"] = max(peak["processes"], len(members))
            for r in roots:  # VmHWM only grows: the last value read is the process's peak so far
                hwm = _status_kib(r, "VmHWM")
                if hwm is not None:
                    self.hwm_kib[name] = max(self.hwm_kib.get(name, 0), hwm)
            point[name] = round(rss / 2**20, 1)
        for name, folder in self.folders.items():
            size = folder_bytes(folder)
            self.folder_peak[name] = max(self.folder_peak[name], size)
            point[name] = round(size / 2**20, 1)
        self.samples += 1
        self.timeline.append(point)
        if len(self.timeline) > 400:  # keep it coarse: every other point, the latest always kept
            self.timeline = self.timeline[::2] + ([point] if self.timeline[-1] is not point else [])

    def _run(self) -> None:
        t_cpu = time.thread_time()
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                break
        self.sample()  # one more after the stop request: the end state
        self.cpu_s = time.thread_time() - t_cpu

    def summary(self) -> dict[str, Any]:
        return {"peak": self.peak, "vm_hwm_bytes": {k: v * 1024 for k, v in self.hwm_kib.items()},
                "folder_peak_bytes": self.folder_peak, "samples": self.samples, "interval_s": self.interval,
                "sampler_cpu_s": round(self.cpu_s, 2), "timeline_mib": self.timeline}


# -- the CLI path ----------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ORL_IMAGE_STORE", str(WORK / "image_store"))  # never the user's ~/.cache
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_checkpoint(images: Path, preset: str, epochs: int, out: Path, threads: int | None) -> Path:
    """A stage-1 checkpoint trained once on ``images`` (reused when ``out`` holds a finished run)."""
    if (out / "backbone.pth").exists() and (out / "last.pt").exists():
        return out / "last.pt"
    cmd = [sys.executable, "-m", "orl", "pretrain", "--images", str(images), "--out", str(out), "--preset", preset,
           "--epochs", str(epochs), "--quiet", *(["--threads", str(threads)] if threads else [])]
    print("training the stage-1 checkpoint:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=_env(), check=True, stdout=subprocess.DEVNULL)
    return out / "last.pt"


def proposal_counts(cache: Path) -> dict[str, int]:
    """Images, boxes kept and failed images in an ``orl mine`` proposals.jsonl."""
    boxes = images = failed = 0
    if cache.exists():
        for line in cache.read_text().splitlines()[1:]:
            rec = json.loads(line)
            images += 1
            boxes += len(rec.get("boxes") or [])
            failed += 0 if rec.get("ok") else 1
    return {"images": images, "boxes": boxes, "images_without_boxes": failed}


def run_cli(n: int, folder: Path, checkpoint: Path, settings: list[str], threads: int | None, interval: float,
            pss: bool) -> dict[str, Any]:
    """One ``orl mine`` over ``folder`` in a fresh process, measured."""
    out = WORK / "cli" / f"n{n}"
    logs = WORK / "cli" / "logs"
    shutil.rmtree(out, ignore_errors=True)  # no proposal cache from an earlier run
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "orl", "mine", "--images", str(folder), "--checkpoint", str(checkpoint),
           "--out", str(out), "--quiet", *[a for s in settings for a in ("--set", s)],
           *(["--threads", str(threads)] if threads else [])]
    print(f"cli n={n}: {' '.join(cmd)}", flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    with open(logs / f"n{n}.out", "wb") as so, open(logs / f"n{n}.err", "wb") as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=so, stderr=se)
        with MemorySampler(lambda: {"cli": [proc.pid]}, interval, {"roi_store": out / "roi_store"}, pss) as sampler:
            # wait4, not Popen.wait: its rusage has the largest peak RSS of the process and its children
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"orl mine (n={n}) failed with exit code {proc.returncode}:\n"
                         + (logs / f"n{n}.err").read_text(errors="replace")[-3000:])
    result = json.loads((logs / f"n{n}.out").read_text())
    stats = json.loads((out / "mine_stats.json").read_text())
    mem = sampler.summary()
    stages = result["seconds"]
    return {"images": result["images"], "wall_s": round(wall, 2), "stages_s": stages,
            "startup_s": round(wall - sum(stages.values()), 2), "pairs": result["pairs"],
            "failed_images": result["failed_images"], "images_without_boxes": result["images_without_boxes"],
            "proposals": proposal_counts(out / "proposals.jsonl"), "threads": stats["threads"],
            "cnn_forwards": stats["cnn_forwards"], "mine_config": stats["params"],
            "peak_tree_rss_bytes": mem["peak"]["cli"]["rss_bytes"],
            "peak_tree_pss_bytes": mem["peak"]["cli"]["pss_bytes"],
            "peak_tree_processes": mem["peak"]["cli"]["processes"],
            "main_vm_hwm_bytes": mem["vm_hwm_bytes"].get("cli"), "max_process_rss_bytes": usage.ru_maxrss * 1024,
            "roi_store_peak_bytes": mem["folder_peak_bytes"]["roi_store"], "load_average_at_start": load,
            "sampler": {k: mem[k] for k in ("samples", "interval_s", "sampler_cpu_s", "timeline_mib")},
            "command": " ".join(cmd)}


# -- the service path ------------------------------------------------------------------------------------
def _iso_s(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return round((datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds(), 2)


class Stack:
    """The stack of scripts/stack.py in its own state folder, driven as page_benchmark.py does."""

    def __init__(self, state: Path, sets_root: Path, threads: int | None):
        sys.path.insert(0, str(REPO / "scripts"))
        # scripts/ is not a package: mypy, run on this file alone, does not see these modules
        import demo_stack  # type: ignore[import-not-found]  # scripts/demo_stack.py
        import stack  # type: ignore[import-not-found]  # scripts/stack.py

        self.stack, self.demo_stack, self.state_dir = stack, demo_stack, state
        roots = [str(sets_root), *filter(None, os.environ.get("ORL_DATA_ROOTS", str(REPO / "data")).split(":"))]
        os.environ["ORL_DATA_ROOTS"] = ":".join(roots)  # the services may read the sets
        os.environ.setdefault("ORL_IMAGE_STORE", str(WORK / "image_store"))
        if threads:
            os.environ["ORL_WORKER_CORES"] = str(threads)
        self.api: Any = None
        self.st: Any = None

    def clean_up(self) -> None:
        if self.stack.main(["clean", "--state", str(self.state_dir)]) != 0:
            raise SystemExit(f"could not empty the stack state {self.state_dir}")
        self.up()

    def up(self) -> None:
        if self.stack.main(["up", "--state", str(self.state_dir), "--services", STACK_SERVICES]) != 0:
            raise SystemExit(f"the stack did not start; logs in {self.state_dir / 'logs'}")
        self.st = self.stack.State(self.state_dir.resolve()).load()
        self.api = self.demo_stack.Api(self.st.config["urls"]["api"], self.st.token())

    def restart_miners(self) -> None:
        for name in MINERS:
            self.stack.stop_process(self.st, name)
        self.up()

    def down(self) -> None:
        self.stack.main(["down", "--state", str(self.state_dir)])

    def pids(self) -> dict[str, list[int]]:
        out = {}
        for name in (*MINERS, "api"):
            info = self.stack.read_pidfile(self.st, name) or {}
            out[name] = [int(info["pid"])] if "pid" in info else []
        pm = self.stack._postmaster_pid(self.st)
        out["postgres"] = [pm] if pm else []
        return out

    def register(self, name: str, folder: Path, timeout_s: float) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        ds = self.demo_stack.wait_registered(
            self.api, self.api.call("POST", "/api/v1/datasets", {"name": name, "path": str(folder)}), timeout_s)
        return ds, time.perf_counter() - t0

    def follow(self, job_id: int, timeout_s: float) -> tuple[dict[str, Any], dict[str, float]]:
        """Poll a job every second until it ends: (the finished job, seconds since submission at which
        each phase (mine: result.phase) or status was first seen)."""
        t0 = time.perf_counter()
        seen: dict[str, float] = {}
        while True:
            job = self.api.call("GET", f"/api/v1/jobs/{job_id}")
            now = round(time.perf_counter() - t0, 1)
            seen.setdefault(f"status:{job['status']}", now)
            phase = (job.get("result") or {}).get("phase")
            if phase:
                seen.setdefault(f"phase:{phase}", now)
            if job["status"] in TERMINAL:
                return job, seen
            if now > timeout_s:
                raise SystemExit(f"job {job_id} did not finish in {timeout_s:.0f} s (still {job['status']})")
            time.sleep(1.0)


def _mine_params(checkpoint_id: int, settings: list[str]) -> dict[str, Any]:
    over = {}
    for s in settings:
        key, _, value = s.partition("=")
        over[key.strip()] = value  # strings, as the CLI's --set gives them: the same parsing
    return {"checkpoint_id": checkpoint_id, "set": over}


def run_service(sizes: list[int], sets: dict[int, Path], train_set: Path, args: argparse.Namespace,
                settings: list[str]) -> dict[str, Any]:
    stk = Stack(Path(args.state), WORK / "sets", args.threads)
    out: dict[str, Any] = {"state": str(Path(args.state).resolve()), "runs": {}}
    try:
        t0 = time.perf_counter()
        stk.clean_up()
        out["stack_start_s"] = round(time.perf_counter() - t0, 1)
        ds, reg_s = stk.register(f"scale-train{args.train_images}", train_set, args.timeout)
        job = stk.api.call("POST", "/api/v1/jobs", {"kind": "pretrain", "dataset_id": ds["id"], "params": {
            "preset": args.preset, "epochs": args.epochs}})
        job, _ = stk.follow(job["id"], args.timeout)
        if job["status"] != "succeeded":
            raise SystemExit(f"the pretrain job {job['id']} {job['status']}: {job.get('error')}")
        ckpt = job["result"]["checkpoint_id"]
        out["checkpoint"] = {"checkpoint_id": ckpt, "pretrain_job": job["id"], "dataset_id": ds["id"],
                             "preset": args.preset, "epochs": args.epochs, "images": args.train_images,
                             "seconds": _iso_s(job.get("started_at"), job.get("finished_at"))}
        for n in sizes:
            stk.restart_miners()
            ds, reg_s = stk.register(f"scale-n{n}", sets[n], args.timeout)
            counts = ds.get("counts") or {}
            print(f"service n={n}: dataset {ds['id']} registered in {reg_s:.1f} s ({counts})", flush=True)
            load = [round(v, 2) for v in os.getloadavg()]
            with MemorySampler(stk.pids, args.interval, pss=not args.no_pss) as sampler:
                t0 = time.perf_counter()
                job = stk.api.call("POST", "/api/v1/jobs", {"kind": "mine", "dataset_id": ds["id"],
                                                            "params": _mine_params(ckpt, settings)})
                job, seen = stk.follow(job["id"], args.timeout)
                wall = time.perf_counter() - t0
            if job["status"] != "succeeded":
                raise SystemExit(f"mine job {job['id']} (n={n}) {job['status']}: {job.get('error')}")
            mem = sampler.summary()
            result = job.get("result") or {}
            phases = [k for k in ("phase:propose", "phase:embed", "phase:pairs", "status:succeeded") if k in seen]
            phase_s = {a.split(":")[1]: round(seen[b] - seen[a], 1) for a, b in zip(phases, phases[1:], strict=False)}
            cache = Path(stk.st.path("artifacts")) / "roi_cache" / f"ckpt-{ckpt}"
            miners = [mem["peak"].get(m, {}) for m in MINERS]
            out["runs"][str(n)] = {
                "images": counts.get("images"), "dataset_id": ds["id"], "job_id": job["id"],
                "registration_s": round(reg_s, 2), "wall_s": round(wall, 2),
                "job_run_s": _iso_s(job.get("started_at"), job.get("finished_at")),
                "queued_s": _iso_s(job.get("created_at"), job.get("started_at")),
                "phases_s": phase_s, "pairs": result.get("pairs"), "attempts": job.get("attempts"),
                "mine_config": (result.get("config") or {}).get("mine"),  # as the worker resolved it
                "peak_rss_bytes": {k: v["rss_bytes"] for k, v in mem["peak"].items()},
                "peak_pss_bytes": {k: v["pss_bytes"] for k, v in mem["peak"].items()},
                "peak_processes": {k: v["processes"] for k, v in mem["peak"].items()},
                # each worker's peak came at its own time: the sum bounds what they held at once from above
                "peak_miners_rss_bytes": sum(m.get("rss_bytes", 0) for m in miners),
                "peak_miners_pss_bytes": sum(m.get("pss_bytes", 0) for m in miners),
                "vm_hwm_bytes": mem["vm_hwm_bytes"], "roi_cache_bytes": folder_bytes(cache),
                "load_average_at_start": load,
                "sampler": {k: mem[k] for k in ("samples", "interval_s", "sampler_cpu_s", "timeline_mib")},
            }
            print(f"service n={n}: {wall:.1f} s, {result.get('pairs')} pairs, phases {phase_s}", flush=True)
        out["postmaster_pid"] = next(iter(stk.pids().get("postgres", [])), None)
    finally:
        stk.down()
    return out


# -- results ---------------------------------------------------------------------------------------------
def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def derive(res: dict[str, Any]) -> None:
    """Per-image figures and the ratios to the smallest N, into each run's record."""
    for path in ("cli", "service"):
        runs = res.get(path, {}).get("runs", {})
        for r in runs.values():
            n = max(1, r["images"] or 0)
            r["wall_s_per_image"] = round(r["wall_s"] / n, 4)
            if path == "cli":
                r["stages_s_per_image"] = {k: round(v / n, 4) for k, v in r["stages_s"].items()}
                r["stages_sum_s_per_image"] = round(sum(r["stages_s"].values()) / n, 4)
                r["peak_bytes"] = r["peak_tree_pss_bytes"] or r["peak_tree_rss_bytes"]
                r["disk_bytes_per_image"] = round(r["roi_store_peak_bytes"] / n)
            else:
                r["job_run_s_per_image"] = round(r["job_run_s"] / n, 4) if r["job_run_s"] else None
                r["phases_s_per_image"] = {k: round(v / n, 4) for k, v in r["phases_s"].items()}
                r["registration_s_per_image"] = round(r["registration_s"] / n, 4)
                r["peak_bytes"] = r["peak_miners_pss_bytes"] or r["peak_miners_rss_bytes"]
                r["disk_bytes_per_image"] = round(r["roi_cache_bytes"] / n)
        if not runs:
            continue
        sizes = sorted(runs, key=int)
        base = runs[sizes[0]]
        keys = ["wall_s_per_image", "peak_bytes", "disk_bytes_per_image"] + (
            ["stages_sum_s_per_image"] if path == "cli" else ["job_run_s_per_image"])
        for n in sizes:
            runs[n]["ratio_to_smallest"] = {k: _ratio(runs[n].get(k), base.get(k)) for k in keys}
        if len(sizes) > 1:  # the marginal cost: what each image past the smallest set added
            big, small = runs[sizes[-1]], base
            dn = max(1, (big["images"] or 0) - (small["images"] or 0))
            res[path]["marginal_s_per_image"] = round((big["wall_s"] - small["wall_s"]) / dn, 4)


def markdown(res: dict[str, Any]) -> str:
    clean = ("**Clean run**: full sizes, an idle machine, niceness 0, no other busy process." if res["clean"] else
             f"**Not a clean run** ({'; '.join(res['not_clean_because'])}): these numbers check the script; "
             "they do not answer the question.")
    lines = [f"# Mining at scale: cost per image at {', '.join(f'{n:,}' for n in res['sizes'])} images, CPU", "",
             f"`{res['command']}` on {res['machine']}, {res['date']}.", "", clean, "",
             "**The question** is whether per-image time and peak memory stay flat as the number of images grows "
             "(no step quadratic in N, no feature matrix in RAM). It is asked with a cheap per-image "
             f"configuration, `{' '.join('--set ' + s for s in res['settings'])}` on the checkpoint's "
             f"`{res['checkpoint']['preset']}` preset: its absolute figures say nothing about the default settings "
             "(500-px selective search would take hours at 10,000 images on 2 cores); the ratios to the smallest "
             "set say whether the cost is flat.", "",
             f"**The images** are distinct variants of our {res['variants']['sources']} photos "
             f"(coco128 and coco-mini): {res['variants']['recipe']} Every file has a distinct SHA-1 and "
             "distinct decoded pixels (checked). Set N is variants 0 .. N-1, hard-linked.", ""]
    cli = res.get("cli", {}).get("runs", {})
    if cli:
        lines += ["## `orl mine` (one fresh process per N)", "",
                  "Peak memory: of the CLI process and all its children, sampled every "
                  f"{res['interval_s']} s (PSS counts shared pages once; RSS sums them); VmHWM: the main "
                  "process's own peak RSS. Start-up: wall time outside the stages the CLI reports (imports, "
                  "model, folder scan, writing results). RoI shards: peak size of the streamed feature store.", "",
                  "| N | wall s | s/image | stages s/image | start-up s | peak PSS MiB | peak RSS MiB | main "
                  "VmHWM MiB | RoI shards MiB | KiB/image | pairs | ratio s/image | ratio stages s/image | "
                  "ratio peak |", "|" + "---|" * 14]
        for n, r in sorted(cli.items(), key=lambda kv: int(kv[0])):
            q = r["ratio_to_smallest"]
            lines.append(f"| {int(n):,} | {r['wall_s']:.1f} | {r['wall_s_per_image']:.3f} | "
                         f"{r['stages_sum_s_per_image']:.3f} | {r['startup_s']:.1f} | {_mib(r['peak_tree_pss_bytes'])}"
                         f" | {_mib(r['peak_tree_rss_bytes'])} | {_mib(r['main_vm_hwm_bytes'])} | "
                         f"{r['roi_store_peak_bytes'] / 2**20:.1f} | {r['disk_bytes_per_image'] / 1024:.1f} | "
                         f"{r['pairs']:,} | {q['wall_s_per_image']} | {q['stages_sum_s_per_image']} | "
                         f"{q['peak_bytes']} |")
        stage_names = list(next(iter(cli.values()))["stages_s_per_image"])
        lines += ["", "Seconds per image, per stage:", "", "| N | " + " | ".join(stage_names) + " |",
                  "|---|" + "---|" * len(stage_names)]
        for n, r in sorted(cli.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {int(n):,} | " + " | ".join(f"{r['stages_s_per_image'][s]:.4f}" for s in stage_names)
                         + " |")
        if "marginal_s_per_image" in res["cli"]:
            lines += ["", f"Marginal cost, (wall(largest) - wall(smallest)) / (difference in images): "
                          f"{res['cli']['marginal_s_per_image']:.3f} s per image."]
        lines.append("")
    svc = res.get("service", {}).get("runs", {})
    if svc:
        lines += ["## The services (Celery miner workers, PostgreSQL)", "",
                  "From the mining job's submission through the REST API to `succeeded` (polled every second); "
                  "job: the job's own started_at -> finished_at. Phases as first seen by the poll. Memory: peak "
                  "PSS of each miner worker's process tree, summed (each worker's peak may come at another time, "
                  "so the sum bounds what they held at once); the workers are restarted before each N. RoI cache: "
                  "the job's features on the artifacts volume. Registration (scan, checksums) is timed apart.", "",
                  "| N | wall s | s/image | job s | propose / embed / pairs s | registration s | miners peak PSS MiB "
                  "| (RSS) | miner-cpu / miner-gpu PSS MiB | API / Postgres PSS MiB | RoI cache MiB | pairs | ratio "
                  "s/image | ratio peak |", "|" + "---|" * 14]
        for n, r in sorted(svc.items(), key=lambda kv: int(kv[0])):
            q, p, ph = r["ratio_to_smallest"], r["peak_pss_bytes"], r["phases_s"]
            lines.append(f"| {int(n):,} | {r['wall_s']:.1f} | {r['wall_s_per_image']:.3f} | {r['job_run_s']} | "
                         f"{ph.get('propose', '-')} / {ph.get('embed', '-')} / {ph.get('pairs', '-')} | "
                         f"{r['registration_s']:.1f} | {_mib(r['peak_miners_pss_bytes'])} | "
                         f"{_mib(r['peak_miners_rss_bytes'])} | {_mib(p.get('miner-cpu'))} / "
                         f"{_mib(p.get('miner-gpu'))} | {_mib(p.get('api'))} / {_mib(p.get('postgres'))} | "
                         f"{r['roi_cache_bytes'] / 2**20:.1f} | {r['pairs']} | {q['wall_s_per_image']} | "
                         f"{q['peak_bytes']} |")
        ck = res["service"]["checkpoint"]
        lines += ["", f"The services' checkpoint: a `pretrain` job ({ck['preset']} preset, {ck['epochs']} epoch(s), "
                      f"{ck['images']} images, {ck['seconds']} s), the same recipe as the CLI's; per-image costs "
                      "do not depend on the weights' values (the boxes and the number of pairs do not).", ""]
    c = res["checkpoint"]
    lines += ["## Conditions", "",
              f"Load average (1, 5, 15 min) {res['load_average_before']} before, {res['load_average_after']} after, on "
              f"{res['cpus']} CPU cores; niceness {res['niceness']}; threads: {res['threads'] or 'all cores'}. Other "
              "processes that used more than 10% of a core during the run:",
              *([f"  - pid {o['pid']}, {o['cpu_share']:.0%} of a core: `{o['command'][:100]}`"
                 for o in res["other_busy_processes"][:8]] or ["  - none"]), "",
              f"CLI checkpoint: `{c['path']}` ({c['preset']} preset, {c['epochs']} epoch(s) on {c['images']} "
              "images). The memory sampler runs in this script's process (its CPU time is in the json).", ""]
    return "\n".join(lines)


def cpu_snapshot() -> dict[int, tuple[str, int]]:
    out = {}
    for pid, (_, _, _, ticks) in scan_proc().items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[pid] = (cmd[:160], ticks)
    return out


def others_busy(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], seconds: float,
                ours: set[int]) -> list[dict[str, Any]]:
    """Processes, not ours, that used more than 10% of a core between the snapshots."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid, (cmd, t1) in after.items():
        share = (t1 - before.get(pid, (cmd, 0))[1]) / tick / max(seconds, 1e-9)
        if pid not in ours and share > 0.10:
            out.append({"pid": pid, "cpu_share": round(share, 2), "command": cmd})
    return sorted(out, key=lambda r: -r["cpu_share"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="image counts, comma-separated")
    p.add_argument("--paths", default="cli,service", help="cli, service, or both (comma-separated)")
    p.add_argument("--set", dest="settings", action="append", metavar="SECTION.FIELD=VALUE",
                   help=f"mining settings for both paths, repeatable (default: {' '.join(FAST_SETTINGS)})")
    p.add_argument("--checkpoint", type=Path, help="stage-1 checkpoint for the CLI (default: train one, cached)")
    p.add_argument("--preset", default="tiny", help="preset of the checkpoint trained here (CLI and services)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the checkpoint trained here")
    p.add_argument("--train-images", type=int, default=32,
                   help="variants the checkpoint is trained on (its quality does not change the cost per image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the variants")
    p.add_argument("--threads", type=int, help="cores for mining (CLI --threads, ORL_WORKER_CORES); default: all")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--no-pss", action="store_true", help="sample RSS only (PSS reads /proc/PID/smaps_rollup)")
    p.add_argument("--state", default=str(REPO / ".state" / "mining-scale"),
                   help="the stack's state folder: EMPTIED at the start of the service path")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds to wait for one job")
    p.add_argument("--out", type=Path, default=RESULTS / "mining_scale", help="results .json and .md (no suffix)")
    args = p.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or set(paths) - {"cli", "service"} or not paths:
        p.error("--sizes: positive integers; --paths: cli and/or service")
    settings = list(args.settings or FAST_SETTINGS)
    command = "python benchmarks/mining_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if os.nice(0):
        command = f"nice -n {os.nice(0)} {command}"
    load_before = [round(v, 2) for v in os.getloadavg()]
    cpu0, t_start = cpu_snapshot(), time.monotonic()

    sources = source_photos()
    if not sources:
        raise SystemExit(f"no photos under {', '.join(map(str, SOURCES))}")
    pool = WORK / "pool"
    workers = args.threads or os.cpu_count() or 1
    variants = build_pool(pool, max(max(sizes), args.train_images), args.seed, sources, workers)
    sets = {n: link_set(pool, variants[:n], WORK / "sets" / f"n{n}") for n in sizes}
    train_set = link_set(pool, variants[: args.train_images], WORK / "sets" / f"train{args.train_images}")

    ckpt = args.checkpoint or train_checkpoint(train_set, args.preset, args.epochs,
                                               WORK / f"stage1_{args.preset}_{args.epochs}ep_{args.train_images}",
                                               args.threads)
    import torch

    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    res: dict[str, Any] = {
        "sizes": sizes, "paths": paths, "settings": settings, "interval_s": args.interval,
        "threads": args.threads, "command": command,
        "checkpoint": {"path": str(ckpt), "preset": (ck.get("config") or {}).get("preset", args.preset),
                       "epochs": (ck.get("position") or {}).get("epoch"), "images": ck.get("images")},
        "variants": {"sources": len(sources), "seed": args.seed, "version": VARIANT_VERSION, "pool": str(pool),
                     "recipe": "variant k takes photo perm[k % P] (a seeded permutation of the P photos), is cropped "
                               "to a uniform 80-100% of its width and, independently, its height at a uniform "
                               "position, flipped left-right with probability 1/2, multiplied by a brightness in "
                               "[0.9, 1.1] and per-channel gains in [0.95, 1.05], and saved as JPEG at a quality "
                               "drawn from 80-95 (benchmarks/mining_scale.py, numpy generators seeded with "
                               "(seed, k, attempt)).",
                     "bytes_mean": round(float(np.mean([v["bytes"] for v in variants[: max(sizes)]])))},
    }
    del ck
    if "cli" in paths:
        res["cli"] = {"runs": {}}
        for n in sizes:
            r = run_cli(n, sets[n], ckpt, settings, args.threads, args.interval, not args.no_pss)
            res["cli"]["runs"][str(n)] = r
            print(f"cli n={n}: {r['wall_s']:.1f} s, {r['wall_s'] / n:.3f} s/image, peak PSS "
                  f"{_mib(r['peak_tree_pss_bytes'])} MiB, RoI shards {_mib(r['roi_store_peak_bytes'])} MiB", flush=True)
    if "service" in paths:
        res["service"] = run_service(sizes, sets, train_set, args, settings)
    derive(res)

    elapsed = time.monotonic() - t_start
    after = cpu_snapshot()
    procs = scan_proc()
    ours = tree(procs, [os.getpid()])
    pm = res.get("service", {}).pop("postmaster_pid", None)
    if pm:
        ours |= tree(procs, [pm])
    others = others_busy(cpu0, after, elapsed, ours)
    not_clean = []
    if sizes != list(DEFAULT_SIZES):
        not_clean.append(f"sizes {sizes}, not the full {list(DEFAULT_SIZES)}")
    if max(load_before) > 0.5 * (os.cpu_count() or 1):
        not_clean.append(f"load average {load_before} before the run on {os.cpu_count()} cores")
    if os.nice(0) > 0:
        not_clean.append(f"ran at niceness {os.nice(0)}")
    if others:
        not_clean.append(f"{len(others)} other busy process(es)")
    res.update({
        "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(), "niceness": os.nice(0), "other_busy_processes": others, "clean": not not_clean,
        "not_clean_because": not_clean, "elapsed_s": round(elapsed, 1),
        "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'}, Python "
                   f"{platform.python_version()}, torch {torch.__version__})",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
