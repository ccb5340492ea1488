"""The Embedding map page against a live API (uvicorn on the test database), with the rows an
embedding_map job writes seeded next to test_dashboard's data: in Streamlit's AppTest, and in
headless Chromium (hovering a dot shows its photo, clicking it opens the Image page)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.services import test_dashboard as dash

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The live API and its seeded dataset (photos, a mine job, a byol and an orl checkpoint).
live_api = dash.live_api
seeded = dash.seeded
app = dash.app
live_dashboard = dash.live_dashboard


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
    assert f"job #{seeded_map['job']}" in body and "csv labels from /data/labels.csv" in body
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
    at.button[[b.label for b in at.button].index("Submit")].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    msg = [s.value for s in at.success]
    assert msg and "submitted job" in msg[0]
    job_id = int(msg[0].split("#")[1].split()[0])
    job = httpx.get(f"{os.environ['ORL_API_URL']}/api/v1/jobs/{job_id}").json()
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
