"""Rows that several routers look up by id, with the 4xx a client gets when they are not there.

Each message says what the id must be and where to find valid ones.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.models import Artifact, Dataset, Image, Job
from services.common.plan import MinePlan

T = TypeVar("T")


def row_or_404(session: Session, model: type[T], row_id: int, noun: str, list_path: str | None = None) -> T:
    """The row of ``model`` with primary key ``row_id``, or a 404 naming it (and, with
    ``list_path``, the endpoint that lists the valid ids)."""
    row = session.get(model, row_id)
    if row is None:
        hint = f"; list {noun}s with GET {list_path}" if list_path else ""
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{noun} {row_id} does not exist{hint}")
    return row


def image_or_404(session: Session, image_id: int) -> Image:
    return row_or_404(session, Image, image_id, "image")


def dataset_or_404(session: Session, dataset_id: int) -> Dataset:
    return row_or_404(session, Dataset, dataset_id, "dataset", "/api/v1/datasets")


def checkpoint_or_404(session: Session, checkpoint_id: int) -> Artifact:
    art = session.get(Artifact, checkpoint_id)
    if art is None or art.kind != "checkpoint":
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"checkpoint {checkpoint_id} does not exist; list checkpoints with GET /api/v1/checkpoints")
    return art


# The answers of ``mine_job_id`` beyond 404, for the routes that use it (OpenAPI ``responses``).
MINE_JOB_ERRORS: dict[int | str, dict] = {
    409: {"description": "the pipeline given has not reached its mine stage yet"},
    422: {"description": "the job given is not a mine (or pipeline) job"},
}


def mine_job_id(session: Session, job_id: int) -> int:
    """A mine job's id; a pipeline stands for its mine stage."""
    # Its kind only, not the ORM object: every page of pairs asks, and loading a Job (its JSON
    # columns, the identity map) cost more than the page's own query.
    kind = session.connection().execute(select(Job.kind).where(Job.id == job_id)).scalar()
    if kind is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist")
    if kind == "pipeline":
        child = session.execute(select(Job.id).where(Job.parent_id == job_id, Job.kind == "mine")).scalar()
        if child is None:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"pipeline {job_id} has not reached its mine stage yet; try again later")
        return child
    if kind != "mine":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"job {job_id} is a {kind} job; pairs come from mine (or pipeline) jobs")
    return job_id


def mine_checkpoint_id(job: Job) -> int | None:
    """The stage-1 checkpoint a mine job embeds with: its recorded plan, else its parameters."""
    plan = MinePlan.of(job)
    cid = plan.checkpoint_id if plan else (job.params or {}).get("checkpoint_id")
    return int(cid) if isinstance(cid, int) and not isinstance(cid, bool) else None
