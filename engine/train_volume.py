"""Train the volume Deep-Z: one wide-field frame in, the sample's density on a depth grid out.

``python -m engine.train_volume --config configs/train_volume.toml [--resume] [--steps N]``

Why a second trainer: per-plane networks trained on pixel losses learnt the forward blur and not
depth (see issue 9 and `docs/evaluation/report.md`). Here the network localises: it predicts
the non-negative density ``O[d]`` at 41 depths relative to the focal plane, supervised directly
by the simulator's ground truth (the density the frame was imaged from), so an in-focus bead at
the wrong depth costs as much as a missing one. Two terms:

- object loss: L1 between the predicted and true densities, both smoothed by a small 3D
  Gaussian (σ 1 px, 1 slice) so a sub-voxel miss costs a little and a depth miss a lot;
- render loss: L1 between wide-field planes rendered through the known PSF (`engine.volume`)
  from the prediction and from the truth, at a few random Δz, so the planes users see are right.

A curriculum starts bead-heavy (the depth cue is strongest for bright sparse points) and widens
to worms. Each simulated sample draws its index-mismatch depth, so sources see different
aberrations. On CPUs with AVX-512-BF16 / AMX the net runs under bfloat16 autocast in
channels-last layout (2.5x faster here); ``device = "cuda"`` trains on a GPU (bf16 there too),
the samples still simulated on the CPU; checkpoints every few minutes allow ``--resume``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import scipy.fft
import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine.detection import detection_loss
from engine.metadata import (
    Modality,
    ModelMetadata,
    ModelMetadataError,
    VolumeOutput,
    file_sha256,
    normalize_images,
)
from engine.model import DeepZ, build_model, read_checkpoint, save_model, write_checkpoint
from engine.optics import Lateral, WormConfig
from engine.train import (
    LabStackConfig,
    SampleKind,
    _Base,
    _lr_factor,
    camera_overrides,
    configure,
    read_config,
    read_lab_stack,
)
from engine.volume import (
    DEPTH_STEP_UM,
    RESIDUAL_SIGMA_PX,
    defocus_index,
    depth_grid,
    matched_filter_kernels,
    psf_bank,
    save_psf_bank,
)

if TYPE_CHECKING:
    from engine.optics import CameraConfig, OpticsConfig, VolumePair

__all__ = [
    "VolumeBatch",
    "VolumeTrainConfig",
    "bead_density_fwhm",
    "bead_depth_errors",
    "body_term",
    "load_config",
    "main",
    "train",
]

TRAIN_SEED_OFFSET = 2_000_000
"""Volume training samples use seeds >= this; evaluation uses seeds below 1,000,000."""
VALIDATION_SEED_OFFSET = 950_000


class VolumeDataConfig(_Base):
    """Simulated samples: kinds, curriculum, focus positions, aberrations, signal levels."""

    kinds: list[SampleKind] = Field(["beads", "worm", "mixed"], description="Sample kinds.")
    kind_weights: list[float] = Field([0.35, 0.35, 0.30], description="Weights after warm-up.")
    start_kind_weights: list[float] = Field(
        [0.8, 0.1, 0.1], description="Weights at the start (curriculum: beads first)."
    )
    curriculum_fraction: float = Field(
        0.2, ge=0, le=1, description="Share of the run over which the weights move to kind_weights."
    )
    stack_shape: tuple[int, int] = Field((256, 256), description="Simulated frame (H, W) px.")
    focus_half_range_um: float = Field(2.0, ge=0, description="Frame focus within ±this (µm).")
    frames_per_sample: int = Field(2, ge=1, description="Frames per sample (focus positions).")
    particle_depths_um: list[float] = Field(
        [2.0, 5.0, 10.0, 15.0],
        description="Index-mismatch depths drawn per sample (µm); with "
        "optics.depth_dependent_aberration, the depth of z = 0 below the coverslip.",
    )
    psf_models: list[Literal["scalar", "vectorial"]] = Field(
        ["scalar"],
        min_length=1,
        description="psfmodels' PSF models the frames are imaged with, one drawn per sample "
        "(`OpticsConfig.psf_model`). The model's PSF bank stays the config's optics' "
        "(scalar), and so do the render targets: only the input frames change, so the "
        "network learns depth cues that hold across PSF models. Not with optics.psf_model.",
    )
    frame_points: Lateral = Field(
        "linear",
        description="How the input frames are imaged from a bead between pixels "
        "(`engine.optics.simulate_volume_pair`): 'linear' from the truth's own bilinear split "
        "(a bead at a pixel corner about 25 % dim in focus), 'spline' as a camera images it "
        "(within 1-2 %). The density targets keep the split either way.",
    )
    peak_photons: tuple[float, float] = Field((300.0, 3000.0), description="Log-uniform range.")
    background_photons: tuple[float, float] = Field((10.0, 100.0), description="Uniform range.")
    worm: WormConfig = Field(
        default_factory=WormConfig,
        description="How the worm samples are drawn: nucleus sizes, the body's depth "
        "(`engine.optics.WormConfig`; default: the original worm).",
    )
    pool_size: int = Field(24, ge=1, description="Samples kept in memory.")
    refresh_every: int = Field(100, ge=1, description="Steps between pool refreshes.")
    refresh_count: int = Field(2, ge=0, description="Samples replaced per refresh.")
    workers: int = Field(
        0,
        ge=0,
        description="Processes that simulate the pool's samples ahead of the training loop "
        "(0: the loop simulates them itself, as suits a 2-core machine). On a GPU the loop "
        "would otherwise wait ~0.9 s per sample, longer than a hundred of its steps.",
    )
    lab_stacks: list[LabStackConfig] = Field(
        [], description="A lab's own focus-scanned stacks (no density truth: render loss only)."
    )
    lab_every: int = Field(0, ge=0, description="Every N-th step trains on a lab stack (0: never).")

    @model_validator(mode="after")
    def _check(self) -> VolumeDataConfig:
        for name in ("kind_weights", "start_kind_weights"):
            if len(getattr(self, name)) != len(self.kinds):
                raise ValueError(f"data.{name} needs one weight per entry of data.kinds")
        if len(set(self.psf_models)) != len(self.psf_models):
            raise ValueError(f"data.psf_models lists a model twice: {self.psf_models}")
        if self.lab_every and not self.lab_stacks:
            raise ValueError("data.lab_every > 0 needs at least one data.lab_stacks entry")
        if self.lab_stacks and not self.lab_every:  # loaded, unused
            raise ValueError(
                "data.lab_stacks are listed but data.lab_every is 0, so none would be trained "
                "on: set data.lab_every (every N-th step a lab stack)"
            )
        for spec in self.lab_stacks:
            steps = spec.z_step_um / DEPTH_STEP_UM
            if abs(steps - round(steps)) > 1e-6:
                raise ValueError(
                    f"data.lab_stacks: {spec.path} has z_step_um {spec.z_step_um}, not a multiple "
                    f"of the depth grid's {DEPTH_STEP_UM} µm (planes are rendered on that grid)"
                )
        return self


class VolumeLossConfig(_Base):
    """Weights of the object and render terms."""

    object_loss: Literal["l1", "relative_mse"] = Field(
        "relative_mse",
        description="Density term: L1, or squared error relative to the target's mean square "
        "(under doubt about depth, L1 predicts nothing; squared error spreads mass over the "
        "candidates and sharpens it as evidence grows).",
    )
    object_weight: float = Field(1.0, ge=0, description="Weight of the smoothed density term.")
    object_sigma_px: float = Field(1.0, gt=0, description="Lateral smoothing (px).")
    object_sigma_slices: float = Field(1.0, gt=0, description="Axial smoothing (depth steps).")
    render_weight: float = Field(1.0, ge=0, description="Weight of the rendered-plane L1.")
    render_planes: int = Field(3, ge=1, description="Random Δz planes rendered per step.")
    render_at_objects: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the render planes' draw that follows the truth's mass per "
        "depth (`render_depths`): planes where objects are in focus, where a density too "
        "wide or a slice off shows as a blurred object, and not only planes of blur. "
        "0 draws depths uniformly.",
    )
    render_psf_px: int = Field(63, ge=3, description="PSF crop for the render loss (px, odd).")
    normalise: Literal["batch", "sample"] = Field(
        "batch",
        description="relative_mse: divide by the batch's target mean square, or by each "
        "sample's own (a dim sample then weighs as much as a bright one; with 'batch' a sample "
        "10x dimmer counts 100x less, and faint objects are the ones the model misses).",
    )
    coarse_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the density term after heavy smoothing (coarse_sigma_*): "
        "partial credit for density near a faint object, so recall can be learnt.",
    )
    coarse_sigma_px: float = Field(3.0, gt=0, description="Coarse lateral smoothing (px).")
    coarse_sigma_slices: float = Field(3.0, gt=0, description="Coarse axial smoothing (steps).")
    far_weight: float = Field(
        0.0,
        ge=0,
        description="Density-term weight grows as 1 + far_weight * |depth| / half range: far "
        "out-of-focus objects (faint rings in the frame) count more.",
    )
    column_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the column term: the density summed over depth (how much light "
        "comes from each pixel's column, wherever in depth), relative squared error. It "
        "rewards finding an object before placing it: the shipped model puts 2-6 % of a far "
        "bead's mass anywhere in its column.",
    )
    column_sigma_px: float = Field(2.0, gt=0, description="Column term lateral smoothing (px).")
    compress_scale: float = Field(
        0.0,
        ge=0,
        description="With c > 0 the density and column terms compare c·log(1 + x/c) of the "
        "smoothed densities instead of x (`compress`): an object much brighter than c is "
        "scored by its relative error, where a squared error weighs a miss by brightness "
        "squared (in a batch, bead peaks span 40x). At c = 0.1 missing a bead 30x brighter "
        "than another costs 19x as much, not 900x. Below c the error stays absolute, so "
        "faint stray mass in empty space costs little. In the targets' normalised units a "
        "bead's smoothed peak is 1.5-65 (median 16), a worm nucleus's 2-5. 0 compares the "
        "densities themselves. Tried at 0.1 (recipe 24, docs/evaluation/volume.md): worse "
        "on the hold-out, faint beads dropped, since faint haze is priced like them.",
    )
    cdf_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the depth-CDF term: squared error of the density's running "
        "sums along depth, from both ends (`_cdf_term`). Mass put d slices from the truth "
        "costs in proportion to d, and less than missing it while d is under half the grid, "
        "where the density term scores any misplacement as a miss plus a false object.",
    )
    cdf_sigma_px: float = Field(1.0, gt=0, description="Depth-CDF term lateral smoothing (px).")
    depth_nll_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the depth-likelihood term (`_depth_nll_term`): each column's "
        "density, normalised to a distribution over depth, scored by its KL divergence from "
        "the truth's, weighted by the truth's mass there. How much mass a column holds plays "
        "no part, so a doubted depth is scored as a likelihood (a broad guess costs less than "
        "a wrong sharp one, and nothing like a miss plus a false object).",
    )
    depth_nll_sigma_px: float = Field(
        1.0, gt=0, description="Depth-likelihood term lateral smoothing (px)."
    )
    depth_nll_sigma_slices: float = Field(
        0.75, gt=0, description="Depth-likelihood term axial smoothing (depth steps)."
    )
    source_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the per-source term (`_source_term`): at each true bead, the "
        "density's mass in a small window around its position and depth against the "
        "truth's, as a relative squared error, every bead counting the same however faint. "
        "Paid only at true sources, so the haze the network leaves where it is unsure is not "
        "priced by it (the density term prices that): where recipe 24's compression priced "
        "faint haze like a faint bead, this term sees only the beads. At 1 (recipes 26, 27, "
        "docs/evaluation/volume.md): the training simulator's beads within 1 µm +3 points, "
        "the hold-out sets made another way level, their tilted plane down.",
    )
    source_sigma_px: float = Field(
        1.0, gt=0, description="Per-source window's lateral Gaussian sigma (px)."
    )
    source_far_weight: float = Field(
        0.0,
        ge=0,
        description="In the per-source term a bead counts 1 + source_far_weight * |depth| / "
        "half range (a weighted mean over the batch's beads): the beads 4 µm or more from "
        "focus are the ones the shipped model misses (docs/evaluation/volume.md, session 32), "
        "and each counts once however faint, like an in-focus one. Recipe 40.",
    )
    source_sigma_slices: float = Field(
        1.0, gt=0, description="Per-source window's axial Gaussian sigma (depth steps)."
    )
    detection_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the detection head's loss (DECODE's count and Gaussian-mixture "
        "likelihood of the true beads; `engine.detection.detection_loss`). Needs detection.",
    )
    body_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the body head's term (`body_term`): its glow against the "
        "worm body's imaged alone, as a relative squared error over the batch. Needs body.",
    )


class VolumeTrainConfig(_Base):
    """Everything one volume training run needs; saved with every checkpoint."""

    name: str = Field("deepz-volume-sim", description="Model name written to the metadata.")
    seed: int = Field(0, ge=0)
    steps: int = Field(20000, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(
        1,
        ge=1,
        description="Batches whose gradients one optimiser step averages: batch_size x this "
        "patches a step. On a CPU four batches of 8 run faster than one of 32 (2.2 against "
        "3.4 s a step on 2 AMD EPYC cores, session 31) and make nearly the GPU recipe's step "
        "of 32 (no layer looks across a batch; the relative_mse term divides each batch of 8 "
        "by its own targets' mean square).",
    )
    patch_size: int = Field(128, ge=32)
    lr: float = Field(1e-3, gt=0)
    lr_min: float = Field(2e-5, ge=0)
    warmup_steps: int = Field(200, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Keep an exponential moving average of the weights with this decay per "
        "step (0: none). Validation reads the average and the run writes it: at batch 8 on a "
        "CPU each step's gradient is noisy, and the average of the last ~1/(1 - decay) steps' "
        "weights sits nearer the bottom of the valley than any one of them.",
    )
    depth_half_range_um: float = Field(10.0, gt=0, description="Depth grid ±this (µm).")
    target_modality: Modality = Field(
        "widefield",
        description="Planes the model renders: wide-field (as the input) or confocal-like "
        "(cross-modality: excitation x pinhole-detection PSF).",
    )
    channels: list[int] = Field([24, 24, 32, 64, 96, 128, 192], description="U-Net widths.")
    train_leak: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Negative slope of the final ReLU while training (dead depth channels come "
        "back; it also leaves a low floor of density that widens rendered beads).",
    )
    primer_depths_um: list[float] = Field(
        [],
        description="Matched-filter primer channels at these object depths (µm; empty: none): "
        "the frame correlated with the PSF at each defocus, fed to the stem beside the frame "
        "(`engine.model.MatchedFilterPrimer`). Fine-tuning from a model without them starts "
        "with their stem weights at zero, i.e. from the old model exactly.",
    )
    detection: bool = Field(
        False,
        description="Add a DECODE-style point-source head (`engine.detection`): per pixel the "
        "probability of a bead, its sub-pixel offset, continuous depth and brightness, trained "
        "with a likelihood (loss.detection_weight) and splatted onto the depth grid, so the "
        "served model returns one density as before. Fine-tuning from a model without it "
        "starts with the head nearly silent.",
    )
    detection_lr_factor: float = Field(
        10.0,
        gt=0,
        description="The detection head learns at this multiple of lr: fine-tuned from a "
        "trained network it starts from nothing (at 1x, 1,500 steps found a fifth of the beads).",
    )
    detection_serve_min_p: float = Field(
        0.0,
        ge=0,
        le=9,
        description="Serve (eval mode) only the detections whose 3 x 3 neighbourhood holds this "
        "much p (0: every pixel's p * N, as trained): without it the low p every pixel keeps "
        "is light at every depth of every column.",
    )
    freeze_trunk: bool = Field(
        False,
        description="Train the detection head alone, on the detection loss alone, with the rest "
        "of the network (from init_from or the checkpoint) frozen: the served density stays "
        "as it was and the head learns on its features, at a third of a full step's cost.",
    )
    brightness_scale: float = Field(
        100.0,
        gt=0,
        description="Detections' brightness unit (density units; a simulated bead in a "
        "normalised frame holds about 70-130).",
    )
    body: bool = Field(
        False,
        description="A second head gives the worm body's glow at focus (`DeepZ` body), trained "
        "against the simulator's body imaged alone (loss.body_weight): session 28 found the "
        "shipped trunk's features give the glow to ~1 e⁻/px on the simulator's uniform "
        "bodies but not on textured ones or the hold-out's, and a fit needs it to ~1 e⁻ to "
        "place crowded nuclei. The served density is unchanged.",
    )
    primer_bin: int = Field(4, ge=1, description="The primer bins the frame this much first.")
    primer_kernel: int = Field(17, ge=3, description="Primer kernel side (binned px, odd).")
    threads: int = Field(2, ge=1)
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where the network and the loss run. The samples are simulated on the "
        "CPU either way (numpy), in a pool refreshed every data.refresh_every steps.",
    )
    bf16: Literal["auto", "on", "off"] = Field(
        "auto",
        description="bfloat16 autocast ('auto': where the CPU has AVX-512-BF16 or AMX; on "
        "CUDA, always).",
    )
    checkpoint_every: int = Field(500, ge=1)
    max_wall_s: float | None = Field(None, gt=0, description="Stop after this wall time (s).")
    schedule_by: Literal["steps", "wall"] = Field("steps")
    out_dir: Path = Field(Path("runs/volume"))
    weights_out: Path | None = Field(None, description="Final .pt (+ .json, .psf.npy).")
    portable_checkpoint: Path | None = Field(
        None,
        description="Also write the latest checkpoint here, slimmed to be committed (one "
        "file; `portable_state`): --resume on a fresh machine continues from it.",
    )
    resume_from: Path | None = Field(
        None,
        description="Where --resume starts when the run has no checkpoint of its own yet "
        "(neither out_dir's nor portable_checkpoint: a fresh machine), read and never "
        "written: the committed engine/weights/deepz-volume.ckpt.pt, so continuing the "
        "shipped model cannot overwrite it with a run that may not ship (the run writes "
        "portable_checkpoint; copy it there when its weights ship).",
    )
    init_from: Path | None = Field(
        None,
        description="Start from these weights (a volume .pt or a checkpoint) with a fresh "
        "optimiser and schedule: fine-tuning with a changed recipe. --resume takes precedence.",
    )
    optics: dict[str, Any] = Field({}, description="engine.optics.OpticsConfig overrides.")
    camera: dict[str, Any] = Field({}, description="engine.optics.CameraConfig overrides.")
    _camera = field_validator("camera")(camera_overrides)
    data: VolumeDataConfig = Field(default_factory=VolumeDataConfig)  # type: ignore[arg-type]
    loss: VolumeLossConfig = Field(default_factory=VolumeLossConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _check(self) -> VolumeTrainConfig:
        multiple = 2 ** (len(self.channels) - 2)
        if self.patch_size % multiple or self.patch_size > min(self.data.stack_shape):
            raise ValueError(
                f"patch_size {self.patch_size} must be a multiple of {multiple} and fit "
                f"data.stack_shape {self.data.stack_shape}"
            )
        if self.loss.detection_weight > 0 and not self.detection:
            raise ValueError("loss.detection_weight > 0 needs detection = true (the head)")
        if (self.loss.body_weight > 0) != self.body:
            raise ValueError(
                "body = true and loss.body_weight > 0 go together (the head, its term)"
            )
        if self.freeze_trunk and (
            not self.detection or self.loss.detection_weight <= 0 or self.data.lab_every
        ):
            raise ValueError(
                "freeze_trunk trains the detection head alone: it needs detection = true, "
                "loss.detection_weight > 0 and no lab stacks (data.lab_every = 0)"
            )
        from engine.optics import OpticsConfig

        optics = OpticsConfig(**self.optics)  # its fields at load (a bank's file: at the run)
        if optics.psf_model == "measured" and self.target_modality != "widefield":
            raise ValueError(
                "optics.psf_model 'measured' renders wide-field targets only: a measured bank "
                "has no excitation PSF for confocal ones"
            )
        if "psf_model" in self.optics and self.data.psf_models != ["scalar"]:
            raise ValueError(
                "optics.psf_model and data.psf_models both name the frames' PSF model: set "
                "optics.psf_model (the PSF bank's too) or data.psf_models (the frames' only)"
            )
        return self

    @property
    def depth_um(self) -> np.ndarray:
        """The model's depth grid (µm)."""
        return depth_grid(self.depth_half_range_um)


def load_config(path: str | Path) -> VolumeTrainConfig:
    """Read a TOML volume-training config; unknown keys or bad values raise naming the key."""
    return read_config(path, VolumeTrainConfig)


def build_volume_model(cfg: VolumeTrainConfig) -> DeepZ:
    """Build the volume network of this config (preset 'volume', its widths and depths).

    With ``primer_depths_um`` the matched-filter kernels are made here from the config's optics
    (they then travel in the weights).
    """
    from engine.optics import OpticsConfig

    primer = None
    if cfg.primer_depths_um:
        primer = {
            "depths_um": cfg.primer_depths_um,
            "bin": cfg.primer_bin,
            "kernel": cfg.primer_kernel,
        }
    detection = None
    if cfg.detection:
        detection = {
            "z_first_um": float(cfg.depth_um[0]),
            "z_step_um": DEPTH_STEP_UM,
            "brightness_scale": cfg.brightness_scale,
        }
        if cfg.detection_serve_min_p > 0:  # only when set: older models rebuild unchanged
            detection["serve_min_p"] = cfg.detection_serve_min_p
    model = build_model(
        "volume",
        channels=tuple(cfg.channels),
        out_channels=int(cfg.depth_um.size),
        primer=primer,
        detection=detection,
        body=cfg.body,
    )
    if model.primer is not None:
        kernels = matched_filter_kernels(
            OpticsConfig(**cfg.optics), cfg.primer_depths_um, cfg.primer_bin, cfg.primer_kernel
        )
        model.primer.kernels.copy_(torch.from_numpy(kernels))
    model.train_leak = cfg.train_leak  # (in training mode only; served models never leak)
    return model


# ----------------------------------------------------------------------------- data


def draw_imaging(
    cfg: VolumeTrainConfig, seed: int, kind_weights: Sequence[float]
) -> tuple[SampleKind, OpticsConfig, CameraConfig, np.ndarray]:
    """Draw what a training sample of `seed` is imaged with: kind, optics, camera, focus (µm).

    The config's ranges (brightness log-uniform, background uniform, the index-mismatch depth
    and PSF model from their lists, focus on the 0.5 µm lattice within the half range); one
    home for these draws, so a sample of a seed is the same wherever it is made.
    """
    from engine.optics import CameraConfig, OpticsConfig

    rng = np.random.default_rng(seed)
    d = cfg.data
    w = np.asarray(kind_weights, dtype=np.float64)
    kind = d.kinds[int(rng.choice(len(d.kinds), p=w / w.sum()))]
    lo, hi = d.peak_photons
    camera = CameraConfig(
        **{
            "peak_photons": float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
            "background_photons": float(rng.uniform(*d.background_photons)),
            **cfg.camera,
        }
    )
    models = d.psf_models  # no draw for one model: earlier recipes' samples unchanged
    drawn: dict[str, Any] = {
        "particle_depth_um": float(rng.choice(d.particle_depths_um)),
        "psf_model": models[int(rng.integers(len(models)))] if len(models) > 1 else models[0],
    }
    optics = OpticsConfig(**{**drawn, **cfg.optics})
    n = round(d.focus_half_range_um / 0.5)
    focus = rng.integers(-n, n + 1, d.frames_per_sample) * 0.5
    return kind, optics, camera, focus


class Sample:
    """One simulated sample: normalised frames and their density targets (same units)."""

    def __init__(self, cfg: VolumeTrainConfig, seed: int, kind_weights: Sequence[float]) -> None:
        from engine.optics import simulate_volume_pair

        kind, optics, camera, focus = draw_imaging(cfg, seed, kind_weights)
        d = cfg.data
        pair = simulate_volume_pair(
            kind,
            shape=d.stack_shape,
            focus_um=focus,
            depth_um=cfg.depth_um,
            optics=optics,
            camera=camera,
            seed=seed,
            worm=d.worm,
            body_glow=cfg.body,
            frame_points=d.frame_points,
        )
        x, _, std = normalize_images(pair.frames)
        self.kind = kind
        self.optics = optics
        self.inputs = x.astype(np.float32)
        self.targets = (pair.objects_counts / std[:, :, :, None]).astype(np.float32)
        per_photon = camera.quantum_efficiency * camera.gain_counts_per_e
        self.sources = point_sources(pair, optics.pixel_size_um, per_photon / std.ravel(), cfg)
        # the truth's objects and the frames' focus (validation reads beads from them); not
        # the pair itself, whose density duplicates `targets` (it doubled what a worker sends)
        self.objects = pair.objects
        self.focus_um = pair.focus_um
        # the body's glow alone (F, H, W), in the frames' normalised units: a body model's
        # second target
        self.body = (
            None if pair.body_counts is None else (pair.body_counts / std).astype(np.float32)
        )
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._body: dict[torch.device, torch.Tensor] = {}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return inputs and targets on `device`, copied there once (CPU: shared, no copy).

        A GPU batch is then cropped and turned where it is trained: copying 32 patches of
        41 planes from the host each step cost a GPU step four times its own work.
        """
        if device not in self._tensors:
            self._tensors[device] = (
                torch.from_numpy(self.inputs).to(device),
                torch.from_numpy(self.targets).to(device),
            )
        return self._tensors[device]

    def body_tensor(self, device: torch.device) -> torch.Tensor | None:
        """Return the body's glow on `device` (copied there once), or None without it."""
        if self.body is None:
            return None
        if device not in self._body:
            self._body[device] = torch.from_numpy(self.body).to(device)
        return self._body[device]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to and from `SampleFeed`'s workers) without its device copies."""
        return {**self.__dict__, "_tensors": {}, "_body": {}}


class SampleFeed:
    """Simulates the pool's samples: in the loop, or ahead of it in worker processes.

    With ``workers = 0`` a sample is simulated when the loop asks for it (the 2-core default:
    a second process would only take the training's core). With workers, the samples of the
    next refresh are submitted one refresh early and are ready when the loop reaches it, so a
    GPU is not left waiting ~0.9 s per sample. Either way a sample depends only on its seed and
    kind weights, so the run sees the same samples in the same slots.
    """

    def __init__(self, cfg: VolumeTrainConfig) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._cfg = cfg
        # spawn, not fork: the parent holds torch's threads (and maybe a CUDA context), which a
        # forked child would inherit half-initialised
        ctx = multiprocessing.get_context("spawn")
        workers = cfg.data.workers
        self._pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers else None

    def submit(self, seed: int, kind_weights: Sequence[float]) -> Callable[[], Sample]:
        """Start simulating one sample (with workers); return the call that hands it over."""
        weights = [float(w) for w in kind_weights]
        if self._pool is None:
            return functools.partial(Sample, self._cfg, seed, weights)
        return self._pool.submit(Sample, self._cfg, seed, weights).result

    def close(self) -> None:
        """Stop the workers, dropping samples no one will ask for."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> SampleFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def point_sources(
    pair: VolumePair, pixel_size_um: float, units_per_photon: np.ndarray, cfg: VolumeTrainConfig
) -> list[np.ndarray]:
    """Return the detection head's truth: per frame, the beads in the depth grid, (M, 4).

    Each row is x, y (frame pixels, pixel centres at integers), depth (µm from the frame's
    focus) and brightness: the bead's density total in the frame's normalised units
    (`units_per_photon[f]` per photon), over ``brightness_scale``. Beads are the simulator's
    points (splatted sub-voxel); nuclei and the worm body stay the density channels' work.
    """
    o = pair.objects
    bead = o.kind == "bead"
    first, last = float(cfg.depth_um[0]), float(cfg.depth_um[-1])
    out = []
    for f, focus in enumerate(pair.focus_um):
        z = o.z_um[bead] - focus
        keep = (z >= first) & (z <= last)
        rows = np.stack(
            [
                o.x_um[bead][keep] / pixel_size_um,
                o.y_um[bead][keep] / pixel_size_um,
                z[keep],
                o.intensity[bead][keep] * units_per_photon[f] / cfg.brightness_scale,
            ],
            axis=1,
        )
        out.append(rows.astype(np.float32).reshape(-1, 4))
    return out


def _kind_weights(cfg: VolumeTrainConfig, progress: float) -> list[float]:
    """Curriculum: start weights moving linearly to the final ones over curriculum_fraction."""
    d = cfg.data
    t = 1.0 if d.curriculum_fraction == 0 else min(progress / d.curriculum_fraction, 1.0)
    return [a + (b - a) * t for a, b in zip(d.start_kind_weights, d.kind_weights, strict=True)]


class VolumeBatch(NamedTuple):
    """A training batch: patches, their densities and their beads.

    Inputs (N, 1, P, P), densities (N, D, P, P), the beads as (N, M, 4) source rows (x, y in
    patch pixels, depth, brightness; `point_sources`) and an (N, M) mask of the real rows;
    for a body model, the body's glow alone (N, 1, P, P).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    sources: torch.Tensor
    mask: torch.Tensor
    body: torch.Tensor | None = None


def _turn(patch: torch.Tensor, t: int) -> torch.Tensor:
    """Return a (C, P, P) patch turned by copy `t` of 8 of the square's symmetries.

    rot90 ``t % 4`` times, then (t >= 4) an x flip; `_turn_points` moves points the same way.
    """
    turned = torch.rot90(patch, t % 4, dims=(1, 2))
    return turned.flip(2) if t >= 4 else turned


def _turn_points(rows: np.ndarray, turns: int, flip: bool, size: int) -> np.ndarray:
    """Source rows moved as `np.rot90(patch, turns, axes=(1, 2))` then an x flip move pixels."""
    rows = rows.copy()
    for _ in range(turns):  # rot90 once: new[i, j] = old[j, size - 1 - i]
        rows[:, 0], rows[:, 1] = rows[:, 1].copy(), size - 1 - rows[:, 0]
    if flip:
        rows[:, 0] = size - 1 - rows[:, 0]
    return rows


def sample_batch(
    rng: np.random.Generator,
    pool: Sequence[Sample],
    cfg: VolumeTrainConfig,
    device: torch.device | None = None,
) -> VolumeBatch:
    """Draw a batch of patches, randomly cropped and turned, with their beads (`VolumeBatch`).

    Patches are cut and turned on `device` (default the CPU) from the samples' copies there;
    the beads' rows stay small host arrays.
    """
    dev = torch.device("cpu") if device is None else device
    size = cfg.patch_size
    xs, ys, points, bodies = [], [], [], []
    for _ in range(cfg.batch_size):
        s = pool[int(rng.integers(len(pool)))]
        inputs, targets = s.tensors(dev)
        glow = s.body_tensor(dev)
        f = int(rng.integers(s.inputs.shape[0]))
        h, w = s.inputs.shape[-2:]
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        rows = s.sources[f] - np.array([x0, y0, 0, 0], dtype=np.float32)
        inside = (rows[:, :2] >= -0.5).all(1) & (rows[:, :2] < size - 0.5).all(1)
        t = int(rng.integers(8))  # the PSF is rotationally symmetric: 8 free copies
        xs.append(_turn(inputs[f, None, y0 : y0 + size, x0 : x0 + size], t))
        ys.append(_turn(targets[f, :, y0 : y0 + size, x0 : x0 + size], t))
        if glow is not None:
            bodies.append(_turn(glow[f, None, y0 : y0 + size, x0 : x0 + size], t))
        points.append(_turn_points(rows[inside], t % 4, t >= 4, size))
    m = max(1, max(len(p) for p in points))
    sources = np.zeros((len(points), m, 4), dtype=np.float32)
    mask = np.zeros((len(points), m), dtype=np.float32)
    for i, p in enumerate(points):
        sources[i, : len(p)] = p
        mask[i, : len(p)] = 1.0
    return VolumeBatch(
        torch.stack(xs),
        torch.stack(ys),
        _to_device(sources, dev),
        _to_device(mask, dev),
        torch.stack(bodies) if len(bodies) == len(xs) else None,
    )


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return a small host array on `device`, without waiting for the GPU where there is one.

    A copy from ordinary (pageable) host memory waits for every kernel queued before it; from
    pinned memory it is queued like one (torch's pinned allocator keeps the buffer until done).
    """
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- losses


def _gauss_matrix(n: int, sigma: float) -> torch.Tensor:
    """(n, n) Gaussian smoothing matrix (rows sum to 1 inside, zero beyond the edges)."""
    i = torch.arange(n, dtype=torch.float32)
    g = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    r = max(1, math.ceil(3 * sigma))
    g = g * ((i[:, None] - i[None, :]).abs() <= r)
    return g / g.sum(dim=1, keepdim=True).max()


@functools.lru_cache(maxsize=64)
def _gauss_on(n: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Return `_gauss_matrix` on a device, made once per size, scale, device and dtype.

    A loss step needs six; on a GPU each would otherwise be built on the host and copied
    every step.
    """
    return _gauss_matrix(n, sigma).to(device=device, dtype=dtype)


def smooth3d(v: torch.Tensor, sigma_px: float, sigma_slices: float | None) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, D, H, W) volumes along D, H and W (zero edges).

    Done as three small matrix products, which CPUs run far faster than 1-channel convs.
    ``sigma_slices=None`` smooths laterally only.
    """
    n, d, h, w = v.shape
    x = v
    if sigma_slices is not None:
        gz = _gauss_on(d, sigma_slices, v.device, v.dtype)
        x = torch.matmul(gz, v.reshape(n, d, h * w)).reshape(n, d, h, w)
    gh = _gauss_on(h, sigma_px, v.device, v.dtype)
    gw = _gauss_on(w, sigma_px, v.device, v.dtype)
    x = torch.matmul(gh, x)
    return torch.matmul(x, gw.T)


class TorchRenderer:
    """Torch twin of `engine.volume.Renderer.planes` (without the residual) for patches.

    For the loss, the PSF may be cropped (`crop_px`): prediction and truth are rendered the
    same way. As in `Renderer`, the patch sits at the FFT grid's origin with one PSF radius of
    zeros after it (light spread past an edge wraps into those zeros, never onto the patch), so
    a 128 px patch with a 63 px PSF needs a 160 px grid, not 192 with a margin on both sides.
    The zero rows are not transformed, nor are rows outside the patch transformed back. The
    render term was half of a training step (128² patches, batch 8, 2 threads on an AMX Xeon:
    337 of 631 ms); with this layout, elementwise products instead of an einsum, dense input
    and the truth's light from `light`, a step takes 349 ms, same loss values.
    """

    def __init__(
        self,
        psf: np.ndarray,
        depth_um: np.ndarray,
        patch: int,
        crop_px: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if crop_px is not None and crop_px < psf.shape[-1]:
            c, r = psf.shape[-1] // 2, crop_px // 2
            psf = psf[:, c - r : c + r + 1, c - r : c + r + 1]
        size = psf.shape[-1]
        # the same grid rule as `Renderer`: one PSF radius of zeros after the patch
        self.grid = scipy.fft.next_fast_len(patch + size // 2, real=True)
        emb = torch.zeros(psf.shape[0], self.grid, self.grid)
        emb[:, :size, :size] = torch.from_numpy(psf)
        emb = torch.roll(emb, (-(size // 2), -(size // 2)), dims=(1, 2))
        self.otf = torch.fft.rfft2(emb).to(device)
        self.depth_um = depth_um
        self._crop_light: dict[tuple[int, int], torch.Tensor] = {}

    def light(self, objects: torch.Tensor, dz_um: np.ndarray) -> torch.Tensor:
        """Mean (N, K) of the planes `render` would return, without rendering them.

        A plane's sum over the patch is each depth's density weighted by how much of its
        light the PSF puts inside the patch: the patch's indicator correlated with the PSF,
        one (H, W) map per bank entry, made once per patch shape. The render term's
        normaliser, for the cost of a dot product instead of an FFT per depth.
        """
        h, w = objects.shape[-2:]
        maps = self._crop_light.get((h, w))
        if maps is None:
            inside = torch.zeros(self.grid, self.grid, device=self.otf.device)
            inside[:h, :w] = 1.0
            corr = torch.fft.irfft2(
                torch.fft.rfft2(inside) * self.otf.conj(), s=(self.grid, self.grid)
            )
            maps = self._crop_light[(h, w)] = corr[:, :h, :w].reshape(len(self.otf), -1)
        j = torch.from_numpy(defocus_index(dz_um, self.depth_um)).to(maps.device)
        flat = objects.float().reshape(*objects.shape[:2], -1)
        total = torch.einsum("ndx,kdx->nk", flat, maps[j])
        return total / (h * w)

    def render(self, objects: torch.Tensor, dz_um: np.ndarray) -> torch.Tensor:
        """Planes (N, K, P, P) at defocus `dz_um` from (N, D, P, P) densities."""
        h, w = objects.shape[-2:]
        g = self.grid
        # rfft2 of the zero-padded patch, without padding it: along x with n = g (the
        # zeros are implicit), then along y over the patch's rows padded to g
        dense = objects.float().contiguous()  # FFTs on channels-last rows run ~3x slower
        spec = torch.fft.fft(torch.fft.rfft(dense, n=g, dim=-1), n=g, dim=-2)
        j = torch.from_numpy(defocus_index(dz_um, self.depth_um)).to(self.otf.device)
        # plane k = sum over depths d of spec[d] · OTF[j[k, d]], as elementwise products: an
        # einsum here runs as one tiny complex matmul per frequency, 5x slower with its copies
        out = torch.stack([(spec * self.otf[jk]).sum(dim=1) for jk in j], 1)
        # irfft2, keeping only the patch: back along y, drop the rows beyond it, then along x
        rows = torch.fft.ifft(out, dim=-2)[..., :h, :]
        img: torch.Tensor = torch.fft.irfft(rows, n=g, dim=-1)
        return img[..., :w]


def _density_term(
    cfg: VolumeTrainConfig,
    pred: torch.Tensor,
    target: torch.Tensor,
    sigma_px: float,
    sigma_slices: float,
) -> torch.Tensor:
    """Return the density term at one smoothing scale (L1, or squared error relative)."""
    lc = cfg.loss
    sp = compress(smooth3d(pred, sigma_px, sigma_slices), lc.compress_scale)
    st = compress(smooth3d(target, sigma_px, sigma_slices), lc.compress_scale)
    # (1, D, 1, 1) weights along the depth grid: 1 at focus, 1 + far_weight at the range's ends
    depth = torch.as_tensor(
        np.abs(cfg.depth_um) / cfg.depth_half_range_um, dtype=sp.dtype, device=sp.device
    )
    wz = (1.0 + lc.far_weight * depth).reshape(1, -1, 1, 1)
    if lc.object_loss == "l1":
        return ((sp - st).abs() * wz).mean()
    if lc.normalise == "batch":  # relative to the target's size, so the terms' weights compare
        return (((sp - st) ** 2) * wz).mean() / ((st**2).mean() + 1e-6)
    # the same, per sample, then averaged: every sample counts, however dim (a crop with next
    # to nothing in it must not weigh a million times the others: each denominator is at
    # least 1e-3 of the batch's)
    size = (st**2).mean(dim=(1, 2, 3))
    size = torch.maximum(size, 1e-3 * size.mean()) + 1e-6
    return ((((sp - st) ** 2) * wz).mean(dim=(1, 2, 3)) / size).mean()


def compress(v: torch.Tensor, scale: float) -> torch.Tensor:
    """Return c·log(1 + v/c) for c = ``scale`` > 0 (v itself for 0): relative above c, linear below.

    The densities are non-negative; the clamp only keeps a leaky output's small negatives
    (``train_leak``) out of the logarithm's domain trouble.
    """
    if scale <= 0:
        return v
    return scale * torch.log1p(v.clamp_min(0.0) / scale)


def _column_term(
    pred: torch.Tensor, target: torch.Tensor, sigma_px: float, scale: float = 0.0
) -> torch.Tensor:
    """Relative squared error of the density summed over depth, smoothed laterally.

    Depth plays no part here, so a faint far object whose depth the network doubts still
    earns the full gradient for putting its mass in the right column; the density term
    places it in depth. With ``scale`` the sums are compared compressed (`compress`).
    """
    sp = compress(smooth3d(pred.sum(dim=1, keepdim=True), sigma_px, None), scale)
    st = compress(smooth3d(target.sum(dim=1, keepdim=True), sigma_px, None), scale)
    return ((sp - st) ** 2).mean() / ((st**2).mean() + 1e-6)


def _cdf_term(pred: torch.Tensor, target: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Relative squared error of the density's running sums along depth, from both ends.

    Per pixel (after lateral smoothing) the running sum from the top and the one from the
    bottom each differ from the truth's by the mass on the wrong side: mass misplaced by d
    slices costs 2·d·m² in all, mass missed (D + 1)·m², so a guess in doubt pays, and a
    closer guess pays more: a one-dimensional transport cost along depth.
    """
    sp = smooth3d(pred, sigma_px, None)
    st = smooth3d(target, sigma_px, None)

    def both_ends_squared(v: torch.Tensor) -> torch.Tensor:
        # running sums from the top, and from the bottom (= the total minus those above)
        down = torch.cumsum(v, dim=1)
        up = down[:, -1:] - down + v
        return down**2 + up**2

    return both_ends_squared(sp - st).mean() / (both_ends_squared(st).mean() + 1e-6)


def _depth_nll_term(
    pred: torch.Tensor, target: torch.Tensor, sigma_px: float, sigma_slices: float
) -> torch.Tensor:
    """Mass-weighted KL divergence of each column's depth distribution from the truth's.

    After smoothing, each pixel's truth column p(z) and predicted column q(z) are normalised
    over depth; KL(p ‖ q) is averaged over pixels with the truth's column mass as weight, so
    it is 0 when every column puts its light at the right depths in the right proportions,
    nearly whatever the amount (the column and density terms score the amount). q is floored at
    every depth by 1 % of the predicted column's mean and 1 % of the true one's: no depth's
    log-likelihood falls far below log(1/(100·D)), so a sharp wrong guess costs a bounded
    amount; an empty column reads as a uniform guess, log(D) − H(p), cheaper than a sharp wrong
    one and dearer than a broad right one; and, with the mass weight, a column's gradient does
    not grow as its object dims. The floor's share tied to the truth's mass leaves a small
    pull towards more mass: a bead placed right scores 0.017 at the truth's brightness, 0.009
    at ten times it and 0.09 at a tenth (one bead, D = 41); the column term, which scores the
    amount squared, holds that in check.
    """
    sp = smooth3d(pred, sigma_px, sigma_slices).clamp_min(0.0)
    st = smooth3d(target, sigma_px, sigma_slices).clamp_min(0.0)
    mass = st.sum(dim=1, keepdim=True)
    p = st / (mass + 1e-12)
    floor = 1e-2 * (sp.mean(dim=1, keepdim=True) + mass / sp.shape[1]) + 1e-12
    q = (sp + floor) / (sp + floor).sum(dim=1, keepdim=True)
    kl = (p * (torch.log(p + 1e-12) - torch.log(q))).sum(dim=1, keepdim=True)
    return (kl * mass).sum() / (mass.sum() + 1e-12)


def source_masses(
    v: torch.Tensor,
    sources: torch.Tensor,
    depth_um: np.ndarray,
    sigma_px: float,
    sigma_slices: float,
) -> torch.Tensor:
    """Return each source's windowed mass of a density, (N, M).

    ``v`` is (N, D, P, P) on the depth grid ``depth_um``; ``sources`` (N, M, 4) rows x, y
    (patch pixels, centres at integers), depth (µm), brightness (`point_sources`). The window
    is a separable Gaussian centred on the source (unnormalised: 1 at its centre), so a
    density placed a pixel or a slice off still counts, less.
    """
    h, w = v.shape[-2:]
    dt, dev = v.dtype, v.device
    xs = torch.arange(w, dtype=dt, device=dev)
    ys = torch.arange(h, dtype=dt, device=dev)
    zs = torch.as_tensor(depth_um, dtype=dt, device=dev)
    sources = sources.to(dt)
    wx = torch.exp(-0.5 * ((xs - sources[..., 0:1]) / sigma_px) ** 2)  # (N, M, W)
    wy = torch.exp(-0.5 * ((ys - sources[..., 1:2]) / sigma_px) ** 2)  # (N, M, H)
    # (N, M, D); sigma_slices in steps of the grid, which depth_grid spaces by DEPTH_STEP_UM
    wz = torch.exp(-0.5 * ((zs - sources[..., 2:3]) / (sigma_slices * DEPTH_STEP_UM)) ** 2)
    # contract depth first, then rows, then columns: (N, M, H, W) is the largest intermediate
    per_plane = torch.einsum("ndyx,nmd->nmyx", v, wz)
    return torch.einsum("nmyx,nmy,nmx->nm", per_plane, wy, wx)


def _source_term(
    pred: torch.Tensor,
    target: torch.Tensor,
    sources: torch.Tensor,
    mask: torch.Tensor,
    depth_um: np.ndarray,
    sigma_px: float,
    sigma_slices: float,
    far_weight: float = 0.0,
) -> torch.Tensor:
    """Mean over the true beads of the relative squared error of their windowed masses.

    Each bead counts once, whatever its brightness: missing a faint one costs what missing a
    bright one does (the density term weighs a miss by brightness squared). Nothing outside
    the windows is scored. A bead's truth mass is floored at 1 % of the batch's mean so a
    bead at the very edge of the patch or the grid cannot dominate. With ``far_weight`` k a
    bead at depth z weighs 1 + k·|z|/half range in a weighted mean (k = 0: the plain mean).
    """
    # no branch on the bead count (a branch reads it from the device: a sync per step); a batch
    # of worm crops has no beads, an all-zero mask, and the term is then exactly 0
    count = mask.sum().clamp_min(1.0)
    p = source_masses(pred, sources, depth_um, sigma_px, sigma_slices)
    t = source_masses(target, sources, depth_um, sigma_px, sigma_slices)
    t_mean = (t * mask).sum() / count
    size = torch.maximum(t, 1e-2 * t_mean) ** 2 + 1e-12
    half_range = float(np.abs(depth_um).max())
    weight = mask * (1.0 + far_weight * sources[..., 2].to(mask.dtype).abs() / half_range)
    return (((p - t) ** 2 / size) * weight).sum() / weight.sum().clamp_min(1.0)


def body_term(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Return the body head's term: its glow's squared error relative to the batch's glow power.

    A batch of bead samples, with no body, is priced against a floor (`BODY_FLOOR`).
    """
    return ((pred - truth) ** 2).sum() / (truth**2).sum().clamp_min(BODY_FLOOR * truth.numel())


BODY_FLOOR = 0.01
"""Least mean squared glow (normalised units) `body_term` divides by: a batch with no body
(beads only) still pays for glow the head draws, as if a faint body were there (a worm's glow
is about 0.3-1 of a frame's std)."""


def render_depths(
    rng: np.random.Generator, cfg: VolumeTrainConfig, target: torch.Tensor
) -> np.ndarray:
    """Δz (µm) of the planes the render term scores this step, drawn without replacement.

    With ``render_at_objects`` = a, each draw picks depth d with weight (1 − a)/D + a · m_d / Σm
    (m_d the batch's true density at depth d), renormalised over the depths not yet drawn. A
    plane at an object's own depth is where the rendered object is sharp, so it is where a
    density too wide laterally, or placed a slice off, costs most. A uniform draw spends most
    planes on depths with nothing in focus.
    """
    depth = cfg.depth_um
    k = cfg.loss.render_planes
    share = cfg.loss.render_at_objects
    if share <= 0:
        return rng.choice(depth, k, replace=False)
    mass = target.detach().float().sum(dim=(0, 2, 3)).cpu().numpy().astype(np.float64)
    uniform = np.full(depth.size, 1.0 / depth.size)
    p = uniform if mass.sum() <= 0 else (1 - share) * uniform + share * mass / mass.sum()
    if share >= 1:  # keep k depths drawable however sparse the batch
        p = np.maximum(p, 1e-9)
    return rng.choice(depth, k, replace=False, p=p / p.sum())


def volume_loss(
    cfg: VolumeTrainConfig,
    renderer: TorchRenderer,
    pred: torch.Tensor,
    target: torch.Tensor,
    dz_um: np.ndarray,
    sources: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Object + render loss of predicted densities against the truth, and its parts as numbers.

    `volume_loss_terms` with its parts read (one device sync for all of them).
    """
    total, terms = volume_loss_terms(cfg, renderer, pred, target, dz_um, sources)
    return total, read_parts(terms)


def read_parts(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Return a dict of 0-d tensors as numbers, read from the device in one go."""
    if not terms:
        return {}
    values = torch.stack([v.detach().float() for v in terms.values()]).tolist()
    return dict(zip(terms, values, strict=True))


def volume_loss_terms(
    cfg: VolumeTrainConfig,
    renderer: TorchRenderer,
    pred: torch.Tensor,
    target: torch.Tensor,
    dz_um: np.ndarray,
    sources: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Object + render loss of predicted densities against the truth, and its parts.

    The parts stay on the device, detached: reading one (``.item()``) waits for the GPU's
    queue to drain, and the training loop reads them in batches (`read_parts`) so the host
    can queue the next steps meanwhile.

    With ``source_weight`` and ``sources`` (the batch's bead rows and their mask,
    `VolumeBatch`) each true bead's windowed mass is scored too (`_source_term`).

    With ``column_weight`` the density summed over depth is compared too (`_column_term`), with
    ``cdf_weight`` its running sums along depth (`_cdf_term`), with ``depth_nll_weight`` each
    column's distribution over depth (`_depth_nll_term`).
    With ``coarse_weight`` the density is also compared after heavy smoothing: density put a
    few pixels or slices from a faint object then earns partial credit, where the fine term
    alone gives next to no gradient and the network learns to put nothing there.
    """
    lc = cfg.loss
    # A channels-last network returns depth as the innermost axis; every term below works on
    # (H, W) planes, whose FFTs and matrix products are several times slower on that layout
    pred = pred.float().contiguous()
    obj = _density_term(cfg, pred, target, lc.object_sigma_px, lc.object_sigma_slices)
    parts = {"object": obj.detach()}
    total = lc.object_weight * obj
    if lc.coarse_weight > 0:
        coarse = _density_term(cfg, pred, target, lc.coarse_sigma_px, lc.coarse_sigma_slices)
        parts["coarse"] = coarse.detach()
        total = total + lc.coarse_weight * coarse
    if lc.cdf_weight > 0:
        cdf = _cdf_term(pred, target, lc.cdf_sigma_px)
        parts["cdf"] = cdf.detach()
        total = total + lc.cdf_weight * cdf
    if lc.column_weight > 0:
        col = _column_term(pred, target, lc.column_sigma_px, lc.compress_scale)
        parts["column"] = col.detach()
        total = total + lc.column_weight * col
    if lc.depth_nll_weight > 0:
        nll = _depth_nll_term(pred, target, lc.depth_nll_sigma_px, lc.depth_nll_sigma_slices)
        parts["depth_nll"] = nll.detach()
        total = total + lc.depth_nll_weight * nll
    if lc.source_weight > 0 and sources is not None:
        src = _source_term(
            pred,
            target,
            *sources,
            cfg.depth_um,
            lc.source_sigma_px,
            lc.source_sigma_slices,
            lc.source_far_weight,
        )
        parts["source"] = src.detach()
        total = total + lc.source_weight * src
    # at weight 0 the render term is still logged (how far the planes drift without it), but
    # outside the graph: no backward pass through the renderer
    with torch.set_grad_enabled(torch.is_grad_enabled() and lc.render_weight > 0):
        # rendering is linear: one render of the error, and the truth's light without rendering
        ren_err = renderer.render(pred - target, dz_um).abs()
        if lc.object_loss == "l1":
            ren = ren_err.mean()
        elif lc.normalise == "batch":
            ren = ren_err.mean() / (renderer.light(target, dz_um).mean() + 1e-6)
        else:
            light = renderer.light(target, dz_um).mean(dim=1)
            light = torch.maximum(light, 1e-3 * light.mean()) + 1e-6
            ren = (ren_err.mean(dim=(1, 2, 3)) / light).mean()
    parts["render"] = ren.detach()
    return total + lc.render_weight * ren, parts


class LabStack:
    """A lab's focus-scanned stack for volume training: planes in counts, z in µm (middle 0)."""

    def __init__(self, spec: LabStackConfig) -> None:
        self.z_um, self.planes = read_lab_stack(spec)
        self.path = spec.path


def sample_lab_batch(
    rng: np.random.Generator, stack: LabStack, cfg: VolumeTrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Cut a batch from one lab stack: one plane in, other planes of the same crop as targets.

    Returns the normalised inputs (N, 1, P, P), the input frames and the target planes in the
    density's units (counts / the frame's std; (N, 1, P, P) and (N, K, P, P)), and the K
    target planes' Δz from the input (µm, on the depth grid, within its range).
    """
    size, d = cfg.patch_size, cfg.data
    z = stack.z_um
    h, w = stack.planes.shape[-2:]
    if min(h, w) < size:
        raise ValueError(f"{stack.path}: planes {h}x{w} are smaller than patch_size {size}")
    inputs = np.flatnonzero(np.abs(z) <= d.focus_half_range_um + 1e-6)
    i0 = int(rng.choice(inputs))
    reach = np.flatnonzero((np.abs(z - z[i0]) <= cfg.depth_half_range_um + 1e-6) & (z != z[i0]))
    k = min(cfg.loss.render_planes, reach.size)
    if k == 0:
        raise ValueError(f"{stack.path}: no other plane within the depth range of plane {i0}")
    picked = np.sort(rng.choice(reach, k, replace=False))
    xs, frames, ys = [], [], []
    for _ in range(cfg.batch_size):
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        crop = stack.planes[:, y0 : y0 + size, x0 : x0 + size]
        t = int(rng.integers(8))
        crop = np.rot90(crop, t % 4, axes=(1, 2))
        if t >= 4:
            crop = crop[:, :, ::-1]
        frame = np.ascontiguousarray(crop[i0])
        x, _, std = normalize_images(frame[None])
        xs.append(x[0][None])
        frames.append(frame[None] / std[0])
        ys.append(np.ascontiguousarray(crop[picked]) / std[0])
    dz = np.round((z[picked] - z[i0]) / DEPTH_STEP_UM) * DEPTH_STEP_UM
    return (
        torch.from_numpy(np.stack(xs).astype(np.float32)),
        torch.from_numpy(np.stack(frames).astype(np.float32)),
        torch.from_numpy(np.stack(ys).astype(np.float32)),
        dz,
    )


def lowpass_residual(img: torch.Tensor, sigma_px: float = RESIDUAL_SIGMA_PX) -> torch.Tensor:
    """Gaussian low-pass of (N, C, H, W) inside the frame only, as `engine.volume.Renderer`.

    Normalised convolution: `smooth3d` with zero edges, divided by the smoothed frame support,
    so a flat residual (camera offset, background) stays flat up to the edges, as the runtime
    adds it to every plane.
    """
    n, c, h, w = img.shape
    flat = smooth3d(img.reshape(n * c, 1, h, w), sigma_px, None)
    support = smooth3d(torch.ones(1, 1, h, w, dtype=img.dtype, device=img.device), sigma_px, None)
    return (flat / support).reshape(n, c, h, w)


def lab_loss(
    renderer: TorchRenderer,
    pred: torch.Tensor,
    frames: torch.Tensor,
    targets: torch.Tensor,
    dz_um: np.ndarray,
    margin_px: int = 8,
) -> torch.Tensor:
    """Relative L1 between a lab stack's planes and the planes rendered from the density.

    As the runtime renders them (`engine.volume.Renderer.planes`): the density's own light at
    each Δz plus the low-passed part of the input frame that the density does not explain
    (camera offset, diffuse background). Supervision without density truth: the optics the
    model ships with tie every plane to the one density. Frame edges (`margin_px`), where
    light from outside the crop is missing, are left out.
    """
    rendered = renderer.render(pred, np.concatenate([[0.0], dz_um]))
    residual = lowpass_residual(frames - rendered[:, :1])
    model_planes = rendered[:, 1:] + residual
    m = margin_px
    err = (model_planes - targets)[..., m:-m, m:-m].abs().mean()
    return err / (targets[..., m:-m, m:-m].abs().mean() + 1e-6)


# ----------------------------------------------------------------------------- validation


VALIDATION_PIXEL_UM = 0.3
"""Pixel size of the validation frames (µm): the simulator's default, as the configs train."""


def _scored_beads(
    shape: tuple[int, ...], depth_um: np.ndarray, objects: Any, focus_um: float, margin_px: int
) -> list[tuple[float, int, int]]:
    """(depth from focus in µm, row, col) of the beads validation scores.

    Beads at least `margin_px` inside the frame and within the depth grid (less half a step).
    """
    h, w = shape[-2:]
    px = VALIDATION_PIXEL_UM
    out = []
    for i in np.flatnonzero(objects.kind == "bead"):
        z = float(objects.z_um[i]) - focus_um
        y, x = round(objects.y_um[i] / px), round(objects.x_um[i] / px)
        if margin_px <= y < h - margin_px and margin_px <= x < w - margin_px:
            if abs(z) <= depth_um[-1] - 0.5:
                out.append((z, int(y), int(x)))
    return out


def _column_peak(density: np.ndarray, y: int, x: int) -> tuple[np.ndarray, int | None]:
    """Return the 3x3 density column at (y, x) summed per depth, and its peak (None: empty)."""
    profile = density[:, y - 1 : y + 2, x - 1 : x + 2].sum(axis=(1, 2))
    k = int(np.argmax(profile))
    return profile, (k if profile[k] > 0 else None)


def bead_depth_errors(
    density: np.ndarray, depth_um: np.ndarray, objects: Any, focus_um: float, margin_px: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bead depth errors (µm) from a predicted (D, H, W) density, and the beads' depths.

    Returns the errors (NaN: nothing there) and each scored bead's true depth from focus (µm).
    The depth of a bead is where the density in a 3x3 window at its true xy peaks along the
    grid, refined by a parabola through the peak and its neighbours.
    """
    d = density.shape[0]
    errs, depths = [], []
    for z, y, x in _scored_beads(density.shape, depth_um, objects, focus_um, margin_px):
        depths.append(z)
        profile, k = _column_peak(density, y, x)
        if k is None:
            errs.append(np.nan)
            continue
        frac = 0.0
        if 0 < k < d - 1:
            a, b, c = profile[k - 1], profile[k], profile[k + 1]
            den = a - 2 * b + c
            frac = float(np.clip(0.5 * (a - c) / den, -0.5, 0.5)) if den < 0 else 0.0
        est = depth_um[0] + (k + frac) * (depth_um[1] - depth_um[0])
        errs.append(abs(est - z))
    return np.asarray(errs, dtype=np.float64), np.asarray(depths, dtype=np.float64)


def bead_density_fwhm(
    density: np.ndarray, depth_um: np.ndarray, objects: Any, focus_um: float, margin_px: int = 8
) -> np.ndarray:
    """Lateral FWHM (µm) of the density of each found bead, at its peak depth (NaN: not found).

    The beads of `bead_depth_errors`; an isotropic Gaussian fitted in a 13x13 window at the
    bead's true xy (`engine.metrics.gaussian_fwhm_2d`), on the depth where its 3x3 column
    peaks. Rendered beads are as wide as this width and the PSF's together, so this says,
    during training, whether the density is as sharp as the truth's (tri-linear points:
    about 0.2 µm; `engine.probes`).
    """
    from engine.metrics import gaussian_fwhm_2d

    out = []
    for _, y, x in _scored_beads(density.shape, depth_um, objects, focus_um, margin_px):
        _, k = _column_peak(density, y, x)
        if k is None:
            out.append(np.nan)
            continue
        window = density[k, y - 6 : y + 7, x - 6 : x + 7]
        out.append(gaussian_fwhm_2d(window, VALIDATION_PIXEL_UM, centered=True))
    return np.asarray(out, dtype=np.float64)


class _Validation:
    """Fixed full frames (never trained on): losses and the bead depth error of the model."""

    def __init__(self, cfg: VolumeTrainConfig) -> None:
        # the original worm whatever the recipe's (`data.worm`): every recipe's validation
        # reads the same frames, so its figures compare across recipes
        data = cfg.data.model_copy(update={"worm": WormConfig()})
        cfg = cfg.model_copy(update={"data": data})
        self.samples = [
            Sample(cfg, VALIDATION_SEED_OFFSET + i, w)
            for i, w in enumerate([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
        ]
        # the same read-out on the truth's own density (frame 0 of each pair): the goal
        widths = [
            bead_density_fwhm(s.targets[0], cfg.depth_um, s.objects, s.focus_um[0])
            for s in self.samples
            if s.kind != "worm"
        ]
        truth = np.concatenate(widths) if widths else np.zeros(0)
        self.truth_fwhm_um = float(np.nanmedian(truth)) if np.isfinite(truth).any() else np.nan

    def run(
        self, cfg: VolumeTrainConfig, model: DeepZ, bf16: bool, device: torch.device
    ) -> dict[str, float]:
        errs: list[np.ndarray] = []
        depths: list[np.ndarray] = []
        widths: list[np.ndarray] = []
        mass = np.zeros(cfg.depth_um.size)
        body_err, body_power = 0.0, 0.0
        for s in self.samples:
            x = torch.from_numpy(s.inputs[:1, None]).to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out, _, body = model.outputs(x)
                pred = out.float()[0].cpu().numpy()
            mass += pred.sum(axis=(1, 2))
            if body is not None and s.body is not None and s.kind != "beads":
                glow = body.float()[0, 0].cpu().numpy()
                body_err += float(((glow - s.body[0]) ** 2).sum())
                body_power += float((s.body[0] ** 2).sum())
            if s.kind != "worm":
                e, z = bead_depth_errors(pred, cfg.depth_um, s.objects, s.focus_um[0])
                errs.append(e)
                depths.append(z)
                widths.append(bead_density_fwhm(pred, cfg.depth_um, s.objects, s.focus_um[0]))
        e = np.concatenate(errs) if errs else np.zeros(0)
        far = np.abs(np.concatenate(depths)) > 6.0 if depths else np.zeros(0, dtype=bool)
        hits = np.nan_to_num(e, nan=np.inf) <= 1.0
        found = e[np.isfinite(e)]
        share = mass / max(float(mass.sum()), 1e-30)
        fwhm = np.concatenate(widths) if widths else np.zeros(0)
        fwhm = fwhm[np.isfinite(fwhm)]
        # a body model's glow on the worm frames, RMS error over the glow's RMS
        body_row = {"val_body_relative_rms": (body_err / body_power) ** 0.5} if body_power else {}
        return body_row | {
            # depth channels holding at least a fifth of an even share of the density: a model
            # that gathers mass on a comb of preferred depths uses few (depth is quantised)
            "val_depth_channels_used": float(np.mean(share >= 0.2 / share.size)),
            # over all beads, a bead with no density in its column counting as a miss
            "val_bead_found": float(found.size / e.size) if e.size else 0.0,
            "val_bead_recall_1um": float(np.mean(hits)) if e.size else 0.0,
            # the same for beads more than 6 µm from focus (faint rings: where models fail)
            "val_far_recall_1um": float(np.mean(hits[far])) if far.any() else 0.0,
            "val_bead_depth_median_um": float(np.median(found)) if found.size else float("nan"),
            "val_bead_depth_p90_um": (
                float(np.percentile(found, 90)) if found.size else float("nan")
            ),
            "val_bead_within_1um": float(np.mean(found <= 1.0)) if found.size else 0.0,
            "val_beads": float(e.size),
            # found beads' density width at their peak depth, against the truth's (the
            # rendered bead FWHM follows it: sessions 10-11)
            "val_density_fwhm_um": float(np.median(fwhm)) if fwhm.size else float("nan"),
            "val_truth_density_fwhm_um": self.truth_fwhm_um,
        }


# ----------------------------------------------------------------------------- training


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bfloat16 matmul (AVX-512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_device(cfg: VolumeTrainConfig) -> torch.device:
    """Return the torch device of `cfg.device`; raise ValueError naming it when missing."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but torch sees no CUDA GPU here (use 'cpu')")
    return torch.device(cfg.device)


def uses_bf16(cfg: VolumeTrainConfig) -> bool:
    """Whether `cfg` trains under bfloat16 autocast on its device."""
    if cfg.bf16 != "auto":
        return cfg.bf16 == "on"
    if cfg.device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def _progress(cfg: VolumeTrainConfig, step: int, wall_s: float) -> float:
    t = step / cfg.steps
    if cfg.schedule_by == "wall" and cfg.max_wall_s is not None:
        t = max(t, wall_s / cfg.max_wall_s)
    return min(t, 1.0)


def make_volume_metadata(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    psf_file: str,
    extra: dict[str, Any],
    modality: Modality | None = None,
) -> ModelMetadata:
    """Describe a volume model trained with `cfg`, rendering `modality` (default: the trained)."""
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
        ),
        extra=extra,
    )


def batch_loss(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    renderer: TorchRenderer,
    pool: Sequence[Sample],
    step: int,
    device: torch.device,
    bf16: bool,
    labs: Sequence[LabStack],
    key: list[int],
    done: Callable[[str], None],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of `training_step`: drawn with the seed `key`, run forward; its loss and parts."""
    rng = np.random.default_rng(key)
    d = cfg.data
    if labs and step % d.lab_every == d.lab_every - 1:  # a lab stack: render loss only
        x, frames, targets, dz = sample_lab_batch(rng, labs[int(rng.integers(len(labs)))], cfg)
        x, frames, targets = x.to(device), frames.to(device), targets.to(device)
        done("batch")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(x.to(memory_format=torch.channels_last))
        done("forward")
        lab = lab_loss(renderer, pred.float(), frames, targets, dz)
        loss, parts = cfg.loss.render_weight * lab, {"lab": lab.detach()}
    else:
        batch = sample_batch(rng, pool, cfg, device)
        x = batch.inputs.contiguous(memory_format=torch.channels_last)
        dz = render_depths(rng, cfg, batch.targets)
        done("batch")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred, det, body = model.outputs(x)
        done("forward")
        beads = (batch.sources, batch.mask)
        if cfg.freeze_trunk:  # the density is frozen: its terms would only pull the splat
            loss, parts = torch.zeros((), device=device), {}
        else:
            loss, parts = volume_loss_terms(cfg, renderer, pred.float(), batch.targets, dz, beads)
        if det is not None and cfg.loss.detection_weight > 0:
            found, found_parts = detection_loss(det, *beads)
            loss = loss + cfg.loss.detection_weight * found
            parts |= found_parts
        if body is not None and batch.body is not None and cfg.loss.body_weight > 0:
            glow = body_term(body.float(), batch.body)
            loss = loss + cfg.loss.body_weight * glow
            parts["body"] = glow.detach()
    return loss, parts


def training_step(
    cfg: VolumeTrainConfig,
    model: DeepZ,
    opt: torch.optim.Optimizer,
    renderer: TorchRenderer,
    pool: Sequence[Sample],
    step: int,
    device: torch.device,
    bf16: bool,
    labs: Sequence[LabStack] = (),
    ema: AveragedModel | None = None,
    mark: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the loop's step number `step` (counted from 0); return its loss and parts.

    The one home of a training step, which `train` loops over and `benchmarks.train_step`
    times: a batch (from the pool, or every ``lab_every``-th step a lab stack's), the forward
    pass, the loss, the backward pass — ``grad_accumulation`` times, the gradients averaged —
    and the optimiser with its weight average. The values (the batches' means) come back on
    the device, unread ("loss" first): reading one waits for the GPU's queue.
    `mark`, where given, is called with each phase's name as it ends (``PHASES``).
    """

    def done(phase: str) -> None:
        if mark is not None:
            mark(phase)

    opt.zero_grad(set_to_none=True)
    total: dict[str, torch.Tensor] = {}
    for part in range(cfg.grad_accumulation):
        # batch 0 keeps the seed a step had before accumulation existed: runs stay reproducible
        key = [cfg.seed, step] if part == 0 else [cfg.seed, step, part]
        loss, parts = batch_loss(cfg, model, renderer, pool, step, device, bf16, labs, key, done)
        done("loss")
        (loss / cfg.grad_accumulation).backward()  # type: ignore[no-untyped-call]
        done("backward")
        for k, v in {"loss": loss.detach(), **parts}.items():
            share = v / cfg.grad_accumulation
            total[k] = share if part == 0 else total[k] + share
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if ema is not None:
        ema.update_parameters(model)
    done("optimiser")
    return total


PHASES = ("batch", "forward", "loss", "backward", "optimiser")

READ_EVERY = 50
"""`train` reads its steps' loss values from the device every this many steps."""


def _read_rows(
    unread: list[tuple[dict[str, float], dict[str, torch.Tensor]]],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """Append the unread steps' rows to `history` with their values read; return the last's.

    One device sync for all of them. `unread` is emptied.
    """
    keyed = {f"{i} {k}": v for i, (_, values) in enumerate(unread) for k, v in values.items()}
    numbers = iter(read_parts(keyed).values())
    last: dict[str, float] = {}
    for row, values in unread:
        last = {k: next(numbers) for k in values}
        history.append(row | last)
    unread.clear()
    return last


def build_optimiser(cfg: VolumeTrainConfig, model: DeepZ) -> torch.optim.Adam:
    """Return the run's optimiser: Adam over the weights the config trains (`_param_groups`).

    With ``freeze_trunk`` (and a detection head) the rest of `model` is frozen here first, so
    every caller (the run, the step benchmark, `checkpoint_from_weights`) trains the same set.
    """
    if cfg.freeze_trunk and model.detect_head is not None:  # the head alone learns
        model.requires_grad_(False)
        model.detect_head.requires_grad_(True)
    return torch.optim.Adam(_param_groups(model, cfg), lr=cfg.lr)


def check_measured_bank(cfg: VolumeTrainConfig) -> str | None:
    """Check a measured PSF bank the optics name; return its SHA-256 (None without one).

    Raises ValueError with one line if it is unfit: missing, not a bank, or its step off the
    simulator's slices. Not at config load: a recipe's config names a bank made by a command
    (its header says which), and loads on a machine that has not made it yet. Before a run,
    though, so a wrong bank fails at the start, not when the first sample is imaged.
    """
    from engine.optics import SLICE_UM, OpticsConfig
    from engine.volume import load_psf_bank

    optics = OpticsConfig(**cfg.optics)
    if optics.psf_model != "measured":
        return None
    ratio = SLICE_UM / optics.psf_bank_step_um
    if abs(ratio - round(ratio)) > 1e-6:
        raise ValueError(
            f"optics.psf_bank_step_um {optics.psf_bank_step_um} µm does not divide the "
            f"simulator's {SLICE_UM} µm slices"
        )
    try:
        load_psf_bank(str(optics.psf_bank), None, measured=True)
        return file_sha256(str(optics.psf_bank))
    except (OSError, ValueError) as exc:
        raise ValueError(f"optics.psf_bank: {exc}") from exc


def train(cfg: VolumeTrainConfig, resume: bool = False, progress: bool = True) -> DeepZ:
    """Run (or resume) volume training; return the model (eval mode)."""
    from tqdm import tqdm

    from engine.optics import OpticsConfig

    bank_sha256 = check_measured_bank(cfg)
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    device = training_device(cfg)
    bf16 = uses_bf16(cfg)
    out = cfg.out_dir  # made once the start is checked: a refused run leaves no empty folder
    model: DeepZ = build_volume_model(cfg)
    model = model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = build_optimiser(cfg, model)
    step, history, wall_before = 0, [], 0.0
    ema_state: dict[str, torch.Tensor] | None = None
    ckpt = out / "checkpoint.pt"
    if resume:
        src, ck = _resume_checkpoint(cfg, ckpt)
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ModelMetadataError(
                f"--resume: {src} does not fit this config's network "
                f"({str(err).splitlines()[0][:200]})"
            ) from None
        step, history, wall_before = ck["step"], ck["history"], ck["wall_s"]
        ema_state = ck.get("ema")
        if ck.get("psf_bank_sha256", bank_sha256) != bank_sha256:  # older checkpoints: none
            raise ValueError(
                f"optics.psf_bank: {src} was trained through another PSF bank (sha256 "
                f"{str(ck['psf_bank_sha256'])[:12]}) than the config's now "
                f"({str(bank_sha256)[:12]}); a resume would mix two microscopes"
            )
        print(f"resumed from {src} at step {step} ({wall_before / 60:.0f} min trained)")
    elif cfg.init_from is not None:
        state = _widen_inputs(_initial_weights(Path(cfg.init_from)), model.state_dict())
        own = model.state_dict()
        # layers whose shape changed (e.g. the head of a wider depth grid) start fresh
        fresh = sorted(k for k, v in own.items() if k not in state or state[k].shape != v.shape)
        if len(fresh) > len(own) // 2:  # not this network's weights: a run from scratch
            raise ModelMetadataError(  # would pass for a fine-tune
                f"init_from: {cfg.init_from} fits {len(own) - len(fresh)} of this network's "
                f"{len(own)} tensors: not weights of this architecture"
            )
        model.load_state_dict(
            {k: v for k, v in state.items() if k in own and k not in fresh}, strict=False
        )
        note = f"; fresh: {', '.join(fresh)}" if fresh else ""
        print(f"initialised from {cfg.init_from} (fresh optimiser and schedule{note})")
    ema = weight_average(model, cfg.ema_decay)
    if ema is not None and resume:
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        else:  # a checkpoint of a run without the average: it starts from the weights
            print("the checkpoint has no weight average: it starts from the weights")
    elif ema_state is not None:
        print("ema_decay = 0: the checkpoint's weight average is dropped; the raw weights go on")
    # the network validation reads and the run writes: the average where one is kept
    served: DeepZ = model if ema is None else ema.module  # type: ignore[assignment]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    psf = psf_bank(OpticsConfig(**cfg.optics), cfg.depth_um, modality=cfg.target_modality)
    renderer = TorchRenderer(psf, cfg.depth_um, cfg.patch_size, cfg.loss.render_psf_px, device)
    with SampleFeed(cfg) as feed:  # its workers (if any) stop however the loop ends
        d = cfg.data
        first_seed = TRAIN_SEED_OFFSET + cfg.seed * 1_000_000
        # the pool as an unbroken run holds it at `step`: the refreshes before it (the loop
        # makes the one at `step` itself), each sample in its slot (counter % pool size); with
        # a curriculum its samples take the kind weights of `step`, not of when first drawn
        counter = d.pool_size + (max(step - 1, 0) // d.refresh_every) * d.refresh_count
        weights = _kind_weights(cfg, _progress(cfg, step, wall_before))
        made = [
            feed.submit(first_seed + counter - d.pool_size + i, weights) for i in range(d.pool_size)
        ]
        val = _Validation(cfg)  # (with workers, built while they simulate the pool)
        pool = [get() for get in made]
        pool = [pool[(j - counter) % d.pool_size] for j in range(d.pool_size)]
        # the next refresh's samples, simulated while the steps before it run (with workers);
        # their kind weights are those of the refresh before, a curriculum one refresh behind
        ahead = [feed.submit(first_seed + counter + i, weights) for i in range(d.refresh_count)]
        labs = [LabStack(spec) for spec in d.lab_stacks] if d.lab_every else []
        start = time.monotonic()
        bar = tqdm(
            total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True
        )
        model.train()
        # where this run's wall time goes, printed at its end: a GPU run's loop reached half its
        # step benchmark's rate (docs/benchmarks.md, sessions 23-24) and this says whether the
        # pool's refreshes or the validations take the rest, or the steps themselves
        spent = {"refresh": 0.0, "validation and checkpoints": 0.0}
        first_step = step
        # each step's loss values stay on the device until READ_EVERY steps are due, then are
        # read in one go: a read is a host sync, and 7 a step kept a GPU from running ahead
        unread: list[tuple[dict[str, float], dict[str, torch.Tensor]]] = []
        while step < cfg.steps:
            wall = wall_before + time.monotonic() - start
            if step > 0 and step % d.refresh_every == 0:
                t0 = time.monotonic()
                for get in ahead:  # waits for the workers' samples if they are not done yet
                    pool[counter % d.pool_size] = get()
                    counter += 1
                weights = _kind_weights(cfg, _progress(cfg, step, wall))
                ahead = [
                    feed.submit(first_seed + counter + i, weights) for i in range(d.refresh_count)
                ]
                spent["refresh"] += time.monotonic() - t0
            values = training_step(cfg, model, opt, renderer, pool, step, device, bf16, labs, ema)
            step += 1
            wall = wall_before + time.monotonic() - start
            lr = cfg.lr * _lr_factor(cfg, step, wall)  # type: ignore[arg-type]  # same fields
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_factor", 1.0)
            unread.append(({"step": step, "lr": lr, "wall_s": wall}, values))
            bar.update(1)
            timeout = cfg.max_wall_s is not None and wall >= cfg.max_wall_s
            validate = step % cfg.checkpoint_every == 0 or step == cfg.steps or timeout
            if validate or len(unread) >= READ_EVERY:
                parts = _read_rows(unread, history)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items() if k != "loss"})
            if validate:
                t0 = time.monotonic()
                served.eval()
                history[-1] |= val.run(cfg, served, bf16, device)
                model.train()
                # (`checkpoint_from_weights` leaves one row without a loss)
                bar.write(
                    f"step {step} ({wall / 60:.1f} min): "
                    f"loss {np.mean([h['loss'] for h in history[-100:] if 'loss' in h]):.4f}"
                    f"  bead depth median {history[-1]['val_bead_depth_median_um']:.2f} µm, "
                    f"p90 {history[-1]['val_bead_depth_p90_um']:.2f} µm, "
                    f"within 1 µm {history[-1]['val_bead_within_1um']:.0%}, "
                    f"found {history[-1]['val_bead_found']:.0%}, "
                    f"recall (<= 1 µm of all) {history[-1]['val_bead_recall_1um']:.0%}, "
                    f"beyond 6 µm {history[-1]['val_far_recall_1um']:.0%}, "
                    f"depth channels used {history[-1]['val_depth_channels_used']:.0%}, "
                    f"density FWHM {history[-1]['val_density_fwhm_um']:.2f} µm "
                    f"(truth {history[-1]['val_truth_density_fwhm_um']:.2f})"
                )
                _checkpoint(cfg, model, opt, step, history, wall, ema)
                spent["validation and checkpoints"] += time.monotonic() - t0
            if timeout:
                bar.write(f"stopping at step {step}: max_wall_s = {cfg.max_wall_s} reached")
                break
        bar.close()
        _read_rows(unread, history)  # (empty unless the loop was left early)
        total = time.monotonic() - start
        stepping = total - sum(spent.values())
        bar.write(
            f"{step - first_step} steps in {total:.0f} s: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in spent.items())
            + f", the steps {stepping:.0f} s ({(step - first_step) / max(stepping, 1e-9):.1f}"
            " steps/s)"
        )
    served.eval()
    if cfg.weights_out is not None:
        save_volume_model(cfg, served, psf, history, step, bf16)
    return served


def _param_groups(model: DeepZ, cfg: VolumeTrainConfig) -> list[dict[str, Any]]:
    """Return the optimiser's groups: the detection head, and everything else.

    The head is fresh on a trained network, so it learns at ``detection_lr_factor`` times lr.
    Frozen parameters (``freeze_trunk``) are left out.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if n.startswith("detect_head.")]
    rest = [p for n, p in named if not n.startswith("detect_head.")]
    groups: list[dict[str, Any]] = [{"params": rest, "lr_factor": 1.0}] if rest else []
    if head:
        factor = cfg.detection_lr_factor
        groups.append({"params": head, "lr": cfg.lr * factor, "lr_factor": factor})
    return groups


def weight_average(model: DeepZ, decay: float) -> AveragedModel | None:
    """Return an exponential moving average of `model`'s weights (torch's), or None for 0."""
    if decay <= 0:
        return None
    average = get_ema_multi_avg_fn(decay)  # type: ignore[no-untyped-call]
    return AveragedModel(model, multi_avg_fn=average, use_buffers=True)


def served_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the weights a checkpoint serves: the weight average where the run kept one."""
    if "ema" not in checkpoint:
        state: dict[str, torch.Tensor] = checkpoint["model"]
        return state
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in checkpoint["ema"].items() if k.startswith(prefix)}


def _widen_inputs(
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


def _initial_weights(path: Path) -> dict[str, torch.Tensor]:
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
    meta = make_volume_metadata(cfg, model, psf_path.name, extra, modality)
    save_model(model.cpu(), meta, weights)
    return weights


def _machine(cfg: VolumeTrainConfig, bf16: bool) -> str:
    """Where a run trained, for the model's metadata."""
    where = f"{platform.machine()} {os.cpu_count()} cores, torch threads {cfg.threads}"
    if cfg.device == "cuda":  # (converted elsewhere from a checkpoint: the GPU is unknown)
        where += f", GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cuda'}"
    return f"{where}, bf16 autocast {bf16}"


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

    if cfg.weights_out is None:
        raise ValueError("the config has no weights_out to write")
    ck = read_checkpoint(checkpoint)
    ck_cfg = VolumeTrainConfig.model_validate(ck["config"])
    ck_cfg.weights_out = cfg.weights_out
    model = build_volume_model(ck_cfg)
    raw = not average and "ema" in ck
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
    are unchanged and the next step is a fresh Adam's first); the step count and wall time
    from the weights' metadata (``extra``); the validation history of the run, as the weights'
    metadata keeps it (its last row); and ``cfg`` as the recipe to resume with.
    """
    from engine.model import load_model

    if cfg.portable_checkpoint is None:
        raise ValueError("the config has no portable_checkpoint to write")
    loaded, meta = load_model(weights)
    model = build_volume_model(cfg)
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
    history = [{"step": float(step), **last}] if last else []
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
    "detection",
    "body",
)
"""What a resumed run must share with its checkpoint: its network and what it learns. A run
that changes them is a new recipe, started from the weights with ``init_from``."""


def _resume_checkpoint(cfg: VolumeTrainConfig, ckpt: Path) -> tuple[Path, dict[str, Any]]:
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


def _checkpoint(
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
        _plot(cfg.out_dir, history)
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


def _plot(out: Path, history: list[dict[str, float]]) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
