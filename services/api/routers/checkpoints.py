"""Checkpoints (artifacts of kind checkpoint): what ``checkpoint_id`` parameters refer to, and the
embedding map of each (computed by embedding_map jobs, services/miner/embedding_map.py)."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import select

from services.api import cursors, lookups
from services.api.deps import CheckpointId, OptionalId, SessionDep, id_query
from services.api.schemas import CheckpointOut, EmbeddingMapPage, MapPoint, Page
from services.common import embedding_maps
from services.common.models import TERMINAL_STATUSES, Artifact, EmbeddingMapPoint, Image, Job, JobStatus

router = APIRouter(prefix="/api/v1/checkpoints", tags=["checkpoints"])

MAX_PAGE = 500
# A point is ~100 bytes of JSON: the dashboard draws a map of 10,000 images from one page.
MAX_MAP_PAGE = 10_000


@router.get("", response_model=Page[CheckpointOut], summary="Checkpoints, newest first")
def list_checkpoints(
    session: SessionDep,
    dataset_id: OptionalId = None,
    job_id: OptionalId = None,
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


def _map_job(session, checkpoint_id: int, dataset_id: int | None, job_id: int | None) -> Job:
    """The embedding_map job whose points answer: the given one, else the newest succeeded one of
    the checkpoint (in the dataset, when given). 404s say what exists instead and what to run."""
    if job_id is not None:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist")
        if job.kind != embedding_maps.KIND or (job.params or {}).get("checkpoint_id") != checkpoint_id:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"job {job_id} is not an embedding_map job of checkpoint {checkpoint_id}; list those "
                                "with GET /api/v1/jobs?kind=embedding_map, or omit job_id for the newest")
        if job.status != JobStatus.SUCCEEDED:
            raise HTTPException(status.HTTP_409_CONFLICT, f"embedding_map job {job_id} is {job.status}"
                                + (f": {job.error}" if job.error else "; try again when it has succeeded"))
        return job
    done, newest = embedding_maps.latest_map_job(session, checkpoint_id, dataset_id)
    if done is not None:
        return done
    where = f" for dataset {dataset_id}" if dataset_id is not None else ""
    body = {"kind": embedding_maps.KIND, "dataset_id": dataset_id if dataset_id is not None else "<id>",
            "params": {"checkpoint_id": checkpoint_id}}
    submit = f"submit POST /api/v1/jobs with {json.dumps(body)}"
    if newest is None:
        detail = f"checkpoint {checkpoint_id} has no embedding map{where} yet; {submit}"
    elif newest.status in TERMINAL_STATUSES:
        detail = (f"checkpoint {checkpoint_id} has no finished embedding map{where}: its newest job {newest.id} "
                  f"{newest.status}" + (f" ({newest.error})" if newest.error else "") + f"; {submit}")
    else:
        detail = (f"the embedding map of checkpoint {checkpoint_id}{where} is being computed by job {newest.id} "
                  f"({newest.status}); try again when it has succeeded")
    raise HTTPException(status.HTTP_404_NOT_FOUND, detail)


@router.get("/{checkpoint_id}/embedding-map", response_model=EmbeddingMapPage,
            summary="The 2-D map of a checkpoint's image embeddings (stored by an embedding_map job), by image id",
            responses={404: {"description": "no such checkpoint, or no finished map for it (the detail says what "
                                            "to submit, or which job is computing it)"},
                       409: {"description": "the given job has not succeeded"}})
def embedding_map(
    checkpoint_id: CheckpointId,
    session: SessionDep,
    dataset_id: Annotated[int | None, id_query("the dataset whose images are mapped "
                                                              "(default: the newest map of any dataset)")] = None,
    job_id: Annotated[int | None, id_query("a given embedding_map job instead of the newest")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_MAP_PAGE, description=f"page size, at most {MAX_MAP_PAGE}")] = 1000,
    cursor: str | None = None,
) -> EmbeddingMapPage:
    lookups.checkpoint_or_404(session, checkpoint_id)
    job = _map_job(session, checkpoint_id, dataset_id, job_id)
    result = job.result or {}
    where = [EmbeddingMapPoint.job_id == job.id]
    total = cursors.count(session, EmbeddingMapPoint, where)
    filters = {"job_id": job.id}
    if cursor:
        (after,) = cursors.decode(cursor, filters, 1)
        where.append(EmbeddingMapPoint.image_id > after)
    rows = session.execute(select(EmbeddingMapPoint, Image.rel_path).join(Image, Image.id == EmbeddingMapPoint.image_id)
                           .where(*where).order_by(EmbeddingMapPoint.image_id).limit(limit + 1)).all()
    nxt = cursors.encode([rows[limit - 1][0].image_id], filters) if len(rows) > limit else None
    items = [MapPoint(image_id=p.image_id, rel_path=path, x=p.x, y=p.y, label=p.label) for p, path in rows[:limit]]
    plan = result.get("map") or {}
    return EmbeddingMapPage(items=items, next_cursor=nxt, total=total, job_id=job.id, checkpoint_id=checkpoint_id,
                            dataset_id=job.dataset_id, method=result.get("method", "pca"),
                            method_requested=(plan.get("params") or {}).get("method", "auto"),
                            method_reason=result.get("method_reason") or "", params=plan.get("params") or {},
                            labels=result.get("labels"), finished_at=job.finished_at)
