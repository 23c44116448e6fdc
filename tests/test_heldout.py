"""The independent held-out set (engine.heldout): its PSF, its samples and its read-outs."""

from __future__ import annotations

import numpy as np
import pytest

from engine import heldout as H
from engine.heldout.readouts import NUCLEUS_MAX_DIAMETER_UM, peak_position
from engine.optics import OpticsConfig, make_psf

SHAPE = (128, 128)


@pytest.fixture(scope="module")
def beads() -> H.IndependentSample:
    return H.independent_sample("beads", 3, SHAPE)


@pytest.fixture(scope="module")
def tilted() -> H.IndependentSample:
    return H.independent_sample("tilted", 4, SHAPE)


def test_samples_are_deterministic_and_well_formed(beads):
    again = H.independent_sample("beads", 3, SHAPE)
    np.testing.assert_array_equal(again.frame, beads.frame)
    np.testing.assert_array_equal(again.planes, beads.planes)
    np.testing.assert_array_equal(again.objects.z_um, beads.objects.z_um)
    other = H.independent_sample("beads", 4, SHAPE)
    assert not np.array_equal(other.frame, beads.frame)
    assert beads.frame.shape == SHAPE and beads.frame.dtype == np.uint16
    assert beads.planes.shape == (41, *SHAPE) and beads.planes.dtype == np.float32
    np.testing.assert_allclose(beads.dz_um, np.arange(-10, 10.01, 0.5))
    assert set(beads.objects.kind) == {"bead"}
    assert np.all(np.abs(beads.objects.z_um) <= 10.0)
    # the frame is the truth plane at focus 0 plus noise (zero-mean, a few counts)
    resid = beads.frame.astype(np.float64) - beads.planes[20]
    assert abs(resid.mean()) < 0.5
    assert resid.std() == pytest.approx(beads.noise_sigma, rel=0.5)


def test_spheres_have_the_stated_statistics():
    s = H.independent_sample("spheres", 1, (64, 64))
    assert set(s.objects.kind) == {"sphere"}
    assert np.all((s.objects.radius_um >= 0.5) & (s.objects.radius_um <= 2.5))
    assert s.planes.shape == (41, 64, 64) and np.all(np.isfinite(s.planes))


def test_vectorial_psf_unit_sum_focus_and_differs_from_training_psf():
    optics = H.IndependentOptics()
    d = H.truth_dz_um()
    psf = optics.psf(d, source_z_um=0.0)
    np.testing.assert_allclose(psf.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert d[int(np.argmax(psf[:, 63, 63]))] == 0.0  # 0 = brightest on-axis peak
    assert np.unravel_index(int(np.argmax(psf[20])), psf[20].shape) == (63, 63)
    scalar = np.asarray(make_psf(OpticsConfig(), d, 127))

    def rel(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - scalar) / np.linalg.norm(scalar))

    # Measured relative L2 difference from the training simulator's scalar PSF (pz = 5 µm):
    # 0.060 for a vectorial PSF at the same particle depth (source z = -7 µm, pz = 5 µm),
    # 0.120 at z = 0 (pz = 12 µm), 0.27 at z = +10 (pz = 22 µm; 0.61 on the worst plane).
    assert rel(np.asarray(optics.psf(d, source_z_um=-7.0))) > 0.04
    assert rel(psf) > 0.08
    assert rel(np.asarray(optics.psf(d, source_z_um=10.0))) > 0.2


def test_within_range_summarises_only_the_beads_near_focus():
    z = np.array([0.5, -1.0, 3.0, -5.0, 7.0, -9.0])
    err = np.array([0.1, 0.2, 0.4, np.nan, 2.0, np.nan])  # NaN: not found
    near, mid = H.within_range(z, err, (4.0, 6.0))
    assert (near["range_um"], near["count"], near["failures"]) == (4.0, 3, 0)
    assert near["median_um"] == 0.2 and near["p90_um"] == 0.4 and near["within_1um"] == 1.0
    assert (mid["count"], mid["failures"], mid["p90_um"]) == (4, 1, np.inf)


def test_confocal_psf_sections_and_its_pinhole_is_not_the_simulators_point():
    """The independent confocal truth: in focus sums to 1 and dims away from focus; a 1 AU
    pinhole (the held-out truth's) sections less than a point pinhole (the simulator's kind)."""
    optics = H.IndependentOptics(pinhole_au=1.0)
    disc = H.pinhole_disc(optics)  # 1 AU = 1.22 * 0.52 / 0.75 µm = 2.82 px across
    np.testing.assert_allclose(disc, disc.T)
    assert disc.shape == (5, 5) and abs(disc.sum() - 1) < 1e-9
    assert 5.5 < 1 / disc.max() < 6.5  # the disc's area in px: pi * 1.41² = 6.2
    d = H.truth_dz_um()
    one_au = optics.psf(d)
    point = H.IndependentOptics(pinhole_au=0.01).psf(d)
    s_one, s_point = one_au.sum(axis=(1, 2)), point.sum(axis=(1, 2))
    np.testing.assert_allclose([s_one[20], s_point[20]], 1.0, rtol=1e-5)
    # measured: 1 AU 0.32 / 0.10 / 0.025 of the in-focus light at 1 / 2 / 4 µm
    assert s_one[16] < 0.15 and s_one[24] < 0.15 and s_one[12] < 0.05 and s_one[28] < 0.05
    assert np.all(s_point[[12, 16, 18, 22, 24, 28]] < s_one[[12, 16, 18, 22, 24, 28]])
    wide = H.IndependentOptics().psf(d)  # confocal in focus: narrower, so a higher peak
    assert one_au[20].max() > 1.3 * wide[20].max()
    with pytest.raises(ValueError, match=r"pinhole_au must be in \(0, 10\)"):
        H.IndependentOptics(pinhole_au=0.0)


def test_truth_planes_score_perfectly_and_the_input_does_not(beads):
    truth = H.truth_planes_fn(beads)
    depth = H.summarise(H.bead_depth_errors(truth, beads))
    assert depth["count"] >= 8 and depth["failures"] == 0
    assert depth["median_um"] <= 0.5
    ratios = H.bead_fwhm_ratios(truth, beads)
    assert ratios.size >= 5
    np.testing.assert_allclose(ratios, 1.0, atol=1e-6)
    fwhm = H.summarise_ratios(ratios)
    assert fwhm["fraction_within"] == 1.0
    inp = H.summarise(H.bead_depth_errors(H.input_planes_fn, beads))
    assert inp["count"] == depth["count"]
    assert inp["median_um"] >= 2.0 and inp["within_1um"] <= 0.3
    metrics = H.plane_metrics(H.input_planes_fn, beads, [-6.0, 0.0, 6.0])
    assert [m["dz_um"] for m in metrics] == [-6.0, 0.0, 6.0]
    assert all(np.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1 for m in metrics)


def test_tilted_truth_surface_is_in_focus_and_input_is_not(tilted):
    assert tilted.tilt is not None and tilted.dpm_um is not None and tilted.in_focus is not None
    excursion = float(tilted.dpm_um.max() - tilted.dpm_um.min())
    assert excursion <= 14.0 + 1e-6 and np.all(np.abs(tilted.dpm_um) <= 10.0)
    np.testing.assert_allclose(
        tilted.tilt.depth_um(tilted.objects.x_um, tilted.objects.y_um), tilted.objects.z_um
    )
    perfect = H.tilted_in_focus(H.surface_from_planes(H.truth_planes_fn(tilted)), tilted)
    assert perfect.index.size >= 5
    assert perfect.fraction == 1.0 and perfect.pearson > 0.999
    raw = H.tilted_in_focus(H.input_surface_fn, tilted)
    assert raw.fraction < 0.6 and raw.pearson < perfect.pearson


def test_matched_filter_recovers_depths_of_scalar_psf_beads():
    optics = OpticsConfig()
    z_true = np.array([-8.0, -5.5, -2.0, 0.0, 2.5, 5.0, 8.5])
    xy = np.array([[32, 32], [80, 32], [128, 32], [32, 96], [80, 96], [128, 96], [80, 144]])
    frame = np.full((176, 160), 100.0)
    psf = make_psf(optics, -z_true, 63)  # a bead at depth z seen at focus 0: defocus -z
    for (x, y), p in zip(xy, psf, strict=True):
        frame[y - 31 : y + 32, x - 31 : x + 32] += 20000.0 * p
    frame = np.random.default_rng(0).poisson(frame).astype(np.uint16)
    defocus = H.truth_dz_um()
    bank = np.asarray(make_psf(optics, defocus, 63))
    est = H.matched_filter_depth(frame, bank, defocus, xy.astype(float))
    np.testing.assert_allclose(est, z_true, atol=1.0)


def test_the_matched_filters_ignore_background_the_smoothing_left(beads, monkeypatch):
    """Review 83: with the templates' mean left in, a flat residual of background (what
    `smooth_background` leaves on Poisson frames: a few tenths of a count) pulled depths to the
    ends of the range, weakening both matched-filter rows. Zero-mean templates ignore it."""
    from engine.heldout import matched_filter as mf

    optics = OpticsConfig()
    z_true = np.array([-8.5, 8.5, 6.0])
    xy = np.array([[48, 48], [112, 48], [80, 112]])
    frame = np.full((160, 160), 100.0)
    for (x, y), p in zip(xy, make_psf(optics, -z_true, 63), strict=True):
        frame[y - 31 : y + 32, x - 31 : x + 32] += 20000.0 * p
    frame = np.random.default_rng(1).poisson(frame).astype(np.float64)
    defocus = H.truth_dz_um()
    bank = np.asarray(make_psf(optics, defocus, 63))
    true_background = mf.smooth_background

    def read(residual: float) -> tuple[np.ndarray, np.ndarray]:
        monkeypatch.setattr(mf, "smooth_background", lambda img: true_background(img) - residual)
        return (
            H.matched_filter_depth(frame, bank, defocus, xy.astype(float)),
            H.own_psf_bead_depths(beads, H.IndependentOptics()).z_est_um,
        )

    (flat, own_flat), (left, own_left) = read(0.0), read(0.5)
    np.testing.assert_allclose(left, flat, atol=1e-6)
    # near the frame's edge the own-PSF window reaches past it (zeros there): hardly moved
    np.testing.assert_allclose(own_left, own_flat, atol=0.1)
    np.testing.assert_allclose(flat, z_true, atol=1.0)


def test_summaries_count_failures():
    s = H.summarise(np.array([0.2, 0.4, np.nan, 3.0]))
    assert s["count"] == 4 and s["failures"] == 1
    assert s["within_0p5um"] == 0.5 and s["within_1um"] == 0.5
    assert s["median_found_um"] == pytest.approx(0.4)
    r = H.summarise_ratios(np.array([1.0, 1.1, 1.3, np.nan]))
    assert r["unresolved"] == 1 and r["fraction_within"] == 0.5


def test_the_share_within_1um_comes_with_its_95_percent_interval():
    s = H.summarise(np.array([0.2, 0.4, np.nan, 3.0]))
    assert 0 < s["within_1um_lo"] < 0.5 < s["within_1um_hi"] < 1
    # 76 of 149 (the shipped model's beads within 1 µm): about 43-59 %, the textbook value
    lo, hi = H.wilson_interval(76, 149)
    assert lo == pytest.approx(0.431, abs=2e-3) and hi == pytest.approx(0.590, abs=2e-3)
    assert H.wilson_interval(0, 10)[0] == 0 and H.wilson_interval(10, 10)[1] == 1


def test_paired_hits_counts_beads_gained_and_lost_and_tests_the_split():
    a = np.array([0.2, 3.0, np.nan, 0.5, 2.0, 0.1])
    b = np.array([0.3, 0.4, 0.9, 2.5, 2.2, 0.1])
    pair = H.paired_hits(a, b)
    assert (pair["gained"], pair["lost"], pair["beads"]) == (2, 1, 6)
    assert pair["p_value"] == 1.0  # 2 against 1 is no evidence either way
    ten = H.paired_hits(np.full(10, np.nan), np.zeros(10))  # ten gained, none lost
    assert ten["p_value"] == pytest.approx(2 / 2**10)
    with pytest.raises(ValueError, match="the same beads"):
        H.paired_hits(a, b[:3])


def test_nucleus_depth_read_out_is_right_on_the_truth_and_wrong_on_the_input():
    spheres = H.independent_sample("spheres", 111, (192, 192))
    truth = H.nucleus_depths(H.truth_planes_fn(spheres), spheres)
    assert truth.index.size >= 5
    assert set(spheres.objects.kind[truth.index]) == {"sphere"}
    assert np.all(2 * spheres.objects.radius_um[truth.index] <= NUCLEUS_MAX_DIAMETER_UM)
    on_truth = H.summarise(truth.errors)
    assert on_truth["failures"] == 0 and on_truth["median_um"] < 0.5
    on_input = H.summarise(H.nucleus_depths(H.input_planes_fn, spheres).errors)
    assert on_input["median_um"] > 2.0  # a flat profile says nothing about depth


def test_ganglion_nuclei_are_crowded_in_a_body_and_the_read_out_holds_on_the_truth():
    """The "ganglion" samples: nuclei packed in a dim worm body; the crowded-nucleus read-out
    (`heldout.CROWDED_MIN_GAP_UM`) is right on the noise-free truth and not on the input."""
    s = H.independent_sample("ganglion", 121, (160, 160))
    o = s.objects
    assert set(o.kind) == {"body", "sphere"}
    nuclei, body = o.kind == "sphere", o.kind == "body"
    assert np.all((o.radius_um[nuclei] >= 0.75) & (o.radius_um[nuclei] <= 2.0))
    assert np.all(np.abs(o.z_um[nuclei]) <= 9.5) and np.all(o.radius_um[body] >= 7.0)
    # crowded: every nucleus's nearest neighbour within a few µm, none overlapping
    xyz = np.column_stack([o.x_um, o.y_um, o.z_um])[nuclei]
    r = o.radius_um[nuclei]
    gaps = np.linalg.norm(xyz[:, None] - xyz[None], axis=2) - r[:, None] - r[None]
    np.fill_diagonal(gaps, np.inf)
    assert gaps.min() > 0.3 - 1e-9 and np.median(gaps.min(axis=1)) < 2.0
    truth = H.nucleus_depths(H.truth_planes_fn(s), s, min_gap_um=H.CROWDED_MIN_GAP_UM)
    assert truth.index.size >= 5 and set(o.kind[truth.index]) == {"sphere"}
    on_truth = H.summarise(truth.errors)
    assert on_truth["failures"] == 0 and on_truth["median_um"] < 0.5
    on_input = H.nucleus_depths(H.input_planes_fn, s, min_gap_um=H.CROWDED_MIN_GAP_UM)
    assert H.summarise(on_input.errors)["median_um"] > 2.0


def test_by_distance_bins_count_misses_as_failures() -> None:
    z = np.array([0.5, -1.0, 3.0, -7.0, 9.0, 9.5])
    err = np.array([0.2, 2.0, 0.5, np.nan, 0.3, np.nan])
    rows = {(r["lo_um"], r["hi_um"]): r for r in H.by_distance(z, err)}
    near = rows[(0.0, 2.0)]
    assert near["count"] == 2 and near["found"] == 1.0 and near["within_1um"] == 0.5
    far = rows[(8.0, 10.5)]
    assert far["count"] == 2 and far["found"] == 0.5 and far["within_1um"] == 0.5
    assert far["median_found_um"] == pytest.approx(0.3)
    assert rows[(6.0, 8.0)]["found"] == 0.0 and rows[(4.0, 6.0)]["count"] == 0
    assert "at_mirror" not in near  # only with the signed estimates


def test_by_distance_counts_beads_put_the_other_side_of_focus() -> None:
    """A bead 8 µm above focus read 8.3 µm below it is at the mirror; one read at its own depth,
    one read elsewhere and one not found are not; near focus the two depths overlap and a
    right answer is never called a mirror."""
    z = np.array([8.0, -9.0, 7.0, 9.5, 0.3])
    est = np.array([-8.3, -9.2, 2.0, np.nan, -0.2])
    rows = {(r["lo_um"], r["hi_um"]): r for r in H.by_distance(z, np.abs(est - z), z_est_um=est)}
    far = rows[(8.0, 10.5)]
    assert far["count"] == 3 and far["at_mirror"] == pytest.approx(1 / 3)
    assert rows[(6.0, 8.0)]["at_mirror"] == 0.0
    assert rows[(0.0, 2.0)]["at_mirror"] == 0.0 and rows[(0.0, 2.0)]["within_1um"] == 1.0


def test_bead_snr_is_what_the_matched_filter_scores_and_falls_with_defocus(beads):
    """`bead_snr` in the sample's own units: on the noise-free frame, the bead's own image
    (`point_images`, mean removed, unit norm) correlated at each bead near focus scores its
    predicted SNR times σ (within 10 %: its neighbours' light is in the window too; beads 3 µm
    apart or more); a bead twice as bright has twice
    the SNR, and the same bead 8 µm from focus a third or less of it (its light spreads over a
    ring)."""
    from dataclasses import replace

    optics = H.IndependentOptics()
    index, rows, cols = H.bead_sites(beads, 3.0)
    snr = H.bead_snr(beads, index, optics)
    clean = np.pad(beads.planes[20].astype(np.float64) - beads.background, 63)
    near = np.flatnonzero(np.abs(beads.objects.z_um[index]) <= 2.0)
    assert near.size >= 1
    for j in near:
        i = int(index[j])
        x, y = (float(beads.objects.x_um[i]), float(beads.objects.y_um[i]))
        x, y = x / beads.pixel_size_um, y / beads.pixel_size_um
        t = H.point_images(optics, [beads.objects.z_um[i]], 127, (x - round(x), y - round(y)))[0]
        t = t.astype(np.float64)
        t = (t - t.mean()) / np.sqrt(((t - t.mean()) ** 2).sum())
        score = float((clean[rows[j] : rows[j] + 127, cols[j] : cols[j] + 127] * t).sum())
        assert score / beads.noise_sigma == pytest.approx(snr[j], rel=0.1)
    one = H.HeldoutObjects(
        x_um=np.zeros(3),
        y_um=np.zeros(3),
        z_um=np.array([0.5, 0.5, 8.0]),
        radius_um=np.zeros(3),
        intensity=np.array([1000.0, 2000.0, 1000.0]),
        kind=np.array(["bead"] * 3, dtype="<U6"),
    )
    a, b, far = H.bead_snr(replace(beads, objects=one), np.arange(3), optics)
    assert b == pytest.approx(2 * a)
    assert 0 < far < a / 3


def test_the_matched_filter_with_the_sets_own_psf_places_beads_near_focus(beads):
    """`own_psf_bead_depths`: told where each bead is, the frame correlated with the bead's own
    image at each candidate depth places three in four of the beads within 3 µm of focus to
    0.5 µm (a crowded one may fall to a neighbour's ring; the reference row of the fidelity
    report), and scores the beads `bead_depths` scores."""
    found = H.own_psf_bead_depths(beads, H.IndependentOptics())
    index, _, _ = H.bead_sites(beads, 1.5)
    np.testing.assert_array_equal(found.index, index)
    near = np.abs(found.z_true_um) <= 3.0
    assert near.sum() >= 3
    assert np.mean(found.errors[near] <= 0.5) >= 0.75
    assert np.median(found.errors[near]) <= 0.25


def test_a_beads_own_image_is_the_frames_and_a_corner_bead_is_dimmer_as_a_camera_sees_it():
    """`point_images` is how the set images a bead: unit light in the crop near focus; between
    pixels on a camera-like set (point_render "subpixel") it is the pixel-centred image moved,
    its peak at a pixel corner about half of a centred one's, and it is what `bead_snr` and the
    own-PSF filter correlate with, so a corner bead in focus is not read as defocused."""
    camera = H.IndependentOptics(point_render="subpixel")
    centred = H.point_images(camera, [0.0], 63)[0]
    corner = H.point_images(camera, [0.0], 63, (0.5, 0.5))[0]
    assert float(centred.sum()) == pytest.approx(1.0, abs=0.02)
    assert float(corner.sum()) == pytest.approx(1.0, abs=0.02)
    assert 0.4 < corner.max() / centred.max() < 0.6
    # a corner bead in focus, alone and noise-free: its own image says 0 µm, the centred one
    # (what the filter used to correlate with) says it is defocused
    depths = -H.truth_dz_um()[::-1]
    frame = np.pad(corner, 40) * 5000.0
    window = frame[40 : 40 + 63, 40 : 40 + 63]

    def best(offset: tuple[float, float]) -> float:
        t = H.point_images(camera, depths, 63, offset).astype(np.float64)
        scores = np.einsum("qyx,yx->q", t, window) / np.sqrt((t**2).sum(axis=(1, 2)))
        return float(depths[int(np.argmax(scores))])

    assert best((0.5, 0.5)) == 0.0
    assert best((0.0, 0.0)) != 0.0


def test_the_fidelity_report_bins_beads_by_snr_where_the_optics_are_known(beads):
    """`engine.fidelity._evaluate_set` with a set's optics: every method's beads binned by SNR
    (the bins count every scored bead), the own-PSF matched filter scored; without optics (the
    simulator set) neither, and the report leaves that filter's row out."""
    from engine import fidelity as F

    methods = [
        F.Method("unrefocused input", H.input_planes_fn, H.input_surface_fn),
        F.Method(F.OWN_PSF_FILTER, H.input_planes_fn, H.input_surface_fn, True, own_psf=True),
    ]

    with_optics = F._evaluate_set(methods, [beads], H.IndependentOptics())
    for name in (m.name for m in methods):
        rows = with_optics[name]["bead_depth_by_snr"]
        assert sum(r["count"] for r in rows) == with_optics[name]["bead_depth"]["count"] > 0
    assert with_optics[F.OWN_PSF_FILTER]["bead_depth"]["failures"] == 0
    without = F._evaluate_set(methods, [beads])
    assert without["unrefocused input"]["bead_depth_by_snr"] == []
    assert without[F.OWN_PSF_FILTER]["bead_depth"] == {}
    text = F.report(
        {"results": {"simulator": without}, "sets": {"simulator": ["beads 3"]}, "seconds": 0.0}
    )
    assert F.OWN_PSF_FILTER not in text and "unrefocused input" in text


def test_by_snr_bins_count_misses_as_failures() -> None:
    snr = np.array([3.0, 6.0, 7.0, 25.0, 40.0])
    err = np.array([np.nan, 0.4, 3.0, 0.1, np.nan])
    rows = {(r["snr_lo"], r["snr_hi"]): r for r in H.by_snr(snr, err)}
    assert rows[(0.0, 5.0)]["count"] == 1 and rows[(0.0, 5.0)]["found"] == 0.0
    mid = rows[(5.0, 8.0)]
    assert mid["count"] == 2 and mid["found"] == 1.0 and mid["within_1um"] == 0.5
    top = rows[(20.0, float("inf"))]
    assert top["count"] == 2 and top["within_1um"] == 0.5 and top["found"] == 0.5
    assert rows[(12.0, 20.0)]["count"] == 0


def test_the_fidelity_report_compares_models_bead_by_bead():
    from engine.fidelity import _paired_table

    errors = {"shipped": [0.2, 3.0, np.nan, 0.5], "recipe": [0.3, 0.4, 0.9, 2.5]}
    tilted = {
        "shipped": [True, True, False, False, True],
        "recipe": [True, False, True, True, True],
    }
    res = {
        m: {
            "bead_errors_um": e,
            "bead_depth": H.summarise(np.array(e)),
            "tilted_beads_in_focus": tilted[m],
            "tilted_plane_sizes": [2, 3],  # two planes: the first 2 beads and the last 3
        }
        for m, e in errors.items()
    }
    lines = _paired_table(res)
    depth_row, tilted_row = [line for line in lines if line.startswith("| recipe |")]
    cells = [c.strip() for c in depth_row.split("|")[2:-1]]
    assert cells[1] == "2 / 1" and cells[4] == "1 / 1"  # within 1 and 0.5 µm: gained / lost
    assert cells[0].startswith("75% (") and cells[3].startswith("50% (")  # with intervals
    # the tilted plane's beads in focus, compared the same way: 2 gained, 1 lost of 5
    cells = [c.strip() for c in tilted_row.split("|")[2:-1]]
    assert cells[0].startswith("80% (") and cells[0].endswith("of 5")
    assert cells[1] == "2 / 1" and cells[2] == "1"
    # plane by plane (review 83: a plane's beads move together): 2 -> 1 and 1 -> 3 in focus
    assert cells[3] == "1 / 1" and cells[4] == "1"


def test_pupil_psf_keeps_psfmodels_focus_and_adds_the_objectives_aberrations():
    pupil = H.IndependentOptics(psf_model="pupil")
    vectorial = H.IndependentOptics()
    for pz in (2.0, 12.0, 22.0):  # one axial convention: defocus means the same in every set
        assert abs(pupil.best_focus_um(pz) - vectorial.best_focus_um(pz)) < 0.02
    d = np.array([-2.0, 0.0, 2.0])
    psf = pupil.psf(d)
    np.testing.assert_allclose(psf.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert int(np.argmax(psf[:, 63, 63])) == 1  # 0 = the brightest on-axis peak

    def skew(plane: np.ndarray) -> float:
        """x·y second moment: an image stretched along one diagonal or the other."""
        y, x = np.mgrid[-63:64, -63:64]
        return float((plane * x * y).sum() / plane.sum())

    # Oblique astigmatism stretches the defocused spot along one diagonal before focus and
    # the other after (measured: -1.4 and +2.6 px²); without the Zernike terms the PSF is
    # the same under x <-> y and not stretched at all.
    assert skew(psf[0]) < -0.5 and skew(psf[2]) > 0.5
    clean = H.IndependentOptics(psf_model="pupil", zernike_waves=(0.0, 0.0, 0.0)).psf(d)
    np.testing.assert_allclose(clean, clean.transpose(0, 2, 1), atol=1e-6)
    np.testing.assert_allclose(clean, clean[:, ::-1, ::-1], atol=1e-6)  # centred on (63, 63)
    assert max(abs(skew(p)) for p in clean) < 1e-3
    # defocus has psfmodels' sign: each plane is like the vectorial PSF's at the same defocus
    # (measured correlation 0.99) more than at the mirror one (0.82-0.87)
    far = np.array([-6.0, 6.0])
    mine = H.IndependentOptics(psf_model="pupil", zernike_waves=(0.0, 0.0, 0.0)).psf(far)
    theirs = vectorial.psf(far)
    corr = np.corrcoef(mine.reshape(2, -1), theirs.reshape(2, -1))[:2, 2:]
    assert corr[0, 0] > corr[0, 1] + 0.05 and corr[1, 1] > corr[1, 0] + 0.05
    with pytest.raises(ValueError, match="psf_model must be"):
        H.IndependentOptics(psf_model="scalar")  # type: ignore[arg-type]
    # and it is another model than psfmodels' vectorial one (dimmer in focus: aberrated)
    assert psf[1].max() < 0.9 * vectorial.psf(d)[1].max()


def test_the_fidelity_report_gives_each_methods_psnr_gain_frame_by_frame():
    """The pooled PSNR median follows the set's mix of sample kinds; the report also gives the
    gain over the input frame by frame, which does not (median, lowest, highest)."""
    from engine.fidelity import _frame_gain_lines

    res = {
        "model": {"psnr_per_frame": [40.0, 31.0, 30.0]},
        "unrefocused input": {"psnr_per_frame": [35.0, 26.0, 27.0]},
        "matched filter": {"psnr_per_frame": []},  # depth only: no planes, no line
    }
    (line, blank) = _frame_gain_lines(res)
    assert "3 frames" in line and "model: +5.00 dB (+3.00 … +5.00)." in line
    assert "matched filter" not in line and blank == ""
    assert _frame_gain_lines({"model": {"psnr_per_frame": [40.0]}}) == []  # no input scored


def test_the_fidelity_figure_of_crowded_nuclei_is_drawn_where_there_are_some(tmp_path):
    from engine.fidelity import _plot_crowded

    nuclei = {"z_true_um": [-6.0, 2.0, 7.5], "z_est_um": [5.5, 2.1, float("nan")]}
    r = {
        "results": {
            "independent": {"model": {"crowded_nuclei": nuclei}, "filter": {}},
            "simulator": {"model": {"crowded_nuclei": {}}},
        }
    }
    path = tmp_path / "crowded.png"
    assert _plot_crowded(r, path) and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _plot_crowded({"results": {"simulator": {"model": {}}}}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_a_sphere_images_as_the_hold_out_draws_it_and_a_tiny_one_as_its_psf():
    """`sphere_image` is the hold-out's own sphere rendering (what `engine.depth_bound` bounds
    a nucleus with): unit total, and a 0.1 µm sphere is the point spread function of its depth;
    in focus a 2 µm one spreads its light far wider. Bad sizes are refused."""
    optics = H.IndependentOptics()
    tiny = H.sphere_image(optics, 0.1, 3.0, 63)
    assert abs(float(tiny.sum()) - 1.0) < 0.02
    psf = optics.psf(np.array([-3.0]), source_z_um=3.0, size_px=63)[0]
    assert np.corrcoef(tiny.ravel(), psf.ravel())[0, 1] > 0.99
    in_focus = H.sphere_image(optics, 0.1, 0.0, 63), H.sphere_image(optics, 2.0, 0.0, 63)
    assert in_focus[1].max() < 0.2 * in_focus[0].max()
    for bad in ((0.0, 63), (1.0, 64)):
        with pytest.raises(ValueError, match="radius_um"):
            H.sphere_image(optics, *bad[:1], 0.0, bad[1])


@pytest.mark.parametrize("psf_model", ["vectorial", "pupil"])
def test_subpixel_psf_sums_to_the_pixel_psf(psf_model):
    optics = H.IndependentOptics(psf_model=psf_model, point_render="subpixel")
    d = np.array([0.0, 6.0])
    fine = optics.psf_subpixel(d, 0.0, 31)
    assert fine.shape == (2, 93, 93)
    np.testing.assert_allclose(fine.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    binned = fine.reshape(2, 31, 3, 31, 3).sum(axis=(2, 4))
    l1 = np.abs(binned - optics.psf(d, 0.0, 31)).sum(axis=(1, 2))
    # the pupil model sums the very same thirds; psfmodels integrates its pixels its own way
    assert np.all(l1 < (1e-5 if psf_model == "pupil" else 0.03)), l1


def _one_point(render: str, row: float, col: float) -> np.ndarray:
    optics = H.IndependentOptics(point_render=render)  # type: ignore[arg-type]
    xyz = np.array([[col * optics.pixel_size_um, row * optics.pixel_size_um, 0.0]])
    image: np.ndarray = H.render_objects(
        xyz, np.zeros(1), np.ones(1), (41, 41), optics, np.zeros(1)
    )[0]
    return image


def test_subpixel_points_keep_their_light_and_peak_where_a_camera_sees_them():
    rows, cols = np.indices((41, 41))
    centred = _one_point("subpixel", 20.0, 20.0)
    np.testing.assert_allclose(centred, _one_point("split", 20.0, 20.0), atol=1e-6)
    for fy, fx in [(0.5, 0.5), (0.25, 0.4), (0.9, 0.1)]:
        sub = _one_point("subpixel", 20 + fy, 20 + fx)
        split = _one_point("split", 20 + fy, 20 + fx)
        assert sub.sum() == pytest.approx(centred.sum(), rel=1e-4)  # 41² keeps 99 %
        # placed where it is (to a third, then a Fourier shift by the rest): the centroid
        # within 0.01 px (measured 0.006; the 41² crop cuts the PSF's tails unevenly)
        cy, cx = (sub * rows).sum() / sub.sum(), (sub * cols).sum() / sub.sum()
        assert abs(cy - 20 - fy) <= 0.01 and abs(cx - 20 - fx) <= 0.01
        # a pixel collects the light on its area: off-centre points peak higher than the
        # four-pixel split makes them, and never above a centred point
        assert split.max() < sub.max() <= centred.max() + 1e-6
    # at a pixel's corner a camera collects about half the centred peak (measured 0.49)
    assert 0.45 < _one_point("subpixel", 20.5, 20.5).max() / centred.max() < 0.55


def test_subpixel_points_refuse_a_confocal_pinhole():
    with pytest.raises(ValueError, match="wide-field only"):
        H.IndependentOptics(point_render="subpixel", pinhole_au=1.0)
    with pytest.raises(ValueError, match="point_render"):
        H.IndependentOptics(point_render="exact")  # type: ignore[arg-type]


def test_a_refocusing_with_no_objects_scores_high_ssim_and_finds_no_bead(beads):
    """The pixel targets' floor (review 36): the frame's smooth background at every Δz holds
    no object, yet on a sparse frame its SSIM beats the unrefocused input's. So the report
    carries it as a row, and a pixel figure counts only above it."""
    dz = np.arange(-10.0, 10.001, 2.0)
    blank = H.plane_metrics(H.background_planes_fn, beads, dz)
    given = H.plane_metrics(H.input_planes_fn, beads, dz)
    assert np.median([r["ssim"] for r in blank]) > np.median([r["ssim"] for r in given])
    assert np.median([r["ssim"] for r in blank]) > 0.9
    errors = H.bead_depth_errors(H.background_planes_fn, beads)
    assert errors.size > 0 and np.all(np.isnan(errors))  # NaN: not found (no peak anywhere)
    surface = H.background_surface_fn(beads.frame, np.zeros(beads.frame.shape))
    np.testing.assert_array_equal(surface, H.background_planes_fn(beads.frame, np.zeros(1))[0])


def test_the_fresh_seeds_were_never_used_for_development():
    """`engine.fidelity --fresh` (review 36): its seeds share none with the sets models were
    chosen and the point fit tuned on, kind by kind."""
    from engine import fidelity as F

    used = [F.SEED_SETS[k] for k in ("quick", "default", "large")]
    used += [(F.CROSS_MODALITY_SEEDS, F.CROSS_MODALITY_INDEPENDENT)]
    fresh_sim, fresh_ind = F.SEED_SETS["fresh"]
    for sim, ind in used:
        for fresh, old in ((fresh_sim, sim), (fresh_ind, ind)):
            for kind, seeds in fresh.items():
                assert not set(seeds) & set(old.get(kind, ())), kind
    assert sum(map(len, fresh_ind.values())) == sum(map(len, F.LARGE_INDEPENDENT.values()))


def test_the_sealed_seeds_share_none_with_any_other_set():
    """`engine.fidelity --sealed` (review 83: ship decisions were made on --fresh since session
    37): seeds of its own, cross-modality included, the larger set's size."""
    from engine import fidelity as F

    sealed_sim, sealed_ind = F.SEED_SETS["sealed"]
    others = [F.SEED_SETS[k] for k in ("quick", "default", "large", "fresh")]
    others += [(F.CROSS_MODALITY_SEEDS, F.CROSS_MODALITY_INDEPENDENT), F.FRESH_CROSS_MODALITY]
    mine = [(sealed_sim, sealed_ind), F.SEALED_CROSS_MODALITY]
    for sim, ind in others:
        for own_sim, own_ind in mine:
            for own, old in ((own_sim, sim), (own_ind, ind)):
                for kind, seeds in own.items():
                    assert not set(seeds) & set(old.get(kind, ())), kind
    cm_sim, cm_ind = F.SEALED_CROSS_MODALITY
    for own, cm in ((sealed_sim, cm_sim), (sealed_ind, cm_ind)):  # nor within itself
        for kind, seeds in cm.items():
            assert not set(seeds) & set(own.get(kind, ())), kind
    assert sum(map(len, sealed_ind.values())) == sum(map(len, F.LARGE_INDEPENDENT.values()))


def test_a_bead_between_depth_slices_is_imaged_through_its_own_depths_psf():
    """`IndependentOptics.point_depth` (review 65): "lattice" mixes the PSFs of the two 0.5 µm
    slices around a bead, as the training simulator does; "own" images it through the PSF at
    its own defocus, as a microscope does. On a slice both agree; between two slices the mix
    is measurably off the bead's own PSF (2-7 % L1 at focus, measured)."""
    lattice = H.IndependentOptics()
    own = H.IndependentOptics(point_depth="own")
    between, on_slice = 3.25, 2.0
    images = H.point_images(own, [between, on_slice], size_px=41)
    exact = own.psf(np.array([-between]), between, 41)[0]
    np.testing.assert_allclose(images[0], exact, atol=1e-7)
    mixed = H.point_images(lattice, [between, on_slice], size_px=41)
    np.testing.assert_allclose(images[1], mixed[1], atol=1e-7)
    off = np.abs(mixed[0] - images[0]).sum() / images[0].sum()
    assert 0.01 < off < 0.15
    with pytest.raises(ValueError, match="point_depth"):
        H.IndependentOptics(point_depth="exact")  # type: ignore[arg-type]


def test_own_depth_truth_planes_peak_at_the_beads_depth():
    """A frame of own-depth beads: a bead's 3x3 profile through the truth planes, refined by a
    parabola, peaks at its depth (measured within 0.02 µm; the slice mix is off by 0.02)."""
    optics = H.IndependentOptics(point_depth="own")
    xyz = np.array([[9.0, 9.0, 1.3], [16.5, 16.5, -4.2], [9.0, 16.5, 6.7]])
    dz = H.truth_dz_um()
    planes = H.render_objects(xyz, np.zeros(3), np.full(3, 1e4), (80, 80), optics, dz)
    for x, y, z in xyz:
        r, c = round(y / optics.pixel_size_um), round(x / optics.pixel_size_um)
        profile = planes[:, r - 1 : r + 2, c - 1 : c + 2].mean(axis=(1, 2))
        assert peak_position(profile.astype(np.float64), dz) == pytest.approx(z, abs=0.05)


def _with_spots(sample: H.IndependentSample, spots: list[tuple[int, int, int]]) -> H.PlanesFn:
    """The sample's truth with a bright 3x3 spot added at each (truth plane, row, col)."""
    truth = H.truth_planes_fn(sample)

    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        out = truth(frame, dz_um).copy()
        for k, r, c in spots:
            for j in np.flatnonzero(np.isclose(np.asarray(dz_um), sample.dz_um[k])):
                out[j, r - 1 : r + 2, c - 1 : c + 2] += 50 * sample.noise_sigma
        return out

    return planes


def test_invented_spots_counts_what_the_truth_does_not_hold(beads):
    """The precision read-out (review 65): the truth invents nothing; spots added where no bead
    is are each counted; a stack with no objects shows no spot; the truth moved 3 µm deeper
    (every bead drawn at the wrong depth) invents most of what it shows."""
    truth = H.invented_spots(H.truth_planes_fn(beads), beads)
    assert truth.count > 0 and truth.invented_count == 0
    px = beads.pixel_size_um
    sites = []  # 12 added spots, each more than 3 µm from every bead
    for r in range(20, 110, 9):
        for c in range(20, 110, 9):
            gap = np.hypot(beads.objects.x_um - c * px, beads.objects.y_um - r * px).min()
            if gap > 3.0 and len(sites) < 12:
                sites.append((len(sites) * 3, r, c))
    assert len(sites) == 12
    added = H.invented_spots(_with_spots(beads, sites), beads)
    assert added.invented_count == 12 and truth.invented_value == 0.0
    assert 0 < added.invented_value < added.value.sum()
    assert added.count >= truth.count  # (an added spot may outshine a dim neighbour's peak)
    blank = H.invented_spots(H.background_planes_fn, beads)
    assert blank.count == 0
    plain = H.truth_planes_fn(beads)

    def deeper(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        return plain(frame, np.asarray(dz_um) - 3.0)

    moved = H.invented_spots(deeper, beads)
    assert moved.invented_count > moved.count / 2

    def twice(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:  # each bead 2 px to each side
        out = plain(frame, dz_um)
        return np.roll(out, -2, axis=2) + np.roll(out, 2, axis=2)

    doubled = H.invented_spots(twice, beads)  # review 83: both copies were held by the bead
    assert doubled.count > 1.5 * truth.count
    assert doubled.invented_count >= 0.8 * (doubled.count - truth.count)


def test_the_fidelity_report_tallies_invented_spots_per_frame(beads):
    """`engine.fidelity` counts every method's spots per frame (bead frames apart from frames
    with nuclei) and its report prints them; the truth's own stack invents none."""
    from engine import fidelity as F

    methods = [
        F.Method("truth", H.truth_planes_fn(beads), H.input_surface_fn),
        F.Method(
            "truth and 5 more",
            _with_spots(
                beads, [(20, 30, 30), (5, 60, 90), (30, 100, 40), (10, 45, 70), (38, 80, 20)]
            ),
            H.input_surface_fn,
        ),
    ]
    res = F._evaluate_set(methods, [beads])
    ok, more = res["truth"]["spots"]["beads"], res["truth and 5 more"]["spots"]["beads"]
    assert ok["frames"] == 1 and ok["invented_per_frame"] == 0 and ok["per_frame"] > 0
    assert ok["invented_light_share"] == 0 and 0 < more["invented_light_share"] < 1
    assert ok["truth_per_frame"] == ok["per_frame"] == more["truth_per_frame"]
    assert 1 <= more["invented_per_frame"] <= 5  # unless a site lies on a bead's own light
    text = "\n".join(F._spots_table(res))
    assert (
        "bead frames: spots / invented per frame (share; of the light)" in text
        and "| truth and 5 more |" in text
    )
