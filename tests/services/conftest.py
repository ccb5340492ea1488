"""Fixtures for the service tests: a real, freshly migrated Postgres database, ORL_* settings
pointing at it, and a FastAPI TestClient.

Nothing here mocks the database: ``pg_url`` creates ``orl_test_<hex>`` on the Postgres server at
ORL_TEST_PG_ADMIN_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/postgres), runs the
Alembic migrations on it, and drops it at the end of the session. The broker is the real Redis at
ORL_TEST_BROKER_URL (default: redis://127.0.0.1:6379/<an empty db of 1..15>, claimed with an owner
key and flushed at the end, so the queues of a test session do not feed the Celery workers of
another session on the same machine: every module that registers a dataset sends a task).

Reuse from other test files: ``pg_url``, ``settings_env`` (a ``ServiceEnv``), ``api_client``,
``auth_headers``, ``db_session``, ``registrar`` (a real miner worker on the cpu queue, for modules
that register datasets through the API without a miner of their own: POST /datasets answers at
once and a register job scans the folder; ``procs.registered`` waits for it).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, pool, text
from sqlalchemy.exc import OperationalError

REPO = Path(__file__).resolve().parents[2]
# `services` is not an installed package (pyproject installs orl only); uvicorn and celery find it
# from the working directory, pytest from here.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
SAMPLE_IMAGES = REPO / "data" / "sample" / "images"
ADMIN_URL = os.environ.get("ORL_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TOKEN = "test-token-" + uuid.uuid4().hex[:8]


def _server_reachable(url: str) -> str | None:
    eng = create_engine(url, poolclass=pool.NullPool, connect_args={"connect_timeout": 3})
    try:
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except OperationalError as exc:
        return str(exc.orig)
    finally:
        eng.dispose()


def make_test_database(admin_url: str, prefix: str = "orl_test") -> str:
    """Create and migrate a database with a random name on the server of ``admin_url``; its URL."""
    from services.common.migrate import upgrade

    url = make_url(admin_url).set(database=f"{prefix}_{uuid.uuid4().hex[:12]}").render_as_string(hide_password=False)
    upgrade(url)  # creates the database, then alembic upgrade head
    return url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh, migrated database (dropped after the session)."""
    from services.common.migrate import drop_database

    err = _server_reachable(ADMIN_URL)
    if err:
        pytest.skip(f"no Postgres server at {ADMIN_URL} ({err}); start one or set ORL_TEST_PG_ADMIN_URL")
    url = make_test_database(ADMIN_URL)
    yield url
    from services.common import runtime

    runtime.dispose_engine()
    drop_database(url)


@dataclass(frozen=True)
class ServiceEnv:
    database_url: str
    broker_url: str
    data_root: Path  # the only ORL_DATA_ROOTS entry
    images_dir: Path  # data_root/sample: 8 real photos in train2017/ and val2017/
    artifacts_dir: Path
    token: str


def _copy_sample(dst: Path, per_split: int = 4) -> None:
    for split in ("train2017", "val2017"):
        (dst / split).mkdir(parents=True)
        for f in sorted((SAMPLE_IMAGES / split).glob("*.jpg"))[:per_split]:
            shutil.copy(f, dst / split / f.name)


@pytest.fixture(scope="session")
def settings_env(pg_url, tmp_path_factory) -> Iterator[ServiceEnv]:
    """ORL_* variables for the whole session (database, broker, data root, artifacts, token)."""
    from services.common.runtime import reset

    root = tmp_path_factory.mktemp("data_root").resolve()
    _copy_sample(root / "sample")
    artifacts = tmp_path_factory.mktemp("artifacts").resolve()
    broker, release = os.environ.get("ORL_TEST_BROKER_URL"), None
    if broker is None:
        broker, release = _claim_broker_db()
    env = ServiceEnv(pg_url, broker, root, root / "sample", artifacts, TOKEN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORL_DATABASE_URL", env.database_url)
        mp.setenv("ORL_BROKER_URL", env.broker_url)
        mp.setenv("ORL_DATA_ROOTS", str(root))
        mp.setenv("ORL_ARTIFACTS_DIR", str(artifacts))
        mp.setenv("ORL_API_TOKEN", TOKEN)
        reset()
        try:
            yield env
        finally:
            reset()
            if release is not None:
                release()
    reset()


BROKER_OWNER_KEY = "orl-test-owner"  # the key tests/services/procs.py's isolated_env claims with too


def _claim_broker_db():
    """(URL of an empty Redis db on 127.0.0.1:6379, a function that flushes and frees it).

    Claimed with SET NX on the owner key (which also makes it non-empty for the next session
    looking); when every db is in use, a random one, as before, with no release."""
    import redis

    owner = f"session-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for n in random.sample(range(1, 16), 15):
        client = redis.Redis(host="127.0.0.1", port=6379, db=n)
        try:
            if client.dbsize() == 0 and client.set(BROKER_OWNER_KEY, owner, nx=True, ex=12 * 3600):
                def release(client=client) -> None:
                    if client.get(BROKER_OWNER_KEY) == owner.encode():
                        client.flushdb()  # the session's leftover tasks must not feed the next one
                    client.close()

                return f"redis://127.0.0.1:6379/{n}", release
        except redis.RedisError:
            pass
        client.close()
    return f"redis://127.0.0.1:6379/{random.randint(1, 15)}", None


@pytest.fixture(scope="session")
def api_client(settings_env):
    """A TestClient on the real app (no auth header; add ``auth_headers`` on write calls)."""
    from fastapi.testclient import TestClient

    from services.api.main import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture(scope="session")
def auth_headers(settings_env) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings_env.token}"}


@pytest.fixture
def db_session(settings_env):
    """A session on the test database; commits are real (tests use unique names)."""
    from services.common.runtime import get_sessionmaker

    s = get_sessionmaker()()
    try:
        yield s
    finally:
        s.rollback()
        s.close()


@pytest.fixture(scope="module")
def registrar(settings_env, tmp_path_factory):
    """A Celery miner worker on the cpu queue alone, for the module: it runs the register jobs of
    POST /datasets (and any other cpu task the module sends; nothing of the gpu queue).

    A long lease: its stale-job reaper must leave alone the job rows tests write by hand (a
    "running" job with no worker); a long visibility timeout: a slow scan is not redelivered."""
    from tests.services import procs

    env = procs.service_env(settings_env, ORL_LEASE_S=3600, ORL_HEARTBEAT_S=2, ORL_VISIBILITY_TIMEOUT_S=900)
    proc = procs.start_miner(env, tmp_path_factory.mktemp("registrar"), f"registrar-{uuid.uuid4().hex[:6]}",
                             queues="cpu", start_timeout_s=300)
    yield proc
    proc.stop()
