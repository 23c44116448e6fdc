"""The classical baseline: depth read by correlating the frame with the PSF at each defocus."""

from __future__ import annotations

import numpy as np
import scipy.fft

from engine.heldout.optics import PSF_SIZE_PX, IndependentOptics, truth_dz_um
from engine.heldout.readouts import (
    DEPTH_BORDER_PX,
    BeadDepths,
    bead_images,
    peak_position,
    scored_beads,
)
from engine.heldout.refocusers import smooth_background
from engine.heldout.samples import IndependentSample


def _correlate_same(img: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Cross-correlation (Q, H, W) of an image with each of (Q, S, S) kernels, 'same' size."""
    h, w = img.shape
    s0, s1 = kernels.shape[1:]
    fh = scipy.fft.next_fast_len(h + s0 - 1, real=True)
    fw = scipy.fft.next_fast_len(w + s1 - 1, real=True)
    spec = scipy.fft.rfft2(img, s=(fh, fw), workers=2)
    flipped = kernels[:, ::-1, ::-1]
    full = scipy.fft.irfft2(
        scipy.fft.rfft2(flipped, s=(fh, fw), workers=2) * spec[None], s=(fh, fw), workers=2
    )
    out: np.ndarray = full[:, s0 // 2 : s0 // 2 + h, s1 // 2 : s1 // 2 + w]
    return out


def _zero_mean_unit(templates: np.ndarray) -> np.ndarray:
    """Each (S, S) template of a (Q, S, S) stack less its mean, scaled to unit norm.

    Zero mean, so that background left over by `smooth_background` adds nothing to a score
    (review 83: with the mean left in, a residual of b counts added b·Σt/‖t‖ to each score,
    most to the flattest, far-defocus templates, and a residual of +0.3 counts, the size
    `smooth_background` leaves on integer Poisson frames, took beads at +8 µm from 68 % to
    7 % within 1 µm: depths were pulled to the ends of the range).
    """
    t = templates - templates.mean(axis=(1, 2), keepdims=True)
    out: np.ndarray = t / np.sqrt((t**2).sum(axis=(1, 2), keepdims=True))
    return out


def matched_filter_depth(
    frame: np.ndarray, psf_bank: np.ndarray, defocus_um: np.ndarray, xy_px: np.ndarray
) -> np.ndarray:
    """Classical depth read-out: correlate the frame with the PSF at each defocus.

    The frame's smooth background is removed, the result is correlated (FFT) with every
    PSF plane made zero-mean and unit-norm (`_zero_mean_unit`), and at each given position
    the defocus of the highest score is taken (refined by a parabola). A bead at depth z seen
    at focus 0 has defocus ``-z``, so the depth returned is minus that defocus.

    Parameters
    ----------
    frame : (H, W) camera frame at focus 0.
    psf_bank : (Q, S, S) PSF planes at `defocus_um` (the model's own assumption: the
        training simulator's `engine.optics.make_psf`).
    defocus_um : (Q,) increasing defocus values of the bank (µm).
    xy_px : (N, 2) bead positions as (x, y) = (column, row) in pixels.

    Returns
    -------
    np.ndarray
        (N,) estimated depths (µm, + deeper); NaN for positions outside the frame.
    """
    img = np.asarray(frame, dtype=np.float64)
    bank = np.asarray(psf_bank, dtype=np.float64)
    d = np.asarray(defocus_um, dtype=np.float64).ravel()
    if bank.ndim != 3 or bank.shape[0] != d.size or d.size < 3 or np.any(np.diff(d) <= 0):
        raise ValueError(f"psf_bank {bank.shape} must be (Q, S, S) for Q >= 3 increasing defocus")
    img = img - smooth_background(img)
    scores = _correlate_same(img, _zero_mean_unit(bank))
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    h, w = img.shape
    out = np.full(xy.shape[0], np.nan)
    for j, (x, y) in enumerate(xy):
        r, c = round(float(y)), round(float(x))
        if 0 <= r < h and 0 <= c < w:
            out[j] = -peak_position(scores[:, r, c], d)
    return out


OWN_FILTER_PX = 81
"""Side of `own_psf_bead_depths`' templates: 98.5-99.3 % of a bead's light 10 µm from focus
(the vectorial PSF; 92 % in 63 px), at a sixth of the frame PSF's cost (its thirds, 243, are a
power of 3 where 381 = 3 · 127 is slow to Fourier transform)."""


def own_psf_bead_depths(
    sample: IndependentSample, optics: IndependentOptics, *, min_sep_um: float = 1.5
) -> BeadDepths:
    """Read bead depths with a matched filter that knows the set's optics and bead positions.

    Told where each bead is, to the fraction of a pixel, the background-removed frame is
    correlated there with the bead's own image at every candidate depth z of the truth grid
    (`point_images`: z's PSF with z's aberration, at the bead's place between pixels, as the set
    imaged it; zero mean, unit norm), and the best z is refined by a parabola. Under white
    noise this is the maximum-likelihood depth of a lone bead of unknown brightness on an
    unknown flat background: the reference the model
    cannot be held to beat where its own PSF is not the set's. (A pixel-centred PSF would not
    do on camera-like sets: a bead at a pixel corner is dimmer and wider in focus, which reads
    as defocus.)
    """
    index, rows, cols = scored_beads(sample, DEPTH_BORDER_PX, min_sep_um)
    candidates = -truth_dz_um()[::-1]  # increasing depths
    half = OWN_FILTER_PX // 2
    img = sample.frame.astype(np.float64)
    img = np.pad(img - smooth_background(img), half)  # the window may leave the frame
    est = np.empty(index.size)
    for j, (i, r, c) in enumerate(zip(index, rows, cols, strict=True)):
        window = img[r : r + OWN_FILTER_PX, c : c + OWN_FILTER_PX]
        t = bead_images(sample, int(i), candidates, optics, OWN_FILTER_PX).astype(np.float64)
        scores = np.einsum("qyx,yx->q", _zero_mean_unit(t), window)
        est[j] = peak_position(scores, candidates)
    return BeadDepths(index=index, z_true_um=sample.objects.z_um[index], z_est_um=est)


def matched_filter_bead_depths(
    sample: IndependentSample,
    psf_bank: np.ndarray | None = None,
    defocus_um: np.ndarray | None = None,
    *,
    min_sep_um: float = 1.5,
) -> BeadDepths:
    """`matched_filter_depth` on the same beads `bead_depths` scores, as `BeadDepths`.

    Default bank: the training simulator's scalar PSF (`engine.optics.make_psf` with default
    `OpticsConfig`) at defocus -10 ... +10 µm in 0.5 µm steps, 127 px.
    """
    if psf_bank is None or defocus_um is None:
        from engine.optics import OpticsConfig, make_psf

        defocus_um = truth_dz_um()
        psf_bank = np.asarray(make_psf(OpticsConfig(), defocus_um, PSF_SIZE_PX))
    index, rows, cols = scored_beads(sample, DEPTH_BORDER_PX, min_sep_um)
    xy = np.column_stack([cols, rows]).astype(np.float64)
    est = matched_filter_depth(sample.frame, psf_bank, defocus_um, xy)
    return BeadDepths(index=index, z_true_um=sample.objects.z_um[index], z_est_um=est)
