"""The bad-input fixture set: every kind of file a real photo folder may hold, made in the test.

``make_folder(folder, outside)`` writes a handful of real photos from data/sample plus one file
per case in CASES (nothing is committed as a binary). The library/CLI test (tests/test_bad_input.py)
and the REST-flow test (tests/services/test_bad_input_rest.py) build the same folder and check
the same expectations, so the policy table in docs/ARCHITECTURE.md ("Bad input") is tested
through both. ``mutate_after_registration`` makes the two cases that happen between steps: a
file that changes, and one that disappears.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "images"
ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    """One file and what every interface must record for it.

    status: "ok" (used, possibly converted: ``reason`` names the conversion) or "failed".
    reason: a fragment of the per-image reason. when: where it is caught: "scan" (from the
    directory entry and header: registration, the CLI's pre-scan), "decode" (when pixels are
    first decoded: mining or training), "mine" (selective search / the box filter: the
    proposal record), "later" (changed or removed after registration: the REST flow only).
    """

    file: str
    status: str
    reason: str
    when: str
    root_only_skip: bool = False  # root reads a chmod-000 file anyway


CASES = [
    Case("truncated.jpg", "failed", "cannot decode image", "decode"),
    Case("empty.jpg", "failed", "empty file (0 bytes)", "scan"),
    Case("text.jpg", "failed", "not an image format", "scan"),
    Case("alpha.png", "ok", "composited over white", "scan"),
    Case("deep16.png", "ok", "16-bit, scaled to 8 bits", "scan"),
    Case("gray.jpg", "ok", "grayscale: replicated to RGB", "scan"),
    Case("cmyk.jpg", "ok", "CMYK: converted to RGB", "scan"),
    Case("exif_rotated.jpg", "ok", "EXIF orientation 6: rotated upright", "scan"),
    Case("tiny10.png", "failed", "image too small: 10 x 10 px", "scan"),
    Case("small80.jpg", "ok", "kept the first raw region", "mine"),
    Case("bomb.png", "failed", "too many pixels: 12000 x 12000", "scan"),
    Case("wide.png", "ok", "kept the first raw region", "mine"),
    Case("tall.png", "ok", "kept the first raw region", "mine"),
    Case("outside_link.jpg", "failed", "outside the dataset root", "scan"),
    Case("unreadable.jpg", "failed", "cannot read file: Permission denied", "scan", root_only_skip=True),
    Case("fifo.jpg", "failed", "not a regular file", "scan"),
    Case("animated.gif", "ok", "animated, 3 frames: the first is used", "scan"),
    Case("changed.jpg", "failed", "file changed since it was registered", "later"),
    Case("vanished.jpg", "failed", "file not found", "later"),
]
BY_FILE = {c.file: c for c in CASES}


def photos(n: int, offset: int = 0) -> list[Path]:
    return (sorted(SAMPLE.glob("train2017/*.jpg")) + sorted(SAMPLE.glob("val2017/*.jpg")))[offset:offset + n]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (8-bit RGB) with a few bytes of pixel data:
    a decompression bomb as far as any reader that trusts the header is concerned."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def exif_rotated(photo: Image.Image) -> tuple[bytes, Image.Image]:
    """(JPEG bytes stored sideways with EXIF orientation 6, the upright image a viewer shows).

    Orientation 6 means "rotate 90 degrees clockwise to display", so the stored pixels are the
    upright photo turned 90 degrees counter-clockwise. The upright reference is taken from the
    decoded JPEG itself, so it has exactly the pixels a correct reader produces."""
    stored = photo.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    decoded.load()
    upright = decoded.transpose(Image.Transpose.ROTATE_270).convert("RGB")  # clockwise
    return buf.getvalue(), upright


def make_folder(folder: Path, outside: Path, n_good: int = 6) -> dict:
    """Write n_good real photos and every case of CASES into ``folder``; ``outside`` (a folder
    outside it) receives the target of the symlink. Returns facts the tests check against:
    {"good": [files], "upright_size": (w, h) of exif_rotated.jpg, "exif_reference": file}."""
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    good = []
    for p in photos(n_good):
        shutil.copy(p, folder / p.name)
        good.append(p.name)
    src = photos(1, offset=n_good)[0]
    photo = Image.open(src).convert("RGB")
    rng = np.random.default_rng(0)

    (folder / "truncated.jpg").write_bytes(src.read_bytes()[: src.stat().st_size * 6 // 10])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("shopping list: milk, eggs\n")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    rgba.save(folder / "alpha.png")
    deep = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")  # uint16 -> mode I;16
    photo.convert("L").save(folder / "gray.jpg", quality=90)
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=90)

    stored, upright = exif_rotated(Image.open(photos(1, offset=n_good + 1)[0]).convert("RGB"))
    (folder / "exif_rotated.jpg").write_bytes(stored)
    upright.save(folder / "exif_upright.png")  # the same pixels, stored upright: a control

    Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).save(folder / "tiny10.png")
    photo.resize((80, 60), Image.Resampling.BILINEAR).save(folder / "small80.jpg", quality=90)
    _png_header_only(folder / "bomb.png", 12000, 12000)
    photo.resize((2400, 40), Image.Resampling.BILINEAR).save(folder / "wide.png")
    photo.resize((40, 2400), Image.Resampling.BILINEAR).save(folder / "tall.png")

    shutil.copy(photos(1, offset=n_good + 2)[0], outside / "elsewhere.jpg")
    os.symlink(outside / "elsewhere.jpg", folder / "outside_link.jpg")
    shutil.copy(src, folder / "unreadable.jpg")
    os.chmod(folder / "unreadable.jpg", 0)
    os.mkfifo(folder / "fifo.jpg")

    frames = [Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).convert("P") for _ in range(3)]
    frames[0] = photo.resize((128, 96)).convert("P")
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    shutil.copy(photos(1, offset=n_good + 3)[0], folder / "changed.jpg")
    shutil.copy(photos(1, offset=n_good + 4)[0], folder / "vanished.jpg")
    return {"good": good, "upright_size": upright.size, "exif_reference": "exif_upright.png"}


def mutate_after_registration(folder: Path) -> None:
    """changed.jpg gets other content (and another size); vanished.jpg is removed."""
    other = Image.open(photos(1, offset=20)[0]).convert("RGB")
    other.resize((other.width // 2, other.height // 2)).save(folder / "changed.jpg", quality=90)
    (folder / "vanished.jpg").unlink()


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def cleanup(folder: Path) -> None:
    """Give the chmod-000 file its permissions back so tmp folders can be removed."""
    p = folder / "unreadable.jpg"
    if p.exists():
        os.chmod(p, 0o644)
