"""Held-out image formation: each object on its own through its depth's PSF."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.fft

from engine.heldout.optics import (
    PSF_SIZE_PX,
    PUPIL_OVERSAMPLE,
    SLICE_UM,
    IndependentOptics,
    truth_dz_um,
)
from engine.heldout.samples import (
    KIND_CODE,
    HeldoutCamera,
    HeldoutObjects,
    IndependentSample,
    SampleKind,
    TiltedPlane,
    background_image_e,
    draw_beads,
    draw_ganglion,
    draw_spheres,
    draw_tilted,
)


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
    """Return the PSF (F, S, S) of a point at depth `z` at every focus of `lattice`.

    Linear between its two depth slices; with `IndependentOptics.point_depth` "own", computed
    at the point's own defocus instead (one PSF computation per point, not cached banks).
    """
    optics = lattice.optics
    if isinstance(optics, IndependentOptics) and optics.point_depth == "own":
        defocus = np.round(lattice.focus_um - z, 6)
        psf = optics.psf_subpixel if lattice.subpixel else optics.psf
        own: np.ndarray = psf(defocus, z, lattice.psf_px)  # read-only: callers never write it
        return own
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
    q = PUPIL_OVERSAMPLE
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


def interp_planes(planes: np.ndarray, dz_um: np.ndarray, depth: np.ndarray) -> np.ndarray:
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
    kind : "spheres", "beads", "tilted" or "ganglion" (the `engine.heldout` package
        docstring has the statistics of each).
    seed : random seed; each kind has its own stream.
    shape : (H, W) of the frame; object counts scale with its area (given per 256²).
    optics, camera : override the held-out optics or camera.

    Returns
    -------
    IndependentSample
        The noisy frame at focus 0, the 41 noise-free truth planes and the object table.
    """
    if kind not in KIND_CODE:
        raise ValueError(f"kind must be 'spheres', 'beads', 'tilted' or 'ganglion', not {kind!r}")
    if len(shape) != 2 or min(shape) < 32:
        raise ValueError(f"shape must be (H, W) with sides >= 32, got {shape!r}")
    shape = (int(shape[0]), int(shape[1]))
    optics = optics or IndependentOptics()
    camera = camera or HeldoutCamera()
    px = optics.pixel_size_um
    rng = np.random.default_rng((0x5EED, KIND_CODE[kind], int(seed)))
    tilt: TiltedPlane | None = None
    body = None
    if kind == "spheres":
        xyz, radius, signal_e = draw_spheres(rng, shape, px)
    elif kind == "ganglion":
        xyz, radius, signal_e, body = draw_ganglion(rng, shape, px)
    elif kind == "beads":
        xyz, signal_e = draw_beads(rng, shape, px)
        radius = np.zeros(len(signal_e))
    else:
        xyz, signal_e, tilt = draw_tilted(rng, shape, px)
        radius = np.zeros(len(signal_e))
    dz = truth_dz_um()
    photo_e = render_objects(xyz, radius, signal_e, shape, optics, dz)
    bg_e = background_image_e(rng, shape, camera)
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
        in_focus = interp_planes(planes, dz, dpm)
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
    bg_e = background_image_e(rng, (h, w), camera)
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
