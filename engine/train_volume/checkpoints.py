"""Checkpoints and weights: save, resume, and the one portable checkpoint file."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch.optim.swa_utils import AveragedModel

from engine.metadata import (
    Modality,
    ModelMetadata,
    ModelMetadataError,
    VolumeOutput,
    file_sha256,
    weights_that_fit,
)
from engine.model import DeepZ, read_checkpoint, save_model, write_checkpoint
from engine.train_volume.config import VolumeTrainConfig, build_volume_model
from engine.train_volume.optim import build_optimiser, uses_bf16
from engine.volume import psf_bank, save_psf_bank


def served_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the weights a checkpoint serves: the weight average where the run kept one."""
    if "ema" not in checkpoint:
        state: dict[str, torch.Tensor] = checkpoint["model"]
        return state
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in checkpoint["ema"].items() if k.startswith(prefix)}


def widen_inputs(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Old weights with the stem widened to the new model's inputs (new channels at zero).

    A model fine-tuned with primer channels it did not have starts as the old model exactly:
    the frame's weights are copied, the added channels contribute nothing until trained. The
    primer's kernels are the new model's own (made from the config's optics), never the old.
    """
    out = dict(state)
    old, new = state.get("stem.weight"), own.get("stem.weight")
    if (
        old is not None
        and new is not None
        and old.shape[1] < new.shape[1]
        and (old.shape[0], *old.shape[2:]) == (new.shape[0], *new.shape[2:])
    ):
        widened = torch.zeros_like(new)
        widened[:, : old.shape[1]] = old
        out["stem.weight"] = widened
    out.pop("primer.kernels", None)
    return out


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """Model state from a volume .pt (a plain state_dict) or a training checkpoint."""
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found")
    loaded = read_checkpoint(path)
    state: dict[str, torch.Tensor] = served_state(loaded) if "opt" in loaded else loaded
    return state


def save_volume_model(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    psf: np.ndarray,
    history: list[dict[str, float]],
    step: int,
    bf16: bool,
    modality: Modality | None = None,
    raw: bool = False,
) -> Path:
    """Write weights, metadata and the PSF bank to cfg.weights_out; return the weights path.

    The bank is written first and its SHA-256 recorded in the metadata, which is written last
    (`save_model`): once the model there recorded its bank's hash too, a save interrupted
    anywhere leaves files that `engine.volume.model_psf_bank` or `load_model` refuse, never a
    model served through another run's bank.

    The metadata's ``extra.weights`` says which were written: ``"average"`` (the run's weight
    average), ``"raw"`` (its raw weights though it kept an average) or ``"trained"``.

    `modality` must name `psf`'s modality when it is not the one trained (the caller built
    `psf`; `weights_from_checkpoint` is the one place that does so).
    """
    assert cfg.weights_out is not None
    weights = Path(cfg.weights_out)
    psf_path = weights.with_suffix(".psf.npy")
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_psf_bank(psf, psf_path)
    psf_sha256 = file_sha256(psf_path)
    last_val = next((h for h in reversed(history) if "val_bead_depth_median_um" in h), {})
    extra = {
        "steps": step,
        "wall_time_s": round(history[-1]["wall_s"], 1) if history else 0.0,
        "machine": _machine(cfg, bf16),
        "parameters": model.count_parameters(),
        "flops_per_pixel": model.flops_per_pixel(),
        "weights": "raw" if raw else ("average" if cfg.ema_decay > 0 else "trained"),
        "validation": {k: v for k, v in last_val.items() if k.startswith("val_")},
        "train_config": json.loads(cfg.model_dump_json()),
    }
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    meta = make_volume_metadata(cfg, model, psf_path.name, extra, modality, psf_sha256)
    save_model(model.cpu(), meta, weights)
    return weights


def _machine(cfg: VolumeTrainConfig, bf16: bool) -> str:
    """Where a run trained, for the model's metadata."""
    where = f"{platform.machine()} {os.cpu_count()} cores, torch threads {cfg.threads}"
    if cfg.device == "cuda":  # (converted elsewhere from a checkpoint: the GPU is unknown)
        where += f", GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cuda'}"
    return f"{where}, bf16 autocast {bf16}"


CHECKPOINT_KEYS = ("model", "step", "history", "config")
"""What `weights_from_checkpoint` reads of a checkpoint (`_training_state` writes them all)."""


def weights_from_checkpoint(
    cfg: VolumeTrainConfig,
    checkpoint: Path,
    render_modality: Modality | None = None,
    average: bool = True,
) -> Path:
    """Write cfg.weights_out from a checkpoint (e.g. of a run stopped early); return its path.

    The weights are the run's weight average where it kept one (`served_state`); with
    ``average=False`` its raw weights, to measure what the average did.

    The network predicts where the light comes from, whatever the microscope; only the PSF bank
    it is rendered through has a modality. `render_modality` writes the bank of another one
    than was trained (a confocal-trained model served wide-field, or the reverse).
    """
    from engine.optics import OpticsConfig
    from engine.train import TrainConfigError, validation_line

    if cfg.weights_out is None:
        raise TrainConfigError("the config has no weights_out to write: set it or --weights-out")
    ck = read_checkpoint(checkpoint)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:  # a model's weights, say: a plain state_dict
        raise ModelMetadataError(
            f"{checkpoint}: not a volume training checkpoint (no {', '.join(missing)})"
        )
    try:
        ck_cfg = VolumeTrainConfig.model_validate(ck["config"])
    except ValidationError as exc:
        raise ModelMetadataError(
            f"{checkpoint}: its training config does not read ({validation_line(exc)})"
        ) from None
    ck_cfg.weights_out = cfg.weights_out
    model = build_volume_model(ck_cfg)
    raw = not average and "ema" in ck
    what = f"{checkpoint}: its weights do not fit the network its config builds"
    with weights_that_fit(what, (RuntimeError, KeyError, AttributeError)):
        model.load_state_dict(ck["model"] if raw else served_state(ck))
    model.eval()
    modality = render_modality or ck_cfg.target_modality
    psf = psf_bank(OpticsConfig(**ck_cfg.optics), ck_cfg.depth_um, modality=modality)
    bf16 = uses_bf16(ck_cfg)
    history = ck["history"]
    if raw:  # validation read the average: its numbers do not describe the raw weights
        history = [{k: v for k, v in h.items() if not k.startswith("val_")} for h in history]
    return save_volume_model(ck_cfg, model, psf, history, ck["step"], bf16, modality, raw)


def checkpoint_from_weights(cfg: VolumeTrainConfig, weights: Path) -> Path:
    """Write cfg.portable_checkpoint for weights whose run's checkpoint stayed behind.

    A lent GPU call returns files of at most 16 MB and a portable checkpoint is 18.5 MB, so a
    GPU run's weights come back without their optimiser state. This writes the checkpoint
    `--resume` needs to continue them on a fresh machine: the weights exactly; Adam's state as
    a fresh optimiser's after one step with zero gradients (both moments zero, so the weights
    are unchanged; the run sets the schedule's rate before its first step); the step count and
    wall time from the weights' metadata (``extra``); the validation history of the run, as
    the weights' metadata keeps it (its last row); and ``cfg`` as the recipe to resume with.
    """
    from engine.model import load_model
    from engine.train import TrainConfigError

    if cfg.portable_checkpoint is None:
        raise TrainConfigError("the config has no portable_checkpoint to write")
    loaded, meta = load_model(weights)
    model = build_volume_model(cfg)
    with weights_that_fit(
        f"{weights}: not weights of the network this config builds", (RuntimeError,)
    ):
        model.load_state_dict(loaded.state_dict())
    opt = build_optimiser(cfg, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradients: creates Adam's state with zero moments, moves nothing
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    extra = meta.extra
    step, wall = int(extra.get("steps", 0)), float(extra.get("wall_time_s", 0.0))
    last = {k: float(v) for k, v in dict(extra.get("validation", {})).items()}
    # the row `save_volume_model` and the loop read the wall time from (without it a checkpoint
    # made here could not be turned back into weights: review 72)
    history = [{"step": float(step), "wall_s": wall, **last}]
    path = Path(cfg.portable_checkpoint)
    write_checkpoint(path, portable_state(_training_state(cfg, model, opt, step, history, wall)))
    return path


RECIPE_KEYS = (
    "loss",
    "optics",
    "target_modality",
    "depth_half_range_um",
    "channels",
    "primer_depths_um",
    "primer_bin",
    "primer_kernel",
    "brightness_scale",
    "detection",
    "body",
    "seed",
)
"""What a resumed run must share with its checkpoint: its network and what it learns. A run
that changes them is a new recipe, started from the weights with ``init_from``."""


def resume_checkpoint(cfg: VolumeTrainConfig, ckpt: Path) -> tuple[Path, dict[str, Any]]:
    """Return the checkpoint `--resume` continues from, and where it was read.

    This run's own checkpoint first, then the portable copy it writes, then ``resume_from``
    (where a fresh machine starts): one that cannot be read is said and the next one tried.
    A checkpoint of another recipe (`RECIPE_KEYS`) is refused with one line naming what
    differs.
    """
    paths = [p for p in (ckpt, cfg.portable_checkpoint, cfg.resume_from) if p is not None]
    found = [Path(p) for p in dict.fromkeys(paths) if Path(p).is_file()]
    if not found:
        raise FileNotFoundError(
            f"--resume: no checkpoint at {ckpt}, nor at resume_from or portable_checkpoint"
        )
    for i, path in enumerate(found):
        try:
            ck: dict[str, Any] = read_checkpoint(path)
        except ModelMetadataError as err:
            if i == len(found) - 1:
                raise
            print(f"warning: {err}; trying {found[i + 1]}", file=sys.stderr)
            continue
        stored = ck.get("config")
        try:  # filled in with today's defaults: keys added since then are not changes
            old = VolumeTrainConfig.model_validate(stored).model_dump(mode="json")
        except ValidationError:
            old = None  # a config this code no longer reads: the weights' fit decides
        if old is not None:
            new = cfg.model_dump(mode="json")
            changed = [k for k in RECIPE_KEYS if old.get(k) != new.get(k)]
            if changed:
                raise ModelMetadataError(
                    f"--resume: {path} was trained with another {', '.join(changed)} than "
                    "this config's; a changed recipe starts from the weights (init_from)"
                )
        return path, ck
    raise AssertionError("unreachable: the last checkpoint either loads or raises")


def save_checkpoint(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    opt: torch.optim.Optimizer,
    step: int,
    history: list[dict[str, float]],
    wall: float,
    ema: AveragedModel | None = None,
) -> None:
    """Write checkpoint.pt (whole or not at all), the portable copy and loss_curve.png.

    A checkpoint that cannot be written (a full or read-only disk) is one warning, and the
    run goes on: the last one written stays whole, and the next checkpoint tries again.
    """
    state = _training_state(cfg, model, opt, step, history, wall, ema)
    targets = [(cfg.out_dir / "checkpoint.pt", state)]
    if cfg.portable_checkpoint is not None:
        targets.append((Path(cfg.portable_checkpoint), portable_state(state)))
    for path, content in targets:
        try:
            write_checkpoint(path, content)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError
            print(
                f"warning: step {step}: {path} could not be written ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); training goes on, the last checkpoint "
                "stands",
                file=sys.stderr,
            )
    try:
        plot_history(cfg.out_dir, history)
    except OSError as err:
        print(f"warning: step {step}: loss curve not written ({err})", file=sys.stderr)


def _training_state(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    opt: torch.optim.Optimizer,
    step: int,
    history: list[dict[str, float]],
    wall: float,
    ema: AveragedModel | None = None,
) -> dict[str, Any]:
    """Return what a checkpoint holds: weights, optimiser, step, history, wall, recipe, average."""
    state: dict[str, Any] = {
        "model": {k: v.contiguous() for k, v in model.state_dict().items()},
        "opt": opt.state_dict(),
        "step": step,
        "history": history,
        "wall_s": wall,
        "config": json.loads(cfg.model_dump_json()),
    }
    if cfg.optics.get("psf_model") == "measured":  # the bank's content, checked on resume
        state["psf_bank_sha256"] = file_sha256(str(cfg.optics["psf_bank"]))
    if ema is not None:
        state["ema"] = {k: v.contiguous() for k, v in ema.state_dict().items()}
    return state


PORTABLE_HISTORY_EVERY = 100
"""The committed checkpoint keeps every validation row of the history and every 100th step."""


def portable_state(state: dict[str, Any]) -> dict[str, Any]:
    """Return a checkpoint slimmed for the repository (the shipped one: 29.6 -> 18.5 MB).

    A run with a weight average (`ema_decay`) keeps it in float32 too: one model's size more
    (9.2 MB for the shipped network).

    The model stays float32, exactly. Adam's moment estimates are kept in bfloat16 (half their
    bytes; `Optimizer.load_state_dict` casts them back to the parameters' float32 on resume,
    a relative change of at most 2^-8 in each moment, against the noise of one step's
    gradient), and the history keeps its validation rows and every 100th step (the loss
    curve's shape). Why it matters: a lent GPU machine takes the whole tracked tree, at most
    64 MiB with what a call carries, and the full checkpoint alone was 30 MB of it.
    """
    opt = state["opt"]
    # on the CPU, so a machine without the GPU a run trained on can load it
    slim_opt = {
        **opt,
        "state": {
            k: {
                name: (v.to(torch.bfloat16) if v.is_floating_point() and v.dim() > 0 else v).cpu()
                for name, v in entry.items()
            }
            for k, entry in opt["state"].items()
        },
    }
    history = [
        h
        for h in state["history"]
        if "val_bead_depth_median_um" in h or int(h["step"]) % PORTABLE_HISTORY_EVERY == 0
    ]
    model = {k: v.cpu() for k, v in state["model"].items()}
    out = {**state, "model": model, "opt": slim_opt, "history": history}
    if "ema" in state:  # the average stays float32 too: it is what the run serves
        out["ema"] = {k: v.cpu() for k, v in state["ema"].items()}
    return out


def make_volume_metadata(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    psf_file: str,
    extra: dict[str, Any],
    modality: Modality | None = None,
    psf_sha256: str | None = None,
) -> ModelMetadata:
    """Describe a volume model trained with `cfg`, rendering `modality` (default: the trained).

    `psf_sha256` is the hash of the bank file `psf_file` as written beside the weights.
    """
    from engine.optics import OpticsConfig
    from engine.train import command_line, git_commit

    optics = OpticsConfig(**cfg.optics)
    d = cfg.data
    aberration = (
        "each source's index-mismatch aberration at its own depth, depth of z = 0"
        if optics.depth_dependent_aberration
        else "index-mismatch depths"
    )
    psf_names = " and ".join(
        {"scalar": "scalar Gibson-Lanni", "vectorial": "vectorial"}[m] for m in d.psf_models
    )
    if optics.psf_model != "scalar":  # the optics name the frames' PSF (and the bank's)
        psf_names = (
            f"measured ({optics.psf_bank}, sha256 {file_sha256(str(optics.psf_bank))[:12]})"
            if optics.psf_model == "measured"
            else "vectorial"
        )
    notes = ""  # said only where the worm or the frames are not the original ones
    if d.worm.nucleus_diameter_um is not None:
        lo, hi = d.worm.nucleus_diameter_um
        notes += f"; worm nuclei {lo:g}-{hi:g} µm"
    if d.worm.axis_depth_um > 0:
        notes += f"; worm axis within ±{d.worm.axis_depth_um:g} µm of mid-plane"
    if d.frame_points != "linear":
        notes += f"; frames' beads on the {d.frame_points} kernel"
    return ModelMetadata(
        name=cfg.name,
        architecture=model.architecture,
        size_multiple=model.size_multiple,
        dz_range_um=(-cfg.depth_half_range_um, cfg.depth_half_range_um),
        pixel_size_um=optics.pixel_size_um,
        na=optics.na,
        wavelength_um=optics.wavelength_um,
        immersion_index=optics.immersion_index,
        sample_index=optics.sample_index,
        trained_on=(
            f"engine.optics simulated frames + true densities ({', '.join(d.kinds)}; "
            f"{psf_names} PSF, {aberration} {d.particle_depths_um} µm, focus within "
            f"±{d.focus_half_range_um} µm{notes}; {cfg.target_modality} render targets)"
        ),
        training_command=command_line("engine.train_volume"),
        commit=git_commit(),
        volume=VolumeOutput(
            depth_um=tuple(float(z) for z in cfg.depth_um),
            psf_file=psf_file,
            modality=modality or cfg.target_modality,
            psf_sha256=psf_sha256,
        ),
        extra=extra,
    )


def plot_history(out: Path, history: list[dict[str, float]]) -> None:
    """Write the run's loss and validation curves to ``out/loss_curve.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("object", "coarse", "render", "lab"):
        rows = [h for h in history if key in h]
        if not rows:
            continue
        v = np.array([h[key] for h in rows])
        k = min(50, len(v))
        at = np.array([h["step"] for h in rows])
        ax[0].plot(at[k - 1 :], np.convolve(v, np.ones(k) / k, mode="valid"), label=key)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    if ax[0].lines:  # a head trained alone (freeze_trunk) has no density terms to show
        ax[0].legend()
    val = [h for h in history if "val_bead_depth_median_um" in h]
    if val:
        s = [h["step"] for h in val]
        ax[1].plot(s, [h["val_bead_depth_median_um"] for h in val], "o-", label="median")
        ax[1].plot(s, [h["val_bead_depth_p90_um"] for h in val], "o-", label="p90")
        ax[1].set_ylabel("bead depth error (µm)")
        ax[1].set_xlabel("step")
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=90)
    plt.close(fig)
