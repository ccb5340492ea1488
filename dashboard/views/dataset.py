"""Dataset: counts, the histogram of pair scores, reviewed precision per mining job, and the
unreadable images with their reasons."""

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
    st.caption(f"{common.md_text(ds['name'])} · {common.md_text(ds['path'])} · {ds.get('status', 'ready')}")
    if (reg := common.registration_text(ds)) is not None:
        (st.warning if ds.get("status") == "incomplete" else st.info)(reg)
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

    st.subheader("Reviewed precision per mining job")
    _review_table(api, mine_jobs)

    st.subheader("Unreadable images")
    _failed_images(api, dataset_id)


def precision_text(summary: dict) -> str:
    """'0.667 [0.208, 0.939]' (precision and its interval), or '–' before any review."""
    if summary.get("precision") is None:
        return "–"
    lo, hi = summary["interval"]
    return f"{summary['precision']:.3f} [{lo:.3f}, {hi:.3f}]"


def _review_table(api: common.Api, mine_jobs: list[dict]) -> None:
    rows = []
    for job in mine_jobs:
        try:
            summary = api.review_summary(job["id"])
        except ApiError as exc:
            common.show_error(exc, f"cannot load the reviews of job {job['id']}")
            continue
        rows.append({"job": f"#{job['id']}", "status": job["status"], "pairs": summary["pairs"],
                     "reviewed": summary["reviewed"], "correct": summary["correct"], "wrong": summary["wrong"],
                     "disputed": summary["disputed"], "reviewers": len(summary["reviewers"]),
                     "precision [95% interval]": precision_text(summary)})
    if not rows:
        st.info("No mining job yet.")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption("Share of reviewed pairs marked correct (a pair counts once, with the verdict most of its reviewers "
               "gave), with a Wilson 95% interval. It estimates the precision of all of a job's pairs only when the "
               "reviewed ones are a random sample: review them on the Pairs page with Order: random sample. When two "
               "jobs' intervals do not overlap, their precision really differs.")


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
