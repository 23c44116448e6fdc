"""Held-out optics: a vectorial or pupil-function PSF with depth-dependent aberration."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import psfmodels
import scipy.fft
from scipy import ndimage, optimize

SLICE_UM = 0.5
"""Axial sampling of the objects and of the PSF defocus lattice (µm)."""
PSF_SIZE_PX = 127
"""Side of the PSF planes (px): 19 µm of radius holds a point's light to 15 µm of defocus, 91-95 %
of it at 20 µm (each plane is normalised to sum 1)."""
FOCUS_HALF_RANGE_UM = 10.0
"""The truth planes span ±10 µm around the frame's focus."""


def truth_dz_um() -> np.ndarray:
    """Focus positions of a sample's truth planes: -10 ... +10 µm in 0.5 µm steps (41)."""
    n = round(FOCUS_HALF_RANGE_UM / SLICE_UM)
    out: np.ndarray = np.round(np.arange(-n, n + 1) * SLICE_UM, 6)
    return out


@dataclass(frozen=True)
class IndependentOptics:
    """Nominal optics of the held-out set and its depth-aberrated PSF (vectorial or pupil).

    Same nominal values as `engine.optics.OpticsConfig`'s defaults; `base_depth_um` is the
    depth below the coverslip of the frame's focal plane, so a source at depth z sees the
    aberration of particle depth ``base_depth_um + z`` (quantised to `aberration_step_um`,
    clipped at the coverslip). Frozen, so PSFs computed from it can be cached.
    """

    na: float = 0.75
    wavelength_um: float = 0.52
    immersion_index: float = 1.0
    sample_index: float = 1.33
    pixel_size_um: float = 0.3
    base_depth_um: float = 12.0
    aberration_step_um: float = 1.0
    pinhole_au: float | None = None
    """None: wide-field. Otherwise a confocal PSF, the cross-modality truth, made unlike the
    simulator's (scalar, point pinhole): the vectorial excitation PSF times the vectorial
    detection PSF seen through a round pinhole of this diameter in Airy units, both aberrated."""
    excitation_wavelength_um: float = 0.488
    psf_model: Literal["vectorial", "pupil"] = "vectorial"
    """"vectorial": psfmodels' vectorial model (the default set). "pupil": a scalar
    pupil-function model computed here by FFT (`_pupil_psf`), with the aplanatic 1 / sqrt(cos)
    amplitude (psfmodels' convention), Fresnel transmission at the sample / immersion
    interface, pixel-area integration and the objective's own fixed aberrations
    (`zernike_waves`): a third PSF model, neither the training simulator's nor psfmodels', for
    models that trained on both of theirs."""
    point_render: Literal["split", "subpixel"] = "split"
    """How a point source (a bead) lands on the camera. "split": its PSF placed at the four
    nearest pixel centres with bilinear weights, as the training simulator places points too
    (at a pixel corner the in-focus peak is then 0.38 of a centred one's, against about 0.5
    for the light a camera's pixels really collect: the PSF is sampled at 0.3 µm, under
    Nyquist's 0.17). "subpixel": the PSF computed at a third of a pixel, moved to the point
    (to the nearest third, then by the rest with a Fourier shift, exact at that sampling) and
    summed over each pixel's area, as a camera images a point; the truth planes and a bead
    slide are made the same way. A bead at a pixel corner then peaks 0.49 of a centred one's
    in focus, a third of a pixel off 0.73 (session 36; session 35's sets stopped at the
    nearest third, so no bead lay more than 1/3 px from a pixel centre). Wide-field only."""
    point_depth: Literal["lattice", "own"] = "lattice"
    """How a point source between the 0.5 µm depth slices is imaged. "lattice": the linear mix of
    the two slices' PSFs by distance, as the training simulator and the volume models' renderer
    draw it (2-7 % L1 from the PSF at the point's own depth, session 39's review 65: that shared
    convention flatters bead depth, FWHM and the tilted plane). "own": the PSF computed at the
    point's own defocus for every focus position, as a microscope images it (session 40; its
    aberration still that of its 1 µm depth bin, `aberration_step_um`, as every source's); about
    0.4-0.8 s per bead on a 2-core CPU, so a set of 700 beads costs some 10 minutes more. Spheres
    stay 0.5 µm slabs either way (their slabs average over depth)."""
    zernike_waves: tuple[float, float, float] = (0.05, 0.03, 0.03)
    """"pupil" only: RMS waves of oblique astigmatism, horizontal coma and primary spherical
    aberration (Noll Z5, Z8, Z11) on top of the index mismatch; 0.066 waves in all: a good
    objective, not a perfect one. The spherical term adds to the index mismatch's, so the
    in-focus peak is 0.83 (2 µm deep) to 0.77 (12 µm) of the unaberrated pupil model's, and
    the coma moves the in-focus centroid 0.24 px along -x (the truth planes share it)."""

    def __post_init__(self) -> None:
        if self.psf_model not in ("vectorial", "pupil"):
            raise ValueError(f"psf_model must be 'vectorial' or 'pupil', not {self.psf_model!r}")
        if len(self.zernike_waves) != 3:
            raise ValueError(
                "zernike_waves must be 3 RMS amplitudes (astigmatism, coma, spherical), "
                f"not {self.zernike_waves!r}"
            )
        if self.point_render not in ("split", "subpixel"):
            raise ValueError(
                f"point_render must be 'split' or 'subpixel', not {self.point_render!r}"
            )
        if self.point_depth not in ("lattice", "own"):
            raise ValueError(f"point_depth must be 'lattice' or 'own', not {self.point_depth!r}")
        if self.point_render == "subpixel" and self.pinhole_au is not None:
            raise ValueError("point_render='subpixel' is wide-field only (pinhole_au=None)")
        if self.pinhole_au is not None and not 0 < self.pinhole_au < 10:
            raise ValueError(
                f"pinhole_au must be in (0, 10) Airy units (or None: wide-field), "
                f"not {self.pinhole_au}"
            )

    def aberration_bin(self, z_um: float) -> int:
        """Index of the aberration depth bin a source at depth `z_um` falls in."""
        return math.floor(z_um / self.aberration_step_um + 0.5)

    def particle_depth_um(self, z_um: float) -> float:
        """Depth below the coverslip (µm) whose aberration a source at depth `z_um` sees."""
        pz = self.base_depth_um + self.aberration_bin(z_um) * self.aberration_step_um
        return max(round(pz, 6), 0.0)

    def best_focus_um(self, particle_depth_um: float) -> float:
        """Nominal focus position (psfmodels coordinates) of the brightest on-axis peak."""
        return _best_focus(self, round(float(particle_depth_um), 6))

    def psf(
        self, defocus_um: np.ndarray, source_z_um: float = 0.0, size_px: int = PSF_SIZE_PX
    ) -> np.ndarray:
        """Return the set's PSF (Q, size, size) float32 of a source at depth `source_z_um`.

        ``defocus_um = z_focus - z_object``; 0 is that source's best focus. The point sits at
        the centre pixel (use an odd size); every wide-field plane sums to 1 (confocal: the in-focus
        plane does, the others dim). Cached and read-only.
        """
        key = _defocus_key(defocus_um, size_px)
        return _psf_planes(self, self.particle_depth_um(float(source_z_um)), key, int(size_px))

    def psf_subpixel(
        self, defocus_um: np.ndarray, source_z_um: float = 0.0, size_px: int = PSF_SIZE_PX
    ) -> np.ndarray:
        """Return the PSF at a third of a pixel: (Q, 3·size, 3·size) float32, wide-field.

        The light each third of a pixel collects, the point at the middle of the centre pixel's
        3 × 3 block; summed over 3 × 3 blocks it is a pixel PSF like `psf`'s (the pupil model's
        exactly, the vectorial one's within psfmodels' own pixel integration, 1-2 % L1), and
        every plane sums to 1. What `point_render="subpixel"` images points with. Cached.
        """
        key = _defocus_key(defocus_um, size_px)
        if self.pinhole_au is not None:
            raise ValueError("psf_subpixel is wide-field only (pinhole_au=None)")
        pz = self.particle_depth_um(float(source_z_um))
        return _psf_planes_subpixel(self, pz, key, int(size_px))


def _defocus_key(defocus_um: np.ndarray, size_px: int) -> tuple[float, ...]:
    """Check a PSF request (finite 1-D defocus, an odd side >= 3); return its cache key."""
    d = np.atleast_1d(np.asarray(defocus_um, dtype=np.float64))
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"defocus_um must be a 1-D array of finite values, got {defocus_um!r}")
    if size_px < 3 or size_px % 2 == 0:
        raise ValueError(f"size_px must be odd and >= 3, got {size_px}")
    return tuple(round(float(v), 6) for v in d)


def _raw_psf(
    optics: IndependentOptics,
    pz: float,
    z_stage_um: Sequence[float] | np.ndarray,
    size_px: int,
    wavelength_um: float | None = None,
    subpixel: bool = False,
) -> np.ndarray:
    """Compute the set's PSF at nominal focus positions `z_stage_um` (float64, unnormalised).

    `subpixel`: (Z, 3·size, 3·size) samples at a third of a pixel instead, whose 3 × 3 sums
    are the pixels (psfmodels' vectorial model sampled there without its own oversampling).
    """
    if optics.psf_model == "pupil":
        return _pupil_psf(optics, pz, z_stage_um, size_px, wavelength_um, subpixel)
    q = PUPIL_OVERSAMPLE if subpixel else 1
    psf: np.ndarray = psfmodels.make_psf(
        [float(z) for z in z_stage_um],
        size_px * q,
        dxy=optics.pixel_size_um / q,
        pz=pz,
        NA=optics.na,
        wvl=optics.wavelength_um if wavelength_um is None else wavelength_um,
        ns=optics.sample_index,
        ni=optics.immersion_index,
        ni0=optics.immersion_index,
        model="vectorial",
        normalize=False,
        **({"oversample_factor": 1} if subpixel else {}),
    )
    return psf


PUPIL_OVERSAMPLE = 3
"""The pupil model's intensity is sampled at pixel / 3 and summed over each pixel's area."""
_PUPIL_GRID = 512
"""FFT side of the pupil model: 51 µm at 0.1 µm, room for the rings of 20 µm of defocus."""


def _pupil_psf(
    optics: IndependentOptics,
    pz: float,
    z_stage_um: Sequence[float] | np.ndarray,
    size_px: int,
    wavelength_um: float | None = None,
    subpixel: bool = False,
) -> np.ndarray:
    """Scalar pupil-function PSF (Z, size, size) float64, unnormalised, by FFT.

    `subpixel`: (Z, 3·size, 3·size), the intensity at a third of a pixel before each pixel's
    3 × 3 sum.

    The same index-mismatch physics as Gibson-Lanni (a source `pz` µm below the coverslip in
    the sample medium, the focus at `z_stage_um` in psfmodels' axial convention, so defocus
    means the same in every set), computed another way: the optical path difference
    ``pz · ns · cos θs − (z − pz (1 − ni / ns)) · ni · cos θi`` is written on a sampled pupil
    (`_pupil`), then Fourier-transformed to the image at a third of a pixel and summed over
    each pixel.
    """
    wvl = optics.wavelength_um if wavelength_um is None else wavelength_um
    q = PUPIL_OVERSAMPLE
    n = max(_PUPIL_GRID, scipy.fft.next_fast_len(size_px * q + 2 * q))
    base, cos_i = _pupil(optics, pz, wvl, n)
    k0 = 2 * np.pi / wvl
    ni, ns = optics.immersion_index, optics.sample_index
    # psfmodels counts z from the coverslip with a source's paraxial focal shift taken out
    # (its best focus lies near 0.94 pz, where the stage alone would put it near 0.69 pz)
    paraxial_shift = pz * (1.0 - ni / ns)
    side = size_px * q
    start = n // 2 - side // 2
    out_side = side if subpixel else size_px
    out = np.empty((len(z_stage_um), out_side, out_side), dtype=np.float64)
    for i, z in enumerate(z_stage_um):
        stage = float(z) - paraxial_shift
        field = scipy.fft.ifft2(base * np.exp(-1j * k0 * stage * ni * cos_i))
        intensity = np.fft.fftshift(np.abs(field) ** 2)[start : start + side, start : start + side]
        out[i] = intensity if subpixel else intensity.reshape(size_px, q, size_px, q).sum((1, 3))
    return out


@functools.lru_cache(maxsize=4)  # a best-focus search asks for one plane at a time, ~15 times
def _pupil(
    optics: IndependentOptics, pz: float, wavelength_um: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Build the n² pupil of a source `pz` deep (stage at 0) and cos θ in the immersion.

    The pupil carries the objective's Zernike aberrations, the 1 / sqrt(cos θi) amplitude of an
    aplanatic objective collecting a point's light and the mean of the s and p Fresnel
    transmissions at the sample / immersion interface; the stage's defocus phase is
    ``k0 · z · ni · cos θi`` on top. Built once per (optics, depth, wavelength): it costs six
    times one plane's FFT. Read-only.
    """
    wvl = wavelength_um
    freq = np.fft.fftfreq(n, d=optics.pixel_size_um / PUPIL_OVERSAMPLE)  # cycles per µm
    kx, ky = np.meshgrid(freq, freq)  # x along columns, y along rows
    sine = np.hypot(kx, ky) * wvl  # n · sin θ, the same in every medium (Snell)
    # the pupil's rim shaded over one sample (the share of each sample inside it): a hard rim
    # on this grid is 4 % off a 2048² grid's PSF at 20 µm of defocus, a shaded one 2.4 %
    step = wvl * float(freq[1] - freq[0])
    rim = np.clip((optics.na - sine) / step + 0.5, 0.0, 1.0)
    inside = rim > 0
    ni, ns = optics.immersion_index, optics.sample_index
    cos_i = np.sqrt(np.clip(1.0 - (sine / ni) ** 2, 0.0, None))
    cos_s = np.sqrt(np.clip(1.0 - (sine / ns) ** 2, 0.0, None))
    t_s = 2 * ns * cos_s / np.maximum(ns * cos_s + ni * cos_i, 1e-9)
    t_p = 2 * ns * cos_s / np.maximum(ni * cos_s + ns * cos_i, 1e-9)
    amplitude = rim * 0.5 * (t_s + t_p) / np.sqrt(np.maximum(cos_i, 1e-6))
    rho = np.where(inside, sine / optics.na, 0.0)
    phi = np.arctan2(ky, kx)
    astig, coma, spherical = optics.zernike_waves
    zernike = (
        astig * math.sqrt(6) * rho**2 * np.sin(2 * phi)
        + coma * math.sqrt(8) * (3 * rho**3 - 2 * rho) * np.cos(phi)
        + spherical * math.sqrt(5) * (6 * rho**4 - 6 * rho**2 + 1)
    )
    k0 = 2 * np.pi / wvl
    base = amplitude * np.exp(1j * (2 * np.pi * zernike + k0 * pz * ns * cos_s))
    base.flags.writeable = False
    cos_i.flags.writeable = False
    return base, cos_i


@functools.lru_cache(maxsize=256)
def _best_focus(optics: IndependentOptics, pz: float) -> float:
    """Focus of the brightest on-axis intensity: a 0.25 µm scan, then Brent's method."""
    coarse = pz + np.arange(-5.0, 3.0001, 0.25)
    on_axis = _raw_psf(optics, pz, coarse, 5)[:, 2, 2]
    k = int(np.argmax(on_axis))
    lo, hi = float(coarse[max(k - 1, 0)]), float(coarse[min(k + 1, coarse.size - 1)])

    def dark(zv: float) -> float:
        return -float(_raw_psf(optics, pz, [zv], 5)[0, 2, 2])

    res = optimize.minimize_scalar(dark, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
    return float(res.x)


@functools.lru_cache(maxsize=64)
def _psf_planes(
    optics: IndependentOptics, pz: float, defocus_um: tuple[float, ...], size_px: int
) -> np.ndarray:
    """Compute the set's PSF planes at `defocus_um` from the best focus of depth `pz`.

    Wide-field planes each sum to 1; confocal ones (`optics.pinhole_au`) are scaled so the
    in-focus plane sums to 1 and dim away from focus (optical sectioning).
    """
    best = _best_focus(replace(optics, pinhole_au=None), pz)  # the emission's focus
    stage = [best + d for d in defocus_um]
    psf = _raw_psf(optics, pz, stage, size_px)
    if optics.pinhole_au is None:
        psf /= psf.sum(axis=(1, 2), keepdims=True)
    else:
        psf = _confocal(optics, pz, stage, psf)
        if 0.0 in defocus_um:
            psf /= psf[defocus_um.index(0.0)].sum()
        else:
            psf /= _confocal(optics, pz, [best], _raw_psf(optics, pz, [best], size_px)).sum()
    out = psf.astype(np.float32)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)  # each bank is 9 times a pixel bank's size (25 MB for 45 planes)
def _psf_planes_subpixel(
    optics: IndependentOptics, pz: float, defocus_um: tuple[float, ...], size_px: int
) -> np.ndarray:
    """Wide-field PSF planes at a third of a pixel (`IndependentOptics.psf_subpixel`)."""
    best = _best_focus(optics, pz)
    psf = _raw_psf(optics, pz, [best + d for d in defocus_um], size_px, subpixel=True)
    psf /= psf.sum(axis=(1, 2), keepdims=True)
    out = psf.astype(np.float32)
    out.flags.writeable = False
    return out


def pinhole_disc(optics: IndependentOptics) -> np.ndarray:
    """Return the pinhole in sample pixels: a unit-sum disc `optics.pinhole_au` AU across.

    1 AU = 1.22 λ/NA at the emission wavelength; each pixel holds the share of its 4 × 4
    sub-pixel centres inside the disc (a pinhole narrower than a sub-pixel is one pixel).
    """
    if optics.pinhole_au is None:
        raise ValueError("a wide-field IndependentOptics (pinhole_au None) has no pinhole")
    radius_px = 0.5 * optics.pinhole_au * 1.22 * optics.wavelength_um / optics.na
    radius_px /= optics.pixel_size_um
    half = math.ceil(radius_px)
    sub = (np.arange(4 * (2 * half + 1)) + 0.5) / 4 - (half + 0.5)
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2 <= radius_px**2).astype(np.float64)
    disc = inside.reshape(2 * half + 1, 4, 2 * half + 1, 4).sum(axis=(1, 3))
    if disc.sum() == 0:
        disc[half, half] = 1.0
    out: np.ndarray = disc / disc.sum()
    return out


def _confocal(
    optics: IndependentOptics, pz: float, stage: Sequence[float], detection: np.ndarray
) -> np.ndarray:
    """Confocal PSF planes: excitation × (detection ⊛ pinhole disc), unnormalised (float64).

    The detection PSF is seen through `pinhole_disc` (sample coordinates); the excitation PSF
    is the same vectorial, aberrated model at `optics.excitation_wavelength_um`.
    """
    excitation = _raw_psf(optics, pz, stage, detection.shape[-1], optics.excitation_wavelength_um)
    disc = pinhole_disc(optics)
    seen = np.stack([ndimage.convolve(p, disc, mode="constant") for p in detection])
    out: np.ndarray = excitation * seen
    return out
