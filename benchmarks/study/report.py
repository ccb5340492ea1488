"""docs/RESULTS.md and its plots, generated from the results files alone (no torch import).

Every number in the report is read from benchmarks/results/study_<mode>.json; the prose
around them is fixed text written here, and every sentence that states a finding is built
from the numbers it states.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import DOC, RESULTS_DIR
from .plan import (
    MODES,
    RANDOM_BN,
    RUNS,
    VARIANTS,
    comparable_minings,
    mines_with_roi_align,
    mining_unit,
    roi_align_unit,
    unit_keys,
)
from .store import aggregate, paired

MODE_ORDER = ("long", "short", "gpu", "quick")
MODE_TITLES = {
    "long": "Long run: one seed, thousands of stage-1 steps (2 CPU cores)",
    "short": "Three seeds at a shorter length (2 CPU cores)",
    "gpu": "GPU configuration (reported separately, with its device)",
    "quick": "Quick pipeline check (`--quick`): these numbers only check that the pipeline runs",
}
DATASET_NAMES = ("coco128", "coco-mini")


# -- reading the results -------------------------------------------------------------------------
def done(units: dict, key: str) -> dict | None:
    r = units.get(key)
    return r if r and r.get("status") == "done" else None


def dig(d: Any, *path, default=None):
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return default
        d = d[p]
    return d


def ckpt_label(name: str, results: dict) -> str:
    st = results["settings"]
    if name == "e0":
        return "random init (BatchNorm statistics 0/1)"
    if name == RANDOM_BN:
        return "random init, BatchNorm statistics from the photos"
    if name == "control":
        return "**supervised positive control** (GT crops of train2017)"
    if name in RUNS:
        return RUNS[name].label.replace(" N ", f" {st['epochs']} ep. ").replace(" M", f" {st['more_epochs']} ep.")
    if "+" in name:
        c, v = name.split("+", 1)
        return f"{ckpt_label(c, results)}, {VARIANTS[v].label}"
    e = int(name[1:])
    return f"BYOL {e} epochs" + (" (end of stage 1)" if e == st["epochs"] else "")


def ckpt_steps(units: dict, seed: int, name: str) -> int | None:
    """Optimiser steps behind a checkpoint (from its mining or evaluation record)."""
    for kind in ("eval", "mine"):
        r = done(units, f"{kind}/s{seed}/{name}")
        if r and r.get("checkpoint_step") is not None:
            return int(r["checkpoint_step"])
    return None


def steps_cell(units: dict, seed: int, name: str, results: dict) -> str:
    """Steps behind a checkpoint; a run after stage 1 shows "stage-1 steps + its own" (its
    compute includes stage 1, whose checkpoint initialised it or mined its pairs)."""
    own = ckpt_steps(units, seed, name)
    if name in RUNS:
        first = ckpt_steps(units, seed, f"e{results['settings']['epochs']}")
        return f"{first if first is not None else '?'} + {own if own is not None else '?'}"
    return "n/a" if own is None else str(own)


def stage1_names(results: dict) -> list[str]:
    return ["e0", RANDOM_BN] + [f"e{e}" for e in sorted(results["settings"]["snapshots"]) if e > 0]


def done_names(units: dict, kind: str, seed: int) -> list[str]:
    """Names of the done units ``kind/s<seed>/<name>``, in the order they were recorded."""
    return [k.split("/", 2)[2] for k in units if k.startswith(f"{kind}/s{seed}/") and done(units, k)]


def seeds_of(results: dict) -> list[int]:
    return sorted({int(k.split("/")[1][1:]) for k, r in results["units"].items() if r.get("status") == "done"})


# metric name -> (label, fn(eval or mine record) -> value, kind)
def probe_fn(field: str, ds: str | None = None) -> Callable[[dict], float | None]:
    def f(rec):
        vals = [dig(rec, "datasets", d, "probe", field) for d in ([ds] if ds else DATASET_NAMES)]
        return float(np.mean(vals)) if vals and all(v is not None for v in vals) else None
    return f


def svm_fn(rec):
    vals = [dig(rec, "datasets", d, "svm", "map") for d in DATASET_NAMES]
    return float(np.mean(vals)) if all(v is not None for v in vals) else None


EVAL_METRICS = [
    ("knn_bal", "kNN bal. acc.", probe_fn("knn_balanced_acc")),
    ("linear_bal", "linear bal. acc.", probe_fn("linear_balanced_acc")),
    ("knn_acc", "kNN acc.", probe_fn("knn_acc")),
    ("svm", "SVM mAP", svm_fn),
    ("view_top1", "view top-1", lambda r: dig(r, "label_free", "view_top1")),
    ("eff_rank", "eff. rank", lambda r: dig(r, "label_free", "effective_rank")),
]
PAIR_METRICS = [
    ("auc_fixed", "pair AUC (fixed pairs, IoA)", lambda r: dig(r, "pair_auc_fixed", "ioa", "auc")),
    ("auc_knn", "pair AUC (own KNN, IoA)", lambda r: dig(r, "pair_auc", "ioa", "auc")),
    ("prec_ioa", "IoA precision", lambda r: dig(r, "precision", "ioa", "precision")),
    ("prec_area", "area-matched random", lambda r: dig(r, "precision", "ioa", "random_area_matched", "precision")),
]


def pct(v, nd: int = 1) -> str:
    return "n/a" if v is None else f"{100 * v:.{nd}f}"


def num(v, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def ci(c, scale: float = 1.0, nd: int = 3) -> str:
    return "" if not c or c[0] is None else f" [{scale * c[0]:.{nd}f}, {scale * c[1]:.{nd}f}]"


def auc_cell(rec: dict | None, block: str, rule: str = "ioa", field: str = "auc") -> str:
    """An AUC with its interval; ``field`` "auc_area_matched" for the size-matched one."""
    a = dig(rec, block, rule) if rec else None
    iv = "ci95" if field == "auc" else "ci95_area_matched"
    return "n/a" if not a or a.get(field) is None else f"{a[field]:.3f}{ci(a.get(iv))}"


def probe_cell(rec: dict | None, field: str, ds: str) -> str:
    p = dig(rec, "datasets", ds, "probe") if rec else None
    if not p or p.get(field) is None:
        return "n/a"
    return f"{100 * p[field]:.1f}{ci(p.get(field + '_ci95'), 100, 1)}"


def intervals_apart(a: dict | None, b: dict | None) -> bool | None:
    """True when interval a lies wholly above interval b; None when either is missing."""
    ca, cb = dig(a, "ci95"), dig(b, "ci95")
    if not ca or not cb or None in ca or None in cb:
        return None
    return ca[0] > cb[1]


# -- one mode's section ---------------------------------------------------------------------------
def section(results: dict, plots: dict[str, str]) -> list[str]:
    mode, units = results["mode"], results["units"]
    m = results.get("machine", {})
    seeds = seeds_of(results)
    L = [f"## {MODE_TITLES.get(mode, mode)}", ""]
    if mode == "quick":
        L += ["> The quick mode trains the `tiny` preset for a few steps on a handful of photos. It checks "
              "that every unit, metric, table and plot works end to end; its numbers say nothing.", ""]
    if mines_with_roi_align(results["settings"]):
        L += ["> Every mining in this mode uses RoIAlign RoI features (one backbone pass per image): the "
              "stage-1 snapshots, the runs after stage 1, and the pairs stage 3 trains on. Its pair scores "
              "therefore compare with each other across the whole mode, but not with the crop-feature scores "
              "of a mode that mines with crops.", ""]
    planned = results.get("seeds", [])
    expected = expected_units(results)
    missing = [k for k in expected if not done(units, k)]
    if missing:
        L += [f"> **Partial:** {len(missing)} of {len(expected)} units are not done yet "
              f"(next: `{missing[0]}`). Rerunning the same command resumes.", ""]
    L += headline(results, seeds[0] if seeds else (planned or [0])[0])
    if len(seeds) > 1:
        L += seed_comparisons(results, seeds)
    L += setup(results, m)
    for s in seeds:
        L += pairs_table(results, s)
        L += eval_table(results, s)
    for kind in ("auc", "probe", "loss"):
        if kind in plots:
            L += [f"![{kind}]({plots[kind]})", ""]
    errors = [(k, r.get("error")) for k, r in units.items() if r.get("status") == "error"]
    if errors:
        L += ["Units that failed (the rest still ran):", ""] + [f"- `{k}`: {e}" for k, e in errors] + [""]
    L += reproducibility(units)
    return L


def reproducibility(units: dict) -> list[str]:
    """Units computed more than once (their files were gone on a new machine, or ``--redo``):
    what the first computation found beside the latest, which the tables show. A training run
    on CPU that does not reproduce to the last digit shows here how far apart two runs of the
    same unit land: a floor under any difference between two networks."""
    rows = []
    for k, r in units.items():
        prev = r.get("previous")
        if not r.get("recomputed") or not prev:
            continue
        kind = k.split("/", 1)[0]
        if kind == "train" and prev.get("loss") and r.get("loss"):
            a, b = prev["loss"].get("total") or [], r["loss"].get("total") or []
            n = min(len(a), len(b))
            same = sum(x == y for x, y in zip(a[:n], b[:n], strict=True))
            diff = max((abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)), default=0.0)
            last = f"{a[n - 1]:.4f} / {b[n - 1]:.4f}" if n else "n/a"
            rows.append(f"| `{k}` | per-epoch mean loss: {same} of {n} epochs identical, largest difference "
                        f"{diff:.4f}; last epoch {last} |")
        elif kind == "mine":
            a, b = dig(prev, "pair_auc_fixed", "ioa", "auc"), dig(r, "pair_auc_fixed", "ioa", "auc")
            rows.append(f"| `{k}` | pairs {prev.get('pairs', 'n/a')} / {r.get('pairs', 'n/a')}; pair AUC (fixed) "
                        f"{num(a, 4)} / {num(b, 4)} |")
        else:
            rows.append(f"| `{k}` | computed {r['recomputed'] + 1} times |")
    if not rows:
        return []
    return ["**Units computed more than once** (files gone on a new machine, or `--redo`): first / latest "
            "computation; the tables hold the latest. Where a training run does not reproduce to the last "
            "digit, its two computations also show how far two runs of one unit land.", "",
            "| unit | first / latest |", "|---|---|", *rows, ""]


def expected_units(results: dict) -> list[str]:
    """Every unit the mode plans for the seeds the file has seen (the study's own order)."""
    return unit_keys(results["settings"], results.get("seeds", []))


def headline(results: dict, seed: int) -> list[str]:
    """The three comparisons the study exists for, from one seed (the long run's)."""
    units, st = results["units"], results["settings"]
    N = st["epochs"]
    g = lambda kind, name: done(units, f"{kind}/s{seed}/{name}")  # noqa: E731
    L = ["### In short", ""]
    # 1. BYOL against random init
    # every evaluated stage-1 snapshot, so a study still in stage 1 already shows its trend
    rows = [n for n in stage1_names(results) + ["control"] if g("eval", n)]
    if rows:
        L += [f"**1. BYOL against random init** (seed {seed}). View top-1: a photo's second augmented view "
              "retrieved among the views of 128 fixed photos (no labels; chance 1/128 = 0.8%). Effective rank of "
              "their embeddings (no labels). Object probe: balanced (mean per-class) accuracy of kNN and linear "
              "classifiers on ground-truth crops of at least 32 px, fit on train2017, scored on val2017; "
              "percent with 95% bootstrap intervals over val crops.", "",
              "| network | steps | view top-1 | eff. rank | " +
              " | ".join(f"{d} kNN bal." for d in DATASET_NAMES) + " | linear bal. (mean) | SVM mAP (mean) |",
              "|---|---|---|---|" + "---|" * len(DATASET_NAMES) + "---|---|"]
        for n in rows:
            r = g("eval", n)
            L.append(f"| {ckpt_label(n, results)} | {steps_cell(units, seed, n, results)} | "
                     f"{pct(dig(r, 'label_free', 'view_top1'))} | {num(dig(r, 'label_free', 'effective_rank'), 1)} | "
                     + " | ".join(probe_cell(r, "knn_balanced_acc", d) for d in DATASET_NAMES)
                     + f" | {pct(probe_fn('linear_balanced_acc')(r))} | {pct(svm_fn(r))} |")
        chance = [dig(g("eval", rows[0]), "datasets", d, "probe", "balanced_chance") for d in DATASET_NAMES]
        maj = [dig(g("eval", rows[0]), "datasets", d, "probe", "majority_acc") for d in DATASET_NAMES]
        L += ["", "Chance for balanced accuracy: "
              + ", ".join(f"{d} {pct(c)}%" for d, c in zip(DATASET_NAMES, chance, strict=True))
              + "; the majority class's plain accuracy: "
              + ", ".join(f"{d} {pct(x)}%" for d, x in zip(DATASET_NAMES, maj, strict=True))
              + ".", ""]
        latest = [n for n in stage1_names(results)[2:] if g("eval", n)]
        byol, rnd = (g("eval", latest[-1]) if latest else None), g("eval", RANDOM_BN)
        if byol and rnd:
            better = [d for d in DATASET_NAMES
                      if intervals_apart(_probe_ci(byol, d), _probe_ci(rnd, d))]
            L += [f"BYOL after {latest[-1][1:]} epochs against the random-init network with data BatchNorm statistics: "
                  f"kNN balanced accuracy higher with non-overlapping intervals on "
                  f"{', '.join(better) if better else 'neither dataset'}; view top-1 "
                  f"{pct(dig(byol, 'label_free', 'view_top1'))}% against "
                  f"{pct(dig(rnd, 'label_free', 'view_top1'))}%.", ""]
    # 2. pair AUC over stage-1 training, beside the positive control
    names = [n for n in stage1_names(results) + ["control"] if g("mine", n)]
    if names:
        L += ["**2. Do the RoI features rank same-class box pairs first?** Pair ranking AUC: for each image pair, "
              "the ROC-AUC of RoI cosine similarity over all candidate box pairs, positive when both boxes lie on "
              "objects of one class (IoA >= 0.5); mean over image pairs, 95% bootstrap interval over image pairs. "
              "Chance is 0.5. 'fixed pairs': the same class-sharing image pairs for every network, so only the "
              "RoI features differ; 'own KNN': the network's own image neighbours, what its mining sees; "
              "'area-matched': a positive is compared only with negatives whose boxes have the same area "
              "quintiles, so box size alone cannot move it off 0.5.", "",
              "| network | steps | AUC, fixed pairs | area-matched | AUC, own KNN | area-matched |",
              "|---|---|---|---|---|---|"]
        for n in names:
            r = g("mine", n)
            L.append(f"| {ckpt_label(n, results)} | {steps_cell(units, seed, n, results)} | "
                     f"{auc_cell(r, 'pair_auc_fixed')} | {auc_cell(r, 'pair_auc_fixed', field='auc_area_matched')} | "
                     f"{auc_cell(r, 'pair_auc')} | {auc_cell(r, 'pair_auc', field='auc_area_matched')} |")
        L.append("")
        last, ctl = g("mine", f"e{N}"), g("mine", "control")
        for who, rec, ok_text in ((f"End of stage 1 ({N} epochs)", last, "higher, intervals do not overlap"),
                                  ("Positive control", ctl, "higher, intervals do not overlap: the metric can see "
                                                            "good features")):
            for base in ("e0", RANDOM_BN):
                b = g("mine", base)
                if rec and b:
                    L.append(f"- {who} against {ckpt_label(base, results)}, fixed pairs: "
                             + "; ".join(f"{lab}: " + apart_text(rec, b, field, ok_text)
                                         for field, lab in (("auc", "AUC"), ("auc_area_matched", "area-matched"))))
        L.append("")
    # 3. ORL against BYOL at equal compute
    runs = [r for r in st.get("runs", []) if g("eval", r)]
    if "byol_cont" in runs and len(runs) > 1:
        M = st["more_epochs"]
        starts = [t for r, t in (("orl_init", "from the stage-1 weights"),
                                 ("orl", "from random init as the authors do")) if r in runs]
        L += [f"**3. ORL against BYOL at equal compute** (Table 5e's shape): after {N} epochs of BYOL, {M} more "
              f"epochs of BYOL, or of ORL ({', or '.join(starts) or 'ablations only'}). "
              "Differences against BYOL continued, percentage points (AUC: absolute).", "",
              "| run | " + " | ".join(lab for _, lab, _ in EVAL_METRICS) + " | pair AUC (fixed) |",
              "|---|" + "---|" * (len(EVAL_METRICS) + 1)]
        base = g("eval", "byol_cont")
        base_m = g("mine", mining_unit("byol_cont", st))
        losses = []
        for r in runs:
            rec, mrec = g("eval", r), g("mine", mining_unit(r, st))
            cells = []
            for key, lab, fn in EVAL_METRICS:
                v, b = fn(rec), fn(base)
                scale = 1 if key == "eff_rank" else 100
                cell = "n/a" if v is None else (f"{v:.1f}" if key == "eff_rank" else pct(v))
                if r != "byol_cont" and v is not None and b is not None:
                    cell += f" ({scale * (v - b):+.1f})"
                    if v <= b and key != "eff_rank":
                        losses.append((r, lab))
                cells.append(cell)
            a, ab = dig(mrec, "pair_auc_fixed", "ioa", "auc"), dig(base_m, "pair_auc_fixed", "ioa", "auc")
            ac = auc_cell(mrec, "pair_auc_fixed")
            if r != "byol_cont" and a is not None and ab is not None:
                ac += f" ({a - ab:+.3f})"
                if a <= ab:
                    losses.append((r, "pair AUC"))
            L.append(f"| {ckpt_label(r, results)} | " + " | ".join(cells) + f" | {ac} |")
        L.append("")
        s1 = g("mine", roi_align_unit(f"e{N}", st))
        if mines_with_roi_align(st):
            L += [f"Pair AUC here comes from RoIAlign RoI features, like every mining in this mode; the end of "
                  f"stage 1: {auc_cell(s1, 'pair_auc_fixed')}.", ""]
        else:
            crop = g("mine", f"e{N}")
            secs = [dig(x, "stage_seconds", "embed_rois") for x in (s1, crop)]
            cost = ("" if None in secs else f"; embedding the end of stage 1's RoIs took {secs[0]:.0f} s that way "
                    f"against {secs[1]:.0f} s with crops")
            L += [f"Pair AUC here comes from RoIAlign RoI features (one forward per image; the runs are mined only "
                  f"that way{cost}); the end of stage 1 scored the same way: {auc_cell(s1, 'pair_auc_fixed')}.", ""]
        L += paired_lines([(r, "byol_cont") for r in runs if r != "byol_cont"] + [(r, f"e{N}") for r in runs],
                          g, results)
        if losses:
            by_run: dict[str, list[str]] = {}
            for r, lab in losses:
                by_run.setdefault(r, []).append(lab)
            L += ["**Where ORL does not win here:** " + "; ".join(
                f"{ckpt_label(r, results)}: {', '.join(labs)}" for r, labs in by_run.items())
                + ". One seed; see the three-seed section for the spread.", ""]
    return L


def paired_cells(a: str, b: str, g: Callable[[str, str], dict | None], results: dict) -> list[str] | None:
    """Paired difference (A minus B) of pair AUC on the fixed pairs, IoA, per image pair: the
    same image pairs and the same boxes, so the difference is read per image pair
    (orl.metrics.paired_auc_difference); a run is compared through RoIAlign minings on both
    sides (plan.comparable_minings). Cells for the AUC and its area-matched form; None where
    either unit lacks per-pair values."""
    from orl.metrics import paired_auc_difference

    pa, pb = (dig(g("mine", x), "pair_auc_fixed", "ioa", "per_pair")
              for x in comparable_minings(a, b, results["settings"]))
    if not pa or not pb:
        return None
    d = paired_auc_difference(pa, pb)
    cells = []
    for field in ("auc", "auc_area_matched"):
        x = d[field]
        if x["diff"] is None:
            cells.append("n/a")
            continue
        lo, hi = x["ci95"]
        sign = "above 0" if lo > 0 else ("below 0" if hi < 0 else "includes 0")
        cells.append(f"{x['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] ({sign}); higher on {100 * x['a_higher']:.0f}% "
                     f"of {x['pairs']} image pairs")
    return cells


PAIRED_TEXT = ("Paired differences (A minus B) of pair AUC on the fixed pairs, per image pair: both networks score "
               "the same image pairs and the same boxes, so what the two share (how hard a pair is) cancels. "
               "95% interval resampling query images; it covers the sampling of image pairs, not of training")


def paired_lines(comparisons: list[tuple[str, str]], g: Callable[[str, str], dict | None],
                 results: dict) -> list[str]:
    """The paired differences of one seed's comparisons (see paired_cells)."""
    rows = []
    for a, b in comparisons:
        cells = paired_cells(a, b, g, results)
        if cells:
            rows.append(f"| {ckpt_label(a, results)} | {ckpt_label(b, results)} | {cells[0]} | {cells[1]} |")
    if not rows:
        return []
    return [PAIRED_TEXT + " (one seed).", "",
            "| A | B | AUC difference | area-matched difference |", "|---|---|---|---|", *rows, ""]


def apart_text(rec: dict, base: dict, field: str, ok_text: str) -> str:
    a, b = dig(rec, "pair_auc_fixed", "ioa"), dig(base, "pair_auc_fixed", "ioa")
    iv = "ci95" if field == "auc" else "ci95_area_matched"
    if not a or not b or a.get(field) is None or b.get(field) is None:
        return "n/a"
    apart = intervals_apart({"ci95": a.get(iv)}, {"ci95": b.get(iv)})
    vals = f"{a[field]:.3f} against {b[field]:.3f}"
    return f"{vals}, " + (ok_text if apart else "intervals overlap or lower: not shown")


def _probe_ci(rec: dict, ds: str) -> dict:
    p = dig(rec, "datasets", ds, "probe") or {}
    return {"ci95": p.get("knn_balanced_acc_ci95")}


def setup(results: dict, m: dict) -> list[str]:
    st, units = results["settings"], results["units"]
    counts = results.get("images", {})
    L = ["### Setup", "",
         f"- Photos pre-trained on (labels unused): {counts.get('total', 'n/a')} "
         f"({', '.join(f'{k}: {v}' for k, v in counts.get('per_dataset', {}).items())}).",
         "- Labelled images for evaluation (train / val): "
         + "; ".join(f"{k}: {v['train']} / {v['val']}" for k, v in results.get("labels", {}).items()) + ".",
         f"- Preset `{st['preset']}` with `{json.dumps(st['overrides'])}`: {m.get('backbone', 'n/a')}, global views "
         f"{m.get('image_size', 'n/a')} px, RoI patches {m.get('patch_size', 'n/a')} px, "
         f"batch {m.get('batch_size', 'n/a')}, "
         f"{m.get('steps_per_epoch', 'n/a')} steps per epoch.",
         f"- Stage 1: N = {st['epochs']} epochs, snapshots after {', '.join(map(str, st['snapshots']))} epochs; "
         f"runs after it: M = {st['more_epochs']} epochs each. Positive control: "
         + (f"{st['control_epochs']} epochs." if st.get("control_epochs") else "none in this mode."),
         f"- Machine: {m.get('cpu', 'n/a')}, {m.get('cpu_count', 'n/a')} cores, "
         f"torch threads {m.get('torch_threads', 'n/a')}, "
         f"device `{m.get('device', 'n/a')}`, torch {m.get('torch', 'n/a')}, commit {m.get('git_commit', 'n/a')}.", ""]
    cost = {}
    for k, r in units.items():
        if r.get("status") == "done":
            cost.setdefault(k.split("/")[0], [0.0, 0.0])
            cost[k.split("/")[0]][0] += r.get("seconds", 0)
            cost[k.split("/")[0]][1] += r.get("cpu_seconds", 0)
    if cost:
        L += ["Time summed over done units (wall / CPU minutes): " + "; ".join(
            f"{k} {w / 60:.1f} / {c / 60:.1f}" for k, (w, c) in sorted(cost.items())) + ".", ""]
    stage1 = [r for k, r in units.items() if k.split("/")[-1].startswith("byol@") and r.get("status") == "done"
              and r.get("train_seconds")]
    if stage1:
        steps = sum(r.get("steps", 0) for r in stage1[-1:])
        L += [f"Stage 1 reached {steps} steps; median wall seconds per unit "
              f"{np.median([r['seconds'] for r in stage1]):.0f}.", ""]
    inv = results.get("invocations", [])
    if inv:
        L += ["| started | command | wall s | load avg at start |", "|---|---|---|---|"]
        for i in inv:
            wall = "n/a (interrupted)" if i.get("wall_s") is None else f"{i['wall_s']:.0f}"
            load = ", ".join(f"{x:.1f}" for x in i.get("load_avg", []))
            L.append(f"| {i['started']} | `{i['command']}` | {wall} | {load} |")
        L.append("")
    return L


def pairs_table(results: dict, seed: int) -> list[str]:
    units = results["units"]
    names = done_names(units, "mine", seed)
    if not names:
        return []
    L = [f"### Mined pairs, seed {seed}", "",
         "AUC as above, also under the IoU >= 0.5 rule (the box frames the object). Precision: share of mined pairs "
         "whose two boxes lie on one class (IoA >= 0.5); 'uniform': random box pairs from the same two images; "
         "'area-matched': random pairs whose two boxes fall in the same area bins (quintiles) as the mined pair's. "
         "'shared class': only image pairs that share a ground-truth class (removes the image KNN's cap). "
         "KNN: share of image neighbours sharing a class, against random images. Percent except AUC.", "",
         "| pairs mined with | steps | pairs | AUC fixed IoA | area-matched | AUC fixed IoU | AUC KNN IoA | "
         "IoA prec. | uniform | area-matched | shared-class prec. | its area-matched | KNN share | random |",
         "|---|" + "---|" * 13]
    for n in names:
        r = done(units, f"mine/s{seed}/{n}")
        p = dig(r, "precision", "ioa") or {}
        L.append(f"| {ckpt_label(n, results)} | {steps_cell(units, seed, n.split('+')[0], results)} | "
                 f"{r.get('pairs', 'n/a')} | "
                 f"{auc_cell(r, 'pair_auc_fixed')} | {auc_cell(r, 'pair_auc_fixed', field='auc_area_matched')} | "
                 f"{auc_cell(r, 'pair_auc_fixed', 'iou')} | {auc_cell(r, 'pair_auc')} | "
                 f"{pct(p.get('precision'), 2)} | {pct(dig(p, 'random', 'precision'), 2)} | "
                 f"{pct(dig(p, 'random_area_matched', 'precision'), 2)} | "
                 f"{pct(dig(p, 'shared_class', 'precision'), 2)} | "
                 f"{pct(dig(p, 'shared_class', 'random_area_matched_precision'), 2)} | "
                 f"{pct(dig(p, 'knn', 'share'))} | {pct(dig(p, 'knn_random', 'share'))} |")
    return L + [""]


def eval_table(results: dict, seed: int) -> list[str]:
    units = results["units"]
    names = done_names(units, "eval", seed)
    if not names:
        return []
    L = [f"### Frozen features, seed {seed}", "",
         "Probe accuracies are the mean over the two datasets (each fit on its train2017 crops, scored on val2017), "
         "percent; the SVM is the VOC07-style linear SVM on whole images (only for final checkpoints).", "",
         "| network | steps | " + " | ".join(lab for _, lab, _ in EVAL_METRICS) + " | linear C |",
         "|---|---|" + "---|" * (len(EVAL_METRICS) + 1)]
    for n in names:
        r = done(units, f"eval/s{seed}/{n}")
        cells = [(f"{fn(r):.1f}" if fn(r) is not None else "n/a") if key == "eff_rank" else pct(fn(r))
                 for key, _, fn in EVAL_METRICS]
        cs = [dig(r, "datasets", d, "probe", "linear_C") for d in DATASET_NAMES]
        L.append(f"| {ckpt_label(n, results)} | {steps_cell(units, seed, n, results)} | " + " | ".join(cells)
                 + f" | {', '.join('n/a' if c is None else f'{c:g}' for c in cs)} |")
    ctl = done(units, f"train/s{seed}/control")
    if ctl:
        L += ["", f"The control's own classifier on val2017 crops: accuracy {pct(ctl.get('classifier_val_acc'))}%, "
              f"balanced {pct(ctl.get('classifier_val_balanced_acc'))}% "
              f"(majority class {pct(ctl.get('val_majority_acc'))}%), after {ctl.get('epochs')} epochs on "
              f"{ctl.get('train_crops')} train crops of {ctl.get('train_classes')} classes."]
    return L + [""]


def seed_comparisons(results: dict, seeds: list[int]) -> list[str]:
    """The headline comparisons over seeds: per seed a, b and a - b, then the mean of each, the
    spread of a - b over seeds (std and min / max) and in how many seeds a is higher; and per
    seed the paired per-image-pair difference of pair AUC (the long mode's paired_cells)."""
    units, st = results["units"], results["settings"]
    N = st["epochs"]
    comps = [(f"e{N}", RANDOM_BN, "BYOL against random init (data BatchNorm statistics)"),
             (f"e{N}", "e0", "BYOL against random init (BatchNorm 0/1)")]
    comps += [(r, "byol_cont", "ORL against BYOL at equal compute") for r in st.get("runs", []) if r != "byol_cont"]
    pair_auc = ("pair_auc", "pair AUC (fixed)", lambda r: dig(r, "pair_auc_fixed", "ioa", "auc"))
    L = [f"### Over seeds {', '.join(map(str, seeds))}", "",
         "Each headline comparison, a against b: per seed a / b (a - b); the mean of a and of b over seeds; the "
         "mean ± std (ddof 1) and the min / max of a - b over seeds; in how many seeds a is higher. Percent and "
         "percentage points, except effective rank and pair AUC (absolute). Pair AUC of a run after stage 1 is "
         "compared through RoIAlign minings on both sides.", ""]
    for a, b, what in comps:
        if not any(done(units, f"eval/s{s}/{a}") for s in seeds):
            continue
        L += [f"#### {what}: a = {ckpt_label(a, results)}; b = {ckpt_label(b, results)}", "",
              "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean a / mean b | a - b: mean ± std | "
              "a - b: min / max | a higher |", "|---|" + "---|" * (len(seeds) + 4)]
        ma, mb = comparable_minings(a, b, st)
        for key, lab, fn in [*EVAL_METRICS, pair_auc]:
            kind, na, nb = ("mine", ma, mb) if key == "pair_auc" else ("eval", a, b)
            va = {s: fn(units[f"{kind}/s{s}/{na}"]) for s in seeds if done(units, f"{kind}/s{s}/{na}")}
            vb = {s: fn(units[f"{kind}/s{s}/{nb}"]) for s in seeds if done(units, f"{kind}/s{s}/{nb}")}
            scale, nd = (1.0, 1) if key == "eff_rank" else ((1.0, 3) if key == "pair_auc" else (100.0, 1))
            cells = [f"{scaled(va.get(s), scale, nd)} / {scaled(vb.get(s), scale, nd)}"
                     + (f" ({scale * (va[s] - vb[s]):+.{nd}f})" if va.get(s) is not None and vb.get(s) is not None
                        else "") for s in seeds]
            p = paired(va, vb)
            diffs = [va[s] - vb[s] for s in p["seeds"]]
            spread = f"{scale * min(diffs):+.{nd}f} / {scale * max(diffs):+.{nd}f}" if diffs else "n/a"
            means = " / ".join(scaled(aggregate(list(x.values()))["mean"], scale, nd) for x in (va, vb))
            L.append(f"| {lab} | " + " | ".join(cells) + f" | {means} | {fmt_diff(p, scale, nd)} | "
                     f"{spread} | {wins_cell(p)} |")
        L.append("")
        rows = []
        for s in seeds:
            g = lambda kind, name, s=s: done(units, f"{kind}/s{s}/{name}")  # noqa: E731
            pc = paired_cells(a, b, g, results)
            if pc:
                rows.append(f"| {s} | {pc[0]} | {pc[1]} |")
        if rows:
            L += [PAIRED_TEXT + f" (within one seed; the rows differ by training seed). A = {ckpt_label(a, results)}, "
                  f"B = {ckpt_label(b, results)}.", "",
                  "| seed | AUC difference | area-matched difference |", "|---|---|---|", *rows, ""]
    return L


def wins_cell(p: dict) -> str:
    return f"{p['wins']}/{p['n']}" if p["n"] else "n/a"


def scaled(x: float | None, scale: float, nd: int) -> str:
    return "n/a" if x is None else f"{scale * x:.{nd}f}"


def fmt_diff(p: dict, scale: float = 100.0, nd: int = 1) -> str:
    """Mean ± std of a - b over seeds (store.paired)."""
    if p["n"] == 0:
        return "n/a"
    std = "" if p["diff_std"] is None else f" ± {scale * p['diff_std']:.{nd}f}"
    return f"{scale * p['diff_mean']:+.{nd}f}{std}"


# -- plots -------------------------------------------------------------------------------------------
def make_plots(results: dict, out_dir: Path, doc_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mode, units = results["mode"], results["units"]
    seed = (seeds_of(results) or [0])[0]
    made: dict[str, str] = {}

    def save(fig, kind: str) -> None:
        path = out_dir / f"study_{mode}_{kind}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[kind] = os.path.relpath(path, doc_dir)

    snaps = [n for n in stage1_names(results) if n != RANDOM_BN and done(units, f"mine/s{seed}/{n}")]
    if snaps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, rule in zip(axes, ("ioa", "iou"), strict=True):
            for block, lab, mk in (("pair_auc_fixed", "fixed class-sharing pairs", "o-"),
                                   ("pair_auc", "own KNN", "s--")):
                xs, ys, lo, hi = [], [], [], []
                for n in snaps:
                    a = dig(units[f"mine/s{seed}/{n}"], block, rule)
                    if a and a.get("auc") is not None:
                        xs.append(max(1, ckpt_steps(units, seed, n) or 0))
                        ys.append(a["auc"])
                        c = a.get("ci95") or [a["auc"], a["auc"]]
                        lo.append(a["auc"] - c[0])
                        hi.append(c[1] - a["auc"])
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], fmt=mk, capsize=3, label=f"BYOL snapshots, {lab}")
            for n, color in ((RANDOM_BN, "tab:gray"), ("control", "tab:green")):
                a = dig(units.get(f"mine/s{seed}/{n}"), "pair_auc_fixed", rule)
                if a and a.get("auc") is not None:
                    ax.axhline(a["auc"], color=color, ls=":", label=ckpt_label(n, results).replace("*", ""))
            ax.axhline(0.5, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("stage-1 steps (1 = random init)")
            ax.set_ylabel(f"pair ranking AUC ({rule.upper()} rule)")
            ax.legend(fontsize=7)
        fig.suptitle(f"Pair AUC over stage-1 training ({mode}, seed {seed}; 95% bootstrap intervals)")
        save(fig, "auc")
    evs = [n for n in stage1_names(results) if n != RANDOM_BN and done(units, f"eval/s{seed}/{n}")]
    if evs:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [max(1, ckpt_steps(units, seed, n) or 0) for n in evs]
        for key, lab, fn in EVAL_METRICS:
            if key in ("knn_bal", "linear_bal", "view_top1"):
                ax.plot(xs, [fn(units[f"eval/s{seed}/{n}"]) for n in evs], "o-", label=lab)
        ax.set_xscale("log")
        ax.set_xlabel("stage-1 steps (1 = random init)")
        ax.set_ylabel("fraction")
        ax.legend(fontsize=8)
        ax.set_title(f"Frozen-feature metrics over stage-1 training ({mode}, seed {seed})")
        save(fig, "probe")
    curves = {k.split("/", 2)[2]: r["loss"] for k, r in units.items() if k.startswith(f"train/s{seed}/")
              and done(units, k) and isinstance(r.get("loss"), dict) and r["loss"].get("total")}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        last_stage1 = max((k for k in curves if k.startswith("byol@")), default=None,
                          key=lambda k: int(k.split("@e")[1]))
        for name, c in curves.items():
            if name.startswith("byol@") and name != last_stage1:
                continue
            ax.plot(range(1, len(c["total"]) + 1), c["total"], label="stage 1 (BYOL)" if name == last_stage1 else name)
        ax.set_xlabel("epoch of the run")
        ax.set_ylabel("training loss (epoch mean)")
        ax.legend(fontsize=7)
        save(fig, "loss")
    return made


# -- the whole file -------------------------------------------------------------------------------------
def render_report(all_results: dict[str, dict], plots: dict[str, dict[str, str]]) -> str:
    L = ["# Results: does our ORL beat BYOL on real scene photos, and are the mined pairs objects?", "",
         "Generated by `python -m benchmarks.study` from `benchmarks/results/study_<mode>.json`; do not edit by "
         "hand (`python -m benchmarks.study --report-only` regenerates it). Every number comes from those files.", "",
         "```",
         "python -m benchmarks.study --mode long --commit   # one seed, ~3,000 stage-1 steps; commits each unit",
         "python -m benchmarks.study --mode short --commit  # three seeds at ~800 steps",
         "python -m benchmarks.study --mode short --dry-run # its units and their estimated minutes",
         "python -m benchmarks.study --quick                # pipeline check, under 15 minutes; numbers mean nothing",
         "python -m benchmarks.study --report-only          # rebuild this file and the plots from the JSON",
         "```", "",
         "An earlier study (60 stage-1 steps, no pair AUC, no positive control) is kept in "
         "`benchmarks/results/archive/`; it could not see any effect, which is why this one exists.", ""]
    if not any(m in all_results for m in ("long", "short")):
        L += ["> **No CPU study has been run yet.** Run `python -m benchmarks.study --mode long`.", ""]
    for mode in MODE_ORDER:
        if mode in all_results:
            L += section(all_results[mode], plots.get(mode, {}))
    return "\n".join(L).rstrip() + "\n"


def write_report(results_dir: Path = RESULTS_DIR, doc: Path = DOC) -> Path:
    all_results = {}
    for mode in MODES:
        p = results_dir / f"study_{mode}.json"
        if p.exists():
            all_results[mode] = json.loads(p.read_text())
    plots = {mode: make_plots(r, results_dir, doc.parent) for mode, r in all_results.items()}
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_report(all_results, plots))
    return doc
