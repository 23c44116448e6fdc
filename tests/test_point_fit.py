"""The serve-time point fit: beads refitted to the frame through the PSF bank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from engine.optics import Lateral, OpticsConfig, deposit_point
from engine.point_fit import PointFit, fit_points, frame_noise_sd, point_image
from engine.volume import Renderer, defocus_index, depth_grid, psf_bank

SHAPE = (96, 96)
OFFSET = 100.0  # camera offset and background (counts)


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return psf_bank(OpticsConfig(), depth_grid())


@pytest.fixture(scope="module")
def renderer(bank: np.ndarray) -> Renderer:
    return Renderer(bank, depth_grid(), SHAPE, threads=1)


def _point(z: float, r: float, c: float, mass: float, lateral: str = "linear") -> np.ndarray:
    """A density of one point at continuous (slice, row, col), split tri-linearly (or, with
    `lateral` "spline", held on the cubic-spline kernel laterally: engine.optics.deposit_point)."""
    out = np.zeros((depth_grid().size, *SHAPE), dtype=np.float32)
    if lateral == "spline":
        deposit_point(out, mass, z, r, c, lateral="spline")
        return out
    fz, fr, fc = int(z), int(r), int(c)
    az, ar, ac = z - fz, r - fr, c - fc
    for dz, wz in ((0, 1 - az), (1, az)):
        for dr, wr in ((0, 1 - ar), (1, ar)):
            for dc, wc in ((0, 1 - ac), (1, ac)):
                out[fz + dz, fr + dr, fc + dc] += mass * wz * wr * wc
    return out


def _centroid(density: np.ndarray) -> tuple[float, float, float, float]:
    grid = np.meshgrid(*(np.arange(n) for n in density.shape), indexing="ij")
    mass = float(density.sum())
    z, r, c = (float((density * g).sum()) / mass for g in grid)
    return mass, z, r, c


def _frame(renderer: Renderer, truth: np.ndarray, seed: int) -> np.ndarray:
    clean = renderer.render(truth, np.zeros(1))[0] + OFFSET
    return np.random.default_rng(seed).poisson(clean).astype(np.float32)


@pytest.mark.parametrize("depth_um", [0.6, 3.3, -4.7])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("lateral", ["linear", "spline"])
def test_a_wide_misplaced_bead_comes_back_as_the_point_the_frame_shows(
    renderer: Renderer, bank: np.ndarray, depth_um: float, noise: bool, lateral: str
) -> None:
    """The network's bead: a slice and a half-pixel off, 30 % too dim and twice as wide. The
    fit puts it where the frame's light says, as bright as it is, as a point: exactly on a
    noise-free frame; within 0.1 µm and 8 % on a noisy one (a bright bead: how well a dim
    one is placed is the noise's to say, and the evaluation's to measure). The frame's bead is
    held as the fit holds points (`lateral`): split, or on the spline kernel."""
    z_true = (depth_um + 10.0) / 0.5  # slice index on the ±10 µm, 0.5 µm grid
    truth = _point(z_true, 47.3, 51.6, 10000.0, lateral)
    if noise:
        frame = _frame(renderer, truth, seed=1)
    else:
        frame = renderer.render(truth, np.zeros(1))[0] + OFFSET
    guess = _point(z_true + 0.9, 47.3 + 0.4, 51.6 - 0.3, 7000.0)
    guess = gaussian_filter(guess, (0.6, 0.5, 0.5)).astype(np.float32)

    out = fit_points(guess, frame, renderer, bank, PointFit(lateral=lateral))  # type: ignore[arg-type]

    assert out.blobs == 1 and out.fitted == 1
    mass, z, r, c = _centroid(out.density)
    tol_px, tol_mass = (1 / 3, 0.08) if noise else (0.02, 0.01)
    assert mass == pytest.approx(10000.0, rel=tol_mass)
    assert abs(z - z_true) <= tol_px * 0.3 / 0.5  # 0.1 µm: a slice is 0.5 µm, a pixel 0.3
    assert abs(r - 47.3) <= tol_px and abs(c - 51.6) <= tol_px
    # a point: its mass on the 8 voxels around it (the spline's 2 x 11 x 11), not a blob
    held = 8 if lateral == "linear" else 2 * 11 * 11
    assert (np.abs(out.density) > 1e-3 * mass).sum() <= held


def test_extended_objects_and_faint_density_are_left_as_they_are(
    renderer: Renderer, bank: np.ndarray
) -> None:
    """A nucleus-wide blob (lateral SD 3 px) and density below the noise are not beads."""
    nucleus = gaussian_filter(_point(20.0, 48.0, 48.0, 40000.0), (1.0, 3.0, 3.0))
    haze = np.full_like(nucleus, 0.01)
    frame = _frame(renderer, nucleus, seed=2)

    out = fit_points(nucleus + haze, frame, renderer, bank)

    assert out.blobs == 0 and out.fitted == 0
    np.testing.assert_array_equal(out.density, nucleus + haze)


def test_two_beads_side_by_side_are_each_fitted(renderer: Renderer, bank: np.ndarray) -> None:
    """A neighbour's light is the rest of the model's, not this bead's (two passes)."""
    truth = _point(24.0, 40.2, 40.0, 2500.0) + _point(16.0, 40.0, 47.7, 1500.0)
    frame = _frame(renderer, truth, seed=3)
    guess = _point(24.6, 40.2, 40.0, 1800.0) + _point(15.5, 40.0, 47.7, 1000.0)
    guess = gaussian_filter(guess, (0.6, 0.5, 0.5)).astype(np.float32)

    out = fit_points(guess, frame, renderer, bank)

    assert out.fitted == 2
    for (z0, z1), mass, z in (((0, 20), 1500.0, 16.0), ((20, 41), 2500.0, 24.0)):
        m, cz, _, _ = _centroid(out.density[z0:z1])
        assert m == pytest.approx(mass, rel=0.1) and abs(cz + z0 - z) <= 0.3


def test_noise_sd_is_read_from_the_frame() -> None:
    rng = np.random.default_rng(4)
    frame = 400.0 + rng.normal(0, 3.0, (128, 128))
    frame[60:64, 60:64] += 500.0  # a bright object does not move it
    assert frame_noise_sd(frame) == pytest.approx(3.0, rel=0.1)


def test_settings_that_cannot_describe_a_fit_are_refused(renderer: Renderer) -> None:
    with pytest.raises(ValueError, match="max_sd_px"):
        PointFit(max_sd_px=0)
    with pytest.raises(ValueError, match="passes"):
        PointFit(passes=0)
    with pytest.raises(ValueError, match="disagree"):
        fit_points(np.zeros((41, 64, 64)), np.zeros(SHAPE), renderer, np.zeros((81, 63, 63)))


def test_the_runtime_serves_the_fit_and_refuses_it_where_it_cannot() -> None:
    """load_backend(point_fit=...) renders the fitted density; per-plane models and confocal
    planes refuse it with one line."""
    from engine.heldout import IndependentOptics, independent_sample
    from engine.runtime import BackendError, load_backend

    weights = Path(__file__).resolve().parents[1] / "engine" / "weights"
    model = weights / "deepz-volume.onnx"
    sample = independent_sample("beads", 101, (128, 128), optics=IndependentOptics())
    plain = load_backend(model, prefer=["onnxruntime"])
    fitted = load_backend(model, prefer=["onnxruntime"], point_fit=PointFit())
    dz = np.array([0.0, 2.0])
    dpms = np.broadcast_to(dz[:, None, None], (2, 128, 128)).astype(np.float32)
    a, b = plain.infer(sample.frame, dpms), fitted.infer(sample.frame, dpms)
    assert a.shape == b.shape and not np.allclose(a, b)
    # the same light: the fit moves and sharpens beads, it does not make or lose much of it
    assert float(b.sum()) == pytest.approx(float(a.sum()), rel=0.05)
    with pytest.raises(BackendError, match="per-plane model"):
        load_backend(weights / "deepz-slim.onnx", prefer=["onnxruntime"], point_fit=PointFit())
    with pytest.raises(ValueError, match="confocal"):
        load_backend(
            model, prefer=["onnxruntime"], point_fit=PointFit(), render_modality="confocal"
        )


def test_the_fidelity_report_serves_each_volume_model_with_the_fit_too() -> None:
    """`engine.fidelity --point-fit`: the shipped model with its beads refitted renders them
    nearer their true width than without (a held-out bead frame made another way)."""
    from engine import fidelity as F
    from engine.heldout import IndependentOptics, bead_fwhm_ratios, independent_sample

    model = Path(__file__).resolve().parents[1] / "engine" / "weights" / "deepz-volume.onnx"
    plain, fitted = F._model_method(model), F._model_method(model, point_fit=True)
    assert fitted.name == f"{plain.name} + point fit" and fitted.volume
    sample = independent_sample("beads", 102, optics=IndependentOptics())
    ratios = {m.name: bead_fwhm_ratios(m.planes, sample) for m in (plain, fitted)}
    plain_err = np.nanmedian(np.abs(ratios[plain.name] - 1))
    fitted_err = np.nanmedian(np.abs(ratios[fitted.name] - 1))
    assert np.isfinite(ratios[fitted.name]).sum() >= 10
    assert fitted_err < plain_err


def test_the_fidelity_command_refuses_a_fit_convention_without_the_fit() -> None:
    from engine import fidelity as F

    with pytest.raises(SystemExit) as exit_info:
        F.main(["--quick", "--fit-lateral", "spline"])
    assert exit_info.value.code == 2


def test_the_fidelity_report_measures_what_a_frame_holds_by_a_fit_from_the_truth() -> None:
    """`engine.fidelity`'s `FIT_CEILING`: the point fit started at the true beads, through the
    bank measured for that set's microscope, places a held-out frame's beads as well as the
    frame allows (median well within the 0.5 µm target); it scores beads only (a spheres frame
    and pixel scores are left out) and needs the set's optics (none on the simulator set)."""
    from engine import fidelity as F
    from engine import heldout as H
    from engine.heldout import IndependentOptics, independent_sample

    model = Path(__file__).resolve().parents[1] / "engine" / "weights" / "deepz-volume.onnx"
    method = F.Method(F.FIT_CEILING, H.input_planes_fn, H.input_surface_fn, fit_from_truth=model)
    optics = IndependentOptics()
    samples = [
        independent_sample("beads", 102, optics=optics),
        independent_sample("spheres", 111, optics=optics),
    ]

    out = F._evaluate_set([method], samples, optics)[F.FIT_CEILING]
    assert out["bead_depth"]["count"] >= 10
    assert out["bead_depth"]["median_um"] <= 0.3
    assert out["nucleus_depth"] == {} and out["psnr_per_frame"] == []
    assert F._evaluate_set([method], samples[:1])[F.FIT_CEILING]["bead_depth"] == {}


def test_the_fits_point_image_is_what_the_renderer_makes_of_the_point(
    renderer: Renderer, bank: np.ndarray
) -> None:
    """`point_image`, the image the fit matches to the frame, equals the renderer's image at
    focus of the same point split tri-linearly (one convention for both); a window reaching
    past the bank's planes is refused rather than wrapped."""
    for z, r, c in ((12.3, 40.6, 51.2), (30.0, 48.0, 47.5), (0.4, 45.1, 44.9)):
        window = (int(r) - 20, int(r) + 21), (int(c) - 20, int(c) + 21)
        image = point_image(bank, depth_grid(), (z, r, c), *window)
        rendered = renderer.render(_point(z, r, c, 1.0), np.zeros(1))[0]
        (r0, r1), (c0, c1) = window
        np.testing.assert_allclose(image, rendered[r0:r1, c0:c1], atol=1e-6)
    half = bank.shape[-1] // 2
    with pytest.raises(ValueError, match="reaches past"):
        point_image(bank, depth_grid(), (10.0, 40.0, 40.0), (40 - half - 1, 41), (20, 61))


def test_a_spline_points_image_is_what_the_renderer_makes_of_it_and_is_the_psf_moved(
    renderer: Renderer, bank: np.ndarray
) -> None:
    """With ``lateral = "spline"`` the fit's image of a point is the renderer's image of that
    point deposited on the spline kernel, and that is the bank's plane moved to the point by
    cubic-spline interpolation: a camera-like bead between pixels, not a four-pixel split."""
    from scipy import ndimage

    for z, r, c in ((12.3, 40.6, 51.2), (20.0, 48.5, 47.5), (0.4, 45.1, 44.9), (5.0, 94.7, 1.3)):
        window = (
            (max(int(r) - 20, 0), min(int(r) + 21, SHAPE[0])),
            (max(int(c) - 20, 0), int(c) + 21),
        )
        image = point_image(bank, depth_grid(), (z, r, c), *window, "spline", SHAPE)
        rendered = renderer.render(_point(z, r, c, 1.0, "spline"), np.zeros(1))[0]
        (r0, r1), (c0, c1) = window
        # at the frame's edge too: the taps off the frame are neither held nor fitted
        np.testing.assert_allclose(image, rendered[r0:r1, c0:c1], atol=1e-6)
    # in focus, a bead at a pixel corner: the moved PSF (spline) keeps the centred peak's
    # height within a few %, the split loses a quarter or more
    focus = int(np.argmin(np.abs(depth_grid())))
    plane = bank[int(defocus_index(np.zeros(1), depth_grid())[0][focus])]
    window = (28, 69), (28, 69)
    spline = point_image(bank, depth_grid(), (focus, 48.5, 48.5), *window, lateral="spline")
    split = point_image(bank, depth_grid(), (focus, 48.5, 48.5), *window)
    moved = ndimage.shift(plane, (0.5, 0.5), order=3, mode="constant")
    o = plane.shape[0] // 2
    np.testing.assert_allclose(spline, moved[o - 20 : o + 21, o - 20 : o + 21], atol=2e-3)
    assert split.max() < 0.8 * spline.max()


@pytest.mark.parametrize(("lateral", "side"), [("spline", 47), ("linear", 31), ("spline", 31)])
def test_a_fit_serves_a_bank_narrower_than_its_window(
    bank: np.ndarray, lateral: Lateral, side: int
) -> None:
    """A measured bank may be narrow (an odd side of 11 px and up): the fit cuts its
    candidates' windows from the planes padded with the zeros beyond them. It was a traceback,
    the spline fit's under 53 px and (review 36) the linear fit's under 45, at every frame."""
    cut = (bank.shape[-1] - side) // 2
    narrow = np.ascontiguousarray(bank[:, cut : cut + side, cut : cut + side])
    narrow /= narrow.sum(axis=(1, 2), keepdims=True)
    renderer = Renderer(narrow, depth_grid(), SHAPE, threads=1)
    truth = _point(26.0, 47.3, 51.6, 10000.0, lateral)
    frame = renderer.render(truth, np.zeros(1))[0] + OFFSET
    guess = gaussian_filter(_point(26.6, 47.6, 51.4, 7000.0), (0.6, 0.5, 0.5)).astype(np.float32)
    out = fit_points(guess, frame, renderer, narrow, PointFit(lateral=lateral))
    assert out.fitted == 1
    mass, z, r, c = _centroid(out.density)
    assert mass == pytest.approx(10000.0, rel=0.01)
    assert abs(z - 26.0) <= 0.05 and abs(r - 47.3) <= 0.05 and abs(c - 51.6) <= 0.05


@pytest.mark.parametrize("lateral", ["linear", "spline"])
def test_the_fits_candidates_are_the_renderers_images_of_the_points_it_deposits(
    renderer: Renderer, bank: np.ndarray, lateral: Lateral
) -> None:
    """The images the fit builds at once for a search's candidates (`_Patch.points`: one
    separable product of the bank's planes with each point's taps, for either convention)
    are, each, the renderer's image of that point held as `deposit_point` holds it: between
    slices and pixels, at the last slice, and at the frame's corner, where the taps that fall
    off the frame are neither held nor fitted."""
    from engine.point_fit import _Patch

    seen = defocus_index(np.zeros(1), depth_grid())[0]
    last = depth_grid().size - 1
    rows, cols = (0, 21), (SHAPE[1] - 26, SHAPE[1])
    candidates = [
        (12.3, 4.6, 88.2),
        (float(last), 3.0, 90.0),
        (last - 0.4, 0.2, 95.7),
        (25.0, -0.3, 94.0),
        (7.75, 1.45, 95.05),
        (7.75, 0.95, 94.55),
    ]
    images = _Patch(bank, seen, rows, cols, lateral, SHAPE).points(candidates)
    for image, (z, r, c) in zip(images, candidates, strict=True):
        volume = np.zeros((depth_grid().size, *SHAPE), dtype=np.float32)
        deposit_point(volume, 1.0, z, r, c, lateral)
        rendered = renderer.render(volume, np.zeros(1))[0]
        np.testing.assert_allclose(image, rendered[rows[0] : rows[1], cols[0] : cols[1]], atol=1e-6)
