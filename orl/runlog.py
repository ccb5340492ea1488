"""The run folder's logs: their names, their columns, and how they are read back.

A training run writes two CSV files next to ``last.pt`` (and, where the ``tensorboard``
package is installed, TensorBoard event files with the same values):

* ``metrics.csv``, one row per optimiser step (:data:`METRICS_COLUMNS`);
* ``monitor.csv``, one row per monitored epoch (``train.monitor_every_epochs``): the
  label-free signals of :mod:`orl.monitor` (:data:`MONITOR_COLUMNS`).

Two files, because their rows are of two kinds: a step's loss, and an epoch-end evaluation
of a fixed image set. This module imports no torch, so the API can read the files of a job
without loading it.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"
# metrics.csv: one row per optimiser step with these columns, in this order, each written with
# its format ("" for a branch that did not run in that step). Readers go by column name.
METRICS_COLUMNS: dict[str, str] = {
    "epoch": "d", "step": "d", "global_step": "d", "lr": ".6g", "momentum": ".6f", "loss": ".5f",
    "loss_global": ".5f", "loss_intra": ".5f", "loss_inter": ".5f", "images_per_s": ".2f", "time": ".1f",
}
# Label-free signals per monitored epoch (train.monitor_every_epochs).
MONITOR_FILE = "monitor.csv"
MONITOR_COLUMNS = ("epoch", "global_step", "view_top1", "view_top1_chance", "effective_rank", "effective_rank_max",
                   "images", "seconds")
# The monitor's values a trainer reports as a job's progress (and TensorBoard logs as scalars).
MONITOR_SIGNALS = ("view_top1", "view_top1_chance", "effective_rank", "effective_rank_max")


def metrics_row(values: dict[str, Any]) -> dict[str, str]:
    """One metrics.csv row: each of METRICS_COLUMNS formatted, "" where ``values`` lacks it."""
    return {col: "" if values.get(col) is None else format(values[col], spec) for col, spec in METRICS_COLUMNS.items()}


def _number(text: str | None) -> int | float | None:
    """A CSV cell as a number: "" (a branch that did not run), a missing column, or text that is
    not a finite number are None, so a reader never meets NaN (JSON has none)."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(text) if text.lstrip("-").isdigit() else value


def _rows(path: Path, columns: tuple[str, ...]) -> list[dict[str, int | float | None]]:
    """The rows of one of the run's CSV files, as numbers, by global step.

    A run resumed from last.pt redoes the steps after its last checkpoint and appends them
    again: the last row of each global step is the one the network kept, so it wins. Rows
    without a global step (a line cut short by a kill) are dropped."""
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, int | float | None]] = {}
    with path.open(newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {c: _number(raw.get(c)) for c in columns}
            step = row.get("global_step")
            if step is None:
                continue
            by_step[int(step)] = row
    return [by_step[k] for k in sorted(by_step)]


def read_metrics(run_dir: str | os.PathLike, max_points: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """(rows, number of steps logged) of ``run_dir/metrics.csv``; at most ``max_points`` rows,
    evenly spaced over the steps with the first and the last kept (a chart needs no more)."""
    rows = _rows(Path(run_dir) / METRICS_FILE, tuple(c for c in METRICS_COLUMNS if c != "time"))
    n = len(rows)
    if max_points is not None and n > max_points >= 2:
        idx = [i * (n - 1) // (max_points - 1) for i in range(max_points)]  # distinct: n > max_points
        rows = [rows[i] for i in idx]
    return rows, n


def read_monitor(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``run_dir/monitor.csv`` (one per monitored epoch), as numbers."""
    return _rows(Path(run_dir) / MONITOR_FILE, MONITOR_COLUMNS)
