"""Shared fixtures: real photos from the bundled sample, and tiny trained checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _image_store(tmp_path_factory):
    """The decoded-image store of the tensor backend in a session folder, never ~/.cache
    (child processes, e.g. the CLI or the trainer service, inherit it)."""
    from orl.imagestore import STORE_ENV

    old = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = str(tmp_path_factory.mktemp("image_store"))
    yield
    if old is None:
        os.environ.pop(STORE_ENV, None)
    else:
        os.environ[STORE_ENV] = old


@pytest.fixture(scope="session")
def sample_images() -> Path:
    return SAMPLE / "images"


@pytest.fixture(scope="session")
def sample_labels() -> Path:
    return SAMPLE / "labels"


@pytest.fixture(scope="session")
def eight_images(tmp_path_factory) -> Path:
    """8 real photos (4 train2017, 4 val2017) with their labels, in a fresh folder."""
    root = tmp_path_factory.mktemp("eight")
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for f in sorted((SAMPLE / "images" / split).glob("*.jpg"))[:4]:
            shutil.copy(f, root / "images" / split / f.name)
            lab = SAMPLE / "labels" / split / (f.stem + ".txt")
            if lab.exists():
                shutil.copy(lab, root / "labels" / split / lab.name)
    shutil.copy(SAMPLE / "classes.yaml", root / "classes.yaml")
    return root


@pytest.fixture(scope="session")
def tiny_byol_checkpoint(tmp_path_factory, eight_images) -> Path:
    """A tiny stage-1 checkpoint trained for one step on 8 real photos."""
    from orl.config import get_preset
    from orl.images import list_images
    from orl.train import train

    out = tmp_path_factory.mktemp("byol")
    root = eight_images / "images"
    train("byol", root, out, get_preset("tiny"), files=list_images(root), show_progress=False)
    return out / "last.pt"
