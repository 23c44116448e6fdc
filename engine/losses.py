"""Training losses for Deep-Z in torch: SSIM / MS-SSIM and the least-squares GAN terms.

Kept apart from the model so that `engine.model` stays pure; evaluation metrics in numpy live in
`engine.metrics`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["lsgan_d_loss", "lsgan_g_loss", "ms_ssim", "ssim"]

_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gauss_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Return a normalised 1-D Gaussian window of `size` taps."""
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian blur of an (N, 1, H, W) tensor."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def _ssim_parts(
    x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor, size: int, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean SSIM and contrast-structure terms of (N, 1, H, W) images."""
    g = _gauss_window(size, sigma, x.device)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    c1 = c1.view(-1, 1, 1, 1)
    c2 = c2.view(-1, 1, 1, 1)
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return (lum * cs).mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def _data_range(target: torch.Tensor) -> torch.Tensor:
    """Per-sample dynamic range (max - min) of the target, at least 1e-3."""
    flat = target.flatten(1)
    return (flat.max(dim=1).values - flat.min(dim=1).values).clamp_min(1e-3).detach()


def ssim(
    pred: torch.Tensor, target: torch.Tensor, *, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of (N, 1, H, W) images, data range from each target."""
    s, _ = _ssim_parts(pred, target, _data_range(target), size, sigma)
    return s.mean()


def ms_ssim(
    pred: torch.Tensor, target: torch.Tensor, *, scales: int = 3, size: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """Multi-scale SSIM over `scales` dyadic scales (weights renormalised, Wang et al. 2003).

    A 7-tap window and 3 scales suit 96-128 px training patches; contrast-structure terms are
    clamped positive so the product stays differentiable.
    """
    if not 1 <= scales <= len(_MS_WEIGHTS):
        raise ValueError(f"scales must be in 1..{len(_MS_WEIGHTS)}, got {scales}")
    min_side = size * 2 ** (scales - 1)
    if min(pred.shape[-2:]) < min_side:
        raise ValueError(
            f"ms_ssim with {scales} scales needs sides >= {min_side}, got {pred.shape}"
        )
    w = torch.tensor(_MS_WEIGHTS[:scales], device=pred.device)
    w = w / w.sum()
    dr = _data_range(target)
    out = torch.ones(pred.shape[0], device=pred.device)
    for i in range(scales):
        s, cs = _ssim_parts(pred, target, dr, size, sigma)
        term = s if i == scales - 1 else cs
        out = out * term.clamp_min(1e-4) ** w[i]
        if i < scales - 1:
            pred, target = F.avg_pool2d(pred, 2), F.avg_pool2d(target, 2)
    return out.mean()


def lsgan_d_loss(real_score: torch.Tensor, fake_score: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN critic loss: real -> 1, fake -> 0."""
    return 0.5 * (((real_score - 1) ** 2).mean() + (fake_score**2).mean())


def lsgan_g_loss(fake_score: torch.Tensor) -> torch.Tensor:
    """Least-squares GAN generator loss: push fake scores to 1."""
    return ((fake_score - 1) ** 2).mean()
