"""Fast pages and weights out, against the real app on real Postgres: thumbnails kept on the
artifacts volume and served with cache headers, and backbone exports written as artifacts.

The mining side (thumbnails rendered by the proposal shards of a real Celery worker) is checked
in tests/services/test_miner.py, on the job that test already runs.
"""

from __future__ import annotations

import io
import shutil
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage

from services.common import thumbnails
from tests.services import procs

API = "/api/v1"


@pytest.fixture(scope="module")
def photos(api_client, auth_headers, settings_env, registrar):
    """A dataset of 3 sample photos in a folder of its own; its image rows."""
    folder = settings_env.data_root / f"fast-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    for f in sorted(settings_env.images_dir.rglob("*.jpg"))[:3]:
        shutil.copy(f, folder / f.name)
    r = api_client.post(f"{API}/datasets", json={"name": folder.name, "path": str(folder)}, headers=auth_headers)
    ds = procs.registered(api_client, r, procs=[registrar])
    return api_client.get(f"{API}/datasets/{ds['id']}/images").json()["items"]


def _source(settings_env, img: dict):
    return next(settings_env.data_root.glob(f"fast-*/{img['rel_path']}"))


def _file(settings_env, img: dict, size: int):
    return thumbnails.thumbnail_file(settings_env.artifacts_dir, img["checksum"], size)


def test_thumbnail_is_rendered_once_kept_and_revalidated(api_client, settings_env, photos):
    img = photos[0]
    kept = _file(settings_env, img, 256)
    kept.unlink(missing_ok=True)
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.headers["cache-control"] == "public, max-age=86400" and r.headers["etag"]
    # The first request left the file on the artifacts volume; the next one sends that file.
    assert kept.is_file() and kept.read_bytes() == r.content
    stamp = kept.stat().st_mtime_ns
    again = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256})
    assert again.content == r.content and again.headers["etag"] == r.headers["etag"]
    assert kept.stat().st_mtime_ns == stamp, "served from the file, not rendered again"
    # The longer side is the size, and both axes shrink by one factor (boxes scale exactly).
    th = PILImage.open(io.BytesIO(r.content))
    s = 256 / max(img["width"], img["height"])
    assert max(th.size) == 256
    assert abs(th.width - img["width"] * s) <= 1 and abs(th.height - img["height"] * s) <= 1
    # A client that has it asks with its ETag: 304, no body, the same cache headers.
    r304 = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256},
                          headers={"If-None-Match": f'"other", {r.headers["etag"]}'})
    assert r304.status_code == 304 and r304.content == b""
    assert r304.headers["etag"] == r.headers["etag"] and r304.headers["cache-control"] == "public, max-age=86400"
    stale = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256},
                           headers={"If-None-Match": '"not-this-one"'})
    assert stale.status_code == 200 and stale.content == r.content
    # Another size is another file and another ETag.
    small = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 100})
    assert small.headers["etag"] != r.headers["etag"] and max(PILImage.open(io.BytesIO(small.content)).size) == 100
    assert _file(settings_env, img, 100).read_bytes() == small.content


def test_thumbnail_with_its_checksum_is_immutable(api_client, photos):
    img = photos[1]
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256, "checksum": img["checksum"]})
    assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=31536000, immutable"
    r304 = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256, "checksum": img["checksum"]},
                          headers={"If-None-Match": r.headers["etag"]})
    assert r304.status_code == 304 and r304.headers["cache-control"].endswith("immutable")
    # Another image's checksum: refused with the right one named.
    wrong = photos[0]["checksum"]
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256, "checksum": wrong})
    assert r.status_code == 409 and img["checksum"] in r.json()["detail"]
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"checksum": "abc"})
    assert r.status_code == 422 and "checksum" in r.json()["detail"]


def test_missing_thumbnail_is_rendered_again_and_a_changed_photo_refused(api_client, settings_env, photos):
    img = photos[2]
    first = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256}).content
    kept = _file(settings_env, img, 256)
    kept.unlink()  # an operator cleaned the volume, or another host's copy is incomplete
    r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256})
    assert r.status_code == 200 and kept.is_file()
    assert r.content == first, "one rendering per (content, size, version): the same bytes again"
    # A photo edited in place no longer has the recorded checksum: never stored under the old one.
    kept.unlink()
    src = _source(settings_env, img)
    original = src.read_bytes()
    try:
        PILImage.open(io.BytesIO(original)).rotate(90, expand=True).save(src, format="JPEG")
        r = api_client.get(f"{API}/images/{img['id']}/thumbnail", params={"size": 256})
        assert r.status_code == 409 and "changed since it was registered" in r.json()["detail"]
        assert not kept.exists()
    finally:
        src.write_bytes(original)


def test_crop_decodes_only_what_it_needs_and_matches_the_full_decode(api_client, settings_env, photos):
    from services.api import imaging

    img = photos[0]
    src = _source(settings_env, img)
    box = (40.0, 30.0, 440.0, 330.0)  # 400 x 300 px shown at 96: the decoder may reduce by 4
    reduced = np.asarray(PILImage.open(io.BytesIO(imaging.crop_jpeg(src, box, 96, (img["width"], img["height"])))))
    full = np.asarray(PILImage.open(io.BytesIO(imaging.crop_jpeg(src, box, 96))))
    assert reduced.shape == full.shape == (72, 96, 3)
    # The same region: the two renderings differ by resampling noise only.
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 6
    r = api_client.get(f"{API}/images/{img['id']}/crop", params={"box": "40,30,440,330", "size": 96})
    assert r.status_code == 200 and r.content == imaging.crop_jpeg(src, box, 96, (img["width"], img["height"]))


# -- weights out: backbone exports as artifacts --------------------------------------------------------
@pytest.fixture(scope="module")
def trained(settings_env, photos):
    """A finished pretrain job with a real tiny checkpoint (one step on real photos) as its artifact."""
    from services.common import jobs
    from services.common.db import session_scope
    from services.common.models import Artifact
    from tests.services import procs

    ckpt_id = procs.make_checkpoint(settings_env.images_dir, settings_env.artifacts_dir, photos[0]["dataset_id"])
    with session_scope() as s:
        job = jobs.create_job(s, kind="pretrain", dataset_id=photos[0]["dataset_id"]).job
        jobs.start_job(s, job.id, "test")
        jobs.finish_job(s, job.id, "succeeded", result={"summary": {"metrics": {"loss": 0.5, "lr": 0.05}}})
        s.get(Artifact, ckpt_id).job_id = job.id
        return {"checkpoint": ckpt_id, "job": job.id}


def _reference(settings_env, checkpoint_id: int):
    """The checkpoint's own backbone, loaded by the library: what every export must reproduce."""
    from orl.checkpoint import load_model
    from services.common.db import session_scope
    from services.common.models import Artifact

    with session_scope() as s:
        path = settings_env.artifacts_dir / s.get(Artifact, checkpoint_id).path
    model, cfg, _ = load_model(path)
    return model.backbone.eval(), cfg


def _inputs():
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 64, 64, generator=g), torch.randn(1, 3, 96, 80, generator=g)]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "torchvision"])
def test_export_is_an_artifact_that_downloads_and_loads_back(api_client, auth_headers, settings_env, trained, fmt,
                                                              tmp_path):
    import torch

    ckpt, job = trained["checkpoint"], trained["job"]
    url = f"{API}/artifacts/{ckpt}/export"
    assert api_client.post(url, json={"format": fmt}).status_code == 401, "writes need the token"
    r = api_client.post(url, json={"format": fmt}, headers=auth_headers)
    assert r.status_code == 201, r.text
    art = r.json()
    assert r.headers["location"] == f"/api/v1/artifacts/{art['id']}"
    assert art["kind"] == "export" and art["stage"] == "byol"
    assert art["job"] == {"id": job, "kind": "pretrain", "status": "succeeded"}
    assert art["meta"]["format"] == fmt and art["meta"]["source_artifact_id"] == ckpt
    assert art["metrics"] == {"loss": 0.5, "lr": 0.05}, "the metrics of the training that made the checkpoint"
    listed = api_client.get(f"{API}/artifacts", params={"kind": "export", "job_id": job}).json()["items"]
    assert art["id"] in [a["id"] for a in listed]
    # The same request again: the same artifact, not a second export.
    again = api_client.post(url, json={"format": fmt}, headers=auth_headers)
    assert again.status_code == 200 and again.json()["id"] == art["id"]

    d = api_client.get(art["download_url"])
    assert d.status_code == 200 and len(d.content) == art["size_bytes"] > 0
    assert f'filename="export-{art["id"]}-{art["file_name"]}"' in d.headers["content-disposition"]
    out = tmp_path / art["file_name"]
    out.write_bytes(d.content)
    net, cfg = _reference(settings_env, ckpt)
    with torch.no_grad():
        want = [net(x) for x in _inputs()]  # pooled res5 features (N, C)
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out))
        with torch.no_grad():
            got = [loaded(x) for x in _inputs()]
    elif fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        runner = ReferenceEvaluator(model)  # onnx's own implementation of every operator
        got = [torch.from_numpy(runner.run(None, {"images": x.numpy()})[0]) for x in _inputs()]
    else:
        import torchvision

        resnet = getattr(torchvision.models, cfg.model.backbone)()
        missing = resnet.load_state_dict(torch.load(out, weights_only=True), strict=False).missing_keys
        assert sorted(missing) == ["fc.bias", "fc.weight"]
        resnet.fc = torch.nn.Identity()
        with torch.no_grad():
            got = [resnet.eval()(x) for x in _inputs()]
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-4)


def test_export_refuses_what_it_cannot_export(api_client, auth_headers, trained, settings_env):
    from services.common.db import session_scope
    from services.common.models import Artifact

    url = f"{API}/artifacts/{trained['checkpoint']}/export"
    r = api_client.post(url, json={"format": "tflite"}, headers=auth_headers)
    assert r.status_code == 422 and "format" in r.json()["detail"]
    r = api_client.post(url, json={"format": "onnx", "input_size": 8}, headers=auth_headers)
    assert r.status_code == 422 and "input_size" in r.json()["detail"]
    assert api_client.post(f"{API}/artifacts/99999999/export", json={"format": "onnx"},
                           headers=auth_headers).status_code == 404
    with session_scope() as s:
        corr = Artifact(kind="correspondence", path="nowhere.json", meta={})
        gone = Artifact(kind="checkpoint", stage="orl", path="test-checkpoints/gone/last.pt", meta={})
        s.add_all([corr, gone])
        s.flush()
        ids = corr.id, gone.id
    r = api_client.post(f"{API}/artifacts/{ids[0]}/export", json={"format": "onnx"}, headers=auth_headers)
    assert r.status_code == 422 and "not a checkpoint" in r.json()["detail"]
    r = api_client.post(f"{API}/artifacts/{ids[1]}/export", json={"format": "onnx"}, headers=auth_headers)
    assert r.status_code == 410 and "gone" in r.json()["detail"]


# -- the dashboard's image fetching, against a live uvicorn API ------------------------------------------
from tests.services.test_dashboard import live_api  # noqa: E402,F401  (the module's uvicorn fixture)


def test_dashboard_fetches_a_pages_images_in_parallel_and_keeps_them(live_api, photos):  # noqa: F811
    from dashboard.api_client import ApiClient, ApiError

    client = ApiClient(live_api)
    try:
        ids = [p["id"] for p in photos]
        reqs = [(f"/images/{i}/thumbnail", {"size": 256}) for i in ids] + [
            (f"/images/{ids[0]}/crop", {"box": "10,10,200,150", "size": 96}),
            ("/images/99999999/thumbnail", {"size": 256}),  # no such image: its error, in its place
            (f"/images/{ids[0]}/thumbnail", {"size": 256}),  # asked twice on one page: fetched once
        ]
        got = client.get_binaries(reqs)
        assert [type(g).__name__ for g in got] == ["Binary"] * 4 + ["ApiError", "Binary"]
        assert isinstance(got[4], ApiError) and got[4].status == 404
        assert got[5] is got[0]
        for g, i in zip(got[:3], ids, strict=True):
            direct = httpx.get(f"{live_api}/api/v1/images/{i}/thumbnail", params={"size": 256})
            assert g.content == direct.content and g.headers["etag"] == direct.headers["etag"]
        # The next page (or the next run of this one) is answered from memory.
        again = client.get_binaries(reqs[:4])
        assert all(a is g for a, g in zip(again, got[:4], strict=True))
    finally:
        client.close()


def test_image_cache_keeps_the_recent_within_its_budget():
    from dashboard.api_client import Binary, BinaryCache

    cache = BinaryCache(max_bytes=250)  # room for two of these
    cache.put(("a",), Binary(b"x" * 100, {}))
    cache.put(("b",), Binary(b"y" * 100, {}))
    assert cache.get(("a",)).content == b"x" * 100  # a is now the most recently used
    cache.put(("c",), Binary(b"z" * 100, {}))
    assert cache.get(("b",)) is None, "the least recently used went out when the budget was passed"
    assert cache.get(("a",)) is not None and cache.get(("c",)) is not None
    expired = BinaryCache(ttl_s=0.0)
    expired.put(("a",), Binary(b"x", {}))
    time.sleep(0.01)
    assert expired.get(("a",)) is None, "older than its TTL"
