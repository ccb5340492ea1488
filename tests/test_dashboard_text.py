"""User text shown by the dashboard in Markdown (captions, headers) must show literally: a file
named ``a_b_*c*[x](http://e).jpg`` is not emphasis and not a link (dashboard.views.common.md_text)."""

from __future__ import annotations

import html

import pytest

from dashboard.views.common import md_text

NAMES = ["plain.jpg", "snake_case_photo_01.jpg", "*starred* and _under_.png", "[link](http://example.com).jpg",
         "cost $5 and $6.jpg", "`code` # not a title.jpg", "a:smile:b.jpg", "back\\slash\\n.jpg",
         "<b>tag</b>.jpg", "~strike~ | pipe.jpg", "1. not a list.jpg", "- dash.jpg", "!img[x](y).jpg"]


@pytest.mark.parametrize("name", NAMES)
def test_a_name_renders_as_its_own_text(name):
    markdown_it = pytest.importorskip("markdown_it")  # CommonMark, as Streamlit's renderer is
    rendered = markdown_it.MarkdownIt("commonmark").render(md_text(name)).strip()
    assert rendered == f"<p>{html.escape(name, quote=False)}</p>"


def test_streamlit_directives_are_escaped():
    # Streamlit's own extras (emoji shortcodes, :red[...] colours) start with ':' which CommonMark
    # does not know: escaped, they are not directives any more.
    assert md_text("x:smile:y :red[z]") == "x\\:smile\\:y \\:red\\[z\\]"
