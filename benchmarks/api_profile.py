#!/usr/bin/env python
"""CPU per request of GET /api/v1/correspondences, in this process: where the API's time goes.

The load benchmark (``api_load_benchmark.py``) measures the API's CPU per request from outside;
this script finds out what that CPU is spent on. It calls the ASGI app directly (no HTTP server,
no test client, whose own work would count), with the load benchmark's query mix on its seeded
database, one request at a time, and reports the process's CPU time (``time.process_time``, all
threads: FastAPI runs a sync route in a worker thread) per request by query kind. With
``--profile`` it also prints the functions that cost the most (cProfile on CPU time, cumulative),
and with ``--profile-out`` writes the raw profile for ``python -m pstats`` or snakeviz. cProfile
sees one thread only, so a profiled run makes FastAPI's worker-thread calls inline (the hand-off
to the thread pool is then missing from the profile, and only from it).

CPU time, unlike latency, stays meaningful on a busy machine; the query execution itself is in the
Postgres backend, another process, and does not count here.

Usage (the database is the load benchmark's, seeded by it)::

    nice -n 15 python benchmarks/api_profile.py --pairs 100000 --requests 600
    nice -n 15 python benchmarks/api_profile.py --pairs 100000 --requests 300 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import api_load_benchmark as load  # noqa: E402  (after the path is set)


async def _get(app, path: str, params: dict) -> tuple[int, bytes]:
    """One GET through the ASGI app: (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": urlencode(params).encode(), "headers": [(b"host", b"127.0.0.1")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    out: dict = {"status": 0, "body": b""}
    done = False

    async def receive() -> dict:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # a streaming response would wait for a disconnect here
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["body"]


async def drive(app, info: dict, n_requests: int, pages: int, seed: int) -> dict[str, list[float]]:
    """``n_requests`` requests of the load benchmark's mix (first pages, then cursor pages), one at
    a time; the CPU seconds of each, by query kind."""
    rnd = random.Random(seed)
    cpu: dict[str, list[float]] = defaultdict(list)
    sent = 0
    while sent < n_requests:
        kind = rnd.choice(load.QUERY_TYPES)
        params = load.query_params(kind, rnd, info)
        for page in range(pages):
            t0 = time.process_time()
            code, body = await _get(app, "/api/v1/correspondences", params)
            cpu[kind if page == 0 else f"{kind}+cursor"].append(time.process_time() - t0)
            sent += 1
            if code != 200:
                raise SystemExit(f"HTTP {code} for {params}: {body[:300]!r}")
            nxt = json.loads(body)["next_cursor"]
            if not nxt or sent >= n_requests:
                break
            params = {**params, "cursor": nxt}
    return cpu


def _inline_threads() -> None:
    """Run what FastAPI hands to its thread pool in the calling thread (for cProfile's one thread)."""
    import anyio.to_thread

    async def run_sync(func, *args, abandon_on_cancel=False, cancellable=None, limiter=None):
        return func(*args)

    anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100_000, help="the seeded database of the load benchmark to use")
    p.add_argument("--db", default=None, help="database name (default orl_bench_load_<pairs>)")
    p.add_argument("--requests", type=int, default=600, help="measured requests")
    p.add_argument("--warmup", type=int, default=100, help="requests before measuring (caches, pools)")
    p.add_argument("--pages", type=int, default=3, help="pages per query: the first, then by cursor")
    p.add_argument("--profile", action="store_true", help="print the costliest functions (cProfile)")
    p.add_argument("--profile-out", type=Path, help="write the raw cProfile stats here")
    p.add_argument("--top", type=int, default=40, help="functions to print with --profile")
    args = p.parse_args(argv)

    name = args.db or f"orl_bench_load_{args.pairs}"
    url = load.db_url(name)
    info = load.seeded_info(url)
    if info is None:
        raise SystemExit(f"{name} is not seeded; run benchmarks/api_load_benchmark.py --pairs {args.pairs} first")
    from sqlalchemy import create_engine, pool, text

    eng = create_engine(url, poolclass=pool.NullPool)
    with eng.connect() as c:
        info["first_image_id"] = c.execute(text("SELECT min(id) FROM images WHERE dataset_id = :d"),
                                           {"d": info["dataset_id"]}).scalar()
    eng.dispose()

    tmp = Path(tempfile.mkdtemp(prefix="orl_api_profile_"))
    (tmp / "data").mkdir()
    os.environ.update({"ORL_DATABASE_URL": url, "ORL_DATA_ROOTS": str(tmp / "data"),
                       "ORL_ARTIFACTS_DIR": str(tmp / "artifacts")})
    os.environ.pop("ORL_API_READ_TOKEN", None)  # reads open, as in the load benchmark
    from services.api.main import create_app
    from services.common.runtime import reset

    reset()
    app = create_app()
    asyncio.run(drive(app, info, args.warmup, args.pages, seed=1))
    prof = None
    if args.profile or args.profile_out:
        _inline_threads()
        # CPU time, not wall time: on a busy machine wall time is mostly waiting for a core.
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
    cpu = asyncio.run(drive(app, info, args.requests, args.pages, seed=2))
    if prof is not None:
        prof.disable()
    reset()

    every = [x for xs in cpu.values() for x in xs]
    print(f"{name}: {len(every)} requests, CPU per request mean {1000 * statistics.fmean(every):.2f} ms, "
          f"median {1000 * statistics.median(every):.2f} ms" + (" (under cProfile: inflated)" if prof else ""))
    print("| query | requests | CPU ms mean | CPU ms median |\n|---|---|---|---|")
    for kind in sorted(cpu):
        xs = cpu[kind]
        print(f"| {kind} | {len(xs)} | {1000 * statistics.fmean(xs):.2f} | {1000 * statistics.median(xs):.2f} |")
    if prof is not None:
        if args.profile_out:
            prof.dump_stats(args.profile_out)
        if args.profile:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(args.top)
            print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
