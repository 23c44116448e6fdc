"""Train the volume Deep-Z: one wide-field frame in, the sample's density on a depth grid out.

The command line, ``python -m engine.train_volume`` (`main`); its first line above is the
``--help`` description.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.metadata import ModelMetadataError
from engine.train import configure
from engine.train_volume.checkpoints import checkpoint_from_weights, weights_from_checkpoint
from engine.train_volume.config import VolumeTrainConfig
from engine.train_volume.loop import check_measured_bank, train


def out_dir_problem(out_dir: Path) -> str | None:
    """Say why a run could not make or write `out_dir` (None: it can), before training starts.

    Its nearest existing folder must be a folder this process may write: a file there (an
    ``--out`` naming the config, say) was a FileExistsError traceback once the network was
    built.
    """
    for path in (out_dir, *out_dir.absolute().parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "" if path == out_dir else f"{out_dir}: "
            return f"{where}{path} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{out_dir}: cannot write in {path}"
        return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m engine.train_volume", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--config", type=Path, required=True, help="TOML volume training config")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--out", type=Path, default=None, help="override out_dir")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--weights-from-checkpoint",
        type=Path,
        default=None,
        metavar="CKPT",
        help="write weights_out (+ .json, .psf.npy) from this checkpoint and exit (no training)",
    )
    p.add_argument("--weights-out", type=Path, default=None, help="override weights_out")
    p.add_argument(
        "--checkpoint-from-weights",
        type=Path,
        default=None,
        metavar="WEIGHTS",
        help="write portable_checkpoint for these weights (a GPU run's, whose checkpoint "
        "could not come back) with a fresh optimiser, and exit (no training)",
    )
    p.add_argument(
        "--render-modality",
        choices=["widefield", "confocal"],
        default=None,
        help="with --weights-from-checkpoint: the PSF bank to render through (default: trained)",
    )
    p.add_argument(
        "--raw-weights",
        action="store_true",
        help="with --weights-from-checkpoint: the run's raw weights, not its weight average",
    )
    args = p.parse_args(argv)
    if args.render_modality is not None and args.weights_from_checkpoint is None:
        p.error("--render-modality applies to --weights-from-checkpoint only")
    if args.raw_weights and args.weights_from_checkpoint is None:
        p.error("--raw-weights applies to --weights-from-checkpoint only")
    try:
        cfg = configure(
            args.config,
            VolumeTrainConfig,
            weights_out=args.weights_out,
            steps=args.steps,
            out_dir=args.out,
        )
        check_measured_bank(cfg)
    except ValueError as exc:  # TrainConfigError, and a measured bank that does not fit
        print(f"error: {exc}", file=sys.stderr)
        return 2
    training = args.checkpoint_from_weights is None and args.weights_from_checkpoint is None
    problem = out_dir_problem(cfg.out_dir) if training else None
    if problem is not None:
        where = "--out" if args.out is not None else f"{args.config}: out_dir"
        print(f"error: {where}: {problem}", file=sys.stderr)
        return 2
    try:
        if args.checkpoint_from_weights is not None:
            print(f"checkpoint: {checkpoint_from_weights(cfg, args.checkpoint_from_weights)}")
            return 0
        if args.weights_from_checkpoint is not None:
            path = weights_from_checkpoint(
                cfg, args.weights_from_checkpoint, args.render_modality, not args.raw_weights
            )
            print(f"weights: {path}")
            return 0
        model = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, ModelMetadataError) as exc:  # a checkpoint or file it names
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {model.count_parameters()} parameters; outputs in {cfg.out_dir}")
    if cfg.weights_out is not None:
        print(f"weights: {cfg.weights_out}")
    return 0
