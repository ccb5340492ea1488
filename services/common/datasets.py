"""Datasets: how a registered folder's images are recorded, and their counts.

The configured data roots (ORL_DATA_ROOTS) are the trust boundary. A dataset folder must resolve
(symlinks followed) to a folder inside one of them, and an image file must resolve to a file
inside its dataset's folder; nothing else is ever read. Those checks are
``services.common.paths`` (the one resolver); the API and the miner share this module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from orl.images import ImageError, inspect_image, list_images
from services.common.db import chunks, insert_ignore
from services.common.models import Dataset, Image, Job, Proposal, RoiPair
from services.common.paths import PathRefused as PathRefused  # re-exported: callers catch it from here
from services.common.paths import dataset_folder, resolve_user_path


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


def scan_dataset(session: Session, dataset: Dataset, batch: int = 500,
                 roots: list[Path] | None = None) -> ScanResult:
    """Record every image file of the dataset folder not recorded yet; idempotent.

    Files already in ``images`` are not read again (a rescan only adds new ones), and the insert
    ignores conflicts, so two scans running at once insert each file once. With ``roots`` (the
    API's rescan), a folder that no longer lies under them, or was replaced by a link that leads
    out, is refused (PathRefused) before anything in it is listed. Does not commit.
    """
    base = Path(dataset.path) if roots is None else dataset_folder(dataset.path, roots)
    files = list_images(base)
    known = set(session.execute(select(Image.rel_path).where(Image.dataset_id == dataset.id)).scalars())
    new = [f for f in files if f not in known]
    added = added_failed = 0
    for part in chunks(new, batch):
        rows = [{**describe_image(base, f), "dataset_id": dataset.id} for f in part]
        ins = insert_ignore(session, Image, rows, returning=["status"])
        added += len(ins)
        added_failed += sum(1 for (st,) in ins if st == "failed")
    return ScanResult(found=len(files), added=added, added_failed=added_failed)


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
