"""Thin Celery tasks: job and image ids in, database rows out. The work is in ``pipeline``.

Task names and queues (``celery_app.ROUTES``): ``miner.start_mine(job_id)`` on gpu,
``miner.propose_shard(job_id, image_ids)`` on cpu, ``miner.embed_knn(job_id)`` on gpu,
``miner.pairs_shard(job_id, image_ids, shard=None)`` on gpu; for embedding_map jobs
``miner.map_embed(job_id)`` on gpu and ``miner.map_layout(job_id)`` on cpu; for register jobs
(POST /datasets) ``miner.register_dataset(job_id)`` on cpu. All are safe to redeliver (acks late +
reject on worker lost): see the pipeline, embedding_map and registration modules for why.

Errors: a transient database or broker error is retried a few times with backoff; anything else
fails the job with a message saying which step failed and why (the job row is what users see;
Celery's own task state is not kept).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import OperationalError as DatabaseError

from services.common.broker import MAP_TASK, MINE_TASK, REGISTER_TASK
from services.common.models import JobStatus
from services.miner import embedding_map, pipeline, registration
from services.miner.celery_app import app

log = logging.getLogger(__name__)

MAX_RETRIES = 3
_TRANSIENT = (DatabaseError, BrokerError, ConnectionError)


class CeleryDispatcher:
    """pipeline.Dispatcher over Celery: queues come from celery_app.ROUTES."""

    def start(self, job_id: int) -> None:
        start_mine.apply_async(args=[int(job_id)])

    def propose(self, job_id: int, image_ids: list[int]) -> None:
        propose_shard.apply_async(args=[int(job_id), [int(i) for i in image_ids]])

    def embed(self, job_id: int) -> None:
        embed_knn.apply_async(args=[int(job_id)])

    def pairs(self, job_id: int, image_ids: list[int], shard: int) -> None:
        pairs_shard.apply_async(args=[int(job_id), [int(i) for i in image_ids]], kwargs={"shard": int(shard)})

    def layout(self, job_id: int) -> None:
        map_layout.apply_async(args=[int(job_id)])

    def register(self, job_id: int) -> None:
        register_dataset.apply_async(args=[int(job_id)])


DISPATCHER = CeleryDispatcher()


def _run(task: Task, job_id: int, step: Callable[..., None], *args) -> dict:
    try:
        step(job_id, *args, DISPATCHER)
    except pipeline.Stop as exc:
        log.info("%s: %s", task.name, exc)
    except (pipeline.MineError, embedding_map.MapError, registration.RegisterError) as exc:
        pipeline.finish(job_id, JobStatus.FAILED, error=str(exc), dispatcher=DISPATCHER)
    except SoftTimeLimitExceeded:
        smaller = ("use method pca" if task.name.startswith("miner.map_") else
                   "a batch of files took too long (a slow or hanging disk?)" if task.name == REGISTER_TASK
                   else "lower ORL_SHARD_SIZE")
        pipeline.finish(job_id, JobStatus.FAILED, dispatcher=DISPATCHER, error=(
            f"{task.name} exceeded its time limit ({task.app.conf.task_soft_time_limit} s): {smaller} "
            "or raise ORL_VISIBILITY_TIMEOUT_S (the limits follow it)"))
    except _TRANSIENT as exc:
        if task.request.retries < MAX_RETRIES:
            log.warning("%s for job %s: transient error, retrying: %s", task.name, job_id, exc)
            raise task.retry(exc=exc, countdown=2 ** (task.request.retries + 1)) from exc
        pipeline.finish(job_id, JobStatus.FAILED, dispatcher=DISPATCHER,
                        error=f"{task.name} failed {MAX_RETRIES + 1} times: {type(exc).__name__}: {exc}")
    except Exception as exc:
        log.exception("%s for job %s failed", task.name, job_id)
        pipeline.finish(job_id, JobStatus.FAILED, dispatcher=DISPATCHER,
                        error=f"{task.name} failed: {type(exc).__name__}: {exc}")
    return {"job_id": job_id}


@app.task(name=MINE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def start_mine(self: Task, job_id: int) -> dict:
    """Plan the job (resolve params, register new files) and send what its phase needs."""
    return _run(self, int(job_id), pipeline.start_mine)


@app.task(name="miner.propose_shard", bind=True, acks_late=True, reject_on_worker_lost=True)
def propose_shard(self: Task, job_id: int, image_ids: list[int]) -> dict:
    """Selective search on images that lack proposals for the job's parameters."""
    return _run(self, int(job_id), pipeline.propose_shard, [int(i) for i in image_ids])


@app.task(name="miner.embed_knn", bind=True, acks_late=True, reject_on_worker_lost=True)
def embed_knn(self: Task, job_id: int) -> dict:
    """Embeddings of new images, KNN over the job's images, fan-out of pairs_shard."""
    return _run(self, int(job_id), pipeline.embed_knn)


@app.task(name="miner.pairs_shard", bind=True, acks_late=True, reject_on_worker_lost=True)
def pairs_shard(self: Task, job_id: int, image_ids: list[int], shard: int | None = None) -> dict:
    """RoI features (cached per image) and the top pairs of each (image, neighbour)."""
    return _run(self, int(job_id), pipeline.pairs_shard, [int(i) for i in image_ids], shard)


@app.task(name=MAP_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def map_embed(self: Task, job_id: int) -> dict:
    """An embedding_map job: plan, embed the images that lack an embedding, send map_layout."""
    return _run(self, int(job_id), embedding_map.start_map)


@app.task(name="miner.map_layout", bind=True, acks_late=True, reject_on_worker_lost=True)
def map_layout(self: Task, job_id: int) -> dict:
    """UMAP (or PCA) of the checkpoint's image embeddings; the points stored, the job finished."""
    return _run(self, int(job_id), embedding_map.layout_map)


@app.task(name=REGISTER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def register_dataset(self: Task, job_id: int) -> dict:
    """A register job: list the dataset folder, record the new files (header, sha1) in batches.

    It works for half the soft time limit at most, then sends itself again to go on."""
    budget_s = 0.5 * float(self.app.conf.task_soft_time_limit or 600)
    return _run(self, int(job_id), registration.register, budget_s)
