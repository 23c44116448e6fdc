"""Engine benchmark: planes/s, ms per frame and roofline fraction of every backend available here.

For each backend, frame size and plane batch it times `backend.infer(frame, dpms)` (one camera
frame refocused onto `batch` planes: the live call), counts the network's FLOPs per plane from
the model, and compares the achieved GFLOP/s with a float32 matrix-multiply peak measured in the
same run. Cases whose estimated time per call exceeds `--max-call-s` are recorded as skipped
rather than run (1024² × 41 planes takes minutes on a 2-core CPU).

    python -m benchmarks.engine [--quick] [--sizes 256 512] [--batches 1 8] [--backends ...]

Writes `benchmarks/results/engine.json` and `engine.png` and prints a table.
"""

from __future__ import annotations

import os

# Torch's OpenMP threads busy-wait by default; on a shared machine that made torch eager ~10x
# slower here (1.2 s vs 0.11 s per 256² plane). PASSIVE gives the reference a fair timing.
# It must be set before torch (libgomp) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime as dt
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import write_results
from engine.metadata import ModelMetadata, padded_shape
from engine.runtime import (
    DEFAULT_MODEL,
    Backend,
    BackendError,
    Precision,
    available_backends,
    load_backend,
)

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = (256, 512, 1024)
BATCHES = (1, 8, 41)

log = logging.getLogger("benchmarks.engine")


@dataclass
class Case:
    """One timed (backend, frame size, plane batch) case, or the reason it was skipped."""

    backend: str
    device: str
    precision: str
    size: int
    batch: int
    ms_per_frame: float | None = None
    planes_per_s: float | None = None
    gflops: float | None = None
    peak_fraction: float | None = None
    repeats: int = 0
    skipped: str = ""


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Return the fastest of `repeats` timed calls of `fn` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measure float32 matmul GFLOP/s with numpy and (when installed) torch; keep the best."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    flops = 2.0 * n**3
    peaks = {"numpy": flops / _best_seconds(lambda: a @ a, repeats) / 1e9}
    try:
        import torch
    except ImportError:
        pass
    else:
        t = torch.from_numpy(a)
        peaks["torch"] = flops / _best_seconds(lambda: t @ t, repeats) / 1e9
    peaks["peak"] = max(peaks.values())
    return peaks


def flops_per_pixel(metadata: ModelMetadata) -> float:
    """Count the network's forward FLOPs per input pixel (2 × conv MACs) from its architecture."""
    from engine.model import DeepZ

    return DeepZ(**metadata.architecture).flops_per_pixel()


def random_model(directory: Path) -> Path:
    """Export a random-weight slim model to `directory` (used until trained weights ship)."""
    import torch

    from engine.model import build_model, save_model, untrained_metadata
    from export import export_onnx

    torch.manual_seed(0)
    model = build_model("slim").eval()
    metadata = untrained_metadata(
        model, "deepz-slim-random", "nothing: random weights for benchmarking"
    )
    save_model(model, metadata, directory / "deepz-slim.pt")
    path = directory / "deepz-slim.onnx"
    export_onnx(model, metadata, path, source="benchmarks.engine random weights")
    return path


def time_case(backend: Backend, size: int, batch: int, repeats: int) -> float:
    """Return the median seconds of one `infer` of a size² frame onto `batch` planes."""
    rng = np.random.default_rng(0)
    frame = rng.integers(100, 4000, size=(size, size), dtype=np.uint16)
    lo, hi = backend.metadata.dz_range_um
    dz = np.linspace(lo, hi, batch, dtype=np.float32)
    dpms = np.ascontiguousarray(np.broadcast_to(dz[:, None, None], (batch, size, size)))
    backend.infer(frame, dpms)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.infer(frame, dpms)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_backend(
    name: str, model: Path, args: argparse.Namespace, fpp: float, peak: float
) -> list[Case]:
    """Time every size × batch on one backend, skipping cases estimated above the call budget."""
    precision: Precision = args.trt_precision if name == "tensorrt" else "fp32"
    try:
        backend = load_backend(
            model,
            prefer=[name],
            precision=precision,
            intra_op_threads=args.threads,
            max_batch=max(args.batches),
        )
    except BackendError as exc:
        return [Case(name, "", precision, 0, 0, skipped=str(exc))]
    cases: list[Case] = []
    seconds_per_pixel: float | None = None
    for size in args.sizes:
        for batch in args.batches:
            case = Case(name, backend.device, backend.precision, size, batch)
            cases.append(case)
            h, w = padded_shape(size, size, backend.metadata.size_multiple)
            if seconds_per_pixel is not None:
                estimate = seconds_per_pixel * h * w * batch
                if estimate > args.max_call_s:
                    case.skipped = f"estimated {estimate:.0f} s per call > --max-call-s"
                    print(f"  {name} {size}² × {batch}: skipped ({case.skipped})", flush=True)
                    continue
            seconds = time_case(backend, size, batch, args.repeats)
            per_pixel = seconds / (h * w * batch)
            seconds_per_pixel = max(seconds_per_pixel or 0.0, per_pixel)
            case.repeats = args.repeats
            case.ms_per_frame = seconds * 1e3
            case.planes_per_s = batch / seconds
            case.gflops = fpp * h * w * batch / seconds / 1e9
            case.peak_fraction = case.gflops / peak
            print(
                f"  {name} {size}² × {batch}: {case.ms_per_frame:.1f} ms/frame, "
                f"{case.planes_per_s:.1f} planes/s, {case.gflops:.1f} GFLOP/s",
                flush=True,
            )
    backend.close()
    return cases


def table(cases: Sequence[Case]) -> str:
    """Format the cases as a Markdown table."""
    lines = [
        "| backend | device | precision | frame | planes | ms/frame | planes/s | GFLOP/s | "
        "% of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        if c.skipped:
            lines.append(
                f"| {c.backend} | {c.device} | {c.precision} | {c.size}² | {c.batch} | "
                f"skipped: {c.skipped} | | | |"
            )
            continue
        lines.append(
            f"| {c.backend} | {c.device} | {c.precision} | {c.size}² | {c.batch} | "
            f"{c.ms_per_frame:.1f} | {c.planes_per_s:.1f} | {c.gflops:.1f} | "
            f"{100 * (c.peak_fraction or 0):.0f} % |"
        )
    return "\n".join(lines)


def speedups(cases: Sequence[Case], baseline: str = "torch") -> dict[str, dict[str, float]]:
    """Return each backend's speed-up over `baseline` per "size x batch" both ran."""
    base = {(c.size, c.batch): c.ms_per_frame for c in cases if c.backend == baseline}
    out: dict[str, dict[str, float]] = {}
    for c in cases:
        ref = base.get((c.size, c.batch))
        if c.backend != baseline and c.ms_per_frame and ref:
            out.setdefault(c.backend, {})[f"{c.size}x{c.batch}"] = ref / c.ms_per_frame
    return out


def plot(cases: Sequence[Case], path: Path, title: str) -> None:
    """Plot planes/s against plane batch, one line per backend and frame size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(c.backend, c.size) for c in cases if not c.skipped})
    sizes = sorted({size for _, size in keys})
    styles = ["-", "--", ":", "-."]
    backends = sorted({backend for backend, _ in keys})
    for backend, size in keys:
        done = [c for c in cases if (c.backend, c.size) == (backend, size) and not c.skipped]
        ax.plot(
            [c.batch for c in done],
            [c.planes_per_s or 0.0 for c in done],
            marker="o",
            color=f"C{sizes.index(size)}",
            linestyle=styles[backends.index(backend) % len(styles)],
            label=f"{backend} {size}²",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("planes per call (batch)")
    ax.set_ylabel("planes / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """Describe this machine and the library versions."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("onnxruntime", "torch", "tensorrt"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            continue
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average": os.getloadavg(),
        "versions": versions,
    }


def _parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    p.add_argument("--quick", action="store_true", help="256² only, batches 1 and 8")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--backends", nargs="+", help="default: all available here")
    p.add_argument("--model", type=Path, help="ONNX model (default: shipped, else random slim)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: all usable cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (after warm-up)")
    p.add_argument("--max-call-s", type=float, default=15.0, help="skip longer estimated calls")
    p.add_argument("--trt-precision", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--out", type=Path, default=RESULTS / "engine.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write JSON, table and plot."""
    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.repeats = [256], [1, 8], 2
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
        if model is None:
            print("no shipped model yet: exporting a random-weight slim model", flush=True)
            model = random_model(Path(tmp))
        metadata = load_backend(model, prefer=["onnxruntime", "torch"]).metadata
        fpp = flops_per_pixel(metadata)
        print(f"model {model} ({metadata.name}): {fpp / 1e3:.1f} kFLOP per pixel", flush=True)
        peaks = matmul_peak()
        print(f"float32 matmul peak: {peaks}", flush=True)
        names = args.backends or available_backends()
        cases: list[Case] = []
        for name in names:
            cases += run_backend(name, model, args, fpp, peaks["peak"])
        peaks_after = matmul_peak()
    peak = max(peaks["peak"], peaks_after["peak"])  # the higher peak: the honest fraction
    for case in cases:
        if case.gflops is not None:
            case.peak_fraction = case.gflops / peak
    summary = table(cases)
    print(summary)
    vs_torch = speedups(cases)
    for name, ratios in vs_torch.items():
        print(f"{name} vs torch eager: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    host = machine()
    result = {
        "date": when,
        "command": " ".join(["python -m benchmarks.engine", *(argv or sys.argv[1:])]),
        "machine": host,
        "model": {"path": str(model), "name": metadata.name, "flops_per_pixel": fpp},
        "matmul_gflops": {"before": peaks, "after": peaks_after, "peak_used": peak},
        "cases": [asdict(c) for c in cases],
        "speedup_vs_torch": vs_torch,
        "table": summary,
    }
    measured = any(c.ms_per_frame is not None for c in cases)  # every case skipped: nothing
    if write_results(args.out, result, measured=measured) != args.out:
        return 1  # written beside the results: the committed plot stays too
    png = args.out.with_suffix(".png")
    plot(cases, png, f"{metadata.name}, {host['cpu']}, {when}")
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
