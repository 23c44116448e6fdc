"""The training recipe as validated config: data, loss terms, schedule, model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, FiniteFloat, ValidationInfo, field_validator, model_validator

from engine.metadata import Modality
from engine.model import DeepZ, build_model
from engine.optics import Lateral, SampleKind, WormConfig
from engine.train import LabStackConfig, _Base, camera_overrides, read_config
from engine.volume import DEPTH_STEP_UM, MAX_PSF_SIDE_PX, depth_grid, matched_filter_kernels

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
    frame_batches: int = Field(
        0,
        ge=0,
        description="Of each step's grad_accumulation batches, this many (the last) are "
        "whole simulated frames (data.stack_shape, frames_per_batch of them) of "
        "data.frame_kinds instead of patch_size crops: the crops keep many beads in every "
        "step, the whole frames show a worm's body with its edges and the dark beside it, "
        "as served frames do (recipe 50 trained on whole frames alone and lost the tilted "
        "plane). 0: crops only. A lab step (data.lab_every) is lab crops throughout.",
    )
    frame_kinds: list[SampleKind] = Field(
        ["worm", "mixed", "nuclei"],
        min_length=1,
        description="The kinds whole-frame batches are drawn from (each in data.kinds); a "
        "pool that holds none of them at the time gives a whole frame of any kind.",
    )
    frames_per_batch: int = Field(
        2, ge=1, description="Whole frames in each of the data.frame_batches batches."
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
            weights = getattr(self, name)
            if len(weights) != len(self.kinds):
                raise ValueError(f"data.{name} needs one weight per entry of data.kinds")
            if min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"data.{name} must be >= 0 with a positive sum, not {weights}")
        if self.frame_batches:
            missing = sorted(set(self.frame_kinds) - set(self.kinds))
            if missing:
                raise ValueError(
                    f"data.frame_kinds {missing} are not in data.kinds {self.kinds}: no "
                    "sample of them is ever drawn"
                )
            drawn = [
                sum(w for k, w in zip(self.kinds, weights, strict=True) if k in self.frame_kinds)
                for weights in (self.kind_weights, self.start_kind_weights)
            ]
            if max(drawn) <= 0:
                raise ValueError(
                    f"data.frame_kinds {self.frame_kinds} have no weight in data.kind_weights "
                    "or start_kind_weights: no sample of them is ever drawn"
                )
            if self.stack_shape[0] != self.stack_shape[1]:
                raise ValueError(
                    f"data.frame_batches needs square frames (they are turned like patches), "
                    f"not data.stack_shape {self.stack_shape}"
                )
        elif unused := [
            name
            for name in ("frame_kinds", "frames_per_batch")
            if getattr(self, name) != type(self).model_fields[name].default
        ]:
            # Changed, unused, like lab_stacks without lab_every below: a recipe that changes
            # them means whole frames, so saying nothing would train another recipe. Compared
            # with the defaults, not model_fields_set, so a dumped config validates again.
            raise ValueError(
                f"data.{' and data.'.join(unused)} set but data.frame_batches is 0, so no "
                "whole frame would be trained on: set data.frame_batches (how many of the "
                "step's batches are whole frames) or remove them"
            )
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
    excess_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the excess term (`_excess_term`): the density's mass where "
        "the truth holds nothing within about 3 µm (`excess_support_*`), relative to the "
        "truth's mass, an L1 price, so a faint ghost costs its share of the light, where "
        "the squared terms price it at its square. Session 40 counted a quarter of the "
        "shipped model's bead spots, faint ghosts 7-9 µm from focus, as invented. Recipe 43.",
    )
    excess_support_sigma_px: float = Field(
        2.0, gt=0, description="Excess term: lateral Gaussian sigma of the truth's support (px)."
    )
    excess_support_sigma_slices: float = Field(
        2.0,
        gt=0,
        description="Excess term: axial Gaussian sigma of the truth's support (depth steps).",
    )
    excess_threshold: float = Field(
        1e-3,
        gt=0,
        lt=1,
        description="Excess term: a voxel is in the truth's support where the smoothed truth "
        "exceeds this fraction of the sample's brightest smoothed-truth voxel.",
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
    primer_depths_um: list[FiniteFloat] = Field(
        [],
        description="Matched-filter primer channels at these object depths (µm; empty: none): "
        "the frame correlated with the PSF at each defocus, fed to the stem beside the frame "
        "(`engine.model.MatchedFilterPrimer`). Each within the depth grid, "
        "±depth_half_range_um: the depths the model finds objects at. Fine-tuning from a "
        "model without them starts with their stem weights at zero, i.e. from the old model "
        "exactly.",
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
    primer_kernel: int = Field(
        17,
        ge=3,
        le=MAX_PSF_SIDE_PX,
        description="Primer kernel side (binned px, odd); primer_bin x this is the PSF side it "
        "is made from, at most `engine.volume.MAX_PSF_SIDE_PX` px as any PSF bank's.",
    )
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

    @field_validator("primer_depths_um")
    @classmethod
    def _primer_on_the_grid(cls, v: list[float], info: ValidationInfo) -> list[float]:
        half = info.data.get("depth_half_range_um")  # absent: its own error is said
        outside = [d for d in v if half is not None and abs(d) > half]
        if outside:  # a channel for depths the model has none for, or a PSF at 1e300 µm
            raise ValueError(
                f"{outside[0]:g} µm is outside the depth grid: the primer's depths lie within "
                f"±depth_half_range_um = ±{half:g} µm"
            )
        return v

    @field_validator("primer_kernel")
    @classmethod
    def _primer_kernel_fits(cls, v: int, info: ValidationInfo) -> int:
        if v % 2 == 0:  # `MatchedFilterPrimer` centres it on the pixel it scores
            raise ValueError(f"the primer kernel must be odd (centred on a pixel), not {v}")
        binning = info.data.get("primer_bin")  # absent: its own error is said
        if binning is not None and binning * v > MAX_PSF_SIDE_PX:
            raise ValueError(
                f"primer_bin x primer_kernel = {binning} x {v} = {binning * v} px of PSF, more "
                f"than the {MAX_PSF_SIDE_PX} px a PSF may have"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> VolumeTrainConfig:
        multiple = 2 ** (len(self.channels) - 2)
        if self.patch_size % multiple or self.patch_size > min(self.data.stack_shape):
            raise ValueError(
                f"patch_size {self.patch_size} must be a multiple of {multiple} and fit "
                f"data.stack_shape {self.data.stack_shape}"
            )
        if self.data.frame_batches > self.grad_accumulation:
            raise ValueError(
                f"data.frame_batches {self.data.frame_batches} is more than the step's "
                f"grad_accumulation {self.grad_accumulation} batches"
            )
        if self.data.frame_batches and self.data.stack_shape[0] % multiple:
            raise ValueError(
                f"data.frame_batches trains on whole {self.data.stack_shape} frames: their "
                f"side must be a multiple of {multiple}"
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
