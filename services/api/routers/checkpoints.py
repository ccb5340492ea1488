"""Checkpoints (artifacts of kind checkpoint): what ``checkpoint_id`` parameters refer to."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select

from services.api.deps import SessionDep
from services.api.schemas import CheckpointOut
from services.common.models import Artifact

router = APIRouter(prefix="/api/v1/checkpoints", tags=["checkpoints"])


@router.get("", response_model=list[CheckpointOut], summary="Checkpoints, newest first")
def list_checkpoints(
    session: SessionDep,
    dataset_id: int | None = None,
    job_id: int | None = None,
    stage: Literal["byol", "orl"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[CheckpointOut]:
    stmt = select(Artifact).where(Artifact.kind == "checkpoint")
    if dataset_id is not None:
        stmt = stmt.where(Artifact.dataset_id == dataset_id)
    if job_id is not None:
        stmt = stmt.where(Artifact.job_id == job_id)
    if stage is not None:
        stmt = stmt.where(Artifact.stage == stage)
    rows = session.execute(stmt.order_by(Artifact.id.desc()).limit(limit)).scalars()
    return [CheckpointOut.model_validate(a) for a in rows]
