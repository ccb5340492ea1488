"""Known-value tests for the BYOL loss, the EMA schedule and update, and the LR schedules."""

import itertools
import math

import pytest
import torch

from orl.ema import update_target
from orl.losses import byol_loss
from orl.schedules import ema_momentum_at, lr_at, lr_by_epoch_at, peak_lr


def test_loss_known_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert byol_loss(p, p * 3).item() == pytest.approx(0.0, abs=1e-6)  # same direction
    assert byol_loss(p, -p).item() == pytest.approx(4.0)  # opposite
    z = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    # rows: cos = 0 -> 2; cos = 1/sqrt(2) -> 2 - sqrt(2); mean
    assert byol_loss(p, z).item() == pytest.approx((2 + 2 - math.sqrt(2)) / 2, rel=1e-5)


def test_loss_gradient_only_through_prediction():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


def test_ema_momentum_schedule():
    assert ema_momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert ema_momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert ema_momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    vals = [ema_momentum_at(k, 100) for k in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(vals))


def test_ema_update_known_value():
    online = [torch.tensor([1.0, 2.0])]
    target = [torch.tensor([3.0, 4.0])]
    update_target(online, target, 0.75)
    assert torch.allclose(target[0], torch.tensor([0.75 * 3 + 0.25 * 1, 0.75 * 4 + 0.25 * 2]))


def test_per_step_lr_schedule_known_values():
    """train.lr_by_epoch=False: per-iteration warmup and cosine."""
    assert peak_lr(0.2, 512) == pytest.approx(0.4)  # the authors' 0.4 at batch 512
    peak, total, warm = 0.4, 100, 10
    assert lr_at(0, total, warm, peak) == pytest.approx(0.04)
    assert lr_at(9, total, warm, peak) == pytest.approx(0.4)
    assert lr_at(10, total, warm, peak) == pytest.approx(0.4)
    assert lr_at(55, total, warm, peak) == pytest.approx(0.2)  # half way through the cosine
    assert lr_at(100, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, total, 0, peak) == pytest.approx(0.4)


def test_authors_lr_schedule_known_values():
    """mmcv CosineAnnealing by epoch (min_lr 0) with linear warmup by iteration from 1e-4."""
    peak, E = 0.4, 10
    W = 2 * 5  # warmup_epochs 2 x 5 steps per epoch = 10 iterations

    def lr(e, it):
        return lr_by_epoch_at(e, it, E, W, peak, 1e-4)

    assert lr(0, 0) == pytest.approx(0.4 * 1e-4)  # warmup starts at warmup_ratio x peak
    # epoch 1, iteration 5: half way through the warmup, on epoch 1's cosine value
    # 0.4 * (1 + cos(pi / 10)) / 2 = 0.4 * 0.97552826 = 0.39021130; factor 1 - 0.5 * 0.9999
    assert lr(1, 5) == pytest.approx(0.39021130 * 0.50005, rel=1e-7)
    assert lr(1, 9) == pytest.approx(0.39021130 * (1 - 0.1 * 0.9999), rel=1e-7)
    assert lr(2, 10) == pytest.approx(0.4 * 0.90450850, rel=1e-7)  # warmup over: (1 + cos(pi/5))/2
    assert lr(5, 25) == pytest.approx(0.2)  # half way: cos(pi / 2) = 0
    assert lr(7, 35) == lr(7, 39)  # constant within an epoch
    assert lr(9, 49) == pytest.approx(0.4 * 0.02447174, rel=1e-6)  # the last epoch is not 0
    assert lr(10, 50) == pytest.approx(0.0, abs=1e-12)
    vals = [lr(e, e * 5 + k) for e in range(2, E) for k in range(5)]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    assert lr_by_epoch_at(0, 0, E, 0, peak) == pytest.approx(0.4)  # no warmup
    assert lr_by_epoch_at(0, 0, E, W, peak, warmup_ratio=0.5) == pytest.approx(0.2)
