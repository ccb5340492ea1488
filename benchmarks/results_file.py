"""The last step of the API-load and page benchmarks: stamp a result with where and when it was
measured, write it as ``<out>.json`` (the numbers docs quote) and ``<out>.md`` (the same, read by
people), and print the Markdown. One place, so both record the machine the same way."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> str:
    return f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})"


def write_results(out: Path, res: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Add ``machine`` and ``date`` to ``res``, then write ``out`` with the suffixes .json and .md."""
    res["machine"] = machine()
    res["date"] = time.strftime("%Y-%m-%d %H:%M")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    text = markdown(res)
    out.with_suffix(".md").write_text(text)
    print(text)
