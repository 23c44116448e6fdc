"""What one GPU could refocus per second with the volume model: network and render in torch.

``python -m benchmarks.gpu_volume [--weights engine/weights/deepz-volume.pt] [--sizes 256 512
1024 2048] [--precisions fp16 bf16]``

Issue 11 asks for 100 Hz × 41 planes of 512² on one GPU, and for the largest frame that still
sustains 100 Hz. The daemon's GPU path is TensorRT (`engine.runtime`), which this workplace's
lent GPU machine cannot run: its image has no TensorRT, nothing can be installed there from a
registry, and TensorRT's libraries are far larger than what a call may carry (README, known
gaps). Its image does have CUDA torch, so this benchmark measures the same work in torch: the
shipped volume network (channels-last, fp16 or bf16 autocast, batch 1) and the rendering of 41
planes (the model's whole depth grid) from its density through the model's PSF bank by FFTs
(`engine.train_volume.TorchRenderer` on the whole frame; the residual's low-pass, one more
FFT, is left out), each timed with CUDA events after a warm-up. ``frames_per_s`` is
1000 / (network + render): a ceiling on the GPU's side of the pipeline, not the daemon's rate
(frames still cross the host, and TensorRT would fuse more). Writes
``benchmarks/results/gpu_volume.json``. Benchmarks may import torch; the live runtime never
does.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import run_record, write_results

RESULTS = Path(__file__).parent / "results" / "gpu_volume.json"
DEFAULT_WEIGHTS = Path(__file__).parents[1] / "engine" / "weights" / "deepz-volume.pt"
PLANES = 41
"""Planes per frame in issue 11's target (the shipped model's depth grid)."""


def _cuda_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `fn` on the current CUDA stream (CUDA events), after warm-up."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        stop = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def _network(net: Any, x: Any, dtype: Any) -> Any:
    """One forward pass under autocast, without autograd."""
    import torch

    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        return net(x)


def _render(renderer: Any, density: Any, dz: np.ndarray) -> Any:
    """The planes `dz` from one density, without autograd."""
    import torch

    with torch.no_grad():
        return renderer.render(density, dz)


def run(
    weights: Path, sizes: Sequence[int], precisions: Sequence[str], repeats: int
) -> list[dict[str, Any]]:
    """Time network and render per frame size and precision on the first CUDA device."""
    import torch

    from engine.model import load_model
    from engine.train_volume import TorchRenderer
    from engine.volume import load_psf_bank

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu_volume needs a CUDA GPU; torch sees none here")
    model, meta = load_model(weights, "cuda")
    if meta.volume is None:
        raise SystemExit(f"{weights} is not a volume model")
    depth = np.asarray(meta.volume.depth_um)
    psf = load_psf_bank(weights.parent / meta.volume.psf_file, depth.size)
    net = model.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    dz = depth  # every plane of the model's grid: 41 for the shipped model
    rows = []
    for side in sizes:
        renderer = TorchRenderer(psf, depth, side, device="cuda")
        x = torch.randn(1, 1, side, side, device="cuda").to(memory_format=torch.channels_last)
        for precision in precisions:
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            network = partial(_network, net, x, dtype)
            density = network().float().contiguous()
            net_ms = _cuda_ms(network, repeats)
            render_ms = _cuda_ms(partial(_render, renderer, density, dz), repeats)
            total = net_ms + render_ms
            row = {
                "side": side,
                "precision": precision,
                "planes": int(dz.size),
                "network_ms": round(net_ms, 3),
                "render_ms": round(render_ms, 3),
                "frames_per_s": round(1e3 / total, 1),
                "planes_per_s": round(dz.size * 1e3 / total),
            }
            rows.append(row)
            print(
                f"{side:>5}² {precision}: network {net_ms:7.3f} ms, render {render_ms:7.3f} ms "
                f"-> {row['frames_per_s']:8.1f} frames/s × {dz.size} planes",
                flush=True,
            )
        del renderer
        torch.cuda.empty_cache()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_volume")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import torch

    load_before = os.getloadavg()
    command = None if argv is None else list(argv)
    rows = run(args.weights, args.sizes, args.precisions, args.repeats)
    at_100 = [r["side"] for r in rows if r["frames_per_s"] >= 100]
    print(f"largest frame at >= 100 Hz × {PLANES} planes: {max(at_100) if at_100 else 'none'}²")
    result = {
        **run_record("benchmarks.gpu_volume", command, None, load_before),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "weights": str(args.weights),
        "rows": rows,
    }
    write_results(args.results, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
