"""Embedding map: a checkpoint's image embeddings laid out in 2-D (UMAP, or PCA without
umap-learn), one dot per photo, coloured by label when the map was given a label file.

The map is computed by an ``embedding_map`` job and stored (``GET /checkpoints/{id}/embedding-map``);
this page draws it, and submits the job when there is none yet. Hovering a dot shows the photo:
the tooltip's ``image`` field is a URL of the API's thumbnail endpoint, which the browser loads
itself (Vega's tooltip shows a field named ``image`` as a picture), so the page sends no image
bytes. The URL is the API as the browser reaches it: ORL_API_PUBLIC_URL, else ORL_API_URL (in
compose the dashboard reaches the API as http://api:8000, a browser does not).

When the API needs a token for reads (ORL_API_READ_TOKEN), a browser cannot load those URLs: it
sends no token, and the read token never leaves the dashboard process. The dashboard then fetches
the thumbnails itself, with the read token, and puts small JPEGs into the chart's rows as
``data:`` URIs, which the tooltip shows the same way. They travel inside the chart, so their
number is capped (ORL_DASHBOARD_MAP_PHOTOS, default 400, spread evenly over the points); a dot
beyond the cap shows its file name and id. Clicking a dot opens it on the Image page; so does the
picker under the map.
"""

from __future__ import annotations

import base64
import os
import uuid
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import drawing
from dashboard.api_client import ApiError
from dashboard.views import common

PAGE = "map"
PAGE_SIZE = 10_000  # the API's largest page of points
MAX_POINTS = 50_000  # beyond this a browser draws the scatter too slowly to use
THUMB_PX = 160
# With a read token: photos sent inside the chart, as 128 px JPEGs (a few KB each as base64), so
# the default cap adds a few MB to the page at most; the source is a size mining renders ahead
# (services.common.thumbnails.PRERENDER_SIZES_PX), so fetching it makes the API decode no photo.
INLINE_MAX_ENV, INLINE_MAX = "ORL_DASHBOARD_MAP_PHOTOS", 400
INLINE_PX, INLINE_SOURCE_PX, INLINE_QUALITY = 128, 256, 75
DATA_URI = "data:image/jpeg;base64,"
METHODS = {"auto": "auto (UMAP when umap-learn is installed, else PCA)", "umap": "UMAP", "pca": "PCA"}


def inline_max() -> int:
    """How many photos may travel inside the chart (ORL_DASHBOARD_MAP_PHOTOS; 0: none)."""
    raw = os.environ.get(INLINE_MAX_ENV, "").strip()
    try:
        return max(0, int(raw)) if raw else INLINE_MAX
    except ValueError:
        return INLINE_MAX


def inline_ids(image_ids: list[int], cap: int) -> list[int]:
    """At most ``cap`` of the ids, spread evenly through the list, so that a map of more points
    than the cap has photos all over it rather than only for its first ``cap`` points."""
    if len(image_ids) <= cap:
        return list(image_ids)
    return [image_ids[k * len(image_ids) // cap] for k in range(cap)]


@st.cache_data(max_entries=8, show_spinner=False)
def _data_uris(thumbnails: tuple[bytes, ...]) -> tuple[str, ...]:
    """Each thumbnail reduced to INLINE_PX and written as a JPEG ``data:`` URI."""
    out = []
    for data in thumbnails:
        im = drawing.open_image(data)
        im.thumbnail((INLINE_PX, INLINE_PX))
        out.append(DATA_URI + base64.b64encode(drawing.jpeg(im, INLINE_QUALITY)).decode("ascii"))
    return tuple(out)


def inline_thumbnails(api: common.Api, image_ids: list[int]) -> dict[int, str]:
    """{image id: data URI} for up to inline_max() of the points, fetched here with the read token
    (in parallel, through the client's image cache); an image the API cannot render is left out."""
    ids = inline_ids(image_ids, inline_max())
    got = api.fetch_images([common.Api.thumbnail_request(i, INLINE_SOURCE_PX) for i in ids])
    ok = [(i, r) for i, r in zip(ids, got, strict=True) if not isinstance(r, ApiError)]
    return dict(zip([i for i, _ in ok], _data_uris(tuple(r.content for _, r in ok)), strict=True))


def map_frame(points: list[dict], dataset_id: int, image_url: str | None,
              inline: dict[int, str] | None = None) -> pd.DataFrame:
    """The points as the chart's rows: the picture each tooltip shows, and the link a click follows
    (this dashboard's Image page, a relative URL, so it works wherever the page is served). The
    picture is the API's thumbnail URL under ``image_url``; without one, the point's ``data:`` URI
    in ``inline``, or "" (which the tooltip skips) for a point that has none."""
    frame = pd.DataFrame(points, columns=["image_id", "rel_path", "x", "y", "label"])
    if image_url is not None:
        frame["image"] = [f"{image_url}/api/v1/images/{i}/thumbnail?size={THUMB_PX}" for i in frame["image_id"]]
    elif inline:
        frame["image"] = [inline.get(int(i), "") for i in frame["image_id"]]
    frame["open"] = [f"?page=image&dataset={dataset_id}&image={i}" for i in frame["image_id"]]
    frame["label"] = frame["label"].fillna("(unlabelled)")
    return frame


def map_chart(frame: pd.DataFrame, coloured: bool) -> alt.Chart:
    tooltip = ([alt.Tooltip("image:N", title="image")] if "image" in frame else []) + [
        alt.Tooltip("rel_path:N", title="file"), alt.Tooltip("image_id:Q", title="id")]
    if coloured:
        tooltip.append(alt.Tooltip("label:N", title="label"))
    # tableau20: 20 distinguishable hues (the theme's own palette repeats after a few classes).
    color = (alt.Color("label:N", title="label", scale=alt.Scale(scheme="tableau20"),
                       legend=alt.Legend(orient="right", symbolLimit=40)) if coloured else alt.value("#4c78a8"))
    return (alt.Chart(frame).mark_circle(size=70, opacity=0.8)
            .encode(x=alt.X("x:Q", axis=None), y=alt.Y("y:Q", axis=None), color=color, tooltip=tooltip,
                    href=alt.Href("open:N"))
            .properties(height=640).interactive())


def render(api: common.Api) -> None:
    values = common.query_values(PAGE)
    st.header("Embedding map")
    dataset_id = common.dataset_picker(api, values["dataset"], key="map_dataset")
    if dataset_id is None:
        return
    try:
        checkpoints = api.checkpoints(dataset_id=dataset_id)
    except ApiError as exc:
        common.show_error(exc, "cannot list checkpoints")
        return
    if not checkpoints:
        st.info("No checkpoint for this dataset yet: run a pipeline on the Jobs page.")
        common.set_query(PAGE, {"dataset": dataset_id})
        return
    labels = {c["id"]: common.checkpoint_label(c) for c in checkpoints}
    ids = list(labels)
    current = values["checkpoint"] if values["checkpoint"] in labels else ids[0]  # newest first
    checkpoint = st.selectbox("Checkpoint", ids, index=ids.index(current), format_func=labels.get,
                              key="map_checkpoint")
    common.set_query(PAGE, {"dataset": dataset_id, "checkpoint": checkpoint})
    try:
        page = api.embedding_map(checkpoint, dataset_id=dataset_id, limit=PAGE_SIZE)
        points = list(page["items"])
        while page.get("next_cursor") and len(points) < MAX_POINTS:
            page_next = api.embedding_map(checkpoint, dataset_id=dataset_id, limit=PAGE_SIZE,
                                          cursor=page["next_cursor"])
            points += page_next["items"]
            page = {**page, "next_cursor": page_next.get("next_cursor")}
    except ApiError as exc:
        if exc.status != 404:
            common.show_error(exc, "cannot load the embedding map")
            return
        st.info(f"No map yet: {exc}")
        _submit_form(api, dataset_id, checkpoint, expanded=True)
        return
    _describe(page, len(points))
    thumbs = common.public_api_url(api)
    inline = inline_thumbnails(api, [p["image_id"] for p in points]) if thumbs is None else None
    frame = map_frame(points, dataset_id, thumbs, inline)
    coloured = page.get("labels") is not None
    st.altair_chart(map_chart(frame, coloured), width="stretch")
    if inline is not None and len(inline) < len(points):
        st.caption(f"The API needs a token for reads, which the browser never gets: the dashboard sent the photos of "
                   f"{len(inline):,} of the {len(points):,} dots (at most {inline_max():,}, {INLINE_MAX_ENV}); "
                   "hovering another shows its file name; open a dot on the Image page to see its photo.")
    _open_picker(dataset_id, checkpoint, points)
    _submit_form(api, dataset_id, checkpoint, expanded=False)


def _describe(page: dict, shown: int) -> None:
    params = page.get("params") or {}
    how = page["method"].upper()
    if page.get("method_reason"):
        how += f" ({page['method_reason']})"
    if page["method"] == "umap":
        how += f" · n_neighbors {params.get('n_neighbors')} · min_dist {params.get('min_dist')}"
    more = f" (the first {shown:,} shown)" if shown < (page.get("total") or 0) else ""
    st.caption(f"{page.get('total', shown):,} images{more} · {how} · seed {params.get('seed')} · "
               f"job #{page['job_id']} · hover a dot for its photo, click it to open the Image page")
    lab = page.get("labels")
    if lab:
        st.caption(f"colour: {lab.get('format')} labels from {common.md_text(lab.get('path'))} · "
                   f"{lab.get('labelled')} images labelled, {lab.get('classes')} classes")


def _open_picker(dataset_id: int, checkpoint: int, points: list[dict]) -> None:
    names = {p["image_id"]: f"{p['image_id']} · {p['rel_path']}" for p in points}
    pick, button = st.columns([4, 1], vertical_alignment="bottom")
    chosen = pick.selectbox("Image", list(names), format_func=names.get, key="map_image")
    button.button("Open on the Image page", key="map_open", on_click=common.goto,
                  args=("image", {"dataset": dataset_id, "image": chosen, "checkpoint": checkpoint}))


def _submit_form(api: common.Api, dataset_id: int, checkpoint: int, expanded: bool) -> None:
    with st.expander("Compute a map" if expanded else "Compute it again (other method, seed or labels)",
                     expanded=expanded):
        with st.form(f"map_submit_{checkpoint}", border=False):
            method = st.selectbox("Method", list(METHODS), format_func=METHODS.get, key="map_method")
            c1, c2, c3 = st.columns(3)
            seed = c1.number_input("Seed", min_value=0, max_value=2**31 - 1, value=0, step=1, key="map_seed")
            n_neighbors = c2.number_input("UMAP n_neighbors", min_value=2, max_value=200, value=15, step=1,
                                          key="map_n_neighbors")
            min_dist = c3.number_input("UMAP min_dist", min_value=0.0, max_value=1.0, value=0.1, step=0.05,
                                       key="map_min_dist")
            labels = st.text_input(
                "Label file (optional, colours the dots)", key="map_labels", max_chars=4096,
                placeholder="e.g. sample/labels.csv, coco/annotations/instances_val2017.json or coco128/labels",
                help="under a data root (ORL_DATA_ROOTS): a CSV of image,label rows (path relative to the dataset "
                     "folder, or the file name), a COCO instances json, or a YOLO label folder (each image gets "
                     "the class covering most of its box area)")
            if st.form_submit_button("Submit", disabled=not api.token, type="primary"):
                params = build_params(checkpoint, method, int(seed), int(n_neighbors), float(min_dist), labels)
                try:
                    job = api.submit_job("embedding_map", dataset_id, params,
                                         idempotency_key=f"dashboard-{uuid.uuid4()}")
                except ApiError as exc:
                    common.show_error(exc, "the job was refused")
                else:
                    st.success(f"submitted job #{job['id']} ({job['status']}); follow it on the Jobs page, "
                               "then reload this page")
        if not api.token:
            st.caption("read-only: type the API token in the sidebar to submit")


def build_params(checkpoint: int, method: str, seed: int, n_neighbors: int, min_dist: float,
                 labels: str | None) -> dict[str, Any]:
    """The embedding_map job's params; UMAP's options only when UMAP may run, labels when given."""
    params: dict[str, Any] = {"checkpoint_id": int(checkpoint), "method": method, "seed": int(seed)}
    if method != "pca":
        params.update(n_neighbors=int(n_neighbors), min_dist=round(float(min_dist), 4))
    if labels and labels.strip():
        params["labels"] = labels.strip()
    return params
