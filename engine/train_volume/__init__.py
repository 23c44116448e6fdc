"""Train the volume Deep-Z: one wide-field frame in, the sample's density on a depth grid out.

``python -m engine.train_volume --config configs/train_volume.toml [--resume] [--steps N]``

Why a second trainer: per-plane networks trained on pixel losses learnt the forward blur and not
depth (see issue 9 and `docs/evaluation/report.md`). Here the network localises: it predicts
the non-negative density ``O[d]`` at 41 depths relative to the focal plane, supervised directly
by the simulator's ground truth (the density the frame was imaged from), so an in-focus bead at
the wrong depth costs as much as a missing one, and the planes users see are that density
rendered through the known PSF (`engine.volume`).

The loss is a sum of terms, each weighted in the recipe's ``[loss]`` table
(`VolumeLossConfig`, where each says what it prices and what it did on the hold-out). The
shipped recipe (31) uses five: the density against the truth's, both smoothed a little
(a sub-voxel miss costs a little, a depth miss a lot) and, heavily smoothed, for partial
credit near a faint object; each pixel column's light summed over depth (finding an object
before placing it); the mass at each true bead, every bead counting the same however faint;
and wide-field planes rendered from the density against those rendered from the truth.

Samples are simulated on the CPU (`engine.optics`): beads, worms and mixtures, each sample
at its own index-mismatch depth (each source at its own with
``optics.depth_dependent_aberration``), imaged by a camera as the recipe says; a lab's
focus-scanned stacks train the same network (``data.lab_stacks``). On CPUs with AVX-512-BF16
/ AMX the net runs under bfloat16 autocast in channels-last layout; ``device = "cuda"``
trains on a GPU. Checkpoints every few minutes allow ``--resume``, and one portable
checkpoint file continues a run on a fresh machine.

Where each part lives, in the order a run meets them:

- `engine.train_volume.config`: the recipe, validated (`VolumeTrainConfig`), and its model.
- `engine.train_volume.data`: simulated samples and their batches (`Sample`, `sample_batch`).
- `engine.train_volume.losses`: the loss terms and the torch renderer they render through.
- `engine.train_volume.lab`: a lab's own stacks as batches, and their loss.
- `engine.train_volume.validation`: bead depth and width read from the density, on fixed
  frames, while training.
- `engine.train_volume.optim`: device, precision, optimiser and weight average.
- `engine.train_volume.loop`: one step and the run (`train`).
- `engine.train_volume.checkpoints`: saving the model, checkpoints, resuming.
- `engine.train_volume.cli`: the command line (`main`).
"""

from __future__ import annotations

from engine.train_volume.checkpoints import (
    checkpoint_from_weights,
    make_volume_metadata,
    portable_state,
    save_volume_model,
    served_state,
    weights_from_checkpoint,
)
from engine.train_volume.cli import main
from engine.train_volume.config import (
    TRAIN_SEED_OFFSET,
    VALIDATION_SEED_OFFSET,
    VolumeDataConfig,
    VolumeLossConfig,
    VolumeTrainConfig,
    build_volume_model,
    load_config,
)
from engine.train_volume.data import Sample, SampleFeed, VolumeBatch, draw_imaging, sample_batch
from engine.train_volume.lab import LabStack, lab_loss, lowpass_residual
from engine.train_volume.loop import PHASES, batch_loss, train, training_step
from engine.train_volume.losses import (
    TorchRenderer,
    body_term,
    compress,
    render_depths,
    volume_loss,
    volume_loss_terms,
)
from engine.train_volume.optim import (
    build_optimiser,
    cpu_has_bf16,
    training_device,
    uses_bf16,
    weight_average,
)
from engine.train_volume.validation import bead_density_fwhm, bead_depth_errors

__all__ = [
    "PHASES",
    "TRAIN_SEED_OFFSET",
    "VALIDATION_SEED_OFFSET",
    "LabStack",
    "Sample",
    "SampleFeed",
    "TorchRenderer",
    "VolumeBatch",
    "VolumeDataConfig",
    "VolumeLossConfig",
    "VolumeTrainConfig",
    "batch_loss",
    "bead_density_fwhm",
    "bead_depth_errors",
    "body_term",
    "build_optimiser",
    "build_volume_model",
    "checkpoint_from_weights",
    "compress",
    "cpu_has_bf16",
    "draw_imaging",
    "lab_loss",
    "load_config",
    "lowpass_residual",
    "main",
    "make_volume_metadata",
    "portable_state",
    "render_depths",
    "sample_batch",
    "save_volume_model",
    "served_state",
    "train",
    "training_device",
    "training_step",
    "uses_bf16",
    "volume_loss",
    "volume_loss_terms",
    "weight_average",
    "weights_from_checkpoint",
]
