"""The miner: a real Celery worker (subprocess) on real Redis and Postgres, real photos.

Jobs are submitted through the REST API (or the job functions, for malformed ones) and the
results read back from /correspondences and the tables. No eager mode.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from orl.config import MineConfig, get_preset
from orl.correspondence import Correspondence
from services.common import thumbnails
from services.common.db import session_scope
from services.common.models import Image, ImageEmbedding, Neighbor, ProposalStatus, RoiPair
from services.common.plan import embed_key
from services.miner.params import MineParamsError, params_key, resolve_mine_config
from tests.services import procs

API = "/api/v1"


@pytest.fixture(scope="module")
def miner(settings_env, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("miner-logs")
    proc = procs.start_miner(procs.service_env(settings_env), log_dir, f"miner-{uuid.uuid4().hex[:6]}")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def checkpoint_id(settings_env) -> int:
    return procs.make_checkpoint(settings_env.images_dir, settings_env.artifacts_dir)


def _folder(settings_env, n: int, offset: int = 0) -> Path:
    folder = settings_env.data_root / f"miner-{uuid.uuid4().hex[:8]}"
    procs.copy_photos(folder, n, offset)
    return folder


def _register(api_client, auth_headers, folder: Path) -> int:
    """Through the API; the module's miner (on cpu and gpu) runs the register job."""
    r = api_client.post(f"{API}/datasets", json={"name": folder.name, "path": str(folder)}, headers=auth_headers)
    return procs.registered(api_client, r)["id"]


def _submit(api_client, auth_headers, dataset_id: int, params: dict) -> int:
    r = api_client.post(f"{API}/jobs", json={"kind": "mine", "dataset_id": dataset_id, "params": params},
                        headers=auth_headers)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _all_pairs(api_client, job_id: int) -> list[dict]:
    items, cursor = [], None
    while True:
        params = {"job_id": job_id, "limit": 200, **({"cursor": cursor} if cursor else {})}
        page = api_client.get(f"{API}/correspondences", params=params).json()
        items += page["items"]
        cursor = page.get("next_cursor")
        if not cursor:
            return items


# -- parameters ------------------------------------------------------------------------------
def test_mining_parameters_resolve_from_the_checkpoint_and_name_bad_keys():
    tiny = get_preset("tiny")
    cfg = resolve_mine_config({"checkpoint_id": 1, "knn_k": 3, "ss_max_side_px": "full", "roi_mode": "roi_align"}, tiny)
    assert (cfg.knn_k, cfg.ss_max_side_px, cfg.roi_mode) == (3, None, "roi_align")
    assert cfg.embed_crop == tiny.mine.embed_crop  # the rest from the checkpoint's preset
    assert resolve_mine_config({"preset": "cpu"}, tiny).embed_crop == get_preset("cpu").mine.embed_crop
    with pytest.raises(MineParamsError, match="unknown mining parameter.*knn.*valid: .*knn_k"):
        resolve_mine_config({"knn": 3}, tiny)
    with pytest.raises(MineParamsError, match="roi_mode"):
        resolve_mine_config({"roi_mode": "warp"}, tiny)
    # Proposals are shared across jobs exactly when the selective-search + filter settings agree.
    base = MineConfig()
    assert params_key(base) == params_key(MineConfig(knn_k=3, roi_mode="roi_align"))
    assert params_key(base) != params_key(MineConfig(ss_max_side_px=640))
    # Image embeddings likewise, exactly when the options that change an embedding agree.
    assert embed_key(base) == embed_key(MineConfig(knn_k=3, batch_size=8, roi_mode="roi_align", ss_max_side_px=640))
    others = [MineConfig(embed_resize=300), MineConfig(embed_crop=200), MineConfig(decode_draft=True),
              MineConfig(knn_features="backbone")]
    assert len({embed_key(base), *map(embed_key, others)}) == 1 + len(others)


def test_worker_threads_come_from_settings_and_never_oversubscribe():
    """The cpu worker's pool size and the selective-search processes per shard are settings
    (ORL_CPU_CONCURRENCY, ORL_SS_PROCESSES, ORL_WORKER_CORES), checked against the cores."""
    from services.common.settings import Settings
    from services.miner.celery_app import worker_config
    from services.miner.threads import ThreadSettingsError, worker_plan

    plan = worker_plan(Settings(worker_cores=16))
    assert (plan.processes, plan.threads, plan.ss_processes) == (2, 8, 8)  # the defaults on 16 cores
    plan = worker_plan(Settings(worker_cores=16, cpu_concurrency=4, ss_processes=2))
    assert (plan.processes, plan.threads, plan.ss_processes) == (4, 4, 2)
    assert worker_plan(Settings(worker_cores=1)).processes == 1
    assert worker_config(Settings(worker_cores=6, cpu_concurrency=3))["worker_concurrency"] == 3
    with pytest.raises(ThreadSettingsError, match="ORL_CPU_CONCURRENCY=4 pool processes for 2 cores"):
        worker_plan(Settings(worker_cores=2, cpu_concurrency=4))
    with pytest.raises(ThreadSettingsError, match="lower ORL_SS_PROCESSES to at most 2"):
        worker_plan(Settings(worker_cores=4, cpu_concurrency=2, ss_processes=3))
    # compose passes an unset variable through as an empty string: the default
    assert Settings(_env_file=None, **{"ss_processes": ""}).ss_processes is None


# -- a real job, end to end --------------------------------------------------------------------
def test_mine_job_through_the_api_matches_the_library(api_client, auth_headers, settings_env, miner, checkpoint_id):
    """Pairs come back from /correspondences, and equal what ``orl mine`` finds on the same input."""
    folder = _folder(settings_env, 8)
    ds = _register(api_client, auth_headers, folder)
    # No thumbnail of these photos on the volume yet (other tests may have shown the same photos).
    images = api_client.get(f"{API}/datasets/{ds}/images").json()["items"]
    thumbs = [thumbnails.thumbnail_file(settings_env.artifacts_dir, im["checksum"], size)
              for im in images for size in thumbnails.PRERENDER_SIZES_PX]
    for f in thumbs:
        f.unlink(missing_ok=True)
    job_id = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id})
    row = procs.wait_job(job_id, 180, [miner])
    assert row["status"] == "succeeded", row["error"]
    # The proposal shards rendered every image's thumbnails, so no page has to decode a photo.
    assert len(thumbs) == 8 * len(thumbnails.PRERENDER_SIZES_PX) and all(f.is_file() for f in thumbs)
    r = api_client.get(f"{API}/images/{images[0]['id']}/thumbnail", params={"size": 512})
    assert r.status_code == 200 and r.content == thumbs[1].read_bytes()

    items = _all_pairs(api_client, job_id)
    assert items and all(len(p["query_box"]) == 4 and len(p["neighbor_box"]) == 4 for p in items)
    assert [p["score"] for p in items] == sorted((p["score"] for p in items), reverse=True)

    # Every parameter is recorded, and progress reached its total.
    plan = row["result"]["plan"]
    assert set(plan["mine"]) == set(MineConfig.__dataclass_fields__)
    assert plan["checkpoint_id"] == checkpoint_id and plan["params_key"] and plan["image_max_id"] > 0
    assert row["progress_done"] == row["progress_total"] > 0
    assert row["result"]["pairs"] == len(items)
    # The resolved configuration (the checkpoint's model, the job's mining options), shown by GET.
    job = api_client.get(f"{API}/jobs/{job_id}").json()
    assert job["config"] == row["result"]["config"] and job["config"]["mine"] == plan["mine"]
    assert job["config"]["model"] == get_preset("tiny").to_dict()["model"]

    # The correspondence.json artifact (official layout) holds the same pairs.
    corr = Correspondence.load(settings_env.artifacts_dir / "jobs" / str(job_id) / "correspondence.json")
    assert corr.num_pairs == len(items) and len(corr) == 8

    # The library on the same photos and checkpoint: the same pairs, same scores.
    from orl.checkpoint import load_model
    from orl.images import list_images
    from orl.mining import mine

    model, cfg, _ = load_model(settings_env.artifacts_dir / plan["checkpoint_path"])
    lib, _ = mine(model, folder, list_images(folder), folder.parent / f"{folder.name}-lib", cfg.mine)
    shutil.rmtree(folder.parent / f"{folder.name}-lib")
    expected = _library_pairs(lib)
    got = procs.pair_set(job_id)
    assert set(got) == set(expected)
    assert max(abs(got[k] - expected[k]) for k in got) < 1e-4


def _library_pairs(corr: Correspondence) -> dict[tuple, float]:
    out = {}
    for i, j, r, q, n, s in corr.iter_pairs():
        k = list(corr.knn[i]).index(j)
        out[(corr.files[i], corr.files[j], k, r, tuple(round(float(v), 2) for v in np.r_[q, n]))] = s
    return out


def test_api_export_is_the_miners_correspondence_json(api_client, auth_headers, settings_env, miner, checkpoint_id):
    """GET /correspondences/export?format=orl-json and the miner's file: one function, one result."""
    folder = _folder(settings_env, 4, offset=16)
    ds = _register(api_client, auth_headers, folder)
    job_id = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id})
    assert procs.wait_job(job_id, 180, [miner])["status"] == "succeeded"
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": job_id})
    assert r.status_code == 200, r.text
    written = json.loads((settings_env.artifacts_dir / "jobs" / str(job_id) / "correspondence.json").read_text())
    assert r.json() == written
    info = written["info"]
    assert info["job_id"] == job_id and info["knn_image_num"] == info["mine_config"]["knn_k"]
    assert written["pseudo_annotations"]["knn_bbox_pair"]


def test_resubmitted_job_processes_only_new_images_and_records_bad_ones(api_client, auth_headers, settings_env,
                                                                        miner, checkpoint_id):
    folder = _folder(settings_env, 5)
    ds = _register(api_client, auth_headers, folder)
    first = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id})
    assert procs.wait_job(first, 180, [miner])["status"] == "succeeded"
    with session_scope() as s:
        old_ids = set(s.execute(select(Image.id).where(Image.dataset_id == ds)).scalars())
        before = dict(s.execute(select(ProposalStatus.image_id, ProposalStatus.seconds)
                                .where(ProposalStatus.image_id.in_(old_ids))).all())
    roi_files = sorted((settings_env.artifacts_dir / "roi_cache").rglob("*.npy"))
    mtimes = {p: p.stat().st_mtime_ns for p in roi_files}

    # The folder gains two photos, a truncated JPEG (valid header, fails to decode) and a
    # file that is not an image at all.
    procs.copy_photos(folder, 2, offset=5)
    photo = sorted(procs.SAMPLE_IMAGES.glob("val2017/*.jpg"))[-1]
    (folder / "truncated.jpg").write_bytes(photo.read_bytes()[:2500])
    (folder / "notes.jpg").write_bytes(b"this is not a JPEG")

    second = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id})
    row = procs.wait_job(second, 180, [miner])
    assert row["status"] == "succeeded", row["error"]
    assert row["result"]["plan"]["new_images_registered"] == 4
    with session_scope() as s:
        imgs = {p: (i, st, reason) for i, p, st, reason in s.execute(
            select(Image.id, Image.rel_path, Image.status, Image.reason).where(Image.dataset_id == ds))}
        after = dict(s.execute(select(ProposalStatus.image_id, ProposalStatus.seconds)
                               .join(Image, Image.id == ProposalStatus.image_id).where(Image.dataset_id == ds)).all())
        n_emb = s.execute(select(func.count()).select_from(ImageEmbedding)
                          .join(Image, Image.id == ImageEmbedding.image_id)
                          .where(Image.dataset_id == ds)).scalar_one()
        in_pairs = set(s.execute(select(RoiPair.image_id).where(RoiPair.job_id == second)).scalars()) | set(
            s.execute(select(RoiPair.neighbor_image_id).where(RoiPair.job_id == second)).scalars())
    # Bad images are recorded with their reason, and the job went on.
    assert imgs["truncated.jpg"][1] == "failed" and "cannot decode" in imgs["truncated.jpg"][2]
    assert imgs["notes.jpg"][1] == "failed" and imgs["notes.jpg"][2]
    assert in_pairs and imgs["truncated.jpg"][0] not in in_pairs and imgs["notes.jpg"][0] not in in_pairs
    # Only new images were proposed and embedded: the old proposal rows are the same rows,
    # the new ones are exactly the two new photos plus the truncated one (tried, failed).
    new_ids = {i for p, (i, _, _) in imgs.items() if i not in old_ids}
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == new_ids - {imgs["notes.jpg"][0]}
    assert n_emb == 5 + 2
    # RoI features of the old images were not recomputed (each image's boxes encoded once).
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    assert row["result"]["images"] == 7 and row["result"]["failed_images"] == 1


def _embeddings(dataset_id: int) -> dict[str, dict[int, bytes]]:
    """{embed_key: {image id: vector bytes}} of the dataset's cached image embeddings."""
    out: dict[str, dict[int, bytes]] = {}
    with session_scope() as s:
        for key, image_id, vector in s.execute(
                select(ImageEmbedding.embed_key, ImageEmbedding.image_id, ImageEmbedding.vector)
                .join(Image, Image.id == ImageEmbedding.image_id).where(Image.dataset_id == dataset_id)):
            out.setdefault(key, {})[int(image_id)] = bytes(vector)
    return out


def test_jobs_share_image_embeddings_only_under_the_same_embedding_options(api_client, auth_headers, settings_env,
                                                                           miner, checkpoint_id):
    """The cached image embeddings are keyed by checkpoint and embedding options: a job with another
    resize computes (and mines with) its own, and a job that differs only in options that leave the
    embeddings alone (knn_k) reuses the first job's without computing any."""
    from orl.checkpoint import load_model
    from orl.mining import embed_images

    folder = _folder(settings_env, 4, offset=20)
    ds = _register(api_client, auth_headers, folder)
    jobs = {}
    for name, params in (("default", {}), ("resized", {"embed_resize": 96}), ("same", {"knn_k": 2})):
        jobs[name] = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id, **params})
        row = procs.wait_job(jobs[name], 180, [miner])
        assert row["status"] == "succeeded", row["error"]
        jobs[name] = row
    keys = {name: row["result"]["plan"]["embed_key"] for name, row in jobs.items()}
    assert keys["default"] == keys["same"] != keys["resized"]
    cached = _embeddings(ds)
    assert set(cached) == {keys["default"], keys["resized"]}
    ids = sorted(cached[keys["default"]])
    assert len(ids) == 4 and sorted(cached[keys["resized"]]) == ids

    # Each key's vectors are what the library computes with that job's options, and differ.
    model, _, _ = load_model(settings_env.artifacts_dir / jobs["default"]["result"]["plan"]["checkpoint_path"])
    with session_scope() as s:
        paths = dict(s.execute(select(Image.id, Image.rel_path).where(Image.id.in_(ids))).all())
    vectors = {}
    for name in ("default", "resized"):
        mc = MineConfig(**jobs[name]["result"]["plan"]["mine"])
        expected, failed = embed_images(model, [str(folder / paths[i]) for i in ids], mc)
        got = np.stack([np.frombuffer(cached[keys[name]][i], dtype="<f4") for i in ids])
        assert not failed and np.allclose(got, expected, atol=1e-4), name
        vectors[name] = got
    assert not np.allclose(vectors["default"], vectors["resized"], atol=1e-3)

    # The resized job mined with its own embeddings: its neighbours' similarities are theirs.
    with session_scope() as s:
        sims = s.execute(select(Neighbor.image_id, Neighbor.neighbor_image_id, Neighbor.similarity)
                         .where(Neighbor.job_id == jobs["resized"]["id"])).all()
    row_of = {i: k for k, i in enumerate(ids)}
    assert sims and all(abs(float(vectors["resized"][row_of[q]] @ vectors["resized"][row_of[n]]) - sim) < 1e-4
                        for q, n, sim in sims)
    # The third job computed no embedding: the default job's rows served it unchanged.
    assert f"job {jobs['resized']['id']}: embedded images" in miner.log()
    assert f"job {jobs['same']['id']}: embedded images" not in miner.log()
    assert _embeddings(ds) == cached


def test_cancel_stops_a_running_mining_job(api_client, auth_headers, settings_env, miner, checkpoint_id):
    folder = _folder(settings_env, 8, offset=8)
    ds = _register(api_client, auth_headers, folder)
    job_id = _submit(api_client, auth_headers, ds, {"checkpoint_id": checkpoint_id})
    procs.wait_job(job_id, 120, [miner], pred=lambda r: r["status"] == "running" and r["progress_done"] >= 1)
    r = api_client.post(f"{API}/jobs/{job_id}/cancel", headers=auth_headers)
    assert r.status_code in (200, 202), r.text
    row = procs.wait_job(job_id, 60, [miner])
    assert row["status"] == "cancelled"
    with session_scope() as s:
        assert s.execute(select(func.count()).select_from(Neighbor).where(Neighbor.job_id == job_id)).scalar_one() == 0
        assert s.execute(select(func.count()).select_from(RoiPair).where(RoiPair.job_id == job_id)).scalar_one() == 0


@pytest.mark.parametrize("params, message", [
    ({}, "needs params.checkpoint_id"),
    ({"checkpoint_id": "CHECKPOINT", "knn": 5}, "unknown mining parameter(s) knn"),
    ({"checkpoint_id": 10**9}, "is not a checkpoint artifact"),
])
def test_a_job_that_cannot_run_fails_with_a_message(settings_env, miner, checkpoint_id, params, message):
    from services.common import broker

    params = {k: (checkpoint_id if v == "CHECKPOINT" else v) for k, v in params.items()}
    ds = procs.register_dataset(settings_env.images_dir)
    job_id = procs.create_job("mine", ds, params)
    broker.send_mine(job_id)
    row = procs.wait_job(job_id, 60, [miner])
    assert row["status"] == "failed" and message in row["error"]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_gpu_and_cpu_mine_the_same_pairs(settings_env, checkpoint_id):
    """What a GPU worker computes (embeddings, KNN, RoI features, pairs) matches the CPU path."""
    from orl.checkpoint import load_model
    from orl.images import list_images
    from orl.mining import mine
    from services.common.models import Artifact

    with session_scope() as s:
        plan_ckpt = settings_env.artifacts_dir / s.get(Artifact, checkpoint_id).path
    files = list_images(settings_env.images_dir)
    out = {}
    for dev in ("cpu", "cuda"):
        model, cfg, _ = load_model(plan_ckpt)
        out[dev], _ = mine(model, settings_env.images_dir, files, settings_env.artifacts_dir / f"gpu-check-{dev}",
                           cfg.mine, dev)
    a, b = _library_pairs(out["cpu"]), _library_pairs(out["cuda"])
    assert np.array_equal(out["cpu"].knn, out["cuda"].knn)
    assert np.allclose(out["cpu"].knn_sim, out["cuda"].knn_sim, atol=1e-4)
    assert set(a) == set(b) and max(abs(a[k] - b[k]) for k in a) < 1e-3
