"""Datasets: where a folder may come from, how its images are recorded, and reading them safely.

The configured data roots (ORL_DATA_ROOTS) are the trust boundary. A dataset folder must resolve
(symlinks followed) to a folder inside one of them, and an image file must resolve to a file
inside its dataset's folder; nothing else is ever read. Those checks are
``services.common.paths`` (the one resolver); the API and the miner share this module.

Registration is a job (kind ``register``): POST /datasets and /rescan create it
(``request_registration``) and answer at once; a miner CPU worker lists the folder and records
the new files (services/miner/registration.py, with ``new_files`` and ``record_images`` here).
A dataset's status is read from its register jobs (``registrations``), never stored twice:
``ready`` once one succeeded (or when none ever ran: rows written by scripts and tests through
``scan_dataset``), ``registering`` while the first one is queued or running, ``incomplete`` when
it failed or was cancelled before any succeeded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from orl.images import ImageError, inspect_image, list_images
from services.common import jobs
from services.common.db import chunks, insert_ignore
from services.common.models import TERMINAL_STATUSES, Dataset, Image, Job, JobStatus, Proposal, RoiPair
from services.common.paths import PathRefused as PathRefused  # re-exported: callers catch it from here
from services.common.paths import resolve_user_path

REGISTER_KIND = "register"
DATASET_STATUSES = ("registering", "ready", "incomplete")

def resolve_dataset_path(raw: str, roots: list[Path], field: str = "path") -> Path:
    """The real folder of a user-given dataset path under the data roots, or PathRefused
    (``services.common.paths.resolve_user_path``)."""
    return resolve_user_path(raw, roots, field=field, noun="folder", folder=True)


def sha1_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def describe_image(base: Path, rel_path: str) -> dict:
    """One ``images`` row for a file: size, sha1, (width, height) from the header, status/reason.

    The directory entry and header decide (orl.images.inspect_image, no pixel decoded): a link
    out of the dataset folder, a non-regular file (a FIFO would block the checksum read), an
    empty or non-image file, too many pixels or too few are ``failed`` with the reason. An ok
    row's reason names the conversion decoding applies (grayscale, CMYK, alpha, 16-bit, EXIF
    rotation, first GIF frame), or is null. A file that decodes badly later (truncated) is
    recorded by the miner or the trainer when they first decode it.
    """
    row = dict(rel_path=rel_path, width=None, height=None, size_bytes=None, checksum=None, status="ok", reason=None)
    path = base / rel_path
    try:
        info = inspect_image(path, root=base)
    except ImageError as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    try:
        row["size_bytes"] = path.stat().st_size
        row["checksum"] = sha1_file(path)
    except OSError as exc:
        return {**row, "status": "failed", "reason": f"cannot read file: {exc.strerror or exc}"}
    return {**row, "width": info.width, "height": info.height, "reason": info.note or None}


@dataclass
class ScanResult:
    found: int  # image files in the folder now
    added: int  # rows inserted by this scan (new files)
    added_failed: int  # of which unreadable


def new_files(session: Session, dataset_id: int, files: Iterable[str]) -> list[str]:
    """Those of ``files`` (relative paths) that the dataset has no ``images`` row for, in order."""
    known = set(session.execute(select(Image.rel_path).where(Image.dataset_id == dataset_id)).scalars())
    return [f for f in files if f not in known]


def record_images(session: Session, dataset_id: int, base: Path, rel_paths: Sequence[str]) -> tuple[int, int]:
    """Describe each file (header, sha1: ``describe_image``) and insert its row; (added, of which failed).

    The insert ignores conflicts, so a file recorded meanwhile (a concurrent scan, a redelivered
    task) is written once. Does not commit.
    """
    if not rel_paths:
        return 0, 0
    rows = [{**describe_image(base, f), "dataset_id": dataset_id} for f in rel_paths]
    ins = insert_ignore(session, Image, rows, returning=["status"])
    return len(ins), sum(1 for (st,) in ins if st == "failed")


def scan_dataset(session: Session, dataset: Dataset, batch: int = 500) -> ScanResult:
    """Record every image file of the dataset folder not recorded yet, in this call; idempotent.

    Files already in ``images`` are not read again (a rescan only adds new ones), and the insert
    ignores conflicts, so two scans running at once insert each file once. Does not commit.
    The API does not call it (a large folder would hold the request for minutes): the register
    job does the same in committed batches with progress. A mining job's plan and scripts do.
    """
    base = Path(dataset.path)
    files = list_images(base)
    added = added_failed = 0
    for part in chunks(new_files(session, dataset.id, files), batch):
        n, n_failed = record_images(session, dataset.id, base, part)
        added += n
        added_failed += n_failed
    return ScanResult(found=len(files), added=added, added_failed=added_failed)


# -- registration jobs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registration:
    """Where a dataset's registration stands: its newest register job, and whether one succeeded."""

    job: Job | None
    succeeded_once: bool

    @property
    def status(self) -> str:
        if self.job is None or self.succeeded_once:
            return "ready"
        if self.job.status not in TERMINAL_STATUSES:
            return "registering"
        return "incomplete"

    def refusal(self, dataset_id: int) -> str | None:
        """Why a job may not run on the dataset yet (a message saying what to do), or None."""
        if self.status == "ready" or self.job is None:
            return None
        j = self.job
        if self.status == "registering":
            seen = f", {j.progress_done} of {j.progress_total} new files checksummed" if j.progress_total else ""
            return (f"dataset {dataset_id} is still being registered (job {j.id} {j.status}{seen}); submit the job "
                    f"once GET /api/v1/datasets/{dataset_id} says status 'ready'")
        why = f": {j.error}" if j.error else ""
        return (f"dataset {dataset_id} is not registered: its registration job {j.id} {j.status}{why}; "
                f"register it again (POST /api/v1/datasets/{dataset_id}/rescan), then submit the job")


def registrations(session: Session, dataset_ids: Sequence[int]) -> dict[int, Registration]:
    """The ``Registration`` of each of ``dataset_ids`` (two queries, whatever their number)."""
    ids = sorted(set(int(i) for i in dataset_ids))
    if not ids:
        return {}
    newest_ids = (select(func.max(Job.id)).where(Job.kind == REGISTER_KIND, Job.dataset_id.in_(ids))
                  .group_by(Job.dataset_id))
    newest = {j.dataset_id: j for j in session.execute(select(Job).where(Job.id.in_(newest_ids))).scalars()}
    ok = set(session.execute(select(Job.dataset_id).where(
        Job.kind == REGISTER_KIND, Job.dataset_id.in_(ids), Job.status == JobStatus.SUCCEEDED).distinct()).scalars())
    return {i: Registration(newest.get(i), i in ok) for i in ids}


def registration(session: Session, dataset_id: int) -> Registration:
    return registrations(session, [dataset_id])[dataset_id]


def request_registration(session: Session, dataset: Dataset) -> jobs.Created:
    """The dataset's register job: the one already queued or running, else a new one (queued).

    The dataset row is locked first, so concurrent requests for one dataset get one job; a
    register job is idempotent anyway (files are recorded once). Dispatch ``to_dispatch`` after
    commit (``broker.dispatch_all``): empty when the job already existed. Does not commit.
    """
    session.execute(select(Dataset.id).where(Dataset.id == dataset.id).with_for_update())
    active = session.execute(
        select(Job).where(Job.kind == REGISTER_KIND, Job.dataset_id == dataset.id,
                          Job.status.not_in(list(TERMINAL_STATUSES))).order_by(Job.id.desc()).limit(1)
    ).scalar_one_or_none()
    if active is not None:
        return jobs.Created(active, created=False)
    return jobs.create_job(session, kind=REGISTER_KIND, dataset_id=dataset.id, params={})


def dataset_counts(session: Session, dataset_id: int) -> dict[str, int]:
    """images, failed_images, proposals (boxes, all parameter sets), pairs (all mining jobs), jobs."""
    img = session.execute(
        select(func.count(), func.count().filter(Image.status == "failed")).where(Image.dataset_id == dataset_id)).one()
    n_props = session.execute(
        select(func.count()).select_from(Proposal).join(Image, Image.id == Proposal.image_id)
        .where(Image.dataset_id == dataset_id)).scalar_one()
    job_ids = select(Job.id).where(Job.dataset_id == dataset_id)
    n_pairs = session.execute(select(func.count()).select_from(RoiPair).where(RoiPair.job_id.in_(job_ids))).scalar_one()
    n_jobs = session.execute(select(func.count()).select_from(Job).where(Job.dataset_id == dataset_id)).scalar_one()
    return {"images": int(img[0]), "failed_images": int(img[1]), "proposals": int(n_props),
            "pairs": int(n_pairs), "jobs": int(n_jobs)}


def mark_images_failed(session: Session, dataset_id: int, reasons: dict[str, str]) -> int:
    """Set status 'failed' with the reason on the dataset's images named by rel_path (those
    skipped in training, for instance); returns how many rows changed. Does not commit."""
    n = 0
    for rel_path, reason in reasons.items():
        res = session.execute(update(Image).where(Image.dataset_id == dataset_id, Image.rel_path == rel_path,
                                                  Image.status == "ok").values(status="failed", reason=reason))
        n += res.rowcount or 0
    return n
