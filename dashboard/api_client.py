"""A small synchronous client for the ORL REST API (the endpoints of docs/SERVICES.md).

The dashboard's only way to the system. Errors become ``ApiError`` with the API's own message
(FastAPI's ``detail``), so a page can show the user what to change instead of a stack trace.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

API_PREFIX = "/api/v1"


class ApiError(Exception):
    """A failed request. ``status`` is the HTTP status, or None when the API was not reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _detail(resp: httpx.Response) -> str:
    """The human part of an error response: FastAPI's ``detail`` (a string or validation list)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # request validation errors: [{"loc": [...], "msg": ...}, ...]
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(p) for p in err.get("loc", []) if p not in ("body", "query"))
                parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)


def items_of(body: Any) -> list[dict]:
    """The rows of a list response: every list endpoint answers ``{items, next_cursor, total}``."""
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise ApiError(f"the API sent a list response without 'items' ({type(body).__name__}); "
                       "is it an older version than this dashboard?")
    return list(body["items"])


@dataclass(frozen=True)
class Binary:
    """Bytes of an image response plus the headers a page may need (value ranges, sizes)."""

    content: bytes
    headers: dict[str, str]


class BinaryCache:
    """Image responses kept in memory: least recently used out beyond ``max_bytes``, and each
    for ``ttl_s`` seconds. Thread-safe, so the threads of ``ApiClient.get_binaries`` share it.

    Rendered images are immutable for a given URL (the API keys them by the image's content), so
    the TTL only bounds how long a deleted image's bytes are kept.
    """

    def __init__(self, max_bytes: int = 256 << 20, ttl_s: float = 3600.0):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict[tuple, tuple[float, Binary]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Binary | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if time.monotonic() - hit[0] > self.ttl_s:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: tuple, value: Binary) -> None:
        with self._lock:
            if key in self._items:
                self._drop(key)
            self._items[key] = (time.monotonic(), value)
            self._bytes += len(value.content)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._drop(next(iter(self._items)))

    def _drop(self, key: tuple) -> None:
        _, value = self._items.pop(key)
        self._bytes -= len(value.content)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class ApiClient:
    """One ``httpx.Client`` (connection pool) per API URL and token; thread-safe for reads."""

    # Parallel image requests per page: enough to hide the per-request latency of a page of pairs,
    # few enough that one dashboard user does not take every thread of the API's pool (40).
    IMAGE_THREADS = 8

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30.0,
                 transport: httpx.BaseTransport | None = None, images: BinaryCache | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s,
                                  transport=transport, follow_redirects=True)
        self.images = images if images is not None else BinaryCache()
        self._pool = ThreadPoolExecutor(self.IMAGE_THREADS, thread_name_prefix="orl-images")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # -- transport --------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        url = API_PREFIX + path  # every resource lives under /api/v1; health endpoints use ready()
        try:
            resp = self._http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise ApiError(f"the API at {self.base_url} did not answer in time ({method} {url})") from None
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach the API at {self.base_url}: {exc}; is it running? "
                           "(set ORL_API_URL if it lives elsewhere)") from None
        if resp.status_code >= 400:
            raise ApiError(f"{resp.status_code}: {_detail(resp)}", resp.status_code)
        return resp

    def get(self, path: str, **params) -> Any:
        return self._request("GET", path, params=_clean(params)).json()

    def get_binary(self, path: str, **params) -> Binary:
        """An image response, from the in-memory cache when it was fetched before."""
        params = _clean(params)
        key = (path, tuple(sorted(params.items())))
        hit = self.images.get(key)
        if hit is not None:
            return hit
        resp = self._request("GET", path, params=params)
        out = Binary(resp.content, {k.lower(): v for k, v in resp.headers.items()})
        self.images.put(key, out)
        return out

    def get_binaries(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[Binary | ApiError]:
        """Many image requests at once, answered in order: cached ones from memory, the others
        in parallel over the connection pool. A failed one is its ``ApiError`` in the list, so
        one unreadable photo does not cost the whole page."""

        def one(req: tuple[str, dict[str, Any]]) -> Binary | ApiError:
            try:
                return self.get_binary(req[0], **req[1])
            except ApiError as exc:
                return exc

        unique = list(dict.fromkeys((p, tuple(sorted(_clean(q).items()))) for p, q in requests))
        done = dict(zip(unique, self._pool.map(one, [(p, dict(q)) for p, q in unique]), strict=True))
        return [done[(p, tuple(sorted(_clean(q).items())))] for p, q in requests]

    def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.send("POST", path, json, headers)

    def send(self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None) -> Any:
        """A write (POST, PUT): the JSON body of the answer, or None when it has none."""
        resp = self._request(method, path, json=json, headers=headers)
        return resp.json() if resp.content else None

    # -- health -----------------------------------------------------------------------------
    def ready(self) -> tuple[bool, str]:
        """(ready, message) from /readyz; never raises."""
        try:
            resp = self._http.get("/readyz", timeout=5)
        except httpx.HTTPError as exc:
            return False, f"cannot reach the API at {self.base_url}: {exc}"
        if resp.status_code == 200:
            return True, "ready"
        return False, _detail(resp)


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    """Drop unset query parameters, so the API applies its own defaults."""
    return {k: v for k, v in params.items() if v is not None and v != ""}
