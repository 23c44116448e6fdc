"""How well one wide-field frame can tell a bead's depth at all: the information bound.

    python -m engine.depth_bound [--model engine/weights/deepz-volume.json]
                                 [--optics model|independent|pupil] [--nucleus-radius-um R]
                                 [--out runs/depth_bound]

Any estimator — a network, the matched filter, a fit — reads a bead's depth from the photons
of one frame. Two numbers bound how well it can do, for an isolated bead of known lateral
position, given the optics the model was trained for (`extra.train_config.optics` in its
metadata; the simulator's defaults where none is recorded) and the simulator's camera
(`engine.optics.CameraConfig`: QE, read noise, uniform background):

- **Local precision (Cramér–Rao bound).** The smallest standard deviation of an unbiased
  depth estimate near the true depth, with the bead's brightness and the background unknown
  too (the Fisher information of the Poisson + read-noise image for (depth, photons,
  background), inverted).
- **Mirror confusion.** The local bound says nothing about a second depth that explains the
  frame almost as well. Above and below focus a defocused bead is nearly the same ring (only
  the index-mismatch aberration tells them apart), so for every depth this finds the depth at
  least `--min-separation-um` away whose image, with its brightness and background refitted,
  is closest in Kullback–Leibler divergence, and the error rate of the ideal two-way test
  between them, Φ(−√(2·KL)/2) (Gaussian approximation of the shot and read noise, the true
  depth's variance for both). That is the Bayes error with the two depths equally likely:
  an estimator may favour one side and do better there, but not on both sides at once, so
  averaged over a pair no estimator, however trained, confuses them less often.

`--optics model` (the default) bounds the *training simulator's* beads: the model's optics,
the scalar PSF at one aberration depth, the simulator's camera and uniform background, beads of
1,500–4,500 photons (3 × `peak_photons` × U(0.5, 1.5)). `--particle-depth-um` and
`--depth-dependent-aberration` change the aberration: how often a far bead is confused with
its mirror depends mostly on how deep below the coverslip the sample lies (session 15: 15 % of
beads over ±10 µm at 5 µm, 7 % at 12 µm), since the index-mismatch aberration is what breaks
the symmetry about focus. `--optics independent` bounds the
independent hold-out's beads (`engine.heldout`): the vectorial PSF whose index-mismatch
aberration follows each source's own depth (so a bead and its mirror see different
aberrations), 2 e⁻ read noise with the 1-count offset pattern added as noise (an estimator does
not know it), the middle of its 8–16 e⁻ background taken as uniform, beads of 700–3,500 e⁻
(log-uniform). `--optics pupil` bounds the same beads and camera through the hold-out's third
PSF model, the pupil-function PSF with the objective's own astigmatism, coma and spherical
aberration (`heldout.IndependentOptics(psf_model="pupil")`). With either, `--nucleus-radius-um`
bounds the hold-out's nuclei instead (`nucleus_case`): a filled sphere imaged as the hold-out
images it, with the brightness its crowded nuclei are drawn with, in a uniform body glow; alone,
so a floor under what a crowd allows. The table shows both ends of the
brightness and its middle. Prints the table, writes JSON and a plot. Seconds on a CPU
(a minute or two for the pupil model).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError
from scipy.optimize import nnls
from scipy.special import ndtr

from engine.files import out_dir_problem
from engine.heldout import HeldoutCamera, IndependentOptics, sphere_image, sphere_signal_e
from engine.metadata import ModelMetadata, ModelMetadataError
from engine.optics import SLICE_UM, CameraConfig, OpticsConfig, make_psf

__all__ = [
    "DEFOCUS_UM",
    "BoundCase",
    "Detection",
    "confused_share",
    "depth_bound",
    "independent_case",
    "main",
    "nucleus_case",
    "simulator_case",
]

DEFOCUS_UM = tuple(float(z) for z in np.arange(-10.0, 10.01, 1.0))
"""Bead defocus values the table reports (µm, `make_psf` convention: focus − bead)."""
BEAD_PHOTONS = (1500.0, 3000.0, 4500.0)
"""The simulator's bead brightness: both ends and the middle of 3 × peak_photons × U(0.5, 1.5)."""
INDEPENDENT_BEAD_E = (700.0, float(np.sqrt(700.0 * 3500.0)), 3500.0)
"""The hold-out's bead signal (e⁻): both ends and the geometric middle of its log-uniform draw."""
NUCLEUS_COLUMN_E = (120.0, float(np.sqrt(120.0 * 720.0)), 720.0)
"""The hold-out's nucleus brightness, as the signal of the pixel column through its centre
(e⁻): both ends and the geometric middle of its log-uniform draw
(`engine.heldout.samples.draw_ganglion`)."""
BODY_E = 60.0
"""The worm body's autofluorescence under a nucleus (e⁻ per pixel, taken as uniform): the
hold-out's body tube is 40-110 e⁻ on its axis where its spheres overlap, less off it."""
_STEP_UM = 0.25
"""Grid of candidate depths for the mirror search (µm); the depth derivative of the Cramér–Rao
bound is a central difference of ±_STEP_UM / 5."""
_CROP_PX = 127
"""PSF crop: a bead 10 µm out of focus is a ring about 23 px in radius at 0.3 µm pixels."""


ImagesFn = Callable[[np.ndarray], np.ndarray]
"""(defocus_um (n,), focus − bead) -> (n, H, W) float64 images of one bead, each summing to 1."""


@dataclass(frozen=True)
class Detection:
    """The camera's side of the bound: what turns an object's photons into noisy electrons."""

    quantum_efficiency: float
    background_photons: float
    """Uniform background per pixel (photons; e⁻ when the efficiency is 1)."""
    read_noise_e: float


@dataclass(frozen=True)
class BoundCase:
    """One set of objects to bound (beads or nuclei): how one images, the camera, brightness."""

    name: str
    images: ImagesFn
    detection: Detection
    photons: tuple[float, ...]
    describe: dict[str, Any]
    """What the case stands for, recorded in the JSON."""


def _fisher_sd(
    psf_minus: np.ndarray,
    psf: np.ndarray,
    psf_plus: np.ndarray,
    h_um: float,
    photons: float,
    camera: Detection,
) -> float:
    """Cramér–Rao standard deviation (µm) of depth, brightness and background unknown."""
    qe = camera.quantum_efficiency
    mean_e = qe * (photons * psf + camera.background_photons)
    var = mean_e + camera.read_noise_e**2
    jac = np.stack(
        [qe * photons * (psf_plus - psf_minus) / (2 * h_um), qe * psf, np.full_like(psf, qe)]
    ).reshape(3, -1)
    fisher = (jac / var.reshape(-1)) @ jac.T
    return float(np.sqrt(np.linalg.inv(fisher)[0, 0]))


def _closest_alternative(
    bank: np.ndarray,
    grid_um: np.ndarray,
    index: int,
    photons: float,
    camera: Detection,
    min_separation_um: float,
) -> tuple[float, float]:
    """(depth, KL in nats) of the candidate ≥ min_separation_um away that best mimics the bead."""
    qe = camera.quantum_efficiency
    mean_e = qe * (photons * bank[index] + camera.background_photons)
    weight = 1.0 / (mean_e + camera.read_noise_e**2)
    best, best_z = np.inf, float("nan")
    root_w = np.sqrt(weight)
    for j in np.flatnonzero(np.abs(grid_um - grid_um[index]) >= min_separation_um - 1e-9):
        # the alternative's own brightness and background, fitted by weighted least squares
        design = np.stack([qe * bank[j], np.full_like(bank[j], qe)], axis=1)
        # non-negative: a negative brightness or background would mimic the bead too well
        coef = nnls(design * root_w[:, None], mean_e * root_w)[0]
        kl = 0.5 * float(np.sum((design @ coef - mean_e) ** 2 * weight))
        if kl < best:
            best, best_z = kl, float(grid_um[j])
    return best_z, best


def simulator_case(optics: OpticsConfig, camera: CameraConfig) -> BoundCase:
    """Return the simulator's beads: scalar PSF of `optics`, `camera`, 1,500–4,500 photons.

    A bead at defocus d lies at depth −d; with `optics.depth_dependent_aberration` it is
    imaged with its own depth's aberration (`OpticsConfig.at_depth`), as the simulator does,
    at the depth of its 0.5 µm slice (the simulator's sources sit on that lattice). So the
    depth derivative of the Cramér–Rao bound is the defocus's, within one slice's aberration:
    the PSF's best focus is found on a 0.01 µm grid, which across a 0.1 µm difference of
    aberration depth would move by up to a tenth of it.
    """

    def images(defocus_um: np.ndarray) -> np.ndarray:
        if not optics.depth_dependent_aberration:
            return make_psf(optics, defocus_um, _CROP_PX).astype(np.float64)
        slab = [round(-float(d) / SLICE_UM) * SLICE_UM for d in defocus_um]
        return np.stack(
            [
                make_psf(optics.at_depth(z), np.array([d]), _CROP_PX)[0]
                for z, d in zip(slab, defocus_um, strict=True)
            ]
        ).astype(np.float64)

    return BoundCase(
        name="simulator",
        images=images,
        detection=Detection(
            camera.quantum_efficiency, camera.background_photons, camera.read_noise_e
        ),
        photons=BEAD_PHOTONS,
        describe={"optics": optics.model_dump(), "camera": camera.model_dump()},
    )


def independent_case(
    optics: IndependentOptics | None = None, camera: HeldoutCamera | None = None
) -> BoundCase:
    """Return the independent hold-out's beads (`engine.heldout`), signal in e⁻ (efficiency 1).

    A bead at depth z (defocus d = −z) is imaged with the aberration of its own depth, as the
    hold-out renders it, so its mirror's ring differs by both the defocus sign and the
    aberration. The hold-out's fixed offset pattern is unknown to an estimator: it counts as
    read noise, added in quadrature; its background, smooth but uneven, is taken at the middle
    of its range and uniform.
    """
    opt = optics or IndependentOptics()
    cam = camera or HeldoutCamera()
    name = "independent" if opt.psf_model == "vectorial" else f"independent, {opt.psf_model} PSF"

    def images(defocus_um: np.ndarray) -> np.ndarray:
        return np.stack(
            [opt.psf(np.array([d]), source_z_um=-float(d), size_px=_CROP_PX)[0] for d in defocus_um]
        ).astype(np.float64)

    pattern_e = cam.offset_pattern_counts / cam.gain_counts_per_e
    return BoundCase(
        name=name,
        images=images,
        detection=Detection(
            1.0, float(np.mean(cam.background_e)), float(np.hypot(cam.read_noise_e, pattern_e))
        ),
        photons=INDEPENDENT_BEAD_E,
        describe={"optics": asdict(opt), "camera": asdict(cam)},
    )


def nucleus_case(
    radius_um: float,
    optics: IndependentOptics | None = None,
    camera: HeldoutCamera | None = None,
    body_e: float = BODY_E,
) -> BoundCase:
    """Return the independent hold-out's nuclei of one radius: filled spheres in a worm's body.

    A nucleus at depth z (defocus d = −z) is imaged exactly as the hold-out images it
    (`heldout.sphere_image`: 0.5 µm slabs, each through its own depth's aberrated PSF). Its
    brightness is reported as the hold-out draws it, by the centre column's signal
    (`NUCLEUS_COLUMN_E`), converted to the sphere's total; the background is the camera's
    (as in `independent_case`) plus the body's autofluorescence `body_e`, both uniform. The
    nucleus is alone: its neighbours in a ganglion only make it harder, so this is a floor
    under the error of any estimator on the crowded nuclei.
    """
    opt = optics or IndependentOptics()
    beads = independent_case(opt, camera)  # the same camera, as the hold-out's beads see it
    name = f"nucleus r {radius_um:g} µm" + ("" if opt.psf_model == "vectorial" else ", pupil")

    def images(defocus_um: np.ndarray) -> np.ndarray:
        return np.stack(
            [sphere_image(opt, radius_um, -float(d), _CROP_PX) for d in defocus_um]
        ).astype(np.float64)

    column = np.asarray(NUCLEUS_COLUMN_E)
    total = sphere_signal_e(column, radius_um, opt.pixel_size_um)
    background = beads.detection.background_photons + body_e
    return BoundCase(
        name=name,
        images=images,
        detection=replace(beads.detection, background_photons=background),
        photons=tuple(float(t) for t in total),
        describe=beads.describe
        | {
            "nucleus_radius_um": radius_um,
            "column_e": list(NUCLEUS_COLUMN_E),
            "body_e": body_e,
        },
    )


def depth_bound(
    case: BoundCase,
    photons: Sequence[float] | None = None,
    defocus_um: Sequence[float] = DEFOCUS_UM,
    min_separation_um: float = 1.0,
) -> list[dict[str, Any]]:
    """One row per (photons, defocus): the local bound and the closest mirror depth.

    Each row: ``photons`` (the case's brightness unless given), ``defocus_um``, ``crlb_um``
    (Cramér–Rao SD of depth), ``alternative_um`` (the depth ≥ ``min_separation_um`` away that
    best mimics the bead), ``kl_nats`` and ``ideal_error_rate`` (of the ideal test between the
    two).
    """
    lo = min(defocus_um) - 2.0
    hi = max(defocus_um) + 2.0
    grid = np.round(np.arange(lo, hi + 1e-9, _STEP_UM), 6)
    bank = case.images(grid).reshape(grid.size, -1)
    h = _STEP_UM / 5
    camera = case.detection
    rows = []
    for n in case.photons if photons is None else photons:
        for z in defocus_um:
            index = int(np.argmin(np.abs(grid - z)))
            near = case.images(np.array([z - h, z + h]))
            sd = _fisher_sd(near[0].ravel(), bank[index], near[1].ravel(), h, float(n), camera)
            alt, kl = _closest_alternative(bank, grid, index, float(n), camera, min_separation_um)
            rows.append(
                {
                    "photons": float(n),
                    "defocus_um": float(z),
                    "crlb_um": sd,
                    "alternative_um": alt,
                    "kl_nats": kl,
                    "ideal_error_rate": float(ndtr(-np.sqrt(2 * kl) / 2)),
                }
            )
    return rows


def confused_share(rows: Sequence[dict[str, Any]], within_um: float) -> float:
    """Mean ideal error rate over the rows with |defocus| ≤ within_um (every brightness).

    With depths and brightnesses spread evenly, as the simulator draws them, this is the share
    of beads that even the ideal observer puts at the wrong one of two depths ≥ 1 µm apart: a
    floor under the share of beads any estimator misplaces by at least half that separation
    (for a mirror, about the bead's defocus). It is fair as a mean because each mirror pair
    stands in the rows on both sides of focus; near focus the pairs overlap.
    """
    rates = [r["ideal_error_rate"] for r in rows if abs(r["defocus_um"]) <= within_um + 1e-9]
    if not rates:
        raise ValueError(f"no rows within ±{within_um} µm")
    return float(np.mean(rates))


def _optics_of(model_json: Path) -> OpticsConfig:
    """Return the optics a volume model was trained for (simulator defaults if none recorded)."""
    return OpticsConfig(**(ModelMetadata.from_file(model_json).training_optics or {}))


def _plot(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for n in sorted({r["photons"] for r in rows}):
        mine = [r for r in rows if r["photons"] == n]
        z = [r["defocus_um"] for r in mine]
        ax1.plot(
            z,
            [r["crlb_um"] for r in mine],
            marker="o",
            label=f"{n:.0f} photons" if name == "simulator" else f"{n:.0f} e⁻",
        )
        ax2.plot(z, [100 * r["ideal_error_rate"] for r in mine], marker="o", label=f"{n:.0f}")
    what = name if name.startswith("nucleus") else f"{name} beads"
    xlabel = ("nucleus" if name.startswith("nucleus") else "bead") + " defocus (µm)"
    ax1.set(xlabel=xlabel, ylabel="Cramér–Rao SD of depth (µm)", yscale="log")
    ax1.set_title(f"local precision ({what})", fontsize=10)
    ax2.set(xlabel=xlabel, ylabel="ideal observer's error rate (%)", ylim=(0, 50))
    ax2.set_title("confused with a depth ≥ 1 µm away (often the mirror)", fontsize=10)
    ax1.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the bound for a model's training optics; write JSON and a plot."""
    parser = argparse.ArgumentParser(prog="python -m engine.depth_bound", description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("engine/weights/deepz-volume.json"))
    parser.add_argument(
        "--optics",
        choices=("model", "independent", "pupil"),
        default="model",
        help="model: the model's training optics and the simulator's beads and camera; "
        "independent: the independent hold-out's (engine.heldout; --model is not read); "
        "pupil: the same through the hold-out's pupil-function PSF",
    )
    parser.add_argument(
        "--particle-depth-um",
        type=float,
        help="--optics model: the aberration depth instead of the model's (µm below the "
        "coverslip); how far a bead's side of focus shows depends on it",
    )
    parser.add_argument(
        "--depth-dependent-aberration",
        action=argparse.BooleanOptionalAction,
        help="--optics model: each bead aberrated at its own depth (particle depth + z), or "
        "not (default: as the model trained)",
    )
    parser.add_argument(
        "--nucleus-radius-um",
        type=float,
        help="--optics independent or pupil: bound the hold-out's nuclei of this radius "
        "(filled spheres in a worm's body, `nucleus_case`) instead of its beads",
    )
    parser.add_argument("--min-separation-um", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("runs/depth_bound"))
    args = parser.parse_args(argv)
    which: Literal["model", "independent", "pupil"] = args.optics
    if which != "model" and (
        args.particle_depth_um is not None or args.depth_dependent_aberration is not None
    ):
        parser.error("--particle-depth-um and --depth-dependent-aberration apply to --optics model")
    if which == "model" and args.nucleus_radius_um is not None:
        parser.error("--nucleus-radius-um applies to --optics independent or pupil")
    if args.nucleus_radius_um is not None and not 0 < args.nucleus_radius_um <= 5:
        parser.error(f"--nucleus-radius-um must be in (0, 5] µm, not {args.nucleus_radius_um}")
    if not (math.isfinite(args.min_separation_um) and args.min_separation_um > 0):
        parser.error(
            f"--min-separation-um must be a finite number > 0, not {args.min_separation_um}"
        )
    record: dict[str, Any] = {"case": which}
    if which == "model":
        model_json = args.model.with_suffix(".json")
        if not model_json.is_file():
            parser.error(f"{model_json}: no model metadata there")
        try:
            optics = _optics_of(model_json)
        except (ModelMetadataError, ValidationError) as exc:
            parser.error(f"{model_json}: not a model's metadata with its optics ({exc})")
        changes: dict[str, Any] = {}  # to the model's optics, from the options
        if args.particle_depth_um is not None:
            changes["particle_depth_um"] = args.particle_depth_um
        if args.depth_dependent_aberration is not None:
            changes["depth_dependent_aberration"] = args.depth_dependent_aberration
        try:
            optics = OpticsConfig(**(optics.model_dump() | changes))
        except ValidationError as exc:  # only --particle-depth-um can be refused here
            first = exc.errors()[0]
            parser.error(f"--particle-depth-um {args.particle_depth_um}: {first['msg']}")
        case = simulator_case(optics, CameraConfig())
        record["model"] = str(model_json)
        own_depth = " + each bead's own depth"
        print(
            f"optics of {model_json}: NA {optics.na}, {optics.wavelength_um} µm, "
            f"n {optics.immersion_index} -> {optics.sample_index}, "
            f"{optics.pixel_size_um} µm pixels, aberration at {optics.particle_depth_um} µm"
            f"{own_depth if optics.depth_dependent_aberration else ''}; "
            "the simulator's camera and beads"
        )
    else:
        psf_model: Literal["vectorial", "pupil"] = "pupil" if which == "pupil" else "vectorial"
        ind = IndependentOptics(psf_model=psf_model)
        if args.nucleus_radius_um is None:
            case = independent_case(ind)
            what = "beads (signal in e⁻)"
        else:
            case = nucleus_case(args.nucleus_radius_um, ind)
            what = (
                f"nuclei of radius {args.nucleus_radius_um:g} µm in a body of {BODY_E:g} e⁻ "
                f"(total signal in e⁻ from a centre column of {NUCLEUS_COLUMN_E[0]:.0f}-"
                f"{NUCLEUS_COLUMN_E[-1]:.0f} e⁻)"
            )
        print(
            f"the independent hold-out's optics ({psf_model} PSF, depth-dependent aberration), "
            f"camera and {what}"
        )
    stem = "depth_bound" if which == "model" else f"depth_bound_{which}"
    if args.nucleus_radius_um is not None:
        stem += f"_nucleus_r{args.nucleus_radius_um:g}"
    if which == "model":  # named by the optics bounded, whatever the model's own are
        if optics.particle_depth_um != OpticsConfig().particle_depth_um:
            stem += f"_pz{optics.particle_depth_um:g}"
        if optics.depth_dependent_aberration:
            stem += "_depthdep"
    problem = out_dir_problem(args.out, [f"{stem}.json", f"{stem}.png"])  # before the bound
    if problem is not None:
        parser.error(f"--out: {problem}")
    rows = depth_bound(case, min_separation_um=args.min_separation_um)
    print(f"{'photons':>8} {'defocus':>8} {'CRLB SD':>8} {'mirror':>7} {'KL':>6} {'ideal err':>9}")
    for r in rows:
        print(
            f"{r['photons']:>8.0f} {r['defocus_um']:>+7.1f}µ {r['crlb_um']:>7.2f}µ "
            f"{r['alternative_um']:>+6.2f}µ {r['kl_nats']:>6.1f} "
            f"{100 * r['ideal_error_rate']:>8.1f}%"
        )
    shares = {f"{r:g}": confused_share(rows, r) for r in (4.0, 6.0, 10.0)}
    print(
        f"{'beads' if args.nucleus_radius_um is None else 'nuclei'} even the ideal observer "
        "confuses with a depth ≥ "
        f"{args.min_separation_um:g} µm away: "
        + ", ".join(f"{100 * v:.0f} % within ±{k} µm" for k, v in shares.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    record |= case.describe | {
        "detection": asdict(case.detection),
        "min_separation_um": args.min_separation_um,
        "confused_share_within_um": shares,
        "rows": rows,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot(rows, args.out / f"{stem}.png", case.name)
    print(f"wrote {args.out / stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
