"""Serve-time point fit: a volume model's beads refitted to the frame through its PSF bank.

A volume model's density holds a found bead about twice as wide as the truth's points, both
laterally and in depth (`engine.probes`: 0.38 against 0.21 µm FWHM), and a wide density
renders a wide, dim bead: at 2–4 µm from focus half the beads of a tilted plane come out more
than 20 % too dim, though the density's mass there is right (session 31). The network has done
the hard part — it found the bead, on the right side of focus, within a slice or two — and
what is left is what a fit does well when it is started near the answer: one point's image
through the microscope's PSF, matched to the frame. Single-molecule localisation works this
way (a detector, then a PSF fit per spot); so does the Deep-Z paper's bead analysis.

How (`fit_points`), each step one a newcomer can check:

1. **Blobs.** Local maxima of the density (3 × 3 × 3) at least `PointFit.min_peak_sigma`
   frame-noise SDs high, brightest first; each takes the 5 × 5 × 5 window around it of what
   the brighter ones left. A blob is *point-like* when its lateral SD is at most
   `max_sd_px`, its depth SD at most `max_sd_slices` (a found bead's density: 0.3–0.8 px,
   0.4–1 slices; a nucleus 2 µm across: over 1.5 px) and the 3 × 3 × 3 voxels around its
   maximum hold at least `min_core` of the window's mass. Extended objects and the density
   between blobs stay as the network made them.
2. **Fit.** For each point-like blob, brightest first, in a patch of ±`PATCH_HALF_PX`: the
   frame, minus the light of the rest of the model (the density rendered at focus through the
   bank, each blob as it now stands) and a background (what that light leaves unexplained,
   smoothed by `BACKGROUND_SIGMA_PX`), is one point's image and an offset. Its brightness and
   the offset come from least squares at each candidate position, and the position is the
   candidate that explains most of the patch: depth within ±`depth_search_slices` of the
   blob's centroid in 0.1-slice steps, on the network's side of focus (near focus a point
   and its mirror image look alike), then the lateral position within ±0.5 px in 0.1-px
   steps, then both once more. A point's image is what the model's renderer makes of it: the
   bank's planes for the voxels it is held on, linearly between the two slices around it and
   laterally on its taps (`engine.optics.lateral_weights`, as `deposit_point` holds it):
   split between the four pixels around it (the convention the density's training targets
   and a measured bank share, `engine.psf_calibration`), or with
   ``PointFit.lateral = "spline"`` on the cubic-spline kernel (`engine.optics.spline_taps`:
   a bead as a camera images it between pixels). Both are one separable product of the
   bank's planes with those taps (`_Patch.points`).
3. **Replace, or keep.** The blob becomes a point of the fitted brightness at the fitted
   position, held on the grid as the fit held it (`engine.optics.deposit_point`) — unless
   the fit found no positive brightness, the network hedged the bead (`HEDGE` of its mass
   again across focus: its split is kept), or the blob itself or a point blurred by
   `WIDER_PX` explains the patch clearly better
   (`SHAPE_MARGIN`: a nucleus the network holds as a compact blob stays a blob). The model is
   updated as each blob is decided, so two blobs never both take one bead's light;
   `passes` = 2 fits every blob again against the first pass's result.

Each rule is there because the evaluation without it was worse (`docs/evaluation/volume.md`,
session 31): through a measured bank the shipped model's tilted plane 57 / 41 → 64 / 64 % and
FWHM within 15 % 31 / 27 → 44 / 43 % (vectorial / pupil held-out sets), bead depth level.

The fit trusts the bank: through a bank that is not the microscope's (the training
simulator's on another objective) it fits the wrong PSF. Serve it through a bank measured on
the microscope (`engine.psf_calibration`, `load_backend(psf_bank=...)`). Beyond the network's
0.14 s, it costs 0.35–0.6 s per 256² frame of beads or nuclei holding points split between
pixels and 0.4–0.8 s holding them on the spline kernel, in numpy on one thread (2-core AMD
EPYC, shared; held-out bead and sphere frames through the shipped model; session 37's
separate spline path took 0.85–1.9 s): the candidates of each search are built at once from
the bank windows they share, one separable product for either convention (`_Patch.points`)
— offline refocusing and evaluation, not the 100 Hz live path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy import ndimage as ndi
from scipy.signal import convolve2d

from engine.optics import SPLINE_TAPS, Lateral, deposit_point, lateral_weights
from engine.volume import Renderer, defocus_index

__all__ = [
    "PATCH_HALF_PX",
    "PointFit",
    "PointFitResult",
    "fit_points",
    "frame_noise_sd",
    "point_image",
]

PATCH_HALF_PX = 20
"""Half side of the patch a point is fitted in (px): a bead 6 µm from focus spreads over a
ring about 13 px in radius through the shipped optics (NA 0.75, 0.3 µm pixels)."""
WINDOW_HALF = 2
"""A blob's window: ±2 slices and ±2 px around its maximum."""
WIDER_PX = (1.0, 2.0)
"""Blurs (Gaussian SD, px) of the fitted point's image: if one of them (or the blob) explains
the patch clearly better than the sharp point, the object is wider than a point, and stays."""
HEDGE = 0.25
"""Mass on the other side of focus, as a share of a blob's, that marks it hedged (`_hedged`)."""
SHAPE_MARGIN = 10.0
"""How much more of the frame (in one pixel's residual variance) another shape must explain
than the point, for the blob to be kept."""
BACKGROUND_SIGMA_PX = 16.0
"""The fit's background: what the density's light leaves unexplained in the frame, smoothed
by this Gaussian (px). Much wider than a bead's ring, so a blob that starts too dim does not
have its missing light taken for background (the renderer's own residual, 4 px, kept a fit
started at 70 % of a bead 3 µm from focus at 70–80 %; this one at 87–100 %)."""


@dataclass(frozen=True)
class PointFit:
    """Settings of the serve-time point fit (`fit_points`)."""

    max_sd_px: float = 1.3
    """A blob is point-like up to this lateral SD of its density (px)."""
    max_sd_slices: float = 2.0
    """... and up to this SD in depth (depth-grid slices)."""
    min_core: float = 0.5
    """... and hold at least this share of its window's mass in the 3 × 3 × 3 voxels around
    its maximum (a found bead: 0.9–1; a nucleus in a crowd, or a bump in a worm's body: 0.1–0.3;
    session 31, `docs/evaluation/volume.md`)."""
    min_peak_sigma: float = 6.0
    """A blob's maximum must be this many frame-noise SDs (`frame_noise_sd`)."""
    depth_search_slices: float = 2.0
    """Depth searched on each side of the blob's centroid (slices)."""
    passes: int = 2
    lateral: Lateral = "linear"
    """How a fitted point sits between pixels (`engine.optics.deposit_point`): "linear", split
    between the four pixels around it as the training targets hold a point; "spline", a
    cubic-spline kernel that renders the bank's pixel PSF moved to the point, as a camera
    images a point between its pixels (the split renders one at a pixel corner 25 % dim in
    focus, out of any tilted-plane or FWHM tolerance: session 35). Serve "spline" through a
    bank measured in the same convention (`engine.psf_calibration --lateral spline`)."""

    def __post_init__(self) -> None:
        """Refuse settings that cannot describe a fit, naming the field."""
        if self.lateral not in ("linear", "spline"):
            raise ValueError(f"PointFit.lateral must be 'linear' or 'spline', not {self.lateral!r}")
        for name in ("max_sd_px", "max_sd_slices", "min_peak_sigma", "depth_search_slices"):
            if not getattr(self, name) > 0:
                raise ValueError(f"PointFit.{name} must be > 0, not {getattr(self, name)!r}")
        if not 0 <= self.min_core <= 1:
            raise ValueError(f"PointFit.min_core must be within 0..1, not {self.min_core!r}")
        if self.passes < 1:
            raise ValueError(f"PointFit.passes must be >= 1, not {self.passes!r}")


@dataclass(frozen=True)
class PointFitResult:
    """A density with its point-like blobs refitted, and what the fit did."""

    density: np.ndarray
    """(D, H, W) float32 counts."""
    blobs: int
    """Point-like blobs found."""
    fitted: int
    """Of those, replaced by a fitted point (the rest kept as the network made them)."""


@dataclass
class _Blob:
    box: tuple[int, int, int, int, int, int]  # z0, z1, r0, r1, c0, c1 of its window
    window: np.ndarray  # the density it took
    point: tuple[float, float, float, float] | None = None  # brightness, slice, row, col


def frame_noise_sd(frame: np.ndarray) -> float:
    """Robust SD of a frame's pixel noise (counts), from neighbouring pixels' differences.

    Objects are smooth over two pixels next to noise that is not, so the median absolute
    difference of horizontal neighbours, over √2 and the normal's 0.6745, is the noise's SD
    on a frame of sparse objects (a camera's read noise with the background's shot noise).
    """
    diff = np.diff(np.asarray(frame, dtype=np.float64), axis=1)
    mad = float(np.median(np.abs(diff - np.median(diff))))
    return max(mad / (0.6745 * float(np.sqrt(2.0))), 1e-6)


def _blobs(density: np.ndarray, fit: PointFit, min_peak: float) -> tuple[np.ndarray, list[_Blob]]:
    """Split `density` into what is left and its point-like blobs (step 1 of the module)."""
    rest = density.copy()
    d, h, w = density.shape
    peaks = (density == ndi.maximum_filter(density, size=3)) & (density >= min_peak)
    zs, rs, cs = np.nonzero(peaks)
    found: list[_Blob] = []
    for i in np.argsort(-density[zs, rs, cs], kind="stable"):
        z, r, c = int(zs[i]), int(rs[i]), int(cs[i])
        if rest[z, r, c] < min_peak:  # taken by a brighter blob's window
            continue
        k = WINDOW_HALF
        z0, z1, r0, r1 = max(z - k, 0), min(z + k + 1, d), max(r - k, 0), min(r + k + 1, h)
        c0, c1 = max(c - k, 0), min(c + k + 1, w)
        win = rest[z0:z1, r0:r1, c0:c1]
        mass = float(win.sum())
        zz, yy, xx = np.meshgrid(
            np.arange(z0, z1), np.arange(r0, r1), np.arange(c0, c1), indexing="ij"
        )
        cz, cy, cx = (float((win * a).sum()) / mass for a in (zz, yy, xx))
        sd_z = np.sqrt(float((win * (zz - cz) ** 2).sum()) / mass)
        sd_xy = np.sqrt(float((win * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()) / (2 * mass))
        core = float(
            rest[max(z - 1, 0) : z + 2, max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].sum()
        )
        if sd_xy > fit.max_sd_px or sd_z > fit.max_sd_slices or core < fit.min_core * mass:
            continue
        found.append(_Blob((z0, z1, r0, r1, c0, c1), win.copy()))
        rest[z0:z1, r0:r1, c0:c1] = 0
    return rest, found


def _assemble(rest: np.ndarray, blobs: list[_Blob], lateral: Lateral) -> np.ndarray:
    """Return the density: what no blob took, each blob as its window or its fitted point."""
    out = rest.copy()
    for b in blobs:
        if b.point is None:
            z0, z1, r0, r1, c0, c1 = b.box
            out[z0:z1, r0:r1, c0:c1] += b.window
        else:
            deposit_point(out, *b.point, lateral=lateral)
    return out


def _reach(lateral: Lateral) -> tuple[int, int]:
    """Return the first and last pixel a point is held on laterally, from the one below it.

    (0, 1) for ``"linear"``, (-SPLINE_TAPS, SPLINE_TAPS) for ``"spline"``: where
    `engine.optics.lateral_weights` puts its weights.
    """
    first, taps = lateral_weights(0.0, lateral)
    return first, first + taps.size - 1


class _Patch:
    """One blob's patch of the frame, and the images of points in it through the bank."""

    def __init__(
        self,
        psf: np.ndarray,
        seen: np.ndarray,
        rows: tuple[int, int],
        cols: tuple[int, int],
        lateral: Lateral = "linear",
        shape: tuple[int, int] | None = None,
    ) -> None:
        self.psf, self.seen, self.rows, self.cols = psf, seen, rows, cols
        self.lateral = lateral
        self.shape = shape  # the frame's (H, W): a point's taps off it are not held
        self.centre = psf.shape[-1] // 2

    def point(self, z: float, r: float, c: float) -> np.ndarray:
        """Image in the patch of a unit point at continuous (slice, row, col), as rendered."""
        out: np.ndarray = self.points([(z, r, c)])[0]
        return out

    def points(self, candidates: list[tuple[float, float, float]]) -> np.ndarray:
        """Images (N, ...) of unit points at continuous (slice, row, col) each, as rendered.

        Each point is held as `engine.optics.deposit_point` holds it: linearly between the two
        slices around it, and along rows and columns on its ``lateral`` taps
        (`engine.optics.lateral_weights`: 1 - f and f on its pixel and the next, or the
        cubic-spline kernel's 2·SPLINE_TAPS + 1 around it; taps off the frame, `shape`, left
        out as `deposit_point` leaves them out), each voxel seen through its slice's bank plane
        (the sum the renderer does over those voxels). So its image is a separable product:
        its slices' bank planes, cut as much wider than the patch as its taps reach, convolved
        along the columns with its column taps, then summed over depth and rows with its slice
        weights times its row taps. Candidates whose pixels lie in one 2 × 2 block (a search's
        ±0.5 px) share those windows: the column pass is one matrix product over the distinct
        columns they sit at, and the depth-and-row pass one for each of those columns.
        """
        first, _ = _reach(self.lateral)
        o, (p0, p1), (q0, q1) = self.centre, self.rows, self.cols
        h, w = p1 - p0, q1 - q0
        out = np.zeros((len(candidates), h, w))
        if not candidates:
            return out
        at = np.asarray(candidates, dtype=np.float64).reshape(-1, 3)
        base = np.floor(at).astype(np.int64)
        frac = at - base
        ty, tx = self._taps(frac[:, 1], base[:, 1], 0), self._taps(frac[:, 2], base[:, 2], 1)
        reach = ty.shape[1]
        # each candidate on the slice below it (1 - f) and the one above (f), where it is held
        slices = base[:, :1] + np.arange(2)
        wz = np.stack([1 - frac[:, 0], frac[:, 0]], axis=1)
        held = (wz > 0) & (slices >= 0) & (slices < self.seen.size)
        cell = (base[:, 1:] - base[:, 1:].min(axis=0)) // 2
        _, group = np.unique(cell[:, 0] * (cell[:, 1].max() + 1) + cell[:, 1], return_inverse=True)
        group = group.ravel()
        for members in np.split(
            np.argsort(group, kind="stable"), np.cumsum(np.bincount(group))[:-1]
        ):
            ks = np.unique(slices[members][held[members]])  # the group's slices
            if not ks.size:
                continue
            depth = np.zeros((members.size, ks.size))  # each candidate's weight on each
            for j in (0, 1):
                on = held[members, j]
                depth[on, np.searchsorted(ks, slices[members[on], j])] = wz[members[on], j]
            r, c = base[members, 1], base[members, 2]
            r0, c0 = int(r.min()), int(c.min())
            ny, nx = reach + int(r.max()) - r0, reach + int(c.max()) - c0  # the group's taps
            # tap i sits on pixel r0 + first + i and moves the plane there: in the window cut
            # for all of them it is the shift ny - 1 - i (the taps reversed)
            u = self.psf[
                self.seen[ks],
                o + p0 - (r0 + first + ny - 1) : o + p1 - (r0 + first),
                o + q0 - (c0 + first + nx - 1) : o + q1 - (c0 + first),
            ]  # (S, h + ny - 1, w + nx - 1)
            n = np.arange(members.size)[:, None]
            wy = np.zeros((members.size, ny))
            wy[n, ny - 1 - (r - r0)[:, None] - np.arange(reach)] = ty[members]
            rows = (depth[:, :, None] * wy[:, None, :]).reshape(members.size, -1)  # (N, S·ny)
            # along the columns once for each distinct column the candidates sit at
            _, one, column = np.unique(at[members, 2], return_index=True, return_inverse=True)
            wx = np.zeros((one.size, nx))
            b = np.arange(one.size)[:, None]
            wx[b, nx - 1 - (c[one] - c0)[:, None] - np.arange(reach)] = tx[members[one]]
            sz, sr, sc = u.strides
            shifts = as_strided(u, (ks.size, h + ny - 1, w, nx), (sz, sr, sc, sc), writeable=False)
            moved = np.tensordot(wx, shifts, axes=(1, 3))  # (B, S, h + ny - 1, w)
            sz, sr, sc = moved.strides[1:]
            column = column.ravel()
            for k in range(one.size):  # then along depth and rows, each column's candidates
                sel = members[column == k]
                win = as_strided(moved[k], (ks.size, ny, h, w), (sz, sr, sr, sc), writeable=False)
                out[sel] = (rows[column == k] @ win.reshape(-1, h * w)).reshape(-1, h, w)
        return out

    def _taps(self, frac: np.ndarray, base: np.ndarray, axis: int) -> np.ndarray:
        """(N, L) lateral taps along `axis` of points `frac` px past pixels `base`, on the frame.

        As `engine.optics.lateral_weights` gives them (one call for each distinct `frac`: a
        search's candidates share a few), with those on pixels off the frame (`shape`) zeroed.
        """
        values, which = np.unique(frac, return_inverse=True)
        taps = np.stack([lateral_weights(float(f), self.lateral)[1] for f in values])
        out: np.ndarray = taps[which.ravel()]
        if self.shape is not None:
            first, last = _reach(self.lateral)
            pixel = base[:, None] + np.arange(first, last + 1)
            out = np.where((pixel >= 0) & (pixel < self.shape[axis]), out, 0.0)
        return out

    def window(self, blob: _Blob) -> np.ndarray:
        """Image in the patch of a blob's window of density (each slice one 2-D convolution)."""
        z0, _, r0, r1, c0, c1 = blob.box
        o, (p0, p1), (q0, q1) = self.centre, self.rows, self.cols
        out = np.zeros((p1 - p0, q1 - q0))
        for k, plane in enumerate(blob.window):
            # the bank plane over every pixel the window's pixels shift it to: a 'valid'
            # convolution with the window's slice places each pixel's PSF in the patch
            psf = self.psf[self.seen[z0 + k]]
            span = psf[o + p0 - r1 + 1 : o + p1 - r0, o + q0 - c1 + 1 : o + q1 - c0]
            out += convolve2d(span, plane, mode="valid")
        return out


def point_image(
    psf: np.ndarray,
    depth_um: np.ndarray,
    position: tuple[float, float, float],
    rows: tuple[int, int],
    cols: tuple[int, int],
    lateral: Lateral = "linear",
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Image at focus of a unit point, in the frame's `rows` × `cols` window, as rendered.

    `position` is (slice, row, col), continuous, on the depth grid `depth_um` whose planes
    `psf` (a bank, as `Renderer` takes it) renders; the point is held as
    `engine.optics.deposit_point` holds it (`lateral`) and the renderer renders it. What the
    fit compares with the frame. `shape`: the frame's (H, W), where a point near its edge
    loses the taps that fall off it.
    """
    side, o = psf.shape[-1], psf.shape[-1] // 2
    reach = _reach(lateral)
    for (lo, hi), at in ((rows, position[1]), (cols, position[2])):
        first = int(np.floor(at))  # the pixels the point is held on: first + reach
        if o + lo - (first + reach[1]) < 0 or o + hi - (first + reach[0]) > side:
            raise ValueError(
                f"window {lo}..{hi} reaches past the bank's {side}-px planes around {at:g}"
            )
    seen = defocus_index(np.zeros(1), np.asarray(depth_um, dtype=np.float64))[0]
    return _Patch(psf, seen, rows, cols, lateral, shape).point(*position)


def _explained(images: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit `data` by each of `images` (N, ...) times a scale, plus an offset (least squares).

    Returns the variance each explains (0 where its best scale is not positive) and the scales.
    """
    t = images.reshape(images.shape[0], -1)
    tc = t - t.mean(axis=1, keepdims=True)
    y = data.ravel() - data.mean()
    cov = tc @ y
    var = np.maximum((tc * tc).sum(axis=1), 1e-12)
    return np.where(cov > 0, cov**2 / var, 0.0), cov / var


def _best(
    patch: _Patch, data: np.ndarray, candidates: list[tuple[float, float, float]]
) -> tuple[tuple[float, float, float], float, float]:
    """Return the candidate whose point image best explains `data`, its scale and score."""
    score, scale = _explained(patch.points(candidates), data)
    i = int(np.argmax(score))
    return candidates[i], float(scale[i]), float(score[i])


def _hedged(density: np.ndarray, blob: _Blob, focus: float, row: int, col: int) -> bool:
    """Say whether the network hedged this bead: `HEDGE` of its mass again across focus.

    That is, in its column on the other side of focus (outside its window). Near focus a point
    and its mirror image look alike in the frame, so a fit would re-split the two by noise;
    the network's split carries what it read from the aberration, and is kept.
    """
    z0, z1 = blob.box[0], blob.box[1]
    column = density[:, max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].sum(axis=(1, 2))
    column[z0:z1] = 0
    index = np.arange(column.size)
    other = index < focus if (z0 + z1 - 1) / 2 >= focus else index > focus
    return float(column[other].sum()) >= HEDGE * float(blob.window.sum())


def fit_points(
    density: np.ndarray,
    frame: np.ndarray,
    renderer: Renderer,
    psf: np.ndarray,
    fit: PointFit | None = None,
) -> PointFitResult:
    """Refit a volume model's point-like blobs to its frame through `psf` (see the module).

    `density` is the (D, H, W) density in counts on `renderer`'s depth grid, `frame` the
    (H, W) frame it came from, `renderer` one built on `psf` (the bank the planes are served
    through: the model's own or a measured one) for the frame's shape.
    """
    fit = fit or PointFit()
    dens = np.maximum(np.asarray(density, dtype=np.float32), 0)
    # the widest window a candidate is cut from a plane with (a spline point's: the linear
    # one's and a blob's, `_Patch.window`, are narrower); a narrow bank is zero beyond its
    # side, so padding it is exact
    need = 2 * (PATCH_HALF_PX + SPLINE_TAPS + 1) + 1
    if psf.shape[-1] < need:
        pad = (need - psf.shape[-1]) // 2
        psf = np.pad(psf, ((0, 0), (pad, pad), (pad, pad)))
    if dens.ndim != 3 or dens.shape[1:] != frame.shape or dens.shape[1:] != renderer.shape:
        raise ValueError(
            f"density {dens.shape}, frame {frame.shape} and renderer {renderer.shape} disagree"
        )
    d, h, w = dens.shape
    seen = defocus_index(np.zeros(1), renderer.depth_um)[0]
    focus = float(np.interp(0.0, renderer.depth_um, np.arange(d)))  # slice index of focus
    rest, blobs = _blobs(dens, fit, fit.min_peak_sigma * frame_noise_sd(frame))
    pixels = np.asarray(frame, dtype=np.float64)
    steps = np.arange(-5, 6) / 10  # ±0.5 px in 0.1 px
    for _ in range(fit.passes):
        current = _assemble(rest, blobs, fit.lateral)
        # the frame as the model explains it: its light, and a background that is what the
        # light leaves unexplained, smoothed well beyond a bead's ring (else a dim start's
        # missing light would be taken for background and keep the fit dim)
        light = renderer.render(current, np.zeros(1))[0]
        model = light + ndi.gaussian_filter(pixels - light, BACKGROUND_SIGMA_PX, mode="nearest")
        for b in blobs:
            z0, z1, r0, r1, c0, c1 = b.box
            if b.point is None:  # start at the window's centroid
                win = b.window
                grid = np.meshgrid(
                    np.arange(z0, z1), np.arange(r0, r1), np.arange(c0, c1), indexing="ij"
                )
                mass = float(win.sum())
                cz, cy, cx = (float((win * g).sum()) / mass for g in grid)
            else:
                _, cz, cy, cx = b.point
            ry, rx = round(cy), round(cx)
            if _hedged(dens, b, focus, ry, rx):
                continue
            rows = (max(ry - PATCH_HALF_PX, 0), min(ry + PATCH_HALF_PX + 1, h))
            cols = (max(rx - PATCH_HALF_PX, 0), min(rx + PATCH_HALF_PX + 1, w))
            patch = _Patch(psf, seen, rows, cols, fit.lateral, (h, w))
            blob = patch.window(b)  # the network's blob, as the frame would show it
            own = blob if b.point is None else b.point[0] * patch.point(cz, cy, cx)
            data = pixels[rows[0] : rows[1], cols[0] : cols[1]]
            data = data - model[rows[0] : rows[1], cols[0] : cols[1]] + own
            z, y, x, scale, score = cz, cy, cx, float("nan"), 0.0
            # never across focus: which side a bead is on the network reads far better than
            # a fit near focus can (there a point and its mirror image look alike)
            reach = fit.depth_search_slices
            lo = cz - reach if cz < focus else max(cz - reach, focus)
            hi = cz + reach if cz > focus else min(cz + reach, focus)
            depths = np.arange(lo, hi + 1e-9, 0.1)
            depths = np.unique(np.clip(np.append(depths, cz), 0, d - 1))
            for _ in range(2):
                (z, _, _), scale, score = _best(patch, data, [(float(u), y, x) for u in depths])
                shifts = [(z, cy + dr, cx + dc) for dr in steps for dc in steps]
                (_, y, x), scale, score = _best(patch, data, shifts)
            # a point only where no other shape explains the frame clearly better: not the
            # blob, nor a point blurred by a pixel or two (a nucleus 1-4 µm across, which the
            # network may hold as a compact blob, is wider than a point in the frame).
            # "Clearly": by more than SHAPE_MARGIN times the variance of one pixel's residual,
            # so noise alone does not turn a defocused bead's broad ring into a blob.
            point = patch.point(z, y, x)
            others = np.stack([blob, *(ndi.gaussian_filter(point, s) for s in WIDER_PX)])
            rival = float(_explained(others, data)[0].max())
            residual = max(float(((data - data.mean()) ** 2).sum()) - score, 0.0) / data.size
            if np.isfinite(scale) and scale > 0 and rival - score <= SHAPE_MARGIN * residual:
                b.point = (scale, z, y, x)
                new = scale * point
            else:
                b.point, new = None, blob
            # the next blobs see this one as it now is (two blobs that share a bead's light,
            # a bead and its hedge on the other side of focus, would each take all of it)
            model[rows[0] : rows[1], cols[0] : cols[1]] += new - own
    fitted = sum(b.point is not None for b in blobs)
    return PointFitResult(
        density=_assemble(rest, blobs, fit.lateral), blobs=len(blobs), fitted=fitted
    )
