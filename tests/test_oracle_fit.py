"""The oracle fit of crowded nuclei (`engine.oracle_fit`): what one frame holds in a crowd."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import nnls

pytest.importorskip("psfmodels", reason="the hold-out's PSF needs the sim extra (psfmodels)")

from engine import heldout as ho
from engine.oracle_fit import fit_nnls, main, oracle_nucleus_depths


def test_the_solver_is_non_negative_least_squares_with_a_free_background():
    """FISTA reaches scipy's active-set answer: the first columns ≥ 0, the last one free."""
    rng = np.random.default_rng(3)
    a = rng.random((60, 8))
    b = a[:, :7] @ np.r_[1.0, 0.0, 2.0, 0.0, 0.0, 0.5, 0.0] - 3.0 * a[:, 7]
    b += 0.01 * rng.standard_normal(60)
    x, rel = fit_nnls(sp.csr_matrix(a), b, nonneg=7, iterations=20000)
    # the free column as two non-negative ones (+ and -) gives the same problem to scipy
    ref, _ = nnls(np.column_stack([a, -a[:, 7]]), b)
    np.testing.assert_allclose(x[:7], ref[:7], atol=2e-3)
    assert x[7] == pytest.approx(ref[7] - ref[8], abs=2e-3)
    assert (x[:7] >= 0).all() and x[7] < 0 and rel < 0.01


def test_the_oracle_reads_a_noise_free_crowd():
    """On the noise-free truth of a small ganglion frame, knowing where each nucleus is, its
    size, the body and the optics, the fit puts most scored nuclei within 1 µm of their depth;
    it scores the nuclei the fidelity report scores. Not told the body, it places far fewer."""
    optics = ho.IndependentOptics()
    sample = ho.independent_sample("ganglion", 1, (96, 96), optics=optics)
    fit = oracle_nucleus_depths(sample, optics, iterations=1500, noise_free=True)
    truth = ho.nucleus_depths(ho.truth_planes_fn(sample), sample, min_gap_um=ho.CROWDED_MIN_GAP_UM)
    np.testing.assert_array_equal(fit.depths.index, truth.index)
    assert fit.depths.index.size >= 6 and fit.nuclei > fit.depths.index.size
    errors = fit.depths.errors
    assert np.mean(errors <= 1.0) >= 0.75
    assert np.median(errors) < 0.3
    assert fit.relative_residual < 0.05
    # told nothing of the body, the smooth background cannot take its glow: far fewer placed
    blind = oracle_nucleus_depths(sample, optics, iterations=1500, noise_free=True, body="unknown")
    assert np.mean(blind.depths.errors <= 1.0) < np.mean(errors <= 1.0) - 0.25


def test_the_command_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    """A bad iteration count, a negative seed, a --compare file that is no fidelity report or a
    --body-glow file that is unreadable or lacks a frame each get one line naming the problem,
    before any fitting."""
    not_json = tmp_path / "fidelity.json"
    not_json.write_text("{")
    glows = tmp_path / "glow.npz"
    np.savez(glows, seed_121=np.zeros((4, 4)))
    cases = (
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--glow-error-e", "-1"], "--glow-error-e must be >= 0"),
        (["--glow-error-e", "2", "--body", "shape"], "goes with --body known, not shape"),
        (["--seeds", "-1"], "--seeds must be >= 0"),
        (["--compare", str(not_json)], "not a fidelity report's JSON"),
        (["--compare", str(tmp_path / "missing.json")], "not a fidelity report's JSON"),
        (["--body-glow", str(glows)], "--body-glow goes with --body model, not known"),
        (["--body", "model", "--body-glow", str(not_json)], "not a readable .npz"),
        (["--body", "model", "--body-glow", str(glows)], "no glow for seeds [122, 123, 124]"),
    )
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_the_comparison_pairs_a_models_nuclei_with_the_oracles(capsys):
    """`--compare`: a fidelity report's crowded nuclei beside the oracle's, nucleus by
    nucleus; a report of other nuclei is named and not paired."""
    from engine.oracle_fit import _print_comparison

    z = np.array([-6.0, -1.0, 2.0, 5.0, 8.0])
    oracle = z + np.array([0.2, 0.1, 3.0, 0.3, 0.4])  # misses one near nucleus
    model = z + np.array([12.0, 0.1, 0.2, 10.0, 16.0])  # misses the three far ones
    methods = {
        "model": {"crowded_nuclei": {"z_true_um": z.tolist(), "z_est_um": model.tolist()}},
        "other": {"crowded_nuclei": {"z_true_um": [1.0], "z_est_um": [1.0]}},
        "beads only": {},
    }
    _print_comparison(methods, "independent", z, oracle)
    out = capsys.readouterr().out
    assert "the oracle: within 1 µm 80 % (beyond 4 µm from focus 100 %)" in out
    assert "model: within 1 µm 40 % (beyond 4 µm from focus 0 %)" in out
    assert "the oracle places 3 it misses, misses 1 it places" in out
    assert "other: other nuclei than these (1 against 5): not paired" in out


def test_a_fit_can_believe_the_training_simulators_optics():
    """`--fit-psf simulator`: spheres imaged through the simulator's scalar PSF at the set's
    depth (`SimulatorOptics`, a `heldout.PsfModel`): a tiny one is that PSF, the same at
    every depth."""
    from engine.optics import OpticsConfig, make_psf
    from engine.oracle_fit import SimulatorOptics, fit_optics_for

    optics = fit_optics_for("simulator")
    assert isinstance(optics, SimulatorOptics) and optics.config.particle_depth_um == 12.0
    assert isinstance(fit_optics_for("pupil"), ho.IndependentOptics)
    psf = make_psf(OpticsConfig(particle_depth_um=12.0), np.array([-3.0]), 63)[0]
    tiny = ho.sphere_image(optics, 0.1, 3.0, 63)
    assert abs(float(tiny.sum()) - 1.0) < 0.02
    assert np.corrcoef(tiny.ravel(), psf.ravel())[0, 1] > 0.99
    # one aberration at every depth: the PSF of a source 8 µm deeper is the same function
    assert np.array_equal(optics.psf(np.array([2.0]), 0.0), optics.psf(np.array([2.0]), 8.0))


def test_the_polish_reads_depth_and_radius_blocks_alike():
    """A nucleus offered at two radii has 2 x len(GRID_UM) columns; the polish gives it the
    depth of its best column whichever radius block that lies in."""
    from engine.oracle_fit import GRID_UM, _polish

    rng = np.random.default_rng(5)
    g = GRID_UM.size
    a = rng.random((400, 2 * g + 1))
    a[:, -1] = 1.0  # the background: a constant
    a /= np.linalg.norm(a, axis=0)
    truth = g + 7  # the second radius, the 8th depth
    b = 3.0 * a[:, truth] + 0.5 * a[:, -1]
    owner = np.zeros(2 * g, dtype=int)
    depth, rel = _polish(sp.csc_matrix(a), b, np.zeros(2 * g + 1), owner, 2 * g, sweeps=30)
    assert abs(depth[0] - GRID_UM[7]) < 0.25 and rel < 1e-4


def test_the_body_prior_lattice_covers_the_frame_with_non_negative_blobs():
    """`--body blobs`: broad non-negative Gaussians a step apart, past every edge, so every
    pixel is covered about equally (no hole a nucleus's ring would have to fill)."""
    from engine.oracle_fit import BLOB_SPACING_UM, _blob_columns

    columns = _blob_columns((96, 96), 0.3)
    per_side = len(np.arange(-BLOB_SPACING_UM / 0.3, 96 + BLOB_SPACING_UM / 0.3, 5.0 / 0.3))
    assert columns.shape == (96 * 96, per_side**2) and columns.min() >= 0.0
    cover = np.asarray(columns.sum(axis=1)).ravel()
    assert cover.min() > 0.5 * cover.max()


def test_the_shipped_model_sees_the_body_and_a_fit_can_be_offered_its_glow():
    """`--body model`: the shipped volume model's faint density, rendered at focus, follows the
    body's true glow on a small ganglion frame; offered the true glow the same way (its
    brightness fitted), or with a small error (`--glow-error-e`), the fit places the nuclei as
    well as when told it; a glow of the wrong shape is refused in one line."""
    from engine.oracle_fit import model_body_glow
    from engine.runtime import load_backend

    optics = ho.IndependentOptics()
    sample = ho.independent_sample("ganglion", 1, (96, 96), optics=optics)
    obj = sample.objects
    body = np.flatnonzero(obj.kind == "body")
    xyz = np.column_stack([obj.x_um, obj.y_um, obj.z_um])
    glow = ho.render_objects(
        xyz[body], obj.radius_um[body], obj.intensity[body], (96, 96), optics, np.zeros(1)
    )[0]
    seen = model_body_glow(load_backend("engine/weights/deepz-volume.onnx"), sample.frame)
    assert seen.shape == (96, 96) and seen.min() >= 0.0
    assert np.corrcoef(seen.ravel(), glow.ravel())[0, 1] > 0.9
    offered = oracle_nucleus_depths(
        sample, optics, iterations=1500, noise_free=True, body="model", body_glow_counts=glow * 3
    )
    assert np.mean(offered.depths.errors <= 1.0) >= 0.75
    # the true glow with a small smooth error, its brightness fitted: the same
    near = oracle_nucleus_depths(sample, optics, iterations=1500, noise_free=True, glow_error_e=0.1)
    assert np.mean(near.depths.errors <= 1.0) >= 0.75
    with pytest.raises(ValueError, match="body_glow_counts of shape"):
        oracle_nucleus_depths(sample, optics, iterations=10, body="model")


def test_the_summary_tabulates_every_fit_and_pairs_a_model_on_the_same_nuclei(tmp_path):
    """`--summarise DIR`: one row per fit's JSON (labelled by what it was told, the first
    fits' format too), a compared model's row only where its nuclei are the fits', best
    first, and the bar chart written."""
    import json

    from engine.oracle_fit import summarise

    z = [-8.0, -5.0, 0.5, 6.0]
    fits = {
        "oracle_fit_vectorial.json": {"body": "shape", "radius": "fitted", "est": [-8, -5, 0.5, 6]},
        "oracle_fit_vectorial_body_unknown.json": {"body_known": False, "est": [8, -5, 3.5, -6]},
    }
    for name, told in fits.items():
        record = {"psf_model": "vectorial", "noise_free": False, **told}
        record["nuclei"] = {"z_true_um": z, "z_est_um": record.pop("est")}
        (tmp_path / name).write_text(json.dumps(record))
    compare = {
        "independent": {
            "model": {"crowded_nuclei": {"z_true_um": z, "z_est_um": [-8, 5, 3.0, 6]}},
            "elsewhere": {"crowded_nuclei": {"z_true_um": [1.0], "z_est_um": [1.0]}},
        }
    }
    rows = summarise(tmp_path, compare, tmp_path / "summary.png")
    labels = [r["label"] for r in rows]
    assert labels == [
        "vectorial frames: body's spheres told, radii fitted",
        "vectorial frames: model",
        "vectorial frames: body unknown, radii told",
    ]
    assert [r["within_1um"] for r in rows] == [1.0, 0.5, 0.25]
    assert rows[1]["model"] and rows[2]["within_1um_far"] == pytest.approx(1 / 3)
    assert (tmp_path / "summary.png").stat().st_size > 0
