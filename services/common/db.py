"""Engine, sessions and idempotent bulk writes.

The engine is created on first use from ``get_settings().database_url`` and cached per process.
Forked workers (Celery prefork) must not share the parent's connections: call
``dispose_engine()`` in the child (e.g. from ``worker_process_init``) and the next use reconnects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from services.common.settings import get_settings

_engine: Engine | None = None
_sessionmaker: sessionmaker[Session] | None = None

# Postgres accepts at most 65535 bind parameters per statement; chunks stay well below.
MAX_BIND_PARAMS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A Postgres engine with the options every service wants."""
    kwargs.setdefault("pool_pre_ping", True)  # survive a database restart between requests
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)


def get_engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = make_engine(get_settings().database_url)
    return _engine


def get_sessionmaker() -> sessionmaker[Session]:
    global _sessionmaker
    if _sessionmaker is None:
        # expire_on_commit=False: objects returned from a finished session stay readable
        # (the API serialises them after commit).
        _sessionmaker = sessionmaker(get_engine(), expire_on_commit=False)
    return _sessionmaker


def dispose_engine() -> None:
    """Close every pooled connection and forget the engine (after a fork, or settings change)."""
    global _engine, _sessionmaker
    if _engine is not None:
        # close=False in a forked child would leave the parent's sockets alone; here we own them.
        _engine.dispose()
    _engine = None
    _sessionmaker = None


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_database(engine: Engine | None = None) -> None:
    """Raise if the database cannot answer a trivial query."""
    with (engine or get_engine()).connect() as conn:
        conn.execute(text("SELECT 1"))


def _chunks(rows: Sequence[Mapping[str, Any]], size: int) -> Iterator[Sequence[Mapping[str, Any]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def insert_ignore(
    session: Session,
    model: type,
    rows: Iterable[Mapping[str, Any]],
    *,
    returning: Sequence[str] | None = None,
) -> int | list[tuple]:
    """Insert many rows with multi-row ``INSERT ... ON CONFLICT DO NOTHING``.

    Rows that collide with any unique key (or the primary key) are skipped, so repeating a write
    (a redelivered task, a rescan) changes nothing. Every row must have the same keys.
    Returns the number of rows actually inserted, or, with ``returning`` column names, the
    tuples of those columns for the inserted rows only. Does not commit.
    """
    rows = list(rows)
    if not rows:
        return [] if returning else 0
    table = model.__table__
    n_cols = len(rows[0])
    chunk = max(1, MAX_BIND_PARAMS // max(1, n_cols))
    inserted = 0
    out: list[tuple] = []
    # Core execution on the session's connection (same transaction): the ORM's bulk-insert path
    # would not report how many rows the server actually inserted.
    conn = session.connection()
    for part in _chunks(rows, chunk):
        # values(list) renders ONE statement with many VALUES tuples (not executemany), so a
        # chunk is a single round trip and a single atomic statement.
        stmt = pg_insert(table).values(list(part)).on_conflict_do_nothing()
        if returning:
            stmt = stmt.returning(*(table.c[c] for c in returning))
            out.extend(tuple(r) for r in conn.execute(stmt))
        else:
            # SQLAlchemy reports rowcount for INSERT only when asked to keep it.
            res = conn.execute(stmt.execution_options(preserve_rowcount=True))
            inserted += max(0, res.rowcount)
    return out if returning else inserted
