"""Jobs: submit (202 + Location, Idempotency-Key), list, read, cancel.

Job state lives in the database; the broker only transports "start mining job N". Mine and
embedding_map jobs are sent to the miner's gpu queue by task name, pretrain/train jobs wait in the
table for a trainer to claim them, and a pipeline creates its stages one after the other
(services.common.jobs).
"""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from sqlalchemy import select

from services.api import cursors, lookups, schemas
from services.api.deps import JobId, OptionalId, SessionDep, SettingsDep, WriteAccess
from services.api.dispatch import dispatch_or_503
from services.api.schemas import JobCreate, JobKind, JobMetricsOut, JobOut, Page, ReviewSummary
from services.common import datasets, embedding_maps, jobs, reviews
from services.common import params as job_params
from services.common.models import Dataset, Job, JobStatus, RoiPair
from services.common.paths import PathRefused, resolve_user_path, stored_path
from services.common.settings import Settings

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

MAX_PAGE = 200
TRAINING_KINDS = ("pretrain", "train")
MAX_PARAMS_BYTES = 64 * 1024


def _job_or_404(session, job_id: int) -> Job:
    try:
        return jobs.get_job(session, job_id)
    except jobs.JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} does not exist") from None


def _out(session, job: Job) -> JobOut:
    kids = [c.id for c in jobs.children(session, job.id)] if job.kind == "pipeline" else None
    return JobOut.of(job, kids)


def _validate(session, body: JobCreate, settings: Settings) -> None:
    """Everything checkable before a job row exists; a 422 naming the field otherwise (a 409 for a
    dataset whose registration has not succeeded yet: its images are not all recorded)."""
    if session.get(Dataset, body.dataset_id) is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"dataset_id {body.dataset_id} does not exist; register the folder with "
                            "POST /api/v1/datasets")
    if (why := datasets.registration(session, body.dataset_id).refusal(body.dataset_id)) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, why)
    try:
        job_params.check_storable(body.params, "params")  # what jsonb cannot hold, before anything walks them
        if len(json.dumps(body.params)) > MAX_PARAMS_BYTES:
            raise job_params.ParamsError("params", f"params are larger than {MAX_PARAMS_BYTES} bytes")
        # The same reading of params as the trainer and the miner use when the job runs.
        job_params.check_job(session, body.kind, body.params, settings.artifacts_path)
    except job_params.ParamsError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"body field '{exc.field}': {exc.reason}") from None
    if body.kind == embedding_maps.KIND:
        # The label source needs the data roots, which only the API and the worker know; it goes
        # through the one path resolver, like a dataset folder.
        labels = embedding_maps.parse_params(body.params).labels  # check_job has read the params
        if labels is not None:
            try:
                resolve_user_path(labels, settings.data_root_paths, field="params.labels",
                                  noun="label file or folder")
            except PathRefused as exc:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    f"body field '{exc.field}': {exc.reason}") from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, dependencies=[WriteAccess],
             summary="Submit a job (pretrain, mine, train, a whole pipeline, or an embedding map)",
             responses={409: {"description": "Idempotency-Key reused with a different request, or the dataset "
                                             "is not registered yet (its registration job is under way or failed)"},
                        503: {"description": "the broker is unreachable"}})
def submit_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200, description=(
        "any unique string; retrying the POST with the same key returns the same job"))] = None,
) -> JobOut:
    _validate(session, body, settings)
    try:
        created = jobs.create_job(session, kind=body.kind, dataset_id=body.dataset_id, params=body.params,
                                  idempotency_key=idempotency_key or None)
    except jobs.IdempotencyConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    session.commit()  # before dispatch: the worker must find the row
    job = created.job
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    if not created.created:
        response.headers["Idempotent-Replayed"] = "true"
        return _out(session, job)
    dispatch_or_503(session, created.to_dispatch, what="the job",
                    retry="submit again with a new Idempotency-Key")
    session.refresh(job)
    return _out(session, job)


@router.get("", response_model=Page[JobOut], summary="Jobs, newest first")
def list_jobs(
    session: SessionDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: JobKind | None = None,
    dataset_id: OptionalId = None,
    parent_id: OptionalId = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: str | None = None,
) -> Page[JobOut]:
    filters = {"status": status_, "kind": kind, "dataset_id": dataset_id, "parent_id": parent_id}
    where = cursors.equal_to([(Job.status, status_), (Job.kind, kind), (Job.dataset_id, dataset_id),
                              (Job.parent_id, parent_id)])
    rows, nxt = cursors.id_page(session, select(Job).where(*where), Job.id, filters, limit, cursor, descending=True)
    return Page[JobOut](items=[_out(session, j) for j in rows], next_cursor=nxt,
                        total=cursors.count(session, Job, where))


@router.get("/{job_id}", response_model=JobOut, summary="A job: status, progress, error, params, timestamps")
def get_job(job_id: JobId, session: SessionDep) -> JobOut:
    return _out(session, _job_or_404(session, job_id))


@router.get("/{job_id}/review-summary", response_model=ReviewSummary,
            summary="Reviewed precision of a mining job's pairs, with a Wilson 95% interval",
            responses={404: {"description": "no such job"}, **lookups.MINE_JOB_ERRORS})
def review_summary(
    job_id: JobId,
    session: SessionDep,
    reviewer: Annotated[str | None, Query(min_length=1, max_length=100,
                                          description="only this reviewer's verdicts")] = None,
) -> ReviewSummary:
    mine_id = lookups.mine_job_id(session, job_id)
    summary = reviews.job_summary(session, mine_id, reviewer)
    pairs = cursors.count(session, RoiPair, [RoiPair.job_id == mine_id])
    return ReviewSummary(
        job_id=mine_id, reviewer=reviewer, pairs=pairs, reviewed=summary.reviewed, correct=summary.correct,
        wrong=summary.wrong, disputed=summary.disputed, reviews=summary.reviews, reviewers=summary.reviewers,
        precision=summary.precision, interval=summary.interval, level=reviews.LEVEL,
        last_review_at=summary.last_review_at,
        note=("the share of reviewed pairs marked correct; it estimates the precision of all the job's pairs only "
              "when the reviewed ones are a random sample (GET /correspondences?order=random&seed=)"))


@router.get("/{job_id}/metrics", response_model=JobMetricsOut,
            summary="A training job's curves: loss and lr per step, and the label-free signals per monitored epoch",
            responses={409: {"description": "the job is not a pretrain or train job (a pipeline names its stages)"}})
def job_metrics(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    max_points: Annotated[int, Query(ge=2, le=5000, description="most per-step rows returned")] = 500,
) -> JobMetricsOut:
    """Read from the job's run folder on the artifacts volume (its metrics.csv and monitor.csv,
    orl.runlog), which the trainer appends to at every step: live while the job runs. The folder
    is the one the trainer recorded in result.out_dir, resolved inside ORL_ARTIFACTS_DIR only."""
    from orl.runlog import METRICS_FILE, MONITOR_FILE, read_metrics, read_monitor

    job = _job_or_404(session, job_id)
    if job.kind not in TRAINING_KINDS:
        stages = ""
        if job.kind == "pipeline":
            ids = [c.id for c in jobs.children(session, job.id) if c.kind in TRAINING_KINDS]
            stages = f"; its training stages are jobs {ids}" if ids else "; none of its training stages has started"
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"job {job_id} is a {job.kind} job: metrics are kept for pretrain and train jobs{stages}")
    out = JobMetricsOut(job_id=job.id, kind=job.kind, status=job.status, steps=[], steps_logged=0, monitor=[],  # type: ignore[arg-type]
                        note=None)
    out_dir = (job.result or {}).get("out_dir")
    if not isinstance(out_dir, str):
        out.note = "no run folder yet: the job has not been claimed by a trainer"
        return out
    try:
        run_dir = stored_path(out_dir, settings.artifacts_path, what="run folder")
        for name in (METRICS_FILE, MONITOR_FILE):  # nor does a file in it lead out (a symlink)
            stored_path(run_dir / name, settings.artifacts_path, what=name)
    except PathRefused:
        out.note = "the job's run folder, or a log in it, leads outside the artifacts volume (ORL_ARTIFACTS_DIR)"
        return out
    rows, out.steps_logged = read_metrics(run_dir, max_points)
    out.steps = [schemas.StepMetrics(**r) for r in rows]
    out.monitor = [schemas.MonitorSignals(**r) for r in read_monitor(run_dir)]
    if not out.steps and not out.monitor:
        out.note = "nothing logged yet" if run_dir.is_dir() else "the run folder is not on this host's artifacts volume"
    return out


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             dependencies=[WriteAccess], summary="Request cancellation (workers stop between batches)",
             responses={409: {"description": "the job already succeeded or failed"}})
def cancel_job(job_id: JobId, session: SessionDep) -> JobOut:
    _job_or_404(session, job_id)
    try:
        job = jobs.cancel_job(session, job_id)
    except jobs.InvalidTransition as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    session.commit()
    session.refresh(job)
    return _out(session, job)
