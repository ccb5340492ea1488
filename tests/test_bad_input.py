"""Bad input through the library and the CLI: every case of tests/bad_inputs.py gets a per-image
record with its reason, the run goes on, and the good photos in the same folder are mined as
usual. The same fixture set runs through the REST flow in tests/services/test_bad_input_rest.py.

One module-scoped run of ``orl pretrain`` -> ``orl mine`` -> (change one file, delete another)
-> ``orl train`` -> ``orl render-pairs`` (tiny preset) on one folder; the parametrised tests
then read its records.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orl.cli import main
from orl.correspondence import Correspondence
from orl.images import MAX_PIXELS_ENV, ImageError, inspect_image, load_rgb
from orl.proposals import run_proposals
from tests import bad_inputs as B

PARAMS = {"mode": "fast", "max_side_px": 500, "min_side_px": 96, "max_aspect": 3, "max_iou": 0.5, "max_boxes": 100}


def _rows(path: Path) -> dict[str, dict]:
    with path.open(newline="") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("badinput")
    folder = base / "photos"
    facts = B.make_folder(folder, base / "outside")
    try:
        assert main(["pretrain", "--images", str(folder), "--out", str(base / "s1"), "--preset", "tiny",
                     "--batch-size", "4", "--quiet"]) == 0
        assert main(["mine", "--images", str(folder), "--checkpoint", str(base / "s1" / "last.pt"),
                     "--out", str(base / "m"), "--roi-mode", "roi_align", "--ss-max-side", "320", "--quiet"]) == 0
        B.mutate_after_registration(folder)  # after mining: stage 3 must notice
        assert main(["train", "--images", str(folder), "--pairs", str(base / "m"), "--out", str(base / "s3"),
                     "--preset", "tiny", "--batch-size", "4", "--quiet"]) == 0
        assert main(["render-pairs", "--pairs", str(base / "m"), "--images", str(folder), "--out",
                     str(base / "png"), "--n", "4"]) == 0
        yield {
            "folder": folder, "base": base, "facts": facts,
            "stage1": _rows(base / "s1" / "image_status.csv"),
            "mine": _rows(base / "m" / "image_status.csv"),
            "stage3": _rows(base / "s3" / "skipped_images.csv"),
            "corr": Correspondence.load(base / "m"),
        }
    finally:
        B.cleanup(folder)


def _skip_root_case(case: B.Case) -> None:
    if case.root_only_skip and B.running_as_root():
        pytest.skip("tests run as root, and chmod 000 does not stop root from reading; fifo.jpg covers an "
                    "entry that cannot be opened")


@pytest.mark.parametrize("case", B.CASES, ids=[c.file for c in B.CASES])
def test_every_case_is_recorded_through_the_cli(cli_run, case):
    _skip_root_case(case)
    s1, mine, s3 = cli_run["stage1"], cli_run["mine"], cli_run["stage3"]
    files = cli_run["corr"].files
    if case.when == "scan":  # refused or converted from the header, before anything runs
        for rows in (s1, mine):
            assert rows[case.file]["status"] == case.status and case.reason in rows[case.file]["reason"]
        assert (case.file in files) == (case.status == "ok")
    elif case.when == "decode":  # truncated: only decoding shows it; stage 1 skips it mid-epoch
        assert s1[case.file]["status"] == "failed"
        assert s1[case.file]["reason"].startswith("skipped in training: ") and case.reason in s1[case.file]["reason"]
        assert mine[case.file]["status"] == "failed" and case.reason in mine[case.file]["reason"]
        assert case.file not in files
    elif case.when == "mine":  # usable, but no region passes the box filter: the authors' fallback
        assert s1[case.file]["status"] == "ok"
        assert mine[case.file]["status"] == "ok" and case.reason in mine[case.file]["reason"]
        assert mine[case.file]["n_boxes"] == "1"
    else:  # changed (other size) / removed after mining: stage 3 skips and records them
        assert s1[case.file]["status"] == "ok" and mine[case.file]["status"] == "ok" and case.file in files
        expected = "was 640 x 426 when mined" if case.file == "changed.jpg" else "file not found"
        assert expected in s3[case.file]["reason"]


def test_good_photos_are_mined_as_usual(cli_run):
    corr, mine = cli_run["corr"], cli_run["mine"]
    good = cli_run["facts"]["good"] + [cli_run["facts"]["exif_reference"]]
    for f in good:
        assert mine[f]["status"] == "ok" and mine[f]["reason"] == "" and int(mine[f]["n_boxes"]) > 1
        i = corr.files.index(f)
        assert sum(len(p) for p in corr.pairs[i]) > 0, f"{f} got no pairs"
    # Stage 1 and stage 3 trained to the end (a finished run exports its backbone).
    assert (cli_run["base"] / "s1" / "backbone.pth").is_file() and (cli_run["base"] / "s3" / "backbone.pth").is_file()
    assert len(list((cli_run["base"] / "png").glob("*.png"))) == 4


def test_exif_rotated_boxes_refer_to_the_upright_image(cli_run):
    """Proposals of the sideways-stored photo equal those of the same pixels stored upright, and
    lie within the upright size; the pairs and the renderings use the same pixels."""
    corr, (w, h) = cli_run["corr"], cli_run["facts"]["upright_size"]
    assert w > h  # landscape upright, stored portrait: a box in stored pixels would leave it
    i, j = corr.files.index("exif_rotated.jpg"), corr.files.index("exif_upright.png")
    assert tuple(corr.sizes[i]) == (w, h) == tuple(corr.sizes[j])
    assert np.array_equal(corr.boxes[i], corr.boxes[j]) and len(corr.boxes[i]) > 1
    boxes = np.concatenate([corr.boxes[i]] + [p[:, :4] for p in corr.pairs[i] if len(p)])
    assert (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all() and (boxes >= 0).all()
    assert (boxes[:, 2] > h).any()  # some box reaches past the stored width: upright coordinates
    folder = cli_run["folder"]
    assert np.array_equal(np.asarray(load_rgb(folder / "exif_rotated.jpg")),
                          np.asarray(load_rgb(folder / "exif_upright.png")))


def test_conversions_give_plain_rgb(cli_run):
    folder = cli_run["folder"]
    for f in ("alpha.png", "deep16.png", "gray.jpg", "cmyk.jpg", "animated.gif"):
        im = load_rgb(folder / f)
        assert im.mode == "RGB" and min(im.size) >= 32
    # 16-bit: a fixed scale (value / 257), the gray photo it was made from, not stretched per image
    deep = np.asarray(load_rgb(folder / "deep16.png"))[:, :, 0].astype(int)
    src = np.asarray(Image.open(B.photos(1, offset=6)[0]).convert("L")).astype(int)
    assert np.abs(deep - src).max() <= 1
    # alpha: the (nearly) transparent top row comes out white, the opaque bottom row as the photo
    alpha = np.asarray(load_rgb(folder / "alpha.png")).astype(int)
    assert (alpha[0] >= 250).all() and (alpha[-1] < 250).any()


def test_the_pixel_limit_is_a_setting_and_refuses_before_decoding(cli_run, monkeypatch):
    bomb = cli_run["folder"] / "bomb.png"
    with pytest.raises(ImageError, match="above the limit of 120.0 MP"):
        inspect_image(bomb)
    # Raised above its size, the header passes, and decoding then finds the pixel data missing:
    # so the refusal above came before any decoding.
    monkeypatch.setenv(MAX_PIXELS_ENV, "150000000")
    assert inspect_image(bomb).width == 12000
    with pytest.raises(ImageError, match="cannot decode image"):
        load_rgb(bomb)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match="ORL_MAX_IMAGE_PIXELS must be a whole number"):
        inspect_image(bomb)


def test_a_selective_search_crash_on_an_extreme_aspect_image_is_recorded(cli_run):
    """OpenCV's selective search is reported to crash on extreme aspect ratios (this OpenCV does
    not: see the "mine" cases). A worker process really killed (SIGKILL) while on such an image
    costs that image alone, with a record; the images after it are proposed."""
    import orl.proposals as P

    folder = cli_run["folder"]
    paths = [str(folder / f) for f in ("wide.png", "tall.png", "000000000009.jpg")]

    class DiesOnWide(P._Worker):
        def send(self, msg):
            super().send(msg)
            if msg is not None and msg[1].endswith("wide.png"):
                self.proc.kill()

    orig, P._Worker = P._Worker, DiesOnWide
    try:
        out = dict(run_proposals(paths, dict(PARAMS, max_side_px=320), workers=1, timeout_s=300))
    finally:
        P._Worker = orig
    assert not out[0].ok and "selective search worker crashed" in out[0].reason and not out[0].image_failed
    assert out[1].ok and out[2].ok and len(out[2].boxes) > 1
