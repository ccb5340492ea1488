"""The FastAPI application: ``uvicorn services.api.main:app``.

``create_app()`` reads no settings and opens no connection; both happen per request through the
dependencies, so importing this module (uvicorn, tests, OpenAPI generation) has no side effects.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from services.api.routers import artifacts, checkpoints, correspondences, datasets, health, images, jobs

MAX_BODY_BYTES = 1 << 20  # every request body is a small JSON object

DESCRIPTION = """
Object-level representation learning (ORL, Xie et al., NeurIPS 2021) as a service: register a
folder of scene photos, run pretrain / mine / train jobs (or a whole pipeline), and browse the
mined RoI pairs and attention maps. Write endpoints need `Authorization: Bearer <ORL_API_TOKEN>`.
"""


def _where(loc: tuple) -> str:
    kind = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "body field"}
    if not loc:
        return "request"
    head, rest = loc[0], [str(p) for p in loc[1:]]
    return f"{kind.get(head, head)} '{'.'.join(rest)}'" if rest else kind.get(head, str(head))


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    # One sentence per problem that names the field and what it must be, e.g.
    # "query parameter 'limit': Input should be less than or equal to 500".
    errors = exc.errors()
    detail = "; ".join(f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors)
    return JSONResponse({"detail": detail, "errors": jsonable_encoder(errors)},
                        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def create_app() -> FastAPI:
    app = FastAPI(title="ORL API", version="1.0", description=DESCRIPTION, docs_url="/docs")
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body larger than {MAX_BODY_BYTES} bytes; send a smaller body"},
                                status_code=status.HTTP_413_CONTENT_TOO_LARGE)
        return await call_next(request)

    for r in (health, datasets, images, jobs, correspondences, checkpoints, artifacts):
        app.include_router(r.router)
    return app


app = create_app()
