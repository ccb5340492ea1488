"""Measurements of the fault tests (cancel latency, recovery times, ...), for docs/RELIABILITY.md.

``record(name, values)`` prints the values (visible with ``pytest -s`` or in a failure's
captured output) and, when ORL_RELIABILITY_RESULTS names a file, merges them into that JSON
file under ``name``. ``benchmarks/reliability.py`` runs the fault tests with it set and writes
benchmarks/results/reliability.json, the source of the numbers in the doc.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def record(name: str, values: dict[str, Any]) -> None:
    print(f"[reliability] {name}: {json.dumps(values, sort_keys=True)}")
    target = os.environ.get("ORL_RELIABILITY_RESULTS")
    if not target:
        return
    path = Path(target)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = values
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
