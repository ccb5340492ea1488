"""Real worker processes for the integration and fault tests: Celery miners and trainers.

Each process runs in its own session (process group), so ``kill9`` takes down the worker with
everything it started (Celery pool children, selective-search subprocesses, torchrun ranks),
as when a machine or container dies. Output goes to a log file that failing tests print.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO / "data" / "sample" / "images"

# Every wait of these tests is multiplied by this (default 1): on a machine shared with long
# jobs at a higher priority, a worker may need minutes just to import torch. It stretches the
# waits for things to happen, and the wall-clock bounds of the fault tests (the cancel tests
# also bound the CPU time spent after a cancel, which load does not stretch).
TIMEOUT_SCALE = float(os.environ.get("ORL_TEST_TIMEOUT_SCALE", "1"))

# Short leases so redelivery and stale detection happen in seconds (production: 3600 / 10 / 60).
FAST_TIMEOUTS = {"ORL_VISIBILITY_TIMEOUT_S": "10", "ORL_HEARTBEAT_S": "0.5", "ORL_LEASE_S": "4"}


def service_env(settings_env, **extra: Any) -> dict[str, str]:
    """Environment of a worker: the test's ORL_* settings, 1 thread, fast timeouts."""
    env = dict(os.environ)
    env.update({
        "ORL_DATABASE_URL": settings_env.database_url, "ORL_BROKER_URL": settings_env.broker_url,
        "ORL_DATA_ROOTS": str(settings_env.data_root), "ORL_ARTIFACTS_DIR": str(settings_env.artifacts_dir),
        "ORL_API_TOKEN": settings_env.token, "ORL_DEVICE": "cpu", "ORL_SHARD_SIZE": "3",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ORL_WORKER_CORES": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        **FAST_TIMEOUTS,
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path,
                 preexec_fn: Callable[[], None] | None = None):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True, preexec_fn=preexec_fn)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)  # the session id is the leader's pid
        except ProcessLookupError:
            pass

    def processes(self) -> list[tuple[int, str, float]]:
        """(pid, command line, CPU seconds with its reaped children's) of every live process of
        this worker's session: the worker, its pool children, selective-search subprocesses,
        torchrun ranks."""
        return session_processes(self.popen.pid)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of the session's processes, those that exited included.

        Zombies count too: an exited subprocess's CPU reaches its parent's only when the parent
        reaps it, so without them a killed selective search would vanish from the sum and come
        back at the reap, inside a later measuring window (a cancel test once read 161% of a
        core from an idle worker that way)."""
        return sum(cpu for _, _, cpu in session_processes(self.popen.pid, zombies=True))

    def kill9(self) -> None:
        """SIGKILL the whole process group: no cleanup, no acks, no final checkpoint."""
        self._signal_group(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # stragglers in the group (pool children)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def session_processes(sid: int, zombies: bool = False) -> list[tuple[int, str, float]]:
    """Live processes whose session id is ``sid``, read from /proc (Linux); with ``zombies``,
    also those that exited and wait to be reaped (their command line is empty)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        # fields[0] is the state (3rd field of stat): session is stat's 6th; utime, stime, cutime,
        # cstime its 14th to 17th (with the children's, the CPU of a subprocess that exited, e.g.
        # a killed selective search, still counts, in its parent's).
        if int(fields[3]) != sid or (fields[0] == "Z" and not zombies):
            continue
        out.append((int(entry), cmd, sum(int(f) for f in fields[11:15]) / tick))
    return out


def start_miner(env: dict[str, str], log_dir: Path, name: str, queues: str = "cpu,gpu",
                start_timeout_s: float = 90, pool: str = "prefork") -> Proc:
    """A Celery miner worker; ``pool="solo"`` as the gpu workers run in production."""
    cmd = [sys.executable, "-m", "celery", "-A", "services.miner.celery_app", "worker", "-Q", queues,
           "--pool", pool, "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"{name}@%h",
           "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = Proc(name, cmd, env, log_dir / f"{name}.log")
    try:
        wait_for(lambda: " ready." in proc.log() or not proc.alive(), start_timeout_s, f"miner {name} to start")
    except AssertionError:
        proc.stop()  # never leave a worker behind a failed start
        raise
    assert proc.alive(), f"miner {name} died at start:\n{proc.log()[-3000:]}"
    return proc


def trainer_cmd() -> list[str]:
    return [sys.executable, "-m", "services.trainer", "--poll-s", "0.3"]


def start_trainer(env: dict[str, str], log_dir: Path, name: str,
                  preexec_fn: Callable[[], None] | None = None) -> Proc:
    """A polling trainer; ``preexec_fn`` runs in the child before exec (e.g. a resource limit)."""
    return Proc(name, trainer_cmd(), env, log_dir / f"{name}.log", preexec_fn=preexec_fn)


@contextmanager
def workers(settings_env, log_dir: Path) -> Iterator[Callable[..., Proc]]:
    """A ``start(kind, name, preexec=None, **extra_env)`` for miners and trainers on ``settings_env``,
    logging to ``log_dir``: every worker it started is stopped on exit, dead or alive, so that a
    failing test never leaves one polling the next test's jobs. ``preexec`` is for trainers only."""
    running: list[Proc] = []

    def start(kind: str, name: str, preexec: Callable[[], None] | None = None, **extra: Any) -> Proc:
        e = service_env(settings_env, **extra)
        if kind == "miner":
            assert preexec is None, "start_miner takes no preexec_fn"
            p = start_miner(e, log_dir, name)
        else:
            p = start_trainer(e, log_dir, name, preexec_fn=preexec)
        running.append(p)
        return p

    try:
        yield start
    finally:
        for p in running:
            p.stop()


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1,
             on_timeout: Callable[[], str] | None = None) -> Any:
    timeout_s *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}\n{detail}")
        time.sleep(interval_s)


def copy_photos(dst: Path, n: int, offset: int = 0) -> list[str]:
    """n real photos from the bundled sample (train2017 then val2017), as dst/<name>.jpg."""
    files = sorted(SAMPLE_IMAGES.glob("train2017/*.jpg")) + sorted(SAMPLE_IMAGES.glob("val2017/*.jpg"))
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files[offset : offset + n]:
        shutil.copy(f, dst / f.name)
        out.append(f.name)
    return out


# -- database helpers (the test process talks to the same database as the workers) -------------
def register_dataset(folder: Path, name: str | None = None) -> int:
    """A datasets row for ``folder`` and its images, as POST /datasets does (common's scan)."""
    import uuid

    from services.common.datasets import scan_dataset
    from services.common.db import session_scope
    from services.common.models import Dataset

    with session_scope() as s:
        ds = Dataset(name=name or f"ds-{uuid.uuid4().hex[:8]}", path=str(Path(folder).resolve()))
        s.add(ds)
        s.flush()
        scan_dataset(s, ds)
        return int(ds.id)


def registered(client: Any, response: Any, timeout_s: float = 600, procs: list[Proc] = (),
               base: str = "/api/v1") -> dict:
    """The dataset of a POST /datasets (or /rescan) ``response`` once its register job succeeded.

    POST /datasets answers 202 before the folder is scanned; a miner worker on the cpu queue runs
    the job (the module's own miner, or the ``registrar`` fixture). ``client`` is anything with
    ``.get(url)``: a TestClient with ``base="/api/v1"``, or the httpx module with the full base URL.
    """
    assert response.status_code == 202, response.text
    ds = response.json()
    row = wait_job(ds["registration"]["job_id"], timeout_s, procs)
    assert row["status"] == "succeeded", f"registration of {ds['path']}: {row['status']}: {row['error']}"
    r = client.get(f"{base}/datasets/{ds['id']}")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    return r.json()


def make_checkpoint(images_dir: Path, artifacts_dir: Path, dataset_id: int | None = None) -> int:
    """Train a tiny BYOL checkpoint (one step on real photos) and register it as an artifact."""
    import uuid

    from orl.config import get_preset
    from orl.images import list_images
    from orl.train import train
    from services.common.db import session_scope
    from services.common.models import Artifact

    rel = Path("test-checkpoints") / uuid.uuid4().hex[:8]
    cfg = get_preset("tiny")
    train("byol", images_dir, artifacts_dir / rel, cfg, files=list_images(images_dir), show_progress=False)
    with session_scope() as s:
        art = Artifact(kind="checkpoint", stage="byol", dataset_id=dataset_id, path=(rel / "last.pt").as_posix(),
                       meta={"config": cfg.to_dict(), "preset": "tiny"})
        s.add(art)
        s.flush()
        return int(art.id)


def create_job(kind: str, dataset_id: int, params: dict | None = None) -> int:
    from services.common import jobs
    from services.common.db import session_scope

    with session_scope() as s:
        return int(jobs.create_job(s, kind=kind, dataset_id=dataset_id, params=params or {}).job.id)


def job_row(job_id: int) -> dict:
    from services.common.db import session_scope
    from services.common.models import Job

    with session_scope() as s:
        j = s.get(Job, job_id)
        return {c.name: getattr(j, c.name) for c in Job.__table__.columns}


def wait_job(job_id: int, timeout_s: float, procs: list[Proc] = (), statuses=("succeeded", "failed", "cancelled"),
             pred: Callable[[dict], bool] | None = None) -> dict:
    """Wait until the job reaches one of ``statuses`` (or ``pred`` holds); worker logs on timeout."""
    def check():
        row = job_row(job_id)
        return row if (pred(row) if pred else row["status"] in statuses) else None

    def detail():
        row = job_row(job_id)
        logs = "\n".join(f"--- {p.name} ---\n{p.log()[-4000:]}" for p in procs)
        return f"job: { {k: row[k] for k in ('status', 'progress', 'error', 'attempts', 'worker')} }\n{logs}"

    return wait_for(check, timeout_s, f"job {job_id}", interval_s=0.1, on_timeout=detail)


def pair_set(job_id: int, digits: int = 2) -> dict[tuple, float]:
    """{(query file, neighbour file, neighbour rank, rank, rounded boxes): score} of a mine job."""
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from services.common.db import session_scope
    from services.common.models import Image, RoiPair

    q, n = aliased(Image), aliased(Image)
    with session_scope() as s:
        rows = s.execute(select(q.rel_path, n.rel_path, RoiPair).join(q, q.id == RoiPair.image_id)
                         .join(n, n.id == RoiPair.neighbor_image_id).where(RoiPair.job_id == job_id)).all()
    out = {}
    for qp, np_, p in rows:
        key = (qp, np_, p.neighbor_rank, p.rank,
               tuple(round(v, digits) for v in (p.qx1, p.qy1, p.qx2, p.qy2, p.nx1, p.ny1, p.nx2, p.ny2)))
        assert key not in out, f"duplicate pair {key}"
        out[key] = p.score
    return out


# -- an isolated database and broker for tests that run polling workers ---------------------------
def _claim_redis_db(broker_url: str, owner: str):
    """An empty Redis database number, marked as ours (other sessions pick random db numbers)."""
    import redis
    from redis.connection import parse_url

    opts = parse_url(broker_url)
    host, port = opts.get("host", "127.0.0.1"), opts.get("port", 6379)
    for n in range(15, 0, -1):
        client = redis.Redis(host=host, port=port, db=n)
        if client.dbsize() == 0 and client.set("orl-test-owner", owner, nx=True, ex=3600):
            return f"redis://{host}:{port}/{n}", client
        client.close()
    raise RuntimeError("no empty Redis database (1..15) is free for this test module")


@contextmanager
def isolated_env(settings_env, tmp_dir: Path, broker_url: str | None = None) -> Iterator[Any]:
    """A fresh migrated database and an empty Redis db for one test module.

    Workers that poll the job table (trainers) would otherwise claim jobs other test modules left
    queued in the session database; the test process is pointed at the same database and broker
    (ORL_* variables, settings reset) for the module, and everything is dropped afterwards.
    ``broker_url``: a broker of the module's own (servers.private_redis) instead of a db of the
    shared Redis. A claimed db is empty when claimed, but another test session on the machine
    picks its db number at random (conftest.settings_env) and may pick the same one: then its
    workers take this module's tasks, and the other way round.
    """
    import dataclasses
    import uuid

    import pytest
    from sqlalchemy import make_url

    from services.common.migrate import drop_database, upgrade
    from services.common.runtime import reset

    tag = uuid.uuid4().hex[:10]
    url = make_url(settings_env.database_url).set(database=f"orl_workers_{tag}").render_as_string(hide_password=False)
    upgrade(url)
    client = None
    if broker_url is None:
        broker_url, client = _claim_redis_db(settings_env.broker_url, tag)
    artifacts = tmp_dir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    env = dataclasses.replace(settings_env, database_url=url, broker_url=broker_url, artifacts_dir=artifacts)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ORL_DATABASE_URL", url)
            mp.setenv("ORL_BROKER_URL", broker_url)
            mp.setenv("ORL_ARTIFACTS_DIR", str(artifacts))
            reset()
            yield env
    finally:
        reset()
        drop_database(url)
        if client is not None:
            client.flushdb()
            client.close()
