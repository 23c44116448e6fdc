"""Where a benchmark ran: the CPU model (``lscpu``), core count and load, for every results JSON.

Figures from shared machines vary between sessions (AMD EPYC or Intel Xeon, busy or quiet), so
each result records the machine and its load, and comparisons are made between ratios measured
in one run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "run_record", "write_results"]


def cpu_model() -> str:
    """Return the CPU's model name from ``lscpu`` (the platform's processor string without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or f"{os.cpu_count()} CPUs"


def run_record(
    module: str, argv: list[str] | None, note: str | None, load_before: tuple[float, ...]
) -> dict[str, Any]:
    """Return the header every results JSON starts with: when, where, how loaded, which command."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "command": " ".join([f"python -m {module}", *(argv or sys.argv[1:])]),
        "note": note,
    }


def write_results(path: Path, record: dict[str, Any]) -> Path:
    """Write a benchmark's results JSON (its folder made if needed) and say where; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return path
