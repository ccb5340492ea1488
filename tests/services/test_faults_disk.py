"""A full disk and an unwritable artifacts folder (issue 11): a clear job error, no crash loop, and
no partial checkpoint that a later resume would load.

The tests run as root, so file modes do not stop a write. Instead:
- full disk: the trainer's ORL_ARTIFACTS_DIR is a tmpfs mount of 1.5 checkpoints (real ENOSPC
  in the middle of the second checkpoint); where mounting is not allowed, the trainer runs
  under RLIMIT_FSIZE of half a checkpoint (EFBIG on the first one);
- unwritable folder: ORL_ARTIFACTS_DIR is a path below a regular file (ENOTDIR on every
  mkdir/open), for the trainer and for the miner (whose checkpoint is then registered by
  absolute path, so it can still be read).
"""

from __future__ import annotations

import resource
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from orl.checkpoint import load_checkpoint
from services.common import broker
from services.common.db import session_scope
from services.common.models import Artifact
from tests.services import procs, servers
from tests.services.reliability import record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(settings_env, tmp_path_factory):
    with servers.private_broker_env(settings_env, tmp_path_factory.mktemp("disk-env")) as e:
        yield e


@pytest.fixture(scope="module")
def checkpoint(env) -> tuple[int, Path]:
    """A tiny stage-1 checkpoint (id, file): its size sizes the full disk."""
    art_id = procs.make_checkpoint(env.images_dir, env.artifacts_dir)
    with session_scope() as s:
        path = env.artifacts_dir / s.get(Artifact, art_id).path
    return art_id, path


@pytest.fixture
def started(env, tmp_path):
    """Start workers through this; every one is stopped at the end of the test, dead or alive."""
    with procs.workers(env, tmp_path) as start:
        yield start


def _folder(env, n: int) -> Path:
    folder = env.data_root / f"disk-{uuid.uuid4().hex[:8]}"
    procs.copy_photos(folder, n)
    return folder


@contextmanager
def _tmpfs(size: int) -> Iterator[Path | None]:
    """A tmpfs of ``size`` bytes mounted at a fresh folder, or None where mounting is refused."""
    mnt = Path(f"/tmp/orl-full-{uuid.uuid4().hex[:8]}")
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                        capture_output=True).returncode == 0
    try:
        yield mnt if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def _no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def _failed_error(job: int, worker: procs.Proc) -> str:
    """The error of ``job`` once it has failed (the test fails if it ends any other way)."""
    row = procs.wait_job(job, 300, [worker])
    assert row["status"] == "failed", row
    return row["error"]


def _no_crash_loop(job: int, worker: procs.Proc) -> None:
    """Well past the lease, the failed job was not retried and its worker lives on."""
    time.sleep(3 * float(procs.FAST_TIMEOUTS["ORL_LEASE_S"]))
    row = procs.job_row(job)
    assert (row["status"], row["attempts"]) == ("failed", 1), row
    assert worker.alive(), worker.log()[-3000:]


def test_full_disk_fails_the_training_job_clearly_and_keeps_the_last_checkpoint(env, started, checkpoint):
    size = checkpoint[1].stat().st_size
    ds = procs.register_dataset(_folder(env, 8))
    # 8 photos, batch 2: 4 steps per epoch, a checkpoint every 2 steps.
    params = {"preset": "tiny", "batch_size": 2, "epochs": 3, "checkpoint_every_steps": 2}
    with _tmpfs(int(1.5 * size) + 2_000_000) as mnt:
        if mnt is not None:
            artifacts, preexec, how = mnt, None, "tmpfs"
        else:
            artifacts, how = env.artifacts_dir / "fsize", "RLIMIT_FSIZE"
            limit = size // 2

            def preexec():
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        t = started("trainer", "t-full", preexec=preexec, ORL_ARTIFACTS_DIR=artifacts)
        job = procs.create_job("pretrain", ds, params)
        err = _failed_error(job, t)
        out = artifacts / "jobs" / str(job)
        assert ("No space left on device" if how == "tmpfs" else "File too large") in err, err
        assert "last.pt" in err and "cannot write" in err, err
        # The last complete checkpoint is still there (tmpfs: step 2's) and loads; no temp file.
        assert _no_temp_files(out) == []
        if how == "tmpfs":
            assert "the previous file is unchanged" in err
            assert load_checkpoint(out / "last.pt")["position"]["global_step"] == 2
        else:
            assert not (out / "last.pt").exists()
        _no_crash_loop(job, t)
        assert t.log().count(f"job {job}: pretrain stage") == 1  # claimed once
        if how == "tmpfs":
            # Space freed (the volume grown): the same trainer runs the job submitted again.
            subprocess.run(["mount", "-o", f"remount,size={4 * size}", str(mnt)], check=True)
            again = procs.create_job("pretrain", ds, params)
            row = procs.wait_job(again, 300, [t])
            assert row["status"] == "succeeded", row["error"]
            assert load_checkpoint(artifacts / "jobs" / str(again) / "last.pt")["position"]["finished"]
        t.stop()
    record("full_disk_training", {"how": how, "checkpoint_mb": round(size / 1e6, 1), "error": err,
                                  "resubmitted_after_space_freed": how == "tmpfs"})


def _unwritable(env) -> Path:
    """An artifacts folder no process can create: its parent is a regular file."""
    blocker = env.artifacts_dir / f"blocker-{uuid.uuid4().hex[:6]}"
    blocker.write_text("a regular file where a folder should be\n")
    return blocker / "artifacts"


def test_unwritable_artifacts_folder_fails_the_training_job_clearly(env, started):
    ds = procs.register_dataset(_folder(env, 4))
    t = started("trainer", "t-unwritable", ORL_ARTIFACTS_DIR=_unwritable(env))
    job = procs.create_job("pretrain", ds, {"preset": "tiny", "batch_size": 2})
    err = _failed_error(job, t)
    assert "Not a directory" in err and "artifacts" in err, err
    _no_crash_loop(job, t)
    record("unwritable_artifacts_training", {"error": err})


def test_unwritable_artifacts_folder_fails_the_mining_job_clearly(env, started, checkpoint):
    art_id, ckpt_file = checkpoint
    # The checkpoint stays readable (by absolute path) while nothing can be written.
    with session_scope() as s:
        art = s.get(Artifact, art_id)
        absolute = Artifact(kind="checkpoint", stage="byol", path=str(ckpt_file), meta=dict(art.meta))
        s.add(absolute)
        s.flush()
        abs_id = absolute.id
    ds = procs.register_dataset(_folder(env, 4))
    w = started("miner", "w-unwritable", ORL_ARTIFACTS_DIR=_unwritable(env))
    job = procs.create_job("mine", ds, {"checkpoint_id": abs_id})
    broker.send_mine(job)
    err = _failed_error(job, w)
    # Since the one path resolver (services/common/paths.py) landed, a worker refuses a checkpoint
    # outside its own artifacts volume before it tries to write there: this setup's checkpoint
    # lies outside the unwritable one, so either clear refusal is the expected end.
    assert ("Not a directory" in err or "PathRefused" in err) and "artifacts" in err, err
    _no_crash_loop(job, w)
    record("unwritable_artifacts_mining", {"error": err})
