"""Checkpoints (artifacts of kind checkpoint): what ``checkpoint_id`` parameters refer to."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select

from services.api import cursors
from services.api.deps import SessionDep
from services.api.schemas import CheckpointOut, Page
from services.common.models import Artifact

router = APIRouter(prefix="/api/v1/checkpoints", tags=["checkpoints"])

MAX_PAGE = 500


@router.get("", response_model=Page[CheckpointOut], summary="Checkpoints, newest first")
def list_checkpoints(
    session: SessionDep,
    dataset_id: int | None = None,
    job_id: int | None = None,
    stage: Literal["byol", "orl"] | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 100,
    cursor: str | None = None,
) -> Page[CheckpointOut]:
    filters = {"dataset_id": dataset_id, "job_id": job_id, "stage": stage}
    where = cursors.equal_to([(Artifact.kind, "checkpoint"), (Artifact.dataset_id, dataset_id),
                              (Artifact.job_id, job_id), (Artifact.stage, stage)])
    rows, nxt = cursors.id_page(session, select(Artifact).where(*where), Artifact.id, filters, limit, cursor,
                                descending=True)
    return Page[CheckpointOut](items=[CheckpointOut.model_validate(a) for a in rows], next_cursor=nxt,
                               total=cursors.count(session, Artifact, where))
