"""live.store's dtype and shard arithmetic: stacks cast to float16 without infinities, and
shards sized by time, memory and chunk, on plain numpy arrays (no store needed)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from live.store import FLOAT16_MAX, WindowSampler, as_stack_dtype, shard_frames, write_atomic


def test_float16_saturates_at_65504_counts_and_counts_every_saturated_value() -> None:
    values = np.array(
        [1.0, 100.3, 65504.0, 65519.0, 65520.0, 122_422.7, -70_000.0, np.inf, -np.inf, np.nan],
        np.float32,
    )
    out, clipped = as_stack_dtype(values.reshape(2, 5), "float16")
    assert out.dtype == np.float16 and out.shape == (2, 5) and out.flags.c_contiguous
    flat = out.ravel().astype(np.float32)
    # 65519 rounds down to the top finite value; 65520 and beyond would be inf: saturated.
    np.testing.assert_array_equal(
        flat[:9], [1.0, 100.3125, FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX, FLOAT16_MAX,
                   -FLOAT16_MAX, FLOAT16_MAX, -FLOAT16_MAX]
    )  # fmt: skip
    assert np.isnan(flat[9]) and clipped == 5
    assert FLOAT16_MAX == 65504.0


def test_in_range_stacks_round_to_nearest_within_2_to_the_minus_11() -> None:
    rng = np.random.default_rng(0)
    stack = (rng.random((5, 32, 32)) * 65000 + 1).astype(np.float32)
    stack[0, 0, :3] = [-3.7, 0.0, 6.1e-5]  # negative ringing, zero, the smallest normal
    out, clipped = as_stack_dtype(stack, np.dtype("float16"))
    assert clipped == 0
    error = np.abs(out.astype(np.float32) - stack)
    assert np.all(error <= np.abs(stack) * 2.0**-11)
    np.testing.assert_array_equal(out, stack.astype(np.float16))  # numpy's own rounding


def test_the_same_dtype_is_passed_through_and_other_inputs_are_cast() -> None:
    stack = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    same, clipped = as_stack_dtype(stack, "float32")
    assert same is stack and clipped == 0
    strided = stack[:, :, ::2]
    assert as_stack_dtype(strided, "float32")[0].flags.c_contiguous
    counts = np.array([[0, 70_000, 2**31 - 1]], np.int64)
    out, clipped = as_stack_dtype(counts, "float16")
    np.testing.assert_array_equal(out, [[0.0, FLOAT16_MAX, FLOAT16_MAX]])
    assert clipped == 2
    empty, clipped = as_stack_dtype(np.zeros((0, 4), np.float32), "float16")
    assert empty.shape == (0, 4) and clipped == 0
    with pytest.raises(ValueError, match="stored as floats"):
        as_stack_dtype(stack, "uint16")


def test_shards_hold_about_shard_s_of_frames_within_the_memory_cap() -> None:
    frame, stack = (512, 512), (41, 512, 512)  # 0.5 MB uint16; 20.5 MB float16
    assert shard_frames(frame, "uint16", rate_hz=100, shard_s=1.0, max_mb=128) == 100
    assert shard_frames(stack, "float16", rate_hz=100, shard_s=1.0, max_mb=128) == 6
    assert shard_frames(stack, "float32", rate_hz=100, shard_s=1.0, max_mb=128) == 3
    # A multiple of the chunk, at least one chunk; shard_s = 0 or a slow rate: one chunk.
    assert shard_frames(frame, "uint16", rate_hz=100, shard_s=1.0, max_mb=128, chunk=8) == 96
    assert shard_frames(frame, "uint16", rate_hz=2, shard_s=1.0, max_mb=128, chunk=4) == 4
    assert shard_frames(frame, "uint16", rate_hz=100, shard_s=0.0, max_mb=128, chunk=4) == 4
    assert shard_frames(stack, "float32", rate_hz=100, shard_s=1.0, max_mb=1) == 1


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_an_atomic_write_has_the_mode_of_a_plain_open_not_owner_only(
    tmp_path: Path, umask: int
) -> None:
    text, png = tmp_path / "METADATA.ome.xml", tmp_path / "run.preview.png"
    png.write_bytes(b"the old picture")
    previous = os.umask(umask)
    try:
        write_atomic(text, "<OME>1 µm</OME>")
        write_atomic(png, b"\x89PNG the new picture")
    finally:
        os.umask(previous)
    assert text.read_text(encoding="utf-8") == "<OME>1 µm</OME>"
    assert png.read_bytes() == b"\x89PNG the new picture"
    for path in (text, png):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [text.name, png.name]  # no temp left


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "METADATA.ome.xml"
    path.write_text("old")

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("engine.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("value", [0.0, 7.0, 1e15, 2e16, -3e30])
def test_a_flat_images_display_window_is_never_empty(value: float) -> None:
    # napari refuses a window whose ends are equal; one unit is below float64's step past 2**53
    sampler = WindowSampler(np.dtype(np.float64))
    sampler.add(np.full((8, 8), value))
    window = sampler.window()
    assert window["end"] > window["start"] == value
    assert window["min"] <= window["start"] and window["max"] >= window["end"]


def test_an_image_never_takes_a_group_another_image_has(tmp_path: Path) -> None:
    # (review 61: a role named like an offline image's numbered group was given that group)
    import zarr

    from live.store import XmlImage, image_group, register_image

    root = zarr.open_group(tmp_path / "s.ome.zarr", mode="w", zarr_format=3)
    xml = XmlImage("x", "float32", 1, 1, 4, 4, 0.5, 1.0)
    first = image_group(root, "first")
    root.create_group(first)
    assert register_image(root, None, "first", xml, group=first) == "0"
    with pytest.raises(ValueError, match="'0' is a number"):
        image_group(root, "0")
    with pytest.raises(ValueError, match="group '0' is already image 'first', not 'second'"):
        register_image(root, None, "second", xml, group="0")
    assert image_group(root, "second") == "1"  # the next free one
    assert register_image(root, None, "first", xml) == "0"  # listed: keeps its group


def test_presence_runs_are_clipped_sorted_and_merged_and_a_forged_list_refused() -> None:
    """`live.store.present_runs` (review 67): a run store's ``raw_present`` is input. Runs out
    of order, overlapping, repeated or far past the array come back disjoint, in order and
    inside it (a run to 10^12 is no loop); anything but [start, stop) integer pairs is one
    error."""
    from live.store import present_runs

    assert present_runs([[5, 10], [0, 10], [0, 10], [12, 14], [13, 20]], 16) == [(0, 10), (12, 16)]
    assert present_runs([[0, 10**12]] * 200_000, 8) == [(0, 8)]
    assert present_runs([[-5, 2], [8, 6], [30, 40]], 10) == [(0, 2)]
    assert present_runs([], 10) == []
    for forged in ("0-10", [[0]], [[0, "9"]], [[True, 3]], [[0, 1.5]], {"a": 1}):
        with pytest.raises(ValueError, match="presence run"):
            present_runs(forged, 10)
