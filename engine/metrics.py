"""Image metrics for evaluating refocused planes: PSNR, SSIM, Pearson and bead FWHM (numpy).

All functions take float arrays in any intensity scale; the data range for PSNR / SSIM comes
from the reference (ground-truth) image unless given.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage, optimize

__all__ = ["fwhm_1d", "gaussian_fwhm_2d", "pearson", "psnr", "ssim"]


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast a prediction / reference pair to float64 and check they are same-shape 2-D."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"expected two 2-D images of one shape, got {p.shape} and {t.shape}")
    return p, t


def _range(t: np.ndarray, data_range: float | None) -> float:
    """Return the given data range, or the reference's max - min (at least 1e-12)."""
    if data_range is not None:
        if data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        return float(data_range)
    return max(float(t.max() - t.min()), 1e-12)


def psnr(pred: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio (dB), 10 log10(L^2 / MSE), L = the reference's range."""
    p, t = _pair(pred, truth)
    mse = float(np.mean((p - t) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(_range(t, data_range) ** 2 / mse))


def ssim(
    pred: np.ndarray, truth: np.ndarray, data_range: float | None = None, sigma: float = 1.5
) -> float:
    """Mean structural similarity (Wang et al. 2004), Gaussian window sigma 1.5 px (11 taps).

    Statistics are computed with a Gaussian filter and averaged away from a 5-px border.
    """
    p, t = _pair(pred, truth)
    r = _range(t, data_range)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2

    def blur(a: np.ndarray) -> np.ndarray:
        out: np.ndarray = ndimage.gaussian_filter(a, sigma, truncate=3.5, mode="reflect")
        return out

    mp, mt = blur(p), blur(t)
    spp = blur(p * p) - mp * mp
    stt = blur(t * t) - mt * mt
    spt = blur(p * t) - mp * mt
    smap = ((2 * mp * mt + c1) * (2 * spt + c2)) / ((mp**2 + mt**2 + c1) * (spp + stt + c2))
    b = int(3.5 * sigma + 0.5)
    if min(smap.shape) > 2 * b:
        smap = smap[b:-b, b:-b]
    return float(smap.mean())


def pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation coefficient of two same-shape images (0 when one is constant)."""
    p, t = _pair(pred, truth)
    p = p - p.mean()
    t = t - t.mean()
    den = float(np.sqrt((p * p).sum() * (t * t).sum()))
    return float((p * t).sum() / den) if den > 0 else 0.0


def fwhm_1d(profile: np.ndarray, spacing: float = 1.0) -> float:
    """Full width at half maximum of a single-peaked 1-D profile above its minimum.

    Crossings of half maximum are linearly interpolated; NaN when the peak touches an edge.
    """
    y = np.asarray(profile, dtype=np.float64)
    if y.ndim != 1 or y.size < 3:
        raise ValueError(f"profile must be 1-D with >= 3 samples, got shape {y.shape}")
    y = y - y.min()
    k = int(np.argmax(y))
    half = y[k] / 2
    if half <= 0:
        return float("nan")
    left = k
    while left > 0 and y[left] > half:
        left -= 1
    right = k
    while right < y.size - 1 and y[right] > half:
        right += 1
    if y[left] > half or y[right] > half:
        return float("nan")
    xl = left + (half - y[left]) / (y[left + 1] - y[left])
    xr = right - (half - y[right]) / (y[right - 1] - y[right])
    return float((xr - xl) * spacing)


def gaussian_fwhm_2d(
    patch: np.ndarray, spacing: float = 1.0, *, centered: bool = False, min_snr: float = 0.0
) -> float:
    """Lateral FWHM of a spot: fit an isotropic 2-D Gaussian plus offset to a small patch.

    Returns 2 sqrt(2 ln 2) sigma times `spacing`; NaN when the fit fails or sigma reaches the
    patch size (no spot). With `centered`, the spot is known to sit at the patch centre: the
    fit starts there and its centre may move at most 2 px, so it cannot lock onto a noise
    pixel elsewhere. With `min_snr` > 0, a spot whose fitted amplitude is below `min_snr`
    times the residual noise is "not resolved" (NaN): a bead blurred into the background has
    no width to measure.
    """
    z = np.asarray(patch, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"patch must be 2-D, got shape {z.shape}")
    yy, xx = np.indices(z.shape, dtype=np.float64)
    coords = np.stack([yy.ravel(), xx.ravel()])
    if centered:
        cy, cx = (z.shape[0] - 1) / 2, (z.shape[1] - 1) / 2
    else:
        cy, cx = (float(v) for v in np.unravel_index(int(np.argmax(z)), z.shape))
    size = float(max(z.shape))

    def model(coords: np.ndarray, a: float, y0: float, x0: float, s: float, c: float) -> np.ndarray:
        y, x = coords
        out: np.ndarray = a * np.exp(-((y - y0) ** 2 + (x - x0) ** 2) / (2 * s * s)) + c
        return out

    span = float(z.max() - z.min())
    p0 = [max(span, 1e-12), cy, cx, 1.5, float(z.min())]
    lower = [0.0, cy - 2, cx - 2, 0.3, -np.inf] if centered else -np.inf
    upper = [np.inf, cy + 2, cx + 2, size, np.inf] if centered else np.inf
    try:
        with warnings.catch_warnings():  # the covariance is not used; its warning is noise
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            popt, _ = optimize.curve_fit(
                model, coords, z.ravel(), p0=p0, bounds=(lower, upper), maxfev=2000
            )
    except (RuntimeError, ValueError):
        return float("nan")
    s = abs(float(popt[3]))
    if not np.isfinite(s) or s >= 0.99 * size:
        return float("nan")
    if min_snr > 0:
        noise = float(np.std(z.ravel() - model(coords, *popt)))
        if popt[0] < min_snr * max(noise, 1e-12):
            return float("nan")
    return float(2.0 * np.sqrt(2.0 * np.log(2.0)) * s * spacing)
