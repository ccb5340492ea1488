"""Backbones by name: torchvision ResNets, random init (no weights are ever downloaded).

ORLModel re-initialises them as the authors do (orl.models.init).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

# name -> (constructor, res5 channels). A plain dict, so the valid names are easy to list.
BACKBONES: dict[str, tuple[Callable[..., torchvision.models.ResNet], int]] = {
    "resnet18": (torchvision.models.resnet18, 512),
    "resnet34": (torchvision.models.resnet34, 512),
    "resnet50": (torchvision.models.resnet50, 2048),
    "resnet101": (torchvision.models.resnet101, 2048),
    "resnet152": (torchvision.models.resnet152, 2048),
    "wide_resnet50_2": (torchvision.models.wide_resnet50_2, 2048),
}


class Backbone(nn.Module):
    """A torchvision ResNet without its classifier.

    ``forward_features`` returns the res5 map (B, C, H/32, W/32); ``forward`` returns the
    globally average-pooled (B, C) vector. Parameters keep torchvision's names under
    ``net.``, so ``export_backbone`` can write weights that torchvision loads directly.
    """

    def __init__(self, name: str):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
        ctor, channels = BACKBONES[name]
        net = ctor(weights=None)
        net.fc = nn.Identity()
        self.net = net
        self.name = name
        self.out_channels = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def build_backbone(name: str) -> Backbone:
    return Backbone(name)
