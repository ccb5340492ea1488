#!/usr/bin/env python
"""Render docs/PERFORMANCE.md from the committed benchmark results files, and nothing else.

Every number in the page is read from a file under benchmarks/results/; for each benchmark the
page says whether its results come from a clean run on an idle machine (as far as the file
records it) and the command that produces one. A benchmark without a results file is listed
as not run. Imports nothing of the project, so it runs anywhere in a second.

  python benchmarks/performance_table.py           # writes docs/PERFORMANCE.md
  python benchmarks/performance_table.py --check   # exit 1 when the page is not what the files give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOC = REPO / "docs" / "PERFORMANCE.md"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def train_throughput() -> list[str]:
    cmd = "python benchmarks/train_throughput.py --repeats 5"
    out = ["## Training throughput (stage 1 and stage 3 steps, against the bare forward + backward)", ""]
    res = _load("train_throughput.json")
    if res is None:
        return out + ["**Not run**: no `benchmarks/results/train_throughput.json` is committed, so there are no "
                      "numbers here yet.", "",
                      f"A clean run: on an idle machine, `{cmd}` (the script marks a run `loaded` when the load "
                      "average went above half the cores, and such a run is not a result). On a GPU: the "
                      "`--device cuda` command in the script's docstring.", ""]
    m, load = res["machine"], res["load"]
    state = ("**Loaded machine: not a clean run.**" if res["loaded"] else "Clean run: the load average stayed at "
             "or below half the cores.")
    out += [f"{state} Load average {load['min']:.2f} to {load['max']:.2f}; {m.get('gpu') or m.get('processor') or ''}"
            f" {m['cpu_count']} cores, device {m['device']}, torch {m['torch']}; medians of {res['repeats']} "
            f"repeats of {res['steps']} steps. Produced by `{res['command']}`; a clean one: `{cmd}` on an idle "
            "machine.", ""]
    peer = res.get("peer") or {}
    if peer:
        out += [f"Peer: {peer['name']} {peer.get('version') or ''} "
                f"({'in this run' if peer.get('installed') else 'not installed in this run'}).", ""]
    out += ["| preset | stage | variant | samples/s | views/s | of bare | of pil |",
            "|---|---|---|---:|---:|---:|---:|"]
    for r in res["results"]:
        views = "" if r.get("views_per_s") is None else f"{r['views_per_s']:.2f}"
        of_pil = "" if r.get("of_pil") is None else f"{r['of_pil']:.2f}x"
        out.append(f"| {r['preset']} | {r['stage']} | {r['variant']} | {r['median']:.2f} | {views} | "
                   f"{100 * r['of_bare']:.0f}% | {of_pil} |")
    return out + [""]


def mining() -> list[str]:
    out = ["## Mining (stage 2) on coco128", ""]
    res = _load("mining_coco128_cpu2t.json")
    if res is None:
        return out + ["**Not run**: no `benchmarks/results/mining_coco128_cpu2t.json`. Produce one with `make bench` "
                      "on an idle machine.", ""]
    out += [f"From `benchmarks/results/mining_coco128_cpu2t.json` ({res['images']} photos, device {res['device']}, "
            f"torch {res['torch']}, {res['started']} to {res['finished']}). **Not known to be a clean idle run**: the "
            "file records no load average. A clean one: `make bench` (`python benchmarks/mining_benchmark.py`) on an "
            "idle machine; details in `benchmarks/results/mining_coco128_cpu2t.md`.", "",
            "| proposals | RoI features | wall s | selective search img/s | embedding img/s | pairs |",
            "|---|---|---:|---:|---:|---:|"]
    for name, r in res["miner"].items():
        side = "full" if r["ss_max_side_px"] is None else f"max side {r['ss_max_side_px']} px"
        ips = r["images_per_s"]
        out.append(f"| {name} ({side}) | {r['roi_mode']} | {r['wall_seconds']:.0f} | {ips['selective_search']:.2f} | "
                   f"{ips['embed_images']:.1f} | {r['pairs']} |")
    ref = res.get("reference_vs_ours")
    if ref:
        out += ["", f"Against the reference path (full-resolution selective search, every neighbour's boxes "
                    f"re-encoded per query), median of {ref['repeats']} interleaved repeats: "
                    f"{ref['median_reference_s']:.2f} s per query against {ref['median_ours_s']:.2f} s per image for "
                    f"ours ({ref['speedup_median']:.2f}x), {ref['cnn_forwards_per_image']['ratio']:.1f}x fewer CNN "
                    "forwards per image."]
    return out + [""]


def image_store() -> list[str]:
    out = ["## Decoded-image store: size", ""]
    res = _load("image_store_size.json")
    if res is None:
        return out + ["**Not run**: `python benchmarks/image_store_size.py` writes it.", ""]
    out += [f"From `benchmarks/results/image_store_size.json`, produced by `{res['command']}`. These are byte counts, "
            "not timings: they depend on the photos and the working size only, so the machine's load does not "
            "enter them and the run needs no idle machine.", "",
            "| photos folder | photos | working size (px) | MB per 1,000 photos |", "|---|---:|---:|---:|"]
    for r in res["results"]:
        out.append(f"| {r['folder']} | {r['photos']} | {r['working_size']} | {r['mb_per_1000_photos']:.1f} |")
    return out + [""]


def gpu() -> list[str]:
    out = ["## GPU paths of stage 2 (CUDA against the CPU)", ""]
    res = _load("gpu/gpu_paths.json")
    if res is None:
        return out + ["**Not run**: `bash benchmarks/gpu_check.sh` on a GPU machine writes benchmarks/results/gpu/.",
                      ""]
    device = RESULTS / "gpu" / "gpu_device.txt"
    seen = device.read_text().splitlines()[1].split(",")[0] if device.is_file() else res["device"]
    out += [f"From `benchmarks/results/gpu/gpu_paths.json`: device {res['device']} (gpu_device.txt: {seen}), torch "
            f"{res['torch']}. The checks are of equality, which load does not change; the timings come from one lent "
            "GPU machine whose load the file does not record, so they are **not known to be from an idle machine**. "
            "A new run: `bash benchmarks/gpu_check.sh` (prepared by `python benchmarks/gpu_prepare.py`, see the "
            "script's header).", "",
            "| path | same result as the CPU | CPU s | CUDA s |", "|---|---|---:|---:|"]
    for name in ("knn", "crop", "roi_align"):
        r = res.get(name)
        if r:
            out.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r.get('cpu_seconds', float('nan')):.2f} | "
                       f"{r['cuda_seconds']:.2f} |")
    return out + [""]


def render() -> str:
    lines = ["# Performance", "",
             "Generated by `python benchmarks/performance_table.py` from the results files under "
             "`benchmarks/results/`; do not edit by hand. Each section says whether its numbers come from a clean "
             "run on an idle machine and the command that produces one.", ""]
    for section in (train_throughput, mining, image_store, gpu):
        lines += section()
    return "\n".join(lines).rstrip("\n").replace("| nan |", "| |") + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with docs/PERFORMANCE.md instead of writing it")
    args = p.parse_args()
    text = render()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            sys.exit(f"{_rel(DOC)} is not what the results files give: run python benchmarks/performance_table.py")
        return
    DOC.write_text(text)
    print(f"wrote {_rel(DOC)}")


if __name__ == "__main__":
    main()
