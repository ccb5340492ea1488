"""Images: metadata, stored KNN neighbours, and server-rendered thumbnails, crops and attention overlays."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from sqlalchemy import exists, func, or_, select

from orl.images import ImageError
from services.api import cursors, imaging, lookups
from services.api.deps import ImageId, SessionDep, SettingsDep, id_query
from services.api.schemas import ImageOut, NeighborOut, NeighborPage
from services.common import thumbnails
from services.common.artifacts import artifact_file
from services.common.models import Dataset, Image, Job, Neighbor, RoiPair
from services.common.paths import PathRefused, image_file

router = APIRouter(prefix="/api/v1/images", tags=["images"])

MAX_NEIGHBORS_PAGE = 200

# Rendered bytes depend only on the file's content (checksum) and the request parameters, so a
# client may keep them for a day; the ETag lets it revalidate cheaply after that.
CACHE_CONTROL = "public, max-age=86400"
# A thumbnail requested with the image's checksum names one content for good (the stored file is
# keyed by it and checked against it when rendered): a client may keep it without ever asking again.
IMMUTABLE = "public, max-age=31536000, immutable"
JPEG: dict[int | str, dict] = {200: {"content": {"image/jpeg": {}}, "description": "the image"}}
PNG: dict[int | str, dict] = {200: {"content": {"image/png": {}}, "description": "the overlay"}}
IMAGE_RESPONSES = {304: {"description": "not modified (If-None-Match)"},
                   403: {"description": "the file (image, or checkpoint) leads outside the data roots or the artifacts "
                                        "volume; it is not read"},
                   404: {"description": "no such image"}, 409: {"description": "the image is unreadable"},
                   410: {"description": "the file (image, or checkpoint) is gone"}}


def _image_and_file(session, settings, image_id: int) -> tuple[Image, Path]:
    img = lookups.image_or_404(session, image_id)
    if img.status != "ok":
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"image {image_id} ({img.rel_path}) is unreadable: {img.reason}")
    ds = session.get(Dataset, img.dataset_id)
    try:
        path = image_file(ds.path, img.rel_path, settings.data_root_paths)
    except PathRefused as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"image file {img.rel_path} was removed from {ds.path}")
    return img, path


def _etag(img: Image, *parts: object) -> str:
    h = hashlib.sha1("|".join([img.checksum or str(img.id), *map(str, parts)]).encode()).hexdigest()[:20]
    return f'"{h}"'


def _not_modified(if_none_match: str | None, etag: str) -> bool:
    return if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]


def _send(body: bytes, media_type: str, etag: str, extra: dict[str, str] | None = None) -> Response:
    return Response(body, media_type=media_type,
                    headers={"Cache-Control": CACHE_CONTROL, "ETag": etag, **(extra or {})})


def _unreadable(img: Image, exc: Exception) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, f"image {img.id} ({img.rel_path}) cannot be decoded: {exc}")


@router.get("/{image_id}", response_model=ImageOut, summary="Image metadata")
def get_image(image_id: ImageId, session: SessionDep) -> ImageOut:
    return ImageOut.model_validate(lookups.image_or_404(session, image_id))


def _knn_job(session, img: Image, checkpoint_id: int | None, job_id: int | None) -> Job:
    """The mining job whose stored KNN answers for ``img``: the given one, else the newest
    (succeeded ones first) that covered the image, with ``checkpoint_id`` when given."""
    if job_id is not None:
        job = session.get(Job, lookups.mine_job_id(session, job_id))
        used = lookups.mine_checkpoint_id(job)
        if checkpoint_id is not None and used != checkpoint_id:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"mining job {job.id} embedded with checkpoint {used}, not {checkpoint_id}; "
                                "give job_id or checkpoint_id, or a matching pair")
        return job
    covered = exists().where(Neighbor.job_id == Job.id, Neighbor.image_id == img.id)
    stmt = select(Job).where(Job.kind == "mine", Job.dataset_id == img.dataset_id, covered)
    if checkpoint_id is not None:
        ckpt = Job.result[("plan", "checkpoint_id")].astext
        stmt = stmt.where(func.coalesce(ckpt, Job.params["checkpoint_id"].astext) == str(checkpoint_id))
    job = session.execute(stmt.order_by((Job.status == "succeeded").desc(), Job.id.desc()).limit(1)).scalar()
    if job is None:
        under = f" under checkpoint {checkpoint_id}" if checkpoint_id is not None else ""
        hint = (f"mine the dataset with params.checkpoint_id={checkpoint_id}, or omit checkpoint_id for the newest "
                "mining job that covered it" if checkpoint_id is not None else "submit a mine (or pipeline) job")
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"image {img.id} has no stored neighbours{under}: no mining job of dataset "
                            f"{img.dataset_id} covered it; {hint}")
    return job


@router.get("/{image_id}/neighbors", response_model=NeighborPage,
            summary="The image's K nearest images (stored by a mining job), with similarities and pair counts",
            responses={404: {"description": "no such image or checkpoint, or no mining job covered the image"},
                       **lookups.MINE_JOB_ERRORS})
def neighbors(
    image_id: ImageId,
    session: SessionDep,
    checkpoint_id: Annotated[int | None, id_query(
        "the checkpoint the KNN was computed with (default: the newest mining job that covered the image)")] = None,
    job_id: Annotated[int | None, id_query("a mine job (or pipeline) instead of a checkpoint")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_NEIGHBORS_PAGE,
                                description=f"page size, at most {MAX_NEIGHBORS_PAGE}")] = 50,
    cursor: str | None = None,
) -> NeighborPage:
    img = lookups.image_or_404(session, image_id)
    if checkpoint_id is not None:
        lookups.checkpoint_or_404(session, checkpoint_id)
    job = _knn_job(session, img, checkpoint_id, job_id)
    where = [Neighbor.job_id == job.id, Neighbor.image_id == image_id]
    total = cursors.count(session, Neighbor, where)
    if not total:  # only when the job was given: otherwise it was chosen for covering the image
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"mining job {job.id} stored no neighbours for image {image_id}: it has not reached its "
                            "KNN step, or the image is not among its images; omit job_id for a job that covered it")
    filters = {"image_id": image_id, "job_id": job.id}
    if cursor:
        (after,) = cursors.decode(cursor, filters, 1)
        where.append(Neighbor.rank > after)
    rows = session.execute(select(Neighbor, Image.rel_path, Image.width, Image.height)
                           .join(Image, Image.id == Neighbor.neighbor_image_id)
                           .where(*where).order_by(Neighbor.rank).limit(limit + 1)).all()
    nxt = cursors.encode([rows[limit - 1][0].rank], filters) if len(rows) > limit else None
    rows = rows[:limit]
    ids = [n.neighbor_image_id for n, *_ in rows]
    back = dict(session.execute(select(Neighbor.image_id, Neighbor.rank).where(
        Neighbor.job_id == job.id, Neighbor.neighbor_image_id == image_id, Neighbor.image_id.in_(ids))).all())
    counts = {(int(q), int(n)): int(c) for q, n, c in session.execute(
        select(RoiPair.image_id, RoiPair.neighbor_image_id, func.count())
        .where(RoiPair.job_id == job.id,
               or_((RoiPair.image_id == image_id) & RoiPair.neighbor_image_id.in_(ids),
                   (RoiPair.neighbor_image_id == image_id) & RoiPair.image_id.in_(ids)))
        .group_by(RoiPair.image_id, RoiPair.neighbor_image_id))}
    items = [NeighborOut(rank=n.rank, image_id=n.neighbor_image_id, similarity=n.similarity, rel_path=path,
                         width=w, height=h, rank_back=back.get(n.neighbor_image_id),
                         pairs_as_query=counts.get((image_id, n.neighbor_image_id), 0),
                         pairs_as_neighbor=counts.get((n.neighbor_image_id, image_id), 0))
             for n, path, w, h in rows]
    return NeighborPage(items=items, next_cursor=nxt, total=total, image_id=image_id, job_id=job.id,
                        checkpoint_id=lookups.mine_checkpoint_id(job))


@router.get("/{image_id}/thumbnail", response_class=Response, responses={**JPEG, **IMAGE_RESPONSES},
            summary="The whole image as a small JPEG (longer side <= size), rendered once and kept")
def thumbnail(image_id: ImageId, session: SessionDep, settings: SettingsDep,
              size: Annotated[int, Query(ge=16, le=imaging.MAX_RENDER_SIDE_PX)] = 256,
              checksum: Annotated[str | None, Query(
                  min_length=40, max_length=40, pattern="^[0-9a-f]{40}$",
                  description="the image's sha1 (GET /images/{id}): the answer is then cached as immutable")] = None,
              if_none_match: Annotated[str | None, Header()] = None) -> Response:
    img, path = _image_and_file(session, settings, image_id)
    if checksum is not None and checksum != img.checksum:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"image {image_id} has checksum {img.checksum}, not {checksum}; take the current one "
                            f"from GET /api/v1/images/{image_id}, or leave checksum out")
    if not img.checksum:
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"image {image_id} has no recorded checksum; register its folder again as a new dataset")
    etag = _etag(img, "thumb", size, thumbnails.RENDER_VERSION)
    cache = IMMUTABLE if checksum is not None else CACHE_CONTROL
    if _not_modified(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache})
    # The file rendered by mining (or by an earlier request); a missing one is rendered now.
    try:
        files = thumbnails.ensure(settings.artifacts_path, path, img.checksum, [size])
    except ImageError as exc:
        raise _unreadable(img, exc) from None
    except thumbnails.ContentChanged as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"image {image_id} ({img.rel_path}): {exc}") from None
    return Response(files[size].read_bytes(), media_type="image/jpeg",
                    headers={"Cache-Control": cache, "ETag": etag})


@router.get("/{image_id}/crop", response_class=Response,
            responses={**JPEG, **IMAGE_RESPONSES, 422: {"description": "bad box"}},
            summary="A box of the image as a JPEG (longer side = size)")
def crop(image_id: ImageId, session: SessionDep, settings: SettingsDep,
         box: Annotated[str, Query(description="x1,y1,x2,y2 in the image's pixels", examples=["10,20,110,220"])],
         size: Annotated[int, Query(ge=16, le=imaging.MAX_RENDER_SIDE_PX)] = 224,
         if_none_match: Annotated[str | None, Header()] = None) -> Response:
    try:
        xyxy = imaging.parse_box(box)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    img, path = _image_and_file(session, settings, image_id)
    etag = _etag(img, "crop", size, *xyxy)
    if _not_modified(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})
    try:
        body = imaging.crop_jpeg(path, xyxy, size, (img.width, img.height))
    except ImageError as exc:
        raise _unreadable(img, exc) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return _send(body, "image/jpeg", etag)


def checkpoint_file(session, settings, checkpoint_id: int) -> Path:
    art = lookups.checkpoint_or_404(session, checkpoint_id)
    try:
        p = artifact_file(art.path, settings.artifacts_path)
    except PathRefused:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"checkpoint {checkpoint_id}'s path leads outside ORL_ARTIFACTS_DIR; only files on the "
                            "artifacts volume are read") from None
    if not p.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"checkpoint {checkpoint_id}'s file {p} is missing")
    return p


@router.get("/{image_id}/attention", response_class=Response, responses={**PNG, **IMAGE_RESPONSES},
            summary="PNG: the image with a checkpoint's attention heat map blended over it")
def attention(image_id: ImageId, session: SessionDep, settings: SettingsDep,
                    checkpoint_id: Annotated[int, id_query("artifacts.id of a checkpoint")],
                    method: Literal["similarity", "contribution", "gradcam"] = "similarity",
                    opacity: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
                    size: Annotated[int, Query(ge=64, le=imaging.MAX_RENDER_SIDE_PX)] = 512,
                    if_none_match: Annotated[str | None, Header()] = None) -> Response:
    # A plain def: FastAPI runs it in its thread pool, so seconds of model work here do not block
    # the event loop and other requests.
    img, path = _image_and_file(session, settings, image_id)
    ckpt = checkpoint_file(session, settings, checkpoint_id)
    etag = _etag(img, "attention", checkpoint_id, ckpt.stat().st_mtime, method, opacity, size)
    if _not_modified(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})

    from orl.checkpoint import CheckpointError

    try:
        model = imaging.MODELS.get(ckpt)
    except CheckpointError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"checkpoint {checkpoint_id} cannot be loaded: {exc}") from None
    try:
        body, vmin, vmax = imaging.attention_png(model, path, method, opacity, size)
    except ImageError as exc:
        raise _unreadable(img, exc) from None
    return _send(body, "image/png", etag, {"X-Attention-Vmin": f"{vmin:.6g}", "X-Attention-Vmax": f"{vmax:.6g}",
                                           "X-Attention-Method": method})
