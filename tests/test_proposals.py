"""Selective search on real photos, and per-image failure records for bad inputs."""

import numpy as np
from PIL import Image

from orl.proposals import ProposalResult, propose_image, run_proposals, selective_search

PARAMS = {"mode": "fast", "max_side_px": 320, "min_side_px": 96, "max_aspect": 3, "max_iou": 0.5, "max_boxes": 100}


def test_real_photos_give_valid_boxes(sample_images):
    paths = sorted(sample_images.glob("train2017/*.jpg"))[:3]
    for p in paths:
        r = propose_image(str(p), PARAMS)
        assert r.ok, r.reason
        assert r.n_raw > len(r.boxes) >= 1
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= r.width).all() and (b[:, 3] <= r.height).all()
        assert ((b[:, 2] - b[:, 0]) >= 96).all() and ((b[:, 3] - b[:, 1]) >= 96).all()


def test_downscale_maps_back_to_original_pixels(sample_images):
    from orl.images import load_rgb

    rgb = np.asarray(load_rgb(sorted(sample_images.glob("train2017/*.jpg"))[0]))
    full = selective_search(rgb, "fast", None)
    small = selective_search(rgb, "fast", 200)
    h, w = rgb.shape[:2]
    # boxes of the downscaled run still span the original image, not the small one
    assert small[:, 2].max() > 0.9 * w and small[:, 3].max() > 0.9 * h
    assert len(small) < len(full)


def _make_bad_inputs(tmp_path):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((300, 400)) * 255).astype(np.uint8), "L").save(tmp_path / "gray.png")
    Image.fromarray((rng.random((12, 9, 3)) * 255).astype(np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray((rng.random((40, 2400, 3)) * 255).astype(np.uint8)).save(tmp_path / "wide.png")
    return [str(tmp_path / n) for n in ("corrupt.jpg", "gray.png", "tiny.png", "wide.png")]


def test_bad_inputs_get_clear_records(tmp_path):
    paths = _make_bad_inputs(tmp_path)
    results = {paths[i]: r for i, r in run_proposals(paths, PARAMS, workers=2, timeout_s=60)}
    assert set(results) == set(paths)
    corrupt = results[paths[0]]
    assert not corrupt.ok and corrupt.image_failed and "cannot read image header" in corrupt.reason
    gray = results[paths[1]]
    assert gray.ok and (gray.width, gray.height) == (400, 300) and len(gray.boxes) >= 1
    tiny = results[paths[2]]  # below 32 px a side: refused as an image, before selective search
    assert not tiny.ok and tiny.image_failed and "image too small: 9 x 12 px" in tiny.reason
    wide = results[paths[3]]  # no region can pass a 96 px / aspect 3 filter
    assert wide.ok and len(wide.boxes) == 1 and "fallback" in wide.reason


def test_timeout_is_recorded_and_run_goes_on(sample_images):
    paths = [str(p) for p in sorted(sample_images.glob("val2017/*.jpg"))[:2]]
    params = dict(PARAMS, max_side_px=None, mode="quality")  # slow enough to exceed 0.05 s
    results = dict(run_proposals(paths, params, workers=1, timeout_s=0.05))
    assert len(results) == 2
    assert all(not r.ok and "timed out" in r.reason for r in results.values())


def test_worker_crash_is_isolated(tmp_path, sample_images):
    """A worker killed mid-image (as a segfault in OpenCV would) costs only that image."""
    good = str(sorted(sample_images.glob("train2017/*.jpg"))[0])
    params = dict(PARAMS, mode="__crash__")  # unknown mode: handled error, not a crash
    r = dict(run_proposals([good], params, workers=1, timeout_s=30))[0]
    assert isinstance(r, ProposalResult) and not r.ok and "unknown selective search mode" in r.reason

    import orl.proposals as P

    class Killer(P._Worker):
        def send(self, msg):
            super().send(msg)
            if msg is not None:
                self.proc.kill()

    orig = P._Worker
    P._Worker = Killer
    try:
        out = dict(run_proposals([good, good], PARAMS, workers=1, timeout_s=30))
    finally:
        P._Worker = orig
    assert len(out) == 2 and all("crashed" in r.reason for r in out.values())


def test_proposals_are_reproducible_across_processes(sample_images):
    """OpenCV ranks regions with C rand(); seeding it per image makes the order (and so the
    first-100 filter) independent of which worker ran which images before."""
    paths = [str(p) for p in sorted(sample_images.glob("train2017/*.jpg"))[:3]]
    in_process = [propose_image(p, PARAMS).boxes for p in paths]
    again = [propose_image(p, PARAMS).boxes for p in reversed(paths)][::-1]
    workers = dict(run_proposals(paths, PARAMS, workers=2, timeout_s=60))
    for i in range(3):
        assert np.array_equal(in_process[i], again[i])
        assert np.array_equal(in_process[i], workers[i].boxes)


def test_faster_proposers_give_valid_reproducible_boxes(sample_images):
    """single and felzenszwalb (mine.ss_mode): boxes in original pixels that pass the same
    filter, the same in a worker process as here (a named option, measured by the benchmark)."""
    path = str(sorted(sample_images.glob("train2017/*.jpg"))[1])
    for mode in ("single", "felzenszwalb"):
        params = dict(PARAMS, mode=mode)
        r = propose_image(path, params)
        assert r.ok and r.n_raw > len(r.boxes) >= 1, (mode, r.reason)
        b = r.boxes
        assert (b >= 0).all() and (b[:, 2] <= r.width).all() and (b[:, 3] <= r.height).all()
        assert ((b[:, 2] - b[:, 0]) >= 96).all() and ((b[:, 3] - b[:, 1]) >= 96).all()
        (_, w), = run_proposals([path], params, workers=1, timeout_s=60)
        assert np.array_equal(w.boxes, b)
    fz = selective_search(np.zeros((100, 200, 3), np.uint8), "felzenszwalb")
    assert len(fz) >= 1 and np.array_equal(fz[0], [0, 0, 200, 100])  # one flat segment: the whole image
