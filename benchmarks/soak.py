"""Issue 10: a long run of the live daemon at the default rate, with its memory watched.

``python -m benchmarks.soak [--minutes 30] [--scope config.toml] [--results PATH]``

Runs ``python -m live.run --scope SCOPE --duration S`` (the shipped config: the simulated scope,
the shipped volume model) as its own process, samples the resident memory (VmRSS) of the daemon
and of its worker every `SAMPLE_S` seconds, and afterwards reopens the store. It passes when the
run ended by its duration with exit 0, every acquired frame is recorded raw exactly once, every
admitted frame has its stack (nothing skipped or lost), and memory is flat after warm-up: the
least-squares slope of the daemon's and the worker's RSS over the run's second half is under
`SLOPE_LIMIT_MB_PER_MIN`.

The camera ring buffer is not in play here: the simulated scope pre-renders a loop of frames
(``source.simulator.loop_frames``) and the daemon's own source sends them in-process; the
bounds that matter are the edges of `live.run.compose` (``--wiring``).

A table goes to stdout and JSON to ``benchmarks/results/soak.json`` (lscpu model, date).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from benchmarks.hostile import rss_mb
from benchmarks.machine import code_version, cpu_model, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
SAMPLE_S = 10.0
"""Seconds between memory samples."""
SLOPE_LIMIT_MB_PER_MIN = 0.5
"""Largest RSS growth over the run's second half counted as flat (MiB per minute)."""


def _children(pid: int) -> list[int]:
    """Return the child pids of `pid` (the worker processes of a daemon)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _slope(t_s: list[float], mb: list[float]) -> float:
    """Least-squares slope (MiB per minute) over the second half of the samples."""
    half = len(t_s) // 2
    if len(t_s) - half < 3:
        return float("nan")
    t = np.asarray(t_s[half:]) / 60.0
    return float(np.polyfit(t, np.asarray(mb[half:]), 1)[0])


def soak(scope: Path, minutes: float, workdir: Path) -> dict[str, Any]:
    """Run the daemon for `minutes`, sampling memory; return the measurements and checks."""
    store = workdir / "soak.ome.zarr"
    log = workdir / "daemon.log"
    command = [sys.executable, "-m", "live.run", "--scope", str(scope)]
    command += ["--duration", str(minutes * 60), "--output", str(store)]
    samples: dict[str, list[float]] = {"t_s": [], "daemon_mb": [], "worker_mb": []}
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while proc.poll() is None:
            time.sleep(SAMPLE_S)
            daemon = rss_mb(proc.pid)
            workers = [m for c in _children(proc.pid) if (m := rss_mb(c)) is not None]
            if daemon is None:
                continue
            samples["t_s"].append(time.monotonic() - t0)
            samples["daemon_mb"].append(daemon)
            samples["worker_mb"].append(max(workers) if workers else float("nan"))
    text = log.read_text()
    root = zarr.open_group(store, mode="r")
    deepz: dict[str, Any] = json.loads(json.dumps(root.attrs["deepz"]))
    summary: dict[str, Any] = deepz.get("summary", {})
    run: dict[str, Any] = deepz.get("run_summary", {})
    acquired = re.search(r"frames acquired\s+(\d+)", text)
    result: dict[str, Any] = {
        "exit_code": proc.returncode,
        "finish": run.get("finish_reason"),
        "frames_acquired": int(acquired.group(1)) if acquired else None,
        "raw_recorded": summary.get("raw_frames"),
        "stacks": summary.get("stacks"),
        "skipped": run.get("skipped"),
        "lost": run.get("lost"),
        "complete": deepz.get("complete"),
        "daemon_mb_start": samples["daemon_mb"][0] if samples["daemon_mb"] else None,
        "daemon_mb_end": samples["daemon_mb"][-1] if samples["daemon_mb"] else None,
        "worker_mb_end": samples["worker_mb"][-1] if samples["worker_mb"] else None,
        "daemon_slope_mb_per_min": _slope(samples["t_s"], samples["daemon_mb"]),
        "worker_slope_mb_per_min": _slope(samples["t_s"], samples["worker_mb"]),
        "samples": samples,
        "log_tail": text.splitlines()[-20:],
    }
    nothing_lost = not result["skipped"] and not result["lost"]
    result["passed"] = bool(
        proc.returncode == 0
        and result["complete"]
        and result["frames_acquired"] == result["raw_recorded"] == result["stacks"]
        and nothing_lost
        and result["daemon_slope_mb_per_min"] < SLOPE_LIMIT_MB_PER_MIN
        and result["worker_slope_mb_per_min"] < SLOPE_LIMIT_MB_PER_MIN
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit 0 when the soak passes."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--minutes", type=float, default=30.0, help="run length (default 30)")
    p.add_argument("--scope", type=Path, default=REPO / "config.toml", help="daemon config")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON output")
    args = p.parse_args(argv)
    code, started = code_version(), datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="deepz-soak-") as tmp:
        r = soak(args.scope, args.minutes, Path(tmp))
    # the code and the time it started with: commits may land during a 30-minute run
    r |= {"minutes": args.minutes, "cpu": cpu_model(), "date": started, "command": sys.argv}
    rows = [
        ("exit code / finish", f"{r['exit_code']} / {r['finish']}"),
        (
            "frames acquired / raw / stacks",
            f"{r['frames_acquired']} / {r['raw_recorded']} / {r['stacks']}",
        ),
        ("skipped / lost", f"{r['skipped']} / {r['lost']}"),
        ("daemon RSS start → end (MiB)", f"{r['daemon_mb_start']} → {r['daemon_mb_end']}"),
        (
            "RSS slope, 2nd half (MiB/min)",
            f"daemon {r['daemon_slope_mb_per_min']:.3f}, worker {r['worker_slope_mb_per_min']:.3f}",
        ),
        ("passed", str(r["passed"])),
    ]
    for name, value in rows:
        print(f"{name:32s} {value}")
    write_results(args.results, r, measured=bool(r["passed"]), code=code)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
