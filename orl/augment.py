"""BYOL view pipelines and RoI patch crops.

The asymmetric BYOL recipe, as in the authors' configs: view 1 always blurs and never
solarises; view 2 blurs with p 0.1 and solarises with p 0.2. Stage-3 patches use the same
pipelines minus the random resized crop (the patch is already cut from the box and warped).
Every resize is bilinear (``interpolation=2`` in the authors' configs) and the blur is PIL's
untruncated Gaussian with sigma ~ U(0.1, 2).

torchvision's random transforms draw from torch's global RNG; in training it is seeded per
sample from the sample's position in the run (orl.data.SeededKeys), so runs are repeatable for
a given seed whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The authors' BYOL recipe, shared by both backends (orl.tensor_augment draws from the same).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect range (torchvision's default)
FLIP_P = 0.5
JITTER = (0.4, 0.4, 0.2, 0.1)  # ColorJitter brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAY_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
# Per view: (blur probability, solarise probability).
VIEW_PROBS = {1: (1.0, 0.0), 2: (0.1, 0.2)}


class RandomGaussianBlur:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` with sigma ~ U(sigma_min, sigma_max).

    As the authors' pipeline: PIL's filter, so no kernel-size cut-off (torchvision's
    GaussianBlur truncates the kernel to a given size). sigma is drawn from torch's global
    RNG, as torchvision's random transforms draw theirs, so the per-sample seeding in training
    keeps runs repeatable. Applied with a probability through ``T.RandomApply``.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        if not 0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must be 0 < min <= max, got {sigma}")
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item())
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def byol_pipeline(view: int, size: int, min_scale: float = 0.08, random_crop: bool = True) -> T.Compose:
    """PIL image -> normalised (3, size, size) tensor for BYOL view 1 or 2."""
    if view not in VIEW_PROBS:
        raise ValueError("view must be 1 or 2")
    blur_p, solarize_p = VIEW_PROBS[view]
    first = (
        [T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=CROP_RATIO,
                             interpolation=T.InterpolationMode.BILINEAR)]
        if random_crop
        else [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR)]
    )
    return T.Compose(
        first
        + [
            T.RandomHorizontalFlip(p=FLIP_P),
            T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
            T.RandomGrayscale(p=GRAY_P),
            T.RandomApply([RandomGaussianBlur(BLUR_SIGMA)], p=blur_p),
            T.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_p),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(resize: int, crop: int) -> T.Compose:
    """Resize(short side) + CenterCrop: the stage-2 image-embedding input."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def squash_transform(size: int) -> T.Compose:
    """Warp to size x size (aspect not kept): RoI crops and the VOC07 SVM protocol."""
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def clip_patch_box(box: np.ndarray | tuple[float, ...], width: int, height: int) -> tuple[float, float, float, float]:
    """An xyxy box clipped to a width x height image and given at least one pixel each way.

    So a degenerate box still yields a valid patch rather than an exception deep inside a
    DataLoader worker. Both backends cut patches from boxes clipped this way.
    """
    x1, y1, x2, y2 = [float(v) for v in box]
    x1, y1 = max(0.0, min(x1, width - 1)), max(0.0, min(y1, height - 1))
    x2, y2 = max(x1 + 1, min(x2, width)), max(y1 + 1, min(y2, height))
    return x1, y1, x2, y2


def crop_patch(image: Image.Image, box: np.ndarray, size: int) -> Image.Image:
    """Cut an xyxy box (clipped: :func:`clip_patch_box`) from the original image and warp it
    to size x size."""
    return image.resize((size, size), Image.Resampling.BILINEAR, box=clip_patch_box(box, image.width, image.height))


def to_tensor_batch(images: list[Image.Image], tf: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    return torch.stack([tf(im) for im in images])
