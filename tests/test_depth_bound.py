"""The information bound on depth from one frame (`engine.depth_bound`), simulator optics."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("psfmodels", reason="the PSF needs the sim extra (psfmodels)")

from engine.depth_bound import confused_share, depth_bound
from engine.optics import CameraConfig, OpticsConfig


@pytest.fixture(scope="module")
def rows() -> list[dict[str, float]]:
    return depth_bound(
        OpticsConfig(), CameraConfig(), photons=(1000.0, 4000.0), defocus_um=(-8.0, -2.0, 2.0, 8.0)
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
