"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.common import broker, db, migrate, runtime

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    # No I/O on purpose: a database outage must not make an orchestrator restart the API.
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker reachable, migrations at head",
            responses={503: {"description": "a dependency is not ready; the body says which"}})
def readyz() -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        db.check_database()
        checks["database"] = "ok"
        checks["migrations"] = ("ok" if migrate.is_at_head(runtime.get_engine())
                                else "not at head: run `python -m services.common.migrate`")
    except Exception as exc:  # any driver error means "not ready"; the text says which
        checks["database"] = f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
        checks["migrations"] = "unknown (database unreachable)"
    try:
        broker.check_broker(timeout_s=2.0)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}: {exc}".splitlines()[0]
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)
