"""Optics simulator benchmark: focal-stack and live-frame speed.

Times `simulate_focal_stack` (41 planes, 256² and 512²; the first call of a size includes the
PSF computation, later ones reuse the cached PSF transforms) and `WormTimeSeries.frame`
(frames per second at 256², including the occasional footprint re-render as focus drifts).

    python -m benchmarks.optics [--repeats 5] [--frames 2000]

Writes `benchmarks/results/optics.json` and prints a table. The machine is often shared, so
CPU time (all threads of this process) is recorded beside wall time, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import run_record, write_results
from engine.optics import WormTimeSeries, simulate_focal_stack

RESULTS = Path(__file__).resolve().parent / "results"


def time_stack(size: int, repeats: int) -> dict[str, Any]:
    """Cold (first) and warm (median of `repeats`) time of a 41-plane worm stack."""
    t0 = time.perf_counter()
    simulate_focal_stack("worm", shape=(size, size), seed=0)
    cold = time.perf_counter() - t0
    warm, cpu = [], []
    for seed in range(1, repeats + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        simulate_focal_stack("worm", shape=(size, size), seed=seed)
        warm.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "case": f"focal stack 41 x {size}²",
        "cold_s": round(cold, 3),
        "warm_median_s": round(statistics.median(warm), 3),
        "warm_min_s": round(min(warm), 3),
        "warm_cpu_median_s": round(statistics.median(cpu), 3),
        "repeats": repeats,
    }


def time_series(size: int, frames: int) -> dict[str, Any]:
    """Frames per second of `WormTimeSeries.frame` over `frames` consecutive frames at 100 Hz."""
    t0 = time.perf_counter()
    ts = WormTimeSeries((size, size), seed=0, rate_hz=100.0)
    ts.frame(0)
    setup = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(1, frames + 1):
        ts.frame(i)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    ts._render_uncached(8)  # focus 2 µm deeper: computes the PSFs it needs once
    t0 = time.perf_counter()
    ts._render_uncached(8)  # what a re-render costs when focus drifts by a step
    render = time.perf_counter() - t0
    return {
        "case": f"worm time series {size}²",
        "frames": frames,
        "frames_per_s": round(frames / elapsed, 1),
        "ms_per_frame": round(1000 * elapsed / frames, 3),
        "cpu_ms_per_frame": round(1000 * cpu / frames, 3),
        "setup_s": round(setup, 3),
        "footprint_render_s": round(render, 3),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the cases, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="warm repeats per stack size")
    parser.add_argument("--frames", type=int, default=2000, help="time-series frames to time")
    parser.add_argument("--out", type=Path, default=RESULTS / "optics.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    stacks = [time_stack(256, args.repeats), time_stack(512, max(1, args.repeats // 2))]
    series = time_series(256, args.frames)
    print(f"{'case':<28}{'cold s':>10}{'warm s (median)':>18}{'warm CPU s':>12}")
    for s in stacks:
        print(
            f"{s['case']:<28}{s['cold_s']:>10.3f}{s['warm_median_s']:>18.3f}"
            f"{s['warm_cpu_median_s']:>12.3f}"
        )
    print(
        f"{series['case']:<28}{series['frames_per_s']:>10.1f} frames/s "
        f"({series['ms_per_frame']:.2f} ms/frame, {series['cpu_ms_per_frame']:.2f} ms CPU; "
        f"footprint re-render "
        f"{series['footprint_render_s']:.2f} s)"
    )
    result = {
        "benchmark": "optics",
        **run_record("benchmarks.optics", argv, None, load_before),
        "stacks": stacks,
        "time_series": series,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
