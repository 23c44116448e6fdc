"""Command line: ``python -m export onnx ...`` and ``python -m export tensorrt ...``.

Examples
--------
python -m export onnx --weights engine/weights/deepz-slim.pt --out engine/weights/deepz-slim.onnx
python -m export tensorrt --onnx engine/weights/deepz-slim.onnx --fp16 --frame-shape 512 512
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    """Build the argument parser with the two subcommands."""
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    onnx_p = sub.add_parser("onnx", help="export .pt weights to ONNX and check parity with torch")
    onnx_p.add_argument("--weights", type=Path, required=True, help=".pt with its .json beside")
    onnx_p.add_argument("--out", type=Path, help="output .onnx (default: beside the weights)")
    onnx_p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    trt_p = sub.add_parser("tensorrt", help="build (or find cached) a TensorRT engine")
    trt_p.add_argument("--onnx", type=Path, required=True, help="exported .onnx model")
    trt_p.add_argument("--fp16", action="store_true", help="allow FP16 kernels (else FP32)")
    trt_p.add_argument(
        "--frame-shape",
        type=int,
        nargs=2,
        action="append",
        metavar=("H", "W"),
        help="frame size to cover; repeat for several (default 256², 512², 1024²)",
    )
    trt_p.add_argument("--max-batch", type=int, help="most planes per call (default 41)")
    trt_p.add_argument(
        "--scope", type=Path, help="config.toml: take source.frame_shape and engine.max_batch"
    )
    trt_p.add_argument("--cache-dir", type=Path, help="engine cache (default ~/.cache/...)")
    trt_p.add_argument("--rebuild", action="store_true", help="build even when cached")
    return parser


def _onnx(args: argparse.Namespace) -> int:
    """Run the ONNX export and print the parity table."""
    from engine.metadata import ModelMetadataError
    from export._onnx import ParityError, export_weights

    out = args.out or args.weights.with_suffix(".onnx")
    try:
        report = export_weights(args.weights, out, opset=args.opset)
    except (ParityError, FileNotFoundError, ModelMetadataError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(report.table())
    print(f"wrote {out}  (max abs {report.max_abs:.2e}, max rel {report.max_rel:.2e})")
    return 0


def _scope_shapes(path: Path) -> tuple[tuple[int, int], int]:
    """Read (source.frame_shape, engine.max_batch) from a scope config.toml."""
    with path.open("rb") as f:
        scope = tomllib.load(f)
    try:
        h, w = (int(v) for v in scope["source"]["frame_shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SystemExit(f"{path}: source.frame_shape must be [height, width] ({exc})") from exc
    return (h, w), int(scope.get("engine", {}).get("max_batch", 41))


def _tensorrt(args: argparse.Namespace) -> int:
    """Build or look up the TensorRT engine and print where it is."""
    from engine.runtime import onnx_metadata

    try:
        from engine.runtime import build_tensorrt_engine
    except ImportError as exc:
        print(
            f"TensorRT is not usable here ({exc}); install it on a CUDA machine with "
            "pip install 'deepz-live[gpu]'",
            file=sys.stderr,
        )
        return 2

    metadata = onnx_metadata(args.onnx)
    frames: list[tuple[int, int]] = [(h, w) for h, w in args.frame_shape or []]
    max_batch = args.max_batch
    if args.scope is not None:
        scope_frame, scope_batch = _scope_shapes(args.scope)
        frames.append(scope_frame)
        max_batch = max_batch or scope_batch
    entry, key, built = build_tensorrt_engine(
        args.onnx,
        metadata,
        precision="fp16" if args.fp16 else "fp32",
        frame_shapes=frames or None,
        max_batch=max_batch or 41,
        cache_dir=args.cache_dir,
        rebuild=args.rebuild,
    )
    state = "built" if built else "cached"
    print(f"{state}: {entry.plan}\n  gpu {key.gpu}, TensorRT {key.tensorrt}, {key.precision}")
    print(f"  profile min {key.min_shape} opt {key.opt_shape} max {key.max_shape}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # the exporter's pass-by-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    if args.command == "onnx":
        return _onnx(args)
    return _tensorrt(args)


if __name__ == "__main__":
    sys.exit(main())
