"""How a miner worker spends the cores it is given: one ``orl.device.ThreadPlan`` per process.

The whole worker gets ``ORL_WORKER_CORES`` (default: its CPU affinity). The cpu worker's prefork
pool runs ``ORL_CPU_CONCURRENCY`` processes (default ``min(2, cores)``: two shards, or a shard and
an embedding-map layout, at once), and each of them gets ``cores // processes`` for its torch and
BLAS threads and its selective-search subprocesses (``ORL_SS_PROCESSES`` per shard, at most that
share). A solo-pool (gpu) worker runs its tasks in its main process, with every core given.
So no setting or command-line ``--concurrency`` makes the worker's processes outnumber its cores.

celery_app.py calls :func:`configure_process` in every process that runs tasks (the
``worker_process_init`` signal), and the pipeline reads :func:`current`.
"""

from __future__ import annotations

import logging
import os

from orl.device import ThreadPlan, apply_threads, available_cores, plan_threads
from services.common.settings import Settings, get_settings

log = logging.getLogger(__name__)

_process_plan: ThreadPlan | None = None
_main_pid: int | None = None
_pool_processes: int | None = None


class ThreadSettingsError(ValueError):
    """The thread settings cannot be met; the message names the settings to change."""


def worker_plan(settings: Settings) -> ThreadPlan:
    """The plan for the whole worker from its settings. Raises ThreadSettingsError naming them."""
    cores = settings.worker_cores or available_cores()
    processes = settings.cpu_concurrency or min(2, cores)
    if processes > cores:
        raise ThreadSettingsError(f"ORL_CPU_CONCURRENCY={processes} pool processes for {cores} cores "
                                  f"(ORL_WORKER_CORES, default: the CPUs this worker may run on): lower it to "
                                  f"at most {cores}, or give the worker more cores")
    share = cores // processes
    if settings.ss_processes is not None and settings.ss_processes > share:
        raise ThreadSettingsError(f"ORL_SS_PROCESSES={settings.ss_processes} selective-search processes per shard "
                                  f"with {processes} pool processes on {cores} cores leaves {share} core(s) each: "
                                  f"lower ORL_SS_PROCESSES to at most {share} or ORL_CPU_CONCURRENCY")
    return plan_threads(cores, processes, settings.ss_processes)


def record_worker(concurrency: object) -> None:
    """In the worker's main process, before its pool starts: remember which process it is and how
    many pool processes the command line gave (``--concurrency`` overrides the setting)."""
    global _main_pid, _pool_processes
    _main_pid = os.getpid()
    try:
        _pool_processes = int(concurrency)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        _pool_processes = None


def configure_process() -> ThreadPlan:
    """Apply this process's share (torch, BLAS) and remember it for :func:`current`."""
    global _process_plan
    settings = get_settings()
    whole = worker_plan(settings)
    if _main_pid is not None and os.getpid() == _main_pid:
        processes = 1  # the solo pool: tasks run here, one at a time
    else:
        processes = _pool_processes or whole.processes
        if processes > whole.cores:
            log.warning("--concurrency %d is more than the %d cores given (ORL_WORKER_CORES): each process "
                        "gets one thread", processes, whole.cores)
            processes = whole.cores
    _process_plan = plan_threads(whole.cores, processes, settings.ss_processes)
    apply_threads(_process_plan)
    log.info("miner process %d: %s", os.getpid(), _process_plan.to_dict())
    return _process_plan


def current() -> ThreadPlan:
    """This process's plan (outside a Celery worker: the settings' plan for one process)."""
    if _process_plan is not None:
        return _process_plan
    whole = worker_plan(get_settings())
    return plan_threads(whole.cores, 1, get_settings().ss_processes)
