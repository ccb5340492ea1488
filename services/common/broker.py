"""The Celery app used to SEND tasks, and the dispatch of a job to whoever runs it.

Tasks are sent by name (``send_task("miner.start_mine", ...)``), so the API and the trainer never
import the miner package (services import only ``services.common``). The miner's own worker app
can start from ``celery_config()`` so both ends agree on the transport options.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from services.common.settings import Settings, get_settings

MINE_TASK = "miner.start_mine"
MINE_QUEUE = "gpu"

_app: Celery | None = None


def celery_config(settings: Settings) -> dict[str, Any]:
    """Options both the sending side and the workers use (see the service conventions)."""
    return {
        "broker_url": settings.broker_url,
        # Unacked tasks come back after this long; it must exceed the longest task.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Job state lives in the database; Celery results would only duplicate it.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_celery(settings: Settings | None = None, name: str = "orl") -> Celery:
    settings = settings or get_settings()
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


def get_celery() -> Celery:
    """The process-wide sending app, built from settings on first use."""
    global _app
    if _app is None:
        _app = make_celery()
    return _app


def reset_celery() -> None:
    global _app
    if _app is not None:
        _app.close()
    _app = None


def check_broker(timeout_s: float = 2.0) -> None:
    """Raise if the broker cannot be reached within ``timeout_s``."""
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)


def send_mine(job_id: int) -> None:
    """Start a mining job: its first task fans the rest out (docs/SERVICES.md, Job flow)."""
    get_celery().send_task(MINE_TASK, args=[int(job_id)], queue=MINE_QUEUE)


def dispatch(job_id: int, kind: str) -> None:
    """Hand a queued job to whoever runs it.

    mine -> a Celery task on the gpu queue. pretrain/train -> nothing: a trainer process claims
    queued rows itself (``jobs.claim``). pipeline -> nothing: its children are dispatched.
    Call it AFTER the transaction that created the job committed, so the worker finds the row.
    """
    if kind == "mine":
        send_mine(job_id)
