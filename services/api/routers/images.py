"""Images: metadata, and server-rendered thumbnails, crops and attention overlays."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response, status

from orl.images import ImageError
from services.api import imaging
from services.api.deps import SessionDep, SettingsDep
from services.api.schemas import ImageOut
from services.common.artifacts import artifact_file
from services.common.datasets import PathRefused, image_file
from services.common.models import Artifact, Dataset, Image

router = APIRouter(prefix="/api/v1/images", tags=["images"])

# Rendered bytes depend only on the file's content (checksum) and the request parameters, so a
# client may keep them for a day; the ETag lets it revalidate cheaply after that.
CACHE_CONTROL = "public, max-age=86400"
IMAGE_RESPONSES = {304: {"description": "not modified (If-None-Match)"},
                   404: {"description": "no such image"}, 409: {"description": "the image is unreadable"}}


def _image_and_file(session, settings, image_id: int) -> tuple[Image, Path]:
    img = session.get(Image, image_id)
    if img is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"image {image_id} does not exist")
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
def get_image(image_id: int, session: SessionDep) -> ImageOut:
    img = session.get(Image, image_id)
    if img is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"image {image_id} does not exist")
    return ImageOut.model_validate(img)


@router.get("/{image_id}/thumbnail", response_class=Response, responses=IMAGE_RESPONSES,
            summary="The whole image as a small JPEG (longer side <= size)")
def thumbnail(image_id: int, session: SessionDep, settings: SettingsDep,
              size: Annotated[int, Query(ge=16, le=imaging.MAX_RENDER_SIDE_PX)] = 256,
              if_none_match: Annotated[str | None, Header()] = None) -> Response:
    img, path = _image_and_file(session, settings, image_id)
    etag = _etag(img, "thumb", size)
    if _not_modified(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})
    try:
        body = imaging.thumbnail_jpeg(path, size)
    except ImageError as exc:
        raise _unreadable(img, exc) from None
    return _send(body, "image/jpeg", etag)


@router.get("/{image_id}/crop", response_class=Response, responses={**IMAGE_RESPONSES, 422: {"description": "bad box"}},
            summary="A box of the image as a JPEG (longer side = size)")
def crop(image_id: int, session: SessionDep, settings: SettingsDep,
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
        body = imaging.crop_jpeg(path, xyxy, size)
    except ImageError as exc:
        raise _unreadable(img, exc) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return _send(body, "image/jpeg", etag)


def checkpoint_file(session, settings, checkpoint_id: int) -> Path:
    art = session.get(Artifact, checkpoint_id)
    if art is None or art.kind != "checkpoint":
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"checkpoint {checkpoint_id} does not exist; list checkpoints with GET /api/v1/checkpoints")
    p = artifact_file(art.path, settings.artifacts_path)
    if not p.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"checkpoint {checkpoint_id}'s file {p} is missing")
    return p


@router.get("/{image_id}/attention", response_class=Response, responses=IMAGE_RESPONSES,
            summary="PNG: the image with a checkpoint's attention heat map blended over it")
def attention(image_id: int, session: SessionDep, settings: SettingsDep,
                    checkpoint_id: Annotated[int, Query(gt=0, description="artifacts.id of a checkpoint")],
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
