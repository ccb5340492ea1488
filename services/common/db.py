"""Sessions and idempotent bulk writes, over the engine of ``services.common.runtime``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, Float, String, Table, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from services.common.runtime import get_engine, get_sessionmaker

# Postgres accepts at most 65535 bind parameters per statement; chunks of a multi-row statement
# stay well below. insert_ignore binds one array per column, but keeps chunks of as many values,
# so that one statement's arrays stay a few MB at most.
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
    """Insert many rows with ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING``.

    Rows that collide with any unique key (or the primary key) are skipped, so repeating a write
    (a redelivered task, a rescan) changes nothing. Every row must have the same keys.
    Returns the number of rows actually inserted, or, with ``returning`` column names, the
    tuples of those columns for the inserted rows only. Does not commit.
    """
    rows = list(rows)
    if not rows:
        return [] if returning else 0
    table = model.__table__
    keys = list(rows[0])
    first = rows[0].keys()
    if any(r.keys() != first for r in rows):
        raise ValueError(f"insert_ignore({table.name}): every row must have the same keys")
    chunk = max(1, MAX_BIND_PARAMS // max(1, len(keys)))
    stmt = _unnest_insert(table, tuple(keys), tuple(returning or ()))
    floats = [k for k in keys if isinstance(table.c[k].type, Float)]
    inserted = 0
    out: list[tuple] = []
    # Core execution on the session's connection (same transaction): the ORM's bulk-insert path
    # would not report how many rows the server actually inserted.
    conn = session.connection()
    for part in chunks(rows, chunk):
        # One array per column: a single statement with as many parameters as columns, whatever
        # the number of rows, so its SQL is the same for every call (compiled and prepared once).
        # The multi-row VALUES it replaces had a parameter per value, which SQLAlchemy built,
        # keyed and bound one by one: for one image's 50 pairs, several times the CPU the server
        # spent on the insert (benchmarks/api_load_benchmark.py measures the miner's writes).
        arrays = {k: [r[k] for r in part] for k in keys}
        for k in floats:  # psycopg refuses a list of ints and floats ("cannot dump lists of mixed types")
            arrays[k] = [None if v is None else float(v) for v in arrays[k]]
        if returning:
            out.extend(tuple(r) for r in conn.execute(stmt, arrays))
        else:
            # SQLAlchemy reports rowcount for INSERT only when asked to keep it.
            res = conn.execute(stmt.execution_options(preserve_rowcount=True), arrays)
            inserted += max(0, res.rowcount)
    return out if returning else inserted


def _element_type(col_type: Any) -> Any:
    """The array's element type: the column's, but a string without its length. An explicit cast
    to varchar(n) truncates a longer value silently; cast to text, the insert into the column
    refuses it ("value too long"), as the multi-row VALUES did."""
    return String() if isinstance(col_type, String) and col_type.length else col_type


@lru_cache(maxsize=64)
def _unnest_insert(table: Table, keys: tuple[str, ...], returning: tuple[str, ...]) -> Any:
    """``INSERT INTO table (keys) SELECT * FROM unnest(:k1::type[], ...) AS t(keys) ON CONFLICT DO
    NOTHING [RETURNING ...]``: one statement object per (table, columns), so SQLAlchemy's cache key
    and compiled form are computed once."""
    arrays = func.unnest(*(bindparam(k, type_=ARRAY(_element_type(table.c[k].type))) for k in keys))
    src = select(arrays.table_valued(*keys).render_derived())
    stmt = pg_insert(table).from_select(list(keys), src).on_conflict_do_nothing()
    return stmt.returning(*(table.c[c] for c in returning)) if returning else stmt
