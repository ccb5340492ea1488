"""What an ``embedding_map`` job's tasks do: a 2-D map of a checkpoint's image embeddings.

Two tasks, each on the queue of the resource it needs (docs/SERVICES.md, "Job flow")::

    map_embed (gpu): plan; embed the images that lack an embedding under the checkpoint
        │             (pipeline.embed_missing, the function mining uses; stored in image_embeddings)
        └──> map_layout (cpu): UMAP or PCA of all of them (orl.embedding_map), labels, points stored

Images without an embedding are embedded, not refused: a map is wanted for checkpoints that
were never mined with (a stage-3 ORL checkpoint, say), and the embeddings are the same rows a
later mining job would compute and reuse.

Safe to run twice, as the mining tasks are (pipeline.py's docstring): the plan is recorded once
under the row lock; embeddings are written through their unique key; ``map_embed`` sends the
layout task before it commits the phase change, so a kill in between re-sends rather than
stalls; ``map_layout`` replaces the job's points and finishes the job in one transaction, so a
map is stored whole or not at all, and a redelivery after that finds the job finished.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from importlib import metadata
from typing import Protocol

from sqlalchemy import delete

from orl.embedding_map import LayoutError, image_labels, layout_2d
from services.common import jobs
from services.common.artifacts import checkpoint_config
from services.common.datasets import scan_dataset
from services.common.db import insert_ignore, session_scope
from services.common.embedding_maps import KIND, MapParamsError, MapPlan, labels_file, parse_params
from services.common.heartbeat import Heartbeat
from services.common.models import TERMINAL_STATUSES, EmbeddingMapPoint, Job, JobStatus
from services.common.plan import embed_key
from services.common.settings import get_settings
from services.miner import records
from services.miner.params import MineParamsError, resolve_mine_config
from services.miner.pipeline import Gate, ImageSet, Stop, embed_missing, finish, worker_name

log = logging.getLogger(__name__)


class MapError(RuntimeError):
    """The job cannot run as submitted; the message (shown to the user) says what to change."""


class Dispatcher(Protocol):
    def layout(self, job_id: int) -> None: ...


def _locked(s, job_id: int) -> Job:
    try:
        return jobs.get_job(s, job_id, lock=True)
    except jobs.JobNotFound:
        raise Stop(f"job {job_id} no longer exists") from None


# -- map_embed -----------------------------------------------------------------------------------
def start_map(job_id: int, dispatcher: Dispatcher) -> None:
    """Plan the job, embed what is missing, send the layout task."""
    with session_scope() as s:
        job = jobs.start_job(s, job_id, worker_name())
        status = records.job_status(s, job_id) if job is None else None
        if job is not None and job.kind != KIND:
            raise MapError(f"job {job_id} is a {job.kind} job, not an {KIND} job")
        planned = job is not None and "map" in (job.result or {})
    if job is None:
        if status is not None and status[0] == JobStatus.CANCELLING:
            finish(job_id, JobStatus.CANCELLED)
        return  # finished, or cancelled while it waited in the broker
    if not planned:
        make_plan(job_id)
    gate = Gate(job_id)
    result = gate.check()
    plan = MapPlan.from_dict(result["map"])
    if result.get("phase") == "embed":
        with Heartbeat(job_id, get_settings().heartbeat_s):
            computed = embed_missing(job_id, gate, ImageSet(plan.dataset_id, plan.dataset_path, plan.image_max_id),
                                     plan.params.checkpoint_id, plan.checkpoint_path, plan.mine_config())
        log.info("job %s: %d embeddings computed", job_id, computed)
    advance_to_layout(job_id, dispatcher)


def make_plan(job_id: int) -> MapPlan:
    """Resolve the parameters, register new files, snapshot the image set (under the row lock)."""
    settings = get_settings()
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        try:
            params = parse_params(dict(job.params or {}))
            labels = labels_file(params.labels, settings.data_root_paths) if params.labels else None
        except MapParamsError as exc:
            raise MapError(str(exc)) from None
        ds = records.dataset(s, job.dataset_id)
        if ds is None:
            raise MapError(f"dataset {job.dataset_id} of job {job_id} does not exist")
        art = records.checkpoint_artifact(s, params.checkpoint_id)
        if art is None:
            raise MapError(f"checkpoint_id {params.checkpoint_id} is not a checkpoint artifact")
        try:
            ck_cfg = checkpoint_config(art, settings.artifacts_path)
        except Exception as exc:
            raise MapError(f"checkpoint {art.id} ({art.path}) cannot be read: {exc}") from exc
        dataset_id, dataset_path, ckpt_path = ds.id, ds.path, art.path
    try:
        # The checkpoint's own mining options: the embeddings a default mine job would store.
        embed = resolve_mine_config({}, ck_cfg)
    except MineParamsError as exc:
        raise MapError(str(exc)) from None
    try:
        with session_scope() as s:
            scan_dataset(s, records.dataset(s, dataset_id))
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise MapError(f"dataset {dataset_id}: {exc}") from None
    with session_scope() as s:
        job = _locked(s, job_id)
        if (planned := MapPlan.of(job)) is not None:  # a concurrent copy planned first
            return planned
        plan = MapPlan(params=params, checkpoint_path=ckpt_path, dataset_id=dataset_id, dataset_path=dataset_path,
                       image_max_id=records.max_image_id(s, dataset_id),
                       labels_path=str(labels) if labels else None, embed=asdict(embed))
        # How many images mining (or an earlier map) had embedded already, and how many this job must.
        missing = len(records.ids_lacking_embedding(s, dataset_id, plan.image_max_id, params.checkpoint_id,
                                                     embed_key(embed)))
        jobs.update_job(s, job, result={"map": plan.to_dict(), "phase": "embed", "embeddings_missing": missing},
                        progress={"stage": "embed"})
    log.info("job %s: map plan %s", job_id, plan)
    return plan


def advance_to_layout(job_id: int, dispatcher: Dispatcher) -> None:
    """Send map_layout (before committing the phase: a kill in between re-sends, never stalls)."""
    with session_scope() as s:
        job = _locked(s, job_id)
        if job.status in TERMINAL_STATUSES:
            return
        dispatcher.layout(job_id)
        if (job.result or {}).get("phase") != "layout":
            jobs.update_job(s, job, result={"phase": "layout"}, progress={"stage": "layout"})


# -- map_layout ----------------------------------------------------------------------------------
def layout_map(job_id: int, dispatcher: Dispatcher) -> None:
    """UMAP / PCA of the set's embeddings, labels, and the points stored; the job succeeds."""
    gate = Gate(job_id)
    gate.check()
    with session_scope() as s:
        job = _locked(s, job_id)  # waits for advance_to_layout's commit
        phase, plan = (job.result or {}).get("phase"), MapPlan.of(job)
    if phase != "layout" or plan is None:
        return  # sent by a sender that did not commit: its redelivery sends it again
    p = plan.params
    with Heartbeat(job_id, get_settings().heartbeat_s):
        with session_scope() as s:
            ids, emb = records.load_embeddings(s, plan.dataset_id, plan.image_max_id, p.checkpoint_id,
                                               embed_key(plan.mine_config()))
            paths = records.image_paths(s, ids, plan.dataset_id)
            jobs.set_progress(s, job_id, done=0, total=len(ids), phase="layout")
        if not ids:
            raise MapError(f"no readable image of dataset {plan.dataset_id} has an embedding under checkpoint "
                           f"{p.checkpoint_id}; register images in the dataset folder, then submit the job again")
        t0 = time.monotonic()
        try:
            lay = layout_2d(emb, p.method, seed=p.seed, n_neighbors=p.n_neighbors, min_dist=p.min_dist)
        except LayoutError as exc:
            raise MapError(str(exc)) from None
        seconds = time.monotonic() - t0
        labels, label_info = _labels(plan, [paths.get(i, "") for i in ids])
        gate.check()
        rows = [{"job_id": job_id, "image_id": i, "x": float(x), "y": float(y), "label": labels.get(paths.get(i, ""))}
                for i, (x, y) in zip(ids, lay.xy, strict=True)]
        with session_scope() as s:  # the points and the job's end in one transaction
            job = _locked(s, job_id)
            if job.status in TERMINAL_STATUSES:
                return
            s.execute(delete(EmbeddingMapPoint).where(EmbeddingMapPoint.job_id == job_id))
            insert_ignore(s, EmbeddingMapPoint, rows)
            summary = {**dict(job.result or {}), "phase": "done", "method": lay.method, "method_reason": lay.reason,
                       "points": len(rows), "dim": int(emb.shape[1]), "layout_seconds": round(seconds, 3),
                       "umap_learn": _version("umap-learn") if lay.method == "umap" else None, "labels": label_info}
            jobs.finish_job(s, job_id, JobStatus.SUCCEEDED, result=summary)
    log.info("job %s succeeded: %d points by %s in %.1f s", job_id, len(rows), lay.method, seconds)


def _labels(plan: MapPlan, rel_paths: list[str]) -> tuple[dict[str, str], dict | None]:
    if plan.labels_path is None:
        return {}, None
    try:
        labels, fmt = image_labels(plan.dataset_path, plan.labels_path, rel_paths)
    except (FileNotFoundError, ValueError) as exc:
        raise MapError(f"params.labels: {exc}") from None
    return labels, {"path": plan.labels_path, "format": fmt, "labelled": len(labels),
                    "classes": len(set(labels.values()))}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None

