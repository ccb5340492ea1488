#!/usr/bin/env python
"""Study: does our ORL beat BYOL on real scene photos, and are the mined pairs objects?

One command runs every configuration for every seed, writes the raw results as JSON
(incrementally, after every unit of work) and regenerates docs/RESULTS.md with tables and
matplotlib plots from that JSON. Nothing in RESULTS.md is typed by hand.

Data: ../shared/data/coco128 (YOLO labels) and ../shared/data/coco-mini (COCO json), all
photos pre-trained on together through a folder of symlinks (labels unused). Label metrics:
each dataset with its own labels (fit on train2017, score on val2017), both reported and
their mean; pair precision against the union of both label sets (pairs cross datasets).

Per seed, in order (so a partial run still holds whole seeds):
  stage 1   BYOL for N epochs, snapshots after a few epochs (and at random init)
  stage 2   mining with each snapshot (precision against stage-1 epochs), and the options
            roi_align RoI features, selective search at 320 px, mutual-nearest pairs
  stage 3   BYOL 2N; BYOL N + ORL N (random init, the authors' way; and from stage 1);
            the Table 5a ablation (w_inter = 0, w_intra = 0); ORL on each option's pairs
  eval      frozen features: object probe (kNN, linear) on GT crops, VOC07-style SVM mAP

Stage outputs are cached under the work folder and units already in the JSON are skipped,
so rerunning the same command resumes. Usage:

  python benchmarks/study.py                # full study (2 CPU cores: about 2 hours)
  python benchmarks/study.py --quick        # pipeline check (minutes); numbers mean nothing
  python benchmarks/study.py --gpu          # larger configuration on one CUDA GPU, under 5 min
  python benchmarks/study.py --report-only  # regenerate docs/RESULTS.md from existing JSON
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

# OpenMP threads that wait for work sleep instead of spinning: on a shared 2-core machine,
# spinning threads of one process steal the core the other process needs (set before torch
# loads libgomp).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "RESULTS.md"
DATA = REPO.parent / "shared" / "data"
SCHEMA = 1

# The two labelled sources: images root and labels path relative to the data folder. The
# symlink folder holds each under its name, so "coco128/train2017/x.jpg" is the image
# "train2017/x.jpg" of the coco128 root.
DATASETS = {
    "coco128": ("coco128/images", "coco128/labels"),
    "coco-mini": ("coco-mini", "coco-mini/annotations"),
}


# ==========================================================================================
# What is run: modes, stage-3 runs, mining variants
# ==========================================================================================
@dataclass(frozen=True)
class Mode:
    """One scale of the study. ``settings()`` is its record in the JSON. Seeds are left out
    of it, and the EXTENDABLE fields (which runs, snapshots and variants are done) are left
    out of the comparison with an existing file: a later invocation may add seeds, runs or
    variants to a result without changing what the existing units mean."""

    name: str
    preset: str
    overrides: dict[str, Any]
    epochs: int  # N
    snapshots: tuple[int, ...]  # stage-1 epochs whose checkpoints are mined
    seeds: tuple[int, ...]
    per_folder: int | None = None  # images per source folder (None: all)
    max_minutes: float | None = None  # stop starting units after this (GPU run limit)
    runs: tuple[str, ...] | None = None  # RUNS names to train and evaluate (None: all)
    svm: bool = True  # the VOC07 SVM (CPU-bound: most of an evaluation's time)
    # stage-1 snapshots that are mined (None: all). Snapshot 0 may be kept for its evaluation
    # (the random-init network) without mining it.
    mine_epochs: tuple[int, ...] | None = None
    # VARIANTS mined and scored (None: all), whether or not a stage-3 run trains on them
    variants: tuple[str, ...] | None = None
    svm_jobs: int = 1  # processes for the SVM's per-class fits (same results, less wall time)
    # torch intra-op threads (None: torch's default). Under load, OpenMP's spin-waiting once
    # made tiny training steps 10x slower with 2 threads (measured); OMP_WAIT_POLICY=PASSIVE
    # (set above) avoids that, and the full mode uses both cores.
    threads: int | None = 1

    def settings(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("seeds", "max_minutes", "threads", "svm_jobs"):
            d.pop(k)
        return json.loads(json.dumps(d))  # as it reads back from the file (tuples -> lists)


EXTENDABLE = ("runs", "mine_epochs", "variants")


def signature(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that define what every unit means (compared between invocations)."""
    return {k: v for k, v in settings.items() if k not in EXTENDABLE}


def merge_choice(a: list | None, b: list | None) -> list | None:
    """Union of two EXTENDABLE choices; None (everything) absorbs any list."""
    return None if a is None or b is None else list(a) + [x for x in b if x not in a]


MODES = {
    # ResNet-18 at 112 px (the cpu preset). Batch 32 instead of 64: 490 photos give 15 steps
    # per epoch instead of 7, twice the optimiser updates for the same compute. N = 4 keeps
    # the whole study (every run, 3 seeds) at about two hours on 2 cores (122 min measured,
    # docs/RESULTS.md); the snapshot at epoch 0 is evaluated (random init) but not mined.
    "full": Mode("full", "cpu", {"train.batch_size": 32, "train.warmup_epochs": 1.0},
                 epochs=4, snapshots=(0, 2, 4), seeds=(0, 1, 2), mine_epochs=(2, 4),
                 threads=2, svm_jobs=2),
    # Pipeline check only: tiny preset, a few photos per source folder, 2 epochs, 2 seeds.
    "quick": Mode("quick", "tiny", {"train.batch_size": 8},
                  epochs=2, snapshots=(0, 1, 2), seeds=(0, 1), per_folder=12),
    # One CUDA GPU, one prepared run under 5 minutes (benchmarks/gpu_check.sh): ResNet-50
    # with the paper's heads at 160 px, on the equal-epoch comparison only; nothing new
    # starts after 4.5 minutes, so the seeds after the first run only as far as time allows.
    # The SVM runs on the machine's CPU cores, its classes in parallel.
    "gpu": Mode("gpu", "paper",
                {"train.batch_size": 64, "train.warmup_epochs": 1.0, "train.num_workers": 8,
                 "augment.image_size": 160, "augment.patch_size": 96,
                 "mine.embed_resize": 182, "mine.embed_crop": 160, "mine.roi_size": 160,
                 "mine.batch_size": 128, "mine.ss_workers": 14},
                epochs=8, snapshots=(8,), seeds=(0, 1, 2), max_minutes=4.5, threads=None,
                runs=("byol_N", "byol_2N", "orl", "orl_init"), variants=(), svm_jobs=12),
}


@dataclass(frozen=True)
class MineVariant:
    name: str
    label: str
    overrides: dict[str, Any]  # MineConfig fields, over DEFAULT_MINE
    rule: str = "top"  # "top": the authors' top-10%-of-matrix rule; "mutual": see mutual_pairs


# The study's default mining: the library's faithful crop features and its 500 px
# selective-search default, in every mode (the tiny preset alone would use 320 px).
DEFAULT_MINE = {"ss_max_side_px": 500, "roi_mode": "crop"}
VARIANTS = {
    "roi_align": MineVariant("roi_align", "RoIAlign features (1 forward per image)", {"roi_mode": "roi_align"}),
    "ss320": MineVariant("ss320", "selective search at 320 px", {"ss_max_side_px": 320}),
    "mutual": MineVariant("mutual", "mutual-nearest RoI pairs", {}, rule="mutual"),
}


@dataclass(frozen=True)
class RunSpec:
    """A pre-training whose backbone is evaluated. ``pairs``: "default" is the stage-1
    checkpoint after N epochs mined with DEFAULT_MINE, else a VARIANTS name."""

    name: str
    label: str
    stage: str  # byol | orl
    epochs_mult: int = 1
    pairs: str = "default"
    init: bool = False
    weights: dict[str, float] = field(default_factory=dict)


RUNS = [
    RunSpec("byol_N", "BYOL N (stage 1)", "byol"),
    RunSpec("byol_2N", "BYOL 2N", "byol", epochs_mult=2),
    RunSpec("orl", "BYOL N + ORL N, random init (authors)", "orl"),
    RunSpec("orl_init", "BYOL N + ORL N, init from stage 1", "orl", init=True),
    RunSpec("orl_no_inter", "ORL without inter-RoI loss (w_inter = 0)", "orl", weights={"w_inter": 0.0}),
    RunSpec("orl_no_intra", "ORL without intra-RoI loss (w_intra = 0)", "orl", weights={"w_intra": 0.0}),
    RunSpec("orl_roi_align", "ORL on RoIAlign-mined pairs", "orl", pairs="roi_align"),
    RunSpec("orl_ss320", "ORL on 320 px selective-search pairs", "orl", pairs="ss320"),
    RunSpec("orl_mutual", "ORL on mutual-nearest pairs", "orl", pairs="mutual"),
]
RUN_BY_NAME = {r.name: r for r in RUNS}
RANDOM_INIT = "random_init"  # evaluation of the stage-1 snapshot at epoch 0 (no training)


# ==========================================================================================
# Results store: the JSON, written after every unit; resumable
# ==========================================================================================
class SettingsMismatch(RuntimeError):
    pass


class MissingInput(RuntimeError):
    """A unit's input failed or was skipped earlier (that unit's error says why)."""


class ResultsStore:
    """The study's JSON file. ``units`` maps a key ("train/s0/orl") to its record; a unit
    whose record has status "done" is skipped on a rerun. Every write is atomic."""

    def __init__(self, path: Path, mode: str, settings: dict[str, Any], fresh: bool = False):
        self.path = Path(path)
        self.data: dict[str, Any]
        if self.path.exists() and not fresh:
            self.data = json.loads(self.path.read_text())
            old = self.data.get("settings") or {}
            if signature(old) != signature(settings) or self.data.get("mode") != mode:
                raise SettingsMismatch(
                    f"{self.path} was written with other settings ({old}); "
                    f"this run uses {settings}. Pass --fresh to start over, or --out for another file.")
            self.data["settings"] = {**settings, **{k: merge_choice(old.get(k), settings.get(k))
                                                    for k in EXTENDABLE if k in settings}}
        else:
            self.data = {"schema": SCHEMA, "mode": mode, "settings": settings, "machine": {},
                         "invocations": [], "units": {}}
        self.errors: list[str] = []  # keys that failed in this invocation
        self.skipped: list[str] = []  # keys not started in this invocation (time budget)

    @property
    def units(self) -> dict[str, dict[str, Any]]:
        return self.data["units"]

    def done(self, key: str) -> bool:
        return self.units.get(key, {}).get("status") == "done"

    def get(self, key: str) -> dict[str, Any] | None:
        return self.units.get(key)

    def record(self, key: str, rec: dict[str, Any]) -> None:
        self.units[key] = {**rec, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()

    def run_unit(self, key: str, fn: Callable[[], dict[str, Any]], outputs_exist: bool = True,
                 out_of_time: bool = False, log: Callable[[str], None] = print) -> bool:
        """Run ``fn`` unless ``key`` is done (and its files exist); record its result dict, or
        its error (the other units still run). Past the time budget nothing new starts and
        the key is listed in ``skipped``. Returns whether the unit is done now."""
        if self.done(key) and outputs_exist:
            return True
        if out_of_time:
            if key not in self.skipped:
                self.skipped.append(key)
            return False
        log(f"{key} ...")
        t, c = time.perf_counter(), cpu_seconds()
        try:
            rec = fn()
        except Exception as exc:
            if not isinstance(exc, MissingInput):
                traceback.print_exc()
            self.errors.append(key)
            self.record(key, {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                              "seconds": time.perf_counter() - t})
            return False
        rec = {"status": "done", "seconds": time.perf_counter() - t, "cpu_seconds": cpu_seconds() - c, **rec}
        self.record(key, rec)
        log(f"{key} done in {rec['seconds']:.0f} s")
        return True

    def save(self) -> None:
        from orl.evaluate import to_jsonable  # lazy: --report-only stays free of torch imports

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(self.data), indent=1))
        os.replace(tmp, self.path)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, selective
    search workers): a cost that, unlike wall time, other load on the machine barely changes."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def unit_key(kind: str, seed: int, name: str) -> str:
    return f"{kind}/s{seed}/{name}"


# ==========================================================================================
# Aggregation over seeds (pure; tested)
# ==========================================================================================
def aggregate(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of the non-missing values."""
    v = [float(x) for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None,
            "std": float(np.std(v, ddof=1)) if len(v) >= 2 else None,
            "n": len(v), "values": v}


def paired(a: dict[int, float | None], b: dict[int, float | None]) -> dict[str, Any]:
    """a - b over the seeds both have: mean, std, and in how many seeds a > b."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    d = [a[s] - b[s] for s in seeds]
    agg = aggregate(d)
    return {"diff_mean": agg["mean"], "diff_std": agg["std"], "n": len(d),
            "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "seeds": seeds}


def verdict(p: dict[str, Any]) -> str:
    if p["n"] == 0:
        return "not measured"
    if p["wins"] == p["n"]:
        return f"higher in all {p['n']} seeds"
    if p["losses"] == p["n"]:
        return f"lower in all {p['n']} seeds"
    ties = p["n"] - p["wins"] - p["losses"]
    return f"mixed: higher in {p['wins']}, lower in {p['losses']}, equal in {ties} of {p['n']} seeds"


def seed_values(units: dict[str, dict], kind: str, name: str, fn: Callable[[dict], float | None]) -> dict[int, float | None]:
    """{seed: fn(record)} for every done unit ``kind/s<seed>/name``."""
    out = {}
    for key, rec in units.items():
        k, s, n = key.split("/", 2)
        if k == kind and n == name and rec.get("status") == "done":
            out[int(s[1:])] = fn(rec)
    return dict(sorted(out.items()))


def dataset_mean(rec: dict, metric: str) -> float | None:
    """Mean of one eval metric over the datasets (None if any dataset lacks it)."""
    vals = [d.get(metric) for d in rec["datasets"].values()]
    return float(np.mean(vals)) if vals and all(v is not None for v in vals) else None


RULE_NAMES = {"iou": "IoU", "ioa": "IoA"}
# The chance level of each eval metric: a key of the same per-dataset record. Chance depends
# on the labels only, so any evaluated checkpoint's record gives it (see first_eval).
CHANCE = {"knn_acc": "majority_acc", "linear_acc": "majority_acc", "svm_map": "svm_chance_map"}
EVAL_METRICS = [  # key in an eval record's per-dataset dict, label (values are fractions; shown in %)
    ("knn_acc", "kNN acc. (GT crops)"),
    ("linear_acc", "linear acc. (GT crops)"),
    ("svm_map", "SVM mAP (images)"),
]


# ==========================================================================================
# Data: the symlink folder, labels
# ==========================================================================================
def build_image_folder(data_root: Path, dest: Path, per_folder: int | None) -> list[str]:
    """Symlink every photo (or ``per_folder`` evenly spaced ones per source folder) into
    ``dest/<dataset>/<split>/`` and return the relative paths. Idempotent."""
    from orl.images import list_images

    files = []
    for name, (img_rel, _) in DATASETS.items():
        src_root = data_root / img_rel
        by_folder: dict[str, list[str]] = {}
        for rel in list_images(src_root):
            by_folder.setdefault(str(Path(rel).parent), []).append(rel)
        for folder, rels in sorted(by_folder.items()):
            if per_folder is not None and len(rels) > per_folder:
                step = len(rels) / per_folder
                rels = [rels[int(i * step)] for i in range(per_folder)]
            for rel in rels:
                link = dest / name / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to((src_root / rel).resolve())
                files.append(f"{name}/{rel}")
    return sorted(files)


def load_ground_truths(data_root: Path, files: list[str]):
    """({dataset: GroundTruth restricted to ``files``}, union GroundTruth keyed by the
    symlink-folder paths, for pair precision)."""
    from orl.labels import GroundTruth, load_labels

    keep = set(files)
    per, classes = {}, None
    objects, splits = {}, {}
    for name, (img_rel, lab_rel) in DATASETS.items():
        gt = load_labels(data_root / img_rel, data_root / lab_rel)
        if classes is None:
            classes = gt.classes
        elif gt.classes != classes:
            raise ValueError(f"{name} has other class names than {next(iter(DATASETS))}; cannot pool labels")
        sub_obj = {k: v for k, v in gt.objects.items() if f"{name}/{k}" in keep}
        sub_split = {k: v for k, v in gt.splits.items() if f"{name}/{k}" in keep}
        per[name] = GroundTruth(gt.classes, sub_obj, sub_split, gt.format, gt.images_root, gt.labels_path)
        objects.update({f"{name}/{k}": v for k, v in sub_obj.items()})
        splits.update({f"{name}/{k}": v for k, v in sub_split.items()})
    union = GroundTruth(classes, objects, splits, "union", "", "+".join(DATASETS))
    return per, union


# ==========================================================================================
# Pair rule option: mutual nearest neighbours (pure; tested)
# ==========================================================================================
def mutual_pairs(fq: np.ndarray, fk: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual-nearest RoI pairs of one (query, neighbour) image pair.

    fq (Bq, C), fk (Bk, C) L2-normalised. Box a of the query and box b of the neighbour
    pair up when b is a's most similar neighbour box AND a is b's most similar query box.
    At most max(1, int(ratio * Bq)) of them are kept, best first (the authors' count cap);
    the matrix maximum is always mutual, so there is at least one pair. Unlike the
    authors' rule, no query box pairs twice. Returns ((P, 2) int, (P,) float32 scores).
    """
    if len(fq) == 0 or len(fk) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    sim = fq @ fk.T
    best_k = sim.argmax(axis=1)  # (Bq,)
    best_q = sim.argmax(axis=0)  # (Bk,)
    a = np.nonzero(best_q[best_k] == np.arange(len(fq)))[0]
    s = sim[a, best_k[a]]
    order = np.argsort(-s, kind="stable")[: max(1, int(ratio * len(fq)))]
    return np.stack([a[order], best_k[a[order]]], axis=1).astype(np.int64), s[order].astype(np.float32)


# ==========================================================================================
# The study: units of work
# ==========================================================================================
class Study:
    """The units of work of one mode. Getters (``stage1``, ``corr``, ``checkpoint``) are lazy
    and memoised: a rerun recomputes a stage output only when its record is missing from the
    JSON, or when a unit still to run needs the file and the file is gone."""

    def __init__(self, mode: Mode, work: Path, store: ResultsStore, data_root: Path, device: str):
        from orl.config import get_preset
        from orl.train import resolve_device

        self.mode, self.work, self.store, self.data_root = mode, work, store, data_root
        self.device = resolve_device(device)
        self.cfg = get_preset(mode.preset).override(**mode.overrides).validate()
        self.images = work / "images"
        self.files = build_image_folder(data_root, self.images, mode.per_folder)
        self.gts, self.gt_union = load_ground_truths(data_root, self.files)
        self.t0 = time.time()
        self._memo: dict[tuple, Path | None] = {}
        if mode.threads:
            # numpy's, scipy's and sklearn's thread pools too. Oversubscribed, the linear
            # probe's lbfgs took 25 s instead of 0.2 s on a 139-crop set (measured on the
            # shared machine).
            from orl.cli import set_threads

            set_threads(mode.threads)

    # -- bookkeeping ---------------------------------------------------------------------------
    def out_of_time(self) -> bool:
        return self.mode.max_minutes is not None and time.time() - self.t0 > 60 * self.mode.max_minutes

    def unit(self, key: str, fn: Callable[[], dict[str, Any]], outputs_exist: bool = True) -> bool:
        return self.store.run_unit(key, fn, outputs_exist, self.out_of_time(),
                                   lambda msg: print(f"[study {self.mode.name}] {msg}", flush=True))

    def memo(self, key: tuple, fn: Callable[[], Path | None]) -> Path | None:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def run_cfg(self, seed: int, epochs: int, weights: dict[str, float] | None = None):
        over = {"train.epochs": epochs, "train.seed": seed}
        over.update({f"train.{k}": v for k, v in (weights or {}).items()})
        return self.cfg.override(**over)

    def mine_cfg(self, variant: MineVariant | None):
        over = {**DEFAULT_MINE, **(variant.overrides if variant else {})}
        return self.cfg.override(**{f"mine.{k}": v for k, v in over.items()}).mine

    def seed_dir(self, seed: int) -> Path:
        return self.work / f"s{seed}"

    def snapshot_path(self, seed: int, epoch: int) -> Path:
        return self.seed_dir(seed) / "byol_N" / "snapshots" / f"ep{epoch}.pt"

    # -- stage 1 with snapshots ------------------------------------------------------------------
    def stage1(self, seed: int) -> Path | None:
        """BYOL N epochs (the last.pt path); a copy of the checkpoint at each snapshot epoch."""
        return self.memo(("stage1", seed), lambda: self._stage1(seed))

    def _stage1(self, seed: int) -> Path | None:
        from orl.checkpoint import load_checkpoint
        from orl.data import ResumableSampler
        from orl.train import train

        out = self.seed_dir(seed) / "byol_N"
        final = out / "last.pt"
        N = self.mode.epochs

        def run():
            cfg = self.run_cfg(seed, N)
            batch = min(cfg.train.batch_size, len(self.files))
            spe = ResumableSampler(len(self.files), batch, seed).steps_per_epoch()
            for e in sorted(self.mode.snapshots):
                snap = self.snapshot_path(seed, e)
                if snap.exists() or e >= N:
                    continue
                if final.exists() and load_checkpoint(final)["position"]["global_step"] > e * spe:
                    raise RuntimeError(f"{final} is past epoch {e} but {snap} is missing; delete {out} to redo stage 1")
                train("byol", self.images, out, cfg, files=self.files, device=str(self.device),
                      show_progress=False, max_steps=e * spe)
                snap.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(final, snap)
            summary = train("byol", self.images, out, cfg, files=self.files, device=str(self.device),
                            show_progress=False)
            if N in self.mode.snapshots:
                self.snapshot_path(seed, N).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(final, self.snapshot_path(seed, N))
            return {"kind": "train", "run": "byol_N", "seed": seed, **train_record(out, summary)}

        snaps_ok = all(self.snapshot_path(seed, e).exists() for e in self.mode.snapshots)
        ok = self.unit(unit_key("train", seed, "byol_N"), run, final.exists() and snaps_ok)
        return final if ok and final.exists() else None

    def snapshot(self, seed: int, epoch: int) -> Path | None:
        return self.snapshot_path(seed, epoch) if self.stage1(seed) and self.snapshot_path(seed, epoch).exists() else None

    # -- stage 2 -------------------------------------------------------------------------------
    def mine_dir(self, seed: int, name: str) -> Path:
        return self.seed_dir(seed) / f"mine_{name}"

    def corr(self, seed: int, name: str) -> Path | None:
        """Mined pairs "ep<e>" (stage-1 snapshot, default settings) or a VARIANTS name (stage
        1 after N epochs); scored against the labels. Returns the correspondence.json."""
        return self.memo(("corr", seed, name), lambda: self._corr(seed, name))

    def _corr(self, seed: int, name: str) -> Path | None:
        from orl.checkpoint import load_model

        out = self.mine_dir(seed, name)
        corr_path = out / "correspondence.json"
        variant = VARIANTS.get(name)
        default = f"ep{self.mode.epochs}"

        def run():
            ckpt = self.snapshot(seed, int(name[2:])) if variant is None else self.stage1(seed)
            base = self.corr(seed, default) if variant is not None and variant.rule == "mutual" else None
            if ckpt is None or (variant is not None and variant.rule == "mutual" and base is None):
                raise MissingInput("its stage-1 checkpoint or base mining is missing")
            mc = self.mine_cfg(variant)
            model, _, ck = load_model(ckpt)
            if base is not None:
                corr, stats = self.mine_mutual(model, out, mc, base)
            else:
                corr, stats = self.mine_top(model, out, mc)
            pos = ck["position"]
            return {"kind": "mine", "variant": name, "seed": seed,
                    "checkpoint_epoch": pos["epoch"] + (1 if pos["step_in_epoch"] else 0),
                    "checkpoint_step": pos["global_step"],
                    "mine_params": {k: v for k, v in dataclasses.asdict(mc).items()
                                    if k in ("roi_mode", "ss_max_side_px", "roi_size", "max_boxes", "knn_k", "pair_ratio")},
                    "rule": variant.rule if variant else "top",
                    "pairs": corr.num_pairs, "images": len(corr),
                    "boxes_per_image": float(np.mean([len(b) for b in corr.boxes])),
                    "stage_seconds": stats.get("seconds", {}),
                    **score_pairs(corr, self.gt_union, self.gts, seed)}

        ok = self.unit(unit_key("mine", seed, name), run, corr_path.exists())
        return corr_path if ok and corr_path.exists() else None

    def mine_top(self, model, out: Path, mc):
        """The library's stage 2, with selective search shared between runs of one scale."""
        from orl.mining import mine

        cache = self.work / "proposals" / f"ss{mc.ss_max_side_px or 'full'}.jsonl"
        local = out / "proposals.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if cache.exists() and not local.exists():
            shutil.copy(cache, local)  # selective search does not depend on the checkpoint
        # The default mining keeps its RoI features: the mutual-nearest rule reuses them.
        corr, stats = mine(model, self.images, self.files, out, mc, self.device, save_features=True)
        # The local file now holds the cache's records plus any photo the cache lacked.
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
        return corr, stats

    def mine_mutual(self, model, out: Path, mc, base_path: Path):
        """Same boxes, RoI features and image KNN as ``base_path``; pairs by :func:`mutual_pairs`."""
        from orl.correspondence import Correspondence
        from orl.images import load_rgb
        from orl.mining import embed_rois, load_roi_features

        base = Correspondence.load(base_path)
        t = time.perf_counter()
        saved = base_path.parent / "roi_features.npz"
        files, feats = load_roi_features(saved) if saved.exists() else ([], [])
        if files != base.files:  # an older cache without features: encode the boxes again
            model = model.to(self.device).eval()
            feats = [embed_rois(model.backbone, load_rgb(self.images / f), b, mc, self.device)[0]
                     for f, b in zip(base.files, base.boxes)]
        t_feat = time.perf_counter() - t
        empty = (np.zeros((0, 2), np.int64), np.zeros(0, np.float32))
        pairs, scores = [], []
        for q in range(len(base)):
            row_p, row_s = [], []
            for j in base.knn[q]:
                ij, s = mutual_pairs(feats[q], feats[j], mc.pair_ratio) if j >= 0 else empty
                row_p.append(np.concatenate([base.boxes[q][ij[:, 0]], base.boxes[j][ij[:, 1]]], axis=1)
                             if len(ij) else np.zeros((0, 8)))
                row_s.append(s)
            pairs.append(row_p)
            scores.append(row_s)
        corr = dataclasses.replace(base, pairs=pairs, pair_scores=scores,
                                   info={**base.info, "pair_rule": "mutual_nearest"})
        out.mkdir(parents=True, exist_ok=True)
        corr.save(out / "correspondence.json")
        return corr, {"seconds": {"embed_rois": t_feat}}

    # -- stage 3 and BYOL 2N -----------------------------------------------------------------
    def checkpoint(self, seed: int, name: str) -> Path | None:
        if name == RANDOM_INIT:
            return self.snapshot(seed, 0)
        if name == "byol_N":
            return self.stage1(seed)
        return self.memo(("ckpt", seed, name), lambda: self._train(seed, RUN_BY_NAME[name]))

    def _train(self, seed: int, spec: RunSpec) -> Path | None:
        from orl.correspondence import Correspondence
        from orl.train import train

        out = self.seed_dir(seed) / spec.name
        final = out / "last.pt"

        def run():
            cfg = self.run_cfg(seed, self.mode.epochs * spec.epochs_mult, spec.weights)
            if spec.stage == "byol":
                summary = train("byol", self.images, out, cfg, files=self.files, device=str(self.device),
                                show_progress=False)
            else:
                pairs = self.corr(seed, f"ep{self.mode.epochs}" if spec.pairs == "default" else spec.pairs)
                init = self.stage1(seed) if spec.init else None
                if pairs is None or (spec.init and init is None):
                    raise MissingInput("its stage-1 checkpoint or mined pairs are missing")
                summary = train("orl", self.images, out, cfg, corr=Correspondence.load(pairs), init_from=init,
                                device=str(self.device), show_progress=False)
            return {"kind": "train", "run": spec.name, "seed": seed, **train_record(out, summary)}

        ok = self.unit(unit_key("train", seed, spec.name), run, final.exists())
        return final if ok and final.exists() else None

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, seed: int, name: str) -> None:
        def run():
            ckpt = self.checkpoint(seed, name)
            if ckpt is None:
                raise MissingInput("no checkpoint (its training failed or was skipped)")
            return {"kind": "eval", "run": name, "seed": seed,
                    "datasets": evaluate_checkpoint_on(ckpt, self.gts, self.device, seed, self.mode.svm,
                                                       self.mode.svm_jobs)}

        self.unit(unit_key("eval", seed, name), run)

    # -- the whole study, seed after seed --------------------------------------------------------
    def run(self) -> None:
        """Per seed, the most important units first (the GPU mode may stop on time)."""
        N = self.mode.epochs
        runs = [r.name for r in RUNS if self.mode.runs is None or r.name in self.mode.runs]
        evals = ([RANDOM_INIT] if 0 in self.mode.snapshots else []) + runs
        mined = self.mode.snapshots if self.mode.mine_epochs is None else self.mode.mine_epochs
        mines = [f"ep{e}" for e in sorted(mined, key=lambda e: (e != N, e))]  # stage 3's pairs first
        mines += [v for v in VARIANTS if (self.mode.variants is None or v in self.mode.variants)
                  or any(RUN_BY_NAME[r].pairs == v for r in runs)]
        for seed in self.mode.seeds:
            keys = [unit_key("mine", seed, m) for m in mines] + [unit_key("eval", seed, n) for n in evals]
            if not all(self.store.done(k) for k in keys):
                self.stage1(seed)  # on its own, so no other unit's time includes it
            for m in mines:  # every mining before stage 3, so a seed's pair table is whole early
                self.corr(seed, m)
            for name in evals:
                spec = RUN_BY_NAME.get(name)
                if spec is not None and spec.pairs in VARIANTS:
                    self.corr(seed, spec.pairs)  # score the option's pairs even if its eval is done
                if not self.store.done(unit_key("eval", seed, name)):
                    self.checkpoint(seed, name)  # train first, so the eval unit times only itself
                self.evaluate(seed, name)


def train_record(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    curve, seconds = loss_curves(out / "metrics.csv", summary["batch_size"])
    return {"epochs": summary["epoch"], "steps": summary["global_step"], "batch_size": summary["batch_size"],
            "images": summary["images"], "finished": summary["finished"], "device": summary["device"],
            "train_seconds": seconds, "loss": curve}


def loss_curves(metrics_csv: Path, batch: int) -> tuple[dict[str, list[float | None]], float]:
    """Per-epoch mean of each loss column of a run's metrics.csv, and the training seconds
    (sum over steps of batch / images_per_s, so time lost to an interruption is not
    counted). A resumed run may log a step twice: the last row of a global step wins."""
    rows: dict[int, dict[str, str]] = {}
    with metrics_csv.open() as fh:
        for r in csv.DictReader(fh):
            rows[int(r["global_step"])] = r
    by_epoch: dict[int, dict[str, list[float]]] = {}
    seconds = 0.0
    for step in sorted(rows):
        r = rows[step]
        e = by_epoch.setdefault(int(r["epoch"]), {})
        for col in ("loss", "loss_global", "loss_intra", "loss_inter"):
            if r[col] != "":
                e.setdefault(col, []).append(float(r[col]))
        ips = float(r["images_per_s"] or 0)
        seconds += batch / ips if ips > 0 else 0.0
    epochs = sorted(by_epoch)
    curves = {("total" if col == "loss" else col[5:]):
              [float(np.mean(by_epoch[e][col])) if col in by_epoch[e] else None for e in epochs]
              for col in ("loss", "loss_global", "loss_intra", "loss_inter")}
    return curves, seconds


def score_pairs(corr, gt_union, gts: dict, seed: int) -> dict[str, Any]:
    """Precision of the mined pairs (IoU and IoA rules) and KNN share, each with its random
    baseline: on the union of the label sets, and on each dataset alone (within-dataset
    pairs only)."""
    from orl.metrics import correspondence_precision

    def brief(r):
        return {"pairs": r["pairs"], "precision": r["precision"], "top1_precision": r["top1_precision"],
                "random_precision": r["random"]["precision"], "lift": r["lift"],
                "knn_share": r["knn"]["share"], "knn_random_share": r["knn_random"]["share"],
                "knn_image_pairs": r["knn"]["image_pairs"], "labelled_images": r["images"]["labelled"],
                "iou_threshold": r["iou_threshold"]}

    out = {"union": {rule: brief(correspondence_precision(corr, gt_union, seed=seed, rule=rule))
                     for rule in ("iou", "ioa")}}
    out["per_dataset"] = {}
    for name, gt in gts.items():
        try:
            out["per_dataset"][name] = {rule: brief(correspondence_precision(corr, gt, seed=seed, rule=rule))
                                        for rule in ("iou", "ioa")}
        except ValueError:  # no labelled image of this dataset in the correspondence
            out["per_dataset"][name] = None
    return out


def evaluate_checkpoint_on(ckpt: Path, gts: dict, device, seed: int, svm: bool = True,
                           svm_jobs: int = 1) -> dict[str, Any]:
    """Frozen online backbone of ``ckpt`` on each dataset, at the checkpoint's training
    resolution: object probe (kNN, linear) and, if ``svm``, the VOC07 SVM. With chance
    levels: the majority train class's share of the val crops, and the mean positive rate
    of the SVM's classes (the AP of a random ranking)."""
    import torch

    from orl.checkpoint import load_model
    from orl.evaluate import image_svm, object_probe

    model, cfg, _ = load_model(ckpt)
    size = cfg.augment.image_size
    out = {}
    for name, gt in gts.items():
        torch.manual_seed(seed)
        t = time.perf_counter()
        p = object_probe(model.backbone, gt, size, batch_size=64, device=device, seed=seed)
        t_probe = time.perf_counter() - t
        r = {"knn_acc": p["knn_acc"], "knn_acc_majority": p["knn_acc_majority"], "linear_acc": p["linear_acc"],
             "train_crops": p["train_crops"], "val_crops": p["val_crops"], "val_unseen_class": p["val_unseen_class"],
             "majority_acc": majority_class_share(gt, p["min_box_side"]), "seconds": {"object_probe": t_probe}}
        if svm:
            t = time.perf_counter()
            s = image_svm(model.backbone, gt, size, batch_size=64, device=device, seed=seed, n_jobs=svm_jobs)
            cv = [v for v in s["per_class"].values() if v["cv"]]
            r.update(svm_map=s["map"], svm_map_all=s["map_all"], svm_classes=s["classes_evaluated"],
                     svm_classes_small=s["classes_small"], train_images=s["train_images"], val_images=s["val_images"],
                     svm_chance_map=float(np.mean([v["val_pos"] / s["val_images"] for v in cv])) if cv else None)
            r["seconds"]["svm"] = time.perf_counter() - t
        out[name] = r
    return out


def majority_class_share(gt, min_box_side: float) -> float | None:
    """Accuracy of always answering the most frequent class of the train crops, on the val
    crops of classes seen in train (the probe's own filter: both box sides >= min_box_side)."""
    def labels(split):
        ys = []
        for rel in gt.images(split):
            obj = gt[rel]
            wh = obj.boxes[:, 2:] - obj.boxes[:, :2]
            ys.extend(obj.class_ids[(wh >= min_box_side).all(axis=1)].tolist())
        return np.asarray(ys, dtype=np.int64)

    tr, va = labels("train"), labels("val")
    va = va[np.isin(va, tr)]
    if len(tr) == 0 or len(va) == 0:
        return None
    return float(np.mean(va == np.bincount(tr).argmax()))


# ==========================================================================================
# Report: docs/RESULTS.md and the plots, generated from the JSON only
# ==========================================================================================
MODE_TITLES = {
    "full": "Full study (2 CPU cores)",
    "gpu": "GPU configuration (reported separately)",
    "quick": "Quick pipeline check (`--quick`): these numbers only check that the pipeline runs",
}
# Equal epochs (the shape of Table 5e): every ORL pre-training (N + N epochs) against BYOL 2N.
EQUAL_EPOCHS = [(r.name, "byol_2N", "equal epochs (Table 5e's comparison)") for r in RUNS if r.stage == "orl"]
COMPARISONS = EQUAL_EPOCHS + [  # (a, b, what a - b measures)
    ("orl", "byol_N", "what stage 3 adds to its stage-1 checkpoint (not equal compute)"),
    ("orl_init", "byol_N", "stage 3 continued from stage 1 vs stage 1 alone (not equal compute)"),
    ("orl_init", "orl", "option: stage 3 initialised from stage 1 vs random init"),
    ("orl", "orl_no_inter", "inter-RoI loss (Table 5a): full ORL vs w_inter = 0"),
    ("orl", "orl_no_intra", "intra-RoI loss (Table 5a): full ORL vs w_intra = 0"),
    ("orl_roi_align", "orl", "option: RoIAlign-mined pairs vs crop-mined pairs"),
    ("orl_ss320", "orl", "option: selective search at 320 px vs 500 px"),
    ("orl_mutual", "orl", "option: mutual-nearest pairs vs the authors' top-10% rule"),
    ("byol_2N", "byol_N", "longer BYOL"),
    ("byol_N", RANDOM_INIT, "any pre-training at all vs the random-init network"),
]


def run_label(name: str) -> str:
    return "random init (no training)" if name == RANDOM_INIT else RUN_BY_NAME[name].label


def fmt_pm(agg: dict[str, Any], scale: float = 100.0, nd: int = 1) -> str:
    if agg["mean"] is None:
        return "n/a"
    s = f"{agg['mean'] * scale:.{nd}f}"
    return s + (f" ± {agg['std'] * scale:.{nd}f}" if agg["std"] is not None else f" (n={agg['n']})")


def fmt_diff(p: dict[str, Any], scale: float = 100.0, nd: int = 1) -> str:
    if p["n"] == 0:
        return "n/a"
    s = f"{p['diff_mean'] * scale:+.{nd}f}"
    if p["diff_std"] is not None:
        s += f" ± {p['diff_std'] * scale:.{nd}f}"
    return s + f" ({p['wins']}/{p['n']})"


def eval_names(units: dict) -> list[str]:
    present = {k.split("/", 2)[2] for k in units if k.startswith("eval/")}
    return [n for n in [RANDOM_INIT] + [r.name for r in RUNS] if n in present]


def mine_names(units: dict) -> list[str]:
    present = {k.split("/", 2)[2] for k in units if k.startswith("mine/")}
    eps = sorted((n for n in present if n.startswith("ep")), key=lambda n: int(n[2:]))
    return eps + [v for v in VARIANTS if v in present]


def metric_fn(metric: str, dataset: str | None) -> Callable[[dict], float | None]:
    if dataset is None:
        return lambda rec: dataset_mean(rec, metric)
    return lambda rec: rec["datasets"].get(dataset, {}).get(metric)


def pairs_fn(rule: str, field_: str, scope: str = "union") -> Callable[[dict], float | None]:
    def f(rec):
        part = rec["union"] if scope == "union" else (rec["per_dataset"].get(scope) or {})
        return (part.get(rule) or {}).get(field_)
    return f


def mine_label(name: str, results: dict) -> str:
    n = results["settings"]["epochs"]
    if name.startswith("ep"):
        e = int(name[2:])
        tag = " (random init)" if e == 0 else (" (default: pairs for stage 3)" if e == n else "")
        return f"stage 1 after {e} epochs{tag}"
    return f"{VARIANTS[name].label}, stage 1 after {n} epochs"


def section(results: dict, plots: dict[str, str]) -> list[str]:
    """Markdown lines of one mode's section."""
    mode, st, units = results["mode"], results["settings"], results["units"]
    m = results.get("machine", {})
    N = st["epochs"]
    L = [f"## {MODE_TITLES.get(mode, mode)}", ""]
    L += in_short(results)
    if mode == "quick":
        L += ["> Quick mode trains the `tiny` preset for a few epochs on a handful of photos per folder, "
              "with fewer seeds. It exists to check that every stage, metric, table and plot of the study "
              "works end to end in minutes. Its numbers say nothing about ORL or BYOL.", ""]
    if mode == "gpu":
        L += ["Run by `benchmarks/gpu_check.sh` on a machine lent for minutes, prepared by "
              "`benchmarks/gpu_prepare.py`: to fit that machine's 64 MiB transfer limit the photos were "
              "re-encoded as JPEG quality 90 at their original size, and selective search was not rerun there "
              "(its image lacks opencv-contrib): stage 2 used the full CPU study's 500 px proposals, so both "
              "studies mine the same boxes. One seed is not a spread: read these rows as one draw.", ""]
        pc = results.get("paths_check")
        if pc:
            L += [f"CUDA paths against the CPU on {pc.get('device', 'n/a')} (torch {pc.get('torch', 'n/a')}; "
                  "`benchmarks/results/gpu/gpu_paths.json`): image KNN on "
                  f"{pc['knn']['rows']} random unit vectors, {pc['knn']['identical_indices']:.1%} of neighbour "
                  "indices identical to an exact numpy search; RoI features of "
                  + "; ".join(f"`{m}` mode on {pc[m]['images']} photos ({pc[m]['boxes']} boxes): largest feature "
                              f"difference {pc[m]['max_feature_diff']:.1e}, {pc[m]['pairs_identical_share']:.1%} of "
                              "mined pairs identical" for m in ("crop", "roi_align") if m in pc)
                  + f". Overall: {'pass' if pc.get('ok') else 'FAIL'}.", ""]
    planned, have = results.get("seeds", []), done_seeds(units)
    if set(planned) - set(have):
        L += [f"> **Partial:** results for seed(s) {', '.join(map(str, have)) or 'none'} of the planned "
              f"{', '.join(map(str, planned))}. Rerunning the same command resumes.", ""]
    # -- setup
    counts = results.get("images", {})
    L += ["### Setup", "",
          f"- Photos pre-trained on (labels unused): {counts.get('total', 'n/a')} "
          f"({', '.join(f'{k}: {v}' for k, v in counts.get('per_dataset', {}).items())}).",
          "- Labelled images for evaluation (train / val): "
          + "; ".join(f"{k}: {v['train']} / {v['val']}" for k, v in results.get("labels", {}).items()) + ".",
          f"- Preset `{st['preset']}` with overrides `{json.dumps(st['overrides'])}`: backbone "
          f"{m.get('backbone', 'n/a')}, global views {m.get('image_size', 'n/a')} px, RoI patches "
          f"{m.get('patch_size', 'n/a')} px, batch {m.get('batch_size', 'n/a')}.",
          f"- N = {N} epochs. Stage-1 snapshots mined after {', '.join(str(e) for e in (st.get('mine_epochs') or st['snapshots']))} epochs"
          + (" (and evaluated at random init, epoch 0)" if 0 in st["snapshots"] and 0 not in (st.get("mine_epochs") or [0]) else "")
          + ". "
          f"Seeds with results: {', '.join(str(s) for s in done_seeds(units)) or 'none'}. Spread = sample standard deviation "
          f"over seeds (ddof 1); `(n=1)` marks a single seed.",
          f"- Stage-2 default: {json.dumps(DEFAULT_MINE)} (other fields from the preset), K = "
          f"{m.get('knn_k', 'n/a')} neighbours, max(1, int({m.get('pair_ratio', 'n/a')} x query boxes)) pairs per neighbour.",
          f"- Machine: {m.get('cpu', 'n/a')}, {m.get('cpu_count', 'n/a')} cores visible, torch threads "
          f"{m.get('torch_threads', 'n/a')}, device `{m.get('device', 'n/a')}`, torch {m.get('torch', 'n/a')}, "
          f"Python {m.get('python', 'n/a')}, commit {m.get('git_commit', 'n/a')}"
          f"{' (with uncommitted changes)' if m.get('git_dirty') else ''}.", ""]
    cost = {kind: sum(r.get("seconds", 0) for k, r in units.items() if k.startswith(kind + "/"))
            for kind in ("train", "mine", "eval")}
    cpu = {kind: sum(r.get("cpu_seconds", 0) for k, r in units.items() if k.startswith(kind + "/"))
           for kind in ("train", "mine", "eval")}
    if any(cost.values()):
        L += ["Time spent, summed over units (wall / CPU minutes): " + "; ".join(
            f"{kind} {cost[kind] / 60:.1f} / {cpu[kind] / 60:.1f}" for kind in cost)
            + f"; total {sum(cost.values()) / 60:.1f} / {sum(cpu.values()) / 60:.1f}. Selective search, shared by "
            "every mining run of one scale, is counted in the first mining run of each scale.", ""]
    if st.get("runs") is not None or not st.get("svm", True):
        L += [f"This mode trains only {', '.join(st['runs'] or [])}"
              + ("" if st.get("svm", True) else "; the SVM is not run (CPU-bound), so its column is n/a") + ".", ""]
    inv = results.get("invocations", [])
    if inv:
        L += ["Commands run (each invocation; a rerun resumes). The load average counts other work on the "
              "machine too:", "", "| started | command | device, torch threads | wall s | load avg at start |",
              "|---|---|---|---|---|"]
        for i in inv:
            wall = "n/a (interrupted)" if i.get("wall_s") is None else f"{i['wall_s']:.0f}"
            L.append(f"| {i['started']} | `{i['command']}` | {i.get('device', 'n/a')}, {i.get('threads', 'n/a')} | "
                     f"{wall} | {', '.join(f'{x:.1f}' for x in i.get('load_avg', []))} |")
        L.append("")

    # -- pairs
    mnames = mine_names(units)
    if mnames:
        thr = next((r["union"]["iou"]["iou_threshold"] for r in units.values()
                    if r.get("kind") == "mine" and r.get("status") == "done"), None)
        L += ["### Are the mined pairs objects?", "",
              f"A pair is correct when both boxes match a ground-truth object of one class, by IoU >= {thr} "
              f"(the box frames the object) or by IoA >= {thr} (intersection over the box's own area: the box "
              "lies on the object, parts count). 'random' draws as many box pairs uniformly from the same two "
              "images' filtered proposals. KNN: share of (image, neighbour) pairs sharing a class, against a "
              "random other image. Labels of both datasets pooled (the KNN links photos across the two); "
              "percent, mean ± std over seeds.", "",
              "| pairs mined with | pairs | IoU prec. | random | IoA prec. | random | top-1 IoU | KNN share | random |",
              "|---|---|---|---|---|---|---|---|---|"]
        for n in mnames:
            g = lambda fn: aggregate(list(seed_values(units, "mine", n, fn).values()))  # noqa: E731
            pairs = g(lambda r: r["pairs"])
            L.append(f"| {mine_label(n, results)} | {fmt_pm(pairs, 1, 0)} | "
                     f"{fmt_pm(g(pairs_fn('iou', 'precision')), nd=2)} | {fmt_pm(g(pairs_fn('iou', 'random_precision')), nd=2)} | "
                     f"{fmt_pm(g(pairs_fn('ioa', 'precision')), nd=2)} | {fmt_pm(g(pairs_fn('ioa', 'random_precision')), nd=2)} | "
                     f"{fmt_pm(g(pairs_fn('iou', 'top1_precision')), nd=2)} | {fmt_pm(g(pairs_fn('iou', 'knn_share')))} | "
                     f"{fmt_pm(g(pairs_fn('iou', 'knn_random_share')))} |")
        L += ["", "Per dataset (IoU rule; only pairs whose two photos are both in that dataset):", "",
              "| pairs mined with | " + " | ".join(f"{d} prec. | random" for d in DATASETS) + " |",
              "|---|" + "---|---|" * len(DATASETS)]
        for n in mnames:
            cells = []
            for d in DATASETS:
                for f in ("precision", "random_precision"):
                    cells.append(fmt_pm(aggregate(list(seed_values(units, "mine", n, pairs_fn("iou", f, d)).values())), nd=2))
            L.append(f"| {mine_label(n, results)} | " + " | ".join(cells) + " |")
        L.append("")
        if "precision" in plots:
            L += [f"![precision against stage-1 epochs]({plots['precision']})", ""]

    # -- representations
    enames = eval_names(units)
    if enames:
        L += ["### Representation quality (frozen features)", "",
              "Object probe: every ground-truth box of the train2017 images is cut out, warped to the training "
              "resolution and embedded (pooled res5); kNN (similarity-weighted) and a linear probe are fit on them "
              "and score the val2017 boxes. SVM: the VOC07-style multi-label linear SVM on whole images (2x2 "
              "pooled res5), mAP over the classes with enough positives to cross-validate. Each dataset is "
              "evaluated with its own labels; the table gives the mean of the two, percent, mean ± std over seeds.", "",
              "| pre-training | epochs | training min (this run) | " + " | ".join(lab for _, lab in EVAL_METRICS) + " |",
              "|---|---|---|" + "---|" * len(EVAL_METRICS)]
        first = first_eval(units)
        if first:
            L.append("| chance: majority class (probe), positive rate (SVM) | | | " + " | ".join(
                fmt_pm(aggregate([dataset_mean(first, CHANCE[k])])).replace(" (n=1)", "") for k, _ in EVAL_METRICS) + " |")
        for n in enames:
            tmin = aggregate(list(seed_values(units, "train", n, lambda r: r["train_seconds"] / 60).values())) \
                if n != RANDOM_INIT else {"mean": None, "std": None, "n": 0}
            epochs = "0" if n == RANDOM_INIT else epochs_label(n, N)
            L.append(f"| {run_label(n)} | {epochs} | {fmt_pm(tmin, 1, 1)} | " + " | ".join(
                fmt_pm(aggregate(list(seed_values(units, "eval", n, metric_fn(k, None)).values())))
                for k, _ in EVAL_METRICS) + " |")
        L += ["", "Per dataset:", "",
              "| pre-training | " + " | ".join(f"{lab} {d}" for k, lab in EVAL_METRICS for d in DATASETS) + " |",
              "|---|" + "---|" * (len(EVAL_METRICS) * len(DATASETS))]
        for n in enames:
            L.append(f"| {run_label(n)} | " + " | ".join(
                fmt_pm(aggregate(list(seed_values(units, "eval", n, metric_fn(k, d)).values())))
                for k, _ in EVAL_METRICS for d in DATASETS) + " |")
        sizes = next((r["datasets"] for r in units.values() if r.get("kind") == "eval" and r.get("status") == "done"), {})
        if sizes:
            L += ["", "Evaluation sizes (first evaluated checkpoint): " + "; ".join(
                f"{d}: {v['train_crops']} train / {v['val_crops']} val crops, {v['train_images']} / "
                f"{v['val_images']} images, SVM mAP over {v['svm_classes']} classes "
                f"(+{v['svm_classes_small']} too small to cross-validate)" for d, v in sizes.items()) + "."]
        L.append("")
        if "probe" in plots:
            L += [f"![probe accuracy per method]({plots['probe']})", ""]

        # -- paired comparisons
        rows = [(a, b, what) for a, b, what in COMPARISONS if a in enames and b in enames]
        if rows:
            L += ["### Paired comparisons", "",
                  "Difference a - b in points (mean over the two datasets), mean ± std over seeds, and in how "
                  "many seeds a is higher.", "",
                  "| a | b | what it measures | " + " | ".join(lab for _, lab in EVAL_METRICS) + " |",
                  "|---|---|---|" + "---|" * len(EVAL_METRICS)]
            for a, b, what in rows:
                L.append(f"| {run_label(a)} | {run_label(b)} | {what} | " + " | ".join(
                    fmt_diff(paired(seed_values(units, "eval", a, metric_fn(k, None)),
                                    seed_values(units, "eval", b, metric_fn(k, None)))) for k, _ in EVAL_METRICS) + " |")
            L.append("")
    if "loss" in plots:
        L += ["### Training loss", "", f"![training loss curves]({plots['loss']})", "",
              "Left: the total loss (ORL sums three symmetric BYOL losses, so its scale differs from BYOL's). "
              "Right: the global (image-level) loss alone, the term every run shares. Mean over seeds per epoch.", ""]
    L += findings(results)
    stale = recomputed_inputs(units, N)
    if stale:
        L += ["### Units whose inputs were recomputed later", "",
              "A later invocation recomputed these inputs because their files were gone (the GPU machine "
              "keeps nothing between calls). The unit's numbers come from the earlier version of the input: "
              "same recipe and seed, not bit-identical on a GPU.", ""]
        L += [f"- `{k}` used an earlier `{d}`" for k, d in stale] + [""]
    bad = {k: r for k, r in units.items() if r.get("status") != "done"}
    if bad or results.get("skipped"):
        L += ["### Units that failed or were not run", ""]
        L += [f"- `{k}`: {r.get('error', r.get('status'))}" for k, r in bad.items()]
        L += [f"- `{k}`: not run (time budget)" for k in results.get("skipped", [])]
        L.append("")
    return L


def unit_inputs(key: str, n: int) -> list[str]:
    """The units whose outputs ``key`` consumed (N = ``n``)."""
    kind, s, name = key.split("/", 2)
    stage1 = f"train/{s}/byol_N"
    if kind == "eval":
        return [stage1 if name == RANDOM_INIT else f"train/{s}/{name}"]
    if kind == "mine":
        return [stage1] + ([f"mine/{s}/ep{n}"] if VARIANTS.get(name) and VARIANTS[name].rule == "mutual" else [])
    spec = RUN_BY_NAME.get(name)
    if spec is None or spec.stage == "byol":
        return []
    return [f"mine/{s}/" + (f"ep{n}" if spec.pairs == "default" else spec.pairs)] + ([stage1] if spec.init else [])


def recomputed_inputs(units: dict[str, dict], n: int) -> list[tuple[str, str]]:
    """(unit, input) where the input was recorded after the unit: a later invocation
    recomputed the input (its files were gone), so the unit's numbers belong to the earlier
    version of that input. Same recipe and seed, but not bit-identical on a GPU."""
    out = []
    for key, rec in units.items():
        for dep in unit_inputs(key, n):
            d = units.get(dep)
            if rec.get("status") == "done" and d and d.get("recorded_at", "") > rec.get("recorded_at", ""):
                out.append((key, dep))
    return sorted(out)


def first_eval(units: dict[str, dict]) -> dict | None:
    """The first done evaluation record (by key), or None."""
    return next((r for k, r in sorted(units.items()) if k.startswith("eval/") and r.get("status") == "done"), None)


def done_seeds(units: dict[str, dict]) -> list[int]:
    return sorted({int(k.split("/")[1][1:]) for k, r in units.items() if r.get("status") == "done"})


def epochs_label(name: str, n: int) -> str:
    spec = RUN_BY_NAME[name]
    if spec.stage == "byol":
        return str(n * spec.epochs_mult)
    return f"{n} + {n}"


def in_short(results: dict) -> list[str]:
    """Three headline comparisons first (the details and caveats follow in the section)."""
    units, N = results["units"], results["settings"]["epochs"]
    ev = lambda n, k: seed_values(units, "eval", n, metric_fn(k, None))  # noqa: E731
    rows = []
    for a, b, what in (("byol_N", RANDOM_INIT, "Any pre-training vs none (BYOL N minus the random-init network)"),
                       ("orl", "byol_2N", "ORL vs BYOL at equal epochs (BYOL N + ORL N minus BYOL 2N)")):
        ps = [(lab, paired(ev(a, k), ev(b, k))) for k, lab in EVAL_METRICS]
        if any(p["n"] for _, p in ps):
            rows.append(f"- {what}: " + "; ".join(f"{lab} {fmt_diff(p)}" for lab, p in ps if p["n"]) + ".")
    p = paired(seed_values(units, "mine", f"ep{N}", pairs_fn("ioa", "precision")),
               seed_values(units, "mine", f"ep{N}", pairs_fn("ioa", "random_precision")))
    if p["n"]:
        rows.append(f"- Mined pairs vs random box pairs from the same images (IoA precision): {fmt_diff(p, nd=2)}.")
    if not rows:
        return []
    pre = [paired(ev("byol_N", k), ev(RANDOM_INIT, k)) for k, _ in EVAL_METRICS]
    eq = [p for p in (paired(ev("orl", k), ev("byol_2N", k)) for k, _ in EVAL_METRICS) if p["n"] >= 2]
    if any(p["n"] >= 2 for p in pre) and not any(p["n"] and p["wins"] == p["n"] for p in pre) and eq:
        big = max(abs(p["diff_mean"]) for p in eq) * 100
        spread = max(p["diff_std"] for p in eq) * 100
        rows.append("- So at this scale BYOL pre-training does not beat a random-init network on every seed of "
                    f"any metric: the features have barely moved. ORL minus BYOL 2N is at most {big:.1f} points "
                    f"on any metric, the size of the seed spread (up to {spread:.1f}), so this setup cannot "
                    "resolve it. That is not evidence for or against the paper, which needs far longer "
                    "pre-training (see 'What they do not show').")
    return ["**In short** (points, mean ± std over seeds, and in how many seeds the first is higher; the "
            "tables below hold every number and the caveats):", ""] + rows + [""]


def findings(results: dict) -> list[str]:
    """The 'what the numbers do and do not show' text: generated from the numbers."""
    units, N = results["units"], results["settings"]["epochs"]
    L = ["### What these numbers show, and what they do not", ""]
    if results["mode"] == "quick":
        L += ["- Quick mode: the sentences below are generated by the same code as for the full study, "
              "but on a pipeline check; read them as a test of the report, not as evidence.", ""]

    def cmp(a, b, k):  # eval metric k, mean over datasets, a - b per seed
        return paired(seed_values(units, "eval", a, metric_fn(k, None)), seed_values(units, "eval", b, metric_fn(k, None)))

    # 1. pairs
    d = f"ep{N}"
    if any(k.startswith("mine/") and k.endswith("/" + d) for k in units):
        for rule in ("iou", "ioa"):
            p = paired(seed_values(units, "mine", d, pairs_fn(rule, "precision")),
                       seed_values(units, "mine", d, pairs_fn(rule, "random_precision")))
            if p["n"]:
                L.append(f"- Mined pairs vs random box pairs from the same images ({RULE_NAMES[rule]} rule, stage 1 "
                         f"after {N} epochs): {fmt_diff(p, nd=2)} points, {verdict(p)}.")
        p = paired(seed_values(units, "mine", d, pairs_fn("iou", "knn_share")),
                   seed_values(units, "mine", d, pairs_fn("iou", "knn_random_share")))
        if p["n"]:
            L.append(f"- Image KNN: share of neighbours sharing a class with the query minus the share for random "
                     f"images: {fmt_diff(p)} points, {verdict(p)}.")
        eps = sorted(int(k.rsplit('/', 1)[1][2:]) for k in units if k.startswith("mine/") and k.rsplit("/", 1)[1].startswith("ep"))
        if eps and eps[0] < N:
            p = paired(seed_values(units, "mine", d, pairs_fn("iou", "precision")),
                       seed_values(units, "mine", f"ep{eps[0]}", pairs_fn("iou", "precision")))
            if p["n"]:
                L.append(f"- IoU precision with the stage-1 checkpoint after {N} epochs minus after {eps[0]} epochs: "
                         f"{fmt_diff(p, nd=2)} points, {verdict(p)}. Whether more stage-1 training mines better pairs at "
                         "this scale is read here, not assumed.")
        for v in VARIANTS:
            p = paired(seed_values(units, "mine", v, pairs_fn("iou", "precision")),
                       seed_values(units, "mine", d, pairs_fn("iou", "precision")))
            if p["n"]:
                L.append(f"- Pair precision (IoU), {VARIANTS[v].label} minus the default: {fmt_diff(p, nd=2)} points, {verdict(p)}.")
        L.append("")

    # 2. representations
    if any(k.startswith("eval/") for k in units):
        not_win, measured = [], 0
        for a, b, _ in EQUAL_EPOCHS:
            for k, lab in EVAL_METRICS:
                p = cmp(a, b, k)
                measured += bool(p["n"])
                if p["n"] and p["wins"] < p["n"]:
                    not_win.append(f"{run_label(a)} vs {run_label(b)}, {lab}: {fmt_diff(p)}, {verdict(p)}")
        eq = [(k, lab, cmp("orl", "byol_2N", k)) for k, lab in EVAL_METRICS]
        if any(p["n"] for _, _, p in eq):
            L.append("- Equal epochs (Table 5e's comparison), ORL (authors' recipe) minus BYOL 2N: " + "; ".join(
                f"{lab} {fmt_diff(p)} ({verdict(p)})" for _, lab, p in eq if p["n"]) + ".")
        what = {(a, b): w for a, b, w in COMPARISONS}
        for a, b in (("orl", "orl_no_inter"), ("orl", "orl_no_intra"), ("orl_init", "orl"),
                     ("orl_roi_align", "orl"), ("orl_ss320", "orl"), ("orl_mutual", "orl"),
                     ("byol_N", RANDOM_INIT)):
            ps = [(lab, cmp(a, b, k)) for k, lab in EVAL_METRICS]
            if any(p["n"] for _, p in ps):
                L.append(f"- {what[(a, b)][0].upper() + what[(a, b)][1:]}, {run_label(a)} minus {run_label(b)}: "
                         + "; ".join(f"{lab} {fmt_diff(p)} ({verdict(p)})" for lab, p in ps if p["n"]) + ".")
        L.append("")
        # The linear probe's fixed C = 1 over-fits a few hundred crops in 512+ dimensions;
        # say so when it lands below the majority-class rate (the number alone would mislead).
        lin = aggregate([dataset_mean(r, "linear_acc") for k, r in units.items()
                         if k.startswith("eval/") and r.get("status") == "done"])
        maj = aggregate([dataset_mean(r, "majority_acc") for k, r in units.items()
                         if k.startswith("eval/") and r.get("status") == "done"])
        if lin["mean"] is not None and maj["mean"] is not None and lin["mean"] < maj["mean"]:
            L += [f"- The linear probe scores below always answering the majority class (mean over every "
                  f"evaluation {lin['mean'] * 100:.1f} against {maj['mean'] * 100:.1f}): with a few hundred "
                  "training crops and 512 or more dimensions, its fixed L2 strength (C = 1) over-fits. Its "
                  "differences between methods are still paired on the same crops, but kNN is the more "
                  "trustworthy probe here; choosing C by cross-validation is the fix, not applied to this study "
                  "so that all of its evaluations share one protocol.", ""]
        if not_win:
            L += ["**Where ORL does not win** against BYOL trained for the same number of epochs (every ORL "
                  "pre-training of this study vs BYOL 2N; listed when not higher in every seed):", ""] \
                + [f"- {x}" for x in not_win] + [""]
        elif measured:
            L += ["Every ORL pre-training measured was higher than BYOL 2N in every seed on every metric.", ""]

    # 3. limits that hold whatever the numbers
    t = {n: aggregate(list(seed_values(units, "train", n, lambda r: r["train_seconds"]).values()))["mean"]
         for n in ("byol_N", "byol_2N", "orl")}
    L += ["What they do not show:", "",
          f"- Scale. The paper pre-trains a ResNet-50 for hundreds of epochs on COCO; this study pre-trains "
          f"{results.get('machine', {}).get('backbone', 'n/a')} for N = {N} epochs on "
          f"{results.get('images', {}).get('total', 'n/a')} photos. It tests whether the *shape* of the paper's "
          "claims appears at this scale, not the paper's numbers; a null result here does not refute them.",
          "- Transfer. The paper's headline numbers are transfer benchmarks (VOC07 SVM, detection). Here the "
          "features are probed on held-out photos of the same distribution, with small val sets (sizes above): "
          "differences smaller than the seed spread are noise.",
          "- Equal epochs are not equal compute. An ORL step runs three branches per image (global views, "
          "intra-RoI patches, inter-RoI patches) through the online and target networks, and decodes a second "
          "photo; stage 3 also needs stage 2 (mining)."
          + (f" Measured training time: BYOL N {t['byol_N'] / 60:.1f} min, BYOL 2N {t['byol_2N'] / 60:.1f} min, "
             f"ORL N {t['orl'] / 60:.1f} min (mining: the `mine/` units in the JSON)."
             if all(v is not None for v in t.values()) else ""),
          "- Pair precision depends on the matching rule: IoU >= threshold misses boxes on object parts, which "
          "the paper counts as useful pairs; IoA counts them but also credits small boxes inside large objects. "
          "Both are reported; neither is what stage 3 optimises. COCO labels 80 classes only, so a pair on an "
          "unlabelled object (a window, a wall, a lamp) counts as wrong, and precision is a lower bound.",
          "- Chance levels matter: COCO crops are dominated by a few classes (the majority-class row), and a "
          "randomly initialised network (the random-init row) already scores well above zero.",
          "- The ablation turns a loss term off with its weight (w = 0): orl.train then skips that branch "
          "entirely (no forward pass, no BatchNorm update), so the ablated run also costs less time.", ""]
    return L


def make_plots(results: dict, out_dir: Path, doc_dir: Path = DOC.parent) -> dict[str, str]:
    """Write study_<mode>_{loss,precision,probe}.png; return {kind: path relative to doc_dir}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    mode, units, N = results["mode"], results["units"], results["settings"]["epochs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(out_dir, doc_dir)
    written = {}

    def save(fig, kind: str, title: str, rect=(0, 0, 1, 1)) -> None:
        fig.suptitle(f"{title} ({mode})")
        fig.tight_layout(rect=rect)
        p = out_dir / f"study_{mode}_{kind}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written[kind] = f"{rel}/{p.name}"

    # training loss curves
    names = [r.name for r in RUNS if seed_values(units, "train", r.name, lambda r: r)]
    if names:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for n in names:
            for ax, key in zip(axes, ("total", "global")):
                curves = [c for c in seed_values(units, "train", n, lambda r: r["loss"].get(key)).values() if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                arr = np.array([[np.nan if v is None else v for v in c[:length]] for c in curves], dtype=float)
                ax.plot(np.arange(1, length + 1), np.nanmean(arr, axis=0), marker=".",
                        ls="--" if RUN_BY_NAME[n].stage == "byol" else "-", label=run_label(n))
        for ax, t in zip(axes, ("total loss", "global (image-level) loss")):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch of this run")
            ax.set_ylabel(t)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        save(fig, "loss", "Training loss per epoch, mean over seeds")

    # precision against stage-1 epochs (+ options at epoch N)
    eps = sorted({int(k.rsplit("/", 1)[1][2:]) for k in units
                  if k.startswith("mine/") and k.rsplit("/", 1)[1].startswith("ep")})
    if eps:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))

        def series(name, fn):
            a = aggregate(list(seed_values(units, "mine", name, fn).values()))
            return (np.nan if a["mean"] is None else 100 * a["mean"]), (0 if a["std"] is None else 100 * a["std"])

        for rule, color in (("iou", "C0"), ("ioa", "C1")):
            for field_, ls, lab in (("precision", "-", "mined"), ("random_precision", ":", "random pairs")):
                ys = [series(f"ep{e}", pairs_fn(rule, field_)) for e in eps]
                axes[0].errorbar(eps, [y for y, _ in ys], yerr=[s for _, s in ys], color=color, ls=ls, marker="o",
                                 capsize=3, label=f"{RULE_NAMES[rule]}: {lab}")
        for i, (v, mk) in enumerate(zip(VARIANTS, ("s", "^", "D"))):
            if seed_values(units, "mine", v, lambda r: r):
                y, s = series(v, pairs_fn("iou", "precision"))
                axes[0].errorbar([N + 0.15 * (i + 1)], [y], yerr=[s], color="C3", marker=mk, ls="none", capsize=3,
                                 label=f"IoU: {VARIANTS[v].label}")
        for field_, ls, lab in (("knn_share", "-", "KNN neighbours"), ("knn_random_share", ":", "random images")):
            ys = [series(f"ep{e}", pairs_fn("iou", field_)) for e in eps]
            axes[1].errorbar(eps, [y for y, _ in ys], yerr=[s for _, s in ys], color="C2", ls=ls, marker="o",
                             capsize=3, label=lab)
        axes[0].set_ylabel("pair precision (%)")
        axes[1].set_ylabel("share of image pairs with a common class (%)")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("stage-1 (BYOL) epochs of the mining checkpoint")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "precision", "Stage-2 quality against stage-1 epochs, mean ± std over seeds")

    # probe accuracy per method
    enames = eval_names(units)
    if enames:
        fig, axes = plt.subplots(1, len(EVAL_METRICS), figsize=(5 * len(EVAL_METRICS), 5.5), sharey=False)
        x = np.arange(len(enames))
        first = first_eval(units)
        for ax, (k, lab) in zip(axes, EVAL_METRICS):
            aggs = [aggregate(list(seed_values(units, "eval", n, metric_fn(k, None)).values())) for n in enames]
            if all(a["mean"] is None for a in aggs):
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(f"{lab} (%)", fontsize=10)
                ax.set_xticks([])
                continue
            c = dataset_mean(first, CHANCE[k])
            means = [np.nan if a["mean"] is None else 100 * a["mean"] for a in aggs]
            stds = [0 if a["std"] is None else 100 * a["std"] for a in aggs]
            colors = ["0.6" if n == RANDOM_INIT else ("C0" if RUN_BY_NAME[n].stage == "byol" else "C1") for n in enames]
            ax.bar(x, means, yerr=stds, color=colors, capsize=3)
            for xi, a in zip(x, aggs):
                ax.plot([xi] * len(a["values"]), [100 * v for v in a["values"]], "k.", ms=4)
            ax.set_xticks(x)
            ax.set_xticklabels([n for n in enames], rotation=60, ha="right", fontsize=8)
            ax.set_title(f"{lab} (%)", fontsize=10)
            finite = [m for m in means if not np.isnan(m)] + ([100 * c] if c is not None else [])
            if c is not None:
                ax.axhline(100 * c, color="k", ls="--", lw=1)
            lo = min(finite) - 3 * (max(stds) + 1)
            ax.set_ylim(max(0, lo), max(finite) + 3 * (max(stds) + 1))
            ax.grid(axis="y", alpha=0.3)
        fig.legend(handles=[Patch(color="0.6", label="no training"), Patch(color="C0", label="BYOL"),
                            Patch(color="C1", label="ORL (after BYOL N)"),
                            plt.Line2D([], [], color="k", ls="--", label="chance")],
                   loc="lower center", ncol=4, fontsize=8)
        save(fig, "probe", "Frozen-feature quality per pre-training, mean over datasets; bars mean ± std, dots seeds",
             rect=(0, 0.06, 1, 1))
    return written


def render_report(all_results: dict[str, dict], plots: dict[str, dict[str, str]]) -> str:
    """The whole docs/RESULTS.md from the results of each mode present."""
    L = ["# Results: does our ORL beat BYOL on real scene photos, and are the mined pairs objects?", "",
         "Generated by `benchmarks/study.py` from `benchmarks/results/study*.json`; do not edit by hand "
         "(`python benchmarks/study.py --report-only` regenerates it). Every number below comes from those files.", "",
         "Commands:", "",
         "```",
         "python benchmarks/study.py                # full study: about 2 hours on 2 CPU cores; resumable (rerun it)",
         "python benchmarks/study.py --quick        # pipeline check in minutes; numbers mean nothing",
         "python benchmarks/study.py --gpu          # one CUDA GPU, one run under 5 minutes",
         "python benchmarks/study.py --report-only  # rebuild this file and the plots from the JSON",
         "```", ""]
    if "full" not in all_results:
        L += ["> **The full study has not been run yet.** Only the sections below exist. Run "
              "`python benchmarks/study.py` to produce the evidence.", ""]
    for mode in ("full", "gpu", "quick"):
        if mode in all_results:
            L += section(all_results[mode], plots.get(mode, {}))
    return "\n".join(L).rstrip() + "\n"


def result_path(mode: str) -> Path:
    return RESULTS_DIR / ("study.json" if mode == "full" else f"study_{mode}.json")


def write_report(results_dir: Path = RESULTS_DIR, doc: Path = DOC) -> Path:
    all_results = {}
    for mode in MODES:
        p = results_dir / result_path(mode).name
        if p.exists():
            all_results[mode] = json.loads(p.read_text())
    check = results_dir / "gpu" / "gpu_paths.json"  # benchmarks/gpu_check.sh's CUDA-path check
    if "gpu" in all_results and check.exists():
        all_results["gpu"]["paths_check"] = json.loads(check.read_text())
    plots = {mode: make_plots(r, results_dir, doc.parent) for mode, r in all_results.items()}
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_report(all_results, plots))
    return doc


# ==========================================================================================
# Main
# ==========================================================================================
def machine_info(study: Study) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = study.device
    def git(*a: str) -> str:  # "" where git or the repository is absent (a copied tree on a GPU box)
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    cfg = study.cfg
    return {"cpu": cpu, "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "git_commit": git("rev-parse", "--short", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "backbone": cfg.model.backbone, "image_size": cfg.augment.image_size, "patch_size": cfg.augment.patch_size,
            "batch_size": cfg.train.batch_size, "knn_k": cfg.mine.knn_k, "pair_ratio": cfg.mine.pair_ratio}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="pipeline check in minutes (tiny preset, few photos)")
    g.add_argument("--gpu", action="store_true", help="larger configuration on one CUDA GPU, under 5 minutes")
    g.add_argument("--report-only", action="store_true", help="only regenerate docs/RESULTS.md and the plots")
    p.add_argument("--seeds", help="comma-separated seeds (default: the mode's); seeds can be added later")
    p.add_argument("--runs", help="comma-separated stage-3 / BYOL runs to train and evaluate (default: the "
                   f"mode's); runs can be added to an existing result. Names: {', '.join(RUN_BY_NAME)}")
    p.add_argument("--epochs", type=int, help="N (default: the mode's); changing it needs --fresh or --out")
    p.add_argument("--work", help="cache folder (default benchmarks/work/study_<mode>)")
    p.add_argument("--out", help="results folder (default benchmarks/results): study[_<mode>].json and plots")
    p.add_argument("--doc", default=str(DOC), help="the report to regenerate (default docs/RESULTS.md)")
    p.add_argument("--data", default=str(DATA), help="folder holding coco128/ and coco-mini/")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=float, help="start no new unit after this many minutes")
    p.add_argument("--threads", type=int, help="torch threads (default: the mode's: full 2, quick 1, --gpu torch's default)")
    p.add_argument("--fresh", action="store_true", help="discard existing results json (cached stage outputs are reused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    results_dir = Path(args.out) if args.out else RESULTS_DIR
    if args.report_only:
        print(f"wrote {write_report(results_dir, Path(args.doc))}")
        return 0
    name = "quick" if args.quick else "gpu" if args.gpu else "full"
    mode = MODES[name]
    if args.epochs:
        mode = dataclasses.replace(
            mode, epochs=args.epochs,
            snapshots=tuple(sorted({e for e in mode.snapshots if e < args.epochs} | {args.epochs})),
            mine_epochs=None if mode.mine_epochs is None else
            tuple(sorted({e for e in mode.mine_epochs if e < args.epochs} | {args.epochs})))
    if args.seeds:
        mode = dataclasses.replace(mode, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.runs:
        runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
        unknown = [r for r in runs if r not in RUN_BY_NAME]
        if unknown:
            print(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUN_BY_NAME)}", file=sys.stderr)
            return 2
        mode = dataclasses.replace(mode, runs=runs)
    assert mode.epochs in mode.snapshots and mode.epochs in (mode.mine_epochs or mode.snapshots), \
        "stage 3 trains on the pairs of the final stage-1 snapshot"
    if args.max_minutes is not None:
        mode = dataclasses.replace(mode, max_minutes=args.max_minutes)
    if args.threads is not None:
        mode = dataclasses.replace(mode, threads=args.threads)
    if name == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("--gpu needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    out = results_dir / result_path(name).name
    work = Path(args.work) if args.work else REPO / "benchmarks" / "work" / f"study_{name}"
    try:
        store = ResultsStore(out, name, mode.settings(), fresh=args.fresh)
    except SettingsMismatch as exc:
        print(exc, file=sys.stderr)
        return 2
    study = Study(mode, work, store, Path(args.data), args.device)
    d = store.data
    d["machine"] = machine_info(study)
    d["seeds"] = sorted(set(d.get("seeds", [])) | set(mode.seeds))
    d["images"] = {"total": len(study.files),
                   "per_dataset": {k: sum(f.startswith(k + "/") for f in study.files) for k in DATASETS}}
    d["labels"] = {k: {"train": len(g.images("train")), "val": len(g.images("val"))} for k, g in study.gts.items()}
    inv = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join(["python benchmarks/study.py", *(sys.argv[1:] if argv is None else argv)]),
           "load_avg": list(os.getloadavg()), "wall_s": None, "device": d["machine"]["device"],
           "threads": d["machine"]["torch_threads"]}
    d["invocations"].append(inv)
    store.save()
    try:
        study.run()
    finally:
        inv["wall_s"] = time.perf_counter() - t0
        d["skipped"] = store.skipped
        store.save()
        print(f"results: {out}; report: {write_report(results_dir, Path(args.doc))}; wall {inv['wall_s']:.0f} s",
              flush=True)
    if store.errors:
        print(f"{len(store.errors)} unit(s) failed: {', '.join(store.errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
