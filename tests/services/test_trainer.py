"""The trainer: real ``python -m services.trainer`` processes on a real database, real photos.

Covers stage 1 and stage 3 (a whole pipeline: pretrain -> mine on a real Celery worker ->
train on the mined pairs read from the database), progress and cancel, the torchrun path on CPU
(gloo, 2 processes), and two trainers sharing one queue as two hosts would.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from orl.checkpoint import load_checkpoint
from orl.config import get_preset
from services.common import broker, jobs
from services.common.db import session_scope
from services.common.models import Artifact, Job
from services.trainer.spec import SpecError, build_config
from tests.services import procs

TINY = {"preset": "tiny", "batch_size": 2}


@pytest.fixture(scope="module")
def env(settings_env, tmp_path_factory):
    with procs.isolated_env(settings_env, tmp_path_factory.mktemp("trainer-env")) as e:
        yield e


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer-logs")


@pytest.fixture(scope="module")
def trainer(env, log_dir):
    proc = procs.start_trainer(procs.service_env(env), log_dir, "trainer-a")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dataset(env) -> int:
    folder = env.data_root / f"trainer-{uuid.uuid4().hex[:8]}"
    procs.copy_photos(folder, 8)
    return procs.register_dataset(folder)


def _artifact(artifact_id: int) -> Artifact:
    with session_scope() as s:
        return s.get(Artifact, artifact_id)


def test_training_parameters_name_what_to_change():
    cfg = build_config({"preset": "tiny", "epochs": 3, "set": {"augment.image_size": 96}}, get_preset("cpu"))
    assert (cfg.preset, cfg.train.epochs, cfg.augment.image_size) == ("tiny", 3, 96)
    with pytest.raises(SpecError, match="unknown training parameter.*epoch.*valid:.*epochs"):
        build_config({"epoch": 3}, get_preset("tiny"))
    with pytest.raises(SpecError, match="unknown preset"):
        build_config({"preset": "huge"}, get_preset("tiny"))
    with pytest.raises(SpecError, match="augment.size"):
        build_config({"set": {"augment.size": 3}}, get_preset("tiny"))


def test_pretrain_job_reports_progress_and_records_its_checkpoint(env, dataset, trainer):
    job_id = procs.create_job("pretrain", dataset, {**TINY, "epochs": 2})
    seen: list[dict] = []
    row = procs.wait_job(job_id, 120, [trainer], pred=lambda r: seen.append(r["progress"]) or
                         r["status"] in ("succeeded", "failed"))
    assert row["status"] == "succeeded", row["error"]
    # Progress as the job ran: epoch, step, loss, images/s and ETA, and done/total in steps.
    mid = [p for p in seen if p.get("global_step")]
    assert mid and {"epoch", "step", "loss", "images_per_s", "eta_s", "total_steps"} <= set(mid[0])
    assert row["progress_done"] == row["progress_total"] == 8
    # The checkpoint is an artifact (what a mine job's checkpoint_id names), with its config.
    art = _artifact(row["result"]["checkpoint_id"])
    assert (art.kind, art.stage, art.job_id) == ("checkpoint", "byol", job_id)
    ck = load_checkpoint(env.artifacts_dir / art.path)
    assert ck["position"]["finished"] and ck["position"]["global_step"] == 8
    assert art.meta["config"]["train"]["epochs"] == 2
    assert _artifact(row["result"]["backbone_id"]).kind == "backbone"


def test_default_preset_is_decided_by_the_trainer_and_recorded(env, dataset, trainer):
    """No preset: the trainer applies the one default rule on its device (cpu here), records the
    resolved configuration in the job (GET /jobs/{id} shows it) and writes config.yaml."""
    from fastapi.testclient import TestClient

    from orl.config import CONFIG_FILE, apply_overrides, read_config_file
    from services.api.main import create_app

    params = {"epochs": 1, "max_steps": 1, "set": {"train": {"batch_size": 2, "num_workers": 0},
                                                   "augment.image_size": 64, "mine.ss_max_side_px": None}}
    job_id = procs.create_job("pretrain", dataset, params)
    row = procs.wait_job(job_id, 120, [trainer])
    assert row["status"] == "succeeded", row["error"]
    expected = apply_overrides(get_preset("cpu"), {"train.epochs": 1, "train.batch_size": 2, "train.num_workers": 0,
                                                   "augment.image_size": 64, "mine.ss_max_side_px": None})
    with TestClient(create_app()) as client:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["config"] == job["result"]["config"] == expected.to_dict()
    assert job["result"]["preset_from"] == "default rule: cpu on cpu"
    preset, over = read_config_file(env.artifacts_dir / job["result"]["out_dir"] / CONFIG_FILE)
    assert apply_overrides(get_preset(preset), over) == expected


def test_cancel_stops_training_at_the_next_step(env, dataset, trainer):
    job_id = procs.create_job("pretrain", dataset, {**TINY, "epochs": 100})
    procs.wait_job(job_id, 60, [trainer], pred=lambda r: (r["progress"] or {}).get("global_step", 0) >= 2)
    with session_scope() as s:
        jobs.cancel_job(s, job_id)
    row = procs.wait_job(job_id, 30, [trainer])
    assert row["status"] == "cancelled"
    ck = load_checkpoint(env.artifacts_dir / _artifact(row["result"]["checkpoint_id"]).path)
    assert 2 <= ck["position"]["global_step"] < 400 and not ck["position"]["finished"]


def test_torchrun_two_processes_on_cpu_with_gloo(env, dataset, trainer):
    """nproc=2: DDP over 2 CPU processes; the replicas stay identical (gradients averaged)."""
    job_id = procs.create_job("pretrain", dataset, {**TINY, "epochs": 2, "nproc": 2, "device": "cpu"})
    row = procs.wait_job(job_id, 180, [trainer])
    assert row["status"] == "succeeded", row["error"]
    summary = row["result"]["summary"]
    # 8 images over 2 ranks, batch 2 per rank: 2 steps per epoch.
    assert (summary["world"], summary["global_step"], summary["finished"]) == (2, 4, True)
    assert summary["replica_max_abs_diff"] == 0.0
    assert row["progress_done"] == 4
    ck = load_checkpoint(env.artifacts_dir / _artifact(row["result"]["checkpoint_id"]).path)
    assert ck["position"]["global_step"] == 4


def test_pipeline_runs_pretrain_mine_train(env, dataset, trainer, log_dir):
    """Stage 3 reads the pairs the miner wrote to the database."""
    miner = procs.start_miner(procs.service_env(env), log_dir, "pipeline-miner")
    try:
        params = {"pretrain": {**TINY, "batch_size": 4}, "mine": {"knn_k": 3}, "train": {"batch_size": 4}}
        with session_scope() as s:
            created = jobs.create_job(s, kind="pipeline", dataset_id=dataset, params=params)
            pipe_id, to_dispatch = created.job.id, created.to_dispatch
        for job_id, kind in to_dispatch:
            broker.dispatch(job_id, kind)
        row = procs.wait_job(pipe_id, 240, [trainer, miner])
        assert row["status"] == "succeeded", row["error"]
    finally:
        miner.stop()
    with session_scope() as s:
        kids = {j.kind: j for j in s.execute(select(Job).where(Job.parent_id == pipe_id)).scalars()}
        assert {k: j.status for k, j in kids.items()} == {"pretrain": "succeeded", "mine": "succeeded",
                                                         "train": "succeeded"}
        mine, train = kids["mine"], kids["train"]
        assert mine.params["checkpoint_id"] == kids["pretrain"].result["checkpoint_id"]
        assert mine.result["plan"]["mine"]["knn_k"] == 3
        assert train.result["mine_job_id"] == mine.id and train.result["pairs"] == mine.result["pairs"] > 0
        art = s.get(Artifact, train.result["checkpoint_id"])
        assert (art.kind, art.stage) == ("checkpoint", "orl")
    ck = load_checkpoint(env.artifacts_dir / art.path)
    assert ck["stage"] == "orl" and ck["position"]["finished"]


def test_two_trainers_share_one_queue(env, dataset, trainer, log_dir):
    """As trainers on two hosts would (same database and artifact volume): each job runs once."""
    second = procs.start_trainer(procs.service_env(env), log_dir, "trainer-b")
    try:
        procs.wait_for(lambda: "polling" in second.log(), 60, "trainer-b to start")
        ids = [procs.create_job("pretrain", dataset, {**TINY, "epochs": 3}) for _ in range(2)]
        rows = [procs.wait_job(j, 120, [trainer, second]) for j in ids]
    finally:
        second.stop()
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"]
    assert rows[0]["worker"] != rows[1]["worker"] and all(r["attempts"] == 1 for r in rows)
