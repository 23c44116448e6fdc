"""Offline refocusing throughput against the engine's own, and the Dask LocalCluster speed-up.

    python -m benchmarks.refocus [--frames 64] [--side 256] [--planes 9] [--backend openvino]
                                 [--threads 2] [--skip-cluster] [--note TEXT]
                                 [--model PATH] [--results PATH] [--dtype float16]

Makes a recording of `frames` simulated worm frames (`engine.optics.WormTimeSeries`) with the
project's `Recorder` (lz4, one frame per chunk, as the shipped config), then times:

- the engine: ``backend.infer(frame, dpms)`` over the same frames held in memory (warmed up,
  frozen DPMs: the live worker's call), before and after the offline runs (their mean is the
  reference, since the machine may be shared);
- `live.refocus.refocus_recording` on this machine with the ``sync`` scheduler (one
  thread) and the default ``threads`` scheduler (2 threads sharing one backend: reading and
  writing overlap with inference); both use a backend already loaded and warmed up, as the
  engine row does. Overhead = 1 - offline / engine frames per second;
- a ``dask.distributed`` LocalCluster of 1 and of 2 worker processes (1 thread each, backends
  on 1 intra-op thread, loaded on every worker before timing), against the engine on 1 thread.

The model is the per-plane slim model unless ``--model`` names another (the shipped volume
model: ``engine/weights/deepz-volume.onnx``). Prints a table and writes
``benchmarks/results/refocus.json`` (or ``--results``) with the CPU model (lscpu), the date and
the load average.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import run_record, write_results
from engine.runtime import DEFAULT_MODEL, load_backend
from live.refocus import RefocusSummary, clear_backends, refocus_recording

RESULTS = Path(__file__).resolve().parent / "results"


def make_recording(path: Path, frames: int, side: int, planes: list[float]) -> np.ndarray:
    """Record `frames` worm frames into a run store with the project's Recorder; return them."""
    from engine.optics import WormTimeSeries
    from live.protocol import decode, encode_frame
    from live.recorder import Recorder

    series = WormTimeSeries((side, side), rate_hz=2.0)
    data = np.stack([np.asarray(series.frame(i, 0.0), dtype=np.uint16) for i in range(frames)])
    rec = Recorder(
        path,
        frame_shape=(side, side),
        pixel_size_um=0.3,
        rate_hz=2.0,
        planes_um=planes,
        keep_stacks=False,
        compression="lz4",
    )
    for seq, frame in enumerate(data):
        rec.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=time.time())))
    rec.close()
    return data


def engine_fps(
    frames: np.ndarray, planes: list[float], backend: str, threads: int, model: Path
) -> float:
    """Frames per second of ``backend.infer(frame, dpms)`` over `frames` (after 2 warm-ups)."""
    b = load_backend(model, prefer=[backend], intra_op_threads=threads)
    side = frames.shape[-1]
    dpms = np.array(
        np.broadcast_to(np.array(planes, np.float32)[:, None, None], (len(planes), side, side))
    )
    dpms.setflags(write=False)
    for frame in frames[:2]:
        b.infer(frame, dpms)
    t0 = time.perf_counter()
    for frame in frames:
        b.infer(frame, dpms)
    seconds = time.perf_counter() - t0
    b.close()
    return len(frames) / seconds


def offline(
    store: Path,
    planes: list[float],
    backend: str,
    threads: int,
    name: str,
    scheduler: Any,
    model: Path,
    dtype: str = "float32",
    chunk: int | None = None,
) -> RefocusSummary:
    """One offline run into a fresh image (``overwrite``), timed by its own summary."""
    return refocus_recording(
        store,
        model=model,
        planes=planes,
        backend=backend,
        intra_op_threads=threads,
        overwrite=True,
        name=f"bench_{name}",
        scheduler=scheduler,
        stack_dtype=dtype,
        chunk=chunk,
    )


def cluster_fps(
    store: Path, planes: list[float], backend: str, workers: int, model: Path, dtype: str
) -> tuple[float, float, str]:
    """Frames/s on a LocalCluster of `workers` processes (1 thread each); also its start time."""
    distributed: Any = importlib.import_module("distributed")
    t0 = time.perf_counter()
    with (
        distributed.LocalCluster(
            n_workers=workers,
            processes=True,
            threads_per_worker=1,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        start = time.perf_counter() - t0
        s = offline(store, planes, backend, 1, f"cluster{workers}", client, model, dtype)
    return s.frames_per_s, start, s.scheduler


def main(argv: list[str] | None = None) -> int:
    """Run every case, print the table and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refocus", description=__doc__)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--planes", type=int, default=9, help="planes from -8 to +8 µm")
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, local runs")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. machine load)")
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="model file (default: the slim model)"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS / "refocus.json", help="JSON to write"
    )
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    planes = [float(z) for z in np.linspace(-8.0, 8.0, args.planes)]
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deepz-bench-") as tmp:
        store = Path(tmp) / "run.ome.zarr"
        frames = make_recording(store, args.frames, args.side, planes)
        warm = Path(tmp) / "warm.ome.zarr"
        make_recording(warm, 2, args.side, planes)
        t = args.threads
        m, dt = args.model, args.dtype
        engine_a = engine_fps(frames, planes, args.backend, t, m)
        offline(warm, planes, args.backend, t, "warm", "sync", m, dt)  # load and warm it
        sync = offline(store, planes, args.backend, t, "sync", "sync", m, dt)
        threads = offline(store, planes, args.backend, t, "threads", "threads", m, dt)
        engine_b = engine_fps(frames, planes, args.backend, t, m)
        clear_backends()
        engine = (engine_a + engine_b) / 2
        runs = [engine_a, engine_b]
        rows.append({"case": f"engine, {t} threads", "frames_per_s": engine, "runs": runs})
        served_by = f"{sync.backend} on {sync.device}"  # what ran, not only what was asked
        for label, s in (("offline, sync", sync), ("offline, threads (2)", threads)):
            rows.append(
                {
                    "case": f"{label}, backend {t} threads",
                    "served_by": f"{s.backend} on {s.device}",
                    "frames_per_s": s.frames_per_s,
                    "share_of_engine": s.frames_per_s / engine,
                    "overhead": 1 - s.frames_per_s / engine,
                    "scheduler": s.scheduler,
                }
            )
        if not args.skip_cluster:
            engine1 = engine_fps(frames, planes, args.backend, 1, m)
            rows.append({"case": "engine, 1 thread", "frames_per_s": engine1})
            one, start1, sched1 = cluster_fps(store, planes, args.backend, 1, m, dt)
            two, start2, sched2 = cluster_fps(store, planes, args.backend, 2, m, dt)
            rows.append(
                {
                    "case": "LocalCluster, 1 worker × 1 thread",
                    "frames_per_s": one,
                    "share_of_engine": one / engine1,
                    "cluster_start_s": start1,
                    "scheduler": sched1,
                }
            )
            rows.append(
                {
                    "case": "LocalCluster, 2 workers × 1 thread",
                    "frames_per_s": two,
                    "speedup_vs_1_worker": two / one if one > 0 else None,
                    "cluster_start_s": start2,
                    "scheduler": sched2,
                }
            )
    print(f"{args.frames} frames of {args.side}² × {args.planes} planes, {args.backend}")
    print(f"{'case':<44} {'frames/s':>9} {'vs engine':>10} {'speed-up':>9}")
    for r in rows:
        share = f"{100 * r['share_of_engine']:.1f} %" if "share_of_engine" in r else ""
        speedup = r.get("speedup_vs_1_worker")
        speed = f"{speedup:.2f}×" if speedup is not None else ""
        print(f"{r['case']:<44} {r['frames_per_s']:>9.2f} {share:>10} {speed:>9}")
    record = {
        **run_record("benchmarks.refocus", argv, args.note, load_before),
        "frames": args.frames,
        "side": args.side,
        "planes": planes,
        "backend": args.backend,
        "served_by": served_by,
        "model": str(args.model),
        "dtype": args.dtype,
        "rows": rows,
    }
    write_results(args.results, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
