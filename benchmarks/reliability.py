#!/usr/bin/env python
"""The fault tests' measurements, for docs/RELIABILITY.md.

Runs the fault test files (real Postgres, Redis, Celery workers and trainers; see each file's
docstring) with ORL_RELIABILITY_RESULTS set, so each test's ``tests.services.reliability.record``
call lands in benchmarks/results/reliability.json: cancel latencies, CPU after a cancel, outage
and recovery times, the errors a full or unwritable disk gives. It adds what the numbers depend
on (the machine, its load average before and after, the niceness, pytest's outcome and time per
test) and writes benchmarks/results/reliability.md from the JSON.

Usage: nice -n 15 python benchmarks/reliability.py [--tests FILE ...] [--timeout-scale N]
(``--timeout-scale`` stretches the tests' waits on a busy machine, ORL_TEST_TIMEOUT_SCALE; it
never stretches a bound a test asserts.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TESTS = ["tests/services/test_faults_cancel.py", "tests/services/test_faults_restart.py",
         "tests/services/test_faults_disk.py", "tests/services/test_faults_concurrency.py", "tests/test_fileio.py"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", nargs="+", default=TESTS)
    ap.add_argument("--timeout-scale", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "reliability.json")
    args = ap.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".measured.json")
    raw.unlink(missing_ok=True)
    env = dict(os.environ, ORL_RELIABILITY_RESULTS=str(raw), ORL_TEST_TIMEOUT_SCALE=str(args.timeout_scale))
    load_before = os.getloadavg()
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "-rA", *args.tests]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    # Every process of the run (pytest, its workers, servers, subprocesses) was waited for, so
    # their CPU time is here: on an idle machine the run takes about this much, plus its waits.
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    durations = {m.group(2): float(m.group(1)) for m in re.finditer(r"^([\d.]+)s call\s+(\S+)$", proc.stdout, re.M)}
    outcomes = dict(reversed(m.groups()) for m in re.finditer(r"^(PASSED|FAILED|SKIPPED|ERROR) (\S+)", proc.stdout,
                                                             re.M))
    measured = json.loads(raw.read_text()) if raw.exists() else {}
    raw.unlink(missing_ok=True)
    doc = {
        "command": " ".join(["python", "benchmarks/reliability.py", *(argv if argv is not None else sys.argv[1:])]),
        "pytest": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "nice": os.nice(0), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "timeout_scale": args.timeout_scale, "tests": {k: {"outcome": outcomes.get(k), "seconds": durations.get(k)}
                                                       for k in sorted(set(outcomes) | set(durations))},
        "measured": measured,
    }
    args.out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(doc))
    log = Path(tempfile.gettempdir()) / "reliability-pytest.log"
    log.write_text(proc.stdout + proc.stderr)
    print(proc.stdout[-3000:])
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}; pytest's whole output: {log}")
    return proc.returncode


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Fault tests: measurements", "",
             f"`{doc['command']}` (pytest exit code {doc['exit_code']}, {doc['wall_s']} s wall, "
             f"{doc['cpu_s']} CPU s in all its processes). "
             f"{m['cpus']} CPUs, nice {m['nice']}, load average {m['loadavg_before'][0]} before and "
             f"{m['loadavg_after'][0]} after; waits stretched x{doc['timeout_scale']:g}.", "",
             "| test | outcome | seconds |", "|---|---|---|"]
    lines += [f"| `{k}` | {v['outcome']} | {v['seconds']} |" for k, v in doc["tests"].items()]
    lines += ["", "| measurement | values |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v, sort_keys=True)}` |" for k, v in sorted(doc["measured"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
