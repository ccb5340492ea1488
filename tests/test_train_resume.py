"""A run split by a stop or a kill, then resumed, ends with the weights of an uninterrupted run."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orl.checkpoint import load_checkpoint
from orl.config import get_preset
from orl.images import list_images
from orl.train import train
from tests.test_train import _toy_corr

REPO = Path(__file__).resolve().parents[1]

LOSSES = ("loss", "loss_global", "loss_intra", "loss_inter")


def _cfg(epochs, batch, backend="pil"):
    # Checkpoints only where a run stops and at epoch ends: a resume starts from the stop.
    return get_preset("tiny").override(**{"train.epochs": epochs, "train.batch_size": batch,
                                          "train.checkpoint_every_steps": 0, "augment.backend": backend})


def _assert_same_state(a, b):
    assert a["position"] == b["position"] and a["position"]["finished"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "weights differ"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]


def _losses_by_step(path):
    """Per global step, the losses of its last row (a resumed run may log a redone step twice)."""
    with open(path) as fh:
        return {int(r["global_step"]): tuple(r[c] for c in LOSSES) for r in csv.DictReader(fh)}


@pytest.mark.parametrize("stage, epochs, batch, stops, backend", [
    # 8 images, batch 4: 2 steps per epoch. Stopped at epoch 0's last step (the epoch not
    # yet closed), then mid-epoch 1.
    ("byol", 2, 4, [2, 3], "pil"),
    ("orl", 1, 4, [1], "pil"),  # all three branches, stopped mid-epoch
    # The tensor backend seeds each batch by its position: a resumed run makes the same views.
    ("orl", 1, 4, [1], "tensor"),
])
def test_stopped_and_resumed_run_ends_as_the_uninterrupted_one(tmp_path, eight_images, stage, epochs, batch, stops,
                                                                backend):
    root = eight_images / "images"
    files = list_images(root)
    data = {"files": files} if stage == "byol" else {"corr": _toy_corr(files)}
    cfg = _cfg(epochs, batch, backend)
    whole = train(stage, root, tmp_path / "whole", cfg, show_progress=False, **data)
    for max_steps in stops:
        s = train(stage, root, tmp_path / "split", cfg, show_progress=False, max_steps=max_steps, **data)
        assert s["stopped"] and s["global_step"] == max_steps
    split = train(stage, root, tmp_path / "split", cfg, show_progress=False, **data)
    assert split["finished"] and split["global_step"] == whole["global_step"]
    _assert_same_state(load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt"))
    assert _losses_by_step(tmp_path / "split" / "metrics.csv") == _losses_by_step(tmp_path / "whole" / "metrics.csv")


def _pretrain(images, out, *extra):
    # One thread in every run, so each one computes with the same reduction order.
    return [sys.executable, "-m", "orl", "pretrain", "--images", str(images), "--out", str(out), "--preset", "tiny",
            "--epochs", "2", "--batch-size", "4", "--threads", "1", "--quiet", *extra]


@pytest.mark.slow
def test_killed_and_resumed_cli_run_ends_as_the_uninterrupted_one(tmp_path, eight_images):
    # 8 images, batch 4: 2 steps per epoch, 4 in all; tiny checkpoints every 2 steps. Killed
    # after its third step, the run resumes from step 2 and redoes step 3.
    images = eight_images / "images"
    subprocess.run(_pretrain(images, tmp_path / "whole"), check=True, cwd=REPO, capture_output=True, timeout=300)
    killed = subprocess.Popen(_pretrain(images, tmp_path / "split"), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "split" / "metrics.csv", time.monotonic() + 240
    while killed.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:  # header + 3 steps
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not load_checkpoint(tmp_path / "split" / "last.pt")["position"]["finished"]
    subprocess.run(_pretrain(images, tmp_path / "split"), check=True, cwd=REPO, capture_output=True, timeout=300)
    _assert_same_state(load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt"))
    assert _losses_by_step(metrics) == _losses_by_step(tmp_path / "whole" / "metrics.csv")


def test_orl_run_is_the_same_whatever_the_worker_count_and_a_resume(tmp_path, eight_images):
    # Each sample is seeded by its position in the run (orl.data.SeededKeys), not by the worker
    # that makes it: a run in the main process and one with two workers, stopped mid-epoch and
    # resumed (workers started afresh), train on the same batches to the same weights.
    root = eight_images / "images"
    corr = _toy_corr(list_images(root))
    cfg = _cfg(1, 4)  # 8 images, batch 4: 2 steps
    whole = train("orl", root, tmp_path / "whole", cfg, corr=corr, show_progress=False)
    workers = cfg.override(**{"train.num_workers": 2})
    s = train("orl", root, tmp_path / "split", workers, corr=corr, show_progress=False, max_steps=1)
    assert s["stopped"] and s["global_step"] == 1
    split = train("orl", root, tmp_path / "split", workers, corr=corr, show_progress=False)
    assert split["finished"] and split["global_step"] == whole["global_step"] == 2
    _assert_same_state(load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt"))
    losses = _losses_by_step(tmp_path / "split" / "metrics.csv")
    assert losses == _losses_by_step(tmp_path / "whole" / "metrics.csv")
    assert all(v != "" for step in losses.values() for v in step[:3])  # global and intra ran at every step
