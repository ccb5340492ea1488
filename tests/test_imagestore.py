"""The decoded-image store: each photo decoded once at the working size, keyed by its bytes,
refused for the same reasons as every other decode."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from orl.images import ImageError, image_size, list_images, load_rgb
from orl.imagestore import INDEX, ImageStore, stored_size
from tests.bad_inputs import BY_FILE, cleanup, make_folder, running_as_root


def _entries(store):
    return sorted(store.root.rglob("*.npy"))


def test_photos_are_decoded_once_at_the_working_size_and_reused(tmp_path, eight_images):
    root = eight_images / "images"
    paths = [str(root / f) for f in list_images(root)]
    store = ImageStore(tmp_path / "store", 96)
    got, failed = store.ensure(paths)
    assert not failed and len(_entries(store)) == len(paths)
    for path, e in zip(paths, got, strict=True):
        w, h = image_size(path)
        assert (e.orig_w, e.orig_h) == (w, h) and min(e.width, e.height) == 96
        assert (e.width, e.height) == stored_size(w, h, 96)
        arr = store.array(e)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint8 and arr.shape == (3, e.height, e.width)
        assert e.scale == pytest.approx((e.width / w, e.height / h))
    # The draft-mode decode and resize against a full decode resized the same way: the same picture.
    full = np.asarray(load_rgb(paths[0]).resize((got[0].width, got[0].height), Image.Resampling.BILINEAR))
    diff = np.abs(store.array(got[0]).transpose(1, 2, 0).astype(float) - full)
    assert diff.mean() < 3.0
    # Another run (a new store object on the same folder): nothing decoded, nothing rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in _entries(store)}
    index = (store.root / INDEX).read_text()
    again, failed = ImageStore(tmp_path / "store", 96).ensure(paths)
    assert not failed and again == got
    assert {p: p.stat().st_mtime_ns for p in _entries(store)} == stamps
    assert (store.root / INDEX).read_text() == index
    # Another working size is another entry of the same photo.
    other, _ = ImageStore(tmp_path / "store", 64).ensure(paths[:1])
    assert other[0].sha1 == got[0].sha1 and min(other[0].width, other[0].height) == 64


def test_the_key_is_the_content(tmp_path, eight_images):
    src = sorted((eight_images / "images").rglob("*.jpg"))
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(src[0], folder / "a.jpg")
    shutil.copy(src[0], folder / "copy_of_a.jpg")
    store = ImageStore(tmp_path / "store", 64)
    (a, copy), _ = store.ensure([folder / "a.jpg", folder / "copy_of_a.jpg"])
    assert a == copy and len(_entries(store)) == 1  # the same bytes: one entry, decoded once
    # The file changes (same name): a new checksum, a new entry; the old one stays for whoever shares it.
    shutil.copy(src[1], folder / "a.jpg")
    (changed,), _ = ImageStore(tmp_path / "store", 64).ensure([folder / "a.jpg"])
    assert changed.sha1 != a.sha1 and (changed.orig_w, changed.orig_h) == image_size(src[1])
    assert len(_entries(store)) == 2
    # A photo smaller than the working size is kept at its own size, never enlarged.
    Image.open(src[2]).convert("RGB").resize((90, 50)).save(folder / "small.png")
    (small,), _ = store.ensure([folder / "small.png"])
    assert (small.width, small.height) == (90, 50) and small.scale == (1.0, 1.0)
    # A damaged entry is refused with what to do, not read as pixels.
    a.path.write_bytes(b"not an array")
    with pytest.raises(ImageError, match="damaged.*delete it"):
        store.array(a)


def test_bad_files_are_refused_with_the_decode_reasons(tmp_path):
    folder = tmp_path / "photos"
    facts = make_folder(folder, tmp_path / "outside")
    try:
        # The store is given full paths, as training gives them: the root check (symlinks out of
        # the folder) is the pre-run scan's, so the link is left out here.
        names = sorted(p.name for p in folder.iterdir() if p.name != "outside_link.jpg")
        store = ImageStore(tmp_path / "store", 64)
        got, failed = store.ensure([folder / n for n in names], workers=2)
        by_name = dict(zip(names, got, strict=True))
        for k, name in enumerate(names):
            case = BY_FILE.get(name)
            if case is None or case.status == "ok" or case.when in ("mine", "later") or (
                    case.root_only_skip and running_as_root()):
                assert k not in failed and by_name[name] is not None, (name, failed.get(k))
            else:
                assert case.reason in failed[k] and by_name[name] is None, (name, failed.get(k))
        # EXIF orientation applied: the rotated JPEG is stored upright, as the PNG of its upright pixels.
        rot, ref = by_name["exif_rotated.jpg"], by_name[facts["exif_reference"]]
        assert (rot.orig_w, rot.orig_h) == facts["upright_size"] == (ref.orig_w, ref.orig_h)
        a, b = store.array(rot).astype(float), store.array(ref).astype(float)
        assert np.abs(a - b).mean() < 3.0 < np.abs(a - b[:, ::-1, ::-1]).mean()
        # A sliver (2400 x 40) is shorter than the working size on one side: kept as it is.
        wide = by_name["wide.png"]
        assert (wide.width, wide.height) == (2400, 40)
        # Refusals are not cached: the index holds only readable photos' records.
        records = [json.loads(line) for line in (store.root / INDEX).read_text().splitlines()]
        assert len([r for r in records if "entry" in r]) == len(_entries(store))
    finally:
        cleanup(folder)
