"""The information bound on depth from one frame (`engine.depth_bound`): simulator and hold-out."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("psfmodels", reason="the PSF needs the sim extra (psfmodels)")

from engine.depth_bound import confused_share, depth_bound, independent_case, simulator_case
from engine.optics import CameraConfig, OpticsConfig


@pytest.fixture(scope="module")
def rows() -> list[dict[str, float]]:
    return depth_bound(
        simulator_case(OpticsConfig(), CameraConfig()),
        photons=(1000.0, 4000.0),
        defocus_um=(-8.0, -2.0, 2.0, 8.0),
    )


def _row(rows: list[dict[str, float]], photons: float, z: float) -> dict[str, float]:
    (row,) = [r for r in rows if r["photons"] == photons and r["defocus_um"] == z]
    return row


def test_precision_follows_photons_and_defocus(rows):
    """Four times the photons divides the Cramér–Rao SD by 2 where the bead's own shot noise
    dominates and by 4 where the background's does: nearer 4 for a ring 8 µm out of focus,
    spread over hundreds of pixels, than at 2 µm. That ring is located several times less
    precisely."""
    ratios = {
        z: _row(rows, 1000.0, z)["crlb_um"] / _row(rows, 4000.0, z)["crlb_um"]
        for z in (-8.0, 2.0, 8.0)
    }
    assert all(1.9 < r < 4.1 for r in ratios.values())
    assert ratios[2.0] < min(ratios[-8.0], ratios[8.0])
    for n in (1000.0, 4000.0):
        assert _row(rows, n, 8.0)["crlb_um"] > 3 * _row(rows, n, 2.0)["crlb_um"]


def test_a_far_bead_is_mistaken_for_its_mirror(rows):
    """Far from focus the depth that best mimics a bead is on the other side of focus, and even
    the ideal observer confuses the two often; 2 µm from focus it hardly ever does."""
    for z in (-8.0, 8.0):
        far = _row(rows, 1000.0, z)
        assert np.sign(far["alternative_um"]) == -np.sign(z)
        assert abs(abs(far["alternative_um"]) - 8.0) <= 0.5
        assert far["ideal_error_rate"] > 0.2
    assert _row(rows, 4000.0, 2.0)["ideal_error_rate"] < 0.01
    assert _row(rows, 4000.0, 8.0)["ideal_error_rate"] < _row(rows, 1000.0, 8.0)["ideal_error_rate"]
    assert confused_share(rows, 2.0) < confused_share(rows, 8.0)
    with pytest.raises(ValueError, match="no rows"):
        confused_share(rows, 1.0)


def test_deeper_aberration_tells_a_far_bead_from_its_mirror():
    """The index-mismatch aberration is what breaks the symmetry about focus, so on average
    over both sides and the simulator's brightness a far bead is confused with its mirror
    less often the deeper the sample lies; with each bead aberrated at its own depth, a bead
    in the focal plane images as without it and a far one differently."""

    def rows_at(depth: float) -> list[dict[str, float]]:
        optics = OpticsConfig(particle_depth_um=depth)
        return depth_bound(
            simulator_case(optics, CameraConfig()), defocus_um=(-8.0, -4.0, 0.0, 4.0, 8.0)
        )

    shallow, deep = rows_at(5.0), rows_at(15.0)
    assert confused_share(deep, 8.0) < 0.6 * confused_share(shallow, 8.0)
    optics = OpticsConfig(particle_depth_um=15.0)
    own_case = simulator_case(
        optics.model_copy(update={"depth_dependent_aberration": True}), CameraConfig()
    )
    same_case = simulator_case(optics, CameraConfig())
    at = np.array([0.0, 8.0])
    own, same = own_case.images(at), same_case.images(at)
    np.testing.assert_array_equal(own[0], same[0])
    assert np.abs(own[1] - same[1]).sum() > 0.05


def test_the_hold_out_is_bounded_with_its_own_optics_and_camera():
    """The independent set's case: its vectorial PSF, its read noise with the unknown offset
    pattern added in quadrature, its beads' brightness; a far bead's depth is bounded
    more loosely than a near one's."""
    case = independent_case()
    assert case.detection.quantum_efficiency == 1.0
    assert case.detection.read_noise_e == pytest.approx(np.hypot(2.0, 1.0 / 0.8))
    assert case.photons[0] == 700.0 and case.photons[-1] == 3500.0
    rows = depth_bound(case, photons=(1565.0,), defocus_um=(-2.0, -8.0))
    near, far = rows
    assert 0 < near["crlb_um"] < far["crlb_um"] < 1.0
    assert near["ideal_error_rate"] < 0.01 <= far["ideal_error_rate"] < 0.5


def test_the_hold_out_is_bounded_through_its_pupil_psf_too():
    """`--optics pupil`: the same beads and camera through the third PSF model, whose
    astigmatism stretches a bead along one diagonal before focus and the other after."""
    from engine.heldout import IndependentOptics

    pupil = independent_case(IndependentOptics(psf_model="pupil"))
    assert pupil.name == "independent, pupil PSF" and independent_case().name == "independent"
    d = np.array([-2.0, 2.0])
    images = pupil.images(d)
    np.testing.assert_allclose(images.sum(axis=(1, 2)), 1.0, atol=0.02)  # a crop of unit sum
    assert not np.allclose(images, independent_case().images(d), atol=1e-3)
    c = images.shape[-1] // 2
    y, x = np.mgrid[-c : c + 1, -c : c + 1]
    skew = (images * x * y).sum(axis=(1, 2)) / images.sum(axis=(1, 2))
    assert skew[0] * skew[1] < 0


def test_a_nucleus_is_bounded_with_the_hold_outs_own_sphere_images():
    """`nucleus_case`: the hold-out's nuclei (filled spheres, brightness by their centre
    column, in the body's glow). A 1 µm nucleus 8 µm out is located less precisely than one
    2 µm out; a brighter one is confused with another depth less often, and a bigger one of
    the same column brightness (more light) less often than a small one."""
    from engine.depth_bound import BODY_E, NUCLEUS_COLUMN_E, nucleus_case

    case = nucleus_case(1.0)
    assert case.detection.background_photons == pytest.approx(12.0 + BODY_E)
    # total signal of a filled sphere from its centre column: column · (2/3)·π·r² / px²
    assert case.photons[0] == pytest.approx(NUCLEUS_COLUMN_E[0] * (2 / 3) * np.pi / 0.09)
    images = case.images(np.array([-2.0, 8.0]))
    np.testing.assert_allclose(images.sum(axis=(1, 2)), 1.0, atol=0.02)
    rows = depth_bound(case, photons=case.photons[:2], defocus_um=(2.0, 8.0))
    dim_near, dim_far, _, bright_far = rows
    assert dim_near["crlb_um"] < dim_far["crlb_um"]
    assert bright_far["ideal_error_rate"] < dim_far["ideal_error_rate"]
    small = nucleus_case(0.75)
    (small_far,) = depth_bound(small, photons=small.photons[:1], defocus_um=(8.0,))
    assert dim_far["ideal_error_rate"] < small_far["ideal_error_rate"]
