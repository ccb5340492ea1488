"""Command line: run one mode of the study (resumable), then regenerate the report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import DATA, DOC, REPO, RESULTS_DIR
from .data import DATASETS
from .plan import MODES, RUNS, VARIANTS, Mode, unit_keys
from .store import ResultsStore, SettingsMismatch, git_commit


def results_repo(results_dir: Path) -> Path:
    """The git work tree that holds the results folder: commits go there, which need not be the
    tree the study's code runs from (a long study can run from a frozen worktree while other
    work lands on main, and still commit its results to main)."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=results_dir, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        top = ""
    return Path(top) if top else REPO


def result_path(results_dir: Path, mode: str) -> Path:
    return results_dir / f"study_{mode}.json"


def cpu_identity() -> str:
    """The CPU as precisely as /proc/cpuinfo says: a virtual machine often names only "AMD EPYC",
    and two sessions on different CPU models (or SIMD sets) may round float sums differently, so
    every invocation records family, model, stepping and the vector extensions next to the name."""
    name = platform.processor() or platform.machine()
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return name
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}
    simd = sorted(f for f in info.get("flags", "").split() if f.startswith(("avx", "fma", "sse4", "amx")))
    parts = [info.get("model name", name)]
    if "cpu family" in info:
        parts.append(f"family {info['cpu family']} model {info.get('model', '?')} stepping {info.get('stepping', '?')}")
    if simd:
        parts.append(" ".join(simd))
    return ", ".join(parts)


def machine_info(study) -> dict[str, Any]:
    import torch

    cpu = cpu_identity()

    def git(*a: str) -> str:  # "" where git or the repository is absent (a copied tree on a GPU box)
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    cfg, dev = study.cfg, study.device
    return {"cpu": cpu, "cpu_count": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "git_commit": git("rev-parse", "--short", "HEAD"),
            "backbone": cfg.model.backbone, "image_size": cfg.augment.image_size,
            "patch_size": cfg.augment.patch_size, "batch_size": cfg.train.batch_size,
            "base_lr": cfg.train.base_lr, "knn_k": cfg.mine.knn_k, "pair_ratio": cfg.mine.pair_ratio,
            "steps_per_epoch": study.steps_per_epoch()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__)
    p.add_argument("--mode", choices=sorted(MODES), default="long",
                   help="long: one seed, 3,000 stage-1 steps (2 CPU cores: several hours over sessions); "
                        "short: 3 seeds, 800 steps; quick: pipeline check in minutes; gpu: one CUDA GPU")
    p.add_argument("--quick", action="store_true", help="same as --mode quick")
    p.add_argument("--report-only", action="store_true", help="only regenerate docs/RESULTS.md and the plots")
    p.add_argument("--dry-run", "--plan", action="store_true",
                   help="list the mode's units in run order, whether each is done in the results file, and its "
                        "minutes estimated from the long mode's recorded timings (--timings); runs and writes nothing")
    p.add_argument("--timings", default=str(RESULTS_DIR / "study_long.json"),
                   help="results file whose unit timings --dry-run scales (default benchmarks/results/study_long.json)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the mode's)")
    p.add_argument("--runs", help=f"comma-separated runs after stage 1 (default: the mode's): {', '.join(RUNS)}")
    p.add_argument("--variants", help=f"comma-separated mining options (default: the mode's): {', '.join(VARIANTS)}")
    p.add_argument("--work", help="cache folder for checkpoints and mining (default benchmarks/work/study_<mode>)")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    p.add_argument("--doc", default=str(DOC), help="the report to regenerate (default docs/RESULTS.md)")
    p.add_argument("--data", default=str(DATA), help="folder holding coco128/ and coco-mini/")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=float, help="start no new unit after this many minutes")
    p.add_argument("--threads", type=int, help="torch and BLAS threads (default: the mode's)")
    p.add_argument("--fresh", action="store_true", help="discard the existing results file (cached files are reused)")
    p.add_argument("--rescore", action="store_true",
                   help="recompute the pair metrics of every done mining unit from its saved files (after a "
                        "change to the metrics), then regenerate the report; runs no other unit")
    p.add_argument("--redo", help="comma-separated runs after stage 1 to train, evaluate and mine again (e.g. to "
                                  "check that a run reproduces, or to score it with a newer metric), or mining "
                                  "units (<checkpoint>+<variant>) to mine again; the first values stay under "
                                  "'previous'. Give it once: the mark is kept in the results file")
    p.add_argument("--commit", action="store_true",
                   help="git-commit the results file and the report after every unit (a long study that a "
                        "session may cut short keeps everything finished)")
    return p.parse_args(argv)


def dry_run(mode: Mode, results: Path, timings: Path) -> str:
    """The --dry-run listing (estimate.render); reads the two files, writes nothing."""
    import json

    from .estimate import estimate, render

    status = ({k: r.get("status", "?") for k, r in json.loads(results.read_text())["units"].items()}
              if results.exists() else {})
    if not timings.exists():
        return f"no timings file {timings}: no estimates\n" + "\n".join(
            f"{k} {status.get(k, 'todo')}" for k in unit_keys(mode.settings(), mode.seeds)) + "\n"
    head = (f"{mode.name}: {len(mode.seeds)} seed(s) {', '.join(map(str, mode.seeds))}; runs "
            f"{', '.join(mode.runs) or 'none'}; variants {', '.join(mode.variants) or 'none'}; results {results}"
            f"{'' if results.exists() else ' (not started)'}; minutes scaled from {timings}\n")
    return head + render(mode.name, estimate(mode.settings(), mode.seeds, json.loads(timings.read_text())), status)


def main(argv=None) -> int:
    from .report import write_report

    t0 = time.perf_counter()
    args = parse_args(argv)
    results_dir = Path(args.out) if args.out else RESULTS_DIR
    doc = Path(args.doc)
    if args.report_only:
        print(f"wrote {write_report(results_dir, doc)}")
        return 0
    name = "quick" if args.quick else args.mode
    mode = MODES[name]
    for opt, table in (("runs", RUNS), ("variants", VARIANTS)):
        if getattr(args, opt):
            chosen = tuple(x.strip() for x in getattr(args, opt).split(",") if x.strip())
            unknown = [x for x in chosen if x not in table]
            if unknown:
                print(f"unknown {opt}: {', '.join(unknown)}; choose from {', '.join(table)}", file=sys.stderr)
                return 2
            mode = dataclasses.replace(mode, **{opt: chosen})
    if args.seeds:
        mode = dataclasses.replace(mode, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.max_minutes is not None:
        mode = dataclasses.replace(mode, max_minutes=args.max_minutes)
    if args.threads is not None:
        mode = dataclasses.replace(mode, threads=args.threads)
    if args.dry_run:
        print(dry_run(mode, result_path(results_dir, name), Path(args.timings)), end="")
        return 0
    if name == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("--mode gpu needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    out = result_path(results_dir, name)
    results_dir.mkdir(parents=True, exist_ok=True)
    repo = results_repo(results_dir)
    work = Path(args.work) if args.work else REPO / "benchmarks" / "work" / f"study_{name}"
    try:
        store = ResultsStore(out, name, mode.settings(), fresh=args.fresh)
    except SettingsMismatch as exc:
        print(exc, file=sys.stderr)
        return 2

    redo = tuple(x.strip() for x in (args.redo or "").split(",") if x.strip())
    unknown = [x for x in redo if x.partition("+")[0] not in RUNS and "+" not in x]
    if unknown:
        print(f"unknown runs in --redo: {', '.join(unknown)}; choose from {', '.join(RUNS)}, or name a mining "
              "unit such as e188+roi_align", file=sys.stderr)
        return 2
    if redo:
        mode = dataclasses.replace(mode, runs=tuple(dict.fromkeys([*mode.runs, *(x for x in redo if x in RUNS)])))

    from .units import Study

    keep = results_dir / f"study_{name}_keep" if mode.keep_in_git else work / "keep"
    study = Study(mode, work, store, Path(args.data), args.device, keep=keep)
    d = store.data
    d["machine"] = machine_info(study)
    d["seeds"] = sorted(set(d.get("seeds", [])) | set(mode.seeds))
    d["images"] = {"total": len(study.files),
                   "per_dataset": {k: sum(f.startswith(k + "/") for f in study.files) for k in DATASETS}}
    d["labels"] = {k: {"train": len(g.images("train")), "val": len(g.images("val"))} for k, g in study.gts.items()}
    inv = {"started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join(["python -m benchmarks.study", *(sys.argv[1:] if argv is None else argv)]),
           "load_avg": list(os.getloadavg()), "wall_s": None, "device": d["machine"]["device"],
           "threads": d["machine"]["torch_threads"], "cpu": d["machine"]["cpu"]}
    d["invocations"].append(inv)
    store.save()
    if redo:
        marked = study.mark_redo(redo)
        print(f"marked for redo: {', '.join(marked) or 'nothing done yet'}", flush=True)
    if args.rescore:
        n = study.rescore()
        store.save()
        print(f"rescored {n} mining unit(s); report: {write_report(results_dir, doc)}")
        if args.commit:
            git_commit(repo, [out, doc, *sorted(results_dir.glob(f"study_{name}_*.png"))],
                       f"study {name}: pair metrics recomputed for {n} mining units")
        return 0
    if args.commit:
        def commit(key: str) -> None:
            try:
                written = write_report(results_dir, doc)
            except Exception as exc:  # a report bug must not stop the study; the JSON is what counts
                print(f"report failed: {exc}", file=sys.stderr)
                written = None
            paths = ([out] + ([written] if written else []) + sorted(results_dir.glob(f"study_{name}_*.png"))
                     + (study.kept_written if mode.keep_in_git else []))
            git_commit(repo, paths, f"study {name}: {key} ({store.units[key]['status']})")
        store.after_record = commit
        if mode.keep_in_git:
            study.after_keep = lambda p: git_commit(repo, [p], f"study {name}: keep {p.relative_to(results_dir)}")
    try:
        study.run()
    finally:
        inv["wall_s"] = time.perf_counter() - t0
        d["skipped"] = store.skipped
        store.save()
        print(f"results: {out}; report: {write_report(results_dir, doc)}; wall {inv['wall_s']:.0f} s", flush=True)
    if store.errors:
        print(f"{len(store.errors)} unit(s) failed: {', '.join(store.errors)}", file=sys.stderr)
        return 1
    return 0
