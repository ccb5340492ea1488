#!/usr/bin/env python
"""Does bf16 autocast pay on this CPU? A quick probe before setting ``train.cpu_amp``.

A torchvision ResNet-18 (the `cpu` preset's backbone, 128 outputs standing in for the heads)
forward + backward on one batch of random views, four ways side by side, interleaved:
fp32 / bf16 autocast, each with and without channels_last. Per way the median of
``--repeats`` timings (each the mean of 2 steps after 2 untimed ones). It answers one question
in a minute: is the bf16 step faster here? CPUs with bf16 matrix units (Intel AMX, AVX512-BF16)
say yes; CPUs without them are many times slower in bf16. The full training step with the
option is measured by ``train_throughput.py --variants tensor,tensor-bf16``.

Usage::

    python benchmarks/cpu_amp_probe.py                 # 1 thread, 64 px, batch 32
    python benchmarks/cpu_amp_probe.py --threads 2 --size 112
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import write_results  # noqa: E402
from benchmarks.study.runner import cpu_identity  # noqa: E402

WAYS = [("fp32", False, False), ("bf16", True, False), ("bf16 channels_last", True, True),
        ("fp32 channels_last", False, True)]
EARLIER_KEYS = ("date", "command", "cpu", "threads", "size", "batch", "repeats", "loaded", "seconds")


def step(model: torch.nn.Module, x: torch.Tensor, amp: bool, channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = model(x.contiguous(memory_format=fmt)).float().pow(2).mean()
    y.backward()


def markdown(res: dict) -> str:
    lines = ["# Does bf16 autocast pay on this CPU?", "",
             f"`{res['command']}` on {res['machine']}, {res['date']}; CPU: {res['cpu']}.", "",
             f"ResNet-18 forward + backward, batch {res['batch']}, {res['size']} px, {res['threads']} torch "
             f"thread(s); median of {res['repeats']} interleaved timings. Load average before "
             f"{res['load_before']:.2f}, after {res['load_after']:.2f} on {os.cpu_count()} cores"
             + (" (**loaded**: other jobs ran; read the ratios, not the seconds)." if res["loaded"] else "."), "",
             "| way | seconds per step | vs fp32 |", "|---|---|---|"]
    base = res["seconds"]["fp32"]
    lines += [f"| {k} | {v:.3f} | {base / v:.2f}x |" for k, v in res["seconds"].items()]
    if res.get("earlier"):
        lines += ["", "Earlier readings (seconds per step; vs fp32):", "",
                  "| date | threads, px, batch | loaded | " + " | ".join(res["seconds"]) + " |",
                  "|---|---|---|" + "---|" * len(res["seconds"])]
        for e in res["earlier"]:
            sec = e.get("seconds") or {}
            cells = [f"{sec[k]:.3f} ({sec['fp32'] / sec[k]:.2f}x)" if k in sec else "n/a" for k in res["seconds"]]
            lines.append(f"| {e.get('date')} | {e.get('threads')}, {e.get('size')}, {e.get('batch')} | "
                         f"{'yes' if e.get('loaded') else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu_amp_probe"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=128)
    x = torch.randn(args.batch, 3, args.size, args.size)
    before = os.getloadavg()[0]
    for _, amp, cl in WAYS:
        step(model, x, amp, cl)
        step(model, x, amp, cl)
    times: dict[str, list[float]] = {name: [] for name, _, _ in WAYS}
    for _ in range(args.repeats):
        for name, amp, cl in WAYS:
            t0 = time.perf_counter()
            step(model, x, amp, cl)
            step(model, x, amp, cl)
            times[name].append((time.perf_counter() - t0) / 2)
    after = os.getloadavg()[0]
    res = {"command": "python benchmarks/cpu_amp_probe.py " + " ".join(sys.argv[1:]), "cpu": cpu_identity(),
           "threads": args.threads, "size": args.size, "batch": args.batch, "repeats": args.repeats,
           "torch": torch.__version__, "load_before": before, "load_after": after,
           "loaded": max(before, after) > (os.cpu_count() or 1) / 2,
           "seconds": {k: statistics.median(v) for k, v in times.items()}, "runs": times}
    # Earlier readings are kept (a busy machine gives spread, and the spread is the finding).
    prev_file = Path(args.out).with_suffix(".json")
    if prev_file.exists():
        prev = json.loads(prev_file.read_text())
        res["earlier"] = [*prev.pop("earlier", []), {k: prev.get(k) for k in EARLIER_KEYS}]
    write_results(Path(args.out), res, markdown)


if __name__ == "__main__":
    main()
