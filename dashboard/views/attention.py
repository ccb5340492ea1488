"""Attention: one image's attention map under two checkpoints side by side (the paper's Fig. 4).

The API computes the map (cosine similarity of each res5 cell to the pooled feature) and sends
it as a bare colour-mapped PNG with its raw value range in headers; the page blends it over the
thumbnail, so the opacity slider is instant and costs the API nothing.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from PIL import Image

from dashboard import drawing
from dashboard.api_client import ApiError
from dashboard.views import common

SIZE_PX = 512  # thumbnail and heat map are requested at the same size, so they align exactly


def jet_bar(width: int = 256, height: int = 12) -> Image.Image:
    """The jet colour scale (blue = low, red = high) the API's heat maps use, as a legend."""
    x = np.linspace(0.0, 1.0, width)
    # Piecewise-linear jet: each channel is a trapezoid over the scale.
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    row = (np.stack([r, g, b], axis=1) * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(row[None], height, axis=0))


def default_pair(checkpoints: list[dict]) -> tuple[int | None, int | None]:
    """Newest BYOL checkpoint on the left, newest ORL one on the right (the paper's comparison)."""
    byol = next((c["id"] for c in checkpoints if c.get("stage") == "byol"), None)
    orl = next((c["id"] for c in checkpoints if c.get("stage") == "orl"), None)
    ids = [c["id"] for c in checkpoints]
    left = byol or (ids[0] if ids else None)
    right = orl or next((i for i in ids if i != left), left)
    return left, right


def render(api: common.Api) -> None:
    values = common.query_values("attention")
    st.header("Attention")
    dataset_id = common.dataset_picker(api, values["dataset"], key="attention_dataset")
    if dataset_id is None:
        return
    try:
        checkpoints = api.checkpoints(dataset_id=dataset_id)
        images = (api.images(dataset_id, status="ok", limit=200).get("items") or [])
    except ApiError as exc:
        common.show_error(exc, "cannot list checkpoints or images")
        return
    if not checkpoints:
        st.info("No checkpoint for this dataset yet: run a pipeline on the Jobs page.")
        common.set_query("attention", {"dataset": dataset_id})
        return
    if not images:
        st.info("This dataset has no readable image.")
        return
    ids = [c["id"] for c in checkpoints]
    labels = {c["id"]: common.checkpoint_label(c) for c in checkpoints}
    image_ids = [im["id"] for im in images]
    names = {im["id"]: f"{im['id']} · {im['rel_path']}" for im in images}
    if values["image"] is not None and values["image"] not in image_ids:
        image_ids.insert(0, values["image"])  # a linked image beyond the first page of the list
    left_default, right_default = default_pair(checkpoints)
    a = values["a"] if values["a"] in ids else left_default
    b = values["b"] if values["b"] in ids else right_default

    c1, c2, c3 = st.columns([2, 2, 2])
    image_id = c1.selectbox("Image", image_ids, key="attention_image",
                            index=image_ids.index(values["image"]) if values["image"] in image_ids else 0,
                            format_func=lambda i: names.get(i, f"image {i}"))
    a = c2.selectbox("Left checkpoint", ids, index=ids.index(a), format_func=labels.get, key="attention_a")
    b = c3.selectbox("Right checkpoint", ids, index=ids.index(b), format_func=labels.get, key="attention_b")
    opacity = st.slider("Heat-map opacity", 0.0, 1.0, float(values["opacity"]), 0.05, key="attention_opacity")
    common.set_query("attention", {"dataset": dataset_id, "image": image_id, "a": a, "b": b, "opacity": opacity})

    try:
        base = drawing.open_image(api.thumbnail(image_id, SIZE_PX).content)
    except ApiError as exc:
        common.show_error(exc, f"cannot load image {image_id}")
        return
    cols = st.columns(2)
    for col, ckpt in zip(cols, (a, b), strict=True):
        with col:
            st.markdown(f"**{labels[ckpt]}**")
            try:
                with st.spinner("computing the attention map…"):
                    heat = api.attention(image_id, ckpt, SIZE_PX)
            except ApiError as exc:
                common.show_error(exc, f"no attention map for checkpoint {ckpt}")
                continue
            st.image(drawing.blend(base, drawing.open_image(heat.content), opacity), width="stretch",
                     output_format="JPEG")
            vmin = heat.headers.get("x-attention-vmin", "?")
            vmax = heat.headers.get("x-attention-vmax", "?")
            method = heat.headers.get("x-attention-method", "similarity")
            st.image(jet_bar(), width="stretch")
            lo, mid, hi = st.columns([1, 2, 1])
            lo.caption(f"{vmin}")
            mid.caption(f"<div style='text-align:center'>{method}: raw value range</div>", unsafe_allow_html=True)
            hi.caption(f"<div style='text-align:right'>{vmax}</div>", unsafe_allow_html=True)
