"""BYOL view pipelines and RoI patch crops.

The asymmetric BYOL recipe, as in the authors' configs: view 1 always blurs and never
solarises; view 2 blurs with p 0.1 and solarises with p 0.2. Stage-3 patches use the same
pipelines minus the random resized crop (the patch is already cut from the box and warped).

torchvision's random transforms draw from torch's global RNG; the DataLoader seeds it per
worker from the run seed, so runs are repeatable for a given seed and worker count.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel(size_px: int) -> int:
    """Odd kernel of about 10% of the image side (23 px at 224, as in BYOL)."""
    return max(3, int(0.1 * size_px) // 2 * 2 + 1)


def byol_pipeline(view: int, size: int, min_scale: float = 0.08, random_crop: bool = True) -> T.Compose:
    """PIL image -> normalised (3, size, size) tensor for BYOL view 1 or 2."""
    if view not in (1, 2):
        raise ValueError("view must be 1 or 2")
    blur_p, solarize_p = (1.0, 0.0) if view == 1 else (0.1, 0.2)
    first = (
        [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)]
        if random_crop
        else [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    )
    return T.Compose(
        first
        + [
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p),
            T.RandomSolarize(128, p=solarize_p),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(resize: int, crop: int) -> T.Compose:
    """Resize(short side) + CenterCrop: the stage-2 image-embedding input."""
    return T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def squash_transform(size: int) -> T.Compose:
    """Warp to size x size (aspect not kept): RoI crops and the VOC07 SVM protocol."""
    return T.Compose(
        [
            T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def crop_patch(image: Image.Image, box: np.ndarray, size: int) -> Image.Image:
    """Cut an xyxy box from the original image and warp it to size x size.

    Boxes are clipped to the image and given at least one pixel, so a degenerate box still
    yields a valid patch rather than an exception deep inside a DataLoader worker.
    """
    x1, y1, x2, y2 = [float(v) for v in box]
    x1, y1 = max(0.0, min(x1, image.width - 1)), max(0.0, min(y1, image.height - 1))
    x2, y2 = max(x1 + 1, min(x2, image.width)), max(y1 + 1, min(y2, image.height))
    return image.resize((size, size), Image.BICUBIC, box=(x1, y1, x2, y2))


def to_tensor_batch(images: list[Image.Image], tf) -> torch.Tensor:
    return torch.stack([tf(im) for im in images])
