"""live.sources: the simulated UniMMCore scope, TIFF / OME-Zarr replay, and make_source.

Every test sends through a real FrameSender to a real PULL socket and checks what arrives:
sequence numbers, order and pixels. No test asserts on wall-clock time.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq

from live.config import ConfigError, validate_config
from live.hook import FrameSender
from live.protocol import Message, decode, encode_frame
from live.sources import (
    MicroManagerSource,
    ReplaySource,
    SimulatedScope,
    Source,
    SourceFailed,
    SourceSummary,
    make_source,
    open_recording,
)

SHAPE = (24, 40)


def pattern(index: int, focus_um: float = 0.0) -> np.ndarray:
    """A frame whose first pixel is its index and whose other pixels depend on it."""
    ramp = np.arange(SHAPE[0] * SHAPE[1], dtype=np.uint32).reshape(SHAPE)
    frame = ((ramp * 7 + 1009 * index) % 65521).astype(np.uint16)
    frame[0, 0] = index
    return frame


def receive_all(
    sock: zmq.Socket[bytes], expected: int = 0, quiet_ms: int = 500, timeout_ms: int = 30_000
) -> list[Message]:
    """Everything that arrives: the first `expected` messages, each waited for up to
    `timeout_ms` (the sender's socket may still be connecting, and a loaded CI machine is
    slow), then anything more until the socket has been quiet for `quiet_ms`."""
    out = []
    while len(out) < expected:
        assert sock.poll(timeout_ms), f"only {len(out)} of {expected} messages arrived"
        out.append(decode(sock.recv_multipart(copy=False)))
    while sock.poll(quiet_ms):
        out.append(decode(sock.recv_multipart(copy=False)))
    return out


def run_source(source: Source, endpoint: str, stop: threading.Event | None = None):
    sender = FrameSender(endpoint)
    try:
        return source.run(sender, stop or threading.Event())
    finally:
        sender.close()


# ---------------------------------------------------------------------- simulated scope


def test_a_slow_simulated_camera_stops_with_every_frame_it_made_sent(pull):
    """At 0.3 Hz the camera waits 3.3 s for each frame: a stop during that wait ends it, so
    the frame comes before the core stops the camera and is drained with the rest (the
    wait held the stop for the core's 2 s limit, and its frame landed in the ring after the
    drain, never sent or counted; review 54)."""
    import time

    from live._mmcore import simulated_camera

    sock, endpoint = pull
    scope = SimulatedScope(SHAPE, rate_hz=0.3, frame_fn=pattern)
    stop = threading.Event()

    def stop_after_the_first_frame() -> None:  # so the stop lands inside the next wait
        if sock.poll(120_000):
            sock.recv_multipart()
        stop.set()

    stopper = threading.Thread(target=stop_after_the_first_frame, daemon=True)
    stopper.start()
    summary = run_source(scope, endpoint, stop)
    stopper.join(120)
    time.sleep(3.5)  # longer than a frame period: a camera thread still waiting would add one
    camera = simulated_camera(scope.core)
    assert summary.frames_sent + summary.frames_dropped == camera.frame_index >= 1
    assert scope.core.getRemainingImageCount() == 0


def test_simulated_scope_streams_paced_frames_through_the_core(pull):
    sock, endpoint = pull
    scope = SimulatedScope(SHAPE, rate_hz=400.0, frame_count=40, frame_fn=pattern)
    summary = run_source(scope, endpoint)
    msgs = receive_all(sock, 40)
    assert [m.header.seq for m in msgs] == list(range(40))
    for m in msgs:
        np.testing.assert_array_equal(m.array, pattern(m.header.seq))
    stamps = [m.header.timestamp_s for m in msgs]
    assert stamps == sorted(stamps) and len(set(stamps)) == 40  # stamped at exposure
    assert isinstance(summary, SourceSummary)
    assert (summary.name, summary.frames_sent, summary.frames_dropped) == ("simulated", 40, 0)
    assert summary.dropped_seqs == ()
    # the rate is the frames over the run's duration, which spans at least the exposures
    assert summary.achieved_rate_hz == pytest.approx(40 / summary.duration_s)
    assert summary.duration_s >= stamps[-1] - stamps[0]
    assert scope.core.getCameraDevice() == "DeepZCamera"  # a real MMCore ran it


def test_a_frame_size_that_does_not_divide_the_ring_buffer_streams_past_its_first_lap(pull):
    """500 x 501 frames at 20 Hz: a 20 MiB ring holds 41.9 of them. pymmcore-plus's Python
    camera buffer raised instead of wrapping the 42nd frame while one waited unread, and the
    camera stopped as "overflowed" (review 76; any ROI not dividing the ring)."""
    sock, endpoint = pull
    shape = (500, 501)
    frame = np.full(shape, 7, np.uint16)
    scope = SimulatedScope(shape, rate_hz=20.0, frame_count=60, frame_fn=lambda i, z: frame)
    summary = run_source(scope, endpoint)
    assert (summary.frames_sent, summary.frames_dropped) == (60, 0)
    assert [m.header.seq for m in receive_all(sock, 60)] == list(range(60))


def test_simulated_scope_stops_on_event_and_sends_what_it_acquired(pull):
    sock, endpoint = pull
    stop = threading.Event()
    scope = SimulatedScope(SHAPE, rate_hz=200.0, frame_fn=pattern)  # no frame_count: endless
    result: list[SourceSummary] = []
    thread = threading.Thread(target=lambda: result.append(run_source(scope, endpoint, stop)))
    thread.start()
    first = [decode(sock.recv_multipart(copy=False)) for _ in range(10)]
    stop.set()
    thread.join(60)
    assert not thread.is_alive()
    msgs = first + receive_all(sock, result[0].frames_sent - 10)
    assert [m.header.seq for m in msgs] == list(range(len(msgs)))
    assert result[0].frames_sent == len(msgs) >= 10 and result[0].frames_dropped == 0


# the camera's own thread (pymmcore-plus's) raising is what this test makes happen
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_camera_that_fails_mid_run_fails_the_source_after_sending_what_it_acquired(pull):
    """The camera's thread is pymmcore-plus's own, which only logs its error and stops the
    sequence: the source must not report that as a finished run (the daemon would exit 0
    and mark the store complete)."""
    sock, endpoint = pull

    def failing(index: int, focus_um: float = 0.0) -> np.ndarray:
        if index == 5:
            raise RuntimeError("camera fell over")
        return pattern(index, focus_um)

    scope = SimulatedScope(SHAPE, rate_hz=200.0, frame_fn=failing)  # endless: never stopped
    with pytest.raises(
        SourceFailed, match="stopped by itself after 5 frames: the camera failed"
    ) as err:
        run_source(scope, endpoint)
    assert [m.header.seq for m in receive_all(sock, 5)] == [0, 1, 2, 3, 4]
    # what it did up to then goes with the failure into the run's summary (review 81: lost)
    assert err.value.summary.frames_sent == 5 and err.value.summary.frames_dropped == 0


def test_a_camera_that_stops_delivering_is_said_and_so_is_its_return(
    pull, caplog: pytest.LogCaptureFixture
) -> None:
    """Review 81: a camera whose sequence still runs but sends nothing (a lost trigger, a
    cable) showed only as 0 Hz. It is said once when it stalls and once when frames come
    back; the run goes on (an externally triggered camera may be waiting for triggers)."""
    sock, endpoint = pull
    wedged = threading.Event()

    def stalling(index: int, focus_um: float = 0.0) -> np.ndarray:
        if index == 3:
            wedged.wait(60.0)  # no frame, no error: the camera just stops delivering
        return pattern(index, focus_um)

    def said(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    stop = threading.Event()
    scope = SimulatedScope(SHAPE, rate_hz=50.0, frame_fn=stalling)
    thread = threading.Thread(target=run_source, args=(scope, endpoint, stop))
    with caplog.at_level("WARNING", logger="live.sources"):
        thread.start()
        try:
            for text in ("has sent no frame for 2.0 s (50 Hz asked)", None, "sends frames again"):
                if text is None:
                    wedged.set()
                    continue
                for _ in range(600):  # up to a minute on a loaded machine
                    if said(text):
                        break
                    stop.wait(0.1)
                assert said(text), [r.getMessage() for r in caplog.records]
        finally:
            wedged.set()
            stop.set()
            thread.join(30)
    assert not thread.is_alive()
    assert len(receive_all(sock, 4)) >= 4  # the frames before and after the stall


def test_simulated_scope_renders_the_worm(pull):
    sock, endpoint = pull
    cfg = validate_config({"source": {"frame_shape": [64, 64], "rate_hz": 50.0, "frame_count": 6}})
    scope = make_source(cfg)
    assert isinstance(scope, SimulatedScope)
    summary = run_source(scope, endpoint)
    msgs = receive_all(sock, 6)
    assert [m.header.seq for m in msgs] == list(range(6)) and summary.frames_sent == 6
    frames = np.stack([m.array for m in msgs])
    assert frames.dtype == np.uint16 and frames.shape == (6, 64, 64)
    assert frames.std() > 0 and frames.max() > frames.min() + 10  # a lit sample over a dark level


def test_simulated_scope_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"source.rate_hz must be a positive number"):
        SimulatedScope(SHAPE, rate_hz=0.0)
    with pytest.raises(ValueError, match=r"source.frame_shape must be \[height, width\]"):
        SimulatedScope((0, 8), rate_hz=10.0)


# ---------------------------------------------------------------------------- replay


def frames_of(n: int) -> np.ndarray:
    return np.stack([pattern(i) for i in range(n)])


def test_replay_tiff_in_order_with_pixels_and_original_rate(pull, tmp_path):
    sock, endpoint = pull
    data = frames_of(12)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, data, imagej=True, metadata={"axes": "TYX", "finterval": 0.004})
    source = ReplaySource(path)
    assert source.rate_hz == pytest.approx(250.0)  # from ImageJ's frame interval
    summary = run_source(source, endpoint)
    msgs = receive_all(sock, 12)
    assert [m.header.seq for m in msgs] == list(range(12))
    for m in msgs:
        np.testing.assert_array_equal(m.array, data[m.header.seq])
    assert (summary.name, summary.frames_sent, summary.frames_dropped) == ("replay", 12, 0)


def test_replay_tiff_at_chosen_rate_looped_to_a_frame_count(pull, tmp_path):
    sock, endpoint = pull
    data = frames_of(5)
    path = tmp_path / "plain.tiff"
    tifffile.imwrite(path, data, photometric="minisblack")
    source = ReplaySource(path, rate_hz=500.0, loop=True, frame_count=13)
    run_source(source, endpoint)
    msgs = receive_all(sock, 13)
    assert [m.header.seq for m in msgs] == list(range(13))
    for m in msgs:
        np.testing.assert_array_equal(m.array, data[m.header.seq % 5])


def test_replay_ngff_image_written_by_ome_zarr(pull, tmp_path):
    ome_zarr_writer = pytest.importorskip("ome_zarr.writer", reason="ome-zarr-py (dev extra)")
    import zarr

    sock, endpoint = pull
    data = frames_of(9)
    path = tmp_path / "ngff.zarr"
    root = zarr.open_group(str(path), mode="w")
    ome_zarr_writer.write_image(
        data,
        root,
        axes="tyx",
        scale_factors=[],
        scale={"t": 2.5, "y": 0.3, "x": 0.3},
        axes_units={"t": "millisecond", "y": "micrometer", "x": "micrometer"},
    )
    recording = open_recording(path)
    assert recording.rate_hz == pytest.approx(400.0)  # 2.5 ms per time point
    run_source(ReplaySource(path), endpoint)
    msgs = receive_all(sock, 9)
    assert [m.header.seq for m in msgs] == list(range(9))
    for m in msgs:
        np.testing.assert_array_equal(m.array, data[m.header.seq])


def test_replay_our_recording_keeps_seqs_and_gaps(pull, tmp_path):
    from live.recorder import Recorder

    sock, endpoint = pull
    path = tmp_path / "run.ome.zarr"
    recorder = Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=0.3,
        rate_hz=200.0,
        planes_um=[0.0],
        keep_stacks=False,
    )
    present = [0, 1, 2, 4, 5, 7]  # seqs 3 and 6 were lost upstream
    for seq in present:
        recorder.put_frame(decode(encode_frame(pattern(seq), seq=seq, timestamp_s=1.0 * seq)))
    recorder.close()
    source = ReplaySource(path)
    assert source.rate_hz == pytest.approx(200.0)
    summary = run_source(source, endpoint)
    msgs = receive_all(sock, len(present))
    assert [m.header.seq for m in msgs] == present
    for m in msgs:
        np.testing.assert_array_equal(m.array, pattern(m.header.seq))
    assert summary.frames_sent == len(present)


def test_replay_of_int64_counts_sends_them_as_uint16(pull, tmp_path):
    """numpy's default integers are not on the wire: a recording of int64 counts passed the
    open check and then had every frame dropped (review 81). They go as exact uint16."""
    import zarr

    sock, endpoint = pull
    data = frames_of(4)
    path = tmp_path / "int64.zarr"
    zarr.create_array(str(path), shape=data.shape, dtype="int64")[...] = data.astype(np.int64)
    summary = run_source(ReplaySource(path, rate_hz=500.0), endpoint)
    msgs = receive_all(sock, 4)
    assert (summary.frames_sent, summary.frames_dropped) == (4, 0)
    for m in msgs:
        assert m.array.dtype == np.uint16
        np.testing.assert_array_equal(m.array, data[m.header.seq])


def test_replay_plain_zarr_arrays_of_one_frame_or_with_axes_of_size_one(pull, tmp_path):
    """A plain 2-D array is one frame and a (1, T, H, W) one is T frames: the time points
    come from the frames, not the array's first axis (a 2-D array sent 1 frame and counted
    its other rows as lost; a (1, 5, H, W) one sent 1 frame of 5)."""
    import zarr

    sock, endpoint = pull
    frame = tmp_path / "frame.zarr"
    zarr.create_array(str(frame), shape=SHAPE, dtype="uint16")[...] = pattern(3)
    summary = run_source(ReplaySource(frame, rate_hz=500.0), endpoint)
    (msg,) = receive_all(sock, 1)
    assert (summary.frames_sent, summary.frames_dropped, summary.dropped_seqs) == (1, 0, ())
    assert msg.header.seq == 0
    np.testing.assert_array_equal(msg.array, pattern(3))

    data = frames_of(5)
    extra = tmp_path / "extra.zarr"
    zarr.create_array(str(extra), shape=(1, *data.shape), dtype="uint16")[...] = data[None]
    assert open_recording(extra).frames.shape == data.shape
    summary = run_source(ReplaySource(extra, rate_hz=500.0), endpoint)
    msgs = receive_all(sock, 5)
    assert (summary.frames_sent, summary.frames_dropped) == (5, 0)
    assert [m.header.seq for m in msgs] == list(range(5))
    for m in msgs:
        np.testing.assert_array_equal(m.array, data[m.header.seq])


def test_replay_stops_on_event(pull, tmp_path):
    sock, endpoint = pull
    path = tmp_path / "long.tif"
    tifffile.imwrite(path, frames_of(3), photometric="minisblack")
    stop = threading.Event()
    stop.set()
    summary = run_source(ReplaySource(path, rate_hz=1.0, loop=True), endpoint, stop)
    assert summary.frames_sent == 0 and receive_all(sock, quiet_ms=100) == []


def test_replay_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_recording(tmp_path / "nope.tif")
    (tmp_path / "movie.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"expected a \.tif/\.tiff file or a Zarr"):
        open_recording(tmp_path / "movie.png")
    multi = tmp_path / "multi.tif"
    tifffile.imwrite(multi, np.zeros((3, 2, 8, 8), np.uint16), imagej=True)
    with pytest.raises(ValueError, match=r"shape \[3, 2, 8, 8\].*needs frames \(t, y, x\)"):
        open_recording(multi)
    import zarr
    from ome_zarr import writer as ome_zarr_writer

    channels = tmp_path / "tcyx.ome.zarr"  # review 81: replayed as 3 time points, silently
    root = zarr.open_group(str(channels), mode="w")
    ome_zarr_writer.write_image(np.ones((1, 3, 8, 8), np.uint16), root, axes="tcyx")
    with pytest.raises(ValueError, match=r"vary along axis C \(axes TCYX.*not a z-stack or"):
        open_recording(channels)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match=r"axes YXS.*last two axes to be y, x"):
        open_recording(rgb)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((3, 8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(ValueError, match="does not say its frame rate"):
        ReplaySource(plain)
    with pytest.raises(ValueError, match=r"frame_shape \[16, 16\] does not match.*\[8, 8\]"):
        ReplaySource(plain, rate_hz=10.0, frame_shape=(16, 16))


# ------------------------------------------------------------------ config, Micro-Manager


def test_make_source_from_config(tmp_path):
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, frames_of(4), photometric="minisblack")
    replay = make_source(
        validate_config(
            {
                "source": {
                    "kind": "replay",
                    "frame_shape": list(SHAPE),
                    "rate_hz": 20.0,
                    "replay": {"path": str(path), "loop": True},
                }
            }
        )
    )
    assert isinstance(replay, ReplaySource) and replay.rate_hz == 20.0 and replay.loop
    mm = make_source(validate_config({"source": {"kind": "micromanager"}}))
    assert isinstance(mm, MicroManagerSource) and mm.config_file is None
    assert mm.acquisition == "core"  # no config_file: Micro-Manager's demo configuration
    hook = {"kind": "micromanager", "frame_shape": [8, 8], "pixel_size_um": 0.3}
    hook["micromanager"] = {"acquisition": "hook"}
    listener = make_source(validate_config({"source": hook}))
    assert isinstance(listener, MicroManagerSource) and listener.acquisition == "hook"
    with pytest.raises(ConfigError, match=r"source\.simulator\.sample = 'beads'.*'worm'"):
        validate_config({"source": {"simulator": {"sample": "beads"}}})  # refused at load


def test_micromanager_source_listens_until_stopped(pull):
    _sock, endpoint = pull
    stop = threading.Event()
    source = MicroManagerSource(endpoint, acquisition="hook")
    threading.Timer(0.05, stop.set).start()
    summary = run_source(source, endpoint, stop)
    assert stop.is_set()  # it returned because it was stopped, not on its own
    assert (summary.name, summary.frames_sent, summary.frames_dropped) == ("micromanager", 0, 0)
    assert summary.external  # the hook's frames are not this source's: acquired is not 0


def test_importing_sources_and_hook_stays_light():
    code = (
        "import sys, live.sources, live.hook; "
        "heavy = [m for m in ('pymmcore_plus', 'pycromanager', 'torch', 'engine.optics') "
        "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_simulated_scope_without_the_sim_extra_names_the_extra():
    code = (
        "import sys; sys.modules['psfmodels'] = None; "
        "from live.config import ConfigError, validate_config; "
        "from live.sources import make_source\n"
        "try:\n    make_source(validate_config({}))\n"
        "except ConfigError as err:\n    print(err)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == (
        "source.kind = 'simulated' needs psfmodels, not installed here: "
        "pip install 'deepz-live[sim]'"
    )


def test_the_daemon_refuses_a_missing_sim_extra_before_it_makes_the_store(tmp_path):
    """Review 81: the simulated scope was made after the pre-flight, the store and the
    workers, so the refusal left an empty store that made a retry with --output refused."""
    store = tmp_path / "run.ome.zarr"
    code = (
        "import sys; sys.modules['psfmodels'] = None\n"
        "from pathlib import Path\n"
        "from live.config import ConfigError\n"
        "from live.run import Daemon\n"
        "from tests.live_helpers import live_config\n"
        f"config = live_config(Path({str(tmp_path)!r}), Path('engine/weights/deepz-slim.onnx'))\n"
        f"daemon = Daemon(config, output={str(store)!r})\n"
        "try:\n    daemon.check()\nexcept ConfigError as err:\n    print(err)\n"
        "finally:\n    daemon.stop()"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith(
        "needs psfmodels, not installed here: pip install 'deepz-live[sim]'"
    ), result.stdout
    assert not store.exists()


def _config_file_camera_class():
    """A no-argument Python camera that a Micro-Manager config file can load (made lazily)."""
    from live._mmcore import SimulatedCamera

    class _Camera(SimulatedCamera):
        def __init__(self) -> None:
            super().__init__(pattern, SHAPE)

    return _Camera


def _plain_camera_class():
    """A Python camera that tags nothing of its own, as any C++ device adapter (made lazily)."""
    from pymmcore_plus.experimental.unicore import SimpleCameraDevice

    class _Plain(SimpleCameraDevice):
        def __init__(self) -> None:
            super().__init__()
            self._exposure, self.index = 10.0, 0

        def get_exposure(self) -> float:
            return self._exposure

        def set_exposure(self, value: float) -> None:
            self._exposure = float(value)

        def sensor_shape(self) -> tuple[int, int]:
            return SHAPE

        def dtype(self) -> type[np.uint16]:
            return np.uint16

        def snap(self, buffer: np.ndarray) -> dict[str, str]:
            buffer[...] = pattern(self.index)
            self.index += 1
            return {}

    return _Plain


def __getattr__(name: str):  # the config files name tests.test_sources.<Camera>
    if name == "PatternCamera":
        return _config_file_camera_class()
    if name == "PlainCamera":
        return _plain_camera_class()
    raise AttributeError(name)


def test_the_core_source_takes_a_camera_that_tags_nothing(pull, tmp_path):
    """Any camera but the simulated one writes no DeepZ tags, and pymmcore-plus's Metadata
    raises KeyError from get() for a missing tag: the first frame failed the run. Frames
    are numbered by the core's ImageNumber (or the sender's count) and timed by the core."""
    pytest.importorskip("pymmcore_plus", reason="the Micro-Manager source needs the mm extra")
    sock, endpoint = pull
    cfg = tmp_path / "scope.cfg"
    cfg.write_text("#py pyDevice,Cam,tests.test_sources,PlainCamera\nProperty,Core,Initialize,1\n")
    source = MicroManagerSource(endpoint, config_file=cfg, camera="Cam", frame_count=15)
    summary = run_source(source, endpoint)
    msgs = receive_all(sock, 15)
    assert [m.header.seq for m in msgs] == list(range(15))
    for m in msgs:
        np.testing.assert_array_equal(m.array, pattern(m.header.seq))
        assert m.header.focus_um is None  # the camera did not say
    assert (summary.frames_sent, summary.frames_dropped) == (15, 0)


def test_micromanager_source_runs_a_config_file(pull, tmp_path):
    pytest.importorskip("pymmcore_plus", reason="the Micro-Manager source needs the mm extra")
    sock, endpoint = pull
    cfg = tmp_path / "scope.cfg"
    cfg.write_text(
        "#py pyDevice,Cam,tests.test_sources,PatternCamera\nProperty,Core,Initialize,1\n"
    )
    source = MicroManagerSource(endpoint, config_file=cfg, camera="Cam", frame_count=15)
    summary = run_source(source, endpoint)
    msgs = receive_all(sock, 15)
    assert [m.header.seq for m in msgs] == list(range(15))
    for m in msgs:
        np.testing.assert_array_equal(m.array, pattern(m.header.seq))
    assert (summary.name, summary.frames_sent) == ("micromanager", 15)
    with pytest.raises(FileNotFoundError, match=r"config_file .* does not exist"):
        MicroManagerSource(endpoint, config_file=tmp_path / "missing.cfg")


def test_a_hook_listeners_run_counts_the_frames_that_arrived_as_acquired():
    """In hook mode the daemon's source sends nothing itself: the summary's "frames acquired"
    is what arrived from the hook, not the listener's 0 (and a source that sent counts its own)."""
    from dataclasses import asdict

    from live.run import _frames_acquired

    listened = SourceSummary("micromanager", 0, 0, (), 10.0, 0.0, external=True)
    assert _frames_acquired(asdict(listened), 500) == 500
    sent = SourceSummary("simulated", 30, 2, (7, 9), 1.0, 32.0)
    assert _frames_acquired(asdict(sent), 25) == 32
