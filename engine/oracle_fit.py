"""What a crowd allows: crowded nuclei's depths from one frame, by a fit told all but depth.

    python -m engine.oracle_fit [--psf vectorial|pupil] [--seeds 121 122 123 124]
                                [--iterations 5000] [--noise-free]
                                [--body known|shape|model|blobs|unknown]
                                [--radius known|nominal|fitted] [--body-clip 25]
                                [--glow-error-e RMS] [--fit-psf vectorial|pupil|simulator]
                                [--compare fidelity.json] [--out runs/oracle_fit]
    python -m engine.oracle_fit --summarise DIR [--compare fidelity.json]

`engine.depth_bound` bounds a nucleus alone. In a worm's head the nuclei crowd into ganglia,
and a far nucleus's defocused ring lies over its neighbours: does one frame still hold each
one's depth? This answers it empirically, on the independent hold-out's ganglion frames
(`engine.heldout`, kind "ganglion"), with an estimator told all a network is not: every
nucleus's lateral position and radius, the body's exact glow (subtracted) and the optics (the
hold-out's own sphere images, `heldout.sphere_image`). Only the depths and brightnesses are
unknown, and the smooth background (a quadratic surface).

First a convex fit: every nucleus is offered at every depth of a 0.5 µm grid over ±10.5 µm
(one column of a sparse dictionary per nucleus and depth), and the frame is explained as a
non-negative sum of those columns plus the background, weighted by each pixel's noise
variance (FISTA). That fit may spread a nucleus over several depths, its mirror among them;
Gauss–Seidel sweeps then give each nucleus the one depth that best explains what the others
leave (`_polish`). Its errors are scored on the nuclei the fidelity report scores
(`heldout.scored_nuclei`, `CROWDED_MIN_GAP_UM` from another's surface, in the frame).

What the number means: it is an estimator, not a bound. Where it puts a nucleus within 1 µm
and a model does not, the frame held that depth (given the rest) and the model missed it;
where it errs, the crowd may hide the depth, or the fit stopped short of the best reading
(`--noise-free` shows how much the fit itself loses). `--body shape` tells it only where the
body's spheres lie, `--body unknown` nothing of the body: what knowing the glow is worth.
What a fit at serve time could know instead: `--body model` offers the glow a volume model's
faint density gives (the shipped model's by default), `--body blobs` a generic lattice of broad
non-negative blobs for any diffuse glow, `--glow-error-e` the true glow with a smooth error
(how well must the body be known?), `--radius nominal|fitted` withholds the radii.
`--summarise` puts every fit's JSON in a folder into one table and a bar chart.
Minutes per frame on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from scipy import ndimage as ndi
from tqdm import tqdm

from engine import heldout as ho
from engine.files import out_dir_problem
from engine.optics import OpticsConfig, make_psf

__all__ = [
    "GRID_UM",
    "BodyKnowledge",
    "OracleFit",
    "SimulatorOptics",
    "fit_nnls",
    "fit_optics_for",
    "main",
    "model_body_glow",
    "oracle_nucleus_depths",
    "summarise",
    "true_body_glow_e",
]

GRID_UM = np.round(np.arange(-10.5, 10.51, 0.5), 6)
"""Depths every nucleus is offered at (µm): the hold-out's ±9.5 µm with a margin."""
_HALF_PX = 31
"""Half-size of a nucleus's template (px): its ring 10.5 µm out of focus fits in 63²."""
BodyKnowledge = Literal["known", "shape", "model", "blobs", "unknown"]
"""What the fit is told of the body's glow: "known", the glow itself (subtracted); "shape",
where each of the body's spheres lies and how large it is, not how bright (one free column
each: what a network sees of the body's outline); "model", the glow of a volume model's faint
density (`model_body_glow`), its brightness fitted; "blobs", nothing, but any diffuse glow is
offered as a non-negative lattice of broad Gaussians (`BLOB_SPACING_UM`): a generic prior a
serve-time fit could use, tailored to no sample; "unknown", nothing (the smooth background
must take it)."""
RadiusKnowledge = Literal["known", "nominal", "fitted"]
"""What the fit is told of each nucleus's radius: "known", the truth; "nominal", nothing (every
nucleus drawn with `NOMINAL_RADIUS_UM`); "fitted", nothing, but each nucleus is offered at
every radius of `RADII_UM` too and the polish keeps the best (radius, depth)."""
NOMINAL_RADIUS_UM = 1.25
"""The radius a fit assumes when it is told none (µm): mid-range of C. elegans head nuclei."""
RADII_UM = (0.8, 1.2, 1.75)
"""Radii (µm) a "fitted" nucleus is offered at."""
MODEL_BODY_CLIP_COUNTS = 25.0
"""Density (camera counts per voxel) below which a volume model's density counts as body."""
BLOB_SPACING_UM = 5.0
"""Lattice step of the "blobs" body prior (µm); each blob is a Gaussian of SD the same."""


@dataclass(frozen=True)
class OracleFit:
    """One frame's oracle fit: the scored nuclei's depths, and how the solver ended."""

    depths: ho.BeadDepths
    radius_um: np.ndarray
    """(N,) radius of each scored nucleus (µm)."""
    nuclei: int
    """Nuclei in the fit (all those whose template reaches the frame)."""
    relative_residual: float
    """Weighted residual norm over the frame's, at the end: near the noise level if it fits."""


@dataclass(frozen=True)
class SimulatorOptics:
    """The training simulator's scalar PSF (`engine.optics.make_psf`) as a `heldout.PsfModel`.

    What a model trained on the simulator believes about the optics, so a fit through it asks
    what a physics refinement of a model's output would get through the model's own optics.
    One aberration for every source (at `config.particle_depth_um`), as the simulator draws a
    sample's sources.
    """

    config: OpticsConfig

    @property
    def pixel_size_um(self) -> float:
        """Pixel size at the sample (µm)."""
        return self.config.pixel_size_um

    @property
    def aberration_step_um(self) -> float:
        """Depth step of the bins the renderer caches PSFs by (each bin's are the same)."""
        return 1.0

    def aberration_bin(self, z_um: float) -> int:
        """Return the bin of depth `z_um` (the renderer's cache key; every bin: one aberration)."""
        return math.floor(z_um + 0.5)

    def psf(
        self, defocus_um: np.ndarray, source_z_um: float = 0.0, size_px: int = ho.PSF_SIZE_PX
    ) -> np.ndarray:
        """Scalar PSF (Q, size, size) at `defocus_um` (focus − object), the same at any depth."""
        return make_psf(self.config, np.asarray(defocus_um, dtype=np.float64), size_px)


def fit_optics_for(psf: Literal["vectorial", "pupil", "simulator"]) -> ho.PsfModel:
    """Return the optics a fit believes: a hold-out PSF model, or the simulator's at its depth.

    "simulator": the training simulator's defaults (the hold-out's nominal optics: same NA,
    wavelength, indices and pixel) with the aberration of the hold-out's focal-plane depth
    (`IndependentOptics.base_depth_um`, 12 µm; a user knows roughly how deep they image).
    """
    if psf == "simulator":
        depth = ho.IndependentOptics().base_depth_um
        return SimulatorOptics(OpticsConfig(particle_depth_um=depth))
    return ho.IndependentOptics(psf_model=psf)


def fit_nnls(
    a: sp.csr_matrix,
    b: np.ndarray,
    nonneg: int,
    iterations: int,
    x0: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Solve min ‖A x − b‖² with x[:nonneg] ≥ 0 (the rest free) by FISTA, from `x0` or zero.

    Returns (x, ‖A x − b‖ / ‖b‖). The step is 1 / L, L the largest eigenvalue of AᵀA by power
    iteration (30 rounds, then 1 % more for safety).
    """
    at = a.T.tocsr()
    v = np.random.default_rng(0).standard_normal(a.shape[1])
    for _ in range(30):
        v = at @ (a @ v)
        v /= np.linalg.norm(v)
    lipschitz = 1.01 * float(np.linalg.norm(at @ (a @ v)))
    x = np.zeros(a.shape[1]) if x0 is None else np.array(x0, dtype=np.float64)
    x[:nonneg] = np.maximum(x[:nonneg], 0.0)
    y = x.copy()
    t = 1.0
    for _ in range(iterations):
        x_next = y - (at @ (a @ y - b)) / lipschitz
        x_next[:nonneg] = np.maximum(x_next[:nonneg], 0.0)
        t_next = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = x_next + ((t - 1.0) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return x, float(np.linalg.norm(a @ x - b) / np.linalg.norm(b))


def _polish(
    a: sp.csc_matrix,
    b: np.ndarray,
    x: np.ndarray,
    owner: np.ndarray,
    n: int,
    sweeps: int,
    bg_nonneg: int = 0,
) -> tuple[dict[int, float], float]:
    """One depth per nucleus, from the convex fit: Gauss–Seidel sweeps over the nuclei.

    The convex fit may spread a nucleus over several depths (its mirror among them). Each
    step takes one nucleus out of the model and puts it back at the single grid depth (and
    non-negative brightness) that most lowers the weighted residual, the others held; the
    background is refitted after each sweep (its first `bg_nonneg` columns kept ≥ 0). A
    nucleus's columns run over `GRID_UM` once per radius it is offered at. The first sweep may
    raise the residual (a nucleus the convex fit spread over depths gets one); after it no step
    does. Returns ({nucleus: depth refined by a parabola through the residual drops around the
    best}, ‖A x − b‖ / ‖b‖).
    """
    x = x.copy()
    r = b - a @ x
    nuclei = list(dict.fromkeys(owner.tolist()))
    cols = {i: np.flatnonzero(owner == i) for i in nuclei}
    background = np.arange(n, a.shape[1])
    bg = a[:, background]
    bg_dense = None if bg_nonneg else bg.toarray()
    depth: dict[int, float] = {}
    g = GRID_UM.size
    for _ in range(max(sweeps, 1)):
        for i in nuclei:
            c = cols[i]
            block = a[:, c]
            r += block @ x[c]
            x[c] = 0.0
            dot = block.T @ r  # columns have unit norm: the best amplitude is the dot product
            drop = np.maximum(dot, 0.0) ** 2
            k = int(np.argmax(drop))
            x[c[k]] = max(float(dot[k]), 0.0)
            r -= block[:, [k]] @ x[c[[k]]]
            z = float(GRID_UM[k % g])
            if 0 < k % g < g - 1:
                d0, d1, d2 = drop[k - 1 : k + 2]
                den = d0 - 2 * d1 + d2
                if den < 0:
                    z += 0.5 * float(GRID_UM[1] - GRID_UM[0]) * float((d0 - d2) / den)
            depth[i] = z
        r += bg @ x[background]
        if bg_dense is not None:
            x[background] = np.linalg.lstsq(bg_dense, r, rcond=None)[0]
        else:
            x[background] = fit_nnls(bg.tocsr(), r, bg_nonneg, 300, x0=x[background])[0]
        r -= bg @ x[background]
    return depth, float(np.linalg.norm(r) / np.linalg.norm(b))


def _background_columns(shape: tuple[int, int]) -> np.ndarray:
    """(H·W, 6) quadratic surface over the frame: 1, x, y, x², xy, y²."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    y = ((yy - h / 2) / h).ravel()
    x = ((xx - w / 2) / w).ravel()
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)


def _placed(
    patch: np.ndarray, top: int, left: int, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Flat frame indices and values of `patch`'s entries above 1e-7, its corner at (top, left).

    What falls off the frame is dropped: one sparse column's rows, for the dictionary's
    templates and the blob lattice alike.
    """
    h, w = shape
    py, px = np.nonzero(patch > 1e-7)
    fr, fc = py + top, px + left
    ok = (fr >= 0) & (fr < h) & (fc >= 0) & (fc < w)
    return fr[ok] * w + fc[ok], patch[py[ok], px[ok]].astype(np.float64)


def _blob_columns(shape: tuple[int, int], pixel_size_um: float) -> sp.csr_matrix:
    """(H·W, K) non-negative lattice of Gaussians (SD and step `BLOB_SPACING_UM`) over the frame.

    A generic diffuse-glow prior: smooth enough to leave a nucleus's defocused ring to the
    nuclei's columns, dense enough to follow a body's outline a few µm wide. The lattice runs
    a step past each edge, so glow entering the frame from outside is covered.
    """
    h, w = shape
    step = BLOB_SPACING_UM / pixel_size_um
    reach = math.ceil(3 * step)
    yy, xx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    cols: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    centres = [
        (cy, cx)
        for cy in np.arange(-step, h + step, step)
        for cx in np.arange(-step, w + step, step)
    ]
    for j, (cy, cx) in enumerate(centres):
        ry, rx = round(cy), round(cx)
        g = np.exp(-((yy + ry - cy) ** 2 + (xx + rx - cx) ** 2) / (2 * step * step))
        at, v = _placed(g, ry - reach, rx - reach, shape)  # a blob is > 1e-4 to its corners
        rows.append(at)
        cols.append(np.full(at.size, j))
        vals.append(v)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(h * w, len(centres)),
    )


def model_body_glow(
    backend: Any, frame: np.ndarray, clip_counts: float = MODEL_BODY_CLIP_COUNTS
) -> np.ndarray:
    """Return the body's glow at focus (H, W, counts above offset) as a volume model sees it.

    The shipped volume model explains a worm body's diffuse glow with faint density spread
    through the body (a comb of voxels, mostly below 25 counts, in bands a few depth slices
    apart) and the nuclei with compact bright blobs (hundreds of counts). Its voxels below
    `clip_counts` are taken as body and rendered at focus through the model's own PSF, then
    smoothed (Gaussian, 3 px) to even out the comb.
    """
    from engine.volume import Renderer, model_psf_bank

    volume = backend.metadata.volume
    if volume is None:
        raise ValueError(f"{backend.name} is a per-plane model; the body needs a volume model")
    density = backend.volume(frame)[0]
    psf = model_psf_bank(backend.model_path, volume)
    renderer = Renderer(psf, np.asarray(volume.depth_um), frame.shape, threads=1)
    faint = np.where(density < clip_counts, density, 0.0).astype(np.float32)
    glow: np.ndarray = ndi.gaussian_filter(renderer.render(faint, np.zeros(1))[0], 3.0)
    return glow


def true_body_glow_e(
    sample: ho.IndependentSample, optics: ho.PsfModel, camera: ho.HeldoutCamera | None = None
) -> np.ndarray:
    """Return the body's glow at focus (H, W) float64 in e⁻ per pixel: its spheres alone.

    Rendered through `optics` (the frame's own, or those a fit believes); zeros without a body.
    """
    cam = camera or ho.HeldoutCamera()
    obj = sample.objects
    in_body = np.flatnonzero(obj.kind == "body")
    if not in_body.size:
        return np.zeros(sample.frame.shape)
    xyz = np.column_stack([obj.x_um, obj.y_um, obj.z_um])[in_body]
    signal = obj.intensity[in_body] / cam.gain_counts_per_e
    glow: np.ndarray = ho.render_objects(
        xyz, obj.radius_um[in_body], signal, sample.frame.shape, optics, np.zeros(1)
    )[0].astype(np.float64)
    return glow


def oracle_nucleus_depths(
    sample: ho.IndependentSample,
    optics: ho.PsfModel,
    camera: ho.HeldoutCamera | None = None,
    *,
    iterations: int = 5000,
    sweeps: int = 3,
    noise_free: bool = False,
    body: BodyKnowledge = "known",
    radius: RadiusKnowledge = "known",
    body_glow_counts: np.ndarray | None = None,
    glow_error_e: float = 0.0,
    error_seed: int = 0,
) -> OracleFit:
    """Fit every nucleus's depth in a ganglion frame, knowing all but depths and brightness.

    `optics` are what the fit believes: the ones the sample was imaged with, or others to ask
    what wrong optics cost. ``noise_free`` fits the truth plane
    at focus 0 instead of the camera frame: what the fit itself (grid, solver) costs. `body`:
    how much the fit is told of the body's glow (`BodyKnowledge`); `radius`, of each nucleus's
    radius (`RadiusKnowledge`). `body_glow_counts` (H, W): the glow a "model" body offers, in
    camera counts above offset (`model_body_glow`). `glow_error_e` > 0 (a "known" body): how
    well must the glow be known? The true glow plus a smooth error field of that RMS (e⁻ per
    pixel; white noise from `error_seed` smoothed over 8 px), offered with its brightness fitted.
    """
    cam = camera or ho.HeldoutCamera()
    obj, px = sample.objects, sample.pixel_size_um
    h, w = shape = sample.frame.shape
    source = sample.planes[int(np.argmin(np.abs(sample.dz_um)))] if noise_free else sample.frame
    image = (source.astype(np.float64) - cam.offset_counts) / cam.gain_counts_per_e
    variance = np.maximum(image, 1.0) + cam.read_noise_e**2  # Poisson + read noise, in e⁻²
    in_body = np.flatnonzero(obj.kind == "body")
    xyz = np.column_stack([obj.x_um, obj.y_um, obj.z_um])
    smooth = _background_columns(shape)
    if body == "known" and in_body.size:  # the glow itself, subtracted
        glow = true_body_glow_e(sample, optics, cam)
        if glow_error_e > 0:
            noise = np.random.default_rng(error_seed).standard_normal(shape)
            field = ndi.gaussian_filter(noise, 8.0)
            smooth = np.column_stack(
                [smooth, (glow + field * (glow_error_e / field.std())).ravel()]
            )
        else:
            image = image - glow
    elif body == "shape" and in_body.size:  # each body sphere's image, its brightness fitted
        one = np.ones(1)
        glows = [
            ho.render_objects(xyz[[j]], obj.radius_um[[j]], one, shape, optics, np.zeros(1))
            for j in in_body
        ]
        smooth = np.column_stack([smooth, *(g[0].ravel() for g in glows)])
    elif body == "model":
        if body_glow_counts is None or body_glow_counts.shape != shape:
            raise ValueError(f"a 'model' body needs body_glow_counts of shape {shape}")
        glow_e = np.asarray(body_glow_counts, dtype=np.float64) / cam.gain_counts_per_e
        smooth = np.column_stack([smooth, glow_e.ravel()])
    blobs = _blob_columns(shape, px) if body == "blobs" else sp.csr_matrix((h * w, 0))
    k = 2 * _HALF_PX + 1
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    owner: list[int] = []  # the nucleus (object row) of each dictionary column
    nuclei = 0
    for i in np.flatnonzero(obj.kind == "sphere"):
        x, y = obj.x_um[i] / px, obj.y_um[i] / px
        ci, ri = round(x), round(y)
        if not (-_HALF_PX < ri < h + _HALF_PX and -_HALF_PX < ci < w + _HALF_PX):
            continue
        nuclei += 1
        radii = {
            "known": (float(obj.radius_um[i]),),
            "nominal": (NOMINAL_RADIUS_UM,),
            "fitted": RADII_UM,
        }[radius]
        for r_um, z in ((r_um, z) for r_um in radii for z in GRID_UM):
            t = ho.sphere_image(optics, r_um, float(z), k, (x - ci, y - ri))
            at, v = _placed(t, ri - _HALF_PX, ci - _HALF_PX, shape)
            rows.append(at)
            cols.append(np.full(at.size, len(owner)))
            vals.append(v)
            owner.append(int(i))
    n = len(owner)
    dictionary = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, n)
    )
    design = sp.hstack([dictionary, blobs, sp.csr_matrix(smooth)]).tocsr()
    weight = 1.0 / np.sqrt(variance.ravel())
    design = sp.diags(weight) @ design
    # unit columns: one step size suits every column, however bright or dim its template
    norm = np.sqrt(np.asarray(design.multiply(design).sum(axis=0)).ravel())
    norm[norm == 0] = 1.0
    scaled = (design @ sp.diags(1.0 / norm)).tocsr()
    b = image.ravel() * weight
    m = blobs.shape[1]
    coef, _ = fit_nnls(scaled, b, n + m, iterations)
    depth, rel = _polish(scaled.tocsc(), b, coef, np.asarray(owner), n, sweeps, bg_nonneg=m)
    scored = ho.scored_nuclei(sample, min_gap_um=ho.CROWDED_MIN_GAP_UM)
    est = np.array([depth.get(int(i), np.nan) for i in scored])
    return OracleFit(
        depths=ho.BeadDepths(index=scored, z_true_um=obj.z_um[scored], z_est_um=est),
        radius_um=obj.radius_um[scored],
        nuclei=nuclei,
        relative_residual=rel,
    )


def _print_comparison(
    methods: dict[str, Any], set_name: str, z: np.ndarray, oracle_est: np.ndarray
) -> None:
    """Each method's crowded nuclei in a fidelity report's `set_name` beside the oracle's."""
    oracle_err = np.abs(oracle_est - z)
    oracle = _row("the oracle", z, oracle_err)
    print(
        f"  the oracle: within 1 µm {100 * oracle['within_1um']:.0f} % (beyond 4 µm from focus "
        f"{100 * oracle['within_1um_far']:.0f} %)"
    )
    shown = 0
    for name, result in methods.items():
        nuclei = result.get("crowded_nuclei") or {}
        if not nuclei:
            continue
        z_m = np.asarray(nuclei["z_true_um"], dtype=np.float64)
        if z_m.shape != z.shape or not np.allclose(z_m, z):
            print(f"  {name}: other nuclei than these ({z_m.size} against {z.size}): not paired")
            continue
        err = np.abs(np.asarray(nuclei["z_est_um"], dtype=np.float64) - z)
        pair = ho.paired_hits(err, oracle_err)
        row = _row(name, z, err)
        print(
            f"  {name}: within 1 µm {100 * row['within_1um']:.0f} % (beyond 4 µm from focus "
            f"{100 * row['within_1um_far']:.0f} %); the oracle places {pair['gained']:.0f} it "
            f"misses, misses {pair['lost']:.0f} it places (sign test p {pair['p_value']:.2g})"
        )
        shown += 1
    if not shown:
        print(f"  the fidelity report has no crowded nuclei in its {set_name!r} set")


def _label(record: dict[str, Any]) -> str:
    """Name one fit's JSON by what it was told and what it was not."""
    told = []
    if record.get("noise_free"):
        told.append("noise-free")
    # the first fits (session 26) wrote only whether the glow was known
    body = record.get("body", "known" if record.get("body_known", True) else "unknown")
    clip = record.get("body_clip_counts")
    glow_file = record.get("body_glow_file")
    error = record.get("glow_error_e") or 0.0
    told.append(
        {
            "known": f"body's glow told to {error:g} e⁻/px RMS" if error else "body's glow told",
            "shape": "body's spheres told",
            "model": f"body from {Path(glow_file).parent.name}/{Path(glow_file).stem}"
            if glow_file
            else f"body from the model's density (< {clip:g} counts)"
            if clip
            else "",
            "blobs": "body: a lattice of blobs",
            "unknown": "body unknown",
        }.get(body, f"body {body}")
    )
    radius = record.get("radius", "known")
    told.append(
        {"known": "radii told", "nominal": "radii unknown", "fitted": "radii fitted"}[radius]
    )
    fit_psf = record.get("fit_psf_model", record["psf_model"])
    if fit_psf != record["psf_model"]:
        told.append(f"through the {fit_psf} PSF")
    return f"{record['psf_model']} frames: " + ", ".join(told)


def summarise(
    folder: Path, compare: dict[str, Any] | None = None, plot: Path | None = None
) -> list[dict[str, Any]]:
    """Every fit's JSON in `folder` (and a fidelity report's methods, paired) in one table.

    Returns rows (label, nuclei, median, within 1 µm, within 1 µm beyond 4 µm from focus),
    best first; with `plot`, draws them as bars (what a fit must be told, at a glance).
    """
    rows: list[dict[str, Any]] = []
    truth: dict[str, np.ndarray] = {}
    for path in sorted(folder.glob("oracle_fit_*.json")):
        record = json.loads(path.read_text())
        z = np.asarray(record["nuclei"]["z_true_um"], dtype=np.float64)
        err = np.abs(np.asarray(record["nuclei"]["z_est_um"], dtype=np.float64) - z)
        truth.setdefault(record["psf_model"], z)
        rows.append(_row(_label(record), z, err))
    for psf, record_set in (("vectorial", "independent"), ("pupil", "pupil")):
        if psf not in truth:
            continue
        for name, result in (compare or {}).get(record_set, {}).items():
            nuclei = result.get("crowded_nuclei") or {}
            z = np.asarray(nuclei.get("z_true_um", []), dtype=np.float64)
            if z.shape != truth[psf].shape or not np.allclose(z, truth[psf]):
                print(  # other nuclei than the fits' (other seeds): no row, said
                    f"note: {record_set} {name}: other nuclei than the {psf} fits' "
                    f"({z.size} against {truth[psf].size}): no row",
                    file=sys.stderr,
                )
                continue
            err = np.abs(np.asarray(nuclei["z_est_um"], dtype=np.float64) - z)
            rows.append(_row(f"{psf} frames: {name}", z, err, model=True))
    rows.sort(key=lambda r: -r["within_1um"])
    if plot is not None and rows:
        _plot_summary(rows, plot)
    return rows


def _row(label: str, z: np.ndarray, err: np.ndarray, model: bool = False) -> dict[str, Any]:
    """One row: median error, share within 1 µm, and of those beyond 4 µm (NaN: not found)."""
    hits = np.nan_to_num(err, nan=np.inf) <= 1.0
    far = np.abs(z) >= 4.0
    return {
        "label": label,
        "model": model,
        "nuclei": int(z.size),
        "median_um": float(np.median(np.nan_to_num(err, nan=np.inf))),
        "within_1um": float(np.mean(hits)),
        "within_1um_far": float(np.mean(hits[far])) if far.any() else float("nan"),
    }


def _plot_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars: share within 1 µm, all nuclei and those beyond 4 µm from focus; methods hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    all_ = [100 * r["within_1um"] for r in rows]
    far = [100 * r["within_1um_far"] for r in rows]
    hatch = ["//" if r["model"] else "" for r in rows]
    ax.barh(y + 0.2, all_, 0.4, color="tab:blue", hatch=hatch, label="all crowded nuclei")
    ax.barh(y - 0.2, far, 0.4, color="tab:orange", hatch=hatch, label="beyond 4 µm from focus")
    ax.set_yticks(y, [textwrap.fill(r["label"], 60) for r in rows], fontsize=7)
    ax.set_xlabel("within 1 µm of the true depth (%)")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    title = "Crowded nuclei from one frame: what a fit must be told"
    ax.set_title(f"{title} (hatched: the fidelity report's methods)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Fit the ganglion frames; print the depth errors by distance from focus; write JSON."""
    parser = argparse.ArgumentParser(prog="python -m engine.oracle_fit", description=__doc__)
    parser.add_argument("--psf", choices=("vectorial", "pupil"), default="vectorial")
    parser.add_argument(
        "--fit-psf",
        choices=("vectorial", "pupil", "simulator"),
        help="the PSF model the fit believes (default: --psf, the frames' own); another asks "
        "what wrong optics cost; 'simulator': the training simulator's scalar PSF, what a "
        "model trained there believes",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[121, 122, 123, 124],
        help="ganglion seeds (the fidelity report's vectorial set: 121-122 by default, 121-124 "
        "with --large; its pupil set draws seeds + 1000 since session 48: give those to pair "
        "a pupil fit with a new report)",
    )
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--noise-free", action="store_true", help="fit the noise-free truth")
    parser.add_argument(
        "--body",
        choices=("known", "shape", "model", "blobs", "unknown"),
        default="known",
        help="what the fit is told of the body's glow: the glow itself, its spheres' places and "
        "sizes (brightness fitted), nothing but a lattice of broad non-negative blobs offered "
        "for any diffuse glow, or nothing; 'model': the glow of a volume model's faint "
        "density (--body-model, --body-clip), brightness fitted",
    )
    parser.add_argument("--body-model", type=Path, default=Path("engine/weights/deepz-volume.onnx"))
    parser.add_argument(
        "--glow-error-e",
        type=float,
        default=0.0,
        help="with --body known: offer the true glow plus a smooth error field of this RMS "
        "(e- per pixel), its brightness fitted: how well must the body be known?",
    )
    parser.add_argument(
        "--body-glow",
        type=Path,
        help="with --body model: the glow offered, read from this .npz (arrays seed_<n>, counts "
        "above offset, the frame's shape; e.g. `engine.body_probe glow`) instead of a model's "
        "faint density",
    )
    parser.add_argument(
        "--body-clip",
        type=float,
        default=MODEL_BODY_CLIP_COUNTS,
        help="density (counts per voxel) below which the model's density counts as body",
    )
    parser.add_argument(
        "--radius",
        choices=("known", "nominal", "fitted"),
        default="known",
        help=f"what the fit is told of each nucleus's radius: the truth, nothing (all drawn "
        f"{NOMINAL_RADIUS_UM} µm), or nothing but each offered at {RADII_UM} µm",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="a fidelity.json (`engine.fidelity`) scored on the same frames: each method's "
        "crowded nuclei beside the oracle's, nucleus by nucleus",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/oracle_fit"))
    parser.add_argument(
        "--summarise",
        type=Path,
        metavar="DIR",
        help="fit nothing: tabulate every fit's JSON in DIR (with --compare's methods, paired "
        "by nucleus) and draw DIR/summary.png",
    )
    args = parser.parse_args(argv)
    if args.glow_error_e < 0 or (args.glow_error_e > 0 and args.body != "known"):
        parser.error(f"--glow-error-e must be >= 0 and goes with --body known, not {args.body}")
    glows: dict[str, np.ndarray] | None = None
    if args.body_glow is not None:
        if args.body != "model":
            parser.error(f"--body-glow goes with --body model, not {args.body}")
        try:
            with np.load(args.body_glow) as f:
                glows = {k: np.asarray(f[k]) for k in f.files}
        except (OSError, ValueError) as exc:
            parser.error(f"--body-glow {args.body_glow}: not a readable .npz ({exc})")
        missing = [s for s in args.seeds if f"seed_{s}" not in glows]
        if missing:
            parser.error(f"--body-glow {args.body_glow}: no glow for seeds {missing}")
    if args.iterations < 1:
        parser.error(f"--iterations must be >= 1, not {args.iterations}")
    if min(args.seeds) < 0:
        parser.error(f"--seeds must be >= 0, not {min(args.seeds)}")
    compare: dict[str, Any] | None = None
    if args.compare is not None:
        try:
            compare = json.loads(args.compare.read_text())["results"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--compare {args.compare}: not a fidelity report's JSON ({exc})")
    if args.summarise is not None:
        if not args.summarise.is_dir():
            parser.error(f"--summarise {args.summarise}: not a folder")
        problem = out_dir_problem(args.summarise, ["summary.png"])
        if problem is not None:
            parser.error(f"--summarise: {problem}")
        rows = summarise(args.summarise, compare, args.summarise / "summary.png")
        for r in rows:
            print(
                f"{r['label']}: {r['nuclei']} nuclei, median {r['median_um']:.2f} µm, "
                f"within 1 µm {100 * r['within_1um']:.0f} % "
                f"(beyond 4 µm {100 * r['within_1um_far']:.0f} %)"
            )
        print(f"wrote {args.summarise / 'summary.png'}" if rows else "no fits found")
        return 0
    psf: Literal["vectorial", "pupil"] = args.psf
    optics = ho.IndependentOptics(psf_model=psf)
    fit_psf: Literal["vectorial", "pupil", "simulator"] = args.fit_psf or psf
    fit_optics = fit_optics_for(fit_psf)
    stem = f"oracle_fit_{psf}{'_noise_free' if args.noise_free else ''}"
    stem += "" if fit_psf == psf else f"_fit_{fit_psf}"
    stem += "" if args.body == "known" else f"_body_{args.body}"
    if args.body == "model":
        glow = args.body_glow
        stem += f"_{glow.parent.name}_{glow.stem}" if glow else f"{args.body_clip:g}"
    stem += f"_glow_error_{args.glow_error_e:g}e" if args.glow_error_e > 0 else ""
    path = args.out / f"{stem}{'' if args.radius == 'known' else f'_radius_{args.radius}'}.json"
    problem = out_dir_problem(args.out, [path.name])  # before the fits: it was written after
    if problem is not None:
        parser.error(f"--out: {problem}")
    backend = None
    if args.body == "model" and glows is None:
        from engine.runtime import BackendError, load_backend

        try:
            backend = load_backend(args.body_model)
        except BackendError as exc:
            parser.error(f"--body-model: {exc}")
        if backend.metadata.volume is None:
            parser.error(
                f"--body-model {args.body_model}: a per-plane model; the body's glow "
                "is read from a volume model's density"
            )
    fits: list[OracleFit] = []
    frames: list[dict[str, Any]] = []
    for seed in tqdm(args.seeds, desc=f"oracle fit ({psf})", unit="frame"):
        start = time.perf_counter()
        sample = ho.independent_sample("ganglion", seed, optics=optics)
        offered = None  # the glow a "model" body offers: from --body-glow, or the model's
        if glows is not None:
            offered = glows[f"seed_{seed}"]
        elif backend is not None:
            offered = model_body_glow(backend, sample.frame, args.body_clip)
        fit = oracle_nucleus_depths(
            sample,
            fit_optics,
            iterations=args.iterations,
            noise_free=args.noise_free,
            body=args.body,
            radius=args.radius,
            body_glow_counts=offered,
            glow_error_e=args.glow_error_e,
            error_seed=seed,
        )
        fits.append(fit)
        summary = ho.summarise(fit.depths.errors)
        frames.append(
            {
                "seed": seed,
                "nuclei": fit.nuclei,
                "scored": int(fit.depths.index.size),
                "relative_residual": fit.relative_residual,
                "seconds": time.perf_counter() - start,
                **summary,
            }
        )
        tqdm.write(
            f"seed {seed}: {fit.depths.index.size} of {fit.nuclei} nuclei scored, "
            f"median {summary['median_um']:.2f} µm, within 1 µm "
            f"{100 * summary['within_1um']:.0f} %, residual {fit.relative_residual:.3f}"
        )
    z = np.concatenate([f.depths.z_true_um for f in fits])
    est = np.concatenate([f.depths.z_est_um for f in fits])
    radius = np.concatenate([f.radius_um for f in fits])
    errors = np.abs(est - z)
    pooled = ho.summarise(errors)
    bins = ho.by_distance(z, errors, z_est_um=est)
    print(
        f"oracle fit, {psf} PSF{', noise-free' if args.noise_free else ''}"
        f"{'' if fit_psf == psf else f', fitted through the {fit_psf} PSF'}"
        f"{'' if args.body == 'known' else f', body {args.body}'}"
        f"{'' if args.radius == 'known' else f', radius {args.radius}'}"
        f"{f', glow told to {args.glow_error_e:g} e⁻/px' if args.glow_error_e else ''}: "
        f"{pooled['count']:.0f} crowded nuclei, median {pooled['median_um']:.2f} µm, "
        f"within 1 µm {100 * pooled['within_1um']:.0f} % "
        f"[{100 * pooled['within_1um_lo']:.0f}–{100 * pooled['within_1um_hi']:.0f}], "
        f"p90 {pooled['p90_um']:.2f} µm"
    )
    for row in bins:
        print(
            f"  |z| {row['lo_um']:g}–{row['hi_um']:g} µm: {row['count']:.0f} nuclei, within 1 µm "
            f"{100 * row['within_1um']:.0f} %, at the mirror depth {100 * row['at_mirror']:.0f} %"
        )
    if compare is not None:
        record_set = "independent" if psf == "vectorial" else "pupil"
        _print_comparison(compare.get(record_set, {}), record_set, z, est)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "psf_model": psf,
        "fit_psf_model": fit_psf,
        "noise_free": args.noise_free,
        "body": args.body,
        "radius": args.radius,
        "body_model": str(args.body_model) if args.body == "model" and not glows else None,
        "body_clip_counts": args.body_clip if args.body == "model" and not glows else None,
        "body_glow_file": str(args.body_glow) if glows else None,
        "glow_error_e": args.glow_error_e,
        "iterations": args.iterations,
        "grid_um": GRID_UM.tolist(),
        "pooled": pooled,
        "by_distance": bins,
        "frames": frames,
        "nuclei": {"z_true_um": z.tolist(), "z_est_um": est.tolist(), "radius_um": radius.tolist()},
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
