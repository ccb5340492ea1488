"""Hostile or malformed requests: tokens, binding, path traversal, out-of-range parameters,
SQL-injection strings, and property-based fuzzing of the whole OpenAPI schema.

Everything runs against the real app on real Postgres and Redis: a fresh migrated database and
an empty Redis db of its own for this module (``procs.isolated_env``), so that what the fuzzer
and the attacks write, or try to write, never reaches another module's rows or queues. Two
clients: the in-process TestClient of ``conftest.py`` (the app's settings come from the
environment per request) and a live uvicorn started with the single-machine command of
``scripts/stack.py`` (127.0.0.1, reads needing ORL_API_READ_TOKEN), which the fuzzer, the raw
HTTP attacks and the dashboard talk to.

"Nothing written" is checked as the row count of every table before and after; "the tables still
exist" as the set of table names.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, inspect, select, text

from services.common.db import insert_ignore, session_scope
from services.common.models import Artifact, Image, Neighbor, RoiPair
from tests.services import procs

API = "/api/v1"
REPO = Path(__file__).resolve().parents[2]
READ_TOKEN = "read-token-" + uuid.uuid4().hex[:8]
MAX_ID = 2**63 - 1
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
START_TIMEOUT_S = float(os.environ.get("ORL_TEST_START_TIMEOUT_S", "180"))  # uvicorn imports torch: slow on busy cores

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _stack_module():
    spec = importlib.util.spec_from_file_location("stack", REPO / "scripts" / "stack.py")
    stack = importlib.util.module_from_spec(spec)
    sys.modules["stack"] = stack  # dataclasses look their module up there
    spec.loader.exec_module(stack)
    return stack


stack = _stack_module()


# -- the database as a whole ---------------------------------------------------------------------------
def table_counts() -> dict[str, int]:
    """{table: rows} for every table of the database (alembic_version included)."""
    with session_scope() as s:
        names = inspect(s.get_bind()).get_table_names()
        return {n: int(s.execute(text(f'SELECT count(*) FROM "{n}"')).scalar_one()) for n in sorted(names)}


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(settings_env, tmp_path_factory):
    """A fresh database and Redis db for this module; ORL_* point at them for the module."""
    with procs.isolated_env(settings_env, tmp_path_factory.mktemp("security")) as e:
        yield e


@pytest.fixture(scope="module")
def world(env, api_client, auth_headers, tiny_byol_checkpoint) -> dict[str, Any]:
    """A registered dataset (its photos, plus two whose names look like SQL and LIKE patterns),
    a usable checkpoint, a mine job with neighbours and pairs written as the miner writes them, a
    review, and an export. Ids start at 1 in the fresh database, where the fuzzer's small
    integers find them."""
    from orl.checkpoint import load_checkpoint

    folder = env.data_root / f"sec-{_uid()}"
    procs.copy_photos(folder, 4)
    first = sorted(folder.glob("*.jpg"))[0]
    shutil.copy(first, folder / "x' OR '1'='1.jpg")
    shutil.copy(first, folder / "50%_off.jpg")
    r = api_client.post(f"{API}/datasets", json={"name": f"sec-{_uid()}", "path": folder.name}, headers=auth_headers)
    assert r.status_code == 201, r.text
    ds = r.json()
    ckpt = env.artifacts_dir / "ckpt" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(tiny_byol_checkpoint, ckpt)
    with session_scope() as s:
        from services.common import jobs

        art = Artifact(kind="checkpoint", stage="byol", path="ckpt/last.pt", dataset_id=ds["id"],
                       meta={"config": load_checkpoint(ckpt)["config"]})
        s.add(art)
        s.flush()
        job = jobs.create_job(s, kind="mine", dataset_id=ds["id"], params={"checkpoint_id": art.id}).job
        ids = list(s.execute(select(Image.id).where(Image.dataset_id == ds["id"]).order_by(Image.id)).scalars())
        nb, pairs = [], []
        for a, ia in enumerate(ids):
            ib = ids[(a + 1) % len(ids)]
            nb.append(dict(job_id=job.id, image_id=ia, rank=0, neighbor_image_id=ib, similarity=0.8))
            pairs += [dict(job_id=job.id, image_id=ia, neighbor_image_id=ib, neighbor_rank=0, rank=k,
                           score=0.9 - 0.1 * k, qx1=1.0, qy1=2.0, qx2=50.0, qy2=60.0, nx1=3.0, ny1=4.0, nx2=70.0,
                           ny2=80.0) for k in range(3)]
        insert_ignore(s, Neighbor, nb)
        insert_ignore(s, RoiPair, pairs)
        jobs.start_job(s, job.id, "test")
        jobs.finish_job(s, job.id, "succeeded")
        pair_id = s.execute(select(func.min(RoiPair.id)).where(RoiPair.job_id == job.id)).scalar_one()
        checkpoint_id, mine_id = art.id, job.id
    r = api_client.put(f"{API}/correspondences/{pair_id}/review", json={"verdict": "correct", "reviewer": "ana"},
                       headers=auth_headers)
    assert r.status_code == 201, r.text
    return {"dataset": ds, "folder": folder, "image_ids": ids, "checkpoint": checkpoint_id, "mine": mine_id,
            "pair": pair_id}


@pytest.fixture
def reads_need_token(env, monkeypatch):
    """The in-process app with ORL_API_READ_TOKEN set (for one test)."""
    from services.common.runtime import reset

    monkeypatch.setenv("ORL_API_READ_TOKEN", READ_TOKEN)
    reset()
    yield READ_TOKEN
    monkeypatch.undo()
    reset()


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                if len(addr) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
                else:
                    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                    found.add(socket.inet_ntop(socket.AF_INET6, raw))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: procs.Proc, timeout_s: float) -> None:
    def up():
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n{proc.log()[-3000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    procs.wait_for(up, timeout_s, url, interval_s=0.3, on_timeout=lambda: proc.log()[-3000:])


@pytest.fixture(scope="module")
def live_api(env, world, tmp_path_factory):
    """uvicorn with the single-machine command (scripts/stack.py: 127.0.0.1 by default), on the
    module's database, reads needing ORL_API_READ_TOKEN; its base URL."""
    port = _free_port()
    cmd = stack.service_command("api", {**stack.DEFAULT_PORTS, "api": port}, bind_host=stack.default_bind_host())
    e = procs.service_env(env, ORL_API_READ_TOKEN=READ_TOKEN)
    e.pop("ORL_BIND_HOST", None)
    proc = procs.Proc("api", [sys.executable, "-m", *cmd], e, tmp_path_factory.mktemp("logs") / "api.log")
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, START_TIMEOUT_S)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "proc": proc}
    finally:
        proc.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- property-based fuzzing of the whole OpenAPI schema -------------------------------------------------
# Examples per operation and generation mode (positive: valid per the schema; negative: invalid).
# Small enough for the whole schema in about a minute on 2 busy cores; raise it to look harder.
FUZZ_EXAMPLES = int(os.environ.get("ORL_FUZZ_EXAMPLES", "12"))


def _fuzz(operation, mode, base: str, headers: dict[str, str], checks: list) -> list[str]:
    """Run FUZZ_EXAMPLES generated requests of one operation and generation mode; the failures."""
    import hypothesis
    from hypothesis import HealthCheck, given

    seen: list[str] = []

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        response = case.call(base_url=base, headers=headers, timeout=60)
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except (AssertionError, BaseExceptionGroup) as exc:  # each failure is collected, all reported together
            seen.append(f"{operation.label} [{mode.value}] {response.status_code}: {str(exc)[:1500]}")

    run()
    return seen


def test_fuzz_the_whole_openapi_schema(env, live_api, world):
    """schemathesis generates requests for every operation of /openapi.json, valid and invalid,
    and sends them over HTTP to the live API (with the write token, so that nothing stops at
    auth, except where the fuzzer leaves the token out on purpose): no answer may be a 5xx, and
    every answer must match the schema: its status code is documented, its content type too, and
    its body validates against the documented model."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    base = live_api["url"]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures: list[str] = []
    timings: list[tuple[float, str]] = []
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            started = time.monotonic()
            try:
                failures += _fuzz(operation, mode, base, bearer(env.token), checks)[:2]
            except hypothesis.errors.Unsatisfiable:
                # No invalid request exists (an operation without parameters, e.g. /healthz in
                # negative mode): nothing to send.
                continue
            timings.append((time.monotonic() - started, f"{operation.label} [{mode.value}]"))
    elapsed = time.monotonic() - t0
    print(f"fuzzed {len(timings)} operation runs in {elapsed:.0f} s; slowest:",
          ", ".join(f"{label} {sec:.1f} s" for sec, label in sorted(timings, reverse=True)[:5]))
    assert len(timings) >= 2 * 20, f"only {len(timings)} operation runs: the schema lost operations?"
    assert not failures, f"{len(failures)} failures in {elapsed:.0f} s:\n\n" + "\n\n".join(failures)
