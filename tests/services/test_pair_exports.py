"""Label Studio and COCO exports of a mining job through the real API on Postgres, with reviews,
read back by each format's reader (tests/annotation_readers.py)."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from orl import annotation_formats as af
from services.common.db import insert_ignore, session_scope
from services.common.models import Image, Neighbor, RoiPair
from tests import annotation_readers as readers
from tests.services import procs

API = "/api/v1"


@pytest.fixture(scope="module")
def reviewed_job(api_client, auth_headers, settings_env, registrar):
    """The 8 sample photos, a mine job with 2 neighbours per image and 2 pairs per neighbour
    (boxes differ per pair and lie inside each photo), and reviews by two people through the API."""
    r = api_client.post(f"{API}/datasets", json={"name": f"exp-{uuid.uuid4().hex[:8]}",
                                                 "path": str(settings_env.images_dir)}, headers=auth_headers)
    ds = procs.registered(api_client, r, procs=[registrar])
    with session_scope() as s:
        from services.common import jobs

        job = jobs.create_job(s, kind="mine", dataset_id=ds["id"], params={"params_key": "pk"}).job
        imgs = list(s.execute(select(Image).where(Image.dataset_id == ds["id"]).order_by(Image.id)).scalars())
        size = {i.id: (i.width, i.height) for i in imgs}
        nb, pairs = [], []
        for a, img in enumerate(imgs):
            for k in range(2):
                other = imgs[(a + 2 * k + 1) % len(imgs)]
                nb.append(dict(job_id=job.id, image_id=img.id, rank=k, neighbor_image_id=other.id,
                               similarity=0.8 - 0.1 * k))
                (qw, qh), (nw, nh) = size[img.id], size[other.id]
                for rank in range(2):
                    f = 0.1 + 0.05 * (a + k + rank)  # a different box per pair, inside its image
                    pairs.append(dict(job_id=job.id, image_id=img.id, neighbor_image_id=other.id, neighbor_rank=k,
                                      rank=rank, score=round(0.9 - 0.07 * a - 0.2 * rank, 3),
                                      qx1=f * qw, qy1=f * qh / 2, qx2=qw * (0.4 + f), qy2=qh - 1.5,
                                      nx1=0.0, ny1=f * nh, nx2=nw * (1 - f / 2), ny2=nh * 0.75))
        insert_ignore(s, Neighbor, nb)
        insert_ignore(s, RoiPair, pairs)
        jobs.start_job(s, job.id)
        jobs.finish_job(s, job.id, "succeeded")
        rows = {p.id: p for p in s.execute(select(RoiPair).where(RoiPair.job_id == job.id)).scalars()}
        want = {pid: (p.image_id, p.neighbor_image_id, (p.qx1, p.qy1, p.qx2, p.qy2), (p.nx1, p.ny1, p.nx2, p.ny2),
                      p.score) for pid, p in rows.items()}
    ids = sorted(want)
    verdicts = {ids[0]: [("ana", "correct"), ("bo", "correct")], ids[1]: [("ana", "wrong")],
                ids[5]: [("ana", "correct"), ("bo", "wrong")]}
    for pid, said in verdicts.items():
        for who, v in said:
            r = api_client.put(f"{API}/correspondences/{pid}/review", json={"verdict": v, "reviewer": who},
                               headers=auth_headers)
            assert r.status_code == 201, r.text
    consensus = {ids[0]: "correct", ids[1]: "wrong", ids[5]: "disputed"}
    return {"job_id": job.id, "dataset": ds, "want": want, "verdicts": verdicts, "consensus": consensus,
            "image_ids": [i.id for i in imgs]}


def _same(back: dict[int, readers.Back], job: dict, with_reviewers: bool = True) -> None:
    assert sorted(back) == sorted(job["want"])
    for pid, (qi, ni, qb, nb, score) in job["want"].items():
        got = back[pid]
        assert (got.query_image_id, got.neighbor_image_id) == (qi, ni), pid
        assert got.query_box == pytest.approx(qb, abs=1e-6) and got.neighbor_box == pytest.approx(nb, abs=1e-6)
        assert got.score == pytest.approx(score)
        assert got.verdict == job["consensus"].get(pid, af.UNREVIEWED)
        if with_reviewers:
            assert got.verdicts == tuple(v for _, v in job["verdicts"].get(pid, [])), pid


def _export(api_client, job_id: int, fmt: str, **params):
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": job_id, "format": fmt, **params})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert f"pairs_job{job_id}.{fmt}.json" in r.headers["content-disposition"]
    return r


def test_coco_export_reads_back_in_pycocotools(api_client, reviewed_job, tmp_path):
    r = _export(api_client, reviewed_job["job_id"], "coco")
    path = tmp_path / "pairs.coco.json"
    path.write_bytes(r.content)
    back = readers.coco_back_pycocotools(path)
    _same(back, reviewed_job)
    data = readers.load_json(path)
    assert [i["id"] for i in data["images"]] == reviewed_job["image_ids"]  # the job's KNN images, by id
    assert data["info"]["job_id"] == reviewed_job["job_id"] and data["info"]["images_root"] == \
        reviewed_job["dataset"]["path"]
    first = reviewed_job["verdicts"]
    pid = sorted(first)[0]
    (pair,) = [p for p in data["pairs"] if p["id"] == pid]
    assert [(x["reviewer"], x["verdict"]) for x in pair["reviews"]] == first[pid] and pair["reviews"][0]["updated_at"]
    ann = {a["id"]: a for a in data["annotations"]}
    q_id, n_id = af.coco_annotation_ids(pid)
    assert (ann[q_id]["reviews_correct"], ann[q_id]["reviews_wrong"]) == (2, 0) and ann[n_id]["verdict"] == "correct"


def test_coco_export_loads_in_fiftyone(api_client, reviewed_job, tmp_path, settings_env):
    pytest.importorskip("fiftyone", reason="fiftyone is not installed (not pinned: see tests/annotation_readers.py)")
    path = tmp_path / "pairs.coco.json"
    path.write_bytes(_export(api_client, reviewed_job["job_id"], "coco").content)
    back, samples = readers.coco_back_fiftyone(path, settings_env.images_dir)
    assert samples == len(reviewed_job["image_ids"])
    _same(back, reviewed_job, with_reviewers=False)  # per-reviewer verdicts live in 'pairs', which FiftyOne skips


def test_labelstudio_export_follows_the_import_rules(api_client, reviewed_job):
    job = reviewed_job["job_id"]
    config = api_client.get(f"{API}/correspondences/labelstudio-config")
    assert config.status_code == 200 and config.headers["content-type"].startswith("application/xml")
    assert config.text == af.LABELSTUDIO_CONFIG
    tasks = _export(api_client, job, "labelstudio").json()
    assert len(tasks) == len(reviewed_job["want"])
    assert readers.labelstudio_rule_errors(config.text, tasks) == []
    _same(readers.labelstudio_back(tasks), reviewed_job)
    t = tasks[0]
    assert t["predictions"][0]["model_version"] == f"orl-mine-job-{job}" and t["data"]["job_id"] == job
    assert [r["reviewer"] for r in t["data"]["reviews"]] == ["ana", "bo"] and len(t["annotations"]) == 2
    # the default image URL is this API's thumbnail, which answers
    url = urlsplit(t["data"]["query_image"])
    assert url.path == f"{API}/images/{t['data']['query_image_id']}/thumbnail"
    img = api_client.get(f"{url.path}?{url.query}")
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    # or Label Studio's own file serving, by path under the dataset folder
    local = _export(api_client, job, "labelstudio", image_url_prefix="/data/local-files/?d=photos/").json()
    assert local[0]["data"]["neighbor_image"] == "/data/local-files/?d=photos/" + local[0]["data"]["neighbor_path"]


def test_labelstudio_export_passes_the_sdk_validator(api_client, reviewed_job):
    pytest.importorskip("label_studio_sdk", reason="label-studio-sdk is not installed (not pinned: see "
                                                   "tests/annotation_readers.py)")
    tasks = _export(api_client, reviewed_job["job_id"], "labelstudio").json()
    assert readers.labelstudio_sdk_errors(af.LABELSTUDIO_CONFIG, tasks) == []


def test_export_refuses_bad_options(api_client, reviewed_job):
    job = reviewed_job["job_id"]
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": job, "format": "coco",
                                                                "image_url_prefix": "http://x/"})
    assert r.status_code == 422 and "format=labelstudio only" in r.json()["detail"]
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": job, "format": "fiftyone"})
    assert r.status_code == 422 and "'labelstudio' or 'coco'" in r.json()["detail"]
    r = api_client.get(f"{API}/correspondences/export", params={"job_id": 99999999, "format": "coco"})
    assert r.status_code == 404


def test_pair_records_are_the_same_in_any_batch_size(settings_env, reviewed_job):
    """Reviews are fetched per streamed batch while the pairs' server-side cursor is open."""
    from services.common.correspondences import pair_records
    from services.common.runtime import get_sessionmaker

    with get_sessionmaker()() as s:
        whole = list(pair_records(s, reviewed_job["job_id"]))
        small = list(pair_records(s, reviewed_job["job_id"], batch=3))
    assert whole == small and len(whole) == len(reviewed_job["want"])
    assert [(r.query.image_id, r.neighbor_rank, r.rank) for r in whole] == \
        sorted((r.query.image_id, r.neighbor_rank, r.rank) for r in whole)
    assert {r.pair_id: r.verdict for r in whole if r.verdict} == reviewed_job["consensus"]
