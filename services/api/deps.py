"""Dependencies as ``Annotated`` aliases: settings, a database session, read and write access, ids.

Access (docs/SERVICES.md, "Security"): write endpoints need ``Authorization: Bearer
<ORL_API_TOKEN>``. Reads are open unless ORL_API_READ_TOKEN is set; then every ``/api/v1`` read
needs one of the two tokens (the write token can do everything the read token can). The health
probes and the OpenAPI schema stay open: they hold no data, and orchestrators probe them
without credentials.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from enum import Enum
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from services.common.models import MAX_ID
from services.common.runtime import get_sessionmaker
from services.common.settings import Settings, get_settings

# Every id is a Postgres bigint: a larger one is a 422 naming the parameter, never a driver error.
INT64_MAX = MAX_ID


# The dependencies that do no I/O are ``async def``: FastAPI runs those in the event loop, where a
# plain ``def`` would cost each request a round trip through the thread pool.
async def _settings() -> Settings:
    return get_settings()


def _session() -> Iterator[Session]:
    s = get_sessionmaker()()
    try:
        yield s
    finally:
        # Read endpoints never commit; write endpoints commit explicitly before dispatching.
        s.rollback()
        s.close()


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]

_bearer = HTTPBearer(auto_error=False, description=(
    "ORL_API_TOKEN (printed by `make up`) for writes; for reads ORL_API_READ_TOKEN or ORL_API_TOKEN "
    "when the server sets ORL_API_READ_TOKEN, else none"))


class Grant(Enum):
    READ = "read"
    WRITE = "write"


def _same(given: str, expected: str | None) -> bool:
    # Constant-time comparison: a token must not leak through response timing.
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _grant(settings: Settings, cred: HTTPAuthorizationCredentials | None) -> Grant | None:
    """What the request's bearer token allows: WRITE (ORL_API_TOKEN), READ (ORL_API_READ_TOKEN), or None."""
    if cred is None:
        return None
    if _same(cred.credentials, settings.api_token):
        return Grant.WRITE
    if _same(cred.credentials, settings.api_read_token):
        return Grant.READ
    return None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


async def _require_token(settings: SettingsDep,
                   cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if settings.api_token is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "write endpoints are disabled: the server has no ORL_API_TOKEN; set it and restart the API")
    if cred is None:
        raise _unauthorized("this endpoint needs a token: send the header 'Authorization: Bearer <ORL_API_TOKEN>'")
    grant = _grant(settings, cred)
    if grant is Grant.READ:
        raise _unauthorized("this is the read token (ORL_API_READ_TOKEN); writing needs ORL_API_TOKEN")
    if grant is not Grant.WRITE:
        raise _unauthorized("the bearer token is wrong; use the value of ORL_API_TOKEN")


async def _require_read(request: Request, settings: SettingsDep,
                  cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if settings.api_read_token is None:
        return  # reads are open: the documented default on a loopback-only machine
    # A write route runs this check too (it is on every router), before its own: name the token it needs.
    needed = "ORL_API_READ_TOKEN (or ORL_API_TOKEN)" if request.method in ("GET", "HEAD") else "ORL_API_TOKEN"
    if cred is None:
        raise _unauthorized(f"this endpoint needs a token: send the header 'Authorization: Bearer <{needed}>'")
    if _grant(settings, cred) is None:
        raise _unauthorized(f"the bearer token is wrong; use the value of {needed}")


WriteAccess = Depends(_require_token)
ReadAccess = Depends(_require_read)
"""On every ``/api/v1`` router (``create_app``): reads need a token once ORL_API_READ_TOKEN is set."""


# -- ids --------------------------------------------------------------------------------------------
def id_path(description: str) -> object:
    """A path parameter holding a row id: 1 .. 2**63 - 1."""
    return Path(ge=1, le=INT64_MAX, description=description)


def id_query(description: str | None = None) -> object:
    """An optional query parameter holding a row id: 1 .. 2**63 - 1."""
    return Query(ge=1, le=INT64_MAX, description=description)


DatasetId = Annotated[int, id_path("a dataset id (GET /api/v1/datasets)")]
ImageId = Annotated[int, id_path("an image id (GET /api/v1/datasets/{id}/images)")]
JobId = Annotated[int, id_path("a job id (GET /api/v1/jobs)")]
PairId = Annotated[int, id_path("a pair id (GET /api/v1/correspondences)")]
ArtifactId = Annotated[int, id_path("an artifact id (GET /api/v1/artifacts)")]
CheckpointId = Annotated[int, id_path("a checkpoint id (GET /api/v1/checkpoints)")]
OptionalId = Annotated[int | None, id_query()]
