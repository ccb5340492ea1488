"""Sessions and idempotent bulk writes, over the engine of ``services.common.runtime``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from services.common.runtime import get_engine, get_sessionmaker

# Postgres accepts at most 65535 bind parameters per statement; chunks stay well below.
MAX_BIND_PARAMS = 30_000

T = TypeVar("T")


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


def chunks(seq: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive runs of at most ``size`` items: statements under the bind limit, task shards, batches."""
    size = max(1, int(size))
    return [list(seq[i : i + size]) for i in range(0, len(seq), size)]


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
    for part in chunks(rows, chunk):
        # values(list) renders ONE statement with many VALUES tuples (not executemany), so a
        # chunk is a single round trip and a single atomic statement.
        stmt = pg_insert(table).values(part).on_conflict_do_nothing()
        if returning:
            stmt = stmt.returning(*(table.c[c] for c in returning))
            out.extend(tuple(r) for r in conn.execute(stmt))
        else:
            # SQLAlchemy reports rowcount for INSERT only when asked to keep it.
            res = conn.execute(stmt.execution_options(preserve_rowcount=True))
            inserted += max(0, res.rowcount)
    return out if returning else inserted
