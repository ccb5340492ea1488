"""The plan of a mining job: every value its tasks run with, fixed when the job starts.

The miner resolves it once (``services.miner.pipeline.make_plan``) and records it in the job row as
``result["plan"]``; every later task of the job reads it from there, never from live settings, so
a job runs with one set of values even when workers on other hosts are configured differently.
The trainer (a stage-3 job reads its mine job's plan) and the API read the same record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from orl.config import MineConfig
from services.common.models import Job


def embed_key(cfg: MineConfig) -> str:
    """image_embeddings.embed_key: under one checkpoint, rows of equal keys are interchangeable,
    so mining and embedding-map jobs share them; jobs with other embedding options (a resize, a
    crop, draft decoding, backbone features) compute and keep their own."""
    digest = hashlib.sha1(json.dumps(cfg.embedding_params(), sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg.knn_features}-{digest}"


@dataclass(frozen=True)
class MinePlan:
    checkpoint_id: int  # artifacts.id of the stage-1 checkpoint
    checkpoint_path: str  # as stored in the artifact row (relative to ORL_ARTIFACTS_DIR, or absolute)
    checkpoint_preset: str
    dataset_id: int
    dataset_path: str
    mine: MineConfig  # the resolved mining parameters
    proposal_params: dict[str, Any]  # what selective search reads (orl.proposals.proposal_params)
    params_key: str  # key of the proposals under these parameters (shared across jobs)
    roi_key: str  # key of the cached RoI features
    shard_size: int  # images per propose / pairs task
    new_images_registered: int  # files the start-of-job rescan found
    image_max_id: int  # the job's images: the dataset's ok images with id <= image_max_id
    images: int  # how many there were when the job started

    @property
    def embed_key(self) -> str:
        """Key of the image embeddings: derived from ``mine``, so plans recorded before the key
        existed have one too; ``to_dict`` records it next to the other keys."""
        return embed_key(self.mine)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "embed_key": self.embed_key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MinePlan:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"the recorded plan lacks {', '.join(missing)}")
        known = {f.name for f in fields(MineConfig)}
        mine = MineConfig(**{k: v for k, v in d["mine"].items() if k in known})
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name != "mine"}, mine=mine)

    @classmethod
    def of(cls, job: Job) -> MinePlan | None:
        """The recorded plan of a mine job, or None before it was planned."""
        d = (job.result or {}).get("plan")
        return cls.from_dict(d) if d else None
