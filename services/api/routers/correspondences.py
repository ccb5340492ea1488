"""Mined RoI pairs: keyset pages ordered by score, a score histogram, and exports.

Order is (score DESC, id ASC), served by the (job_id | image_id |) score DESC, id indexes. The
``image_id`` filter matches the query side of a pair (each image is a query of its own pairs).
A ``dataset_id`` filter without ``job_id`` covers every mining job of that dataset; each item
says which job it comes from.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import aliased

from services.api import cursors
from services.api.deps import SessionDep
from services.api.schemas import Histogram, Page, PairOut
from services.common.correspondences import mine_job_correspondence
from services.common.models import Dataset, Image, Job, RoiPair
from services.common.runtime import get_sessionmaker

router = APIRouter(prefix="/api/v1/correspondences", tags=["correspondences"])

MAX_PAGE = 500
QI, NI = aliased(Image, name="qi"), aliased(Image, name="ni")


def _filters(session, dataset_id, job_id, image_id, min_score) -> list:
    where = []
    if job_id is not None:
        where.append(RoiPair.job_id == _mine_job_id(session, job_id))
    if dataset_id is not None:
        if session.get(Dataset, dataset_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} does not exist")
        where.append(RoiPair.job_id.in_(select(Job.id).where(Job.dataset_id == dataset_id)))
    if image_id is not None:
        where.append(RoiPair.image_id == image_id)
    if min_score is not None:
        where.append(RoiPair.score >= min_score)
    return where


def _mine_job_id(session, job_id: int) -> int:
    """A mine job's id; a pipeline stands for its mine stage."""
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist")
    if job.kind == "pipeline":
        child = session.execute(select(Job.id).where(Job.parent_id == job_id, Job.kind == "mine")).scalar()
        if child is None:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"pipeline {job_id} has not reached its mine stage yet; try again later")
        return child
    if job.kind != "mine":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"job {job_id} is a {job.kind} job; pairs come from mine (or pipeline) jobs")
    return job.id


@router.get("", response_model=Page[PairOut], summary="RoI pairs, best score first (keyset pages)")
def list_pairs(
    session: SessionDep,
    dataset_id: int | None = None,
    job_id: Annotated[int | None, Query(description="a mine job, or a pipeline (its mine stage)")] = None,
    image_id: Annotated[int | None, Query(description="pairs whose query image is this one")] = None,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 50,
    cursor: str | None = None,
) -> Page[PairOut]:
    where = _filters(session, dataset_id, job_id, image_id, min_score)
    fkey = {"dataset_id": dataset_id, "job_id": job_id, "image_id": image_id, "min_score": min_score}
    if cursor:
        score, last_id = cursors.decode(cursor, fkey, 2)
        where.append(or_(RoiPair.score < score, and_(RoiPair.score == score, RoiPair.id > last_id)))
    stmt = (select(RoiPair, QI.width, QI.height, QI.rel_path, NI.width, NI.height, NI.rel_path)
            .join(QI, QI.id == RoiPair.image_id).join(NI, NI.id == RoiPair.neighbor_image_id)
            .where(*where).order_by(RoiPair.score.desc(), RoiPair.id.asc()).limit(limit + 1))
    rows = session.execute(stmt).all()
    items = [PairOut(id=p.id, job_id=p.job_id, image_id=p.image_id, neighbor_image_id=p.neighbor_image_id,
                     neighbor_rank=p.neighbor_rank, rank=p.rank, score=p.score,
                     query_box=(p.qx1, p.qy1, p.qx2, p.qy2), neighbor_box=(p.nx1, p.ny1, p.nx2, p.ny2),
                     image_width=qw, image_height=qh, neighbor_width=nw, neighbor_height=nh,
                     image_path=qp, neighbor_path=np_)
             for p, qw, qh, qp, nw, nh, np_ in rows[:limit]]
    nxt = None
    if len(rows) > limit:
        last = rows[limit - 1][0]
        nxt = cursors.encode([last.score, last.id], fkey)
    return Page[PairOut](items=items, next_cursor=nxt)


@router.get("/histogram", response_model=Histogram, summary="Histogram of pair scores")
def histogram(
    session: SessionDep,
    dataset_id: int | None = None,
    job_id: int | None = None,
    bins: Annotated[int, Query(ge=1, le=200)] = 20,
) -> Histogram:
    where = _filters(session, dataset_id, job_id, None, None)
    lo, hi, total = session.execute(select(func.min(RoiPair.score), func.max(RoiPair.score), func.count())
                                    .where(*where)).one()
    if not total:
        return Histogram(edges=[], counts=[], total=0)
    if hi <= lo:
        return Histogram(edges=[lo, hi], counts=[total], total=total)
    # width_bucket puts the maximum itself in bucket bins+1; fold it into the last bin.
    b = func.least(func.width_bucket(RoiPair.score, lo, hi, bins), bins)
    counts = dict(session.execute(select(b, func.count()).where(*where).group_by(b)).all())
    edges = np.linspace(lo, hi, bins + 1).tolist()
    return Histogram(edges=edges, counts=[int(counts.get(i, 0)) for i in range(1, bins + 1)], total=total)


# -- export -------------------------------------------------------------------------------------
CSV_COLUMNS = ["pair_id", "job_id", "image_id", "image_path", "image_width", "image_height", "neighbor_image_id",
               "neighbor_path", "neighbor_width", "neighbor_height", "neighbor_rank", "rank", "score",
               "qx1", "qy1", "qx2", "qy2", "nx1", "ny1", "nx2", "ny2"]


def _csv_rows(mine_id: int) -> Iterator[str]:
    # Its own session: the response body is produced after the endpoint (and its request-scoped
    # session) returned.
    with get_sessionmaker()() as session:
        yield from _csv_lines(session, mine_id)


def _csv_lines(session, mine_id: int) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    stmt = (select(RoiPair, QI.rel_path, QI.width, QI.height, NI.rel_path, NI.width, NI.height)
            .join(QI, QI.id == RoiPair.image_id).join(NI, NI.id == RoiPair.neighbor_image_id)
            .where(RoiPair.job_id == mine_id)
            .order_by(RoiPair.image_id, RoiPair.neighbor_rank, RoiPair.rank)
            .execution_options(yield_per=5000))  # stream: never the whole table in memory
    for p, qp, qw, qh, np_, nw, nh in session.execute(stmt):
        w.writerow([p.id, p.job_id, p.image_id, qp, qw, qh, p.neighbor_image_id, np_, nw, nh, p.neighbor_rank,
                    p.rank, repr(p.score), p.qx1, p.qy1, p.qx2, p.qy2, p.nx1, p.ny1, p.nx2, p.ny2])
        if buf.tell() > 1 << 16:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


@router.get("/export", summary="All pairs of a mining job: official ORL json layout, or flat CSV",
            responses={200: {"content": {"application/json": {}, "text/csv": {}}}})
def export(
    session: SessionDep,
    job_id: Annotated[int, Query(description="a mine job, or a pipeline (its mine stage)")],
    format: Literal["orl-json", "csv"] = "orl-json",
):
    mine_id = _mine_job_id(session, job_id)
    if format == "csv":
        return StreamingResponse(_csv_rows(mine_id), media_type="text/csv",
                                 headers={"Content-Disposition": f'attachment; filename="pairs_job{mine_id}.csv"'})
    corr = mine_job_correspondence(session, session.get(Job, mine_id))  # = the miner's correspondence.json
    return JSONResponse(corr.to_official(),
                        headers={"Content-Disposition": f'attachment; filename="correspondence_job{mine_id}.json"'})
