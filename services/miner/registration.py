"""What a ``register`` job's task does: record a dataset folder's image files (scan, then checksums).

POST /api/v1/datasets and POST /datasets/{id}/rescan create the job and answer at once
(``services.common.datasets.request_registration``); ``miner.register_dataset(job_id)`` on the
cpu queue does the work, in two steps that its progress reports::

    scan      list the folder (orl.images.iter_images): progress.scanned, every half second
    checksum  for each file without an ``images`` row: header and sha1 (datasets.describe_image),
              inserted in batches of BATCH_FILES, each batch one transaction with its progress
              (progress_done / progress_total = checksummed / to checksum, progress.failed:
              how many of them were refused, each row with its reason)

then the job succeeds with ``result = {found, added, added_failed}`` and the dataset is ``ready``.

Safe to run twice, like the mining tasks (pipeline.py's docstring): a file's row is written
through the (dataset_id, rel_path) key, so a redelivered or requeued task lists the folder again
and records only what is still missing. The counts are read from the rows, above the highest
image id the dataset had when the job first started (``result.image_max_id_before``), so a
redelivery reports the same numbers. Cancel is checked between batches (and every half second of
listing); what was recorded stays, and registering again goes on from there.

A task works for at most ``budget_s`` (half the task's soft time limit), then sends the job's
next task and ends: a folder of millions of photos is never cut off by the limit, and the queue
is not held for hours by one task.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import func, select

from orl.images import iter_images
from services.common import jobs
from services.common.datasets import REGISTER_KIND, new_files, record_images
from services.common.db import chunks, session_scope
from services.common.heartbeat import Heartbeat
from services.common.models import TERMINAL_STATUSES, Image, JobStatus
from services.common.paths import PathRefused, dataset_folder
from services.common.settings import get_settings
from services.miner import records
from services.miner.pipeline import Gate, Stop, finish, worker_name

log = logging.getLogger(__name__)

BATCH_FILES = 100  # files per transaction: progress and cancel granularity (a few seconds of big photos)
_REPORT_S = 0.5  # while listing: how often the scanned count is written (and cancel checked)


class RegisterError(RuntimeError):
    """The folder cannot be registered; the message (shown to the user) says what to change."""


class Dispatcher(Protocol):
    def register(self, job_id: int) -> None: ...


def register(job_id: int, budget_s: float, dispatcher: Dispatcher) -> None:
    """One task of a register job: list the folder, record new files until done or ``budget_s`` is spent."""
    t0 = time.monotonic()
    start = _start(job_id)
    if start is None:
        return
    dataset_id, base, before = start
    _check_root(dataset_id, base)
    gate = Gate(job_id)
    with Heartbeat(job_id, get_settings().heartbeat_s):
        files = sorted(_scan(job_id, base, gate))
        with session_scope() as s:
            todo = new_files(s, dataset_id, files)
            done, failed = _added(s, dataset_id, before)  # recorded by this job's earlier tasks
        total = done + len(todo)
        progress: dict[str, Any] = {"stage": "checksum", "scanned": len(files), "known": max(0, len(files) - total)}

        def report(s) -> None:
            jobs.set_progress(s, job_id, done=done, total=total,
                              progress={**progress, "checksummed": done, "failed": failed})

        with session_scope() as s:
            report(s)
        for i, part in enumerate(chunks(todo, BATCH_FILES)):
            gate.check()
            if i and time.monotonic() - t0 > budget_s:
                dispatcher.register(job_id)  # the rows so far are committed: the next task goes on from there
                log.info("job %s: %d of %d files checksummed, continued in a new task", job_id, done, total)
                return
            with session_scope() as s:
                _, n_failed = record_images(s, dataset_id, base, part)
                done, failed = done + len(part), failed + n_failed
                report(s)
    gate.check()
    _finish(job_id, dataset_id, before, len(files))


def _start(job_id: int) -> tuple[int, Path, int] | None:
    """Running the job: (dataset id, folder, image_max_id_before), or None when there is nothing to do."""
    with session_scope() as s:
        job = jobs.start_job(s, job_id, worker_name())
        if job is None:
            status = records.job_status(s, job_id)
        else:
            if job.kind != REGISTER_KIND:
                raise RegisterError(f"job {job_id} is a {job.kind} job, not a {REGISTER_KIND} job")
            ds = records.dataset(s, job.dataset_id)
            if ds is None:
                raise RegisterError(f"dataset {job.dataset_id} of job {job_id} does not exist")
            if "image_max_id_before" not in (job.result or {}):
                jobs.update_job(s, job, result={"image_max_id_before": records.max_image_id(s, ds.id)},
                                progress={"stage": "scan", "scanned": 0})
            return ds.id, Path(ds.path), int(job.result["image_max_id_before"])
    if status is not None and status[0] == JobStatus.CANCELLING:
        finish(job_id, JobStatus.CANCELLED)
    return None  # finished, or cancelled while it waited in the broker


def _check_root(dataset_id: int, base: Path) -> None:
    """The API checked the folder against its data roots; this worker checks against its own."""
    roots = get_settings().data_root_paths
    try:
        # Links followed (services.common.paths): a folder swapped for a link that leads out of
        # the roots after registration is refused before anything in it is listed or read.
        dataset_folder(base, roots)
    except PathRefused:
        raise RegisterError(f"dataset {dataset_id}'s folder {base} is not under this worker's data roots "
                            f"({', '.join(map(str, roots)) or 'none'}); give every worker the ORL_DATA_ROOTS "
                            "of the API") from None


def _scan(job_id: int, base: Path, gate: Gate) -> list[str]:
    """The folder's image files, reporting how many were seen every ``_REPORT_S``."""
    files: list[str] = []
    last = time.monotonic()
    try:
        for f in iter_images(base):
            files.append(f)
            if time.monotonic() - last > _REPORT_S:
                gate.check()
                with session_scope() as s:
                    jobs.set_progress(s, job_id, progress={"stage": "scan", "scanned": len(files)})
                last = time.monotonic()
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise RegisterError(f"the dataset folder cannot be listed: {exc}; restore it or register another "
                            "folder") from None
    return files


def _added(s, dataset_id: int, before: int) -> tuple[int, int]:
    """(rows, failed rows) this job recorded so far: the dataset's images above ``before``."""
    n, n_failed = s.execute(select(func.count(), func.count().filter(Image.status == "failed"))
                            .where(Image.dataset_id == dataset_id, Image.id > before)).one()
    return int(n), int(n_failed)


def _finish(job_id: int, dataset_id: int, before: int, found: int) -> None:
    with session_scope() as s:
        try:
            job = jobs.get_job(s, job_id, lock=True)
        except jobs.JobNotFound:
            raise Stop(f"job {job_id} no longer exists") from None
        if job.status in TERMINAL_STATUSES:
            return  # a copy of this task finished it first
        added, added_failed = _added(s, dataset_id, before)
        jobs.finish_job(s, job_id, JobStatus.SUCCEEDED,
                        result={**(job.result or {}), "found": found, "added": added, "added_failed": added_failed})
    log.info("job %s succeeded: %d files, %d new (%d unreadable)", job_id, found, added, added_failed)
