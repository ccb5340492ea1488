"""Pure schedule functions: learning rate and EMA momentum, both per iteration."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup from ~0 to ``peak_lr`` over ``warmup_steps``, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum_at(step: int, total_steps: int, base: float = 0.99) -> float:
    """m = 1 - (1 - base) * (cos(pi * k / K) + 1) / 2: ``base`` at k = 0, 1 at k = K."""
    k = min(step, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(1, total_steps)) + 1.0) / 2.0


def peak_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule used by the authors: base_lr x batch / 256."""
    return base_lr * batch_size / 256.0
