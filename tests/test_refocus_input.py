"""live.refocus on damaged or odd inputs: each is one line and a non-zero exit, never a
traceback, or costs only the frames it damages.

Small on purpose, as tests/test_refocus.py (whose recordings these are: the project's
Recorder, 64² frames, the shipped slim model on one ONNX Runtime thread).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import zarr

from live.refocus import MANIFEST, RefocusError, main, refocus_recording
from tests.test_refocus import ORT, PLANES, SIDE, _frames, _group, _read, _record, _reference

CLI = ["--planes", "0", "--scheduler", "sync", "--backend", "onnxruntime", "--threads", "1"]


def _one_error_line(capsys: pytest.CaptureFixture[str], *words: str) -> None:
    """What the command line printed on stderr is one ``error:`` line holding `words`."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]


def test_a_run_missing_a_raw_chunk_file_is_refused_naming_its_seqs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """zarr reads a missing chunk file as zeros: the run was refocused as zero frames and its
    output marked complete. The recorder writes every chunk and lists a seq as present only
    once it is on disk, so a missing file is damage: refused, naming the seqs it held."""
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(6)))
    raw = zarr.open_array(str(store), path="0/0", mode="r")
    assert raw.shards == (2, SIDE, SIDE)  # two frames a file: the second file holds seqs 2-3
    (store / "0" / "0" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(RefocusError, match=r"seqs 2-3 are listed as recorded but their chunk"):
        refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert main([str(store), *CLI, "--no-progress"]) == 2
    _one_error_line(capsys, "seqs 2-3", "missing")


def test_a_damaged_raw_chunk_fails_its_task_in_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A raw chunk file that does not decode fails the task that reads it: one line naming
    the chunk and its seqs and exit 1 (was a zarr traceback); the chunks done are kept."""
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(4)))
    (store / "0" / "0" / "c" / "1" / "0" / "0").write_bytes(b"not a shard at all")
    assert main([str(store), *CLI, "--chunk", "2", "--no-progress"]) == 1
    _one_error_line(capsys, "cannot read the raw frames of chunk 1 (seqs 2-3)")


def test_tiffs_that_cannot_be_refocused_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TIFF of bool or complex pixels is refused when opened, as a Zarr input is (exit 2);
    one cut short fails the task that reads it (exit 1): one line each, no traceback."""
    import tifffile

    frames = _frames(3)
    tifffile.imwrite(tmp_path / "bool.tif", frames > 500, photometric="minisblack")
    tifffile.imwrite(
        tmp_path / "complex.tif", frames.astype(np.complex64), photometric="minisblack"
    )
    tifffile.imwrite(tmp_path / "whole.tif", frames, photometric="minisblack")
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    for name, code, words in (
        ("bool", 2, ("bool.tif", "dtype bool is not a real number type")),
        ("complex", 2, ("complex.tif", "dtype complex64 is not a real number type")),
        ("cut", 1, ("cut.tif", "cannot read the raw frames of chunk 0 (seqs 0-2)")),
    ):
        out = tmp_path / f"{name}.ome.zarr"
        argv = [str(tmp_path / f"{name}.tif"), "--out", str(out), *CLI, "--no-progress"]
        assert main(argv) == code
        _one_error_line(capsys, *words)


def test_a_frame_the_backend_refuses_costs_that_frame_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A float frame with a pixel at 1e20 (no camera count): the backend refuses it, as live
    (`live.worker`), so its planes stay NaN with a warning naming it and why, and every other
    frame is refocused (it was a traceback that lost the job)."""
    import tifffile

    frames = _frames(3).astype(np.float32)
    frames[1, 3, 3] = 1e20
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    out = tmp_path / "out.ome.zarr"
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        summary = refocus_recording(
            tmp_path / "movie.tif", planes=PLANES, out=out, scheduler="sync", **ORT
        )
    assert summary.frames_done == 2
    warned = [r.getMessage() for r in caplog.records if "cannot be refocused" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("frame 1 cannot be refocused (")
    assert "1e+20" in warned[0]  # the backend's reason
    group = zarr.open_group(str(out), mode="r")[_group(out, "stacks")]
    assert group.attrs["deepz"]["present"] == [[0, 1], [2, 3]]
    assert group.attrs["deepz"]["complete"] is False
    stacks = _read(out, "stacks/0")
    assert np.isnan(stacks[1]).all()
    good = _reference(frames[[0, 2]])
    np.testing.assert_allclose(stacks[[0, 2]], good, rtol=1e-5, atol=1e-2)
    assert summary.frames_left == 1 and "1 left NaN" in summary.line()
    # every frame refused: the command fails as a whole (review 36: it said 0 frames, rc 0)
    frames[:, 3, 3] = 1e20
    tifffile.imwrite(tmp_path / "bad.tif", frames, photometric="minisblack")
    argv = [str(tmp_path / "bad.tif"), "--out", str(tmp_path / "bad.ome.zarr"), *CLI]
    assert main([*argv, "--no-progress"]) == 1


def test_an_unreadable_manifest_entry_means_that_chunk_is_not_done(tmp_path: Path) -> None:
    """A manifest entry emptied on disk (a 0-byte object) made the rerun a traceback: it says
    nothing about its chunk, so that chunk is computed again and its entry rewritten."""
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(4)))
    first = refocus_recording(store, planes=PLANES, chunk=2, scheduler="sync", **ORT)
    assert first.chunks_done == 2
    group = _group(store, "stacks_offline")
    (store / group / MANIFEST / "c" / "0").write_bytes(b"")
    again = refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert (again.chunks_done, again.frames_done, again.chunks_skipped) == (1, 2, 1)
    third = refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert (third.chunks_done, third.chunks_skipped) == (0, 2)


def _ngff(path: Path, lead: dict[str, str], n: int) -> Path:
    """Write an NGFF image of `n` frames whose leading axis is `lead` (then y, x)."""
    image = zarr.open_group(str(path), mode="w", zarr_format=3)
    axes = [lead, {"name": "y", "type": "space"}, {"name": "x"}]
    image.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": axes, "datasets": [{"path": "0"}]}],
    }
    image.create_array("0", data=_frames(n), chunks=(1, SIDE, SIDE))
    return path


def test_an_ngff_volume_without_a_time_axis_is_refused(tmp_path: Path) -> None:
    """An NGFF (z, y, x) image is one volume, not a time series: its planes were refocused as
    frames. The frames' axis must be the one named t."""
    zyx = _ngff(tmp_path / "zyx.ome.zarr", {"name": "z", "type": "space"}, 3)
    with pytest.raises(RefocusError, match=r"axes zyx; its axis 'z' is not time"):
        refocus_recording(zyx, planes=PLANES, out=tmp_path / "o.zarr", **ORT)
    # one plane of a named axis: one frame, as before
    cyx = _ngff(tmp_path / "cyx.ome.zarr", {"name": "c", "type": "channel"}, 1)
    summary = refocus_recording(
        cyx, planes=PLANES, out=tmp_path / "c.zarr", scheduler="sync", **ORT
    )
    assert summary.frames_done == 1
    # an axis of NGFF type "time" is the frames' axis whatever its name
    timed = _ngff(tmp_path / "time.ome.zarr", {"name": "time", "type": "time"}, 3)
    summary = refocus_recording(
        timed, planes=PLANES, out=tmp_path / "t.zarr", scheduler="sync", **ORT
    )
    assert summary.frames_done == 3


def test_a_truncated_imagej_hyperstack_is_mapped_and_read_block_by_block(tmp_path: Path) -> None:
    """An ImageJ hyperstack truncated to one IFD (as ImageJ writes stacks beyond 4 GB) holds
    every frame in one page: it is memory-mapped and each block reads its own frames (it was
    read whole into every process), big-endian too; it refocuses as the same frames do. A
    compressed page of several frames cannot be mapped: it is still read whole, as before."""
    import tifffile

    from live.refocus import open_input
    from live.refocus.inputs import _Frames

    frames = _frames(5, seed=2)
    ij = {"axes": "TYX", "finterval": 0.5}
    tifffile.imwrite(tmp_path / "ij.tif", frames, imagej=True, truncate=True, metadata=ij)
    tifffile.imwrite(
        tmp_path / "be.tif", frames, imagej=True, truncate=True, metadata=ij, byteorder=">"
    )
    tifffile.imwrite(
        tmp_path / "vol.tif", frames, volumetric=True, tile=(16, 16), compression="zlib"
    )
    for name, mapped in (("ij", True), ("be", True), ("vol", False)):
        with tifffile.TiffFile(tmp_path / f"{name}.tif") as tif:
            assert len(tif.pages) == 1 and tif.series[0].shape == frames.shape
        raw = open_input(tmp_path / f"{name}.tif")
        assert raw.n_t == 5 and raw.present == tuple(range(5))
        reader = _Frames(raw.spec)
        try:
            assert isinstance(reader._array, np.memmap) is mapped, name
            for t0, t1 in ((0, 2), (2, 5), (4, 5)):
                block = reader.read(t0, t1)
                assert type(block) is np.ndarray and block.dtype == np.dtype("uint16")
                np.testing.assert_array_equal(block, frames[t0:t1])
        finally:
            reader.close()
    assert open_input(tmp_path / "ij.tif").rate_hz == 2.0
    summary = refocus_recording(
        tmp_path / "ij.tif", planes=PLANES, out=tmp_path / "ij.ome.zarr", chunk=2, **ORT
    )
    assert (summary.frames_done, summary.chunks_done) == (5, 3)
    stacks = _read(tmp_path / "ij.ome.zarr", "stacks/0")
    np.testing.assert_allclose(stacks, _reference(frames), rtol=1e-5, atol=1e-3)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path: contents)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["../escape", "", "a/b", "7", ".hidden", "-x", "n" * 65])
def test_a_bad_image_name_is_refused_before_any_store_is_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """``--name`` is one plain name in the store: a path, an empty name (which became the
    default) or a group number is one line and exit 2, and neither the run store nor the
    ``--out`` store is made or changed (review 58: ``../escape`` was a zarr traceback that
    left ``zarr.json`` behind)."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1])
    before = _files(tmp_path)
    out = tmp_path / "out" / "o.ome.zarr"
    for where in ([], ["--out", str(out)]):
        assert main([str(store), *CLI, f"--name={name}", *where, "--no-progress"]) == 2
        _one_error_line(capsys, f"--name {name!r} is not an image name")
        assert _files(tmp_path) == before and not (tmp_path / "out").exists()
    with pytest.raises(RefocusError, match="is not an image name"):
        refocus_recording(store, planes=PLANES, out=out, name=name, scheduler="sync", **ORT)
    assert not out.exists() and _files(tmp_path) == before


def test_a_name_with_fill_gaps_is_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--fill-gaps`` completes the run's own stacks image: a ``--name`` it would ignore is
    refused in one line, the store untouched."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1], stack_seqs=[0])
    before = _files(tmp_path)
    argv = [str(store), "--fill-gaps", "--name", "mine", "--backend", "onnxruntime"]
    assert main([*argv, "--no-progress"]) == 2
    _one_error_line(capsys, "--name 'mine' with --fill-gaps", "drop --name")
    assert _files(tmp_path) == before


def test_a_plain_image_name_is_written_under_that_name(tmp_path: Path) -> None:
    """Letters, digits, ``_``, ``.`` and ``-`` after a first letter make a name as given."""
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, [0, 1])
    assert main([str(store), *CLI, "--name", "z-2.5_um", "--no-progress"]) == 0
    assert _group(store, "z-2.5_um") != "z-2.5_um"  # a numbered group, listed by its name
    got = _read(store, "z-2.5_um/0")
    np.testing.assert_allclose(got[:, 0], _reference(frames)[:, 1], rtol=1e-5, atol=1e-3)


FILL = ["--fill-gaps", "--scheduler", "sync", "--backend", "onnxruntime", "--threads", "1"]
"""--fill-gaps of a run's own planes (no --planes: a fill takes the run's)."""


@pytest.mark.parametrize(
    ("forged", "args", "words"),
    [
        ({"stacks_present": [[1, 2, 3]]}, FILL, "stacks_present"),
        ({"stacks_present": "ab"}, FILL, "stacks_present"),
        ({"planes_um": ["a"], "config": None}, CLI[2:], "planes_um"),
        ({"config": {"engine": {"max_batch": "abc"}}}, CLI, "[engine] config"),
        ({"config": {"engine": {"model_path": 5}}}, CLI, "[engine] config"),
        ({"config": {"engine": {"backends": 5}}}, [*CLI[:4], "--threads", "1"], "[engine]"),
    ],
)
def test_forged_run_metadata_is_one_line_naming_the_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    forged: dict[str, object],
    args: list[str],
    words: str,
) -> None:
    """A run's attributes are read from disk, as hostile as any input (review 74): each of
    these was a traceback (the last one: the recorded backends, used without --backend)."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1], stack_seqs=[0])
    root = zarr.open_group(str(store), mode="r+")
    root.attrs["deepz"] = {**dict(root.attrs["deepz"]), **forged}
    assert main([str(store), *args, "--no-progress"]) == 2
    _one_error_line(capsys, "malformed", words)


def test_forged_shapes_and_stacks_are_refused_before_anything_is_allocated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Zarr array forged as (1, 10^6, 10^6) asked the first plan for 3.6 TiB, and a live
    stacks image of int16 made --fill-gaps fail converting NaN (review 74)."""
    huge = zarr.open_array(
        str(tmp_path / "huge.zarr"), mode="w", shape=(1, 10**6, 10**6), dtype="uint16"
    )
    assert huge.shape[1] == 10**6
    assert main([str(tmp_path / "huge.zarr"), *CLI, "--no-progress"]) == 2
    _one_error_line(capsys, "1000000 x 1000000 pixels", "not a camera's frame")
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1], stack_seqs=[0])
    root = zarr.open_group(str(store), mode="r+")
    group = _group(store, "stacks")
    del root[group]["0"]
    root[group].create_array("0", shape=(2, len(PLANES), SIDE, SIDE), dtype="int16")
    assert main([str(store), *FILL, "--no-progress"]) == 2
    _one_error_line(capsys, "int16 stacks", "not a live stacks image to fill")
