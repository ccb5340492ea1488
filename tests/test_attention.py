"""Attention maps: geometry, determinism, the map computations, overlay and the PNG writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from orl.attention import (
    METHODS,
    attention_map,
    compute_attention,
    contribution_map,
    gradcam_map,
    input_size,
    overlay,
    render_attention,
    similarity_map,
)
from orl.checkpoint import save_checkpoint
from orl.config import get_preset
from orl.images import load_rgb

COCO = str(Path(__file__).resolve().parents[1] / "data" / "sample" / "images" / "train2017")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    from orl.models import build_model

    torch.manual_seed(0)
    return build_model(get_preset("tiny").model, "byol")


def _patch_image(x0: int) -> Image.Image:
    """Flat grey 320x192 image with a 96x96 noise patch whose left edge is at x0."""
    rng = np.random.default_rng(1)
    arr = np.full((192, 320, 3), 128, np.uint8)
    arr[48:144, x0 : x0 + 96] = rng.integers(0, 256, (96, 96, 3))
    return Image.fromarray(arr)


# -- the computations on hand-made feature maps --------------------------------------------
def test_similarity_map_matches_definition_and_finds_odd_cell():
    f = torch.zeros(2, 3, 4)
    f[0] = 1.0  # every cell points along channel 0 ...
    f[:, 2, 1] = torch.tensor([0.0, 1.0])  # ... except (2, 1), which points along channel 1
    s = similarity_map(f)
    assert s.shape == (3, 4)
    assert tuple(np.unravel_index(int(s.argmin()), s.shape)) == (2, 1)
    # Explicit formula for every cell.
    g = f.mean(dim=(1, 2)).numpy()
    for i in range(3):
        for j in range(4):
            v = f[:, i, j].numpy()
            assert s[i, j].item() == pytest.approx(v @ g / np.linalg.norm(v) / np.linalg.norm(g), abs=1e-6)


def test_similarity_map_argmax_is_the_cell_most_like_the_mean():
    # Channels 0 and 1 balance exactly on average, so the one balanced cell is the most typical.
    cells = [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5], [0.1, 0.9]]
    f = torch.tensor(cells).T.reshape(2, 1, 5)
    s = similarity_map(f)
    assert s.shape == (1, 5)
    assert int(s.argmax()) == 3
    assert s[0, 3].item() == pytest.approx(1.0, abs=1e-6)
    assert s[0, 0].item() == pytest.approx(np.sqrt(0.5), abs=1e-6)


def test_contribution_map_sums_to_one_and_weighs_strength():
    f = torch.ones(3, 2, 3)
    f[:, 1, 2] *= 5.0  # same direction, five times stronger
    c = contribution_map(f)
    assert c.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert tuple(np.unravel_index(int(c.argmax()), c.shape)) == (1, 2)
    assert torch.all(contribution_map(torch.zeros(3, 2, 2)) == 0)


def test_gradcam_map_is_relu_of_gradient_weighted_channels():
    a = torch.zeros(2, 2, 2)
    a[0, 0, 0] = 1.0
    a[1, 1, 1] = 1.0
    grad = torch.zeros(2, 2, 2)
    grad[0] = 1.0  # channel 0 raises the score
    grad[1] = -1.0  # channel 1 lowers it
    cam = gradcam_map(a, grad)
    assert cam.tolist() == [[1.0, 0.0], [0.0, 0.0]]


def test_input_size_short_side_cap_and_multiples_of_32():
    assert input_size(640, 480, 448, 1024) == (608, 448)
    w, h = input_size(4000, 500, 448, 1024)  # panorama: long side capped
    assert w == 1024 and h % 32 == 0 and h < 448
    assert input_size(10, 10, 64, 64) == (64, 64)
    for w, h in [(333, 517), (1, 999), (97, 33)]:
        a, b = input_size(w, h, 128, 512)
        assert a % 32 == 0 and b % 32 == 0 and a >= 32 and b >= 32 and max(a, b) <= 512


# -- a real (random) backbone on real and synthetic images -----------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_map_shape_range_and_determinism_on_a_photo(model, method):
    img = load_rgb(f"{COCO}/000000000009.jpg")
    net = model if method == "gradcam" else model.backbone
    model.train()  # the caller's mode must survive
    a = compute_attention(net, img, short_side=128, method=method)
    b = compute_attention(net, img, short_side=128, method=method)
    assert model.training and model.backbone.net.bn1.training and model.projector.training
    assert a.heat.shape == (img.height, img.width)
    assert a.heat.dtype == np.float32
    assert a.heat.min() >= 0.0 and a.heat.max() <= 1.0
    assert a.vmax > a.vmin and a.heat.max() > 0.9 and a.heat.min() < 0.1  # min-max normalised
    assert a.raw.shape == (a.input_size[1] // 32, a.input_size[0] // 32)
    assert min(a.input_size) == 128
    assert np.array_equal(a.heat, b.heat) and a.vmin == b.vmin
    assert np.array_equal(attention_map(net, img, 128, method), a.heat)


def test_gradcam_leaves_no_parameter_gradients(model):
    img = _patch_image(16)
    model.zero_grad(set_to_none=True)
    compute_attention(model, img, short_side=64, method="gradcam")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["similarity", "contribution"])
def test_map_follows_a_distinctive_patch(model, method):
    """No stub: a random ResNet-18 on grey images with a noise patch on the left or right.

    The map must not be constant, and whatever the patch does to it (raise or lower it) must
    move with the patch: the left-minus-right difference flips sign when the patch moves.
    """
    left, right = (slice(48, 144), slice(16, 112)), (slice(48, 144), slice(208, 304))
    hl = attention_map(model.backbone, _patch_image(16), short_side=128, method=method)
    hr = attention_map(model.backbone, _patch_image(208), short_side=128, method=method)
    assert hl.std() > 0.05 and hr.std() > 0.05
    d_l = hl[left].mean() - hl[right].mean()
    d_r = hr[left].mean() - hr[right].mean()
    assert abs(d_l) > 0.01 and abs(d_r) > 0.01
    assert np.sign(d_l) == -np.sign(d_r)
    if method == "contribution":  # the textured patch fires far more than flat grey
        assert d_l > 0.2 and d_r < -0.2
        y, x = np.unravel_index(int(hl.argmax()), hl.shape)
        assert 24 <= y < 168 and x < 136  # the peak is on (or next to) the patch


class _OddCellStub(nn.Module):
    """Feature map of ones with one cell pointing elsewhere at a fixed relative position.

    Only for checking geometry (rows vs columns, upsampling placement); the tests above use
    a real network.
    """

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: tuple[int, ...] | None = None

    def forward_features(self, x):
        self.seen = tuple(x.shape)
        h, w = x.shape[2] // 32, x.shape[3] // 32
        f = torch.zeros(1, 2, h, w)
        f[:, 0] = 1.0
        f[0, :, h - 1, 0] = torch.tensor([0.0, 1.0])  # bottom-left cell is the odd one
        return f + self.w


def test_map_geometry_bottom_left_cell_lands_bottom_left():
    stub = _OddCellStub()
    img = Image.new("RGB", (300, 100), (10, 200, 30))  # wide, so rows/cols cannot be confused
    a = compute_attention(stub, img, short_side=64, method="similarity")
    assert stub.seen == (1, 3, 64, 192)
    assert a.raw.shape == (2, 6)
    y, x = np.unravel_index(int(a.heat.argmin()), a.heat.shape)
    assert y >= 50 and x < 50  # the odd cell covers the bottom-left sixth of the image
    assert a.heat[10, 250] == 1.0  # far from it, full similarity


def test_errors():
    stub = _OddCellStub()
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError) as e:
        attention_map(stub, img, method="saliency")
    for name in METHODS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="ORLModel"):
        attention_map(stub, img, method="gradcam")
    with pytest.raises(ValueError, match="device"):
        attention_map(stub.to("meta"), img, device="cpu")


# -- overlay ----------------------------------------------------------------------------
def test_overlay_opacity_zero_is_the_original_and_one_is_the_colour_map():
    img = load_rgb(f"{COCO}/000000000025.jpg")
    heat = np.linspace(0, 1, img.width, dtype=np.float32)[None].repeat(img.height, 0)
    same = overlay(img, heat, opacity=0.0)
    assert same.mode == "RGB" and np.array_equal(np.asarray(same), np.asarray(img))
    full = np.asarray(overlay(img, heat, opacity=1.0, colormap="jet")).astype(int)
    assert full[:, 0].tolist() == [full[0, 0].tolist()] * img.height  # pure colour, no photo
    assert full[0, 0, 2] > 100 and full[0, 0, 0] < 50  # jet: 0 is blue
    assert full[0, -1, 0] > 100 and full[0, -1, 2] < 50  # jet: 1 is red
    half = np.asarray(overlay(img, heat, opacity=0.5)).astype(int)
    expect = np.round(0.5 * np.asarray(img).astype(float) + 0.5 * full)
    assert np.abs(half - expect).max() <= 1


def test_overlay_rejects_bad_input():
    img = Image.new("RGB", (8, 6))
    with pytest.raises(ValueError, match="shape"):
        overlay(img, np.zeros((8, 6)))
    with pytest.raises(ValueError, match="opacity"):
        overlay(img, np.zeros((6, 8)), opacity=1.5)
    with pytest.raises(ValueError, match="colormap"):
        overlay(img, np.zeros((6, 8)), colormap="no-such-map")


# -- the PNG writer on a saved checkpoint -----------------------------------------------------
@pytest.mark.parametrize("method", ["similarity", "gradcam"])
def test_render_attention_from_a_tiny_checkpoint(tmp_path, model, method):
    cfg = get_preset("tiny")
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint({"stage": "byol", "config": cfg.to_dict(), "model": model.state_dict()}, ckpt)
    src = f"{COCO}/000000000030.jpg"
    out = tmp_path / "sub" / "att.png"
    att = render_attention(ckpt, src, out, opacity=0.6, method=method)
    img = load_rgb(src)
    assert att.heat.shape == (img.height, img.width)
    assert min(att.input_size) == 2 * cfg.augment.image_size  # default: twice training size
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        # 640-px photo: panels at full size, side by side, legend below
        assert png.width >= 2 * img.width and png.height > img.height
        left = np.asarray(png)[: img.height, : img.width]
    # The left panel is the untouched photo (640 px fits the 768-px panel, so no resize).
    assert np.array_equal(left, np.asarray(img))
    with pytest.raises(ValueError, match="similarity"):
        render_attention(ckpt, src, tmp_path / "x.png", method="nope")
