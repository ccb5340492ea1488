"""The tensor backend pinned to the PIL pipeline, the reference.

1. ``pil_view`` with parameters replayed from torch's RNG in the order torchvision's transforms
   draw them is the PIL pipeline, bit for bit: so "the PIL pipeline's parameters" are known.
2. The tensor backend draws the same distributions (two-sample tests, fixed seeds).
3. Its batched operations are torchvision's tensor functions, per sample (to float rounding),
   and its blur is PIL's GaussianBlur (to PIL's 8-bit rounding).
4. Given one batch plan, the views of both backends agree within the stated tolerance, and so
   do the losses of one network on them.

Tolerance (views, on the 0-255 scale, after undoing the normalisation): mean absolute
difference at most 12 per view and at most 3 over all views. Measured on the sample photos:
about 2 on average, at most about 10 for one view. The difference comes from PIL rounding to 8
bits after each operation (its HSV round trip alone moves pixels by up to about 7), from
roi_align's box averaging where PIL's antialiased resize uses a wider triangle, and from the
store's photos being resampled once to the working size.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torchvision.transforms import functional as TF

from orl.augment import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, VIEW_PROBS, byol_pipeline, crop_patch
from orl.batch_data import StoreData, batch_seed, store_data
from orl.config import get_preset
from orl.images import list_images, load_rgb
from orl.models import build_model
from orl.tensor_augment import (
    ViewParams,
    _blur,
    augment,
    draw_crops,
    draw_view_params,
    pil_view,
)
from tests.test_train import _toy_corr

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _pixels(x):
    """Normalised views -> the 0-255 scale."""
    return (x * STD + MEAN) * 255


# -- 1. the reference ------------------------------------------------------------------------------
def replay(wh, view, min_scale=0.08, crop=True):
    """(crop box or None, ViewParams) drawn from torch's global RNG exactly as byol_pipeline's
    transforms draw them, in their order (torchvision 0.29: RandomResizedCrop.get_params,
    RandomHorizontalFlip, RandomApply(ColorJitter) then ColorJitter.get_params, RandomGrayscale,
    RandomApply(blur) then the sigma, RandomSolarize)."""
    box = None
    if crop:
        W, H = wh
        log_ratio = torch.log(torch.tensor(CROP_RATIO))
        for _ in range(10):
            target = W * H * torch.empty(1).uniform_(min_scale, 1.0).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= W and 0 < h <= H:
                i = torch.randint(0, H - h + 1, size=(1,)).item()
                j = torch.randint(0, W - w + 1, size=(1,)).item()
                box = (j, i, j + w, i + h)
                break
        else:
            ratio = W / H
            if ratio < CROP_RATIO[0]:
                w, h = W, int(round(W / CROP_RATIO[0]))
            elif ratio > CROP_RATIO[1]:
                w, h = int(round(H * CROP_RATIO[1])), H
            else:
                w, h = W, H
            box = ((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)
    flip = bool(torch.rand(1) < 0.5)
    jitter = not bool(0.8 < torch.rand(1))
    order, factors = torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    if jitter:
        order = torch.randperm(4)
        factors = torch.tensor([torch.empty(1).uniform_(lo, hi).item() for lo, hi in
                                ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))], dtype=torch.float64)
    gray = bool(torch.rand(1) < 0.2)
    blur_p, solarize_p = VIEW_PROBS[view]
    blur = not bool(blur_p < torch.rand(1))
    sigma = torch.empty(1).uniform_(0.1, 2.0).item() if blur else 1.0
    solarize = torch.rand(1).item() < solarize_p
    p = ViewParams(torch.tensor([flip]), torch.tensor([jitter]), order.view(1, 4), factors.view(1, 4),
                   torch.tensor([gray]), torch.tensor([blur]), torch.tensor([sigma], dtype=torch.float64),
                   torch.tensor([solarize]))
    return box, p


def test_pil_view_with_the_replayed_draws_is_the_pil_pipeline(sample_images):
    img = load_rgb(sorted(sample_images.rglob("*.jpg"))[0])
    patch = crop_patch(img, np.array([30.0, 40.0, 250.0, 200.0]), 32)
    for view in (1, 2):
        for seed in range(8):
            torch.manual_seed(seed)
            ref = byol_pipeline(view, 64)(img)
            torch.manual_seed(seed)
            box, p = replay(img.size, view)
            assert torch.equal(pil_view(img, p, 64, box), ref), (view, seed)
            torch.manual_seed(seed)
            ref = byol_pipeline(view, 32, random_crop=False)(patch)
            torch.manual_seed(seed)
            _, p = replay(patch.size, view, crop=False)
            assert torch.equal(pil_view(patch, p, 32), ref), (view, seed)


# -- 2. the distributions --------------------------------------------------------------------------
def _crop_stats(boxes, W, H):
    b = np.asarray(boxes, dtype=np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return {"area": w * h / (W * H), "log_aspect": np.log(w / h), "cx": (b[:, 0] + w / 2) / W,
            "cy": (b[:, 1] + h / 2) / H}


def _same(a, b, what):
    p = stats.ks_2samp(a, b).pvalue
    assert p > 1e-3, f"{what}: two-sample KS p = {p:.2g}"


def _same_rate(a, b, what):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    table = [[a.sum(), (~a).sum()], [b.sum(), (~b).sum()]]
    if min(a.mean(), b.mean()) in (0.0, 1.0):
        assert a.mean() == b.mean(), what
        return
    p = stats.chi2_contingency(table).pvalue
    assert p > 1e-3, f"{what}: rates {a.mean():.3f} vs {b.mean():.3f}, p = {p:.2g}"


def test_both_backends_draw_the_same_distributions():
    n = 2000
    g = torch.Generator().manual_seed(1)
    # A photo, and a narrow strip on which the centre fallback of the crop happens (about 5%).
    for W, H in ((640, 480), (500, 120)):
        torch.manual_seed(0)
        ref = [replay((W, H), 2)[0] for _ in range(n)]
        ours = draw_crops(np.tile([W, H], (n, 1)), 0.08, g)
        a, b = _crop_stats(ref, W, H), _crop_stats(ours, W, H)
        for key in a:
            _same(a[key], b[key], f"crop {key} on {W} x {H}")
        assert np.all(ours[:, :2] >= 0) and np.all(ours[:, 2] <= W) and np.all(ours[:, 3] <= H)
        assert np.array_equal(ours, np.round(ours))  # integer boxes, as torchvision's
        # The test can tell: crops with a smaller scale range are told apart.
        assert stats.ks_2samp(a["area"], _crop_stats(draw_crops(np.tile([W, H], (n, 1)), 0.2, g), W, H)["area"]
                              ).pvalue < 1e-6
    for view in (1, 2):
        torch.manual_seed(view)
        ref = ViewParams.cat([replay((64, 64), view, crop=False)[1] for _ in range(n)])
        ours = draw_view_params(n, view, g)
        for flag in ("flip", "jitter", "gray", "blur", "solarize"):
            _same_rate(getattr(ref, flag), getattr(ours, flag), f"view {view} {flag}")
        expected = {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": VIEW_PROBS[view][0],
                    "solarize": VIEW_PROBS[view][1]}
        for flag, rate in expected.items():
            assert abs(float(getattr(ours, flag).double().mean()) - rate) < 0.03, (view, flag)
        for k, name in enumerate(("brightness", "contrast", "saturation", "hue")):
            _same(ref.factors[ref.jitter, k], ours.factors[ours.jitter, k], f"view {view} {name}")
        _same(ref.sigma[ref.blur], ours.sigma[ours.blur], f"view {view} blur sigma")
        for stage in range(4):  # which operation comes at each place of the order
            table = [np.bincount(o[j, stage].numpy(), minlength=4) for o, j in ((ref.order, ref.jitter),
                                                                                 (ours.order, ours.jitter))]
            assert stats.chi2_contingency(table).pvalue > 1e-3, (view, stage)


# -- 3. the operations -----------------------------------------------------------------------------
def _patches(sample_images, n=6, size=40):
    ims = [load_rgb(p).resize((size, size), Image.Resampling.BILINEAR) for p in sorted(sample_images.rglob("*.jpg"))]
    return torch.stack([TF.to_tensor(im) for im in ims[:n]])


def test_batched_operations_are_torchvisions_per_sample(sample_images):
    x = _patches(sample_images)
    n = len(x)
    p = draw_view_params(n, 2, torch.Generator().manual_seed(3))
    on, off = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    alt = torch.arange(n) % 2 == 0
    p = ViewParams(alt, on, p.order, p.factors, off, off, p.sigma, off)
    got = augment(x.clone(), p)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for k in range(n):
        y = TF.hflip(x[k]) if bool(p.flip[k]) else x[k]
        for op in p.order[k].tolist():
            y = ops[op](y, float(p.factors[k, op]))
        assert torch.allclose(got[k], TF.normalize(y, IMAGENET_MEAN, IMAGENET_STD), atol=1e-4), k
    # grayscale and solarise
    p = ViewParams(off, off, p.order, p.factors, alt, off, p.sigma, ~alt)
    got = augment(x.clone(), p)
    for k in range(n):
        y = TF.rgb_to_grayscale(x[k], 3) if bool(alt[k]) else torch.where(x[k] >= 128 / 255, 1 - x[k], x[k])
        assert torch.allclose(got[k], TF.normalize(y, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5), k


def test_blur_is_pils_gaussian_blur(sample_images):
    # An impulse: the kernel itself, to PIL's 8-bit rounding, for sigma across U(0.1, 2).
    sigmas = torch.tensor([0.1, 0.5, 1.0, 1.37, 2.0], dtype=torch.float64)
    a = np.zeros((31, 31, 3), np.uint8)
    a[15, 15] = 255
    ours = _blur(torch.from_numpy(a).permute(2, 0, 1).float().expand(len(sigmas), -1, -1, -1).contiguous(), sigmas)
    for k, s in enumerate(sigmas.tolist()):
        ref = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=s))).astype(float)
        assert np.abs(ours[k].permute(1, 2, 0).numpy() - ref).max() <= 2.0, s
        assert ours[k].sum().item() == pytest.approx(3 * 255, rel=1e-4)  # nothing lost at the cut-off
    # Real photos, edges included (replicated, as PIL's passes do).
    x = _patches(sample_images, size=64)
    sig = torch.linspace(0.1, 2.0, len(x), dtype=torch.float64)
    ours = _blur(x * 255, sig)
    for k in range(len(x)):
        im = TF.to_pil_image(x[k])
        ref = torch.from_numpy(np.array(im.filter(ImageFilter.GaussianBlur(float(sig[k]))))).permute(2, 0, 1)
        d = (ours[k] - ref.float()).abs()
        assert d.mean() < 1.0 and d.max() <= 3.0, (float(sig[k]), d.mean(), d.max())


# -- 4. views and losses of one plan -------------------------------------------------------------
def _pil_render(data: StoreData, plan):
    """The PIL pipeline's views of a plan: global crops of the original photos, patches cut from
    them by crop_patch, the same parameters."""
    a = data.aug
    photos = {}

    def photo(i):
        if i not in photos:
            photos[i] = load_rgb(data.paths[i])
        return photos[i]

    out = {"global": tuple(torch.stack([pil_view(photo(i), plan.views[v].row(k), a.image_size, tuple(plan.crops[v][k]))
                                        for k, i in enumerate(plan.images)]) for v in (0, 1))}
    if data.stage == "orl":
        pairs = plan.pairs["intra"] + plan.pairs["inter"]
        views = [torch.stack([pil_view(crop_patch(photo(c[0]), c[1], a.patch_size), plan.patch_views[v].row(k),
                                       a.patch_size) for k, c in enumerate(pr[v] for pr in pairs)]) if pairs else None
                 for v in (0, 1)]
        ni = len(plan.pairs["intra"])
        out["intra"] = (views[0][:ni], views[1][:ni]) if ni else None
        out["inter"] = (views[0][ni:], views[1][ni:]) if len(pairs) > ni else None
    return out


def _data(stage, root, files, tmp_path):
    cfg = get_preset("tiny")
    data = store_data(stage, root, cfg.augment, cfg.train, files=files,
                      corr=_toy_corr(files) if stage == "orl" else None, store_root=tmp_path / "store")
    data.prepare(torch.device("cpu"))
    return cfg, data


@pytest.mark.parametrize("stage", ["byol", "orl"])
def test_views_and_losses_agree_with_the_pil_pipeline(tmp_path, sample_images, stage):
    # 16 photos: with fewer, BatchNorm's statistics over a handful of patches make a random
    # network's loss swing by more than the views differ (8 photos: up to 10% on 6 intra pairs).
    root = sample_images
    files = list_images(root)[:16]
    cfg, data = _data(stage, root, files, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, stage).train()
    per_view = []
    for seed in range(2):
        plan = data.plan(range(len(files)), batch_seed(0, 0, 0, seed))
        ours, ref = data.render(plan), _pil_render(data, plan)
        assert ours.keys() == ref.keys()
        for branch, pair in ours.items():
            assert (pair is None) == (ref[branch] is None), branch
            for a, b in zip(pair or (), ref[branch] or (), strict=True):
                assert a.shape == b.shape
                per_view.append((_pixels(a) - _pixels(b)).abs().mean(dim=(1, 2, 3)))
        if stage == "orl":
            assert ours["intra"] is not None and ours["inter"] is not None  # the toy data has both
        with torch.no_grad():
            la, lb = model(ours), model(ref)
        for branch in la:
            assert la[branch].item() == pytest.approx(lb[branch].item(), rel=0.05), (seed, branch)
    d = torch.cat(per_view)
    assert d.max() <= 12 and d.mean() <= 3, (d.max(), d.mean())


def test_a_plan_is_a_function_of_its_seed(tmp_path, eight_images):
    root = eight_images / "images"
    files = list_images(root)
    _, data = _data("orl", root, files, tmp_path)
    a, b = data.batch([0, 1, 2, 3], 11), data.batch([0, 1, 2, 3], 11)
    c = data.batch([0, 1, 2, 3], 12)
    assert all(torch.equal(x, y) for k in a if a[k] for x, y in zip(a[k], b[k], strict=True))
    assert not torch.equal(a["global"][0], c["global"][0])
    assert a["global"][0].shape == (4, 3, 64, 64) and a["intra"][0].shape[1:] == (3, 32, 32)
    assert batch_seed(0, 0, 1, 2) != batch_seed(0, 0, 2, 1) and batch_seed(0, 1, 0, 0) != batch_seed(0, 0, 0, 0)
