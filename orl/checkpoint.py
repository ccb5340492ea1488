"""Checkpoints: everything a resume or an evaluation needs, and backbone-only export.

A checkpoint is a dict with: ``format`` (version tag), ``stage`` ("byol" | "orl"),
``config`` (Config.to_dict()), ``model`` (state dict of ORLModel, online + target + predictors),
``optimizer``, ``position`` ({epoch, step_in_epoch, global_step, total_steps}),
``rng`` (python, numpy, torch and cuda states) and ``metrics`` (last logged values).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from orl.config import Config
from orl.fileio import atomic_path
from orl.models import ORLModel, build_model

FORMAT = "orl-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not an ORL checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically (temp file + rename), so a kill mid-write never corrupts last.pt."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ORL checkpoint (expected format {FORMAT})")
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu",
               ) -> tuple[ORLModel, Config, dict[str, Any]]:
    """Rebuild the exact model a checkpoint was trained with. Returns (model, config, ckpt)."""
    ckpt = load_checkpoint(path, map_location)
    cfg = Config.from_dict(ckpt["config"])
    model = build_model(cfg.model, ckpt["stage"])
    model.load_state_dict(ckpt["model"])
    return model, cfg, ckpt


def export_backbone(path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write the online backbone as a torchvision ResNet state dict (no ``fc``).

    ``torchvision.models.resnet50().load_state_dict(torch.load(out), strict=False)`` loads it;
    only ``fc.weight`` / ``fc.bias`` are reported missing.
    """
    ckpt = load_checkpoint(path)
    prefix = "backbone.net."
    sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    torch.save(sd, out)
