"""The units of work of one mode, and the order they run in.

Kinds of unit (key = kind/s<seed>/<name>):
  train/s0/byol@e<E>   stage 1 (BYOL) continued up to epoch E of N; its checkpoint is kept
                       as the snapshot "e<E>" (E = 0: the random-init network, no training)
  train/s0/e0bn        the random-init network with BatchNorm statistics recomputed on the photos
  train/s0/control     the supervised positive control (control.py)
  train/s0/<run>       M more epochs after stage 1: BYOL continued, ORL, ablations (plan.RUNS)
  mine/s0/<ckpt>[+<variant>]   stage 2 with a checkpoint, scored against the labels
  eval/s0/<ckpt>       frozen features: object probe, label-free signals, the SVM for final ones

Getters (``checkpoint``, ``mined``) are lazy and memoised: a unit's input that is missing on
disk (a new machine) is recomputed by running its unit again, and that unit's record then says
``recomputed``. A done unit is never rerun for its own sake, only when a later unit needs its
files. Training resumes from its run folder's last.pt, so even a killed chunk loses only the
steps since its last checkpoint (every 50 steps).

The work folder does not survive a new checkout, and every run after stage 1 needs the final
stage-1 checkpoint and its pairs (about 95 minutes to recompute on 2 cores in the long mode).
Those two are kept (``keep``): the model weights in float16 (48 MB for ResNet-18, online +
target; no optimizer state, which stage 3's init does not read) and the pairs file; in git
(``benchmarks/results/study_<mode>_keep/``) for a mode with ``keep_in_git`` (the long one),
else in the work folder, where a new checkout recomputes them (the short mode's stage 1: about
20 minutes per seed). A getter that finds its file missing restores it from there first. A run
after stage 1 whose session ended between its training and its evaluation may be kept the same
way (``<run>.pt``), by hand: ``units.keep_checkpoint(work/s0/<run>/last.pt, keep/s0/<run>.pt)``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .data import build_image_folder, class_sharing_pairs, load_ground_truths
from .plan import RANDOM_BN, RUNS, VARIANTS, MineVariant, Mode, default_mining, eval_with_svm, unit_keys
from .store import MissingInput, ResultsStore

LABEL_FREE_IMAGES = 128  # fixed photos for view retrieval and effective rank


def unit_key(kind: str, seed: int, name: str) -> str:
    return f"{kind}/s{seed}/{name}"


class Study:
    def __init__(self, mode: Mode, work: Path, store: ResultsStore, data_root: Path, device: str,
                 keep: Path | None = None):
        from orl.config import get_preset
        from orl.train import resolve_device

        self.mode, self.work, self.store, self.keep = mode, work, store, keep
        self.device = resolve_device(device)
        self.cfg = get_preset(mode.preset).override(**mode.overrides).validate()
        self.images = work / "images"
        self.files = build_image_folder(data_root, self.images, mode.per_folder)
        self.gts, self.gt_union = load_ground_truths(data_root, self.files)
        self.t0 = time.time()
        self._memo: dict[tuple, Path | None] = {}
        self.kept_written: list[Path] = []  # for the runner to commit
        self.restored: set[str] = set()
        self.after_keep: Callable[[Path], None] | None = None
        if mode.threads:
            from orl.cli import set_threads

            set_threads(mode.threads)

    # -- bookkeeping ---------------------------------------------------------------------------
    def unit(self, key: str, fn: Callable[[], dict[str, Any]], outputs_exist: bool = True) -> bool:
        late = self.mode.max_minutes is not None and time.time() - self.t0 > 60 * self.mode.max_minutes
        return self.store.run_unit(key, fn, outputs_exist, late,
                                   lambda msg: print(f"[study {self.mode.name}] {msg}", flush=True))

    def memo(self, key: tuple, fn: Callable[[], Path | None]) -> Path | None:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def seed_dir(self, seed: int) -> Path:
        return self.work / f"s{seed}"

    def steps_per_epoch(self) -> int:
        from orl.data import ResumableSampler

        batch = min(self.cfg.train.batch_size, len(self.files))
        return ResumableSampler(len(self.files), batch, 0).steps_per_epoch()

    def train_cfg(self, seed: int, epochs: int, weights: dict[str, float] | None = None):
        over = {"train.epochs": epochs, "train.seed": seed, **{f"train.{k}": v for k, v in (weights or {}).items()}}
        return self.cfg.override(**over)

    def mine_cfg(self, variant: MineVariant | None, knn_features: str = "projector"):
        over = {**default_mining(self.mode.settings()), **(variant.overrides if variant else {}),
                "knn_features": knn_features}
        return self.cfg.override(**{f"mine.{k}": v for k, v in over.items()}).mine

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, seed: int, name: str) -> Path | None:
        """Path of checkpoint ``name`` ("e<E>", "e0bn", "control" or a RUNS name), training
        it (and whatever it needs) first when it is not on disk."""
        if name == RANDOM_BN:
            return self.memo(("ckpt", seed, name), lambda: self._random_bn(seed))
        if name == "control":
            return self.memo(("ckpt", seed, name), lambda: self._control(seed))
        if name in RUNS:
            return self.memo(("ckpt", seed, name), lambda: self._run(seed, name))
        return self.memo(("ckpt", seed, name), lambda: self._snapshot(seed, int(name[1:])))

    def snapshot_path(self, seed: int, epoch: int) -> Path:
        return self.seed_dir(seed) / "byol" / "snapshots" / f"e{epoch}.pt"

    def _snapshot(self, seed: int, epoch: int) -> Path | None:
        """Stage 1 continued to ``epoch`` (one unit per snapshot, so no unit trains all of N)."""
        from orl.checkpoint import load_checkpoint
        from orl.train import train

        run_dir = self.seed_dir(seed) / "byol"
        snap = self.snapshot_path(seed, epoch)
        earlier = [e for e in self.mode.snapshots if e < epoch]

        def run():
            cfg = self.train_cfg(seed, self.mode.epochs)
            if epoch == 0:
                # The random-init network: the run's seed builds it, so a separate folder gives
                # exactly the weights the stage-1 run starts from.
                init_dir = self.seed_dir(seed) / "byol_init"
                summary = train("byol", self.images, init_dir, cfg, files=self.files, device=str(self.device),
                                show_progress=False, max_steps=0)
                snap.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(init_dir / "last.pt", snap)
                return {"kind": "train", "run": "byol", "seed": seed, "snapshot_epoch": 0, "steps": 0}
            prev = self.checkpoint(seed, f"e{max(earlier)}") if earlier else None
            if earlier and prev is None:
                raise MissingInput(f"the stage-1 snapshot at epoch {max(earlier)} is missing")
            last = run_dir / "last.pt"
            target = epoch * self.steps_per_epoch()
            if last.exists() and load_checkpoint(last)["position"]["global_step"] > target:
                # The results file outlived this snapshot's file (a new machine, a deleted
                # file): stage 1 is redone from the nearest earlier snapshot.
                shutil.copy(prev, last)
            summary = train("byol", self.images, run_dir, cfg, files=self.files,
                            device=str(self.device), show_progress=False, max_steps=target)
            snap.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(last, snap)
            return {"kind": "train", "run": "byol", "seed": seed, "snapshot_epoch": epoch,
                    **train_record(run_dir, summary)}

        key = unit_key("train", seed, f"byol@e{epoch}")
        if epoch == self.mode.epochs:
            self.restore_kept(key, self.keep_path(seed, f"e{epoch}.pt"), snap, restore_checkpoint)
        ok = self.unit(key, run, snap.exists())
        kept = self.keep_path(seed, f"e{epoch}.pt")
        if ok and snap.exists() and epoch == self.mode.epochs and kept is not None:
            self.save_kept(kept, lambda p: keep_checkpoint(snap, p))
            # Every later unit reads the rounded weights, in this session and after a new
            # checkout alike, so no two runs start from different copies of stage 1.
            restore_checkpoint(kept, snap)
        return snap if ok and snap.exists() else None

    # -- the kept inputs of the runs (see the module docstring) ---------------------------------------
    def keep_path(self, seed: int, name: str) -> Path | None:
        return self.keep / f"s{seed}" / name if self.keep else None

    def restore_kept(self, key: str, kept: Path | None, dest: Path, restore: Callable[[Path, Path], None]) -> None:
        if dest.exists() or kept is None or not kept.exists() or not self.store.done(key):
            return
        restore(kept, dest)
        self.restored.add(str(kept.relative_to(self.keep)) if self.keep else str(kept))
        print(f"[study {self.mode.name}] {key}: restored {dest.name} from {kept}", flush=True)

    def save_kept(self, kept: Path | None, write: Callable[[Path], None]) -> None:
        if kept is None or kept.exists():
            return
        kept.parent.mkdir(parents=True, exist_ok=True)
        write(kept)
        self.kept_written.append(kept)
        if self.after_keep:
            self.after_keep(kept)

    def _random_bn(self, seed: int) -> Path | None:
        from torch import nn

        from orl.checkpoint import load_checkpoint, save_checkpoint
        from orl.evaluate import recompute_bn_stats
        from orl.models import build_model

        out = self.snapshot_path(seed, 0).with_name(f"{RANDOM_BN}.pt")

        def run():
            src = self.checkpoint(seed, "e0")
            if src is None:
                raise MissingInput("the random-init snapshot is missing")
            ck = load_checkpoint(src)
            model = build_model(self.cfg.model, "byol")
            model.load_state_dict(ck["model"])
            # Backbone and projector: the image KNN reads the projector, whose BatchNorm has
            # 0/1 statistics at init too.
            n = recompute_bn_stats(nn.Sequential(model.backbone, model.projector), self.images, self.files,
                                   self.cfg.augment.image_size, device=self.device)
            save_checkpoint({**{k: v for k, v in ck.items() if k != "format"}, "model": model.state_dict(),
                             "metrics": {"bn_recomputed_on_images": n}}, out)
            return {"kind": "train", "run": RANDOM_BN, "seed": seed, "bn_images": n}

        ok = self.unit(unit_key("train", seed, RANDOM_BN), run, out.exists())
        return out if ok and out.exists() else None

    def _control(self, seed: int) -> Path | None:
        from .control import train_control

        out = self.seed_dir(seed) / "control" / "control.pt"

        def run():
            rec = train_control(self.cfg, self.gts, out, self.mode.control_epochs, seed, self.device,
                                num_workers=self.cfg.train.num_workers)
            return {"kind": "train", "run": "control", "seed": seed, **rec}

        ok = self.unit(unit_key("train", seed, "control"), run, out.exists())
        return out if ok and out.exists() else None

    def _run(self, seed: int, name: str) -> Path | None:
        from orl.correspondence import Correspondence
        from orl.train import train

        spec = RUNS[name]
        out = self.seed_dir(seed) / name
        final = out / "last.pt"
        N = self.mode.epochs

        def run():
            init = self.checkpoint(seed, f"e{N}") if spec.init else None
            if spec.init and init is None:
                raise MissingInput("the stage-1 checkpoint is missing")
            cfg = self.train_cfg(seed, self.mode.more_epochs, spec.weights)
            if spec.stage == "byol":
                summary = train("byol", self.images, out, cfg, files=self.files, init_from=init,
                                device=str(self.device), show_progress=False)
            else:
                pairs = self.mined(seed, f"e{N}", features=False)
                if pairs is None:
                    raise MissingInput("the stage-1 pairs are missing")
                summary = train("orl", self.images, out, cfg, corr=Correspondence.load(pairs), init_from=init,
                                device=str(self.device), show_progress=False)
            return {"kind": "train", "run": name, "seed": seed, **train_record(out, summary),
                    "inputs_restored_from_keep": sorted(self.restored)}

        key = unit_key("train", seed, name)
        # A run trained in a session that ended before its evaluation or mining may have been
        # kept too (same float16 form as stage 1's); it is read instead of training again.
        self.restore_kept(key, self.keep_path(seed, f"{name}.pt"), final, restore_checkpoint)
        ok = self.unit(key, run, final.exists())
        return final if ok and final.exists() else None

    # -- stage 2 -----------------------------------------------------------------------------------
    def mined(self, seed: int, name: str, features: bool = True) -> Path | None:
        """correspondence.json of mining unit ``name`` ("<ckpt>" or "<ckpt>+<variant>").
        ``features``: its saved RoI features are needed too (scoring); stage 3 needs only the pairs."""
        if not features:
            corr = self.seed_dir(seed) / f"mine_{name}" / "correspondence.json"
            key = unit_key("mine", seed, name)
            if name == f"e{self.mode.epochs}":
                self.restore_kept(key, self.keep_path(seed, f"mine_{name}.json"), corr, restore_file)
            if corr.exists() and self.store.done(key):
                return corr
        return self.memo(("mine", seed, name), lambda: self._mine(seed, name))

    def _mine(self, seed: int, name: str) -> Path | None:
        from orl.checkpoint import load_model

        ckpt_name, _, vname = name.partition("+")
        variant = VARIANTS[vname] if vname else None
        out = self.seed_dir(seed) / f"mine_{name}"
        corr_path = out / "correspondence.json"

        def run():
            ckpt = self.checkpoint(seed, ckpt_name)
            if ckpt is None:
                raise MissingInput(f"checkpoint {ckpt_name} is missing")
            mc = self.mine_cfg(variant, "backbone" if ckpt_name == "control" else "projector")
            model, _, ck = load_model(ckpt)
            if variant is not None and variant.rule == "mutual":
                base = self.mined(seed, ckpt_name)
                if base is None:
                    raise MissingInput("the default mining of this checkpoint is missing")
                corr, feats, stats = mine_mutual(base, out, mc)
            else:
                corr, feats, stats = self.mine_top(model, out, mc)
            return {"kind": "mine", "checkpoint": ckpt_name, "variant": vname or None, "seed": seed,
                    "checkpoint_step": ck["position"]["global_step"],
                    "mine_params": {k: v for k, v in dataclasses.asdict(mc).items()
                                    if k in ("roi_mode", "ss_max_side_px", "roi_size", "max_boxes", "knn_k",
                                             "pair_ratio", "knn_features")},
                    "rule": variant.rule if variant else "top", "pairs": corr.num_pairs, "images": len(corr),
                    "boxes_per_image": float(np.mean([len(b) for b in corr.boxes])),
                    "stage_seconds": stats.get("seconds", {}), **score_pairs(corr, feats, self.gt_union, seed)}

        ok = self.unit(unit_key("mine", seed, name), run, corr_path.exists() and (out / "roi_features.npz").exists())
        if ok and corr_path.exists() and name == f"e{self.mode.epochs}":
            self.save_kept(self.keep_path(seed, f"mine_{name}.json"), lambda p: shutil.copy(corr_path, p))
        return corr_path if ok and corr_path.exists() else None

    def mine_top(self, model, out: Path, mc):
        """The library's stage 2; selective search is shared by every mining of one scale
        (it does not depend on the checkpoint)."""
        from orl.mining import load_roi_features, mine

        cache = self.work / "proposals" / f"ss{mc.ss_max_side_px or 'full'}.jsonl"
        local = out / "proposals.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        if cache.exists() and not local.exists():
            shutil.copy(cache, local)
        corr, stats = mine(model, self.images, self.files, out, mc, self.device, save_features=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
        return corr, load_roi_features(out / "roi_features.npz")[1], stats

    def rescore(self) -> int:
        """Recompute the pair metrics of every done mining unit whose files are on disk (the
        metrics read only the correspondence and the saved RoI features). Returns the count."""
        from orl.correspondence import Correspondence
        from orl.mining import load_roi_features

        n = 0
        for key, rec in self.store.units.items():
            kind, s, name = key.split("/", 2)
            folder = self.seed_dir(int(s[1:])) / f"mine_{name}"
            if kind != "mine" or rec.get("status") != "done" or not (folder / "roi_features.npz").exists():
                continue
            corr = Correspondence.load(folder / "correspondence.json")
            rec.update(score_pairs(corr, load_roi_features(folder / "roi_features.npz")[1], self.gt_union,
                                   int(s[1:])), rescored_at=time.strftime("%Y-%m-%d %H:%M:%S"))
            n += 1
        return n

    def mark_redo(self, runs: tuple[str, ...]) -> list[str]:
        """Mark the train, eval and mining units of ``runs`` (every seed of the mode), or the
        mining units named "<checkpoint>+<variant>", to be computed again, and remove their
        files so that training starts over, not resumes."""
        keys = []
        for seed in self.mode.seeds:
            for r in runs:
                if "+" in r:  # one mining unit
                    keys.append(unit_key("mine", seed, r))
                    continue
                keys += [unit_key("train", seed, r), unit_key("eval", seed, r)]
                keys += [k for k in self.store.units if k.startswith(unit_key("mine", seed, f"{r}+"))]
        marked = self.store.mark_redo(keys)
        for key in marked:
            kind, s, name = key.split("/", 2)
            folder = self.seed_dir(int(s[1:])) / (name if kind == "train" else f"mine_{name}")
            if kind != "eval" and folder.exists():
                shutil.rmtree(folder)
        return marked

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, seed: int, name: str, svm: bool) -> None:
        def run():
            ckpt = self.checkpoint(seed, name)
            if ckpt is None:
                raise MissingInput(f"checkpoint {name} is missing")
            return {"kind": "eval", "checkpoint": name, "seed": seed,
                    **evaluate_checkpoint(ckpt, self.gts, self.images, self.files, self.device, seed,
                                          svm and self.mode.svm, self.mode.svm_jobs)}

        self.unit(unit_key("eval", seed, name), run)

    # -- the order ------------------------------------------------------------------------------------
    def run(self) -> None:
        """Every unit of the mode in plan.unit_keys's order (the order is explained there).

        A unit already done is skipped here even when its files are gone: only a later unit
        that needs them recomputes them."""
        for key in unit_keys(self.mode.settings(), self.mode.seeds):
            if not self.store.done(key):
                self.run_key(key)

    def run_key(self, key: str) -> None:
        """One unit by its key. Training goes through the checkpoint getter (so whatever it
        needs is trained first), mining through the mining getter."""
        kind, s, name = key.split("/", 2)
        seed = int(s[1:])
        if kind == "train":
            self.checkpoint(seed, name.removeprefix("byol@"))
        elif kind == "mine":
            self.mined(seed, name)
        else:
            self.evaluate(seed, name, svm=eval_with_svm(name, self.mode.settings()))


# -- pieces (no Study state) -------------------------------------------------------------------------
def keep_checkpoint(src: Path, dest: Path) -> None:
    """The parts of a checkpoint later units read (config, stage, position, model), floating
    tensors in float16: half the size, and far below what stage 3's first steps change."""
    import torch

    from orl.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(src)
    model = {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}
    save_checkpoint({"stage": ck["stage"], "config": ck["config"], "position": ck["position"], "model": model,
                     "metrics": {**(ck.get("metrics") or {}), "kept_as": str(torch.float16)}}, dest)


def restore_checkpoint(kept: Path, dest: Path) -> None:
    from orl.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(kept)
    ck["model"] = {k: v.float() if v.is_floating_point() else v for k, v in ck["model"].items()}
    ck.pop("format", None)
    save_checkpoint(ck, dest)


def restore_file(kept: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(kept, dest.with_suffix(".tmp"))
    os.replace(dest.with_suffix(".tmp"), dest)


def train_record(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    curve, seconds = loss_curves(out / "metrics.csv", summary["batch_size"])
    return {"epochs": summary["epoch"], "steps": summary["global_step"], "total_steps": summary["total_steps"],
            "batch_size": summary["batch_size"], "images": summary["images"], "finished": summary["finished"],
            "device": summary["device"], "train_seconds": seconds, "loss": curve}


def loss_curves(metrics_csv: Path, batch: int) -> tuple[dict[str, list[float | None]], float]:
    """Per-epoch mean of each loss column of metrics.csv, and the training seconds.

    A step's seconds are the gap to the previous step's row (rows carry a wall-clock time);
    the first step of an invocation, or one after a gap over two minutes (an interruption),
    counts batch / images_per_s instead, so time lost to an interruption is not counted. A
    resumed run may log a step twice: the last row of a global step wins."""
    import csv

    rows: dict[int, dict[str, str]] = {}
    with metrics_csv.open() as fh:
        for r in csv.DictReader(fh):
            rows[int(r["global_step"])] = r
    by_epoch: dict[int, dict[str, list[float]]] = {}
    seconds = 0.0
    cols = ("loss", "loss_global", "loss_intra", "loss_inter")
    for step in sorted(rows):
        r = rows[step]
        e = by_epoch.setdefault(int(r["epoch"]), {})
        for col in cols:
            if r.get(col):
                e.setdefault(col, []).append(float(r[col]))
        prev = rows.get(step - 1)
        gap = float(r["time"]) - float(prev["time"]) if prev and r.get("time") and prev.get("time") else -1.0
        ips = float(r["images_per_s"] or 0)
        seconds += gap if 0.0 < gap < 120.0 else (batch / ips if ips > 0 else 0.0)
    epochs = sorted(by_epoch)
    return ({("total" if c == "loss" else c[5:]): [float(np.mean(by_epoch[e][c])) if c in by_epoch[e] else None
                                                  for e in epochs] for c in cols}, seconds)


def mine_mutual(base_path: Path, out: Path, mc):
    """Same boxes, RoI features and image KNN as ``base_path``; pairs by :func:`mutual_pairs`."""
    from orl.correspondence import Correspondence
    from orl.mining import load_roi_features

    t = time.perf_counter()
    base = Correspondence.load(base_path)
    files, feats = load_roi_features(base_path.parent / "roi_features.npz")
    if files != base.files:
        raise MissingInput(f"{base_path.parent} holds RoI features of other images")
    pairs, scores = [], []
    for q in range(len(base)):
        row_p, row_s = [], []
        for j in base.knn[q]:
            ij, s = mutual_pairs(feats[q], feats[j], mc.pair_ratio) if j >= 0 else (np.zeros((0, 2), np.int64), [])
            row_p.append(np.concatenate([base.boxes[q][ij[:, 0]], base.boxes[j][ij[:, 1]]], axis=1)
                         if len(ij) else np.zeros((0, 8)))
            row_s.append(np.asarray(s, np.float32))
        pairs.append(row_p)
        scores.append(row_s)
    corr = dataclasses.replace(base, pairs=pairs, pair_scores=scores, info={**base.info, "pair_rule": "mutual_nearest"})
    out.mkdir(parents=True, exist_ok=True)
    corr.save(out / "correspondence.json")
    shutil.copy(base_path.parent / "roi_features.npz", out / "roi_features.npz")
    return corr, feats, {"seconds": {"select_pairs": time.perf_counter() - t}}


def mutual_pairs(fq: np.ndarray, fk: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual-nearest RoI pairs of one (query, neighbour) image pair.

    fq (Bq, C), fk (Bk, C) L2-normalised. Box a of the query and box b of the neighbour pair
    up when b is a's most similar neighbour box AND a is b's most similar query box. At most
    max(1, int(ratio * Bq)) are kept, best first (the authors' count cap); the matrix maximum
    is always mutual, so there is at least one. Returns ((P, 2) int, (P,) float32 scores).
    """
    if len(fq) == 0 or len(fk) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    sim = fq @ fk.T
    best_k = sim.argmax(axis=1)
    best_q = sim.argmax(axis=0)
    a = np.nonzero(best_q[best_k] == np.arange(len(fq)))[0]
    s = sim[a, best_k[a]]
    order = np.argsort(-s, kind="stable")[: max(1, int(ratio * len(fq)))]
    return np.stack([a[order], best_k[a[order]]], axis=1).astype(np.int64), s[order].astype(np.float32)


def score_pairs(corr, feats: list[np.ndarray], gt, seed: int) -> dict[str, Any]:
    """Pair ranking AUC (IoA and IoU rules) on the checkpoint's own image KNN and on fixed
    class-sharing image pairs, and pair precision with its random baselines (uniform and
    area-matched), against the union of both label sets."""
    from orl.metrics import correspondence_precision, pair_ranking_auc

    fixed = class_sharing_pairs(corr.files, gt, k=corr.knn.shape[1] if corr.knn.ndim == 2 else 10, seed=0)
    auc = {rule: pair_ranking_auc(corr, feats, gt, rule=rule, seed=seed) for rule in ("ioa", "iou")}
    # Per-image-pair values on the fixed pairs (the same image pairs and boxes for every network
    # mined at one scale): the report's paired differences read them. IoA only, rounded: size.
    auc_fixed = {rule: pair_ranking_auc(corr, feats, gt, rule=rule, knn=fixed, seed=seed, keep_per_pair=rule == "ioa")
                 for rule in ("ioa", "iou")}
    pp = auc_fixed["ioa"].get("per_pair")
    if pp:
        for f in ("auc", "auc_area_matched"):
            pp[f] = [None if v is None else round(v, 6) for v in pp[f]]
    prec = {rule: correspondence_precision(corr, gt, seed=seed, rule=rule) for rule in ("ioa", "iou")}
    return {"pair_auc": auc, "pair_auc_fixed": auc_fixed, "precision": prec}


def evaluate_checkpoint(ckpt: Path, gts: dict, images: Path, files: list[str], device, seed: int,
                        svm: bool, svm_jobs: int) -> dict[str, Any]:
    """Frozen online backbone at the training resolution: the object probe per dataset, the
    label-free signals on fixed photos, and (``svm``) the VOC07 SVM per dataset."""
    import torch

    from orl.checkpoint import load_model
    from orl.evaluate import image_svm, object_probe
    from orl.monitor import label_free_signals

    model, cfg, ck = load_model(ckpt)
    size = cfg.augment.image_size
    out: dict[str, Any] = {"checkpoint_step": (ck.get("position") or {}).get("global_step"), "datasets": {}}
    t = time.perf_counter()
    out["label_free"] = label_free_signals(model.backbone, [str(images / f) for f in files], size, seed=0,
                                           n_images=LABEL_FREE_IMAGES, device=device)
    out["stage_seconds"] = {"label_free": time.perf_counter() - t}
    for name, gt in gts.items():
        torch.manual_seed(seed)
        t = time.perf_counter()
        r = {"probe": object_probe(model.backbone, gt, size, batch_size=64, device=device, seed=seed)}
        out["stage_seconds"][f"probe_{name}"] = time.perf_counter() - t
        if svm:
            t = time.perf_counter()
            s = image_svm(model.backbone, gt, size, batch_size=64, device=device, seed=seed, n_jobs=svm_jobs)
            cv = [v for v in s["per_class"].values() if v["cv"]]
            r["svm"] = {"map": s["map"], "map_all": s["map_all"], "classes": s["classes_evaluated"],
                        "chance_map": float(np.mean([v["val_pos"] / s["val_images"] for v in cv])) if cv else None,
                        "ap": s["ap"]}
            out["stage_seconds"][f"svm_{name}"] = time.perf_counter() - t
        out["datasets"][name] = r
    return out
