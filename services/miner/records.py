"""The SQL of the mining pipeline: reads of a job's images, boxes, embeddings and neighbours,
and idempotent writes (every write goes through a unique key, ``db.insert_ignore``).

A job's image set is fixed when it starts: the dataset's images with ``id <= image_max_id``
(ids only grow, so this is a snapshot without storing the list). Images found undecodable on
the way get ``status='failed'`` and drop out of the later steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session

from services.common.db import insert_ignore
from services.common.models import (
    Artifact,
    Dataset,
    Image,
    ImageEmbedding,
    Job,
    Neighbor,
    Proposal,
    ProposalStatus,
    RoiPair,
)


# -- the job's image set ---------------------------------------------------------------------
def _in_set(dataset_id: int, image_max_id: int):
    return and_(Image.dataset_id == dataset_id, Image.id <= image_max_id)


def max_image_id(session: Session, dataset_id: int) -> int:
    return int(session.execute(select(func.coalesce(func.max(Image.id), 0))
                               .where(Image.dataset_id == dataset_id)).scalar_one())


def count_set(session: Session, dataset_id: int, image_max_id: int) -> int:
    return int(session.execute(select(func.count()).select_from(Image)
                               .where(_in_set(dataset_id, image_max_id), Image.status == "ok")).scalar_one())


def _has_status(params_key: str):
    return exists().where(ProposalStatus.image_id == Image.id, ProposalStatus.params_key == params_key)


def images_lacking_proposals(session: Session, dataset_id: int, image_max_id: int, params_key: str) -> list[int]:
    return list(session.execute(
        select(Image.id).where(_in_set(dataset_id, image_max_id), Image.status == "ok", ~_has_status(params_key))
        .order_by(Image.id)).scalars())


def count_proposed(session: Session, dataset_id: int, image_max_id: int, params_key: str) -> int:
    return int(session.execute(
        select(func.count()).select_from(Image)
        .where(_in_set(dataset_id, image_max_id), Image.status == "ok", _has_status(params_key))).scalar_one())


def image_paths(session: Session, image_ids: Sequence[int], dataset_id: int | None = None,
                only_ok: bool = True) -> dict[int, str]:
    """{image id: rel_path}, restricted to the dataset (a shard never reads another's files)."""
    stmt = select(Image.id, Image.rel_path).where(Image.id.in_(list(image_ids)))
    if dataset_id is not None:
        stmt = stmt.where(Image.dataset_id == dataset_id)
    if only_ok:
        stmt = stmt.where(Image.status == "ok")
    return {int(i): p for i, p in session.execute(stmt)}


def image_checksums(session: Session, image_ids: Sequence[int]) -> dict[int, str | None]:
    """{image id: sha1 recorded at registration}: what the file must still hash to when mined."""
    stmt = select(Image.id, Image.checksum).where(Image.id.in_(list(image_ids)))
    return {int(i): c for i, c in session.execute(stmt)}


def ok_image_checksums(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    """{image id: sha1} of the readable ones among ``image_ids`` (the thumbnail cache key)."""
    return {int(i): c for i, c in session.execute(select(Image.id, Image.checksum).where(
        Image.id.in_(list(image_ids)), Image.status == "ok", Image.checksum.is_not(None)))}


def proposed_among(session: Session, image_ids: Sequence[int], params_key: str) -> set[int]:
    return set(session.execute(select(ProposalStatus.image_id).where(
        ProposalStatus.image_id.in_(list(image_ids)), ProposalStatus.params_key == params_key)).scalars())


def mark_image_failed(session: Session, image_id: int, reason: str) -> None:
    session.execute(update(Image).where(Image.id == image_id).values(status="failed", reason=reason))


# -- proposals ---------------------------------------------------------------------------------
def write_proposals(session: Session, image_id: int, params_key: str, ok: bool, reason: str | None,
                    n_raw: int, boxes: np.ndarray, seconds: float) -> None:
    """The status row and the boxes of one image, in one transaction (the caller's)."""
    rows = [{"image_id": image_id, "params_key": params_key, "ord": k, "x1": float(b[0]), "y1": float(b[1]),
             "x2": float(b[2]), "y2": float(b[3])} for k, b in enumerate(np.asarray(boxes).reshape(-1, 4))]
    insert_ignore(session, Proposal, rows)
    insert_ignore(session, ProposalStatus, [{
        "image_id": image_id, "params_key": params_key, "ok": bool(ok), "reason": reason or None,
        "n_raw": int(n_raw), "n_boxes": len(rows), "seconds": float(seconds)}])


def boxes_of(session: Session, image_ids: Iterable[int], params_key: str) -> dict[int, np.ndarray]:
    """{image id: (B, 4) float xyxy in proposal order}; images without boxes map to (0, 4)."""
    ids = list(image_ids)
    out: dict[int, list] = {i: [] for i in ids}
    stmt = (select(Proposal.image_id, Proposal.x1, Proposal.y1, Proposal.x2, Proposal.y2)
            .where(Proposal.image_id.in_(ids), Proposal.params_key == params_key)
            .order_by(Proposal.image_id, Proposal.ord))
    for image_id, *box in session.execute(stmt):
        out[int(image_id)].append(box)
    return {i: np.asarray(b, dtype=np.float64).reshape(-1, 4) for i, b in out.items()}


# -- embeddings and neighbours -------------------------------------------------------------------
# An image's embedding is cached under (checkpoint, embed_key): services.common.plan.embed_key of
# the options that change it, so jobs with other embedding options never read each other's rows.
def ids_lacking_embedding(session: Session, dataset_id: int, image_max_id: int, checkpoint_id: int,
                          embed_key: str) -> list[int]:
    has = exists().where(ImageEmbedding.image_id == Image.id, ImageEmbedding.checkpoint_id == checkpoint_id,
                         ImageEmbedding.embed_key == embed_key)
    return list(session.execute(select(Image.id).where(_in_set(dataset_id, image_max_id), Image.status == "ok", ~has)
                                .order_by(Image.id)).scalars())


def write_embeddings(session: Session, checkpoint_id: int, embed_key: str, ids: Sequence[int],
                     emb: np.ndarray) -> None:
    insert_ignore(session, ImageEmbedding, [
        {"image_id": int(i), "checkpoint_id": checkpoint_id, "embed_key": embed_key,
         "vector": np.ascontiguousarray(v, dtype="<f4").tobytes()} for i, v in zip(ids, emb, strict=True)])


def load_embeddings(session: Session, dataset_id: int, image_max_id: int,
                    checkpoint_id: int, embed_key: str) -> tuple[list[int], np.ndarray]:
    """(image ids ascending, (N, D) float32) of the set's ok images that have an embedding."""
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.vector)
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(_in_set(dataset_id, image_max_id), Image.status == "ok", ImageEmbedding.checkpoint_id == checkpoint_id,
               ImageEmbedding.embed_key == embed_key)
        .order_by(ImageEmbedding.image_id)).all()
    if not rows:
        return [], np.zeros((0, 0), np.float32)
    return [int(r[0]) for r in rows], np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows]).astype(np.float32)


def write_neighbors(session: Session, job_id: int, ids: Sequence[int], knn: np.ndarray, sims: np.ndarray) -> None:
    rows = [{"job_id": job_id, "image_id": int(ids[q]), "rank": k, "neighbor_image_id": int(ids[int(j)]),
             "similarity": float(sims[q, k])}
            for q in range(len(ids)) for k, j in enumerate(knn[q]) if j >= 0]
    insert_ignore(session, Neighbor, rows)


def query_ids(session: Session, job_id: int) -> list[int]:
    """The job's query images: those with at least one neighbour, ascending."""
    return list(session.execute(select(Neighbor.image_id).where(Neighbor.job_id == job_id)
                                .distinct().order_by(Neighbor.image_id)).scalars())


def neighbors_of(session: Session, job_id: int, image_ids: Sequence[int]) -> dict[int, list[tuple[int, int, float]]]:
    """{image id: [(rank, neighbour id, similarity), ...] by rank}."""
    out: dict[int, list] = {int(i): [] for i in image_ids}
    stmt = (select(Neighbor.image_id, Neighbor.rank, Neighbor.neighbor_image_id, Neighbor.similarity)
            .where(Neighbor.job_id == job_id, Neighbor.image_id.in_(list(image_ids)))
            .order_by(Neighbor.image_id, Neighbor.rank))
    for i, r, n, s in session.execute(stmt):
        out[int(i)].append((int(r), int(n), float(s)))
    return out


# -- pairs --------------------------------------------------------------------------------------
def images_with_pairs(session: Session, job_id: int, image_ids: Sequence[int]) -> set[int]:
    return set(session.execute(select(RoiPair.image_id).where(RoiPair.job_id == job_id,
                                                             RoiPair.image_id.in_(list(image_ids))).distinct()).scalars())


def write_pairs(session: Session, rows: list[dict[str, Any]]) -> int:
    return insert_ignore(session, RoiPair, rows)


# -- datasets, checkpoints, jobs --------------------------------------------------------------------
def dataset(session: Session, dataset_id: int) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def checkpoint_artifact(session: Session, artifact_id: int) -> Artifact | None:
    art = session.get(Artifact, artifact_id)
    return art if art is not None and art.kind == "checkpoint" else None


def job_status(session: Session, job_id: int) -> tuple[str, bool, dict[str, Any]] | None:
    row = session.execute(select(Job.status, Job.cancel_requested, Job.result).where(Job.id == job_id)).one_or_none()
    return None if row is None else (row[0], bool(row[1]), dict(row[2] or {}))
