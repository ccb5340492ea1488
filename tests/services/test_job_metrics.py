"""GET /api/v1/jobs/{id}/metrics: a training job's curves, read from its run folder on the
artifacts volume (real Postgres; the files as orl.train writes them), and the progress keys the
trainer reports from them."""

from __future__ import annotations

import uuid

import pytest

from orl.runlog import METRICS_COLUMNS, MONITOR_COLUMNS, metrics_row
from services.common.models import Dataset, Job

API = "/api/v1"


def write_run(run_dir, steps: int = 6, monitored=(3, 6)) -> None:
    """metrics.csv and monitor.csv as orl.train writes them: a step row each, a row per monitored step."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [metrics_row({"epoch": (s - 1) // 3, "step": (s - 1) % 3 + 1, "global_step": s, "lr": 0.1 * s,
                         "momentum": 0.99, "loss": 4.0 - 0.5 * s, "loss_global": 4.0 - 0.5 * s,
                         "images_per_s": 10.0, "time": 1.0}) for s in range(1, steps + 1)]
    (run_dir / "metrics.csv").write_text(
        "\n".join([",".join(METRICS_COLUMNS), *(",".join(r.values()) for r in rows)]) + "\n")
    mon = [[str(s // 3), str(s), str(0.1 * s), "0.125", str(1.5 * s), "7", "8", "0.5"] for s in monitored]
    (run_dir / "monitor.csv").write_text("\n".join([",".join(MONITOR_COLUMNS), *(",".join(r) for r in mon)]) + "\n")


@pytest.fixture
def training_job(db_session, settings_env):
    """A dataset row and a running pretrain job whose result names its run folder (relative to
    the artifacts volume, as the trainer records it)."""
    ds = Dataset(name=f"metrics-{uuid.uuid4().hex[:8]}", path=str(settings_env.images_dir))
    db_session.add(ds)
    db_session.flush()
    rel = f"jobs/metrics-{uuid.uuid4().hex[:8]}"
    job = Job(kind="pretrain", dataset_id=ds.id, status="running", params={"preset": "tiny"},
              result={"out_dir": rel}, progress={"epoch": 1, "view_top1": 0.6, "monitor_epoch": 2})
    queued = Job(kind="train", dataset_id=ds.id, status="queued", params={})
    mine = Job(kind="mine", dataset_id=ds.id, status="succeeded", params={})
    db_session.add_all([job, queued, mine])
    db_session.commit()
    return {"job": job.id, "queued": queued.id, "mine": mine.id, "dataset": ds.id,
            "dir": settings_env.artifacts_dir / rel}


def test_job_metrics_reads_the_run_folder_thinned_and_typed(api_client, training_job):
    write_run(training_job["dir"])
    r = api_client.get(f"{API}/jobs/{training_job['job']}/metrics")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "pretrain" and body["status"] == "running" and body["steps_logged"] == 6
    assert [s["global_step"] for s in body["steps"]] == [1, 2, 3, 4, 5, 6]
    assert body["steps"][0]["loss"] == pytest.approx(3.5) and body["steps"][0]["loss_intra"] is None
    assert [(m["epoch"], m["global_step"]) for m in body["monitor"]] == [(1, 3), (2, 6)]
    assert body["monitor"][1]["effective_rank"] == pytest.approx(9.0) and body["note"] is None
    thin = api_client.get(f"{API}/jobs/{training_job['job']}/metrics", params={"max_points": 3}).json()
    assert [s["global_step"] for s in thin["steps"]] == [1, 3, 6] and thin["steps_logged"] == 6
    # The latest signals are in the job itself too (the trainer reports them as progress).
    job = api_client.get(f"{API}/jobs/{training_job['job']}").json()
    assert job["progress"]["view_top1"] == 0.6 and job["progress"]["monitor_epoch"] == 2


def test_job_metrics_before_the_run_and_for_other_kinds(api_client, training_job):
    queued = api_client.get(f"{API}/jobs/{training_job['queued']}/metrics").json()
    assert queued["steps"] == [] and queued["monitor"] == [] and "not been claimed" in queued["note"]
    empty = api_client.get(f"{API}/jobs/{training_job['job']}/metrics").json()  # the folder is not there yet
    assert empty["steps"] == [] and empty["note"]
    r = api_client.get(f"{API}/jobs/{training_job['mine']}/metrics")
    assert r.status_code == 409 and "pretrain and train jobs" in r.json()["detail"]
    assert api_client.get(f"{API}/jobs/987654321/metrics").status_code == 404
    assert api_client.get(f"{API}/jobs/{training_job['job']}/metrics", params={"max_points": 1}).status_code == 422


def test_job_metrics_never_reads_outside_the_artifacts_volume(api_client, training_job, tmp_path):
    outside = tmp_path / "elsewhere"
    write_run(outside)
    training_job["dir"].mkdir(parents=True)
    (training_job["dir"] / "metrics.csv").symlink_to(outside / "metrics.csv")
    body = api_client.get(f"{API}/jobs/{training_job['job']}/metrics").json()
    assert body["steps"] == [] and "outside the artifacts volume" in body["note"]


def test_the_trainer_reports_the_latest_signals_as_job_progress():
    from services.trainer.runner import _report

    class Beat:
        def report(self, **kw):
            self.kw = kw

    beat = Beat()
    step = {"epoch": 2, "step": 1, "global_step": 7, "total_steps": 12, "loss": 1.5, "lr": 0.1, "momentum": 0.99,
            "view_top1": 0.4, "view_top1_chance": 0.125, "effective_rank": 5.2, "effective_rank_max": 7,
            "monitor_epoch": 2}
    _report(beat, "byol", step)  # type: ignore[arg-type]
    assert beat.kw["done"] == 7 and beat.kw["total"] == 12
    progress = beat.kw["progress"]
    assert {k: progress[k] for k in ("view_top1", "effective_rank", "monitor_epoch")} == {
        "view_top1": 0.4, "effective_rank": 5.2, "monitor_epoch": 2}
    assert "momentum" not in progress and progress["stage"] == "byol"
