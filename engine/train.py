"""Train the Deep-Z generator on simulated focal stacks (and optional lab focus scans).

``python -m engine.train --config configs/train_slim.toml [--resume] [--steps N] [--out DIR]``

Pairs are an input plane at z0 and a target at z0 + Δz from one focal stack: uniform DPMs
(target = the stack plane), and tilted / curved DPMs whose target is interpolated between
planes along the surface. Inputs and targets are normalised only through `engine.metadata`:
the target uses the INPUT frame's mean and std, so outputs map back with the input's stats.
A pool of pre-simulated stacks is cropped into patches and partly refreshed every few hundred
steps. Fixed seeds give the same run; checkpoints allow ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.files import out_dir_problem
from engine.lab_files import focus_step_problem, full_scale, read_stack, saturated_mask
from engine.losses import lsgan_d_loss, lsgan_g_loss, ms_ssim, ssim
from engine.metadata import ModelMetadata, ModelMetadataError, normalize_images, weights_that_fit
from engine.model import (
    PRESETS,
    DeepZ,
    Discriminator,
    build_model,
    load_model,
    metadata_path,
    read_checkpoint,
    save_model,
    write_checkpoint,
)
from engine.optics import SampleKind

log = logging.getLogger(__name__)

__all__ = [
    "CameraRange",
    "CropOrigins",
    "DataConfig",
    "LabPlanes",
    "LabStackConfig",
    "LossConfig",
    "ModelConfig",
    "Stack",
    "TrainConfig",
    "command_line",
    "git_commit",
    "load_config",
    "load_lab_stack",
    "main",
    "make_metadata",
    "phase_correlation_shift",
    "read_lab_stack",
    "register_stack",
    "sample_batch",
    "simulated_stack",
    "train",
    "train_stack_seed",
]

TRAIN_SEED_OFFSET = 1_000_000
"""Simulated training stacks use seeds >= this; `engine.evaluate` uses seeds below it."""
VALIDATION_SEED_OFFSET = 900_000


class _Base(BaseModel):
    """Strict pydantic base: unknown keys are errors, assignments are validated, floats finite.

    ``lr = inf`` or ``grad_clip = inf`` passed ``gt=0`` and trained NaN weights.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


_C = TypeVar("_C", bound=BaseModel)


def validation_line(exc: ValidationError) -> str:
    """Return the first of a pydantic error's problems in one line: key, value and message."""
    first = exc.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{key} = {first.get('input')!r}: {first['msg']}{more}"


def camera_overrides(v: dict[str, Any]) -> dict[str, Any]:
    """Check a config's ``camera`` table against `engine.optics.CameraConfig` at load.

    (Not when the first sample is simulated, minutes into a run.)
    """
    from engine.optics import CameraConfig

    try:
        CameraConfig.model_validate(v)
    except ValidationError as exc:
        raise ValueError(f"camera.{validation_line(exc)}") from None
    return v


def optics_overrides(v: dict[str, Any]) -> dict[str, Any]:
    """Check a config's ``optics`` table against `engine.optics.OpticsConfig` at load.

    (Not when the first stack is simulated, with the run's folder made: a misspelt key was a
    pydantic traceback and a config.json left behind.)
    """
    from engine.optics import OpticsConfig

    try:
        OpticsConfig.model_validate(v)
    except ValidationError as exc:
        raise ValueError(f"optics.{validation_line(exc)}") from None
    return v


class ModelConfig(_Base):
    """Which generator to train: a preset with optional overrides."""

    preset: Literal["slim", "paper"] = Field("slim", description="Named architecture.")
    channels: list[int] | None = Field(None, description="Override: stem + level widths.")
    global_skip: bool | None = Field(None, description="Override: add the input to the output.")

    def build(self) -> DeepZ:
        """Build the generator described by this section."""
        overrides: dict[str, Any] = {}
        if self.channels is not None:
            overrides["channels"] = self.channels
        if self.global_skip is not None:
            overrides["global_skip"] = self.global_skip
        return build_model(self.preset, **overrides)


class LossConfig(_Base):
    """Loss weights: pixel term + (MS-)SSIM + optional least-squares GAN."""

    pixel: Literal["l1", "reversed_huber"] = Field("l1", description="Pixel loss kind.")
    pixel_weight: float = Field(3.0, ge=0.0, description="Weight of the pixel loss.")
    ssim_weight: float = Field(1.0, ge=0.0, description="Weight of (1 - MS-SSIM).")
    ssim_scales: int = Field(3, ge=1, le=5, description="MS-SSIM scales (1 = plain SSIM).")
    adversarial_weight: float = Field(0.0, ge=0.0, description="LSGAN weight; 0 disables D.")
    adversarial_start_step: int = Field(0, ge=0, description="Step at which the GAN term starts.")


class CameraRange(_Base):
    """Ranges from which each simulated stack draws its signal and background levels."""

    peak_photons: tuple[float, float] = Field((300.0, 3000.0), description="Log-uniform range.")
    background_photons: tuple[float, float] = Field((10.0, 100.0), description="Uniform range.")


class LabStackConfig(_Base):
    """A lab's own focus-scanned stack (TIFF or OME-Zarr), used beside simulated stacks."""

    path: Path = Field(
        description="TIFF, .npy, or OME-Zarr group / array holding (Z, H, W) (time and channel "
        "axes of length 1 are dropped)."
    )
    z_step_um: float = Field(
        description="Focus step between planes (µm): positive when the first plane is the "
        "shallowest, negative when the scan ran from deep to shallow (read in reverse)."
    )
    register_planes: bool = Field(True, description="Register planes by phase correlation (drift).")
    check_file_step: bool = Field(
        True,
        description="Refuse a z_step_um more than 1 % from the focus step the file records "
        "(ImageJ spacing, OME PhysicalSizeZ, an OME-Zarr z scale); false for a file whose "
        "recorded calibration is known to be wrong.",
    )

    @field_validator("z_step_um")
    @classmethod
    def _a_step(cls, v: float) -> float:
        if not math.isfinite(v) or v == 0:
            raise ValueError("z_step_um must be a finite, non-zero focus step (µm)")
        return v


class DataConfig(_Base):
    """Where training pairs come from and how they are cut."""

    kinds: list[SampleKind] = Field(["worm", "beads", "mixed"], description="Sample kinds.")
    kind_weights: list[float] | None = Field(None, description="Relative weight of each kind.")
    stack_shape: tuple[int, int] = Field((256, 256), description="Simulated frame (H, W) px.")
    z_step_um: float = Field(0.5, gt=0, description="Plane spacing of simulated stacks (µm).")
    z_half_range_um: float = Field(16.0, gt=0, description="Stacks span ±this (µm).")
    input_half_range_um: float = Field(6.0, ge=0, description="Input planes lie within ±this.")
    dz_range_um: tuple[float, float] = Field((-10.0, 10.0), description="Refocus range (µm).")
    surface_fraction: float = Field(0.3, ge=0, le=1, description="Share of non-uniform DPMs.")
    max_tilt_um: float = Field(6.0, ge=0, description="Max DPM change across a patch, tilt.")
    max_curvature_um: float = Field(4.0, ge=0, description="Max DPM bow across a patch.")
    target: Literal["clean", "noisy"] = Field("clean", description="Target plane (clean: denoise).")
    pool_size: int = Field(24, ge=1, description="Stacks kept in memory.")
    refresh_every: int = Field(300, ge=1, description="Steps between pool refreshes.")
    refresh_count: int = Field(4, ge=0, description="Stacks replaced per refresh.")
    camera: CameraRange = Field(default_factory=CameraRange)  # type: ignore[arg-type]
    lab_stacks: list[LabStackConfig] = Field([], description="Extra focus-scanned stacks.")
    lab_fraction: float = Field(0.0, ge=0, le=1, description="Share of samples from lab stacks.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        lo, hi = self.dz_range_um
        if not lo < hi:
            raise ValueError(f"data.dz_range_um must be (min, max) with min < max, got {(lo, hi)}")
        if self.kind_weights is not None and len(self.kind_weights) != len(self.kinds):
            raise ValueError(
                f"data.kind_weights has {len(self.kind_weights)} entries, "
                f"data.kinds has {len(self.kinds)}"
            )
        if self.lab_fraction > 0 and not self.lab_stacks:
            raise ValueError("data.lab_fraction > 0 needs at least one data.lab_stacks entry")
        if self.lab_stacks and self.lab_fraction == 0:  # loaded, named in the metadata, unused
            raise ValueError(
                "data.lab_stacks are listed but data.lab_fraction is 0, so none would be drawn: "
                "set data.lab_fraction (the share of samples from them)"
            )
        return self


class TrainConfig(_Base):
    """Everything one training run needs; loaded from TOML and saved with every checkpoint."""

    name: str = Field("deepz-slim-sim", description="Model name written to the metadata.")
    seed: int = Field(0, ge=0, description="Seed of weights, stacks and patch sampling.")
    steps: int = Field(3000, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Patches per step.")
    patch_size: int = Field(128, ge=8, description="Patch side (px), multiple of size_multiple.")
    lr: float = Field(1e-3, gt=0, description="Peak generator learning rate (Adam).")
    lr_min: float = Field(2e-5, ge=0, description="Final learning rate (cosine decay).")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    lr_d: float = Field(1e-5, gt=0, description="Discriminator learning rate.")
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm of the generator.")
    dpm_scale_um: float = Field(10.0, gt=0, description="DPM channel = dpm_um / this.")
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    loss: LossConfig = Field(default_factory=LossConfig)  # type: ignore[arg-type]
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    optics: dict[str, Any] = Field({}, description="engine.optics.OpticsConfig overrides.")
    camera: dict[str, Any] = Field({}, description="engine.optics.CameraConfig overrides.")

    _camera = field_validator("camera")(camera_overrides)
    _optics = field_validator("optics")(optics_overrides)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if present.")
    threads: int = Field(2, ge=1, description="torch CPU threads.")
    amp: bool = Field(True, description="bfloat16 autocast on CUDA.")
    checkpoint_every: int = Field(250, ge=1, description="Steps between checkpoints.")
    validation_samples: int = Field(16, ge=1, description="Fixed held-out patches for val loss.")
    max_wall_s: float | None = Field(None, gt=0, description="Stop after this wall time (s).")
    schedule_by: Literal["steps", "wall"] = Field(
        "steps",
        description="LR decay by step count (reproducible) or by wall time (fixed budget).",
    )
    out_dir: Path = Field(Path("runs/slim"), description="Checkpoints, curves and samples.")
    weights_out: Path | None = Field(None, description="Where to write the final .pt + .json.")
    init_weights: Path | None = Field(
        None, description="Start from these weights (.pt with its .json), e.g. to fine-tune."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        chans = self.model.channels or PRESETS[self.model.preset]["channels"]
        multiple = 2 ** (len(chans) - 2)
        if self.patch_size % multiple:
            raise ValueError(
                f"patch_size {self.patch_size} must be a multiple of the model's size_multiple "
                f"{multiple}"
            )
        if self.patch_size > min(self.data.stack_shape):
            raise ValueError(
                f"patch_size {self.patch_size} exceeds data.stack_shape {self.data.stack_shape}"
            )
        return self


class TrainConfigError(ValueError):
    """A training config or command line that cannot be used; the message is one line."""


def read_config(path: str | Path, schema: type[_C]) -> _C:
    """Read a TOML training config into `schema`; any problem is one `TrainConfigError` line.

    The file's name, then the key and what is wrong with it (the first of pydantic's errors,
    with how many more there are), or where its TOML stops parsing.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise TrainConfigError(f"{path}: cannot read the training config ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TrainConfigError(f"{path}: not a TOML file ({exc})") from exc
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise TrainConfigError(f"{path}: {validation_line(exc)}") from exc


def configure(path: str | Path, schema: type[_C], **overrides: Any) -> _C:
    """Read `path` into `schema` and set the command line's `overrides` (None: not given).

    Any problem, in the file or in an override the schema refuses, is one `TrainConfigError`
    line naming the file: what both training commands need before anything runs.
    """
    cfg = read_config(path, schema)
    try:
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
    except ValidationError as exc:
        raise TrainConfigError(f"{path}: {validation_line(exc)}") from None
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a TOML training config; unknown keys or bad values raise naming the key."""
    return read_config(path, TrainConfig)


# ----------------------------------------------------------------------------- stacks


@dataclass
class Stack:
    """One focal stack ready for pair sampling.

    Attributes
    ----------
    z_um : (Z,) plane positions, increasing.
    target : (Z, H, W) float32 target planes (noise-free counts for simulated stacks).
    inputs : (K, H, W) camera frames usable as inputs; `input_index` maps them to planes.
    input_index : (K,) plane index of each input frame.
    mean, std : (K, 1, 1) per-input-frame normalisation from `normalize_images`.
    origins : where patches may start (a lab stack's avoid its saturated pixels); None: anywhere.
    """

    z_um: np.ndarray
    target: np.ndarray
    inputs: np.ndarray
    input_index: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    origins: CropOrigins | None = None


def _stack_from_planes(
    z_um: np.ndarray, target: np.ndarray, frames: np.ndarray, input_half_range_um: float
) -> Stack:
    """Build a `Stack`, keeping as inputs only the frames within ±input_half_range_um of 0."""
    idx = np.flatnonzero(np.abs(z_um) <= input_half_range_um + 1e-6)
    if idx.size == 0:
        raise ValueError(f"no plane lies within ±{input_half_range_um} µm of z = 0")
    inputs = np.ascontiguousarray(frames[idx])
    _, mean, std = normalize_images(inputs)
    return Stack(z_um.astype(np.float64), target.astype(np.float32), inputs, idx, mean, std)


def simulated_stack(
    cfg: TrainConfig, seed: int, kind: SampleKind | None = None, shape: Sequence[int] | None = None
) -> Stack:
    """Simulate one focal stack with seed-drawn kind, signal and background levels."""
    from engine.optics import CameraConfig, OpticsConfig, simulate_focal_stack

    rng = np.random.default_rng(seed)
    d = cfg.data
    weights = np.asarray(d.kind_weights or [1.0] * len(d.kinds), dtype=np.float64)
    chosen = d.kinds[int(rng.choice(len(d.kinds), p=weights / weights.sum()))]
    kind = kind or chosen
    lo, hi = d.camera.peak_photons
    peak = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    background = float(rng.uniform(*d.camera.background_photons))
    camera = CameraConfig(**{"peak_photons": peak, "background_photons": background, **cfg.camera})
    n = round(d.z_half_range_um / d.z_step_um)
    z = np.arange(-n, n + 1) * d.z_step_um
    hw = tuple(shape or d.stack_shape)
    fs = simulate_focal_stack(
        kind,
        shape=(int(hw[0]), int(hw[1])),
        z_um=z,
        optics=OpticsConfig(**cfg.optics),
        camera=camera,
        seed=seed,
    )
    target = fs.clean if d.target == "clean" else fs.images.astype(np.float32)
    return _stack_from_planes(np.asarray(fs.z_um), target, fs.images, d.input_half_range_um)


def train_stack_seed(seed: int, counter: int) -> int:
    """Seed of the `counter`-th simulated training stack of a run seeded `seed`."""
    return TRAIN_SEED_OFFSET + seed * 100_000 + counter


def phase_correlation_shift(ref: np.ndarray, moving: np.ndarray) -> tuple[float, float]:
    """Return the (dy, dx) shift that aligns `moving` onto `ref` (partial phase correlation).

    Full whitening amplifies noise at frequencies a defocused plane no longer carries, so the
    cross-power spectrum is divided by its magnitude to the power 0.6 only; sub-pixel by parabola.
    """
    a = np.fft.fft2(ref - ref.mean())
    b = np.fft.fft2(moving - moving.mean())
    r = a * np.conj(b)
    r /= np.maximum(np.abs(r), 1e-12) ** 0.6  # partial whitening: robust to defocus blur
    corr = np.fft.ifft2(r).real
    py, px = np.unravel_index(int(np.argmax(corr)), corr.shape)
    out = []
    for p, n, axis in ((py, corr.shape[0], 0), (px, corr.shape[1], 1)):
        cm = corr[(py - 1) % corr.shape[0], px] if axis == 0 else corr[py, (px - 1) % n]
        cp = corr[(py + 1) % corr.shape[0], px] if axis == 0 else corr[py, (px + 1) % n]
        c0 = corr[py, px]
        den = cm - 2 * c0 + cp
        frac = 0.5 * (cm - cp) / den if den != 0 else 0.0
        shift = p + float(np.clip(frac, -0.5, 0.5))
        out.append(shift - n if shift > n / 2 else shift)
    return out[0], out[1]


MAX_STEP_SHIFT_PX = 1.5
"""Largest lateral shift `register_stack` takes between neighbouring planes (px). A stage moves
a fraction of a pixel sideways per focus step; a larger "shift" is a failed match (a sparse or
dim sample far from focus), and chained from the middle it threw whole planes tens of pixels
off on a stack that never moved (review 85: up to 107 px)."""


def register_stack(
    stack: np.ndarray, max_step_px: float = MAX_STEP_SHIFT_PX
) -> tuple[np.ndarray, np.ndarray]:
    """Register each plane of a (Z, H, W) stack to its neighbour, chained from the middle plane.

    Neighbouring planes are alike even when far from focus, so plane-to-plane shifts are
    accumulated outwards; a step beyond `max_step_px` is a failed match and adds nothing
    (said). Returns the registered float32 stack and the (Z, 2) shifts applied.
    """
    from scipy import ndimage

    s = np.asarray(stack, dtype=np.float32)
    mid = s.shape[0] // 2
    shifts = np.zeros((s.shape[0], 2))
    refused = []
    for order in (range(mid + 1, s.shape[0]), range(mid - 1, -1, -1)):
        for i in order:
            j = i - 1 if i > mid else i + 1
            step = np.asarray(phase_correlation_shift(s[j], s[i]))
            if np.abs(step).max() > max_step_px:
                refused.append(i)
                step = np.zeros(2)
            shifts[i] = shifts[j] + step
    if refused:
        log.warning(
            "plane registration: %d of %d steps matched beyond %.1f px (planes %s) and were "
            "taken as no shift; the largest shift applied is %.2f px",
            len(refused),
            s.shape[0] - 1,
            max_step_px,
            ", ".join(map(str, sorted(refused))),
            float(np.abs(shifts).max()),
        )
    out = np.empty_like(s)
    for i in range(s.shape[0]):
        out[i] = ndimage.shift(s[i], shifts[i], order=1, mode="nearest")
    return out, shifts


@dataclass(frozen=True)
class CropOrigins:
    """Where a patch of a stack may start: anywhere, or only where it touches no clipped pixel.

    A lab stack's saturated pixels (`engine.lab_files.saturated_mask`) are no measurement; a
    patch holding one would teach the network flat-topped beads. Rather than mask the losses of
    two trainers, their samplers draw patches that hold none. `flat` lists the allowed origins
    as flat indices into the (H - P + 1, W - P + 1) grid (None: every origin, drawn exactly as
    before, so simulated stacks keep their random stream).
    """

    shape: tuple[int, int]
    patch_px: int
    flat: np.ndarray | None = None

    @classmethod
    def avoiding(cls, mask: np.ndarray, patch_px: int) -> CropOrigins:
        """Return the origins of `patch_px` crops of an (H, W) plane that hold no True of `mask`."""
        h, w = mask.shape
        if not mask.any():
            return cls((h, w), patch_px)
        table = np.zeros((h + 1, w + 1), dtype=np.int64)  # summed-area table of the mask
        table[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0), axis=1)
        p = patch_px
        inside = table[p:, p:] - table[:-p, p:] - table[p:, :-p] + table[:-p, :-p]
        return cls((h, w), patch_px, np.flatnonzero(inside == 0).astype(np.int64))

    @property
    def share(self) -> float:
        """Share of all origins allowed (1.0 when none is excluded)."""
        if self.flat is None:
            return 1.0
        h, w = self.shape
        return self.flat.size / ((h - self.patch_px + 1) * (w - self.patch_px + 1))

    def draw(self, rng: np.random.Generator, size: int) -> tuple[int, int]:
        """Return a (y0, x0) origin of a `size` crop."""
        h, w = self.shape
        if self.flat is None:
            return int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        if size != self.patch_px:
            raise ValueError(f"origins were found for {self.patch_px} px crops, not {size}")
        y0, x0 = divmod(int(self.flat[int(rng.integers(self.flat.size))]), w - size + 1)
        return y0, x0


class LabPlanes(NamedTuple):
    """A lab stack as `read_lab_stack` gives it: z (µm, middle 0), planes, allowed crops."""

    z_um: np.ndarray
    planes: np.ndarray
    origins: CropOrigins


def read_lab_stack(spec: LabStackConfig, min_side_px: int = 0) -> LabPlanes:
    """Read a focus-scanned (Z, H, W) stack as z_um, planes float32 and the crops allowed.

    The file is read by `engine.lab_files.read_stack` (.npy, TIFF or OME-Zarr). The planes
    are in camera counts minus the stack's 1st percentile (dark level), one offset for all
    planes so the axial intensity profile is kept, and registered by phase correlation when
    `register_planes`. z = 0 is the middle plane; the first plane is the shallowest.
    Both trainers read lab stacks here, at load, so a stack they cannot use (not finite,
    planes smaller than `min_side_px`, the patch size, a focus step other than the one the file
    records, no patch free of saturated pixels) is refused before training starts. Patches
    of `min_side_px` are drawn only where no plane is at the camera's full scale (`origins`).
    """
    path = spec.path
    data = read_stack(path)  # LabFileError (a ValueError) names an unreadable file
    problem = focus_step_problem(path, spec.z_step_um) if spec.check_file_step else None
    if problem is not None:
        raise ValueError(
            f"{path}: z_step_um = {spec.z_step_um:g} but {problem}; give the file's step (its "
            "sign says the scan's direction), or check_file_step = false if its calibration "
            "is wrong"
        )
    if min(data.shape[1:]) < min_side_px:
        raise ValueError(
            f"{path}: planes {data.shape[1]}x{data.shape[2]} are smaller than patch_size "
            f"{min_side_px}"
        )
    top = full_scale(data)  # on the camera's counts, before any offset or shift
    clipped = saturated_mask(data, top)
    n_clipped = int(clipped.sum())
    stack = data.astype(np.float32)
    if not np.isfinite(stack).all():  # one NaN made every pixel NaN through the dark level
        bad = int(stack.size - np.isfinite(stack).sum())
        raise ValueError(f"{path}: {bad} pixels are NaN or infinite; a lab stack must be finite")
    stack -= np.float32(np.percentile(stack, 1))
    if spec.z_step_um < 0:  # scanned deep to shallow: read shallow first, as z rises
        stack = np.ascontiguousarray(stack[::-1])
    if spec.register_planes:
        stack, shifts = register_stack(stack)
        if clipped.any():  # a clipped pixel moves with its plane: widen the mask by the shift
            reach = int(np.ceil(np.abs(shifts).max()))
            if reach:  # a square: a diagonal shift moves a pixel along both axes at once
                from scipy import ndimage

                square = np.ones((3, 3), dtype=bool)
                clipped = ndimage.binary_dilation(clipped, structure=square, iterations=reach)
    origins = (
        CropOrigins.avoiding(clipped, min_side_px)
        if min_side_px
        else CropOrigins((stack.shape[1], stack.shape[2]), 0)
    )
    if n_clipped and min_side_px and origins.share == 0:
        raise ValueError(
            f"{path}: every {min_side_px} px patch holds a saturated pixel (at the camera's "
            f"full scale {top:g}); a stack needs unclipped regions to train on"
        )
    if n_clipped:
        log.warning(
            "%s: %d pixels reach the camera's full scale (%g) in some plane; %s",
            path,
            n_clipped,
            top,
            f"patches holding them are not drawn ({100 * origins.share:.0f} % of "
            f"{min_side_px} px patch positions left)"
            if min_side_px
            else "no patch size given, so patches holding them are not avoided",
        )
    z = (np.arange(stack.shape[0]) - (stack.shape[0] - 1) / 2) * abs(spec.z_step_um)
    return LabPlanes(z, stack, origins)


def load_lab_stack(spec: LabStackConfig, input_half_range_um: float, min_side_px: int = 0) -> Stack:
    """Load a focus-scanned stack (`read_lab_stack`) as a `Stack` of the per-plane trainer.

    Targets are the (noisy) planes themselves.
    """
    z, stack, origins = read_lab_stack(spec, min_side_px)
    return replace(_stack_from_planes(z, stack, stack, input_half_range_um), origins=origins)


# ----------------------------------------------------------------------------- pairs


def _surface(rng: np.random.Generator, size: int, dz0: float, d: DataConfig) -> np.ndarray:
    """Return a tilted and/or curved DPM (µm) over a size x size patch, centred on `dz0`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    tilt = rng.uniform(-d.max_tilt_um, d.max_tilt_um)
    bow = rng.uniform(-d.max_curvature_um, d.max_curvature_um) if rng.random() < 0.5 else 0.0
    plane = tilt * (np.cos(angle) * xx + np.sin(angle) * yy)
    curve = bow * (4 * (xx**2 + yy**2) - 2 / 3)
    out: np.ndarray = (dz0 + plane + curve).astype(np.float32)
    return out


def _sample_along(stack: Stack, z_target: np.ndarray, y0: int, x0: int) -> np.ndarray:
    """Interpolate the target stack linearly in z at per-pixel depths over a patch."""
    size = z_target.shape[0]
    z = stack.z_um
    pos = np.interp(z_target, z, np.arange(z.size)).astype(np.float32)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, z.size - 2)
    frac = pos - lo
    rows = np.arange(y0, y0 + size)[:, None]
    cols = np.arange(x0, x0 + size)[None, :]
    a = stack.target[lo, rows, cols]
    b = stack.target[lo + 1, rows, cols]
    out: np.ndarray = (a * (1 - frac) + b * frac).astype(np.float32)
    return out


def _sample_one(
    rng: np.random.Generator, stack: Stack, d: DataConfig, size: int, dpm_scale_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """One (2, P, P) input and (1, P, P) target from `stack`, normalised via engine.metadata."""
    k = int(rng.integers(stack.input_index.size))
    i = int(stack.input_index[k])
    z0 = float(stack.z_um[i])
    lo = max(d.dz_range_um[0], float(stack.z_um[0]) - z0)
    hi = min(d.dz_range_um[1], float(stack.z_um[-1]) - z0)
    h, w = stack.target.shape[-2:]
    origins = stack.origins or CropOrigins((h, w), size)
    y0, x0 = origins.draw(rng, size)
    if rng.random() < d.surface_fraction:
        dpm = np.clip(_surface(rng, size, rng.uniform(lo, hi), d), lo, hi)
        target = _sample_along(stack, z0 + dpm, y0, x0)
    else:
        choices = np.flatnonzero((stack.z_um - z0 >= lo - 1e-6) & (stack.z_um - z0 <= hi + 1e-6))
        j = int(rng.choice(choices))
        dpm = np.full((size, size), stack.z_um[j] - z0, dtype=np.float32)
        target = stack.target[j, y0 : y0 + size, x0 : x0 + size]
    frame = stack.inputs[k, y0 : y0 + size, x0 : x0 + size].astype(np.float32)
    mean, std = stack.mean[k], stack.std[k]
    x = np.stack([(frame - mean) / std, dpm / np.float32(dpm_scale_um)])
    y = ((target - mean) / std)[None]
    t = int(rng.integers(8))
    x, y = np.rot90(x, t % 4, axes=(1, 2)), np.rot90(y, t % 4, axes=(1, 2))
    if t >= 4:
        x, y = x[:, :, ::-1], y[:, :, ::-1]
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.float32)


def sample_batch(
    rng: np.random.Generator,
    pool: Sequence[Stack],
    lab: Sequence[Stack],
    cfg: TrainConfig,
    n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a batch of (N, 2, P, P) inputs and (N, 1, P, P) targets from the stack pools."""
    n = n or cfg.batch_size
    xs, ys = [], []
    for _ in range(n):
        use_lab = bool(lab) and rng.random() < cfg.data.lab_fraction
        src = lab if use_lab else pool
        stack = src[int(rng.integers(len(src)))]
        x, y = _sample_one(rng, stack, cfg.data, cfg.patch_size, cfg.dpm_scale_um)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def _pool_counters(cfg: TrainConfig, step: int) -> list[int]:
    """Which training-stack counters fill each pool slot at `step` (deterministic refresh)."""
    d = cfg.data
    slots = list(range(d.pool_size))
    k = min(d.refresh_count, d.pool_size)
    for r in range(1, step // d.refresh_every + 1):
        for j in range(k):
            slots[((r - 1) * k + j) % d.pool_size] = d.pool_size + (r - 1) * k + j
    return slots


# ----------------------------------------------------------------------------- training


def make_metadata(
    cfg: TrainConfig, model: DeepZ, extra: dict[str, Any] | None = None, commit: str | None = None
) -> ModelMetadata:
    """Describe a model trained with `cfg` (optics, ranges, command, commit; HEAD by default)."""
    from engine.optics import OpticsConfig

    optics = OpticsConfig(**cfg.optics)
    kinds = ", ".join(cfg.data.kinds)
    trained_on = (
        f"engine.optics simulated focal stacks ({kinds}; {cfg.data.stack_shape[0]}x"
        f"{cfg.data.stack_shape[1]} px, z ±{cfg.data.z_half_range_um} µm step "
        f"{cfg.data.z_step_um} µm, {cfg.data.target} targets, "
        f"{cfg.data.surface_fraction:.0%} tilted/curved DPMs)"
    )
    if cfg.data.lab_stacks:
        trained_on += f" + {len(cfg.data.lab_stacks)} lab stacks"
    return ModelMetadata(
        name=cfg.name,
        architecture=model.architecture,
        size_multiple=model.size_multiple,
        dz_range_um=cfg.data.dz_range_um,
        dpm_scale_um=cfg.dpm_scale_um,
        pixel_size_um=optics.pixel_size_um,
        na=optics.na,
        wavelength_um=optics.wavelength_um,
        immersion_index=optics.immersion_index,
        sample_index=optics.sample_index,
        trained_on=trained_on,
        training_command=command_line(),
        commit=git_commit() if commit is None else commit,
        extra=extra or {},
    )


def command_line(module: str = "engine.train") -> str:
    """Return the command line that started this process, as ``python -m MODULE ...``."""
    args = ["python", "-m", module, *sys.argv[1:]]
    return " ".join(shlex.quote(a) for a in args)


def git_commit() -> str:
    """Return the current git HEAD (empty when not in a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _lr_factor(cfg: TrainConfig, step: int, wall_s: float = 0.0) -> float:
    """Linear warm-up then cosine decay from lr to lr_min, as a factor of lr.

    Progress is step / steps, or with ``schedule_by = "wall"`` the larger of that and
    wall_s / max_wall_s (for a fixed time budget on a shared machine).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    if cfg.schedule_by == "wall" and cfg.max_wall_s is not None:
        t = max(t, wall_s / cfg.max_wall_s)
    floor = cfg.lr_min / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _pixel_loss(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error, or the reversed Huber (berHu) loss with c = 0.2 max|error|."""
    err = (pred - target).abs()
    if kind == "l1":
        return err.mean()
    c = (0.2 * err.max()).clamp_min(1e-6).detach()
    return torch.where(err <= c, err, (err**2 + c**2) / (2 * c)).mean()


def _generator_loss(
    cfg: TrainConfig, pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted pixel + (1 - MS-SSIM) loss and its parts."""
    pix = _pixel_loss(cfg.loss.pixel, pred, target)
    if cfg.loss.ssim_scales == 1:
        sim = ssim(pred.float(), target.float())
    else:
        sim = ms_ssim(pred.float(), target.float(), scales=cfg.loss.ssim_scales)
    total = cfg.loss.pixel_weight * pix + cfg.loss.ssim_weight * (1 - sim)
    return total, {"pixel": pix.item(), "ssim": sim.item()}


def _save_plots(out: Path, history: list[dict[str, float]], samples: np.ndarray) -> None:
    """Write loss_curve.png and samples.png (input / output / target rows) into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["loss"] for h in history], label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax[0].plot(*zip(*val, strict=True), "o-", label="val loss")
    ax[0].set_xlabel("step")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].plot(steps, [h["ssim"] for h in history], label="train MS-SSIM")
    vs = [(h["step"], h["val_ssim"]) for h in history if "val_ssim" in h]
    if vs:
        ax[1].plot(*zip(*vs, strict=True), "o-", label="val MS-SSIM")
    ax[1].set_xlabel("step")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=90)
    plt.close(fig)
    n = samples.shape[1]
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6), squeeze=False)
    for r, label in enumerate(("input", "Deep-Z", "target")):
        for c in range(n):
            axes[r, c].imshow(samples[r, c], cmap="gray")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=80)
    plt.close(fig)


def _device(cfg: TrainConfig) -> torch.device:
    """Return the torch device for this run."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA device is available")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _validation_set(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a fixed set of patches from stacks with validation seeds (never trained on)."""
    stacks = [simulated_stack(cfg, VALIDATION_SEED_OFFSET + i) for i in range(2)]
    rng = np.random.default_rng([cfg.seed, 7])
    return sample_batch(rng, stacks, [], cfg, n=cfg.validation_samples)


CHECKPOINT_KEYS = ("model", "opt", "step", "history", "wall_s")
"""What ``--resume`` reads of out_dir/checkpoint.pt (`_checkpoint` writes them all)."""


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> DeepZ:
    """Run (or resume) training as configured; return the trained generator (eval mode)."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormals slow CPU convs by 10x or more
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    commit = git_commit()  # the code this run started from
    out = cfg.out_dir  # made once the start is checked: a refused run leaves no empty folder
    model = cfg.model.build()
    if cfg.init_weights is not None and not resume:
        init, init_meta = load_model(cfg.init_weights)
        if init.architecture != model.architecture or init_meta.volume is not None:
            kind = " (a volume model's)" if init_meta.volume is not None else ""
            raise TrainConfigError(
                f"init_weights {cfg.init_weights} has architecture {init.architecture}{kind}, "
                f"the config builds {model.architecture}"
            )
        model.load_state_dict(init.state_dict())
    model = model.to(device)
    disc = Discriminator().to(device) if cfg.loss.adversarial_weight > 0 else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d) if disc is not None else None
    for group in opt.param_groups:
        group["lr"] = cfg.lr * _lr_factor(cfg, 0)
    step, history, wall_before = 0, [], 0.0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = read_checkpoint(ckpt_path, map_location=device)
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
        if missing:  # weights alone (a state_dict), or another trainer's file
            raise ModelMetadataError(
                f"--resume: {ckpt_path} is not a checkpoint of engine.train "
                f"(no {', '.join(missing)})"
            )
        with weights_that_fit(f"--resume: {ckpt_path} does not fit this config's network"):
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            if disc is not None and opt_d is not None and ck.get("disc") is not None:
                disc.load_state_dict(ck["disc"])
                opt_d.load_state_dict(ck["opt_d"])
        step, history, wall_before = ck["step"], ck["history"], ck["wall_s"]
    missing = [str(s.path) for s in cfg.data.lab_stacks if not s.path.exists()]
    if missing:  # read before the folder is made: a missing or unreadable stack leaves nothing
        raise TrainConfigError(f"data.lab_stacks: {', '.join(missing)}: not found")
    try:
        lab = [
            load_lab_stack(s, cfg.data.input_half_range_um, cfg.patch_size)
            for s in cfg.data.lab_stacks
        ]
    except (OSError, ValueError) as exc:
        raise TrainConfigError(f"data.lab_stacks: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))
    counters = _pool_counters(cfg, step)
    pool = [simulated_stack(cfg, train_stack_seed(cfg.seed, c)) for c in counters]
    val_x, val_y = _validation_set(cfg)
    val_x, val_y = val_x.to(device), val_y.to(device)
    amp = cfg.amp and device.type == "cuda"
    start = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    while step < cfg.steps:
        if step > 0 and step % cfg.data.refresh_every == 0:
            new = _pool_counters(cfg, step)
            for i, c in enumerate(new):
                if c != counters[i]:
                    pool[i] = simulated_stack(cfg, train_stack_seed(cfg.seed, c))
            counters = new
        rng = np.random.default_rng([cfg.seed, step])
        x, y = sample_batch(rng, pool, lab, cfg)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x)
        loss, parts = _generator_loss(cfg, pred.float(), y)
        use_gan = disc is not None and opt_d is not None and step >= cfg.loss.adversarial_start_step
        if use_gan and disc is not None and opt_d is not None:
            d_loss = lsgan_d_loss(disc(y), disc(pred.detach().float()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()  # type: ignore[no-untyped-call]
            opt_d.step()
            g_adv = lsgan_g_loss(disc(pred.float()))
            loss = loss + cfg.loss.adversarial_weight * g_adv
            parts |= {"d": d_loss.item(), "adv": g_adv.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        wall = wall_before + time.monotonic() - start
        lr = cfg.lr * _lr_factor(cfg, step, wall)
        for group in opt.param_groups:
            group["lr"] = lr
        history.append({"step": step, "loss": loss.item(), **parts, "lr": lr})
        bar.update(1)
        bar.set_postfix(
            loss=f"{history[-1]['loss']:.4f}",
            l1=f"{parts['pixel']:.4f}",
            ssim=f"{parts['ssim']:.3f}",
        )
        wall = wall_before + time.monotonic() - start
        timeout = cfg.max_wall_s is not None and wall >= cfg.max_wall_s
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or timeout:
            _checkpoint(cfg, model, disc, opt, opt_d, step, history, wall, val_x, val_y)
        if timeout:
            bar.write(f"stopping at step {step}: max_wall_s = {cfg.max_wall_s} reached")
            break
    bar.close()
    model.eval()
    wall = wall_before + time.monotonic() - start
    if cfg.weights_out is not None:
        extra = {
            "steps": step,
            "planned_steps": cfg.steps,
            "wall_time_s": round(wall, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''} "
            f"{os.cpu_count()} cores, torch threads {cfg.threads}, device {device.type}".strip(),
            "parameters": model.count_parameters(),
            "flops_per_pixel": model.flops_per_pixel(),
            "final_val_loss": history[-1].get("val_loss"),
            "train_config": json.loads(cfg.model_dump_json()),
        }
        save_model(model.cpu(), make_metadata(cfg, model, extra, commit), cfg.weights_out)
        model.to(device)
    return model


def _checkpoint(
    cfg: TrainConfig,
    model: DeepZ,
    disc: Discriminator | None,
    opt: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    step: int,
    history: list[dict[str, float]],
    wall: float,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
) -> None:
    """Validate, then write checkpoint.pt, loss_curve.png and samples.png (atomically)."""
    model.eval()
    with torch.no_grad():
        pred = model(val_x)
        vloss, parts = _generator_loss(cfg, pred, val_y)
    model.train()
    history[-1] |= {"val_loss": float(vloss), "val_ssim": parts["ssim"]}
    state = {
        "model": model.state_dict(),
        "disc": disc.state_dict() if disc is not None else None,
        "opt": opt.state_dict(),
        "opt_d": opt_d.state_dict() if opt_d is not None else None,
        "step": step,
        "history": history,
        "wall_s": wall,
        "config": json.loads(cfg.model_dump_json()),
    }
    write_checkpoint(cfg.out_dir / "checkpoint.pt", state)
    k = min(6, val_x.shape[0])
    samples = np.stack(
        [val_x[:k, 0].cpu().numpy(), pred[:k, 0].cpu().numpy(), val_y[:k, 0].cpu().numpy()]
    )
    _save_plots(cfg.out_dir, history, samples)


def _output_problem(cfg: TrainConfig, config: Path, out_given: bool) -> str | None:
    """Say why a run could not write out_dir's files or weights_out (None: it can).

    Checked before the run starts: out_dir was made after the network was built, and
    weights_out written only at the run's end.
    """
    problem = out_dir_problem(
        cfg.out_dir, ("config.json", "checkpoint.pt", "loss_curve.png", "samples.png")
    )
    if problem is not None:
        return f"{'--out' if out_given else f'{config}: out_dir'}: {problem}"
    if cfg.weights_out is not None:
        weights = Path(cfg.weights_out)
        names = (weights.name, metadata_path(weights).name)
        problem = out_dir_problem(weights.parent, names)
        if problem is not None:
            return f"{config}: weights_out: {problem}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: parse arguments, load the config and train."""
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True, help="TOML training config")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--out", type=Path, default=None, help="override out_dir")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    try:
        cfg = configure(args.config, TrainConfig, steps=args.steps, out_dir=args.out)
    except TrainConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = _output_problem(cfg, args.config, args.out is not None)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        model = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, ModelMetadataError, TrainConfigError) as exc:  # a file it names
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {model.count_parameters()} parameters; outputs in {cfg.out_dir}")
    if cfg.weights_out is not None:
        print(f"weights: {cfg.weights_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
