"""A pretrain / train job row -> everything ``orl.train.train`` needs (a ``RunSpec``).

Job params (all optional except ``mine_job_id`` for train):

- ``preset``: tiny | cpu | paper. Default for pretrain: ``cpu``; for train: the configuration
  of the checkpoint the mining job used, so a pipeline names its preset once (pretrain).
- any ``orl.config.TrainConfig`` field at top level: ``epochs``, ``batch_size``, ``base_lr``,
  ``seed``, ``checkpoint_every_steps``, ``num_workers`` ...
- ``set``: ``{"section.field": value}`` for any other config field (``augment.image_size`` ...).
- ``max_steps``: stop after this many optimisation steps (a smoke run); the job succeeds.
- ``nproc``: training processes (data-parallel through torchrun); default: the number of GPUs
  when there are several, else 1.
- ``device``: cpu | cuda | auto (default ORL_DEVICE).
- train only: ``mine_job_id`` (whose pairs to train on), ``init_from_checkpoint_id`` (an
  artifacts id), or ``init_from: "stage1"`` to start from the checkpoint the pairs were mined with
  (``stage1_checkpoint_id``, set by pipelines). The default is random init, as the authors do.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from orl.config import Config, TrainConfig, get_preset
from orl.correspondence import Correspondence
from services.common.artifacts import artifact_file, checkpoint_config
from services.common.correspondences import correspondence_from_db
from services.common.models import Artifact, Dataset, Image, Job, JobStatus
from services.common.plan import MinePlan

DEFAULT_PRESET = "cpu"
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
OTHER_KEYS = ("preset", "set", "max_steps", "nproc", "device", "mine_job_id", "init_from_checkpoint_id",
              "init_from", "stage1_checkpoint_id")
STAGE_OF_KIND = {"pretrain": "byol", "train": "orl"}


class SpecError(ValueError):
    """The job cannot run as submitted; the message says what to change."""


@dataclass
class RunSpec:
    job_id: int
    kind: str
    stage: str  # byol | orl
    cfg: Config
    images_root: str
    out_dir: Path
    files: list[str] | None = None
    corr: Correspondence | None = None
    init_from: str | None = None
    max_steps: int | None = None
    nproc: int = 1
    device: str = "auto"
    dataset_id: int | None = None
    images_dataset_id: int | None = None  # whose images train: the job's dataset, or its mine job's
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the job's result


def _checkpoint(session: Session, artifact_id: Any, artifacts_dir: Path, what: str) -> tuple[Artifact, Path]:
    try:
        art = session.get(Artifact, int(artifact_id))
    except (TypeError, ValueError):
        raise SpecError(f"{what} must be an artifacts id (integer), got {artifact_id!r}") from None
    if art is None or art.kind != "checkpoint":
        raise SpecError(f"{what} {artifact_id} is not a checkpoint artifact")
    return art, artifact_file(art.path, artifacts_dir)


def build_config(params: dict[str, Any], base: Config) -> Config:
    unknown = sorted(set(params) - set(TRAIN_FIELDS) - set(OTHER_KEYS))
    if unknown:
        raise SpecError(f"unknown training parameter(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(OTHER_KEYS + TRAIN_FIELDS)}")
    cfg = base
    try:
        if params.get("preset"):
            cfg = get_preset(str(params["preset"]))
        cfg = cfg.override(**{f"train.{k}": params[k] for k in TRAIN_FIELDS if k in params})
        extra = params.get("set") or {}
        if not isinstance(extra, dict):
            raise SpecError('params.set must be an object like {"augment.image_size": 96}')
        cfg = cfg.override(**extra)
        return cfg.validate()
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"invalid training parameters: {exc}") from None


def default_nproc() -> int:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return n if n > 1 else 1


def build_spec(session: Session, job: Job, artifacts_dir: Path, default_device: str = "auto") -> RunSpec:
    params = dict(job.params or {})
    if job.kind not in STAGE_OF_KIND:
        raise SpecError(f"the trainer runs pretrain and train jobs, not {job.kind}")
    stage = STAGE_OF_KIND[job.kind]
    ds = session.get(Dataset, job.dataset_id)
    if ds is None:
        raise SpecError(f"dataset {job.dataset_id} does not exist")
    out_dir = artifacts_dir / "jobs" / str(job.id)
    nproc = params.get("nproc")
    try:
        nproc = default_nproc() if nproc is None else int(nproc)
        max_steps = None if params.get("max_steps") is None else int(params["max_steps"])
    except (TypeError, ValueError):
        raise SpecError("params.nproc and params.max_steps must be integers") from None
    if nproc < 1:
        raise SpecError(f"params.nproc must be at least 1, got {nproc}")
    spec = RunSpec(job.id, job.kind, stage, get_preset(DEFAULT_PRESET), ds.path, out_dir, max_steps=max_steps,
                   nproc=nproc, device=str(params.get("device") or default_device), dataset_id=ds.id,
                   images_dataset_id=ds.id)
    if stage == "byol":
        spec.cfg = build_config(params, get_preset(DEFAULT_PRESET))
        spec.files = list(session.execute(select(Image.rel_path).where(Image.dataset_id == ds.id, Image.status == "ok")
                                          .order_by(Image.id)).scalars())
        if len(spec.files) < 2:
            raise SpecError(f"dataset {ds.id} ({ds.path}) has {len(spec.files)} readable registered images; "
                            "stage 1 needs at least 2 (register the dataset's images first)")
        spec.info = {"images": len(spec.files)}
        return spec
    # stage 3
    if params.get("mine_job_id") is None:
        raise SpecError("a train job needs params.mine_job_id: the id of a succeeded mine job whose pairs it trains on")
    mine = session.get(Job, int(params["mine_job_id"]))
    if mine is None or mine.kind != "mine":
        raise SpecError(f"mine_job_id {params['mine_job_id']} is not a mine job")
    if mine.status != JobStatus.SUCCEEDED:
        raise SpecError(f"mine job {mine.id} is {mine.status}; train on a succeeded mine job")
    try:
        plan = MinePlan.of(mine)
    except ValueError as exc:
        raise SpecError(f"mine job {mine.id}: {exc}") from None
    if plan is None:
        raise SpecError(f"mine job {mine.id} has no recorded plan (result.plan)")
    mine_ds = session.get(Dataset, mine.dataset_id)
    stage1 = _checkpoint(session, plan.checkpoint_id, artifacts_dir, "the mine job's checkpoint")
    spec.cfg = build_config(params, checkpoint_config(stage1[0], artifacts_dir))
    spec.images_root = mine_ds.path
    spec.images_dataset_id = mine_ds.id
    spec.corr = correspondence_from_db(session, mine.id, plan.params_key)
    if len(spec.corr) < 2:
        raise SpecError(f"mine job {mine.id} found {len(spec.corr)} images with neighbours; stage 3 needs at least 2")
    init = params.get("init_from_checkpoint_id")
    if params.get("init_from") == "stage1":
        init = params.get("stage1_checkpoint_id", plan.checkpoint_id)
    elif params.get("init_from") not in (None, "random"):
        raise SpecError(f"params.init_from must be 'stage1' or 'random', got {params['init_from']!r}")
    if init is not None:
        spec.init_from = str(_checkpoint(session, init, artifacts_dir, "init_from_checkpoint_id")[1])
    spec.info = {"mine_job_id": mine.id, "images": len(spec.corr), "pairs": spec.corr.num_pairs,
                 "init_from_checkpoint_id": None if init is None else int(init)}
    return spec


