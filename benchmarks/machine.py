"""Where a benchmark ran: the CPU model (``lscpu``), core count and load, for every results JSON.

Figures from shared machines vary between sessions (AMD EPYC or Intel Xeon, busy or quiet), so
each result records the machine and its load, and comparisons are made between ratios measured
in one run.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["code_version", "cpu_model", "run_record", "write_results"]


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


def code_version() -> dict[str, Any]:
    """Return the git commit the benchmark ran and whether the tree had changes (None: no git)."""
    try:
        commit = _git("rev-parse", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(changed)}


def _git(*args: str) -> str:
    """Run git in this checkout (wherever the benchmark was started from); its stdout."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, timeout=10, cwd=repo
    )
    return done.stdout.strip()


def write_results(
    path: Path,
    record: dict[str, Any],
    *,
    measured: bool = True,
    code: dict[str, Any] | None = None,
) -> Path:
    """Write a benchmark's results JSON atomically and say where; return the path written.

    The record gains the code it measured: `code`, as `code_version` said when the run began
    (a long run: commits may land meanwhile), else `code_version` now. NaN and infinities
    become null (a JSON file a strict parser reads). A run that measured nothing or failed
    (``measured`` false) never replaces results already there: it is written beside them as
    ``NAME.failed.json``, so committed figures are not lost to a loaded machine or a typo.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not measured and path.exists():
        path = path.with_name(f"{path.stem}.failed.json")
        print(f"this run measured nothing or failed: {path.name} written beside the results")
    full = {**record, "measured": measured, "code": code or code_version()}
    text = json.dumps(_finite(full), indent=1, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep committed results from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}")
    return path


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
