"""Page and filter state kept in the URL's query string, so a view can be shared as a link.

Pure functions over plain mappings (``st.query_params.to_dict()`` in the app), so the rules are
tested without Streamlit: every page declares its parameters with a type and a default; values
that do not parse are dropped (a hand-edited link never crashes a page); defaults are left out
of the URL to keep links short.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PAGES = ("jobs", "pairs", "image", "map", "attention", "dataset")
DEFAULT_PAGE = "jobs"
PAGE_SIZES = (10, 20, 50)
ORDERS = ("score_desc", "score_asc", "random")  # the API's ?order=


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise ValueError(v)
    return n


def _score(v: str) -> float:
    x = float(v)
    if not math.isfinite(x) or not -1.0 <= x <= 1.0:  # cosine similarities
        raise ValueError(v)
    return x


def _opacity(v: str) -> float:
    x = float(v)
    if not 0.0 <= x <= 1.0:
        raise ValueError(v)
    return x


def _area(v: str) -> float:
    x = float(v)
    if not math.isfinite(x) or x < 0:  # square pixels
        raise ValueError(v)
    return x


def _order(v: str) -> str:
    if v not in ORDERS:
        raise ValueError(v)
    return v


def _seed(v: str) -> int:
    n = int(v)
    if not 0 <= n <= 2**31 - 1:
        raise ValueError(v)
    return n


def _flag(v: str) -> bool:
    if v not in ("0", "1"):
        raise ValueError(v)
    return v == "1"


def _page_size(v: str) -> int:
    n = int(v)
    if n not in PAGE_SIZES:
        raise ValueError(v)
    return n


def _search(v: str) -> str:
    # A file-name search as typed; bounded like the API's ?name=.
    v = v.strip()
    if not v or len(v) > 200:
        raise ValueError(v)
    return v


def _cursor(v: str) -> str:
    # Opaque to us; bounded so a pasted link cannot make us send a huge query string.
    if not v or len(v) > 512:
        raise ValueError(v)
    return v


@dataclass(frozen=True)
class Param:
    parse: Callable[[str], Any]
    default: Any = None


PARAMS: dict[str, dict[str, Param]] = {
    "jobs": {"dataset": Param(_positive_int)},
    "pairs": {
        "dataset": Param(_positive_int),
        "job": Param(_positive_int),
        "image": Param(_positive_int),
        "min_score": Param(_score),
        "max_score": Param(_score),
        "min_area": Param(_area),  # both boxes, square pixels
        "max_area": Param(_area),
        "order": Param(_order, "score_desc"),
        "seed": Param(_seed, 0),  # with order=random
        "todo": Param(_flag, False),  # only pairs the reviewer has not judged yet
        "per_page": Param(_page_size, 20),
        "cursor": Param(_cursor),
    },
    "image": {
        "dataset": Param(_positive_int),
        "image": Param(_positive_int),
        "checkpoint": Param(_positive_int),  # whose KNN; none: the newest mining job that covered the image
        "nb": Param(_positive_int),  # the neighbour whose pairs are drawn
        "q": Param(_search),  # file-name search of the gallery
        "cursor": Param(_cursor),  # the gallery's page
    },
    "attention": {
        "dataset": Param(_positive_int),
        "image": Param(_positive_int),
        "a": Param(_positive_int),  # checkpoint ids (artifacts.id), left and right
        "b": Param(_positive_int),
        "opacity": Param(_opacity, 0.5),
    },
    "dataset": {"dataset": Param(_positive_int)},
    "map": {
        "dataset": Param(_positive_int),
        "checkpoint": Param(_positive_int),  # whose embeddings; none: the dataset's newest checkpoint
    },
}
# Changing any of these starts the pair list again from its first page.
PAIR_FILTERS = ("dataset", "job", "image", "min_score", "max_score", "min_area", "max_area", "order", "seed", "todo",
                "per_page")


def page_of(query: Mapping[str, str]) -> str:
    page = query.get("page", DEFAULT_PAGE)
    return page if page in PAGES else DEFAULT_PAGE


def parse(page: str, query: Mapping[str, str]) -> dict[str, Any]:
    """Typed values of ``page``'s parameters; missing or malformed ones get the default."""
    values = {}
    for name, param in PARAMS[page].items():
        raw = query.get(name)
        try:
            values[name] = param.default if raw in (None, "") else param.parse(str(raw))
        except (TypeError, ValueError):
            values[name] = param.default
    return values


def encode(page: str, values: Mapping[str, Any]) -> dict[str, str]:
    """The query string for ``page`` with ``values``: only known, non-default parameters."""
    out = {"page": page}
    for name, param in PARAMS[page].items():
        v = values.get(name)
        if v is None or v == param.default:
            continue
        out[name] = f"{v:g}" if isinstance(v, float) else str(int(v)) if isinstance(v, bool) else str(v)
    return out


def with_filters(current: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """Pair-page values after the user changed filters: a new filter means page one again."""
    new = {**current, **changes}
    if any(new.get(k) != current.get(k) for k in PAIR_FILTERS):
        new["cursor"] = None
    return new
