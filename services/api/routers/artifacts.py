"""Artifacts: every file a job left on the artifacts volume (checkpoints, torchvision backbones,
correspondence exports) and every backbone export made here, listed with its job, stage and
metrics, and downloaded as a stream.

Only files that resolve (symlinks followed) inside ORL_ARTIFACTS_DIR are ever served, whatever
path a row holds.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.responses import FileResponse
from sqlalchemy import select

from services.api import cursors
from services.api.deps import ArtifactId, OptionalId, SessionDep, SettingsDep, WriteAccess
from services.api.lookups import row_or_404
from services.api.schemas import ArtifactKind, ArtifactOut, ExportIn, JobRef, Page
from services.common.artifacts import artifact_file
from services.common.models import Artifact, Job
from services.common.paths import PathRefused

router = APIRouter(prefix="/api/v1/artifacts", tags=["artifacts"])

MAX_PAGE = 200
# What a download is sent as: the formats of the artifacts jobs write; anything else is bytes.
OCTETS = "application/octet-stream"
DOWNLOAD_TYPES = {".json": "application/json", ".csv": "text/csv"}


def _metrics(art: Artifact, job: Job | None) -> dict[str, Any]:
    meta = art.meta or {}
    if isinstance(meta.get("metrics"), dict):
        return meta["metrics"]
    if art.kind in ("checkpoint", "backbone") and job is not None:
        # The trainer reports its last logged values in the job's result summary.
        found = ((job.result or {}).get("summary") or {}).get("metrics")
        return found if isinstance(found, dict) else {}
    return {k: meta[k] for k in ("images", "pairs") if k in meta}


def _file(art: Artifact, root: Path) -> Path | None:
    """The real path (symlinks followed) of the artifact's file when it lies inside ``root``, else
    None (``artifact_file``, the one resolver). Containment is decided before existence, so a
    client never learns whether a file outside the artifacts volume exists."""
    try:
        return artifact_file(art.path, root)
    except PathRefused:
        return None


def _size(art: Artifact, root: Path) -> int | None:
    real = _file(art, root)
    return real.stat().st_size if real is not None and real.is_file() else None


def _out(art: Artifact, job: Job | None, root: Path) -> ArtifactOut:
    return ArtifactOut(
        id=art.id, kind=art.kind, stage=art.stage, dataset_id=art.dataset_id,
        job=JobRef(id=job.id, kind=job.kind, status=job.status) if job is not None else None,
        file_name=PurePath(art.path).name, size_bytes=_size(art, root), metrics=_metrics(art, job),
        meta={k: v for k, v in (art.meta or {}).items() if k != "config"}, created_at=art.created_at,
        download_url=f"/api/v1/artifacts/{art.id}/download")


@router.get("", response_model=Page[ArtifactOut], summary="Artifacts (checkpoints, backbones, exports), newest first")
def list_artifacts(
    session: SessionDep,
    settings: SettingsDep,
    dataset_id: OptionalId = None,
    job_id: OptionalId = None,
    kind: ArtifactKind | None = None,
    stage: Literal["byol", "orl"] | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 50,
    cursor: str | None = None,
) -> Page[ArtifactOut]:
    filters = {"dataset_id": dataset_id, "job_id": job_id, "kind": kind, "stage": stage}
    where = cursors.equal_to([(Artifact.dataset_id, dataset_id), (Artifact.job_id, job_id), (Artifact.kind, kind),
                              (Artifact.stage, stage)])
    rows, nxt = cursors.id_page(session, select(Artifact).where(*where), Artifact.id, filters, limit, cursor,
                                descending=True)
    job_ids = {a.job_id for a in rows if a.job_id is not None}
    jobs = {j.id: j for j in session.execute(select(Job).where(Job.id.in_(job_ids))).scalars()} if job_ids else {}
    root = settings.artifacts_path
    return Page[ArtifactOut](items=[_out(a, jobs.get(a.job_id), root) for a in rows], next_cursor=nxt,
                             total=cursors.count(session, Artifact, where))


@router.get("/{artifact_id}", response_model=ArtifactOut, summary="One artifact")
def get_artifact(artifact_id: ArtifactId, session: SessionDep, settings: SettingsDep) -> ArtifactOut:
    art = row_or_404(session, Artifact, artifact_id, "artifact", "/api/v1/artifacts")
    job = session.get(Job, art.job_id) if art.job_id is not None else None
    return _out(art, job, settings.artifacts_path)


@router.get("/{artifact_id}/download", response_class=FileResponse,
            summary="The artifact's file, streamed (ETag, Range); never a file outside ORL_ARTIFACTS_DIR",
            responses={200: {"content": {t: {} for t in sorted({*DOWNLOAD_TYPES.values(), OCTETS})}},
                       403: {"description": "the row's path leads outside the artifacts volume"},
                       404: {"description": "no such artifact"}, 410: {"description": "the file is gone"}})
def download(artifact_id: ArtifactId, session: SessionDep, settings: SettingsDep) -> FileResponse:
    art = row_or_404(session, Artifact, artifact_id, "artifact", "/api/v1/artifacts")
    root = settings.artifacts_path
    real = _file(art, root)
    if real is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"artifact {artifact_id}'s path leads outside ORL_ARTIFACTS_DIR; only files on the "
                            "artifacts volume are served")
    if not real.exists():
        raise HTTPException(status.HTTP_410_GONE,
                            f"artifact {artifact_id}'s file {art.path} is no longer on the artifacts volume")
    if not real.is_file():
        raise HTTPException(status.HTTP_409_CONFLICT, f"artifact {artifact_id} is a folder, not a file")
    # By suffix, from a fixed table: a guess from the system's table would call last.pt a
    # "application/vnd.snesdev-page-table".
    media = DOWNLOAD_TYPES.get(real.suffix.lower(), OCTETS)
    # Every checkpoint is called last.pt: the download name says which one it is.
    return FileResponse(real, media_type=media, filename=f"{art.kind}-{art.id}-{real.name}")


EXPORT_SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "torchvision": ".pth"}


def _export_path(checkpoint: Artifact, fmt: str) -> str:
    """Where the export of a checkpoint lives, relative to ORL_ARTIFACTS_DIR: one file per
    (checkpoint, format), named so that a download says what it is."""
    return f"exports/{checkpoint.id}/backbone-{checkpoint.stage or 'checkpoint'}{EXPORT_SUFFIX[fmt]}"


@router.post("/{artifact_id}/export", response_model=ArtifactOut, status_code=status.HTTP_201_CREATED,
             dependencies=[WriteAccess],
             summary="Export a checkpoint's backbone (TorchScript, ONNX or torchvision) as a new artifact",
             responses={200: {"description": "this checkpoint was exported to this format before: that artifact"},
                        404: {"description": "no such artifact"},
                        409: {"description": "the checkpoint's file is unreadable"},
                        410: {"description": "the checkpoint's file is gone"},
                        422: {"description": "not a checkpoint, or a bad format"}})
def export(artifact_id: ArtifactId, body: ExportIn, session: SessionDep, settings: SettingsDep,
           response: Response) -> ArtifactOut:
    # A plain def: FastAPI runs it in its thread pool, so the seconds of tracing do not block others.
    ckpt = row_or_404(session, Artifact, artifact_id, "artifact", "/api/v1/artifacts")
    if ckpt.kind != "checkpoint":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"artifact {artifact_id} is a {ckpt.kind}, not a checkpoint; export one of "
                            "GET /api/v1/artifacts?kind=checkpoint (its config rebuilds the backbone)")
    root = settings.artifacts_path
    src = _file(ckpt, root)
    if src is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"artifact {artifact_id}'s path leads outside ORL_ARTIFACTS_DIR")
    if not src.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"checkpoint {artifact_id}'s file {ckpt.path} is gone")
    # The checkpoint row's lock makes two exports of it one after another, so a repeated POST
    # finds the first one's row instead of writing a second.
    session.execute(select(Artifact.id).where(Artifact.id == ckpt.id).with_for_update())
    rel = _export_path(ckpt, body.format)
    done = session.execute(select(Artifact).where(Artifact.kind == "export", Artifact.path == rel)
                           .order_by(Artifact.id).limit(1)).scalar_one_or_none()
    job = session.get(Job, ckpt.job_id) if ckpt.job_id is not None else None
    # Reused only when made from the checkpoint file as it is now (a running training rewrites
    # last.pt) and at the same size; otherwise exported again under the same row.
    stamp = src.stat().st_mtime_ns
    prior = (done.meta or {}) if done is not None else {}
    if done is not None and (prior.get("input_size"), prior.get("source_mtime_ns")) == (body.input_size, stamp) \
            and (root / rel).is_file():
        response.status_code = status.HTTP_200_OK
        return _out(done, job, root)
    info = _write_export(src, root / rel, body, artifact_id)
    meta = {**info, "format": body.format, "input_size": body.input_size, "source_artifact_id": ckpt.id,
            "source_mtime_ns": stamp, "metrics": _metrics(ckpt, job)}
    if done is None:
        done = Artifact(job_id=ckpt.job_id, dataset_id=ckpt.dataset_id, kind="export", stage=ckpt.stage, path=rel,
                        meta=meta)
        session.add(done)
    else:  # the file was gone or stale, or another input size was asked for: the same row, a new file
        done.meta = meta
    session.commit()
    response.headers["Location"] = f"/api/v1/artifacts/{done.id}"
    return _out(done, job, root)


def _write_export(src: Path, out: Path, body: ExportIn, artifact_id: int) -> dict[str, Any]:
    from orl.checkpoint import CheckpointError, ExportError, export_backbone  # torch on first use only

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = export_backbone(src, out, body.format, input_size=body.input_size)
    except CheckpointError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"checkpoint {artifact_id} cannot be loaded: {exc}") from None
    except ExportError as exc:  # a missing optional package on the server (onnx)
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, f"this API server cannot export {body.format}: {exc}") \
            from None
    info.pop("path", None)  # absolute on this host; the row stores the relative path
    info.pop("format", None)
    return info
