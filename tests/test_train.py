"""Training loop: checkpoint contents, resume position, ORL branches, clear errors."""

import csv

import numpy as np
import pytest
import torch

from orl.checkpoint import CheckpointError, load_checkpoint, load_model
from orl.config import get_preset
from orl.correspondence import Correspondence
from orl.data import ResumableSampler
from orl.images import list_images
from orl.train import ConfigMismatch, train


def _cfg(epochs=2, batch=4):
    return get_preset("tiny").override(**{"train.epochs": epochs, "train.batch_size": batch,
                                          "train.checkpoint_every_steps": 1})


def test_sampler_resume_covers_epoch_exactly_once():
    s = ResumableSampler(20, 4, seed=3)
    s.set_position(1, 0)
    full = list(s)
    s.set_position(1, 2)
    assert list(s) == full[8:]
    assert sorted(full) == sorted(set(full)) and len(full) == 20
    s.set_position(2, 0)
    assert list(s) != full  # a new permutation each epoch
    shards = [list(ResumableSampler(20, 4, 3, rank=r, world=2)) for r in range(2)]
    assert not set(shards[0]) & set(shards[1])


def _batches(sampler):
    return [len(b) for b in torch.utils.data.DataLoader(range(sampler.n), batch_size=sampler.batch_size,
                                                         sampler=sampler, drop_last=False)]


def test_sampler_keeps_the_last_partial_batch_and_resumes_into_it():
    s = ResumableSampler(22, 4, seed=3)
    assert s.steps_per_epoch() == 6  # ceil(22 / 4)
    s.set_position(0, 0)
    full = list(s)
    assert sorted(full) == list(range(22)) and _batches(s) == [4, 4, 4, 4, 4, 2]
    s.set_position(0, 5)
    assert list(s) == full[20:] and _batches(s) == [2] and len(s) == 2
    # the old behaviour, as an option
    d = ResumableSampler(22, 4, seed=3, drop_last=True)
    assert d.steps_per_epoch() == 5 and _batches(d) == [4] * 5 and list(d) == full[:20]


def test_sampler_drops_a_last_batch_of_one():
    s = ResumableSampler(21, 4, seed=3)  # 5 x 4 + 1: BatchNorm cannot take the single sample
    assert s.steps_per_epoch() == 5 and _batches(s) == [4] * 5
    skipped = []
    for e in range(6):
        s.set_position(e, 0)
        got = list(s)
        assert len(got) == len(set(got)) == 20
        skipped.append((set(range(21)) - set(got)).pop())
    assert len(set(skipped)) > 1  # a different sample sits out each epoch


def test_sampler_ranks_run_the_same_steps():
    # 21 images over 2 ranks: 11 each (the permutation padded by repeating its first index),
    # batches 4, 4, 3 on both ranks.
    shards = [ResumableSampler(21, 4, 3, rank=r, world=2) for r in range(2)]
    assert [s.steps_per_epoch() for s in shards] == [3, 3]
    assert [_batches(s) for s in shards] == [[4, 4, 3], [4, 4, 3]]
    got = [list(s) for s in shards]
    assert set(got[0]) | set(got[1]) == set(range(21))
    assert len(set(got[0]) & set(got[1])) == 1  # the one padding index
    # resume on each rank continues its own shard
    for s, g in zip(shards, got, strict=True):
        s.set_position(0, 2)
        assert list(s) == g[8:]
    # 3 ranks, 8 images, batch 2: 3 each (padded by 1), the last batch of 1 dropped on every rank
    shards = [ResumableSampler(8, 2, 0, rank=r, world=3) for r in range(3)]
    assert [_batches(s) for s in shards] == [[2], [2], [2]]


def test_checkpoint_holds_everything_and_resume_continues(tmp_path, eight_images):
    root = eight_images / "images"
    files = list_images(root)
    cfg = _cfg()
    # 8 images, batch 4 -> 2 steps per epoch, 4 in total; stop after 3 (mid-epoch 1)
    s = train("byol", root, tmp_path, cfg, files=files, show_progress=False, max_steps=3)
    assert s["stopped"] and not s["finished"] and s["global_step"] == 3
    ck = load_checkpoint(tmp_path / "last.pt")
    assert {"model", "optimizer", "position", "rng", "config", "stage"} <= set(ck)
    assert ck["position"] == {"epoch": 1, "step_in_epoch": 1, "global_step": 3, "total_steps": 4,
                              "steps_per_epoch": 2, "finished": False}
    assert any(k.startswith("target_backbone.") for k in ck["model"])
    assert ck["optimizer"]["state"], "SGD momentum buffers must be saved"
    # As if written on CUDA (fused SGD): resumed here, the run keeps the CPU's implementation.
    raw = torch.load(tmp_path / "last.pt", weights_only=False)
    for group in raw["optimizer"]["param_groups"]:
        group["fused"] = True
    torch.save(raw, tmp_path / "last.pt")
    # resume with the same command: exactly the one remaining step runs
    s2 = train("byol", root, tmp_path, cfg, files=files, show_progress=False)
    assert s2["finished"] and s2["global_step"] == 4
    assert all(g["fused"] is None for g in load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["global_step"]) for r in rows] == [1, 2, 3, 4]
    # momentum follows the per-iteration cosine schedule across the resume
    assert float(rows[0]["momentum"]) == pytest.approx(0.99)
    assert float(rows[-1]["momentum"]) > float(rows[0]["momentum"])
    # the exported backbone loads into a plain torchvision ResNet
    import torchvision

    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "backbone.pth"), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_partial_last_batch_trains_and_resumes(tmp_path, eight_images):
    root = eight_images / "images"
    files = list_images(root)
    cfg = _cfg(epochs=2, batch=3)
    # 8 images, batch 3 -> batches of 3, 3, 2: 3 steps per epoch; stop after 4 (mid-epoch 1)
    s = train("byol", root, tmp_path, cfg, files=files, show_progress=False, max_steps=4)
    assert s["global_step"] == 4 and s["total_steps"] == 6
    pos = load_checkpoint(tmp_path / "last.pt")["position"]
    assert (pos["epoch"], pos["step_in_epoch"], pos["steps_per_epoch"]) == (1, 1, 3)
    s2 = train("byol", root, tmp_path, cfg, files=files, show_progress=False)
    assert s2["finished"] and s2["global_step"] == 6
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    # the authors' schedule: one lr per epoch (tiny has no warmup), peak then half of it (csv: 6 digits)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[:3] == [lrs[0]] * 3 and lrs[3:] == [lrs[3]] * 3 and lrs[3] == pytest.approx(lrs[0] / 2, rel=1e-4)


def test_target_is_ema_not_copy(tmp_path, eight_images):
    root = eight_images / "images"
    train("byol", root, tmp_path, _cfg(epochs=1), files=list_images(root), show_progress=False)
    model, _, _ = load_model(tmp_path / "last.pt")
    w_on = model.backbone.net.conv1.weight
    w_tg = model.target_backbone.net.conv1.weight
    assert not torch.equal(w_on, w_tg)


def test_resume_with_other_model_is_refused(tmp_path, eight_images):
    root = eight_images / "images"
    files = list_images(root)
    train("byol", root, tmp_path, _cfg(epochs=1), files=files, show_progress=False, max_steps=1)
    other = _cfg(epochs=1).override(**{"model.proj_out": 16})
    with pytest.raises(ConfigMismatch, match="new --out"):
        train("byol", root, tmp_path, other, files=files, show_progress=False)


def _toy_corr(files):
    n = len(files)
    boxes = [np.array([[0, 0, 200, 200], [100, 100, 300, 300.0]]) if i % 4 else np.zeros((0, 4)) for i in range(n)]
    knn = np.array([[(i + 1) % n, (i + 2) % n] for i in range(n)])
    pairs, scores = [], []
    for i in range(n):
        row = []
        for k in range(2):
            has = i % 3 != 0 and len(boxes[i]) and len(boxes[knn[i, k]])
            row.append(np.array([[0, 0, 200, 200, 100, 100, 300, 300.0]]) if has else np.zeros((0, 8)))
        pairs.append(row)
        scores.append([np.ones(len(r)) for r in row])
    # Sizes 0 x 0: not recorded, so stage 3 does not check the photos against them (the toy boxes
    # were not mined from these photos).
    return Correspondence(files, np.zeros((n, 2)), boxes, knn, np.ones((n, 2)), pairs, scores)


def test_orl_trains_all_branches_and_images_without_pairs(tmp_path, eight_images):
    root = eight_images / "images"
    corr = _toy_corr(list_images(root))
    s = train("orl", root, tmp_path, _cfg(epochs=1, batch=8), corr=corr, show_progress=False)
    m = s["metrics"]
    assert s["finished"]
    assert {"loss_global", "loss_intra", "loss_inter"} <= set(m)
    assert m["loss"] == pytest.approx(m["loss_global"] + m["loss_intra"] + m["loss_inter"], rel=1e-5)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["stage"] == "orl"
    assert {k.split(".")[1] for k in ck["model"] if k.startswith("predictors.")} == {"global", "intra", "inter"}


def test_cpu_bf16_autocast_trains_stage_3_close_to_fp32(tmp_path, eight_images):
    """train.cpu_amp: the step runs under bf16 autocast on the CPU (the losses move off the fp32
    values, but only by bf16 rounding) and the weights stay fp32."""
    root = eight_images / "images"
    corr = _toy_corr(list_images(root))
    runs = {}
    for amp in (False, True):
        cfg = _cfg(epochs=1, batch=8).override(**{"train.cpu_amp": amp})
        runs[amp] = train("orl", root, tmp_path / str(amp), cfg, corr=corr, show_progress=False)["metrics"]
    fp32, bf16 = runs[False], runs[True]
    for k in ("loss_global", "loss_intra", "loss_inter"):
        assert np.isfinite(bf16[k]) and bf16[k] == pytest.approx(fp32[k], rel=0.05), (k, fp32[k], bf16[k])
    assert any(bf16[k] != fp32[k] for k in ("loss_global", "loss_intra", "loss_inter")), "autocast was not applied"
    ck = load_checkpoint(tmp_path / "True" / "last.pt")
    assert {v.dtype for v in ck["model"].values() if v.is_floating_point()} == {torch.float32}


def test_orl_init_from_stage1(tmp_path, eight_images, tiny_byol_checkpoint):
    root = eight_images / "images"
    corr = _toy_corr(list_images(root))
    train("orl", root, tmp_path, _cfg(epochs=1, batch=8), corr=corr, init_from=tiny_byol_checkpoint,
          show_progress=False, max_steps=0)
    src, _, _ = load_model(tiny_byol_checkpoint)
    dst, _, _ = load_model(tmp_path / "last.pt")
    assert torch.equal(src.backbone.net.conv1.weight, dst.backbone.net.conv1.weight)


def test_too_few_images_and_bad_checkpoint(tmp_path, eight_images):
    root = eight_images / "images"
    with pytest.raises(ValueError, match="at least 2 images"):
        train("byol", root, tmp_path, _cfg(), files=list_images(root)[:1], show_progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_zero_weight_branch_is_not_run(tmp_path, eight_images):
    """Table 5a ablation: w_inter = 0 removes the inter branch (no forward), not just its gradient."""
    root = eight_images / "images"
    corr = _toy_corr(list_images(root))
    cfg = _cfg(epochs=1, batch=8).override(**{"train.w_inter": 0.0})
    s = train("orl", root, tmp_path, cfg, corr=corr, show_progress=False)
    m = s["metrics"]
    assert "loss_inter" not in m and "loss_intra" in m
    assert m["loss"] == pytest.approx(m["loss_global"] + m["loss_intra"], rel=1e-5)


def test_tensor_backend_trains_both_stages_from_one_store_and_skips_a_bad_photo(tmp_path, eight_images):
    import shutil

    from orl.imagestore import INDEX

    root = tmp_path / "photos"
    shutil.copytree(eight_images / "images", root)
    good = sorted(root.rglob("*.jpg"))[0]
    (root / "truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files = list_images(root)
    store = tmp_path / "store"
    cfg = _cfg(epochs=1, batch=4).override(**{"augment.backend": "tensor"})
    s = train("byol", root, tmp_path / "byol", cfg, files=files, show_progress=False, image_store=store)
    # 9 files, one unreadable: found when the store is filled, recorded, replaced by the next photo.
    # Batches of 4, 4 (and a last one of 1, dropped: BatchNorm needs 2).
    assert s["finished"] and s["skipped_images"] == 1 and s["global_step"] == 2
    skipped = list(csv.DictReader(open(tmp_path / "byol" / "skipped_images.csv")))
    assert [r["file"] for r in skipped] == ["truncated.jpg"] and "cannot decode image" in skipped[0]["reason"]
    assert np.isfinite(s["metrics"]["loss"])
    # Stage 3 on the same photos decodes nothing again.
    index = (store / INDEX).read_text()
    good_files = [f for f in files if f != "truncated.jpg"]
    s = train("orl", root, tmp_path / "orl", _cfg(epochs=1, batch=8).override(**{"augment.backend": "tensor"}),
              corr=_toy_corr(good_files), show_progress=False, image_store=store)
    assert (store / INDEX).read_text() == index
    m = s["metrics"]
    assert s["finished"] and {"loss_global", "loss_intra", "loss_inter"} <= set(m)
    assert m["loss"] == pytest.approx(m["loss_global"] + m["loss_intra"] + m["loss_inter"], rel=1e-5)
    assert load_checkpoint(tmp_path / "orl" / "last.pt")["config"]["augment"]["backend"] == "tensor"


def test_label_free_monitor_and_epoch_snapshots_leave_training_unchanged(tmp_path, eight_images):
    root = eight_images / "images"
    files = list_images(root)
    cfg = _cfg(epochs=2, batch=4).override(**{"train.checkpoint_every_steps": 0})
    plain = train("byol", root, tmp_path / "plain", cfg, files=files, show_progress=False)
    watched_cfg = cfg.override(**{"train.monitor_every_epochs": 1, "train.monitor_images": 8,
                                  "train.keep_snapshots": 1})
    watched = train("byol", root, tmp_path / "watched", watched_cfg, files=files, show_progress=False)
    rows = list(csv.DictReader(open(tmp_path / "watched" / "monitor.csv")))
    assert [(int(r["epoch"]), int(r["global_step"])) for r in rows] == [(1, 2), (2, 4)]
    for r in rows:
        assert float(r["view_top1_chance"]) == pytest.approx(1 / 8) and int(r["images"]) == 8
        assert 0 <= float(r["view_top1"]) <= 1 and 0 < float(r["effective_rank"]) <= int(r["effective_rank_max"]) == 7
    assert sorted(p.name for p in (tmp_path / "watched").glob("epoch_*.pt")) == ["epoch_0002.pt"]
    assert load_checkpoint(tmp_path / "watched" / "epoch_0002.pt")["position"]["epoch"] == 2
    # The monitor draws from its own RNG and does not train: the same losses and weights as without it.
    assert plain["metrics"]["loss"] == watched["metrics"]["loss"]
    a, b = load_checkpoint(tmp_path / "plain" / "last.pt"), load_checkpoint(tmp_path / "watched" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _event_scalars(run_dir):
    """{tag: [(step, value)]} of the TensorBoard event files in run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_monitor_signals_reach_tensorboard_the_progress_reports_and_the_readers(tmp_path, eight_images):
    pytest.importorskip("tensorboard")
    from orl.runlog import read_metrics, read_monitor

    root = eight_images / "images"
    cfg = _cfg(epochs=2, batch=4).override(**{"train.checkpoint_every_steps": 0, "train.monitor_every_epochs": 1,
                                             "train.monitor_images": 8})
    reports = []
    train("byol", root, tmp_path, cfg, files=list_images(root), show_progress=False, on_progress=reports.append)
    steps, n = read_metrics(tmp_path)
    monitor = read_monitor(tmp_path)
    assert n == 4 and [r["global_step"] for r in steps] == [1, 2, 3, 4]
    assert [(r["epoch"], r["global_step"]) for r in monitor] == [(1, 2), (2, 4)]
    scalars = _event_scalars(tmp_path)
    # The same values as the CSV files (which round them), at the same steps.
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in steps], abs=1e-4)
    assert [s for s, _ in scalars["train/lr"]] == [1, 2, 3, 4]
    for key in ("view_top1", "effective_rank"):
        assert scalars[f"monitor/{key}"] == [(r["global_step"], pytest.approx(r[key], rel=1e-5)) for r in monitor]
    # Steps before the first monitored epoch carry no signals; every report after it carries the latest.
    assert "view_top1" not in reports[0] and "view_top1" not in reports[1]
    after = [r for r in reports if r.get("monitor_epoch") == 1]
    assert after and all(r["view_top1"] == pytest.approx(monitor[0]["view_top1"], abs=1e-5) for r in after)
    assert reports[-1]["monitor_epoch"] == 2


def test_training_without_the_tensorboard_package_logs_it_once_and_writes_the_csv_files(
        tmp_path, eight_images, monkeypatch, caplog):
    import logging
    import sys

    import orl.train

    # None in sys.modules makes `from torch.utils.tensorboard import ...` raise ImportError, as a
    # missing package does.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(orl.train, "_tensorboard_off_logged", False)
    root = eight_images / "images"
    cfg = _cfg(epochs=1, batch=4).override(**{"train.checkpoint_every_steps": 0})
    with caplog.at_level(logging.INFO, logger="orl.train"):
        for name in ("a", "b"):
            s = train("byol", root, tmp_path / name, cfg, files=list_images(root), show_progress=False)
            assert s["finished"] and (tmp_path / name / "metrics.csv").is_file()
            assert not list((tmp_path / name).glob("events.out.tfevents.*"))
    assert sum("TensorBoard event files are off" in r.message for r in caplog.records) == 1
