"""Cost of a volume from the volume model: one network pass, then planes rendered from it.

``python -m benchmarks.volume [--model engine/weights/deepz-volume.onnx] [--sizes 256 512]
[--planes 9 41] [--backends openvino onnxruntime] [--precisions fp32 bf16]``

For each backend and frame size: the network pass (frame -> density on 41 depths), the
rendering of P uniform planes through the model's PSF (`engine.volume.Renderer`, numpy on the
host, written in float16 as the daemon records them), the whole `infer` call and `refocus` onto
a plan of those planes (the daemon's call, float16), in ms per frame, and planes per second (of
`infer`); the CPU time of the network, the render and `refocus` (every thread of the process:
``2000 / refocus_cpu_ms`` is the most frames per second 2 cores could refocus, before the
daemon's own work); the network's
achieved GFLOP/s against a float32 matmul peak measured in the same run (bfloat16 can pass
it: the peak is float32's). A backend that cannot run a precision here (onnxruntime has no
bf16; a CPU without AVX-512-BF16 / AMX neither) is skipped with its reason. Compare with the
per-plane model in `benchmarks/results/engine.json` (one network pass per plane). With
``--graph``, the whole refocus as one ONNX graph (`engine.render_graph`: the render as matrix
products, for GPUs) is timed too, on ONNX Runtime's CPU provider (``graph_ms``), with its
largest deviation from `infer` relative to the planes' peak. Writes
``benchmarks/results/volume.json``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.engine import matmul_peak
from benchmarks.machine import cpu_model, write_results

RESULTS = Path(__file__).parent / "results" / "volume.json"
DEFAULT_MODEL = Path(__file__).parents[1] / "engine" / "weights" / "deepz-volume.onnx"


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn` (ms), after one warm-up call."""
    return _timed(fn, repeats)[0]


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of `fn` (ms), after one warm-up call.

    The CPU time is the whole process's, every thread's (the backend's and the renderer's
    pools): what the call takes out of the machine, which bounds the rate a machine of N
    cores can sustain (N x 1000 / CPU ms) whatever the threading.
    """
    fn()  # warm-up (allocations, kernel choice, PSF transforms)
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls) * 1e3), float(np.median(cpus) * 1e3)


def run(
    model: Path,
    sizes: Sequence[int],
    planes: Sequence[int],
    backends: Sequence[str],
    repeats: int,
    precisions: Sequence[str] = ("fp32",),
    graph: bool = False,
) -> list[dict[str, Any]]:
    """Time network, rendering and `infer` for each backend, precision, size and plane count."""
    from engine.dpm import VolumePlan
    from engine.runtime import BackendError, load_backend

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for name, precision in [(b, q) for b in backends for q in precisions]:
        try:
            backend = load_backend(
                model,
                prefer=[name],
                intra_op_threads=2,
                precision=precision,  # type: ignore[arg-type]
            )
        except BackendError as err:
            print(f"{name} {precision}: skipped ({' '.join(str(err).split())})", flush=True)
            continue
        flops = float(backend.metadata.extra.get("flops_per_pixel", float("nan")))
        for side in sizes:
            frame = rng.integers(100, 3000, (side, side), dtype=np.uint16)
            density = backend.volume(frame)[0]
            render = backend.renderer((side, side))
            net_ms, net_cpu = _timed(partial(backend.volume, frame), repeats)
            for p in planes:
                z = np.linspace(-8.0, 8.0, p) if p < 41 else np.arange(-10.0, 10.001, 0.5)
                z = np.round(z * 2) / 2
                dpms = np.broadcast_to(z.astype(np.float32)[:, None, None], (p, side, side))
                render_ms, render_cpu = _timed(
                    partial(render.planes, density, frame, z, np.float16), repeats
                )
                infer_ms = _median_ms(partial(backend.infer, frame, dpms), repeats)
                plan = VolumePlan.from_z(z, (side, side))  # the daemon's call: refocus
                refocus_ms, refocus_cpu = _timed(
                    partial(backend.refocus, frame, plan, dtype=np.float16), repeats
                )
                extra = _graph_row(model, backend, frame, z, dpms, repeats) if graph else {}
                rows.append(
                    {
                        "backend": name,
                        "precision": backend.precision,  # what "auto" resolved to
                        "side": side,
                        "planes": p,
                        "network_ms": round(net_ms, 1),
                        "render_ms": round(render_ms, 1),
                        "infer_ms": round(infer_ms, 1),
                        "refocus_ms": round(refocus_ms, 1),
                        "network_cpu_ms": round(net_cpu, 1),
                        "render_cpu_ms": round(render_cpu, 1),
                        "refocus_cpu_ms": round(refocus_cpu, 1),
                        "ceiling_hz_2_cores": round(2e3 / refocus_cpu, 1),
                        "frames_per_s": round(1e3 / infer_ms, 2),
                        "planes_per_s": round(p * 1e3 / infer_ms, 1),
                        "network_gflop_per_s": round(flops * side * side / net_ms / 1e6, 1),
                        **extra,
                    }
                )
                print(
                    f"{name:<12} {backend.precision} {side:>4}² × {p:>2}: network "
                    f"{net_ms:7.1f} ms, render {render_ms:7.1f} ms, infer {infer_ms:7.1f} ms, "
                    f"refocus {refocus_ms:7.1f} ms = "
                    f"{p * 1e3 / infer_ms:6.1f} "
                    f"planes/s; CPU: network {net_cpu:.0f}, render {render_cpu:.0f}, refocus "
                    f"{refocus_cpu:.0f} ms (2 cores: at most {2e3 / refocus_cpu:.1f} Hz)",
                    flush=True,
                )
        backend.close()
    return rows


def _graph_row(
    model: Path, backend: Any, frame: np.ndarray, z: np.ndarray, dpms: np.ndarray, repeats: int
) -> dict[str, Any]:
    """Time the whole refocus as one ONNX graph on ONNX Runtime's CPU provider (2 threads)."""
    import onnx
    import onnxruntime as ort

    from engine.render_graph import FRAME_NAME, planes_model
    from engine.volume import load_psf_bank

    volume = backend.metadata.volume
    depth = np.asarray(volume.depth_um)
    psf = load_psf_bank(model.parent / volume.psf_file, depth.size)
    graph = planes_model(
        onnx.load(str(model)), psf, depth, frame.shape, z, backend.metadata.size_multiple
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {FRAME_NAME: frame.astype(np.float32)[None, None]}
    planes = session.run(None, feed)[0][0]
    host = backend.infer(frame, dpms)
    return {
        "graph_ms": round(_median_ms(partial(session.run, None, feed), repeats), 1),
        "graph_max_rel_dev": float(np.abs(planes - host).max() / np.abs(host).max()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.volume")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--planes", type=int, nargs="+", default=[9, 41])
    p.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--graph", action="store_true", help="also time engine.render_graph (ORT)")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON to write")
    args = p.parse_args(argv)
    rows = run(
        args.model,
        args.sizes,
        args.planes,
        args.backends,
        args.repeats,
        args.precisions,
        args.graph,
    )
    peak = matmul_peak()  # same run, same load: the ratio is what compares across machines
    for row in rows:
        row["network_peak_fraction"] = round(row["network_gflop_per_s"] / peak["peak"], 3)
    shares = {(r["backend"], r["precision"], r["side"]): r["network_peak_fraction"] for r in rows}
    print(f"float32 matmul peak {peak['peak']:.0f} GFLOP/s; the network reaches")
    for (backend, precision, side), share in shares.items():
        print(f"  {backend:<12} {precision} {side}²: {share:.0%} of it")
    print("(FLOPs are the direct convolution's: a Winograd kernel can exceed 100 %)")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": cpu_model(),
        "model": str(args.model),
        "matmul_peak_gflop_per_s": peak,
        "rows": rows,
    }
    write_results(args.results, result, measured=bool(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
