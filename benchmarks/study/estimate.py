"""Minutes per unit of a mode, estimated from the long mode's recorded unit timings (pure).

Every unit record holds its wall ``seconds``, and a recomputed one its first computation's
(``previous``). A unit's seconds include the units its getters ran inside it (a mining that
had to train its checkpoint first, an evaluation that trained its run), so each computation's
own seconds are its wall seconds less those of the computations that ran within its interval
(end = ``recorded_at``, start = end - seconds). Training is scaled by optimiser steps; mining
and evaluation are per unit, matched by RoI mode and by whether the SVM runs. Selective search
runs once per scale and work folder (its proposals are cached), so its recorded seconds are
counted once, at the first mining of each scale.

The long mode ran on a shared 2-core machine, some of it beside other load, so each estimate
comes as the median over the matching recorded computations and as their minimum (a machine as
quiet as the study's quietest hours).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .plan import RANDOM_BN, RUNS, VARIANTS, default_mining, eval_with_svm, unit_keys

TOL_S = 1.5  # recorded_at has one-second resolution
SS_RAN_S = 5.0  # a mining's selective_search seconds above this: it ran (a cache read takes under one)


def computations(units: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every recorded computation of a done unit, latest and ``previous``, with its interval and
    its own seconds (less the computations nested in it)."""
    comps: list[dict[str, Any]] = []
    for key, r in units.items():
        if r.get("status") != "done":
            continue
        for rec, latest in ((r, True), (r.get("previous"), False)):
            if not rec or rec.get("seconds") is None or not rec.get("recorded_at"):
                continue
            end = time.mktime(time.strptime(rec["recorded_at"], "%Y-%m-%d %H:%M:%S"))
            comps.append({"key": key, "latest": latest, "seconds": float(rec["seconds"]), "end": end,
                          "start": end - float(rec["seconds"]), "rec": r})
    def inside(c: dict[str, Any], p: dict[str, Any]) -> bool:
        return (c is not p and c["seconds"] < p["seconds"] and c["start"] >= p["start"] - TOL_S
                and c["end"] <= p["end"] + TOL_S)

    for p in comps:
        kids = [c for c in comps if inside(c, p)]
        direct = [c for c in kids if not any(inside(c, o) for o in kids)]
        p["own"] = max(0.0, p["seconds"] - sum(c["seconds"] for c in direct))
    return comps


def same_scale(mode_settings: dict[str, Any], long_settings: dict[str, Any]) -> bool:
    """Training and evaluation cost the same per step only at the same preset, photos and
    non-mining overrides (the mining fields are matched per unit)."""
    strip = lambda o: {k: v for k, v in o.items() if not k.startswith("mine.")}  # noqa: E731
    return (mode_settings["preset"] == long_settings["preset"]
            and mode_settings.get("per_folder") == long_settings.get("per_folder")
            and strip(mode_settings["overrides"]) == strip(long_settings["overrides"]))


class Timings:
    """Samples of the long mode's costs, by kind of unit."""

    def __init__(self, long_results: dict[str, Any]):
        st, units = long_results["settings"], long_results["units"]
        self.settings = st
        self.spe = int(long_results.get("machine", {}).get("steps_per_epoch") or 16)
        comps = computations(units)
        snaps = sorted(st["snapshots"])
        self.fixed: dict[str, list[float]] = {}  # "train/byol@e0", "train/e0bn"
        self.per_step: dict[str, list[float]] = {"byol_stage1": [], "byol": [], "orl": []}
        self.control_per_epoch: list[float] = []  # the control trains on its own crops, not the photos
        self.mine: dict[str, list[float]] = {}  # roi_mode -> own seconds less selective search
        self.ss: dict[Any, list[float]] = {}  # ss_max_side_px -> selective-search seconds
        self.eval: dict[bool, list[float]] = {True: [], False: []}  # svm or not
        for c in comps:
            kind, _, name = c["key"].split("/", 2)
            r = c["rec"]
            if kind == "train" and name in ("byol@e0", RANDOM_BN):
                self.fixed.setdefault(name, []).append(c["own"])
            elif kind == "train" and name.startswith("byol@e"):
                e = int(name[len("byol@e"):])
                prev = max([x for x in snaps if x < e], default=0)
                self.per_step["byol_stage1"].append(c["own"] / ((e - prev) * self.spe))
            elif kind == "train" and name == "control" and r.get("epochs"):
                self.control_per_epoch.append(c["own"] / r["epochs"])
            elif kind == "train" and name in RUNS and not RUNS[name].weights:
                self.per_step[RUNS[name].stage].append(c["own"] / (st["more_epochs"] * self.spe))
            elif kind == "mine" and c["latest"] and r.get("mine_params"):
                # Only the latest computation says (stage_seconds) whether selective search ran in it.
                ss = float((r.get("stage_seconds") or {}).get("selective_search") or 0.0)
                self.mine.setdefault(r["mine_params"]["roi_mode"], []).append(max(0.0, c["own"] - ss))
                if ss > SS_RAN_S:
                    self.ss.setdefault(r["mine_params"]["ss_max_side_px"], []).append(ss)
            elif kind == "eval":
                self.eval[bool(r.get("datasets")) and any(k.startswith("svm_") for k in r.get("stage_seconds", {}))
                          ].append(c["own"])

    def unit_samples(self, key: str, settings: dict[str, Any], ss_done: set) -> list[float] | None:
        """Recorded seconds that estimate unit ``key`` of a mode with ``settings`` (scaled to its
        steps); None where the long mode recorded nothing comparable. ``ss_done``: the selective-
        search scales already counted (updated)."""
        kind, _, name = key.split("/", 2)
        spe = self.spe
        if kind == "train":
            if name in self.fixed:
                return self.fixed[name]
            if name.startswith("byol@e"):
                e = int(name[len("byol@e"):])
                prev = max([x for x in settings["snapshots"] if x < e], default=0)
                return [x * (e - prev) * spe for x in self.per_step["byol_stage1"]] or None
            if name == "control":
                return [x * settings["control_epochs"] for x in self.control_per_epoch] or None
            if name in RUNS:
                return [x * settings["more_epochs"] * spe for x in self.per_step[RUNS[name].stage]] or None
            return None
        if kind == "mine":
            _, _, v = name.partition("+")
            mining = {**default_mining(settings), **(VARIANTS[v].overrides if v else {})}
            if v and VARIANTS[v].rule == "mutual":
                mining["roi_mode"] = "mutual"  # a re-selection from saved features: none recorded at this cost
            base = self.mine.get(mining["roi_mode"])
            if not base:
                return None
            scale = mining["ss_max_side_px"]
            if scale not in ss_done and mining["roi_mode"] != "mutual":
                if not self.ss.get(scale):
                    return None  # a selective search at a scale the long mode never ran from scratch
                ss_done.add(scale)
                return [x + ss for x in base for ss in self.ss[scale]]
            return base
        return self.eval[eval_with_svm(name, settings) and bool(settings.get("svm", True))] or None


def estimate(mode_settings: dict[str, Any], seeds: tuple[int, ...] | list[int],
             long_results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per unit of the mode, in run order: key, median and minimum estimated seconds, samples.
    Seconds are None where the mode is at another scale or nothing comparable was recorded."""
    t = Timings(long_results)
    comparable = same_scale(mode_settings, long_results["settings"])
    ss_done: set = set()
    out = []
    for key in unit_keys(mode_settings, seeds):
        s = t.unit_samples(key, mode_settings, ss_done) if comparable else None
        out.append({"key": key, "median_s": float(np.median(s)) if s else None,
                    "min_s": float(np.min(s)) if s else None, "samples": len(s or [])})
    return out


def render(mode_name: str, rows: list[dict[str, Any]], status: dict[str, str]) -> str:
    """The dry-run listing: each unit, its state in the results file, its estimated minutes
    (median and fastest), and totals per seed, for the mode, and for what is not done yet.
    A total sums the units with an estimate and says how many have none."""
    m = lambda x: "n/a" if x is None else f"{x / 60:.1f}"  # noqa: E731
    lines = [f"{'unit':42s} {'state':8s} {'median min':>10s} {'fastest':>8s}  samples"]
    for r in rows:
        lines.append(f"{r['key']:42s} {status.get(r['key'], 'todo'):8s} {m(r['median_s']):>10s} "
                     f"{m(r['min_s']):>8s}  {r['samples']}")

    def total(label: str, sel: list[dict[str, Any]]) -> str:
        unknown = sum(r["median_s"] is None for r in sel)
        note = f"  ({unknown} of {len(sel)} units without an estimate)" if unknown else ""
        known = [r for r in sel if r["median_s"] is not None]
        med, low = ((sum(r["median_s"] for r in known), sum(r["min_s"] for r in known)) if known
                    else (None, None))  # a mode at another scale: no total rather than a zero
        return f"{label:42s} {'':8s} {m(med):>10s} {m(low):>8s}{note}"

    seeds = sorted({r["key"].split("/")[1] for r in rows}, key=lambda s: int(s[1:]))
    lines += [total(f"seed {s[1:]} total", [r for r in rows if r["key"].split("/")[1] == s]) for s in seeds]
    lines.append(total(f"{mode_name} total ({len(rows)} units)", rows))
    todo = [r for r in rows if status.get(r["key"]) != "done"]
    lines.append(total(f"not done yet ({len(todo)} units)", todo))
    return "\n".join(lines) + "\n"
