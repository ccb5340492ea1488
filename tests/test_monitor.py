import numpy as np
import pytest
import torch

from orl.config import get_preset
from orl.models import build_model
from orl.monitor import (
    effective_rank,
    evenly_spaced,
    label_free_signals,
    retrieval_top1,
    two_views,
    view_retrieval_top1,
)


def test_effective_rank_known_matrices():
    d = 7
    eye_pm = np.vstack([np.eye(d), -np.eye(d)])  # centred already, d equal singular values
    assert effective_rank(eye_pm) == pytest.approx(d)
    assert effective_rank(np.eye(d)) == pytest.approx(d - 1)  # centring removes one direction
    rng = np.random.default_rng(0)
    rank1 = np.outer(rng.standard_normal(50), rng.standard_normal(16)) + 3.0  # rank 1 plus an offset
    assert effective_rank(rank1) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(np.ones((10, 4))) == 0.0  # collapsed: nothing spreads
    g = rng.standard_normal((2000, 20))
    assert 18 < effective_rank(g) < 20
    assert effective_rank(5 * g) == pytest.approx(effective_rank(g))  # scale-invariant
    # two strong and eight weak dimensions: between 2 and 10
    assert 2 < effective_rank(g[:, :10] * np.r_[10, 10, [0.1] * 8]) < 3


def test_retrieval_top1_perfect_collapsed_and_wrong():
    z = np.eye(5)
    assert retrieval_top1(z, z) == 1.0
    assert retrieval_top1(np.ones((5, 3)), np.ones((5, 3))) == pytest.approx(1 / 5)  # ties: chance
    assert retrieval_top1(z, z[[1, 2, 3, 4, 0]]) == 0.0


@pytest.fixture(scope="module")
def photos(sample_images):
    return sorted(sample_images.glob("*/*.jpg"))[:5]


@pytest.fixture(scope="module")
def backbone():
    """A random-init ResNet-18 (the tiny preset's backbone)."""
    torch.manual_seed(0)
    return build_model(get_preset("tiny").model, "byol").backbone


def test_view_retrieval_of_a_random_network_is_deterministic(photos, backbone):
    backbone.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = view_retrieval_top1(backbone, photos, 64, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert backbone.training  # mode restored
    assert 0.0 <= a <= 1.0 and a * len(photos) == pytest.approx(round(a * len(photos)))
    assert view_retrieval_top1(backbone, photos, 64, seed=0) == a
    ims = _load(photos[:2])
    v1, v2 = two_views(ims, 64, seed=0)
    assert v1.shape == v2.shape == (2, 3, 64, 64) and not torch.equal(v1, v2)
    assert torch.equal(two_views(ims, 64, seed=0)[0], v1)
    assert not torch.equal(two_views(ims, 64, seed=1)[0], v1)  # the seed chooses the views
    with pytest.raises(ValueError, match="at least 2"):
        view_retrieval_top1(backbone, photos[:1], 64)


def _load(paths):
    from orl.images import load_rgb

    return [load_rgb(p) for p in paths]


def test_label_free_signals_fixed_subset(photos, backbone, sample_images):
    all_paths = sorted(sample_images.glob("*/*.jpg"))
    assert evenly_spaced(all_paths, 3) == [str(all_paths[0]), str(all_paths[len(all_paths) // 2]),
                                          str(all_paths[-1])]
    r = label_free_signals(backbone, photos, 64, n_images=4)
    assert r["images"] == 4 and r["view_top1_chance"] == 0.25 and r["embedding_dim"] == 512
    assert 0.0 <= r["view_top1"] <= 1.0 and 0.0 < r["effective_rank"] <= r["effective_rank_max"] == 3
    assert label_free_signals(backbone, photos[::-1], 64, n_images=4) == r  # order does not matter
