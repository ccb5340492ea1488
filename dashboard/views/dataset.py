"""Dataset: counts, the histogram of pair scores, and the unreadable images with their reasons."""

from __future__ import annotations

import itertools

import pandas as pd
import streamlit as st

from dashboard.api_client import ApiError
from dashboard.views import common

FAILED_PAGE = 50


def histogram_frame(hist: dict) -> pd.DataFrame:
    """The API's {edges, counts} as a frame indexed by bin label ('0.62–0.65'), in score order."""
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if len(edges) != len(counts) + 1 or not counts:
        return pd.DataFrame({"pairs": []})
    labels = [f"{lo:.3f}–{hi:.3f}" for lo, hi in itertools.pairwise(edges)]
    # Ordered categories keep the bars in score order (a plain string index would be sorted).
    return pd.DataFrame({"score": pd.Categorical(labels, categories=labels, ordered=True), "pairs": counts})


def render(api: common.Api) -> None:
    values = common.query_values("dataset")
    st.header("Dataset")
    dataset_id = common.dataset_picker(api, values["dataset"], key="dataset_dataset")
    if dataset_id is None:
        return
    common.set_query("dataset", {"dataset": dataset_id})
    try:
        ds = api.dataset(dataset_id)
    except ApiError as exc:
        common.show_error(exc, f"cannot load dataset {dataset_id}")
        return
    st.caption(f"{ds['name']} · {ds['path']}")
    counts = ds.get("counts") or {}
    cols = st.columns(5)
    tiles = [("images", "Images"), ("failed_images", "Unreadable"), ("proposals", "Proposals (boxes)"),
             ("pairs", "RoI pairs"), ("jobs", "Jobs")]
    for col, (key, label) in zip(cols, tiles, strict=True):
        col.metric(label, f"{counts.get(key, 0):,}")

    st.subheader("Pair scores")
    try:
        mine_jobs = api.jobs(dataset_id=dataset_id, kind="mine", limit=100)
    except ApiError as exc:
        common.show_error(exc, "cannot list mining jobs")
        mine_jobs = []
    options = [None] + [j["id"] for j in mine_jobs]
    job_id = st.selectbox("Mining job", options, key="dataset_job",
                          format_func=lambda i: "all mining jobs" if i is None else f"job #{i}")
    try:
        hist = api.histogram(dataset_id=dataset_id, job_id=job_id, bins=30)
    except ApiError as exc:
        common.show_error(exc, "cannot load the score histogram")
        hist = {}
    frame = histogram_frame(hist)
    if frame.empty:
        st.info("No pairs yet.")
    else:
        st.bar_chart(frame, x="score", y="pairs", x_label="pair score (cosine similarity)", y_label="pairs")
        st.caption(f"{hist.get('total', 0):,} pairs")

    st.subheader("Unreadable images")
    _failed_images(api, dataset_id)


def _failed_images(api: common.Api, dataset_id: int) -> None:
    # Cursor pagination within this session; the list is usually empty or short.
    cursors = st.session_state.setdefault(f"failed_cursors_{dataset_id}", [None])
    try:
        page = api.images(dataset_id, status="failed", limit=FAILED_PAGE, cursor=cursors[-1])
    except ApiError as exc:
        common.show_error(exc, "cannot list unreadable images")
        return
    rows = page.get("items") or []
    if not rows and len(cursors) == 1:
        st.success("Every image of this dataset is readable.")
        return
    st.caption(f"{page.get('total', len(rows))} unreadable images; they are skipped by mining and training")
    st.dataframe(pd.DataFrame([{"id": r["id"], "file": r["rel_path"], "reason": r.get("reason") or ""} for r in rows]),
                 hide_index=True, width="stretch")
    back, more, _ = st.columns([1, 1, 5])
    if back.button("← Back", disabled=len(cursors) == 1, key="failed_back"):
        cursors.pop()
        st.rerun()
    if more.button("More →", disabled=not page.get("next_cursor"), key="failed_more"):
        cursors.append(page["next_cursor"])
        st.rerun()
