"""Limits every request meets before a route sees it: body size, a JSON body's encoding, and NUL
bytes in the query string.

A pure ASGI middleware rather than a route dependency: the body limit must hold for a body sent
without a Content-Length (chunked) as well, which only counting the received bytes can do, and
the checks must cover every route, present and future. Every body this API takes is a small
JSON object, so the body is read here in full (at most the limit) and handed on to the app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (ORL_MAX_BODY_BYTES); send a smaller body"


class RequestLimits:
    """413 for a body over ``max_body_bytes()`` (declared or counted); 422 for a JSON body that is
    not UTF-8 and for a query parameter holding a NUL byte (Postgres text cannot hold one). Each
    answer names what to change."""

    def __init__(self, app: ASGIApp, max_body_bytes: Callable[[], int]):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def refuse(code: int, detail: str) -> None:
            await JSONResponse({"detail": detail}, status_code=code)(scope, receive, send)

        bad = next((k for k, v in QueryParams(scope.get("query_string", b"")).multi_items()
                    if "\x00" in k or "\x00" in v), None)
        if bad is not None:
            name = bad.replace("\x00", "\\x00")
            await refuse(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         f"query parameter '{name}': must not contain a NUL byte")
            return
        limit = self.max_body_bytes()
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await refuse(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit))
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:  # a chunked body says no length: count it
                await refuse(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit))
                return
        if body and "json" in headers.get("content-type", ""):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                # FastAPI would answer a bare "There was an error parsing the body".
                await refuse(status.HTTP_422_UNPROCESSABLE_CONTENT,
                             f"body: not valid UTF-8 (byte {exc.start}); send the JSON body as UTF-8 text")
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls: the disconnect a streaming response listens for

        await self.app(scope, replay, send)


def install(app: Any, max_body_bytes: Callable[[], int]) -> None:
    app.add_middleware(RequestLimits, max_body_bytes=max_body_bytes)
