"""Datasets: register a folder under a data root, rescan it, read its counts and images."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.api import cursors
from services.api.deps import DatasetId, SessionDep, SettingsDep, WriteAccess
from services.api.lookups import dataset_or_404
from services.api.schemas import Counts, DatasetCreate, DatasetOut, ImageOut, Page, ScanOut
from services.common.datasets import PathRefused, dataset_counts, resolve_dataset_path, scan_dataset
from services.common.models import Dataset, Image

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

MAX_PAGE = 500


def _out(session, ds: Dataset, scan=None) -> DatasetOut:
    out = DatasetOut.model_validate(ds)
    out.counts = Counts(**dataset_counts(session, ds.id))
    if scan is not None:
        out.scan = ScanOut(found=scan.found, added=scan.added, added_failed=scan.added_failed)
    return out


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut, dependencies=[WriteAccess],
             summary="Register a folder of images (or rescan it, if already registered under this name)",
             responses={200: {"description": "already registered with this path: rescanned, new images added"},
                        400: {"description": "path refused"}, 409: {"description": "name taken by another folder"}})
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
    else:
        response.status_code = status.HTTP_200_OK
    scan = scan_dataset(session, ds)
    session.commit()
    return _out(session, ds, scan)


@router.get("", response_model=Page[DatasetOut], summary="Datasets, oldest first (without counts)")
def list_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 100,
    cursor: str | None = None,
) -> Page[DatasetOut]:
    rows, nxt = cursors.id_page(session, select(Dataset), Dataset.id, {}, limit, cursor)
    return Page[DatasetOut](items=[DatasetOut.model_validate(d) for d in rows], next_cursor=nxt,
                            total=cursors.count(session, Dataset, []))


@router.get("/{dataset_id}", response_model=DatasetOut, summary="A dataset and its counts")
def get_dataset(dataset_id: DatasetId, session: SessionDep) -> DatasetOut:
    return _out(session, dataset_or_404(session, dataset_id))


@router.post("/{dataset_id}/rescan", response_model=DatasetOut, dependencies=[WriteAccess],
             summary="Record images added to the folder since the last scan",
             responses={403: {"description": "the folder now leads outside the data roots; it is not read"},
                        409: {"description": "the folder is gone"}})
def rescan_dataset(dataset_id: DatasetId, session: SessionDep, settings: SettingsDep) -> DatasetOut:
    ds = dataset_or_404(session, dataset_id)
    try:
        # The folder is checked against today's data roots before anything in it is listed.
        scan = scan_dataset(session, ds, roots=settings.data_root_paths)
    except PathRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"dataset {dataset_id}: {exc}") from None
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the dataset folder is gone: {exc}") from None
    session.commit()
    return _out(session, ds, scan)


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
