"""Object-level read-outs: bead depth and width, a tilted plane in focus, nuclei depth."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engine.heldout.imaging import point_images
from engine.heldout.optics import PSF_SIZE_PX, SLICE_UM, IndependentOptics, truth_dz_um
from engine.heldout.refocusers import PlanesFn, SurfaceFn
from engine.heldout.samples import IndependentSample
from engine.metrics import gaussian_fwhm_2d, pearson, psnr, ssim

if TYPE_CHECKING:
    from engine.optics import Lateral


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
    return scored_beads(sample, DEPTH_BORDER_PX, min_sep_um)


def scored_beads(
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


def peak_position(profile: np.ndarray, grid: np.ndarray) -> float:
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


def _virtual_stack(
    planes_fn: PlanesFn, sample: IndependentSample, dz_grid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return (depths, stack): `sample`'s frame refocused onto `dz_grid`, both checked.

    `dz_grid` defaults to the truth grid (-10 ... +10 µm in 0.5 µm steps) and must hold at
    least 3 increasing depths; the stack must be (depths, H, W). The one way the depth
    read-outs make their virtual stack.
    """
    dz = truth_dz_um() if dz_grid is None else np.asarray(dz_grid, dtype=np.float64).ravel()
    if dz.size < 3 or np.any(np.diff(dz) <= 0):
        raise ValueError(f"dz_grid must be >= 3 increasing depths, got {dz_grid!r}")
    stack = np.asarray(planes_fn(sample.frame, dz), dtype=np.float32)
    if stack.shape != (dz.size, *sample.frame.shape):
        raise ValueError(
            f"planes_fn returned {stack.shape}, expected {(dz.size, *sample.frame.shape)}"
        )
    return dz, stack


def _truth_indices(sample: IndependentSample, dz: np.ndarray, name: str) -> list[int]:
    """Return the indices of `dz` (µm) among `sample`'s truth planes; ValueError if off them."""
    idx = [int(np.argmin(np.abs(sample.dz_um - v))) for v in dz]
    if any(abs(sample.dz_um[i] - v) > 1e-6 for i, v in zip(idx, dz, strict=True)):
        raise ValueError(
            f"{name} must lie on the truth grid {sample.dz_um[0]}..{sample.dz_um[-1]} step 0.5"
        )
    return idx


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
    dz, stack = _virtual_stack(planes_fn, sample, dz_grid)
    index, rows, cols = scored_beads(sample, DEPTH_BORDER_PX, min_sep_um)
    threshold = MIN_PEAK_SIGMA * sample.noise_sigma / 3.0
    est = np.full(index.size, np.nan)
    for j, (r, c) in enumerate(zip(rows, cols, strict=True)):
        profile = _local_peak_profile(stack, int(r), int(c))
        if profile.max() > threshold:
            est[j] = peak_position(profile, dz)
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
    dz, stack = _virtual_stack(planes_fn, sample, dz_grid)
    obj, px = sample.objects, sample.pixel_size_um
    index = scored_nuclei(sample, max_diameter_um=max_diameter_um, min_gap_um=min_gap_um)
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
            est[j] = peak_position(profile.astype(np.float64), dz)
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
        t = bead_images(sample, int(i), z, optics, PSF_SIZE_PX)[0].astype(np.float64)
        norm = float(np.sqrt(((t - t.mean()) ** 2).sum()))
        out[j] = float(sample.objects.intensity[i]) * norm / sample.noise_sigma
    return out


def bead_images(
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
    index, rows, cols = scored_beads(sample, DEPTH_BORDER_PX, min_sep_um)
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
    index, rows, cols = scored_beads(sample, DEPTH_BORDER_PX, min_sep_um)
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


INVENTED_MIN_SIGMA = 5.0
"""A spot of a virtual stack counts when its 3x3 mean stands 5x the 3x3 mean's camera noise
(σ/3) above the local background: at 3x (`MIN_PEAK_SIGMA`, enough to call a known bead found)
the unrefocused input's shot noise alone makes spots in every frame."""
SPOT_WINDOW_UM = 1.0
"""Half-width of the windows of `invented_spots`, in depth and laterally: as many whole planes
and pixels as fit within it (±2 planes of 0.5 µm; ±3 px of 0.3 µm, 0.9 µm, so 7 x 7 px). A spot
is the brightest point of its window; it is real when the truth holds light within it."""
SUPPORT_FRACTION = 0.5
"""... at least half as bright as the spot (both background-removed 3x3 means). With the
truth's own axial spread, a bead drawn up to about 2 µm from its depth is held (2.5 µm: not),
and one drawn twice as bright as the truth's is not (measured, review 70)."""


def _half_width(um: float, step: float) -> int:
    """Whole steps of `step` within `um` (floating-point slack: 1.0 / 0.5 is 2, 1.0 / 0.3 is 3)."""
    return int(um / step + 1e-9)


@dataclass(frozen=True, eq=False)
class InventedSpots:
    """The spots a refocused stack shows where the truth has nothing like them: its precision.

    The other read-outs look at each true bead or nucleus and so count only what a method
    misses; 40 bright beads invented beside a perfect refocus left them at 100 % (review 65).
    This one looks at every spot the method shows.

    Attributes
    ----------
    zyx : (N, 3) the spots (plane index on the grid, row, col).
    value : (N,) each spot's background-removed 3x3 mean (counts).
    invented : (N,) bool: the truth has no light at least `SUPPORT_FRACTION` as bright within
        `SPOT_WINDOW_UM` of it, or its brightest light there already holds a brighter spot.
    """

    zyx: np.ndarray
    value: np.ndarray
    invented: np.ndarray

    @property
    def count(self) -> int:
        """Number of spots the stack shows."""
        return int(self.value.size)

    @property
    def invented_count(self) -> int:
        """Number of them the truth does not hold."""
        return int(self.invented.sum())

    @property
    def invented_value(self) -> float:
        """Summed value of the invented spots.

        Over ``value.sum()``: the invented share of the light in spots (a faint ghost weighs
        less than a bright bead made up).
        """
        return float(self.value[self.invented].sum())


def spot_map(stack: np.ndarray) -> np.ndarray:
    """(P, H, W) 3x3 mean of each plane less its local background (about a 21x21 median).

    The background is the 21x21 median of a 3x sub-sampled plane (7x7 samples), repeated back
    to full size: the read-outs' 21x21 local median at a 50th of the cost.
    """
    from scipy import ndimage

    planes = np.asarray(stack, dtype=np.float32)
    _, h, w = planes.shape
    coarse = ndimage.median_filter(planes[:, ::3, ::3], size=(1, 7, 7), mode="nearest")
    bg = np.repeat(np.repeat(coarse, 3, axis=1), 3, axis=2)[:, :h, :w]
    out: np.ndarray = ndimage.uniform_filter(planes, size=(1, 3, 3), mode="nearest") - bg
    return out


def invented_spots(
    planes_fn: PlanesFn, sample: IndependentSample, dz_grid: np.ndarray | None = None
) -> InventedSpots:
    """Find every spot of the virtual stack and tell which ones the truth does not hold.

    The stack is ``planes_fn(frame, dz_grid)`` (default: the truth grid). A spot is a local
    maximum of `spot_map` within `SPOT_WINDOW_UM` above `INVENTED_MIN_SIGMA` times the
    3x3 mean's camera noise, at least `DEPTH_BORDER_PX` from the edge; a run of equal maxima
    (a flat profile, as the unrefocused input has at every bead) is one spot at its middle. It
    is invented when the truth's `spot_map` within `SPOT_WINDOW_UM` of it stays under
    `SUPPORT_FRACTION` of its value: a spot where nothing is, a bead drawn 2.5 µm or more from
    its depth, or one twice as bright as anything there; and when the brightest truth within
    that window already holds a brighter spot: a bead drawn twice. What the truth shows (a defocused
    bead's rings) is never invented: a perfect refocus shows the same. The threshold assumes
    the camera's white noise: an output of stronger or textured noise shows spots of it, and
    they count (the report's truth row gives the count a perfect refocus shows). The
    unrefocused input's identical planes make one spot per object at the middle of the grid
    (Δz 0 on the truth grid, where the frame is the truth): it invents next to nothing by
    construction, which makes it no precision baseline.
    """
    from scipy import ndimage

    dz = truth_dz_um() if dz_grid is None else np.asarray(dz_grid, dtype=np.float64).ravel()
    truth_at = _truth_indices(sample, dz, "dz_grid")  # (before the refocus: it takes seconds)
    _, stack = _virtual_stack(planes_fn, sample, dz)
    step, px = float(dz[1] - dz[0]), sample.pixel_size_um
    spots = spot_map(stack)
    truth = spot_map(sample.planes[truth_at])
    wz, wxy = _half_width(SPOT_WINDOW_UM, step), _half_width(SPOT_WINDOW_UM, px)
    window = (2 * wz + 1, 2 * wxy + 1, 2 * wxy + 1)
    peak = spots == ndimage.maximum_filter(spots, size=window, mode="nearest")
    peak &= spots > INVENTED_MIN_SIGMA * sample.noise_sigma / 3.0
    b = DEPTH_BORDER_PX
    peak[:, :b] = peak[:, -b:] = False
    peak[:, :, :b] = peak[:, :, -b:] = False
    labels, n = ndimage.label(peak, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        empty = np.zeros((0, 3), dtype=np.int64)
        return InventedSpots(zyx=empty, value=np.zeros(0), invented=np.zeros(0, dtype=bool))
    centres = np.rint(ndimage.center_of_mass(peak, labels, range(1, n + 1))).astype(np.int64)
    centres = centres.reshape(n, 3)
    values = spots[centres[:, 0], centres[:, 1], centres[:, 2]].astype(np.float64)
    support = ndimage.maximum_filter(truth, size=window, mode="nearest")
    held = support[centres[:, 0], centres[:, 1], centres[:, 2]]
    invented = held < SUPPORT_FRACTION * values
    # one truth peak holds one spot (review 83): a bead drawn twice, 2 px to either side or
    # 1 µm above and below, had both copies held by it. Each held spot is tied to the
    # brightest truth voxel of its window; of the spots tied to one voxel only the brightest
    # is held. The truth's own spots are its local maxima, each its own voxel: none lost.
    owner: dict[tuple[int, ...], int] = {}
    for j in np.argsort(-values, kind="stable"):
        if invented[j]:
            continue
        lo = np.maximum(centres[j] - (wz, wxy, wxy), 0)
        box = truth[lo[0] : centres[j, 0] + wz + 1, lo[1] : centres[j, 1] + wxy + 1][
            :, :, lo[2] : centres[j, 2] + wxy + 1
        ]
        at = tuple(int(v) for v in lo + np.unravel_index(int(np.argmax(box)), box.shape))
        if at in owner:
            invented[j] = True
        else:
            owner[at] = int(j)
    return InventedSpots(zyx=centres, value=values, invented=invented)


def plane_metrics(
    planes_fn: PlanesFn, sample: IndependentSample, dz: Sequence[float] | np.ndarray
) -> list[dict[str, float]]:
    """PSNR, SSIM and Pearson (`engine.metrics`) of refocused planes against the truth planes.

    `dz` must lie on the sample's truth grid (0.5 µm steps within ±10 µm).
    """
    d = np.atleast_1d(np.asarray(dz, dtype=np.float64))
    idx = _truth_indices(sample, d, "dz")
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
