"""Recorder: a real OME-Zarr store written on the background thread, read back independently.

The layout is checked with the ecosystem's own readers: ome-zarr-py finds the images from the
root of the collection, yaozarrs validates the whole store against OME-Zarr 0.5, ome-types
parses METADATA.ome.xml; a SIGKILLed recorder leaves a store that says only true things.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.utils import find_multiscales

from live.protocol import Message, decode, encode_frame, encode_stack
from live.recorder import Recorder, missing_seqs, store_path
from tests.live_helpers import run_array

REPO = Path(__file__).resolve().parents[1]

SHAPE = (64, 80)
PLANES = [-2.0, 0.0, 2.0]


def _frame(seq: int) -> Message:
    image = np.full(SHAPE, seq, np.uint16)
    image[0, 0] = 1000 + seq
    return decode(
        encode_frame(image, seq=seq, timestamp_s=100.0 + seq / 8, focus_um=50.0 + seq / 10)
    )


def _stack(seq: int, planes_um: list[float] = PLANES) -> Message:
    planes = np.stack([np.full(SHAPE, seq + p, np.float32) for p in planes_um])
    return decode(
        encode_stack(
            planes,
            seq=seq,
            timestamp_s=100.0 + seq,
            focus_um=0.0,
            latency_ms=1.0,
        )
    )


def _recorder(path: Path, **kwargs: object) -> Recorder:
    kwargs.setdefault("planes_um", PLANES)
    return Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=0.5,
        rate_hz=20.0,
        config={"source": {"kind": "test"}},
        **kwargs,  # type: ignore[arg-type]
    )


def _validate(path: Path) -> None:
    """Validate the whole store with yaozarrs (OME-Zarr 0.5), warnings included."""
    yaozarrs = pytest.importorskip("yaozarrs", reason="validates OME-Zarr: the dev extra")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yaozarrs.validate_zarr_store(str(path))


def _images_from_root(path: Path) -> dict[str, object]:
    """Find the collection's images from its root with ome-zarr-py and read each with Reader."""
    found = find_multiscales(path)  # what ``ome_zarr finder`` lists: OME/METADATA.ome.xml
    nodes = {}
    for image_path, name, _ in found:
        nodes[name] = next(iter(Reader(parse_url(str(image_path)))()))
    return nodes


@pytest.mark.parametrize("frames_per_chunk", [1, 4])
def test_store_holds_every_frame_and_names_the_gaps(tmp_path: Path, frames_per_chunk: int) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, frames_per_chunk=frames_per_chunk)
    raw_seqs = [s for s in range(23) if s not in (5, 17)]
    stack_seqs = [s for s in range(23) if s not in (2, 5, 17, 22)]
    for seq in reversed(raw_seqs):  # out of order on purpose
        rec.put_frame(_frame(seq))
    for seq in stack_seqs:
        rec.put_stack(_stack(seq))
    summary = rec.close(timeout_s=30)
    assert summary.error is None
    assert (summary.raw_frames, summary.stacks) == (21, 19)
    assert summary.raw_gaps == [(5, 6), (17, 18)]
    assert summary.stacks_gaps == [(2, 3), (5, 6), (17, 18)]  # 22 is after the last stack
    assert "raw gaps: 5, 17" in summary.line()

    root = zarr.open_group(path, mode="r")
    raw, stacks = run_array(path, "raw"), run_array(path, "stacks")
    assert raw.shape == (23, *SHAPE) and raw.chunks == (frames_per_chunk, *SHAPE)
    assert stacks.shape == (22, 3, *SHAPE) and stacks.chunks == (1, 3, *SHAPE)
    for seq in raw_seqs:
        assert raw[seq, 0, 0] == 1000 + seq and raw[seq, 5, 5] == seq
    assert not raw[5].any() and not raw[17].any()
    np.testing.assert_array_equal(stacks[7, :, 3, 3], [5.0, 7.0, 9.0])
    deepz = root.attrs["deepz"]
    assert deepz["complete"] is True
    assert deepz["config"] == {"source": {"kind": "test"}}
    assert deepz["planes_um"] == PLANES
    assert missing_seqs(deepz["raw_present"]) == [5, 17]
    assert deepz["summary"]["stacks_gaps"] == [[2, 3], [5, 6], [17, 18]]
    assert "stacks_missing" not in deepz["summary"]  # ranges only: a list can be huge
    timestamps, focus = root["frames/timestamp_s"][:], root["frames/focus_um"][:]
    assert timestamps.shape == focus.shape == (23,)
    np.testing.assert_array_equal(timestamps[raw_seqs], [100.0 + s / 8 for s in raw_seqs])
    np.testing.assert_allclose(focus[raw_seqs], [50.0 + s / 10 for s in raw_seqs])
    assert np.isnan(timestamps[[5, 17]]).all() and np.isnan(focus[[5, 17]]).all()


def test_ecosystem_readers_open_the_collection_from_its_root(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, planes_um=[-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    rng = np.random.default_rng(0)
    for seq in range(6):
        frame = rng.integers(200, 400, SHAPE, dtype=np.uint16)
        frame[0, 0] = 60000  # one hot pixel must not set the window
        rec.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=float(seq))))
        stack = rng.normal(10.0, 1.0, (9, *SHAPE)).astype(np.float32)
        rec.put_stack(
            decode(encode_stack(stack, seq=seq, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0))
        )
    rec.close(timeout_s=30)

    root = zarr.open_group(path, mode="r")
    assert root.attrs["ome"] == {"version": "0.5", "bioformats2raw.layout": 3}
    assert root["OME"].attrs["ome"]["series"] == ["0", "1"]
    _validate(path)
    nodes = _images_from_root(path)
    assert list(nodes) == ["raw", "stacks"]

    raw = nodes["raw"]
    assert [a["name"] for a in raw.metadata["axes"]] == ["t", "y", "x"]
    assert raw.metadata["axes"][0]["unit"] == "second"
    assert raw.metadata["coordinateTransformations"][0] == [
        {"type": "scale", "scale": [0.05, 0.5, 0.5]}
    ]
    assert np.asarray(raw.data[0]).shape == (6, *SHAPE)
    ((start, end),) = raw.metadata["contrast_limits"]  # the omero window: the data, not 0-65535
    assert 200 <= start < 210 and 390 < end < 400

    stacks = nodes["stacks"]
    axes = stacks.metadata["axes"]
    assert [(a["name"], a["type"], a["unit"]) for a in axes][1] == ("z", "space", "micrometer")
    scale, translation = stacks.metadata["coordinateTransformations"][0]
    assert scale == {"type": "scale", "scale": [0.05, 2.0, 0.5, 0.5]}
    assert translation == {"type": "translation", "translation": [0.0, -8.0, 0.0, 0.0]}
    z = translation["translation"][1] + scale["scale"][1] * np.arange(9)
    np.testing.assert_array_equal(z, [-8, -6, -4, -2, 0, 2, 4, 6, 8])  # µm about focus
    ((start, end),) = stacks.metadata["contrast_limits"]
    assert 5.0 < start < 8.0 and 12.0 < end < 15.0

    ome_types = pytest.importorskip("ome_types", reason="validates OME-XML: the dev extra")
    xml = ome_types.from_xml((path / "OME" / "METADATA.ome.xml").read_text())
    assert [image.name for image in xml.images] == ["raw", "stacks"]
    assert [image.pixels.size_t for image in xml.images] == [6, 6]
    assert (xml.images[1].pixels.size_z, xml.images[1].pixels.physical_size_z) == (9, 2.0)


def test_surfaces_are_stored_as_surfaces_with_their_dpms(tmp_path: Path) -> None:
    from engine.dpm import polynomial, tilted

    dpms = np.stack(
        [
            tilted(SHAPE, 1.0, 0.1, 0.0, pixel_size_um=0.5),
            polynomial(SHAPE, [2.0, 0.01], pixel_size_um=0.5),
        ]
    )
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, planes_um=None, surfaces=["tilt", "bowl"], dpms_um=dpms)
    for seq in range(3):
        rec.put_frame(_frame(seq))
        rec.put_stack(_stack(seq, [0.0, 1.0]))
    rec.close(timeout_s=30)

    _validate(path)
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["stack_axis"] == "surface" and deepz["surfaces"] == ["tilt", "bowl"]
    assert deepz["uniform_planes"] is False and deepz["planes_um"] is None
    stacks = _images_from_root(path)["stacks"]
    assert stacks.metadata["axes"][1] == {"name": "surface", "type": "surface"}  # no µm
    assert stacks.metadata["coordinateTransformations"][0] == [
        {"type": "scale", "scale": [0.05, 1.0, 0.5, 0.5]}
    ]
    stored = zarr.open_group(path, mode="r")[f"{deepz['images']['stacks']}/dpms_um"]
    np.testing.assert_array_equal(stored[...], dpms)
    assert stored.attrs["deepz"]["unit"] == "micrometer"
    with pytest.raises(ValueError, match="2 surface names for 1 DPMs"):
        _recorder(tmp_path / "x.ome.zarr", planes_um=None, surfaces=["a", "b"], dpms_um=dpms[:1])


def test_uneven_planes_keep_their_z_in_the_attributes_not_a_false_scale(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    planes = [-3.0, 0.0, 1.0]
    rec = _recorder(path, planes_um=planes, keep_raw=False)
    for seq in range(3):
        assert rec.admit_frame(_frame(seq)) is None  # not kept, but its metadata is
        rec.put_stack(_stack(seq, planes))
    rec.close(timeout_s=30)

    _validate(path)
    root = zarr.open_group(path, mode="r")
    deepz = root.attrs["deepz"]
    assert deepz["images"] == {"stacks": "0"} and deepz["raw_present"] == []
    assert deepz["planes_um"] == planes and deepz["uniform_planes"] is False
    stacks = _images_from_root(path)["stacks"]
    assert stacks.metadata["axes"][1] == {"name": "plane", "type": "plane"}
    assert stacks.metadata["coordinateTransformations"][0][0]["scale"][1] == 1.0
    np.testing.assert_array_equal(root["frames/timestamp_s"][:], [100.0, 100.125, 100.25])


_CRASHER = """
import sys, time
import numpy as np
from live.protocol import decode, encode_frame
from live.recorder import Recorder
# Shards of 20 frames (1 s at 20 Hz), held for at most 1 s: seqs 0-4 are written as a partial
# shard, then seq 5 is merged into that shard file by a second write.
rec = Recorder(sys.argv[1], frame_shape=(16, 16), pixel_size_um=0.5, rate_hz=20.0,
               planes_um=[0.0], hold_s=1.0)
for seq in range(5):
    frame = np.full((16, 16), 100 + seq, np.uint16)
    rec.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=10.0 + seq, focus_um=2.0)))
import zarr
deadline = time.monotonic() + 60
# wait (not a fixed sleep) until the partial shard is written and the presence record shows it
while rec.counts()[0] < 5 or not zarr.open_group(sys.argv[1], mode="r").attrs["deepz"].get(
    "raw_present"
):
    assert time.monotonic() < deadline, "seqs 0-4 were never written"
    time.sleep(0.05)
assert rec.counts()[0] == 5 and rec.shard_t["raw"] == 20
rec.put_frame(decode(encode_frame(np.full((16, 16), 7, np.uint16), seq=5, timestamp_s=15.0)))
while rec.counts()[0] < 6:  # held, then written
    time.sleep(0.05)
print("written", flush=True)
time.sleep(60)
"""


def test_a_store_cut_off_by_sigkill_holds_no_false_rows(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    root = zarr.open_group(path, mode="r")
    raw = run_array(path, "raw")
    assert raw.shape[0] == 6  # no rows past the last frame written
    assert [int(raw[s, 0, 0]) for s in range(6)] == [100, 101, 102, 103, 104, 7]
    deepz = root.attrs["deepz"]
    assert deepz["complete"] is False and "summary" not in deepz
    present = [s for start, stop in deepz["raw_present"] for s in range(start, stop)]
    assert present and set(present) <= set(range(6))  # may lag the arrays, never lead them
    timestamps = root["frames/timestamp_s"][:]
    np.testing.assert_array_equal(timestamps[present], [10.0 + s for s in present])
    _validate(path)


def test_disk_below_min_free_stops_recording_keeps_data_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, min_free_mb=1e12)  # more than any disk: the first check fails
    with caplog.at_level(logging.ERROR, logger="live.recorder"):
        for seq in range(5):
            rec.put_frame(_frame(seq))
        summary = rec.close(timeout_s=30)
    assert summary.error is not None and "below half of recorder.min_free_mb" in summary.error
    assert summary.unrecorded == 5 and summary.raw_frames == 0
    assert "RECORDER STOPPED" in caplog.text
    root = zarr.open_group(path, mode="r")  # the store is still consistent and readable
    assert root.attrs["deepz"]["complete"] is False
    assert "min_free_mb" in root.attrs["deepz"]["error"]


def test_a_filling_disk_stops_the_stacks_first_then_the_raw_frames_writing_held_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The free space read by the writer is set by the test (a real store, a made-up disk).
    # Below min_free_mb (1000) the stacks stop and the raw frames go on; below half of it the
    # raw frames stop too, the ones held in memory for their 1 s shard written first.
    free = {"mb": 10_000.0}
    monkeypatch.setattr("live.recorder._disk_free_mb", lambda path: free["mb"])
    path = tmp_path / "filling.ome.zarr"
    rec = _recorder(path, min_free_mb=1000, shard_s=1.0)

    def put_until(seqs: range, done: Callable[[], bool], what: str) -> None:
        for seq in seqs:
            assert rec.put_frame(_frame(seq))
            rec.put_stack(_stack(seq))
        deadline = time.monotonic() + 60  # waited on, not timed: space is read once a second
        while not done():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    put_until(range(0, 20), lambda: rec.counts() == (20, 20), "the first shard never landed")
    free["mb"] = 700.0
    put_until(range(20, 30), lambda: rec.stacks_error is not None, "the stacks never stopped")
    assert rec.error is None and "below recorder.min_free_mb = 1000" in rec.stacks_error
    for seq in range(30, 35):  # held for their shard (20-39), not yet on disk
        assert rec.put_frame(_frame(seq))
    free["mb"] = 400.0
    put_until(range(35, 35), lambda: rec.error is not None, "the raw frames never stopped")
    assert "below half of recorder.min_free_mb = 1000" in rec.error
    summary = rec.close(timeout_s=30)
    assert summary.raw_frames == 35 and summary.raw_gaps == []  # none held was dropped
    assert summary.stacks == 20
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["raw_present"] == [[0, 35]] and deepz["complete"] is False
    raw = run_array(path, "raw")
    assert [int(raw[seq, 1, 1]) for seq in (0, 20, 34)] == [0, 20, 34]


def test_after_a_full_disk_the_space_freed_by_the_reserve_takes_no_more_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review 78: a raw write fails with ENOSPC (its shard stays held), the reserve is freed;
    # the next space check, below half of min_free_mb, must not write the held shard into the
    # room that was kept for the final metadata.
    free = {"mb": 10_000.0}
    monkeypatch.setattr("live.recorder._disk_free_mb", lambda path: free["mb"])
    full = {"on": True}
    write = zarr.Array.__setitem__

    def filling_write(array: zarr.Array, selection: object, value: object) -> None:
        if array.ndim == 3 and full["on"]:  # raw frames (t, y, x)
            raise OSError(errno.ENOSPC, "No space left on device")
        write(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", filling_write)
    path = tmp_path / "full.ome.zarr"
    rec = _recorder(path, keep_stacks=False, shard_s=1.0, min_free_mb=1000)
    for seq in range(20):  # one whole shard: written at once, and refused
        assert rec.put_frame(_frame(seq))
    deadline = time.monotonic() + 60
    while rec.error is None:
        assert time.monotonic() < deadline, "the full disk never stopped the recorder"
        time.sleep(0.05)
    full["on"] = False
    for mb in (3.0, 2.9):  # only the freed reserve is left; two space checks read it
        free["mb"] = mb
        while rec.free_mb() != mb:
            assert time.monotonic() < deadline, "the writer stopped reading the free space"
            time.sleep(0.05)
    assert rec.counts() == (0, 0)
    summary = rec.close(timeout_s=30)
    assert summary.raw_frames == 0 and summary.unrecorded == 20 and "No space" in summary.error


def test_write_error_is_logged_and_later_items_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A storage fault on seq 1 (injected; a wrong-shape frame is rejected on its own instead,
    # see test_recorder_integrity.py) stops recording; what was written stays.
    write = zarr.Array.__setitem__

    def failing_write(array: zarr.Array, selection: object, value: object) -> None:
        if isinstance(selection, int) and selection == 1:
            raise OSError("injected write fault")
        write(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_write)
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, shard_s=0)  # one file per frame, each written at once
    for seq in range(3):
        rec.put_frame(_frame(seq))
    summary = rec.close(timeout_s=30)
    assert summary.raw_frames == 1
    assert summary.unrecorded == 2
    assert summary.error == "writing raw seq 1 failed: OSError: injected write fault"
    assert run_array(path, "raw")[0, 0, 0] == 1000
    assert zarr.open_group(path, mode="r").attrs["deepz"]["complete"] is False


def test_a_failed_shard_write_loses_that_shard_only_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shards of 20 frames (1 s at 20 Hz): the first is written whole; writing the second
    # fails, so its 20 frames and every later one are unrecorded, and the store says so.
    write = zarr.Array.__setitem__

    def failing_write(array: zarr.Array, selection: object, value: object) -> None:
        if isinstance(selection, slice) and selection.start == 20:
            raise OSError("injected write fault")
        write(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_write)
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, keep_stacks=False)
    assert rec.shard_t["raw"] == 20
    for seq in range(45):
        rec.put_frame(_frame(seq))
    summary = rec.close(timeout_s=30)
    monkeypatch.undo()

    assert (summary.raw_frames, summary.unrecorded) == (20, 25)
    assert summary.error == "writing raw seq 39 failed: OSError: injected write fault"
    raw = run_array(path, "raw")
    assert raw.shape[0] == 20 and raw.shards == (20, *SHAPE)
    assert [int(raw[s, 0, 0]) for s in range(20)] == [1000 + s for s in range(20)]
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["raw_present"] == [[0, 20]] and deepz["complete"] is False


def _stacks_writes_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every write into a stacks array (t, z, y, x) raise OSError, as a bad disk region."""
    write = zarr.Array.__setitem__

    def failing_write(array: zarr.Array, selection: object, value: object) -> None:
        if array.ndim == 4:
            raise OSError("injected stacks fault")
        write(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_write)


@pytest.mark.parametrize("shard_s", [0.0, 1.0])
def test_a_failed_stacks_write_stops_the_stacks_and_no_raw_frame(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    shard_s: float,
) -> None:
    # Stacks can be made again offline from the raw frames, so a stacks fault (tried twice)
    # stops the stacks alone: every raw frame is still recorded, and the store says why.
    _stacks_writes_fail(monkeypatch)
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, shard_s=shard_s)
    with caplog.at_level(logging.WARNING, logger="live.recorder"):
        for seq in range(30):
            assert rec.put_frame(_frame(seq))
            rec.put_stack(_stack(seq))
        summary = rec.close(timeout_s=30)
    monkeypatch.undo()

    assert summary.error is None
    assert summary.stacks_error is not None and "injected stacks fault" in summary.stacks_error
    assert (summary.raw_frames, summary.stacks, summary.unrecorded) == (30, 0, 30)
    assert "STACKS NOT RECORDED after error" in summary.line()
    assert "RECORDER STOPPED WRITING STACKS" in caplog.text
    assert caplog.text.count("RECORDER STOPPED WRITING STACKS") == 1
    raw = run_array(path, "raw")
    assert [int(raw[s, 0, 0]) for s in range(30)] == [1000 + s for s in range(30)]
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["raw_present"] == [[0, 30]] and deepz["stacks_present"] == []
    assert deepz["complete"] is False and deepz["error"] is None
    assert deepz["stacks_error"] == summary.stacks_error
    assert deepz["summary"]["stacks_error"] == summary.stacks_error


def test_a_failed_stacks_write_stops_the_recorder_when_raw_frames_are_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no raw frames the stacks are the whole recording: the same fault stops it.
    _stacks_writes_fail(monkeypatch)
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, keep_raw=False, shard_s=0)
    for seq in range(5):
        rec.put_stack(_stack(seq))
    summary = rec.close(timeout_s=30)
    monkeypatch.undo()

    assert summary.error is not None and "injected stacks fault" in summary.error
    assert summary.stacks_error is None and (summary.stacks, summary.unrecorded) == (0, 5)


def test_store_path_and_bad_settings(tmp_path: Path) -> None:
    assert store_path(tmp_path, tmp_path / "x.ome.zarr") == tmp_path / "x.ome.zarr"
    made = store_path(tmp_path)
    assert made.parent == tmp_path and made.name.endswith(".ome.zarr")
    with pytest.raises(ValueError, match="compression 'lzma' is not supported"):
        _recorder(tmp_path / "a.ome.zarr", compression="lzma")
    with pytest.raises(ValueError, match="frames_per_chunk must be >= 1"):
        _recorder(tmp_path / "b.ome.zarr", frames_per_chunk=0)
    with pytest.raises(ValueError, match="stack_dtype 'uint16' is not supported"):
        _recorder(tmp_path / "c.ome.zarr", stack_dtype="uint16")
    with pytest.raises(ValueError, match="shard_s must be >= 0"):
        _recorder(tmp_path / "d.ome.zarr", shard_s=-1.0)


def test_every_gap_and_every_skipped_or_lost_seq_is_stored_as_ranges(tmp_path: Path) -> None:
    # Far more gaps than any printed line shows (format_seqs elides after 20 ranges): the store
    # keeps every one, as half-open [start, stop] ranges.
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, keep_stacks=False)
    present = [s for s in range(200) if s % 3 == 0]  # 66 gaps of two seqs each
    for seq in present:
        rec.put_frame(_frame(seq))
    summary = rec.close(timeout_s=30)
    gaps = [(s + 1, s + 3) for s in present[:-1]]
    assert summary.raw_gaps == gaps
    assert not hasattr(summary, "raw_missing")  # ranges only: a list of seqs can be huge
    assert "… (46 more ranges)" in summary.line()  # the log line is short; the store is whole
    skipped = [*range(5, 40), 41, 43, *range(100_000, 300_000)]
    run_summary = {
        "frames_in": 200,
        "skipped": skipped,
        "lost": [],
        "backend": "x",
        "recorder": {"raw_gaps": summary.raw_gaps, "error": None},
    }
    rec.add_run_summary(run_summary)
    assert run_summary["skipped"] == skipped  # the caller's summary is left as it was

    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["summary"]["raw_gaps"] == [list(g) for g in gaps]
    assert missing_seqs(deepz["raw_present"]) == [s for a, b in gaps for s in range(a, b)]
    run = deepz["run_summary"]
    assert run["skipped"] == [[5, 40], [41, 42], [43, 44], [100_000, 300_000]]
    assert run["lost"] == [] and run["frames_in"] == 200 and run["backend"] == "x"
    assert run["recorder"] == {"raw_gaps": [list(g) for g in gaps], "error": None}
    assert run["seq_lists"] == "half-open [start, stop] ranges"
    assert deepz["complete"] is True and not (path / "OME" / ".deepz-reserve").exists()


def test_the_reserve_grows_with_the_metadata_it_must_hold_back_room_for(tmp_path: Path) -> None:
    # A 4 KiB reserve under root metadata of about 20 KiB (three hundred gaps): the writer
    # grows it to three times the metadata, so a disk that fills later still takes the final
    # write. Waited on, not timed: the metadata is written every 2 s, and a loaded machine
    # writes it while only part of the gaps are in (the reserve grows in steps with it).
    path = tmp_path / "gappy.ome.zarr"
    rec = _recorder(path, keep_stacks=False, reserve_mb=4 / 1024, seq_window=10_000)
    reserve = path / "OME" / ".deepz-reserve"
    assert reserve.stat().st_size == 4096
    for seq in range(0, 3000, 10):
        assert rec.put_frame(_frame(seq))
    deadline = time.monotonic() + 120
    root = path / "zarr.json"

    def grown() -> bool:  # the reserve read after the metadata: it never shrinks meanwhile
        metadata = root.stat().st_size
        return metadata > 4096 and reserve.stat().st_size >= 3 * metadata

    while time.monotonic() < deadline and not grown():
        time.sleep(0.1)
    metadata = root.stat().st_size
    assert reserve.stat().st_size >= 3 * metadata > 3 * 4096
    summary = rec.close(timeout_s=30)
    assert summary.raw_frames == 300 and summary.error is None and not reserve.exists()


def _counts_stack(seq: int, dtype: type = np.float32) -> Message:
    """A stack in camera counts over the whole uint16 range, with sub-count detail."""
    rng = np.random.default_rng(seq)
    planes = rng.random((len(PLANES), *SHAPE)) * 65000 + rng.random((len(PLANES), *SHAPE))
    planes = planes.astype(dtype)
    planes[0, :4, :4] = [1.25, 99.5, 140.2, 65503.9]  # dim and bright values, kept finite
    return decode(encode_stack(planes, seq=seq, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0))


def test_float16_stacks_are_stored_as_float16_within_half_an_ulp(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, stack_dtype="float16")
    sent = {seq: _counts_stack(seq) for seq in range(4)}  # float32 on the wire: rounded here
    sent[4] = _counts_stack(4, np.float16)  # as the worker sends them: stored as they are
    for message in sent.values():
        assert rec.put_stack(message)
    summary = rec.close(timeout_s=30)

    assert summary.stacks == 5 and summary.rejected_total == 0
    assert summary.stack_values_clipped == 0
    stacks = run_array(path, "stacks")
    assert stacks.dtype == np.float16
    meta = json.loads((path / stacks.path / "zarr.json").read_text())
    assert meta["data_type"] == "float16"
    for seq, message in sent.items():
        stored = stacks[seq].astype(np.float32)
        exact = message.array.astype(np.float32)
        # Round to nearest: at most half a float16 step, 2^-11 of the value (normal range).
        assert np.all(np.abs(stored - exact) <= np.abs(exact) * 2.0**-11)
        if seq == 4:
            assert stacks[seq].tobytes() == message.array.tobytes()
    assert stacks[0, 0, 0, 3] == 65504.0  # 65503.9 rounds to the top finite value, not inf
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["stack_dtype"] == "float16"
    assert deepz["summary"]["stack_values_clipped"] == 0
    ome_types = pytest.importorskip("ome_types", reason="validates OME-XML: the dev extra")
    xml = ome_types.from_xml((path / "OME" / "METADATA.ome.xml").read_text())
    assert [image.pixels.type.value for image in xml.images] == ["uint16", "float"]
    _validate(path)
    stacks_node = _images_from_root(path)["stacks"]
    assert np.asarray(stacks_node.data[0]).dtype == np.float16


def test_stack_values_beyond_float16_saturate_and_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, stack_dtype="float16")
    bright = np.full((len(PLANES), *SHAPE), 1000.0, np.float32)
    bright[1, 2, :3] = [65520.0, 122_422.7, np.inf]  # an overexposed frame's refocused peak
    bright[2, 0, 0] = -70_000.0
    bright[2, 0, 1] = np.nan  # not a number stays not a number, and is not counted
    with caplog.at_level(logging.WARNING, logger="live.recorder"):
        for seq in range(3):
            parts = encode_stack(bright, seq=seq, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0)
            assert rec.put_stack(decode(parts))
        assert not rec.put_stack(decode(parts))  # a duplicate: rejected, its values not counted
        summary = rec.close(timeout_s=30)

    assert summary.stack_values_clipped == 3 * 4 and summary.stacks == 3
    assert "12 stack values saturated" in summary.line()
    assert sum("beyond the float16 range" in r.message for r in caplog.records) == 1
    stacks = run_array(path, "stacks")
    np.testing.assert_array_equal(stacks[2, 1, 2, :4], [65504.0, 65504.0, 65504.0, 1000.0])
    assert stacks[0, 2, 0, 0] == -65504.0 and np.isnan(stacks[0, 2, 0, 1])
    assert np.isfinite(stacks[:][~np.isnan(stacks[:])]).all()
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["stack_values_clipped"] == deepz["summary"]["stack_values_clipped"] == 12


def _files(array_dir: Path) -> int:
    """Data files of one zarr array (chunk or shard objects; not its zarr.json)."""
    return sum(1 for f in (array_dir / "c").rglob("*") if f.is_file())


def _count_file_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every file zarr's LocalStore writes (until the patch is undone)."""
    import zarr.storage._local as zarr_local

    puts: list[str] = []
    put = zarr_local._put

    def counting_put(file: Path, value: object, exclusive: bool = False) -> int:
        puts.append(str(file))
        return put(file, value, exclusive)  # type: ignore[arg-type]

    monkeypatch.setattr(zarr_local, "_put", counting_put)
    return puts


def test_shards_hold_many_frames_per_file_and_each_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1 s shards at 20 Hz: 20 frames or stacks a file. In order at rate, each shard file is
    # written exactly once (no rewrite per frame); the unsharded store has a file per frame.
    puts = _count_file_writes(monkeypatch)
    n = 40
    stores = {}
    for shard_s in (1.0, 0.0):
        path = stores[shard_s] = tmp_path / f"shard-{shard_s}.ome.zarr"
        rec = _recorder(path, shard_s=shard_s, stack_dtype="float16", compression="none")
        for seq in range(n):
            rec.put_frame(_frame(seq))
            rec.put_stack(_stack(seq))
        summary = rec.close(timeout_s=30)
        assert (summary.raw_frames, summary.stacks, summary.error) == (n, n, None)
    monkeypatch.undo()

    sharded, plain = stores[1.0], stores[0.0]
    raw, stacks = run_array(sharded, "raw"), run_array(sharded, "stacks")
    assert raw.shards == (20, *SHAPE) and raw.chunks == (1, *SHAPE)
    assert stacks.shards == (20, 3, *SHAPE) and stacks.chunks == (1, 3, *SHAPE)
    assert run_array(plain, "raw").shards is None
    for role in ("raw", "stacks"):
        array = run_array(sharded, role)
        assert _files(sharded / array.path) == n // 20  # 2 files, not 40
        assert _files(plain / run_array(plain, role).path) == n
        np.testing.assert_array_equal(array[:], run_array(plain, role)[:])
        shard_puts = [p for p in puts if p.startswith(str(sharded / array.path / "c"))]
        assert len(shard_puts) == n // 20  # each shard written once, whole
    _validate(sharded)
    assert list(_images_from_root(sharded)) == ["raw", "stacks"]


def test_a_partly_filled_shard_is_one_write_and_a_late_frame_merges_without_overwriting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every other frame (the "latest" policy's stacks look like this): a shard of 20 holds 10.
    # It used to be written one run at a time, 10 rewrites of the same file. Frame 1 then
    # comes late, after its shard is on disk: it is merged in, and frame 0 and 2 keep theirs.
    puts = _count_file_writes(monkeypatch)
    path = tmp_path / "every-other.ome.zarr"
    rec = _recorder(path, shard_s=1.0, keep_stacks=False, compression="none")
    evens = list(range(0, 100, 2))  # 5 shards; the newest written stale push out the oldest
    for seq in evens:
        assert rec.put_frame(_frame(seq))
    rec.put_frame(_frame(1))  # late: shard 0 was written when shard 3 began
    summary = rec.close(timeout_s=30)
    monkeypatch.undo()

    assert (summary.raw_frames, summary.error) == (len(evens) + 1, None)
    raw = run_array(path, "raw")
    shard_puts = [p for p in puts if p.startswith(str(path / raw.path / "c"))]
    assert len(shard_puts) == 5 + 1  # each shard once; shard 0 once more for the late frame
    for seq in [0, 1, 2, 98]:
        assert raw[seq, 1, 1] == seq and raw[seq, 0, 0] == 1000 + seq
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["raw_present"][:3] == [[0, 3], [4, 5], [6, 7]] and len(deepz["raw_present"]) == 49
