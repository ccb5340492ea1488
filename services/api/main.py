"""The FastAPI application: ``uvicorn services.api.main:app``.

``create_app()`` reads no settings and opens no connection; both happen per request through the
dependencies, so importing this module (uvicorn, tests, OpenAPI generation) has no side effects.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api import limits
from services.api.deps import ReadAccess
from services.api.routers import artifacts, checkpoints, correspondences, datasets, health, images, jobs
from services.api.schemas import ErrorOut, ValidationErrorOut
from services.common.settings import get_settings

DESCRIPTION = """
Object-level representation learning (ORL, Xie et al., NeurIPS 2021) as a service: register a
folder of scene photos, run pretrain / mine / train jobs (or a whole pipeline), and browse the
mined RoI pairs and attention maps. Write endpoints need `Authorization: Bearer <ORL_API_TOKEN>`;
reads need `ORL_API_READ_TOKEN` (or the write token) when the server sets one.
"""


def _where(loc: tuple) -> str:
    kind = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body field"}
    if not loc:
        return "request"
    head, rest = loc[0], [str(p) for p in loc[1:]]
    return f"{kind.get(head, head)} '{'.'.join(rest)}'" if rest else kind.get(head, str(head))


class ErrorResponse(JSONResponse):
    """The body of every error answer, ASCII-escaped: an error may quote the request, and a request
    may hold text UTF-8 cannot encode (a lone surrogate from a JSON escape such as "\\udb09"),
    which the plain JSONResponse turned into a 500 (found by the fuzzer)."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # One sentence per problem that names the field and what it must be, e.g.
    # "query parameter 'limit': Input should be less than or equal to 500".
    errors = exc.errors()
    detail = "; ".join(f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors)
    return ErrorResponse({"detail": detail, "errors": jsonable_encoder(errors)},
                         status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304):  # answers without a body
        return Response(status_code=exc.status_code, headers=exc.headers)
    return ErrorResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# Answers any /api/v1 route can give, whatever it does: the token checks, the body limit and the
# request checks (the NUL check of the query string included).
COMMON_ERRORS = {
    401: "no token, or a wrong one: writes need ORL_API_TOKEN; reads need ORL_API_READ_TOKEN (or ORL_API_TOKEN) "
         "when the server sets one",
    413: "the request body is larger than ORL_MAX_BODY_BYTES",
    422: "a parameter or body field is invalid: detail names it and says what to change",
}


def _route_errors(route: APIRoute) -> dict[int, str]:
    """The error answers a route can give because of the parameters it takes."""
    path, query, body = [], [], []
    todo = [route.dependant]
    while todo:  # the route's parameters and those of its dependencies
        d = todo.pop()
        path += d.path_params
        query += d.query_params
        body += d.body_params
        todo += d.dependencies
    names = {p.name for p in path + query}
    out = dict(COMMON_ERRORS)
    if path or any(n.endswith("_id") for n in names):
        out[404] = "a row the request names (in the path or a filter) does not exist; detail says where to list them"
    if "cursor" in names or body:
        out[400] = "a cursor from another query or a malformed one, a body that cannot be read, or a refused path"
    return out


def _document_errors(router: APIRouter) -> None:
    """Give every error answer of the router's routes its body schema (ErrorOut; 422:
    ValidationErrorOut), and add those every route of its kind can give (``_route_errors``). The
    routes declare their own codes with a description only, and FastAPI would document 422 as
    its own validation body, whose ``detail`` is a list, while this API's is a sentence
    (``_validation_error``). Done on the routes before they are included, since including copies
    them; repeating it changes nothing."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        # Routes may share one responses dict (a module constant): each gets its own, and so does
        # each entry, so that no route's additions show up in another's.
        route.responses = {code: dict(spec) for code, spec in route.responses.items()}
        for code, text in _route_errors(route).items():
            route.responses.setdefault(code, {"description": text})
        for code, spec in route.responses.items():
            if int(code) >= 400 and "model" not in spec and "content" not in spec:
                spec["model"] = ValidationErrorOut if int(code) == 422 else ErrorOut


def create_app() -> FastAPI:
    app = FastAPI(title="ORL API", version="1.0", description=DESCRIPTION, docs_url="/docs")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    # Read per request (the settings are cached): create_app() itself reads no settings.
    limits.install(app, lambda: get_settings().max_body_bytes)
    app.include_router(health.router)  # probes stay open: they hold no data
    for r in (datasets, images, jobs, correspondences, checkpoints, artifacts):
        _document_errors(r.router)
        app.include_router(r.router, dependencies=[ReadAccess])
    return app


app = create_app()
