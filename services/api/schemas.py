"""Request and response bodies (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.models import Job, JobStatus

JobKind = Literal["pretrain", "mine", "train", "pipeline"]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last page")


# -- datasets -----------------------------------------------------------------------------------
class DatasetCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$",
                      description="unique name: letters, digits, '.', '_', '-', spaces")
    path: str = Field(min_length=1, max_length=4096,
                      description="folder under one of ORL_DATA_ROOTS: absolute, or relative to a data root")


class Counts(BaseModel):
    images: int
    failed_images: int
    proposals: int
    pairs: int
    jobs: int


class ScanOut(BaseModel):
    found: int = Field(description="image files in the folder")
    added: int = Field(description="new images recorded by this scan")
    added_failed: int = Field(description="of the new images, how many are unreadable")


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    path: str
    created_at: datetime
    counts: Counts | None = None
    scan: ScanOut | None = None


class ImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    dataset_id: int
    rel_path: str
    width: int | None
    height: int | None
    size_bytes: int | None
    checksum: str | None
    status: Literal["ok", "failed"]
    reason: str | None
    created_at: datetime


class ImagePage(Page[ImageOut]):
    total: int = Field(description="images matching the filter")


# -- jobs ---------------------------------------------------------------------------------------
class JobCreate(BaseModel):
    kind: JobKind
    dataset_id: int = Field(gt=0)
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "stage parameters; for a pipeline, one object per stage: {\"pretrain\": {...}, \"mine\": {...}, "
        "\"train\": {...}}"))

    @field_validator("params")
    @classmethod
    def _pipeline_shape(cls, v: dict[str, Any], info) -> dict[str, Any]:
        if info.data.get("kind") == "pipeline":
            bad = [k for k, val in v.items() if k not in ("pretrain", "mine", "train") or not isinstance(val, dict)]
            if bad:
                raise ValueError(f"pipeline params take one object per stage (keys pretrain, mine, train); "
                                 f"move or remove {', '.join(map(repr, bad))}")
        return v


class JobOut(BaseModel):
    id: int
    kind: JobKind
    dataset_id: int
    parent_id: int | None
    status: JobStatus
    params: dict[str, Any]
    progress: dict[str, Any] = Field(description="done, total, plus what the worker reports: stage, epoch, step, "
                                                 "loss, images_per_s, eta_s")
    error: str | None
    cancel_requested: bool
    attempts: int
    worker: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    children: list[int] | None = Field(None, description="a pipeline's stage jobs, in order")

    @classmethod
    def of(cls, job: Job, children: list[int] | None = None) -> JobOut:
        progress = {**(job.progress or {}), "done": job.progress_done, "total": job.progress_total}
        return cls(id=job.id, kind=job.kind, dataset_id=job.dataset_id, parent_id=job.parent_id, status=job.status,
                   params=job.params or {}, progress=progress, error=job.error,
                   cancel_requested=job.cancel_requested, attempts=job.attempts, worker=job.worker,
                   result=job.result, created_at=job.created_at, started_at=job.started_at,
                   heartbeat_at=job.heartbeat_at, finished_at=job.finished_at, children=children)


# -- correspondences ----------------------------------------------------------------------------
Box = tuple[float, float, float, float]


class PairOut(BaseModel):
    id: int
    job_id: int
    image_id: int
    neighbor_image_id: int
    neighbor_rank: int = Field(description="rank of the neighbour image in the query image's KNN (0 = nearest)")
    rank: int = Field(description="rank of this pair among the pairs of (image, neighbour), 0 = best")
    score: float
    query_box: Box = Field(description="[x1, y1, x2, y2] in the query image's pixels")
    neighbor_box: Box = Field(description="[x1, y1, x2, y2] in the neighbour image's pixels")
    image_width: int | None
    image_height: int | None
    neighbor_width: int | None
    neighbor_height: int | None
    image_path: str
    neighbor_path: str


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]
    total: int


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int | None
    dataset_id: int | None
    kind: str
    stage: str | None
    path: str
    meta: dict[str, Any]
    created_at: datetime
