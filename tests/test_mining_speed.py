"""Every stage-2 speed-up pinned to the plain path it replaces, on real photos.

- Parallel decoding: the same image embeddings as decoding one image at a time in this thread.
- RoI features of many images per forward: the same features as ``embed_rois`` one image at a
  time, in both modes, and the same order and failure records.
- RoI features streamed to disk: with ``mine.roi_dtype=float32``, ``orl mine`` gives exactly the
  pairs of the in-RAM float32 reference path (features per image, ``select_pairs`` per
  neighbour). With float16 (the default), a pair changes only where its float32 score lies
  within 2 x 1e-3 of the cut-off of its (query, neighbour) matrix: a unit vector rounds to
  float16 with a relative error of at most 2^-11 per element, so a cosine moves by at most
  2^-10 + 2^-22 < 1e-3 (Cauchy-Schwarz). The count is printed (``pytest -s``).
- JPEG draft decoding (an option, off by default): embeddings within cosine 0.99 of a full decode.
- The thread plan: the counts never add up to more than the cores given; ``orl mine`` takes its
  selective-search process count from ``--threads``, never from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from orl.config import MineConfig, get_preset
from orl.correspondence import Correspondence
from orl.device import available_cores, plan_threads
from orl.images import load_rgb
from orl.mining import RoiImage, embed_images, embed_rois, embed_rois_batched, select_pairs
from orl.proposals import proposal_params, propose_image
from orl.roi_features import RoiFeatureStore, RoiFeatureWriter, load_roi_features, write_npz

FP16_COSINE_ERROR = 1e-3  # the bound of the module docstring


@pytest.fixture(scope="module")
def tiny_model():
    from orl.models import build_model

    torch.manual_seed(0)
    return build_model(get_preset("tiny").model, "byol").eval()


@pytest.fixture(scope="module")
def photos(sample_images) -> list[str]:
    """Six photos of three sizes (two 640 x 480 ones, so roi_align batches two images)."""
    return [str(p) for p in sorted(sample_images.glob("*/*.jpg"))[:6]]


@pytest.fixture(scope="module")
def photo_boxes(photos) -> list[np.ndarray]:
    params = proposal_params(get_preset("tiny").mine)
    return [propose_image(p, params).boxes for p in photos]


# -- decoding waves --------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True])
def test_decode_waves_keep_order_and_take_turns_on_a_cpu(overlap):
    import threading

    from orl.mining import decode_waves

    started: list[int] = []
    lock = threading.Lock()

    def fn(x: int) -> int:
        with lock:
            started.append(x)
        return x * x

    waves = [[0, 1, 2], [3, 4], [5]]
    seen = []
    for k, results in enumerate(decode_waves(waves, fn, threads=3, overlap=overlap)):
        seen.append(results)
        if not overlap:  # no image of the next wave is decoded while the caller computes
            assert sorted(started) == sorted(x for w in waves[: k + 1] for x in w)
    assert seen == [[0, 1, 4], [9, 16], [25]]


# -- image embeddings ------------------------------------------------------------------------------
def test_parallel_decoding_gives_the_serial_embeddings(tiny_model, photos):
    from orl.augment import eval_transform

    cfg = replace(get_preset("tiny").mine, batch_size=4)  # two batches, the second partial
    tf = eval_transform(cfg.embed_resize, cfg.embed_crop)
    with torch.no_grad():  # the plain path: decode one image at a time here, embed per batch
        want = np.concatenate([torch.nn.functional.normalize(tiny_model.embed(torch.stack(
            [tf(load_rgb(p)) for p in photos[s : s + 4]])), dim=1).numpy() for s in range(0, len(photos), 4)])
    got, failed = embed_images(tiny_model, photos, cfg, decode_threads=3)
    assert not failed and np.array_equal(got, want)  # the same batches: the same bits
    # A file that fails is recorded and left out; its batch is one image short, which moves the
    # others only by float32 rounding (the convolution kernels depend on the batch size).
    got, failed = embed_images(tiny_model, photos[:2] + ["/nonexistent/x.jpg"] + photos[2:], cfg, decode_threads=3)
    assert list(failed) == [2] and "file not found" in failed[2]
    assert not got[2].any() and np.abs(np.delete(got, 2, axis=0) - want).max() < 1e-5


def test_draft_decoding_is_an_option_within_its_tolerance(tiny_model, photos):
    cfg = get_preset("tiny").mine
    assert not cfg.decode_draft
    full, _ = embed_images(tiny_model, photos, cfg)
    draft, _ = embed_images(tiny_model, photos, replace(cfg, decode_draft=True))
    assert not np.array_equal(full, draft)  # the JPEGs really were decoded at a smaller scale
    assert (np.sum(full * draft, axis=1) > 0.99).all()


# -- RoI features, many images per forward -------------------------------------------------------
@pytest.mark.parametrize("mode", ["crop", "roi_align"])
def test_batched_roi_features_equal_the_one_image_path(tiny_model, photos, photo_boxes, mode):
    cfg = replace(get_preset("tiny").mine, roi_mode=mode, batch_size=16, roi_align_batch_images=4)
    want = [embed_rois(tiny_model.backbone, load_rgb(p), b, cfg)[0] for p, b in zip(photos, photo_boxes, strict=True)]
    jobs = [RoiImage(p, b) for p, b in zip(photos, photo_boxes, strict=True)]
    jobs.insert(1, RoiImage(photos[0], np.zeros((0, 4))))  # no boxes: nothing decoded, (0, C)
    jobs.insert(3, RoiImage("/nonexistent/x.jpg", photo_boxes[0]))  # gone: a reason, (0, C)
    got = list(embed_rois_batched(tiny_model.backbone, jobs, cfg, decode_threads=2))
    assert [k for k, _, _ in got] == list(range(len(jobs)))
    assert got[1][1].shape == (0, tiny_model.backbone.out_channels) and not got[1][2]
    assert got[3][1].shape[0] == 0 and "file not found" in got[3][2]
    feats = [f for k, f, _ in got if k not in (1, 3)]
    for a, b in zip(feats, want, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    # ... and so the same pairs between every two photos
    for i in range(len(want)):
        for j in range(len(want)):
            if i != j:
                assert np.array_equal(select_pairs(feats[i], feats[j], 0.1)[0], select_pairs(want[i], want[j], 0.1)[0])


# -- RoI features on disk --------------------------------------------------------------------------
def test_feature_store_round_trip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 0, 5, 1, 0, 4)]
    writer = RoiFeatureWriter(tmp_path / "s32", 8, "float32", shard_bytes=4 * 8 * 6)  # ~6 rows a shard
    for f in feats:
        writer.append(f)
    store = writer.close([f"{i}.jpg" for i in range(len(feats))])
    assert len(list((tmp_path / "s32").glob("shard-*.bin"))) > 1
    assert store.files == [f"{i}.jpg" for i in range(6)] and store.counts() == [3, 0, 5, 1, 0, 4]
    assert all(np.array_equal(a, b) and a.dtype == np.float32 for a, b in zip(store, feats, strict=True))
    assert isinstance(store[0], np.memmap) and not store[0].flags.writeable
    half = RoiFeatureWriter(tmp_path / "s16", 8, "float16")
    for f in feats:
        half.append(f)
    h = half.close([str(i) for i in range(6)])
    assert h[2].dtype == np.float16 and np.array_equal(h[2], feats[2].astype(np.float16))
    # the single-file layout, written image by image, reads back the same
    write_npz(tmp_path / "f.npz", store.files, store)
    files, back = load_roi_features(tmp_path / "f.npz")
    assert files == store.files and all(np.array_equal(a, b) for a, b in zip(back, feats, strict=True))
    files, mapped = load_roi_features(tmp_path / "s32")
    assert files == store.files and all(np.array_equal(a, b) for a, b in zip(mapped, feats, strict=True))
    with pytest.raises(ValueError, match="float16, float32"):
        RoiFeatureWriter(tmp_path / "x", 8, "float64")
    with pytest.raises(ValueError, match="not a RoI feature store"):
        RoiFeatureStore(tmp_path)


@pytest.fixture(scope="module")
def mined(tmp_path_factory, eight_images, tiny_byol_checkpoint):
    """``orl mine --threads 1`` on 8 photos, features kept as float32 and as float16 (one
    selective search: the second run reads the first one's proposals cache)."""
    from orl.cli import main, set_threads

    before = torch.get_num_threads()
    root = tmp_path_factory.mktemp("mined")
    out = {}
    try:
        for dtype in ("float32", "float16"):
            folder = root / dtype
            if out:
                folder.mkdir()
                shutil.copy(out["float32"] / "proposals.jsonl", folder / "proposals.jsonl")
            assert main(["mine", "--images", str(eight_images / "images"), "--checkpoint", str(tiny_byol_checkpoint),
                         "--out", str(folder), "--threads", "1", "--set", f"mine.roi_dtype={dtype}", "--quiet"]) == 0
            out[dtype] = folder
    finally:
        set_threads(before)
    return out


def _reference_pairs(corr: Correspondence, images: Path, cfg) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The plain path: each image's features in RAM as float32, one image at a time, then the
    pair rule per (query, neighbour). Returns per query, per neighbour, (indices, full matrix)."""
    from orl.checkpoint import load_model

    model, _, _ = load_model(corr.info["checkpoint"])
    model.eval()
    feats = [embed_rois(model.backbone, load_rgb(images / f), b, cfg)[0] for f, b in zip(corr.files, corr.boxes,
                                                                                         strict=True)]
    return [[(select_pairs(feats[q], feats[j], cfg.pair_ratio)[0], feats[q] @ feats[j].T) for j in corr.knn[q]]
            for q in range(len(corr))]


def _pair_keys(corr: Correspondence, q: int, k: int) -> list[tuple[float, ...]]:
    return [tuple(np.round(p, 2)) for p in corr.pairs[q][k]]



def test_mine_streams_features_and_float32_gives_the_reference_pairs(mined, eight_images):
    corr = Correspondence.load(mined["float32"])
    stats = json.loads((mined["float32"] / "mine_stats.json").read_text())
    assert stats["threads"]["cores"] == stats["threads"]["ss_processes"] == 1  # --threads 1
    assert not (mined["float32"] / "roi_store").exists()  # the features lived on disk, then went
    cfg = MineConfig(**corr.info["mine_config"])
    assert cfg.roi_dtype == "float32"
    ref = _reference_pairs(corr, eight_images / "images", cfg)
    assert corr.num_pairs > 0
    for q in range(len(corr)):
        for k, (ij, _) in enumerate(ref[q]):
            j = corr.knn[q][k]
            want = np.concatenate([corr.boxes[q][ij[:, 0]], corr.boxes[j][ij[:, 1]]], axis=1)
            assert corr.pairs[q][k].shape == want.shape and np.allclose(corr.pairs[q][k], want, atol=1e-6), (q, k)


def test_float16_features_change_pairs_only_at_near_ties(mined, eight_images):
    c16 = Correspondence.load(mined["float16"])
    cfg = MineConfig(**c16.info["mine_config"])
    assert cfg.roi_dtype == "float16" and c16.num_pairs > 0
    ref = _reference_pairs(c16, eight_images / "images", cfg)  # float32 in RAM, on the same boxes
    changed = total = 0
    for q in range(len(c16)):
        for k, (ij, sim) in enumerate(ref[q]):
            j = c16.knn[q][k]
            cutoff = float(sim[ij[-1, 0], ij[-1, 1]])
            want = np.concatenate([c16.boxes[q][ij[:, 0]], c16.boxes[j][ij[:, 1]]], axis=1)
            a = {tuple(np.round(p, 2)) for p in want}
            b = set(_pair_keys(c16, q, k))
            assert len(a) == len(b) == len(want)
            total += len(a)
            changed += len(a - b)
            for pair in a ^ b:  # in one list only: a near-tie at the cut-off
                iq = int(np.argmin(np.abs(c16.boxes[q] - np.array(pair[:4])).sum(1)))
                jn = int(np.argmin(np.abs(c16.boxes[j] - np.array(pair[4:])).sum(1)))
                assert abs(sim[iq, jn] - cutoff) <= 2 * FP16_COSINE_ERROR, (q, k, pair, sim[iq, jn], cutoff)
            # the best score moves by less than the bound
            assert abs(float(c16.pair_scores[q][k][0]) - float(sim[ij[0, 0], ij[0, 1]])) <= FP16_COSINE_ERROR
    print(f"\nfloat16 RoI features: {changed} of {total} pairs changed against the float32 in-RAM path "
          f"(each within {2 * FP16_COSINE_ERROR:g} of its matrix's cut-off)")
    assert changed <= 0.05 * total


# -- threads ---------------------------------------------------------------------------------------
def test_thread_plan_never_oversubscribes(caplog):
    for cores in range(1, 9):
        for processes in range(1, cores + 1):
            for ss in (None, 0, 1, 2, 3, 8, 16):
                p = plan_threads(cores, processes, ss)
                assert processes * p.ss_processes <= cores and processes * p.threads <= cores
                assert p.threads >= 1 and (ss == 0) == (p.ss_processes == 0)
    assert plan_threads(None).ss_processes == available_cores()  # the CLI's default: every core
    assert plan_threads(8, 2).to_dict() == {"cores": 8, "processes": 2, "threads": 4, "ss_processes": 4}
    with caplog.at_level(logging.WARNING, logger="orl.device"):
        assert plan_threads(2, ss_processes=5).ss_processes == 2
    assert "5 selective-search processes asked for" in caplog.text
    with pytest.raises(ValueError, match="3 pool processes for 2 cores"):
        plan_threads(2, 3)
    with pytest.raises(ValueError, match="at least 1"):
        plan_threads(0)


def test_mine_takes_selective_search_processes_from_the_command_not_the_checkpoint():
    from orl.cli import _mine_config, build_parser

    ckpt = get_preset("tiny")
    ckpt = replace(ckpt, mine=replace(ckpt.mine, ss_workers=7))  # e.g. trained on a 16-core machine
    parse = build_parser().parse_args
    args = parse(["mine", "--images", "x", "--checkpoint", "c.pt", "--out", "o"])
    assert _mine_config(args, ckpt).mine.ss_workers is None
    args = parse(["mine", "--images", "x", "--checkpoint", "c.pt", "--out", "o", "--ss-workers", "1",
                  "--ss-mode", "felzenszwalb"])
    mc = _mine_config(args, ckpt).mine
    assert (mc.ss_workers, mc.ss_mode) == (1, "felzenszwalb")
