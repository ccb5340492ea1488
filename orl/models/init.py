"""Weight initialisation, as the authors' code does it for a model trained from scratch.

Their ResNet's ``init_weights`` (no pretrained weights): every convolution
``kaiming_init(mode='fan_in', nonlinearity='relu')`` (mmcv: kaiming *normal*, bias 0), every
BatchNorm weight 1 and bias 0, no zero-init of the last BN in a residual block. Their BYOL and
ORL models call the projector's and each predictor's ``init_weights(init_linear='kaiming')``,
which gives every Linear (and Conv2d) the same kaiming normal fan_in / relu init with bias 0,
and every BatchNorm weight 1, bias 0. The target network is then a copy of the online one.
torchvision's own ResNet init (kaiming normal with fan_out) and torch's Linear default
(kaiming uniform, a = sqrt(5)) are therefore overwritten.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def init_weights(module: nn.Module) -> nn.Module:
    """Initialise ``module`` in place, drawing from torch's global RNG; returns it."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module
