"""Host-side cost of `Backend.infer`: normalising into the network input and mapping back.

Runs `BaseBackend.infer` with a network that does nothing, so what is timed is the part every
backend shares (input checks, image and DPM normalisation into the reused input buffer, output
denormalisation into a new array). At 100 Hz a GPU leaves 10 ms per frame for all of it.

    python -m benchmarks.host_path [--repeats 15]

Cases: 9 × 256² (the shipped config) and 41 × 512² (the paper's stack), each with a writable
DPM array (normalised on every call) and a frozen one (read-only and owning its data:
normalised once). Writes `benchmarks/results/host_path.json` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import cpu_model, write_results
from engine.metadata import ModelMetadata
from engine.runtime import DEFAULT_MODEL, BackendOptions, BaseBackend, onnx_metadata

RESULTS = Path(__file__).resolve().parent / "results"


class NullBackend(BaseBackend):
    """A backend whose network returns zeros from a kept buffer: only the host path remains."""

    name = "null"

    def __init__(self, metadata: ModelMetadata) -> None:
        super().__init__(None, metadata, BackendOptions())
        self._zeros: dict[tuple[int, ...], np.ndarray] = {}

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Return (n, 1, H, W) zeros for input (n, 2, H, W), allocated once per shape."""
        shape = (x.shape[0], 1, *x.shape[2:])
        if shape not in self._zeros:
            self._zeros[shape] = np.zeros(shape, dtype=np.float32)
        return self._zeros[shape]


def time_case(
    backend: NullBackend, planes: int, side: int, frozen: bool, repeats: int
) -> dict[str, Any]:
    """Median and minimum ms of `infer(frame, dpms)` after warm-up."""
    rng = np.random.default_rng(0)
    frame = rng.integers(90, 4000, (side, side), dtype=np.uint16)
    dz = np.linspace(-8.0, 8.0, planes, dtype=np.float32)
    dpms = np.array(np.broadcast_to(dz[:, None, None], (planes, side, side)))
    if frozen:
        dpms.setflags(write=False)
    for _ in range(3):
        backend.infer(frame, dpms)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.infer(frame, dpms)
        times.append(time.perf_counter() - t0)
    return {
        "planes": planes,
        "side": side,
        "dpms": "frozen" if frozen else "writable",
        "median_ms": round(1e3 * statistics.median(times), 2),
        "min_ms": round(1e3 * min(times), 2),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    """Time every case, print a table and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_path", description=__doc__)
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per case")
    parser.add_argument(
        "--results", type=Path, default=RESULTS / "host_path.json", help="results JSON to write"
    )
    args = parser.parse_args(argv)
    backend = NullBackend(onnx_metadata(DEFAULT_MODEL))
    rows = [
        time_case(backend, planes, side, frozen, args.repeats)
        for planes, side in ((9, 256), (41, 512))
        for frozen in (False, True)
    ]
    print(f"{'planes × frame':<16} {'DPMs':<9} {'median ms':>10} {'min ms':>8}")
    for r in rows:
        case = f"{r['planes']} × {r['side']}²"
        print(f"{case:<16} {r['dpms']:<9} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f}")
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(),
        "cpu": cpu_model(),
        "command": " ".join(["python -m benchmarks.host_path", *(argv or sys.argv[1:])]),
        "cases": rows,
    }
    write_results(args.results, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
