"""A mining job's rows -> ``orl.correspondence.Correspondence``: the one place that does it.

The miner exports it as correspondence.json when a job finishes (``mine_job_correspondence``), the
API serves the same thing in the authors' json layout, and the trainer feeds it to stage 3: all
three must see the same pairs. The Label Studio and COCO exports read the same rows, pair by pair
with their reviews (``job_images``, ``pair_records``), as ``orl.annotation_formats`` records.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from sqlalchemy import select, union
from sqlalchemy.orm import Session, aliased

from orl.annotation_formats import PairImage, PairRecord, Verdict
from orl.correspondence import Correspondence, official_info
from services.common import reviews
from services.common.models import Image, Job, Neighbor, Proposal, RoiPair
from services.common.plan import MinePlan


def job_params_key(job: Job) -> str | None:
    """The selective-search parameters key of a mine job (the miner records it in its plan)."""
    plan = MinePlan.of(job)
    return (plan.params_key if plan else None) or (job.result or {}).get("params_key") \
        or (job.params or {}).get("params_key")


def correspondence_from_db(session: Session, job_id: int, params_key: str | None = None,
                           info: dict[str, Any] | None = None) -> Correspondence:
    """Images = every image that has or is a neighbour in the job, ordered by id; boxes = its
    proposals under ``params_key`` (looked up from the job when None); pairs[i][k] = the pairs
    with its k-th neighbour, by rank. Similarities of missing neighbours are 0 (json has no NaN).
    """
    if params_key is None:
        job = session.get(Job, job_id)
        params_key = job_params_key(job) if job is not None else None
    nb = session.execute(select(Neighbor.image_id, Neighbor.rank, Neighbor.neighbor_image_id, Neighbor.similarity)
                         .where(Neighbor.job_id == job_id).order_by(Neighbor.image_id, Neighbor.rank)).all()
    ids = sorted({int(r[0]) for r in nb} | {int(r[2]) for r in nb})
    pos = {i: p for p, i in enumerate(ids)}
    meta = {int(i): (p, w, h) for i, p, w, h in session.execute(
        select(Image.id, Image.rel_path, Image.width, Image.height).where(Image.id.in_(ids)))} if ids else {}
    k_max = max((int(r[1]) + 1 for r in nb), default=0)
    knn = -np.ones((len(ids), k_max), dtype=np.int64)
    knn_sim = np.zeros((len(ids), k_max), dtype=np.float64)
    for i, k, j, s in nb:
        knn[pos[int(i)], int(k)] = pos[int(j)]
        knn_sim[pos[int(i)], int(k)] = s
    boxes: dict[int, list] = {i: [] for i in ids}
    if params_key and ids:
        for i, *b in session.execute(select(Proposal.image_id, Proposal.x1, Proposal.y1, Proposal.x2, Proposal.y2)
                                     .where(Proposal.image_id.in_(ids), Proposal.params_key == params_key)
                                     .order_by(Proposal.image_id, Proposal.ord)):
            boxes[int(i)].append(b)
    grouped: dict[tuple[int, int], list] = {}
    for row in session.execute(
            select(RoiPair.image_id, RoiPair.neighbor_rank, RoiPair.score, RoiPair.qx1, RoiPair.qy1, RoiPair.qx2,
                   RoiPair.qy2, RoiPair.nx1, RoiPair.ny1, RoiPair.nx2, RoiPair.ny2)
            .where(RoiPair.job_id == job_id)
            .order_by(RoiPair.image_id, RoiPair.neighbor_rank, RoiPair.rank)).yield_per(10_000):
        grouped.setdefault((int(row[0]), int(row[1])), []).append(row[2:])
    pairs = [[np.zeros((0, 8)) for _ in range(k_max)] for _ in ids]
    scores = [[np.zeros(0) for _ in range(k_max)] for _ in ids]
    for (i, k), rows in grouped.items():
        arr = np.asarray(rows, dtype=np.float64)
        pairs[pos[i]][k], scores[pos[i]][k] = arr[:, 1:], arr[:, 0]
    return Correspondence(
        files=[meta[i][0] for i in ids],
        sizes=np.asarray([[meta[i][1] or 0, meta[i][2] or 0] for i in ids], dtype=np.int64).reshape(-1, 2),
        boxes=[np.asarray(boxes[i], dtype=np.float64).reshape(-1, 4) for i in ids],
        knn=knn, knn_sim=knn_sim, pairs=pairs, pair_scores=scores, info=dict(info or {"mine_job_id": job_id}))


def mine_job_correspondence(session: Session, job: Job) -> Correspondence:
    """A mine job's result with its ``info`` block: the miner's correspondence.json and the API's
    ``GET /correspondences/export?format=orl-json`` are both this, so they are identical."""
    plan = MinePlan.of(job)
    key = job_params_key(job)
    where = {"job_id": job.id, "dataset_id": job.dataset_id}
    if plan is None:  # rows written without the miner (no recorded parameters)
        info = {**where, "params_key": key}
    else:
        info = official_info(plan.mine, {**where, "images_root": plan.dataset_path,
                                         "checkpoint_id": plan.checkpoint_id, "params_key": key})
    return correspondence_from_db(session, job.id, key, info)


def job_images(session: Session, job_id: int) -> Iterator[PairImage]:
    """Every image of the job's KNN (has or is a neighbour: the images of correspondence_from_db), by id."""
    ids = union(select(Neighbor.image_id.label("id")).where(Neighbor.job_id == job_id),
                select(Neighbor.neighbor_image_id.label("id")).where(Neighbor.job_id == job_id)).subquery()
    stmt = (select(Image.id, Image.rel_path, Image.width, Image.height).join(ids, ids.c.id == Image.id)
            .order_by(Image.id).execution_options(yield_per=5000))
    for i, path, w, h in session.execute(stmt):
        yield PairImage(int(i), path, int(w or 0), int(h or 0))


def pair_records(session: Session, job_id: int, batch: int = 2000) -> Iterator[PairRecord]:
    """The job's pairs in file order (image, neighbour rank, rank) with their reviews, streamed in
    batches of ``batch`` rows (one reviews query per batch)."""
    qi, ni = aliased(Image), aliased(Image)
    stmt = (select(RoiPair, qi.rel_path, qi.width, qi.height, ni.rel_path, ni.width, ni.height)
            .join(qi, qi.id == RoiPair.image_id).join(ni, ni.id == RoiPair.neighbor_image_id)
            .where(RoiPair.job_id == job_id).order_by(RoiPair.image_id, RoiPair.neighbor_rank, RoiPair.rank)
            .execution_options(yield_per=batch))
    for rows in session.execute(stmt).partitions():
        by_pair = reviews.reviews_of(session, [r[0].id for r in rows])
        for p, qp, qw, qh, np_, nw, nh in rows:
            got = tuple(Verdict(who, v, at.isoformat()) for who, v, at in by_pair.get(p.id, []))
            yield PairRecord(
                pair_id=p.id, job_id=p.job_id, score=float(p.score), neighbor_rank=p.neighbor_rank, rank=p.rank,
                query=PairImage(p.image_id, qp, int(qw or 0), int(qh or 0)),
                neighbor=PairImage(p.neighbor_image_id, np_, int(nw or 0), int(nh or 0)),
                query_box=(p.qx1, p.qy1, p.qx2, p.qy2), neighbor_box=(p.nx1, p.ny1, p.nx2, p.ny2), reviews=got,
                verdict=reviews.consensus(sum(v.verdict == "correct" for v in got),
                                          sum(v.verdict == "wrong" for v in got)))
