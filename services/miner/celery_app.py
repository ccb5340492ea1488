"""The miner's Celery worker app: queues ``cpu`` (selective search, embedding-map layouts, dataset
registration) and ``gpu`` (embeddings, KNN, RoI features, pairs).

Start workers with (docs/SERVICES.md, "Commands")::

    celery -A services.miner.celery_app worker -Q cpu --prefetch-multiplier 1 -n cpu@%h
    celery -A services.miner.celery_app worker -Q gpu --pool solo -n gpu@%h

(or one worker on both queues, ``-Q cpu,gpu``, on a small machine). Configuration comes from
``ORL_*`` settings, read when the worker first needs it, not at import time: the shared options
of ``services.common.runtime.celery_config`` (acks late, reject on worker lost, prefetch 1, the
broker visibility timeout) plus the queues, routes and time limits below, and the pool size
(``ORL_CPU_CONCURRENCY``; threads.py decides it with the per-process threads and
selective-search processes, from ``ORL_WORKER_CORES``).

Every worker also runs, in a thread of its main process, the stale-job reaper
(``services.common.jobs.reap_stale``), so a job whose worker vanished is requeued (and its mining
re-sent) or failed even where no trainer runs, and the keep-alive of mining jobs whose tasks wait
in the queues (``keepalive.py``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals
from kombu import Queue

from services.common.broker import MAP_QUEUE, MAP_TASK, MINE_QUEUE, MINE_TASK, REGISTER_QUEUE, REGISTER_TASK
from services.common.runtime import celery_config
from services.common.settings import Settings, get_settings
from services.miner import threads

log = logging.getLogger(__name__)

QUEUES = ("cpu", "gpu")
ROUTES = {
    MINE_TASK: MINE_QUEUE,  # docs/SERVICES.md: the API sends it to gpu (a light task)
    "miner.propose_shard": "cpu",
    "miner.embed_knn": "gpu",
    "miner.pairs_shard": "gpu",
    MAP_TASK: MAP_QUEUE,  # embedding_map: embeddings the checkpoint lacks (services/miner/embedding_map.py)
    "miner.map_layout": "cpu",  # then UMAP / PCA, which needs no accelerator
    REGISTER_TASK: REGISTER_QUEUE,  # a dataset folder's listing and checksums (services/miner/registration.py)
}


def worker_config(settings: Settings) -> dict[str, Any]:
    conf = celery_config(settings)
    vt = settings.visibility_timeout_s
    conf["broker_transport_options"] = {
        **conf.get("broker_transport_options", {}),
        # kombu sweeps for unacked messages older than the visibility timeout every
        # interval * throttle seconds (default 100 s): scale it with the timeout, so a task
        # of a killed worker comes back within about 1.2x the timeout.
        "unacked_restore_interval": max(1, min(60, vt // 5)),
        "unacked_restore_throttle": 1,
    }
    conf.update(
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_routes={name: {"queue": q, "routing_key": q} for name, q in ROUTES.items()},
        # A task that outlives the visibility timeout is redelivered while it still runs, so the
        # limits sit below it (but never below 2 minutes: tests use timeouts of seconds).
        # The solo pool cannot enforce limits; shards are sized to finish well inside them.
        task_soft_time_limit=max(120, int(vt * 0.8)),
        task_time_limit=max(150, int(vt * 0.9)),
        # With acks late, a task running when the broker connection drops is redelivered anyway;
        # cancelling it avoids two copies running at once.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=False,
        # The prefork pool's size (a command-line --concurrency overrides it); the solo pool ignores it.
        worker_concurrency=threads.worker_plan(settings).processes,
    )
    return conf


app = Celery("orl-miner", include=["services.miner.tasks"])
# A callable is evaluated on first use of app.conf, i.e. after the environment is final.
app.add_defaults(lambda: worker_config(get_settings()))


# -- stale-job reaper and keep-alive -------------------------------------------------------------
def reap_once(engine) -> list[tuple[int, str]]:
    """Renew mine jobs waiting in the queues (keepalive.py), then requeue or fail stale jobs."""
    from sqlalchemy.orm import Session

    from services.common import broker, jobs
    from services.miner.keepalive import waiting_job_ids

    settings = get_settings()
    try:
        waiting = waiting_job_ids(settings.broker_url, QUEUES, recent_s=settings.lease_s)
    except Exception:  # the broker may be briefly away; reaping still proceeds
        log.warning("cannot list queued tasks", exc_info=True)
        waiting = set()
    with Session(engine) as s, s.begin():
        jobs.keep_alive(s, waiting)
    with Session(engine) as s, s.begin():
        requeued = jobs.reap_stale(s, settings.lease_s, settings.max_attempts)
        # Sent before the commit, as jobs.reap_and_dispatch does (with this worker's connection):
        # a broker that is down rolls the requeue back instead of leaving a job queued that no
        # task will ever start.
        broker.dispatch_all(requeued, app)
    for job_id, kind in requeued:
        log.warning("job %s (%s) had a stale heartbeat: requeued", job_id, kind)
    return requeued


def _reap_forever(stop: threading.Event) -> None:
    from sqlalchemy.pool import NullPool

    from services.common.runtime import make_engine

    settings = get_settings()
    # Its own engine without a pool: the prefork pool forks this process after the thread
    # starts, and a child must not inherit open database connections.
    engine = make_engine(settings, poolclass=NullPool)
    # A third of the lease: the keep-alive must renew waiting jobs before any reaper (trainers
    # run one too) finds them stale.
    period = max(0.5, min(settings.lease_s / 3, 60.0))
    while not stop.wait(period):
        try:
            reap_once(engine)
        except Exception:  # the database may be briefly away; the next round retries
            log.warning("stale-job reaper round failed", exc_info=True)


_reaper_stop = threading.Event()


@signals.worker_init.connect
def _record_worker(sender: Any = None, **_: Any) -> None:
    threads.record_worker(getattr(sender, "concurrency", None))


@signals.worker_process_init.connect
def _configure_threads(**_: Any) -> None:
    # Every process that runs tasks: prefork children, or the main process of the solo pool.
    threads.configure_process()


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    threading.Thread(target=_reap_forever, args=(_reaper_stop,), name="orl-reaper", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    _reaper_stop.set()
