"""Embedding maps through the real stack: jobs submitted over the REST API, run by a real Celery
worker (subprocess) on real Redis and Postgres, on real photos; the map read back from
GET /checkpoints/{id}/embedding-map. No eager mode."""

from __future__ import annotations

import uuid
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from orl.embedding_map import pca_2d, umap_available
from services.common import jobs
from services.common.db import session_scope
from services.common.models import Image, ImageEmbedding
from tests.services import procs

API = "/api/v1"


@pytest.fixture(scope="module")
def miner(settings_env, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("map-miner-logs")
    # On a shared 2-core machine importing torch at nice 15 alone can take a minute or more, and the
    # worker's first UMAP compiles numba code for minutes: task time limits of minutes (they follow
    # the visibility timeout) and a lease of a minute, as in production (a starved heartbeat thread
    # must not get the job reaped; no test here kills a worker), and patience at start.
    env = procs.service_env(settings_env, ORL_VISIBILITY_TIMEOUT_S=900, ORL_LEASE_S=60, ORL_HEARTBEAT_S=2)
    proc = procs.start_miner(env, log_dir, f"map-miner-{uuid.uuid4().hex[:6]}", start_timeout_s=300)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def checkpoint_id(settings_env) -> int:
    return procs.make_checkpoint(settings_env.images_dir, settings_env.artifacts_dir)


def _dataset(api_client, auth_headers, settings_env, n: int, offset: int = 0) -> tuple[int, Path]:
    folder = settings_env.data_root / f"map-{uuid.uuid4().hex[:8]}"
    procs.copy_photos(folder, n, offset)
    r = api_client.post(f"{API}/datasets", json={"name": folder.name, "path": str(folder)}, headers=auth_headers)
    return procs.registered(api_client, r)["id"], folder  # the module's miner runs the register job


def _submit(api_client, auth_headers, dataset_id: int, params: dict):
    return api_client.post(f"{API}/jobs", json={"kind": "embedding_map", "dataset_id": dataset_id, "params": params},
                           headers=auth_headers)


def _all_points(api_client, checkpoint_id: int, limit: int, **params) -> tuple[dict, list[dict]]:
    first = page = api_client.get(f"{API}/checkpoints/{checkpoint_id}/embedding-map",
                                  params={"limit": limit, **params}).json()
    items = list(page["items"])
    while page.get("next_cursor"):
        page = api_client.get(f"{API}/checkpoints/{checkpoint_id}/embedding-map",
                              params={"limit": limit, "cursor": page["next_cursor"], **params}).json()
        items += page["items"]
    return first, items


def _stored_embeddings(dataset_id: int, checkpoint_id: int) -> tuple[list[int], np.ndarray]:
    with session_scope() as s:
        rows = s.execute(select(ImageEmbedding.image_id, ImageEmbedding.vector)
                         .join(Image, Image.id == ImageEmbedding.image_id)
                         .where(Image.dataset_id == dataset_id, ImageEmbedding.checkpoint_id == checkpoint_id)
                         .order_by(ImageEmbedding.image_id)).all()
    return [r[0] for r in rows], np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])


def test_pca_map_with_csv_labels_is_stored_served_and_rerun(api_client, auth_headers, settings_env, miner,
                                                             checkpoint_id):
    ds, folder = _dataset(api_client, auth_headers, settings_env, 6)
    names = sorted(p.name for p in folder.glob("*.jpg"))
    # Image-level labels by file name, for 5 of the 6 photos.
    csv = settings_env.data_root / f"{folder.name}-labels.csv"
    csv.write_text("image,label\n" + "".join(f"{n},{'even' if k % 2 == 0 else 'odd'}\n"
                                             for k, n in enumerate(names[:5])))
    r = api_client.get(f"{API}/checkpoints/{checkpoint_id}/embedding-map", params={"dataset_id": ds})
    assert r.status_code == 404 and '"kind": "embedding_map"' in r.json()["detail"], r.text

    # The label path is relative to the data root, as dataset folders may be.
    r = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id, "method": "pca", "labels": csv.name})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    row = procs.wait_job(job_id, 180, [miner])
    assert row["status"] == "succeeded", row["error"]
    res = row["result"]
    # No mining ran on this dataset: the job embedded every image itself, as mining would.
    assert res["embeddings_missing"] == 6 and res["points"] == 6 and res["method"] == "pca"
    assert res["labels"] == {"path": str(csv.resolve()), "format": "csv", "labelled": 5, "classes": 2}
    assert res["map"]["params"] == {"checkpoint_id": checkpoint_id, "method": "pca", "seed": 0, "n_neighbors": 15,
                                    "min_dist": 0.1, "labels": csv.name}

    page, points = _all_points(api_client, checkpoint_id, 4, dataset_id=ds)
    assert page["total"] == 6 and len(page["items"]) == 4 and page["next_cursor"]
    assert (page["job_id"], page["dataset_id"], page["method"], page["method_requested"]) == (job_id, ds, "pca", "pca")
    ids, emb = _stored_embeddings(ds, checkpoint_id)
    assert [p["image_id"] for p in points] == ids and emb.shape[0] == 6
    # They are the embeddings mining computes (orl.mining.embed_images, the checkpoint's options),
    # so a later mining job reuses them.
    from orl.checkpoint import load_model
    from orl.mining import embed_images

    model, cfg, _ = load_model(settings_env.artifacts_dir / res["map"]["checkpoint_path"])
    lib, failed = embed_images(model, [str(folder / p["rel_path"]) for p in points], cfg.mine)
    assert not failed
    np.testing.assert_allclose(emb, lib, atol=1e-5)
    # The map is the PCA of the stored embeddings.
    xy = np.array([[p["x"], p["y"]] for p in points])
    np.testing.assert_allclose(xy, pca_2d(emb), atol=1e-5)
    expected = {n: ("even" if k % 2 == 0 else "odd") if k < 5 else None for k, n in enumerate(names)}
    assert {p["rel_path"]: p["label"] for p in points} == expected

    # A redelivered start of the finished job changes nothing.
    from services.common import broker

    done_before = miner.log().count("miner.map_embed[")
    broker.send_map(job_id)
    procs.wait_for(lambda: miner.log().count("miner.map_embed[") >= done_before + 2, 60, "the duplicate task")
    assert procs.job_row(job_id)["status"] == "succeeded"
    assert _all_points(api_client, checkpoint_id, 100, job_id=job_id)[1] == points

    # Rerun: a second job reuses every embedding, stores the same map, and is the one served now.
    job2 = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id, "method": "pca",
                                                  "labels": csv.name}).json()["id"]
    row2 = procs.wait_job(job2, 180, [miner])
    assert row2["status"] == "succeeded" and row2["result"]["embeddings_missing"] == 0, row2["error"]
    page2, points2 = _all_points(api_client, checkpoint_id, 100, dataset_id=ds)
    assert page2["job_id"] == job2 and [(p["x"], p["y"]) for p in points2] == [(p["x"], p["y"]) for p in points]
    assert _all_points(api_client, checkpoint_id, 100, job_id=job_id)[0]["job_id"] == job_id


def test_bad_requests_say_what_to_change(api_client, auth_headers, settings_env, miner, checkpoint_id):
    ds, folder = _dataset(api_client, auth_headers, settings_env, 3, offset=4)
    outside = Path("/etc/hostname")
    for params, why in [
        ({"checkpoint_id": checkpoint_id, "method": "tsne"}, "params.method must be one of auto, umap, pca"),
        ({"checkpoint_id": checkpoint_id, "k": 3}, "unknown embedding_map parameter(s) k; valid: checkpoint_id"),
        ({"method": "pca"}, "needs params.checkpoint_id"),
        ({"checkpoint_id": 10**9}, "is not a checkpoint artifact"),
        ({"checkpoint_id": checkpoint_id, "n_neighbors": 1}, "params.n_neighbors must be an integer from 2"),
        ({"checkpoint_id": checkpoint_id, "labels": str(outside)}, "outside the data roots"),
        ({"checkpoint_id": checkpoint_id, "labels": "no/such.csv"}, "label file or folder not found"),
    ]:
        r = _submit(api_client, auth_headers, ds, params)
        assert r.status_code == 422 and why in r.json()["detail"], (params, r.text)
    assert api_client.get(f"{API}/checkpoints/{10**9}/embedding-map").status_code == 404

    # A label file that exists but holds nothing: the worker fails the job with the reason, and
    # the map endpoint says so.
    empty = settings_env.data_root / f"{folder.name}-empty.csv"
    empty.write_text("image,label\n")
    r = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id, "method": "pca", "labels": str(empty)})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    row = procs.wait_job(job_id, 180, [miner])
    assert row["status"] == "failed" and "holds no 'image,label' rows" in row["error"], row
    r = api_client.get(f"{API}/checkpoints/{checkpoint_id}/embedding-map", params={"dataset_id": ds})
    assert r.status_code == 404 and f"newest job {job_id} failed" in r.json()["detail"], r.text
    r = api_client.get(f"{API}/checkpoints/{checkpoint_id}/embedding-map", params={"job_id": job_id})
    assert r.status_code == 409 and "holds no" in r.json()["detail"]
    # A mine job's row (the API now refuses one without a checkpoint at submission).
    mine = procs.create_job("mine", ds, {"checkpoint_id": checkpoint_id})
    r = api_client.get(f"{API}/checkpoints/{checkpoint_id}/embedding-map", params={"job_id": mine})
    assert r.status_code == 422 and "not an embedding_map job" in r.json()["detail"]


def test_waiting_map_jobs_are_kept_alive(settings_env):
    """A map job whose layout task waits in the cpu queue is renewed like a mine job, not reaped."""
    ds = procs.register_dataset(settings_env.images_dir, name=f"keep-{uuid.uuid4().hex[:8]}")
    job_id = procs.create_job("embedding_map", ds, {"checkpoint_id": 1})
    with session_scope() as s:
        assert jobs.keep_alive(s, [job_id]) == 0  # queued: nothing to renew
        jobs.start_job(s, job_id, "test")
    with session_scope() as s:
        assert jobs.keep_alive(s, [job_id]) == 1
        jobs.cancel_job(s, job_id)


@pytest.mark.slow
@pytest.mark.skipif(not umap_available(), reason="umap-learn is not installed")
def test_auto_map_uses_umap_when_installed(api_client, auth_headers, settings_env, miner, checkpoint_id):
    ds, _ = _dataset(api_client, auth_headers, settings_env, 6, offset=2)
    job_id = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id, "seed": 3,
                                                   "n_neighbors": 4}).json()["id"]
    row = procs.wait_job(job_id, 900, [miner])  # the worker's first UMAP compiles numba code (tens of s)
    assert row["status"] == "succeeded", row["error"]
    res = row["result"]
    assert res["method"] == "umap" and res["method_reason"] == "" and res["labels"] is None
    assert res["umap_learn"] == metadata.version("umap-learn")
    page, points = _all_points(api_client, checkpoint_id, 100, dataset_id=ds)
    assert page["method"] == "umap" and page["method_requested"] == "auto" and page["total"] == 6
    xy = np.array([[p["x"], p["y"]] for p in points])
    assert np.isfinite(xy).all() and len({tuple(v) for v in xy.round(6)}) == 6
    assert all(p["label"] is None for p in points)
