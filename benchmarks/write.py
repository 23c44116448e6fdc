"""Sustained recorder write throughput on this disk: float32 or float16 stacks, sharded or not.

    python -m benchmarks.write [--seconds 10] [--shape 512] [--planes 41] [--rate-hz 100]
                               [--compression lz4] [--max-gb 3] [--dir PATH] [--synthetic]
                               [--note TEXT]

First it refocuses simulated worm frames (`engine.optics.WormTimeSeries`) with the shipped
volume model (``engine/weights/deepz-volume.onnx``, OpenVINO or ONNX Runtime) onto `planes`
planes from -10 to +10 µm: two frames as the simulated camera gives them, the first one scaled
so that its brightest pixel is at 65535 counts (a camera used to its full range), and scaled 4×
further and clipped at 65535 (overexposed, as a saturated camera records it). For each it
measures what float16 costs against the float32 stacks: the largest and RMS relative error,
the largest absolute error in counts, and how many values lie beyond the float16 range (65504,
saturated), with uint16 (rounded, negatives and values above 65535 clipped) beside it.

Then, for each of float32 / float16 stacks × one file per item / zarr v3 shards of about
1 s at `rate_hz` (the daemon's ``recorder.shard_s``), it feeds raw frames and those stacks
through the real `live.recorder.Recorder` (``recorder.compression``, one frame per chunk) as
fast as the recorder writes them for `seconds` (or `max_gb` of items), holding its backlog
at a few items, closes it and syncs the disk. Throughput counts what the recorder put on disk
over the time to the end of the sync, so the page cache does not flatter it: items per
second, uncompressed GB/s (the bytes the camera and the engine produce), GB/s on disk, and the
files the store gained per second and per 100 frames (a 100 Hz second). Each store is deleted
before the next case.

Prints a table and writes ``benchmarks/results/write.json`` with the CPU model (lscpu), the
date and the load average (the machine may be shared). ``--synthetic`` skips the model (smooth
random stacks instead; for tests and quick checks).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import run_record, write_results

RESULTS = Path(__file__).resolve().parent / "results"
VOLUME_MODEL = Path(__file__).resolve().parent.parent / "engine" / "weights" / "deepz-volume.onnx"
MAX_BACKLOG = 8
"""Items the feeder lets wait in the recorder's queue before it waits itself."""
BRIGHT = ["0 at full scale", "0 overexposed 4x"]
"""Names of the last two frames of `refocused_bank` (for the error table only)."""
CASES = [
    ("float32", 0.0),
    ("float32", 1.0),
    ("float16", 0.0),
    ("float16", 1.0),
]
"""(stack dtype, shard_s) of each case; shard_s 0 is one file per frame and per stack."""


def refocused_bank(
    shape: tuple[int, int], n_planes: int, *, synthetic: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Return worm frames (N, H, W) uint16, their stacks (N, P, H, W) float32 and the model used.

    Frames 0 and 1 are the simulator's; the last two are frame 0 at full scale and overexposed
    (`BRIGHT`). Without `synthetic` the stacks are the shipped volume model's.
    """
    from engine.optics import WormTimeSeries

    series = WormTimeSeries(shape, rate_hz=100.0, seed=0)
    frames = [series.frame(i).astype(np.float64) for i in range(2)]
    for gain in (1.0, 4.0):
        full = frames[0] * (gain * 65535.0 / frames[0].max())
        frames.append(np.clip(np.rint(full), 0, 65535))
    images = np.stack(frames).astype(np.uint16)
    z = np.linspace(-10.0, 10.0, n_planes, dtype=np.float32)
    if synthetic:
        rng = np.random.default_rng(0)
        weights = np.abs(1.0 - np.abs(z) / 10.0)[:, None, None] + 0.5
        stacks = np.stack([weights * f + rng.normal(0, 2, f.shape) for f in images])
        return images, stacks.astype(np.float32), {"model": "synthetic", "backend": None}
    from engine.runtime import load_backend

    backend = load_backend(VOLUME_MODEL, prefer=["openvino", "onnxruntime"], frame_shape=shape)
    dpms = np.array(np.broadcast_to(z[:, None, None], (n_planes, *shape)))
    dpms.setflags(write=False)
    stacks = np.stack([backend.infer(f, dpms) for f in images])
    model = {"model": VOLUME_MODEL.name, "backend": backend.name}
    backend.close()
    return images, stacks, model


def dtype_error(stack: np.ndarray) -> dict[str, float | int]:
    """What storing `stack` (float32 counts) as float16, or as uint16, costs.

    Relative errors are over the values with magnitude of at least 1 count; float16 values
    beyond its range are saturated (`live.store.as_stack_dtype`) and counted.
    """
    from live.store import as_stack_dtype

    exact = stack.astype(np.float64)
    half, clipped = as_stack_dtype(stack, "float16")
    whole = np.clip(np.rint(exact), 0, 65535).astype(np.uint16)
    lit = np.abs(exact) >= 1.0
    row: dict[str, float | int] = {
        "min_counts": float(exact.min()),
        "max_counts": float(exact.max()),
        "float16_saturated": clipped,
        "uint16_clipped": int(np.count_nonzero((exact < -0.5) | (exact > 65535.5))),
    }
    for name, stored in (("float16", half), ("uint16", whole)):
        error = np.abs(stored.astype(np.float64) - exact)
        relative = error[lit] / np.abs(exact[lit])
        row[f"{name}_max_rel"] = float(relative.max())
        row[f"{name}_rms_rel"] = float(np.sqrt(np.mean(relative**2)))
        row[f"{name}_max_abs"] = float(error.max())
    return row


def run_case(
    directory: Path,
    frames: np.ndarray,
    stacks: np.ndarray,
    *,
    stack_dtype: str,
    shard_s: float,
    seconds: float,
    max_bytes: float,
    compression: str,
    rate_hz: float,
) -> dict[str, Any]:
    """Record as fast as the recorder writes for `seconds`; return throughput, files, backlog."""
    from live.protocol import decode, encode_frame, encode_stack
    from live.recorder import Recorder
    from live.store import as_stack_dtype

    path = directory / f"{stack_dtype}-{shard_s:g}.ome.zarr"
    bank = [as_stack_dtype(s, stack_dtype)[0] for s in stacks]  # as the worker sends them
    n_planes, shape = stacks.shape[1], frames.shape[1:]
    item_bytes = frames[0].nbytes + bank[0].nbytes
    rec = Recorder(
        path,
        frame_shape=(int(shape[0]), int(shape[1])),
        pixel_size_um=0.3,
        rate_hz=rate_hz,
        planes_um=[float(z) for z in np.linspace(-10.0, 10.0, n_planes)],
        compression=compression,
        min_free_mb=2000.0,
        stack_dtype=stack_dtype,
        shard_s=shard_s,
    )
    seq, backlog_max, held_max = 0, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds and seq * item_bytes < max_bytes:
        while rec.backlog >= MAX_BACKLOG:
            time.sleep(0.001)
        k, t = seq % len(frames), seq / rate_hz
        rec.put_frame(decode(encode_frame(frames[k], seq=seq, timestamp_s=t)))
        parts = encode_stack(bank[k], seq=seq, timestamp_s=t, focus_um=0.0, latency_ms=0.0)
        rec.put_stack(decode(parts))
        backlog_max, held_max = max(backlog_max, rec.backlog), max(held_max, rec.held)
        seq += 1
    fed_s = time.perf_counter() - start
    summary = rec.close()
    closed_s = time.perf_counter() - start
    os.sync()
    synced_s = time.perf_counter() - start
    files = sum(1 for f in path.rglob("*") if f.is_file())
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    shutil.rmtree(path)
    items = summary.raw_frames + summary.stacks
    return {
        "stack_dtype": stack_dtype,
        "shard_s": shard_s,
        "shard_frames": rec.shard_t,
        "frames": summary.raw_frames,
        "stacks": summary.stacks,
        "error": summary.error,
        "fed_s": fed_s,
        "closed_s": closed_s,
        "synced_s": synced_s,
        "frames_per_s": summary.raw_frames / synced_s,
        "gb_per_s": summary.raw_frames * item_bytes / synced_s / 1e9,
        "gb_per_s_before_sync": summary.raw_frames * item_bytes / closed_s / 1e9,
        "disk_gb_per_s": disk / synced_s / 1e9,
        "compression_ratio": summary.raw_frames * item_bytes / max(disk, 1),
        "files": files,
        "files_per_s": files / synced_s,
        "files_per_100_frames": 100 * files / max(summary.raw_frames, 1),
        "items": items,
        "backlog_max": backlog_max,
        "held_max": held_max,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the dtype error, run every case, print the table and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.write", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="feeding time per case")
    parser.add_argument("--shape", type=int, default=512, help="frame side, pixels")
    parser.add_argument("--planes", type=int, default=41, help="planes from -10 to +10 µm")
    parser.add_argument("--rate-hz", type=float, default=100.0, help="sizes the 1 s shards")
    parser.add_argument("--compression", default="lz4", choices=["none", "zstd", "lz4"])
    parser.add_argument("--max-gb", type=float, default=3.0, help="items fed per case, at most")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--synthetic", action="store_true", help="no model: synthetic stacks")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. machine load)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS / "write.json", help="results JSON to write"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()
    shape = (args.shape, args.shape)
    frames, stacks, model = refocused_bank(shape, args.planes, synthetic=args.synthetic)
    errors: list[dict[str, Any]] = [{"frame": i, **dtype_error(s)} for i, s in enumerate(stacks)]
    for error, name in zip(errors[-len(BRIGHT) :], BRIGHT, strict=True):
        error["frame"] = name
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepz-write-", dir=args.dir) as tmp:
        for stack_dtype, shard_s in CASES:
            rows.append(
                run_case(
                    Path(tmp),
                    frames[: -len(BRIGHT)],  # the bright frames are for the error table only
                    stacks[: -len(BRIGHT)],
                    stack_dtype=stack_dtype,
                    shard_s=shard_s,
                    seconds=args.seconds,
                    max_bytes=args.max_gb * 1e9,
                    compression=args.compression,
                    rate_hz=args.rate_hz,
                )
            )
    _print(args, model, errors, rows)
    record = {
        **run_record("benchmarks.write", argv, args.note, load_before),
        "shape": list(shape),
        "planes": args.planes,
        "rate_hz": args.rate_hz,
        "compression": args.compression,
        **model,
        "dtype_error": errors,
        "rows": rows,
    }
    write_results(args.results, record, measured=bool(rows))
    return 0


def _print(
    args: argparse.Namespace,
    model: dict[str, Any],
    errors: list[dict[str, Any]],
    rows: list[dict[str, Any]],
) -> None:
    """Print the error table and the throughput table."""
    print(f"{args.shape}² frames, {args.planes} planes, {model['model']} on {model['backend']}")
    print(f"{'frame':<18} {'max counts':>11} {'f16 max rel':>12} {'f16 rms rel':>12} "
          f"{'f16 sat.':>9} {'u16 max rel':>12} {'u16 clip':>9}")  # fmt: skip
    for e in errors:
        print(
            f"{e['frame']!s:<18} {e['max_counts']:>11.1f} {e['float16_max_rel']:>12.2e} "
            f"{e['float16_rms_rel']:>12.2e} {e['float16_saturated']:>9d} "
            f"{e['uint16_max_rel']:>12.2e} {e['uint16_clipped']:>9d}"
        )
    print(f"{'stacks':<8} {'shard':>6} {'frames/s':>9} {'GB/s':>6} {'no sync':>8} "
          f"{'disk GB/s':>9} {'files/s':>8} {'files/100 fr':>12} {'backlog':>8}")  # fmt: skip
    for r in rows:
        shard = f"{r['shard_s']:g} s" if r["shard_s"] else "none"
        print(
            f"{r['stack_dtype']:<8} {shard:>6} {r['frames_per_s']:>9.1f} {r['gb_per_s']:>6.2f} "
            f"{r['gb_per_s_before_sync']:>8.2f} {r['disk_gb_per_s']:>9.2f} "
            f"{r['files_per_s']:>8.1f} {r['files_per_100_frames']:>12.1f} "
            f"{r['backlog_max']:>8d}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
