"""Wide-field image formation: 3D sample ⊛ PSF per focal plane (FFT), then an sCMOS camera.

A sample is rasterised into thin z slices (0.5 µm) on a grid larger than the frame by the PSF
radius, so light from outside the field blurs in correctly. Each focal plane is the sum over
slices of the slice convolved with the PSF at the slice's defocus, computed in Fourier space
with cached PSF transforms; the camera adds shot noise, read noise, gain and offset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import get_args

import numpy as np
import scipy.fft

from engine.optics._config import CameraConfig, OpticsConfig, SampleKind, WormConfig
from engine.optics._psf import make_psf
from engine.optics._samples import (
    Extent,
    Grid,
    Lateral,
    ObjectTable,
    beads,
    body_density,
    body_texture,
    is_point,
    isolated_nuclei,
    rasterize,
    surface_beads,
    worm_body,
    worm_nuclei,
)

PSF_SIZE_PX = 127
"""Side of the PSF kernel (pixels). At 0.3 µm pixels it holds 99 % of a point's light up to
15 µm from focus and 93 % at 20 µm; each plane is renormalised to unit sum."""
SLICE_UM = 0.5
"""Thickness of the z slices a 3D sample is binned into (µm)."""
SLICE_HALF_RANGE_UM = 15.0
"""Samples are sliced over at least ±15 µm (worm bodies and bead layers fit inside)."""
BODY_FRACTION = 0.1
"""Diffuse body autofluorescence through the worm's axis, as a fraction of `peak_photons`."""
WORKERS = 2
"""Threads for scipy.fft."""
_OTF_MAX_BYTES = 128 * 2**20
"""Most memory kept for PSF transforms per grid shape (a 384² plane takes 0.6 MB)."""


@dataclass(frozen=True)
class FocalStack:
    """A simulated wide-field focal stack with its ground truth.

    Attributes
    ----------
    images : (Z, H, W) uint16 camera counts, with noise.
    clean : (Z, H, W) float32 noise-free expected counts (same scale, offset included).
    z_um : (Z,) focal positions relative to the sample's reference plane (µm, + = deeper).
    objects : ground-truth objects, in the frame's sample coordinates.
    pixel_size_um : pixel size at the sample (µm).
    """

    images: np.ndarray
    clean: np.ndarray
    z_um: np.ndarray
    objects: ObjectTable
    pixel_size_um: float


def grid_for_frame(shape: tuple[int, int], pixel_size_um: float, z_um: np.ndarray) -> Grid:
    """Voxel grid covering the frame plus a PSF-radius margin, with an FFT-friendly size."""
    h, w = shape
    hg = scipy.fft.next_fast_len(h + PSF_SIZE_PX - 1, real=True)
    wg = scipy.fft.next_fast_len(w + PSF_SIZE_PX - 1, real=True)
    my, mx = (hg - h) // 2, (wg - w) // 2
    return Grid(
        x0_um=-mx * pixel_size_um,
        y0_um=-my * pixel_size_um,
        shape=(hg, wg),
        pixel_size_um=pixel_size_um,
        z_um=np.asarray(z_um, dtype=np.float64),
    )


def frame_crop(grid: Grid, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Return the frame's rows and columns inside `grid` (see `grid_for_frame`)."""
    my = round(-grid.y0_um / grid.pixel_size_um)
    mx = round(-grid.x0_um / grid.pixel_size_um)
    return slice(my, my + shape[0]), slice(mx, mx + shape[1])


@functools.lru_cache(maxsize=4)
def _otf_store(optics: OpticsConfig, shape: tuple[int, int]) -> dict[float, np.ndarray]:
    """Per-(optics, grid shape) store of PSF transforms, keyed by defocus (µm)."""
    return {}


def _embedded_otf(
    optics: OpticsConfig, defocus_um: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """rfft2 of the PSF planes at `defocus_um`, embedded centred at the origin of `shape`."""
    size = PSF_SIZE_PX
    h, w = shape
    if size > h or size > w:
        raise ValueError(f"grid {shape} smaller than the PSF ({size} px)")
    psf = make_psf(optics, defocus_um, size)
    emb = np.zeros((len(defocus_um), h, w), dtype=np.float32)
    emb[:, :size, :size] = psf
    emb = np.roll(emb, (-(size // 2), -(size // 2)), axis=(1, 2))
    out: np.ndarray = scipy.fft.rfft2(emb, workers=WORKERS).astype(np.complex64)
    return out


def _otf(optics: OpticsConfig, defocus_um: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Like `_embedded_otf`, but each defocus value's plane is computed once and kept.

    The store holds at most `_OTF_MAX_BYTES` per grid shape; when full it starts afresh.
    """
    store = _otf_store(optics, shape)
    missing = sorted({float(d) for d in defocus_um} - store.keys())
    if missing:
        planes = _embedded_otf(optics, np.asarray(missing), shape)
        if (len(store) + len(missing)) * planes[0].nbytes > _OTF_MAX_BYTES:
            store.clear()
        store.update(zip(missing, planes, strict=True))
    return np.stack([store[float(d)] for d in defocus_um])


def image_slices(
    density: np.ndarray, slice_z_um: np.ndarray, focus_um: np.ndarray, optics: OpticsConfig
) -> np.ndarray:
    """Wide-field images (F, H, W) float32 of a sliced sample at each focal position.

    ``out[f] = Σ_s density[s] ⊛ PSF(focus_um[f] - slice_z_um[s])``, circular on the grid (the
    grid's margin must cover the PSF radius). When the slices are evenly spaced and the focal
    positions sit on the same lattice (the usual case), the sum over slices is a convolution
    along z too and is done by FFT; otherwise each (plane, slice) pair is multiplied out. With
    `optics.depth_dependent_aberration` each slice has its own PSF (`OpticsConfig.at_depth`), so the
    sum is no convolution along z and is multiplied out too, skipping empty slices.
    """
    shape = (int(density.shape[1]), int(density.shape[2]))
    if not density.any():
        return np.zeros((focus_um.size, *shape), dtype=np.float32)
    spectra = scipy.fft.rfft2(density, workers=WORKERS)
    if optics.depth_dependent_aberration:
        occupied = np.asarray(density.reshape(density.shape[0], -1).any(axis=1))
        planes = _sum_aberrated(spectra, slice_z_um, focus_um, optics, shape, occupied)
    elif (lattice := _lattice(focus_um, slice_z_um)) is None:
        planes = _sum_pairs(spectra, slice_z_um, focus_um, optics, shape)
    else:
        planes = _convolve_z(spectra, lattice, focus_um.size, optics, shape)
    out: np.ndarray = scipy.fft.irfft2(planes, s=shape, workers=WORKERS).astype(
        np.float32, copy=False
    )
    return out


@dataclass(frozen=True)
class _Lattice:
    """Focal positions on the slice lattice: ``focus[f] = z0 + step · (k[f] + phase)``."""

    step: float
    phase: float
    k: np.ndarray


def _lattice(focus_um: np.ndarray, slice_z_um: np.ndarray) -> _Lattice | None:
    """Describe the focal positions on the slices' lattice, or None if they do not fit one."""
    if slice_z_um.size < 2:
        return None
    step = float(slice_z_um[1] - slice_z_um[0])
    if step <= 0 or not np.allclose(np.diff(slice_z_um), step, atol=1e-6):
        return None
    u = (focus_um - slice_z_um[0]) / step
    phase = float(u[0] - np.floor(u[0]))
    k = np.round(u - phase)
    if not np.allclose(u - phase, k, atol=1e-6):
        return None
    return _Lattice(step, round(phase, 6), k.astype(np.int64))


@functools.lru_cache(maxsize=2)
def _z_kernel(
    optics: OpticsConfig,
    shape: tuple[int, int],
    step: float,
    phase: float,
    j0: int,
    length: int,
    n_fft: int,
) -> np.ndarray:
    """PSF transforms at defocus ``step·(j0 + q + phase)``, q < length, FFT'd along z."""
    defocus = np.round(step * (j0 + np.arange(length) + phase), 6)
    kernel = _embedded_otf(optics, defocus, shape)
    out: np.ndarray = scipy.fft.fft(kernel, n=n_fft, axis=0, workers=WORKERS).astype(np.complex64)
    out.flags.writeable = False
    return out


def _convolve_z(
    spectra: np.ndarray,
    lattice: _Lattice,
    n_planes: int,
    optics: OpticsConfig,
    shape: tuple[int, int],
) -> np.ndarray:
    """Sum over slices as a linear convolution along z (FFT), on the focal-position lattice."""
    n_slices = spectra.shape[0]
    k_min, k_max = int(lattice.k.min()), int(lattice.k.max())
    j0 = k_min - (n_slices - 1)
    length = k_max - j0 + 1
    n_fft = scipy.fft.next_fast_len(length)
    kernel = _z_kernel(optics, shape, lattice.step, lattice.phase, j0, length, n_fft)
    spec_z = scipy.fft.fft(spectra, n=n_fft, axis=0, workers=WORKERS)
    spec_z *= kernel
    conv = scipy.fft.ifft(spec_z, axis=0, workers=WORKERS, overwrite_x=True)
    planes: np.ndarray = conv[lattice.k - j0].astype(np.complex64, copy=False)
    assert planes.shape[0] == n_planes
    return planes


def _sum_pairs(
    spectra: np.ndarray,
    slice_z_um: np.ndarray,
    focus_um: np.ndarray,
    optics: OpticsConfig,
    shape: tuple[int, int],
) -> np.ndarray:
    """Sum over slices pair by pair (any focal positions); returns the planes' spectra."""
    d = np.round(focus_um[:, None] - slice_z_um[None, :], 6)
    uniq, inv = np.unique(d, return_inverse=True)
    inv = inv.reshape(d.shape)
    otf = _otf(optics, uniq, shape)
    acc = np.empty(spectra.shape[1:], dtype=np.complex64)
    tmp = np.empty_like(acc)
    planes = np.empty((focus_um.size, *acc.shape), dtype=np.complex64)
    for f in range(focus_um.size):
        np.multiply(otf[inv[f, 0]], spectra[0], out=acc)
        for s in range(1, spectra.shape[0]):
            np.multiply(otf[inv[f, s]], spectra[s], out=tmp)
            acc += tmp
        planes[f] = acc
    return planes


def _sum_aberrated(
    spectra: np.ndarray,
    slice_z_um: np.ndarray,
    focus_um: np.ndarray,
    optics: OpticsConfig,
    shape: tuple[int, int],
    occupied: np.ndarray,
) -> np.ndarray:
    """Sum over slices, each through the PSF of its own depth's aberration; the planes' spectra.

    Each occupied slice costs one PSF computation per focal plane (about 40 ms on a CPU core
    for two planes): seconds per 61-slice training sample, not cached, because the depth of
    z = 0 changes from sample to sample.
    """
    planes = np.zeros((focus_um.size, *spectra.shape[1:]), dtype=np.complex64)
    for s in np.flatnonzero(occupied):
        z = float(slice_z_um[s])
        otf = _embedded_otf(optics.at_depth(z), np.round(focus_um - z, 6), shape)
        planes += otf * spectra[s]
    return planes


def expected_counts(photons: np.ndarray, camera: CameraConfig) -> np.ndarray:
    """Noise-free camera counts (float32) for a photon image: QE · gain · photons + offset."""
    scale = np.float32(camera.quantum_efficiency * camera.gain_counts_per_e)
    out: np.ndarray = np.maximum(photons, 0).astype(np.float32) * scale + np.float32(
        camera.offset_counts
    )
    return out


def camera_counts(
    photons: np.ndarray, camera: CameraConfig, rng: np.random.Generator, *, exact: bool = True
) -> np.ndarray:
    """uint16 sCMOS counts: Poisson shot noise, Gaussian read noise, gain, offset, clipping.

    With ``exact=False`` the shot noise uses the Gaussian approximation (5x faster, accurate
    above ~20 photo-electrons per pixel), which the live time series uses.
    """
    electrons = np.maximum(photons, 0).astype(np.float32) * np.float32(camera.quantum_efficiency)
    read_var = np.float32(camera.read_noise_e**2)
    if exact:
        noisy = rng.poisson(electrons).astype(np.float32)
        if read_var > 0:
            noisy += rng.standard_normal(electrons.shape, dtype=np.float32) * np.sqrt(read_var)
    else:
        noisy = rng.standard_normal(electrons.shape, dtype=np.float32)
        noisy *= np.sqrt(electrons + read_var)
        noisy += electrons
    noisy *= np.float32(camera.gain_counts_per_e)
    noisy += np.float32(camera.offset_counts + 0.5)
    np.clip(noisy, 0, 65535, out=noisy)
    out: np.ndarray = noisy.astype(np.uint16)
    return out


def make_sample(
    sample: SampleKind,
    shape: tuple[int, int],
    optics: OpticsConfig,
    camera: CameraConfig,
    rng: np.random.Generator,
    worm: WormConfig | None = None,
) -> tuple[ObjectTable, Grid, np.ndarray, np.ndarray | None]:
    """Draw a sample, and rasterise it: (objects, grid, photon density (S, H, W), body).

    `worm` shapes the worm of "worm" and "mixed" samples (default: the original worm). The
    density holds everything; `body` is the worm body's diffuse part of it alone (None
    without a body), for those who image the body apart (`simulate_volume_pair`).
    """
    if sample not in get_args(SampleKind):
        kinds = ", ".join(repr(k) for k in get_args(SampleKind))
        raise ValueError(f"sample must be one of {kinds}, not {sample!r}")
    px = optics.pixel_size_um
    frame = Extent(0.0, (shape[1] - 1) * px, 0.0, (shape[0] - 1) * px)
    grid = grid_for_frame(shape, px, np.zeros(1))
    h, w = grid.shape
    extent = Extent(grid.x0_um, grid.x0_um + (w - 1) * px, grid.y0_um, grid.y0_um + (h - 1) * px)
    tables: list[ObjectTable] = []
    body = None
    if sample in ("worm", "mixed"):
        body = worm_body(rng, frame, worm)
        tables.append(worm_nuclei(rng, body, extent, frame, camera, px, worm))
    if sample in ("beads", "mixed"):
        tables.append(beads(rng, extent, frame, camera))
    if sample == "nuclei":
        tables.append(isolated_nuclei(rng, extent, frame, camera, px))
    if sample == "surface":
        tables.append(surface_beads(rng, extent, frame, camera))
    objects = ObjectTable.concat(*tables)
    top = objects.z_um - objects.semi_axes_um[:, 2]
    bottom = objects.z_um + objects.semi_axes_um[:, 2]
    if body is not None:
        top = np.append(top, body.z_mid_um - body.radius_um)
        bottom = np.append(bottom, body.z_mid_um + body.radius_um)
    # A fixed slice range (unless the sample sticks out) keeps the z kernel cache warm.
    z0 = min(-SLICE_HALF_RANGE_UM, np.floor(top.min() / SLICE_UM - 1) * SLICE_UM)
    z1 = max(SLICE_HALF_RANGE_UM, np.ceil(bottom.max() / SLICE_UM + 1) * SLICE_UM)
    slices = np.arange(z0, z1 + SLICE_UM / 2, SLICE_UM)
    grid = Grid(grid.x0_um, grid.y0_um, grid.shape, px, slices)
    density = rasterize(objects, grid)
    glow = None
    if body is not None:
        glow = body_density(body, grid, BODY_FRACTION * camera.peak_photons / (2 * body.radius_um))
        if worm is not None and worm.body_texture_sd > 0:  # no draws otherwise: samples unchanged
            sd = float(rng.uniform(0.0, worm.body_texture_sd))
            glow *= body_texture(rng, grid, sd, float(rng.uniform(*worm.body_texture_um)))
        if worm is not None and worm.body_brightness != (1.0, 1.0):  # likewise
            glow *= np.float32(np.exp(rng.uniform(*np.log(worm.body_brightness))))
        density += glow
    return objects, grid, density, glow


def default_z_um() -> np.ndarray:
    """Return the default focal positions: -10 to +10 µm in 0.5 µm steps (41 planes)."""
    return np.round(np.arange(-10.0, 10.0001, 0.5), 6)


def simulate_focal_stack(
    sample: SampleKind = "worm",
    *,
    shape: tuple[int, int] = (256, 256),
    z_um: np.ndarray | None = None,
    optics: OpticsConfig | None = None,
    camera: CameraConfig | None = None,
    seed: int = 0,
    focus_um: float = 0.0,
) -> FocalStack:
    """Simulate a wide-field focal stack of a random sample, with noise-free twin and truth.

    The focal planes sit at ``z_um + focus_um`` relative to the sample's reference plane
    (z positive = deeper); `FocalStack.z_um` holds those positions. Same `seed`, same stack.
    """
    optics = optics or OpticsConfig()
    camera = camera or CameraConfig()
    z = default_z_um() if z_um is None else np.asarray(z_um, dtype=np.float64).reshape(-1)
    if z.size == 0 or not np.all(np.isfinite(z)):
        raise ValueError(f"z_um must be a non-empty list of finite positions, got {z_um!r}")
    if len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"shape must be (H, W) with sides >= 8, got {shape!r}")
    shape = (int(shape[0]), int(shape[1]))
    focus = z + float(focus_um)
    rng = np.random.default_rng(seed)
    objects, grid, density, _ = make_sample(sample, shape, optics, camera, rng)
    rows, cols = frame_crop(grid, shape)
    photons = image_slices(density, grid.z_um, focus, optics)[:, rows, cols]
    photons += np.float32(camera.background_photons)
    return FocalStack(
        images=camera_counts(photons, camera, rng),
        clean=expected_counts(photons, camera),
        z_um=focus,
        objects=objects,
        pixel_size_um=optics.pixel_size_um,
    )


@dataclass(frozen=True)
class VolumePair:
    """Camera frames of a random sample and the sample itself on a depth grid (ground truth).

    The truth a volume Deep-Z model learns from: for each frame, the fluorophore density at
    depths ``focus_um[f] + depth_um`` relative to the frame's focal plane, in noise-free camera
    counts (photons · QE · gain, no offset or background), so that imaging it through the PSF
    at defocus 0 gives the frame's expected signal.

    Attributes
    ----------
    frames : (F, H, W) uint16 camera frames, with noise.
    focus_um : (F,) focal positions of the frames relative to the sample's reference plane.
    depth_um : (D,) depths of the object planes relative to each frame's focus (µm, + deeper).
    objects_counts : (F, D, H, W) float32 sample density per (0.5 µm slice, pixel), in counts.
    objects : ground-truth objects.
    background_counts : uniform background plus camera offset (counts), the same in every frame.
    """

    frames: np.ndarray
    focus_um: np.ndarray
    depth_um: np.ndarray
    objects_counts: np.ndarray
    objects: ObjectTable
    background_counts: float
    body_counts: np.ndarray | None = None
    """(F, H, W) float32: the worm body's diffuse glow alone in each frame (noise-free counts,
    no offset or background), when asked for (``body_glow=True``); zeros without a body."""


def simulate_volume_pair(
    sample: SampleKind = "beads",
    *,
    shape: tuple[int, int] = (256, 256),
    focus_um: np.ndarray | None = None,
    depth_um: np.ndarray | None = None,
    optics: OpticsConfig | None = None,
    camera: CameraConfig | None = None,
    seed: int = 0,
    worm: WormConfig | None = None,
    body_glow: bool = False,
    frame_points: Lateral = "linear",
) -> VolumePair:
    """Simulate frames of a random sample with its density on a depth grid around each focus.

    Focus positions and depths must lie on the simulator's 0.5 µm slice lattice, so the truth
    is the very density the frames were imaged from (no resampling). Same `seed`, same pair.
    `worm` shapes a worm sample's body and nuclei (default: the original worm). `body_glow`
    also images the body's diffuse density alone (`VolumePair.body_counts`): what a model must
    tell apart from the nuclei's light (the frames and truth are unchanged).

    `frame_points` is how the frames' image formation holds a bead between pixels
    (`deposit_point`): ``"linear"`` splits it between the four pixels around it, as the truth
    does, so the frames are imaged from the truth itself; ``"spline"`` holds it on the
    cubic-spline kernel, whose image is the pixel PSF moved to the bead (within 1–2 % of the
    light a camera's pixels collect; the split leaves a bead at a pixel corner about 25 % dim in
    focus: session 35). The truth keeps the split either way: it is the density the network
    learns to place, and a serve-time fit refits beads to the frame (`engine.point_fit`).
    """
    optics = optics or OpticsConfig()
    camera = camera or CameraConfig()
    focus = np.zeros(1) if focus_um is None else np.asarray(focus_um, dtype=np.float64).ravel()
    depth = default_z_um() if depth_um is None else np.asarray(depth_um, dtype=np.float64).ravel()
    for name, v in (("focus_um", focus), ("depth_um", depth)):
        steps = v / SLICE_UM
        if v.size == 0 or not np.allclose(steps, np.round(steps), atol=1e-6):
            raise ValueError(f"{name} must be non-empty multiples of {SLICE_UM} µm, got {v!r}")
    if frame_points not in ("linear", "spline"):
        raise ValueError(f"frame_points must be 'linear' or 'spline', not {frame_points!r}")
    shape = (int(shape[0]), int(shape[1]))
    rng = np.random.default_rng(seed)
    objects, grid, density, body = make_sample(sample, shape, optics, camera, rng, worm)
    rows, cols = frame_crop(grid, shape)
    imaged = density
    if frame_points != "linear":
        points = objects.take(is_point(objects, grid))
        imaged = density + rasterize(points, grid, lateral=frame_points) - rasterize(points, grid)
    photons = image_slices(imaged, grid.z_um, focus, optics)[:, rows, cols]
    photons += np.float32(camera.background_photons)
    frames = camera_counts(photons, camera, rng)
    scale = np.float32(camera.quantum_efficiency * camera.gain_counts_per_e)
    truth = np.zeros((focus.size, depth.size, *shape), dtype=np.float32)
    index = np.round((focus[:, None] + depth[None, :] - grid.z_um[0]) / SLICE_UM).astype(np.int64)
    inside = (index >= 0) & (index < grid.z_um.size)
    for f in range(focus.size):
        for k in np.flatnonzero(inside[f]):
            np.multiply(density[index[f, k], rows, cols], scale, out=truth[f, k])
    body_counts = None
    if body_glow:
        body_counts = np.zeros((focus.size, *shape), dtype=np.float32)
        if body is not None:
            body_counts[:] = image_slices(body, grid.z_um, focus, optics)[:, rows, cols] * scale
    return VolumePair(
        frames=frames,
        focus_um=focus,
        depth_um=depth,
        objects_counts=truth,
        objects=objects,
        background_counts=float(camera.background_photons * scale + camera.offset_counts),
        body_counts=body_counts,
    )
