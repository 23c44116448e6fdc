"""Live-service benchmarks: wire transport, and the whole daemon end to end.

``python -m benchmarks.live [--quick] [--skip-e2e]``

Transport: frames/s and GB/s of 512² and 2048² uint16 frames through the project's protocol
(header encode + validated decode + zero-copy) against raw pyzmq multipart PUSH/PULL of the same
buffers and a plain memcpy, in the same run, over ipc and loopback tcp. End to end: the daemon
on the simulated scope with the shipped model for N seconds at a few rate × planes settings;
zero raw frames lost and zero skipped counts as sustained. JSON goes to
``benchmarks/results/live.json``; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from benchmarks.machine import cpu_model, write_results
from live.metrics import format_stage_times
from live.protocol import decode, encode_frame

RESULTS = Path(__file__).resolve().parent / "results" / "live.json"


@dataclass
class TransportResult:
    """One transport measurement."""

    method: str
    transport: str
    side: int
    frames: int
    seconds: float
    frames_per_s: float
    gb_per_s: float


def _memcpy(frame: np.ndarray, n: int) -> float:
    """Seconds to copy `frame` `n` times into a preallocated buffer."""
    dst = np.empty_like(frame)
    t0 = time.perf_counter()
    for _ in range(n):
        np.copyto(dst, frame)
    return time.perf_counter() - t0


def _send(endpoint: str, side: int, n: int, use_protocol: bool) -> None:
    """Child process: PUSH `n` frames of `side`² uint16 to `endpoint` (blocking sends)."""
    frame = np.random.default_rng(0).integers(0, 4096, (side, side), dtype=np.uint16)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = 16
    push.connect(endpoint)
    raw_header = b'{"seq":0}'
    for seq in range(n):
        if use_protocol:
            parts = encode_frame(frame, seq=seq, timestamp_s=time.time())
        else:
            parts = [raw_header, frame.data.cast("B")]
        push.send_multipart(parts, copy=False)
    push.close(linger=-1)
    ctx.term()


def _pipe(side: int, n: int, endpoint: str, use_protocol: bool) -> float:
    """Seconds per frame × n for frames PUSHed by another process and PULLed (and decoded) here.

    The clock runs from the first to the last frame received, so process start is excluded.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.rcvhwm = 16
    if endpoint.startswith("tcp"):
        endpoint = f"{endpoint}:{pull.bind_to_random_port(endpoint)}"
    else:
        pull.bind(endpoint)
    child = mp.get_context("spawn").Process(target=_send, args=(endpoint, side, n, use_protocol))
    child.start()
    checksum = 0
    t0 = 0.0
    for i in range(n):
        parts = pull.recv_multipart(copy=False)
        if i == 0:
            t0 = time.perf_counter()
        if use_protocol:
            checksum += int(decode(parts).array[0, 0])
        else:
            checksum += len(parts[1].buffer)
    seconds = time.perf_counter() - t0
    child.join()
    pull.close()
    ctx.term()
    return seconds * n / (n - 1)


def transport(quick: bool) -> list[TransportResult]:
    """Measure memcpy, raw pyzmq and the protocol for 512² and 2048² uint16, same run."""
    results: list[TransportResult] = []
    tmp = tempfile.mkdtemp(prefix="deepz-bench-")
    for side in (512, 2048):
        frame = np.random.default_rng(0).integers(0, 4096, (side, side), dtype=np.uint16)
        n = (400 if quick else 3000) if side == 512 else (40 if quick else 300)
        runs: list[tuple[str, str, float]] = [("memcpy", "-", _memcpy(frame, n))]
        for transport_name, endpoint in (("ipc", f"ipc://{tmp}/bench"), ("tcp", "tcp://127.0.0.1")):
            for _ in range(2):  # best of two: the machine is shared
                raw = _pipe(side, n, endpoint, use_protocol=False)
                proto = _pipe(side, n, endpoint, use_protocol=True)
                runs += [("raw pyzmq", transport_name, raw), ("protocol", transport_name, proto)]
        best: dict[tuple[str, str], float] = {}
        for method, where, seconds in runs:
            best[(method, where)] = min(seconds, best.get((method, where), float("inf")))
        for (method, where), seconds in best.items():
            results.append(
                TransportResult(
                    method, where, side, n, seconds, n / seconds, n * frame.nbytes / seconds / 1e9
                )
            )
    return results


_EXPORT_SLIM = """
import sys
import torch
from engine.metadata import ModelMetadata
from engine.model import build_model
from export import export_onnx
torch.manual_seed(0)
model = build_model("slim").eval()
meta = ModelMetadata(name="deepz-slim-random", architecture=model.architecture,
    size_multiple=model.size_multiple, dz_range_um=(-10.0, 10.0), pixel_size_um=0.3, na=0.75,
    wavelength_um=0.52, trained_on="nothing: random weights, same architecture as shipped")
export_onnx(model, meta, sys.argv[1], source="benchmarks.live")
"""


def model_path() -> tuple[Path, str]:
    """Return the shipped model, or a random-weight export of the same architecture (same speed).

    The export runs in a subprocess so that this process, which hosts the daemon, never
    imports torch.
    """
    from engine.runtime import DEFAULT_MODEL

    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL, "shipped deepz-slim"
    out = Path(tempfile.gettempdir()) / "deepz-bench" / "deepz-slim-random.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", _EXPORT_SLIM, str(out)], check=True)
    return out, "random-weight deepz-slim (shipped weights not present)"


def run_setting(
    *,
    rate_hz: float,
    planes: int,
    seconds: float,
    side: int,
    model: Path,
    backends: list[str],
    precision: str = "fp32",
    workers: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run the daemon on the simulated scope for `seconds` and return its counts and latency."""
    from live.config import validate_config
    from live.run import Daemon

    tmp = Path(tempfile.mkdtemp(prefix="deepz-e2e-"))
    # 0.5 µm apart around focus: 41 planes span the trained ±10 µm (a volume model renders
    # only inside its depth grid; 1 µm steps reached ±20 µm)
    half = (planes - 1) / 4
    z_um = [round(-half + 0.5 * i, 3) for i in range(planes)]
    config = validate_config(
        {
            "source": {
                "kind": "simulated",
                "frame_shape": [side, side],
                "rate_hz": rate_hz,
                "exposure_ms": min(10.0, 500.0 / rate_hz),
            },
            "engine": {
                "model_path": str(model),
                "backends": backends,
                "precision": precision,
                "intra_op_threads": threads,
            },
            "planes": {"z_um": z_um},
            "endpoints": {
                n: f"ipc://{tmp}/{n}" for n in ("frames", "stacks", "recorder", "status")
            },
            "recorder": {"path": str(tmp)},
            "overload": {"policy": "every_frame", "max_queue_frames": 64},
        },
        source="benchmark",
    )
    daemon = Daemon(config, output=tmp / "run.ome.zarr", preflight_check=False, workers=workers)
    try:
        daemon.start()
        daemon.supervise(seconds, quiet=True)
    finally:
        summary = daemon.stop()
    dropped = int(summary.source.get("frames_dropped") or 0)
    sustained = (
        summary.frames_in > 0
        and not summary.skipped
        and not summary.lost
        and dropped == 0
        and summary.raw_recorded == summary.frames_in == summary.stacks_written
    )
    # Nothing lost AND latency not piling up: the median within 3 frame periods. 'every_frame'
    # skips nothing until max_queue_frames, so 'sustained' alone also passes settings over
    # capacity, whose queue (and latency) grows through the run.
    p50 = summary.latency_p50_ms
    steady = sustained and p50 is not None and p50 <= 3 * 1000.0 / rate_hz
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rate_hz": rate_hz,
        "planes": planes,
        "side": side,
        "precision": precision,
        "workers": workers,
        "threads": threads,
        "seconds": seconds,
        "frames_acquired": summary.frames_acquired,
        "frames_in": summary.frames_in,
        "raw_recorded": summary.raw_recorded,
        "stacks_written": summary.stacks_written,
        "skipped": len(summary.skipped),
        "lost": len(summary.lost),
        "source_dropped": dropped,
        "latency_p50_ms": _round(summary.latency_p50_ms),
        "latency_p99_ms": _round(summary.latency_p99_ms),
        "backend": summary.backend,
        "sustained": sustained,
        "steady": steady,
        # where each worker's time went (refocus, send p50/p99 ms; busy share)
        "worker_times": summary.worker_times,
    }


def _verdict(row: dict[str, Any]) -> str:
    """STEADY, or why not: latency growing (over capacity, nothing lost yet) or frames lost."""
    if row["steady"]:
        return "STEADY"
    return "sustained, latency growing" if row["sustained"] else "not sustained"


def _round(value: float | None) -> float | None:
    """Round a latency for the table (None stays None)."""
    return None if value is None else round(value, 1)


def end_to_end(
    settings: list[tuple[float, int]],
    seconds: float,
    side: int,
    backends: list[str],
    model_file: Path | None = None,
    precision: str = "fp32",
    workers: int = 1,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run the daemon on the simulated scope at each (rate_hz, planes) for `seconds`."""
    model, model_name = (model_file, model_file.name) if model_file else model_path()
    print(f"end to end with {model_name}: {model}", flush=True)
    rows = []
    for rate_hz, planes in settings:
        row = run_setting(
            rate_hz=rate_hz,
            planes=planes,
            seconds=seconds,
            side=side,
            model=model,
            backends=backends,
            precision=precision,
            workers=workers,
            threads=threads,
        )
        row["model"] = model_name
        rows.append(row)
        print(
            f"  e2e {side}² {rate_hz:g} Hz × {planes} planes ({precision}, {workers} worker(s)): "
            f"in {row['frames_in']}, "
            f"raw {row['raw_recorded']}, stacks {row['stacks_written']}, skipped "
            f"{row['skipped']}, lost {row['lost']}, p50/p99 {row['latency_p50_ms']}/"
            f"{row['latency_p99_ms']} ms -> " + _verdict(row),
            flush=True,
        )
        for times in row["worker_times"]:
            print(f"    worker {times['worker']}: {format_stage_times(times)}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print a table and write the JSON results."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer frames, shorter e2e runs")
    parser.add_argument("--skip-e2e", action="store_true", help="transport only")
    parser.add_argument("--seconds", type=float, default=None, help="e2e seconds per setting")
    parser.add_argument("--side", type=int, default=128, help="e2e frame side (pixels)")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["openvino", "onnxruntime"],
        help="engine.backends of the daemon under test (first available runs)",
    )
    parser.add_argument(
        "--settings", default=None, help="e2e rate×planes list, e.g. '10x5,20x5,10x11'"
    )
    parser.add_argument("--model", type=Path, default=None, help="model (default: deepz-slim)")
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="engine.precision"
    )
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    parser.add_argument("--threads", type=int, default=None, help="engine.intra_op_threads")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON to write")
    args = parser.parse_args(argv)
    results = transport(args.quick)
    raw = {(r.side, r.transport): r.gb_per_s for r in results if r.method == "raw pyzmq"}
    print(f"{'method':<10} {'via':<4} {'side':>5} {'frames/s':>10} {'GB/s':>7} {'vs raw':>7}")
    for r in results:
        ratio = f"{r.gb_per_s / raw[(r.side, r.transport)]:.0%}" if r.transport != "-" else ""
        print(
            f"{r.method:<10} {r.transport:<4} {r.side:>5} {r.frames_per_s:>10.1f} "
            f"{r.gb_per_s:>7.2f} {ratio:>7}"
        )
    e2e: list[dict[str, Any]] = []
    if not args.skip_e2e:
        default = "5x3,10x3,20x3,10x7" if args.quick else "5x5,10x5,20x5,40x5,10x11,20x11"
        settings = [
            (float(s.split("x")[0]), int(s.split("x")[1]))
            for s in (args.settings or default).split(",")
        ]
        seconds = args.seconds or (8.0 if args.quick else 60.0)
        e2e = end_to_end(
            settings,
            seconds,
            args.side,
            args.backends,
            args.model,
            args.precision,
            args.workers,
            args.threads,
        )
        steady = [r for r in e2e if r["steady"]]
        if steady:
            top = max(steady, key=lambda r: r["rate_hz"] * r["planes"])
            print(
                f"highest steady: {top['rate_hz']:g} Hz × {top['planes']} planes at "
                f"{args.side}² (p50 {top['latency_p50_ms']} ms, p99 {top['latency_p99_ms']} ms)"
            )
    record = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python -m benchmarks.live", *(argv or sys.argv[1:])]),
        "transport": [asdict(r) for r in results],
        "end_to_end": e2e,
    }
    if args.skip_e2e and args.results.is_file():  # transport only: keep the file's daemon runs
        try:
            before = json.loads(args.results.read_text())
            record["end_to_end"] = before.get("end_to_end", [])
            record["end_to_end_from"] = before.get("date")
        except (OSError, ValueError, AttributeError):
            pass
    write_results(args.results, record, measured=bool(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
