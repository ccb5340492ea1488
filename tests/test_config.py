"""One configuration path: config files, overrides, validation and the default preset rule.

Everything here runs in milliseconds (no training): the CLI's configuration is built from its
real argument parser, and a bad option is checked through ``main`` (exit code 2) before any
image is read.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from orl.cli import _config, build_parser, main
from orl.config import (
    CONFIG_FILE,
    Config,
    ConfigError,
    apply_overrides,
    default_preset,
    get_preset,
    read_config_file,
    save_config,
)

GOOD = """\
# every section, a YAML quirk (1e-4 is a string to PyYAML) and the spelling of None
preset: tiny
model:
  proj_out: 16
augment:
  min_scale: 0.2
train:
  epochs: 3
  base_lr: 1e-4
  amp: no
mine:
  ss_max_side_px: full
  knn_k: 4
  roi_mode: roi_align
"""


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _cli_config(*argv: str, base: Config | None = None) -> Config:
    args = build_parser().parse_args(["pretrain", "--images", "x", "--out", "y", "--device", "cpu", *argv])
    return _config(args, base=base)


# -- files ----------------------------------------------------------------------------------------
def test_a_good_file_gives_the_preset_with_its_values(tmp_path):
    preset, over = read_config_file(_write(tmp_path, GOOD))
    cfg = apply_overrides(get_preset(preset), over)
    tiny = get_preset("tiny")
    assert cfg == dataclasses.replace(
        tiny, model=dataclasses.replace(tiny.model, proj_out=16),
        augment=dataclasses.replace(tiny.augment, min_scale=0.2),
        train=dataclasses.replace(tiny.train, epochs=3, base_lr=1e-4, amp=False),
        mine=dataclasses.replace(tiny.mine, ss_max_side_px=None, knn_k=4, roi_mode="roi_align"))
    # An empty file is no change; a file without preset leaves the choice to the caller.
    assert read_config_file(_write(tmp_path, "", "empty.yaml")) == (None, {})


@pytest.mark.parametrize("text, field, fragment", [
    ("train:\n  epoch: 3\n", "train.epoch", "unknown field 'epoch' in section 'train'; valid: epochs"),
    ("training:\n  epochs: 3\n", "training", "unknown config section 'training'"),
    ("train:\n  epochs: ten\n", "train.epochs", "train.epochs must be an integer, got 'ten'"),
    ("train:\n  amp: 3\n", "train.amp", "train.amp must be true or false"),
    ("mine:\n  roi_mode: 3\n", "mine.roi_mode", "mine.roi_mode must be a string"),
    ("train: 3\n", "train", "train must be a mapping of its fields"),
    ("preset: huge\n", "preset", "unknown preset 'huge'; valid presets: tiny, cpu, paper"),
    ("- train\n", "", "must be a mapping with preset and sections"),
    ("train:\n  epochs: [1\n", "", "is not valid YAML at line"),
])
def test_a_bad_file_names_the_file_and_the_field(tmp_path, text, field, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert err.value.field == field and fragment in str(err.value) and str(path) in str(err.value)


def test_the_saved_config_reads_back_to_the_same_config(tmp_path):
    cfg = apply_overrides(get_preset("cpu"), {"mine.ss_max_side_px": None, "train.w_inter": 0.5})
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / CONFIG_FILE
    assert _cli_config("--config", str(path)) == cfg
    # A checkpoint's config without a named preset still round-trips: every field is written.
    custom = dataclasses.replace(cfg, preset="custom")
    preset, over = read_config_file(save_config(custom, tmp_path / "custom"))
    assert preset is None and apply_overrides(get_preset("paper"), over) == dataclasses.replace(cfg, preset="paper")


# -- overrides --------------------------------------------------------------------------------------
def test_dotted_and_nested_overrides_are_one_reading():
    base = get_preset("tiny")
    dotted = apply_overrides(base, {"train.epochs": "3", "train.base_lr": 1, "mine.ss_max_side_px": "none"})
    nested = apply_overrides(base, {"train": {"epochs": 3, "base_lr": "1.0"}, "mine": {"ss_max_side_px": None}})
    assert dotted == nested
    assert (dotted.train.epochs, dotted.train.base_lr, dotted.mine.ss_max_side_px) == (3, 1.0, None)
    assert isinstance(dotted.train.base_lr, float)  # an int for a float field is stored as a float


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"mine.knn_k": 0}, "mine.knn_k", "at least 1, got 0"),
    ({"mine.pair_ratio": 1.5}, "mine.pair_ratio", "in (0, 1], got 1.5"),
    ({"mine.roi_size": -64}, "mine.roi_size", "at least 32"),
    ({"augment.image_size": -1}, "augment.image_size", "at least 32"),
    ({"train.batch_size": 0}, "train.batch_size", "at least 1"),
    ({"train.base_lr": float("nan")}, "train.base_lr", "must be > 0"),
    ({"mine.embed_crop": 300}, "mine.embed_crop", "must not exceed mine.embed_resize"),
    ({"train.epochs": None}, "train.epochs", "cannot be null; give an integer"),
    ({"mine.knn_k": True}, "mine.knn_k", "must be an integer"),
    ({"mine.ss_max_side_px": "big"}, "mine.ss_max_side_px", "an integer or null"),
    ({"model.backbone": "vgg"}, "model.backbone", "valid backbones: resnet18"),
    ({"augment.backend": "gpu"}, "augment.backend", "must be one of pil, tensor; got 'gpu'"),
    ({"augment.store_size": 16}, "augment.store_size", "at least 32, got 16"),
    ({"preset": "tiny"}, "preset", "unknown config section 'preset'"),
])
def test_bad_overrides_name_the_field(overrides, field, fragment):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_preset("tiny"), overrides)
    assert err.value.field == field and fragment in str(err.value), str(err.value)


def test_the_store_working_size_defaults_to_twice_the_view():
    cfg = get_preset("cpu")
    assert cfg.augment.backend == "pil"  # the PIL pipeline stays the default
    assert cfg.augment.working_size() == 2 * cfg.augment.image_size == 224
    assert apply_overrides(cfg, {"augment.store_size": "300"}).augment.working_size() == 300
    assert apply_overrides(cfg, {"augment.store_size": "none"}).augment.store_size is None


def test_config_override_keeps_its_contract_for_scripts():
    # benchmarks/study builds configs this way: None values are skipped, nothing is validated
    # until .validate().
    cfg = get_preset("tiny").override(**{"train.epochs": 2, "mine.knn_k": None, "train.batch_size": 0})
    assert (cfg.train.epochs, cfg.mine.knn_k, cfg.train.batch_size) == (2, get_preset("tiny").mine.knn_k, 0)
    with pytest.raises(ConfigError, match="train.batch_size"):
        cfg.validate()


def test_default_preset_follows_the_device():
    assert [default_preset(d) for d in ("cuda", "cuda:1", "cpu")] == ["paper", "paper", "cpu"]


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_precedence_preset_file_options_set(tmp_path):
    path = _write(tmp_path, "preset: tiny\ntrain:\n  epochs: 3\n  seed: 5\n  base_lr: 0.3\n")
    cfg = _cli_config("--config", str(path), "--epochs", "4", "--set", "train.epochs=7", "--set", "train.seed=6")
    # the file over its preset, --epochs over the file, --set last
    assert (cfg.preset, cfg.train.epochs, cfg.train.seed, cfg.train.base_lr) == ("tiny", 7, 6, 0.3)
    assert _cli_config("--config", str(path), "--epochs", "4").train.epochs == 4
    # --preset wins over the file's preset; the file's fields still apply on top of it
    cfg = _cli_config("--config", str(path), "--preset", "cpu")
    assert (cfg.preset, cfg.model, cfg.train.epochs) == ("cpu", get_preset("cpu").model, 3)
    # no preset anywhere: the default rule on the run's device (cpu here); a checkpoint's wins
    assert _cli_config().preset == "cpu"
    assert _cli_config(base=get_preset("tiny")) == get_preset("tiny")


@pytest.mark.parametrize("extra, fragment", [
    (["--config", "{tmp}/bad.yaml"], "train.epochs must be an integer, got 'many'"),
    (["--config", "{tmp}/unknown.yaml"], "unknown field 'epoch'"),
    (["--config", "{tmp}/none.yaml"], "cannot read config file"),
    (["--set", "mine.knn_k=0"], "mine.knn_k must be at least 1, got 0"),
    (["--set", "mine.pair_ratio=2"], "mine.pair_ratio must be in (0, 1]"),
    (["--set", "knn_k=3"], "--set expects SECTION.FIELD=VALUE"),
])
def test_cli_refuses_a_bad_file_or_value_with_exit_2(tmp_path, capsys, extra, fragment):
    _write(tmp_path, "train:\n  epochs: many\n", "bad.yaml")
    _write(tmp_path, "train:\n  epoch: 3\n", "unknown.yaml")
    out = tmp_path / "run"
    argv = ["pretrain", "--images", str(tmp_path), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(argv + [a.replace("{tmp}", str(tmp_path)) for a in extra]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
