"""Where a benchmark ran: the CPU model (``lscpu``), core count and load, for every results JSON.

Figures from shared machines vary between sessions (AMD EPYC or Intel Xeon, busy or quiet), so
each result records the machine and its load, and comparisons are made between ratios measured
in one run.
"""

from __future__ import annotations

import os
import platform
import subprocess

__all__ = ["cpu_model"]


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
