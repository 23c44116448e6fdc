"""Independent held-out evaluation set and object-level read-outs for Deep-Z refocusing.

A Deep-Z model is easy to overrate on data made by the simulator it was trained on: it can
learn the simulator's quirks rather than the optics. This module makes held-out data another
way, with the same nominal microscope (20x/0.75 NA air objective, watery sample n = 1.33,
0.52 µm emission, 0.3 µm pixels), and judges a refocusing method by what it does to objects
(bead depth, bead width, a tilted bead plane) rather than by pixel scores alone.

How the set differs from the training simulator (`engine.optics`):

* **PSF model.** psfmodels' *vectorial* model (Aguet et al. 2009) instead of the scalar
  Gibson-Lanni model, with its own best-focus search (a coarse scan of the on-axis intensity
  refined by Brent's method, instead of a fixed 0.1 / 0.01 µm grid search). With
  ``IndependentOptics(psf_model="pupil")`` the same objects and camera are imaged through a
  third model, a scalar pupil-function PSF computed here by FFT with the objective's own
  astigmatism, coma and spherical aberration (`engine.fidelity --pupil`): still independent
  for a model trained on psfmodels' vectorial PSF as well as the scalar one.
* **Depth-dependent aberration.** A source at depth z (µm, + deeper, relative to the frame's
  focal plane) sees the index-mismatch aberration of particle depth
  ``pz = base_depth_um + z`` (base 12 µm, so 2-22 µm over ±10 µm, quantised to 1 µm; the
  PSF changes by about 1.8 % per µm of pz, so the quantisation costs < 1 %), and defocus is
  counted from *its own* best focus. The training simulator uses one depth, 5 µm, for all
  sources. Defocus follows `engine.optics`: PSF index ``d = z_focus - z_object`` (positive
  when the focal plane is deeper than the point), 0 = brightest on-axis peak, every plane
  normalised to unit sum.
* **Image formation.** Objects are rendered one by one: a point is split between the two
  0.5 µm depth-lattice slices around it and placed with bilinear weights in real space; a
  filled sphere is voxelised exactly (the chord of the sphere through each 0.5 µm slab,
  averaged over 4x4 sub-pixels) and convolved with each slice's depth-specific PSF on its own
  small FFT canvas. No grid-wide z-convolution, no shared PSF transform cache.
* **Samples.** "spheres": 10-40 filled spheres of 1-5 µm diameter, brightness over a 10x
  range; "beads": 20-80 sub-resolution points per 256² frame at uniform depth in ±10 µm,
  brightness over 5x (log-uniform); "tilted": beads on a tilted plane with 6-14 µm of depth
  excursion across the frame; "ganglion": a worm's head lying in the frame, a dim body
  autofluorescence (a tube 14-20 µm thick, in any direction, its axis tilted in depth) with
  40-90 spherical nuclei of 1.5-4 µm clustered in 2-4 ganglia along it (the crowded neurons of
  live C. elegans imaging). The training set has worms with 2-3 µm ellipsoidal nuclei spread
  evenly through a tube 22-28 µm thick along x at z = 0, 30-60 beads with 3x brightness
  spread, and no tilted layers.
* **Camera and background.** Poisson shot noise plus Gaussian read noise (2.0 e⁻) at gain
  0.8 counts/e⁻ and offset 400 counts, a per-pixel offset pattern, and a weak smooth
  non-uniform background (8-16 e⁻ with a gradient and a broad blob), unlike the training
  camera (gain 2, offset 100, read noise 1.5 e⁻, QE 0.7, uniform background of 30 photons).

Coordinates follow `engine.optics`: x along columns and y along rows (µm) from the centre of
the top-left pixel, z along the optical axis (+ deeper). Each sample holds one camera frame at
focus 0 and the noise-free wide-field planes at focus -10 ... +10 µm (0.5 µm steps), the
"truth" a refocused plane is compared with. With `IndependentOptics(pinhole_au=...)` the same
objects are imaged confocally instead (vectorial excitation × detection through a finite
pinhole): the cross-modality truth, made unlike the simulator's scalar point-pinhole one.

The read-outs take a refocusing *function*, not a model (`PlanesFn`, `SurfaceFn`), so a
network, the unrefocused input (`input_planes_fn`) or the noise-free truth itself
(`truth_planes_fn`, a check that the read-outs are right) go through the same code. The
classical matched-filter depth read-out (`matched_filter_depth`) is the bar a network has to
clear. numpy / scipy / psfmodels only (the training simulator's PSF is imported lazily, for
the matched filter's default PSF bank).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import psfmodels
import scipy.fft
from scipy import ndimage, optimize

from engine.metrics import gaussian_fwhm_2d, pearson, psnr, ssim

if TYPE_CHECKING:
    from engine.optics import Lateral

__all__ = [
    "CROWDED_MIN_GAP_UM",
    "DISTANCE_BINS_UM",
    "RANGES_UM",
    "SNR_BINS",
    "BeadDepths",
    "BeadFwhm",
    "BeadSlide",
    "HeldoutCamera",
    "HeldoutObjects",
    "IndependentOptics",
    "IndependentSample",
    "PlanesFn",
    "PsfModel",
    "SampleKind",
    "SurfaceFn",
    "TiltedFocus",
    "TiltedPlane",
    "background_planes_fn",
    "background_surface_fn",
    "bead_depth_errors",
    "bead_depths",
    "bead_fwhm",
    "bead_fwhm_ratios",
    "bead_grid_positions",
    "bead_sites",
    "bead_slide",
    "bead_snr",
    "by_distance",
    "by_snr",
    "independent_sample",
    "input_planes_fn",
    "input_surface_fn",
    "matched_filter_bead_depths",
    "matched_filter_depth",
    "nucleus_depths",
    "own_psf_bead_depths",
    "paired_hits",
    "pinhole_disc",
    "plane_metrics",
    "point_density",
    "point_images",
    "refocus_fns",
    "render_objects",
    "scored_nuclei",
    "sign_test",
    "sphere_image",
    "sphere_signal_e",
    "summarise",
    "summarise_ratios",
    "surface_from_planes",
    "tilted_in_focus",
    "tilted_in_focus_fraction",
    "truth_dz_um",
    "truth_planes_fn",
    "wilson_interval",
    "within_range",
]

PlanesFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(frame (H, W) uint16, dz_um (P,) float) -> (P, H, W) float32 refocused planes in counts."""
SurfaceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(frame (H, W) uint16, dpm (H, W) µm) -> (H, W) float32 image refocused onto the DPM."""
SampleKind = Literal["spheres", "beads", "tilted", "ganglion"]

SLICE_UM = 0.5
"""Axial sampling of the objects and of the PSF defocus lattice (µm)."""
PSF_SIZE_PX = 127
"""Side of the PSF planes (px): 19 µm of radius holds a point's light to 15 µm of defocus, 91-95 %
of it at 20 µm (each plane is normalised to sum 1)."""
MARGIN_PX = 32
"""Objects are drawn this far outside the frame too, so light from outside blurs in."""
FOCUS_HALF_RANGE_UM = 10.0
"""The truth planes span ±10 µm around the frame's focus."""
_KIND_CODE: dict[str, int] = {"spheres": 1, "beads": 2, "tilted": 3, "ganglion": 4}
_REFERENCE_AREA_PX = 256 * 256
"""Object counts are given per 256² frame and scale with the frame's area."""


def truth_dz_um() -> np.ndarray:
    """Focus positions of a sample's truth planes: -10 ... +10 µm in 0.5 µm steps (41)."""
    n = round(FOCUS_HALF_RANGE_UM / SLICE_UM)
    out: np.ndarray = np.round(np.arange(-n, n + 1) * SLICE_UM, 6)
    return out


# ---------------------------------------------------------------------------------------------
# Optics: vectorial PSF with depth-dependent aberration


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
    q = _PUPIL_OVERSAMPLE if subpixel else 1
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


_PUPIL_OVERSAMPLE = 3
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
    q = _PUPIL_OVERSAMPLE
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
    freq = np.fft.fftfreq(n, d=optics.pixel_size_um / _PUPIL_OVERSAMPLE)  # cycles per µm
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


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class HeldoutCamera:
    """Camera and background of the held-out set (deliberately unlike `CameraConfig`)."""

    gain_counts_per_e: float = 0.8
    offset_counts: float = 400.0
    read_noise_e: float = 2.0
    offset_pattern_counts: float = 1.0
    """RMS of the fixed per-pixel offset pattern (in the frame, not in the truth)."""
    background_e: tuple[float, float] = (8.0, 16.0)
    """Range of the mean diffuse background (e⁻ per pixel)."""


@dataclass(frozen=True, eq=False)
class HeldoutObjects:
    """Ground truth objects: one row per object, in `engine.optics` sample coordinates.

    Attributes
    ----------
    x_um, y_um, z_um : (N,) centre positions (µm); z relative to the frame's focus, + deeper.
    radius_um : (N,) sphere radius (0 for sub-resolution beads).
    intensity : (N,) integrated signal of the object in one plane (camera counts above the
        background), i.e. what the object adds to an in-focus plane summed over all pixels.
    kind : (N,) ``"bead"``, ``"sphere"`` (a nucleus) or ``"body"`` (a ganglion sample's dim
        autofluorescent body, drawn as overlapping filled spheres; never scored).
    """

    x_um: np.ndarray
    y_um: np.ndarray
    z_um: np.ndarray
    radius_um: np.ndarray
    intensity: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return int(self.x_um.shape[0])


@dataclass(frozen=True)
class TiltedPlane:
    """The bead plane of a "tilted" sample: ``z = z0 + gx·(x - xc) + gy·(y - yc)``, clipped.

    `z0_um` is the depth at the frame centre (xc, yc); `gx`, `gy` are slopes (µm of depth per
    µm); depths are clipped to ±`clip_um`.
    """

    z0_um: float
    gx: float
    gy: float
    xc_um: float
    yc_um: float
    clip_um: float = FOCUS_HALF_RANGE_UM

    def depth_um(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Depth (µm, relative to focus 0) of the plane at sample positions (x, y)."""
        z = self.z0_um + self.gx * (np.asarray(x_um) - self.xc_um)
        z = z + self.gy * (np.asarray(y_um) - self.yc_um)
        out: np.ndarray = np.clip(z, -self.clip_um, self.clip_um)
        return out

    def dpm(self, shape: tuple[int, int], pixel_size_um: float) -> np.ndarray:
        """Return the plane as a DPM (H, W) float32 in µm relative to the frame's focus."""
        y = np.arange(shape[0], dtype=np.float64)[:, None] * pixel_size_um
        x = np.arange(shape[1], dtype=np.float64)[None, :] * pixel_size_um
        out: np.ndarray = self.depth_um(x, y).astype(np.float32)
        return out


@dataclass(frozen=True, eq=False)
class IndependentSample:
    """One held-out sample: a camera frame at focus 0 with its noise-free truth.

    Attributes
    ----------
    kind, seed : what was drawn, and with which seed (same seed, same sample).
    frame : (H, W) uint16 camera frame at focus 0, with noise.
    planes : (41, H, W) float32 noise-free planes at `dz_um` (wide-field, or confocal with a
        pinhole), in the frame's counts
        (offset and background included, no noise): what a perfect refocus returns.
    dz_um : (41,) focus positions of `planes` relative to the frame's focus (µm, + deeper).
    objects : ground-truth objects.
    pixel_size_um : pixel size at the sample (µm).
    background : (H, W) float32 noise-free offset + diffuse background (counts).
    noise_sigma : RMS camera noise at the background level (counts).
    tilt : the bead plane of a "tilted" sample, else None.
    dpm_um : (H, W) float32 DPM of the tilted plane relative to focus 0, else None.
    in_focus : (H, W) float32 all-in-focus truth of a "tilted" sample (the truth planes
        interpolated per pixel at `dpm_um`: each bead at its own depth), else None.
    """

    kind: str
    seed: int
    frame: np.ndarray
    planes: np.ndarray
    dz_um: np.ndarray
    objects: HeldoutObjects
    pixel_size_um: float
    background: np.ndarray
    noise_sigma: float
    tilt: TiltedPlane | None = None
    dpm_um: np.ndarray | None = None
    in_focus: np.ndarray | None = None


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """Draw n values spread log-uniformly between lo and hi."""
    out: np.ndarray = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    return out


def _count(rng: np.random.Generator, lo: int, hi: int, shape: tuple[int, int]) -> int:
    """Objects to draw in the frame plus margin, for `lo`-`hi` per 256² frame."""
    h, w = shape
    per_frame = int(rng.integers(lo, hi + 1)) * h * w / _REFERENCE_AREA_PX
    return round(per_frame * (h + 2 * MARGIN_PX) * (w + 2 * MARGIN_PX) / (h * w))


def _xy(rng: np.random.Generator, n: int, shape: tuple[int, int], px: float) -> np.ndarray:
    """(n, 2) uniform (x, y) positions (µm) over the frame plus margin."""
    h, w = shape
    x = rng.uniform(-MARGIN_PX, w - 1 + MARGIN_PX, n) * px
    y = rng.uniform(-MARGIN_PX, h - 1 + MARGIN_PX, n) * px
    return np.stack([x, y], axis=1)


def _draw_beads(
    rng: np.random.Generator, shape: tuple[int, int], px: float
) -> tuple[np.ndarray, np.ndarray]:
    """20-80 beads per 256² frame: (n, 3) positions, (n,) signal in e⁻ (5x range)."""
    n = _count(rng, 20, 80, shape)
    xy = _xy(rng, n, shape, px)
    z = rng.uniform(-FOCUS_HALF_RANGE_UM, FOCUS_HALF_RANGE_UM, n)
    return np.column_stack([xy, z]), _log_uniform(rng, 700.0, 3500.0, n)


def _clear_of(c: np.ndarray, r: float, centres: list[np.ndarray], radii: list[float]) -> bool:
    """Whether a sphere at `c` of radius `r` keeps 0.3 µm from every sphere drawn so far."""
    return all(np.linalg.norm(c - p) > r + q + 0.3 for p, q in zip(centres, radii, strict=True))


def sphere_signal_e(column_e: np.ndarray, radius_um: float | np.ndarray, px: float) -> np.ndarray:
    """Return the total signal (e⁻) of filled spheres from their centre column's.

    A sphere whose pixel column through the centre holds `column_e` sends
    ``column · (2/3)·π·r² / px²`` in all.
    """
    out: np.ndarray = column_e * (2.0 / 3.0) * np.pi * radius_um**2 / px**2
    return out


def _draw_spheres(
    rng: np.random.Generator, shape: tuple[int, int], px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10-40 non-overlapping filled spheres per 256² frame, 1-5 µm across, 10x brightness.

    Returns (n, 3) centres, (n,) radii and (n,) signal in e⁻. The brightness is set as the
    signal of the pixel column through the centre (80-800 e⁻, log-uniform), so the total is
    ``column · (2/3)·π·r² / px²``.
    """
    n = _count(rng, 10, 40, shape)
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(50 * n):
        if len(centres) == n:
            break
        r = float(rng.uniform(0.5, 2.5))
        c = np.append(_xy(rng, 1, shape, px)[0], rng.uniform(-10.0, 10.0))
        if _clear_of(c, r, centres, radii):
            centres.append(c)
            radii.append(r)
    xyz = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    rad = np.asarray(radii, dtype=np.float64)
    return xyz, rad, sphere_signal_e(_log_uniform(rng, 80.0, 800.0, rad.size), rad, px)


def _draw_tilted(
    rng: np.random.Generator, shape: tuple[int, int], px: float
) -> tuple[np.ndarray, np.ndarray, TiltedPlane]:
    """30-80 beads per 256² frame on a plane with 6-14 µm of depth excursion over the frame."""
    h, w = shape
    excursion = rng.uniform(6.0, 14.0)
    theta = rng.uniform(0.0, 2 * np.pi)
    ux, uy = np.cos(theta), np.sin(theta)
    slope = excursion / (abs(ux) * (w - 1) * px + abs(uy) * (h - 1) * px)
    plane = TiltedPlane(
        z0_um=float(rng.uniform(-3.0, 3.0)),
        gx=float(slope * ux),
        gy=float(slope * uy),
        xc_um=(w - 1) * px / 2,
        yc_um=(h - 1) * px / 2,
    )
    n = _count(rng, 30, 80, shape)
    xy = _xy(rng, n, shape, px)
    z = plane.depth_um(xy[:, 0], xy[:, 1])
    return np.column_stack([xy, z]), _log_uniform(rng, 700.0, 3500.0, n), plane


def _draw_ganglion(
    rng: np.random.Generator, shape: tuple[int, int], px: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw a worm's head: a dim body tube, 40-90 nuclei per 256² frame in ganglia.

    The body's axis crosses the frame near its centre in a random direction, its depth
    tilting by up to ±2 µm over the frame (around a centre depth of ±3 µm); its radius is
    7-10 µm and its autofluorescence is drawn as filled spheres of that radius every 0.75
    radius along the axis (centre column 30-80 e⁻ each, so 40-110 e⁻ where they overlap).
    Nuclei (radius 0.75-2 µm, centre column 120-720 e⁻, log-uniform) sit inside the tube around
    2-4 ganglion centres along the axis (Gaussian spread 4-7 µm along it, anywhere across it),
    at least 0.3 µm apart surface to surface, within ±9.5 µm of focus.

    Returns (n, 3) centres, (n,) radii, (n,) signal in e⁻ and (n,) flags of the body spheres.
    """
    h, w = shape
    centre = np.array([(w - 1) * px / 2, (h - 1) * px / 2]) + rng.uniform(-0.1, 0.1, 2) * (
        np.array([w, h]) * px
    )
    theta = rng.uniform(0.0, np.pi)
    u = np.array([np.cos(theta), np.sin(theta)])
    half_len = 0.5 * math.hypot(w, h) * px + MARGIN_PX * px
    z_mid = rng.uniform(-3.0, 3.0)
    slope = rng.uniform(-2.0, 2.0) / (0.5 * math.hypot(w, h) * px)  # µm of depth per µm

    def on_axis(t: np.ndarray) -> np.ndarray:
        """(len(t), 3) points of the axis at distances t (µm) from the centre."""
        xy = centre[None, :] + t[:, None] * u[None, :]
        return np.column_stack([xy, z_mid + slope * t])

    tube = rng.uniform(7.0, 10.0)
    steps = np.arange(-half_len, half_len + 1e-9, 0.75 * tube)
    body_xyz = on_axis(steps)
    body_column = rng.uniform(30.0, 80.0, steps.size)
    body_e = sphere_signal_e(body_column, tube, px)

    # the axis direction and the two across it (one in the frame's plane, one along z, tilted)
    along = np.array([u[0], u[1], slope]) / math.sqrt(1.0 + slope**2)
    side = np.array([-u[1], u[0], 0.0])
    up = np.cross(along, side)
    ganglia = rng.uniform(-0.8, 0.8, int(rng.integers(2, 5))) * (half_len - MARGIN_PX * px)
    spread = rng.uniform(4.0, 7.0, ganglia.size)
    n = _count(rng, 40, 90, shape)
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(100 * n):
        if len(centres) == n:
            break
        r = float(rng.uniform(0.75, 2.0))
        g = int(rng.integers(ganglia.size))
        t = ganglia[g] + rng.normal(0.0, spread[g])
        a, b = rng.uniform(-1.0, 1.0, 2)
        reach = tube - r - 0.5  # the nucleus stays inside the tube
        if a * a + b * b > 1.0 or reach <= 0:
            continue
        c = on_axis(np.array([t]))[0] + reach * (a * side + b * up)
        if abs(c[2]) > FOCUS_HALF_RANGE_UM - 0.5:
            continue
        if _clear_of(c, r, centres, radii):
            centres.append(c)
            radii.append(r)
    xyz = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    rad = np.asarray(radii, dtype=np.float64)
    nucleus_e = sphere_signal_e(_log_uniform(rng, 120.0, 720.0, rad.size), rad, px)
    body = np.r_[np.ones(steps.size, dtype=bool), np.zeros(rad.size, dtype=bool)]
    return (
        np.vstack([body_xyz, xyz]),
        np.r_[np.full(steps.size, tube), rad],
        np.r_[body_e, nucleus_e],
        body,
    )


def _background_e(
    rng: np.random.Generator, shape: tuple[int, int], camera: HeldoutCamera
) -> np.ndarray:
    """Weak smooth non-uniform diffuse background (e⁻ per pixel): gradient plus a broad blob."""
    h, w = shape
    level = rng.uniform(*camera.background_e)
    yy = (np.arange(h)[:, None] - (h - 1) / 2) / max(h, w)
    xx = (np.arange(w)[None, :] - (w - 1) / 2) / max(h, w)
    gy, gx = rng.uniform(-0.2, 0.2, 2)
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    sigma = rng.uniform(0.3, 0.6)
    blob = rng.uniform(0.0, 0.3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    out: np.ndarray = (level * (1.0 + gx * xx + gy * yy + blob)).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Image formation: each object on its own


class PsfModel(Protocol):
    """What imaging objects needs of optics.

    `IndependentOptics`, or another model a fit believes in (`engine.oracle_fit` images
    spheres through the training simulator's PSF).
    """

    @property
    def pixel_size_um(self) -> float:
        """Pixel size at the sample (µm)."""
        ...

    @property
    def aberration_step_um(self) -> float:
        """Depth step (µm) between the aberration bins sources are imaged with."""
        ...

    def aberration_bin(self, z_um: float) -> int:
        """Index of the aberration depth bin a source at depth `z_um` falls in."""
        ...

    def psf(
        self, defocus_um: np.ndarray, source_z_um: float = 0.0, size_px: int = PSF_SIZE_PX
    ) -> np.ndarray:
        """PSF (Q, size, size) of a source at `source_z_um`, ``defocus = focus - object``."""
        ...


class _PsfLattice:
    """Depth-aberrated PSFs on the 0.5 µm slice lattice for the truth focus positions.

    For aberration bin b (sources at ``z ∈ [b - 1/2, b + 1/2)·step``), one cached PSF bank
    covers every defocus ``focus - z_slice`` that bin's slices need.
    """

    def __init__(self, optics: PsfModel, focus_um: np.ndarray, psf_px: int = PSF_SIZE_PX) -> None:
        self.optics = optics
        self.focus_um = np.asarray(focus_um, dtype=np.float64)
        self.psf_px = psf_px
        self.subpixel = isinstance(optics, IndependentOptics) and optics.point_render == "subpixel"
        self._banks: dict[tuple[int, bool], tuple[float, np.ndarray]] = {}
        self._otfs: dict[tuple[int, int], np.ndarray] = {}

    def _bank(self, b: int, subpixel: bool = False) -> tuple[float, np.ndarray]:
        """(first defocus, PSF planes on the 0.5 µm lattice) for aberration bin b."""
        if (b, subpixel) not in self._banks:
            q = self.optics.aberration_step_um
            zc = b * q
            d0 = math.floor((self.focus_um.min() - zc - q / 2) / SLICE_UM) * SLICE_UM
            d1 = math.ceil((self.focus_um.max() - zc + q / 2) / SLICE_UM) * SLICE_UM
            n = round((d1 - d0) / SLICE_UM) + 1
            defocus = np.round(d0 + SLICE_UM * np.arange(n), 6)
            if subpixel:
                assert isinstance(self.optics, IndependentOptics)  # self.subpixel says so
                bank = self.optics.psf_subpixel(defocus, zc, self.psf_px)
            else:
                bank = self.optics.psf(defocus, zc, self.psf_px)
            self._banks[(b, subpixel)] = (d0, bank)
        return self._banks[(b, subpixel)]

    def _index(self, z_slice: float) -> tuple[int, np.ndarray]:
        """(bin, bank index of every focus position) for a slice at depth `z_slice`."""
        b = self.optics.aberration_bin(z_slice)
        d0, _ = self._bank(b)
        idx = np.round((self.focus_um - z_slice - d0) / SLICE_UM).astype(np.int64)
        return b, idx

    def planes(self, z_slice: float, subpixel: bool = False) -> np.ndarray:
        """PSF (F, S, S) seen at every focus position from a source slice at `z_slice`.

        `subpixel`: (F, 3S, 3S) at a third of a pixel (`IndependentOptics.psf_subpixel`).
        """
        b, idx = self._index(z_slice)
        out: np.ndarray = self._bank(b, subpixel)[1][idx]
        return out

    def otf(self, z_slice: float, canvas: int) -> np.ndarray:
        """rfft2 (F, C, C//2+1) of `planes(z_slice)` centred at the origin of a C² canvas."""
        b, idx = self._index(z_slice)
        if (b, canvas) not in self._otfs:
            psf = self._bank(b)[1]
            s = psf.shape[-1]
            emb = np.zeros((psf.shape[0], canvas, canvas), dtype=np.float32)
            emb[:, :s, :s] = psf
            emb = np.roll(emb, (-(s // 2), -(s // 2)), axis=(1, 2))
            self._otfs[(b, canvas)] = scipy.fft.rfft2(emb, workers=2).astype(np.complex64)
        out: np.ndarray = self._otfs[(b, canvas)][idx]
        return out


def _add_clipped(out: np.ndarray, patch: np.ndarray, row0: int, col0: int) -> None:
    """Add a (F, h, w) patch into (F, H, W) `out` with its top-left at (row0, col0), clipped."""
    _, hh, ww = out.shape
    _, ph, pw = patch.shape
    r0, c0 = max(row0, 0), max(col0, 0)
    r1, c1 = min(row0 + ph, hh), min(col0 + pw, ww)
    if r0 < r1 and c0 < c1:
        out[:, r0:r1, c0:c1] += patch[:, r0 - row0 : r1 - row0, c0 - col0 : c1 - col0]


def _render_point(
    out: np.ndarray, lattice: _PsfLattice, xyz_px: tuple[float, float, float], signal_e: float
) -> None:
    """Image a point source: linear between its two depth slices, bilinear in x and y.

    With `IndependentOptics.point_render` "subpixel" the point is placed to a third of a pixel
    on the finer PSF and each pixel sums the light on its area (`_render_point_subpixel`).
    """
    col, row, z = xyz_px
    _place_point(out, lattice.subpixel, _point_kernel(lattice, z), row, col, signal_e)


def _point_kernel(lattice: _PsfLattice, z: float) -> np.ndarray:
    """Return the PSF (F, S, S) of a point at depth `z`: linear between its two depth slices."""
    z0 = math.floor(z / SLICE_UM) * SLICE_UM
    w1 = (z - z0) / SLICE_UM
    kernel = lattice.planes(z0, lattice.subpixel) * np.float32(1.0 - w1)
    if w1 > 1e-9:
        kernel += lattice.planes(z0 + SLICE_UM, lattice.subpixel) * np.float32(w1)
    return kernel


def _place_point(
    out: np.ndarray, subpixel: bool, kernel: np.ndarray, row: float, col: float, signal_e: float
) -> None:
    """Add `kernel` (F, S, S), or (F, 3S, 3S) if `subpixel`, centred at (row, col) px to `out`."""
    if subpixel:
        _render_point_subpixel(out, kernel, row, col, signal_e)
        return
    r0, c0 = math.floor(row), math.floor(col)
    fy, fx = row - r0, col - c0
    f, s, _ = kernel.shape
    patch = np.zeros((f, s + 1, s + 1), dtype=np.float32)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            if wy * wx > 0:
                patch[:, dy : dy + s, dx : dx + s] += kernel * np.float32(wy * wx * signal_e)
    _add_clipped(out, patch, r0 - s // 2, c0 - s // 2)


def _render_point_subpixel(
    out: np.ndarray, fine: np.ndarray, row: float, col: float, signal_e: float
) -> None:
    """Add a point at (row, col) px imaged through `fine` (F, 3S, 3S), the PSF at px / 3.

    Pixel r spans thirds 3r - 1 … 3r + 1, so the point goes to third u = round(3 · row) of
    pixel (u + 1) // 3 at phase u - 3 · pixel ∈ {-1, 0, 1}; the PSF is moved by that phase
    (zero-filled at the edge, where it is dark) and by what is left, under half a third, with
    a Fourier shift: at a third of a pixel (0.1 µm) the PSF is sampled past its Nyquist rate
    (2 NA / λ), so the shift is exact. Then each pixel sums its 3 × 3 thirds.
    """
    q = _PUPIL_OVERSAMPLE
    f, side, _ = fine.shape
    s = side // q
    u, v = round(q * row), round(q * col)
    r, c = (u + 1) // q, (v + 1) // q
    py, px = u - q * r, v - q * c
    fine = _fourier_shift(fine, q * row - u, q * col - v)
    moved = np.zeros((f, side + 2, side + 2), dtype=np.float32)
    moved[:, 1 + py : 1 + py + side, 1 + px : 1 + px + side] = fine
    patch = moved[:, 1 : 1 + side, 1 : 1 + side].reshape(f, s, q, s, q).sum(axis=(2, 4))
    _add_clipped(out, patch * np.float32(signal_e), r - s // 2, c - s // 2)


def _fourier_shift(planes: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Move each of `planes` (F, H, W) by (dy, dx) samples (a linear phase; light kept)."""
    if abs(dy) < 1e-6 and abs(dx) < 1e-6:
        return planes
    h, w = planes.shape[-2:]
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    spectrum = scipy.fft.rfft2(planes)
    spectrum *= np.exp(-2j * np.pi * (ky * dy + kx * dx))
    moved: np.ndarray = scipy.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    return moved


_SUB = (np.arange(4) + 0.5) / 4 - 0.5
"""4x4 sub-pixel sample offsets for voxelising spheres."""


def _sphere_slices(
    row: float, col: float, z: float, r_px: float, r_um: float, px: float
) -> tuple[int, int, list[tuple[float, np.ndarray]]]:
    """Exact voxelisation of a filled sphere: (r0, c0, [(slice depth, (K, K) weight)]).

    Each slice is a 0.5 µm slab; a pixel's weight is the length of the sphere's chord inside
    the slab, averaged over 4x4 sub-pixel positions. The patch is centred on pixel (r0, c0).
    """
    r0, c0 = round(row), round(col)
    half = math.ceil(r_px) + 1
    k = np.arange(-half, half + 1, dtype=np.float64)
    dy = (k[:, None] + _SUB[None, :]).reshape(-1) - (row - r0)
    dx = (k[:, None] + _SUB[None, :]).reshape(-1) - (col - c0)
    rho2 = (dy[:, None] ** 2 + dx[None, :] ** 2) * px**2
    chord = np.sqrt(np.maximum(r_um**2 - rho2, 0.0))
    top, bottom = z - chord, z + chord
    first = math.ceil((z - r_um - SLICE_UM / 2) / SLICE_UM)
    last = math.floor((z + r_um + SLICE_UM / 2) / SLICE_UM)
    kk = k.size
    slices: list[tuple[float, np.ndarray]] = []
    for j in range(first, last + 1):
        zs = j * SLICE_UM
        inside = np.minimum(bottom, zs + SLICE_UM / 2) - np.maximum(top, zs - SLICE_UM / 2)
        w = np.clip(inside, 0.0, None).reshape(kk, 4, kk, 4).mean(axis=(1, 3))
        if w.sum() > 0:
            slices.append((round(zs, 6), w))
    return r0, c0, slices


def _render_sphere(
    out: np.ndarray,
    lattice: _PsfLattice,
    xyz_px: tuple[float, float, float],
    r_um: float,
    signal_e: float,
    px: float,
) -> None:
    """Image a filled sphere: each slab ⊛ its own depth's PSF, summed on a small FFT canvas."""
    col, row, z = xyz_px
    r0, c0, slices = _sphere_slices(row, col, z, r_um / px, r_um, px)
    if not slices:
        return
    total = sum(float(w.sum()) for _, w in slices)
    kk = slices[0][1].shape[0]
    s = PSF_SIZE_PX
    canvas = scipy.fft.next_fast_len(s + kk - 1, real=True)
    acc: np.ndarray | None = None
    for zs, w in slices:
        pad = np.zeros((canvas, canvas), dtype=np.float32)
        pad[s // 2 : s // 2 + kk, s // 2 : s // 2 + kk] = w * (signal_e / total)
        term = lattice.otf(zs, canvas) * scipy.fft.rfft2(pad, workers=2)[None]
        acc = term if acc is None else acc + term
    assert acc is not None
    img = scipy.fft.irfft2(acc, s=(canvas, canvas), workers=2).astype(np.float32)
    # canvas pixel u shows patch row u - s//2; patch row i is frame row r0 - kk//2 + i
    _add_clipped(out, img, r0 - kk // 2 - s // 2, c0 - kk // 2 - s // 2)


def render_objects(
    xyz_um: np.ndarray,
    radius_um: np.ndarray,
    signal_e: np.ndarray,
    shape: tuple[int, int],
    optics: PsfModel,
    focus_um: np.ndarray,
) -> np.ndarray:
    """Noise-free signal (F, H, W) float32 in e⁻ of objects at each focus position.

    The one home for how the hold-out images its objects: a point source (radius 0) through
    its depth's PSF, a filled sphere as 0.5 µm slabs, each through its own depth's PSF.
    Positions (x, y, z) in µm, x along columns from pixel 0's centre, z deeper; `signal_e` is
    each object's total signal.
    """
    out = np.zeros((focus_um.size, *shape), dtype=np.float32)
    lattice = _PsfLattice(optics, focus_um)
    px = optics.pixel_size_um
    for (x, y, z), r, e in zip(xyz_um, radius_um, signal_e, strict=True):
        pos = (float(x) / px, float(y) / px, float(z))
        if r > 0:
            _render_sphere(out, lattice, pos, float(r), float(e), px)
        else:
            _render_point(out, lattice, pos, float(e))
    return out


def sphere_image(
    optics: PsfModel,
    radius_um: float,
    z_um: float,
    size_px: int = PSF_SIZE_PX,
    offset_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Noise-free image (size, size) float32 at focus 0 of one filled sphere of total signal 1.

    The sphere's centre sits at depth `z_um` under the centre pixel, moved by `offset_px`
    (x, y; a fraction of a pixel, say), and is drawn as every
    hold-out frame draws its spheres (0.5 µm slabs, each through its own depth's PSF), so
    `engine.depth_bound` bounds a nucleus with the very images the hold-out scores. Light that
    falls off the crop is lost, as it would be off a camera.
    """
    if radius_um <= 0 or size_px < 3 or size_px % 2 == 0:
        raise ValueError(f"need radius_um > 0 and an odd size_px >= 3, got {radius_um}, {size_px}")
    c = (size_px - 1) / 2
    x, y = ((c + float(o)) * optics.pixel_size_um for o in offset_px)
    out = render_objects(
        np.array([[x, y, float(z_um)]]),
        np.array([float(radius_um)]),
        np.array([1.0]),
        (size_px, size_px),
        optics,
        np.array([0.0]),
    )
    image: np.ndarray = out[0]
    return image


def point_images(
    optics: IndependentOptics,
    z_um: Sequence[float] | np.ndarray,
    size_px: int = PSF_SIZE_PX,
    offset_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Noise-free images (Q, size, size) float32 at focus 0 of a bead of signal 1 at `z_um`.

    One image per depth, as every hold-out frame images its beads (`render_objects`' point
    sources): through that depth's aberrated PSF, cropped to `size_px`, under the centre pixel
    moved by `offset_px` (x, y), split between pixels or imaged as a camera images it as the set's
    `point_render` says. What an ideal detector told a bead's position correlates the frame
    with (`bead_snr`, `own_psf_bead_depths`): at a pixel corner a camera-like bead is dimmer
    and wider in focus than the pixel-centred PSF. The depths share one placement (one Fourier
    shift on camera-like sets).
    """
    if size_px < 3 or size_px % 2 == 0:
        raise ValueError(f"need an odd size_px >= 3, got {size_px}")
    lattice = _focus_lattice(optics, size_px)
    kernels = np.concatenate([_point_kernel(lattice, float(z)) for z in np.ravel(z_um)])
    out = np.zeros((kernels.shape[0], size_px, size_px), dtype=np.float32)
    c = size_px // 2
    _place_point(out, lattice.subpixel, kernels, c + offset_px[1], c + offset_px[0], 1.0)
    return out


@functools.lru_cache(maxsize=4)
def _focus_lattice(optics: IndependentOptics, size_px: int) -> _PsfLattice:
    """Return a `_PsfLattice` at focus 0, kept per optics and crop (it holds the PSF banks).

    `point_images` asks one bank per aberration bin (about 20 over ±10 µm); the PSF functions'
    own caches hold fewer than that, so a lattice per call would compute them again per bead.
    """
    return _PsfLattice(optics, np.zeros(1), psf_px=size_px)


def _interp_planes(planes: np.ndarray, dz_um: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Per-pixel linear interpolation of a (P, H, W) stack at depths (H, W) on grid `dz_um`."""
    step = float(dz_um[1] - dz_um[0])
    pos = np.clip((np.asarray(depth, dtype=np.float64) - dz_um[0]) / step, 0, dz_um.size - 1)
    i0 = np.minimum(np.floor(pos).astype(np.int64), dz_um.size - 2)
    frac = (pos - i0).astype(np.float32)
    rows, cols = np.indices(depth.shape)
    out: np.ndarray = planes[i0, rows, cols] * (1 - frac) + planes[i0 + 1, rows, cols] * frac
    return out


def independent_sample(
    kind: SampleKind,
    seed: int,
    shape: tuple[int, int] = (256, 256),
    *,
    optics: IndependentOptics | None = None,
    camera: HeldoutCamera | None = None,
) -> IndependentSample:
    """Draw and image one held-out sample of `kind`; the same seed gives the same sample.

    Parameters
    ----------
    kind : "spheres", "beads", "tilted" or "ganglion" (the module docstring has the
        statistics of each).
    seed : random seed; each kind has its own stream.
    shape : (H, W) of the frame; object counts scale with its area (given per 256²).
    optics, camera : override the held-out optics or camera.

    Returns
    -------
    IndependentSample
        The noisy frame at focus 0, the 41 noise-free truth planes and the object table.
    """
    if kind not in _KIND_CODE:
        raise ValueError(f"kind must be 'spheres', 'beads', 'tilted' or 'ganglion', not {kind!r}")
    if len(shape) != 2 or min(shape) < 32:
        raise ValueError(f"shape must be (H, W) with sides >= 32, got {shape!r}")
    shape = (int(shape[0]), int(shape[1]))
    optics = optics or IndependentOptics()
    camera = camera or HeldoutCamera()
    px = optics.pixel_size_um
    rng = np.random.default_rng((0x5EED, _KIND_CODE[kind], int(seed)))
    tilt: TiltedPlane | None = None
    body = None
    if kind == "spheres":
        xyz, radius, signal_e = _draw_spheres(rng, shape, px)
    elif kind == "ganglion":
        xyz, radius, signal_e, body = _draw_ganglion(rng, shape, px)
    elif kind == "beads":
        xyz, signal_e = _draw_beads(rng, shape, px)
        radius = np.zeros(len(signal_e))
    else:
        xyz, signal_e, tilt = _draw_tilted(rng, shape, px)
        radius = np.zeros(len(signal_e))
    dz = truth_dz_um()
    photo_e = render_objects(xyz, radius, signal_e, shape, optics, dz)
    bg_e = _background_e(rng, shape, camera)
    gain = np.float32(camera.gain_counts_per_e)
    offset = np.float32(camera.offset_counts)
    planes = (photo_e + bg_e[None]) * gain + offset
    expected_e = np.maximum(photo_e[int(np.argmin(np.abs(dz)))] + bg_e, 0.0)
    electrons = rng.poisson(expected_e).astype(np.float32)
    electrons += rng.standard_normal(shape, dtype=np.float32) * np.float32(camera.read_noise_e)
    pattern = rng.standard_normal(shape, dtype=np.float32) * np.float32(
        camera.offset_pattern_counts
    )
    counts = electrons * gain + offset + pattern
    frame = np.clip(np.round(counts), 0, 65535).astype(np.uint16)
    noise_sigma = float(
        np.sqrt(
            (float(np.median(bg_e)) + camera.read_noise_e**2) * camera.gain_counts_per_e**2
            + camera.offset_pattern_counts**2
        )
    )
    objects = HeldoutObjects(
        x_um=xyz[:, 0].copy(),
        y_um=xyz[:, 1].copy(),
        z_um=xyz[:, 2].copy(),
        radius_um=np.asarray(radius, dtype=np.float64),
        intensity=np.asarray(signal_e, dtype=np.float64) * camera.gain_counts_per_e,
        kind=np.where(
            body if body is not None else False,
            "body",
            np.where(np.asarray(radius) > 0, "sphere", "bead"),
        ).astype("<U6"),
    )
    dpm = in_focus = None
    if tilt is not None:
        dpm = tilt.dpm(shape, px)
        in_focus = _interp_planes(planes, dz, dpm)
    return IndependentSample(
        kind=kind,
        seed=int(seed),
        frame=frame,
        planes=planes.astype(np.float32, copy=False),
        dz_um=dz,
        objects=objects,
        pixel_size_um=px,
        background=bg_e * gain + offset,
        noise_sigma=noise_sigma,
        tilt=tilt,
        dpm_um=dpm,
        in_focus=in_focus,
    )


@dataclass(frozen=True, eq=False)
class BeadSlide:
    """A focus-scanned stack of one field of a bead slide: what a lab images to measure its PSF.

    Attributes
    ----------
    stack : (F, H, W) uint16 camera frames, one per focus position.
    focus_um : (F,) focus positions (µm, + deeper), uniform steps.
    objects : the beads (x, y, z in µm; z relative to the slide's layer).
    """

    stack: np.ndarray
    focus_um: np.ndarray
    objects: HeldoutObjects


SLIDE_FOCUS_UM = np.round(np.arange(-24.0, 24.0001, SLICE_UM), 6)
"""Focus positions of a bead slide's stack: ±24 µm in 0.5 µm steps, past the ±20 µm of defocus
a ±10 µm volume model renders with by the 2.5 µm `engine.psf_calibration` asks of a scan to
undo the beads' split between depth slices."""


def bead_slide(
    seed: int,
    *,
    optics: IndependentOptics | None = None,
    camera: HeldoutCamera | None = None,
    shape: tuple[int, int] = (320, 320),
    focus_um: np.ndarray = SLIDE_FOCUS_UM,
) -> BeadSlide:
    """Image one field of a calibration slide through the held-out optics, focus-scanned.

    The slide a lab uses to measure its microscope's PSF: sub-resolution beads, bright
    (2-6·10⁴ e⁻ each) and sparse (up to 4 per field, at least 130 px apart and 64 px from the
    edges, so each bead's light to 20 µm of defocus stays its own), in a thin layer (±0.25 µm)
    at the depth of the held-out frames' focal plane (`base_depth_um`), so they see the
    aberration those frames' in-focus sources see. The held-out camera, its background and a
    per-pixel offset pattern fixed over the stack, fresh shot and read noise in every frame.
    Seeds are a stream of their own: no bead of the held-out samples is on a slide.
    """
    optics = optics or IndependentOptics()
    camera = camera or HeldoutCamera()
    if len(shape) != 2 or min(shape) < 2 * 64 + 1:
        raise ValueError(f"shape must be (H, W) with sides > 128 px, got {shape!r}")
    focus = np.asarray(focus_um, dtype=np.float64)
    if focus.ndim != 1 or focus.size < 2 or not np.all(np.diff(focus) > 0):
        raise ValueError("focus_um must be a 1-D increasing array of at least 2 positions")
    h, w = int(shape[0]), int(shape[1])
    px = optics.pixel_size_um
    rng = np.random.default_rng((0x5EED, 0x511DE, int(seed)))
    centres: list[np.ndarray] = []
    for _ in range(200):  # rejection sampling: at most 4 beads, far apart
        c = rng.uniform(64, [w - 1 - 64, h - 1 - 64])
        if all(np.hypot(*(c - o)) >= 130 for o in centres):
            centres.append(c)
        if len(centres) == 4:
            break
    n = len(centres)
    xyz = np.column_stack([np.array(centres) * px, rng.uniform(-0.25, 0.25, n)])
    signal_e = rng.uniform(2e4, 6e4, n)
    photo_e = render_objects(xyz, np.zeros(n), signal_e, (h, w), optics, focus)
    bg_e = _background_e(rng, (h, w), camera)
    pattern = rng.standard_normal((h, w), dtype=np.float32) * np.float32(
        camera.offset_pattern_counts
    )
    gain, offset = np.float32(camera.gain_counts_per_e), np.float32(camera.offset_counts)
    stack = np.empty(photo_e.shape, dtype=np.uint16)
    for k in range(focus.size):  # one plane at a time: a whole float stack is not needed
        electrons = rng.poisson(np.maximum(photo_e[k] + bg_e, 0.0)).astype(np.float32)
        electrons += rng.standard_normal((h, w), dtype=np.float32) * np.float32(camera.read_noise_e)
        stack[k] = np.clip(np.round(electrons * gain + offset + pattern), 0, 65535)
    objects = HeldoutObjects(
        x_um=xyz[:, 0].copy(),
        y_um=xyz[:, 1].copy(),
        z_um=xyz[:, 2].copy(),
        radius_um=np.zeros(n),
        intensity=signal_e * camera.gain_counts_per_e,
        kind=np.full(n, "bead", dtype="<U6"),
    )
    return BeadSlide(stack=stack, focus_um=focus, objects=objects)


# ---------------------------------------------------------------------------------------------
# Refocusing functions: baselines and adapters


def input_planes_fn(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
    """Return the frame itself (float32) for every Δz: the 'unrefocused input' baseline."""
    dz = np.atleast_1d(np.asarray(dz_um))
    img = np.asarray(frame, dtype=np.float32)
    out: np.ndarray = np.repeat(img[None], dz.size, axis=0)
    return out


def input_surface_fn(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
    """Return the frame itself (float32) on any surface: the 'unrefocused input' baseline."""
    out: np.ndarray = np.asarray(frame, dtype=np.float32).copy()
    return out


def background_planes_fn(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
    """Return the frame's smooth background for every Δz: a refocusing with no objects at all.

    The pixel targets' floor: on sparse frames most pixels are background, so this scores a
    median SSIM near 0.98 and beats the input's PSNR at most Δz (review 36); a pixel figure
    says something about refocusing only where it beats this row.
    """
    dz = np.atleast_1d(np.asarray(dz_um))
    out: np.ndarray = np.repeat(background_surface_fn(frame, dz)[None], dz.size, axis=0)
    return out


def background_surface_fn(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
    """Return the frame's smooth background on any surface (`background_planes_fn`)."""
    out: np.ndarray = _smooth_background(np.asarray(frame, dtype=np.float32)).astype(np.float32)
    return out


class _Refocuser(Protocol):
    """What `refocus_fns` needs of a model: `engine.runtime.Backend.infer`."""

    def infer(self, images: np.ndarray, dpms_um: np.ndarray, /) -> np.ndarray: ...


def refocus_fns(backend: _Refocuser) -> tuple[PlanesFn, SurfaceFn]:
    """Return a model's refocusing as the read-outs take it: uniform planes, one DPM surface.

    `backend` is anything with `infer(frame, dpms (N, H, W) µm) -> (N, H, W)`, as every
    `engine.runtime` backend has; one home for how a model is scored, so every report and
    probe scores it the same way.
    """

    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        dz = np.asarray(dz_um, dtype=np.float32)
        dpms = np.broadcast_to(dz[:, None, None], (dz.size, *frame.shape))
        return backend.infer(frame, dpms)

    def surface(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
        out: np.ndarray = backend.infer(frame, np.asarray(dpm_um, dtype=np.float32)[None])[0]
        return out

    return planes, surface


def truth_planes_fn(sample: IndependentSample) -> PlanesFn:
    """Return a 'perfect refocus' for `sample`: its truth planes, linearly interpolated in Δz.

    The check that the read-outs are right: fed to them, it must score (nearly) perfectly.
    """

    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        dz = np.atleast_1d(np.asarray(dz_um, dtype=np.float64))
        h, w = sample.frame.shape
        return np.stack(
            [_interp_planes(sample.planes, sample.dz_um, np.full((h, w), d)) for d in dz]
        )

    return planes


def surface_from_planes(planes_fn: PlanesFn, step_um: float = SLICE_UM) -> SurfaceFn:
    """Turn a `PlanesFn` into a `SurfaceFn`, as a volume model serves any DPM.

    Planes on a `step_um` grid over the DPM's range are interpolated linearly per pixel.
    """

    def surface(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
        dpm = np.asarray(dpm_um, dtype=np.float64)
        lo = math.floor(float(dpm.min()) / step_um) * step_um
        hi = math.ceil(float(dpm.max()) / step_um) * step_um
        z = np.round(np.arange(lo, hi + step_um / 2, step_um), 6)
        if z.size == 1:
            z = np.array([lo, lo + step_um])
        stack = np.asarray(planes_fn(frame, z), dtype=np.float32)
        return _interp_planes(stack, z, dpm)

    return surface


# ---------------------------------------------------------------------------------------------
# Object-level read-outs

DEPTH_BORDER_PX = 8
"""Beads closer than this to the frame's edge are not scored."""
BG_HALF_PX = 10
"""Local background: median of a 21x21 window around the bead, per plane."""
MIN_PEAK_SIGMA = 3.0
"""A bead is found when its 3x3 mean exceeds 3x the 3x3 mean's camera noise (σ/3)."""
FWHM_HALF_PX = 6
"""Gaussian fits use a 13x13 window centred on the bead's true position."""
MIN_SPOT_SNR = 3.0
"""A refocused bead is resolved when its fitted amplitude is >= 3x the fit's residual."""


def bead_grid_positions(
    sample: IndependentSample, depth_um: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return a sample's beads (object indices) and their (N, 3) continuous grid positions.

    A position is (slice on the uniform depth grid `depth_um`, row, col), as a density holds
    the bead: what `point_density` deposits and a fit or a bound on the bead starts from.
    """
    depth = np.asarray(depth_um, dtype=np.float64)
    step = float(depth[1] - depth[0])
    o, px = sample.objects, sample.pixel_size_um
    index = np.flatnonzero(o.kind == "bead")
    positions = np.stack(
        [(o.z_um[index] - depth[0]) / step, o.y_um[index] / px, o.x_um[index] / px], axis=1
    ).reshape(-1, 3)
    return index, positions


def point_density(
    sample: IndependentSample,
    depth_um: np.ndarray,
    *,
    subvoxel: bool = True,
    lateral: Lateral = "linear",
) -> np.ndarray:
    """Return the (D, H, W) density of a sample's beads as points on `depth_um` (µm from focus).

    ``subvoxel``: each bead's brightness split tri-linearly over the 8 voxels around it (how the
    training targets are made, `engine.optics`); else all of it on the nearest voxel.
    ``lateral="spline"``: held laterally on the cubic-spline kernel instead
    (`engine.optics.deposit_point`, the convention of a point fit that renders beads as a
    camera images them), linearly in depth.
    """
    h, w = sample.frame.shape
    out = np.zeros((np.size(depth_um), h, w), dtype=np.float32)
    o = sample.objects
    if lateral == "spline":
        if not subvoxel:
            raise ValueError("lateral='spline' holds a point between voxels: subvoxel only")
        from engine.optics import deposit_point  # the models' convention, not the set's imaging

        for i, (gz, gy, gx) in zip(*bead_grid_positions(sample, depth_um), strict=True):
            deposit_point(out, float(o.intensity[i]), gz, gy, gx, lateral="spline")
        return out
    for i, pos in zip(*bead_grid_positions(sample, depth_um), strict=True):
        base = np.floor(pos) if subvoxel else np.round(pos)
        frac = pos - base if subvoxel else np.zeros(3)
        for corner in itertools.product((0, 1), repeat=3):
            weight = float(np.prod([f if c else 1 - f for c, f in zip(corner, frac, strict=True)]))
            z, y, x = (int(b) + c for b, c in zip(base, corner, strict=True))
            if weight > 0 and 0 <= z < out.shape[0] and 0 <= y < h and 0 <= x < w:
                out[z, y, x] += float(o.intensity[i]) * weight
    return out


def bead_sites(
    sample: IndependentSample, min_sep_um: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object index, row, col) of the beads the read-outs score: inside the border, isolated."""
    return _beads(sample, DEPTH_BORDER_PX, min_sep_um)


def _beads(
    sample: IndependentSample, border_px: int, min_sep_um: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scored beads: (object index, row, col) of beads inside the border and isolated."""
    obj = sample.objects
    px = sample.pixel_size_um
    h, w = sample.frame.shape
    sel = np.flatnonzero(obj.kind == "bead")
    rows = np.round(obj.y_um[sel] / px).astype(np.int64)
    cols = np.round(obj.x_um[sel] / px).astype(np.int64)
    keep = (rows >= border_px) & (rows < h - border_px) & (cols >= border_px)
    keep &= cols < w - border_px
    if min_sep_um > 0 and sel.size > 1:
        d = np.hypot(
            obj.x_um[sel, None] - obj.x_um[None, sel], obj.y_um[sel, None] - obj.y_um[None, sel]
        )
        np.fill_diagonal(d, np.inf)
        keep &= d.min(axis=1) >= min_sep_um
    return sel[keep], rows[keep], cols[keep]


def _local_peak_profile(stack: np.ndarray, row: int, col: int) -> np.ndarray:
    """(P,) mean of the 3x3 window at (row, col) minus each plane's local median background."""
    h, w = stack.shape[1:]
    win = stack[:, row - 1 : row + 2, col - 1 : col + 2].mean(axis=(1, 2))
    r0, r1 = max(row - BG_HALF_PX, 0), min(row + BG_HALF_PX + 1, h)
    c0, c1 = max(col - BG_HALF_PX, 0), min(col + BG_HALF_PX + 1, w)
    bg = np.median(stack[:, r0:r1, c0:c1].reshape(stack.shape[0], -1), axis=1)
    out: np.ndarray = (win - bg).astype(np.float64)
    return out


def _peak_position(profile: np.ndarray, grid: np.ndarray) -> float:
    """Locate a profile's maximum on `grid`, refined by a parabola through its neighbours.

    A flat top gives its middle: a profile that does not change with Δz says nothing about
    depth, so the unrefocused input puts every bead in the middle of the grid.
    """
    top = float(profile.max())
    ties = np.flatnonzero(profile >= top - 1e-6 * max(abs(top), 1e-12))
    if ties.size > 1:
        return float(np.mean(grid[ties]))
    k = int(ties[0])
    if 0 < k < profile.size - 1:
        x0, x1, x2 = (float(v) for v in grid[k - 1 : k + 2])
        y0, y1, y2 = (float(v) for v in profile[k - 1 : k + 2])
        den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
        if den != 0:
            num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
            return float(np.clip(x1 - 0.5 * num / den, x0, x2))
    return float(grid[k])


@dataclass(frozen=True, eq=False)
class BeadDepths:
    """Bead depths read from one frame.

    Attributes
    ----------
    index : (N,) object-table rows of the scored beads.
    z_true_um, z_est_um : (N,) true and estimated depth (µm); NaN where no bead was found.
    """

    index: np.ndarray
    z_true_um: np.ndarray
    z_est_um: np.ndarray

    @property
    def errors(self) -> np.ndarray:
        """(N,) absolute depth errors (µm); NaN for beads not found (failures)."""
        out: np.ndarray = np.abs(self.z_est_um - self.z_true_um)
        return out


def bead_depths(
    planes_fn: PlanesFn,
    sample: IndependentSample,
    dz_grid: np.ndarray | None = None,
    *,
    min_sep_um: float = 1.5,
) -> BeadDepths:
    """Depth of each bead from one frame, read where its virtual-stack intensity peaks.

    The virtual stack is ``planes_fn(frame, dz_grid)`` (default: the truth grid, -10 ... +10
    µm in 0.5 µm steps). For each bead at least `DEPTH_BORDER_PX` from the edge and
    `min_sep_um` from any other bead, the profile is the 3x3 mean at its true position minus
    each plane's local (21x21) median; the depth is its maximum, refined by a parabola. A bead
    whose peak stays below `MIN_PEAK_SIGMA` times the 3x3 mean's camera noise is not found
    (NaN), and counts as a failure in `summarise`.
    """
    dz = truth_dz_um() if dz_grid is None else np.asarray(dz_grid, dtype=np.float64).ravel()
    if dz.size < 3 or np.any(np.diff(dz) <= 0):
        raise ValueError(f"dz_grid must be >= 3 increasing depths, got {dz_grid!r}")
    index, rows, cols = _beads(sample, DEPTH_BORDER_PX, min_sep_um)
    stack = np.asarray(planes_fn(sample.frame, dz), dtype=np.float32)
    if stack.shape != (dz.size, *sample.frame.shape):
        raise ValueError(
            f"planes_fn returned {stack.shape}, expected {(dz.size, *sample.frame.shape)}"
        )
    threshold = MIN_PEAK_SIGMA * sample.noise_sigma / 3.0
    est = np.full(index.size, np.nan)
    for j, (r, c) in enumerate(zip(rows, cols, strict=True)):
        profile = _local_peak_profile(stack, int(r), int(c))
        if profile.max() > threshold:
            est[j] = _peak_position(profile, dz)
    return BeadDepths(index=index, z_true_um=sample.objects.z_um[index], z_est_um=est)


NUCLEUS_MAX_DIAMETER_UM = 4.0
"""Spheres up to this diameter count as nuclei (C. elegans neuron nuclei are 2-4 µm)."""
CROWDED_MIN_GAP_UM = 1.0
"""The "ganglion" samples' nuclei are scored when 1 µm or more from another's surface (the
isolated spheres: `nucleus_depths`' default 1.5 µm). On their noise-free truth planes the
read-out then scores a median of 0.15 µm (92 % within 1 µm; `tests/test_heldout.py`); at
0.5 µm the neighbours' light mixes in (p90 2 µm on the truth)."""


def scored_nuclei(
    sample: IndependentSample,
    *,
    max_diameter_um: float = NUCLEUS_MAX_DIAMETER_UM,
    min_gap_um: float = 1.5,
) -> np.ndarray:
    """Object rows of the nuclei a sample's depth read-out scores (`nucleus_depths`).

    Spheres up to `max_diameter_um` across, at least `min_gap_um` from another sphere's surface
    (their light would mix), whose background window (21 px or 4 radii) lies in the frame.
    """
    obj, px = sample.objects, sample.pixel_size_um
    h, w = sample.frame.shape
    sel = np.flatnonzero((obj.kind == "sphere") & (2 * obj.radius_um <= max_diameter_um))
    centres = np.column_stack([obj.x_um, obj.y_um, obj.z_um])
    spheres = np.flatnonzero(obj.kind == "sphere")
    keep = []
    for i in sel:
        gap = np.linalg.norm(centres[spheres] - centres[i], axis=1)
        gap -= obj.radius_um[spheres] + obj.radius_um[i]
        gap[spheres == i] = np.inf
        row, col = int(np.rint(obj.y_um[i] / px)), int(np.rint(obj.x_um[i] / px))
        half_bg = max(BG_HALF_PX, int(np.ceil(2 * obj.radius_um[i] / px)))
        inside = half_bg <= row < h - half_bg and half_bg <= col < w - half_bg
        if inside and gap.min() >= min_gap_um:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64)


def nucleus_depths(
    planes_fn: PlanesFn,
    sample: IndependentSample,
    dz_grid: np.ndarray | None = None,
    *,
    max_diameter_um: float = NUCLEUS_MAX_DIAMETER_UM,
    min_gap_um: float = 1.5,
) -> BeadDepths:
    """Depth of each nucleus (a sphere of 1-4 µm) from one frame: the "neuron depth" read-out.

    As `bead_depths`, with a window that fits the nucleus: the profile is the mean over the
    central disc (half the radius, at least the 3x3 window) minus each plane's local median
    (a window of 21 px or 4 radii, whichever is larger), and its peak, refined by a parabola,
    is the depth. Nuclei within `min_gap_um` of another sphere's surface are not scored (their
    light mixes); one whose peak stays below `MIN_PEAK_SIGMA` times the disc mean's noise is not
    found (NaN).
    """
    dz = truth_dz_um() if dz_grid is None else np.asarray(dz_grid, dtype=np.float64).ravel()
    if dz.size < 3 or np.any(np.diff(dz) <= 0):
        raise ValueError(f"dz_grid must be >= 3 increasing depths, got {dz_grid!r}")
    obj, px = sample.objects, sample.pixel_size_um
    index = scored_nuclei(sample, max_diameter_um=max_diameter_um, min_gap_um=min_gap_um)
    stack = np.asarray(planes_fn(sample.frame, dz), dtype=np.float32)
    if stack.shape != (dz.size, *sample.frame.shape):
        raise ValueError(
            f"planes_fn returned {stack.shape}, expected {(dz.size, *sample.frame.shape)}"
        )
    est = np.full(index.size, np.nan)
    for j, i in enumerate(index):
        r_px = max(1.0, 0.5 * obj.radius_um[i] / px)
        half_bg = max(BG_HALF_PX, int(np.ceil(2 * obj.radius_um[i] / px)))
        row, col = int(np.rint(obj.y_um[i] / px)), int(np.rint(obj.x_um[i] / px))
        yy, xx = np.mgrid[-half_bg : half_bg + 1, -half_bg : half_bg + 1]
        disc = np.hypot(yy, xx) <= r_px
        patch = stack[:, row - half_bg : row + half_bg + 1, col - half_bg : col + half_bg + 1]
        flat = patch.reshape(dz.size, -1)
        profile = flat[:, disc.ravel()].mean(axis=1) - np.median(flat, axis=1)
        if profile.max() > MIN_PEAK_SIGMA * sample.noise_sigma / np.sqrt(disc.sum()):
            est[j] = _peak_position(profile.astype(np.float64), dz)
    return BeadDepths(index=index, z_true_um=obj.z_um[index], z_est_um=est)


DISTANCE_BINS_UM = (0.0, 2.0, 4.0, 6.0, 8.0, 10.5)
"""Edges of the |depth from focus| bins of `by_distance` (µm)."""


def by_distance(
    z_true_um: np.ndarray,
    errors: np.ndarray,
    edges: Sequence[float] = DISTANCE_BINS_UM,
    z_est_um: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Bead depth read-out per |distance from focus| bin: how well depth is recovered where.

    Per bin: the number of beads, the share found, the median error of those found and the
    share within 1 µm of all of them (a bead not found is a failure). Far from focus a bead is
    a faint ring, and the sign of its defocus shows only through the aberration's asymmetry
    (`engine.depth_bound` bounds it for the training simulator's optics); with the signed
    estimates `z_est_um`, each bin also gives the share of its beads put at the mirror depth
    (more than 1 µm from the truth, within 1 µm of its reflection through focus).
    """
    dist = np.abs(np.asarray(z_true_um, dtype=np.float64))
    mirrored = None
    if z_est_um is not None:
        est = np.asarray(z_est_um, dtype=np.float64)
        z = np.asarray(z_true_um, dtype=np.float64)
        if est.shape != z.shape:
            raise ValueError(f"z_est_um has shape {est.shape}, z_true_um {z.shape}")
        with np.errstate(invalid="ignore"):
            mirrored = (np.abs(est + z) <= 1.0) & ~(np.abs(est - z) <= 1.0)
    rows = []
    for (lo, hi), sel, row in _binned(dist, errors, edges):
        row = {"lo_um": lo, "hi_um": hi, **row}
        if mirrored is not None:
            row["at_mirror"] = float(mirrored[sel].mean()) if sel.any() else float("nan")
        rows.append(row)
    return rows


def _binned(
    key: np.ndarray, errors: np.ndarray, edges: Sequence[float]
) -> Iterator[tuple[tuple[float, float], np.ndarray, dict[str, float]]]:
    """Per bin of `key` over `edges`: its edges, its beads and their depth read-out.

    The read-out: the number of beads, the share found, the median error of those found and
    the share within 1 µm of all of them (a bead not found is a failure).
    """
    err = np.asarray(errors, dtype=np.float64)
    for lo, hi in itertools.pairwise(edges):
        sel = (key >= lo) & (key < hi)
        e = err[sel]
        found = e[np.isfinite(e)]
        yield (
            (float(lo), float(hi)),
            sel,
            {
                "count": int(sel.sum()),
                "found": float(found.size / e.size) if e.size else float("nan"),
                "median_found_um": float(np.median(found)) if found.size else float("nan"),
                "within_1um": float(np.mean(np.nan_to_num(e, nan=np.inf) <= 1.0))
                if e.size
                else float("nan"),
            },
        )


SNR_BINS = (0.0, 5.0, 8.0, 12.0, 20.0, math.inf)
"""Edges of the matched-filter SNR bins of `by_snr`."""


def bead_snr(sample: IndependentSample, index: np.ndarray, optics: IndependentOptics) -> np.ndarray:
    """(N,) the SNR an ideal detector gets of each bead `index` of `sample`, alone in the frame.

    A bead of brightness I (counts) at depth z is seen at focus 0 as ``t``, its own image
    (`point_images`: its depth's PSF, at its place between pixels, as the set imaged it).
    Correlated with that image (mean removed, unit norm), the frame scores ``I · ‖t − mean t‖``
    on average, and the camera noise σ (white) adds σ of spread. So ``I · ‖t − mean t‖ / σ`` is
    what the matched filter gets knowing the PSF exactly, with no neighbours: about 5 is the
    floor of detection in a frame of 10^5 pixels at 41 depths, whatever the method. Far beads
    are faint beads: a bead's light spreads over a ring whose area grows as the square of its
    distance from focus.
    """
    out = np.empty(len(index))
    for j, i in enumerate(np.asarray(index, dtype=np.int64)):
        z = np.array([sample.objects.z_um[i]])
        t = _bead_images(sample, int(i), z, optics, PSF_SIZE_PX)[0].astype(np.float64)
        norm = float(np.sqrt(((t - t.mean()) ** 2).sum()))
        out[j] = float(sample.objects.intensity[i]) * norm / sample.noise_sigma
    return out


def _bead_images(
    sample: IndependentSample, i: int, z_um: np.ndarray, optics: IndependentOptics, size_px: int
) -> np.ndarray:
    """`point_images` of object `i` of `sample` at depths `z_um`, centred on its nearest pixel."""
    px = sample.pixel_size_um
    x, y = float(sample.objects.x_um[i]) / px, float(sample.objects.y_um[i]) / px
    return point_images(optics, z_um, size_px, (x - round(x), y - round(y)))


def by_snr(
    snr: np.ndarray, errors: np.ndarray, edges: Sequence[float] = SNR_BINS
) -> list[dict[str, float]]:
    """Bead depth read-out per bin of the beads' `bead_snr`: what a frame holds, what is left.

    The rows of `by_distance` (count, found, median error of those found, within 1 µm), binned
    by the ideal detector's SNR instead of the distance from focus: a method at the physics'
    limit places nearly every bead of high SNR, and only some below about 8.
    """
    key = np.asarray(snr, dtype=np.float64)
    return [{"snr_lo": lo, "snr_hi": hi, **row} for (lo, hi), _, row in _binned(key, errors, edges)]


def bead_depth_errors(
    planes_fn: PlanesFn, sample: IndependentSample, dz_grid: np.ndarray | None = None
) -> np.ndarray:
    """(N,) absolute bead depth errors (µm) of `bead_depths`; NaN = bead not found."""
    return bead_depths(planes_fn, sample, dz_grid).errors


@dataclass(frozen=True, eq=False)
class BeadFwhm:
    """Lateral FWHM of beads refocused onto their true depth, against the truth plane there.

    Attributes
    ----------
    index : (N,) object-table rows of the scored beads.
    z_plane_um : (N,) the truth plane used: the bead's depth rounded to 0.5 µm.
    fwhm_truth_um, fwhm_refocused_um : (N,) fitted FWHM (µm); NaN = unresolved.
    """

    index: np.ndarray
    z_plane_um: np.ndarray
    fwhm_truth_um: np.ndarray
    fwhm_refocused_um: np.ndarray

    @property
    def ratios(self) -> np.ndarray:
        """(N,) refocused FWHM / truth FWHM; NaN where the refocused bead is unresolved."""
        out: np.ndarray = self.fwhm_refocused_um / self.fwhm_truth_um
        return out


def bead_fwhm(
    planes_fn: PlanesFn, sample: IndependentSample, *, min_sep_um: float = 3.0
) -> BeadFwhm:
    """Refocus onto each bead's true depth and compare its lateral FWHM with the truth's.

    Beads at least `DEPTH_BORDER_PX` from the edge and `min_sep_um` from other beads are
    refocused (one `planes_fn` call over their depths, rounded to 0.5 µm); an isotropic
    Gaussian is fitted (`engine.metrics.gaussian_fwhm_2d`, centred on the true position, as
    `engine.evaluate` does) in a 13x13 window to the refocused bead (resolved only above
    `MIN_SPOT_SNR`) and to the same bead in the noise-free truth plane at that depth.
    """
    index, rows, cols = _beads(sample, DEPTH_BORDER_PX, min_sep_um)
    z_plane = np.round(sample.objects.z_um[index] / SLICE_UM) * SLICE_UM
    z_plane = np.clip(np.round(z_plane, 6), sample.dz_um[0], sample.dz_um[-1])
    depths = np.unique(z_plane)
    refocused = np.asarray(planes_fn(sample.frame, depths), dtype=np.float32)
    px = sample.pixel_size_um
    f_true = np.full(index.size, np.nan)
    f_ref = np.full(index.size, np.nan)
    hw = FWHM_HALF_PX
    for j, (r, c) in enumerate(zip(rows, cols, strict=True)):
        win = np.s_[r - hw : r + hw + 1, c - hw : c + hw + 1]
        k = int(np.argmin(np.abs(sample.dz_um - z_plane[j])))
        f_true[j] = gaussian_fwhm_2d(sample.planes[k][win], px, centered=True)
        out = refocused[int(np.searchsorted(depths, z_plane[j]))]
        f_ref[j] = gaussian_fwhm_2d(out[win], px, centered=True, min_snr=MIN_SPOT_SNR)
    ok = np.isfinite(f_true)
    return BeadFwhm(
        index=index[ok],
        z_plane_um=z_plane[ok],
        fwhm_truth_um=f_true[ok],
        fwhm_refocused_um=f_ref[ok],
    )


def bead_fwhm_ratios(planes_fn: PlanesFn, sample: IndependentSample) -> np.ndarray:
    """(N,) refocused / truth bead FWHM at each bead's true depth (NaN = unresolved)."""
    return bead_fwhm(planes_fn, sample).ratios


@dataclass(frozen=True, eq=False)
class TiltedFocus:
    """How well a DPM on the tilted bead plane brings its beads into focus.

    Attributes
    ----------
    index : (N,) object-table rows of the scored beads.
    peak_truth, peak_refocused : (N,) background-removed 3x3-max bead peaks (counts) in the
        all-in-focus truth and on the refocused surface.
    fraction : fraction of beads whose refocused peak is within 20 % of the truth peak.
    pearson : Pearson correlation of the refocused surface with the all-in-focus truth.
    """

    index: np.ndarray
    peak_truth: np.ndarray
    peak_refocused: np.ndarray
    fraction: float
    pearson: float

    @property
    def ratios(self) -> np.ndarray:
        """(N,) refocused peak / truth peak."""
        out: np.ndarray = self.peak_refocused / self.peak_truth
        return out

    @property
    def in_focus(self) -> np.ndarray:
        """(N,) bool: the bead's refocused peak is within 20 % of the truth."""
        out: np.ndarray = np.abs(self.ratios - 1.0) <= IN_FOCUS_TOLERANCE
        return out


IN_FOCUS_TOLERANCE = 0.2
"""A bead is in focus when its refocused peak is within 20 % of the all-in-focus truth."""
FWHM_TOLERANCE = 0.15
"""A bead's width is right when its refocused FWHM is within 15 % of the truth's (the target)."""


def _peak(img: np.ndarray, row: int, col: int) -> float:
    """Max of the 3x3 window at (row, col) minus the 21x21 window's median."""
    h, w = img.shape
    r0, r1 = max(row - BG_HALF_PX, 0), min(row + BG_HALF_PX + 1, h)
    c0, c1 = max(col - BG_HALF_PX, 0), min(col + BG_HALF_PX + 1, w)
    bg = float(np.median(img[r0:r1, c0:c1]))
    return float(img[row - 1 : row + 2, col - 1 : col + 2].max()) - bg


def tilted_in_focus(
    surface_fn: SurfaceFn, sample: IndependentSample, *, min_sep_um: float = 1.5
) -> TiltedFocus:
    """Refocus a "tilted" sample's frame onto its plane's DPM and score each bead's focus.

    For each bead (inside the border, `min_sep_um` from others): its peak (3x3 max after a
    local 21x21 median background) on the refocused surface against the same bead's peak in
    the all-in-focus truth (`IndependentSample.in_focus`: each bead at its own depth).
    """
    if sample.dpm_um is None or sample.in_focus is None:
        raise ValueError(f"tilted_in_focus needs a 'tilted' sample, got {sample.kind!r}")
    surface = np.asarray(surface_fn(sample.frame, sample.dpm_um), dtype=np.float32)
    if surface.shape != sample.frame.shape:
        raise ValueError(f"surface_fn returned {surface.shape}, expected {sample.frame.shape}")
    index, rows, cols = _beads(sample, DEPTH_BORDER_PX, min_sep_um)
    truth = np.array(
        [_peak(sample.in_focus, int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
    )
    refoc = np.array([_peak(surface, int(r), int(c)) for r, c in zip(rows, cols, strict=True)])
    ratios = refoc / truth
    frac = float(np.mean(np.abs(ratios - 1.0) <= IN_FOCUS_TOLERANCE)) if ratios.size else math.nan
    return TiltedFocus(
        index=index,
        peak_truth=truth,
        peak_refocused=refoc,
        fraction=frac,
        pearson=pearson(surface, sample.in_focus),
    )


def tilted_in_focus_fraction(surface_fn: SurfaceFn, sample: IndependentSample) -> float:
    """Fraction of the tilted plane's beads a DPM refocus brings into focus (`tilted_in_focus`)."""
    return tilted_in_focus(surface_fn, sample).fraction


def plane_metrics(
    planes_fn: PlanesFn, sample: IndependentSample, dz: Sequence[float] | np.ndarray
) -> list[dict[str, float]]:
    """PSNR, SSIM and Pearson (`engine.metrics`) of refocused planes against the truth planes.

    `dz` must lie on the sample's truth grid (0.5 µm steps within ±10 µm).
    """
    d = np.atleast_1d(np.asarray(dz, dtype=np.float64))
    idx = [int(np.argmin(np.abs(sample.dz_um - v))) for v in d]
    if any(abs(sample.dz_um[i] - v) > 1e-6 for i, v in zip(idx, d, strict=True)):
        raise ValueError(
            f"dz must lie on the truth grid {sample.dz_um[0]}..{sample.dz_um[-1]} step 0.5"
        )
    pred = np.asarray(planes_fn(sample.frame, d), dtype=np.float32)
    rows: list[dict[str, float]] = []
    for k, (i, v) in enumerate(zip(idx, d, strict=True)):
        truth = sample.planes[i]
        rows.append(
            {
                "dz_um": float(v),
                "psnr": psnr(pred[k], truth),
                "ssim": ssim(pred[k], truth),
                "pearson": pearson(pred[k], truth),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Classical baseline: matched-filter depth


def _smooth_background(img: np.ndarray, block: int = 8, size: int = 7) -> np.ndarray:
    """Robust smooth background: medians of 8x8 blocks, a 7-block median filter, upsampled."""
    h, w = img.shape
    hb, wb = -(-h // block), -(-w // block)
    pad = np.pad(img, ((0, hb * block - h), (0, wb * block - w)), mode="edge")
    med = np.median(
        pad.reshape(hb, block, wb, block).transpose(0, 2, 1, 3).reshape(hb, wb, -1), axis=2
    )
    med = ndimage.median_filter(med, size=size, mode="nearest")
    ys = (np.arange(h) + 0.5) / block - 0.5
    xs = (np.arange(w) + 0.5) / block - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out: np.ndarray = ndimage.map_coordinates(med, [yy, xx], order=1, mode="nearest")
    return out


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


def matched_filter_depth(
    frame: np.ndarray, psf_bank: np.ndarray, defocus_um: np.ndarray, xy_px: np.ndarray
) -> np.ndarray:
    """Classical depth read-out: correlate the frame with the PSF at each defocus.

    The frame's smooth background is removed, the result is correlated (FFT) with every
    unit-norm PSF plane, and at each given position the defocus of the highest score is
    taken (refined by a parabola). A bead at depth z seen at focus 0 has defocus ``-z``, so
    the depth returned is minus that defocus.

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
    img = img - _smooth_background(img)
    unit = bank / np.sqrt((bank**2).sum(axis=(1, 2), keepdims=True))
    scores = _correlate_same(img, unit)
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    h, w = img.shape
    out = np.full(xy.shape[0], np.nan)
    for j, (x, y) in enumerate(xy):
        r, c = round(float(y)), round(float(x))
        if 0 <= r < h and 0 <= c < w:
            out[j] = -_peak_position(scores[:, r, c], d)
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
    imaged it; unit norm), and the best z is refined by a parabola. Under white noise this is
    the maximum-likelihood depth of a lone bead of unknown brightness: the reference the model
    cannot be held to beat where its own PSF is not the set's. (A pixel-centred PSF would not
    do on camera-like sets: a bead at a pixel corner is dimmer and wider in focus, which reads
    as defocus.)
    """
    index, rows, cols = _beads(sample, DEPTH_BORDER_PX, min_sep_um)
    candidates = -truth_dz_um()[::-1]  # increasing depths
    half = OWN_FILTER_PX // 2
    img = sample.frame.astype(np.float64)
    img = np.pad(img - _smooth_background(img), half)  # the window may leave the frame
    est = np.empty(index.size)
    for j, (i, r, c) in enumerate(zip(index, rows, cols, strict=True)):
        window = img[r : r + OWN_FILTER_PX, c : c + OWN_FILTER_PX]
        t = _bead_images(sample, int(i), candidates, optics, OWN_FILTER_PX).astype(np.float64)
        scores = np.einsum("qyx,yx->q", t, window) / np.sqrt((t**2).sum(axis=(1, 2)))
        est[j] = _peak_position(scores, candidates)
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
    index, rows, cols = _beads(sample, DEPTH_BORDER_PX, min_sep_um)
    xy = np.column_stack([cols, rows]).astype(np.float64)
    est = matched_filter_depth(sample.frame, psf_bank, defocus_um, xy)
    return BeadDepths(index=index, z_true_um=sample.objects.z_um[index], z_est_um=est)


# ---------------------------------------------------------------------------------------------
# Summaries


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion `hits` / `n` (``(nan, nan)`` when n = 0).

    With 149 beads, 51 % within 1 µm is 43-59 %: differences of a few beads between two models
    are within it, which is why `paired_hits` compares models bead by bead.
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_hits(
    errors_a: np.ndarray, errors_b: np.ndarray, within_um: float = 1.0
) -> dict[str, float]:
    """Compare two methods on the same beads: B's gains and losses against A, and a sign test.

    `errors_a` and `errors_b` are absolute depth errors of the same beads in the same order
    (NaN: not found). ``gained``: beads B places within `within_um` and A does not; ``lost``:
    the reverse. ``p_value``: the two-sided exact binomial (sign) test on those discordant
    beads, the chance of a split at least this uneven if the two were equally good.
    """
    a = np.nan_to_num(np.asarray(errors_a, dtype=np.float64).ravel(), nan=np.inf) <= within_um
    b = np.nan_to_num(np.asarray(errors_b, dtype=np.float64).ravel(), nan=np.inf) <= within_um
    return sign_test(a, b)


def sign_test(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, float]:
    """B's gains and losses against A on the same items (booleans: a hit), with a sign test.

    ``gained``: items B hits and A misses; ``lost``: the reverse; ``p_value``: the two-sided
    exact binomial test on those discordant items (`paired_hits` for bead depths; the tilted
    plane's beads in focus in `engine.fidelity`).
    """
    a = np.asarray(hits_a, dtype=bool).ravel()
    b = np.asarray(hits_b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same beads: {a.size} against {b.size}")
    gained, lost = int(np.sum(b & ~a)), int(np.sum(a & ~b))
    n = gained + lost
    k = min(gained, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n if n else 1.0
    return {
        "beads": float(a.size),
        "gained": float(gained),
        "lost": float(lost),
        "p_value": min(1.0, 2 * tail),
    }


def summarise(errors: np.ndarray) -> dict[str, float]:
    """Summary of absolute depth errors (µm); NaN entries are failures (bead not found).

    Failures count as infinitely wrong: they are in the denominators of the fractions and
    push the median and p90 up (to inf if they are that many). ``median_found_um`` is the
    median over the beads that were found, for context only.
    """
    e = np.asarray(errors, dtype=np.float64).ravel()
    fails = ~np.isfinite(e)
    filled = np.where(fails, np.inf, e)
    n = int(e.size)
    nan = math.nan
    # the share within 1 µm and its 95 % interval: what one more or one fewer bead is worth
    lo, hi = wilson_interval(int(np.sum(filled <= 1.0)), n)
    return {
        "count": float(n),
        "failures": float(fails.sum()),
        "median_um": float(np.median(filled)) if n else nan,
        "p90_um": float(np.percentile(filled, 90, method="higher")) if n else nan,
        "within_1um": float(np.mean(filled <= 1.0)) if n else nan,
        "within_1um_lo": lo,
        "within_1um_hi": hi,
        "within_0p5um": float(np.mean(filled <= 0.5)) if n else nan,
        "median_found_um": float(np.median(e[~fails])) if (~fails).any() else nan,
    }


RANGES_UM = (4.0, 6.0)
"""Half-ranges around focus (µm) over which `within_range` summarises bead depth."""


def within_range(
    z_true_um: np.ndarray, errors: np.ndarray, ranges_um: Sequence[float] = RANGES_UM
) -> list[dict[str, float]]:
    """`summarise` over the beads closer than r to focus (|z| < r), for each r in `ranges_um`.

    The targets ask for every bead over ±10 µm; this says how far from focus one frame gives
    depth to a stated accuracy (the median and p90, beads not found counting as failures).
    """
    dist = np.abs(np.asarray(z_true_um, dtype=np.float64))
    err = np.asarray(errors, dtype=np.float64)
    return [{"range_um": float(r), **summarise(err[dist < r])} for r in ranges_um]


def summarise_ratios(ratios: np.ndarray, tolerance: float = FWHM_TOLERANCE) -> dict[str, float]:
    """Summary of FWHM ratios: NaN (unresolved) counts as outside the tolerance."""
    r = np.asarray(ratios, dtype=np.float64).ravel()
    ok = np.isfinite(r)
    n = int(r.size)
    nan = math.nan
    return {
        "count": float(n),
        "unresolved": float((~ok).sum()),
        "median_ratio": float(np.median(r[ok])) if ok.any() else nan,
        "fraction_within": float(np.mean(ok & (np.abs(np.where(ok, r, 0.0) - 1) <= tolerance)))
        if n
        else nan,
        "tolerance": tolerance,
    }
