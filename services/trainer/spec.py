"""A pretrain / train job row -> everything ``orl.train.train`` needs (a ``RunSpec``).

Job params (all optional except ``mine_job_id`` for train):

- ``preset``: tiny | cpu | paper. Default for pretrain: ``paper`` when the job runs on a CUDA
  device, else ``cpu`` (``orl.config.default_preset``, decided here); for train: the
  configuration of the checkpoint the mining job used, so a pipeline names its preset once.
- any ``orl.config.TrainConfig`` field at top level: ``epochs``, ``batch_size``, ``base_lr``,
  ``seed``, ``checkpoint_every_steps``, ``num_workers`` ...
- ``set``: ``{"section.field": value}`` or ``{"section": {"field": value}}`` for any config field.

Params are read by ``services.common.params`` (the reading the API checks at submission).
- ``max_steps``: stop after this many optimisation steps (a smoke run); the job succeeds.
- ``nproc``: training processes (data-parallel through torchrun); default: the number of GPUs
  when there are several, else 1.
- ``device``: cpu | cuda | auto (default ORL_DEVICE).
- train only: ``mine_job_id`` (whose pairs to train on), ``init_from_checkpoint_id`` (an
  artifacts id), or ``init_from: "stage1"`` to start from the checkpoint the pairs were mined with
  (``stage1_checkpoint_id``, set by pipelines). The default is random init, as the authors do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from orl.config import Config
from orl.correspondence import Correspondence
from orl.device import resolve_device
from services.common import params as job_params
from services.common.artifacts import artifact_file, checkpoint_config
from services.common.correspondences import correspondence_from_db
from services.common.models import Artifact, Dataset, Image, Job, JobStatus
from services.common.paths import PathRefused
from services.common.plan import MinePlan

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
    try:
        return art, artifact_file(art.path, artifacts_dir)
    except PathRefused as exc:
        raise SpecError(f"{what} {artifact_id}: {exc}") from None


def build_config(params: dict[str, Any], base: Config, kind: str = "train") -> Config:
    """``params`` over ``base`` through the one reading of job params (``services.common.params``)."""
    try:
        return job_params.resolve_config(kind, params, base)
    except job_params.ParamsError as exc:
        raise SpecError(str(exc)) from None


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
    try:
        job_params.check_options(job.kind, params)
    except job_params.ParamsError as exc:
        raise SpecError(str(exc)) from None
    nproc = default_nproc() if params.get("nproc") is None else int(params["nproc"])
    max_steps = None if params.get("max_steps") is None else int(params["max_steps"])
    device = str(params.get("device") or default_device)
    try:
        # Decided here, on the machine that runs the job: the default preset follows it.
        resolved_device = str(resolve_device(device))
    except RuntimeError as exc:
        raise SpecError(f"params.device {device!r}: {exc}") from None
    spec = RunSpec(job.id, job.kind, stage, job_params.default_base(resolved_device), ds.path, out_dir,
                   max_steps=max_steps, nproc=nproc, device=device, dataset_id=ds.id, images_dataset_id=ds.id)
    if stage == "byol":
        spec.cfg = build_config(params, spec.cfg, "pretrain")
        spec.files = list(session.execute(select(Image.rel_path).where(Image.dataset_id == ds.id, Image.status == "ok")
                                          .order_by(Image.id)).scalars())
        if len(spec.files) < 2:
            raise SpecError(f"dataset {ds.id} ({ds.path}) has {len(spec.files)} readable registered images; "
                            "stage 1 needs at least 2 (register the dataset's images first)")
        spec.info = {"images": len(spec.files), "preset_from": "params.preset" if params.get("preset") else
                     f"default rule: {spec.cfg.preset} on {resolved_device}"}
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
    if init is not None:
        spec.init_from = str(_checkpoint(session, init, artifacts_dir, "init_from_checkpoint_id")[1])
    spec.info = {"mine_job_id": mine.id, "images": len(spec.corr), "pairs": spec.corr.num_pairs,
                 "init_from_checkpoint_id": None if init is None else int(init),
                 "preset_from": "params.preset" if params.get("preset") else
                 f"checkpoint {plan.checkpoint_id} (the mine job's)"}
    return spec


