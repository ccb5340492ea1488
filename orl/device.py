"""Where the computation runs: the torch device, and the size of the CPU thread pools.

The one home of these helpers for the CLI, the training loop, the services and the
benchmarks. torch and the numeric libraries are imported inside the functions, so importing
this module (``orl --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU; anything else as torch reads it."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_threads(n: int) -> None:
    """Limit torch's intra-op pool and the BLAS / OpenMP pools of numpy, scipy and sklearn.

    threadpoolctl limits only the pools of libraries already loaded, so they are loaded first.
    """
    import scipy.linalg  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.svm  # noqa: F401
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)
