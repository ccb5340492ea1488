"""Embedding maps: the parameters of an ``embedding_map`` job, its recorded plan, and where the
API finds a checkpoint's map.

A job's ``params``: ``checkpoint_id`` (required: an artifacts.id of kind checkpoint), ``method``
(auto | umap | pca; auto = UMAP when umap-learn is installed on the worker, else PCA), ``seed``,
``n_neighbors`` and ``min_dist`` (UMAP's), and optionally ``labels``: a label source under a data
root (ORL_DATA_ROOTS, the same trust boundary as dataset folders) to colour the points by: a CSV
of ``image,label`` rows, a COCO instances json (or a folder of instances_*.json), or a YOLO
label folder (orl.embedding_map.image_labels). The API checks them when the job is submitted
(422 naming the field) and the worker resolves them again into the plan it records
(``result["map"]``), so the stored map can be traced back and repeated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orl.config import MineConfig
from orl.embedding_map import METHODS
from services.common.models import Job
from services.common.paths import PathRefused, resolve_user_path

KIND = "embedding_map"
DEFAULTS: dict[str, Any] = {"method": "auto", "seed": 0, "n_neighbors": 15, "min_dist": 0.1, "labels": None}
KEYS = ("checkpoint_id", *DEFAULTS)
MAX_SEED = 2**31 - 1
MAX_NEIGHBORS = 200


class MapParamsError(ValueError):
    """The job's params cannot be run; the message names the field and what to change."""


@dataclass(frozen=True)
class MapParams:
    checkpoint_id: int
    method: str
    seed: int
    n_neighbors: int
    min_dist: float
    labels: str | None  # the label source as given (resolved under the data roots by ``labels_file``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(params: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = params.get(key, DEFAULTS.get(key))
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise MapParamsError(f"params.{key} must be an integer from {lo} to {hi}, got {v!r}")
    return v


def parse_params(params: dict[str, Any]) -> MapParams:
    """The job's params with defaults filled in; MapParamsError names the first bad field."""
    unknown = sorted(set(params) - set(KEYS))
    if unknown:
        raise MapParamsError(f"unknown embedding_map parameter(s) {', '.join(unknown)}; valid: {', '.join(KEYS)}")
    if params.get("checkpoint_id") is None:
        raise MapParamsError("an embedding_map job needs params.checkpoint_id: the artifacts id of a checkpoint "
                             "(GET /api/v1/checkpoints)")
    method = params.get("method", DEFAULTS["method"])
    if method not in METHODS:
        raise MapParamsError(f"params.method must be one of {', '.join(METHODS)}, got {method!r}")
    min_dist = params.get("min_dist", DEFAULTS["min_dist"])
    if not isinstance(min_dist, (int, float)) or isinstance(min_dist, bool) or not 0.0 <= min_dist <= 1.0:
        raise MapParamsError(f"params.min_dist must be a number from 0 to 1, got {min_dist!r}")
    labels = params.get("labels")
    if labels is not None and (not isinstance(labels, str) or not labels.strip()):
        raise MapParamsError(f"params.labels must be a path (a CSV, COCO json or YOLO folder), got {labels!r}")
    return MapParams(checkpoint_id=_int(params, "checkpoint_id", 1, 2**63 - 1), method=method,
                     seed=_int(params, "seed", 0, MAX_SEED), n_neighbors=_int(params, "n_neighbors", 2, MAX_NEIGHBORS),
                     min_dist=float(min_dist), labels=labels)


def labels_file(raw: str, roots: list[Path]) -> Path:
    """The label source's real path under the data roots; MapParamsError says why not."""
    try:
        return resolve_user_path(raw, roots, field="params.labels", noun="label file or folder")
    except PathRefused as exc:
        raise MapParamsError(f"params.labels: {exc}") from None


@dataclass(frozen=True)
class MapPlan:
    """What an embedding_map job runs with, fixed by its first task (``result["map"]``)."""

    params: MapParams
    checkpoint_path: str  # as stored in the artifact row
    dataset_id: int
    dataset_path: str
    image_max_id: int  # the map's images: the dataset's ok images with id <= image_max_id
    labels_path: str | None  # the resolved label source
    embed: dict[str, Any]  # the MineConfig the missing embeddings are computed with (the checkpoint's own)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": self.params.to_dict()}

    def mine_config(self) -> MineConfig:
        known = {f.name for f in fields(MineConfig)}
        return MineConfig(**{k: v for k, v in self.embed.items() if k in known})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MapPlan:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"the recorded map plan lacks {', '.join(missing)}")
        return cls(**{**{f.name: d[f.name] for f in fields(cls)}, "params": MapParams(**d["params"])})

    @classmethod
    def of(cls, job: Job) -> MapPlan | None:
        d = (job.result or {}).get("map")
        return cls.from_dict(d) if d else None


def map_jobs(checkpoint_id: int, dataset_id: int | None = None):
    """A select of the embedding_map jobs of a checkpoint (and dataset), newest first."""
    stmt = select(Job).where(Job.kind == KIND, Job.params["checkpoint_id"].astext == str(int(checkpoint_id)))
    if dataset_id is not None:
        stmt = stmt.where(Job.dataset_id == dataset_id)
    return stmt.order_by(Job.id.desc())


def latest_map_job(session: Session, checkpoint_id: int,
                   dataset_id: int | None = None) -> tuple[Job | None, Job | None]:
    """(the newest succeeded map job, the newest map job of any status) of the checkpoint."""
    stmt = map_jobs(checkpoint_id, dataset_id)
    done = session.execute(stmt.where(Job.status == "succeeded").limit(1)).scalar()
    newest = session.execute(stmt.limit(1)).scalar()
    return done, newest

