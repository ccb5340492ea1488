"""ORL dashboard: ``streamlit run dashboard/app.py``.

Pages (``?page=`` in the URL): Jobs, Pairs, Image, Embedding map, Attention, Dataset. The page and its filters live
in the query string, so any view can be shared as a link. Everything comes from the REST API
at ORL_API_URL (default http://127.0.0.1:8000), read with ORL_API_READ_TOKEN when the API needs
one; write actions (submit, cancel, register, review) send the token the user typed into the
sidebar. The dashboard is never given the write token (docs/SERVICES.md, "Security").
"""

from __future__ import annotations

import sys
from pathlib import Path

# Streamlit puts this file's folder on sys.path, not the repository root; the views import
# their siblings as the `dashboard` package.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402

from dashboard import urlstate  # noqa: E402
from dashboard.views import attention, common, dataset, embedding_map, image, jobs, pairs  # noqa: E402

TITLES = {"jobs": "Jobs", "pairs": "Pairs", "image": "Image", "map": "Embedding map", "attention": "Attention",
          "dataset": "Dataset"}
VIEWS = {"jobs": jobs.render, "pairs": pairs.render, "image": image.render, "map": embedding_map.render,
         "attention": attention.render, "dataset": dataset.render}


def main() -> None:
    st.set_page_config(page_title="ORL", page_icon=":material/join_inner:", layout="wide")
    page = urlstate.page_of(st.query_params.to_dict())
    with st.sidebar:
        st.title("ORL")
        st.caption("Object-level representation learning from scene images")
        choice = st.radio("Page", urlstate.PAGES, index=urlstate.PAGES.index(page), format_func=TITLES.get,
                          key="nav_page")
        if choice != page:
            # A new page keeps only what it shares with the old one (the dataset).
            values = urlstate.parse(page, st.query_params.to_dict())
            common.set_query(choice, {"dataset": values.get("dataset")})
            page = choice
        client = common.sidebar_connection()
    if client is None:
        return
    VIEWS[page](client)


main()
