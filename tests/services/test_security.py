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

import http.client
import importlib.util
import json
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
    # Recorded as a finished registration would record it (no miner worker runs in this module).
    ds = api_client.get(f"{API}/datasets/{procs.register_dataset(folder, f'sec-{_uid()}')}").json()
    assert ds["status"] == "ready" and ds["counts"]["images"] == 6, ds
    ckpt = env.artifacts_dir / "ckpt" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(tiny_byol_checkpoint, ckpt)
    (env.artifacts_dir / "metrics.json").write_text('{"images": 6, "pairs": 18}')
    with session_scope() as s:
        from services.common import jobs

        # First, so that it is artifact 1, the id a fuzzer tries most: a small file to download
        # (the checkpoint is 135 MB).
        small = Artifact(kind="metrics", path="metrics.json", dataset_id=ds["id"], meta={"images": 6})
        s.add(small)
        s.flush()
        small_id = small.id
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
            "pair": pair_id, "small_artifact": small_id}


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


# -- tokens ------------------------------------------------------------------------------------------
def _router_routes():
    """The APIRoutes of every router of the app, as the routers declare them."""
    from fastapi.routing import APIRoute

    from services.api.routers import artifacts, checkpoints, correspondences, datasets, health, images, jobs

    mods = (health, datasets, images, jobs, correspondences, checkpoints, artifacts)
    return [r for m in mods for r in m.router.routes if isinstance(r, APIRoute)]


def _depends_on(route, fn) -> bool:
    todo = [route.dependant]
    while todo:
        d = todo.pop()
        if d.call is fn:
            return True
        todo += d.dependencies
    return False


def _operations(api_client) -> list[tuple[str, str]]:
    """(METHOD, path template) of every operation the app publishes."""
    spec = api_client.get("/openapi.json").json()
    return [(m.upper(), path) for path, ops in spec["paths"].items() for m in ops]


def test_every_write_route_needs_the_write_token_and_every_read_the_read_token(api_client, env, world,
                                                                               reads_need_token):
    """Each POST/PUT/PATCH/DELETE route depends on the write check (statically, from the routers);
    and with ORL_API_READ_TOKEN set, every published /api/v1 operation answers 401 to a request
    without a token (sent to each, ids of real rows in its path), while the probes stay open."""
    from services.api.deps import _require_token

    writes = [r for r in _router_routes() if set(r.methods) & WRITE_METHODS]
    assert len(writes) >= 6
    for r in writes:
        assert _depends_on(r, _require_token), f"{r.methods} {r.path} takes no write token"
    ops = _operations(api_client)
    assert len(ops) >= 25
    for method, path in ops:
        r = api_client.request(method, _fill(path, world), json={} if method in WRITE_METHODS else None)
        if path.startswith(API):
            assert r.status_code == 401, (method, path, r.status_code, r.text[:300])
        else:
            assert r.status_code == 200, (method, path, r.text[:300])


def _write_requests(world, env) -> dict[tuple[str, str], dict[str, Any]]:
    """One request per write route that succeeds with the write token, so that a 401 without it
    is the token's doing and nothing else's: {(method, route path): httpx request kwargs}."""
    ds = world["dataset"]["id"]
    queued = procs.create_job("pretrain", ds, {"preset": "tiny"})
    # A rescan queues a register job, and a dataset with one queued takes no other jobs until it
    # ran (no worker here): rescan another dataset than the module's.
    other = procs.register_dataset(world["folder"], f"other-{_uid()}")
    return {
        ("POST", f"{API}/datasets"): {"url": f"{API}/datasets", "json": {"name": f"w-{_uid()}",
                                                                         "path": world["folder"].name}},
        ("POST", f"{API}/datasets/{{dataset_id}}/rescan"): {"url": f"{API}/datasets/{other}/rescan"},
        ("POST", f"{API}/jobs"): {"url": f"{API}/jobs", "json": {"kind": "pretrain", "dataset_id": ds,
                                                                 "params": {"preset": "tiny"}}},
        ("POST", f"{API}/jobs/{{job_id}}/cancel"): {"url": f"{API}/jobs/{queued}/cancel"},
        ("PUT", f"{API}/correspondences/{{pair_id}}/review"): {
            "url": f"{API}/correspondences/{world['pair']}/review", "json": {"verdict": "wrong", "reviewer": "bo"}},
        ("POST", f"{API}/artifacts/{{artifact_id}}/export"): {
            "url": f"{API}/artifacts/{world['checkpoint']}/export", "json": {"format": "torchvision"}},
    }


BAD_CREDENTIALS = {
    "no header": {},
    "wrong token": bearer("not-the-token"),
    "empty bearer": {"Authorization": "Bearer "},
    "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
    "token with a suffix": None,  # the write token + "x": filled in by the test
    "read token": None,  # ORL_API_READ_TOKEN: reads only
}


def test_write_routes_refuse_missing_wrong_and_read_tokens_and_write_nothing(api_client, env, world,
                                                                               reads_need_token):
    requests = _write_requests(world, env)
    routes = {(m, path) for m, path in _operations(api_client) if m in WRITE_METHODS}
    assert routes == set(requests), "a write route without a request in this test: add it"
    creds = {**BAD_CREDENTIALS, "token with a suffix": bearer(env.token + "x"), "read token": bearer(READ_TOKEN)}
    for (method, path), req in requests.items():
        for what, headers in creds.items():
            before = table_counts()
            r = api_client.request(method, req["url"], json=req.get("json"), headers=headers)
            assert r.status_code == 401, (method, path, what, r.text)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            needed = "ORL_API_TOKEN"
            assert needed in r.json()["detail"], (what, r.json())
            assert table_counts() == before, f"{method} {path} with {what} wrote something"
        # The same request with the write token is a real write: the 401s above were the token's.
        r = api_client.request(method, req["url"], json=req.get("json"), headers=bearer(env.token))
        assert r.status_code < 300, (method, path, r.text)


def test_reads_need_a_token_once_the_read_token_is_set(api_client, env, world, reads_need_token):
    gets = [f"{API}/datasets", f"{API}/datasets/{world['dataset']['id']}", f"{API}/jobs/{world['mine']}",
            f"{API}/correspondences?job_id={world['mine']}", f"{API}/images/{world['image_ids'][0]}/thumbnail",
            f"{API}/artifacts/{world['small_artifact']}/download", f"{API}/checkpoints"]
    for url in gets:
        for what, headers in {"none": {}, "wrong": bearer("nope"), "basic": BAD_CREDENTIALS["basic scheme"]}.items():
            r = api_client.get(url, headers=headers)
            assert r.status_code == 401 and "ORL_API_READ_TOKEN" in r.json()["detail"], (url, what, r.text)
            assert "root:" not in r.text and r.headers["content-type"].startswith("application/json")
        assert api_client.get(url, headers=bearer(READ_TOKEN)).status_code == 200, url
        assert api_client.get(url, headers=bearer(env.token)).status_code == 200, url  # the write token reads too
    # The probes and the schema stay open: orchestrators probe without credentials; no data there.
    for url in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert api_client.get(url).status_code == 200, url


def test_reads_are_open_without_a_read_token_and_the_tokens_must_differ(api_client, env, world, monkeypatch):
    from pydantic import ValidationError

    from services.common.settings import Settings

    assert os.environ.get("ORL_API_READ_TOKEN") is None
    assert api_client.get(f"{API}/datasets").status_code == 200
    assert api_client.post(f"{API}/datasets/{world['dataset']['id']}/rescan").status_code == 401
    monkeypatch.setenv("ORL_API_READ_TOKEN", env.token)
    with pytest.raises(ValidationError, match="ORL_API_READ_TOKEN must differ from ORL_API_TOKEN"):
        Settings()
    monkeypatch.setenv("ORL_API_READ_TOKEN", "")
    assert Settings().api_read_token is None  # empty means unset, as for ORL_API_TOKEN


# -- binding and who holds which token ------------------------------------------------------------------
def test_single_machine_mode_binds_loopback_and_hands_each_process_only_its_tokens(tmp_path, monkeypatch):
    monkeypatch.delenv("ORL_BIND_HOST", raising=False)
    monkeypatch.delenv("ORL_API_READ_TOKEN", raising=False)
    monkeypatch.setenv("ORL_API_TOKEN", "shell-write-token")  # what a user's shell may export
    ports = dict(stack.DEFAULT_PORTS)
    assert stack.default_bind_host() == "127.0.0.1"
    api = stack.service_command("api", ports, bind_host="127.0.0.1")
    assert api[api.index("--host") + 1] == "127.0.0.1"
    dash = stack.service_command("dashboard", ports, bind_host="127.0.0.1")
    assert dash[dash.index("--server.address") + 1] == "127.0.0.1"
    # the documented (container) form is unchanged: compose publishes the port, on 127.0.0.1 by default
    assert stack.service_command("api", ports)[3] == "0.0.0.0"

    def envs(bind_host: str, root: Path) -> dict[str, dict[str, str]]:
        state = stack.State(root)
        state.config = {"urls": {"database": "postgresql+psycopg://x@127.0.0.1:1/orl", "broker": "redis://127.0.0.1:1/0",
                                 "api": "http://127.0.0.1:8000"}, "bind_host": bind_host}
        return {name: stack.service_env(state, name) for name in (*stack.SERVICES, None)}

    local = envs("127.0.0.1", tmp_path / "local")
    assert local["api"]["ORL_API_TOKEN"] == "shell-write-token" and "ORL_API_READ_TOKEN" not in local["api"]
    for name in ("dashboard", "miner-cpu", "miner-gpu", "trainer", None):
        assert "ORL_API_TOKEN" not in local[name], f"{name} was handed the write token"
        assert "ORL_API_READ_TOKEN" not in local[name]  # on loopback reads stay open
    # Exposed: a read token is made once (0600 in the state folder); the API and the dashboard get it.
    exposed = envs("0.0.0.0", tmp_path / "exposed")
    read = exposed["api"]["ORL_API_READ_TOKEN"]
    assert read and read == exposed["dashboard"]["ORL_API_READ_TOKEN"] and read != "shell-write-token"
    assert (tmp_path / "exposed" / "api_read_token").stat().st_mode & 0o077 == 0
    assert "ORL_API_TOKEN" not in exposed["dashboard"] and "ORL_API_READ_TOKEN" not in exposed["trainer"]
    monkeypatch.setenv("ORL_API_READ_TOKEN", "given-read-token")
    assert envs("0.0.0.0", tmp_path / "given")["dashboard"]["ORL_API_READ_TOKEN"] == "given-read-token"
    assert stack.url_host("0.0.0.0") == "127.0.0.1" and stack.url_host("10.1.2.3") == "10.1.2.3"
    assert stack.is_loopback("127.0.0.1") and not stack.is_loopback("0.0.0.0")


def test_compose_publishes_on_loopback_and_keeps_the_write_token_from_the_dashboard():
    import yaml

    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for name in ("api", "dashboard"):
        for mapping in services[name]["ports"]:
            assert str(mapping).startswith("${ORL_BIND_HOST:-127.0.0.1}:"), (name, mapping)
    holders = {n for n, svc in services.items() if "ORL_API_TOKEN" in (svc.get("environment") or {})}
    assert holders == {"api"}, holders
    assert "ORL_API_READ_TOKEN" in services["dashboard"]["environment"]


def test_live_api_listens_on_loopback_only(live_api):
    assert _listening_addresses(live_api["port"]) == {"127.0.0.1"}
    assert httpx.get(f"{live_api['url']}/healthz", timeout=10).json() == {"status": "ok"}


@pytest.fixture(scope="module")
def live_dashboard(live_api, tmp_path_factory):
    """The dashboard as single-machine mode starts it: the stack's command and environment, the
    shell exporting the write token (which must not reach it)."""
    root = tmp_path_factory.mktemp("stack-state")
    state = stack.State(root)
    state.config = {"urls": {"database": "unused", "broker": "unused", "api": live_api["url"]},
                    "bind_host": "127.0.0.1"}
    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORL_API_READ_TOKEN", READ_TOKEN)
        e = stack.service_env(state, "dashboard")
    cmd = stack.service_command("dashboard", {**stack.DEFAULT_PORTS, "dashboard": port}, bind_host="127.0.0.1")
    proc = procs.Proc("dashboard", [str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], e,
                      tmp_path_factory.mktemp("logs") / "dashboard.log")
    try:
        _wait_http(f"http://127.0.0.1:{port}/_stcore/health", proc, START_TIMEOUT_S)
        yield {"port": port, "proc": proc}
    finally:
        proc.stop()


def test_dashboard_process_has_the_read_token_only_and_listens_on_loopback(live_dashboard, env):
    assert os.environ["ORL_API_TOKEN"] == env.token  # the test's own shell has it...
    environ = Path(f"/proc/{live_dashboard['proc'].pid}/environ").read_bytes().split(b"\0")
    names = {v.split(b"=", 1)[0].decode() for v in environ if b"=" in v}
    assert "ORL_API_TOKEN" not in names, "the dashboard process was given the write token"  # ...the dashboard not
    assert f"ORL_API_READ_TOKEN={READ_TOKEN}".encode() in environ
    assert env.token.encode() not in b"\0".join(environ)
    assert _listening_addresses(live_dashboard["port"]) == {"127.0.0.1"}


def test_dashboard_writes_only_with_the_token_its_user_types(live_api, env, world, monkeypatch):
    """The dashboard reads with the read token it was given; registering a folder needs the write
    token typed into the sidebar: none, or a wrong one, writes nothing."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ORL_API_URL", live_api["url"])
    monkeypatch.setenv("ORL_API_READ_TOKEN", READ_TOKEN)  # ORL_API_TOKEN stays exported: ignored
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=90)
    at.query_params["page"] = "jobs"
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert any("ignored" in c.value for c in at.caption), "the ignored ORL_API_TOKEN is pointed out"
    assert any(world["dataset"]["name"] in str(s.options) for s in at.selectbox), "reads work with the read token"

    def register(token: str | None) -> None:
        if token is not None:
            at.text_input(key="api_token").input(token).run()
        name = [t for t in at.text_input if t.label == "Name"][0]
        folder = [t for t in at.text_input if t.label == "Folder"][0]
        name.input(f"dash-{_uid()}")
        folder.input(world["folder"].name)
        at.button[[b.label for b in at.button].index("Register")].click().run()

    button = at.button[[b.label for b in at.button].index("Register")]
    assert button.disabled, "no token typed: read-only"
    before = table_counts()
    register("wrong-token")
    assert any("401" in e.value for e in at.error), [e.value for e in at.error]
    assert table_counts() == before
    register(env.token)
    assert not at.error and any("dataset #" in s.value for s in at.success), [e.value for e in at.error]
    after = table_counts()
    assert after["datasets"] == before["datasets"] + 1


# -- path traversal ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outside(env, tmp_path_factory) -> dict[str, Path]:
    """Things outside every data root and outside the artifacts volume, and links to them from
    inside a data root: a folder of photos, a secret file, a FIFO (opening it to read would block,
    so a request that reads it never returns), a checkpoint."""
    base = tmp_path_factory.mktemp("outside")
    photos = base / "photos"
    procs.copy_photos(photos, 2)
    secret = base / "secret.csv"
    secret.write_text("image,label\nTOP-SECRET-CANARY,x\n")
    fifo = base / "labels.fifo"
    os.mkfifo(fifo)
    ckpt = base / "stolen.pt"
    shutil.copy(env.artifacts_dir / "ckpt" / "last.pt", ckpt)
    root = env.data_root
    links = root / f"links-{_uid()}"
    links.mkdir()
    (links / "dir_out").symlink_to(photos)
    (links / "file_out.csv").symlink_to(secret)
    (links / "fifo_out.csv").symlink_to(fifo)
    (links / "hop").symlink_to(links / "dir_out")  # a link to a link that leads out
    return {"base": base, "photos": photos, "secret": secret, "fifo": fifo, "ckpt": ckpt, "links": links}


def _traversals(outside: dict[str, Path], root: Path) -> list[str]:
    """Path strings that must never reach a file outside the data roots."""
    links = outside["links"].name
    return [
        "..", "../", "../..", "sample/../..", "sample/../../etc", f"{root}/../{outside['base'].name}",
        "%2e%2e", "%2E%2E/%2e%2e/etc", "sample/%2e%2e/%2e%2e", "%252e%252e/etc", "%25252e%25252e%25252f",
        "..%2fetc", "..%5c..%5cetc", "sample\\..\\..", ".%2e/.%2e", "%c0%ae%c0%ae/etc",
        "/etc", "/etc/passwd", "/proc/self/environ", "/", "//etc", "/no/such/folder", "~", "~/x", "~root",
        str(outside["base"]), str(outside["photos"]), str(outside["secret"]), str(outside["fifo"]),
        f"{links}/dir_out", f"{links}/hop", f"{links}/file_out.csv", f"{links}/fifo_out.csv",
        str(root / links / "dir_out"), str(root / links / "fifo_out.csv"),
        "sample\x00", "sample%00", "%2500", " ", "",
    ]


def test_dataset_paths_that_leave_the_roots_are_refused_naming_the_field(api_client, auth_headers, env, world,
                                                                         outside):
    before = table_counts()
    for raw in _traversals(outside, env.data_root):
        r = api_client.post(f"{API}/datasets", json={"name": f"t-{_uid()}", "path": raw}, headers=auth_headers)
        assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
        detail = r.json()["detail"]
        assert "'path'" in detail, (raw, detail)
        assert "TOP-SECRET" not in r.text, (raw, detail)
        if str(outside["photos"]) not in raw:  # a link's target outside the roots is never named
            assert str(outside["photos"]) not in detail, (raw, detail)
    assert table_counts() == before, "a refused path registered something"
    # An absolute path outside the roots gets one answer whether it exists or not: no oracle.
    answers = {api_client.post(f"{API}/datasets", json={"name": "x", "path": p}, headers=auth_headers)
               .json()["detail"].replace(p, "P") for p in (str(outside["photos"]), str(outside["base"] / "nope"))}
    assert len(answers) == 1, answers


def test_label_files_that_leave_the_roots_are_refused_before_anything_opens_them(live_api, env, world, outside):
    """An embedding map's label source, through the live API: each refused with a 422 naming
    params.labels, no job row; the FIFO proves that nothing opened the file (the request would
    block on it until the client timed out)."""
    before = table_counts()
    with httpx.Client(base_url=live_api["url"], headers=bearer(env.token), timeout=30) as http:
        for raw in _traversals(outside, env.data_root):
            if not raw.strip():
                continue  # an empty labels value is refused as a type error, tested with the params below
            body = {"kind": "embedding_map", "dataset_id": world["dataset"]["id"],
                    "params": {"checkpoint_id": world["checkpoint"], "labels": raw}}
            r = http.post(f"{API}/jobs", json=body)
            assert r.status_code == 422, (raw, r.text)
            assert "'params.labels'" in r.json()["detail"], (raw, r.text)
            assert "TOP-SECRET" not in r.text
    assert table_counts() == before


def test_stored_paths_that_lead_out_are_refused_on_every_route(api_client, auth_headers, env, world, outside):
    """Rows can be edited and folders swapped for links after registration: an image whose path
    climbs out, a dataset folder replaced by a link to another place, checkpoint rows pointing
    outside the artifacts volume. Each read is refused (403 / 422 naming the field), and no byte of
    the outside files comes back."""
    passwd = Path("/etc/passwd").read_bytes()[:12]
    # 1. an image row whose rel_path climbs out of its folder
    with session_scope() as s:
        img = s.get(Image, world["image_ids"][0])
        good_rel = img.rel_path
        img.rel_path = "../../../../../../../../etc/passwd"
    try:
        for url in (f"{API}/images/{world['image_ids'][0]}/thumbnail",
                    f"{API}/images/{world['image_ids'][0]}/crop?box=0,0,10,10",
                    f"{API}/images/{world['image_ids'][0]}/attention?checkpoint_id={world['checkpoint']}"):
            r = api_client.get(url)
            assert r.status_code == 403 and "not a plain relative path" in r.json()["detail"], (url, r.text)
            assert passwd not in r.content
    finally:
        with session_scope() as s:
            s.get(Image, world["image_ids"][0]).rel_path = good_rel
    # 2. a registered folder replaced by a link that leads out of the roots
    folder = env.data_root / f"swap-{_uid()}"
    procs.copy_photos(folder, 2)
    ds = {"id": procs.register_dataset(folder, f"swap-{_uid()}")}
    image_id = api_client.get(f"{API}/datasets/{ds['id']}/images").json()["items"][0]["id"]
    shutil.rmtree(folder)
    folder.symlink_to(outside["photos"])
    before = table_counts()
    r = api_client.get(f"{API}/images/{image_id}/thumbnail")
    assert r.status_code == 403 and "no longer under the data roots" in r.json()["detail"], r.text
    r = api_client.post(f"{API}/datasets/{ds['id']}/rescan", headers=auth_headers)
    assert r.status_code == 403 and "no longer under the data roots" in r.json()["detail"], r.text
    assert table_counts() == before
    # 3. checkpoint rows leading out of the artifacts volume: absolute, climbing, through a link
    (env.artifacts_dir / "link.pt").symlink_to(outside["ckpt"])
    with session_scope() as s:
        rows = [Artifact(kind="checkpoint", stage="byol", dataset_id=world["dataset"]["id"], path=p)
                for p in (str(outside["ckpt"]), f"../{outside['base'].name}/stolen.pt", "link.pt")]
        s.add_all(rows)
        s.flush()
        ids = [a.id for a in rows]
    before = table_counts()
    for aid in ids:
        r = api_client.get(f"{API}/artifacts/{aid}/download")
        assert r.status_code == 403 and "outside ORL_ARTIFACTS_DIR" in r.json()["detail"], r.text
        r = api_client.post(f"{API}/artifacts/{aid}/export", json={"format": "torchvision"}, headers=auth_headers)
        assert r.status_code == 403, r.text
        r = api_client.get(f"{API}/images/{world['image_ids'][0]}/attention", params={"checkpoint_id": aid})
        assert r.status_code == 403 and "outside ORL_ARTIFACTS_DIR" in r.json()["detail"], r.text
        for kind in ("mine", "embedding_map"):
            r = api_client.post(f"{API}/jobs", json={"kind": kind, "dataset_id": world["dataset"]["id"],
                                                     "params": {"checkpoint_id": aid}}, headers=auth_headers)
            assert r.status_code == 422 and "'params.checkpoint_id'" in r.json()["detail"], r.text
            assert "outside the artifacts volume" in r.json()["detail"]
        listed = api_client.get(f"{API}/artifacts/{aid}").json()
        assert listed["size_bytes"] is None  # not even the size of the outside file
    assert table_counts() == before


RAW_URL_ATTACKS = [
    "/api/v1/images/..%2f..%2f..%2f..%2fetc%2fpasswd/thumbnail",
    "/api/v1/images/%2e%2e/thumbnail",
    "/api/v1/images/1/..%2f..%2f..%2fetc%2fpasswd",
    "/api/v1/images/1%2f..%2f..%2f..%2fetc%2fpasswd/crop?box=0,0,9,9",
    "/api/v1/artifacts/..%2f..%2fetc%2fpasswd/download",
    "/api/v1/artifacts/1%2f..%2f..%2f..%2f..%2fetc%2fpasswd/download",
    "/api/v1/artifacts/%252e%252e%252fetc%252fpasswd/download",
    "/api/v1/artifacts/1/download/../../../../etc/passwd",
    "/api/v1/../../../../etc/passwd",
    "/api/v1/images/1/thumbnail/..%5c..%5c..%5cetc%5cpasswd",
    "/api/v1/datasets/1/images?name=../../../../etc/passwd",
    "/api/v1/correspondences/export?job_id=1&format=../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
]


def test_raw_url_traversal_reaches_no_file(live_api, env, world):
    """The URL as sent on the wire (http.client leaves it as written; httpx would normalise it)."""
    passwd = Path("/etc/passwd").read_bytes()[:12]
    for url in RAW_URL_ATTACKS:
        conn = http.client.HTTPConnection("127.0.0.1", live_api["port"], timeout=30)
        try:
            conn.request("GET", url, headers=bearer(env.token))
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status in (200, 400, 404, 422), (url, resp.status, body[:300])
        assert passwd not in body, url
        if resp.status == 200:  # a legal request whose value is only data: nothing matched
            assert json.loads(body)["items"] == [], (url, body[:300])


# -- out-of-range parameters ----------------------------------------------------------------------------
def test_bad_job_params_are_422s_naming_the_field_before_any_row(api_client, auth_headers, env, world):
    """What a new user gets wrong, and what an attacker sends: each a 422 whose detail names the
    field, at submission, and no job row (nor any other row) is written."""
    ds, ck = world["dataset"]["id"], world["checkpoint"]
    corrupt = env.artifacts_dir / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    gone = env.artifacts_dir / "gone.pt"
    with session_scope() as s:
        rows = {"corrupt": Artifact(kind="checkpoint", stage="byol", dataset_id=ds, path=corrupt.name),
                "gone": Artifact(kind="checkpoint", stage="byol", dataset_id=ds, path=gone.name),
                "metrics": Artifact(kind="metrics", dataset_id=ds, path="m.json")}
        s.add_all(rows.values())
        s.flush()
        bad = {k: a.id for k, a in rows.items()}
    mine = {"kind": "mine", "dataset_id": ds}
    cases: list[tuple[dict, str, str]] = [
        ({**mine, "params": {"checkpoint_id": ck, "knn_k": 0}}, "params.knn_k", "at least 1"),  # K = 0
        ({**mine, "params": {"checkpoint_id": ck, "roi_size": -64}}, "params.roi_size", "at least"),  # negative size
        ({**mine, "params": {"checkpoint_id": ck, "pair_ratio": 1.5}}, "params.pair_ratio", "(0, 1]"),  # ratio > 1
        ({**mine, "params": {"checkpoint_id": ck, "knn_k": "many"}}, "params.knn_k", "integer"),  # wrong type
        ({**mine, "params": {"checkpoint_id": ck, "knn_k": True}}, "params.knn_k", "integer"),
        ({**mine, "params": {}}, "params.checkpoint_id", "needs params.checkpoint_id"),  # no checkpoint
        ({**mine, "params": {"checkpoint_id": 10**9}}, "params.checkpoint_id", "not a checkpoint artifact"),
        ({**mine, "params": {"checkpoint_id": bad["metrics"]}}, "params.checkpoint_id", "not a checkpoint"),
        ({**mine, "params": {"checkpoint_id": bad["gone"]}}, "params.checkpoint_id", "not on the artifacts volume"),
        ({**mine, "params": {"checkpoint_id": bad["corrupt"]}}, "params.checkpoint_id", "cannot be used"),
        ({**mine, "params": {"checkpoint_id": 2**63}}, "params.checkpoint_id", "at most"),  # > int64
        ({**mine, "params": {"checkpoint_id": -1}}, "params.checkpoint_id", "at least 1"),
        ({"kind": "train", "dataset_id": ds, "params": {"mine_job_id": 2**64}}, "params.mine_job_id", "at most"),
        ({"kind": "pretrain", "dataset_id": ds, "params": {"max_steps": 2**70}}, "params.max_steps", "at most"),
        ({"kind": "pretrain", "dataset_id": ds, "params": {"epochs": -3}}, "params.epochs", "at least 1"),
        ({"kind": "pipeline", "dataset_id": ds, "params": {"mine": {"knn_k": 0}}}, "params.mine.knn_k", "at least 1"),
        ({"kind": "embedding_map", "dataset_id": ds, "params": {"checkpoint_id": ck, "n_neighbors": 0}}, "params",
         "n_neighbors"),
        ({"kind": "embedding_map", "dataset_id": ds, "params": {"checkpoint_id": ck, "min_dist": 2}}, "params",
         "min_dist"),
        ({"kind": "embedding_map", "dataset_id": ds, "params": {"checkpoint_id": ck, "labels": ""}}, "params",
         "labels"),
        ({"kind": "dance", "dataset_id": ds}, "kind", ""),  # unknown kind
        ({"kind": "", "dataset_id": ds}, "kind", ""),
        ({"kind": "mine", "dataset_id": 2**63}, "dataset_id", "less than or equal to"),  # > int64
        ({"kind": "mine", "dataset_id": 0}, "dataset_id", "greater than 0"),
        ({"kind": "mine", "dataset_id": "1; DROP TABLE jobs"}, "dataset_id", "integer"),
        ({"kind": "mine", "dataset_id": ds, "params": ["knn_k", 0]}, "params", "dictionary"),
        ({**mine, "params": {"checkpoint_id": ck, "set": {"mine": {"knn_k": {"deeper": 1}}}}},
         "params.set.mine.knn_k", ""),
        ({**mine, "params": {"checkpoint_id": ck, "roi_mode": "x" * 70_000}}, "params", "larger than"),
    ]
    before = table_counts()
    for body, field, fragment in cases:
        r = api_client.post(f"{API}/jobs", json=body, headers=auth_headers)
        detail = r.json()["detail"]
        assert r.status_code == 422, (body, r.text[:500])
        assert f"body field '{field}" in detail and fragment in detail, (field, fragment, detail[:500])
    # What JSON allows and Postgres jsonb cannot store: NaN, Infinity, NUL; and absurd nesting.
    raw_cases = [
        (f'{{"kind": "mine", "dataset_id": {ds}, "params": {{"checkpoint_id": {ck}, "pair_ratio": NaN}}}}',
         "params.pair_ratio", "finite"),
        (f'{{"kind": "pretrain", "dataset_id": {ds}, "params": {{"base_lr": Infinity}}}}', "params.base_lr", "finite"),
        (f'{{"kind": "pretrain", "dataset_id": {ds}, "params": {{"preset": "tiny\\u0000"}}}}', "params.preset", "NUL"),
        (f'{{"kind": "pretrain", "dataset_id": {ds}, "params": {{"\\u0000": 1}}}}', "params", "NUL"),
        (f'{{"kind": "pretrain", "dataset_id": {ds}, "params": {{"set": ' + "[" * 40 + "]" * 40 + "}}",
         "params.set", "nested deeper"),
    ]
    for raw, field, fragment in raw_cases:
        r = api_client.post(f"{API}/jobs", content=raw.encode(),
                            headers={**auth_headers, "Content-Type": "application/json"})
        assert r.status_code == 422, (raw[:120], r.text[:500])
        detail = r.json()["detail"]
        assert f"body field '{field}" in detail and fragment in detail, (raw[:120], detail[:500])
    assert table_counts() == before, "a refused submission wrote a row"


def test_text_that_no_file_name_or_column_can_hold_is_a_4xx(api_client, auth_headers, world):
    """The fuzzer's 500: a dataset path starting with "~" and an unknown user name, which pathlib's
    ~user expansion raised on. Its neighbours: JSON allows a lone surrogate ("\\udb09"), which no
    file name, jsonb value or UTF-8 answer can hold. Each is a 4xx naming the field."""
    ds, pair = world["dataset"]["id"], world["pair"]
    job = '{"kind": "pretrain", "dataset_id": DS, "params": PARAMS}'.replace("DS", str(ds))
    cases = [
        ("POST", f"{API}/datasets", r'{"name": "s1", "path": "\udb09photos"}', "body field 'path'"),
        ("POST", f"{API}/datasets", r'{"name": "s2", "path": "~nosuchuser\udb09/x"}', "body field 'path'"),
        ("POST", f"{API}/datasets", '{"name": "s3", "path": "~nosuchuser/photos"}', "body field 'path'"),
        ("POST", f"{API}/datasets", r'{"name": "\udb09", "path": "sample"}', "body field 'name'"),
        ("POST", f"{API}/jobs", job.replace("PARAMS", r'{"preset": "\udb09"}'), "body field 'params.preset'"),
        ("POST", f"{API}/jobs", job.replace("PARAMS", r'{"\udb09": 1}'), "body field 'params'"),
        ("PUT", f"{API}/correspondences/{pair}/review", r'{"verdict": "correct", "reviewer": "a\udb09"}',
         "body field 'reviewer'"),
    ]
    before = table_counts()
    for method, url, raw, fragment in cases:
        r = api_client.request(method, url, content=raw.encode(),
                               headers={**auth_headers, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500 and fragment in r.json()["detail"], (raw, r.status_code, r.text[:300])
    assert table_counts() == before


def _limit_params(spec: dict) -> list[tuple[str, dict]]:
    """(path, the limit parameter's schema) of every GET with a page size."""
    out = []
    for path, ops in spec["paths"].items():
        for p in ops.get("get", {}).get("parameters", []):
            if p["name"] == "limit":
                out.append((path, p["schema"]))
    return out


def _fill(path: str, world) -> str:
    ids = {"dataset_id": world["dataset"]["id"], "image_id": world["image_ids"][0], "job_id": world["mine"],
           "checkpoint_id": world["checkpoint"], "artifact_id": world["small_artifact"], "pair_id": world["pair"]}
    for k, v in ids.items():
        path = path.replace("{" + k + "}", str(v))
    return path


def test_every_list_has_a_page_size_limit(api_client, world):
    spec = api_client.get("/openapi.json").json()
    limits = _limit_params(spec)
    lists = [p for p, ops in spec["paths"].items()
             if "get" in ops and "Page" in json.dumps(ops["get"]["responses"]["200"])]
    assert {p for p, _ in limits} >= set(lists) and len(lists) >= 7, (lists, limits)
    for path, schema in limits:
        top = schema["maximum"]
        url = _fill(path, world)
        for bad in (top + 1, 10**30, 0, -1, "all", "1e3"):
            r = api_client.get(url, params={"limit": bad})
            assert r.status_code == 422 and "query parameter 'limit'" in r.json()["detail"], (path, bad, r.text)
        r = api_client.get(url, params={"limit": top})
        assert r.status_code < 500, (path, r.text)


def test_body_size_limits(api_client, auth_headers, live_api, env, world, monkeypatch):
    from services.common.runtime import reset

    before = table_counts()
    big = b'{"kind": "pretrain", "dataset_id": 1, "params": {"x": "' + b"a" * (1 << 20) + b'"}}'
    r = api_client.post(f"{API}/jobs", content=big, headers={**auth_headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and "ORL_MAX_BODY_BYTES" in r.json()["detail"]
    # No Content-Length (chunked, over real HTTP): the bytes are counted as they come.
    def chunks():
        for _ in range(64):
            yield b"a" * (1 << 15)  # 2 MiB in all
    r = httpx.post(f"{live_api['url']}{API}/jobs", content=chunks(), timeout=60,
                   headers={**auth_headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and "ORL_MAX_BODY_BYTES" in r.json()["detail"], r.text
    # A lying Content-Length, a body on a GET, and bytes that are not UTF-8 JSON.
    r = api_client.post(f"{API}/jobs", content=b"{}", headers={**auth_headers, "Content-Length": "99999999999",
                                                               "Content-Type": "application/json"})
    assert r.status_code == 413
    assert api_client.request("GET", f"{API}/datasets", content=big).status_code == 413
    r = api_client.post(f"{API}/jobs", content=b'{"kind": "\xff\xfe"}',
                        headers={**auth_headers, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid UTF-8"), r.text
    # The limit is a setting.
    monkeypatch.setenv("ORL_MAX_BODY_BYTES", "2048")
    reset()
    try:
        body = {"kind": "pretrain", "dataset_id": world["dataset"]["id"], "params": {"preset": "tiny"}}
        r = api_client.post(f"{API}/jobs", json={**body, "pad": "p" * 3000}, headers=auth_headers)
        assert r.status_code == 413 and "2048" in r.json()["detail"]
    finally:
        monkeypatch.undo()
        reset()
    assert table_counts() == before


def _path_params(spec: dict) -> list[tuple[str, str, str]]:
    """(method, path, parameter) for every path parameter of the schema."""
    return [(m, path, p["name"]) for path, ops in spec["paths"].items() for m, op in ops.items()
            for p in op.get("parameters", []) if p["in"] == "path"]


def test_ids_out_of_bigint_range_are_422_not_500(api_client, auth_headers, world):
    spec = api_client.get("/openapi.json").json()
    params = _path_params(spec)
    assert len(params) >= 15
    for method, path, name in params:
        for bad in (2**63, 10**40, -1, 0, "1 OR 1=1", "1.5", "%00"):
            url = path.replace("{" + name + "}", str(bad))
            r = api_client.request(method.upper(), _fill(url, world), headers=auth_headers, json={})
            assert r.status_code == 422 and f"path parameter '{name}'" in r.json()["detail"], (method, url, r.text)
        url = _fill(path.replace("{" + name + "}", str(MAX_ID)), world)
        r = api_client.request(method.upper(), url, headers=auth_headers, json={})
        assert r.status_code in (404, 422), (method, url, r.text)  # the largest bigint: simply no such row
    # the id filters of the lists
    for path, ops in spec["paths"].items():
        for p in ops.get("get", {}).get("parameters", []):
            if p["in"] == "query" and p["name"].endswith("_id"):
                r = api_client.get(_fill(path, world), params={p["name"]: 2**63})
                assert r.status_code == 422 and f"query parameter '{p['name']}'" in r.json()["detail"], (path, p)
                r = api_client.get(_fill(path, world), params={p["name"]: MAX_ID})
                assert r.status_code < 500, (path, p["name"], r.text)
    # a hand-made cursor with a key no bigint holds is refused like any bad cursor
    from services.api import cursors

    for key in ([2**80], [float("inf")], [True], ["1 OR 1=1"]):
        r = api_client.get(f"{API}/datasets", params={"cursor": cursors.encode(key, {})})
        assert r.status_code == 400 and "cursor is not valid" in r.json()["detail"], (key, r.text)


# -- SQL injection -----------------------------------------------------------------------------------------
SQL_PAYLOADS = [
    "' OR '1'='1", "' OR 1=1 --", "'; DROP TABLE images; --", "1; DROP TABLE jobs", '" OR ""="',
    "1' UNION SELECT null, version() --", "%' OR 1=1 --", "' OR pg_sleep(3) IS NULL --",
    "$$; DELETE FROM roi_pairs; $$",
    "\\'; TRUNCATE datasets CASCADE; --", "admin'--", "1 OR 1=1", "%", "_", "\\",
]


def _query_params(spec: dict) -> list[tuple[str, str, bool]]:
    """(path, name, free text) of every query parameter of every GET; free text: a string that is
    neither an enum nor a pattern, the kind of value that reaches a query as it was sent."""
    def free(schema: dict) -> bool:
        options = schema.get("anyOf", [schema])
        return any(o.get("type") == "string" and "enum" not in o and "pattern" not in o for o in options)

    return [(path, p["name"], free(p["schema"])) for path, ops in spec["paths"].items()
            for p in ops.get("get", {}).get("parameters", []) if p["in"] == "query"]


def test_sql_injection_strings_are_plain_data(api_client, auth_headers, world):
    spec = api_client.get("/openapi.json").json()
    tables, before = set(table_counts()), table_counts()
    params = _query_params(spec)
    assert len(params) >= 40 and sum(f for *_, f in params) >= 10
    for path, name, free_text in params:
        # Numbers, enums and patterns are refused by their type: a few payloads show it.
        for payload in SQL_PAYLOADS if free_text else SQL_PAYLOADS[:3]:
            r = api_client.get(_fill(path, world), params={name: payload})
            assert r.status_code < 500, (path, name, payload, r.text)
            if r.status_code == 200 and r.headers["content-type"].startswith("application/json"):
                r.json()
    for method, path, name in _path_params(spec):
        for payload in SQL_PAYLOADS[:6]:
            url = _fill(path.replace("{" + name + "}", httpx.URL("/" + payload).raw_path.decode()[1:]), world)
            r = api_client.request(method.upper(), url, headers=auth_headers, json={})
            assert r.status_code in (404, 422), (method, url, r.text)
    assert set(table_counts()) == tables and table_counts() == before, "an injected string changed the database"
    # The filters match them literally.
    ds = world["dataset"]["id"]
    got = api_client.get(f"{API}/datasets/{ds}/images", params={"name": "' OR '1'='1"}).json()
    assert [i["rel_path"] for i in got["items"]] == ["x' OR '1'='1.jpg"] and got["total"] == 1
    for pattern in ("%", "_", "50%_"):
        got = api_client.get(f"{API}/datasets/{ds}/images", params={"name": pattern}).json()
        assert [i["rel_path"] for i in got["items"]] == ["50%_off.jpg"], (pattern, got)
    got = api_client.get(f"{API}/correspondences", params={"job_id": world["mine"], "reviewer": "' OR '1'='1"}).json()
    assert got["items"] and all(p["verdict"] is None for p in got["items"])
    got = api_client.get(f"{API}/jobs/{world['mine']}/review-summary", params={"reviewer": "ana' OR '1'='1"}).json()
    assert got["reviewed"] == 0 and got["reviewers"] == []
    # Written and read back as they were typed.
    before = table_counts()
    name = "o'brien -- x"
    r = api_client.put(f"{API}/correspondences/{world['pair']}/review", json={"verdict": "wrong", "reviewer": name},
                       headers=auth_headers)
    assert r.status_code == 201 and r.json()["reviewer"] == name
    got = api_client.get(f"{API}/correspondences", params={"job_id": world["mine"], "reviewer": name,
                                                           "reviewed": True}).json()["items"]
    assert [(p["id"], p["verdict"]) for p in got] == [(world["pair"], "wrong")]
    key = "k'; DROP TABLE jobs; --"
    body = {"kind": "pretrain", "dataset_id": ds, "params": {"preset": "tiny"}}
    first = api_client.post(f"{API}/jobs", json=body, headers={**auth_headers, "Idempotency-Key": key}).json()
    again = api_client.post(f"{API}/jobs", json=body, headers={**auth_headers, "Idempotency-Key": key}).json()
    assert first["id"] == again["id"]
    r = api_client.post(f"{API}/jobs", json={**body, "params": {"preset": "tiny'; DROP TABLE jobs; --"}},
                        headers=auth_headers)
    assert r.status_code == 422 and "body field 'params.preset'" in r.json()["detail"]
    for bad_name in ("x'); DROP TABLE datasets; --", "a;b"):
        r = api_client.post(f"{API}/datasets", json={"name": bad_name, "path": "sample"}, headers=auth_headers)
        assert r.status_code == 422 and "body field 'name'" in r.json()["detail"]
    after = table_counts()
    assert set(after) == tables
    assert after["pair_reviews"] == before["pair_reviews"] + 1 and after["jobs"] == before["jobs"] + 1
    assert {k: v for k, v in after.items() if k not in ("pair_reviews", "jobs")} == \
        {k: v for k, v in before.items() if k not in ("pair_reviews", "jobs")}


# -- property-based fuzzing of the whole OpenAPI schema -------------------------------------------------
# Examples per operation and generation mode (positive: valid per the schema; negative: invalid).
# Small enough for the whole schema in about a minute on 2 busy cores; raise it to look harder.
FUZZ_EXAMPLES = int(os.environ.get("ORL_FUZZ_EXAMPLES", "10"))
# The same examples on every run (a CI failure reproduces); ORL_FUZZ_RANDOM=1 explores new ones.
FUZZ_DERANDOMIZE = os.environ.get("ORL_FUZZ_RANDOM", "0") != "1"
# Operations whose valid requests run a model (an export traces the backbone, attention runs it):
# seconds each, so fewer of them.
HEAVY = {"POST /api/v1/artifacts/{artifact_id}/export": 3, "GET /api/v1/images/{image_id}/attention": 4}


def _fuzz(operation, mode, base: str, headers: dict[str, str], checks: list) -> list[str]:
    """Run FUZZ_EXAMPLES generated requests of one operation and generation mode; the failures."""
    import hypothesis
    from hypothesis import HealthCheck, given

    seen: list[str] = []

    @hypothesis.settings(max_examples=min(FUZZ_EXAMPLES, HEAVY.get(operation.label, FUZZ_EXAMPLES)), deadline=None,
                         database=None, derandomize=FUZZ_DERANDOMIZE,
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
