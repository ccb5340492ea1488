"""Registering a folder is a job: POST /datasets answers at once, a real Celery miner worker on the
cpu queue (the ``registrar`` fixture) lists the folder and checksums the files, reporting progress.

Folders of a few thousand tiny PNGs (plus junk) keep the job running long enough to watch it:
the request does not scan, so its time does not grow with the folder.
"""

from __future__ import annotations

import io
import math
import shutil
import time
import uuid
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import func, select

from services.common.db import session_scope
from services.common.models import Image, Job
from tests.services import procs

API = "/api/v1"
N_FILES = 4000
POST_LIMIT_S = 1.0  # "at once": the time of any small request on a loaded machine, not of a scan


def _png() -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (40, 40), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(settings_env, n: int) -> Path:
    """n tiny PNGs in 10 subfolders, a zero-byte file and a text file named .jpg."""
    folder = settings_env.data_root / f"reg-{uuid.uuid4().hex[:8]}"
    data = _png()
    for i in range(n):
        sub = folder / f"part{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i:05d}.png").write_bytes(data)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a photo")
    return folder


def _post(api_client, auth_headers, folder: Path, name: str | None = None):
    t0 = time.perf_counter()
    r = api_client.post(f"{API}/datasets", json={"name": name or folder.name, "path": str(folder)},
                        headers=auth_headers)
    return r, time.perf_counter() - t0


def _job(api_client, job_id: int) -> dict:
    r = api_client.get(f"{API}/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _watch(api_client, job_id: int, timeout_s: float, registrar) -> list[dict]:
    """Snapshots of the job (every 20 ms) until it finishes."""
    seen, deadline = [], time.monotonic() + timeout_s
    while True:
        job = _job(api_client, job_id)
        seen.append(job)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return seen
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}:\n{registrar.log()[-3000:]}"
        time.sleep(0.02)


def test_a_large_folder_is_accepted_at_once_and_its_job_reports_progress(api_client, auth_headers, settings_env,
                                                                         registrar):
    # A small folder first: the app's first POST also connects to the database and the broker.
    small, small_s = _post(api_client, auth_headers, _folder(settings_env, 3))
    procs.registered(api_client, small, 600, [registrar])
    small, small_s = _post(api_client, auth_headers, _folder(settings_env, 3))
    procs.registered(api_client, small, 600, [registrar])
    folder = _folder(settings_env, N_FILES)
    r, post_s = _post(api_client, auth_headers, folder)
    assert r.status_code == 202, r.text
    ds = r.json()
    job_id = ds["registration"]["job_id"]
    assert ds["status"] == "registering" and ds["counts"]["images"] < N_FILES
    assert r.headers["Location"] == f"/api/v1/jobs/{job_id}"
    seen = _watch(api_client, job_id, 900, registrar)
    final = seen[-1]
    assert final["status"] == "succeeded", final["error"]
    job_s = (_ts(final["finished_at"]) - _ts(final["started_at"]))
    print(f"POST of {N_FILES + 2} files {post_s * 1000:.0f} ms, of 5 files {small_s * 1000:.0f} ms; the job ran "
          f"{job_s:.1f} s")
    assert post_s < POST_LIMIT_S and post_s < job_s / 3, (post_s, small_s, job_s)

    # Progress: the files listed, then checksummed / to checksum, never going back.
    running = [j["progress"] for j in seen if j["status"] == "running" and j["progress"].get("stage") == "checksum"]
    assert any(0 < p["done"] < p["total"] for p in running), "progress seen between the first and last batch"
    dones = [p["done"] for p in running]
    assert dones == sorted(dones)
    p = final["progress"]
    assert p["scanned"] == N_FILES + 2 and p["done"] == p["total"] == p["checksummed"] == N_FILES + 2
    assert p["failed"] == 2 and p["known"] == 0
    assert final["result"]["found"] == N_FILES + 2 and final["result"]["added"] == N_FILES + 2
    assert final["result"]["added_failed"] == 2

    # The dataset is ready: every file recorded once, the junk with its reason.
    got = api_client.get(f"{API}/datasets/{ds['id']}").json()
    assert got["status"] == "ready" and got["scan"] == {"found": N_FILES + 2, "added": N_FILES + 2, "added_failed": 2}
    assert got["counts"]["images"] == N_FILES + 2 and got["counts"]["failed_images"] == 2
    failed = api_client.get(f"{API}/datasets/{ds['id']}/images", params={"status": "failed"}).json()["items"]
    reasons = {i["rel_path"]: i["reason"] for i in failed}
    assert set(reasons) == {"empty.jpg", "notes.jpg"} and "empty file" in reasons["empty.jpg"]
    assert "cannot read image header" in reasons["notes.jpg"]
    ok = api_client.get(f"{API}/datasets/{ds['id']}/images", params={"status": "ok", "limit": 1}).json()["items"][0]
    assert (ok["width"], ok["height"]) == (40, 40) and len(ok["checksum"]) == 40


def test_registering_again_meanwhile_cancel_and_resume(api_client, auth_headers, settings_env, registrar):
    folder = _folder(settings_env, N_FILES)
    r, _ = _post(api_client, auth_headers, folder)
    assert r.status_code == 202, r.text
    ds_id, job_id = r.json()["id"], r.json()["registration"]["job_id"]
    # The same request again, and a rescan, while it is under way: the same job, no second one.
    again, _ = _post(api_client, auth_headers, folder)
    assert again.status_code == 202 and again.json()["registration"]["job_id"] == job_id
    rescan = api_client.post(f"{API}/datasets/{ds_id}/rescan", headers=auth_headers)
    assert rescan.status_code == 202 and rescan.json()["registration"]["job_id"] == job_id
    # Jobs wait for the registration: a 409 that says so, and no job row.
    r = api_client.post(f"{API}/jobs", json={"kind": "pretrain", "dataset_id": ds_id}, headers=auth_headers)
    assert r.status_code == 409 and "still being registered" in r.json()["detail"], r.text

    procs.wait_for(lambda: _job(api_client, job_id)["progress"].get("done", 0) >= 100, 600, "the first batches",
                   interval_s=0.02, on_timeout=lambda: registrar.log()[-3000:])
    r = api_client.post(f"{API}/jobs/{job_id}/cancel", headers=auth_headers)
    assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled"), r.text
    cancelled = procs.wait_job(job_id, 120, [registrar])
    assert cancelled["status"] == "cancelled"
    ds = api_client.get(f"{API}/datasets/{ds_id}").json()
    partial = ds["counts"]["images"]
    assert ds["status"] == "incomplete" and 100 <= partial < N_FILES + 2, partial
    r = api_client.post(f"{API}/jobs", json={"kind": "pretrain", "dataset_id": ds_id}, headers=auth_headers)
    assert r.status_code == 409 and "register it again" in r.json()["detail"] and f"job {job_id}" in r.json()["detail"]
    with session_scope() as s:
        assert s.execute(select(func.count()).select_from(Job).where(Job.dataset_id == ds_id)).scalar_one() == 1

    # Registering again goes on from there: the rest is recorded, nothing twice.
    r, _ = _post(api_client, auth_headers, folder)
    resumed = procs.registered(api_client, r, 900, [registrar])
    assert resumed["registration"]["job_id"] != job_id
    # The junk sorts first (empty.jpg, notes.jpg): the cancelled job's first batch recorded it.
    assert resumed["scan"] == {"found": N_FILES + 2, "added": N_FILES + 2 - partial, "added_failed": 0}
    assert resumed["counts"]["images"] == N_FILES + 2 and resumed["counts"]["failed_images"] == 2
    job = _job(api_client, resumed["registration"]["job_id"])
    assert job["progress"]["known"] == partial and job["progress"]["total"] == N_FILES + 2 - partial
    with session_scope() as s:
        paths = list(s.execute(select(Image.rel_path).where(Image.dataset_id == ds_id)).scalars())
    assert len(paths) == len(set(paths)) == N_FILES + 2
    assert api_client.post(f"{API}/jobs", json={"kind": "pretrain", "dataset_id": ds_id},
                           headers=auth_headers).status_code == 202


def test_a_worker_refuses_a_folder_outside_its_roots_and_the_api_a_gone_folder(api_client, auth_headers,
                                                                               settings_env, registrar, tmp_path):
    from services.common import broker, datasets
    from services.common.models import Dataset

    # A row made by hand for a folder outside the data roots (the API would refuse it): the worker
    # checks against its own ORL_DATA_ROOTS and fails the job with what to change.
    with session_scope() as s:
        ds = Dataset(name=f"outside-{uuid.uuid4().hex[:8]}", path=str(tmp_path))
        s.add(ds)
        s.flush()
        created = datasets.request_registration(s, ds)
        ds_id = ds.id
    broker.dispatch_all(created.to_dispatch)
    row = procs.wait_job(created.job.id, 300, [registrar])
    assert row["status"] == "failed" and "not under this worker's data roots" in row["error"], row["error"]
    got = api_client.get(f"{API}/datasets/{ds_id}").json()
    assert got["status"] == "incomplete" and got["registration"]["error"] == row["error"]
    # A registered folder that is gone: the rescan is refused at once.
    folder = _folder(settings_env, 3)
    r, _ = _post(api_client, auth_headers, folder)
    ds = procs.registered(api_client, r, 300, [registrar])
    shutil.rmtree(folder)
    r = api_client.post(f"{API}/datasets/{ds['id']}/rescan", headers=auth_headers)
    assert r.status_code == 409 and "folder is gone" in r.json()["detail"]


class _Recorder:
    """The registration's dispatcher, keeping the continuations it was asked to send."""

    def __init__(self):
        self.sent: list[int] = []

    def register(self, job_id: int) -> None:
        self.sent.append(job_id)


def test_a_register_task_hands_on_after_its_budget_and_a_repeat_changes_nothing(settings_env):
    """Without Celery: each task (budget 0) does one batch and sends the next; together they
    record every file once; a finished job's task does nothing."""
    from services.common import datasets
    from services.common.models import Dataset
    from services.miner import registration

    n = 3 * registration.BATCH_FILES + 7
    folder = _folder(settings_env, n)
    with session_scope() as s:
        ds = Dataset(name=folder.name, path=str(folder))
        s.add(ds)
        s.flush()
        job_id, ds_id = datasets.request_registration(s, ds).job.id, ds.id  # not dispatched: run here
    rec, tasks, done = _Recorder(), 0, []
    pending = [job_id]
    while pending:
        pending.pop()
        registration.register(job_id, 0.0, rec)
        tasks += 1
        done.append(procs.job_row(job_id)["progress_done"])
        pending, rec.sent = rec.sent, []
    row = procs.job_row(job_id)
    assert row["status"] == "succeeded", row["error"]
    assert tasks == math.ceil((n + 2) / registration.BATCH_FILES) and done == sorted(done)
    assert row["result"]["found"] == row["result"]["added"] == n + 2 and row["result"]["added_failed"] == 2
    registration.register(job_id, 0.0, rec)  # a redelivered task of the finished job
    assert rec.sent == [] and procs.job_row(job_id)["finished_at"] == row["finished_at"]
    with session_scope() as s:
        assert s.execute(select(func.count()).select_from(Image).where(Image.dataset_id == ds_id)).scalar_one() == n + 2


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()
