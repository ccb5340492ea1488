"""Server-side rendering of crops and attention overlays (thumbnails: services.common.thumbnails).

The browser never gets full-resolution scene photos for a page of pairs: it gets small JPEGs,
cached by the client (the responses carry ETag and Cache-Control). Attention maps need a model;
models are loaded lazily on first request and kept (a few, least recently used) per process.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from orl.images import load_rgb

MAX_RENDER_SIDE_PX = 1024


def _jpeg(im: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def parse_box(text: str) -> tuple[float, float, float, float]:
    """'x1,y1,x2,y2' -> floats, or ValueError saying what is wrong."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"box must be four comma-separated numbers x1,y1,x2,y2 (pixels), got {text!r}")
    try:
        x1, y1, x2, y2 = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"box must be four numbers x1,y1,x2,y2, got {text!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError("box coordinates must be finite numbers")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box needs x2 > x1 and y2 > y1 (xyxy pixels), got {text!r}")
    return x1, y1, x2, y2


def crop_jpeg(path: Path, box: tuple[float, float, float, float], max_side_px: int,
              image_size_px: tuple[int | None, int | None] = (None, None)) -> bytes:
    """The box region (clipped to the image), scaled so its longer side is ``max_side_px``.

    ``image_size_px`` is the recorded (width, height) the box is measured in. With it, a JPEG is
    decoded only as large as the crop needs (``load_rgb(draft_px=...)``): a 200 px box of a
    4000 px photo shown at 160 px needs a quarter of the pixels, not all of them.
    """
    width, height = image_size_px
    x1, y1, x2, y2 = box
    draft = None
    if width and height:
        scale = max_side_px / max(min(x2, width) - max(x1, 0.0), min(y2, height) - max(y1, 0.0), 1.0)
        draft = math.ceil(max(width, height) * scale) if scale < 1 else None
    im = load_rgb(path, draft_px=draft)
    fx, fy = (im.width / width, im.height / height) if width and height else (1.0, 1.0)
    x1, y1, x2, y2 = x1 * fx, y1 * fy, x2 * fx, y2 * fy
    x1, y1 = max(0.0, x1), max(0.0, y1)
    x2, y2 = min(float(im.width), x2), min(float(im.height), y2)
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ValueError(f"box {box} lies outside the image ({width or im.width}x{height or im.height} pixels)")
    crop = im.crop((int(math.floor(x1)), int(math.floor(y1)), int(math.ceil(x2)), int(math.ceil(y2))))
    s = max_side_px / max(crop.size)
    size = (max(1, round(crop.width * s)), max(1, round(crop.height * s)))
    return _jpeg(crop.resize(size, Image.Resampling.BICUBIC))


class ModelCache:
    """Checkpoint path -> loaded model in eval mode, the ``capacity`` most recently used.

    Loading takes seconds and a model uses tens of MB, so each API process loads a checkpoint
    once. The lock keeps two simultaneous first requests from loading the same file twice.
    """

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._models: OrderedDict[tuple[str, float], object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path):
        key = (str(path), path.stat().st_mtime)  # a rewritten file is a different model
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            from orl.checkpoint import load_model  # torch is imported on first use only

            model, _cfg, _ckpt = load_model(path, map_location="cpu")
            # eval mode for good: orl.attention's per-call mode switch is then a no-op, which
            # makes sharing the model between request threads safe.
            model.eval()
            self._models[key] = model
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
            return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


MODELS = ModelCache()


def attention_png(model, image_path: Path, method: str, opacity: float, max_side_px: int,
                  colormap: str = "jet") -> tuple[bytes, float, float]:
    """PNG of the image with its attention heat map blended over it; also (vmin, vmax) raw range.

    The image is first reduced to ``max_side_px``: the map is computed on a 448-px input anyway,
    and the overlay only needs screen resolution.
    """
    import torch

    from orl.attention import compute_attention, overlay

    im = load_rgb(image_path, draft_px=max_side_px)  # decoded like the thumbnail of that size: same pixels
    im.thumbnail((max_side_px, max_side_px), Image.Resampling.LANCZOS)
    # Grad-CAM needs autograd; the other methods are one plain forward pass.
    with torch.no_grad() if method != "gradcam" else contextlib.nullcontext():
        att = compute_attention(model, im, method=method)
    return _png(overlay(im, att.heat, opacity=opacity, colormap=colormap)), att.vmin, att.vmax
