"""Replay of a run store keeps the recording's own seqs, camera timestamps and focus, and says
at which rate it will send (for the daemon's pre-flight).

Each store is written by the project's real `Recorder`, replayed by `ReplaySource` through a
real `FrameSender` to a real PULL socket, and what arrives is decoded and compared bit for bit.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
import zmq

from live.config import ScopeConfig, validate_config
from live.hook import FrameSender
from live.protocol import Message, decode, encode_frame
from live.recorder import Recorder
from live.sources import ReplayError, ReplaySource, make_source, open_recording, replay_rate_hz
from live.store import array_path

SHAPE = (16, 24)
RATE_HZ = 400.0
PRESENT = [2, 3, 4, 6, 7, 10]  # seqs 0, 1, 5, 8 and 9 never reached the recorder


def _pixels(seq: int) -> np.ndarray:
    return np.random.default_rng(seq).integers(0, 2**16, SHAPE, dtype=np.uint16)


def _stamp(seq: int) -> float:
    """A camera clock that is neither the replay's nor regular (jitter by seq)."""
    return 1_700_000_000.0 + seq / 50 + (seq % 3) * 1e-4


def _focus(seq: int) -> float:
    return -3.25 + 0.125 * seq


def _record(path: Path, seqs: list[int] = PRESENT) -> Path:
    """Write a run store with the real recorder: raw frames of `seqs`, no stacks."""
    recorder = Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=0.3,
        rate_hz=RATE_HZ,
        planes_um=[0.0],
        keep_stacks=False,
    )
    for seq in seqs:
        parts = encode_frame(_pixels(seq), seq=seq, timestamp_s=_stamp(seq), focus_um=_focus(seq))
        assert recorder.put_frame(decode(parts))
    assert recorder.close(timeout_s=30).raw_frames == len(seqs)
    return path


def _replay(source: ReplaySource, endpoint: str) -> None:
    """Run `source` to the end through a real sender connected to `endpoint`."""
    sender = FrameSender(endpoint)
    summary = source.run(sender, threading.Event())
    sender.close()
    assert summary.frames_dropped == 0 and summary.name == "replay"


def _receive(
    sock: zmq.Socket[bytes], expected: int, quiet_ms: int = 500, timeout_ms: int = 30_000
) -> list[Message]:
    """The first `expected` messages, each waited for up to `timeout_ms` (the sender may still
    be connecting, and a loaded CI machine is slow), then anything more until the socket has
    been quiet for `quiet_ms`."""
    out = []
    while len(out) < expected:
        assert sock.poll(timeout_ms), f"only {len(out)} of {expected} messages arrived"
        out.append(decode(sock.recv_multipart(copy=False)))
    while sock.poll(quiet_ms):
        out.append(decode(sock.recv_multipart(copy=False)))
    return out


def test_replay_sends_the_recordings_own_seqs_timestamps_and_focus(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path
) -> None:
    sock, endpoint = pull
    store = _record(tmp_path / "run.ome.zarr")
    source = ReplaySource(store)
    assert source.rate_hz == pytest.approx(RATE_HZ)  # the store's own rate
    _replay(source, endpoint)
    msgs = _receive(sock, len(PRESENT))

    assert [m.header.seq for m in msgs] == PRESENT  # gaps stay gaps, nothing renumbered
    for m in msgs:
        seq = m.header.seq
        assert m.header.timestamp_s == _stamp(seq)  # exactly the camera's clock
        assert m.header.focus_um == _focus(seq)
        assert m.array.tobytes() == _pixels(seq).tobytes()


def test_a_looped_replay_never_repeats_a_seq_and_keeps_its_clock(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path
) -> None:
    sock, endpoint = pull
    store = _record(tmp_path / "run.ome.zarr")
    period = PRESENT[-1] + 1  # the store's time axis ends at its last frame
    source = ReplaySource(store, loop=True, frame_count=2 * len(PRESENT) + 1)
    _replay(source, endpoint)
    msgs = _receive(sock, 2 * len(PRESENT) + 1)

    expected = [lap * period + s for lap in range(3) for s in PRESENT][: 2 * len(PRESENT) + 1]
    assert [m.header.seq for m in msgs] == expected
    for m in msgs:
        lap, seq = divmod(m.header.seq, period)
        assert m.header.timestamp_s == pytest.approx(_stamp(seq) + lap * period / RATE_HZ)
        assert m.header.focus_um == _focus(seq)
        assert m.array.tobytes() == _pixels(seq).tobytes()


def test_frames_without_recorded_metadata_are_stamped_when_sent(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path
) -> None:
    sock, endpoint = pull
    store = _record(tmp_path / "run.ome.zarr")
    frames = zarr.open_group(store, mode="r+")["frames"]
    frames["timestamp_s"][6] = np.nan  # as if the metadata of seq 6 never reached the disk
    frames["focus_um"][6] = np.nan
    before = time.time()
    _replay(ReplaySource(store), endpoint)
    after = time.time()
    msgs = {m.header.seq: m for m in _receive(sock, len(PRESENT))}

    assert sorted(msgs) == PRESENT
    assert before <= msgs[6].header.timestamp_s <= after and msgs[6].header.focus_um is None
    assert msgs[7].header.timestamp_s == _stamp(7)
    assert open_recording(store).stamp(6) == (None, None)
    assert open_recording(store).stamp(99) == (None, None)  # beyond the arrays


def test_replay_rate_for_the_preflight_and_record_raw_option(tmp_path: Path) -> None:
    store = _record(tmp_path / "run.ome.zarr")
    tiff = tmp_path / "movie.tif"
    tifffile.imwrite(
        tiff,
        np.stack([_pixels(i) for i in range(3)]),
        imagej=True,
        metadata={"axes": "TYX", "finterval": 0.02},
    )
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.stack([_pixels(i) for i in range(3)]), photometric="minisblack")

    def config(replay: dict[str, object], kind: str = "replay") -> ScopeConfig:
        return validate_config(
            {
                "source": {
                    "kind": kind,
                    "frame_shape": list(SHAPE),
                    "rate_hz": 7.0,
                    "replay": replay,
                }
            }
        )

    own = config({"path": str(store)})
    assert replay_rate_hz(own) == pytest.approx(RATE_HZ)  # the recording's rate
    assert replay_rate_hz(config({"path": str(store), "rate_hz": 25.0})) == 25.0
    assert replay_rate_hz(config({"path": str(tiff)})) == pytest.approx(50.0)  # finterval
    assert replay_rate_hz(config({"path": str(plain)})) == 7.0  # says nothing: source.rate_hz
    assert replay_rate_hz(config({}, kind="simulated")) == 7.0
    assert own.source.replay.record_raw is False  # raw frames are not recorded twice by default
    assert config({"path": str(store), "record_raw": True}).source.replay.record_raw is True


def test_the_daemon_replays_a_recording_without_recording_its_raw_frames_again(
    tmp_path: Path, tiny_model_files
) -> None:
    """End to end: stacks under the recording's own seqs and camera timestamps, no raw copy."""
    from live.run import Daemon
    from tests.live_helpers import live_config, run_array

    side = 64
    source = tmp_path / "source.ome.zarr"
    recorder = Recorder(
        source,
        frame_shape=(side, side),
        pixel_size_um=0.3,
        rate_hz=20.0,
        planes_um=[0.0],
        keep_stacks=False,
    )
    seqs = [3, 4, 5, 8, 9]
    for seq in seqs:
        frame = np.random.default_rng(seq).integers(100, 3000, (side, side), dtype=np.uint16)
        assert recorder.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=_stamp(seq))))
    recorder.close(timeout_s=30)
    data = live_config(tmp_path, tiny_model_files["onnx"]).model_dump(mode="json")
    data["source"] = {
        "kind": "replay",
        "frame_shape": [side, side],
        "rate_hz": 20.0,
        "replay": {"path": str(source), "rate_hz": 10.0},
    }
    config = validate_config(data, source="test config")
    out = tmp_path / "replayed.ome.zarr"
    daemon = Daemon(config, output=out)
    try:
        daemon.start()
        assert daemon.preflight_result is not None and daemon.preflight_result.rate_hz == 10.0
        daemon.supervise(60.0, quiet=True)  # ends when the recording does
    finally:
        summary = daemon.stop()
    assert summary.finish_reason == "source finished" and not summary.lost
    assert summary.raw_recorded == 0 and summary.stacks_written == len(seqs)
    deepz = zarr.open_group(out, mode="r").attrs["deepz"]
    present = [s for start, stop in deepz["stacks_present"] for s in range(start, stop)]
    assert present == seqs  # the recording's own seqs, gaps kept
    stamps = np.asarray(zarr.open_group(out, mode="r")["frames/timestamp_s"])
    assert np.allclose(stamps[seqs], [_stamp(s) for s in seqs])  # its camera clock, not now
    assert run_array(out, "stacks").shape[0] == max(seqs) + 1


def test_a_recording_that_cannot_be_replayed_is_one_line_naming_it(tmp_path: Path) -> None:
    """Every file given to replay is input: truncated, empty, not camera counts, forged
    presence ranges or metadata of another shape — one ValueError naming the file, and a
    forged range is clipped to the array rather than looped over."""
    import tifffile

    good = np.random.default_rng(0).integers(0, 4000, (5, *SHAPE), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "movie.tif", good, photometric="minisblack")
    data = (tmp_path / "movie.tif").read_bytes()
    (tmp_path / "truncated.tif").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.tif").write_text("not a TIFF")
    halves = np.full((3, *SHAPE), 0.5, np.float32)
    tifffile.imwrite(tmp_path / "halves.tif", halves, photometric="minisblack")
    zarr.create_array(str(tmp_path / "line.zarr"), shape=(10,), dtype="uint16")
    tifffile.imwrite(tmp_path / "backwards.tif", good, imagej=True, metadata={"finterval": -0.1})
    store = _record(tmp_path / "run.ome.zarr")
    forged = zarr.open_group(store, mode="r+")
    deepz = dict(forged.attrs["deepz"])
    for name, attrs in (
        ("empty", {"raw_present": []}),
        ("odd-present", {"raw_present": [["a", "b"]]}),
    ):
        copy = tmp_path / f"{name}.ome.zarr"
        _record(copy)
        zarr.open_group(copy, mode="r+").attrs["deepz"] = {**deepz, **attrs}
    cases = {
        "truncated.tif": "cannot replay",
        "text.tif": "cannot replay",
        "halves.tif": "not camera counts",
        "empty.ome.zarr": "holds no frames",
        "odd-present.ome.zarr": "cannot replay",
        "line.zarr": "not frames",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            open_recording(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
    forged.attrs["deepz"] = {**deepz, "raw_present": [[0, 10**15]]}  # would loop for ever
    assert list(open_recording(store).indices) == list(range(PRESENT[-1] + 1))
    with pytest.raises(ValueError, match=r"the frame rate of .*backwards\.tif.* got -10"):
        ReplaySource(tmp_path / "backwards.tif")  # the file's own rate, named as the file's
    # an uncompressed TIFF is mapped, not read whole: a long recording replays in bounded memory
    assert isinstance(open_recording(tmp_path / "movie.tif").frames, np.memmap)


def test_the_daemon_refuses_a_recording_it_cannot_replay_before_it_starts(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another frame shape than the config's: one config line, exit 2, no worker started."""
    from live.run import EXIT_BAD_CONFIG, run
    from tests.live_helpers import live_config

    store = _record(tmp_path / "source.ome.zarr")  # 16 x 24 frames
    data = live_config(tmp_path, tiny_model_files["onnx"]).model_dump(mode="json")
    data["source"] = {"kind": "replay", "frame_shape": [64, 64], "replay": {"path": str(store)}}
    config = validate_config(data, source="test config")
    code = run(config, duration_s=5.0, output=tmp_path / "out.ome.zarr", workers=1)
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_CONFIG
    (line,) = err.strip().splitlines()
    assert line.startswith("error: source.replay.path: source.frame_shape [64, 64] does not match")
    assert "worker" not in out and not (tmp_path / "out.ome.zarr").exists()


def test_an_unreadable_frame_costs_that_frame_not_the_replay(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path
) -> None:
    """One damaged chunk in a plain Zarr recording: that frame is counted as dropped with its
    seq and the replay goes on (it raised, and the rest of the file was neither sent nor
    counted)."""
    sock, endpoint = pull
    path = tmp_path / "movie.zarr"
    frames = zarr.create_array(str(path), shape=(10, 8, 8), chunks=(1, 8, 8), dtype="uint16")
    frames[:] = np.arange(10, dtype=np.uint16)[:, None, None]
    chunk = path / "c" / "3" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not a chunk")
    sender = FrameSender(endpoint)
    summary = ReplaySource(path, rate_hz=200.0).run(sender, threading.Event())
    sender.close()
    assert (summary.frames_sent, summary.frames_dropped, summary.dropped_seqs) == (9, 1, (3,))
    msgs = _receive(sock, 9)
    assert [m.header.seq for m in msgs] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert all(int(m.array[0, 0]) == m.header.seq for m in msgs)


def _ngff(path: Path, scale_t: float, unit: str) -> Path:
    """Write an NGFF image of 4 frames whose time axis steps `scale_t` `unit`s."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    frames = root.create_array("0", shape=(4, *SHAPE), dtype="uint16")
    frames[:] = np.stack([_pixels(i) for i in range(4)])
    axes = [{"name": "t", "type": "time", "unit": unit}, {"name": "y"}, {"name": "x"}]
    scale = {"type": "scale", "scale": [scale_t, 1.0, 1.0]}
    datasets = [{"path": "0", "coordinateTransformations": [scale]}]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return path


def _replay_config(path: Path) -> ScopeConfig:
    """A replay of `path` at the recording's own rate, else source.rate_hz = 7 Hz."""
    return validate_config(
        {
            "source": {
                "kind": "replay",
                "frame_shape": list(SHAPE),
                "rate_hz": 7.0,
                "replay": {"path": str(path)},
            }
        }
    )


@pytest.mark.parametrize(
    ("scale_t", "unit"),
    [(1e308, "minute"), (1e-320, "second"), (0.0, "second"), (-0.5, "millisecond")],
)
def test_a_time_scale_that_gives_no_rate_gives_the_source_preflight_and_recorder_one(
    tmp_path: Path, scale_t: float, unit: str
) -> None:
    """An NGFF time step so long its rate is 0, so short it is infinite, or not > 0 says no
    rate: the source, the pre-flight and the recorder (which divides by it) all take
    source.rate_hz, where the pre-flight and recorder took 0.0 and the recorder raised
    ZeroDivisionError after it had begun the store."""
    path = _ngff(tmp_path / "movie.ome.zarr", scale_t, unit)
    config = _replay_config(path)
    assert open_recording(path).rate_hz is None
    source = make_source(config)
    assert isinstance(source, ReplaySource) and source.rate_hz == 7.0
    assert replay_rate_hz(config) == 7.0
    recorder = Recorder(
        tmp_path / "out.ome.zarr",
        frame_shape=SHAPE,
        pixel_size_um=0.3,
        rate_hz=replay_rate_hz(config),
        planes_um=[0.0],
        keep_stacks=False,
    )
    assert recorder.close(timeout_s=30).raw_frames == 0


def test_a_file_rate_that_is_bad_is_refused_alike_by_the_source_and_the_preflight(
    tmp_path: Path,
) -> None:
    """An ImageJ ``finterval`` of infinity is a rate of 0: one error naming the file, from the
    source and from the pre-flight's `replay_rate_hz` (one function picks the rate for both);
    a chosen rate replaces it."""
    tiff = tmp_path / "forever.tif"
    frames = np.stack([_pixels(i) for i in range(3)])
    tifffile.imwrite(tiff, frames, imagej=True, metadata={"axes": "TYX", "finterval": np.inf})
    bad = r"^the frame rate of .*forever\.tif.* must be a positive number of Hz, got 0\.0$"
    with pytest.raises(ValueError, match=bad):
        ReplaySource(tiff, default_rate_hz=7.0)
    with pytest.raises(ValueError, match=bad):
        replay_rate_hz(_replay_config(tiff))
    assert ReplaySource(tiff, rate_hz=25.0).rate_hz == 25.0


def test_forged_present_runs_replay_each_time_point_once_in_order(
    pull: tuple[zmq.Socket[bytes], str], tmp_path: Path
) -> None:
    """``raw_present`` runs out of order, overlapping, repeated, past the array or before it
    are clipped and merged: each frame is sent once, in order, at the replay's pace (they were
    expanded as given: repeats sent in a burst, 200000 copies a list of 2M indices)."""
    sock, endpoint = pull
    store = _record(tmp_path / "run.ome.zarr")
    root = zarr.open_group(store, mode="r+")
    deepz = dict(root.attrs["deepz"])
    runs = [[6, 8], [2, 5], [2, 5], [10, 99], [3, 4], [4, 5], [6, 7], [-9, 0], [8, 6]]
    root.attrs["deepz"] = {**deepz, "raw_present": runs}
    indices = open_recording(store).indices
    assert list(indices) == PRESENT and len(indices) == len(PRESENT)
    assert (indices[0], indices[3], indices[-1]) == (2, 6, 10)
    _replay(ReplaySource(store), endpoint)
    msgs = _receive(sock, len(PRESENT))
    assert [m.header.seq for m in msgs] == PRESENT
    assert all(m.header.timestamp_s == _stamp(m.header.seq) for m in msgs)

    root.attrs["deepz"] = {**deepz, "raw_present": [[2, 5]] * 200_000}
    assert list(open_recording(store).indices) == [2, 3, 4]
    # a long recording's runs stay runs: its indices take no memory per time point
    n = 1_000_000
    zarr.open_group(store, mode="r+")[array_path(deepz, "raw")].resize((n, *SHAPE))
    root.attrs["deepz"] = {**deepz, "raw_present": [[2, 5], [6, n + 5]]}
    indices = open_recording(store).indices
    assert len(indices) == 3 + n - 6 and (indices[3], indices[-1]) == (6, n - 1)
    assert len(pickle.dumps(indices)) < 10_000


def test_per_frame_metadata_is_read_for_the_images_time_points_only(tmp_path: Path) -> None:
    """A ``frames/timestamp_s`` far longer than the image is read for its time points only
    (every chunk past them is damaged here: reading it whole fails), and a focus array that
    is not one value per frame is no focus."""
    store = _record(tmp_path / "run.ome.zarr")
    n = PRESENT[-1] + 1
    frames = zarr.open_group(store, mode="r+")["frames"]
    del frames["timestamp_s"], frames["focus_um"]
    stamps = frames.create_array("timestamp_s", shape=(50 * n,), chunks=(n,), dtype="float64")
    stamps[:] = np.concatenate([[_stamp(t) for t in range(n)], np.ones(49 * n)])
    chunks = [c for c in (store / "frames" / "timestamp_s" / "c").iterdir() if c.name != "0"]
    assert len(chunks) == 49
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk")
    frames.create_array("focus_um", shape=(n, 2), dtype="float64")[:] = 1.0
    recording = open_recording(store)
    assert [recording.stamp(t) for t in PRESENT] == [(_stamp(t), None) for t in PRESENT]
    assert recording.stamp(n) == (None, None)  # past the image, though the array goes on


def test_the_frame_shape_is_compared_before_any_pixel_is_read(tmp_path: Path) -> None:
    """Frames of another shape than source.frame_shape are refused from the array's metadata,
    before a pixel is read (all chunks are damaged here, so any read fails first): a file that
    declares frames of 100000 x 100000 asked for 20 GB before it was compared. A 2-D array is
    one frame, read when it is sent (it was read whole on opening)."""
    for name, shape in (
        ("movie.zarr", (3, 64, 64)),
        ("frame.zarr", (64, 64)),
        ("extra.zarr", (1, 3, 64, 64)),
    ):
        path = tmp_path / name
        zarr.create_array(str(path), shape=shape, chunks=shape, dtype="uint16")[...] = 1
        for chunk in (c for c in (path / "c").rglob("*") if c.is_file()):
            chunk.write_bytes(b"not a chunk")
        with pytest.raises(ReplayError, match=r"^source\.frame_shape \[16, 24\] does not match"):
            ReplaySource(path, rate_hz=10.0, frame_shape=SHAPE)
        with pytest.raises(ReplayError, match=f"cannot replay .*{name}"):  # damaged indeed
            ReplaySource(path, rate_hz=10.0, frame_shape=(64, 64))


def test_a_recording_of_other_values_or_no_pixels_is_one_line_naming_it(tmp_path: Path) -> None:
    """Strings, booleans, complex numbers, frames of no pixels: one line naming the file and
    what its frames are (it was numpy's error on ``first.min()``, without the file)."""
    cases: dict[str, tuple[object, tuple[int, ...], str]] = {
        "text.zarr": (str, (2, 4, 4), r"not camera counts.* of shape \[4, 4\]"),
        "flags.zarr": ("bool", (2, 4, 4), r"not camera counts.*bool of shape \[4, 4\]"),
        "waves.zarr": ("complex64", (2, 4, 4), r"not camera counts.*complex64 of shape"),
        "flat.zarr": ("uint16", (2, 0, 4), r"shape \[2, 0, 4\], frames of no pixels"),
        "flat-waves.zarr": ("complex64", (3, 4, 0), r"shape \[3, 4, 0\], frames of no pixels"),
    }
    for name, (dtype, shape, message) in cases.items():
        array = zarr.create_array(str(tmp_path / name), shape=shape, dtype=dtype)
        if array.size:
            array[...] = "x" if dtype is str else 1
        with pytest.raises(ReplayError, match=message) as info:
            open_recording(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
