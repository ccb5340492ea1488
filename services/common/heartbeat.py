"""The heartbeat of a job while a worker works on it: a thread that renews the job's lease.

A thread, because one step of the work (an image of selective search, an embedding batch, a
training step on a slow machine) may take longer than the heartbeat period, and the stale-job
reaper must not take a job that is making progress. Used by the miner's tasks and the trainer::

    with Heartbeat(job_id, settings.heartbeat_s, worker=name) as beat:
        ...
        beat.report(done=step, total=steps, progress={"loss": 0.3})   # never waits on the database
        if beat.should_stop: ...

Every ``period_s`` (and soon after a ``report``, at most every ``min_interval_s``) it calls
``jobs.heartbeat`` in its own transaction with the latest report. The answer sets ``cancel`` (a
cancel was requested) or ``lost`` (the job was requeued or finished by someone else: stop and
write nothing more). A failed beat (the database briefly away) is logged; the next one retries.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.common import jobs
from services.common.db import session_scope

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, job_id: int, period_s: float, *, worker: str | None = None, min_interval_s: float = 0.5):
        self.job_id, self.period_s, self.worker, self.min_interval_s = job_id, period_s, worker, min_interval_s
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._latest: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_write = 0.0
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    @property
    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set()

    def report(self, *, done: int | None = None, total: int | None = None,
               progress: dict[str, Any] | None = None) -> None:
        """Progress for the next beat (``jobs.heartbeat``'s progress_done / progress_total / progress)."""
        with self._lock:
            self._latest = {"progress_done": done, "progress_total": total, "progress": progress}
        self._wake.set()

    def _beat(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
        with session_scope() as s:
            answer = jobs.heartbeat(s, self.job_id, self.worker, **(latest or {}))
        self._last_write = time.monotonic()
        if answer == jobs.Lease.CANCEL:
            self.cancel.set()
        elif answer == jobs.Lease.LOST:
            self.lost.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            woke = self._wake.wait(self.period_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            wait = self.min_interval_s - (time.monotonic() - self._last_write)
            if woke and wait > 0:  # progress rows are written at most every min_interval_s
                self._stop.wait(wait)
            try:
                self._beat()
            except Exception:  # the database may be briefly away: the next beat retries
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)

    def flush(self) -> None:
        """Write the latest report now (at the end of the work)."""
        try:
            self._beat()
        except Exception:
            log.warning("final progress of job %s not written", self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
