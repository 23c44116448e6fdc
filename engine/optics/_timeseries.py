"""A moving, firing worm for the live simulated scope: fast frames at any time and focus.

Each nucleus's blurred image (its "footprint") at the current focus is computed once, in a
128-pixel patch, by the same slice ⊛ PSF image formation as the focal stacks; a frame is then
the activity-weighted sum of the footprints, shifted by the body's motion, on a diffuse body
background, through the camera model. Footprints are re-rendered only when focus drift moves
the focal plane by more than `FOCUS_STEP_UM`, so frames cost about a millisecond.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.sparse

from engine.optics._config import CameraConfig, OpticsConfig
from engine.optics._imaging import BODY_FRACTION, SLICE_UM, WORKERS, _otf, camera_counts
from engine.optics._samples import (
    Extent,
    Grid,
    ObjectTable,
    rasterize,
    worm_body,
    worm_nuclei,
)

PATCH_PX = 128
"""Side of the patch a nucleus's footprint is rendered in (covers ±20 µm defocus)."""
FOCUS_STEP_UM = 0.25
"""Footprints are rendered at the effective focus rounded to this step (µm)."""
MOTION_PX = 16
"""Largest body displacement (pixels) the canvas margin allows."""
BLOCK_S = 10.0
"""Spike trains are drawn in blocks of this many seconds, each from its own seed."""
FOOTPRINT_FLOOR_PHOTONS = 0.2
"""Footprint pixels dimmer than this are cropped away (far below any shot noise)."""


@dataclass(frozen=True)
class _Footprint:
    """A nucleus's image at one focus: `patch` (photons at activity 1) placed at (row, col)."""

    row: int
    col: int
    patch: np.ndarray


class WormTimeSeries:
    """Frames of a C. elegans-like head with GCaMP-like activity, body motion and focus drift.

    Time is ``index / rate_hz``. Activity: each nucleus fires at its own Poisson rate
    (0.05-0.5 Hz); a spike adds a transient rising in 0.1 s and decaying in 1 s on a 0.3
    baseline. Motion: smooth in-plane translation of a few µm (integer-pixel shifts) and a slow
    axial drift of up to ±1.5 µm. Frames use the camera model with Gaussian shot noise.
    """

    def __init__(
        self,
        shape: tuple[int, int] = (256, 256),
        *,
        optics: OpticsConfig | None = None,
        camera: CameraConfig | None = None,
        seed: int = 0,
        rate_hz: float = 100.0,
    ) -> None:
        if len(shape) != 2 or min(shape) < 8:
            raise ValueError(f"shape must be (H, W) with sides >= 8, got {shape!r}")
        if not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.optics = optics or OpticsConfig()
        self.camera = camera or CameraConfig()
        self.seed = int(seed)
        self.rate_hz = float(rate_hz)
        rng = np.random.default_rng(seed)
        px = self.optics.pixel_size_um
        h, w = self.shape
        frame = Extent(0.0, (w - 1) * px, 0.0, (h - 1) * px)
        reach = (PATCH_PX // 2 - MOTION_PX) * px
        extent = Extent(-reach, frame.x1_um + reach, -reach, frame.y1_um + reach)
        self.body = worm_body(rng, frame)
        self.objects = worm_nuclei(rng, self.body, extent, frame, self.camera, px)
        self._margin = PATCH_PX // 2 + MOTION_PX
        self._canvas_shape = (h + 2 * self._margin, w + 2 * self._margin)
        self._rates_hz = rng.uniform(0.05, 0.5, len(self.objects))
        self._phases = rng.uniform(0, 2 * np.pi, 5)
        self._nucleus_spectra()
        self._background = self._body_background()
        self._render = functools.lru_cache(maxsize=8)(self._render_uncached)

    # -- time courses -------------------------------------------------------------------------

    def time_s(self, index: int) -> float:
        """Time (s) of frame `index`."""
        return index / self.rate_hz

    def motion_um(self, index: int) -> tuple[float, float, float]:
        """Body displacement (dx, dy, dz) in µm at frame `index`; dz > 0 moves the worm deeper."""
        t = self.time_s(index)
        p = self._phases
        dx = 2.0 * np.sin(2 * np.pi * t / 17.0 + p[0]) + 1.0 * np.sin(2 * np.pi * t / 41.0 + p[1])
        dy = 1.5 * np.sin(2 * np.pi * t / 23.0 + p[2])
        dz = 1.2 * np.sin(2 * np.pi * t / 120.0 + p[3]) + 0.3 * np.sin(2 * np.pi * t / 400.0 + p[4])
        return float(dx), float(dy), float(dz)

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few blocks per instance, freed with it
    def _spikes(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spikes of all nuclei in one time block: (nucleus index, time s, amplitude)."""
        rng = np.random.default_rng([self.seed, 7, block])
        counts = rng.poisson(self._rates_hz * BLOCK_S)
        idx = np.repeat(np.arange(counts.size), counts)
        times = block * BLOCK_S + rng.uniform(0.0, BLOCK_S, idx.size)
        return idx, times, rng.uniform(0.5, 1.5, idx.size)

    def activity(self, index: int) -> np.ndarray:
        """GCaMP-like fluorescence (N,) of every nucleus at frame `index`, baseline 0.3."""
        t = self.time_s(index)
        block = int(np.floor(t / BLOCK_S))
        out = np.full(len(self.objects), 0.3)
        for b in (block - 1, block):
            if b < 0:
                continue
            idx, times, amps = self._spikes(b)
            dt = t - times
            past = dt > 0
            kernel = amps[past] * (1 - np.exp(-dt[past] / 0.1)) * np.exp(-dt[past] / 1.0)
            out += np.bincount(idx[past], weights=kernel, minlength=out.size)
        return out

    def truth(self, index: int) -> ObjectTable:
        """Ground-truth nuclei at frame `index`: moved positions and current intensities."""
        dx, dy, dz = self.motion_um(index)
        o = self.objects
        return o.replace(
            x_um=o.x_um + dx,
            y_um=o.y_um + dy,
            z_um=o.z_um + dz,
            intensity=o.intensity * self.activity(index),
        )

    # -- frames -------------------------------------------------------------------------------

    def frame(self, index: int, focus_um: float = 0.0) -> np.ndarray:
        """Camera frame (H, W) uint16 at frame `index` with the focal plane at `focus_um`.

        `focus_um` is relative to the worm's resting mid-plane (+ = deeper); drift adds to it.
        Noise is drawn from a generator seeded by (seed, index), so frames are reproducible.
        """
        photons = self.expected_photons(index, focus_um)
        rng = np.random.default_rng([self.seed, 11, index])
        return camera_counts(photons, self.camera, rng, exact=False)

    def expected_photons(self, index: int, focus_um: float = 0.0) -> np.ndarray:
        """Noise-free photons per pixel (H, W) float32 of frame `index` (before the camera)."""
        dx, dy, dz = self.motion_um(index)
        px = self.optics.pixel_size_um
        sx = int(np.clip(round(dx / px), -MOTION_PX, MOTION_PX))
        sy = int(np.clip(round(dy / px), -MOTION_PX, MOTION_PX))
        focus_key = round((focus_um - dz) / FOCUS_STEP_UM)
        canvas = self._render(focus_key) @ self.activity(index).astype(np.float32)
        canvas = canvas.reshape(self._canvas_shape)
        m = self._margin
        h, w = self.shape
        window = (slice(m - sy, m - sy + h), slice(m - sx, m - sx + w))
        out: np.ndarray = canvas[window] + self._background[window]
        out += np.float32(self.camera.background_photons)
        return out

    # -- rendering ----------------------------------------------------------------------------

    def _nucleus_spectra(self) -> None:
        """Rasterise each nucleus into thin slices and keep their patch spectra for rendering.

        Sets `_slice_z` (all slices' z, µm), `_spectra` (rfft2 of each slice centred in a
        `PATCH_PX` patch), `_ranges` (each nucleus's slice range) and `_centres` (row, col).
        """
        px = self.optics.pixel_size_um
        half = 12
        o = self.objects
        slabs: list[np.ndarray] = []
        zs: list[np.ndarray] = []
        self._ranges: list[tuple[int, int]] = []
        self._centres: list[tuple[int, int]] = []
        start = 0
        for i in range(len(o)):
            row, col = round(o.y_um[i] / px), round(o.x_um[i] / px)
            c = o.semi_axes_um[i, 2]
            z0 = np.floor((o.z_um[i] - c) / SLICE_UM - 1) * SLICE_UM
            z1 = np.ceil((o.z_um[i] + c) / SLICE_UM + 1) * SLICE_UM
            slices = np.arange(z0, z1 + SLICE_UM / 2, SLICE_UM)
            grid = Grid((col - half) * px, (row - half) * px, (2 * half, 2 * half), px, slices)
            one = o.replace(**{k: getattr(o, k)[i : i + 1] for k in o.__dataclass_fields__})
            box = rasterize(one, grid)
            keep = box.reshape(box.shape[0], -1).any(axis=1)
            slabs.append(box[keep])
            zs.append(slices[keep])
            self._ranges.append((start, start + int(keep.sum())))
            self._centres.append((row, col))
            start += int(keep.sum())
        batch = np.zeros((start, PATCH_PX, PATCH_PX), dtype=np.float32)
        c0 = PATCH_PX // 2 - half
        batch[:, c0 : c0 + 2 * half, c0 : c0 + 2 * half] = np.concatenate(slabs)
        self._spectra = scipy.fft.rfft2(batch, workers=WORKERS).astype(np.complex64)
        self._slice_z = np.concatenate(zs)

    def _render_uncached(self, focus_key: int) -> scipy.sparse.csc_matrix:
        """Footprints of all nuclei at effective focus ``focus_key · FOCUS_STEP_UM``."""
        focus = focus_key * FOCUS_STEP_UM
        uniq, inv = np.unique(np.round(focus - self._slice_z, 6), return_inverse=True)
        otf = _otf(self.optics, uniq, (PATCH_PX, PATCH_PX))
        summed = np.empty((len(self._ranges), *self._spectra.shape[1:]), dtype=np.complex64)
        tmp = np.empty(self._spectra.shape[1:], dtype=np.complex64)
        for n, (a, b) in enumerate(self._ranges):
            np.multiply(self._spectra[a], otf[inv[a]], out=summed[n])
            for k in range(a + 1, b):
                np.multiply(self._spectra[k], otf[inv[k]], out=tmp)
                summed[n] += tmp
        patches = scipy.fft.irfft2(summed, s=(PATCH_PX, PATCH_PX), workers=WORKERS)
        return self._footprint_matrix(
            [self._crop(r, c, patch) for (r, c), patch in zip(self._centres, patches, strict=True)]
        )

    def _footprint_matrix(self, footprints: list[_Footprint]) -> scipy.sparse.csc_matrix:
        """Sparse (canvas pixels × nuclei) matrix: canvas = matrix @ activity."""
        m = self._margin
        ch, cw = self._canvas_shape
        pixels, values, counts = [], [], []
        for fp in footprints:
            ph, pw = fp.patch.shape
            rows = np.arange(ph)[:, None] + (fp.row + m)
            cols = np.arange(pw)[None, :] + (fp.col + m)
            ok = (rows >= 0) & (rows < ch) & (cols >= 0) & (cols < cw)
            pixels.append((rows * cw + cols)[ok])
            values.append(fp.patch[ok])
            counts.append(int(ok.sum()))
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return scipy.sparse.csc_matrix(
            (np.concatenate(values), np.concatenate(pixels), indptr),
            shape=(ch * cw, len(footprints)),
            dtype=np.float32,
        )

    @staticmethod
    def _crop(row: int, col: int, patch: np.ndarray) -> _Footprint:
        """Trim a footprint patch to its pixels above `FOOTPRINT_FLOOR_PHOTONS`."""
        rows = np.flatnonzero((patch > FOOTPRINT_FLOOR_PHOTONS).any(axis=1))
        cols = np.flatnonzero((patch > FOOTPRINT_FLOOR_PHOTONS).any(axis=0))
        half = PATCH_PX // 2
        if rows.size == 0:
            return _Footprint(row, col, np.zeros((0, 0), dtype=np.float32))
        r0, r1, q0, q1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        sub = np.ascontiguousarray(patch[r0:r1, q0:q1], dtype=np.float32)
        return _Footprint(row - half + int(r0), col - half + int(q0), sub)

    def _body_background(self) -> np.ndarray:
        """Diffuse body autofluorescence (photons) on the frame plus motion margin, blurred."""
        px = self.optics.pixel_size_um
        m = self._margin
        h, w = self.shape[0] + 2 * m, self.shape[1] + 2 * m
        x = (np.arange(w) - m) * px
        y = (np.arange(h) - m) * px
        d = self.body.axis_distance_xy(x[None, :], y[:, None])
        r = self.body.radius_um
        chord = 2 * np.sqrt(np.clip(r**2 - d**2, 0, None))
        level = BODY_FRACTION * self.camera.peak_photons / (2 * r)
        blurred = scipy.ndimage.gaussian_filter(chord * level, sigma=2.0 / px)
        out: np.ndarray = blurred.astype(np.float32)
        return out
