"""The trainer loop: claim a queued pretrain/train job, run ``orl.train.train``, report, repeat.

One job at a time per trainer process; run one trainer per machine (it uses all of the
machine's GPUs through torchrun when a job asks for several processes), or several anywhere:
``claim_job`` takes rows with ``FOR UPDATE SKIP LOCKED``, so each job goes to one trainer.

While a job runs, a heartbeat thread (``services.common.heartbeat``) renews its row every
ORL_HEARTBEAT_S with the latest progress (epoch, step, loss, images/s, ETA) and learns from the
answer whether a cancel was requested, or whether the job was taken away (requeued by the reaper
after a long silence).
``orl.train`` polls ``should_stop`` every step; it writes ``last.pt`` every
``train.checkpoint_every_steps`` steps and at each epoch end, and the same call resumes from it.
So a trainer that dies (kill -9, lost host) costs at most those steps: its job's heartbeat goes
stale, any trainer's reaper requeues it (``ORL_LEASE_S``), and the next claim resumes it from
``<ORL_ARTIFACTS_DIR>/jobs/<job id>/last.pt`` at the same schedule position.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import OperationalError as DatabaseError

from orl.config import save_config
from services.common import broker, jobs
from services.common.artifacts import upsert_artifact
from services.common.datasets import mark_images_failed
from services.common.db import session_scope
from services.common.heartbeat import Heartbeat
from services.common.models import JobStatus
from services.common.settings import Settings, get_settings
from services.trainer.spec import RunSpec, SpecError, build_spec

log = logging.getLogger(__name__)

KINDS = ("pretrain", "train")
DB_RETRY_S = 300.0  # how long the end of a job is retried while the database is unreachable
T = TypeVar("T")
# What a job's progress shows of orl.train's reports: the step's values, and the latest label-free
# signals (orl.runlog.MONITOR_SIGNALS, with the epoch they are of) once a monitored epoch ended.
# The whole curves are in the run folder (GET /api/v1/jobs/{id}/metrics reads them).
_PROGRESS_KEYS = ("stage", "epoch", "step", "global_step", "total_steps", "loss", "lr", "images_per_s", "eta_s",
                  "view_top1", "view_top1_chance", "effective_rank", "effective_rank_max", "monitor_epoch")


class TrainerError(RuntimeError):
    pass


def worker_name() -> str:
    return f"trainer@{socket.gethostname()}:{os.getpid()}"


def _report(beat: Heartbeat, stage: str, metrics: dict[str, Any]) -> None:
    """orl.train's per-step metrics -> the job's progress (written by the heartbeat thread)."""
    m = {"stage": stage, **metrics}
    beat.report(done=int(m.get("global_step", 0)), total=int(m.get("total_steps", 0)),
                progress={k: m[k] for k in _PROGRESS_KEYS if k in m})


class Trainer:
    def __init__(self, settings: Settings | None = None, poll_s: float = 2.0):
        self.settings = settings or get_settings()
        self.poll_s = poll_s
        self.worker = worker_name()
        self.shutdown = threading.Event()
        self._next_reap = 0.0

    # -- loop -------------------------------------------------------------------------------------
    def run_forever(self, max_jobs: int | None = None) -> None:
        log.info("%s: polling for %s jobs every %.1f s", self.worker, "/".join(KINDS), self.poll_s)
        done = 0
        while not self.shutdown.is_set() and (max_jobs is None or done < max_jobs):
            self.reap()
            try:
                job_id = self.claim()
            except Exception:  # database away: keep polling rather than exit (its jobs wait)
                log.warning("cannot claim jobs; retrying in %.1f s", self.poll_s, exc_info=True)
                job_id = None
            if job_id is None:
                self.shutdown.wait(self.poll_s)
                continue
            try:
                self.run_job(job_id)
            except Exception:  # e.g. the database went away mid-job: its lease expires, it is requeued
                log.exception("job %s: unexpected error in the trainer", job_id)
            done += 1

    def reap(self) -> None:
        """Requeue or fail stale jobs of any kind (every trainer does it; SKIP LOCKED makes it safe)."""
        if time.monotonic() < self._next_reap:
            return
        self._next_reap = time.monotonic() + max(1.0, min(self.settings.lease_s / 2, 30.0))
        try:
            requeued = jobs.reap_and_dispatch(self.settings.lease_s, self.settings.max_attempts)
            for job_id, kind in requeued:
                log.warning("job %s (%s) had a stale heartbeat: requeued", job_id, kind)
        except Exception:
            log.warning("stale-job reaper round failed", exc_info=True)

    def claim(self) -> int | None:
        with session_scope() as s:
            job = jobs.claim_job(s, KINDS, self.worker)
            return None if job is None else int(job.id)

    # -- one job ----------------------------------------------------------------------------------
    def run_job(self, job_id: int) -> str:
        """Run a claimed job to its end; returns the final status (or 'lost' / 'released')."""
        try:
            with session_scope() as s:
                job = jobs.get_job(s, job_id, lock=True)
                spec = build_spec(s, job, self.settings.artifacts_path, self.settings.device)
                resumed = (spec.out_dir / "last.pt").exists()
                jobs.update_job(s, job, result={"config": spec.cfg.to_dict(), **spec.info, "nproc": spec.nproc,
                                                "out_dir": self._rel(spec.out_dir)})
        except SpecError as exc:
            return self._finish(job_id, JobStatus.FAILED, error=str(exc))
        try:
            save_config(spec.cfg, spec.out_dir)  # next to last.pt, as `orl pretrain` writes it
        except OSError as exc:
            # An unwritable or full artifacts volume. Uncaught, this left the job running with
            # no heartbeat: requeued after each lease, claimed and crashed again, and finally
            # failed as "stopped sending heartbeats", which hid the cause.
            return self._finish(job_id, JobStatus.FAILED,
                                error=f"cannot write to the artifacts folder (ORL_ARTIFACTS_DIR) at {spec.out_dir}: "
                                      f"{exc}")
        log.info("job %s: %s stage %s, %s, preset %s, %d process(es)%s", job_id, spec.kind, spec.stage,
                 spec.info, spec.cfg.preset, spec.nproc, " (resuming from last.pt)" if resumed else "")
        with Heartbeat(job_id, self.settings.heartbeat_s, worker=self.worker) as lease:
            try:
                if spec.nproc > 1:
                    summary = self._run_torchrun(spec, lease)
                else:
                    summary = self._run_inline(spec, lease)
            except Exception as exc:
                if lease.lost.is_set():
                    return "lost"
                log.exception("job %s failed", job_id)
                self._record_skipped(spec)
                return self._finish(job_id, JobStatus.FAILED, error=f"training failed: {type(exc).__name__}: {exc}")
            lease.flush()
        self._retry_db("record skipped images", lambda: self._record_skipped(spec))
        if lease.lost.is_set():
            # Requeued while we were silent: another trainer owns it now; write nothing more.
            log.warning("job %s was taken over by another worker; stopping", job_id)
            return "lost"
        reached = summary["finished"] or (spec.max_steps is not None and summary["global_step"] >= spec.max_steps)
        if reached:
            ids = self._retry_db("record artifacts", lambda: self._record_artifacts(spec, summary))
            return self._finish(job_id, JobStatus.SUCCEEDED, result={**ids, "summary": _jsonable(summary)})
        if lease.cancel.is_set():
            ids = self._retry_db("record artifacts", lambda: self._record_artifacts(spec, summary))
            return self._finish(job_id, JobStatus.CANCELLED, result={**ids, "summary": _jsonable(summary)})
        if self.shutdown.is_set():
            self._release(job_id)
            return "released"
        return self._finish(job_id, JobStatus.FAILED, error=f"training stopped early at step {summary['global_step']} "
                                                    f"of {summary['total_steps']} without a cancel")

    def _run_inline(self, spec: RunSpec, lease: Heartbeat) -> dict[str, Any]:
        from orl.train import train

        return train(spec.stage, spec.images_root, spec.out_dir, spec.cfg, files=spec.files, corr=spec.corr,
                     init_from=spec.init_from, device=spec.device, show_progress=False,
                     on_progress=lambda m: _report(lease, spec.stage, m),
                     should_stop=lambda: lease.should_stop or self.shutdown.is_set(), max_steps=spec.max_steps)

    def _run_torchrun(self, spec: RunSpec, lease: Heartbeat) -> dict[str, Any]:
        """Data-parallel over spec.nproc processes (services.trainer.ddp_entry) on this host."""
        out = spec.out_dir
        out.mkdir(parents=True, exist_ok=True)
        files = {k: out / f"{k}.json" for k in ("progress", "summary")}
        stop_file = out / "STOP"
        for f in (*files.values(), stop_file):
            f.unlink(missing_ok=True)
        launch = {"stage": spec.stage, "images_root": spec.images_root, "out_dir": str(out),
                  "config": spec.cfg.to_dict(), "files": spec.files, "init_from": spec.init_from,
                  "max_steps": spec.max_steps, "device": spec.device, "stop_file": str(stop_file),
                  "progress_file": str(files["progress"]), "summary_file": str(files["summary"])}
        if spec.corr is not None:
            launch["pairs"] = str(out / "pairs.json")
            spec.corr.save(out / "pairs.json")  # also a record of exactly what was trained on
        (out / "launch.json").write_text(json.dumps(launch))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.nproc}",
               "-m", "services.trainer.ddp_entry", str(out / "launch.json")]
        log_path = out / "torchrun.log"
        with log_path.open("ab") as log_fh:
            proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                    cwd=str(Path(__file__).resolve().parents[2]))
            seen = 0
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    try:
                        st = files["progress"].stat().st_mtime_ns
                        if st != seen:
                            seen = st
                            _report(lease, spec.stage, json.loads(files["progress"].read_text()))
                    except (OSError, ValueError):
                        pass
                    if lease.should_stop or self.shutdown.is_set():
                        stop_file.touch()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise TrainerError(f"torchrun exited with code {proc.returncode}; last lines of {log_path}:\n"
                               + "\n".join(tail))
        return json.loads(files["summary"].read_text())

    # -- bookkeeping ------------------------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.settings.artifacts_path).as_posix()
        except ValueError:
            return str(path)

    def _record_skipped(self, spec: RunSpec) -> None:
        """Images that failed to decode mid-run (orl.data.SkipLog) become failed image rows, so the
        next job leaves them out and the API lists them with the reason."""
        from orl.data import SkipLog
        from orl.train import SKIP_LOG

        skipped = SkipLog(spec.out_dir / SKIP_LOG).read()
        if not skipped or spec.images_dataset_id is None:
            return
        stage = "stage 1" if spec.stage == "byol" else "stage 3"
        with session_scope() as s:
            n = mark_images_failed(s, spec.images_dataset_id, {f: f"skipped in {stage} training: {r}"
                                                               for f, r in skipped.items()})
        if n:
            log.warning("job %s: %d image(s) skipped in training, marked failed", spec.job_id, n)

    def _record_artifacts(self, spec: RunSpec, summary: dict[str, Any]) -> dict[str, int]:
        """One checkpoint (and backbone, when finished) artifact row per job; idempotent."""
        meta = {"config": spec.cfg.to_dict(), "preset": spec.cfg.preset, "global_step": summary["global_step"],
                "total_steps": summary["total_steps"], "finished": summary["finished"], "images": summary["images"]}
        out: dict[str, int] = {}
        with session_scope() as s:
            jobs.get_job(s, spec.job_id, lock=True)  # serialises against a concurrent copy of this
            for kind, name in (("checkpoint", "last.pt"), ("backbone", "backbone.pth")):
                path = spec.out_dir / name
                if path.exists():
                    out[f"{kind}_id"] = upsert_artifact(s, job_id=spec.job_id, dataset_id=spec.dataset_id, kind=kind,
                                                        stage=spec.stage, path=self._rel(path), meta=meta)
        return out

    def _retry_db(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried every second for up to DB_RETRY_S while the database is unreachable.

        For the end of a job, whose training is done: given up at once, the job was left running
        with no heartbeat, requeued by a reaper, and claimed again only to find last.pt finished
        and record it, one of ORL_MAX_ATTEMPTS spent on a database restart. No reaper acts
        within a lease of the database's start (jobs.reap_stale), so the retry records it first.
        """
        deadline = time.monotonic() + DB_RETRY_S
        while True:
            try:
                return fn()
            except DatabaseError as exc:
                if time.monotonic() > deadline or self.shutdown.is_set():
                    raise
                log.warning("cannot %s: the database is unreachable; retrying (%s)", what,
                            str(exc.orig or exc).splitlines()[0])
                self.shutdown.wait(1.0)

    def _finish(self, job_id: int, status: str, *, error: str | None = None, result: dict | None = None) -> str:
        def record() -> list[tuple[int, str]]:
            nonlocal result
            with session_scope() as s:
                job = jobs.get_job(s, job_id)
                if result is not None:
                    result = {**(job.result or {}), **result}
                return jobs.finish_job(s, job_id, status, error=error, result=result, worker=self.worker)

        try:
            nxt = self._retry_db(f"record the end of job {job_id}", record)
        except jobs.InvalidTransition as exc:
            log.warning("job %s: %s", job_id, exc)
            return "lost"
        log.info("job %s %s%s", job_id, status, f": {error}" if error else "")
        self._dispatch_next(nxt)  # a pipeline's next stage (mine: a Celery task)
        return status

    def _dispatch_next(self, nxt: list[tuple[int, str]], wait_s: float = 30.0) -> None:
        """Send the next stage; while the broker is down, retry for ``wait_s`` (a restart takes
        seconds), then fail that stage with the reason, as the API does with a job it cannot send.

        The stage's row is committed before this (its worker must find it), so a send that
        raised used to leave it queued with no task, and its pipeline running, forever.
        """
        deadline = time.monotonic() + wait_s
        while nxt:
            try:
                broker.dispatch_all(nxt)
                return
            except Exception as exc:  # kombu raises several types when Redis is down
                if time.monotonic() < deadline and not self.shutdown.is_set():
                    log.warning("cannot reach the broker to start job(s) %s; retrying: %s", [j for j, _ in nxt], exc)
                    self.shutdown.wait(2.0)
                    continue
                for next_id, _ in nxt:
                    try:
                        with session_scope() as s:
                            jobs.finish_job(s, next_id, JobStatus.FAILED, error=(
                                f"could not reach the broker to start the job for {wait_s:g} s: "
                                f"{type(exc).__name__}: {exc}; check ORL_BROKER_URL / Redis, then submit the "
                                "pipeline again"))
                    except jobs.InvalidTransition:  # cancelled meanwhile
                        pass
                log.error("job(s) %s failed: the broker is unreachable", [j for j, _ in nxt])
                return

    def _release(self, job_id: int) -> None:
        """Give a job back on a clean shutdown, so another trainer resumes it without waiting
        for the lease to expire."""
        with session_scope() as s:
            status = jobs.release_job(s, job_id, self.worker)
        if status:
            log.info("job %s %s (shutdown of %s)", job_id, status, self.worker)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def _die_with_parent() -> None:
    """In the torchrun child: get SIGTERM when the trainer dies, even by kill -9, so a dead
    trainer never leaves ranks training (and writing last.pt) behind its requeued job."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def install_signal_handlers(trainer: Trainer) -> None:
    """SIGTERM/SIGINT: stop at the next step, checkpoint, give the job back, exit. Twice: exit now."""

    def handler(signum, frame):
        if trainer.shutdown.is_set():
            raise SystemExit(128 + signum)
        log.info("signal %d: finishing the current step, then exiting", signum)
        trainer.shutdown.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
