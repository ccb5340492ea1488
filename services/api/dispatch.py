"""Sending a request's new jobs to the broker, or answering 503 when it cannot be reached.

The job rows are committed before the send (a worker must find them). When the send fails, no
worker will ever see those jobs, so they are marked failed with the reason, which keeps the jobs
table honest, and the client gets a 503 that says what to check and how to try again.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import HTTPException, status
from sqlalchemy.orm import Session

from services.common import broker, jobs
from services.common.models import JobStatus


def dispatch_or_503(session: Session, to_dispatch: Sequence[tuple[int, str]], *, what: str, retry: str) -> None:
    """Send ``to_dispatch`` (job id, kind); on a broker error fail those jobs and raise 503.

    ``what``: the thing that was not started, for the error ("the job", "the registration");
    ``retry``: what the client should do once the broker is back."""
    try:
        broker.dispatch_all(to_dispatch)
    except Exception as exc:  # kombu raises several types when Redis is down
        for job_id, _ in to_dispatch:
            jobs.finish_job(session, job_id, JobStatus.FAILED,
                            error=f"could not reach the broker to start {what}: {exc}")
        session.commit()
        ids = ", ".join(str(j) for j, _ in to_dispatch)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the broker is unreachable ({type(exc).__name__}); job {ids} was marked failed. "
                            f"Check ORL_BROKER_URL / Redis and {retry}") from None
