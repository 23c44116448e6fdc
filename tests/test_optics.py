"""The optics simulator: PSF against diffraction theory, image formation, camera, time series."""

from __future__ import annotations

import numpy as np
import pytest

from engine.optics import (
    CameraConfig,
    OpticsConfig,
    WormTimeSeries,
    default_z_um,
    make_psf,
    simulate_focal_stack,
)
from engine.optics._imaging import image_slices
from engine.optics._samples import Grid, ObjectTable, rasterize


def fwhm(profile: np.ndarray, step: float) -> float:
    """Full width at half maximum of a single-peaked 1-D profile (linear interpolation)."""
    p = profile / profile.max()
    i = int(np.argmax(p))
    left = i
    while p[left] > 0.5:
        left -= 1
    right = i
    while p[right] > 0.5:
        right += 1
    x_left = left + (0.5 - p[left]) / (p[left + 1] - p[left])
    x_right = right - 1 + (p[right - 1] - 0.5) / (p[right - 1] - p[right])
    return float((x_right - x_left) * step)


def axial_theory_um(optics: OpticsConfig) -> float:
    """Axial FWHM of a wide-field PSF: 0.88·λ / (n − sqrt(n² − NA²)), n = immersion index."""
    n = optics.immersion_index
    return 0.88 * optics.wavelength_um / (n - np.sqrt(n**2 - optics.na**2))


def test_psf_lateral_fwhm_at_focus_matches_diffraction_limit():
    optics = OpticsConfig(pixel_size_um=0.02)  # fine sampling to measure a 0.35 µm FWHM
    psf = make_psf(optics, np.array([0.0]), 101)[0]
    theory = 0.51 * optics.wavelength_um / optics.na
    assert psf.shape == (101, 101) and psf.dtype == np.float32
    assert np.unravel_index(np.argmax(psf), psf.shape) == (50, 50)
    assert fwhm(psf[50], 0.02) == pytest.approx(theory, rel=0.10)
    assert fwhm(psf[:, 50], 0.02) == pytest.approx(theory, rel=0.10)


@pytest.mark.parametrize("immersion_index", [1.0, 1.33])
def test_psf_axial_fwhm_matches_theory(immersion_index):
    # Check: FWHM of the on-axis intensity vs defocus, within 15 % of 0.88·λ/(n − sqrt(n² − NA²))
    # with n the immersion index: 1.35 µm for the 20x/0.75 air objective, 1.98 µm in water.
    optics = OpticsConfig(pixel_size_um=0.1, immersion_index=immersion_index)
    z = np.round(np.arange(-4.0, 4.0001, 0.05), 3)
    on_axis = make_psf(optics, z, 33)[:, 16, 16]
    assert z[int(np.argmax(on_axis))] == pytest.approx(0.0, abs=0.05)  # 0 = best focus
    assert fwhm(on_axis, 0.05) == pytest.approx(axial_theory_um(optics), rel=0.15)


def test_index_mismatch_makes_psf_asymmetric_about_focus():
    z = np.array([-2.0, 2.0])
    mismatched = make_psf(OpticsConfig(pixel_size_um=0.1), z, 65)
    matched = make_psf(OpticsConfig(pixel_size_um=0.1, immersion_index=1.33), z, 65)
    assert np.abs(matched[0] - matched[1]).sum() < 0.02  # symmetric when indices match
    assert np.abs(mismatched[0] - mismatched[1]).sum() > 0.2  # asymmetric with air / water


def test_depth_dependent_aberration_images_each_source_through_its_own_depth():
    """With the option, a point at depth z images exactly as without it at particle depth
    base + z (the direct per-slice sum agrees with the z-convolution path), so a point at
    z = 0 as without the option and one 6 µm out of focus differently."""
    base = OpticsConfig(particle_depth_um=10.0)
    deep = base.model_copy(update={"depth_dependent_aberration": True})
    assert deep.at_depth(-15.0).particle_depth_um == 0.0  # clipped at the coverslip
    assert deep.at_depth(6.0).particle_depth_um == 16.0 and base.at_depth(6.0) is base
    slices = np.arange(-8.0, 8.01, 0.5)
    focus = np.array([0.0, 1.5])

    def point_at(z: float) -> np.ndarray:
        density = np.zeros((slices.size, 160, 160), dtype=np.float32)
        density[int(np.argmin(np.abs(slices - z))), 80, 80] = 1000.0
        return density

    for z in (6.0, -6.0, 0.0):
        got = image_slices(point_at(z), slices, focus, deep)
        own = OpticsConfig(particle_depth_um=10.0 + z)
        want = image_slices(point_at(z), slices, focus, own)
        np.testing.assert_allclose(got, want, atol=1e-5 * float(want.max()))

    for z, changed in ((0.0, False), (6.0, True), (-6.0, True)):
        with_option = image_slices(point_at(z), slices, focus, deep)
        without = image_slices(point_at(z), slices, focus, base)
        change = float(np.abs(with_option - without).sum() / without.sum())
        assert (change > 0.05) == changed, (z, change)


def test_psf_planes_have_unit_energy_and_are_cached():
    optics = OpticsConfig()
    z = default_z_um()
    psf = make_psf(optics, z, 127)
    np.testing.assert_allclose(psf.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert make_psf(optics, z, 127) is psf  # cached: repeated calls are free
    assert not psf.flags.writeable
    # a defocused plane is spread out: its peak is far below the in-focus peak
    assert psf[0].max() < 0.05 * psf[20].max()


def test_image_formation_conserves_energy_per_plane():
    optics = OpticsConfig()
    grid = Grid(0.0, 0.0, (256, 256), optics.pixel_size_um, np.arange(-2.0, 2.01, 0.5))
    objects = ObjectTable(
        x_um=np.array([38.4, 20.0]),
        y_um=np.array([38.4, 50.0]),
        z_um=np.array([0.3, -1.0]),
        semi_axes_um=np.array([[1.2, 1.0, 1.1], [0.1, 0.1, 0.1]]),
        angle_rad=np.array([0.4, 0.0]),
        intensity=np.array([5e4, 2e3]),
        kind=np.array(["nucleus", "bead"]),
    )
    density = rasterize(objects, grid)
    assert density.sum() == pytest.approx(5.2e4, rel=1e-5)
    planes = image_slices(density, grid.z_um, default_z_um(), optics)
    assert planes.shape == (41, 256, 256)
    np.testing.assert_allclose(planes.sum(axis=(1, 2), dtype=np.float64), 5.2e4, rtol=1e-4)


def test_same_seed_same_stack_and_different_seed_differs():
    z = np.array([-2.0, 0.0, 2.0])
    a = simulate_focal_stack("mixed", shape=(64, 64), z_um=z, seed=3)
    b = simulate_focal_stack("mixed", shape=(64, 64), z_um=z, seed=3)
    c = simulate_focal_stack("mixed", shape=(64, 64), z_um=z, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.clean, b.clean)
    np.testing.assert_array_equal(a.objects.x_um, b.objects.x_um)
    assert not np.array_equal(a.images, c.images)


@pytest.fixture(scope="module")
def worm_stack():
    return simulate_focal_stack("worm", shape=(128, 256), seed=0)


def test_worm_stack_shapes_truth_and_camera_scale(worm_stack):
    s = worm_stack
    cam = CameraConfig()
    assert s.images.shape == s.clean.shape == (41, 128, 256)
    assert s.images.dtype == np.uint16 and s.clean.dtype == np.float32
    np.testing.assert_allclose(s.z_um, np.arange(-10, 10.01, 0.5))
    assert s.pixel_size_um == pytest.approx(0.3)
    nuclei = s.objects.kind == "nucleus"
    assert nuclei.all() and len(s.objects) > 100
    diameters = 2 * s.objects.semi_axes_um
    assert diameters.min() >= 1.8 and diameters.max() <= 3.0
    thickness = s.objects.z_um.max() - s.objects.z_um.min()
    assert 15.0 <= thickness <= 30.0
    assert s.clean.min() >= cam.offset_counts
    # a bright in-focus nucleus is near peak_photons (QE · gain · photons above offset)
    top = (s.clean.max() - cam.offset_counts) / (cam.quantum_efficiency * cam.gain_counts_per_e)
    assert 0.2 * cam.peak_photons < top < 3 * cam.peak_photons


def test_camera_noise_is_shot_plus_read_noise(worm_stack):
    s = worm_stack
    cam = CameraConfig()
    residual = s.images.astype(np.float64) - s.clean
    assert abs(residual.mean()) < 0.05 * residual.std()
    # variance in counts² = gain · (clean − offset) + (gain · read noise)²
    expected = (
        cam.gain_counts_per_e * (s.clean - cam.offset_counts)
        + (cam.gain_counts_per_e * cam.read_noise_e) ** 2
    )
    assert residual.var() == pytest.approx(expected.mean(), rel=0.05)


def test_bead_in_focus_is_sharper_than_5um_off():
    s = simulate_focal_stack("beads", shape=(128, 128), seed=1)
    o = s.objects
    px = s.pixel_size_um
    cols, rows = o.x_um / px, o.y_um / px
    inside = (cols > 20) & (cols < 108) & (rows > 20) & (rows < 108) & (np.abs(o.z_um) < 4.5)
    candidates = np.flatnonzero(inside)
    assert candidates.size > 0
    for i in candidates:
        others = np.hypot(cols - cols[i], rows - rows[i]) < 12
        if others.sum() == 1:  # isolated
            break
    else:
        pytest.fail("no isolated bead in the test stack")
    r, c = round(rows[i]), round(cols[i])
    focus = int(np.argmin(np.abs(s.z_um - o.z_um[i])))
    off = int(np.argmin(np.abs(s.z_um - (o.z_um[i] + 5.0))))
    offset = CameraConfig().offset_counts + 30 * 0.7 * 2  # offset + background
    peak_in = s.clean[focus, r - 2 : r + 3, c - 2 : c + 3].max() - offset
    peak_off = s.clean[off, r - 2 : r + 3, c - 2 : c + 3].max() - offset
    assert peak_in > 10 * peak_off > 0


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="sample must be"):
        simulate_focal_stack("cells", shape=(32, 32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z_um"):
        simulate_focal_stack(shape=(32, 32), z_um=np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="z_um"):
        make_psf(OpticsConfig(), np.array([np.inf]), 33)
    with pytest.raises(ValueError):
        OpticsConfig(na=2.0)


def test_worm_time_series_moves_fires_and_refocuses():
    ts = WormTimeSeries((128, 128), seed=2, rate_hz=100.0)
    f0 = ts.frame(0)
    assert f0.shape == (128, 128) and f0.dtype == np.uint16
    np.testing.assert_array_equal(f0, ts.frame(0))  # reproducible
    t0, t1 = ts.truth(0), ts.truth(1500)  # 15 s apart
    assert len(t0) == len(ts.objects) > 50
    assert not np.allclose(t0.x_um, t1.x_um)  # body motion
    assert not np.allclose(t0.intensity / t1.intensity, 1.0)  # activity changes
    act = np.stack([ts.activity(i) for i in range(0, 3000, 10)])
    assert act.min() >= 0.3 and act.max() > 0.8  # baseline plus calcium transients
    # a nucleus is brightest when the focus is on it
    px = ts.optics.pixel_size_um
    rows, cols = np.round(t0.y_um / px).astype(int), np.round(t0.x_um / px).astype(int)
    inside = (rows >= 3) & (rows < 125) & (cols >= 3) & (cols < 125)
    i = int(np.flatnonzero(inside)[np.argmax(t0.intensity[inside])])
    r, c = rows[i], cols[i]
    on = ts.expected_photons(0, focus_um=float(t0.z_um[i]))[r - 3 : r + 4, c - 3 : c + 4]
    away = ts.expected_photons(0, focus_um=float(t0.z_um[i]) + 6)[r - 3 : r + 4, c - 3 : c + 4]
    assert on.max() > 1.5 * away.max()


def test_the_vectorial_psf_model_is_unit_sum_and_not_the_scalar_one():
    z = np.array([-6.0, 0.0, 6.0])
    scalar = make_psf(OpticsConfig(), z, 63)
    vectorial = make_psf(OpticsConfig(psf_model="vectorial"), z, 63)
    np.testing.assert_allclose(vectorial.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert int(np.argmax(vectorial[:, 31, 31])) == 1
    # measured: 7 % lower in-focus peak (polarisation at high angles), a different ring
    assert vectorial[1, 31, 31] < 0.97 * scalar[1, 31, 31]
    assert np.linalg.norm(vectorial - scalar) > 0.03 * np.linalg.norm(scalar)


def test_a_measured_bank_images_as_its_planes_and_the_scalar_model_stands_in_beyond(tmp_path):
    """psf_model "measured" (issue 9, session 30: training through a lab's measured PSF): a
    bank holding the scalar model's own planes images exactly as the scalar model does, inside
    its range and beyond it (the fallback), cropped or padded to any side; a bank that is not
    the scalar one gives other frames; misuse gets one line."""
    from pydantic import ValidationError

    from engine.volume import psf_bank

    depth = np.arange(-4.0, 4.001, 0.5)  # 17 depths: a bank of 33 planes, ±8 µm
    bank = psf_bank(OpticsConfig(), depth, size_px=63)
    path = tmp_path / "bank.npy"
    np.save(path, bank)
    measured = OpticsConfig(psf_model="measured", psf_bank=str(path))
    z = np.arange(-12.0, 12.01, 0.5)  # beyond ±8 µm: the scalar model of the same optics
    for side in (31, 63):
        np.testing.assert_allclose(
            make_psf(measured, z, side), make_psf(OpticsConfig(), z, side), atol=2e-6
        )
    padded = make_psf(measured, np.array([0.0, 3.0]), 127)  # zeros around the bank's 63 px
    np.testing.assert_allclose(padded[:, 32:95, 32:95], bank[[16, 22]], atol=1e-7)
    np.testing.assert_allclose(padded.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # another PSF in the bank: astigmatism-like, wider along x at + defocus
    skewed = bank.copy()
    skewed[17:] = (skewed[17:] + np.roll(skewed[17:], 2, axis=2)) / 2
    np.save(tmp_path / "skewed.npy", skewed)
    other = OpticsConfig(psf_model="measured", psf_bank=str(tmp_path / "skewed.npy"))
    stack = simulate_focal_stack("beads", shape=(96, 96), z_um=np.array([0.0]), seed=1)
    other_stack = simulate_focal_stack(
        "beads", shape=(96, 96), z_um=np.array([0.0]), seed=1, optics=other
    )
    assert not np.allclose(stack.clean, other_stack.clean, rtol=1e-3)
    even = make_psf(measured, np.array([0.0]), 62)  # an even side: the centre pixel is 31
    np.testing.assert_allclose(
        even[0, 1:62, 1:62], bank[16, 1:62, 1:62] / bank[16, 1:62, 1:62].sum(), atol=1e-7
    )
    fine = OpticsConfig(psf_model="measured", psf_bank=str(path), psf_bank_step_um=0.25)
    np.testing.assert_allclose(make_psf(fine, np.array([1.0]), 63)[0], bank[20], atol=1e-7)
    with pytest.raises(ValueError, match="no excitation PSF"):
        psf_bank(measured, depth, size_px=63, modality="confocal")
    np.save(path, bank[::-1].copy())  # measured again to the same file: read again
    np.testing.assert_allclose(make_psf(measured, np.array([3.0]), 63)[0], bank[10], atol=1e-7)
    with pytest.raises(ValidationError, match="psf_bank is needed"):
        OpticsConfig(psf_model="measured")
    with pytest.raises(ValidationError, match="psf_bank is needed"):
        OpticsConfig(psf_bank=str(path))
    with pytest.raises(ValidationError, match="depth_dependent_aberration"):
        OpticsConfig(psf_model="measured", psf_bank=str(path), depth_dependent_aberration=True)
    with pytest.raises(ValueError, match=r"not on the measured bank's 0\.5 µm step"):
        make_psf(measured, np.array([0.25]))
    with pytest.raises(FileNotFoundError, match="PSF bank not found"):
        make_psf(OpticsConfig(psf_model="measured", psf_bank=str(tmp_path / "none.npy")), z)


def test_worm_config_widens_nucleus_sizes_and_moves_the_body_off_the_mid_plane():
    """`WormConfig` (issue 9: train on nuclei of 1-4 µm): its default is the original worm,
    sample for sample; with options the nuclei span the asked sizes, packed without overlap,
    and the body's axis (its nuclei and its autofluorescence) moves in depth."""
    from pydantic import ValidationError

    from engine.optics import WormConfig, simulate_volume_pair

    depth = np.arange(-10, 10.01, 0.5)

    def pair(worm: WormConfig | None, seed: int = 5):
        return simulate_volume_pair("worm", shape=(96, 96), depth_um=depth, seed=seed, worm=worm)

    original, default = pair(None), pair(WormConfig())
    np.testing.assert_array_equal(original.frames, default.frames)
    np.testing.assert_array_equal(original.objects_counts, default.objects_counts)

    wide = pair(WormConfig(nucleus_diameter_um=(1.5, 4.0)))
    o = wide.objects
    diameters = 2 * o.semi_axes_um.mean(axis=1)
    assert diameters.min() < 2.0 and diameters.max() > 3.0  # beyond the original 2-3 µm
    assert np.all((2 * o.semi_axes_um >= 1.5 * 0.9 - 1e-9) & (2 * o.semi_axes_um <= 4.0 * 1.1))
    xyz = np.column_stack([o.x_um, o.y_um, o.z_um])
    r = o.semi_axes_um.max(axis=1)
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    # packed: centres at least 0.3 µm further apart than their drawn radii (each semi-axis
    # within 10 % of its nucleus's drawn radius, so that radius >= the largest / 1.1)
    assert np.all(dist > (r[:, None] + r[None]) / 1.1 + 0.3 - 1e-9)

    # the body's axis off the mid-plane: nuclei and autofluorescence follow it
    shifted = [pair(WormConfig(axis_depth_um=6.0), seed) for seed in range(6)]
    mids = [float(np.mean(p.objects.z_um)) for p in shifted]
    assert max(np.abs(mids)) > 1.5  # the mid-planes of six draws within ±6 µm
    p = shifted[int(np.argmax(np.abs(mids)))]
    column = p.objects_counts[0].sum(axis=(1, 2))  # the truth's mass per depth
    centre = float(np.sum(column * depth) / column.sum())
    assert np.sign(centre) == np.sign(mids[int(np.argmax(np.abs(mids)))])

    with pytest.raises(ValidationError, match="nucleus_diameter_um"):
        WormConfig(nucleus_diameter_um=(4.0, 1.5))


def test_isolated_nuclei_are_1_to_4_um_spread_over_the_range_apart_and_bodiless():
    """The "nuclei" sample (issue 9: nuclei of 1-4 µm; sparse as well as packed): ellipsoids
    within ±10 % of diameters drawn in 1-4 µm, centres anywhere in ±10 µm, 10-40 in the
    frame, never overlapping, no worm body; the frame holds their blur and nothing else."""
    from engine.optics import simulate_volume_pair

    depth = np.arange(-10, 10.01, 0.5)
    pairs = [
        simulate_volume_pair("nuclei", shape=(128, 128), depth_um=depth, seed=s, body_glow=True)
        for s in range(3)
    ]
    o = pairs[0].objects
    assert set(o.kind) == {"nucleus"}
    assert np.all((2 * o.semi_axes_um >= 1.0 * 0.9 - 1e-9) & (2 * o.semi_axes_um <= 4.0 * 1.1))
    assert np.all(np.abs(o.z_um) <= 10.0)
    r = o.semi_axes_um.max(axis=1)
    xyz = np.column_stack([o.x_um, o.y_um, o.z_um])
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    assert np.all(dist > (r[:, None] + r[None]) / 1.1 + 0.3 - 1e-9)
    every = np.concatenate([p.objects.z_um for p in pairs])
    assert every.min() < -5 and every.max() > 5  # spread in depth, not in one body
    for p in pairs:
        assert p.body_counts is not None and not p.body_counts.any()
        # 10-40 a frame, whatever its size (as beads and worm nuclei); fewer where packing fails
        side_um = 127 * 0.3
        inside = (p.objects.x_um >= 0) & (p.objects.x_um <= side_um)
        inside &= (p.objects.y_um >= 0) & (p.objects.y_um <= side_um)
        assert 5 <= inside.sum() <= 40
        assert p.objects_counts.sum() > 0


def test_surface_beads_lie_on_one_tilted_curved_layer_within_the_range():
    """The "surface" sample (the tilted and curved DPMs' case: a layer the stage holds tilted,
    a field curved by the optics): every bead on one paraboloid, z = a + b·x + c·y + d·r²,
    clipped to ±10 µm, its tilt spanning 2-16 µm over the frame, its sag within ±3 µm at the
    corners, its centre within ±4 µm; 40-120 beads in the frame; each seed its own surface."""
    from engine.optics import simulate_volume_pair

    depth = np.arange(-10, 10.01, 0.5)
    pairs = [
        simulate_volume_pair("surface", shape=(128, 128), depth_um=depth, seed=s) for s in range(4)
    ]
    tilts = []
    for p in pairs:
        o = p.objects
        assert set(o.kind) == {"bead"}
        assert np.all(np.abs(o.z_um) <= 10.0)
        free = np.abs(o.z_um) < 10.0  # the clipped ones sit at ±10 µm, off the paraboloid
        xc = yc = 127 * 0.3 / 2
        x, y = o.x_um[free] - xc, o.y_um[free] - yc
        design = np.column_stack([np.ones_like(x), x, y, x**2 + y**2])
        coef, *_ = np.linalg.lstsq(design, o.z_um[free], rcond=None)
        assert np.abs(design @ coef - o.z_um[free]).max() < 1e-6
        a, b, c, d = coef
        assert -4.0 <= a <= 4.0
        assert 2.0 - 1e-6 <= (abs(b) + abs(c)) * 127 * 0.3 <= 16.0 + 1e-6
        assert abs(d) * 2 * (127 * 0.3 / 2) ** 2 <= 3.0 + 1e-6
        tilts.append(coef[1:3])
        side_um = 127 * 0.3
        inside = (o.x_um >= 0) & (o.x_um <= side_um) & (o.y_um >= 0) & (o.y_um <= side_um)
        assert 20 <= inside.sum() <= 150  # 40-120 expected, drawn uniformly over the extent
        assert p.objects_counts.sum() > 0
    assert len({tuple(np.round(t, 6)) for t in tilts}) == len(tilts)


def test_the_body_glow_is_imaged_apart_and_leaves_the_pair_unchanged():
    """`simulate_volume_pair(body_glow=True)` (session 28: what a model must tell from the
    nuclei's light): the worm body's diffuse glow alone in each frame, a part of the frame's
    signal, with the frames and truth exactly as without it; a bead sample has none."""
    from engine.optics import simulate_volume_pair

    focus, depth = np.array([0.0, 1.5]), np.zeros(1)
    plain = simulate_volume_pair("worm", shape=(96, 96), focus_um=focus, depth_um=depth, seed=2)
    pair = simulate_volume_pair(
        "worm", shape=(96, 96), focus_um=focus, depth_um=depth, seed=2, body_glow=True
    )
    assert plain.body_counts is None and pair.body_counts is not None
    np.testing.assert_array_equal(plain.frames, pair.frames)
    np.testing.assert_array_equal(plain.objects_counts, pair.objects_counts)
    glow = pair.body_counts
    assert glow.shape == (2, 96, 96) and glow.min() >= 0.0
    signal = pair.frames.astype(np.float64).mean(axis=(1, 2)) - pair.background_counts
    share = glow.mean(axis=(1, 2)) / signal
    assert np.all((share > 0.05) & (share < 0.5))  # the body is there, the nuclei dominate
    beads = simulate_volume_pair("beads", shape=(96, 96), depth_um=depth, seed=1, body_glow=True)
    assert beads.body_counts is not None and not beads.body_counts.any()


def test_a_textured_body_is_patchy_with_the_same_mean_and_the_default_draws_nothing():
    """`WormConfig.body_texture_sd` (session 28): the body's glow is modulated by a smooth
    log-normal field, patchier inside the body but about as bright on average, never
    negative; the nuclei are drawn as without it; 0 keeps the uniform tube; a reversed patch
    range is refused. `body_brightness` scales the same body by a factor within its range."""
    from pydantic import ValidationError

    from engine.optics import WormConfig, simulate_volume_pair

    def glow(worm: WormConfig | None, seed: int):
        return simulate_volume_pair(
            "worm", shape=(128, 128), depth_um=np.zeros(1), seed=seed, worm=worm, body_glow=True
        )

    for seed in (3, 4, 5):
        plain, textured = glow(None, seed), glow(WormConfig(body_texture_sd=1.0), seed)
        np.testing.assert_array_equal(plain.objects.z_um, textured.objects.z_um)
        a, b = plain.body_counts[0], textured.body_counts[0]
        inside = a > 0.5 * a.max()
        assert b.min() >= 0.0 and 0.5 < b[inside].mean() / a[inside].mean() < 2.0
        # patchy: the body's own contrast rises (the plain tube's is its curved profile only)
        assert b[inside].std() / b[inside].mean() > 1.3 * a[inside].std() / a[inside].mean()
    none = glow(WormConfig(body_texture_sd=0.0, body_brightness=(1.0, 1.0)), 3)
    np.testing.assert_array_equal(none.frames, glow(None, 3).frames)
    with pytest.raises(ValidationError, match="body_texture_um"):
        WormConfig(body_texture_sd=0.5, body_texture_um=(6.0, 2.0))
    # `body_brightness`: the same body, brighter or dimmer by a factor within the range
    for seed in (3, 4):
        ratio = glow(WormConfig(body_brightness=(0.5, 2.5)), seed).body_counts.sum() / (
            glow(None, seed).body_counts.sum()
        )
        assert 0.5 - 1e-4 <= ratio <= 2.5 + 1e-4 and abs(ratio - 1.0) > 1e-3
    with pytest.raises(ValidationError, match="body_brightness"):
        WormConfig(body_brightness=(2.0, 1.0))


def test_a_spline_held_point_is_the_crop_of_one_on_a_larger_grid_near_and_past_the_edges():
    """`deposit_point(..., lateral="spline")` keeps the kernel's part on the grid, wherever the
    point is: inside, at an edge, or far enough off it to leave nothing (a negative slice stop
    once counted from the far edge and put light on the other side)."""
    from engine.optics import deposit_point, spline_taps

    np.testing.assert_allclose(spline_taps(0.37).sum(), 1.0)
    for row, col in [
        (-13.0, 5.0),
        (5.0, -13.0),
        (30.0, 5.0),
        (5.0, 24.5),
        (-3.2, -2.7),
        (9.6, 9.4),
    ]:
        grid = np.zeros((2, 20, 20))
        larger = np.zeros((2, 60, 60))
        deposit_point(grid, 1.0, 0.5, row, col, lateral="spline")
        deposit_point(larger, 1.0, 0.5, row + 20, col + 20, lateral="spline")
        np.testing.assert_allclose(grid, larger[:, 20:40, 20:40], atol=1e-12)
    assert larger.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="lateral"):
        deposit_point(grid, 1.0, 0.5, 3.0, 3.0, lateral="cubic")  # type: ignore[arg-type]


def test_frames_imaged_as_a_camera_images_beads_are_sharper_at_pixel_corners_truth_unchanged():
    """``frame_points="spline"`` images each bead as the pixel PSF moved to it; the split
    (the truth's convention, and the default frames') leaves a bead at a pixel corner dim in
    focus. The truth, the objects and the light stay the same."""
    from engine.optics import CameraConfig, simulate_volume_pair

    camera = CameraConfig(peak_photons=3000.0, background_photons=10.0)
    for seed in (7, 8):  # each holds one bead within 0.75 µm of focus near a pixel corner
        split, spline = (
            simulate_volume_pair(
                "beads",
                shape=(128, 128),
                focus_um=np.zeros(1),
                camera=camera,
                seed=seed,
                frame_points=points,
            )
            for points in ("linear", "spline")
        )
        np.testing.assert_array_equal(split.objects_counts, spline.objects_counts)
        np.testing.assert_array_equal(split.objects.x_um, spline.objects.x_um)
        signal = [f.frames[0].astype(np.float64) - f.background_counts for f in (split, spline)]
        assert signal[1].sum() == pytest.approx(signal[0].sum(), rel=0.01)
        objects, px = split.objects, 0.3
        col, row = objects.x_um / px, objects.y_um / px
        corner = (
            (np.abs(objects.z_um) < 0.75)
            & (np.abs(col % 1 - 0.5) < 0.25)
            & (np.abs(row % 1 - 0.5) < 0.25)
            & (np.minimum(col, row) > 3)
            & (np.maximum(col, row) < 124)
        )
        assert corner.sum() >= 1
        for r, c in zip(row[corner].astype(int), col[corner].astype(int), strict=True):
            peaks = [s[r : r + 2, c : c + 2].max() for s in signal]
            assert peaks[1] > 1.15 * peaks[0]  # measured 1.24 and 1.40
    with pytest.raises(ValueError, match="frame_points"):
        simulate_volume_pair("beads", shape=(32, 32), frame_points="cubic")  # type: ignore[arg-type]
