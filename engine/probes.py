"""Diagnostic probes of a volume model: where rendered beads get their width, and depth response.

    python -m engine.probes [--model engine/weights/deepz-volume.onnx] [--samples 3]
                            [--pupil] [--measured-psf] [--out runs/probes.json]

Three read-outs that `engine.fidelity` does not give, for the evaluation report (issue 9):

- **bead spread**: on the independent beads (`engine.heldout`, vectorial PSF), for each isolated
  bead the model finds (its 3x3 density column holds at least 5 % of the sample's strongest
  column), the density's lateral FWHM at its peak depth, the peak's depth error and the
  density's standard deviation along depth. The model's PSF widens fast with defocus (its FWHM
  at 0 and 1 µm is printed beside), so density spread over a fraction of a µm in depth renders
  a bead wider than the truth even when its lateral width is right.
- **focus response**: the simulator's worm (`engine.optics.WormTimeSeries`: crowded nuclei over
  ±9 µm, a wide body) imaged at focus offsets, so the sample sits `s` µm deeper; for the
  brightest nuclei (peaks of the reference frame's density projection) the shift of their
  density's depth maximum, and the shift of the whole frame's density centroid, against `s`.
  A model that localises depth moves both by `s`; this is what an image-based drift estimate
  from the density would rest on.
- **FWHM ceiling**: the fidelity report's bead FWHM read-out (`engine.heldout.bead_fwhm`) when
  the density is the truth itself: each bead a point, deposited tri-linearly on the model's depth
  grid (as the training targets are) or snapped to the nearest voxel, rendered through the
  model's own PSF bank and renderer. It says how much of the FWHM target the rendering allows
  at all; and the bead spread of those points (the truth's density FWHM and depth SD), which
  says how sharp, laterally and in depth, the model's density must be to meet it.
- **tilted plane, split**: `engine.fidelity`'s tilted-plane read-out (a bead is in focus when
  its peak on the DPM surface is within 20 % of the all-in-focus truth's) with the misses split
  into too dim and too bright, for the model and for the truth's own points rendered by the
  model's renderer (the ceiling). Sharpening a density after the network moves dim beads up and
  the rest over the top: the split says which way a recipe misses.
- **placement bound**: how precisely the tilted and FWHM read-outs ask a bead to be placed,
  and how precisely one frame can place it. The true beads as points, rendered as in the split
  above, moved by a fixed error (laterally, in depth, in brightness): the in-focus PSF spans
  about a pixel, so a bead's peak pixel and width follow its sub-pixel position closely. Then
  each bead moved by a draw of the least error any unbiased estimator can have from the frame
  (the Cramér–Rao bound: the Fisher information of brightness, depth, row, column and an
  offset, its image through the bank as `engine.point_fit.point_image` renders it, white noise
  of the frame's SD; optimistic, the bead's own shot noise and its neighbours' overlap left
  out).
- **column mass by distance**: on the same beads, the density summed over *all* depths within
  3 px of each isolated bead, per unit of the bead's brightness, by the bead's distance from
  focus, as a share of the same for beads within 2 µm of focus; and the share of that mass
  within 1 µm of the true depth. It separates a model that misses a far bead (little mass in
  its column) from one that finds it and doubts its depth (mass in the column, elsewhere).

- **detection head** (with ``--weights`` of a model trained with ``detection``): the head's own
  read-out (`engine.detection.localise`, DECODE's post-processing) on the same beads: by
  distance from focus, the share of isolated beads with a localisation within 1.5 px, and
  within 1 µm of their depth; the depth and lateral errors of those found; and localisations
  per frame that match no bead (false). It says whether the head places beads better than the
  density it is splatted into is read.

Prints the tables and writes JSON. Takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from engine import heldout as ho
from engine.files import out_dir_problem
from engine.metadata import ModelMetadataError
from engine.metrics import gaussian_fwhm_2d
from engine.psf_calibration import plane_fwhm_um, slide_bank_for
from engine.runtime import BackendError, load_backend
from engine.volume import Renderer, model_psf_bank

if TYPE_CHECKING:
    from engine.optics import Lateral

__all__ = [
    "bead_spread",
    "column_mass",
    "focus_response",
    "fwhm_ceiling",
    "head_localisations",
    "main",
    "placement_bound",
    "tilted_split",
]

FOUND_FRACTION = 0.05
"""A bead counts as found when its 3x3 density column holds this share of the strongest one."""
SHIFTS_UM = (-4.0, -2.0, 2.0, 4.0)
"""Sample shifts of the focus-response probe (µm; + = deeper)."""
PLACEMENT_ERRORS: dict[str, tuple[float, float, float]] = {
    "exact": (0.0, 0.0, 0.0),
    "lateral 0.1 px": (0.1, 0.0, 0.0),
    "lateral 0.2 px": (0.2, 0.0, 0.0),
    "lateral 0.3 px": (0.3, 0.0, 0.0),
    "depth 0.3 µm": (0.0, 0.3, 0.0),
    "brightness 10 %": (0.0, 0.0, 0.1),
}
"""Fixed errors of the placement probe: lateral (px, random direction), depth (µm, random
sign), brightness (fraction, random sign)."""
FISHER_HALF_PX = 20
"""Half side of the window a bead's Fisher information is summed over (its ring at 6 µm fits)."""


def densities(backend: Any, samples: Sequence[ho.IndependentSample]) -> list[np.ndarray]:
    """Return the model's density (D, H, W) of each sample's frame.

    One network pass per sample, shared by the probes that read beads.
    """
    return [backend.volume(s.frame)[0] for s in samples]


def bead_spread(
    depth_um: np.ndarray,
    psf: np.ndarray,
    samples: Sequence[ho.IndependentSample],
    volumes: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Width, depth error and depth spread of the density of each found, isolated bead.

    `volumes` are the model's densities of the samples (`densities`) on depths `depth_um`;
    `psf` is the model's PSF bank (its rendering widths are reported beside).
    """
    depth = np.asarray(depth_um, dtype=np.float64)
    width, error, spread = [], [], []
    for s, density in zip(samples, volumes, strict=True):
        index, rows, cols = ho.bead_sites(s)
        columns = [
            density[:, r - 1 : r + 2, c - 1 : c + 2].sum(axis=(1, 2))
            for r, c in zip(rows, cols, strict=True)
        ]
        strongest = max((float(col.max()) for col in columns), default=0.0)
        for j, column in enumerate(columns):
            if strongest <= 0 or column.max() < FOUND_FRACTION * strongest:
                continue
            k = int(column.argmax())
            r, c = int(rows[j]), int(cols[j])
            window = density[k, r - 6 : r + 7, c - 6 : c + 7]
            width.append(gaussian_fwhm_2d(window, s.pixel_size_um, centered=True))
            error.append(depth[k] - float(s.objects.z_um[index[j]]))
            p = column / column.sum()
            mean = float((p * depth).sum())
            spread.append(float(np.sqrt((p * (depth - mean) ** 2).sum())))
    centre = psf.shape[0] // 2
    step = float(depth[1] - depth[0])
    one_um = round(1.0 / step)
    px = samples[0].pixel_size_um
    return {
        "beads_found": len(width),
        "density_fwhm_um_median": float(np.nanmedian(width)) if width else None,
        "peak_depth_error_um_median_abs": float(np.median(np.abs(error))) if error else None,
        "depth_sd_um_median": float(np.median(spread)) if spread else None,
        "psf_fwhm_um_in_focus": plane_fwhm_um(psf, centre, px),
        "psf_fwhm_um_at_1um": float(
            np.mean([plane_fwhm_um(psf, centre + d, px) for d in (-one_um, one_um)])
        ),
    }


def _rendered(
    renderer: Renderer, density: np.ndarray, background: np.ndarray
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Return a planes function (frame, Δz) -> planes rendering a fixed density (frame unused)."""

    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        out: np.ndarray = renderer.render(density, np.asarray(dz_um)) + background
        return out

    return planes


def fwhm_ceiling(
    depth_um: np.ndarray, psf: np.ndarray, samples: Sequence[ho.IndependentSample]
) -> dict[str, Any]:
    """Run the bead FWHM read-out on the true density, rendered by the model's own renderer.

    For sub-voxel (tri-linear), nearest-voxel and spline-held points (`point_density`): the
    share of beads within 15 % of the truth's FWHM and the median ratio, as `engine.fidelity`
    reports them.
    """
    depth = np.asarray(depth_um, dtype=np.float64)
    modes: dict[str, tuple[bool, Lateral]] = {
        "subvoxel": (True, "linear"),
        "nearest_voxel": (False, "linear"),
        "spline": (True, "spline"),
    }
    ratios: dict[str, list[np.ndarray]] = {label: [] for label in modes}
    for s in samples:
        renderer = Renderer(psf, depth, s.frame.shape, threads=1)  # its OTFs: once per sample
        for label, (subvoxel, lateral) in modes.items():
            density = ho.point_density(s, depth, subvoxel=subvoxel, lateral=lateral)
            ratios[label].append(ho.bead_fwhm_ratios(_rendered(renderer, density, s.background), s))
    out: dict[str, Any] = {}
    for label in modes:
        r = np.concatenate(ratios[label])
        out[label] = {
            "beads": int(r.size),
            "within_15pct": float(np.mean(np.abs(r - 1) <= ho.FWHM_TOLERANCE)) if r.size else None,
            "ratio_median": float(np.nanmedian(r)) if r.size else None,
        }
    return out


def _by_distance(
    distance_um: np.ndarray, **columns: Callable[[np.ndarray], float]
) -> list[dict[str, Any]]:
    """Rows per bin of `heldout.DISTANCE_BINS_UM`: its edges, its beads, and each column.

    `distance_um` is each bead's distance from focus; a column is a function of the bin's
    selection mask over those beads (None for an empty bin).
    """
    d = np.asarray(distance_um, dtype=np.float64)
    rows: list[dict[str, Any]] = []
    for lo, hi in itertools.pairwise(ho.DISTANCE_BINS_UM):
        sel = (d >= lo) & (d < hi)
        row: dict[str, Any] = {"from_um": lo, "to_um": hi, "beads": int(sel.sum())}
        row.update({name: fn(sel) if sel.any() else None for name, fn in columns.items()})
        rows.append(row)
    return rows


def _ratio_summary(ratios: np.ndarray) -> dict[str, Any]:
    """Share of peak ratios in focus (within `ho.IN_FOCUS_TOLERANCE` of 1), below and above."""
    r, tol = np.asarray(ratios, dtype=np.float64), ho.IN_FOCUS_TOLERANCE
    if r.size == 0:
        return {"beads": 0, "in_focus": None, "too_dim": None, "too_bright": None}
    return {
        "beads": int(r.size),
        "in_focus": float(np.mean(np.abs(r - 1) <= tol)),
        "too_dim": float(np.mean(r < 1 - tol)),
        "too_bright": float(np.mean(r > 1 + tol)),
        "ratio_median": float(np.median(r)),
        "ratio_quartiles": [float(np.quantile(r, 0.25)), float(np.quantile(r, 0.75))],
    }


def tilted_split(
    backend: Any, psf: np.ndarray, samples: Sequence[ho.IndependentSample]
) -> dict[str, Any]:
    """Score the tilted plane as `engine.fidelity` does, misses split into too dim and too bright.

    "model": the backend's surface on each sample's DPM, as `engine.fidelity` scores it;
    "truth_points": the true beads as sub-voxel points (`point_density`) rendered by the
    model's renderer over the same surface, the most the rendering allows;
    "truth_points_spline": the same held on the spline kernel (a point fit's
    ``lateral="spline"``), the most a render of camera-like beads allows.
    """
    assert backend.metadata.volume is not None
    depth = np.asarray(backend.metadata.volume.depth_um, dtype=np.float64)
    step = float(depth[1] - depth[0])
    _, surface = ho.refocus_fns(backend)
    model: list[np.ndarray] = []
    truth: dict[Lateral, list[np.ndarray]] = {"linear": [], "spline": []}
    for s in samples:
        t = ho.tilted_in_focus(surface, s)
        model.append(t.peak_refocused / t.peak_truth)
        renderer = Renderer(psf, depth, s.frame.shape, threads=1)
        for lateral, ratios in truth.items():
            density = ho.point_density(s, depth, lateral=lateral)
            points = _rendered(renderer, density, s.background)
            c = ho.tilted_in_focus(ho.surface_from_planes(points, step), s)
            ratios.append(c.peak_refocused / c.peak_truth)
    return {
        "model": _ratio_summary(np.concatenate(model)),
        "truth_points": _ratio_summary(np.concatenate(truth["linear"])),
        "truth_points_spline": _ratio_summary(np.concatenate(truth["spline"])),
    }


def _cramer_rao(
    depth_um: np.ndarray,
    psf: np.ndarray,
    shape: tuple[int, int],
    bead: np.ndarray,
    noise_sd: float,
) -> np.ndarray | None:
    """Covariance bound of (brightness, slice, row, col, offset) of a bead, or None.

    `bead` is its (brightness, slice, row, col) on the depth grid of a frame of `shape`; None
    for a bead too near the frame's border or outside the depth grid.

    The image and its derivatives through the bank as the point fit renders them: the depth
    derivative a difference of the images half a slice either side, the lateral ones the
    image's own gradient (the image of a shifted point is the shifted image).
    """
    from engine.point_fit import point_image

    brightness, z, r, c = (float(v) for v in bead)
    h, w = shape
    ri, ci, k = round(r), round(c), FISHER_HALF_PX
    if not (k <= ri < h - k and k <= ci < w - k and 0 <= z <= depth_um.size - 1):
        return None
    rows, cols = (ri - k, ri + k + 1), (ci - k, ci + k + 1)
    image = point_image(psf, depth_um, (z, r, c), rows, cols)
    lo, hi = max(z - 0.5, 0.0), min(z + 0.5, depth_um.size - 1.0)
    d_slice = (
        point_image(psf, depth_um, (hi, r, c), rows, cols)
        - point_image(psf, depth_um, (lo, r, c), rows, cols)
    ) / (hi - lo)
    g_row, g_col = np.gradient(image)
    jac = np.stack(
        [
            image.ravel(),
            brightness * d_slice.ravel(),
            -brightness * g_row.ravel(),
            -brightness * g_col.ravel(),
            np.ones(image.size),
        ],
        axis=1,
    )
    # a pseudo-inverse: at focus the depth derivative all but vanishes (a point and its
    # mirror look alike), and the depth bound there is large rather than a failed inverse
    cov: np.ndarray = np.linalg.pinv(jac.T @ jac / noise_sd**2, hermitian=True)
    symmetric: np.ndarray = (cov + cov.T) / 2
    return symmetric


def camera_ceiling(
    optics: ho.IndependentOptics, seeds: Mapping[str, Sequence[int]]
) -> dict[str, dict[str, Any]]:
    """How far a render of points can match beads imaged as a camera images them.

    The true beads of `seeds`' tilted and bead samples, imaged with
    ``point_render="subpixel"``, as points on the truth's 0.5 µm grid held between pixels by
    each convention (`heldout.point_density`'s ``lateral``), rendered through the set's own
    pixel PSF (at the focal plane's depth) and scored by `engine.fidelity`'s tilted-plane and
    FWHM read-outs: the most a density rendered that way can score, whatever the network.
    """
    depth = ho.truth_dz_um()
    camera = ho.IndependentOptics(
        psf_model=optics.psf_model, zernike_waves=optics.zernike_waves, point_render="subpixel"
    )
    planes = 2 * depth.size - 1
    bank = np.asarray(
        camera.psf((np.arange(planes) - (depth.size - 1)) * ho.SLICE_UM, 0.0), dtype=np.float32
    )
    laterals: tuple[Lateral, ...] = ("linear", "spline")
    tilted: dict[Lateral, list[np.ndarray]] = {lateral: [] for lateral in laterals}
    fwhm: dict[Lateral, list[np.ndarray]] = {lateral: [] for lateral in laterals}
    for kind in ("tilted", "beads"):
        for seed in seeds.get(kind, ()):
            sample = ho.independent_sample(kind, seed, optics=camera)  # type: ignore[arg-type]
            renderer = Renderer(bank, depth, sample.frame.shape, threads=1)
            for lateral in laterals:
                density = ho.point_density(sample, depth, lateral=lateral)
                rendered = _rendered(renderer, density, sample.background)
                if kind == "tilted":
                    surface = ho.surface_from_planes(rendered, ho.SLICE_UM)
                    t = ho.tilted_in_focus(surface, sample)
                    tilted[lateral].append(t.peak_refocused / t.peak_truth)
                else:
                    fwhm[lateral].append(ho.bead_fwhm_ratios(rendered, sample))
    out: dict[str, dict[str, Any]] = {}
    for lateral in laterals:
        # unresolved beads (NaN) count as misses, as engine.fidelity counts them
        r = ho.summarise_ratios(np.concatenate(fwhm[lateral]) if fwhm[lateral] else np.zeros(0))
        out[lateral] = {
            "tilted": _ratio_summary(np.concatenate(tilted[lateral])) if tilted[lateral] else None,
            "fwhm_beads": int(r["count"]),
            "fwhm_within_15pct": r["fraction_within"],
            "fwhm_ratio_median": r["median_ratio"],
        }
    return out


def placement_bound(
    depth_um: np.ndarray,
    psf: np.ndarray,
    samples: Sequence[ho.IndependentSample],
    draws: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Score the beads' read-outs with the true beads placed with known errors (the probe).

    `samples`: "tilted" samples are scored by the tilted read-out (beads in focus), the others
    with beads by the FWHM read-out (beads within 15 % of the truth's width), each pooled over
    its beads. Returns each read-out's share for every one of `PLACEMENT_ERRORS` and for
    `draws` Cramér–Rao draws per sample ("cramer_rao"), and the bound's lateral (px) and depth
    (µm) SDs by distance from focus (`heldout.DISTANCE_BINS_UM`).
    """
    from engine.optics import deposit_point
    from engine.point_fit import frame_noise_sd

    if draws < 1:
        raise ValueError(f"placement_bound needs at least one Cramér-Rao draw, not {draws!r}")
    depth = np.asarray(depth_um, dtype=np.float64)
    step = float(depth[1] - depth[0])
    rng = np.random.default_rng(seed)
    labels = (*PLACEMENT_ERRORS, "cramer_rao")
    hits: dict[str, dict[str, list[np.ndarray]]] = {
        "tilted_in_focus": {label: [] for label in labels},
        "fwhm_within_15pct": {label: [] for label in labels},
    }
    dist, sd_px, sd_um = [], [], []

    def score(
        s: ho.IndependentSample, renderer: Renderer, beads: np.ndarray, moves: np.ndarray
    ) -> np.ndarray:
        """Per scored bead, its read-out's verdict with bead k at beads[k] + moves[k]."""
        density = np.zeros((depth.size, *s.frame.shape), dtype=np.float32)
        for b, z, r, c in beads + moves:
            deposit_point(density, max(b, 0.0), float(np.clip(z, 0, depth.size - 1)), r, c)
        planes = _rendered(renderer, density, s.background)
        if s.kind == "tilted":
            verdict: np.ndarray = ho.tilted_in_focus(
                ho.surface_from_planes(planes, step), s
            ).in_focus
            return verdict
        ratios = np.nan_to_num(ho.bead_fwhm_ratios(planes, s), nan=np.inf)
        within: np.ndarray = np.abs(ratios - 1) <= ho.FWHM_TOLERANCE
        return within

    for s in (s for s in samples if (s.objects.kind == "bead").any()):
        readout = hits["tilted_in_focus" if s.kind == "tilted" else "fwhm_within_15pct"]
        renderer = Renderer(psf, depth, s.frame.shape, threads=1)
        index, positions = ho.bead_grid_positions(s, depth)
        beads = np.column_stack([s.objects.intensity[index], positions])  # the truth
        for label, (lateral, axial, gain) in PLACEMENT_ERRORS.items():
            angle = rng.uniform(0, 2 * np.pi, index.size)
            sign = rng.choice((-1.0, 1.0), (index.size, 2))
            moves = np.stack(
                [
                    sign[:, 0] * gain * beads[:, 0],
                    sign[:, 1] * axial / step,
                    lateral * np.sin(angle),
                    lateral * np.cos(angle),
                ],
                axis=1,
            )
            readout[label].append(score(s, renderer, beads, moves))
        noise = frame_noise_sd(s.frame)
        shape = (s.frame.shape[0], s.frame.shape[1])
        bounds = [_cramer_rao(depth, psf, shape, bead, noise) for bead in beads]
        for i, cov in zip(index, bounds, strict=True):
            if cov is not None:
                dist.append(abs(float(s.objects.z_um[i])))
                sd_px.append(float(np.sqrt((cov[2, 2] + cov[3, 3]) / 2)))
                sd_um.append(step * float(np.sqrt(cov[1, 1])))
        for _ in range(draws):
            moves = np.array(
                [
                    np.zeros(4) if cov is None else rng.multivariate_normal(np.zeros(5), cov)[:4]
                    for cov in bounds
                ]
            ).reshape(-1, 4)
            readout["cramer_rao"].append(score(s, renderer, beads, moves))
    px, um = np.asarray(sd_px), np.asarray(sd_um)
    by_distance = _by_distance(
        np.asarray(dist),
        lateral_sd_px_median=lambda sel: float(np.median(px[sel])),
        depth_sd_um_median=lambda sel: float(np.median(um[sel])),
    )
    out: dict[str, Any] = {
        name: {k: float(np.mean(np.concatenate(v))) for k, v in shares.items()}
        for name, shares in hits.items()
        if all(shares.values())
    }
    out["cramer_rao_by_distance"] = by_distance
    return out


def column_mass(
    depth_um: np.ndarray, samples: Sequence[ho.IndependentSample], volumes: Sequence[np.ndarray]
) -> list[dict[str, Any]]:
    """Density near each bead (7x7 px, all depths) per unit brightness, by distance from focus.

    `volumes` are the model's densities of the samples (`densities`) on depths `depth_um`. Each
    bin's median is given relative to beads within 2 µm of focus, beside the median share of
    that mass within 1 µm of the bead's depth.
    """
    depth = np.asarray(depth_um, dtype=np.float64)
    dist, mass, near = [], [], []
    for s, density in zip(samples, volumes, strict=True):
        index, rows, cols = ho.bead_sites(s)
        for i, r, c in zip(index, rows, cols, strict=True):
            column = density[:, r - 3 : r + 4, c - 3 : c + 4].sum(axis=(1, 2))
            z, total = float(s.objects.z_um[i]), float(column.sum())
            dist.append(abs(z))
            mass.append(total / float(s.objects.intensity[i]))
            near.append(float(column[np.abs(depth - z) <= 1.0].sum()) / total if total > 0 else 0)
    d, m, n = np.asarray(dist), np.asarray(mass), np.asarray(near)
    edges = ho.DISTANCE_BINS_UM
    in_focus = m[(d >= edges[0]) & (d < edges[1])]
    ref = float(np.median(in_focus)) if in_focus.size else float("nan")
    return _by_distance(
        d,
        column_mass_vs_in_focus=lambda sel: float(np.median(m[sel]) / ref),
        share_within_1um_of_depth=lambda sel: float(np.median(n[sel])),
    )


def head_localisations(weights: Path, samples: Sequence[ho.IndependentSample]) -> dict[str, Any]:
    """Score the detection head's own localisations of the samples' beads (torch, a .pt).

    Each isolated bead (`heldout.bead_sites`) is matched to the nearest localisation within
    1.5 px; a localisation within 1.5 px of no bead at all (isolated or not) is false.
    """
    import torch

    from engine.detection import localise
    from engine.metadata import normalize_images, pad_to_multiple
    from engine.model import load_model

    model, meta = load_model(weights)
    if model.detection is None:
        raise ValueError(f"{weights} has no detection head (trained without `detection`)")
    dist, depth_err, lateral, false = [], [], [], []
    for s in samples:
        x, _, _ = normalize_images(s.frame[None])
        x = pad_to_multiple(x[:, None], meta.size_multiple)
        with torch.no_grad():
            _, det = model.detect(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        assert det is not None
        found = localise(det)[0]
        px = s.pixel_size_um
        obj = s.objects
        bead = np.flatnonzero(obj.kind == "bead")
        all_xy = np.stack([obj.x_um[bead] / px, obj.y_um[bead] / px], axis=1)
        if found.size:
            d_any = np.hypot(*(found[:, None, :2] - all_xy[None]).transpose(2, 0, 1))
            false.append(int((d_any.min(axis=1) > 1.5).sum()))
        else:
            false.append(0)
        index, _, _ = ho.bead_sites(s)
        for i in index:
            dist.append(abs(float(obj.z_um[i])))
            if not found.size:
                depth_err.append(np.inf)
                lateral.append(np.inf)
                continue
            d = np.hypot(found[:, 0] - obj.x_um[i] / px, found[:, 1] - obj.y_um[i] / px)
            k = int(d.argmin())
            hit = d[k] <= 1.5
            depth_err.append(abs(float(found[k, 2] - obj.z_um[i])) if hit else np.inf)
            lateral.append(float(d[k]) * px if hit else np.inf)
    dist_a, err, lat = np.asarray(dist), np.asarray(depth_err), np.asarray(lateral)
    rows = _by_distance(
        dist_a,
        found=lambda sel: float(np.isfinite(err[sel]).mean()),
        within_1um=lambda sel: float((err[sel] <= 1.0).mean()),
    )
    ok = np.isfinite(err)
    return {
        "beads": int(err.size),
        "found": float(ok.mean()) if err.size else 0.0,
        "within_1um": float((err <= 1.0).mean()) if err.size else 0.0,
        "within_0_5um": float((err <= 0.5).mean()) if err.size else 0.0,
        "depth_error_um_median_found": float(np.median(err[ok])) if ok.any() else None,
        "depth_error_um_p90_found": float(np.percentile(err[ok], 90)) if ok.any() else None,
        "lateral_error_um_median_found": float(np.median(lat[ok])) if ok.any() else None,
        "false_per_frame": float(np.mean(false)) if false else 0.0,
        "by_distance": rows,
    }


def focus_response(backend: Any, side: int = 256, seed: int = 3) -> dict[str, Any]:
    """How the density of the simulated worm moves when the sample is shifted in depth."""
    from engine.optics import WormTimeSeries

    depth = np.asarray(backend.metadata.volume.depth_um, dtype=np.float64)
    worm = WormTimeSeries((side, side), seed=seed, rate_hz=2.0)

    def smoothed(shift_um: float) -> np.ndarray:
        frame = worm.frame(0, focus_um=-shift_um)  # the focus moves up: the sample is deeper
        return np.asarray(ndi.gaussian_filter(backend.volume(frame)[0], (1.0, 1.5, 1.5)))

    def centroid(volume: np.ndarray) -> float:
        profile = volume.sum(axis=(1, 2))
        return float((profile * depth).sum() / profile.sum())

    reference = smoothed(0.0)
    projection = reference.max(axis=0)
    peaks = (projection == ndi.maximum_filter(projection, 9)) & (
        projection > np.percentile(projection, 99)
    )
    rows, cols = np.nonzero(peaks)
    at_ref = depth[reference[:, rows, cols].argmax(axis=0)]
    rows_out = []
    for shift in SHIFTS_UM:
        volume = smoothed(shift)
        moved = depth[volume[:, rows, cols].argmax(axis=0)] - at_ref
        rows_out.append(
            {
                "shift_um": shift,
                "nuclei_shift_um_median": float(np.median(moved)),
                "nuclei_within_1um_of_shift": float(np.mean(np.abs(moved - shift) <= 1.0)),
                "centroid_shift_um": centroid(volume) - centroid(reference),
            }
        )
    return {"nuclei": int(rows.size), "rows": rows_out}


def main(argv: Sequence[str] | None = None) -> int:
    """Run both probes, print them and write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m engine.probes", description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("engine/weights/deepz-volume.onnx"))
    parser.add_argument("--samples", type=int, default=3, help="independent bead samples")
    parser.add_argument("--out", type=Path, default=Path("runs/probes.json"))
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="the .pt of a model with a detection head: also probe the head's own read-out",
    )
    parser.add_argument(
        "--pupil",
        action="store_true",
        help="image the independent samples through the pupil-function PSF (a third PSF model)",
    )
    parser.add_argument(
        "--measured-psf",
        action="store_true",
        help="render the model's planes and the truth's points through a PSF bank measured "
        "from a simulated bead slide of the samples' optics (engine.psf_calibration), not the "
        "model's own",
    )
    parser.add_argument(
        "--subpixel-points",
        action="store_true",
        help="image the samples' (and the slide's) beads as a camera does, not split between "
        "four pixels (heldout.IndependentOptics.point_render)",
    )
    parser.add_argument(
        "--camera-ceiling",
        action="store_true",
        help="only this: the true beads of the larger independent set's tilted and bead "
        "samples, imaged as a camera does, as points split or spline-held through the set's "
        "own PSF (camera_ceiling; through the vectorial PSF, or with --pupil the pupil PSF, "
        "on the larger set's seeds either way: not the fidelity report's pupil draw)",
    )
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, not {args.samples}")
    if args.camera_ceiling and (
        args.weights or args.measured_psf or args.subpixel_points or args.samples != 3
    ):
        parser.error(
            "--camera-ceiling takes the larger set's samples, camera-like, through the set's own "
            "PSF: --pupil and --out only"
        )
    bank_path = args.out.with_name(f"{args.out.stem}-psf.npy")  # --measured-psf's bank
    written = [args.out.name, *([bank_path.name] if args.measured_psf else [])]
    problem = out_dir_problem(args.out.parent, written)  # before the work: it was after
    if problem is not None:
        parser.error(f"--out: {problem}")
    if args.camera_ceiling:
        from engine.fidelity import LARGE_INDEPENDENT

        optics = ho.IndependentOptics(psf_model="pupil" if args.pupil else "vectorial")
        result = camera_ceiling(optics, LARGE_INDEPENDENT)
        for lateral, v in result.items():
            t = v["tilted"]
            print(
                f"{optics.psf_model} set, camera-like beads, the true points held {lateral}: "
                f"tilted plane {100 * t['in_focus']:.0f}% in focus of {t['beads']} "
                f"({100 * t['too_dim']:.0f}% too dim); FWHM within 15 % "
                f"{100 * v['fwhm_within_15pct']:.0f}% of {v['fwhm_beads']} (median ratio "
                f"{v['fwhm_ratio_median']:.2f})"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
        return 0
    try:
        backend = load_backend(args.model)
    except BackendError as exc:
        parser.error(f"--model: {exc}")
    if backend.metadata.volume is None:
        parser.error(f"{args.model} is a per-plane model; the probes need a volume model")
    if args.weights is not None:  # read at the end, after minutes of probes: checked now
        from engine.model import load_model

        try:
            head_model, _ = load_model(args.weights)
        except (FileNotFoundError, ModelMetadataError) as exc:
            parser.error(f"--weights: {exc}")
        if head_model.detection is None:
            parser.error(f"--weights {args.weights}: no detection head (trained without one)")
    optics = ho.IndependentOptics(
        psf_model="pupil" if args.pupil else "vectorial",
        point_render="subpixel" if args.subpixel_points else "split",
    )
    samples = [ho.independent_sample("beads", seed, optics=optics) for seed in range(args.samples)]
    volume = backend.metadata.volume
    psf = model_psf_bank(args.model, volume)
    depth = np.asarray(volume.depth_um)
    if args.measured_psf:  # the samples' microscope's PSF, measured as a lab would
        psf = slide_bank_for(args.model, backend.metadata, optics).bank
        bank_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(bank_path, psf)
        backend = load_backend(args.model, psf_bank=bank_path)
    volumes = densities(backend, samples)
    spread = bead_spread(depth, psf, samples, volumes)
    response = focus_response(backend)
    columns = column_mass(depth, samples, volumes)
    ceiling = fwhm_ceiling(depth, psf, samples)
    truth = bead_spread(depth, psf, samples, [ho.point_density(s, depth) for s in samples])
    tilted_samples = [
        ho.independent_sample("tilted", seed, optics=optics) for seed in range(args.samples)
    ]
    tilted = tilted_split(backend, psf, tilted_samples)
    placement = placement_bound(depth, psf, [*tilted_samples, *samples])
    rendered_by = "a PSF bank measured from a bead slide" if args.measured_psf else "its own bank"
    print(
        f"{args.model} ({backend.name}); {optics.psf_model} samples (beads {optics.point_render}), "
        f"planes through {rendered_by}"
    )
    print(
        f"bead spread ({spread['beads_found']} found beads): density FWHM "
        f"{spread['density_fwhm_um_median']:.2f} µm at its peak depth, peak depth error "
        f"{spread['peak_depth_error_um_median_abs']:.2f} µm, depth SD "
        f"{spread['depth_sd_um_median']:.2f} µm; model PSF FWHM "
        f"{spread['psf_fwhm_um_in_focus']:.2f} µm in focus, "
        f"{spread['psf_fwhm_um_at_1um']:.2f} µm at 1 µm defocus"
    )
    print(
        f"  the truth's points on the same grid: density FWHM "
        f"{truth['density_fwhm_um_median']:.2f} µm, depth SD {truth['depth_sd_um_median']:.2f} µm"
    )
    print(
        "FWHM ceiling (the true beads as points, the model's own rendering): within 15 % "
        + ", ".join(
            f"{100 * v['within_15pct']:.0f}% {k.replace('_', ' ')} (median ratio "
            f"{v['ratio_median']:.2f}, {v['beads']} beads)"
            for k, v in ceiling.items()
        )
    )
    print(
        f"tilted plane (peak on the DPM surface within {100 * ho.IN_FOCUS_TOLERANCE:.0f} % of "
        "the truth's): "
        + "; ".join(
            f"{k.replace('_', ' ')} {100 * v['in_focus']:.0f}% in focus, "
            f"{100 * v['too_dim']:.0f}% too dim, {100 * v['too_bright']:.0f}% too bright "
            f"(median ratio {v['ratio_median']:.2f}, {v['beads']} beads)"
            for k, v in tilted.items()
        )
    )
    for name, what in (("tilted_in_focus", "tilted plane"), ("fwhm_within_15pct", "FWHM")):
        print(
            f"{what}, the true beads placed with errors: "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in placement[name].items())
        )
    print(
        "  Cramér-Rao bound, lateral SD (px) / depth SD (µm) by distance from focus: "
        + ", ".join(
            f"{r['from_um']:g}-{r['to_um']:g} µm ({r['beads']}): "
            + (
                "-"
                if r["lateral_sd_px_median"] is None
                else f"{r['lateral_sd_px_median']:.2f} / {r['depth_sd_um_median']:.2f}"
            )
            for r in placement["cramer_rao_by_distance"]
        )
    )
    print(f"focus response ({response['nuclei']} bright nuclei of the simulated worm):")
    print(f"{'shift':>7} {'nuclei median':>14} {'within 1 µm':>12} {'centroid':>9}")
    for r in response["rows"]:
        print(
            f"{r['shift_um']:>+7.1f} {r['nuclei_shift_um_median']:>+14.2f} "
            f"{100 * r['nuclei_within_1um_of_shift']:>11.0f}% {r['centroid_shift_um']:>+9.2f}"
        )
    print("column mass by distance from focus (all depths, 7x7 px, per unit brightness):")
    print(f"{'distance':>11} {'beads':>6} {'vs 0-2 µm':>10} {'within 1 µm of depth':>21}")
    for r in columns:
        rel, share = r["column_mass_vs_in_focus"], r["share_within_1um_of_depth"]
        print(
            f"{r['from_um']:>4.0f}-{r['to_um']:<4g}µm {r['beads']:>6} "
            f"{'-' if rel is None else f'{100 * rel:.0f}%':>10} "
            f"{'-' if share is None else f'{100 * share:.0f}%':>21}"
        )
    head = None
    if args.weights is not None:
        head = head_localisations(args.weights, samples)
        print(
            f"detection head ({head['beads']} isolated beads): found {100 * head['found']:.0f}%, "
            f"within 1 µm {100 * head['within_1um']:.0f}%, within 0.5 µm "
            f"{100 * head['within_0_5um']:.0f}%; found beads' depth error median "
            f"{head['depth_error_um_median_found']:.2f} µm, p90 "
            f"{head['depth_error_um_p90_found']:.2f} µm, lateral "
            f"{head['lateral_error_um_median_found']:.3f} µm; "
            f"{head['false_per_frame']:.1f} false per frame"
        )
        print(
            "  by distance from focus (found / within 1 µm): "
            + ", ".join(
                f"{r['from_um']:g}-{r['to_um']:g} µm {r['beads']}: "
                + (
                    "-"
                    if r["found"] is None
                    else f"{100 * r['found']:.0f}/{100 * r['within_1um']:.0f}%"
                )
                for r in head["by_distance"]
            )
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": str(args.model),
        "samples_psf_model": optics.psf_model,
        "samples_point_render": optics.point_render,
        "psf_bank": "measured" if args.measured_psf else "model's own",
        "bead_spread": spread,
        "focus_response": response,
        "column_mass": columns,
        "fwhm_ceiling": ceiling,
        "bead_spread_truth": truth,
        "tilted_split": tilted,
        "placement_bound": placement,
        "detection_head": head,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
