"""Faults the services must survive (issue 3), with real processes killed by SIGKILL.

- A miner worker killed in the middle of a mining job (twice: during selective search and
  during RoI pairing), replaced by a fresh worker: the job finishes and its pairs equal an
  undisturbed run on the same photos, none lost, none duplicated.
- A trainer killed mid-epoch and restarted: it resumes from its last checkpoint at the same
  schedule position (same epoch, step and learning rate) and finishes.
- A job whose worker vanished is never left running: it is requeued (a mine job is re-sent and
  finishes), or, past ORL_MAX_ATTEMPTS, failed with an error that says what happened.

Timeouts are short (procs.FAST_TIMEOUTS: visibility 10 s, heartbeat 0.5 s, lease 4 s).
"""

from __future__ import annotations

import csv
import time
import uuid
from pathlib import Path

import pytest

from orl.checkpoint import load_checkpoint
from orl.schedules import lr_by_epoch_at, peak_lr
from services.common import broker, jobs
from services.common.db import session_scope
from services.common.models import TERMINAL_STATUSES
from tests.services import procs


@pytest.fixture(scope="module")
def env(settings_env, tmp_path_factory):
    with procs.isolated_env(settings_env, tmp_path_factory.mktemp("faults-env")) as e:
        yield e


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fault-logs")


@pytest.fixture
def started(env, log_dir):
    """Start workers through this; every one is stopped at the end of the test, dead or alive."""
    with procs.workers(env, log_dir) as start:
        yield start


def _folder(env, n: int, offset: int = 0) -> Path:
    folder = env.data_root / f"faults-{uuid.uuid4().hex[:8]}"
    procs.copy_photos(folder, n, offset)
    return folder


@pytest.fixture(scope="module")
def checkpoint_id(env) -> int:
    return procs.make_checkpoint(env.images_dir, env.artifacts_dir)


def _mine(dataset_id: int, checkpoint_id: int) -> int:
    job_id = procs.create_job("mine", dataset_id, {"checkpoint_id": checkpoint_id})
    broker.send_mine(job_id)
    return job_id


def test_killed_miner_worker_the_job_finishes_with_identical_pairs(env, started, checkpoint_id):
    # Two folders with the same 9 photos: 3 selective-search shards and 3 pair shards each.
    ref_ds, ds = procs.register_dataset(_folder(env, 9)), procs.register_dataset(_folder(env, 9))
    w1 = started("miner", "w1")
    ref = _mine(ref_ds, checkpoint_id)
    assert procs.wait_job(ref, 180, [w1])["status"] == "succeeded"

    job = _mine(ds, checkpoint_id)
    # 1. SIGKILL in the middle of selective search (some images done, not all).
    procs.wait_job(job, 120, [w1], pred=lambda r: (r["progress"] or {}).get("stage") == "propose"
                   and 2 <= r["progress_done"] < r["progress_total"], )
    w1.kill9()
    assert procs.job_row(job)["status"] == "running"
    w2 = started("miner", "w2")
    # 2. SIGKILL again once pairing has started.
    procs.wait_job(job, 120, [w2], pred=lambda r: (r["progress"] or {}).get("stage") == "pairs"
                   or r["status"] in TERMINAL_STATUSES)
    interrupted = procs.job_row(job)
    w2.kill9()
    w3 = started("miner", "w3")
    row = procs.wait_job(job, 180, [w3])
    assert row["status"] == "succeeded", row["error"]
    assert interrupted["status"] not in TERMINAL_STATUSES, "the second kill came too late to interrupt the job"

    # (Recovery: the broker redelivers the killed worker's unacked shard after the visibility
    # timeout, and the next worker also takes the shards still queued; if the job's heartbeat
    # goes stale first, the reaper re-sends it. Either way every step is idempotent.)
    expected, got = procs.pair_set(ref), procs.pair_set(job)  # pair_set asserts no duplicates
    assert len(got) == len(expected) == procs.job_row(ref)["result"]["pairs"] > 0
    assert set(got) == set(expected)
    assert max(abs(got[k] - expected[k]) for k in got) < 1e-5


def test_killed_trainer_resumes_mid_epoch_at_the_same_position(env, started):
    folder = _folder(env, 12)
    ds = procs.register_dataset(folder)
    # 12 photos, batch 2: 6 steps per epoch, 2 epochs, a checkpoint every 2 steps. Larger images
    # than the tiny preset's, so a step takes long enough to kill between two checkpoints.
    params = {"preset": "tiny", "batch_size": 2, "epochs": 2, "checkpoint_every_steps": 2,
              "set": {"augment.image_size": 128}}
    job = procs.create_job("pretrain", ds, params)
    t1 = started("trainer", "t1")
    procs.wait_job(job, 120, [t1], pred=lambda r: (r["progress"] or {}).get("global_step", 0) >= 3)
    t1.kill9()
    out = env.artifacts_dir / "jobs" / str(job)
    pos = load_checkpoint(out / "last.pt")["position"]
    # Killed mid-epoch: the last checkpoint is inside epoch 0 (2 or 4 steps of 6 done).
    assert pos["epoch"] == 0 and 0 < pos["step_in_epoch"] < pos["steps_per_epoch"], pos
    rows_before = len(_metrics(out))
    assert procs.job_row(job)["status"] == "running"

    t2 = started("trainer", "t2")
    row = procs.wait_job(job, 180, [t2])
    assert row["status"] == "succeeded", row["error"]
    assert row["attempts"] == 2
    assert "resuming from last.pt" in t2.log()
    metrics = _metrics(out)
    resumed = metrics[rows_before:]
    # The restarted trainer continued from the checkpoint's position, not from the start...
    first = resumed[0]
    assert (int(first["epoch"]), int(first["step"]), int(first["global_step"])) == (
        pos["epoch"], pos["step_in_epoch"] + 1, pos["global_step"] + 1)
    assert [int(r["global_step"]) for r in resumed] == list(range(pos["global_step"] + 1, 13))
    # ...with the same schedule: every step's learning rate is the schedule's value at that step.
    lr_peak, epochs = peak_lr(get_lr_base(), 2), 2
    for r in metrics:
        expected = lr_by_epoch_at(int(r["epoch"]), int(r["global_step"]) - 1, epochs, 0, lr_peak)
        assert float(r["lr"]) == pytest.approx(expected, rel=1e-5)
    final = load_checkpoint(out / "last.pt")["position"]
    assert final["finished"] and final["global_step"] == 12 and final["epoch"] == 2


def get_lr_base() -> float:
    from orl.config import get_preset

    return get_preset("tiny").train.base_lr


def _metrics(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_a_job_whose_worker_vanished_is_requeued_or_failed(env, started, checkpoint_id):
    folder = _folder(env, 3, offset=12)
    ds = procs.register_dataset(folder)
    # A mine job taken by a worker that then vanished, its message lost with it: only the
    # stale-job reaper can notice. It requeues the job and re-sends it, and a worker finishes it.
    mine = procs.create_job("mine", ds, {"checkpoint_id": checkpoint_id})
    with session_scope() as s:
        jobs.start_job(s, mine, "miner@vanished-host:1")
    t0 = time.monotonic()
    miner = started("miner", "w-reaper")
    row = procs.wait_job(mine, 120, [miner])
    assert row["status"] == "succeeded" and row["attempts"] == 2
    assert "miner@vanished-host:1" in row["progress"]["requeued_after"]
    miner.stop()  # its reaper would requeue the next job (it allows the default 3 attempts)

    # A training job claimed by a trainer that vanished, on a system allowing one attempt.
    train = procs.create_job("pretrain", ds, {"preset": "tiny", "batch_size": 2})
    with session_scope() as s:
        assert jobs.claim_job(s, ["pretrain"], "trainer@vanished-host:1").id == train
    trainer = started("trainer", "t-reaper", ORL_MAX_ATTEMPTS=1)
    row = procs.wait_job(train, 60, [trainer])
    assert row["status"] == "failed"
    assert "trainer@vanished-host:1 stopped sending heartbeats" in row["error"]
    assert "giving up after 1" in row["error"]
    assert time.monotonic() - t0 < 90 * procs.TIMEOUT_SCALE  # worker starts included: stretched on a busy machine


def test_a_job_waiting_in_the_queue_is_not_taken_for_dead(env, started, checkpoint_id):
    """Its shards wait for a cpu worker for several leases: no heartbeat from any task, yet the
    job is not requeued (the miners' keep-alive sees its messages in the queue)."""
    ds = procs.register_dataset(_folder(env, 3, offset=16))
    gpu_only = procs.start_miner(procs.service_env(env), env.artifacts_dir.parent, "w-gpu", queues="gpu")
    try:
        job = _mine(ds, checkpoint_id)
        procs.wait_job(job, 60, [gpu_only], pred=lambda r: r["status"] == "running")
        time.sleep(2.5 * float(procs.FAST_TIMEOUTS["ORL_LEASE_S"]))
        row = procs.job_row(job)
        assert (row["status"], row["attempts"]) == ("running", 1)
        cpu = started("miner", "w-cpu")
        row = procs.wait_job(job, 120, [gpu_only, cpu])
    finally:
        gpu_only.stop()
    assert (row["status"], row["attempts"]) == ("succeeded", 1)


def test_a_trainer_stopped_with_sigterm_gives_its_job_back(env, started):
    """A deploy or scale-down: the trainer checkpoints, requeues its job at once (no lease wait)."""
    ds = procs.register_dataset(_folder(env, 8))
    job = procs.create_job("pretrain", ds, {"preset": "tiny", "batch_size": 2, "epochs": 100})
    t = started("trainer", "t-term")
    procs.wait_job(job, 60, [t], pred=lambda r: (r["progress"] or {}).get("global_step", 0) >= 2)
    t.popen.send_signal(15)
    t.popen.wait(30)
    row = procs.job_row(job)
    assert row["status"] == "queued" and row["progress"]["released_by"].startswith("trainer@")
    pos = load_checkpoint(env.artifacts_dir / "jobs" / str(job) / "last.pt")["position"]
    assert pos["global_step"] >= row["progress"]["global_step"] >= 2  # saved where it stopped
    with session_scope() as s:
        jobs.cancel_job(s, job)
