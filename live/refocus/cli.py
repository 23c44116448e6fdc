"""The command line: ``python -m live.refocus``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from live.refocus.driver import refocus_recording
from live.refocus.errors import RefocusError, RefocusTaskError
from live.refocus.outputs import check_image_name


def _parser() -> argparse.ArgumentParser:
    """Build the command line of ``python -m live.refocus``."""
    p = argparse.ArgumentParser(
        prog="python -m live.refocus",
        description="Refocus a recording's raw frames offline into an NGFF stacks image.",
    )
    p.add_argument("source", help="run store (RUN.ome.zarr), NGFF (t, y, x) image or TIFF stack")
    p.add_argument("--model", help="model file (default: the run's, else the shipped model)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--planes", type=float, nargs="+", metavar="Z", help="plane offsets (µm)")
    which.add_argument("--scope", help="scope config whose [planes] and [engine] to use")
    p.add_argument("--out", help="write into this new store instead of beside raw")
    p.add_argument(
        "--name",
        help="image name in the output store: a letter, then letters, digits, _ . - "
        "(default stacks_offline; not with --fill-gaps)",
    )
    p.add_argument(
        "--fill-gaps",
        action="store_true",
        help="compute only the stacks the live run skipped or lost, into its stacks image",
    )
    p.add_argument(
        "--scheduler",
        default="threads",
        help="threads (default), processes, sync, or a dask.distributed address tcp://host:port",
    )
    p.add_argument("--workers", type=int, help="local threads or processes")
    p.add_argument(
        "--chunk",
        type=int,
        help="time points per output chunk (task); default about 4 MiB of stacks (at most 16)",
    )
    p.add_argument("--backend", help="inference backend (openvino, onnxruntime, tensorrt, torch)")
    p.add_argument(
        "--psf-bank",
        help="render through this measured PSF bank (.npy, python -m engine.psf_calibration)",
    )
    p.add_argument(
        "--point-fit",
        action="store_true",
        help="refit each frame's beads to it through the PSF bank before rendering "
        "(engine.point_fit; 0.3-1 s a 256² frame on one core)",
    )
    p.add_argument(
        "--point-fit-lateral",
        choices=("linear", "spline"),
        default="linear",
        help="with --point-fit: hold each bead between pixels split (linear) or on a "
        "cubic-spline kernel (spline: beads rendered as a camera images them; measure the "
        "bank with engine.psf_calibration --lateral spline)",
    )
    p.add_argument("--threads", type=int, help="intra-op CPU threads per backend")
    p.add_argument("--extrapolate", action="store_true", help="allow planes beyond the model range")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output image (--fill-gaps: recompute the stacks an "
        "interrupted fill made with another model or plan)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="stacks dtype of a new image (float16: as the live recorder stores them)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; an error prints one line (no traceback) and exits non-zero.

    A refusal (`RefocusError`) exits 2; a failed chunk task (`RefocusTaskError`) exits 1.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.point_fit_lateral != "linear" and not args.point_fit:
        parser.error("--point-fit-lateral is how --point-fit holds beads: give --point-fit too")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_image_name(args.name, fill_gaps=args.fill_gaps)  # before any input is opened
        summary = refocus_recording(
            args.source,
            model=args.model,
            planes=args.planes,
            scope=args.scope,
            out=args.out,
            name=args.name,
            fill_gaps=args.fill_gaps,
            scheduler=args.scheduler,
            workers=args.workers,
            chunk=args.chunk,
            backend=args.backend,
            intra_op_threads=args.threads,
            allow_extrapolation=args.extrapolate,
            overwrite=args.overwrite,
            stack_dtype=args.dtype,
            progress=not args.no_progress,
            psf_bank=args.psf_bank,
            point_fit=args.point_fit,
            point_fit_lateral=args.point_fit_lateral,
        )
    except RefocusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RefocusTaskError as exc:  # the chunks done so far are kept: a rerun resumes
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    # frames left NaN cost those frames (a lock without focus, a frame the backend refuses);
    # a run that made none of its wanted frames failed as a whole
    return 1 if summary.frames_wanted and summary.frames_left == summary.frames_wanted else 0
