"""One-shot migration step: ``python -m services.common.migrate``.

Creates the database named in ORL_DATABASE_URL if it does not exist, then runs
``alembic upgrade head``. Safe to run any number of times and from several processes at once
(the migrations hold a Postgres advisory lock). Every service waits for it (compose
``service_completed_successfully``; ``make up`` runs it first).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, make_url, pool, text
from sqlalchemy.exc import OperationalError, ProgrammingError

REPO = Path(__file__).resolve().parents[2]
ALEMBIC_INI = REPO / "alembic.ini"


def alembic_config(url: str) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    # Absolute, so the command works from any working directory.
    cfg.set_main_option("script_location", str(REPO / "migrations"))
    # ConfigParser interpolation treats % specially; a password may contain it.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def create_database_if_missing(url: str) -> bool:
    """Create the database of ``url`` (connecting to the ``postgres`` maintenance db). True if created."""
    u = make_url(url)
    name = u.database
    if not name:
        raise ValueError(f"the database URL names no database: {u.render_as_string(hide_password=True)}")
    admin = create_engine(u.set(database="postgres"), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar():
                return False
            quoted = conn.dialect.identifier_preparer.quote(name)
            try:
                conn.execute(text(f"CREATE DATABASE {quoted}"))
            except ProgrammingError as exc:  # another migrate created it between our two statements
                if "already exists" not in str(exc):
                    raise
                return False
            return True
    finally:
        admin.dispose()


def drop_database(url: str) -> None:
    """Drop the database of ``url`` (tests), terminating its other connections first."""
    u = make_url(url)
    admin = create_engine(u.set(database="postgres"), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(u.database)
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()


@functools.lru_cache(maxsize=1)
def _script_heads() -> frozenset[str]:
    # The migration files do not change while a process runs; /readyz asks on every probe.
    return frozenset(ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_heads())


def head_revisions() -> set[str]:
    """Newest revision(s) in migrations/versions."""
    return set(_script_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def is_at_head(engine: Engine) -> bool:
    """True when the database's alembic revision is the newest one in migrations/versions."""
    return current_revisions(engine) == head_revisions()


def upgrade(url: str) -> None:
    create_database_if_missing(url)
    command.upgrade(alembic_config(url), "head")


def _wait_for_server(url: str, timeout_s: float) -> None:
    """Postgres may still be starting (compose, make up): retry until it answers."""
    u = make_url(url).set(database="postgres")
    deadline = time.monotonic() + timeout_s
    while True:
        eng = create_engine(u, poolclass=pool.NullPool)
        try:
            with eng.connect():
                return
        except OperationalError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"Postgres at {u.render_as_string(hide_password=True)} is not reachable "
                                 f"after {timeout_s:.0f} s: {exc.orig}") from None
            time.sleep(0.5)
        finally:
            eng.dispose()


def main(argv: list[str] | None = None) -> int:
    from services.common.settings import get_settings

    p = argparse.ArgumentParser(prog="python -m services.common.migrate", description=__doc__.splitlines()[0])
    p.add_argument("--url", help="database URL (default: ORL_DATABASE_URL)")
    p.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for the server to accept connections")
    args = p.parse_args(argv)
    url = args.url or get_settings().database_url
    _wait_for_server(url, args.wait_s)
    upgrade(url)
    print(f"database {make_url(url).database} is at {', '.join(sorted(head_revisions()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
