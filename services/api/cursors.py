"""Opaque keyset cursors, and the id-ordered page that most list endpoints serve.

A cursor holds the sort key of the last row sent and a digest of the query's filters, so a
cursor reused with other filters is refused instead of silently returning a wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

from fastapi import HTTPException, status
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from services.common.models import MAX_ID


def _digest(filters: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sort_value(v: Any) -> bool:
    """A value a cursor may hold: a finite float, or an integer a bigint column can compare with
    (a cursor is only base64: a hand-made one must not reach the database as a driver error)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -MAX_ID - 1 <= v <= MAX_ID
    return isinstance(v, float) and math.isfinite(v)


def encode(key: list[Any], filters: dict[str, Any]) -> str:
    # json writes floats with repr(), which round-trips a double exactly: the next page starts
    # exactly after the last score sent.
    raw = json.dumps({"k": key, "f": _digest(filters)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, filters: dict[str, Any], n_keys: int) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        key = data["k"]
        ok = isinstance(key, list) and len(key) == n_keys and all(_sort_value(v) for v in key)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            "cursor is not valid; pass the next_cursor of the previous page unchanged, or omit it")
    if data.get("f") != _digest(filters):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            "cursor belongs to a query with other filters; keep the filters of the first page or "
                            "drop the cursor")
    return key


def id_page(session: Session, stmt: Select, id_col: Any, filters: dict[str, Any], limit: int,
            cursor: str | None, *, descending: bool = False) -> tuple[list[Any], str | None]:
    """One keyset page of ``stmt`` (a select of one ORM entity) ordered by its id column.

    Returns (at most ``limit`` rows, the cursor of the next page or None). ``filters`` are the
    query's filters: a cursor made under other filters is refused (``decode``).
    """
    if cursor:
        (last,) = decode(cursor, filters, 1)
        stmt = stmt.where(id_col < last if descending else id_col > last)
    order = id_col.desc() if descending else id_col.asc()
    rows = list(session.execute(stmt.order_by(order).limit(limit + 1)).scalars())
    nxt = encode([rows[limit - 1].id], filters) if len(rows) > limit else None
    return rows[:limit], nxt


def count(session: Session, model: Any, where: list[Any]) -> int:
    """How many rows of ``model`` match ``where`` (the ``total`` of a page, where it is cheap)."""
    return int(session.execute(select(func.count()).select_from(model).where(*where)).scalar_one())


def equal_to(pairs: list[tuple[Any, Any]]) -> list[Any]:
    """``column == value`` for each (column, value) whose value is given (not None): a list's filters."""
    return [col == value for col, value in pairs if value is not None]
