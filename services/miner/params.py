"""A mining job's parameters -> the ``MineConfig`` it runs with, and the keys of its caches.

A job's ``params`` may hold ``checkpoint_id`` (required: an artifacts.id of kind checkpoint),
``preset`` (take the mining options of a named preset instead of the checkpoint's own), and any
field of ``orl.config.MineConfig`` (``knn_k``, ``pair_ratio``, ``roi_mode``, ``ss_max_side_px``
...). Everything resolved here is recorded in the job row (``result["plan"]``, a
``services.common.plan.MinePlan``), so a run can be traced back and repeated.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from typing import Any

from orl.config import Config, MineConfig, get_preset
from orl.proposals import proposal_params

MINE_FIELDS = tuple(f.name for f in fields(MineConfig))
# Keys of a mine job's params that are not MineConfig fields.
OTHER_KEYS = ("checkpoint_id", "preset")


class MineParamsError(ValueError):
    """The job's params cannot be run; the message says what to change."""


def resolve_mine_config(params: dict[str, Any], checkpoint_cfg: Config) -> MineConfig:
    """Defaults from the checkpoint's preset (or ``params["preset"]``), then the overrides."""
    unknown = sorted(set(params) - set(MINE_FIELDS) - set(OTHER_KEYS))
    if unknown:
        raise MineParamsError(
            f"unknown mining parameter(s) {', '.join(unknown)}; valid: {', '.join(OTHER_KEYS + MINE_FIELDS)}")
    if params.get("preset"):
        try:
            base = get_preset(str(params["preset"])).mine
        except ValueError as exc:
            raise MineParamsError(str(exc)) from None
    else:
        base = checkpoint_cfg.mine
    overrides = {k: v for k, v in params.items() if k in MINE_FIELDS}
    if isinstance(overrides.get("ss_max_side_px"), str):
        # "full" is the documented spelling of the authors' full-resolution path (None).
        raw = overrides["ss_max_side_px"]
        if raw.lower() in ("full", "none"):
            overrides["ss_max_side_px"] = None
        else:
            try:
                overrides["ss_max_side_px"] = int(raw)
            except ValueError:
                raise MineParamsError(f"ss_max_side_px must be a number of pixels or 'full', got {raw!r}") from None
    try:
        cfg = replace(base, **overrides)
        Config(model=checkpoint_cfg.model, mine=cfg).validate()
    except (TypeError, ValueError) as exc:
        raise MineParamsError(f"invalid mining parameters: {exc}") from None
    if cfg.knn_k < 1:
        raise MineParamsError(f"knn_k must be at least 1, got {cfg.knn_k}")
    if cfg.batch_size < 1:
        raise MineParamsError(f"batch_size must be at least 1, got {cfg.batch_size}")
    return cfg


def _short_hash(obj: Any, n: int) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def params_key(cfg: MineConfig) -> str:
    """proposals.params_key: equal keys mean equal boxes, so proposals are reused across jobs."""
    return _short_hash(proposal_params(cfg), 16)


def roi_key(cfg: MineConfig) -> str:
    """The RoI-feature options: features cached under one key are interchangeable."""
    opts = {"roi_mode": cfg.roi_mode, "roi_size": cfg.roi_size}
    if cfg.roi_mode == "roi_align":
        opts["roi_align_max_side_px"] = cfg.roi_align_max_side_px
    return f"{cfg.roi_mode}-{_short_hash(opts, 10)}"
