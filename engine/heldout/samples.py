"""Held-out samples: beads, spheres, a tilted bead plane, a worm's ganglia; the camera."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from engine.heldout.optics import FOCUS_HALF_RANGE_UM

SampleKind = Literal["spheres", "beads", "tilted", "ganglion"]
MARGIN_PX = 32
"""Objects are drawn this far outside the frame too, so light from outside blurs in."""
KIND_CODE: dict[str, int] = {"spheres": 1, "beads": 2, "tilted": 3, "ganglion": 4}
_REFERENCE_AREA_PX = 256 * 256
"""Object counts are given per 256² frame and scale with the frame's area."""


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


def draw_beads(
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


def draw_spheres(
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


def draw_tilted(
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


def draw_ganglion(
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


def background_image_e(
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
