"""The authors' weight init: kaiming normal fan_in / relu, BatchNorm 1 / 0, target = online."""

import math

import pytest
import torch
from torch import nn

from orl.config import get_preset
from orl.models import build_model, init_weights


def _model(seed):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny").model, "orl")


def test_conv_and_linear_std_is_kaiming_fan_in():
    model = _model(0)
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in list(model.projector.modules()) + list(model.predictors.modules())
               if isinstance(m, nn.Linear)]
    assert convs and linears
    for m in convs + linears:
        w = m.weight.detach()
        fan_in = w[0].numel()
        # >= 4096 weights per layer in the tiny ResNet-18 and heads: the sample std is within ~1-2%
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05), m
        assert abs(w.mean().item()) < 0.1 * math.sqrt(2.0 / fan_in)
        if m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
    # not torchvision's fan_out: conv1 has fan_in 3*7*7 = 147, fan_out 64*7*7 = 3136
    assert model.backbone.net.conv1.weight.std().item() > 2 * math.sqrt(2.0 / 3136)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_init_is_seeded_and_target_is_a_copy():
    a, b, c = _model(0), _model(0), _model(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.net.conv1.weight"], sc["backbone.net.conv1.weight"])
    for on, tg in zip(a.online_parameters(), a.target_parameters(), strict=True):
        assert torch.equal(on, tg)


def test_init_weights_overwrites_defaults_in_place():
    torch.manual_seed(0)
    lin = nn.Linear(4096, 256)
    assert init_weights(lin) is lin
    assert lin.weight.std().item() == pytest.approx(math.sqrt(2.0 / 4096), rel=0.02)
    assert torch.count_nonzero(lin.bias) == 0
