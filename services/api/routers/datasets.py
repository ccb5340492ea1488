"""Datasets: register a folder under a data root, rescan it, read its counts and images.

Registering (and rescanning) is a job: the request checks the path, creates the dataset row and
a ``register`` job, and answers 202 at once; a miner CPU worker lists the folder and checksums
the new files (services/miner/registration.py), which takes minutes for a large folder. The
dataset's ``status`` and ``registration`` say how far it got; jobs on it are refused (409) until
its first registration succeeded.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.api import cursors
from services.api.deps import DatasetId, SessionDep, SettingsDep, WriteAccess
from services.api.dispatch import dispatch_or_503
from services.api.lookups import dataset_or_404
from services.api.schemas import Counts, DatasetCreate, DatasetOut, ImageOut, Page, RegistrationOut, ScanOut
from services.common.datasets import (
    PathRefused,
    Registration,
    dataset_counts,
    registrations,
    request_registration,
    resolve_dataset_path,
)
from services.common.models import Dataset, Image, JobStatus
from services.common.paths import dataset_folder

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

MAX_PAGE = 500
_ACCEPTED = {202: {"description": "registration job queued (or already under way): follow it at the Location, "
                                  "GET /api/v1/jobs/{id}; the dataset is usable once its status is ready"}}


def _out(session, ds: Dataset, reg: Registration, counts: bool = True) -> DatasetOut:
    out = DatasetOut.model_validate(ds)
    out.status = reg.status
    if (j := reg.job) is not None:
        out.registration = RegistrationOut(
            job_id=j.id, status=j.status, progress={**(j.progress or {}), "done": j.progress_done,
                                                    "total": j.progress_total},
            error=j.error, created_at=j.created_at, finished_at=j.finished_at)
        r = j.result or {}
        if j.status == JobStatus.SUCCEEDED and "found" in r:
            out.scan = ScanOut(found=r["found"], added=r["added"], added_failed=r["added_failed"])
    if counts:
        out.counts = Counts(**dataset_counts(session, ds.id))
    return out


def _register(session: Session, ds: Dataset, response: Response) -> DatasetOut:
    """Queue the dataset's register job (or find the one under way), commit, dispatch, answer."""
    created = request_registration(session, ds)
    # Read in the request's transaction: the answer shows what the request did, even when a fast
    # worker has already finished the job by the time it is sent.
    reg = registrations(session, [ds.id])[ds.id]
    session.commit()  # before dispatch: the worker must find the row
    dispatch_or_503(session, created.to_dispatch, what="the registration", retry="register again")
    response.status_code = status.HTTP_202_ACCEPTED
    response.headers["Location"] = f"/api/v1/jobs/{created.job.id}"
    return _out(session, ds, reg)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetOut, dependencies=[WriteAccess],
             summary="Register a folder of images (or rescan it, if already registered under this name): "
                     "answers at once, a registration job scans the folder",
             responses={**_ACCEPTED, 400: {"description": "path refused"},
                        409: {"description": "name taken by another folder"},
                        503: {"description": "the broker is unreachable"}})
def register_dataset(body: DatasetCreate, session: SessionDep, settings: SettingsDep, response: Response) -> DatasetOut:
    try:
        real = resolve_dataset_path(body.path, settings.data_root_paths, field="path")
    except PathRefused as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body field '{exc.field}': {exc.reason}") from None
    ds = session.execute(select(Dataset).where(Dataset.name == body.name)).scalar_one_or_none()
    if ds is not None and ds.path != str(real):
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"a dataset named {body.name!r} already exists for folder {ds.path}; choose another name")
    if ds is None:
        ds = Dataset(name=body.name, path=str(real))
        session.add(ds)
        try:
            session.flush()
        except IntegrityError:  # registered concurrently under the same name
            session.rollback()
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"a dataset named {body.name!r} was just registered; retry to rescan it") from None
    return _register(session, ds, response)


@router.get("", response_model=Page[DatasetOut], summary="Datasets, oldest first (without counts)")
def list_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 100,
    cursor: str | None = None,
) -> Page[DatasetOut]:
    rows, nxt = cursors.id_page(session, select(Dataset), Dataset.id, {}, limit, cursor)
    regs = registrations(session, [d.id for d in rows])
    return Page[DatasetOut](items=[_out(session, d, regs[d.id], counts=False) for d in rows], next_cursor=nxt,
                            total=cursors.count(session, Dataset, []))


@router.get("/{dataset_id}", response_model=DatasetOut, summary="A dataset: its status, registration and counts")
def get_dataset(dataset_id: DatasetId, session: SessionDep) -> DatasetOut:
    ds = dataset_or_404(session, dataset_id)
    return _out(session, ds, registrations(session, [ds.id])[ds.id])


@router.post("/{dataset_id}/rescan", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetOut,
             dependencies=[WriteAccess], summary="Record images added to the folder since the last scan "
                                                 "(answers at once, a registration job scans)",
             responses={**_ACCEPTED, 409: {"description": "the dataset folder is gone"},
                        403: {"description": "the folder now leads outside the data roots; it is not read"},
                        503: {"description": "the broker is unreachable"}})
def rescan_dataset(dataset_id: DatasetId, session: SessionDep, settings: SettingsDep, response: Response) -> DatasetOut:
    ds = dataset_or_404(session, dataset_id)
    try:
        # Checked against today's data roots, links followed, before a job would list the folder.
        folder = dataset_folder(ds.path, settings.data_root_paths)
    except PathRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"dataset {dataset_id}: {exc}") from None
    if not folder.is_dir():
        raise HTTPException(status.HTTP_409_CONFLICT, f"the dataset folder is gone: {ds.path} is not a folder "
                                                      "any more; restore it, or register the new folder")
    return _register(session, ds, response)


def _like_pattern(text: str) -> str:
    """``text`` as a literal substring for ILIKE (its own % and _ match only themselves)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@router.get("/{dataset_id}/images", response_model=Page[ImageOut],
            summary="A dataset's images, by id; ?name= finds them by file name, ?status=failed lists the "
                    "unreadable ones with reasons")
def list_images(
    dataset_id: DatasetId,
    session: SessionDep,
    status_: Annotated[Literal["ok", "failed"] | None, Query(alias="status")] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=200, description=(
        "part of the file's path relative to the dataset folder, any case (e.g. 000000000139 or train2017/)"))] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 50,
    cursor: str | None = None,
) -> Page[ImageOut]:
    dataset_or_404(session, dataset_id)
    filters = {"dataset_id": dataset_id, "status": status_, "name": name}
    where = [Image.dataset_id == dataset_id]
    if status_ is not None:
        where.append(Image.status == status_)
    if name is not None:
        where.append(Image.rel_path.ilike(_like_pattern(name), escape="\\"))
    rows, nxt = cursors.id_page(session, select(Image).where(*where), Image.id, filters, limit, cursor)
    return Page[ImageOut](items=[ImageOut.model_validate(r) for r in rows], next_cursor=nxt,
                          total=cursors.count(session, Image, where))
