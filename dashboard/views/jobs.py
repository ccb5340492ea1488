"""Jobs: register a dataset, submit pipeline / mine / train jobs, watch progress, cancel."""

from __future__ import annotations

import json
import uuid
from typing import Any

import streamlit as st

from dashboard.api_client import ApiError
from dashboard.views import common

# "default" sends no preset: the worker that runs the job applies the one default rule
# (README, "Presets"): paper on a CUDA device, else cpu; mine / train: the checkpoint's.
DEFAULT = "default"
PRESETS = (DEFAULT, "tiny", "cpu", "paper")
# Sensible starting points: `tiny` shows the whole pipeline in minutes on a laptop CPU (the
# `make demo` setting); `cpu` is a meaningful CPU run; `paper` is ResNet-50 on GPUs. With the
# default preset the epochs are the preset's unless given.
DEFAULT_EPOCHS: dict[str, int | None] = {DEFAULT: None, "tiny": 5, "cpu": 30, "paper": 800}
KINDS = {"pipeline": "Pipeline (pretrain → mine → train)", "mine": "Mine pairs", "train": "Train (stage 3)"}


def _preset(preset: str) -> dict[str, Any]:
    return {} if preset == DEFAULT else {"preset": preset}


def stage_params(preset: str, epochs: int | None) -> dict[str, Any]:
    out: dict[str, Any] = _preset(preset)
    if epochs:
        out["epochs"] = int(epochs)
    return out


def build_params(kind: str, preset: str, epochs: int | None, *, checkpoint_id: int | None = None,
                 mine_job_id: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job's ``params``: what the form shows, then the advanced JSON on top (it wins)."""
    if kind == "pipeline":
        params: dict[str, Any] = {"pretrain": stage_params(preset, epochs), "mine": _preset(preset),
                                  "train": stage_params(preset, epochs)}
        for stage, over in (extra or {}).items():
            params[stage] = {**params.get(stage, {}), **over}
        return params
    params = _preset(preset)
    if kind == "train":
        params.update(stage_params(preset, epochs))
        if mine_job_id:
            params["mine_job_id"] = int(mine_job_id)
    if kind == "mine" and checkpoint_id:
        params["checkpoint_id"] = int(checkpoint_id)
    return {**params, **(extra or {})}


def parse_extra(text: str) -> dict[str, Any]:
    """The advanced-parameters box: empty, or a JSON object. ValueError says what is wrong."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"advanced parameters are not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(value, dict):
        raise ValueError("advanced parameters must be a JSON object, e.g. {\"epochs\": 10}")
    return value


def progress_text(job: dict) -> tuple[float | None, str]:
    """(fraction done or None, a one-line description) of a job's progress."""
    p = job.get("progress") or {}
    done, total = p.get("done") or 0, p.get("total") or 0
    frac = min(1.0, done / total) if total else None
    parts = []
    if p.get("stage"):
        parts.append(f"stage {p['stage']}")
    if total:
        parts.append(f"{done}/{total}")
    if p.get("scanned") is not None:  # a register job: files listed, and of the checksummed, unreadable
        parts.append(f"{p['scanned']} files found")
    if p.get("failed"):
        parts.append(f"{p['failed']} unreadable")
    if p.get("epoch") is not None:
        parts.append(f"epoch {p['epoch']}")
    if p.get("step") is not None:
        parts.append(f"step {p['step']}")
    if isinstance(p.get("loss"), (int, float)):
        parts.append(f"loss {p['loss']:.4f}")
    if isinstance(p.get("images_per_s"), (int, float)):
        parts.append(f"{p['images_per_s']:.1f} img/s")
    if isinstance(p.get("eta_s"), (int, float)) and common.is_active(job):
        parts.append(f"ETA {format_seconds(p['eta_s'])}")
    return frac, " · ".join(parts)


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


TRAINING_KINDS = ("pretrain", "train")
CURVES_HELP = ("loss and learning rate per step; with monitor_every_epochs, the label-free signals per monitored "
               "epoch: top-1 retrieval of each photo's second view (chance: 1 / photos) and the embeddings' "
               "effective rank (near 1: collapse)")
STATUS_COLOURS = {"queued": "gray", "running": "blue", "succeeded": "green", "failed": "red",
                  "cancelling": "orange", "cancelled": "gray"}


def render(api: common.Api) -> None:
    values = common.query_values("jobs")
    st.header("Jobs")
    left, right = st.columns([2, 3], gap="large")
    with left:
        _register_form(api)
        dataset_id = common.dataset_picker(api, values["dataset"], key="jobs_dataset")
        common.set_query("jobs", {"dataset": dataset_id})
        if dataset_id is not None:
            _submit_form(api, dataset_id)
    with right:
        if dataset_id is not None:
            _job_list(api, dataset_id)


def _register_form(api: common.Api) -> None:
    with st.expander("Register a folder of images", expanded=False):
        with st.form("register_dataset", clear_on_submit=False, border=False):
            name = st.text_input("Name", value="sample", key="register_name")
            path = st.text_input("Folder", value="sample/images", key="register_path",
                                 help="absolute, or relative to a data root (ORL_DATA_ROOTS)")
            if st.form_submit_button("Register", disabled=not api.token):
                try:
                    ds = api.register_dataset(name, path)
                except ApiError as exc:
                    common.show_error(exc, "registration refused")
                else:
                    # The API answers at once; a registration job scans the folder (its progress is in
                    # the job list on the right, which refreshes itself while it runs).
                    reg = ds.get("registration") or {}
                    counts = ds.get("counts") or {}
                    st.success(f"dataset #{ds['id']} {ds['name']} ({ds.get('status', 'ready')}): registration job "
                               f"#{reg.get('job_id', '?')} {reg.get('status', '')}, {counts.get('images', 0)} images "
                               "recorded so far")
                    st.session_state["jobs_dataset"] = ds["id"]
        if not api.token:
            st.caption("Registering needs the API token (sidebar).")


def _submit_form(api: common.Api, dataset_id: int) -> None:
    st.subheader("Submit a job")
    kind = st.radio("Kind", list(KINDS), format_func=KINDS.get, key="submit_kind", horizontal=True)
    # Outside the form: the epochs default follows the preset as soon as it changes.
    preset = st.selectbox("Preset", PRESETS, key="submit_preset",
                          help="default: decided where the job runs (paper on a GPU, else cpu; mining and stage 3 "
                               "take the checkpoint's); tiny: minutes on a CPU (demo); cpu: a real CPU run; "
                               "paper: ResNet-50, GPU")
    checkpoints: list[dict] = []
    mine_jobs: list[dict] = []
    try:
        if kind == "mine":
            checkpoints = api.checkpoints(dataset_id=dataset_id)
        if kind == "train":
            mine_jobs = [j for j in api.jobs(dataset_id=dataset_id, kind="mine", status="succeeded")]
    except ApiError as exc:
        common.show_error(exc, "cannot list inputs")
    with st.form("submit_job", border=True):
        epochs = None
        if kind in ("pipeline", "train"):
            epochs = st.number_input("Epochs (stages 1 and 3)", min_value=1, max_value=5000,
                                     value=DEFAULT_EPOCHS[preset], key=f"submit_epochs_{preset}",
                                     placeholder="the preset's (empty)")
        checkpoint_id = mine_job_id = None
        if kind == "mine":
            if not checkpoints:
                st.warning("No checkpoint for this dataset yet: run a pipeline (or a pretrain job) first.")
            checkpoint_id = st.selectbox(
                "Checkpoint (stage 1)", [c["id"] for c in checkpoints], key="submit_ckpt",
                format_func=lambda cid: _checkpoint_label(next(c for c in checkpoints if c["id"] == cid)))
        if kind == "train":
            if not mine_jobs:
                st.warning("No succeeded mining job for this dataset yet.")
            mine_job_id = st.selectbox("Pairs from mining job", [j["id"] for j in mine_jobs], key="submit_minejob",
                                       format_func=lambda i: f"job #{i}")
        extra_text = st.text_area("Advanced parameters (JSON, optional)", key="submit_extra", height=80,
                                  placeholder='{"batch_size": 16}' if kind != "pipeline"
                                  else '{"mine": {"knn_k": 5}}')
        submitted = st.form_submit_button("Submit", type="primary", disabled=not api.token)
    if not api.token:
        st.caption("Submitting needs the API token (sidebar).")
    if submitted:
        try:
            params = build_params(kind, preset, epochs, checkpoint_id=checkpoint_id, mine_job_id=mine_job_id,
                                  extra=parse_extra(extra_text))
        except ValueError as exc:
            st.error(str(exc))
            return
        try:
            # A fresh key per click: a retried request (network hiccup, double rerun) cannot
            # start the same job twice.
            job = api.submit_job(kind, dataset_id, params, idempotency_key=f"dashboard-{uuid.uuid4()}")
        except ApiError as exc:
            common.show_error(exc, "job refused")
        else:
            st.success(f"submitted job #{job['id']} ({job['kind']}), {job['status']}")


def _checkpoint_label(c: dict) -> str:
    meta = c.get("meta") or {}
    extra = f", epoch {meta['epoch']}" if "epoch" in meta else ""
    return f"#{c['id']} {c.get('stage') or ''} (job {c.get('job_id')}{extra})"


def _job_list(api: common.Api, dataset_id: int) -> None:
    st.subheader("Jobs of this dataset")
    try:
        jobs = api.jobs(dataset_id=dataset_id, limit=50)
    except ApiError as exc:
        common.show_error(exc, "cannot list jobs")
        return
    if not jobs:
        st.info("No jobs yet: submit one on the left.")
        return
    live = any(common.is_active(j) for j in jobs)
    # While something runs the list refreshes itself every 2 s (a fragment: only this part of
    # the page reruns); once everything finished it stops polling.
    table = st.fragment(run_every="2s" if live else None)(_job_table)
    table(api, dataset_id, live)


def _job_table(api: common.Api, dataset_id: int, was_live: bool) -> None:
    try:
        jobs = api.jobs(dataset_id=dataset_id, limit=50)
    except ApiError as exc:
        common.show_error(exc, "cannot list jobs")
        return
    if was_live and not any(common.is_active(j) for j in jobs):
        st.rerun()  # everything finished: redraw the page once, without the timer
    by_parent: dict[int, list[dict]] = {}
    for j in jobs:
        if j.get("parent_id"):
            by_parent.setdefault(j["parent_id"], []).append(j)
    top = [j for j in jobs if not j.get("parent_id") or j["parent_id"] not in {x["id"] for x in jobs}]
    for job in top:
        with st.container(border=True):
            _job_row(api, job)
            for child in sorted(by_parent.get(job["id"], []), key=lambda c: c["id"]):
                _job_row(api, child, nested=True)


def _job_row(api: common.Api, job: dict, nested: bool = False) -> None:
    colour = STATUS_COLOURS.get(job["status"], "gray")
    head, action = st.columns([5, 1], vertical_alignment="center")
    indent = "↳ " if nested else ""
    head.markdown(f"{indent}**#{job['id']} {job['kind']}** :{colour}-badge[{job['status']}]"
                  f" <small>created {str(job.get('created_at', ''))[:19].replace('T', ' ')}</small>",
                  unsafe_allow_html=True)
    frac, text = progress_text(job)
    if frac is not None or text:
        st.progress(frac if frac is not None else 0.0, text=text or None)
    if job.get("error"):
        st.error(job["error"])
    if job["kind"] in TRAINING_KINDS and job["status"] != "queued":
        # Behind a toggle: fetched only when asked for, so a long job list costs no extra requests.
        if st.toggle("Curves", key=f"curves_{job['id']}", help=CURVES_HELP):
            _training_curves(api, job)
    if job["status"] == "succeeded" and job["kind"] in ("mine", "pipeline") and not nested:
        # A pipeline's pairs belong to its mine stage; link that job, the one the Pairs page lists.
        mine_id = ((job.get("result") or {}).get("stages") or {}).get("mine", job["id"])
        st.button("Show pairs", key=f"pairs_{job['id']}", on_click=_goto_pairs, args=(job["dataset_id"], mine_id))
    if common.is_active(job) and not nested and job["status"] != "cancelling":
        if action.button("Cancel", key=f"cancel_{job['id']}", disabled=not api.token):
            try:
                api.cancel_job(job["id"])
            except ApiError as exc:
                common.show_error(exc, f"cannot cancel job {job['id']}")
            else:
                st.toast(f"cancel requested for job #{job['id']}")
                st.rerun()


def curve_frames(metrics: dict) -> dict[str, Any]:
    """The charts of a job's GET /jobs/{id}/metrics answer: title -> a DataFrame indexed by
    global step, one column per line. A chart whose values were never logged is left out."""
    import pandas as pd

    out: dict[str, Any] = {}
    steps = pd.DataFrame(metrics.get("steps") or [])
    if not steps.empty:
        steps = steps.set_index("global_step")
        losses = [c for c in ("loss", "loss_global", "loss_intra", "loss_inter") if steps[c].notna().any()]
        if losses:
            out["loss"] = steps[losses]
        if steps["lr"].notna().any():
            out["learning rate"] = steps[["lr"]]
    mon = pd.DataFrame(metrics.get("monitor") or [])
    if not mon.empty:
        mon = mon.set_index("global_step")
        out["view retrieval top-1"] = mon[["view_top1", "view_top1_chance"]].rename(
            columns={"view_top1": "top-1", "view_top1_chance": "chance"})
        out["effective rank"] = mon[["effective_rank", "effective_rank_max"]].rename(
            columns={"effective_rank": "rank", "effective_rank_max": "ceiling"})
    return out


def _training_curves(api: common.Api, job: dict) -> None:
    try:
        metrics = api.job_metrics(job["id"], live=common.is_active(job))
    except ApiError as exc:
        common.show_error(exc, f"cannot read the curves of job {job['id']}")
        return
    frames = curve_frames(metrics)
    if not frames:
        st.caption(metrics.get("note") or "nothing logged yet")
        return
    if "view retrieval top-1" not in frames:
        st.caption("No label-free signals: set monitor_every_epochs in the job's params to log them.")
    cols = st.columns(2)
    for k, (title, frame) in enumerate(frames.items()):
        with cols[k % 2]:
            st.caption(f"{title} (by step)")
            st.line_chart(frame, height=160)


def _goto_pairs(dataset_id: int, job_id: int) -> None:
    common.goto("pairs", {"dataset": dataset_id, "job": job_id})
