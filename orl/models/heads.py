"""BYOL projector and predictor heads."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear(in, hidden, bias) -> BatchNorm1d -> ReLU -> Linear(hidden, out, no bias).

    BYOL: "a linear layer with output size 4096 followed by batch normalization, rectified
    linear units, and a final linear layer with output dimension 256". The authors' code has
    no bias on the last layer and no BN on the output; both projector and predictor use it.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=True),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
