"""Known-value tests for the BYOL loss, the EMA schedule and update, and the LR schedule."""

import math

import pytest
import torch

from orl.ema import update_target
from orl.losses import byol_loss
from orl.schedules import ema_momentum_at, lr_at, peak_lr


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
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_ema_update_known_value():
    online = [torch.tensor([1.0, 2.0])]
    target = [torch.tensor([3.0, 4.0])]
    update_target(online, target, 0.75)
    assert torch.allclose(target[0], torch.tensor([0.75 * 3 + 0.25 * 1, 0.75 * 4 + 0.25 * 2]))


def test_lr_schedule_known_values():
    assert peak_lr(0.2, 512) == pytest.approx(0.4)  # the authors' 0.4 at batch 512
    peak, total, warm = 0.4, 100, 10
    assert lr_at(0, total, warm, peak) == pytest.approx(0.04)
    assert lr_at(9, total, warm, peak) == pytest.approx(0.4)
    assert lr_at(10, total, warm, peak) == pytest.approx(0.4)
    assert lr_at(55, total, warm, peak) == pytest.approx(0.2)  # half way through the cosine
    assert lr_at(100, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, total, 0, peak) == pytest.approx(0.4)
