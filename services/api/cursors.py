"""Opaque keyset cursors.

A cursor holds the sort key of the last row sent and a digest of the query's filters, so a
cursor reused with other filters is refused instead of silently returning a wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from fastapi import HTTPException, status


def _digest(filters: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
        ok = isinstance(key, list) and len(key) == n_keys and all(isinstance(v, (int, float)) for v in key)
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
