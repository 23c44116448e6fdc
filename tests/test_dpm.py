"""DPM builders, validation and volume plans."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from engine import dpm
from engine.metadata import ModelMetadata


def test_uniform_values_and_dtype():
    d = dpm.uniform((4, 6), 2.5)
    assert d.shape == (4, 6) and d.dtype == np.float32
    assert np.all(d == np.float32(2.5))


def test_tilted_values_at_known_pixels():
    # 5 x 7 frame, centre pixel (2, 3); 0.5 µm pixels
    d = dpm.tilted((5, 7), 1.0, 0.2, -0.1, pixel_size_um=0.5)
    assert d.dtype == np.float32
    assert d[2, 3] == pytest.approx(1.0)
    assert d[2, 6] == pytest.approx(1.0 + 0.2 * 3 * 0.5)  # 3 px right of centre
    assert d[0, 3] == pytest.approx(1.0 + 0.1 * 2 * 0.5)  # 2 px up: y = -1 µm
    assert d[4, 0] == pytest.approx(1.0 + 0.2 * (-1.5) - 0.1 * 1.0)
    corner = dpm.tilted((5, 7), 0.0, 1.0, 0.0, pixel_size_um=1.0, center=(0, 0))
    assert corner[0, 0] == 0.0 and corner[3, 4] == pytest.approx(4.0)


def test_polynomial_field_curvature_values():
    d = dpm.polynomial((9, 9), [2.0, 0.1], pixel_size_um=1.0)
    assert d[4, 4] == pytest.approx(2.0)
    assert d[4, 8] == pytest.approx(2.0 + 0.1 * 16)  # r = 4 µm
    assert d[0, 0] == pytest.approx(2.0 + 0.1 * 32)  # r² = 16 + 16
    quartic = dpm.polynomial((9, 9), [0.0, 0.0, 0.01], pixel_size_um=0.5)
    assert quartic[4, 8] == pytest.approx(0.01 * 2.0**4)  # r = 2 µm
    np.testing.assert_allclose(d, d[::-1, ::-1])  # rotationally symmetric


def test_with_drift_and_from_image(tmp_path):
    base = dpm.tilted((8, 8), 0.0, 0.1, 0.0, pixel_size_um=1.0)
    shifted = dpm.with_drift(base, -0.75)
    np.testing.assert_allclose(shifted - base, -0.75, atol=1e-6)
    assert shifted.dtype == np.float32
    assert base[0, 0] == pytest.approx(-0.35)  # the input is not modified
    path = tmp_path / "surface.tif"
    tifffile.imwrite(path, base.astype(np.float64))
    loaded = dpm.from_image(path)
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, base)
    with pytest.raises(dpm.DPMError, match="not found"):
        dpm.from_image(tmp_path / "missing.tif")
    tifffile.imwrite(
        tmp_path / "stack.tif", np.zeros((3, 8, 8), np.float32), photometric="minisblack"
    )
    with pytest.raises(dpm.DPMError, match="2-D"):
        dpm.from_image(tmp_path / "stack.tif")


def test_validate_dpm_checks_shape_finiteness_and_range():
    good = dpm.uniform((16, 16), 3.0)
    out = dpm.validate_dpm(good, (16, 16), (-10.0, 10.0))
    assert out.dtype == np.float32
    with pytest.raises(dpm.DPMError, match=r"shape \(16, 16\) does not match the frame shape"):
        dpm.validate_dpm(good, (16, 32), (-10.0, 10.0))
    bad = good.copy()
    bad[3, 3] = np.nan
    with pytest.raises(dpm.DPMError, match="non-finite"):
        dpm.validate_dpm(bad, (16, 16), (-10.0, 10.0))
    far = dpm.uniform((16, 16), 12.0)
    with pytest.raises(dpm.DPMError, match=r"\[-10, 10\] µm"):
        dpm.validate_dpm(far, (16, 16), (-10.0, 10.0))
    kept = dpm.validate_dpm(far, (16, 16), (-10.0, 10.0), allow_extrapolation=True)
    assert kept.dtype == np.float32 and (kept == 12.0).all()  # allowed: taken as it is


def test_volume_plan_from_z_and_validation():
    plan = dpm.VolumePlan.from_z([-4.0, 0.0, 4.0], (8, 10))
    assert len(plan) == 3 and plan.frame_shape == (8, 10)
    assert plan.dpms_um.shape == (3, 8, 10) and plan.dpms_um.dtype == np.float32
    assert plan.z_um == (-4.0, 0.0, 4.0)
    assert plan.labels == ("z=-4um", "z=+0um", "z=+4um")
    np.testing.assert_array_equal(plan.dpms_um[2], 4.0)
    plan.validate((8, 10), (-5.0, 5.0))
    with pytest.raises(dpm.DPMError, match="z=-4um"):
        plan.validate((8, 10), (-2.0, 2.0))
    plan.validate((8, 10), (-2.0, 2.0), allow_extrapolation=True)


def test_volume_plan_labels_tell_every_config_plane_apart():
    # the config rounds planes to 1e-6 µm; 6 significant digits merged 12.345671 and 12.34567
    plan = dpm.VolumePlan.from_z([12.34567, 12.345671, -0.0, 100000.0], (2, 2))
    assert plan.labels == ("z=+12.34567um", "z=+12.345671um", "z=+0um", "z=+100000um")
    with pytest.raises(dpm.DPMError, match=r"z = 2 µm is asked twice"):
        dpm.VolumePlan.from_z([2.0, 2.0], (2, 2))
    with pytest.raises(dpm.DPMError, match=r"1.0000001 and 1.0000002 µm are one plane at 1e-6"):
        dpm.VolumePlan.from_z([1.0000001, 1.0000002], (2, 2))
    with pytest.raises(dpm.DPMError, match=r"-4e-07 and 4e-07 µm are one plane"):
        dpm.VolumePlan.from_z([-4e-7, 4e-7], (2, 2))
    with pytest.raises(dpm.DPMError, match=r"z = nan µm is not a depth"):
        dpm.VolumePlan.from_z([float("nan")], (2, 2))


def test_volume_plan_from_surfaces_and_bad_plans():
    tilt = dpm.tilted((8, 8), 0.0, 0.05, 0.0, pixel_size_um=0.3)
    plan = dpm.VolumePlan.from_dpms([tilt, dpm.uniform((8, 8), 1.0)], ["tilt", "flat"])
    assert plan.labels == ("tilt", "flat") and plan.z_um is None
    with pytest.raises(dpm.DPMError, match="same shape"):
        dpm.VolumePlan.from_dpms([tilt, dpm.uniform((4, 4), 0.0)], ["a", "b"])
    with pytest.raises(dpm.DPMError, match="unique"):
        dpm.VolumePlan.from_dpms([tilt, tilt], ["a", "a"])
    with pytest.raises(dpm.DPMError, match="labels"):
        dpm.VolumePlan(np.zeros((2, 4, 4), np.float32), ("a",))
    with pytest.raises(dpm.DPMError, match="float32"):
        dpm.VolumePlan(np.zeros((1, 4, 4)), ("a",))


def test_normalize_dpms_is_the_metadata_one():
    from engine import metadata

    assert dpm.normalize_dpms is metadata.normalize_dpms
    meta = ModelMetadata(
        name="t",
        architecture={},
        size_multiple=4,
        dz_range_um=(-10.0, 10.0),
        dpm_scale_um=10.0,
        pixel_size_um=0.3,
        na=0.75,
        wavelength_um=0.52,
    )
    np.testing.assert_allclose(dpm.normalize_dpms(dpm.uniform((2, 2), 5.0), meta), 0.5)


def test_focus_lock_follows_the_stage_and_clamps_to_the_trained_range() -> None:
    from engine.dpm import FocusLock, VolumePlan

    plan = VolumePlan.from_z([-4.0, 0.0, 6.0], (8, 8))
    lock = FocusLock.for_plan(plan, reference_um=50.0, sign=1.0, dz_range_um=(-10.0, 10.0))
    assert lock.offset_um(50.0) == (0.0, 0.0)
    assert lock.offset_um(52.0) == (-2.0, 0.0)  # focus 2 um deeper: planes 2 um shallower
    assert lock.offset_um(45.0) == (4.0, 1.0)  # +5 wanted, the +6 um plane allows +4
    flipped = FocusLock.for_plan(plan, reference_um=50.0, sign=-1.0)
    assert flipped.offset_um(52.0) == (2.0, 0.0)
    with pytest.raises(dpm.DPMError, match="sign"):
        FocusLock.for_plan(plan, reference_um=0.0, sign=2.0)
    # planes wider than the range leave the lock no room: refused, not a lower bound above
    # the upper one (which shifted the planes even at the reference focus)
    wide = VolumePlan.from_z([-8.0, 8.0], (8, 8))
    with pytest.raises(dpm.DPMError, match=r"span -8 … 8 µm, wider than .* \(-5 … 5 µm\)"):
        FocusLock.for_plan(wide, reference_um=50.0, dz_range_um=(-5.0, 5.0))


@pytest.mark.parametrize(
    ("kind", "args"),
    [
        ("tilted", (float("nan"), 0.0, 0.0)),
        ("tilted", (0.0, float("inf"), 0.0)),
        ("tilted", (0.0, 1e39, 0.0)),  # finite as float64, infinite as float32
        ("polynomial", ([0.0, 1e39],)),
    ],
)
def test_surfaces_that_are_not_finite_are_refused_where_they_are_built(
    kind: str, args: tuple[object, ...]
) -> None:
    """A NaN or overflowing tilt or polynomial was refused only later, by the backend, not
    naming the surface (review 75); uniform and image DPMs were checked already."""
    with pytest.raises(dpm.DPMError, match="not finite"):
        getattr(dpm, kind)((8, 8), *args, pixel_size_um=0.3)
