"""View pipelines: bilinear resizes, PIL's untruncated Gaussian blur from torch's RNG."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from orl.augment import RandomGaussianBlur, byol_pipeline, crop_patch, eval_transform, squash_transform


def _image(w=80, h=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _walk(tf):
    for t in tf.transforms:
        yield t
        if isinstance(t, T.RandomApply):
            yield from t.transforms


def test_every_resize_is_bilinear():
    for tf in (byol_pipeline(1, 64), byol_pipeline(2, 64, random_crop=False), eval_transform(72, 64),
               squash_transform(64)):
        resizes = [t for t in _walk(tf) if isinstance(t, (T.RandomResizedCrop, T.Resize))]
        assert resizes and all(t.interpolation == T.InterpolationMode.BILINEAR for t in resizes)
    im, box = _image(), (5.0, 7.0, 50.0, 40.0)
    assert np.array_equal(np.asarray(crop_patch(im, box, 32)),
                          np.asarray(im.resize((32, 32), Image.BILINEAR, box=box)))


def test_blur_probabilities_per_view():
    for view, p in ((1, 1.0), (2, 0.1)):
        blurs = [t for t in byol_pipeline(view, 64).transforms
                 if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], RandomGaussianBlur)]
        assert len(blurs) == 1 and blurs[0].p == p and blurs[0].transforms[0].sigma == (0.1, 2.0)
    assert not any(isinstance(t, T.GaussianBlur) for t in _walk(byol_pipeline(1, 64)))


def test_blur_is_pil_gaussian_with_sigma_from_torch_rng():
    im = _image()
    blur = RandomGaussianBlur((0.1, 2.0))
    torch.manual_seed(5)
    out = blur(im)
    torch.manual_seed(5)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    assert 0.1 <= sigma <= 2.0
    assert np.array_equal(np.asarray(out), np.asarray(im.filter(ImageFilter.GaussianBlur(radius=sigma))))
    torch.manual_seed(5)
    assert np.array_equal(np.asarray(blur(im)), np.asarray(out))  # repeatable under the seed


def test_blur_has_no_kernel_cut_off():
    # A single bright pixel blurred with sigma 2 on a 41-px image: a kernel cut at 10% of the
    # side (5 px, radius 2) would leave nothing 3 px away; PIL's filter does.
    a = np.zeros((41, 41, 3), np.uint8)
    a[20, 20] = 255
    im = Image.fromarray(a)
    torch.manual_seed(0)
    out = np.asarray(RandomGaussianBlur((2.0, 2.0))(im))[..., 0]
    assert out[20, 20] < 255 and out[20, 23] > 0  # mass 3 px away from the centre
    with pytest.raises(ValueError):
        RandomGaussianBlur((0.0, 1.0))
