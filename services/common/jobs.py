"""The job state machine. Every change of a job row goes through these functions.

States::

    queued ──claim/start──> running ──finish──> succeeded | failed | cancelled
      │                       │  └──cancel──> cancelling ──finish──> cancelled (or failed/succeeded)
      └──cancel──> cancelled  └──lease expired──> queued (attempts < max) | failed

Functions take a ``Session`` and do not commit (the caller's transaction decides), except
``reap_and_dispatch``, which hands requeued jobs to the broker and then commits (a worker that
receives the job id first waits for the commit on the row lock; a send that fails rolls back).

Who calls what:
- API: ``create_job`` (+ ``broker.dispatch`` after commit), ``cancel_job``.
- Trainer: ``claim_job(kinds=("pretrain", "train"))``, ``update_job`` (the resolved config),
  ``heartbeat`` between batches (it answers CANCEL when a cancel was requested, LOST when the lease
  went to someone else), ``finish_job`` + ``broker.dispatch_all``, ``release_job`` on shutdown,
  and ``reap_and_dispatch`` in its poll loop.
- Miner: ``start_job`` in ``miner.start_mine``, ``miner.map_embed`` and ``miner.register_dataset``
  (idempotent on redelivery),
  ``get_job(lock=True)`` + ``update_job`` for the plan and each phase change, ``heartbeat`` /
  ``set_progress(phase=...)`` per shard, ``finish_job`` from the last shard. A mining job spans
  many tasks, so something must renew its heartbeat at least every ORL_LEASE_S while shards wait
  in the queue (``keep_alive``; an embedding_map job's layout task too), or ``reap_stale``
  requeues it.

Pipelines: a ``pipeline`` job is a coordinator with no worker. Its children run pretrain -> mine
-> train; each child is created (queued) when the previous one succeeds, with these links added
to its params:
- mine gets ``checkpoint_id`` = the pretrain child's ``result["checkpoint_id"]`` (an artifacts.id);
- train gets ``mine_job_id`` = the mine child's id (its pairs are ``roi_pairs.job_id``).
So a pretrain job MUST finish with ``result={"checkpoint_id": ...}``. Per-stage parameters come
from the pipeline's params: ``{"pretrain": {...}, "mine": {...}, "train": {...}}``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from services.common import broker
from services.common.db import session_scope
from services.common.models import JOB_KINDS, TERMINAL_STATUSES, Job, JobStatus

PIPELINE_STAGES = ("pretrain", "mine", "train")
# Jobs run as Celery tasks by the miner workers (dispatched by broker.dispatch).
MINER_KINDS = ("mine", "embedding_map", "register")
# A worker holds the job (its heartbeat counts).
ACTIVE_STATUSES = (JobStatus.RUNNING, JobStatus.CANCELLING)

# Allowed status changes; anything else is a bug in the caller (InvalidTransition).
TRANSITIONS: dict[str, frozenset[str]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLING, JobStatus.CANCELLED,
                                  JobStatus.QUEUED}),
    # A worker that finished its last batch before seeing the flag may still report success.
    JobStatus.CANCELLING: frozenset({JobStatus.CANCELLED, JobStatus.FAILED, JobStatus.SUCCEEDED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class JobError(Exception):
    """Base class; the message is meant for the API user."""


class JobNotFound(JobError):
    pass


class InvalidTransition(JobError):
    pass


class IdempotencyConflict(JobError):
    pass


class Lease(enum.StrEnum):
    """What a heartbeat tells the worker to do next."""

    CONTINUE = "continue"
    CANCEL = "cancel"  # finish the current batch, then finish_job(..., CANCELLED)
    LOST = "lost"  # the job was requeued or finished by someone else: stop, write nothing more


@dataclass
class Created:
    job: Job
    created: bool  # False: an earlier request with the same Idempotency-Key made this job
    to_dispatch: list[tuple[int, str]] = field(default_factory=list)  # (job id, kind) after commit


# -- helpers ----------------------------------------------------------------------------------
def _now(session: Session) -> datetime:
    # The database clock, not the worker's: heartbeats from several hosts are compared with it.
    return session.execute(select(func.now())).scalar_one()


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id)
    if lock:
        stmt = stmt.with_for_update()
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        raise JobNotFound(f"job {job_id} does not exist")
    if lock:
        # A previous read in this session may have cached stale attributes.
        session.refresh(job)
    return job


def _set_status(session: Session, job: Job, to: str, now: datetime | None = None) -> None:
    if to not in TRANSITIONS[job.status]:
        raise InvalidTransition(f"job {job.id} is {job.status}; it cannot become {to}")
    now = now or _now(session)
    job.status = to
    if to == JobStatus.RUNNING and job.started_at is None:
        job.started_at = now
    if to in TERMINAL_STATUSES:
        job.finished_at = now
    if to == JobStatus.QUEUED:
        job.finished_at = None


# -- creation ---------------------------------------------------------------------------------
def _same_request(job: Job, kind: str, dataset_id: int, params: dict[str, Any]) -> bool:
    return job.kind == kind and job.dataset_id == dataset_id and (job.params or {}) == params


def create_job(
    session: Session,
    *,
    kind: str,
    dataset_id: int,
    params: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    parent_id: int | None = None,
) -> Created:
    """Insert a queued job (and, for a pipeline, its first child).

    With an ``idempotency_key`` that an earlier job already used, nothing is inserted and that job
    is returned (``created=False``); the same key with a different kind, dataset or params raises
    IdempotencyConflict. Concurrent requests with one key are safe: the unique index decides.
    Dispatch ``to_dispatch`` after commit (``broker.dispatch``).
    """
    if kind not in JOB_KINDS:
        raise JobError(f"unknown job kind {kind!r}; valid kinds: {', '.join(JOB_KINDS)}")
    params = dict(params or {})
    values = dict(kind=kind, dataset_id=dataset_id, params=params, parent_id=parent_id,
                  idempotency_key=idempotency_key, status=JobStatus.QUEUED)
    if parent_id is None and kind == "pipeline":
        # A coordinator: it is running as soon as its first stage is queued (no worker claims it).
        values["status"] = JobStatus.RUNNING
        values["started_at"] = func.now()
        values["progress_total"] = len(PIPELINE_STAGES)
        values["progress"] = {"stage": PIPELINE_STAGES[0]}
    stmt = pg_insert(Job).values(**values)
    if idempotency_key is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=[Job.idempotency_key])
    new_id = session.execute(stmt.returning(Job.id)).scalar_one_or_none()
    if new_id is None:
        existing = session.execute(select(Job).where(Job.idempotency_key == idempotency_key)).scalar_one()
        if not _same_request(existing, kind, dataset_id, params):
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was already used for job {existing.id} with a different "
                "kind, dataset or params; send a new key for a new job")
        return Created(existing, created=False)
    job = get_job(session, new_id)
    to_dispatch: list[tuple[int, str]] = []
    if kind == "pipeline":
        child = _create_child(session, job, PIPELINE_STAGES[0], {})
        to_dispatch.append((child.id, child.kind))
    else:
        to_dispatch.append((job.id, job.kind))
    return Created(job, created=True, to_dispatch=to_dispatch)


def _create_child(session: Session, parent: Job, kind: str, links: dict[str, Any]) -> Job:
    params = {**dict((parent.params or {}).get(kind) or {}), **links}
    # The key makes advancing a pipeline idempotent: a finish reported twice creates one child.
    key = f"pipeline:{parent.id}:{kind}"
    created = create_job(session, kind=kind, dataset_id=parent.dataset_id, params=params,
                         idempotency_key=key, parent_id=parent.id)
    return created.job


def children(session: Session, job_id: int) -> list[Job]:
    return list(session.execute(select(Job).where(Job.parent_id == job_id).order_by(Job.id)).scalars())


# -- worker side --------------------------------------------------------------------------------
def claim_job(session: Session, kinds: Sequence[str], worker: str) -> Job | None:
    """Take the oldest queued job of ``kinds`` for ``worker`` (status running, attempts + 1).

    ``FOR UPDATE SKIP LOCKED`` lets any number of trainers poll at once: each row goes to exactly
    one of them and nobody waits on another's lock. Commit right after to publish the claim.
    """
    stmt = (select(Job).where(Job.status == JobStatus.QUEUED, Job.kind.in_(list(kinds)))
            .order_by(Job.id).limit(1).with_for_update(skip_locked=True))
    job = session.execute(stmt).scalar_one_or_none()
    if job is None:
        return None
    session.refresh(job)
    _mark_running(session, job, worker)
    return job


def start_job(session: Session, job_id: int, worker: str | None = None) -> Job | None:
    """Move a dispatched job (a mine task) from queued to running; idempotent.

    Returns the job when the caller should work on it: it was queued (now running) or is already
    running (a redelivered task continues idempotently). Returns None when the job finished, is
    cancelling, or was cancelled while it waited in the broker: the caller does nothing.
    """
    job = get_job(session, job_id, lock=True)
    if job.status == JobStatus.QUEUED:
        _mark_running(session, job, worker)
        return job
    if job.status == JobStatus.RUNNING:
        job.heartbeat_at = _now(session)
        return job
    return None


def _mark_running(session: Session, job: Job, worker: str | None) -> None:
    now = _now(session)
    _set_status(session, job, JobStatus.RUNNING, now)
    job.worker = worker
    job.heartbeat_at = now
    job.attempts = (job.attempts or 0) + 1
    job.error = None
    if job.parent_id is not None:
        parent = get_job(session, job.parent_id, lock=True)
        if parent.status == JobStatus.RUNNING:
            parent.progress = {**(parent.progress or {}), "stage": job.kind}


def heartbeat(
    session: Session,
    job_id: int,
    worker: str | None = None,
    *,
    progress_done: int | None = None,
    progress_total: int | None = None,
    progress: dict[str, Any] | None = None,
) -> Lease:
    """Renew the lease and optionally report progress; says whether to go on.

    ``worker`` (when given) must be the one that claimed the job: a worker whose job was requeued
    after a long pause gets LOST and must stop writing. ``progress`` is merged into the stored
    dict ({stage, epoch, step, loss, images_per_s, eta_s}).
    """
    job = get_job(session, job_id, lock=True)
    if job.status not in ACTIVE_STATUSES or (worker is not None and job.worker not in (None, worker)):
        return Lease.LOST
    job.heartbeat_at = _now(session)
    if progress_done is not None:
        job.progress_done = progress_done
    if progress_total is not None:
        job.progress_total = progress_total
    if progress:
        job.progress = {**(job.progress or {}), **progress}
    return Lease.CANCEL if (job.cancel_requested or job.status == JobStatus.CANCELLING) else Lease.CONTINUE


def update_job(session: Session, job: Job, *, result: dict[str, Any] | None = None,
               progress: dict[str, Any] | None = None, done: int | None = None, total: int | None = None,
               beat: bool = False) -> None:
    """Record a worker's state in a job row it works on; the status is left alone.

    ``result`` keys are merged into ``job.result`` (a mine job's plan and phase, a trainer's
    config), ``progress`` keys into ``job.progress``; ``done`` / ``total`` set the progress counts;
    ``beat`` renews the heartbeat. ``job`` must come from ``get_job(session, id, lock=True)`` in
    this transaction, so concurrent tasks of one job never lose each other's keys.
    """
    if result:
        job.result = {**(job.result or {}), **result}
    if progress:
        job.progress = {**(job.progress or {}), **progress}
    if done is not None:
        job.progress_done = done
    if total is not None:
        job.progress_total = total
    if beat:
        job.heartbeat_at = _now(session)


def set_progress(session: Session, job_id: int, *, done: int | None = None, total: int | None = None,
                 add_done: int = 0, progress: dict[str, Any] | None = None,
                 phase: str | None = None) -> tuple[int, int] | None:
    """Atomic progress update without a lock round trip (many shards report concurrently).

    ``add_done`` increments in SQL, so concurrent shards never lose an update. Note that an
    increment is not idempotent: count from the data (rows written) when redelivery matters.
    Returns (progress_done, progress_total) after the update.

    ``phase`` (mine jobs): update only while ``result["phase"]`` is this phase, and report it as
    ``progress["stage"]``; a slow shard of a phase the job has left then changes nothing, and the
    return value is None.
    """
    values: dict[str, Any] = {"heartbeat_at": func.now()}
    if phase is not None:
        progress = {"stage": phase, **(progress or {})}
    if done is not None:
        values["progress_done"] = done
    elif add_done:
        values["progress_done"] = Job.progress_done + add_done
    if total is not None:
        values["progress_total"] = total
    if progress:
        # jsonb || jsonb merges keys in SQL, so two shards reporting different keys both land.
        values["progress"] = Job.progress.op("||")(bindparam("progress", progress, type_=JSONB))
    stmt = update(Job).where(Job.id == job_id)
    if phase is not None:
        stmt = stmt.where(Job.result["phase"].astext == phase)
    row = session.execute(stmt.values(**values).returning(Job.progress_done, Job.progress_total)).one_or_none()
    if row is None:
        if phase is not None:
            return None
        raise JobNotFound(f"job {job_id} does not exist")
    return int(row[0]), int(row[1])


def keep_alive(session: Session, job_ids: Iterable[int]) -> int:
    """Renew the heartbeat of those of ``job_ids`` that are running miner jobs (mine, embedding_map, register):
    their next tasks wait in the broker, where nobody heartbeats them (services/miner/keepalive.py).
    Returns how many."""
    ids = sorted(set(job_ids))
    if not ids:
        return 0
    res = session.execute(update(Job).where(Job.id.in_(ids), Job.kind.in_(MINER_KINDS),
                                            Job.status == JobStatus.RUNNING).values(heartbeat_at=func.now()))
    return res.rowcount or 0


def is_cancel_requested(session: Session, job_id: int) -> bool:
    """Cheap check for tasks between batches (no lock)."""
    row = session.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise JobNotFound(f"job {job_id} does not exist")
    return bool(row[0]) or row[1] in (JobStatus.CANCELLING, JobStatus.CANCELLED)


def finish_job(
    session: Session,
    job_id: int,
    status: str,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    worker: str | None = None,
) -> list[tuple[int, str]]:
    """Set a terminal status (succeeded | failed | cancelled) and advance a parent pipeline.

    A job that is cancelling becomes cancelled when the worker reports failure or cancellation.
    Finishing an already finished job with the same status is a no-op (redelivered last shard).
    Returns the (job id, kind) pairs to dispatch after commit (the pipeline's next stage).
    """
    if status not in TERMINAL_STATUSES:
        raise InvalidTransition(f"finish_job needs a terminal status ({', '.join(TERMINAL_STATUSES)}), not {status!r}")
    job = get_job(session, job_id, lock=True)
    if job.status in TERMINAL_STATUSES:
        if job.status == status:
            return []
        raise InvalidTransition(f"job {job_id} already finished as {job.status}; it cannot become {status}")
    if worker is not None and job.worker not in (None, worker):
        raise InvalidTransition(f"job {job_id} is held by worker {job.worker}, not {worker}")
    if job.status == JobStatus.CANCELLING and status == JobStatus.FAILED and not error:
        status = JobStatus.CANCELLED
    _set_status(session, job, status)
    if error is not None:
        job.error = error
    if result is not None:
        job.result = result
    if status == JobStatus.SUCCEEDED and job.progress_total:
        job.progress_done = job.progress_total
    if job.parent_id is not None:
        return _advance_pipeline(session, job)
    return []


def _advance_pipeline(session: Session, child: Job) -> list[tuple[int, str]]:
    parent = get_job(session, child.parent_id, lock=True)
    if parent.status in TERMINAL_STATUSES:
        return []
    if child.status == JobStatus.FAILED:
        _set_status(session, parent, JobStatus.FAILED)
        parent.error = f"stage {child.kind} (job {child.id}) failed: {child.error or 'no error message'}"
        return []
    if child.status == JobStatus.CANCELLED or parent.status == JobStatus.CANCELLING or parent.cancel_requested:
        _set_status(session, parent, JobStatus.CANCELLED)
        return []
    # succeeded
    stage = PIPELINE_STAGES.index(child.kind)
    parent.progress_done = stage + 1
    if stage + 1 == len(PIPELINE_STAGES):
        parent.result = {"stages": {k: c.id for k, c in ((c.kind, c) for c in children(session, parent.id))},
                         **(child.result or {})}
        _set_status(session, parent, JobStatus.SUCCEEDED)
        return []
    nxt = PIPELINE_STAGES[stage + 1]
    links: dict[str, Any] = {}
    if nxt == "mine":
        ckpt = (child.result or {}).get("checkpoint_id")
        if ckpt is None and "checkpoint_id" not in ((parent.params or {}).get("mine") or {}):
            _set_status(session, parent, JobStatus.FAILED)
            parent.error = (f"stage pretrain (job {child.id}) succeeded without result.checkpoint_id, "
                            "so the mine stage has no checkpoint to use")
            return []
        if ckpt is not None:
            links["checkpoint_id"] = ckpt
    elif nxt == "train":
        links["mine_job_id"] = child.id
        ckpt = (child.params or {}).get("checkpoint_id")
        if ckpt is not None:
            links.setdefault("stage1_checkpoint_id", ckpt)
    new = _create_child(session, parent, nxt, links)
    parent.progress = {**(parent.progress or {}), "stage": nxt}
    return [(new.id, new.kind)] if new.status == JobStatus.QUEUED else []


# -- cancel -------------------------------------------------------------------------------------
def release_job(session: Session, job_id: int, worker: str) -> str | None:
    """Give a running job back to the queue on a clean shutdown, so another worker resumes it
    at once instead of waiting for the lease to expire. A job being cancelled is finished as
    cancelled instead. Returns the new status, or None when ``worker`` no longer holds the job."""
    job = get_job(session, job_id, lock=True)
    if job.worker != worker or job.status in TERMINAL_STATUSES:
        return None
    if job.status == JobStatus.CANCELLING:
        _set_status(session, job, JobStatus.CANCELLED)
        return job.status
    _set_status(session, job, JobStatus.QUEUED)
    job.worker, job.heartbeat_at = None, None
    job.progress = {**(job.progress or {}), "released_by": worker}
    return job.status


def cancel_job(session: Session, job_id: int) -> Job:
    """Request cancellation; idempotent.

    queued -> cancelled at once (no worker holds it; a mine task already in the broker will find it
    cancelled and do nothing). running -> cancelling with ``cancel_requested``: the worker stops
    between batches and finishes as cancelled. A pipeline passes the request to its active stage.
    Raises InvalidTransition for a job that already succeeded or failed.
    """
    job = get_job(session, job_id, lock=True)
    if job.status == JobStatus.CANCELLED or job.status == JobStatus.CANCELLING:
        return job
    if job.status in TERMINAL_STATUSES:
        raise InvalidTransition(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled")
    job.cancel_requested = True
    if job.kind == "pipeline" and job.parent_id is None:
        _set_status(session, job, JobStatus.CANCELLING)
        active = [c for c in children(session, job.id) if c.status not in TERMINAL_STATUSES]
        for c in active:
            cancel_job(session, c.id)  # a queued child is cancelled at once and finishes the parent
        if not active:
            _set_status(session, job, JobStatus.CANCELLED)
        return job
    if job.status == JobStatus.QUEUED:
        _set_status(session, job, JobStatus.CANCELLED)
        if job.parent_id is not None:
            _advance_pipeline(session, job)
    else:
        _set_status(session, job, JobStatus.CANCELLING)
    return job


# -- stale jobs ---------------------------------------------------------------------------------
def reap_stale(session: Session, lease_s: float, max_attempts: int = 3) -> list[tuple[int, str]]:
    """Requeue or fail running jobs whose heartbeat is older than ``lease_s``.

    A worker that died (kill -9, lost host) stops heartbeating; its job is requeued so another
    worker resumes it (trainers from their last checkpoint, mine tasks idempotently), unless it
    already had ``max_attempts`` attempts: then it fails with an error saying so. A stale job that
    was cancelling is simply cancelled. Returns the requeued (job id, kind) pairs: dispatch them
    before the commit (``reap_and_dispatch``; mine jobs need a new task, pretrain/train are
    claimed from the table). Nothing is reaped within ``lease_s`` of the database's start.
    """
    # Heartbeats cannot be written while the database is down, so right after its server
    # (re)starts every running job looks stale, its worker alive or not. Reaping then requeued
    # live jobs (a trainer lost its job and resumed it from last.pt; a mining job's shards were
    # re-sent while still running) and spent one of ORL_MAX_ATTEMPTS per database restart. So
    # nothing is reaped within one lease of the server's start: live workers renew in that
    # time, and a worker that died is reaped one lease later.
    up_s = session.execute(select(func.extract("epoch", func.now() - func.pg_postmaster_start_time()))).scalar_one()
    if float(up_s) < lease_s:
        return []
    stale = list(session.execute(
        select(Job)
        .where(Job.status.in_(ACTIVE_STATUSES), Job.kind != "pipeline",
               func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at)
               < func.now() - timedelta(seconds=lease_s))
        .order_by(Job.id)
        .with_for_update(skip_locked=True)).scalars())
    requeued: list[tuple[int, str]] = []
    now = _now(session)
    for job in stale:
        session.refresh(job)
        last = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
        if job.status == JobStatus.CANCELLING:
            finish_job(session, job.id, JobStatus.CANCELLED)
            continue
        if job.attempts >= max_attempts:
            finish_job(session, job.id, JobStatus.FAILED, error=(
                f"worker {job.worker or '?'} stopped sending heartbeats (last {last}, lease {lease_s:g} s); "
                f"the job was tried {job.attempts} times, giving up after {max_attempts}"))
            continue
        _set_status(session, job, JobStatus.QUEUED, now)
        job.progress = {**(job.progress or {}), "requeued_after": f"worker {job.worker or '?'} silent since {last}"}
        job.worker = None
        job.heartbeat_at = None
        requeued.append((job.id, job.kind))
    return requeued


# -- committing helpers -------------------------------------------------------------------------
def reap_and_dispatch(lease_s: float, max_attempts: int = 3) -> list[tuple[int, str]]:
    """``reap_stale`` and the re-sending of requeued mine jobs, in one transaction.

    The tasks are sent BEFORE the commit, as the miner's phase changes are: when the broker is
    down the send raises, the transaction rolls back, and the jobs stay running and stale for
    the next round. Sent after the commit, a failed send left a mine job queued with no task,
    which nothing ever re-sends (queued forever). A worker that gets the task before the commit
    waits for it on the row lock (``start_job``).
    """
    with session_scope() as s:
        requeued = reap_stale(s, lease_s, max_attempts)
        broker.dispatch_all(requeued)
    return requeued
