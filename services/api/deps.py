"""Dependencies as ``Annotated`` aliases: settings, a database session, write access."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from services.common.runtime import get_sessionmaker
from services.common.settings import Settings, get_settings


def _settings() -> Settings:
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

_bearer = HTTPBearer(auto_error=False, description="ORL_API_TOKEN (printed by `make up`)")


def _require_token(settings: SettingsDep,
                   cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if settings.api_token is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "write endpoints are disabled: the server has no ORL_API_TOKEN; set it and restart the API")
    if cred is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "this endpoint needs a token: send the header 'Authorization: Bearer <ORL_API_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
    # Constant-time comparison: the token must not leak through response timing.
    if not hmac.compare_digest(cred.credentials.encode(), settings.api_token.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "the bearer token is wrong; use the value of ORL_API_TOKEN",
                            headers={"WWW-Authenticate": "Bearer"})


WriteAccess = Depends(_require_token)
