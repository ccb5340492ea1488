"""The same override gives the same Config through the CLI, the trainer's job spec and the
miner's job params: all three go through ``orl.config.apply_overrides`` and ``validate``.

No database: these are the functions the services call with a job's params (the API checks
the same params at submission, tested against the live API in test_api.py).
"""

from __future__ import annotations

import pytest

from orl.cli import _config, _mine_config, build_parser
from orl.config import get_preset
from services.common import params as job_params
from services.miner.params import MineParamsError, resolve_config
from services.trainer.spec import SpecError, build_config


def _cli(command: str, *argv: str, checkpoint=None):
    """The configuration ``orl pretrain`` / ``orl mine`` (with that checkpoint's config) would run."""
    extra = {"pretrain": ["--images", "x", "--out", "y"],
             "mine": ["--images", "x", "--checkpoint", "c", "--out", "y"]}[command]
    args = build_parser().parse_args([command, *extra, "--device", "cpu", *argv])
    return _config(args) if command == "pretrain" else _mine_config(args, checkpoint)


def test_training_overrides_give_one_config_in_the_cli_and_the_trainer():
    cli = _cli("pretrain", "--preset", "tiny", "--epochs", "3", "--set", "augment.image_size=96",
               "--set", "train.base_lr=1", "--set", "train.amp=false")
    nested = build_config({"preset": "tiny", "epochs": 3, "set": {"augment": {"image_size": 96},
                                                                  "train.base_lr": 1, "train.amp": False}},
                          get_preset("cpu"), "pretrain")
    strings = build_config({"preset": "tiny", "epochs": "3", "set": {"augment.image_size": "96",
                                                                     "train.base_lr": "1", "train.amp": "false"}},
                           get_preset("cpu"), "pretrain")
    assert cli == nested == strings


def test_mining_overrides_give_one_config_in_the_cli_and_the_miner():
    checkpoint = get_preset("tiny")
    cli = _cli("mine", "--set", "mine.knn_k=5", "--ss-max-side", "full", "--roi-mode", "roi_align",
               checkpoint=checkpoint)
    miner = resolve_config({"checkpoint_id": 1, "knn_k": 5, "ss_max_side_px": None,
                            "set": {"mine.roi_mode": "roi_align"}}, checkpoint)
    assert cli == miner and (miner.mine.knn_k, miner.mine.ss_max_side_px) == (5, None)
    assert miner.model == checkpoint.model  # the model is the checkpoint's
    # A preset replaces the mining options only, in both.
    assert _cli("mine", "--preset", "cpu", checkpoint=checkpoint) == \
        resolve_config({"preset": "cpu"}, checkpoint)


def test_none_is_settable_where_the_field_allows_it():
    for value in (None, "full", "null"):
        assert resolve_config({"ss_max_side_px": value}, get_preset("tiny")).mine.ss_max_side_px is None
    with pytest.raises(SpecError, match=r"params.epochs: train.epochs cannot be null"):
        build_config({"epochs": None}, get_preset("tiny"))


@pytest.mark.parametrize("params, fragment", [
    ({"knn_k": 0}, "params.knn_k: mine.knn_k must be at least 1, got 0"),
    ({"set": {"mine.pair_ratio": 2}}, "params.set.mine.pair_ratio: mine.pair_ratio must be in (0, 1]"),
    ({"set": {"train.epochs": 3}}, "params.set.train.epochs: a mine job sets mine.* fields only"),
    ({"knn_k": 3, "set": {"mine": {"knn_k": 4}}}, "mine.knn_k is given twice"),
    ({"knn": 3}, "params.knn: unknown mining parameter(s) knn"),
])
def test_the_miner_refuses_what_the_cli_refuses(params, fragment):
    with pytest.raises(MineParamsError) as err:
        resolve_config(params, get_preset("tiny"))
    assert fragment in str(err.value)


def test_options_that_are_not_config_fields():
    for kind, params, field in [("pretrain", {"nproc": 0}, "params.nproc"), ("pretrain", {"max_steps": "3"},
                                "params.max_steps"), ("pretrain", {"device": "tpu"}, "params.device"),
                                ("train", {"init_from": "best"}, "params.init_from"),
                                ("mine", {"checkpoint_id": True}, "params.checkpoint_id")]:
        with pytest.raises(job_params.ParamsError) as err:
            job_params.check_options(kind, params)
        assert err.value.field == field
