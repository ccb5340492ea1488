"""What the mining tasks do: stage 2 of ORL, split into idempotent steps over the database.

Flow of one mining job (docs/SERVICES.md, "Job flow")::

    start_mine ─┬─ propose_shard (cpu) ─┐  the last one to finish ──> embed_knn (gpu)
                ├─ propose_shard (cpu) ─┤                               │ new image embeddings,
                └─ ...                ──┘                               │ KNN, neighbours
                                                   pairs_shard (gpu) <──┤ fan-out
                                                   pairs_shard (gpu) <──┘
                     the last one to finish ──> correspondence.json, job succeeded, next stage

The job's working state lives in its row: ``result["plan"]`` (a ``services.common.plan.MinePlan``:
every resolved parameter, the image snapshot, the cache keys, the shard size; tasks read these,
never live settings) and ``result["phase"]`` (propose -> embed -> pairs -> done). Every write to
the row goes through ``services.common.jobs`` (``update_job`` under the row lock, ``set_progress``).
Why every step is safe to run twice, or concurrently with a copy of itself:

- Data writes go through unique keys (``INSERT ... ON CONFLICT DO NOTHING``), and each image's
  rows are written in one transaction, so a redelivered shard skips what is done and writes the
  rest; a duplicate writes nothing.
- Completion is counted from the data (images still lacking proposals) or from a set of shard
  indices in the job row, never with a bare counter, so a redelivered shard is not counted twice.
- A phase change locks the job row, checks the phase, SENDS the next task(s), and only then
  commits the new phase. The row lock makes the change happen once; sending before the commit
  means a worker killed in between leaves the phase unchanged, so the redelivered task sends
  again (at-least-once, and every receiver is idempotent) instead of the job stalling.
  A receiver reads the job row with ``FOR UPDATE`` first, which waits for that commit.
- ``start_mine`` is a reconciler: from the phase in the row it re-sends whatever is outstanding.
  The stale-job reaper (``services.common.jobs.reap_stale``) re-sends it when a job stops
  heartbeating, which recovers from any lost message.

Cancel is checked between images / batches (``Gate``); progress is done/total of the current
phase; a bad image gets ``images.status='failed'`` with the reason (or a failed
``proposal_status`` row when only selective search failed) and the job goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sqlalchemy.orm import Session

from orl.checkpoint import load_model
from orl.config import MineConfig
from orl.device import resolve_device
from orl.images import ImageError
from orl.mining import RoiImage, embed_images, embed_rois_batched, knn_search, select_pairs
from orl.proposals import proposal_params, run_proposals
from services.common import jobs, thumbnails
from services.common.artifacts import artifact_file, checkpoint_config, upsert_artifact
from services.common.correspondences import mine_job_correspondence
from services.common.datasets import scan_dataset
from services.common.db import chunks, session_scope
from services.common.heartbeat import Heartbeat
from services.common.models import TERMINAL_STATUSES, Job, JobStatus
from services.common.plan import MinePlan, embed_key
from services.common.settings import get_settings
from services.miner import records, threads
from services.miner.params import MineParamsError, params_key, resolve_config, roi_key
from services.miner.roi_cache import RoiCache

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 2.0  # progress counts are queries; a few per second per shard is plenty


class MineError(RuntimeError):
    """The job cannot run as submitted; the message (shown to the user) says what to change."""


class Stop(Exception):
    """The job finished, was cancelled or vanished: the task ends without doing more."""


class Dispatcher(Protocol):
    """How the pipeline sends the next tasks (tasks.py implements it with Celery)."""

    def start(self, job_id: int) -> None: ...
    def propose(self, job_id: int, image_ids: list[int]) -> None: ...
    def embed(self, job_id: int) -> None: ...
    def pairs(self, job_id: int, image_ids: list[int], shard: int) -> None: ...


def worker_name() -> str:
    return f"miner@{socket.gethostname()}:{os.getpid()}"


def artifact_path(path: str) -> Path:
    return artifact_file(path, get_settings().artifacts_path)


def device() -> torch.device:
    return resolve_device(get_settings().device)


# -- job gate and heartbeat ---------------------------------------------------------------------
class Gate:
    """Between batches: is the job still ours to work on? Cancels it when asked to."""

    def __init__(self, job_id: int):
        self.job_id = job_id

    def check(self) -> dict[str, Any]:
        """Returns the job's result dict (plan, phase); raises Stop when the task must end."""
        with session_scope() as s:
            st = records.job_status(s, self.job_id)
            if st is None:
                raise Stop(f"job {self.job_id} no longer exists")
            status, cancel, result = st
            if status in TERMINAL_STATUSES:
                raise Stop(f"job {self.job_id} is {status}")
            if status == JobStatus.QUEUED and not cancel:
                # Requeued by the stale-job reaper while this task waited: take it up again.
                jobs.start_job(s, self.job_id, worker_name())
        if cancel or status == JobStatus.CANCELLING:
            finish(self.job_id, JobStatus.CANCELLED)
            raise Stop(f"job {self.job_id} was cancelled")
        return result

    def stop_requested(self) -> bool:
        """Cheap poll (no lock) while a long computation runs: cancelled, finished or gone."""
        with session_scope() as s:
            st = records.job_status(s, self.job_id)
        return st is None or st[0] in TERMINAL_STATUSES or bool(st[1]) or st[0] == JobStatus.CANCELLING


def _locked(s: Session, job_id: int) -> Job:
    """The job row, locked until the transaction ends (this waits for a sender's commit)."""
    try:
        return jobs.get_job(s, job_id, lock=True)
    except jobs.JobNotFound:
        raise Stop(f"job {job_id} no longer exists") from None


def _heartbeat(job_id: int) -> Heartbeat:
    """Renews the job's lease while a task works on it (services.common.heartbeat); cancel is
    checked by ``Gate`` between images, so the answer is not needed here."""
    return Heartbeat(job_id, get_settings().heartbeat_s)


def finish(job_id: int, status: str, *, error: str | None = None, result: dict | None = None,
           dispatcher: Dispatcher | None = None) -> None:
    """finish_job in its own transaction, then start the pipeline's next stage (if a mine job)."""
    try:
        with session_scope() as s:
            nxt = jobs.finish_job(s, job_id, status, error=error, result=result)
    except jobs.InvalidTransition as exc:  # finished meanwhile by another task (cancel, reaper)
        log.info("job %s: %s", job_id, exc)
        return
    _dispatch_next(nxt, dispatcher)


def _dispatch_next(nxt: list[tuple[int, str]], dispatcher: Dispatcher | None) -> None:
    for next_id, kind in nxt:
        # pretrain/train children are claimed by trainers from the table; only mine needs a task.
        if kind == "mine" and dispatcher is not None:
            dispatcher.start(next_id)


# -- checkpoint model, loaded once per worker process ---------------------------------------------
_model_cache: dict[str, Any] = {}


def get_model(path: Path):
    """The checkpoint's ORLModel in eval mode on this worker's device (cached per process)."""
    dev = device()
    key = (str(path), path.stat().st_mtime_ns, str(dev))
    if _model_cache.get("key") != key:
        _model_cache.clear()
        model, _, _ = load_model(path, map_location="cpu")
        _model_cache.update(key=key, model=model.to(dev).eval())
    return _model_cache["model"]


# -- start_mine: plan, then reconcile ----------------------------------------------------------------
def start_mine(job_id: int, dispatcher: Dispatcher) -> None:
    with session_scope() as s:
        job = jobs.start_job(s, job_id, worker_name())
        if job is None:
            status = records.job_status(s, job_id)
        else:
            if job.kind != "mine":
                raise MineError(f"job {job_id} is a {job.kind} job, not a mine job")
            has_plan = "plan" in (job.result or {})
    if job is None:
        if status is not None and status[0] == JobStatus.CANCELLING:
            finish(job_id, JobStatus.CANCELLED)
        return  # finished, cancelled, or cancelled while it waited in the broker
    if not has_plan:
        make_plan(job_id)
    reconcile(job_id, dispatcher)


def make_plan(job_id: int) -> MinePlan:
    """Resolve every parameter, register new image files, snapshot the image set."""
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        params = dict(job.params or {})
        ds = records.dataset(s, job.dataset_id)
        if ds is None:
            raise MineError(f"dataset {job.dataset_id} of job {job_id} does not exist")
        if params.get("checkpoint_id") is None:
            raise MineError("a mine job needs params.checkpoint_id: the artifacts id of a stage-1 checkpoint "
                            "(a pretrain job's result.checkpoint_id)")
        try:
            ckpt_id = int(params["checkpoint_id"])
        except (TypeError, ValueError):
            raise MineError(f"params.checkpoint_id must be an integer, got {params['checkpoint_id']!r}") from None
        art = records.checkpoint_artifact(s, ckpt_id)
        if art is None:
            raise MineError(f"checkpoint_id {ckpt_id} is not a checkpoint artifact")
        dataset_id, dataset_path, ckpt_path = ds.id, ds.path, art.path
        try:
            ck_cfg = checkpoint_config(art, get_settings().artifacts_path)
        except Exception as exc:
            raise MineError(f"checkpoint {ckpt_id} ({ckpt_path}) cannot be read: {exc}") from exc
    try:
        cfg = resolve_config(params, ck_cfg)
    except MineParamsError as exc:
        raise MineError(str(exc)) from None
    mc = cfg.mine
    try:  # register files added to the folder since the last scan (idempotent; new ones only)
        with session_scope() as s:
            new = scan_dataset(s, records.dataset(s, dataset_id)).added
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise MineError(f"dataset {dataset_id}: {exc}") from None
    with session_scope() as s:
        job = _locked(s, job_id)
        if (planned := MinePlan.of(job)) is not None:  # a concurrent copy of start_mine planned first
            return planned
        image_max_id = records.max_image_id(s, dataset_id)
        plan = MinePlan(
            checkpoint_id=ckpt_id, checkpoint_path=ckpt_path, checkpoint_preset=ck_cfg.preset,
            dataset_id=dataset_id, dataset_path=dataset_path, mine=mc, proposal_params=proposal_params(mc),
            params_key=params_key(mc), roi_key=roi_key(mc), shard_size=get_settings().shard_size,
            new_images_registered=new, image_max_id=image_max_id,
            images=records.count_set(s, dataset_id, image_max_id))
        # result["config"]: the resolved configuration (checkpoint's model, the job's mining
        # options), the same record a trainer job keeps.
        jobs.update_job(s, job, result={"plan": plan.to_dict(), "config": cfg.to_dict(), "phase": "propose"},
                        progress={"stage": "propose"}, total=plan.images)
    log.info("job %s: plan %s", job_id, plan)
    return plan


def reconcile(job_id: int, dispatcher: Dispatcher) -> None:
    """Send whatever the job's phase still needs (all of it is idempotent to receive twice)."""
    result = Gate(job_id).check()
    plan, phase = MinePlan.from_dict(result["plan"]), result.get("phase")
    if phase == "propose":
        with session_scope() as s:
            todo = records.images_lacking_proposals(s, plan.dataset_id, plan.image_max_id, plan.params_key)
            done = records.count_proposed(s, plan.dataset_id, plan.image_max_id, plan.params_key)
            jobs.set_progress(s, job_id, done=done, total=done + len(todo), phase="propose")
        if not todo:
            advance_to_embed(job_id, dispatcher)
            return
        shards = chunks(todo, plan.shard_size)
        for shard in shards:
            dispatcher.propose(job_id, shard)
        log.info("job %s: %d images to propose in %d shards (%d proposed earlier)", job_id, len(todo), len(shards),
                 done)
    elif phase == "embed":
        dispatcher.embed(job_id)
    elif phase == "pairs":
        shards, done = result["pairs_shards"], set(result.get("pairs_done", []))
        with session_scope() as s:
            qids = records.query_ids(s, job_id)
        for idx, (lo, hi, _) in enumerate(shards):
            if idx not in done:
                dispatcher.pairs(job_id, [i for i in qids if lo <= i <= hi], idx)
        if len(done) >= len(shards):
            finalize(job_id, dispatcher)


# -- propose ------------------------------------------------------------------------------------------
def propose_shard(job_id: int, image_ids: Sequence[int], dispatcher: Dispatcher) -> None:
    """Selective search + box filter for a shard of images (cpu queue)."""
    gate = Gate(job_id)
    result = gate.check()
    if result.get("phase") != "propose":
        return  # a late duplicate: the job has moved on, so these proposals exist
    plan = MinePlan.from_dict(result["plan"])
    key = plan.params_key
    with session_scope() as s:
        paths = records.image_paths(s, image_ids, plan.dataset_id)
        done = records.proposed_among(s, image_ids, key)
        sums = records.image_checksums(s, image_ids)
    todo = [i for i in image_ids if i in paths and i not in done]
    root = Path(plan.dataset_path)
    last_report = time.monotonic()
    with _heartbeat(job_id):
        # Isolated subprocesses: a time limit per image, and an OpenCV crash costs one image, not
        # the Celery pool process. How many: this process's share of the worker's cores
        # (ORL_SS_PROCESSES, threads.py), never the job's mine.ss_workers (another machine's).
        # Each file must still be inside the dataset folder and have its registered checksum.
        # A cancel is also looked for while an image is in work (every 0.5 s): the subprocess is
        # killed then, rather than finishing an image that may take tens of seconds.
        results = run_proposals([str(root / paths[i]) for i in todo], plan.proposal_params,
                                workers=max(1, threads.current().ss_processes), timeout_s=plan.mine.ss_timeout_s,
                                root=str(root), checksums=[sums.get(i) for i in todo],
                                should_stop=gate.stop_requested)
        written = []
        try:
            for k, res in results:
                _write_proposal(todo[k], key, res)
                written.append(todo[k])
                gate.check()
                if time.monotonic() - last_report > _PROGRESS_EVERY_S:
                    _report_propose(job_id, plan)
                    last_report = time.monotonic()
        finally:
            results.close()  # stops the selective-search subprocess when cancelled
            # Which images this task computed (a redelivered shard lists only those still
            # missing): for operators, and how the fault tests check each image is done once.
            log.info("job %s: selective search on images %s", job_id, written)
        gate.check()  # stopped early by a cancel: finish the job as cancelled
        _render_thumbnails(gate, root, paths, image_ids)
    _report_propose(job_id, plan)
    advance_to_embed(job_id, dispatcher)


def _render_thumbnails(gate: Gate, root: Path, paths: dict[int, str], image_ids: Sequence[int]) -> None:
    """The shard's thumbnails (``thumbnails.PRERENDER_SIZES_PX``), those not on disk yet.

    Here because the CPU workers already read every image of the job, in parallel: the pages
    of pairs then never wait for a photo to be decoded. A failure costs that image's
    thumbnails only (the API renders them on demand); the job goes on.
    """
    with session_scope() as s:
        sums = records.ok_image_checksums(s, [i for i in image_ids if i in paths])
    artifacts = get_settings().artifacts_path
    for n, (image_id, checksum) in enumerate(sums.items()):
        try:
            thumbnails.ensure(artifacts, root / paths[image_id], checksum, thumbnails.PRERENDER_SIZES_PX)
        except (ImageError, thumbnails.ContentChanged, OSError) as exc:
            log.warning("image %s: no thumbnail: %s", image_id, exc)
        if n % 20 == 19:
            gate.check()


def _write_proposal(image_id: int, key: str, res) -> None:
    with session_scope() as s:
        if not res.ok and res.image_failed:  # the file itself is refused, not only selective search
            records.mark_image_failed(s, image_id, res.reason)
        records.write_proposals(s, image_id, key, res.ok, res.reason, res.n_raw,
                                res.boxes if res.ok else np.zeros((0, 4)), res.seconds)
    if not res.ok:
        log.warning("image %s: %s", image_id, res.reason)


def _report_propose(job_id: int, plan: MinePlan) -> None:
    with session_scope() as s:
        done = records.count_proposed(s, plan.dataset_id, plan.image_max_id, plan.params_key)
        total = records.count_set(s, plan.dataset_id, plan.image_max_id)
        jobs.set_progress(s, job_id, done=done, total=total, phase="propose")


def advance_to_embed(job_id: int, dispatcher: Dispatcher) -> None:
    """If no image of the set lacks proposals, send embed_knn once (see the module docstring)."""
    with session_scope() as s:
        job = _locked(s, job_id)
        if job.status in TERMINAL_STATUSES or (job.result or {}).get("phase") != "propose":
            return
        plan = MinePlan.of(job)
        if records.images_lacking_proposals(s, plan.dataset_id, plan.image_max_id, plan.params_key):
            return
        dispatcher.embed(job_id)  # before the commit: a kill here re-sends, never loses the step
        jobs.update_job(s, job, result={"phase": "embed"}, progress={"stage": "embed"})


# -- embeddings + KNN ------------------------------------------------------------------------------------
def embed_knn(job_id: int, dispatcher: Dispatcher) -> None:
    """Embed the set's images that have no embedding under this checkpoint; KNN; fan out pairs."""
    gate = Gate(job_id)
    gate.check()
    with session_scope() as s:
        job = _locked(s, job_id)  # waits for the sender's commit (module docstring)
        phase, plan = (job.result or {}).get("phase"), MinePlan.of(job)
        if phase == "propose":
            if records.images_lacking_proposals(s, plan.dataset_id, plan.image_max_id, plan.params_key):
                return  # premature duplicate: the last propose shard will send it
            # The sender was killed after sending and before its commit: take the step ourselves.
            jobs.update_job(s, job, result={"phase": "embed"})
        elif phase != "embed":
            return  # a late duplicate
    mc = plan.mine
    dev = device()
    ds_id, max_id, ck_id = plan.dataset_id, plan.image_max_id, plan.checkpoint_id
    with _heartbeat(job_id):
        embed_missing(job_id, gate, ImageSet(ds_id, plan.dataset_path, max_id), ck_id, plan.checkpoint_path, mc)
        gate.check()
        with session_scope() as s:
            ids, emb = records.load_embeddings(s, ds_id, max_id, ck_id, plan.embed_key)
        # Exact cosine KNN (faiss on CPU, matmul + topk on CUDA): the same neighbours on either.
        knn, sims = knn_search(emb, mc.knn_k, dev) if len(ids) else (np.zeros((0, 0), np.int64), None)
        with session_scope() as s:  # all neighbours in one transaction: a kill leaves none or all
            records.write_neighbors(s, job_id, ids, knn, sims)
    fan_out_pairs(job_id, dispatcher)


@dataclass(frozen=True)
class ImageSet:
    """A job's images: the dataset's ok images with id <= image_max_id (records' snapshot)."""

    dataset_id: int
    dataset_path: str
    image_max_id: int


def embed_missing(job_id: int, gate: Gate, images: ImageSet, checkpoint_id: int, checkpoint_path: str,
                  mc: MineConfig) -> int:
    """Embed the set's images that have no embedding under the checkpoint and ``mc``'s embedding
    options (``image_embeddings``, keyed by ``embed_key(mc)``), in batches with a cancel check
    between them; undecodable images are marked failed. Progress goes to the job's ``embed``
    phase. Mining and embedding maps both call this, so an image has one embedding per checkpoint
    and embedding options, whichever job computed it. Returns how many were computed."""
    ds_id, max_id = images.dataset_id, images.image_max_id
    key = embed_key(mc)
    with session_scope() as s:
        need = records.ids_lacking_embedding(s, ds_id, max_id, checkpoint_id, key)
        total = records.count_set(s, ds_id, max_id)
        jobs.set_progress(s, job_id, done=total - len(need), total=total, phase="embed")
    if not need:
        return 0
    dev = device()
    model = get_model(artifact_path(checkpoint_path))
    root = Path(images.dataset_path)
    computed = 0
    for chunk in chunks(need, 4 * mc.batch_size):
        gate.check()
        with session_scope() as s:
            paths = records.image_paths(s, chunk, ds_id)
            sums = records.image_checksums(s, chunk)
        ids = [i for i in chunk if i in paths]
        # Decoded from the bytes hashed against the registered checksum, inside the dataset root.
        emb, failed = embed_images(model, [str(root / paths[i]) for i in ids], mc, dev, threads.current().threads,
                                   root=root, checksums=[sums.get(i) for i in ids])
        with session_scope() as s:
            for k, reason in failed.items():
                records.mark_image_failed(s, ids[k], reason)
            ok = [k for k in range(len(ids)) if k not in failed]
            records.write_embeddings(s, checkpoint_id, key, [ids[k] for k in ok], emb[ok])
            left = len(records.ids_lacking_embedding(s, ds_id, max_id, checkpoint_id, key))
            total = records.count_set(s, ds_id, max_id)
            jobs.set_progress(s, job_id, done=total - left, total=total, phase="embed")
        log.info("job %s: embedded images %s", job_id, [ids[k] for k in ok])
        computed += len(ok)
    return computed


def fan_out_pairs(job_id: int, dispatcher: Dispatcher) -> None:
    with session_scope() as s:
        qids = records.query_ids(s, job_id)
        job = _locked(s, job_id)
        if job.status in TERMINAL_STATUSES or (job.result or {}).get("phase") != "embed":
            return
        shards = chunks(qids, MinePlan.of(job).shard_size)
        for idx, ids in enumerate(shards):
            dispatcher.pairs(job_id, ids, idx)
        # [first id, last id, count] of each shard: enough to rebuild it (reconcile)
        jobs.update_job(s, job, result={"phase": "pairs", "pairs_done": [],
                                        "pairs_shards": [[ids[0], ids[-1], len(ids)] for ids in shards]},
                        progress={"stage": "pairs"}, done=0, total=len(qids))
        finished = not shards
    log.info("job %s: %d query images in %d pair shards", job_id, len(qids), len(shards))
    if finished:  # fewer than two images: no neighbours, nothing to pair
        finalize(job_id, dispatcher)


# -- RoI features and pairs ----------------------------------------------------------------------------
@dataclass
class _RoiFeatures:
    """Each image's boxes encoded once: read from the on-disk cache, computed in batches first.

    Only a bounded number of images' features is kept in memory (the most recently used), so a
    shard's memory does not grow with its neighbours; the rest are re-read from the cache.
    """

    plan: MinePlan
    boxes: dict[int, np.ndarray]
    paths: dict[int, str]
    checksums: dict[int, str | None]
    memo_images: int = 256

    def __post_init__(self):
        self.cache = RoiCache(get_settings().artifacts_path, self.plan.checkpoint_id, self.plan.params_key,
                              self.plan.roi_key, self.plan.mine.roi_dtype)
        self.memo: OrderedDict[int, np.ndarray] = OrderedDict()
        self.failed: set[int] = set()

    def compute_missing(self, image_ids: Sequence[int], gate: Gate) -> int:
        """Encode (many images per forward) and cache the features the cache lacks; an image that
        no longer decodes is marked failed and gets no pairs. Returns how many were encoded."""
        todo = [i for i in image_ids if len(self.boxes.get(i, ())) and self.cache.get(i, len(self.boxes[i])) is None]
        if not todo:
            return 0
        model = get_model(artifact_path(self.plan.checkpoint_path))
        root = Path(self.plan.dataset_path)
        jobs = [RoiImage(root / self.paths[i], self.boxes[i], root, self.checksums.get(i)) for i in todo]
        for k, feats, reason in embed_rois_batched(model.backbone, jobs, self.plan.mine, device(),
                                                   threads.current().threads):
            if reason:  # readable when proposed, not now: no pairs with it, recorded
                log.warning("image %s: %s", todo[k], reason)
                with session_scope() as s:
                    records.mark_image_failed(s, todo[k], reason)
                self.failed.add(todo[k])
            else:
                self.cache.put(todo[k], feats)
            if k % 16 == 15:
                gate.check()
        return len(todo)

    def __call__(self, image_id: int) -> np.ndarray:
        if image_id in self.memo:
            self.memo.move_to_end(image_id)
            return self.memo[image_id]
        boxes = self.boxes.get(image_id, np.zeros((0, 4)))
        feats = None if image_id in self.failed or not len(boxes) else self.cache.get(image_id, len(boxes))
        if feats is None:
            feats = np.zeros((0, 0), np.float32)
        self.memo[image_id] = feats
        if len(self.memo) > self.memo_images:
            self.memo.popitem(last=False)
        return feats


def pairs_shard(job_id: int, image_ids: Sequence[int], shard: int | None, dispatcher: Dispatcher) -> None:
    """RoI pairs of a shard of query images with each of their neighbours (gpu queue)."""
    gate = Gate(job_id)
    gate.check()
    with session_scope() as s:
        job = _locked(s, job_id)  # waits for fan_out_pairs' commit
        phase, plan = (job.result or {}).get("phase"), MinePlan.of(job)
    if phase != "pairs":
        return  # sent by a fan-out that did not commit: its redelivery sends the shard again
    dev = device()
    qids = sorted(int(i) for i in image_ids)
    with session_scope() as s:
        done = records.images_with_pairs(s, job_id, qids)
        nbrs = records.neighbors_of(s, job_id, qids)
        all_ids = set(qids) | {n for rows in nbrs.values() for _, n, _ in rows}
        boxes = records.boxes_of(s, all_ids, plan.params_key)
        paths = records.image_paths(s, list(all_ids), plan.dataset_id, only_ok=False)
        sums = records.image_checksums(s, list(all_ids))
    feats = _RoiFeatures(plan, boxes, paths, sums)
    with _heartbeat(job_id):
        todo = [q for q in qids if q not in done and len(boxes.get(q, ()))]
        feats.compute_missing(sorted({*todo, *(n for q in todo for _, n, _ in nbrs.get(q, []))}), gate)
        for q in qids:
            gate.check()
            if q in done or not len(boxes.get(q, ())):
                continue
            rows = []
            for k, n, _ in nbrs.get(q, []):
                gate.check()  # each neighbour may need its RoI features computed: seconds on a CPU
                fq, fk = feats(q), feats(n)
                if not len(fq) or not len(fk):
                    continue
                ij, scores = select_pairs(fq, fk, plan.mine.pair_ratio, dev)
                bq, bn = boxes[q][ij[:, 0]], boxes[n][ij[:, 1]]
                rows += [{"job_id": job_id, "image_id": q, "neighbor_image_id": n, "neighbor_rank": k, "rank": r,
                          "score": float(scores[r]), "qx1": float(bq[r, 0]), "qy1": float(bq[r, 1]),
                          "qx2": float(bq[r, 2]), "qy2": float(bq[r, 3]), "nx1": float(bn[r, 0]),
                          "ny1": float(bn[r, 1]), "nx2": float(bn[r, 2]), "ny2": float(bn[r, 3])}
                         for r in range(len(ij))]
            with session_scope() as s:  # one image's pairs in one transaction
                records.write_pairs(s, rows)
    log.info("job %s: pairs of query images %s", job_id, [q for q in qids if q not in done])
    if shard is not None:
        _shard_done(job_id, int(shard), dispatcher)


def _shard_done(job_id: int, shard: int, dispatcher: Dispatcher) -> None:
    """Record the shard in the job's done set (idempotent); the last one finalizes."""
    with session_scope() as s:
        job = _locked(s, job_id)
        if job.status in TERMINAL_STATUSES:
            return
        result = job.result or {}
        done = {*result.get("pairs_done", []), shard}
        shards = result.get("pairs_shards", [])
        jobs.update_job(s, job, result={"pairs_done": sorted(done)},
                        done=sum(shards[i][2] for i in done if i < len(shards)), beat=True)
        complete = len(done) >= len(shards)
    if complete:
        # Also when this shard was counted before (a redelivery): finalize is idempotent, and it
        # is how a job whose last shard died after counting still finishes.
        finalize(job_id, dispatcher)


# -- the end --------------------------------------------------------------------------------------------
def finalize(job_id: int, dispatcher: Dispatcher) -> None:
    """Export correspondence.json, record it as an artifact, mark the job succeeded."""
    plan = MinePlan.from_dict(Gate(job_id).check()["plan"])
    rel = Path("jobs") / str(job_id) / "correspondence.json"
    out = get_settings().artifacts_path / rel
    with session_scope() as s:
        corr = mine_job_correspondence(s, jobs.get_job(s, job_id))
        failed = plan.images - records.count_set(s, plan.dataset_id, plan.image_max_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    corr.save(out)
    with session_scope() as s:
        job = _locked(s, job_id)
        if job.status in TERMINAL_STATUSES:
            return
        art_id = upsert_artifact(s, job_id=job_id, dataset_id=plan.dataset_id, kind="correspondence",
                                         path=rel.as_posix(), meta={"images": len(corr), "pairs": corr.num_pairs,
                                                                    "format": "orl-official-json"})
        summary = {**dict(job.result or {}), "phase": "done", "images": len(corr), "pairs": corr.num_pairs,
                   "failed_images": max(0, failed), "correspondence_artifact_id": art_id}
        nxt = jobs.finish_job(s, job_id, JobStatus.SUCCEEDED, result=summary)
    log.info("job %s succeeded: %d images, %d pairs", job_id, len(corr), corr.num_pairs)
    _dispatch_next(nxt, dispatcher)
