"""Image: one photo, its K nearest images, and the pairs mined between it and a neighbour.

The photo is picked from a paginated gallery, which a file-name search narrows (or from a link,
``?image=``). Its neighbours are the stored KNN of a mining job (``GET /images/{id}/neighbors``:
the newest job that covered the image, or the one of a chosen checkpoint), each with its
similarity and how many pairs link the two photos in each direction. The pairs with the chosen
neighbour are drawn on both photos, once per direction (this photo as the query, then as the
neighbour), one colour per pair on both sides.
"""

from __future__ import annotations

import functools
from typing import Any

import streamlit as st

from dashboard import drawing
from dashboard.api_client import ApiError
from dashboard.views import common

PAGE = "image"
PHOTO_PX = 512
NEIGHBOUR_PX = 192
GALLERY_PX = 160
GALLERY_COLUMNS = 6
GALLERY_PAGE = 12
NEIGHBOUR_COLUMNS = 5
MAX_DRAWN = 10  # pairs drawn per direction: more boxes than this on one photo cannot be told apart


def render(api: common.Api) -> None:
    values = common.query_values(PAGE)
    st.header("Image")
    dataset_id = common.dataset_picker(api, values["dataset"], key="image_dataset")
    if dataset_id is None:
        return
    state = dict(values, dataset=dataset_id)
    if values["dataset"] not in (None, dataset_id):  # another dataset: its images are others
        state.update(image=None, nb=None, cursor=None)
    typed = st.text_input("Find by file name", value=values["q"] or "", key="image_q", max_chars=200,
                          placeholder="part of the file name or folder, e.g. 000000000139 or val2017/")
    state["q"] = typed.strip() or None
    if state["q"] != values["q"]:
        state["cursor"] = None  # a new search starts at its first page
    common.set_query(PAGE, state)
    _gallery(api, state)
    if state["image"] is None:
        st.info("Open an image from the gallery (or search for its file name).")
        return
    _image(api, state)


# -- gallery ----------------------------------------------------------------------------------------
def _gallery(api: common.Api, state: dict[str, Any]) -> None:
    title = f"Gallery · file names containing “{state['q']}”" if state["q"] else "Gallery"
    with st.expander(title, expanded=state["image"] is None or state["q"] is not None):
        try:
            page = common.fetch_page(PAGE, state, functools.partial(_gallery_page, api))
        except ApiError as exc:
            common.show_error(exc, "cannot list images")
            return
        items = page["items"]
        before = common.cursor_history("image_gallery", (state["dataset"], state["q"]))
        first = len(before) * GALLERY_PAGE
        st.caption(f"images {first + 1}–{first + len(items)} of {page['total']}" if items
                   else "no readable image has a file name containing that")
        cols = st.columns(GALLERY_COLUMNS)
        for i, im in enumerate(items):
            col = cols[i % GALLERY_COLUMNS]
            if not _thumbnail(api, col, im["id"], GALLERY_PX, f"{im['id']} · {common.md_text(im['rel_path'])}"):
                continue
            col.button("Open", key=f"open_{im['id']}", on_click=_open, args=(state, im["id"]),
                       type="primary" if im["id"] == state["image"] else "secondary")
        common.pager(PAGE, state, page.get("next_cursor"), before, key="gallery")


def _gallery_page(api: common.Api, state: dict[str, Any]) -> dict:
    return api.images(state["dataset"], status="ok", name=state["q"], limit=GALLERY_PAGE, cursor=state["cursor"])


def _thumbnail(api: common.Api, col, image_id: int, size: int, caption: str) -> bool:
    """The image's thumbnail in ``col`` with ``caption``; a warning instead when it cannot be had."""
    try:
        thumb = api.thumbnail(image_id, size)
    except ApiError as exc:
        col.warning(f"image {image_id}: {exc}")
        return False
    col.image(thumb.content, caption=caption, width="stretch")
    return True


def _open(state: dict[str, Any], image_id: int) -> None:
    common.set_query(PAGE, {**state, "image": image_id, "nb": None})


# -- one image --------------------------------------------------------------------------------------
def _image(api: common.Api, state: dict[str, Any]) -> None:
    image_id = state["image"]
    try:
        meta = api.image(image_id)
        checkpoints = api.checkpoints(dataset_id=state["dataset"])
    except ApiError as exc:
        common.show_error(exc, f"cannot load image {image_id}")
        return
    if meta["dataset_id"] != state["dataset"]:
        st.warning(f"image {image_id} belongs to dataset #{meta['dataset_id']}; pick that dataset to see it")
        return
    st.subheader(f"Image {image_id} · {common.md_text(meta['rel_path'])}")
    labels = {c["id"]: common.checkpoint_label(c) for c in checkpoints}
    options: list[int | None] = [None, *labels]
    current = state["checkpoint"] if state["checkpoint"] in labels else None
    checkpoint = st.selectbox("Neighbours under", options, index=options.index(current), key="image_checkpoint",
                              format_func=lambda c: "the newest mining job that covered this image" if c is None
                              else labels[c])
    state = {**state, "checkpoint": checkpoint}
    common.set_query(PAGE, state)

    photo_col, grid_col = st.columns([2, 3], gap="large")
    with photo_col:
        try:
            photo = api.thumbnail(image_id, PHOTO_PX)
        except ApiError as exc:
            common.show_error(exc, f"cannot load image {image_id}")
        else:
            st.image(photo.content, caption=f"{common.md_text(meta['rel_path'])} · {meta['width']}×{meta['height']} px",
                     width="stretch")
    try:
        knn = api.neighbors(image_id, checkpoint_id=checkpoint, limit=50)
    except ApiError as exc:
        with grid_col:
            (st.info if exc.status == 404 else st.error)(f"No neighbours: {exc}")
        return
    items = knn["items"]
    nb_ids = [n["image_id"] for n in items]
    chosen = state["nb"] if state["nb"] in nb_ids else (nb_ids[0] if nb_ids else None)
    with grid_col:
        st.markdown(f"**{knn['total']} nearest images** · mining job #{knn['job_id']}"
                    + (f" · checkpoint #{knn['checkpoint_id']}" if knn.get("checkpoint_id") else ""))
        _neighbour_grid(api, state, items, chosen)
    if chosen is not None:
        nb = items[nb_ids.index(chosen)]
        _pairs_between(api, knn["job_id"], meta, nb)


def _neighbour_grid(api: common.Api, state: dict[str, Any], items: list[dict], chosen: int | None) -> None:
    cols = st.columns(NEIGHBOUR_COLUMNS)
    for i, n in enumerate(items):
        col = cols[i % NEIGHBOUR_COLUMNS]
        caption = (f"#{n['rank'] + 1} · similarity {n['similarity']:.3f} · "
                   f"pairs → {n['pairs_as_query']} ← {n['pairs_as_neighbor']}")
        if not _thumbnail(api, col, n["image_id"], NEIGHBOUR_PX, caption):
            continue
        col.button("Pairs", key=f"nb_{n['image_id']}", on_click=common.set_query,
                   args=(PAGE, {**state, "nb": n["image_id"]}),
                   type="primary" if n["image_id"] == chosen else "secondary")


def _pairs_between(api: common.Api, job_id: int, meta: dict, nb: dict) -> None:
    a, b = meta["id"], nb["image_id"]
    head, link = st.columns([5, 1], vertical_alignment="bottom")
    head.subheader(f"Pairs between image {a} and neighbour #{nb['rank'] + 1} (image {b})")
    link.button("Open the neighbour", key="open_neighbour", on_click=common.set_query,
                args=(PAGE, {**common.query_values(PAGE), "image": b, "nb": a}))
    try:
        photo_a = drawing.open_image(api.thumbnail(a, PHOTO_PX).content)
        photo_b = drawing.open_image(api.thumbnail(b, PHOTO_PX).content)
        # this image as the query (a -> b), then as the neighbour (b -> a)
        outgoing = api.pairs(job_id=job_id, image_id=a, other_image_id=b, side="query", limit=MAX_DRAWN)
        incoming = api.pairs(job_id=job_id, image_id=a, other_image_id=b, side="neighbor", limit=MAX_DRAWN)
    except ApiError as exc:
        common.show_error(exc, "cannot load the pairs")
        return
    size_a, size_b = (meta["width"], meta["height"]), (nb["width"], nb["height"])
    for title, page, total, a_is_query in (
            (f"image {a} as the query → neighbour {b}", outgoing, nb["pairs_as_query"], True),
            (f"image {b} as the query → image {a} as its neighbour", incoming, nb["pairs_as_neighbor"], False)):
        pairs = page["items"]
        st.markdown(f"**{title}** · " + (f"best {len(pairs)} of {total} pairs" if pairs else "no pairs"))
        if not pairs:
            continue
        on_a = [(p["query_box"] if a_is_query else p["neighbor_box"], drawing.pair_colour(i))
                for i, p in enumerate(pairs)]
        on_b = [(p["neighbor_box"] if a_is_query else p["query_box"], drawing.pair_colour(i))
                for i, p in enumerate(pairs)]
        left, right = st.columns(2)
        left.image(_boxed(photo_a, size_a, on_a), caption=f"image {a}", width="stretch", output_format="JPEG")
        right.image(_boxed(photo_b, size_b, on_b), caption=f"image {b}", width="stretch", output_format="JPEG")
        st.markdown(" ".join(f"<span style='color:rgb{drawing.pair_colour(i)}'>■</span> {p['score']:.3f}"
                             for i, p in enumerate(pairs)), unsafe_allow_html=True)


def _boxed(photo, original_size: tuple[int | None, int | None], boxes: list) -> Any:
    if not (original_size[0] and original_size[1]):
        return photo  # size not recorded: the photo without boxes
    size = (int(original_size[0]), int(original_size[1]))
    return drawing.draw_boxes(photo, [(drawing.scale_box(box, size, photo.size), c) for box, c in boxes])
