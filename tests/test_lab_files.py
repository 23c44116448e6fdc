"""`engine.lab_files`: one reader for a lab's stack files, and where a camera clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.lab_files import FULL_SCALE_EVIDENCE_PX, LabFileError, full_scale, read_stack
from engine.train import LabStackConfig, read_lab_stack


def test_read_stack_takes_npy_tiff_and_zarr_and_refuses_the_rest(tmp_path: Path) -> None:
    import tifffile
    import zarr

    stack = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    np.save(tmp_path / "s.npy", stack[None, None])  # (t, c, z, y, x) with t = c = 1
    tifffile.imwrite(tmp_path / "s.TIF", stack, photometric="minisblack")  # suffix any case
    tifffile.imwrite(tmp_path / "zc.tif", stack[:, None], photometric="minisblack")  # Z, C, Y, X
    tifffile.imwrite(tmp_path / "zyxs.tif", stack[..., None], photometric="minisblack")
    zarr.create_array(str(tmp_path / "s.zarr"), data=stack)
    for name in ("s.npy", "s.TIF", "zc.tif", "zyxs.tif", "s.zarr"):
        got = read_stack(tmp_path / name)
        np.testing.assert_array_equal(got, stack)
        assert got.dtype == np.uint16  # the camera's counts as written, for full_scale
    np.save(tmp_path / "flat.npy", stack[0])
    np.save(tmp_path / "one.npy", stack[:1])  # one plane is no focus scan
    np.save(tmp_path / "empty.npy", stack[:, :0])
    np.save(tmp_path / "text.npy", np.array([["a"] * 5] * 4 * 3).reshape(3, 4, 5))
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    (tmp_path / "scan.nd2").write_bytes(b"a format this does not read")
    (tmp_path / "empty.zarr").mkdir()
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w").attrs["note"] = "no image here"
    for name, message in (
        ("flat.npy", r"must be \(focus, height, width\) numbers, got 4x5 uint16"),
        ("one.npy", r"at least 2 planes of at least 1 pixel, got 1x4x5"),
        ("empty.npy", r"at least 2 planes of at least 1 pixel, got 3x0x5"),
        ("text.npy", r"got 3x4x5 <U1"),
        ("junk.tif", "cannot read a stack"),
        ("scan.nd2", r"not a stack file this reads \(expected .npy"),
        ("empty.zarr", "cannot read a stack"),
        ("group.zarr", "a Zarr group holding no OME-Zarr image"),
        ("missing.npy", "no such stack file"),
    ):
        with pytest.raises(LabFileError, match=message) as caught:
            read_stack(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_the_trainers_reader_refuses_an_unreadable_file_as_the_calibration_does(
    tmp_path: Path,
) -> None:
    """One reader for both: a corrupt TIFF is the same one-line `LabFileError` through
    `read_lab_stack` (a ValueError, which both trainers turn into a config error)."""
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(LabFileError, match=r"junk.tif: cannot read a stack"):
        read_lab_stack(LabStackConfig(path=tmp_path / "junk.tif", z_step_um=1.0))


def test_full_scale_finds_a_camera_stored_in_the_low_or_the_top_bits() -> None:
    """A 12-bit camera in a uint16 stack clips at 4095, or at 65520 when its counts are
    shifted into the top bits (every value a multiple of 16); review 86 left the latter."""
    rng = np.random.default_rng(0)
    twelve = rng.integers(100, 3000, size=(3, 32, 32)).astype(np.uint16)
    twelve[1, 5:7, 5:7] = 4095
    assert full_scale(twelve) == 4095
    shifted = twelve << 4
    assert full_scale(shifted) == 65520
    unshifted_top = shifted.copy()
    unshifted_top[0, 0, 0] += 1  # one odd value: not a shifted camera, so the dtype's maximum
    assert full_scale(unshifted_top) == 65535
    lone = shifted.copy()
    lone[1, 5:7, 5:7] = 0
    lone[1, 5, 5] = 65520  # fewer than FULL_SCALE_EVIDENCE_PX pixels at it: a bright pixel
    assert FULL_SCALE_EVIDENCE_PX > 1 and full_scale(lone) == 65535
    assert full_scale(twelve.astype(np.float32)) == np.inf
