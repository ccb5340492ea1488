"""Dispatch: how a job gets to whoever runs it, through the sending Celery app of
``services.common.runtime``.

Tasks are sent by name (``MINE_TASK``), so the API and the trainer never import the miner package
(services import only ``services.common``); the miner's tasks and routes use the same names.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from services.common.runtime import get_celery

MINE_TASK = "miner.start_mine"
MINE_QUEUE = "gpu"
# An embedding_map job starts on gpu (it embeds images that lack an embedding under the
# checkpoint) and lays out the map on cpu (services/miner/embedding_map.py).
MAP_TASK = "miner.map_embed"
MAP_QUEUE = "gpu"
# A register job (POST /datasets, /rescan) lists the folder and checksums new files: disk and
# CPU work, on the cpu queue (services/miner/registration.py).
REGISTER_TASK = "miner.register_dataset"
REGISTER_QUEUE = "cpu"


def check_broker(timeout_s: float = 2.0) -> None:
    """Raise if the broker cannot be reached within ``timeout_s``."""
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)


def send_mine(job_id: int, app: Celery | None = None) -> None:
    """Start a mining job: its first task fans the rest out (docs/SERVICES.md, Job flow).

    ``app``: the app to send with; default the process's sending app (the miner's worker process
    passes its own, already connected one).
    """
    (app or get_celery()).send_task(MINE_TASK, args=[int(job_id)], queue=MINE_QUEUE)


def send_map(job_id: int, app: Celery | None = None) -> None:
    """Start an embedding_map job (its first task sends the layout task)."""
    (app or get_celery()).send_task(MAP_TASK, args=[int(job_id)], queue=MAP_QUEUE)


def send_register(job_id: int, app: Celery | None = None) -> None:
    """Start a register job (it re-sends itself to continue a very large folder)."""
    (app or get_celery()).send_task(REGISTER_TASK, args=[int(job_id)], queue=REGISTER_QUEUE)


def dispatch(job_id: int, kind: str, app: Celery | None = None) -> None:
    """Hand a queued job to whoever runs it.

    mine, embedding_map -> a Celery task on the gpu queue; register -> one on the cpu queue.
    pretrain/train -> nothing: a trainer process claims
    queued rows itself (``jobs.claim_job``). pipeline -> nothing: its children are dispatched.
    Call it AFTER the transaction that created or requeued the job committed, so the worker finds
    the row.
    """
    if kind == "mine":
        send_mine(job_id, app)
    elif kind == "embedding_map":
        send_map(job_id, app)
    elif kind == "register":
        send_register(job_id, app)


def dispatch_all(pairs: Iterable[tuple[int, str]], app: Celery | None = None) -> None:
    """``dispatch`` each (job id, kind), e.g. what ``jobs.create_job`` or ``jobs.reap_stale`` returned."""
    for job_id, kind in pairs:
        dispatch(job_id, kind, app)
