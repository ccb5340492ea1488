"""Artifact rows (checkpoints, backbones, correspondence exports) and their files.

A row's ``path`` is relative to ORL_ARTIFACTS_DIR (or absolute), so hosts may mount the shared
artifacts volume anywhere; ``artifact_file`` turns it into a file on this host, and refuses one
that leads outside the volume (a ``..``, a symlink, an edited row): every reader of an artifact
goes through it, so no service reads a checkpoint from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orl.checkpoint import load_checkpoint
from orl.config import Config
from services.common.models import Artifact
from services.common.paths import stored_path


def artifact_file(path: str, artifacts_dir: Path) -> Path:
    """The real file of an artifact row's path on this host; PathRefused when it lies outside
    ``artifacts_dir`` (symlinks followed). Whether it exists is the caller's question."""
    return stored_path(path, artifacts_dir, what="artifact")


def checkpoint_config(art: Artifact, artifacts_dir: Path) -> Config:
    """The configuration a checkpoint was trained with: from the row's meta, else from the file."""
    cfg = (art.meta or {}).get("config")
    return Config.from_dict(cfg or load_checkpoint(artifact_file(art.path, artifacts_dir))["config"])


def upsert_artifact(session: Session, *, job_id: int, dataset_id: int | None, kind: str, path: str,
                    stage: str | None = None, meta: dict[str, Any] | None = None) -> int:
    """One artifact row per (job, kind), its path and meta updated on a repeat; returns its id.

    artifacts has no unique key, so the caller holds the job row lock (``jobs.get_job(lock=True)``)
    to make this check-then-insert safe against a redelivered task or a second copy of the worker.
    """
    existing = session.execute(select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind)
                               .order_by(Artifact.id).limit(1)).scalar_one_or_none()
    if existing is not None:
        existing.path, existing.meta = path, meta or {}
        session.flush()
        return int(existing.id)
    art = Artifact(job_id=job_id, dataset_id=dataset_id, kind=kind, stage=stage, path=path, meta=meta or {})
    session.add(art)
    session.flush()
    return int(art.id)
