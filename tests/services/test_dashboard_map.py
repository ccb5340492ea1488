"""The Embedding map page against a live API (uvicorn on the test database), with the rows an
embedding_map job writes seeded next to test_dashboard's data: in Streamlit's AppTest, and in
headless Chromium (hovering a dot shows its photo, clicking it opens the Image page). A second
API on the same database needs a read token (ORL_API_READ_TOKEN): the photos then travel inside
the chart, and the token never reaches the browser."""

from __future__ import annotations

import base64
import io
import json
import uuid

import httpx
import pytest
from PIL import Image

from dashboard.views.common import md_text
from tests.services import test_dashboard as dash

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The live API and its seeded dataset (photos, a mine job, a byol and an orl checkpoint).
live_api = dash.live_api
seeded = dash.seeded
app = dash.app
live_dashboard = dash.live_dashboard

READ_TOKEN = "map-read-token-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def read_protected_api(live_api, tmp_path_factory):
    """The API again, on the same database, answering reads only with READ_TOKEN."""
    with dash.running_api(tmp_path_factory.mktemp("logs"), ORL_API_READ_TOKEN=READ_TOKEN) as url:
        yield url


def _photo_cap(seeded) -> int:
    """Fewer photos than dots, so that both kinds of tooltip show."""
    return len(seeded["images"]) - 2


@pytest.fixture(scope="module")
def seeded_map(seeded, settings_env, live_api):
    """A succeeded embedding_map job of the byol checkpoint, its points labelled by a CSV."""
    from services.common.db import session_scope
    from services.common.models import EmbeddingMapPoint, Job

    images = seeded["images"]
    labels = {i: ("cat" if k % 2 else "dog") for k, i in enumerate(images[:-1])}  # the last one unlabelled
    with session_scope() as s:
        params = {"checkpoint_id": seeded["byol"], "method": "auto", "seed": 0, "n_neighbors": 15, "min_dist": 0.1,
                  "labels": "labels.csv"}
        job = Job(kind="embedding_map", dataset_id=seeded["dataset"], status="succeeded", params=params,
                  result={"map": {"params": params}, "method": "pca", "method_reason": "umap-learn is not "
                          "installed: PCA instead", "points": len(images),
                          "labels": {"path": "/data/labels.csv", "format": "csv", "labelled": len(labels),
                                     "classes": 2}})
        s.add(job)
        s.flush()
        s.add_all([EmbeddingMapPoint(job_id=job.id, image_id=i, x=float(k), y=float(k % 3), label=labels.get(i))
                   for k, i in enumerate(images)])
        s.flush()
        return {"job": job.id, "labels": labels, "api": live_api}


def _chart_spec(at) -> tuple[dict, list[dict]]:
    """The Vega-Lite spec of the page's chart and its data rows (Arrow IPC streams in the proto)."""
    import pyarrow as pa

    charts = at.get("vega_lite_chart")
    assert charts, "the map is drawn"
    proto = charts[0].proto
    tables = [ds.data.data for ds in proto.datasets] + ([proto.data.data] if proto.HasField("data") else [])
    rows = [r for t in tables for r in pa.ipc.open_stream(t).read_all().to_pylist()]
    return json.loads(proto.spec), rows


def test_map_page_plots_points_with_thumbnails_labels_and_links(app, seeded, seeded_map):
    at = dash.open_page(app, page="map", dataset=seeded["dataset"], checkpoint=seeded["byol"])
    body = dash.texts(at)
    assert f"{len(seeded['images'])} images" in body and "PCA (umap-learn is not installed" in body
    assert f"job #{seeded_map['job']}" in body and f"csv labels from {md_text('/data/labels.csv')}" in body
    spec, rows = _chart_spec(at)
    enc = spec.get("encoding") or spec["layer"][0]["encoding"]
    assert enc["color"]["field"] == "label" and enc["href"]["field"] == "open"
    assert [t["field"] for t in enc["tooltip"]][:1] == ["image"]
    by_id = {r["image_id"]: r for r in rows}
    assert sorted(by_id) == sorted(seeded["images"])
    last = seeded["images"][-1]
    assert by_id[last]["label"] == "(unlabelled)" and by_id[seeded["images"][1]]["label"] == "cat"
    assert by_id[last]["open"] == f"?page=image&dataset={seeded['dataset']}&image={last}"
    # The tooltip's image is a thumbnail the browser can load from the API.
    url = by_id[last]["image"]
    r = httpx.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", url
    # The picker opens an image on the Image page.
    at.selectbox(key="map_image").set_value(last).run()
    at.button(key="map_open").click().run()
    assert not at.exception
    assert dash.qp(at)["page"] == "image" and dash.qp(at)["image"] == str(last)


def test_map_page_without_a_map_submits_the_job(app, seeded, seeded_map):
    at = dash.open_page(app, page="map", dataset=seeded["dataset"], checkpoint=seeded["orl"])
    assert any("No map yet" in i.value and "has no embedding map" in i.value for i in at.info), \
        [i.value for i in at.info]
    at.selectbox(key="map_method").set_value("pca")
    at.number_input(key="map_seed").set_value(4)
    job = dash.submit_and_get_job(at)
    job_id = job["id"]
    assert job["kind"] == "embedding_map" and job["params"] == {"checkpoint_id": seeded["orl"], "method": "pca",
                                                                "seed": 4}
    # Until a worker runs it, the page says which job computes the map.
    at.run()
    assert any(f"being computed by job {job_id}" in i.value for i in at.info), [i.value for i in at.info]


def test_map_url_state_and_params():
    from dashboard import urlstate
    from dashboard.views.embedding_map import build_params

    assert urlstate.parse("map", {"dataset": "2", "checkpoint": "x"}) == {"dataset": 2, "checkpoint": None}
    assert urlstate.encode("map", {"dataset": 2, "checkpoint": 5}) == {"page": "map", "dataset": "2",
                                                                       "checkpoint": "5"}
    assert build_params(5, "auto", 1, 10, 0.25, " lab.csv ") == {"checkpoint_id": 5, "method": "auto", "seed": 1,
                                                                 "n_neighbors": 10, "min_dist": 0.25,
                                                                 "labels": "lab.csv"}
    assert build_params(5, "pca", 0, 10, 0.25, "") == {"checkpoint_id": 5, "method": "pca", "seed": 0}


def test_inline_photos_are_spread_over_the_points_and_capped(monkeypatch):
    from dashboard.views.embedding_map import INLINE_MAX, inline_ids, inline_max, map_frame

    assert inline_ids(list(range(10)), 4) == [0, 2, 5, 7]
    assert inline_ids([3, 1, 2], 5) == [3, 1, 2] and inline_ids([3, 1, 2], 0) == []
    for raw, cap in (("", INLINE_MAX), ("12", 12), ("-3", 0), ("many", INLINE_MAX)):
        monkeypatch.setenv("ORL_DASHBOARD_MAP_PHOTOS", raw)
        assert inline_max() == cap, raw
    points = [{"image_id": i, "rel_path": f"{i}.jpg", "x": 0.0, "y": 0.0, "label": None} for i in (1, 2)]
    frame = map_frame(points, 7, None, {2: "data:image/jpeg;base64,AAAA"})
    assert list(frame["image"]) == ["", "data:image/jpeg;base64,AAAA"]  # "": the tooltip shows no picture
    assert "image" not in map_frame(points, 7, None, {})


def _decoded_jpeg(uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix), uri[:40]
    im = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):], validate=True)))
    im.load()
    assert im.format == "JPEG"
    return im


def test_map_page_with_a_read_token_sends_the_photos_inside_the_chart(seeded, seeded_map, read_protected_api,
                                                                     monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard.views.embedding_map import INLINE_PX, inline_ids

    # A browser could not load a thumbnail URL of this API: it sends no token.
    first = seeded["images"][0]
    assert httpx.get(f"{read_protected_api}/api/v1/images/{first}/thumbnail").status_code == 401
    monkeypatch.setenv("ORL_API_URL", read_protected_api)
    monkeypatch.setenv("ORL_API_READ_TOKEN", READ_TOKEN)
    monkeypatch.setenv("ORL_DASHBOARD_MAP_PHOTOS", str(_photo_cap(seeded)))
    at = dash.open_page(AppTest.from_file(str(dash.REPO / "dashboard" / "app.py"), default_timeout=60),
                        page="map", dataset=seeded["dataset"], checkpoint=seeded["byol"])
    spec, rows = _chart_spec(at)
    enc = spec.get("encoding") or spec["layer"][0]["encoding"]
    assert [t["field"] for t in enc["tooltip"]][:1] == ["image"]
    # Photos for an even spread of the dots, up to the cap; the others' tooltips show no picture.
    ids = [r["image_id"] for r in rows]
    assert sorted(ids) == sorted(seeded["images"])
    with_photo = {r["image_id"]: r["image"] for r in rows if r["image"]}
    assert sorted(with_photo) == sorted(inline_ids(ids, _photo_cap(seeded)))
    assert all(r["image"] == "" for r in rows if r["image_id"] not in with_photo)
    # Each is the image's thumbnail, reduced to INLINE_PX (the API's 256 px one, read with the token).
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    for image_id, uri in with_photo.items():
        im = _decoded_jpeg(uri)
        thumb = Image.open(io.BytesIO(httpx.get(f"{read_protected_api}/api/v1/images/{image_id}/thumbnail",
                                                params={"size": 256}, headers=headers).content))
        assert max(im.size) == min(INLINE_PX, max(thumb.size)), (im.size, thumb.size)
        assert abs(im.size[0] / im.size[1] - thumb.size[0] / thumb.size[1]) < 0.05
    # No token is in what the browser receives, and the page says which dots have a photo.
    assert READ_TOKEN not in json.dumps(spec) and READ_TOKEN not in json.dumps(rows)
    assert f"the photos of {_photo_cap(seeded)} of the {len(ids)} dots" in dash.texts(at)



@pytest.mark.skipif(not (dash.CHROMIUM and dash.CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_chromium_map_hover_shows_the_photo_and_a_click_opens_the_image_page(live_dashboard, seeded, seeded_map,
                                                                              tmp_path):
    target = seeded["images"][2]
    name = httpx.get(f"{seeded_map['api']}/api/v1/images/{target}").json()["rel_path"]
    browser = dash.WebDriver(tmp_path / "profile", width=1400, height=1100)
    try:
        browser.get(f"{live_dashboard}/?page=map&dataset={seeded['dataset']}&checkpoint={seeded['byol']}")
        xy = browser.wait_for(lambda: browser.script(dash.MAP_POINT_JS, target), 90, f"the dot of image {target}")
        assert browser.script(dash.TOOLTIP_IMAGE_JS) is None, "no tooltip before the mouse is on a dot"
        browser.move_to(*xy)
        # The tooltip shows the photo, loaded by the browser from the API's thumbnail endpoint.
        src = browser.wait_for(lambda: browser.script(dash.TOOLTIP_IMAGE_JS), 60, "the tooltip's decoded thumbnail")
        assert src == f"{seeded_map['api']}/api/v1/images/{target}/thumbnail?size=160"
        tip = browser.script("return document.getElementById('vg-tooltip-element').innerText")
        assert name in tip and str(target) in tip, tip
        # A click follows the dot's link: this dashboard's Image page of that photo, in the same tab.
        browser.click()
        browser.wait_for(lambda: "page=image" in browser.current_url(), 60, "the Image page's URL")
        assert f"image={target}" in browser.current_url() and f"dataset={seeded['dataset']}" in browser.current_url()
        browser.wait_for(lambda: f"Image {target} · {name}" in browser.script("return document.body.innerText"), 90,
                         "the Image page's heading")
        photos = browser.wait_for(lambda: browser.script(dash.LOADED_IMAGES_JS), 90, "the photo, decoded")
        assert photos and all("/media/" in s for s in photos), photos[:3]
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def read_protected_dashboard(read_protected_api, seeded, tmp_path_factory):
    """A dashboard holding the read token of ``read_protected_api``, as scripts/stack.py runs one."""
    with dash.running_dashboard(read_protected_api, tmp_path_factory.mktemp("logs"), ORL_API_READ_TOKEN=READ_TOKEN,
                                ORL_DASHBOARD_MAP_PHOTOS=str(_photo_cap(seeded))) as url:
        yield url


@pytest.mark.skipif(not (dash.CHROMIUM and dash.CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_chromium_map_hover_shows_the_photo_with_a_read_token(read_protected_dashboard, seeded, seeded_map, tmp_path):
    from dashboard.views.embedding_map import inline_ids

    # The API answers the map's points in image order, so these are the dots with a photo.
    inline = inline_ids(seeded["images"], _photo_cap(seeded))
    target, bare = inline[1], next(i for i in seeded["images"] if i not in inline)
    browser = dash.WebDriver(tmp_path / "profile", width=1400, height=1100)
    try:
        browser.get(f"{read_protected_dashboard}/?page=map&dataset={seeded['dataset']}&checkpoint={seeded['byol']}")
        xy = browser.wait_for(lambda: browser.script(dash.MAP_POINT_JS, target), 90, f"the dot of image {target}")
        browser.move_to(*xy)
        # The tooltip shows the photo, decoded from the data URI the dashboard put in the chart.
        src = browser.wait_for(lambda: browser.script(dash.TOOLTIP_IMAGE_JS), 60, "the tooltip's decoded photo")
        assert src.startswith("data:image/jpeg;base64,"), src[:60]
        # A dot beyond the cap: its tooltip names the file, with no picture (not a broken one).
        browser.move_to(*browser.script(dash.MAP_POINT_JS, bare))
        name = httpx.get(f"{seeded_map['api']}/api/v1/images/{bare}").json()["rel_path"]
        tip = browser.wait_for(lambda: browser.script(
            "const t = document.getElementById('vg-tooltip-element');"
            "return t && t.classList.contains('visible') && t.innerText.includes(arguments[0]) ? t : null;", name),
            60, "the tooltip of a dot without a photo")
        assert tip and browser.script("return document.getElementById('vg-tooltip-element').querySelector('img')") \
            is None
        # The read token is nowhere in the page the browser holds.
        assert READ_TOKEN not in browser.script("return document.documentElement.outerHTML")
    finally:
        browser.quit()
