"""Finding, checking and decoding images. Every reader in the library goes through ``load_rgb``.

Policy for unusual files (docs/ARCHITECTURE.md, "Bad input", has the table): what can be
decided from the directory entry and the header (not a regular file, empty, not an image,
a symlink out of the dataset root, too many pixels, too small) is refused by
:func:`inspect_image` without decoding pixels; what only a decode shows (a truncated file)
is refused by :func:`load_rgb`. Every refusal is an :class:`ImageError` whose message is the
per-image reason. Grayscale, palette, alpha, 16-bit and CMYK inputs are converted to 8-bit
RGB, EXIF orientation is applied (boxes always refer to the upright image), and an animated
GIF contributes its first frame.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# 120 MP: above a 108 MP phone photo, and 360 MB as decoded RGB (Pillow warns from 89 MP).
DEFAULT_MAX_IMAGE_PIXELS = 120_000_000
MAX_PIXELS_ENV = "ORL_MAX_IMAGE_PIXELS"
# Below 32 px a side, the ResNet's res5 map is a single cell and every view an upsampled blur.
MIN_IMAGE_SIDE_PX = 32
_ORIENTATION_TAG = 0x0112


class ImageError(RuntimeError):
    """An image is refused; the message is the per-image reason (what is wrong, what to do)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. ``width`` / ``height``: the upright image, after EXIF orientation."""

    width: int
    height: int
    notes: tuple[str, ...] = field(default=())  # conversions that decoding will apply

    @property
    def note(self) -> str:
        return "; ".join(self.notes)


def max_image_pixels() -> int:
    """The pixel limit: ``ORL_MAX_IMAGE_PIXELS`` when set (read on every call, so selective-search
    subprocesses and data-loader workers see the same value), else DEFAULT_MAX_IMAGE_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV} must be a whole number of pixels, got {raw!r}") from None
    if value < MIN_IMAGE_SIDE_PX**2:
        raise ValueError(f"{MAX_PIXELS_ENV} must be at least {MIN_IMAGE_SIDE_PX**2}, got {value}")
    return value


def iter_images(root: str | os.PathLike) -> Iterator[str]:
    """Relative paths (posix) of the images under ``root``, recursively, in walk order (unsorted).

    The one definition of which files count as images (extension, no hidden files or folders;
    links followed). A generator, so a caller walking a folder of a million files can report
    how far it got (the services' registration job does). Raises FileNotFoundError /
    NotADirectoryError for a bad folder before yielding anything.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                yield Path(dirpath, f).relative_to(root).as_posix()


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative paths (posix) of every image under ``root``, recursively, sorted.

    Raises FileNotFoundError / NotADirectoryError for a bad folder; an empty list is
    returned for a folder with no image files (callers decide whether that is an error).
    """
    return sorted(iter_images(root))


def _check_entry(path: Path, root: str | os.PathLike | None) -> None:
    """Refuse what must not be opened at all: links out of the root, missing, non-regular, empty."""
    if root is not None:
        real_root = Path(root).resolve()
        if not path.resolve().is_relative_to(real_root):
            # The target is not named: the record is shown through the API.
            raise ImageError("outside the dataset root: a symlink leads out of the folder, so it is not read; "
                             "copy the file into the folder")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"file not found: {path}") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        # Opening a FIFO blocks until a writer comes; a device may never end.
        raise ImageError("not a regular file (a named pipe, device or folder with an image name); not read")
    if st.st_size == 0:
        raise ImageError("empty file (0 bytes)")


def _open(src: str | Path | IO[bytes]) -> Image.Image:
    """Image.open with the reasons worded; the pixel limit is ours (checked after this)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(src)
    except FileNotFoundError:
        raise ImageError(f"file not found: {src}") from None
    except PermissionError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    except UnidentifiedImageError:
        raise ImageError("cannot read image header: not an image format Pillow recognises "
                         "(a text or other file with an image extension?)") from None
    except Image.DecompressionBombError as exc:  # above Pillow's own hard limit (2 x 89 MP)
        raise ImageError(f"too many pixels: {exc}; refused before decoding") from None
    except Exception as exc:  # a header Pillow cannot parse
        raise ImageError(f"cannot read image header: {type(exc).__name__}: {exc}") from None


def _info(im: Image.Image) -> ImageInfo:
    """Size after orientation, the limits, and the conversions decoding will apply."""
    w, h = im.size
    try:
        orient = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block: the pixels are still usable, as stored
        orient = 1
    limit = max_image_pixels()
    if w * h > limit:
        raise ImageError(f"too many pixels: {w} x {h} = {w * h / 1e6:.1f} MP, above the limit of {limit / 1e6:.1f} MP "
                         f"({MAX_PIXELS_ENV}); refused before decoding")
    if w < MIN_IMAGE_SIDE_PX or h < MIN_IMAGE_SIDE_PX:
        raise ImageError(f"image too small: {w} x {h} px; images need at least {MIN_IMAGE_SIDE_PX} px on each side")
    notes = []
    if orient in (2, 3, 4, 5, 6, 7, 8):
        notes.append(f"EXIF orientation {orient}: rotated upright")
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        notes.append(f"{mode} with transparency: composited over white")
    elif mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        notes.append(f"{mode}: 16-bit, scaled to 8 bits")
    elif mode == "CMYK":
        notes.append("CMYK: converted to RGB")
    elif mode in ("L", "1"):
        notes.append("grayscale: replicated to RGB")
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        notes.append(f"animated, {frames} frames: the first is used")
    upright = (h, w) if orient in (5, 6, 7, 8) else (w, h)
    return ImageInfo(upright[0], upright[1], tuple(notes))


def inspect_image(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ImageInfo:
    """Check a file from its directory entry and header only, never decoding pixels.

    With ``root``, a file that resolves outside it (a symlink) is refused. Raises ImageError.
    """
    p = Path(path)
    _check_entry(p, root)
    with _open(p) as im:
        return _info(im)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the upright image, from the header only. Raises ImageError."""
    info = inspect_image(path)
    return info.width, info.height


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # A fixed scale, as a viewer shows it (not stretched per image: equal values stay equal).
        top = 65535.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 255.0
        arr = np.asarray(im, dtype=np.float64) * (255.0 / top)
        im = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") and (im.mode != "P" or "transparency" in im.info):
        # Colours under transparent pixels are undefined (often black): show them as white.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 expected_sha1: str | None = None, draft_px: int | None = None) -> tuple[Image.Image, ImageInfo]:
    """(8-bit RGB upright image, its ImageInfo). Raises ImageError with the reason.

    ``draft_px`` is for previews: a JPEG may then be decoded at 1/2, 1/4 or 1/8 of its size
    (libjpeg scales while decoding, several times faster than decoding fully and resizing), as
    long as both sides stay at least ``draft_px``. Other formats are decoded fully. The result
    is smaller than the image's recorded size then; boxes must be scaled by the ratio, and
    nothing that trains or mines may use it (stage 3 refuses a size other than the mined one).

    The header is checked (:func:`inspect_image`) before any pixel is decoded. With
    ``expected_sha1`` (the checksum recorded at registration) the bytes are read once, hashed
    and decoded from memory, so a file that changed since is refused, never decoded with stale
    metadata, and cannot change between the check and the decode.
    """
    p = Path(path)
    _check_entry(p, root)
    src: Path | IO[bytes] = p
    if expected_sha1 is not None:
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
        if hashlib.sha1(data).hexdigest() != expected_sha1:
            raise ImageError("file changed since it was registered (checksum differs); it is left out so that "
                             "nothing is mined with stale metadata: register it again under a new name")
        src = io.BytesIO(data)
    with _open(src) as opened:
        info = _info(opened)
        try:
            if draft_px is not None and opened.format == "JPEG":
                opened.draft("RGB", (draft_px, draft_px))
            opened.load()  # the first frame of an animation
            rgb = _to_rgb(ImageOps.exif_transpose(opened))
        except Exception as exc:  # PIL raises OSError (truncated), SyntaxError, ValueError...
            raise ImageError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return rgb, info


def load_rgb(path: str | os.PathLike, draft_px: int | None = None, *, root: str | os.PathLike | None = None,
             expected_sha1: str | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB, upright (see :func:`decode_image`; ``draft_px``: a preview,
    possibly smaller). Raises ImageError."""
    return decode_image(path, root=root, expected_sha1=expected_sha1, draft_px=draft_px)[0]


def scan_images(root: str | os.PathLike, files: list[str]
                ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """Split files into (usable, {file: reason refused}, {file: conversion note}) from headers only.

    Files resolving outside ``root`` (symlinks) are refused: a folder gives the same images
    through the CLI as through the services.
    """
    good, bad, notes = [], {}, {}
    for f in files:
        try:
            info = inspect_image(Path(root) / f, root=root)
        except ImageError as exc:
            bad[f] = str(exc)
            continue
        good.append(f)
        if info.notes:
            notes[f] = info.note
    return good, bad, notes
