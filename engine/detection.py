"""Point-source detections beside the volume density, in the manner of DECODE.

The volume model's density channels place a bead's light on a 0.5 µm x 1 px grid, and the
density loss compares both sides smoothed over a voxel or two: a found bead's density comes out
about twice the truth's width, laterally and in depth (sessions 6 and 11), so its rendered image
is too wide and its depth is only as good as the grid. DECODE (Speiser et al., Nature Methods
2021) localises single molecules another way: every pixel says how likely a point source lies
under it (p), where exactly (sub-pixel dx, dy and a continuous depth z), how bright it is (N),
and how sure it is of each (sigma); the loss is the likelihood of the true sources under the
Gaussian mixture those pixels define, plus a term on their count. Nothing is smoothed, so a
source placed to a tenth of a voxel earns more than one placed to a voxel.

Here the same five-plus-four numbers per pixel come from a small second head on the volume
network (`engine.model.DeepZ` with ``detection``), and `splat` turns them into density: each
pixel's expected light (p * N) is put tri-linearly at (x + dx, y + dy, z) on the model's depth
grid, and added to the density channels. So the served model still returns one density volume,
and `engine.runtime`, the renderer and the daemon do not change; `splat` is a few shifted
multiply-adds that export to ONNX.

Units: dx, dy in pixels (within ±1 of the pixel), z in µm relative to the frame's focus (the
depth grid's axis), N in density units (sum of the source's density) divided by
``brightness_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DETECTION_CHANNELS",
    "DETECTION_HIDDEN",
    "Detections",
    "count_term",
    "decode",
    "detection_loss",
    "gmm_term",
    "localise",
    "splat",
]

DETECTION_CHANNELS = 9
"""Raw channels of the detection head: p logit, dx, dy, z, N, and the four sigmas."""

DETECTION_HIDDEN = 32
"""Width of the head's hidden layer."""

P_BIAS = -8.0
"""Initial bias of the p logit: p = 3e-4 everywhere, so a fine-tuned model starts as its
density channels alone (a pixel-wide sheet of p * N at z = 0 holds about 3 beads' light per
128 x 128 patch) and the count term teaches p where the sources are."""

SIGMA_MAX = (1.5, 1.5, 5.0, 3.0)
"""Largest sigma of dx, dy (px), z (µm) and N (brightness_scale units); the least is 0.01."""


@dataclass(frozen=True)
class Detections:
    """Decoded head outputs, each (B, 1, H, W) float32.

    p is the probability that a source lies within the pixel; x and y are the offsets of its
    centre from the pixel's centre (px), z its depth (µm, + deeper), n its brightness (units of
    ``brightness_scale``); sigma is (B, 4, H, W): the standard deviations of x, y, z and n.
    """

    p: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    n: torch.Tensor
    sigma: torch.Tensor


def decode(raw: torch.Tensor, z_first_um: float, z_last_um: float) -> Detections:
    """Map the head's (B, 9, H, W) raw outputs to bounded quantities (float32).

    The offsets stay within ±1 px (the splat reaches the 3 x 3 neighbourhood), depth within
    the grid, brightness and sigmas positive.
    """
    raw = raw.float()  # bf16 would resolve the depth to 1/8 of the grid: decode in float32
    mid, half = (z_first_um + z_last_um) / 2, (z_last_um - z_first_um) / 2
    smax = torch.tensor(SIGMA_MAX, dtype=raw.dtype, device=raw.device).view(1, 4, 1, 1)
    return Detections(
        p=torch.sigmoid(raw[:, 0:1]),
        x=torch.tanh(raw[:, 1:2]),
        y=torch.tanh(raw[:, 2:3]),
        z=mid + half * torch.tanh(raw[:, 3:4]),
        n=F.softplus(raw[:, 4:5]),
        sigma=0.01 + smax * torch.sigmoid(raw[:, 5:9]),
    )


def _shift(v: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move `v` (B, D, H, W) by (dy, dx) pixels, zeros coming in (pad and crop: no wrap)."""
    if dx:
        v = F.pad(v, (1, 0) if dx > 0 else (0, 1))
        v = v[..., :-1] if dx > 0 else v[..., 1:]
    if dy:
        v = F.pad(v, (0, 0, 1, 0) if dy > 0 else (0, 0, 0, 1))
        v = v[..., :-1, :] if dy > 0 else v[..., 1:, :]
    return v


def _neighbourhood_p(p: torch.Tensor) -> torch.Tensor:
    """Sum of p over each pixel's 3 x 3 neighbourhood, (B, 1, H, W): how sure a source is there."""
    return F.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=True) * 9


def splat(
    det: Detections,
    z_first_um: float,
    z_step_um: float,
    n_depths: int,
    brightness_scale: float,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Density (B, D, H, W) of the detections: each pixel's p * N put tri-linearly at its source.

    Depth: hat weights max(0, 1 - |z_index - d|) over the D grid depths. Lateral: the bilinear
    weights of the offset over the pixel and its neighbours (offsets are within ±1 px).
    Each pixel's mass is conserved unless it falls off the frame's edge.

    With `min_p` > 0 only pixels whose 3 x 3 neighbourhood holds at least that much p (as
    `localise` counts a source) give mass: the sure detections, without the haze of low p that
    every pixel carries (summed over a frame, that haze is light at every depth of every column).
    """
    mass = det.p * det.n * brightness_scale
    if min_p > 0:
        mass = mass * (_neighbourhood_p(det.p) >= min_p).to(mass.dtype)
    index = (det.z - z_first_um) / z_step_um
    grid = torch.arange(n_depths, dtype=mass.dtype, device=mass.device).view(1, -1, 1, 1)
    volume = mass * torch.relu(1 - (index - grid).abs())
    # weight of the neighbour one pixel back (-1), the pixel itself (0) and one pixel on (+1)
    wx = (torch.relu(-det.x), 1 - det.x.abs(), torch.relu(det.x))
    wy = (torch.relu(-det.y), 1 - det.y.abs(), torch.relu(det.y))
    out = torch.zeros_like(volume)
    for sy in (-1, 0, 1):
        for sx in (-1, 0, 1):
            out = out + _shift(volume * (wy[sy + 1] * wx[sx + 1]), sy, sx)
    return out


def count_term(det: Detections, counts: torch.Tensor) -> torch.Tensor:
    """Return DECODE's count term per patch, (B,): -log N(true count; sum p, sum p (1 - p))."""
    p = det.p.flatten(1)
    mean = p.sum(1)
    var = (p * (1 - p)).sum(1) + 1e-3
    return 0.5 * (counts - mean) ** 2 / var + 0.5 * torch.log(2 * math.pi * var)


def gmm_term(det: Detections, sources: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return DECODE's localisation term per patch, (B,): -sum of log mixture density.

    The sum runs over the true sources.

    `sources` is (B, M, 4): x and y in pixels of the patch (pixel centres at integers), z in
    µm and brightness in ``brightness_scale`` units; `mask` (B, M) marks the real rows (the
    rest is padding). Each pixel is a mixture component weighted p / sum p, a diagonal
    Gaussian at its pixel + offset, depth and brightness with its own sigmas.
    """
    h, w = det.p.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=det.p.dtype, device=det.p.device),
        torch.arange(w, dtype=det.p.dtype, device=det.p.device),
        indexing="ij",
    )
    mu = torch.stack(
        [
            (det.x[:, 0] + xs).flatten(1),
            (det.y[:, 0] + ys).flatten(1),
            det.z.flatten(1),
            det.n.flatten(1),
        ],
        dim=-1,
    )  # (B, K, 4)
    sigma = det.sigma.flatten(2).transpose(1, 2)  # (B, K, 4)
    weight = det.p.flatten(1)
    log_mix = torch.log(weight / weight.sum(1, keepdim=True) + 1e-12)  # (B, K)
    diff = (sources[:, :, None, :] - mu[:, None]) / sigma[:, None]  # (B, M, K, 4)
    log_normal = (
        -0.5 * (diff**2).sum(-1) - torch.log(sigma).sum(-1)[:, None] - 2 * math.log(2 * math.pi)
    )
    log_like = torch.logsumexp(log_normal + log_mix[:, None], dim=2)  # (B, M)
    return -(log_like * mask).sum(1)


def detection_loss(
    det: Detections, sources: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Count term plus localisation term, each averaged per patch, and the parts (detached).

    The localisation term is divided by the batch's mean source count, so its weight against
    the density terms does not swing with how crowded a batch is. The parts stay on the
    device, unread (the training loop reads them in batches: a read waits for the GPU).
    """
    counts = mask.sum(1)
    count = count_term(det, counts).mean()
    gmm = gmm_term(det, sources, mask).mean() / counts.mean().clamp(min=1.0)
    return count + gmm, {"count": count.detach(), "gmm": gmm.detach()}


LOCALISE_THRESHOLD = 0.5
"""`localise` keeps a pixel whose 3 x 3 neighbourhood holds at least this much p."""


def localise(det: Detections, threshold: float = LOCALISE_THRESHOLD) -> list[np.ndarray]:
    """Read the detections out as a list of sources per frame, as DECODE's post-processing.

    A source is a local maximum of p summed over 3 x 3 pixels holding at least `threshold`
    (> 0; ties go to the pixel with the most p);
    its position, depth and brightness are the p-weighted means over those 9 pixels (each
    pixel's own estimate: pixel + offset). Returns per frame a (K, 5) float32 array of rows
    x, y (px), z (µm), n (``brightness_scale`` units) and the summed p.
    """
    p = det.p[:, 0].detach().float()
    pooled = _neighbourhood_p(p[:, None])[:, 0]
    # a source shared by a 2 x 2 block gives four equal sums: the pixel of the most p wins
    score = pooled + 1e-3 * p
    peak = (score == F.max_pool2d(score[:, None], 3, stride=1, padding=1)[:, 0]) & (
        pooled >= threshold
    )
    h, w = p.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    fields = [det.x[:, 0] + xs, det.y[:, 0] + ys, det.z[:, 0], det.n[:, 0]]

    def weighted(v: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d((p * v.detach().float())[:, None], 3, 1, 1)[:, 0] * 9 / pooled

    means = [weighted(v) for v in fields]
    out = []
    for b in range(p.shape[0]):
        rows, cols = torch.nonzero(peak[b], as_tuple=True)
        columns = [m[b, rows, cols] for m in means] + [pooled[b, rows, cols]]
        out.append(torch.stack(columns, dim=1).numpy().astype(np.float32).reshape(-1, 5))
    return out
