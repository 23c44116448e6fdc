"""Command line: ``python -m export onnx ...`` and ``python -m export tensorrt ...``.

Examples
--------
python -m export onnx --weights runs/volume/deepz-volume.pt --out runs/volume/deepz-volume.onnx
python -m export tensorrt --onnx engine/weights/deepz-volume.onnx --scope config.toml
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:
    from engine.metadata import ModelMetadata


def _parser() -> argparse.ArgumentParser:
    """Build the argument parser with the two subcommands."""
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    onnx_p = sub.add_parser("onnx", help="export .pt weights to ONNX and check parity with torch")
    onnx_p.add_argument("--weights", type=Path, required=True, help=".pt with its .json beside")
    onnx_p.add_argument(
        "--out",
        type=Path,
        help="output .onnx (default: beside the weights, except the shipped weights': their "
        "ONNX is replaced only when --out names it)",
    )
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
    trt_p.add_argument(
        "--max-batch", type=int, help="most inputs per call (default: the runtime's, 64)"
    )
    trt_p.add_argument(
        "--scope",
        type=Path,
        help="config.toml: build what the daemon asks for with it (source.frame_shape, "
        "engine.max_batch, engine.precision)",
    )
    trt_p.add_argument("--cache-dir", type=Path, help="engine cache (default ~/.cache/...)")
    trt_p.add_argument("--rebuild", action="store_true", help="build even when cached")
    return parser


def _onnx(args: argparse.Namespace) -> int:
    """Run the ONNX export and print the parity table.

    Exit 2 for input that cannot be exported (a missing or unreadable model, an output path
    that cannot be written), 1 when the export itself fails its checks.
    """
    import onnx

    from engine.metadata import ModelMetadataError
    from engine.runtime import DEFAULT_MODEL
    from export._onnx import ParityError, export_weights

    out = args.out or args.weights.with_suffix(".onnx")
    # the shipped models' folder: an export writes there only when --out names it
    if args.out is None and out.resolve().parent == DEFAULT_MODEL.parent:
        print(
            f"error: --out not given, and beside {args.weights} is the shipped {out.name}: "
            "name it with --out to release new weights, or give another --out",
            file=sys.stderr,
        )
        return 2
    try:
        report = export_weights(args.weights, out, opset=args.opset)
    except (ParityError, onnx.checker.ValidationError) as exc:
        print(f"export failed, {out} left as it was: {exc}", file=sys.stderr)
        return 1
    except (OSError, ModelMetadataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"wrote {out}  (max abs {report.max_abs:.2e}, max rel {report.max_rel:.2e})")
    return 0


SCOPE_KEYS: dict[str, frozenset[str]] = {
    "": frozenset(
        {
            "version",
            "source",
            "engine",
            "planes",
            "endpoints",
            "recorder",
            "display",
            "overload",
            "security",
        }
    ),
    "source": frozenset(
        {
            "kind",
            "frame_shape",
            "pixel_size_um",
            "objective_na",
            "emission_wavelength_um",
            "rate_hz",
            "exposure_ms",
            "frame_count",
            "simulator",
            "replay",
            "micromanager",
        }
    ),
    "engine": frozenset(
        {
            "model_path",
            "backends",
            "precision",
            "max_batch",
            "intra_op_threads",
            "allow_extrapolation",
            "render_modality",
            "psf_bank",
            "optics_check",
            "optics_rel_tol",
        }
    ),
}
"""The keys a scope file may have at its top, in [source] and in [engine].

`export` must not import `live` (the packages depend ``live -> engine <- export``), so it
cannot run the daemon's validator (`live.config.load_config`); it checks the keys it reads
and the names around them, so that a misspelt ``[engine]`` or ``precison`` is refused
instead of building an engine the daemon never asks for. tests/test_export.py holds these
names equal to `live.config.ScopeConfig`'s.
"""


def _table(scope: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """Return section `name` of `scope` ({} when absent); refuse a non-table or unknown key."""
    section = scope.get(name, {})
    if not isinstance(section, dict):
        raise ValueError(f"{path}: {name} is {section!r}, not a [{name}] table")
    _known_keys(section, name, path)
    return section


def _known_keys(table: dict[str, Any], name: str, path: Path) -> None:
    """Refuse a key of `table` (the section `name`, "" = top) that a scope file cannot have."""
    unknown = sorted(set(table) - SCOPE_KEYS[name])
    if unknown:
        dotted = f"{name}.{unknown[0]}" if name else unknown[0]
        what = f"section [{dotted}]" if isinstance(table[unknown[0]], dict) else f"key {dotted}"
        where = f"[{name}]" if name else "the top"
        allowed = ", ".join(sorted(SCOPE_KEYS[name]))
        raise ValueError(f"{path}: unknown {what} (at {where} a scope file has {allowed})")


def _scope_engine(path: Path) -> tuple[tuple[int, int], int, str]:
    """Read (source.frame_shape, engine.max_batch, precision to build) from a scope config.toml.

    The precision is what `TensorRTBackend` builds for the file's ``engine.precision``.
    Raises `ValueError` (one line naming the file and key) for a file that cannot be read,
    an unknown section or key, a section that is not a table, a frame shape that is not two
    sizes ("auto" is read from the camera at start: give --frame-shape instead), a max batch
    that is not a whole number >= 1, or a precision TensorRT does not run.
    """
    from engine.runtime import BACKEND_PRECISIONS, DEFAULT_MAX_BATCH, Precision

    try:
        with path.open("rb") as f:
            scope = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the scope config: {exc}") from None
    _known_keys(scope, "", path)
    source, engine = _table(scope, "source", path), _table(scope, "engine", path)
    shape = source.get("frame_shape", (256, 256))
    if not (
        isinstance(shape, (list, tuple))
        and len(shape) == 2
        and all(type(v) is int and v >= 1 for v in shape)
    ):
        raise ValueError(
            f"{path}: source.frame_shape is {shape!r}, not [height, width] (a shape read from "
            "the camera at start: give --frame-shape H W)"
        )
    max_batch = engine.get("max_batch", DEFAULT_MAX_BATCH)
    if type(max_batch) is not int or max_batch < 1:
        raise ValueError(f"{path}: engine.max_batch is {max_batch!r}, not a whole number >= 1")
    precision = engine.get("precision", "fp32")
    # what `TensorRTBackend` builds for it: "auto" is fp32 there; another precision makes it
    # skip TensorRT, so no engine built here would be used
    builds = {"auto": "fp32", **{p: p for p in BACKEND_PRECISIONS["tensorrt"]}}
    if not isinstance(precision, str) or precision not in builds:
        known = precision in get_args(Precision)
        why = "TensorRT skips it (it builds" if known else "not a precision (TensorRT builds"
        runs = ", ".join(f'"{p}"' for p in BACKEND_PRECISIONS["tensorrt"])
        raise ValueError(
            f'{path}: engine.precision is {precision!r}: {why} {runs} or "auto" = fp32)'
        )
    return (shape[0], shape[1]), max_batch, builds[precision]


def engine_request(
    args: argparse.Namespace,
    metadata: ModelMetadata,
    scope: tuple[tuple[int, int], int, str] | None = None,
) -> tuple[list[tuple[int, int]] | None, int, str]:
    """Return the frame shapes, max batch and precision to build for, as the backend would.

    With ``--scope`` these are what the daemon's `TensorRTBackend` asks for with that config
    (`engine.runtime.serving_frame_shapes`, the config's max batch and precision), so the
    engine built here is the cached one the daemon finds; ``--frame-shape`` adds shapes,
    ``--max-batch`` and ``--fp16`` override. `scope` is ``_scope_engine(args.scope)`` when
    the caller has read it already.
    """
    from engine.runtime import DEFAULT_MAX_BATCH, serving_frame_shapes

    shapes: list[tuple[int, int]] = [(h, w) for h, w in args.frame_shape or []]
    max_batch, precision = DEFAULT_MAX_BATCH, "fp32"
    if scope is None and args.scope is not None:
        scope = _scope_engine(args.scope)
    if scope is not None:
        frame, max_batch, precision = scope
        shapes.insert(0, frame)
    if args.max_batch is not None:
        max_batch = args.max_batch
    if args.fp16:
        precision = "fp16"
    if not shapes:
        return None, max_batch, precision
    first = serving_frame_shapes(metadata, shapes[0])
    assert first is not None
    return [*shapes, *first[1:]], max_batch, precision


def _tensorrt(args: argparse.Namespace) -> int:
    """Build or look up the TensorRT engine and print where it is (exit 2: bad input).

    The scope file is checked first, so a broken one is named even where TensorRT is missing.
    """
    from engine.metadata import ModelMetadataError
    from engine.runtime import BackendError, onnx_metadata

    try:
        scope = _scope_engine(args.scope) if args.scope is not None else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from engine.runtime import build_tensorrt_engine
    except ImportError as exc:
        print(
            f"TensorRT is not usable here ({exc}); install it on a CUDA machine with "
            "pip install 'deepz-live[gpu]'",
            file=sys.stderr,
        )
        return 2
    try:
        metadata = onnx_metadata(args.onnx)
        frames, max_batch, precision = engine_request(args, metadata, scope)
        entry, key, built = build_tensorrt_engine(
            args.onnx,
            metadata,
            precision=precision,
            frame_shapes=frames,
            max_batch=max_batch,
            cache_dir=args.cache_dir,
            rebuild=args.rebuild,
        )
    except (OSError, ValueError, BackendError, ModelMetadataError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # TensorRT could not build it
        print(f"TensorRT build failed: {exc}", file=sys.stderr)
        return 1
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
