"""Finding and decoding images. Every reader in the library goes through ``load_rgb``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(RuntimeError):
    """An image could not be decoded; the message says why."""


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative paths (posix) of every image under ``root``, recursively, sorted.

    Raises FileNotFoundError / NotADirectoryError for a bad folder; an empty list is
    returned for a folder with no image files (callers decide whether that is an error).
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(out)


def load_rgb(path: str | os.PathLike, draft_px: int | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB, applying its EXIF orientation.

    Grayscale, palette, 16-bit and RGBA inputs are converted. Raises ImageError with the
    reason for anything that cannot be decoded (truncated, not an image, zero size).

    ``draft_px`` is for previews: a JPEG may then be decoded at 1/2, 1/4 or 1/8 of its size
    (libjpeg scales while decoding, several times faster than decoding fully and resizing), as
    long as both sides stay at least ``draft_px``. Other formats are decoded fully. The result
    is smaller than the image's recorded size then; boxes must be scaled by the ratio.
    """
    try:
        with Image.open(path) as opened:
            if draft_px is not None and opened.format == "JPEG":
                opened.draft("RGB", (draft_px, draft_px))
            opened.load()
            im = ImageOps.exif_transpose(opened)
            if im.mode == "I;16" or im.mode == "I":
                arr = np.asarray(im, dtype=np.float64)
                arr = (255 * (arr - arr.min()) / max(1.0, arr.max() - arr.min())).astype(np.uint8)
                im = Image.fromarray(arr)
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"file not found: {path}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError("image has zero size")
    return rgb


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header only, after EXIF orientation. Raises ImageError."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orient = im.getexif().get(0x0112, 1)
    except Exception as exc:
        raise ImageError(f"cannot read image header: {type(exc).__name__}: {exc}") from exc
    return (h, w) if orient in (5, 6, 7, 8) else (w, h)


def scan_images(root: str | os.PathLike, files: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split files into (readable, {file: reason}) by reading each header (cheap, no decode)."""
    good, bad = [], {}
    for f in files:
        try:
            w, h = image_size(Path(root) / f)
            if w < 1 or h < 1:
                raise ImageError("image has zero size")
            good.append(f)
        except ImageError as exc:
            bad[f] = str(exc)
    return good, bad
