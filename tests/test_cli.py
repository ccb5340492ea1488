"""The CLI contract, end to end on real photos, plus its error codes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orl.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    """Run ``orl`` as a user would, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "orl", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_end_to_end_tiny(tmp_path, eight_images):
    """tiny preset: pretrain -> mine -> train -> eval -> attention -> render on 8 real photos."""
    images, labels = eight_images / "images", eight_images / "labels"
    (tmp_path / "cfg.yaml").write_text("preset: tiny\ntrain:\n  epochs: 2\n  seed: 1\n")
    r = run("pretrain", "--images", images, "--out", tmp_path / "s1", "--config", tmp_path / "cfg.yaml",
            "--set", "train.seed=3", "--quiet")
    assert r.returncode == 0, r.stderr
    s1 = json.loads(r.stdout)
    assert s1["finished"] and s1["global_step"] == 2 and (tmp_path / "s1" / "last.pt").is_file()
    assert (tmp_path / "s1" / "backbone.pth").is_file() and (tmp_path / "s1" / "metrics.csv").is_file()
    # The resolved configuration is saved with the run: the file's values, then --set.
    saved = yaml.safe_load((tmp_path / "s1" / "config.yaml").read_text())
    assert (saved["preset"], saved["train"]["epochs"], saved["train"]["seed"]) == ("tiny", 2, 3)

    r = run("mine", "--images", images, "--checkpoint", tmp_path / "s1" / "last.pt", "--out", tmp_path / "m", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["images"] == 8 and m["pairs"] > 0 and m["failed_images"] == 0
    corr = json.loads((tmp_path / "m" / "correspondence.json").read_text())
    assert len(corr["pseudo_annotations"]["knn_image_id"][0]) == 7  # K = 10 capped at N - 1
    rows = list(csv.DictReader(open(tmp_path / "m" / "image_status.csv")))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    assert yaml.safe_load((tmp_path / "m" / "config.yaml").read_text()) == saved  # the checkpoint's config

    # No --preset: stage 3 starts from the configuration the pairs were mined with (tiny).
    r = run("train", "--images", images, "--pairs", tmp_path / "m", "--out", tmp_path / "s3", "--epochs", "1",
            "--quiet")
    assert r.returncode == 0, r.stderr
    s3 = json.loads(r.stdout)
    assert s3["finished"] and {"loss_global", "loss_intra", "loss_inter"} <= set(s3["metrics"])
    assert yaml.safe_load((tmp_path / "s3" / "config.yaml").read_text()) == {
        **saved, "train": {**saved["train"], "epochs": 1}}

    r = run("eval", "--checkpoint", tmp_path / "s3" / "last.pt", "--images", images, "--labels", labels,
            "--out", tmp_path / "eval.json", "--pairs", tmp_path / "m", "--quiet")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["stage"] == "orl" and ev["counts"]["labelled"] == 8
    assert ev["object_probe"]["train_crops"] > 0 and ev["object_probe"]["val_crops"] > 0
    assert 0.0 <= ev["object_probe"]["knn_acc"] <= 1.0
    assert ev["svm"]["map_all"] is not None and 0.0 <= ev["svm"]["map_all"] <= 1.0
    assert ev["correspondence"]["pairs"] == m["pairs"] and ev["correspondence"]["random"]["pairs"] == m["pairs"]

    img = next((images / "val2017").glob("*.jpg"))
    r = run("attention", "--checkpoint", tmp_path / "s3" / "last.pt", "--image", img, "--out", tmp_path / "att.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "att.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = run("render-pairs", "--pairs", tmp_path / "m", "--images", images, "--out", tmp_path / "pairs", "--n", "2")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "pairs").glob("*.png"))) == 2


def test_mine_records_bad_images(tmp_path, eight_images, tiny_byol_checkpoint):
    import shutil

    images = tmp_path / "imgs"
    shutil.copytree(eight_images / "images" / "train2017", images)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rc = main(["mine", "--images", str(images), "--checkpoint", str(tiny_byol_checkpoint), "--out",
               str(tmp_path / "m"), "--quiet"])
    assert rc == 0
    rows = {r["file"]: r for r in csv.DictReader(open(tmp_path / "m" / "image_status.csv"))}
    # refused from its header by the pre-scan, before anything is decoded
    assert rows["broken.jpg"]["status"] == "failed" and "cannot read image header" in rows["broken.jpg"]["reason"]
    corr = json.loads((tmp_path / "m" / "correspondence.json").read_text())
    assert "broken.jpg" not in corr["images"]["file_name"] and len(corr["images"]["file_name"]) == 4


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--images", "/no/such/folder", "--out", "{tmp}/x"], "image folder not found"),
    (["pretrain", "--images", "{tmp}/empty", "--out", "{tmp}/x"], "no image files"),
    (["pretrain", "--images", "{tmp}/junk", "--out", "{tmp}/x"], "no readable images"),
    (["mine", "--images", "{tmp}/junk", "--checkpoint", "{tmp}/junk/a.jpg", "--out", "{tmp}/m"],
     "cannot read checkpoint"),
    (["mine", "--images", "{tmp}/junk", "--checkpoint", "{tmp}/nope.pt", "--out", "{tmp}/m"], "checkpoint not found"),
    (["pretrain", "--images", "{tmp}/junk", "--out", "{tmp}/x", "--set", "train.nope=1"], "unknown field 'nope'"),
    (["pretrain", "--images", "{tmp}/junk", "--out", "{tmp}/x", "--set", "model.backbone=vgg"], "valid backbones"),
    (["pretrain", "--images", "{tmp}/junk", "--out", "{tmp}/x", "--threads", "0"], "--threads must be at least 1"),
])
def test_clear_errors(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "junk" / "b.png").write_bytes(b"")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--quiet"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_threads_option_limits_torch_and_blas(tmp_path):
    import torch
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    try:
        assert main(["pretrain", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "x"),
                     "--threads", "1", "--quiet"]) == 2  # the folder is missing; the limit is set first
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info())
    finally:
        from orl.cli import set_threads

        set_threads(before)


def test_bad_option_exits_nonzero():
    r = run("pretrain", "--images", "x", "--out", "y", "--preset", "huge")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_every_command_has_help():
    for cmd in ("pretrain", "mine", "train", "eval", "attention", "render-pairs", "export-pairs",
                "export-backbone"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "--" in r.stdout
