"""PNG renderings of mined correspondences, so people can judge what stage 2 discovered.

Stage 2 produces thousands of RoI pairs (a box in a query image and a box in one of its
nearest-neighbour images). Numbers alone do not tell whether the pairs are the same kind of
object; a picture of the two boxes side by side does. Everything here draws with PIL only
(``ImageDraw`` and the default font), so it runs headless in a worker or web service.

Conventions: boxes are float xyxy in original-image pixels (as everywhere in the library);
ranks shown in pictures are 1-based (rank 1 = the best pair of that image/neighbour), while
``Correspondence`` stores them 0-based as row indices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from orl.correspondence import Correspondence
from orl.images import load_rgb

# Saturated colours that are rare in photographs, so a box stays visible on any content.
# One colour per pair; both boxes of a pair share it.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 220, 0),
    (0, 120, 255),
    (255, 0, 255),
    (255, 200, 0),
    (0, 230, 230),
    (255, 110, 0),
    (150, 60, 255),
    (255, 0, 120),
    (140, 255, 0),
    (0, 255, 150),
    (255, 255, 255),
)

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
RIM_COLOUR = (0, 0, 0)
GAP = 8  # pixels between the two images of a pair and between rows

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Colour = tuple[int, int, int]


# -- text helpers (shared with orl.attention) ------------------------------------------------
def get_font(size: int = 16) -> Font:
    """PIL's default font at ``size`` px when FreeType is available, else the bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def text_size(font: Font, text: str) -> tuple[int, int]:
    """(width, height) in pixels of ``text`` drawn with ``font``."""
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), _safe(font, text), font=font)
    return int(box[2]), int(box[3])


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font: Font,
              fill: Colour = TEXT_COLOUR) -> None:
    """Draw text; characters the font cannot encode become '?' instead of raising."""
    draw.text(xy, _safe(font, text), font=font, fill=fill)


def _safe(font: Font, text: str) -> str:
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    # The bitmap fallback font only encodes latin-1.
    return text.encode("latin-1", "replace").decode("latin-1")


def _fit_text(font: Font, text: str, max_width: int) -> str:
    """Shorten ``text`` with a middle ellipsis until it fits ``max_width`` pixels."""
    if text_size(font, text)[0] <= max_width or len(text) < 5:
        return text
    lo, hi = 1, len(text) - 1
    best = text[:1] + "..."
    while lo <= hi:  # binary search on the number of kept characters
        keep = (lo + hi) // 2
        cand = text[: (keep + 1) // 2] + "..." + text[len(text) - keep // 2 :]
        if text_size(font, cand)[0] <= max_width:
            best, lo = cand, keep + 1
        else:
            hi = keep - 1
    return best


# -- one pair --------------------------------------------------------------------------------
def _box_array(box: Sequence[float] | np.ndarray) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise ValueError(f"a box must be 4 finite numbers (xyxy), got {box!r}")
    return b


def _draw_box(draw: ImageDraw.ImageDraw, box: np.ndarray, scale: float, offset_x: int,
              size: tuple[int, int], colour: Colour, width: int) -> None:
    """Draw an xyxy box given in original pixels onto a panel scaled by ``scale``."""
    w, h = size
    x0, y0, x1, y1 = (box * scale).tolist()
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    # Clip to the panel, so a box touching the border still shows its full line width.
    x0 = min(max(x0, 0.0), w - 1.0)
    x1 = min(max(x1, 0.0), w - 1.0)
    y0 = min(max(y0, 0.0), h - 1.0)
    y1 = min(max(y1, 0.0), h - 1.0)
    x0, x1 = int(round(x0)) + offset_x, int(round(x1)) + offset_x
    y0, y1 = int(round(y0)), int(round(y1))
    # A 1-px dark rim on both sides of the coloured line keeps the box visible on content of
    # the same colour (a red box on a red car).
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=RIM_COLOUR, width=1)
    draw.rectangle([x0, y0, x1, y1], outline=tuple(colour), width=width)
    if x1 - x0 > 2 * width and y1 - y0 > 2 * width:
        draw.rectangle([x0 + width, y0 + width, x1 - width, y1 - width], outline=RIM_COLOUR, width=1)


def render_pair(
    img_q: Image.Image,
    img_n: Image.Image,
    box_q: Sequence[float] | np.ndarray,
    box_n: Sequence[float] | np.ndarray,
    score: float,
    rank: int | None = None,
    *,
    height: int = 320,
    colour: tuple[int, int, int] = PALETTE[0],
    caption: str | None = None,
) -> Image.Image:
    """Query and neighbour images side by side with the paired boxes, plus a caption.

    Both full images are scaled to a common ``height`` (aspect kept), placed left (query)
    and right (neighbour) with a ``GAP``-px white gutter, and the two boxes are drawn in the
    same ``colour`` so the eye links them. The line width grows with ``height`` (3 px at 320)
    so boxes stay visible when the picture is shown small. Below the images is a caption strip:
    ``"score 0.873 | rank 2"`` (rank omitted when None), followed by ``caption`` if given.

    img_q, img_n: PIL images (any mode; converted to RGB).
    box_q, box_n: xyxy in the ORIGINAL pixels of img_q / img_n.
    Returns an RGB image of size (Wq' + GAP + Wn', height + caption strip height), where
    Wq' = round(Wq * height / Hq) and likewise for the neighbour.
    """
    if height < 8:
        raise ValueError(f"height must be >= 8 px, got {height}")
    bq, bn = _box_array(box_q), _box_array(box_n)
    panels, scales = [], []
    for im in (img_q, img_n):
        im = im.convert("RGB")
        s = height / im.height
        panels.append(im.resize((max(1, round(im.width * s)), height), Image.Resampling.BILINEAR))
        scales.append(s)
    wq, wn = panels[0].width, panels[1].width
    font = get_font(max(12, height // 20))
    text = f"score {float(score):.3f}" + (f" | rank {rank}" if rank is not None else "")
    if caption:
        text += " | " + caption
    total_w = wq + GAP + wn
    text = _fit_text(font, text, total_w - 2 * GAP)
    strip_h = text_size(font, "Ag")[1] + 2 * GAP

    out = Image.new("RGB", (total_w, height + strip_h), BACKGROUND)
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (wq + GAP, 0))
    draw = ImageDraw.Draw(out)
    width = max(3, height // 100)
    _draw_box(draw, bq, scales[0], 0, panels[0].size, colour, width)
    _draw_box(draw, bn, scales[1], wq + GAP, panels[1].size, colour, width)
    # Colour swatch in the caption ties the text to the boxes when several pairs are stacked.
    sw = strip_h - 2 * GAP
    draw.rectangle([GAP, height + GAP, GAP + sw, height + GAP + sw], fill=tuple(colour), outline=TEXT_COLOUR)
    draw_text(draw, (2 * GAP + sw, height + GAP), text, font)
    return out


# -- several pairs -----------------------------------------------------------------------------
def _stack(rows: list[Image.Image], header: str | None) -> Image.Image:
    """Stack images vertically on white, left aligned, with an optional header line."""
    font = get_font(18)
    head_h = text_size(font, "Ag")[1] + 2 * GAP if header else 0
    width = max([r.width for r in rows] + [text_size(font, header or "")[0] + 2 * GAP, 64])
    height = head_h + sum(r.height for r in rows) + GAP * max(0, len(rows) - 1)
    out = Image.new("RGB", (width, max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(out)
    if header:
        draw_text(draw, (GAP, GAP), _fit_text(font, header, width - 2 * GAP), font)
    y = head_h
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + GAP
    return out


class _ImageCache:
    """Loads images under a root once per rendering call and checks their size.

    Boxes are in the pixels of the image as it was when mined; if the file on disk has a
    different size (replaced or re-encoded), the boxes would be drawn in the wrong place,
    so that is an error rather than a misleading picture.
    """

    def __init__(self, corr: Correspondence, root: str | os.PathLike):
        self.corr = corr
        self.root = Path(root)
        self.cache: dict[int, Image.Image] = {}

    def __call__(self, idx: int) -> Image.Image:
        if idx not in self.cache:
            im = load_rgb(self.root / self.corr.files[idx])
            sizes = np.asarray(self.corr.sizes)
            if sizes.ndim == 2 and len(sizes) > idx:
                w, h = (int(v) for v in sizes[idx])
                if w > 0 and h > 0 and (w, h) != im.size:
                    raise ValueError(
                        f"{self.corr.files[idx]} is {im.size[0]}x{im.size[1]} px on disk but was "
                        f"{w}x{h} px when mined; its boxes no longer match the file"
                    )
            self.cache[idx] = im
        return self.cache[idx]


def _flat_pairs(corr: Correspondence, images: Sequence[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All pairs as flat arrays: (scores (M,), image (M,), slot k (M,), rank (M,)).

    Vectorised over the per-neighbour arrays, so ranking a full COCO correspondence
    (millions of pairs) does not go through a Python loop per pair.
    """
    scores, img, slot, rank = [], [], [], []
    rows = range(len(corr)) if images is None else images
    for i in rows:
        for k, arr in enumerate(corr.pairs[i]):
            if k >= corr.knn.shape[1] or corr.knn[i, k] < 0:
                continue
            n = len(arr)
            if n == 0:
                continue
            s = np.asarray(corr.pair_scores[i][k], dtype=np.float64).reshape(-1)[:n]
            if len(s) < n:  # scores missing: keep the pairs, rank them last
                s = np.concatenate([s, np.full(n - len(s), np.nan)])
            scores.append(s)
            img.append(np.full(n, i, dtype=np.int64))
            slot.append(np.full(n, k, dtype=np.int64))
            rank.append(np.arange(n, dtype=np.int64))
    if not scores:
        e = np.zeros(0, dtype=np.int64)
        return np.zeros(0), e, e, e
    return np.concatenate(scores), np.concatenate(img), np.concatenate(slot), np.concatenate(rank)


def _order_best_first(scores: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the ``limit`` highest scores, best first; NaN scores come last, ties stable."""
    key = np.where(np.isnan(scores), -np.inf, scores)
    order = np.argsort(-key, kind="stable")
    return order[:limit]


def render_image_pairs(
    corr: Correspondence,
    images_root: str | os.PathLike,
    image_idx: int,
    out_png: str | os.PathLike,
    max_pairs: int = 8,
    *,
    height: int = 280,
) -> Path:
    """Write one PNG with the best ``max_pairs`` pairs of query image ``image_idx``.

    Pairs are pooled across all of the image's neighbours and ordered by RoI similarity,
    one row per pair (query left, neighbour right), each row in its own palette colour.
    The caption of a row gives the neighbour's file name, its position in the KNN list,
    the pair score and the pair's 1-based rank within that neighbour. An image without
    mined pairs still gets a PNG, with a header saying so, so a UI never shows a broken link.

    Returns the path written. Raises IndexError for a bad ``image_idx``, ImageError for an
    unreadable image and ValueError when an image's size no longer matches the mining.
    """
    n_img = len(corr)
    if not (0 <= int(image_idx) < n_img):
        raise IndexError(f"image_idx {image_idx} out of range for {n_img} images")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    i = int(image_idx)
    load = _ImageCache(corr, images_root)
    scores, _, slot, rank = _flat_pairs(corr, [i])
    chosen = _order_best_first(scores, max_pairs)
    rows = []
    for c, idx in enumerate(chosen):
        k, r = int(slot[idx]), int(rank[idx])
        j = int(corr.knn[i, k])
        pair = corr.pairs[i][k][r]
        rows.append(render_pair(
            load(i), load(j), pair[:4], pair[4:], scores[idx], rank=r + 1,
            height=height, colour=PALETTE[c % len(PALETTE)],
            caption=f"neighbour {k + 1}: {corr.files[j]}",
        ))
    total = len(scores)
    if rows:
        header = f"query {i}: {corr.files[i]}  ({len(rows)} of {total} pairs, best first)"
    else:
        header = f"query {i}: {corr.files[i]}  (no mined pairs)"
        thumb = load(i).copy()
        thumb.thumbnail((height * 4, height))
        rows = [thumb]
    out = _stack(rows, header)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out.save(out_png, format="PNG")
    return out_png


def render_top_pairs(
    corr: Correspondence,
    images_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    n: int = 16,
    *,
    height: int = 320,
) -> list[Path]:
    """Write the ``n`` best-scoring pairs of the whole correspondence, one PNG each.

    Files are named ``top_001.png``, ``top_002.png``, ... in score order (best first) and
    the list of paths is returned in that order; fewer than ``n`` when fewer pairs exist.
    Each caption names both files, the score and the pair's 1-based rank for its image and
    neighbour. Only the images of the chosen pairs are decoded.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, img, slot, rank = _flat_pairs(corr)
    chosen = _order_best_first(scores, n)
    load = _ImageCache(corr, images_root)
    digits = max(3, int(math.log10(max(1, len(chosen)))) + 1)
    paths = []
    for c, idx in enumerate(chosen):
        i, k, r = int(img[idx]), int(slot[idx]), int(rank[idx])
        j = int(corr.knn[i, k])
        pair = corr.pairs[i][k][r]
        pic = render_pair(
            load(i), load(j), pair[:4], pair[4:], scores[idx], rank=r + 1, height=height,
            caption=f"{corr.files[i]} <-> {corr.files[j]}",
        )
        path = out_dir / f"top_{c + 1:0{digits}d}.png"
        pic.save(path, format="PNG")
        paths.append(path)
    return paths
