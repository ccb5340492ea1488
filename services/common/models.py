"""SQLAlchemy 2 models: the tables of docs/SERVICES.md.

Every table that workers write has a unique key over its natural identity, so a redelivered task
that writes the same rows again changes nothing (``db.insert_ignore``: multi-row
``INSERT ... ON CONFLICT DO NOTHING``). Tables without a surrogate id use that key as their primary
key. Boxes are float xyxy in original-image pixels, like everywhere in ``orl``.

The Alembic migration in ``migrations/versions`` creates exactly these tables and indexes;
``tests/services/test_storage.py`` checks that the two agree.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# embedding_map: a 2-D layout of a checkpoint's image embeddings (services/miner/embedding_map.py).
# register: recording a dataset folder's files (POST /datasets, /rescan; services/miner/registration.py).
JOB_KINDS = ("pretrain", "mine", "train", "pipeline", "embedding_map", "register")
# Row ids are bigints: the API refuses a larger id with a 422 naming it, before any query.
MAX_ID = 2**63 - 1


class JobStatus(enum.StrEnum):
    """The states of a job row (``services.common.jobs`` has the transitions). A member equals
    its string, so rows, JSON and query parameters hold the plain value."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
IMAGE_STATUSES = ("ok", "failed")
ARTIFACT_KINDS = ("checkpoint", "backbone", "correspondence", "metrics", "export")
ARTIFACT_STAGES = ("byol", "orl")
VERDICTS = ("correct", "wrong")

# Deterministic constraint names, so Alembic migrations can refer to (and drop) them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Scores and coordinates are double precision: the keyset cursor of /correspondences compares a
# score sent back by the client with the stored one, which must round-trip exactly.
Double = Float(precision=53)


def _in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, float: Double}


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Dataset(Base):
    """A registered folder of images under one of the configured data roots."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)  # absolute, symlinks resolved
    created_at: Mapped[datetime] = _created_at()


class Image(Base):
    """One image file of a dataset. ``status='failed'`` rows carry the reason and are never mined."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("dataset_id", "rel_path"),
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        # Paginated listing of a dataset's images, optionally only the failed ones.
        Index("ix_images_dataset_id_status_id", "dataset_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    rel_path: Mapped[str] = mapped_column(Text)  # posix, relative to the dataset folder
    width: Mapped[int | None] = mapped_column(Integer)  # after EXIF orientation
    height: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(40))  # sha1 hex of the file bytes
    status: Mapped[str] = mapped_column(String(16), server_default="ok")
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class Job(Base):
    """A unit of work and its whole state; see ``services.common.jobs`` for the transitions."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("kind", JOB_KINDS), name="kind"),
        CheckConstraint(_in("status", JobStatus), name="status"),
        # The trainer's claim query and the stale-job reaper.
        Index("ix_jobs_status_kind_id", "status", "kind", "id"),
        Index("ix_jobs_dataset_id_id", "dataset_id", "id"),
        Index("ix_jobs_parent_id", "parent_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), server_default=JobStatus.QUEUED.value)
    params: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    progress_done: Mapped[int] = mapped_column(BigInteger, server_default="0")
    progress_total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # {stage, epoch, step, loss, images_per_s, eta_s}: whatever the worker reports.
    progress: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    result: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Artifact(Base):
    """A file on the artifacts volume (path) and what it is. A checkpoint id is an Artifact.id."""

    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint(_in("kind", ARTIFACT_KINDS), name="kind"),
        CheckConstraint(f"stage IS NULL OR {_in('stage', ARTIFACT_STAGES)}", name="stage"),
        Index("ix_artifacts_job_id", "job_id"),
        Index("ix_artifacts_dataset_id_kind", "dataset_id", "kind"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)  # absolute, or relative to ORL_ARTIFACTS_DIR
    meta: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created_at()


class ProposalStatus(Base):
    """Outcome of selective search on one image with one parameter set (kept across jobs)."""

    __tablename__ = "proposal_status"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    # Short hash of the selective-search + box-filter parameters.
    params_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(Text)
    n_raw: Mapped[int] = mapped_column(Integer, server_default="0")
    n_boxes: Mapped[int] = mapped_column(Integer, server_default="0")
    seconds: Mapped[float] = mapped_column(server_default="0")


class Proposal(Base):
    """One filtered box of an image, in proposal order (``ord``)."""

    __tablename__ = "proposals"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    params_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    ord: Mapped[int] = mapped_column(Integer, primary_key=True)
    x1: Mapped[float]
    y1: Mapped[float]
    x2: Mapped[float]
    y2: Mapped[float]


class ImageEmbedding(Base):
    """Image-level embedding of one image under one checkpoint and one set of embedding options
    (``embed_key``: services.common.plan.embed_key): float32 little-endian bytes."""

    __tablename__ = "image_embeddings"
    __table_args__ = (Index("ix_image_embeddings_checkpoint_id_embed_key", "checkpoint_id", "embed_key"),)

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True)
    embed_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Neighbor(Base):
    """The ``rank``-th nearest neighbour (0 = best) of an image in a mining job."""

    __tablename__ = "neighbors"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    neighbor_image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    similarity: Mapped[float]


class RoiPair(Base):
    """A mined RoI pair: box q of image_id matched to box n of its neighbour_rank-th neighbour.

    ``rank`` orders the pairs of one (image, neighbour) by score, 0 = best.
    """

    __tablename__ = "roi_pairs"
    __table_args__ = (UniqueConstraint("job_id", "image_id", "neighbor_image_id", "rank"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    neighbor_image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    neighbor_rank: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float]
    qx1: Mapped[float]
    qy1: Mapped[float]
    qx2: Mapped[float]
    qy2: Mapped[float]
    nx1: Mapped[float]
    ny1: Mapped[float]
    nx2: Mapped[float]
    ny2: Mapped[float]


class PairReview(Base):
    """A person's verdict on a mined pair: one row per (pair, reviewer); their next verdict on the
    same pair replaces it (``updated_at`` says when)."""

    __tablename__ = "pair_reviews"
    __table_args__ = (
        UniqueConstraint("pair_id", "reviewer"),
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("roi_pairs.id", ondelete="CASCADE"))
    reviewer: Mapped[str] = mapped_column(String(100))
    verdict: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()


class EmbeddingMapPoint(Base):
    """One image's place on the 2-D map of an embedding_map job (the job's result["map"] says which
    checkpoint, method and parameters), and its label when the job was given a label file."""

    __tablename__ = "embedding_map_points"
    __table_args__ = (Index("ix_embedding_map_points_image_id", "image_id"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    x: Mapped[float]
    y: Mapped[float]
    label: Mapped[str | None] = mapped_column(Text)


# Keyset pagination of /correspondences orders by (score DESC, id ASC): per job, per query image,
# or over everything (only min_score given). Declared here to use the column objects.
Index("ix_roi_pairs_job_id_score_id", RoiPair.job_id, RoiPair.score.desc(), RoiPair.id)
Index("ix_roi_pairs_image_id_score_id", RoiPair.image_id, RoiPair.score.desc(), RoiPair.id)
Index("ix_roi_pairs_score_id", RoiPair.score.desc(), RoiPair.id)
# order=random: every pair's fixed pseudo-random key, a hash of its id, walked from a point the seed
# picks (services/api/routers/correspondences.py, _random_page); migration 0006. The 0 is written
# out as a literal so that a query's expression matches the index's whatever the plan.
SAMPLE_KEY = func.hashint8extended(RoiPair.id, literal_column("0"), type_=BigInteger)
Index("ix_roi_pairs_job_id_sample_key", RoiPair.job_id, SAMPLE_KEY, RoiPair.id)
# The box-area filters of /correspondences (both boxes, square pixels): a range of the query box's
# area scanned in the index, the neighbour's checked there too; and ANALYZE keeps statistics of
# both expressions, so the planner knows when walking the score index is cheaper (a loose range).
Q_AREA = (RoiPair.qx2 - RoiPair.qx1) * (RoiPair.qy2 - RoiPair.qy1)
N_AREA = (RoiPair.nx2 - RoiPair.nx1) * (RoiPair.ny2 - RoiPair.ny1)
Index("ix_roi_pairs_job_id_areas", RoiPair.job_id, Q_AREA, N_AREA)
# "Which pairs involve this image as the neighbour" (deleting images, the dashboard's image view).
Index("ix_roi_pairs_neighbor_image_id", RoiPair.neighbor_image_id)
Index("ix_neighbors_neighbor_image_id", Neighbor.neighbor_image_id)
