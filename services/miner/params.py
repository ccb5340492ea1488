"""A mining job's parameters -> the ``MineConfig`` it runs with, and the keys of its caches.

A job's ``params`` may hold ``checkpoint_id`` (required: an artifacts.id of kind checkpoint),
``preset`` (take the mining options of a named preset instead of the checkpoint's own), any
field of ``orl.config.MineConfig`` (``knn_k``, ``pair_ratio``, ``roi_mode``, ``ss_max_side_px``
...) and ``set`` (``{"mine.knn_k": 5}``); ``services.common.params`` reads them, as the API does
at submission. Everything resolved here is recorded in the job row (``result["plan"]``, a
``services.common.plan.MinePlan``), so a run can be traced back and repeated.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from orl.config import Config, MineConfig
from orl.proposals import proposal_params
from services.common import params as job_params


class MineParamsError(ValueError):
    """The job's params cannot be run; the message says what to change."""


def resolve_config(params: dict[str, Any], checkpoint_cfg: Config) -> Config:
    """The checkpoint's configuration with the job's mining options (``params.preset``'s, then
    the overrides), through the one reading of job params (``services.common.params``)."""
    try:
        return job_params.resolve_config("mine", params, checkpoint_cfg)
    except job_params.ParamsError as exc:
        raise MineParamsError(f"invalid mining parameters: {exc}") from None


def resolve_mine_config(params: dict[str, Any], checkpoint_cfg: Config) -> MineConfig:
    return resolve_config(params, checkpoint_cfg).mine


def _short_hash(obj: Any, n: int) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def params_key(cfg: MineConfig) -> str:
    """proposals.params_key: equal keys mean equal boxes, so proposals are reused across jobs."""
    return _short_hash(proposal_params(cfg), 16)


def roi_key(cfg: MineConfig) -> str:
    """The RoI-feature options: features cached under one key are interchangeable."""
    opts: dict[str, Any] = {"roi_mode": cfg.roi_mode, "roi_size": cfg.roi_size}
    if cfg.roi_mode == "roi_align":
        opts["roi_align_max_side_px"] = cfg.roi_align_max_side_px
        if cfg.decode_draft:  # draft decoding changes the roi_align pass's pixels (crop mode never drafts)
            opts["decode_draft"] = True
    if cfg.roi_dtype != "float32":  # float32 keys stay those of the caches written before the option
        opts["roi_dtype"] = cfg.roi_dtype
    return f"{cfg.roi_mode}-{_short_hash(opts, 10)}"
