"""Attention maps: where in an image a self-supervised backbone's representation comes from.

The ORL paper (Figure 4) shows attention maps of BYOL and ORL backbones but the authors
publish no code for it, so this module picks methods that answer one clear question and
are cheap enough for a web service (one forward pass, or two plus one small backward).

Methods (``METHODS``):

``"similarity"`` (default)
    Cosine similarity between every cell of the res5 feature map and the image's globally
    average-pooled feature. The pooled vector *is* the representation BYOL/ORL train (the
    projector only sees it), so this shows which regions the global representation is made
    of: cells that look like the summary score high, cells the summary ignores score low.
    Cosine (not a dot product) keeps the map about *what* a region encodes, independent of
    how strongly it fires, so one very bright region does not wash out the rest. One forward
    pass, no gradients, no heads needed: works on an exported backbone.

``"contribution"``
    Each cell's share of the pooled feature's squared norm, ``<f_ij, g> / (h w |g|^2)``;
    the shares sum to 1 over the map. Unlike ``similarity`` it weighs by activation strength,
    so it shows which cells dominate the pooled vector. One forward pass.

``"gradcam"``
    Grad-CAM of the BYOL objective. The score is the agreement of the online prediction
    ``q(g(A))`` with the target projection of the same image, ``<q, sg(z / |z|)>``; the map is
    ``ReLU(sum_c w_c A_c)`` with ``w_c`` the spatial mean of ``d score / d A_c``. We use the
    projection of ``q`` on the target direction rather than BYOL's ``2 - 2 cos(q, z)``
    itself because the loss has zero gradient at perfect agreement, where a trained model
    sits, and Grad-CAM would then amplify noise; both are maximised by the same direction
    of ``q``. It needs the projector, predictor and target network, so it takes a full
    ``ORLModel``. The backward pass goes from the score to the res5 map only (not through the
    backbone), so the cost is two forward passes.

All methods run the network in eval mode (BatchNorm running statistics), so the map of an
image does not depend on anything else and two calls give identical results. The caller's
train/eval flags are restored afterwards and no parameter gradient is touched. (Flags are
switched for the duration of a call: a service sharing one model between threads should keep
it in eval mode, which makes the switch a no-op.)

Resolution: a ResNet's res5 map is 1/32 of its input, so a 224-px input gives a 7x7 map. The
image is therefore resized so its shorter side is ``short_side`` (default 2x the training
resolution in ``render_attention``; 448 in ``compute_attention``), with the longer side capped
at ``max_side`` and both sides rounded to multiples of 32 so the grid tiles the image exactly.
The map is upsampled bilinearly to the ORIGINAL image size and min-max normalised to [0, 1];
the raw range is kept in ``Attention.vmin/vmax`` so a UI can label the colour scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from orl.images import load_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

METHODS: dict[str, str] = {
    "similarity": "cosine similarity of each cell to the pooled feature",
    "contribution": "share of each cell in the pooled feature",
    "gradcam": "Grad-CAM of the BYOL prediction-target agreement",
}

DEFAULT_SHORT_SIDE = 448
DEFAULT_MAX_SIDE = 1024
_STRIDE = 32  # res5 stride of every ResNet in orl.models


@dataclass(frozen=True)
class Attention:
    """One attention map and what is needed to label it.

    heat:       (H, W) float32 in [0, 1] at the original image resolution;
                heat = (raw_upsampled - vmin) / (vmax - vmin), all zeros when vmax == vmin.
    raw:        (h, w) float32 raw scores on the res5 grid (h, w = input size / 32).
    vmin, vmax: raw values that 0 and 1 of ``heat`` stand for.
    method:     the method name.
    input_size: (width, height) of the resized image fed to the network.
    """

    heat: np.ndarray
    raw: np.ndarray
    vmin: float
    vmax: float
    method: str
    input_size: tuple[int, int]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown attention method {method!r}; valid methods: {', '.join(METHODS)}")


def input_size(width: int, height: int, short_side: int = DEFAULT_SHORT_SIDE,
               max_side: int = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """Network input (width, height) for an image: shorter side ``short_side``, longer side at
    most ``max_side``, aspect ratio kept up to rounding both sides to multiples of 32 (>= 32)."""
    if short_side < _STRIDE or max_side < _STRIDE:
        raise ValueError(f"short_side and max_side must be >= {_STRIDE}, got {short_side}, {max_side}")
    if width < 1 or height < 1:
        raise ValueError(f"image has zero size: {width}x{height}")
    s = short_side / min(width, height)
    if max(width, height) * s > max_side:
        s = max_side / max(width, height)

    def r(v: float) -> int:
        return max(_STRIDE, int(round(v * s / _STRIDE)) * _STRIDE)

    return r(width), r(height)


def preprocess(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float tensor, resized (bilinear) and ImageNet-normalised."""
    im = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


# -- the maps on a feature grid (pure functions, unit-testable) ------------------------------
def similarity_map(features: torch.Tensor) -> torch.Tensor:
    """(C, h, w) feature map -> (h, w) cosine similarity of each cell to the mean cell.

    A cell of all zeros scores 0.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (C, h, w), got shape {tuple(features.shape)}")
    f = features.float()
    g = f.mean(dim=(1, 2))
    return F.cosine_similarity(f, g[:, None, None], dim=0, eps=1e-8)


def contribution_map(features: torch.Tensor) -> torch.Tensor:
    """(C, h, w) feature map -> (h, w) share of each cell in |g|^2, g the mean cell.

    Since g = mean_ij f_ij, |g|^2 = sum_ij <f_ij, g> / (h w): the shares sum to 1 (all zeros
    when g is zero). Negative shares are cells pointing away from the pooled vector.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (C, h, w), got shape {tuple(features.shape)}")
    f = features.float()
    c, h, w = f.shape
    g = f.mean(dim=(1, 2))
    denom = (g * g).sum() * (h * w)
    if denom <= 0:
        return torch.zeros(h, w)
    return torch.einsum("chw,c->hw", f, g) / denom


def gradcam_map(features: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: (C, h, w) activations and d score / d activations -> (h, w) ReLU map."""
    w = gradients.float().mean(dim=(1, 2))
    return torch.relu(torch.einsum("chw,c->hw", features.float(), w))


# -- running the network -------------------------------------------------------------------
def _parts(net: nn.Module) -> tuple[Any, Any]:
    """(backbone, model or None) from a Backbone-like module or an ORLModel (duck-typed)."""
    if hasattr(net, "forward_features"):
        return net, None
    if hasattr(net, "backbone") and hasattr(net.backbone, "forward_features"):
        return net.backbone, net
    raise TypeError(
        "expected an orl Backbone (with forward_features) or an ORLModel, got "
        f"{type(net).__name__}"
    )


def _same_device(module: nn.Module, device: torch.device) -> bool:
    p = next(module.parameters(), None)
    if p is None:
        return True
    d = p.device
    return d.type == device.type and (device.index is None or d.index == device.index)


class _EvalMode:
    """Put modules in eval mode for a block and restore every submodule's flag after."""

    def __init__(self, *modules: nn.Module):
        self.modules = [m for m in modules if m is not None]
        self.saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> _EvalMode:
        self.saved = [(m, m.training) for root in self.modules for m in root.modules()]
        for root in self.modules:
            root.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.saved:
            m.training = flag


def _raw_map(net: nn.Module, x: torch.Tensor, method: str) -> torch.Tensor:
    backbone, model = _parts(net)
    if method in ("similarity", "contribution"):
        with _EvalMode(backbone), torch.no_grad():
            feats = backbone.forward_features(x)[0]
        return similarity_map(feats) if method == "similarity" else contribution_map(feats)

    # gradcam
    if model is None or not hasattr(model, "predictors") or "global" not in model.predictors:
        raise ValueError(
            "method 'gradcam' needs the full ORLModel (projector, global predictor and target "
            "network); pass the model rather than model.backbone, or use method 'similarity'"
        )
    with _EvalMode(model), torch.no_grad():
        feats = backbone.forward_features(x)
        z = model.target_projector(model.target_backbone(x))
        z = F.normalize(z.float(), dim=-1)
    with _EvalMode(model), torch.enable_grad():
        a = feats.detach().requires_grad_(True)
        q = model.predictors["global"](model.projector(a.mean(dim=(2, 3))))
        score = (q.float() * z).sum()
        (grad,) = torch.autograd.grad(score, a)
    return gradcam_map(a.detach()[0], grad[0])


def compute_attention(
    backbone: nn.Module,
    image: Image.Image,
    short_side: int = DEFAULT_SHORT_SIDE,
    method: str = "similarity",
    device: str | torch.device = "cpu",
    *,
    max_side: int = DEFAULT_MAX_SIDE,
) -> Attention:
    """Attention map of ``image`` with its raw value range; see the module docstring.

    backbone: an orl ``Backbone`` (or anything with ``forward_features(x) -> (B, C, h, w)``),
              or an ``ORLModel`` (required for ``method="gradcam"``). It must already be on
              ``device``; its train/eval flags are left as they were.
    image:    PIL image of any size and mode.
    Raises ValueError for an unknown method or a model on another device.
    """
    _check_method(method)
    device = torch.device(device)
    if not _same_device(backbone, device):
        raise ValueError(f"the model is not on device {device}; move it there first (model.to(device))")
    W, H = image.size
    size = input_size(W, H, short_side, max_side)
    x = preprocess(image, size).to(device)
    raw = _raw_map(backbone, x, method).detach().float().cpu()
    vmin, vmax = float(raw.min()), float(raw.max())
    up = F.interpolate(raw[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    if vmax > vmin:
        heat = ((up - vmin) / (vmax - vmin)).clamp_(0.0, 1.0)
    else:
        heat = torch.zeros(H, W)
    return Attention(
        heat=heat.numpy().astype(np.float32, copy=False),
        raw=raw.numpy().astype(np.float32, copy=False),
        vmin=vmin, vmax=vmax, method=method, input_size=size,
    )


def attention_map(
    backbone: nn.Module,
    image: Image.Image,
    short_side: int = DEFAULT_SHORT_SIDE,
    method: str = "similarity",
    device: str | torch.device = "cpu",
    *,
    max_side: int = DEFAULT_MAX_SIDE,
) -> np.ndarray:
    """(H, W) float32 map in [0, 1] at ``image``'s original resolution (H = image.height).

    The same as ``compute_attention(...).heat``; use ``compute_attention`` to also get the
    raw value range.
    """
    return compute_attention(backbone, image, short_side, method, device, max_side=max_side).heat


# -- drawing ---------------------------------------------------------------------------------
def colormap_lut(colormap: str = "jet") -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap. Unknown name -> ValueError."""
    import matplotlib  # imported here: only drawing needs it, and it is slow to import

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(f"unknown colormap {colormap!r}; see matplotlib.colormaps for valid names") from None
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.5, colormap: str = "jet") -> Image.Image:
    """Blend a colour-mapped heat map over an image: (1 - opacity) * image + opacity * colour.

    image: PIL image (any mode, converted to RGB) of size (W, H).
    heat:  (H, W) values in [0, 1] (clipped); must match the image size.
    opacity 0 returns the image's pixels unchanged; 1 returns the colour map alone.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    rgb = np.asarray(image.convert("RGB"))
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat map shape {heat.shape} does not match image (H, W) {rgb.shape[:2]}")
    if not np.all(np.isfinite(heat)):
        raise ValueError("heat map contains NaN or infinite values")
    lut = colormap_lut(colormap)
    if opacity == 0.0:
        return Image.fromarray(rgb.copy())
    colour = lut[np.round(np.clip(heat, 0.0, 1.0) * 255).astype(np.uint8)]
    out = (1.0 - opacity) * rgb.astype(np.float32) + opacity * colour.astype(np.float32)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def attention_figure(image: Image.Image, att: Attention, opacity: float = 0.5, colormap: str = "jet",
                     max_panel_side: int = 768, title: str | None = None) -> Image.Image:
    """Original | overlay side by side, with a colour bar labelled with the raw value range.

    Panels are downscaled so their longer side is at most ``max_panel_side`` (the map itself
    is computed at full resolution). Returns an RGB image.
    """
    from orl.render import GAP, draw_text, get_font, text_size

    img = image.convert("RGB")
    ov = overlay(img, att.heat, opacity, colormap)
    s = min(1.0, max_panel_side / max(img.size))
    size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    left, right = img.resize(size, Image.Resampling.BILINEAR), ov.resize(size, Image.Resampling.BILINEAR)

    font = get_font(14)
    line_h = text_size(font, "Ag")[1]
    bar_h = 14
    width = max(2 * size[0] + GAP, 320)
    legend_h = GAP + line_h + GAP + bar_h + 4 + line_h + GAP
    out = Image.new("RGB", (width, size[1] + legend_h), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (size[0] + GAP, 0))
    draw = ImageDraw.Draw(out)

    y = size[1] + GAP
    head = title or f"{att.method}: {METHODS[att.method]}"
    draw_text(draw, (GAP, y), head + f"  (input {att.input_size[0]}x{att.input_size[1]})", font)
    y += line_h + GAP
    bar_w = min(width - 2 * GAP, 400)
    lut = colormap_lut(colormap)
    idx = np.round(np.linspace(0, 255, bar_w)).astype(np.int64)
    bar = np.repeat(lut[idx][None], bar_h, axis=0)
    out.paste(Image.fromarray(bar), (GAP, y))
    draw.rectangle([GAP - 1, y - 1, GAP + bar_w, y + bar_h], outline=(60, 60, 60))
    y += bar_h + 4
    lo, hi = _fmt(att.vmin), _fmt(att.vmax)
    draw_text(draw, (GAP, y), lo, font)
    draw_text(draw, (GAP + bar_w - text_size(font, hi)[0], y), hi, font)
    mid = "raw value" if att.vmax > att.vmin else "constant map"
    draw_text(draw, (GAP + (bar_w - text_size(font, mid)[0]) // 2, y), mid, font)
    return out


def render_attention(
    checkpoint_path: str | os.PathLike,
    image_path: str | os.PathLike,
    out_png: str | os.PathLike,
    opacity: float = 0.5,
    device: str | torch.device = "cpu",
    method: str = "similarity",
    *,
    short_side: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    colormap: str = "jet",
) -> Attention:
    """Load a checkpoint and an image, write ``out_png`` (original | overlay + colour bar).

    ``short_side`` defaults to twice the checkpoint's training resolution
    (``Config.augment.image_size``), e.g. 448 for the paper's 224. Returns the ``Attention``
    so a caller can report the value range. Raises CheckpointError, ImageError or ValueError.
    """
    from orl.checkpoint import load_model  # local import: keeps this module light to import

    _check_method(method)
    model, cfg, _ = load_model(checkpoint_path, map_location=device)
    model.to(device)
    image = load_rgb(image_path)
    side = short_side if short_side is not None else 2 * int(cfg.augment.image_size)
    net = model if method == "gradcam" else model.backbone
    att = compute_attention(net, image, side, method, device, max_side=max(max_side, side))
    fig = attention_figure(image, att, opacity, colormap)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out_png, format="PNG")
    return att
