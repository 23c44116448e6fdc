"""A lab's own focus-scanned stacks as training data: batches and their loss."""

from __future__ import annotations

import numpy as np
import torch

from engine.metadata import normalize_images
from engine.train import LabStackConfig, read_lab_stack
from engine.train_volume.config import VolumeTrainConfig
from engine.train_volume.losses import TorchRenderer, smooth3d
from engine.volume import DEPTH_STEP_UM, RESIDUAL_SIGMA_PX


class LabStack:
    """A lab's focus-scanned stack for volume training: planes in counts, z in µm (middle 0)."""

    def __init__(self, spec: LabStackConfig, min_side_px: int = 0) -> None:
        self.z_um, self.planes, self.origins = read_lab_stack(spec, min_side_px)
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
        y0, x0 = stack.origins.draw(rng, size)
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
