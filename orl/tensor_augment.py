"""The BYOL views in batches, as tensor operations on the training device ("tensor" backend).

Parameters are drawn per sample, on the CPU, from the distributions of the PIL pipeline
(:func:`orl.augment.byol_pipeline`, the reference), then applied to the whole batch:

* crops: the random resized crop (torchvision's rule: 10 tries of area U(min_scale, 1) and
  log-aspect U(ln 3/4, ln 4/3), integer size and corner in ORIGINAL pixels, then the centre
  fallback) and the stage-3 box crops, scaled into the store's pixels and cut by
  ``torchvision.ops.roi_align`` (bilinear, ``aligned=True``: pixel centres as PIL's resize;
  adaptive sampling grid, so a shrinking crop averages its pixels as PIL's antialiased resize
  does, with a box rather than PIL's wider triangle);
* horizontal flip (p 0.5);
* colour jitter (p 0.8): brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 in a random
  order per sample, with the semantics of torchvision's ColorJitter on tensors (blends clamped
  to [0, 1] after each operation; hue through HSV);
* grayscale (p 0.2, torchvision's weights);
* Gaussian blur as PIL's ``GaussianBlur(radius=sigma)`` computes it, sigma ~ U(0.1, 2): three
  box blurs per direction of the same fractional radius, edges replicated (PIL rounds to 8
  bits after each pass; we do not);
* solarise (pixels at or above 128 / 255 inverted);
* normalisation with the ImageNet mean and std.

PIL rounds to 8 bits after every operation and quantises hue to 8 bits; these ops keep floats.
tests/test_tensor_augment.py pins the parameter distributions to the PIL pipeline's and the
images to PIL's within a stated tolerance. Every mask becomes an index list on the CPU before
it reaches the device, so a CUDA step never waits on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from orl.augment import (
    BLUR_SIGMA,
    CROP_RATIO,
    FLIP_P,
    GRAY_P,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    JITTER_P,
    SOLARIZE_THRESHOLD,
    VIEW_PROBS,
)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale on tensors
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's operation numbers


@dataclass(frozen=True)
class ViewParams:
    """Per-sample parameters of n views of one pipeline (CPU tensors, first dimension n).

    ``order[k]`` is sample k's permutation of the four jitter operations (0 brightness,
    1 contrast, 2 saturation, 3 hue, as ColorJitter numbers them); ``factors[k]`` their
    factors in that numbering. Flags say whether each random transform is applied.
    """

    flip: torch.Tensor  # (n,) bool
    jitter: torch.Tensor  # (n,) bool
    order: torch.Tensor  # (n, 4) int64
    factors: torch.Tensor  # (n, 4) float64: brightness, contrast, saturation, hue
    gray: torch.Tensor  # (n,) bool
    blur: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,) float64, where blur
    solarize: torch.Tensor  # (n,) bool

    def __len__(self) -> int:
        return len(self.flip)

    def row(self, k: int) -> ViewParams:
        return ViewParams(*(getattr(self, f)[k : k + 1] for f in self.__dataclass_fields__))

    @staticmethod
    def cat(parts: list[ViewParams]) -> ViewParams:
        return ViewParams(*(torch.cat([getattr(p, f) for p in parts]) for f in ViewParams.__dataclass_fields__))


def _uniform(n: int | tuple[int, ...], low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def draw_view_params(n: int, view: int, g: torch.Generator) -> ViewParams:
    """n samples of the view-``view`` pipeline's parameters (the PIL pipeline's distributions)."""
    if view not in VIEW_PROBS:
        raise ValueError("view must be 1 or 2")
    blur_p, solarize_p = VIEW_PROBS[view]
    b, c, s, h = JITTER
    return ViewParams(
        flip=torch.rand(n, generator=g) < FLIP_P,
        # RandomApply applies when p >= u, u ~ U[0, 1): probability p.
        jitter=torch.rand(n, generator=g) <= JITTER_P,
        order=torch.argsort(torch.rand(n, 4, generator=g), dim=1),  # a uniform random permutation
        factors=torch.stack([_uniform(n, 1 - b, 1 + b, g), _uniform(n, 1 - c, 1 + c, g),
                             _uniform(n, 1 - s, 1 + s, g), _uniform(n, -h, h, g)], dim=1),
        gray=torch.rand(n, generator=g) < GRAY_P,
        blur=torch.rand(n, generator=g) <= blur_p,
        sigma=_uniform(n, BLUR_SIGMA[0], BLUR_SIGMA[1], g),
        solarize=torch.rand(n, generator=g) < solarize_p,
    )


def draw_crops(wh: np.ndarray, min_scale: float, g: torch.Generator,
               ratio: tuple[float, float] = CROP_RATIO, tries: int = 10) -> np.ndarray:
    """Random resized crops of images of sizes ``wh`` (n, 2): (n, 4) xyxy in those pixels.

    torchvision's RandomResizedCrop.get_params, vectorised: up to ``tries`` draws of area
    fraction U(min_scale, 1) and log-aspect U(ln r0, ln r1); the first whose rounded size fits
    is placed at a uniform integer corner; when none fits, the largest centred crop within
    the aspect range.
    """
    wh = np.asarray(wh, dtype=np.int64).reshape(-1, 2)
    n = len(wh)
    W, H = wh[:, 0:1].astype(np.float64), wh[:, 1:2].astype(np.float64)
    target = W * H * _uniform((n, tries), min_scale, 1.0, g).numpy()
    aspect = np.exp(_uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), g).numpy())
    w = np.round(np.sqrt(target * aspect))  # half to even, as Python's round
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    W1, H1 = W[:, 0], H[:, 0]
    u = torch.rand(n, 2, generator=g, dtype=torch.float64).numpy()
    top = np.floor(u[:, 0] * (H1 - ch + 1))
    left = np.floor(u[:, 1] * (W1 - cw + 1))
    # The fallback, where no try fitted.
    none = ~ok.any(axis=1)
    if none.any():
        in_ratio = W1 / H1
        fw = np.where(in_ratio < ratio[0], W1, np.where(in_ratio > ratio[1], np.round(H1 * ratio[1]), W1))
        fh = np.where(in_ratio < ratio[0], np.round(W1 / ratio[0]), H1)
        cw, ch = np.where(none, fw, cw), np.where(none, fh, ch)
        top = np.where(none, (H1 - ch) // 2, top)
        left = np.where(none, (W1 - cw) // 2, left)
    return np.stack([left, top, left + cw, top + ch], axis=1)


# -- the reference: the PIL pipeline with given parameters ---------------------------------------
def pil_view(img: Image.Image, p: ViewParams, size: int, box: tuple[float, float, float, float] | None = None
             ) -> torch.Tensor:
    """One view as the PIL pipeline makes it, with the parameters of ``p`` (one row).

    ``box``: the crop (xyxy, integer, as drawn by :func:`draw_crops`), resized to size x size
    as RandomResizedCrop does; None for a patch (already cut and warped). The same
    torchvision functions the pipeline's transforms call, in the same order.
    """
    if len(p) != 1:
        raise ValueError("pil_view takes the parameters of one view")
    if box is not None:
        x1, y1, x2, y2 = (int(v) for v in box)
        img = TF.resized_crop(img, y1, x1, y2 - y1, x2 - x1, [size, size], InterpolationMode.BILINEAR)
    if bool(p.flip[0]):
        img = TF.hflip(img)
    if bool(p.jitter[0]):
        f = [float(v) for v in p.factors[0]]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in p.order[0].tolist():
            img = ops[op](img, f[op])
    if bool(p.gray[0]):
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if bool(p.blur[0]):
        img = img.filter(ImageFilter.GaussianBlur(radius=float(p.sigma[0])))
    if bool(p.solarize[0]):
        img = TF.solarize(img, SOLARIZE_THRESHOLD)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


# -- batched operations ---------------------------------------------------------------------------
def cut(canvas: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(K, 3, size, size) crops of ``canvas`` (U, 3, H, W) float: ``boxes`` (K, 5) rows of
    (canvas index, x1, y1, x2, y2) in canvas pixels, resized bilinearly as PIL's resize places
    its samples (pixel centres), one ``roi_align`` call for all of them."""
    return roi_align(canvas, boxes.to(canvas.dtype), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (n, 3, H, W) by ``shift`` (n,) turns, through HSV as torchvision does."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0)
    # hsv -> rgb: channel n (5 red, 3 green, 1 blue) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    v, s = maxc.unsqueeze(1), s.unsqueeze(1)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    if op == BRIGHTNESS:
        return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)
    if op == CONTRAST:
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == SATURATION:
        return _blend(x, _gray(x), f)
    return _hue(x, f)


def blur_radius(sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """The fractional box radius whose ``passes`` box blurs have variance sigma^2 (PIL's rule
    for ``GaussianBlur(radius=sigma)``)."""
    s2 = sigma.double() ** 2 / passes
    length = torch.sqrt(12 * s2 + 1)
    whole = torch.floor((length - 1) / 2)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2) / (6 * (s2 - (whole + 1) ** 2))
    return whole + frac


def box_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """(n, 2m + 1) box kernels of PIL's per-pass radius for each sigma: weight 1 / (2r + 1)
    within the integer radius l, (r - l) / (2r + 1) at distance l + 1, 0 beyond."""
    r = blur_radius(sigma)
    whole = torch.floor(r)
    m = int(whole.max().item()) + 1 if len(r) else 1
    k = torch.arange(-m, m + 1, dtype=torch.float64).abs().view(1, -1)
    w = torch.where(k <= whole.view(-1, 1), torch.ones_like(k),
                    torch.where(k == whole.view(-1, 1) + 1, (r - whole).view(-1, 1), torch.zeros_like(k)))
    return w / (2 * r + 1).view(-1, 1)


def _box_passes(x: torch.Tensor, kern: torch.Tensor, dim: int, passes: int = 3) -> torch.Tensor:
    """``passes`` box blurs of x (n, 3, H, W) along ``dim`` (-1 or -2), per-sample kernels (n, 2m + 1),
    edges replicated before each pass as PIL does. Shifted slices weighted and summed: on the CPU
    twice as fast as a grouped convolution with these few taps."""
    n, size = x.shape[0], x.shape[dim]
    m = (kern.shape[1] - 1) // 2
    w = kern.view(n, 1, 1, 1, -1)
    pad = (m, m, 0, 0) if dim == -1 else (0, 0, m, m)
    for _ in range(passes):
        xp = F.pad(x, pad, mode="replicate")
        out = xp.narrow(dim, 0, size) * w[..., 0]
        for t in range(1, 2 * m + 1):
            out.addcmul_(xp.narrow(dim, t, size), w[..., t])
        x = out
    return x


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """PIL's GaussianBlur(radius=sigma) of each image: three box passes along x, then three along y."""
    kern = box_kernels(sigma).to(device=x.device, dtype=x.dtype, non_blocking=True)
    return _box_passes(_box_passes(x, kern, -1), kern, -2)


def _where(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.nonzero(mask, as_tuple=False).flatten().to(device, non_blocking=True)


def _apply(x: torch.Tensor, idx: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    if len(idx):
        x[idx] = fn(x[idx])


def augment(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Flip, colour jitter, grayscale, blur, solarise and normalise (n, 3, S, S) images in
    [0, 1] with the per-sample parameters ``p`` (on the CPU); returns a new tensor."""
    if len(p) != len(x):
        raise ValueError(f"{len(p)} parameter rows for {len(x)} images")
    dev = x.device
    x = torch.where(p.flip.to(dev, non_blocking=True).view(-1, 1, 1, 1), x.flip(-1), x)
    factors = p.factors.to(device=dev, dtype=x.dtype, non_blocking=True)
    for stage in range(4):  # each sample's stage-th operation, one operation at a time
        for op in range(4):
            sel = torch.nonzero(p.jitter & (p.order[:, stage] == op), as_tuple=False).flatten()
            if len(sel):
                idx = sel.to(dev, non_blocking=True)
                x[idx] = _jitter_op(x[idx], op, factors[idx, op])
    _apply(x, _where(p.gray, dev), lambda y: _gray(y).expand(-1, 3, -1, -1))
    sel = torch.nonzero(p.blur, as_tuple=False).flatten()
    if len(sel):
        idx = sel.to(dev, non_blocking=True)
        x[idx] = _blur(x[idx], p.sigma[sel])
    sol = p.solarize.to(dev, non_blocking=True).view(-1, 1, 1, 1) & (x >= SOLARIZE_THRESHOLD / 255)
    x = torch.where(sol, 1 - x, x)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=dev).view(1, 3, 1, 1)
    return (x - mean) / std
