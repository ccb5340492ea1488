"""Thumbnails: small JPEGs of whole images, rendered once per image content and size.

A page of pairs shows dozens of photos; decoding each full-resolution file for every cache miss
made the page as slow as its largest photos. Thumbnails are therefore files on the artifacts
volume, rendered by the mining job's proposal shards (the CPU workers decode every image there
anyway, in parallel) and, for any other size or a file that has gone missing, by the API on the
first request. The file name holds the image's sha1 (its content, recorded at registration),
the size and the rendering version, so:

- identical photos in two datasets share their files, and a re-registered folder reuses them;
- a file never changes once written, which is what lets the API send it as immutable;
- a new rendering (another quality, another filter) is a new version, never a stale file.

Rendering checks that the file on disk still has the recorded checksum: bytes stored under a
checksum are always of that content, even when a photo was edited in place after registration.
The API and the miner share this module (``services.common``), and neither imports the other.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from orl.fileio import atomic_write_bytes
from orl.images import load_rgb
from services.common.datasets import sha1_file

RENDER_VERSION = 1
# What the dashboard asks for: 256 px on the Pairs page and in galleries, 512 px for the photo of
# the Image page and under attention maps. Other sizes are rendered on their first request.
PRERENDER_SIZES_PX = (256, 512)
JPEG_QUALITY = 85


class ContentChanged(RuntimeError):
    """The image file no longer has the checksum recorded at registration; the message says so."""


def thumbnail_file(artifacts_dir: Path, checksum: str, size_px: int) -> Path:
    """Where the thumbnail of an image content (sha1 hex) with longer side ``size_px`` lives."""
    return artifacts_dir / "thumbnails" / checksum[:2] / f"{checksum}-{size_px}px-v{RENDER_VERSION}.jpg"


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()


def render(source: Path, checksum: str, sizes_px: Iterable[int]) -> dict[int, bytes]:
    """{size: JPEG bytes} of ``source``, longer side at most each size (never upscaled).

    Each size is its own decode, at the smallest scale the JPEG decoder offers that keeps the
    image at least that large, then one Lanczos reduction (EXIF orientation applied, as
    everywhere boxes are measured). Deriving the small size from the large one would save a
    decode but make a file's bytes depend on which sizes were rendered together; this way a
    (content, size, version) has exactly one rendering, whoever makes it, so its ETag is strong.
    Raises ``ContentChanged`` when the file's sha1 is not ``checksum``, and
    ``orl.images.ImageError`` for a file that cannot be decoded.
    """
    found = sha1_file(source)
    if found != checksum:
        raise ContentChanged(f"{source} changed since it was registered (sha1 {found[:12]}..., recorded "
                             f"{checksum[:12]}...); register the new version under another name or in a new dataset")
    out = {}
    for size in sorted(set(sizes_px)):
        im = load_rgb(source, draft_px=size)
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        out[size] = _jpeg(im)
    return out


def ensure(artifacts_dir: Path, source: Path, checksum: str, sizes_px: Iterable[int]) -> dict[int, Path]:
    """The thumbnail files of an image for each size, rendering (in one decode) those missing.

    Safe to run concurrently for the same image: each writer renames its own temporary file
    into place, and both write the same bytes.
    """
    files = {s: thumbnail_file(artifacts_dir, checksum, s) for s in set(sizes_px)}
    missing = [s for s, f in files.items() if not f.is_file()]
    if missing:
        for size, data in render(source, checksum, missing).items():
            files[size].parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(files[size], data, unique=True)
    return files
