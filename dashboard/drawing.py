"""Pixels the dashboard draws itself: pair boxes on thumbnails, heat-map blending, score bins.

The API sends small server-rendered thumbnails and crops; boxes arrive in original-image
pixels (float xyxy) and are scaled onto the thumbnail here, so the browser never receives a
full-resolution photo per pair.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Saturated hues that rarely occur in photos; both boxes of one pair share a colour.
PAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128),
)


def pair_colour(index: int) -> tuple[int, int, int]:
    return PAIR_COLOURS[index % len(PAIR_COLOURS)]


def open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of a drawn image; ``st.image`` sends JPEG bytes as they are (quality 90 is
    what it would encode a PIL image with)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def scale_box(box: Sequence[float], original_size: tuple[int, int], shown_size: tuple[int, int]) -> list[float]:
    """A float xyxy box in original pixels -> the same box on a resized copy of that image.

    original_size / shown_size are (width, height). The thumbnail keeps the aspect ratio, so
    one factor per axis is exact even when the server rounded a side.
    """
    sx = shown_size[0] / original_size[0]
    sy = shown_size[1] / original_size[1]
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def draw_box(image: Image.Image, box: Sequence[float], colour: tuple[int, int, int]) -> Image.Image:
    """A copy of ``image`` with ``box`` (xyxy, in this image's pixels) outlined in ``colour``."""
    return draw_boxes(image, [(box, colour)])


def draw_boxes(image: Image.Image, boxes: Sequence[tuple[Sequence[float], tuple[int, int, int]]]) -> Image.Image:
    """A copy of ``image`` with each (box, colour) outlined, in order (later ones on top).

    A dark rim under the coloured line keeps it visible on bright and busy backgrounds.
    """
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 80))
    for box, colour in boxes:
        x1, y1, x2, y2 = box
        # Keep the outline inside the picture even for a box that touches the border.
        x1, y1 = max(0.0, x1), max(0.0, y1)
        x2, y2 = min(out.width - 1.0, x2), min(out.height - 1.0, y2)
        draw.rectangle([x1, y1, x2, y2], outline=(0, 0, 0), width=width + 2)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
    return out


def framed(image: Image.Image, colour: tuple[int, int, int], width_px: int = 4) -> Image.Image:
    """A crop with a border in its pair's colour, so crops and boxes read as one pair."""
    out = Image.new("RGB", (image.width + 2 * width_px, image.height + 2 * width_px), colour)
    out.paste(image, (width_px, width_px))
    return out


def side_by_side(images: Sequence[Image.Image], gap_px: int = 12,
                 background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The images in one row, left to right, each centred vertically, ``gap_px`` apart.

    The Pairs page shows a pair's four pictures as one image: the browser's cost of a page grows
    with its elements far more than with its pixels (benchmarks/page_benchmark.py)."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    width = sum(im.width for im in images) + gap_px * (len(images) - 1)
    height = max(im.height for im in images)
    out = Image.new("RGB", (width, height), background)
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, (height - im.height) // 2))
        x += im.width + gap_px
    return out


def blend(base: Image.Image, heat: Image.Image, opacity: float) -> Image.Image:
    """(1 - opacity) * base + opacity * heat; ``heat`` is resized to ``base`` if needed."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    heat = heat.convert("RGB")
    if heat.size != base.size:
        heat = heat.resize(base.size, Image.BILINEAR)
    return Image.blend(base.convert("RGB"), heat, opacity)


def histogram(scores: Sequence[float], bins: int = 20, lo: float | None = None,
              hi: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, counts) of pair scores; an empty input gives empty arrays."""
    x = np.asarray(list(scores), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:  # all scores equal: one bin around the value
        lo, hi = lo - 0.005, hi + 0.005
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    return (edges[:-1] + edges[1:]) / 2, counts
