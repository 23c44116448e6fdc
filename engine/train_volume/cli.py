"""Train the volume Deep-Z: one wide-field frame in, the sample's density on a depth grid out.

The command line, ``python -m engine.train_volume`` (`main`); its first line above is the
``--help`` description.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.files import out_dir_problem
from engine.metadata import ModelMetadataError
from engine.train import TrainConfigError, configure
from engine.train_volume.checkpoints import checkpoint_from_weights, weights_from_checkpoint
from engine.train_volume.config import VolumeTrainConfig
from engine.train_volume.loop import check_measured_bank, train


def _output_problem(cfg: VolumeTrainConfig, args: argparse.Namespace) -> str | None:
    """Say why this command could not write what it writes (None: it can), before any work.

    Training writes into out_dir, then weights_out (+ .json, .psf.npy) at its end and the
    portable checkpoint at each checkpoint; ``--weights-from-checkpoint`` writes weights_out
    only, ``--checkpoint-from-weights`` the portable checkpoint only. Each is named as the
    user gave it: the flag, or the config's key.
    """
    config = args.config
    where = {
        "out_dir": "--out" if args.out is not None else f"{config}: out_dir",
        "weights_out": "--weights-out"
        if args.weights_out is not None
        else f"{config}: weights_out",
        "portable_checkpoint": f"{config}: portable_checkpoint",
    }
    needed = None  # what the command exists to write: refused where the config has none
    if args.weights_from_checkpoint is not None:
        wanted = needed = "weights_out"
    elif args.checkpoint_from_weights is not None:
        wanted = needed = "portable_checkpoint"
    else:
        wanted = "out_dir weights_out portable_checkpoint"
    for key in wanted.split():
        value = getattr(cfg, key)
        if value is None:
            if key == needed:
                flag = " (or give --weights-out)" if key == "weights_out" else ""
                return f"{config}: no {key} to write: set {key}{flag}"
            continue
        path = Path(value)
        if key == "out_dir":
            problem = out_dir_problem(path, ("config.json", "checkpoint.pt", "loss_curve.png"))
        elif key == "weights_out":
            names = (path.name, path.with_suffix(".json").name, path.with_suffix(".psf.npy").name)
            problem = out_dir_problem(path.parent, names)
        else:
            problem = out_dir_problem(path.parent, (path.name,))
        if problem is not None:
            return f"{where[key]}: {problem}"
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
    problem = _output_problem(cfg, args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
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
    except (FileNotFoundError, ModelMetadataError, TrainConfigError) as exc:  # a file it names
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {model.count_parameters()} parameters; outputs in {cfg.out_dir}")
    if cfg.weights_out is not None:
        print(f"weights: {cfg.weights_out}")
    return 0
