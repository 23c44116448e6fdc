"""Simulated samples: a C. elegans-like head with nuclei, sub-resolution beads, diffuse body.

Objects live in sample coordinates (µm): x to the right and y down from the centre of the
frame's top-left pixel, z along the optical axis (positive = deeper, further from the
objective) from the sample's reference plane (the worm's mid-plane). `rasterize` turns an
object list into photon densities on a grid of thin z slices for image formation.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from engine.optics._config import CameraConfig, WormConfig


@dataclass(frozen=True)
class ObjectTable:
    """Ground truth of a simulated sample: one row per object (nucleus or bead).

    Attributes
    ----------
    x_um, y_um, z_um : (N,) centre positions in sample coordinates (µm).
    semi_axes_um : (N, 3) ellipsoid semi-axes (µm) along the object's own x, y and the z axis.
    angle_rad : (N,) in-plane rotation of the ellipsoid.
    intensity : (N,) photons the object sends into the objective per exposure (before QE).
    kind : (N,) ``"nucleus"`` or ``"bead"``.
    """

    x_um: np.ndarray
    y_um: np.ndarray
    z_um: np.ndarray
    semi_axes_um: np.ndarray
    angle_rad: np.ndarray
    intensity: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return int(self.x_um.shape[0])

    @property
    def radius_um(self) -> np.ndarray:
        """Mean semi-axis of each object (µm), a single size figure per object."""
        r: np.ndarray = self.semi_axes_um.mean(axis=1)
        return r

    def replace(self, **changes: np.ndarray) -> ObjectTable:
        """Copy with some columns replaced (e.g. moved positions or new intensities)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields.update(changes)
        return ObjectTable(**fields)

    def take(self, rows: np.ndarray) -> ObjectTable:
        """Copy holding only `rows` (a boolean mask or indices)."""
        return ObjectTable(**{n: getattr(self, n)[rows] for n in self.__dataclass_fields__})

    @staticmethod
    def concat(*tables: ObjectTable) -> ObjectTable:
        """Stack several tables into one."""
        names = list(ObjectTable.__dataclass_fields__)
        cols = {n: np.concatenate([getattr(t, n) for t in tables]) for n in names}
        return ObjectTable(**cols)


@dataclass(frozen=True)
class WormBody:
    """A curved tube lying on its side: centre line y = y_mid + amp·sin(k·x + phase), z = z_mid."""

    y_mid_um: float
    amp_um: float
    k_per_um: float
    phase: float
    radius_um: float
    z_mid_um: float = 0.0

    def axis_distance_xy(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Approximate in-plane distance (µm) from points to the centre line."""
        arg = self.k_per_um * x_um + self.phase
        yc = self.y_mid_um + self.amp_um * np.sin(arg)
        slope = self.amp_um * self.k_per_um * np.cos(arg)
        d: np.ndarray = np.abs(y_um - yc) / np.sqrt(1.0 + slope**2)
        return d


@dataclass(frozen=True)
class Extent:
    """A rectangle of the sample plane (µm), usually the frame plus a margin for blur."""

    x0_um: float
    x1_um: float
    y0_um: float
    y1_um: float


def worm_body(
    rng: np.random.Generator, frame_extent: Extent, worm: WormConfig | None = None
) -> WormBody:
    """Draw a random curved worm body crossing the frame along x, 22-28 µm thick.

    Its axis lies at the mid-plane, or with ``worm.axis_depth_um`` at a depth drawn within
    ±that (drawn last: the original worm's draws are unchanged).
    """
    height = frame_extent.y1_um - frame_extent.y0_um
    width = frame_extent.x1_um - frame_extent.x0_um
    body = WormBody(
        y_mid_um=frame_extent.y0_um + height * rng.uniform(0.4, 0.6),
        amp_um=height * rng.uniform(0.05, 0.15),
        k_per_um=2 * np.pi / (width * rng.uniform(1.5, 3.0)),
        phase=rng.uniform(0, 2 * np.pi),
        radius_um=rng.uniform(11.0, 14.0),
    )
    if worm is None or worm.axis_depth_um == 0:
        return body
    depth = worm.axis_depth_um
    return dataclasses.replace(body, z_mid_um=float(rng.uniform(-depth, depth)))


def worm_nuclei(
    rng: np.random.Generator,
    body: WormBody,
    extent: Extent,
    frame_extent: Extent,
    camera: CameraConfig,
    pixel_size_um: float,
    worm: WormConfig | None = None,
) -> ObjectTable:
    """100-200 nuclei (in the frame) of 2-3 µm diameter packed inside the worm body.

    Nuclei are spread through the body's volume (rejection sampling, at least 2.8 µm apart),
    with log-normal brightness and a GCaMP-like snapshot activity between 0.3 and 1. With
    ``worm.nucleus_diameter_um`` their sizes span that range instead: each centre at least
    0.3 µm plus the two drawn radii from its neighbours', then each semi-axis within ±10 % of
    the drawn radius (so surfaces may come closer than 0.3 µm, never overlapping for ranges up
    to 4 µm); centres stay within 0.85 of the body's radius, so the largest nuclei may bulge
    a fraction of a µm out of it (recipe 34 trained on exactly this).
    """
    sizes = None if worm is None else worm.nucleus_diameter_um
    frame_len = frame_extent.x1_um - frame_extent.x0_um
    n_frame = int(rng.integers(100, 201))
    n_total = round(n_frame * (extent.x1_um - extent.x0_um) / frame_len)
    pts: list[tuple[float, float, float]] = []
    diameters: list[float] = []
    r_max = 0.85 * body.radius_um
    tries = 0
    while len(pts) < n_total and tries < 200 * n_total:
        tries += 1
        d = 0.0 if sizes is None else float(rng.uniform(*sizes))
        x = rng.uniform(extent.x0_um, extent.x1_um)
        off, z = rng.uniform(-r_max, r_max, size=2)
        if off**2 + z**2 > r_max**2:
            continue
        arg = body.k_per_um * x + body.phase
        y = body.y_mid_um + body.amp_um * np.sin(arg) + off
        z += body.z_mid_um
        if sizes is None:  # centre to centre at least 2.8 µm
            free = all((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2 > 2.8**2 for p in pts)
        else:  # the two drawn radii and 0.3 µm apart
            free = all(
                (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2 > ((d + e) / 2 + 0.3) ** 2
                for p, e in zip(pts, diameters, strict=True)
            )
        if free:
            pts.append((x, float(y), float(z)))
            diameters.append(d)
    xyz = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    n = xyz.shape[0]
    if sizes is None:
        axes = np.stack(
            [rng.uniform(1.0, 1.5, n), rng.uniform(0.9, 1.3, n), rng.uniform(1.0, 1.4, n)], axis=1
        )
    else:  # ellipsoids within ±10 % of each drawn diameter
        half = np.asarray(diameters)[:, None] / 2
        axes = half * rng.uniform(0.9, 1.1, (n, 3))
    return _nuclei(rng, xyz, axes, camera, pixel_size_um)


def _nuclei(
    rng: np.random.Generator,
    xyz: np.ndarray,
    axes: np.ndarray,
    camera: CameraConfig,
    pixel_size_um: float,
) -> ObjectTable:
    """Nuclei at `xyz` with semi-axes `axes`: brightness and in-plane angle drawn, in that order.

    Log-normal brightness times a GCaMP-like snapshot activity in 0.3-1 (the dimmest about a
    tenth of the brightest), as `nucleus_photons` turns into photons.
    """
    n = int(xyz.shape[0])
    brightness = rng.lognormal(0.0, 0.3, n) * rng.uniform(0.3, 1.0, n)
    return ObjectTable(
        x_um=xyz[:, 0],
        y_um=xyz[:, 1],
        z_um=xyz[:, 2],
        semi_axes_um=axes,
        angle_rad=rng.uniform(0, np.pi, n),
        intensity=nucleus_photons(axes, brightness, camera.peak_photons, pixel_size_um),
        kind=np.full(n, "nucleus", dtype="<U8"),
    )


def nucleus_photons(
    axes_um: np.ndarray, brightness: np.ndarray, peak_photons: float, pixel_size_um: float
) -> np.ndarray:
    """Photons of nuclei whose pixel column through the centre holds ``brightness·peak``.

    The column of a uniform ellipsoid through its centre holds ``V / (2/3·π·a·b)`` of its
    volume per µm², so the total is ``peak · (2/3)·π·a·b / pixel_area``.
    """
    area = (2.0 / 3.0) * np.pi * axes_um[:, 0] * axes_um[:, 1] / pixel_size_um**2
    out: np.ndarray = brightness * peak_photons * area
    return out


def _over_extent(n_frame: int, extent: Extent, frame_extent: Extent) -> int:
    """Return how many of objects spread evenly, `n_frame` in the frame, the drawn extent holds.

    The extent is the frame plus the blur margin, whose objects blur into the frame too.
    """
    area = (extent.x1_um - extent.x0_um) * (extent.y1_um - extent.y0_um)
    frame_area = (frame_extent.x1_um - frame_extent.x0_um) * (
        frame_extent.y1_um - frame_extent.y0_um
    )
    return round(n_frame * area / frame_area)


def beads(
    rng: np.random.Generator, extent: Extent, frame_extent: Extent, camera: CameraConfig
) -> ObjectTable:
    """Sub-resolution fluorescent beads (0.2-0.3 µm diameter) spread in 3D over ±10 µm."""
    n = _over_extent(int(rng.integers(30, 61)), extent, frame_extent)
    radius = rng.uniform(*BEAD_RADIUS_UM, n)
    x = rng.uniform(extent.x0_um, extent.x1_um, n)
    y = rng.uniform(extent.y0_um, extent.y1_um, n)
    z = rng.uniform(-10.0, 10.0, n)
    return _bead_table(x, y, z, radius, _bead_photons(rng, n, camera))


BEAD_RADIUS_UM = (0.1, 0.15)
"""Range of a bead's radius (µm), drawn uniformly: 0.2-0.3 µm beads, below the resolution."""


def _bead_photons(rng: np.random.Generator, n: int, camera: CameraConfig) -> np.ndarray:
    """Draw `n` beads' brightness: 1.5-4.5 times the camera's `peak_photons`, uniformly."""
    out: np.ndarray = camera.peak_photons * 3.0 * rng.uniform(0.5, 1.5, n)
    return out


def _bead_table(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, radius: np.ndarray, photons: np.ndarray
) -> ObjectTable:
    """Return the object table of beads (spheres of `radius`) at (x, y, z) µm."""
    return ObjectTable(
        x_um=x,
        y_um=y,
        z_um=z,
        semi_axes_um=np.repeat(radius[:, None], 3, axis=1),
        angle_rad=np.zeros(x.size),
        intensity=photons,
        kind=np.full(x.size, "bead", dtype="<U8"),
    )


SURFACE_BEADS_PER_FRAME = (40, 120)
"""Range of the beads a "surface" sample holds, drawn uniformly: denser than "beads", since all
of them share one layer."""
SURFACE_EXCURSION_UM = (2.0, 16.0)
"""Range of the depth a surface's tilt spans across the frame (µm), drawn uniformly."""
SURFACE_SAG_UM = 3.0
"""Largest sag of a surface's curvature at the frame's corners (µm; drawn in ±this)."""


def surface_beads(
    rng: np.random.Generator, extent: Extent, frame_extent: Extent, camera: CameraConfig
) -> ObjectTable:
    """Beads on one smooth surface: tilted, curved, clipped to ±10 µm.

    What Deep-Z's tilted and curved DPMs are for (Wu et al. 2019: a sample the stage holds
    tilted, a field curved by the optics): every bead of the frame on one layer whose depth
    changes across the field. The tilt spans `SURFACE_EXCURSION_UM` over the frame in a random
    direction; a paraboloid adds up to ±`SURFACE_SAG_UM` at the corners; the depth at the
    frame's centre is within ±4 µm. Beads as `beads` draws them (size, brightness), from
    `SURFACE_BEADS_PER_FRAME`, those of the blur margin on the same surface.
    """
    n = _over_extent(
        int(rng.integers(*SURFACE_BEADS_PER_FRAME, endpoint=True)), extent, frame_extent
    )
    width = frame_extent.x1_um - frame_extent.x0_um
    height = frame_extent.y1_um - frame_extent.y0_um
    xc = (frame_extent.x0_um + frame_extent.x1_um) / 2
    yc = (frame_extent.y0_um + frame_extent.y1_um) / 2
    theta = rng.uniform(0.0, 2 * np.pi)
    ux, uy = np.cos(theta), np.sin(theta)
    slope = rng.uniform(*SURFACE_EXCURSION_UM) / (abs(ux) * width + abs(uy) * height)
    sag = rng.uniform(-SURFACE_SAG_UM, SURFACE_SAG_UM) / ((width / 2) ** 2 + (height / 2) ** 2)
    z0 = rng.uniform(-4.0, 4.0)
    x = rng.uniform(extent.x0_um, extent.x1_um, n)
    y = rng.uniform(extent.y0_um, extent.y1_um, n)
    dx, dy = x - xc, y - yc
    z = np.clip(z0 + slope * (ux * dx + uy * dy) + sag * (dx**2 + dy**2), -10.0, 10.0)
    radius = rng.uniform(*BEAD_RADIUS_UM, n)
    return _bead_table(x, y, z, radius, _bead_photons(rng, n, camera))


ISOLATED_NUCLEI_PER_FRAME = (10, 40)
"""Range of the isolated nuclei a frame holds, drawn uniformly, whatever its size (as the beads'
and a worm's counts are): 10-40 in a 256² frame (77 µm square) is sparse."""
ISOLATED_NUCLEUS_DIAMETER_UM = (1.0, 4.0)
"""Range of an isolated nucleus's diameter (µm), drawn uniformly (issue 9: nuclei of 1-4 µm)."""


def isolated_nuclei(
    rng: np.random.Generator,
    extent: Extent,
    frame_extent: Extent,
    camera: CameraConfig,
    pixel_size_um: float,
) -> ObjectTable:
    """Nuclei with no worm around them, spread in 3D over ±10 µm like the beads.

    A worm's nuclei are packed inside its body, 100-200 a frame at the body's depths; on its
    own, a nucleus of 1-4 µm anywhere in ±10 µm is another case, which the training worms
    never show (session 40: the shipped model invents most of the spots it draws on such
    frames). Each diameter is drawn from `ISOLATED_NUCLEUS_DIAMETER_UM`, each semi-axis
    within ±10 % of its half, centres at least the two radii + 0.3 µm apart; brightness as a
    worm's nuclei (`_nuclei`).
    """
    n_frame = int(rng.integers(*ISOLATED_NUCLEI_PER_FRAME, endpoint=True))
    n_total = _over_extent(n_frame, extent, frame_extent)
    centres: list[np.ndarray] = []
    diameters: list[float] = []
    tries = 0
    while len(centres) < n_total and tries < 200 * max(n_total, 1):
        tries += 1
        d = float(rng.uniform(*ISOLATED_NUCLEUS_DIAMETER_UM))
        c = np.array(
            [
                rng.uniform(extent.x0_um, extent.x1_um),
                rng.uniform(extent.y0_um, extent.y1_um),
                rng.uniform(-10.0, 10.0),
            ]
        )
        if all(
            float(np.sum((c - p) ** 2)) > ((d + e) / 2 + 0.3) ** 2
            for p, e in zip(centres, diameters, strict=True)
        ):
            centres.append(c)
            diameters.append(d)
    xyz = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    n = xyz.shape[0]
    axes = np.asarray(diameters).reshape(-1, 1) / 2 * rng.uniform(0.9, 1.1, (n, 3))
    return _nuclei(rng, xyz, axes, camera, pixel_size_um)


@dataclass(frozen=True)
class Grid:
    """Voxel grid for image formation: pixel (0, 0) at (x0_um, y0_um), z slices `z_um`."""

    x0_um: float
    y0_um: float
    shape: tuple[int, int]
    pixel_size_um: float
    z_um: np.ndarray

    @property
    def dz_um(self) -> float:
        """Slice spacing (µm)."""
        return float(self.z_um[1] - self.z_um[0]) if self.z_um.size > 1 else 1.0


def is_point(objects: ObjectTable, grid: Grid) -> np.ndarray:
    """(N,) bool: the objects smaller than a voxel (beads), which `rasterize` deposits as points."""
    axes = objects.semi_axes_um
    out: np.ndarray = (np.maximum(axes[:, 0], axes[:, 1]) < grid.pixel_size_um) & (
        axes[:, 2] < grid.dz_um
    )
    return out


def rasterize(
    objects: ObjectTable, grid: Grid, photon_scale: float = 1.0, lateral: Lateral = "linear"
) -> np.ndarray:
    """Photon density (S, H, W) float32 of `objects` on `grid`; each object's sum = intensity.

    Ellipsoids get a one-voxel soft edge; objects smaller than a voxel (beads, `is_point`) are
    deposited as points (`deposit_point` with `lateral`: the bilinear split by default), so
    positions are sub-voxel accurate. `photon_scale` multiplies all.
    """
    s_count = grid.z_um.size
    h, w = grid.shape
    out = np.zeros((s_count, h, w), dtype=np.float32)
    px, dz = grid.pixel_size_um, grid.dz_um
    point = is_point(objects, grid)
    for i in range(len(objects)):
        total = float(objects.intensity[i]) * photon_scale
        if total <= 0:
            continue
        gx = (objects.x_um[i] - grid.x0_um) / px
        gy = (objects.y_um[i] - grid.y0_um) / px
        gz = (objects.z_um[i] - grid.z_um[0]) / dz
        if point[i]:
            deposit_point(out, total, gz, gy, gx, lateral)
        else:
            a, b, c = objects.semi_axes_um[i]
            _ellipsoid(out, gx, gy, gz, (a / px, b / px, c / dz), objects.angle_rad[i], total)
    return out


SPLINE_TAPS = 5
"""Half width (px) of a "spline" point's lateral kernel (`spline_taps`): its taps fall as
0.268ⁿ, under 0.1 % of the point five pixels out."""
Lateral = Literal["linear", "spline"]
"""How a volume holds a point between pixels (`deposit_point`)."""


@functools.lru_cache(maxsize=4096)
def _spline_taps_cached(frac: float) -> np.ndarray:
    delta = np.zeros(4 * SPLINE_TAPS + 1)
    delta[2 * SPLINE_TAPS] = 1.0
    moved = ndi.shift(delta, frac, order=3, mode="constant")
    taps = moved[SPLINE_TAPS : 3 * SPLINE_TAPS + 1]
    out: np.ndarray = taps / taps.sum()
    out.flags.writeable = False
    return out


def spline_taps(frac: float) -> np.ndarray:
    """Return one axis's weights of a point `frac` px (0 <= frac < 1) past pixel 0.

    (2·SPLINE_TAPS + 1,) weights on pixels -SPLINE_TAPS … +SPLINE_TAPS: the impulse response
    of a cubic-spline shift (`scipy.ndimage.shift`, order 3). A density holding a point this
    way, rendered through a pixel PSF, is that PSF moved to the point by cubic-spline
    interpolation: within 1–2 % of the light a camera's pixels collect from a point off their
    centres, where the bilinear split comes out 15–25 % dim in focus (session 35,
    `docs/evaluation/volume.md`). Some taps are negative (the kernel undoes the spline's
    smoothing); they sum to 1. Read-only; `frac` is rounded to 1/1000 px.
    """
    return _spline_taps_cached(round(float(frac), 3))


def lateral_weights(frac: float, lateral: Lateral) -> tuple[int, np.ndarray]:
    """Return how a point `frac` px (0 <= frac < 1) past pixel 0 is held along one axis.

    (offset of the first weight from pixel 0, weights): ``"linear"`` puts 1 - frac on pixel 0
    and frac on pixel 1 (the training targets' split); ``"spline"`` puts `spline_taps` on
    pixels -SPLINE_TAPS … +SPLINE_TAPS. The one home of both conventions: `deposit_point`
    deposits with them, `engine.psf_calibration` undoes them.
    """
    if lateral == "spline":
        return -SPLINE_TAPS, spline_taps(frac)
    if lateral != "linear":
        raise ValueError(f"lateral must be 'linear' or 'spline', not {lateral!r}")
    return 0, np.array([1.0 - frac, frac])


def deposit_point(
    out: np.ndarray, total: float, gz: float, gy: float, gx: float, lateral: Lateral = "linear"
) -> None:
    """Add a point of `total` at continuous grid position (gz, gy, gx).

    The one home of how a volume holds a point: the training targets' beads and the point
    fit's refitted beads (`engine.point_fit`) alike. Along depth it is split linearly between
    the two slices around it; laterally as `lateral_weights` says: ``"linear"`` splits it
    bilinearly between the four pixels around it (the training targets), ``"spline"`` spreads
    it over the (2·SPLINE_TAPS + 1)² pixels around it (a point that renders as a camera images
    it). In place; voxels off the grid are skipped.
    """
    s_count, h, w = out.shape
    iz, iy, ix = int(np.floor(gz)), int(np.floor(gy)), int(np.floor(gx))
    fz = gz - iz
    dy, wy = lateral_weights(gy - iy, lateral)
    dx, wx = lateral_weights(gx - ix, lateral)
    block = np.outer(wy, wx) * total
    r0, c0 = iy + dy, ix + dx
    # the part of the block on the grid (none for a point far off it: stops kept >= 0, where
    # a negative one would count from the grid's far edge)
    r1, c1 = min(r0 + block.shape[0], h), min(c0 + block.shape[1], w)
    if r1 <= max(r0, 0) or c1 <= max(c0, 0):
        return
    rs, cs = slice(max(r0, 0), r1), slice(max(c0, 0), c1)
    part = block[rs.start - r0 : r1 - r0, cs.start - c0 : c1 - c0]
    for dzi, wz in ((0, 1 - fz), (1, fz)):
        if wz > 0 and 0 <= iz + dzi < s_count:
            out[iz + dzi, rs, cs] += (wz * part).astype(out.dtype, copy=False)


def _ellipsoid(
    out: np.ndarray,
    gx: float,
    gy: float,
    gz: float,
    semi_vox: tuple[float, float, float],
    angle: float,
    total: float,
) -> None:
    """Add a soft-edged ellipsoid (semi-axes in voxels) holding `total` photons to `out`."""
    s_count, h, w = out.shape
    a, b, c = semi_vox
    rxy = max(a, b) + 1.5
    z0, z1 = max(int(np.floor(gz - c - 1)), 0), min(int(np.ceil(gz + c + 1)) + 1, s_count)
    y0, y1 = max(int(np.floor(gy - rxy)), 0), min(int(np.ceil(gy + rxy)) + 1, h)
    x0, x1 = max(int(np.floor(gx - rxy)), 0), min(int(np.ceil(gx + rxy)) + 1, w)
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return
    zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
    dx, dy = xx - gx, yy - gy
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (ca * dx + sa * dy) / a, (-sa * dx + ca * dy) / b
    r = np.sqrt(u**2 + v**2 + ((zz - gz) / c) ** 2)
    occ = np.clip(0.5 + (1.0 - r) * min(a, b, c), 0.0, 1.0)
    norm = occ.sum()
    if norm > 0:
        out[z0:z1, y0:y1, x0:x1] += (occ * (total / norm)).astype(np.float32)


TEXTURE_VOXEL_UM = 1.0
"""Voxel (µm) on which `body_texture` draws its field before interpolating it to the grid: it
is smoothed over at least 0.5 µm, so the coarse lattice loses nothing that matters and costs
a hundredth of the grid's voxels."""


def body_texture(rng: np.random.Generator, grid: Grid, sd: float, smooth_um: float) -> np.ndarray:
    """Return a smooth random brightness field (S, H, W) float32 on `grid`: log-normal, mean 1.

    White noise on a `TEXTURE_VOXEL_UM` lattice is smoothed with a Gaussian of `smooth_um`,
    scaled to unit SD, interpolated (tri-linear) to the grid, and mapped through
    ``exp(sd·g - sd²/2)``: non-negative, mean one, relative SD about `sd`.
    """
    h, w = grid.shape
    extent = (grid.z_um.size * grid.dz_um, h * grid.pixel_size_um, w * grid.pixel_size_um)
    coarse = tuple(max(2, int(np.ceil(e / TEXTURE_VOXEL_UM)) + 1) for e in extent)
    field = ndi.gaussian_filter(
        rng.standard_normal(coarse), smooth_um / TEXTURE_VOXEL_UM, mode="wrap"
    )
    field /= max(float(field.std()), 1e-12)
    target = (grid.z_um.size, h, w)
    g = ndi.zoom(field, [t / c for t, c in zip(target, coarse, strict=True)], order=1)
    g = g[: target[0], : target[1], : target[2]].astype(np.float32)
    out: np.ndarray = np.exp(np.float32(sd) * g - np.float32(sd * sd / 2))
    return out


def body_density(body: WormBody, grid: Grid, photons_per_um: float) -> np.ndarray:
    """Diffuse autofluorescence (S, H, W) float32 filling the worm body, soft-edged.

    `photons_per_um` is the photon density per pixel per µm of depth, so a column through the
    body's axis collects about ``2·radius·photons_per_um`` photons.
    """
    h, w = grid.shape
    px = grid.pixel_size_um
    x = grid.x0_um + px * np.arange(w, dtype=np.float64)
    y = grid.y0_um + px * np.arange(h, dtype=np.float64)
    d_xy = body.axis_distance_xy(x[None, :], y[:, None]).astype(np.float32)
    d2 = d_xy**2
    out = np.empty((grid.z_um.size, h, w), dtype=np.float32)
    per_voxel = np.float32(photons_per_um * grid.dz_um)
    radius = np.float32(body.radius_um)
    for s, z in enumerate(grid.z_um):
        r = np.sqrt(d2 + np.float32(z - body.z_mid_um) ** 2)
        np.clip(np.float32(0.5) + (radius - r) / np.float32(px), 0.0, 1.0, out=out[s])
        out[s] *= per_voxel
    return out
