"""Where the computation runs: the torch device, and how the CPU cores given are spent.

The one home of these decisions for the CLI, the training loop, the services and the
benchmarks. torch and the numeric libraries are imported inside the functions, so importing
this module (``orl --help``, a selective-search subprocess) stays fast.

Why one place: torch's intra-op pool, the BLAS / OpenMP pools of numpy, scipy, sklearn and
faiss, OpenCV, and our selective-search subprocesses each start a thread or a process per core
by default. Several of them busy at once on the same cores wait on one another (an OpenMP
parallel loop runs at the pace of its slowest thread, and a preempted one is very slow).
:func:`plan_threads` turns "these cores" into counts that never add up to more than the cores.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU; anything else as torch reads it."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or taskset's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """How ``cores`` are spent by ``processes`` processes that share them (a Celery prefork pool;
    1 for the CLI), each with its own torch / BLAS pools, decode threads and selective-search
    subprocesses.

    The phases of one process do not overlap on the CPU (selective search, then decoding and
    forwards, which alternate wave by wave on a CPU device), so each phase may use the whole
    per-process share; what must hold is ``processes * ss_processes <= cores`` and
    ``processes * threads <= cores``.
    """

    cores: int
    processes: int = 1
    ss_processes: int = 1  # selective-search subprocesses per process (each single-threaded)

    @property
    def threads(self) -> int:
        """torch intra-op, BLAS / OpenMP and image-decoding threads of each process."""
        return max(1, self.cores // self.processes)

    def to_dict(self) -> dict[str, int]:
        return {"cores": self.cores, "processes": self.processes, "threads": self.threads,
                "ss_processes": self.ss_processes}


def plan_threads(cores: int | None = None, processes: int = 1, ss_processes: int | None = None) -> ThreadPlan:
    """The counts for ``cores`` (None: :func:`available_cores`) shared by ``processes`` processes.

    ``ss_processes``: selective-search subprocesses per process; None gives each process its
    whole share (``cores // processes``; the CLI's default: all cores for selective search).
    A request that would oversubscribe is lowered to what fits, with a warning that says so
    (``0`` stays 0: selective search in the calling process). Raises ValueError for counts
    below 1 or more processes than cores.
    """
    n = available_cores() if cores is None else int(cores)
    if n < 1:
        raise ValueError(f"cores must be at least 1, got {n}")
    if not 1 <= processes <= n:
        raise ValueError(f"{processes} pool processes for {n} cores: use between 1 and {n} "
                         "(each process needs a core of its own)")
    share = max(1, n // processes)
    if ss_processes is None:
        ss = share
    elif ss_processes < 0:
        raise ValueError(f"selective-search processes must be 0 or more, got {ss_processes}")
    elif ss_processes > share:
        log.warning("%d selective-search processes asked for, but %d core(s) / %d process(es) leave %d each: "
                    "using %d", ss_processes, n, processes, share, share)
        ss = share
    else:
        ss = ss_processes
    return ThreadPlan(cores=n, processes=processes, ss_processes=ss)


def single_thread_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with every OpenMP / BLAS pool of a child limited to one
    thread: for subprocesses whose parallelism is the number of them (selective search)."""
    out = dict(os.environ if env is None else env)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        out[var] = "1"
    return out


def apply_threads(plan: ThreadPlan) -> None:
    """Limit this process's torch intra-op pool and the BLAS / OpenMP pools of numpy, scipy,
    sklearn and faiss to ``plan.threads``.

    threadpoolctl limits only the pools of libraries already loaded, so they are loaded first;
    faiss keeps its own OpenMP setting.
    """
    import scipy.linalg  # noqa: F401
    import sklearn.linear_model  # noqa: F401
    import sklearn.svm  # noqa: F401
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(plan.threads)
    threadpool_limits(plan.threads)
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency; a trimmed install may lack it
        return
    faiss.omp_set_num_threads(plan.threads)


def set_threads(n: int) -> ThreadPlan:
    """``apply_threads`` for ``n`` cores used by this one process (``--threads N``); returns the plan."""
    plan = plan_threads(n)
    apply_threads(plan)
    return plan
