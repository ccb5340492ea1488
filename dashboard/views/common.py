"""What every page shares: the API connection, cached queries, URL state, small widgets.

Tokens (docs/SERVICES.md, "Security"): the dashboard process holds at most the read token
(ORL_API_READ_TOKEN, when the API requires one for reads); everything it shows is read with it.
The write token is never in its environment (ORL_API_TOKEN there is ignored): a user types it
into the sidebar, it stays in that user's session (never in the URL, never in a cache shared
between sessions), and each write sends it on a client made for that one request. So anyone
who can reach the dashboard's port can read what it shows, and no one can write without
knowing the token.

Caching: the HTTP client for reads is a ``st.cache_resource`` (one connection pool per API URL and
read token, shared by all sessions); queries are ``st.cache_data`` with a TTL that fits how fast the
answer changes: job progress seconds, pair pages a minute. Write actions clear those caches.
Rendered images (immutable for a given image, size and box) live in the client's own
``BinaryCache`` instead, an hour each: ``Api.fetch_images`` then fetches a page's missing images in
parallel, which ``st.cache_data`` cannot do (its functions are meant for the script thread, and
it unpickles a copy of every value on every run).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import streamlit as st

from dashboard import urlstate
from dashboard.api_client import ApiClient, ApiError, Binary, items_of

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_LIST = 500  # the API's largest page of datasets and checkpoints: a picker shows them all


@st.cache_resource(show_spinner=False)
def get_client(base_url: str, token: str | None) -> ApiClient:
    return ApiClient(base_url, token)


def _params(items: tuple) -> dict[str, Any]:
    return dict(items)


# One cached function per freshness class; arguments are plain values, so they form the key.
@st.cache_data(ttl=2, show_spinner=False, max_entries=200)
def _get_live(base_url: str, token: str | None, path: str, items: tuple) -> Any:
    return get_client(base_url, token).get(path, **_params(items))


@st.cache_data(ttl=30, show_spinner=False, max_entries=500)
def _get_fresh(base_url: str, token: str | None, path: str, items: tuple) -> Any:
    return get_client(base_url, token).get(path, **_params(items))


@st.cache_data(ttl=5, show_spinner=False)
def _ready(base_url: str) -> tuple[bool, str]:
    return get_client(base_url, None).ready()  # the probe is open: no token needed


class Api:
    """The API calls the pages make, each with its cache policy.

    ``token``: the write token this user typed (None: read-only); ``read_token``: the dashboard's
    ORL_API_READ_TOKEN. Reads use the read token only, so no shared cache or client ever holds
    the write token."""

    def __init__(self, base_url: str, token: str | None = None, read_token: str | None = None):
        self.base_url, self.token, self.read_token = base_url, token, read_token

    def _get(self, fn, path: str, **params) -> Any:
        return fn(self.base_url, self.read_token, path,
                  tuple(sorted((k, v) for k, v in params.items() if v is not None)))

    # reads
    def datasets(self) -> list[dict]:
        return items_of(self._get(_get_fresh, "/datasets", limit=MAX_LIST))

    def dataset(self, dataset_id: int) -> dict:
        return self._get(_get_live, f"/datasets/{dataset_id}")

    def images(self, dataset_id: int, **params) -> dict:
        return self._get(_get_fresh, f"/datasets/{dataset_id}/images", **params)

    def image(self, image_id: int) -> dict:
        return self._get(_get_fresh, f"/images/{image_id}")

    def jobs(self, **params) -> list[dict]:
        return items_of(self._get(_get_live, "/jobs", **params))

    def job_metrics(self, job_id: int, live: bool) -> dict:
        """A training job's curves: refreshed as fast as its progress while it runs, then kept
        longer (a finished job's curves no longer change)."""
        return self._get(_get_live if live else _get_fresh, f"/jobs/{job_id}/metrics")

    def pairs(self, **params) -> dict:
        return self._get(_get_fresh, "/correspondences", **params)

    def neighbors(self, image_id: int, **params) -> dict:
        return self._get(_get_fresh, f"/images/{image_id}/neighbors", **params)

    def review_summary(self, job_id: int) -> dict:
        return self._get(_get_fresh, f"/jobs/{job_id}/review-summary")

    def histogram(self, **params) -> dict:
        return self._get(_get_fresh, "/correspondences/histogram", **params)

    def checkpoints(self, **params) -> list[dict]:
        return items_of(self._get(_get_fresh, "/checkpoints", **params))

    # images: (path, params) requests, answered from the client's BinaryCache or the API
    @staticmethod
    def thumbnail_request(image_id: int, size: int) -> tuple[str, dict[str, Any]]:
        return f"/images/{image_id}/thumbnail", {"size": size}

    @staticmethod
    def crop_request(image_id: int, box, size: int) -> tuple[str, dict[str, Any]]:
        return f"/images/{image_id}/crop", {"box": ",".join(f"{v:.2f}" for v in box), "size": size}

    def fetch_images(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Binary | ApiError]:
        """Several images at once (in parallel), in order; a failed one is its ApiError."""
        return get_client(self.base_url, self.read_token).get_binaries(requests)

    def _binary(self, request: tuple[str, dict[str, Any]]) -> Binary:
        return get_client(self.base_url, self.read_token).get_binary(request[0], **request[1])

    def embedding_map(self, checkpoint_id: int, **params) -> dict:
        return self._get(_get_fresh, f"/checkpoints/{checkpoint_id}/embedding-map", **params)

    def thumbnail(self, image_id: int, size: int) -> Binary:
        return self._binary(self.thumbnail_request(image_id, size))

    def crop(self, image_id: int, box, size: int) -> Binary:
        return self._binary(self.crop_request(image_id, box, size))

    def attention(self, image_id: int, checkpoint_id: int, size: int) -> Binary:
        # opacity 1: the bare heat map; the page blends it over the thumbnail itself, so moving
        # the opacity slider costs no request (and no model run) at all.
        return self._binary((f"/images/{image_id}/attention", {"checkpoint_id": checkpoint_id, "opacity": 1.0,
                                                                "size": size}))

    # writes (never cached; they make the live caches stale)
    def _write(self, path: str, body: Any = None, headers: dict[str, str] | None = None, method: str = "POST") -> Any:
        if not self.token:
            raise ApiError("writing needs the API token (ORL_API_TOKEN): type it in the sidebar", 401)
        # A client for this request alone: the write token never sits in a cache other sessions share.
        client = ApiClient(self.base_url, self.token)
        try:
            out = client.send(method, path, json=body, headers=headers)
        finally:
            client.close()
        _get_live.clear()
        _get_fresh.clear()
        return out

    def register_dataset(self, name: str, path: str) -> dict:
        return self._write("/datasets", {"name": name, "path": path})

    def submit_job(self, kind: str, dataset_id: int, params: dict, idempotency_key: str) -> dict:
        return self._write("/jobs", {"kind": kind, "dataset_id": dataset_id, "params": params},
                           headers={"Idempotency-Key": idempotency_key})

    def cancel_job(self, job_id: int) -> dict:
        return self._write(f"/jobs/{job_id}/cancel")

    def review_pair(self, pair_id: int, verdict: str, reviewer: str) -> dict:
        return self._write(f"/correspondences/{pair_id}/review", {"verdict": verdict, "reviewer": reviewer},
                           method="PUT")


def public_api_url(api: Api) -> str | None:
    """The API as a browser reaches it, for URLs the page hands to the browser (thumbnails in
    chart tooltips): ORL_API_PUBLIC_URL, else the URL the dashboard itself uses. None when reads
    need a token: a browser loading a URL sends none, and the read token stays in this process."""
    if api.read_token:
        return None
    return (os.environ.get("ORL_API_PUBLIC_URL") or api.base_url).rstrip("/")


# -- URL state ----------------------------------------------------------------------------------
def query_values(page: str) -> dict[str, Any]:
    return urlstate.parse(page, st.query_params.to_dict())


def set_query(page: str, values: dict[str, Any]) -> None:
    """Make the URL show ``page`` with ``values`` (only rewritten when it changes)."""
    wanted = urlstate.encode(page, values)
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


# -- text -------------------------------------------------------------------------------------------
# Streamlit renders captions, headers and st.markdown as Markdown, with its own extras: ":smile:"
# becomes an emoji and ":red[...]" colours text. A file or dataset name is the user's text, not
# markup: escaped, its "_" or "*" is no emphasis, its "$" no formula, its "[" no link, its ":" no
# emoji. Any ASCII punctuation may be backslash-escaped in CommonMark.
_MARKDOWN_SPECIAL = frozenset("\\`*_{}[]()<>#+-.!|~$:")


def md_text(text: object) -> str:
    """``text`` as Markdown that shows it literally."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in str(text))


# -- sidebar: connection --------------------------------------------------------------------------
def sidebar_connection() -> Api | None:
    """API URL, readiness and the write-token field in the sidebar; the Api to use, or None when
    unreachable."""
    base_url = os.environ.get("ORL_API_URL", DEFAULT_API_URL).rstrip("/")
    read_token = os.environ.get("ORL_API_READ_TOKEN") or None
    st.divider()
    st.caption(f"API: [{base_url}]({base_url}/docs)")
    # Typed by the user and kept in their session only, never in the URL (links get shared) nor in
    # the dashboard's environment (whoever reaches the port would write with it).
    token = st.text_input("API token (to write)", type="password", key="api_token",
                          help="ORL_API_TOKEN, printed by `make up`; needed to register folders, submit or cancel "
                               "jobs and review pairs. Kept in this browser session only") or None
    if os.environ.get("ORL_API_TOKEN"):
        st.caption(":orange[ORL_API_TOKEN is set in the dashboard's environment and ignored: the dashboard gets "
                   "only ORL_API_READ_TOKEN; type the write token above]")
    ok, message = _ready(base_url)
    if not ok:
        st.error(f"API not ready: {message}")
        if st.button("Retry", key="retry_api"):
            _ready.clear()
            st.rerun()
        return None
    st.caption(":green[API ready]" + ("" if token else " · read-only (type the API token to write)"))
    return Api(base_url, token, read_token)


# -- cursor pages -----------------------------------------------------------------------------------
def cursor_history(name: str, filter_key: tuple) -> list[str | None]:
    """The cursors of the pages before the one shown (this session only: the API pages forward,
    "Back" walks this stack). It belongs to one filter combination and starts empty for another."""
    history = st.session_state.setdefault(name, {"key": None, "cursors": []})
    if history["key"] != filter_key:
        history.update(key=filter_key, cursors=[])
    return history["cursors"]


def fetch_page(page: str, state: dict[str, Any], fetch: Callable[[dict[str, Any]], dict]) -> dict:
    """``fetch(state)``; when the API refuses the link's cursor (400: stale or hand-edited), say
    so and fetch the first page with the same filters (``state["cursor"]`` is reset in place)."""
    try:
        return fetch(state)
    except ApiError as exc:
        if exc.status != 400 or not state.get("cursor"):
            raise
        st.warning(f"{exc}. Showing the first page.")
        state["cursor"] = None
        set_query(page, state)
        return fetch(state)


def pager(page: str, state: dict[str, Any], next_cursor: str | None, before: list[str | None], key: str) -> None:
    """Back / First page / Next buttons; the page's cursor lives in the URL (``state["cursor"]``)."""
    back, first, nxt, _ = st.columns([1, 1, 1, 4])
    if back.button("← Back", disabled=not before, key=f"{key}_back"):
        set_query(page, {**state, "cursor": before.pop()})
        st.rerun()
    if first.button("First page", disabled=state["cursor"] is None, key=f"{key}_first"):
        before.clear()
        set_query(page, {**state, "cursor": None})
        st.rerun()
    if nxt.button("Next →", disabled=next_cursor is None, key=f"{key}_next", type="primary"):
        before.append(state["cursor"])
        set_query(page, {**state, "cursor": next_cursor})
        st.rerun()


# -- widgets shared by pages ------------------------------------------------------------------------
def show_error(exc: ApiError, what: str) -> None:
    st.error(f"{what}: {exc}")


def dataset_picker(api: Api, current: int | None, key: str) -> int | None:
    """A selectbox of the registered datasets; returns the chosen id (None when there are none)."""
    try:
        datasets = api.datasets()
    except ApiError as exc:
        show_error(exc, "cannot list datasets")
        return None
    if not datasets:
        st.info("No dataset registered yet. Register a folder of images on the Jobs page.")
        return None
    ids = [d["id"] for d in datasets]
    names = {d["id"]: f"{d['name']} (#{d['id']}" + ("" if d.get("status", "ready") == "ready" else f", {d['status']}")
             + ")" for d in datasets}
    index = ids.index(current) if current in ids else len(ids) - 1  # newest by default
    return st.selectbox("Dataset", ids, index=index, format_func=names.get, key=key)


def registration_text(ds: dict) -> str | None:
    """A line on the dataset's registration while it is not ready, or a rescan runs; else None."""
    reg = ds.get("registration") or {}
    if not reg or (ds.get("status") == "ready" and reg.get("status") not in ("queued", "running", "cancelling")):
        return None
    p = reg.get("progress") or {}
    done, total = p.get("done") or 0, p.get("total") or 0
    what = "rescan" if ds.get("status") == "ready" else "registration"
    parts = [f"{what} job #{reg['job_id']} {reg['status']}"]
    if p.get("scanned") is not None:
        parts.append(f"{p['scanned']:,} files found")
    if total:
        parts.append(f"{done:,} / {total:,} new files checksummed")
    if p.get("failed"):
        parts.append(f"{p['failed']:,} unreadable")
    if reg.get("error"):
        parts.append(reg["error"])
    return " · ".join(parts)


def checkpoint_label(c: dict) -> str:
    stage = {"byol": "stage 1 BYOL", "orl": "stage 3 ORL"}.get(c.get("stage") or "", c.get("stage") or "checkpoint")
    step = (c.get("meta") or {}).get("global_step")
    # The step tells apart the snapshots of one stage (e.g. a study's), which share the rest.
    return f"#{c['id']} · {stage} · job {c.get('job_id')}" + (f" · step {step:,}" if isinstance(step, int) else "")


def goto(page: str, values: dict[str, Any]) -> None:
    """Switch to ``page`` showing ``values`` (a button's on_click: the next run renders it)."""
    st.session_state["nav_page"] = page
    set_query(page, values)


def is_active(job: dict) -> bool:
    return job.get("status") not in TERMINAL
