"""Pairs: mined RoI pairs, with filters, cursor pages and the reviewer's verdicts.

Each pair is one picture: the query image and its neighbour as thumbnails with the two boxes in
one colour, then the two crops (framed in that colour); its caption gives the pair's number on
the page, score, ranks, ids, reviews and this reviewer's verdict. Pairs come best first, worst
first or as a seeded random sample (the one to review for an unbiased precision, shown per mining
job on the Dataset page). Images come from the API's thumbnail and crop endpoints; boxes are
drawn here onto the thumbnails.

A page's images (up to 4 per pair) are requested together before anything is drawn, in parallel
and through the client's image cache (``Api.fetch_images``): one round trip's latency per page
instead of one per image. A pair's four images are drawn (boxes on the thumbnails, frames around
the crops) and put side by side into one picture, cached as JPEG bytes, which ``st.image`` sends as
they are: a warm page costs no decoding or encoding.

Most of a page's cost is the browser's, and it grows with the number of elements Streamlit
renders (benchmarks/results/page_benchmark.md): each widget, column and text block is a React
component of its own, wrapped in several layout elements. So the page's pictures and their
captions are ONE ``st.image`` element, and what used to be four buttons per pair is done once per
page, in the sidebar (in view while the pictures scroll by): one form marks the page's pairs
correct or wrong, and one pair picker leads to "Only this image" and "Image page".

The browser itself only ever talks to the dashboard; see docs/SERVICES.md ("Fast pages") for why
it does not fetch from the API directly.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Sequence

import streamlit as st
from PIL import Image

from dashboard import drawing, urlstate
from dashboard.api_client import ApiError
from dashboard.views import common

THUMB_PX = 256  # a size the mining jobs render ahead (PRERENDER_SIZES_PX of services.common.thumbnails)
CROP_PX = 160
REVIEWER = "reviewer_name"  # session key: who marks pairs on this browser session


def render(api: common.Api) -> None:
    values = common.query_values("pairs")
    st.header("Pairs")
    dataset_id = common.dataset_picker(api, values["dataset"], key="pairs_dataset")
    if dataset_id is None:
        return
    try:
        mine_jobs = [j for j in api.jobs(dataset_id=dataset_id, kind="mine", limit=100)]
    except ApiError as exc:
        common.show_error(exc, "cannot list mining jobs")
        return
    job_ids = [j["id"] for j in mine_jobs]
    # A pipeline link (?job=<pipeline id>) is accepted by the API as its mine stage; show it too.
    if values["job"] is not None and values["job"] not in job_ids:
        job_ids.insert(0, values["job"])
    if not job_ids:
        st.info("No mining job for this dataset yet: submit a pipeline on the Jobs page.")
        common.set_query("pairs", {"dataset": dataset_id})
        return
    status_of = {j["id"]: j["status"] for j in mine_jobs}
    default_job = values["job"] if values["job"] in job_ids else next(
        (j["id"] for j in mine_jobs if j["status"] == "succeeded"), job_ids[0])

    c1, c2, c3, c4, c5 = st.columns([2, 1.4, 1, 1, 2])
    job_id = c1.selectbox("Mining job", job_ids, index=job_ids.index(default_job), key="pairs_job",
                          format_func=lambda i: f"#{i} ({status_of.get(i, 'pipeline')})")
    order = c2.selectbox("Order", urlstate.ORDERS, index=urlstate.ORDERS.index(values["order"]), key="pairs_order",
                         format_func=ORDER_LABELS.get)
    # Only a random sample has a seed (the link keeps it, so leaving and coming back keeps the sample).
    seed = c3.number_input("Seed", min_value=0, max_value=2**31 - 1, value=values["seed"], step=1, key="pairs_seed",
                           help="the same seed gives the same sample") if order == "random" else values["seed"]
    per_page = c4.selectbox("Per page", urlstate.PAGE_SIZES, index=urlstate.PAGE_SIZES.index(values["per_page"]),
                            key="pairs_per_page")
    # A widget's state is dropped on pages without it: the name is kept in a key of its own.
    typed = c5.text_input("Reviewer", value=st.session_state.get(REVIEWER, os.environ.get("ORL_REVIEWER", "")),
                          key="reviewer", max_chars=100, placeholder="your name, to mark pairs",
                          help="kept in this browser session only, never in the link (default: ORL_REVIEWER)")
    d1, d2 = st.columns([1.4, 6], vertical_alignment="center")
    # The narrowing filters sit in a popover: the browser builds its widgets only when it is opened
    # (five number inputs cost the browser a good part of what a page of pairs does); the line
    # above the pairs says which of them are set.
    with d1.popover("Filters", width="stretch", help="query image, score and box-area ranges"):
        image_id = st.number_input("Query image id", min_value=1, value=values["image"], step=1, key="pairs_image",
                                   placeholder="any")
        min_score = st.number_input("Minimum score", min_value=-1.0, max_value=1.0, value=values["min_score"],
                                    step=0.05, format="%.2f", key="pairs_min_score", placeholder="any")
        max_score = st.number_input("Maximum score", min_value=-1.0, max_value=1.0, value=values["max_score"],
                                    step=0.05, format="%.2f", key="pairs_max_score", placeholder="any")
        area_help = "both boxes of a pair, in square pixels of their own photo (a 100 x 100 box is 10000)"
        min_area = st.number_input("Min box area (px²)", min_value=0.0, value=values["min_area"], step=1000.0,
                                   format="%.0f", key="pairs_min_area", placeholder="any", help=area_help)
        max_area = st.number_input("Max box area (px²)", min_value=0.0, value=values["max_area"], step=1000.0,
                                   format="%.0f", key="pairs_max_area", placeholder="any", help=area_help)
    st.session_state[REVIEWER] = typed
    reviewer = typed.strip() or None
    todo = d2.checkbox("Only pairs I have not reviewed", value=values["todo"], key="pairs_todo",
                       disabled=reviewer is None)
    state = urlstate.with_filters(values, dataset=dataset_id, job=job_id, image=image_id, order=order,
                                  seed=int(seed) if order == "random" else 0, per_page=per_page, min_score=min_score,
                                  max_score=max_score, min_area=min_area, max_area=max_area,
                                  todo=bool(todo and reviewer))
    common.set_query("pairs", state)
    _page(api, state, reviewer)


def _active_filters(state: dict) -> str:
    """The narrowing filters that are set (the popover hides them), for the line above the pairs."""
    parts = [f"image {state['image']}" if state.get("image") is not None else "",
             f"score ≥ {state['min_score']:.2f}" if state.get("min_score") is not None else "",
             f"score ≤ {state['max_score']:.2f}" if state.get("max_score") is not None else "",
             f"box area ≥ {state['min_area']:.0f} px²" if state.get("min_area") is not None else "",
             f"box area ≤ {state['max_area']:.0f} px²" if state.get("max_area") is not None else ""]
    return "".join(f" · {p}" for p in parts if p)


ORDER_LABELS = {"score_desc": "best score first", "score_asc": "worst score first", "random": "random sample"}


def _filter_key(state: dict) -> tuple:
    return tuple(state.get(k) for k in urlstate.PAIR_FILTERS)


def _fetch(api: common.Api, reviewer: str | None, state: dict) -> dict:
    return api.pairs(job_id=state["job"], image_id=state["image"], min_score=state["min_score"],
                     max_score=state["max_score"], min_area=state["min_area"], max_area=state["max_area"],
                     order=state["order"], seed=state["seed"] if state["order"] == "random" else None,
                     reviewer=reviewer, reviewed=False if state["todo"] and reviewer else None,
                     limit=state["per_page"], cursor=state["cursor"])


def _page(api: common.Api, state: dict, reviewer: str | None) -> None:
    state = dict(state)
    try:
        page = common.fetch_page("pairs", state, functools.partial(_fetch, api, reviewer))
    except ApiError as exc:
        common.show_error(exc, "cannot load pairs")
        return
    items = page.get("items") or []
    before = common.cursor_history("pairs_history", _filter_key(state))
    page_no = len(before) + 1
    how = ORDER_LABELS[state["order"]] + (f" (seed {state['seed']})" if state["order"] == "random" else "")
    st.caption((f"page {page_no} · {len(items)} pairs, {how}" if items else "no pairs match these filters")
               + _active_filters(state))
    fetched = api.fetch_images([r for pair in items for r in _image_requests(pair)])
    first = (page_no - 1) * state["per_page"] + 1
    shown: list[tuple[int, dict]] = []  # (number on the page, pair) of the pairs whose images came
    failed: list[str] = []
    for i, pair in enumerate(items):
        error = next((r for r in fetched[4 * i:4 * i + 4] if isinstance(r, ApiError)), None)
        if error is None:
            shown.append((first + i, pair))
        else:
            failed.append(f"#{first + i} (pair {pair['id']}): {error}")
    if failed:
        st.warning("cannot load the images of " + "; ".join(failed))
    if shown:
        pictures = [_picture(pair, fetched[4 * (number - first):4 * (number - first) + 4], drawing.pair_colour(
            number - first)) for number, pair in shown]
        # One element for the whole page: the browser's cost grows with the number of elements
        # Streamlit renders (module docstring), and each pair's text rides along as its caption.
        st.image(pictures, caption=[_caption(number, pair) for number, pair in shown], output_format="JPEG",
                 alt=[f"pair #{number}: image {pair['image_id']} and its neighbour image {pair['neighbor_image_id']}"
                      " with the two boxes, then the two crops" for number, pair in shown])
        _sidebar_tools(api, shown, state["dataset"], reviewer)
    common.pager("pairs", state, page.get("next_cursor"), before, key="pairs")


def _image_requests(pair: dict) -> list[tuple[str, dict]]:
    """The pair's four images: query and neighbour thumbnails, then their two crops."""
    return [common.Api.thumbnail_request(pair["image_id"], THUMB_PX),
            common.Api.thumbnail_request(pair["neighbor_image_id"], THUMB_PX),
            common.Api.crop_request(pair["image_id"], pair["query_box"], CROP_PX),
            common.Api.crop_request(pair["neighbor_image_id"], pair["neighbor_box"], CROP_PX)]


def _boxed(data: bytes, box: Sequence[float], size: tuple[int | None, int | None],
           colour: tuple[int, int, int]) -> Image.Image:
    """The thumbnail with the box drawn in ``colour`` (without it while the size is unknown)."""
    thumb = drawing.open_image(data)
    if size[0] and size[1]:
        # The box is in the recorded image's pixels; the thumbnail is that image scaled down.
        thumb = drawing.draw_box(thumb, drawing.scale_box(box, (size[0], size[1]), thumb.size), colour)
    return thumb


@st.cache_data(max_entries=2000, show_spinner=False)
def _pair_picture(images: tuple[bytes, bytes, bytes, bytes], boxes: tuple[tuple[float, ...], tuple[float, ...]],
                  sizes: tuple[tuple[int | None, int | None], tuple[int | None, int | None]],
                  colour: tuple[int, int, int]) -> bytes:
    """JPEG of the query and neighbour thumbnails with their boxes, then the two crops framed."""
    q_thumb, n_thumb, q_crop, n_crop = images
    return drawing.jpeg(drawing.side_by_side([
        _boxed(q_thumb, boxes[0], sizes[0], colour), _boxed(n_thumb, boxes[1], sizes[1], colour),
        drawing.framed(drawing.open_image(q_crop), colour), drawing.framed(drawing.open_image(n_crop), colour)]))


def _picture(pair: dict, images: list, colour: tuple[int, int, int]) -> bytes:
    # JPEG: these are photos, and PNG would send several times the bytes to the browser.
    return _pair_picture(tuple(r.content for r in images), (tuple(pair["query_box"]), tuple(pair["neighbor_box"])),
                         ((pair.get("image_width"), pair.get("image_height")),
                          (pair.get("neighbor_width"), pair.get("neighbor_height"))), colour)


VERDICT_MARKS = {"correct": ":green[✓ correct]", "wrong": ":red[✗ wrong]"}


def _caption(number: int, pair: dict) -> str:
    """The pair's text under its picture (Markdown): number, score, ranks, ids, reviews, then what is drawn."""
    counts, mine = pair.get("reviews") or {}, pair.get("verdict")
    return (f"**#{number}** · score **{pair['score']:.3f}** · pair rank {pair['rank'] + 1} for these two images · "
            f"neighbour rank {pair['neighbor_rank'] + 1} · pair id {pair['id']} · job {pair['job_id']} · "
            f"reviews ✓ {counts.get('correct', 0)} · ✗ {counts.get('wrong', 0)}"
            + (f" · you: {VERDICT_MARKS[mine]}" if mine in VERDICT_MARKS else "")
            + f"  \nquery · image {pair['image_id']} · {common.md_text(pair.get('image_path') or '')} → neighbour "
            f"{pair['neighbor_rank'] + 1} · image {pair['neighbor_image_id']} · "
            f"{common.md_text(pair.get('neighbor_path') or '')} · then the query box and the neighbour box")


def _page_key(shown: list[tuple[int, dict]], reviewer: str | None) -> str:
    """Names this page's sidebar widgets: another page of pairs, another reviewer or a saved
    verdict makes new widgets (starting from their defaults) instead of keeping stale choices."""
    sig = repr([(n, p["id"], p.get("verdict")) for n, p in shown] + [reviewer])
    return f"{zlib.crc32(sig.encode()):08x}"


def _sidebar_tools(api: common.Api, shown: list[tuple[int, dict]], dataset_id: int, reviewer: str | None) -> None:
    """The per-pair actions, once for the whole page, in the sidebar (in view while the pairs
    scroll by): the review form, then a pair picker with "Only this image" and "Image page"."""
    by_number = dict(shown)
    key = _page_key(shown, reviewer)
    with st.sidebar:
        st.divider()
        _review_form(api, by_number, reviewer, key)
        pick = st.selectbox("Pair", list(by_number), key=f"pairs_pick_{key}",
                            format_func=lambda n: f"#{n} · image {by_number[n]['image_id']} → "
                                                  f"{by_number[n]['neighbor_image_id']}")
        pair = by_number[pick]
        only, page = st.columns(2)
        only.button("Only this image", key="pairs_only", on_click=_only_image, args=(pair["image_id"],),
                    help="show only the pairs whose query is this pair's query image")
        page.button("Image page", key="pairs_imagepage", on_click=common.goto, args=(
            "image", {"dataset": dataset_id, "image": pair["image_id"], "nb": pair["neighbor_image_id"]}),
            help="this pair's query photo with its neighbours")


def _review_form(api: common.Api, by_number: dict[int, dict], reviewer: str | None, key: str) -> None:
    """One form for the whole page's verdicts: the pairs marked correct and those marked wrong.

    Saving PUTs a verdict for each pair whose mark changed (the API's PUT is idempotent: a
    reviewer's second verdict replaces the first). The API has no way to withdraw a verdict, so a
    pair taken out of both lists keeps its old one, and the form says so."""
    why = "needs the API token (sidebar)" if not api.token else "type your name in the Reviewer field" if not reviewer \
        else None
    numbers = list(by_number)

    def marked(verdict: str) -> list[int]:
        return [n for n in numbers if by_number[n].get("verdict") == verdict]

    with st.form(f"pairs_review_{key}", border=False):
        st.markdown("**Review this page**" + (f" as {common.md_text(reviewer)}" if reviewer else ""))
        correct = st.multiselect("✓ correct", numbers, default=marked("correct"), key=f"pairs_correct_{key}",
                                 format_func=lambda n: f"#{n}", disabled=why is not None, placeholder="pairs",
                                 help=why or "the pairs of this page whose two boxes show the same kind of object")
        wrong = st.multiselect("✗ wrong", numbers, default=marked("wrong"), key=f"pairs_wrong_{key}",
                               format_func=lambda n: f"#{n}", disabled=why is not None, placeholder="pairs",
                               help=why or "a verdict can be changed, not withdrawn")
        saved = st.form_submit_button("Save reviews", disabled=why is not None, help=why, type="primary")
    if not saved or why is not None:
        return
    both = sorted(set(correct) & set(wrong))
    if both:
        st.error("marked both correct and wrong: " + ", ".join(f"#{n}" for n in both) + "; nothing saved")
        return
    changes = [(n, v) for v, ns in (("correct", correct), ("wrong", wrong)) for n in ns
               if by_number[n].get("verdict") != v]
    kept = [n for n in numbers if by_number[n].get("verdict") and n not in correct and n not in wrong]
    done = 0
    for n, verdict in changes:
        try:
            api.review_pair(by_number[n]["id"], verdict, reviewer or "")
        except ApiError as exc:
            common.show_error(exc, f"cannot review pair #{n} ({by_number[n]['id']})")
            break
        done += 1
    if kept:
        st.toast("kept their verdicts (a verdict can be changed, not withdrawn): " + ", ".join(f"#{n}" for n in kept))
    if done:
        st.toast(f"{done} verdict{'s' if done > 1 else ''} saved")
    if done and done == len(changes):
        st.rerun()  # the verdicts and counts under the pictures, fresh from the API


def _only_image(image_id: int) -> None:
    st.session_state["pairs_image"] = image_id
