#!/usr/bin/env python
"""API load benchmark: the dashboard's correspondence queries on a large table while mining writes.

1. A Postgres database seeded with ``--pairs`` RoI pairs (default 1,000,000) of one succeeded
   mining job: ``--pairs / 50`` images, each the query of 10 neighbours x 5 pairs (the miner's
   layout), scores and boxes drawn from a seeded generator, and reviews of 2% of the pairs by
   one reviewer. Migrated with the project's Alembic migrations, filled with COPY in the columns
   of the SQLAlchemy models, then ANALYZEd. It is kept under its name (``orl_bench_load_<pairs>``
   by default) so a rerun reuses it; ``--drop`` drops it.
2. The API as in production (``uvicorn services.api.main:app``, one process), started here.
3. From two other processes at once, for ``--seconds`` (after ``--warmup``):
   - the readers: ``--clients`` threads, each a dashboard user paging through the Pairs page's
     queries (GET /api/v1/correspondences, 50 pairs a page): best first, worst first, a score
     range, a box-area range, a seeded random sample, one query image, an image on either side
     (the Image page), and the pairs a reviewer has not reviewed; each first page, then
     ``--pages - 1`` more through ``next_cursor``, pausing ``--think-ms`` between requests (a
     person looks at a page for seconds; with no pause the readers only measure how long the
     queue in front of one API process grows);
   - the writer: a running mining job's pairs, written the miner's way (``records.write_pairs``,
     one image's 50 pairs and the job's progress per transaction) at ``--write-rate`` pairs/s.
4. EXPLAIN (ANALYZE) of the SQL the API runs for each query type (captured from the router's own
   function), noting every sequential scan.
5. ``benchmarks/results/api_load.json`` and ``.md``: requests/s, p50 / p90 / p99 / max latency and
   errors per query type (first pages and cursor pages apart), the writer's achieved rate, the
   plans, the command, the load average before and after, and the other processes that used
   the CPU meanwhile. A run below 1M pairs, on a loaded machine, or beside other busy processes
   is marked as not clean.

Targets (issue 11): no errors, p99 under 50 ms for a page of 50 pairs.

Usage (full scale, on an otherwise idle machine)::

    python benchmarks/api_load_benchmark.py --pairs 1000000 --seconds 60 --clients 8

    nice -n 15 python benchmarks/api_load_benchmark.py --pairs 100000 --seconds 20   # a quick check
    python benchmarks/api_load_benchmark.py --pairs 1000000 --drop                   # drop the cached db
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_file import write_results  # noqa: E402  (needs REPO on sys.path)

RESULTS = REPO / "benchmarks" / "results"
ADMIN_URL = os.environ.get("ORL_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
NEIGHBOURS, PAIRS_PER_NEIGHBOUR = 10, 5  # per query image: the miner's K and pairs per (image, neighbour)
PER_IMAGE = NEIGHBOURS * PAIRS_PER_NEIGHBOUR
PAGE = 50
TARGET_P99_MS = 50.0
REVIEWER = "bench-reviewer"
SEED_VERSION = 2  # bump when the seeded content changes: a cached database of another version is refused
QUERY_TYPES = ("best", "worst", "score_range", "area_range", "random", "image", "image_either", "unreviewed")


# -- the seeded database ------------------------------------------------------------------------------
def db_url(name: str) -> str:
    from sqlalchemy import make_url

    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def _exists(name: str) -> bool:
    from sqlalchemy import create_engine, pool, text

    eng = create_engine(ADMIN_URL, poolclass=pool.NullPool)
    try:
        with eng.connect() as c:
            return c.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
    finally:
        eng.dispose()


def _psycopg_dsn(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def seed(url: str, n_pairs: int, rng_seed: int = 0) -> dict:
    """Migrate and fill the database; returns what was seeded (also stored in bench_seed)."""
    import numpy as np
    import psycopg

    from services.common.migrate import upgrade
    from services.common.models import Dataset, Image, Job, PairReview, RoiPair

    upgrade(url)
    rng = np.random.default_rng(rng_seed)
    n_images = max(NEIGHBOURS + 1, math.ceil(n_pairs / PER_IMAGE))
    t0 = time.perf_counter()
    with psycopg.connect(_psycopg_dsn(url)) as conn:
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {Dataset.__tablename__} (name, path) VALUES (%s, %s) RETURNING id",
                    ("bench", "/nonexistent/bench"))  # the correspondence list reads no file
        dataset_id = cur.fetchone()[0]
        cols = ["dataset_id", "rel_path", "width", "height", "size_bytes", "checksum", "status"]
        _check_columns(Image, cols)
        widths = rng.integers(320, 1280, n_images)
        heights = rng.integers(240, 960, n_images)
        with cur.copy(f"COPY {Image.__tablename__} ({', '.join(cols)}) FROM STDIN") as cp:
            for i in range(n_images):
                cp.write_row((dataset_id, f"img/{i:08d}.jpg", int(widths[i]), int(heights[i]), 100_000,
                              f"{i:040x}", "ok"))
        cur.execute(f"SELECT id FROM {Image.__tablename__} WHERE dataset_id = %s ORDER BY id", (dataset_id,))
        image_ids = np.array([r[0] for r in cur.fetchall()])
        cur.execute(f"INSERT INTO {Job.__tablename__} (kind, dataset_id, status, progress_done, progress_total, "
                    "started_at, finished_at) VALUES ('mine', %s, 'succeeded', %s, %s, now(), now()) RETURNING id",
                    (dataset_id, n_images, n_images))
        job_id = cur.fetchone()[0]
        n = _copy_pairs(cur, RoiPair, rng, job_id, image_ids, widths, heights, n_pairs)
        cur.execute(f"SELECT min(id), max(id) FROM {RoiPair.__tablename__} WHERE job_id = %s", (job_id,))
        lo, hi = cur.fetchone()
        reviewed = rng.choice(np.arange(lo, hi + 1), size=max(1, n // 50), replace=False)
        _check_columns(PairReview, ["pair_id", "reviewer", "verdict"])
        with cur.copy(f"COPY {PairReview.__tablename__} (pair_id, reviewer, verdict) FROM STDIN") as cp:
            for pid in reviewed:
                cp.write_row((int(pid), REVIEWER, "correct" if rng.random() < 0.7 else "wrong"))
        info = {"version": SEED_VERSION, "pairs": n, "images": n_images, "dataset_id": dataset_id, "job_id": job_id,
                "reviews": len(reviewed), "rng_seed": rng_seed}
        cur.execute("CREATE TABLE bench_seed (info jsonb NOT NULL)")
        cur.execute("INSERT INTO bench_seed VALUES (%s)", (json.dumps(info),))
        conn.commit()
    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # what autovacuum does to a table grown this much, before users come
    info["seed_seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _check_columns(model: Any, cols: list[str]) -> None:
    missing = [c for c in cols if c not in model.__table__.columns]
    if missing:
        raise SystemExit(f"the {model.__tablename__} model has no column(s) {missing}; update the seeding")


def _copy_pairs(cur, RoiPair, rng, job_id: int, image_ids, widths, heights, n_pairs: int) -> int:
    """Each image the query of its NEIGHBOURS next images, PAIRS_PER_NEIGHBOUR pairs each, ranked by score."""
    import numpy as np

    cols = ["job_id", "image_id", "neighbor_image_id", "neighbor_rank", "rank", "score",
            "qx1", "qy1", "qx2", "qy2", "nx1", "ny1", "nx2", "ny2"]
    _check_columns(RoiPair, cols)
    n_img = len(image_ids)
    written = 0
    with cur.copy(f"COPY {RoiPair.__tablename__} ({', '.join(cols)}) FROM STDIN") as cp:
        for q in range(n_img):
            if written >= n_pairs:
                break
            take = min(PER_IMAGE, n_pairs - written)
            nb = (q + 1 + np.arange(NEIGHBOURS)) % n_img
            scores = np.sort(np.clip(rng.normal(0.55, 0.18, (NEIGHBOURS, PAIRS_PER_NEIGHBOUR)), -1, 1))[:, ::-1]
            qb = _boxes(rng, np.full(PER_IMAGE, widths[q]), np.full(PER_IMAGE, heights[q]))
            j = np.repeat(nb, PAIRS_PER_NEIGHBOUR)  # the neighbour of each pair
            nbx = _boxes(rng, widths[j], heights[j])
            for k in range(take):
                r, p = divmod(k, PAIRS_PER_NEIGHBOUR)
                cp.write_row((job_id, int(image_ids[q]), int(image_ids[j[k]]), r, p, float(scores[r, p]),
                              *qb[k].tolist(), *nbx[k].tolist()))
            written += take
    return written


MIN_BOX_PX = 96  # the miner's box filter keeps boxes of at least 96 px a side (the paper's)


def _boxes(rng, w, h):
    """(n, 4) float xyxy boxes, the i-th inside a w[i] x h[i] image, MIN_BOX_PX to 80% of a side."""
    import numpy as np

    w, h = np.asarray(w, dtype=float), np.asarray(h, dtype=float)
    bw = rng.uniform(MIN_BOX_PX, np.maximum(MIN_BOX_PX + 1, 0.8 * w))
    bh = rng.uniform(MIN_BOX_PX, np.maximum(MIN_BOX_PX + 1, 0.8 * h))
    x1 = rng.uniform(0, np.maximum(1, w - bw))
    y1 = rng.uniform(0, np.maximum(1, h - bh))
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).round(2)


def seeded_info(url: str) -> dict | None:
    from sqlalchemy import create_engine, pool, text

    eng = create_engine(url, poolclass=pool.NullPool)
    try:
        with eng.connect() as c:
            if c.execute(text("SELECT to_regclass('bench_seed')")).scalar() is None:
                return None
            return dict(c.execute(text("SELECT info FROM bench_seed")).scalar())
    finally:
        eng.dispose()


# -- the API ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def uvicorn_extras() -> dict[str, str | None]:
    """Versions of the optional speed-ups uvicorn's "auto" would pick (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("httptools", "uvloop"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def start_api(url: str, port: int, workers: int, log: Path, tmp: Path, http: str = "auto",
              loop: str = "auto") -> subprocess.Popen:
    (tmp / "data").mkdir(exist_ok=True)
    env = {**os.environ, "ORL_DATABASE_URL": url, "ORL_DATA_ROOTS": str(tmp / "data"),
           "ORL_ARTIFACTS_DIR": str(tmp / "artifacts"), "ORL_API_TOKEN": secrets.token_urlsafe(16),
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "services.api.main:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), "--no-access-log", "--http", http, "--loop", loop]
    out = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"the API did not start: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen | None) -> None:
    import signal

    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- the readers (a process of their own) -----------------------------------------------------------
def query_params(kind: str, rnd: random.Random, info: dict) -> dict:
    """The filters the dashboard's Pairs page (and Image page) send for each kind of query."""
    p: dict[str, Any] = {"job_id": info["job_id"], "limit": PAGE}
    first_image = info["first_image_id"]
    if kind == "worst":
        p["order"] = "score_asc"
    elif kind == "score_range":
        lo = round(rnd.uniform(-0.2, 0.8), 2)
        p.update(min_score=lo, max_score=round(min(1.0, lo + rnd.uniform(0.05, 0.3)), 2),
                 order=rnd.choice(["score_desc", "score_asc"]))
    elif kind == "area_range":  # the dashboard's inputs step by 1000 px²; boxes are 96 x 96 px or more
        lo = rnd.choice([10000.0, 20000.0, 50000.0, 100000.0])
        p.update(min_area=lo, max_area=lo * rnd.choice([2, 5, 20]))
    elif kind == "random":
        p.update(order="random", seed=rnd.randrange(2**31))
    elif kind == "image":
        p["image_id"] = first_image + rnd.randrange(info["images"])
    elif kind == "image_either":
        p.update(image_id=first_image + rnd.randrange(info["images"]), side="either")
    elif kind == "unreviewed":
        p.update(reviewer=REVIEWER, reviewed="false")
    return p


def run_readers(base: str, info: dict, clients: int, seconds: float, warmup: float, pages: int,
                think_s: float, out_path: Path) -> None:
    """Each thread: a query kind at random, its first page, then pages - 1 more by cursor; latencies.

    Each thread has a keep-alive HTTP client, as the dashboard's API client has (httpx)."""
    import httpx

    samples: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    sent = [0]
    lock = threading.Lock()
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds

    def user(k: int) -> None:
        rnd = random.Random(k)
        client = httpx.Client(base_url=base, timeout=30)
        while time.monotonic() < t_end:
            kind = rnd.choice(QUERY_TYPES)
            params = query_params(kind, rnd, info)
            for page in range(pages):
                t0 = time.monotonic()
                try:
                    r = client.get("/api/v1/correspondences", params=params)
                    body = r.json() if r.status_code == 200 else None
                    err = None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                except Exception as exc:  # a refused or reset connection is an error, not a crash
                    body, err = None, f"{type(exc).__name__}: {exc}"
                dt = time.monotonic() - t0
                name = kind if page == 0 else f"{kind}+cursor"
                with lock:
                    sent[0] += 1
                if t0 >= t_measure and t0 < t_end:
                    with lock:
                        samples[name].append(dt)
                        if err:
                            errors[name].append(err)
                time.sleep(rnd.expovariate(1 / think_s) if think_s > 0 else 0)
                if err or not body or not body.get("next_cursor"):
                    break
                params = {**params, "cursor": body["next_cursor"]}
        client.close()

    threads = [threading.Thread(target=user, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + warmup + 60)
    out_path.write_text(json.dumps({"samples": samples, "errors": errors, "seconds": seconds, "sent": sent[0],
                                    "cpu_s": _own_cpu_s(t_start)}))


def _own_cpu_s(t_start: float) -> dict:
    """This process's CPU seconds, and the wall seconds since ``t_start`` (it exits before the
    parent reads /proc, so it reports them itself)."""
    t = os.times()
    return {"cpu": t.user + t.system, "wall": time.monotonic() - t_start}


# -- the writer (a process of its own) --------------------------------------------------------------
def run_writer(url: str, info: dict, rate: float, seconds: float, warmup: float, out_path: Path) -> None:
    """A running mining job's pairs, one image's pairs and the job's progress per transaction."""
    import numpy as np

    os.environ["ORL_DATABASE_URL"] = url
    from services.common import jobs
    from services.common.db import session_scope
    from services.common.models import Job
    from services.miner import records

    rng = np.random.default_rng(1)
    with session_scope() as s:
        job = Job(kind="mine", dataset_id=info["dataset_id"], status="running", params={},
                  progress_total=info["images"])
        s.add(job)
        s.flush()
        job_id = job.id
    first = info["first_image_id"]
    per_tx_s = PER_IMAGE / rate if rate > 0 else float("inf")
    t_start = time.monotonic()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    tx_s: list[float] = []
    written = 0
    q = 0
    nxt = t_start
    while time.monotonic() < t_end and rate > 0:
        rows = []
        for r in range(NEIGHBOURS):
            for p in range(PAIRS_PER_NEIGHBOUR):
                qb, nb = _boxes(rng, [640, 640], [480, 480]).tolist()
                rows.append(dict(job_id=job_id, image_id=first + q % info["images"],
                                 neighbor_image_id=first + (q + 1 + r) % info["images"], neighbor_rank=r, rank=p,
                                 score=float(rng.uniform(0, 1)), qx1=qb[0], qy1=qb[1], qx2=qb[2], qy2=qb[3],
                                 nx1=nb[0], ny1=nb[1], nx2=nb[2], ny2=nb[3]))
        t0 = time.monotonic()
        with session_scope() as s:
            n = records.write_pairs(s, rows)
            jobs.set_progress(s, job_id, add_done=1, progress={"stage": "pairs"})
        if t0 >= t_measure:
            tx_s.append(time.monotonic() - t0)
            written += n
        q += 1
        nxt += per_tx_s
        time.sleep(max(0.0, nxt - time.monotonic()))
    with session_scope() as s:
        jobs.finish_job(s, job_id, "succeeded")
    out_path.write_text(json.dumps({"job_id": job_id, "pairs_written": written, "transactions": len(tx_s),
                                    "seconds": seconds, "tx_s": tx_s, "cpu_s": _own_cpu_s(t_start)}))


# -- EXPLAIN of what the API runs ---------------------------------------------------------------------
def explain_all(url: str, info: dict) -> dict[str, dict]:
    """For each query type (first page, and a cursor page): the plan of the SELECT the router runs."""
    from sqlalchemy import event

    os.environ["ORL_DATABASE_URL"] = url
    from services.api.routers import correspondences
    from services.common.runtime import get_engine, get_sessionmaker, reset

    reset()
    engine = get_engine()
    out: dict[str, dict] = {}
    rnd = random.Random(99)
    for kind in QUERY_TYPES:
        params = {k: v for k, v in query_params(kind, rnd, info).items()}
        if params.get("reviewed") == "false":
            params["reviewed"] = False
        for page in ("first", "cursor"):
            captured: list[tuple[str, Any]] = []

            def grab(conn, cursor, statement, parameters, context, executemany, captured=captured):
                if "FROM roi_pairs" in statement and "JOIN images" in statement:
                    captured.append((statement, parameters))

            with get_sessionmaker()() as s:
                event.listen(engine, "before_cursor_execute", grab)
                try:
                    res = correspondences.list_pairs(s, **params)
                finally:
                    event.remove(engine, "before_cursor_execute", grab)
                if page == "first":
                    nxt = json.loads(res.body)["next_cursor"]  # the route returns its JSON response
                if not captured:
                    continue
                stmt, bind = captured[-1]
                plan = s.connection().exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + stmt,
                                                      bind).scalar()
            out[kind if page == "first" else f"{kind}+cursor"] = _plan_summary(plan[0])
            if not nxt:
                break
            params = {**params, "cursor": nxt}
    reset()
    return out


def _plan_summary(plan: dict) -> dict:
    nodes: list[str] = []
    seq: list[str] = []

    def walk(n: dict) -> None:
        label = n["Node Type"] + (f" on {n['Relation Name']}" if "Relation Name" in n else "") + (
            f" using {n['Index Name']}" if "Index Name" in n else "")
        nodes.append(label)
        if n["Node Type"] == "Seq Scan":
            seq.append(n.get("Relation Name", "?"))
        for c in n.get("Plans", []):
            walk(c)

    walk(plan["Plan"])
    return {"execution_ms": round(plan["Execution Time"], 2), "seq_scans": seq, "nodes": nodes}


def _forget_writer_job(url: str, job_id: int) -> None:
    """Delete the writer's job and its pairs (cascade), so the cached database stays as seeded."""
    import psycopg

    with psycopg.connect(_psycopg_dsn(url), autocommit=True) as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
        conn.execute("VACUUM ANALYZE roi_pairs")


# -- machine load -------------------------------------------------------------------------------------
def cpu_times() -> dict[int, tuple[str, float]]:
    """{pid: (command, CPU seconds so far)} of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(entry.name)] = (cmd[:160], (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_split(before: dict, after: dict, seconds: float, roles: dict[str, set[int]], db: str
              ) -> tuple[dict[str, float], list[dict]]:
    """(cores used by each of our roles, the other processes that used more than 10% of a core).

    Postgres backends connected to the benchmark's database count as ours ("postgres")."""
    used = {role: 0.0 for role in [*roles, "postgres"]}
    others = []
    for pid, (cmd, t1) in after.items():
        share = (t1 - before.get(pid, (cmd, 0.0))[1]) / seconds
        role = next((r for r, pids in roles.items() if pid in pids), None)
        if role is None and cmd.startswith("postgres:") and f" {db} " in f" {cmd} ":
            role = "postgres"
        if role is not None:
            used[role] += share
        elif share > 0.10:
            others.append({"pid": pid, "cpu_share": round(share, 2), "command": cmd})
    return {k: round(v, 2) for k, v in used.items()}, sorted(others, key=lambda r: -r["cpu_share"])


def _descendants(pids: list[int]) -> set[int]:
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out = set(pids)
    changed = True
    while changed:
        changed = False
        for pid, pp in parent.items():
            if pp in out and pid not in out:
                out.add(pid)
                changed = True
    return out


def _log_errors(log: Path, keep: int = 5) -> list[str]:
    """The last lines of the API's last ``keep`` tracebacks (what a 500 was)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    ends = [i for i, line in enumerate(lines) if line and not line.startswith((" ", "Traceback", "INFO", "The above"))
            and i > 0 and lines[i - 1].startswith(" ")]
    return [lines[i][:300] for i in ends[-keep:]]


# -- results ------------------------------------------------------------------------------------------
def _pct_ms(sorted_s: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of sorted seconds, in ms."""
    return round(1000 * sorted_s[min(len(sorted_s) - 1, max(0, math.ceil(q * len(sorted_s)) - 1))], 1)


def stats(samples: dict[str, list[float]], errors: dict[str, list[str]], seconds: float) -> dict[str, dict]:
    out = {}
    for name in sorted(set(samples) | set(errors)):
        xs = sorted(samples.get(name, []))
        if not xs:
            continue
        errs = errors.get(name, [])
        out[name] = {"requests": len(xs), "rps": round(len(xs) / seconds, 1), "p50_ms": _pct_ms(xs, 0.50),
                     "p90_ms": _pct_ms(xs, 0.90), "p99_ms": _pct_ms(xs, 0.99), "max_ms": round(1000 * xs[-1], 1),
                     "errors": len(errs), "error_kinds": sorted(set(errs))[:5],
                     "meets_target": not errs and _pct_ms(xs, 0.99) < TARGET_P99_MS}
    return out


def _impl(res: dict, key: str, fast: str, slow: str) -> str:
    """What uvicorn ran: the chosen implementation, or what "auto" picked from what was installed."""
    u = res.get("uvicorn") or {}
    chosen = u.get(key, "auto")
    if chosen == "auto":
        chosen = fast if u.get(fast) else slow  # uvicorn's own rule
    return chosen + (f" {u[fast]}" if chosen == fast and u.get(fast) else "")


def markdown(res: dict) -> str:
    rows = "\n".join(
        f"| {name} | {s['requests']} | {s['rps']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['max_ms']} | "
        f"{s['errors']} | {'yes' if s['meets_target'] else '**no**'} |" for name, s in res["queries"].items())
    plans = "\n".join(
        f"| {name} | {p['execution_ms']} | {', '.join(p['seq_scans']) or 'none'} | {' > '.join(p['nodes'][:6])} |"
        for name, p in res["explain"].items())
    w = res["writer"]
    others = "\n".join(f"  - pid {o['pid']}, {o['cpu_share']:.0%} of a core: `{o['command'][:100]}`"
                       for o in res["other_busy_processes"][:8]) or "  - none"
    clean = ("**Clean run**: full scale, an idle machine, no other busy process." if res["clean"] else
             f"**Not a clean run** ({'; '.join(res['not_clean_because'])}): these numbers validate the script; "
             "they do not measure the targets.")
    t, c = res["totals"], res["cores_used"]
    return f"""# API load benchmark: correspondence queries on {res['seed']['pairs']:,} pairs while mining writes

`{res['command']}` on {res['machine']}, {res['date']}.

{clean}

Load average (1, 5, 15 min) {res['load_average_before']} before, {res['load_average_after']} after, on
{res['cpus']} CPU cores; this script ran at niceness {res['niceness']}. Cores used meanwhile by the API
{c['api']}, its Postgres backends {c['postgres']}, the readers {c['readers']}, the writer {c['writer']}. Other
processes that used more than 10% of a core during the run:
{others}

**Set-up.** One uvicorn process (`uvicorn services.api.main:app`, {res['api_workers']} worker; HTTP parser
{_impl(res, 'http', 'httptools', 'h11')}, event loop {_impl(res, 'loop', 'uvloop', 'asyncio')}) on a database of
{res['seed']['pairs']:,} pairs of one mining job over {res['seed']['images']:,} images ({res['seed']['reviews']:,}
reviews). {res['clients']} reader threads in another process, each a dashboard user: a query kind at random, its
first page of {PAGE} pairs, then up to {res['pages'] - 1} more by cursor, pausing {res['think_ms']:.0f} ms on
average between requests. Meanwhile a writer process wrote a running
mining job's pairs the miner's way: {w['pairs_written']:,} pairs in {w['transactions']:,} transactions
({w['pairs_per_s']:.0f} pairs/s, asked {res['write_rate']:.0f}; transaction p50 {w['tx_p50_ms']} ms, p99
{w['tx_p99_ms']} ms). Measured for {res['seconds']:.0f} s after a {res['warmup']:.0f} s warm-up.

**Totals:** {t['requests']:,} requests, {t['rps']} requests/s, {t['errors']} errors, p50 {t['p50_ms']} ms,
p99 {t['p99_ms']} ms; the API spent about {res['api_cpu_ms_per_request']} ms of CPU per request (its CPU time
over every request sent, warm-up included). Target: no errors and p99 under {TARGET_P99_MS:.0f} ms for a page of
{PAGE} pairs.

| query (`+cursor`: a next page) | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | meets target |
|---|---|---|---|---|---|---|---|---|
{rows}

**Plans** (EXPLAIN ANALYZE of the SELECT the router runs, once, after the load):

| query | execution ms | sequential scans | plan (outermost first) |
|---|---|---|---|
{plans}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1_000_000, help="RoI pairs of the seeded mining job")
    p.add_argument("--db", default=None, help="database name (default orl_bench_load_<pairs>); kept for reruns")
    p.add_argument("--drop", action="store_true", help="drop the cached database and exit")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=8, help="concurrent reader threads")
    p.add_argument("--pages", type=int, default=3, help="pages per query: the first, then by cursor")
    p.add_argument("--think-ms", type=float, default=200.0, help="each reader's mean pause between requests")
    p.add_argument("--write-rate", type=float, default=2000.0, help="pairs/s the writer aims at (0: no writer)")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn processes (production: 1)")
    # uvicorn's auto picks httptools and uvloop when they are installed (requirements.txt does
    # not pin them), else its pure-Python h11 parser and asyncio's loop: these compare the two.
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto", help="uvicorn's HTTP parser")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto", help="uvicorn's event loop")
    p.add_argument("--out", type=Path, default=RESULTS / "api_load")
    p.add_argument("--role", choices=["readers", "writer"], help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    name = args.db or f"orl_bench_load_{args.pairs}"
    url = db_url(name)
    if args.role == "readers":
        run_readers(args.base, json.loads(args.info), args.clients, args.seconds, args.warmup, args.pages,
                    args.think_ms / 1000, args.result)
        return 0
    if args.role == "writer":
        run_writer(url, json.loads(args.info), args.write_rate, args.seconds, args.warmup, args.result)
        return 0
    if args.drop:
        from services.common.migrate import drop_database

        if _exists(name):
            drop_database(url)
            print(f"dropped {name}")
        else:
            print(f"{name} does not exist")
        return 0

    command = "python benchmarks/api_load_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if os.nice(0):
        command = f"nice -n {os.nice(0)} {command}"
    info = seeded_info(url) if _exists(name) else None
    if info is not None and (info.get("version") != SEED_VERSION or info["pairs"] != args.pairs):
        raise SystemExit(f"database {name} holds another seed ({info}); drop it with --drop --db {name}")
    if info is not None:
        from services.common.migrate import upgrade

        upgrade(url)  # a cached database gets the migrations (indexes) added since it was seeded
    if info is None:
        if _exists(name):
            raise SystemExit(f"database {name} exists but was not seeded by this script (an interrupted seeding?); "
                             f"drop it with --drop --db {name}")
        print(f"seeding {name} with {args.pairs:,} pairs ...", flush=True)
        info = seed(url, args.pairs)
        print(f"seeded in {info['seed_seconds']} s", flush=True)
    from sqlalchemy import create_engine, pool, text

    eng = create_engine(url, poolclass=pool.NullPool)
    with eng.connect() as c:
        info["first_image_id"] = c.execute(text("SELECT min(id) FROM images WHERE dataset_id = :d"),
                                           {"d": info["dataset_id"]}).scalar()
    eng.dispose()

    load_before = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        port = free_port()
        api = start_api(url, port, args.api_workers, tmp / "api.log", tmp, args.http, args.loop)
        readers = writer = None
        try:
            common = ["--seconds", str(args.seconds), "--warmup", str(args.warmup), "--info", json.dumps(info),
                      "--db", name, "--pairs", str(args.pairs)]
            me = [sys.executable, str(Path(__file__).resolve())]
            cpu0, t0 = cpu_times(), time.monotonic()
            writer = subprocess.Popen([*me, "--role", "writer", "--write-rate", str(args.write_rate),
                                       "--result", str(tmp / "writer.json"), *common], cwd=REPO)
            readers = subprocess.Popen([*me, "--role", "readers", "--base", f"http://127.0.0.1:{port}",
                                        "--clients", str(args.clients), "--pages", str(args.pages),
                                        "--think-ms", str(args.think_ms),
                                        "--result", str(tmp / "readers.json"), *common], cwd=REPO)
            deadline = args.seconds + args.warmup + 300
            readers.wait(deadline)
            writer.wait(deadline)
            elapsed = time.monotonic() - t0
            roles = {"api": _descendants([api.pid]), "benchmark": {os.getpid()}}
            ours_cpu, others = cpu_split(cpu0, cpu_times(), elapsed, roles, name)
            load_after = [round(v, 2) for v in os.getloadavg()]
            if readers.returncode or writer.returncode:
                raise SystemExit(f"a load process failed (readers {readers.returncode}, writer {writer.returncode})")
            rd = json.loads((tmp / "readers.json").read_text())
            wr = json.loads((tmp / "writer.json").read_text())
            api_errors = _log_errors(tmp / "api.log")
            for role, r in (("readers", rd), ("writer", wr)):
                ours_cpu[role] = round(r["cpu_s"]["cpu"] / r["cpu_s"]["wall"], 2)
        finally:
            for proc in (readers, writer):
                if proc is not None and proc.poll() is None:
                    proc.kill()
            stop(api)
    plans = explain_all(url, info)
    _forget_writer_job(url, wr["job_id"])

    queries = stats(rd["samples"], rd["errors"], args.seconds)
    all_s = sorted(x for xs in rd["samples"].values() for x in xs)
    n_err = sum(len(v) for v in rd["errors"].values())
    tx = sorted(wr["tx_s"]) or [0.0]
    not_clean = []
    if args.pairs < 1_000_000:
        not_clean.append(f"{args.pairs:,} pairs, below the 1,000,000 of the target")
    # The 1-minute average: the 5- and 15-minute ones still remember work that ended before
    # this run began (e.g. the seeding of a new database, which this script does itself).
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        not_clean.append(f"load average {load_before} before the run on {os.cpu_count()} cores")
    if others:
        not_clean.append(f"{len(others)} other busy process(es)")
    if os.nice(0) > 0:
        not_clean.append(f"ran at niceness {os.nice(0)}")
    res = {
        "command": command, "seed": info, "database": name, "api_workers": args.api_workers,
        "uvicorn": {"http": args.http, "loop": args.loop, **uvicorn_extras()},
        "clients": args.clients, "pages": args.pages, "think_ms": args.think_ms, "seconds": args.seconds,
        "warmup": args.warmup,
        "write_rate": args.write_rate, "page_size": PAGE, "target_p99_ms": TARGET_P99_MS,
        "totals": {"requests": len(all_s), "rps": round(len(all_s) / args.seconds, 1), "errors": n_err,
                   "p50_ms": round(1000 * statistics.median(all_s), 1) if all_s else None,
                   "p99_ms": _pct_ms(all_s, 0.99) if all_s else None},
        "queries": queries,
        "writer": {"job_id": wr["job_id"], "pairs_written": wr["pairs_written"], "transactions": wr["transactions"],
                   "pairs_per_s": wr["pairs_written"] / args.seconds,
                   "tx_p50_ms": round(1000 * statistics.median(tx), 1),
                   "tx_p99_ms": _pct_ms(tx, 0.99)},
        "explain": plans, "api_errors_logged": api_errors,
        "load_average_before": load_before, "load_average_after": load_after, "cpus": os.cpu_count(),
        "niceness": os.nice(0), "cores_used": ours_cpu,
        "api_cpu_ms_per_request": round(1000 * ours_cpu["api"] * elapsed / max(1, rd["sent"]), 1),
        "other_busy_processes": others, "clean": not not_clean,
        "not_clean_because": not_clean,
    }
    write_results(args.out, res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
