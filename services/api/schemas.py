"""Request and response bodies (the OpenAPI schema at /docs is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.common.models import MAX_ID, Job, JobStatus

JobKind = Literal["pretrain", "mine", "train", "pipeline", "embedding_map", "register"]
# What POST /jobs takes: register jobs are made by POST /datasets and /datasets/{id}/rescan.
SubmitKind = Literal["pretrain", "mine", "train", "pipeline", "embedding_map"]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """The one shape of every list response (docs/SERVICES.md, "Lists")."""

    items: list[T]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null on the last page")
    total: int | None = Field(None, description="rows matching the filters, where that is cheap to count; "
                                                "null where it is not (the pairs of a large job)")


class ErrorOut(BaseModel):
    """The body of every error answer (4xx): one sentence that names what is wrong and what to change."""

    detail: str = Field(description="what is wrong, naming the field, and what to change")


class ValidationErrorOut(ErrorOut):
    errors: list[dict[str, Any]] | None = Field(None, description=(
        "for a request that does not match the schema: each problem (loc, msg, type), as pydantic reports it"))


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


class RegistrationOut(BaseModel):
    """The dataset's newest register job (GET /api/v1/jobs/{job_id} has all of it)."""

    job_id: int
    status: JobStatus
    progress: dict[str, Any] = Field(description=(
        "done / total: new files checksummed / to checksum; stage (scan, then checksum), scanned (files listed "
        "so far), known (already recorded), checksummed, failed (of those, unreadable: see ?status=failed)"))
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    path: str
    created_at: datetime
    status: Literal["registering", "ready", "incomplete"] = Field("ready", description=(
        "registering: its first registration job is queued or running (jobs on it are refused until it is "
        "ready); ready: registered (a rescan may be running); incomplete: the first registration failed or "
        "was cancelled: POST /datasets/{id}/rescan to go on"))
    registration: RegistrationOut | None = Field(None, description=(
        "the newest register job (POST /datasets and /rescan make one); null for a dataset registered without one"))
    counts: Counts | None = None
    scan: ScanOut | None = Field(None, description="what the newest registration found, once it succeeded")


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


class NeighborOut(BaseModel):
    rank: int = Field(description="rank in the image's KNN, 0 = nearest")
    image_id: int = Field(description="the neighbour image")
    similarity: float = Field(description="cosine similarity of the two image embeddings")
    rel_path: str
    width: int | None
    height: int | None
    rank_back: int | None = Field(description="rank of the asked image in this neighbour's own KNN; "
                                               "null when it is not among them")
    pairs_as_query: int = Field(description="mined pairs with the asked image as query, this one as neighbour")
    pairs_as_neighbor: int = Field(description="mined pairs with this image as query, the asked one as neighbour")


class NeighborPage(Page[NeighborOut]):
    image_id: int
    job_id: int = Field(description="the mining job whose KNN this is (pairs: GET /correspondences?job_id=)")
    checkpoint_id: int | None = Field(description="the checkpoint that job embedded the images with")


# -- jobs ---------------------------------------------------------------------------------------
class JobCreate(BaseModel):
    kind: SubmitKind
    dataset_id: int = Field(gt=0, le=MAX_ID)
    params: dict[str, Any] = Field(default_factory=dict, description=(
        "stage parameters (docs/SERVICES.md, 'Job parameters'); for a pipeline, one object per stage: "
        "{\"pretrain\": {...}, \"mine\": {...}, \"train\": {...}}. Checked at submission "
        "(services.common.params): a bad one is a 422 naming the field, and no job is created"))


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
    config: dict[str, Any] | None = Field(None, description=(
        "the resolved configuration (preset, then params; the default preset as the worker decided it), "
        "also in result.config; null until a worker has resolved it. A pipeline shows its last finished stage's"))
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
                   result=job.result, config=(job.result or {}).get("config"), created_at=job.created_at,
                   started_at=job.started_at,
                   heartbeat_at=job.heartbeat_at, finished_at=job.finished_at, children=children)


class StepMetrics(BaseModel):
    """One optimiser step of a training job (a row of its metrics.csv); null: not logged."""

    epoch: int | None
    step: int | None
    global_step: int
    lr: float | None
    momentum: float | None
    loss: float | None
    loss_global: float | None
    loss_intra: float | None
    loss_inter: float | None
    images_per_s: float | None


class MonitorSignals(BaseModel):
    """The label-free signals after one monitored epoch (a row of monitor.csv, orl.monitor)."""

    epoch: int
    global_step: int
    view_top1: float | None = Field(description="top-1 retrieval of each photo's second view among the first views")
    view_top1_chance: float | None = Field(description="1 / photos: what a network that learnt nothing scores")
    effective_rank: float | None = Field(description="how many dimensions the photos' embeddings spread over")
    effective_rank_max: float | None = Field(description="its ceiling: min(photos - 1, embedding size)")
    images: int | None = Field(description="photos of the fixed set used")
    seconds: float | None = Field(description="what computing the signals took")


class JobMetricsOut(BaseModel):
    job_id: int
    kind: JobKind
    status: JobStatus
    steps: list[StepMetrics] = Field(description=(
        "per-step values, at most max_points of them evenly spaced over the steps (first and last kept)"))
    steps_logged: int = Field(description="steps in the log (after a resume, a redone step counts once)")
    monitor: list[MonitorSignals] = Field(description=(
        "one row per monitored epoch (train.monitor_every_epochs; none when it is 0, the default)"))
    note: str | None = Field(None, description="why the lists are empty, when they are")


# -- correspondences ----------------------------------------------------------------------------
# Fixed-length number arrays as lists, not tuples: the JSON is the same, and the schema says
# "array of numbers, exactly N" with `items`, which every OpenAPI tool reads, instead of a
# `prefixItems` tuple that some (schemathesis, on a nested one) reject as an invalid schema.
Box = Annotated[list[float], Field(min_length=4, max_length=4)]
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]


class ReviewCounts(BaseModel):
    correct: int = 0
    wrong: int = 0


Verdict = Literal["correct", "wrong"]


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
    reviews: ReviewCounts = Field(description="verdicts given on this pair, by everyone")
    verdict: Verdict | None = Field(None, description="the verdict of ?reviewer= on this pair, if they gave one")


class ReviewIn(BaseModel):
    verdict: Verdict
    # Stripped first: "ana " and "ana" are one reviewer.
    reviewer: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100,
                                               pattern=r"^[\w][\w.@+' -]*$")] = Field(
        description="who reviews: a name or e-mail address (letters, digits, . @ + ' - _ space)")


class ReviewOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    pair_id: int
    reviewer: str
    verdict: Verdict
    created_at: datetime
    updated_at: datetime = Field(description="when this reviewer last gave their verdict on the pair")


class ReviewSummary(BaseModel):
    job_id: int = Field(description="the mine job (a pipeline's mine stage)")
    reviewer: str | None = Field(description="only this reviewer's verdicts; null: everyone's")
    pairs: int = Field(description="pairs the job mined")
    reviewed: int = Field(description="pairs with at least one verdict; a pair counts once, with its majority verdict")
    correct: int
    wrong: int
    disputed: int = Field(description="pairs with as many correct as wrong verdicts: in neither count")
    reviews: int = Field(description="verdicts given")
    reviewers: list[str]
    precision: float | None = Field(description="correct / (correct + wrong); null before any review")
    interval: Interval | None = Field(description="Wilson score interval of the precision: [low, high]")
    level: float = Field(description="confidence level of the interval")
    last_review_at: datetime | None
    note: str = Field(description="how to read the figure")


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


# -- embedding maps -----------------------------------------------------------------------------
class MapPoint(BaseModel):
    image_id: int
    rel_path: str = Field(description="the image file, relative to the dataset folder")
    x: float
    y: float
    label: str | None = Field(description="the image's label from the job's label source; null without one, "
                                          "or when the source does not cover the image")


class EmbeddingMapPage(Page[MapPoint]):
    job_id: int = Field(description="the embedding_map job that computed the map (GET /api/v1/jobs/{id})")
    checkpoint_id: int
    dataset_id: int
    method: Literal["umap", "pca"] = Field(description="what laid the map out")
    method_requested: Literal["auto", "umap", "pca"]
    method_reason: str = Field(description="why auto chose PCA (e.g. umap-learn not installed); empty otherwise")
    params: dict[str, Any] = Field(description="the job's resolved parameters (seed, n_neighbors, min_dist, labels)")
    labels: dict[str, Any] | None = Field(description="the label source: path, format (csv, coco, yolo), how many "
                                                      "images it labelled, how many classes; null without one")
    finished_at: datetime | None


# -- artifacts ----------------------------------------------------------------------------------
ArtifactKind = Literal["checkpoint", "backbone", "correspondence", "metrics", "export"]


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["torchscript", "onnx", "torchvision"] = Field(description=(
        "torchscript / onnx: a self-contained model, normalised images (N, 3, H, W) -> pooled features (N, C); "
        "torchvision: the ResNet state dict without fc"))
    input_size: int | None = Field(None, ge=32, le=1024, description=(
        "px of the example the model is traced at (default: the checkpoint's training size); "
        "the exported model accepts other sizes too"))


class JobRef(BaseModel):
    id: int
    kind: JobKind
    status: JobStatus


class ArtifactOut(BaseModel):
    id: int
    kind: ArtifactKind
    stage: Literal["byol", "orl"] | None = Field(description="training stage of a checkpoint or backbone")
    dataset_id: int | None
    job: JobRef | None = Field(description="the job that wrote it (null once that job was deleted)")
    file_name: str
    size_bytes: int | None = Field(description="null when the file is missing on the artifacts volume")
    metrics: dict[str, Any] = Field(description="what its run reported: the last logged training values "
                                                "(loss, lr, ...) of a checkpoint or backbone, images and pairs "
                                                "of a correspondence export")
    meta: dict[str, Any] = Field(description="the row's meta without the full config (GET /checkpoints has it)")
    created_at: datetime
    download_url: str
