"""The results file: one JSON per mode, written atomically after every unit; resumable.

A unit is one piece of work with a key ("train/s0/byol@e63", "mine/s0/e63", "eval/s0/orl").
Its record (status done or error, seconds, results) is written the moment it completes,
so an interrupted study loses at most the unit it was running. With ``commit=True`` the
file (and the regenerated report) is also committed to git after every unit, so a session
that ends mid-study keeps everything finished so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plan import signature

SCHEMA = 2


class SettingsMismatch(RuntimeError):
    pass


class MissingInput(RuntimeError):
    """A unit's input failed or was not reached (that unit's own record says why)."""


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: a cost that, unlike wall time,
    other load on the machine barely changes."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def to_jsonable(x: Any) -> Any:
    from orl.evaluate import to_jsonable as f  # lazy: the report stays free of torch imports

    return f(x)


class ResultsStore:
    def __init__(self, path: Path, mode: str, settings: dict[str, Any], fresh: bool = False):
        self.path = Path(path)
        if self.path.exists() and not fresh:
            self.data = json.loads(self.path.read_text())
            old = self.data.get("settings") or {}
            if signature(old) != signature(settings) or self.data.get("mode") != mode:
                raise SettingsMismatch(
                    f"{self.path} was written with other settings ({old}); this run uses {settings}. "
                    "Pass --fresh to start over, or --out for another folder.")
            for k in ("runs", "variants"):  # additions only
                self.data["settings"][k] = list(old.get(k, [])) + [x for x in settings[k] if x not in old.get(k, [])]
        else:
            self.data = {"schema": SCHEMA, "mode": mode, "settings": settings, "machine": {},
                         "invocations": [], "units": {}}
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.after_record: Callable[[str], None] | None = None

    @property
    def units(self) -> dict[str, dict[str, Any]]:
        return self.data["units"]

    def done(self, key: str) -> bool:
        rec = self.units.get(key, {})
        return rec.get("status") == "done" and not rec.get("redo")

    def mark_redo(self, keys: list[str]) -> list[str]:
        """Mark done units to be computed again (``--redo``); each keeps its values as
        ``previous`` when it is recorded anew. Persistent: a study interrupted during the redo
        resumes it without the flag. Returns the keys marked."""
        marked = [k for k in keys if self.units.get(k, {}).get("status") == "done"]
        for k in marked:
            self.units[k]["redo"] = True
        if marked:
            self.save()
        return marked

    def record(self, key: str, rec: dict[str, Any]) -> None:
        self.units[key] = {**rec, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()
        if self.after_record:
            self.after_record(key)

    def run_unit(self, key: str, fn: Callable[[], dict[str, Any]], outputs_exist: bool = True,
                 out_of_time: bool = False, log: Callable[[str], None] = print) -> bool:
        """Run ``fn`` unless ``key`` is done and its files exist; record its result or error.

        A done unit whose output files are gone (a new machine) runs again; its new record
        notes ``recomputed`` so the report can say which results were produced twice.
        """
        prev = self.units.get(key, {})
        if self.done(key) and outputs_exist:
            return True
        if out_of_time:
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
        if prev.get("status") == "done":
            # What the first computation found, beside the new one (e.g. whether CPU training
            # reproduced its loss curve).
            rec["recomputed"] = prev.get("recomputed", 0) + 1
            rec["previous"] = {k: prev[k] for k in ("recorded_at", "seconds", "loss", "pair_auc_fixed", "pairs")
                               if k in prev}
        self.record(key, rec)
        log(f"{key} done in {rec['seconds']:.0f} s")
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(to_jsonable(self.data), indent=1))
        os.replace(tmp, self.path)


def git_commit(repo: Path, paths: list[Path], message: str, tries: int = 5) -> bool:
    """Commit only ``paths`` (``git commit -- paths`` leaves anything else staged alone).

    Retries while another git command holds the index lock; gives up quietly (returns False)
    outside a repository or during a merge, because losing a commit must never stop a study.
    """
    rel = [str(p.relative_to(repo)) for p in paths if p.exists()]
    if not rel:
        return False
    for i in range(tries):
        try:
            subprocess.run(["git", "add", "--", *rel], cwd=repo, check=True, capture_output=True)
            r = subprocess.run(["git", "commit", "-q", "-m", message, "--", *rel], cwd=repo, capture_output=True,
                               text=True)
        except (OSError, subprocess.CalledProcessError):
            time.sleep(2 + 2 * i)
            continue
        if r.returncode == 0 or "nothing to commit" in r.stdout + r.stderr or "no changes added" in r.stdout:
            return r.returncode == 0
        time.sleep(2 + 2 * i)
    return False


# -- aggregation over seeds (pure) ------------------------------------------------------------
def aggregate(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of the non-missing values."""
    import numpy as np

    v = [float(x) for x in values if x is not None]
    return {"mean": float(np.mean(v)) if v else None,
            "std": float(np.std(v, ddof=1)) if len(v) >= 2 else None, "n": len(v), "values": v}


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
        return f"higher in all {p['n']} seeds" if p["n"] > 1 else "higher (1 seed)"
    if p["losses"] == p["n"]:
        return f"lower in all {p['n']} seeds" if p["n"] > 1 else "lower (1 seed)"
    ties = p["n"] - p["wins"] - p["losses"]
    return f"mixed: higher in {p['wins']}, lower in {p['losses']}, equal in {ties} of {p['n']} seeds"
