"""Pure schedule functions: learning rate (per epoch, as the authors, or per iteration) and
EMA momentum (per iteration)."""

from __future__ import annotations

import math


def lr_by_epoch_at(epoch: int, step: int, epochs: int, warmup_steps: int, peak_lr: float,
                   warmup_ratio: float = 1e-4) -> float:
    """The authors' schedule: mmcv's ``CosineAnnealing`` (min_lr 0, by epoch) with linear warmup.

    Their configs set ``lr_config = dict(policy='CosineAnnealing', min_lr=0., warmup='linear',
    warmup_iters=4, warmup_ratio=1e-4, warmup_by_epoch=True)`` (mmcv 1.0.3). mmcv's
    LrUpdaterHook then does, as we read it:

    - at the start of each epoch e (0-based, of E), the "regular" lr is set to
      peak * (1 + cos(pi * e / E)) / 2: constant within the epoch, so the last epoch runs at
      peak * (1 - cos(pi / E)) / 2 > 0, and 0 is never reached;
    - warmup is counted in iterations, warmup_iters = warmup_epochs * iterations per epoch;
      at global iteration it (0-based, the iteration about to run) with it < warmup_iters the
      lr is the regular lr times 1 - (1 - it / warmup_iters) * (1 - warmup_ratio): warmup_ratio
      at it = 0, rising linearly towards 1. From it = warmup_iters on it is the regular lr.

    ``step`` is that global iteration index and ``warmup_steps`` is warmup_iters.
    """
    lr = peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))
    if warmup_steps > 0 and step < warmup_steps:
        lr *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return lr


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Per-iteration schedule (``train.lr_by_epoch=False``): linear warmup from peak / warmup_steps
    to ``peak_lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
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
