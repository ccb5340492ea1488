"""The online/target network shared by stage 1 (BYOL) and stage 3 (ORL).

One online backbone + projector and one EMA target serve every branch; each branch
(global, intra, inter) has its own predictor. Stage 1 is the same model with only the
global predictor.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from orl.config import ModelConfig
from orl.losses import byol_loss
from orl.models.backbones import Backbone
from orl.models.heads import MLPHead
from orl.models.init import init_weights

BRANCHES = ("global", "intra", "inter")


class ORLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, branches: tuple[str, ...] = ("global",)):
        super().__init__()
        unknown = set(branches) - set(BRANCHES)
        if unknown:
            raise ValueError(f"unknown branches {sorted(unknown)}; valid: {BRANCHES}")
        self.cfg = cfg
        self.backbone = Backbone(cfg.backbone)
        self.projector = MLPHead(self.backbone.out_channels, cfg.proj_hidden, cfg.proj_out)
        self.predictors = nn.ModuleDict(
            {b: MLPHead(cfg.proj_out, cfg.pred_hidden, cfg.proj_out) for b in branches}
        )
        # The authors' init (kaiming normal fan_in for convolutions and head Linears, BN 1 / 0),
        # then the target starts as an exact copy of the online network.
        init_weights(self)
        # The target is an EMA of backbone + projector parameters. It runs in train mode,
        # like the online net, so it normalises with batch statistics (as the authors do).
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    # -- parameter groups -------------------------------------------------------------
    def online_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters()
        yield from self.projector.parameters()

    def target_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.online_parameters()
        yield from self.predictors.parameters()

    # -- forward pieces ---------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Online projector output (B, proj_out), un-normalised: the stage-2 image embedding."""
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def target_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def forward(self, views: dict[str, tuple[torch.Tensor, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
        """Losses of every branch present in ``views`` ({"global": (v1, v2), "intra": ...}).

        Going through forward (rather than calling branch_loss from outside) is what lets
        DistributedDataParallel see the computation and average the gradients across ranks.
        """
        return {b: self.branch_loss(b, *pair) for b, pair in views.items()
                if pair is not None and b in self.predictors}

    def branch_loss(self, branch: str, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """Symmetric BYOL loss of one branch: L(v1 -> v2) + L(v2 -> v1).

        Each view is its own forward pass, so BatchNorm statistics are per view and never
        mix 224-px global views with 96-px patches.
        """
        pred = self.predictors[branch]
        p1 = pred(self.embed(v1))
        p2 = pred(self.embed(v2))
        z1 = self.target_embed(v1)
        z2 = self.target_embed(v2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)


def build_model(cfg: ModelConfig, stage: str) -> ORLModel:
    if stage == "byol":
        return ORLModel(cfg, ("global",))
    if stage == "orl":
        return ORLModel(cfg, BRANCHES)
    raise ValueError(f"unknown stage {stage!r}; valid: byol, orl")
