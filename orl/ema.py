"""Exponential moving average update of the target network."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def update_target(online_params: Iterable[torch.Tensor], target_params: Iterable[torch.Tensor],
                  momentum: float) -> None:
    """target <- m * target + (1 - m) * online, parameters only (buffers are not averaged).

    Called after the optimiser step, as in the authors' code.
    """
    online = [p.detach() for p in online_params]
    target = list(target_params)
    if len(online) != len(target):
        raise ValueError("online and target parameter lists differ in length")
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, online, alpha=1.0 - momentum)
