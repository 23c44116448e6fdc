"""live.hook: FrameSender over real ZeroMQ, and the hooks inside real Micro-Manager acquisitions.

The acquisitions run on a real MMCore (pymmcore-plus `UniMMCore`) with the simulated Python
camera from `live._mmcore`: a real pycromanager `Acquisition` (Python backend, through the
snake_case bridge) and a real pymmcore-plus MDA. Micro-Manager's Java application cannot be
installed here, so its backend is not exercised.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from live.hook import (
    FrameSender,
    attach_to_pymmcore_plus,
    frame_number,
    pycromanager_image_process_fn,
)
from live.protocol import Message, decode
from tests.live_helpers import free_port

pytest.importorskip("pymmcore_plus", reason="the Micro-Manager hooks need the mm extra")

SHAPE = (32, 48)


def pattern(index: int, focus_um: float = 0.0) -> np.ndarray:
    """A frame that encodes its index in every pixel (and differs pixel to pixel)."""
    ramp = np.arange(SHAPE[0] * SHAPE[1], dtype=np.uint32).reshape(SHAPE)
    frame = ((ramp + 1009 * index) % 65521).astype(np.uint16)
    frame[0, 0] = index
    return frame


def receive(sock: zmq.Socket[bytes], n: int, timeout_ms: int = 30_000) -> list[Message]:
    """Receive `n` messages, each waited for up to `timeout_ms` (generous: CI can be slow)."""
    out = []
    for _ in range(n):
        assert sock.poll(timeout_ms), f"only {len(out)} of {n} messages arrived"
        out.append(decode(sock.recv_multipart(copy=False)))
    return out


@pytest.fixture
def core():
    from live._mmcore import make_simulated_core

    mmc = make_simulated_core(pattern, SHAPE, rate_hz=None, pixel_size_um=0.3)
    yield mmc
    mmc.unloadAllDevices()


# ------------------------------------------------------------------------ FrameSender


def test_sender_round_trip_seqs_pixels_and_fields(pull):
    sock, endpoint = pull
    with FrameSender(endpoint) as sender:
        for i in range(20):
            assert sender.send(pattern(i), timestamp_s=100.0 + i, focus_um=0.5 * i)
        assert sender.send(pattern(99), seq=99)
    msgs = receive(sock, 21)
    assert [m.header.seq for m in msgs] == [*range(20), 99]
    for i, m in enumerate(msgs[:20]):
        np.testing.assert_array_equal(m.array, pattern(i))
        assert m.header.timestamp_s == 100.0 + i
        assert m.header.focus_um == 0.5 * i
        assert m.header.kind == "frame" and m.header.dtype == "uint16"
    assert abs(msgs[20].header.timestamp_s - time.time()) < 60  # defaulted to the clock
    assert (sender.sent, sender.dropped, sender.dropped_seqs) == (21, 0, [])


def test_sender_never_blocks_without_receiver_and_counts_every_frame():
    sender = FrameSender(f"tcp://127.0.0.1:{free_port()}", hwm=4, linger_ms=0)
    results = [sender.send(pattern(i)) for i in range(200)]
    sender.close()
    assert sender.sent + sender.dropped == 200
    assert sender.dropped >= 190  # at most the HWM (+ in-flight) left the process queue
    assert sender.dropped_seqs == [i for i, ok in enumerate(results) if not ok]
    assert sender.dropped_seqs == list(range(200 - sender.dropped, 200))


def test_sender_refuses_bad_frames_without_raising(pull):
    sock, endpoint = pull
    with FrameSender(endpoint) as sender:
        assert not sender.send(np.zeros((2, 3, 4), np.uint16), seq=7)  # a stack is not a frame
        assert not sender.send(np.zeros((4, 4), np.complex64), seq=8)  # dtype not allowed
        assert sender.send(pattern(9), seq=9)
    assert (sender.sent, sender.dropped, sender.dropped_seqs) == (1, 2, [7, 8])
    assert receive(sock, 1)[0].header.seq == 9


def test_sender_rejects_bad_hwm():
    with pytest.raises(ValueError, match="hwm must be >= 1"):
        FrameSender("tcp://127.0.0.1:5999", hwm=0)


# --------------------------------------------------------------------- pycromanager


def run_pycromanager(core, hook, events) -> object:
    from pycromanager import Acquisition

    from live._mmcore import pycromanager_backend

    with pycromanager_backend(core), Acquisition(image_process_fn=hook) as acq:
        acq.acquire(events)
    return acq


def test_pycromanager_acquisition_pushes_every_frame_and_keeps_it(core, pull):
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)
    n = 60
    acq = run_pycromanager(core, hook, multi_d_acquisition_events(num_time_points=n))
    hook.sender.close()
    msgs = receive(sock, n)
    assert [m.header.seq for m in msgs] == list(range(n))
    first = int(msgs[0].array[0, 0])
    for i, m in enumerate(msgs):
        np.testing.assert_array_equal(m.array, pattern(first + i))
    stamps = [m.header.timestamp_s for m in msgs]
    assert stamps == sorted(stamps) and abs(stamps[-1] - time.time()) < 60
    assert (hook.sender.sent, hook.sender.dropped) == (n, 0)
    # the hook returned (image, metadata): Micro-Manager's own dataset still has every frame
    dataset = acq.get_dataset()
    for i in (0, n // 2, n - 1):
        np.testing.assert_array_equal(dataset.read_image(time=i), msgs[i].array)


def test_pycromanager_time_series_carries_focus(core, pull):
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    core.setPosition(2.5)
    hook = pycromanager_image_process_fn(endpoint)
    run_pycromanager(core, hook, multi_d_acquisition_events(num_time_points=3))
    hook.sender.close()
    msgs = receive(sock, 3)
    assert [m.header.focus_um for m in msgs] == [2.5] * 3
    assert (hook.sender.refused, hook.sender.refusal) == (0, None)


def test_pycromanager_z_stack_is_refused_and_still_saved(core, pull, caplog):
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)
    events = multi_d_acquisition_events(num_time_points=2, z_start=-1.0, z_end=1.0, z_step=1.0)
    acq = run_pycromanager(core, hook, events)
    hook.sender.close()
    # the first frame (t 0, z 0) went out before the second z showed the stack: nothing after
    msgs = receive(sock, 1)
    assert sock.poll(200) == 0
    assert msgs[0].header.focus_um == -1.0
    assert (hook.sender.sent, hook.sender.refused, hook.sender.dropped) == (1, 5, 0)
    assert hook.sender.refusal is not None
    assert "refusing a multi-dimensional acquisition (z 0, then 1)" in hook.sender.refusal
    refusals = [r for r in caplog.records if "multi-dimensional" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "ERROR"  # logged once
    assert acq.get_dataset().read_image(time=1, z=2) is not None  # Micro-Manager kept it all


def test_the_hook_reads_micro_managers_metadata_as_untrusted_text(pull):
    """Metadata a device adapter wrote: "NaN" is no value (the next key, or the clock, serves),
    a frame number may be text of a whole number, and one that is not refuses that frame
    (counted) without a traceback or a lost acquisition."""
    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint, seq_key="ImageNumber")
    frames = [
        {
            "ImageNumber": "0",
            "ElapsedTime-ms": "NaN",
            "ZPosition_um": "nan",
            "ZPosition_um_Intended": "5.0",
        },
        {"ImageNumber": "1.0", "ElapsedTime-ms": "1000"},
        {"ImageNumber": "x12", "ElapsedTime-ms": "2000"},
        {"ImageNumber": "2", "ElapsedTime-ms": "3000"},
    ]
    for i, metadata in enumerate(frames):
        image, meta = hook(pattern(i), dict(metadata))
        assert meta == metadata and image is not None  # Micro-Manager still stores it
    hook.sender.close()
    msgs = receive(sock, 3)
    assert [m.header.seq for m in msgs] == [0, 1, 2]
    assert msgs[0].header.focus_um == 5.0  # the NaN reading did not win over the intended one
    # no Z position at all: no focus, not 0 µm (a focus lock would read 0 as a stage move)
    assert msgs[1].header.focus_um is None and msgs[2].header.focus_um is None
    assert all(np.isfinite(m.header.timestamp_s) for m in msgs)
    # the clock offset came from the first finite elapsed time, not from the NaN one
    assert msgs[2].header.timestamp_s - msgs[1].header.timestamp_s == pytest.approx(2.0)
    assert (hook.sender.sent, hook.sender.refused, hook.sender.dropped) == (3, 1, 0)
    assert frame_number("9007199254740993") == 9007199254740993  # exact past 2**53
    assert frame_number("-1") is None and frame_number(True) is None
    # digits str.isdigit() takes and int() does not: no value, not an exception
    assert frame_number("²") is None and frame_number("++5") is None
    assert frame_number("+5") == 5 and frame_number(" 7 ") == 7
    assert frame_number("٣") is None and frame_number("５") is None  # float() takes these


def test_frame_time_is_the_cameras_or_the_cores_per_frame_time():
    """Not ElapsedTime-ms first: pycromanager writes one per event, so a hardware-sequenced
    series would carry one time for all its frames."""
    from datetime import datetime

    from live.hook import frame_time_s

    received = "2026-12-05 21:44:23.260571"
    local = datetime(2026, 12, 5, 21, 44, 23, 260571).timestamp()
    assert frame_time_s({"TimeReceivedByCore": received, "ElapsedTime-ms": "0"}) == local
    assert frame_time_s({"DeepZ-Timestamp-s": "12.5", "TimeReceivedByCore": received}) == 12.5
    assert frame_time_s({"TimeReceivedByCore": "yesterday"}) is None
    assert frame_time_s({"ElapsedTime-ms": "10"}) is None


def test_the_hour_the_clocks_go_back_reads_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """MMCore's TimeReceivedByCore is local time without a zone: in the hour that repeats
    when summer time ends, a frame 0.1 s after 02:59:59.9 (its second pass) read an hour
    early (review 76). The reading nearest the time the hook sees the frame is taken."""
    from live.hook import frame_time_s

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        before = frame_time_s({"TimeReceivedByCore": "2026-10-25 02:59:59.900000"}, now=0.0)
        assert before is not None  # the first pass: now=0 picks the earlier reading
        second = before + 0.1  # 02:00:00.0 again: the clocks went back at 03:00 summer time
        after = frame_time_s({"TimeReceivedByCore": "2026-10-25 02:00:00.000000"}, now=second)
        assert after is not None and abs(after - second) < 1e-3
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_pycromanager_sequenced_frames_keep_their_own_times(core, pull):
    """A real camera writes no DeepZ tag: each frame's time is the core's, not the event's."""
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)

    def real_camera(image: np.ndarray, metadata: dict) -> tuple:
        metadata = {k: v for k, v in metadata.items() if k != "DeepZ-Timestamp-s"}
        return hook(image, metadata)

    run_pycromanager(core, real_camera, multi_d_acquisition_events(num_time_points=4))
    hook.sender.close()
    stamps = [m.header.timestamp_s for m in receive(sock, 4)]
    assert stamps == sorted(set(stamps))  # one time each, in order


def test_a_second_pycromanager_acquisition_continues_the_numbering(core, pull):
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    first = pycromanager_image_process_fn(endpoint)
    run_pycromanager(core, first, multi_d_acquisition_events(num_time_points=3))
    first.sender.close()
    second = pycromanager_image_process_fn(endpoint, first_seq=first.sender.next_seq)
    run_pycromanager(core, second, multi_d_acquisition_events(num_time_points=2))
    second.sender.close()
    # two connections, fair-queued at the receiver: no seq twice (the daemon would refuse it)
    assert sorted(m.header.seq for m in receive(sock, 5)) == [0, 1, 2, 3, 4]


def test_a_reused_pycromanager_hook_numbers_its_second_acquisition_on(core, pull):
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)
    run_pycromanager(core, hook, multi_d_acquisition_events(num_time_points=3))
    run_pycromanager(core, hook, multi_d_acquisition_events(num_time_points=2))
    hook.sender.close()
    assert [m.header.seq for m in receive(sock, 5)] == [0, 1, 2, 3, 4]


def test_a_hook_that_refused_an_acquisition_sends_the_next_one(core, pull):
    """One hook, one refused z-stack, then a plain time series: the series is sent, numbered
    on after the frame sent before the refusal (the refusal held for every later acquisition
    of that hook, as pycromanager says nothing when one begins)."""
    from pycromanager import multi_d_acquisition_events

    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)
    events = multi_d_acquisition_events(num_time_points=2, z_start=-1.0, z_end=1.0, z_step=1.0)
    run_pycromanager(core, hook, events)
    run_pycromanager(core, hook, multi_d_acquisition_events(num_time_points=4))
    hook.sender.close()
    assert [m.header.seq for m in receive(sock, 5)] == [0, 1, 2, 3, 4]
    assert (hook.sender.sent, hook.sender.refused) == (5, 5)


def test_a_hook_numbers_frames_with_a_time_axis_on_after_frames_without_one(pull):
    """Frames without a time axis are numbered by the hook's count; frames with one that come
    after them are numbered on from there, not from the start again (duplicates the daemon
    refuses)."""
    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)
    frame = np.zeros((8, 8), np.uint16)
    for _ in range(3):
        hook(frame, {})
    for t in range(3):
        hook(frame, {"Axes": {"time": t}})
    hook.sender.close()
    assert [m.header.seq for m in receive(sock, 6)] == [0, 1, 2, 3, 4, 5]


def test_a_sender_refuses_an_address_only_a_daemon_can_bind():
    for endpoint in ("tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://[::]:5555"):
        with pytest.raises(ValueError, match="an address the daemon binds"):
            FrameSender(endpoint)


def test_axis_guard_takes_time_series_of_one_channel_only():
    from live.hook import AxisGuard

    guard = AxisGuard()
    for t in range(3):
        assert guard.check({"time": t, "channel": "GFP", "z": 0}) is None
    refusal = guard.check({"time": 3, "channel": "RFP", "z": 0})
    assert refusal is not None and "channel 'GFP', then 'RFP'" in refusal
    assert guard.check({"time": 4, "channel": "GFP", "z": 0}) == refusal  # for good
    assert guard.expect({"t": 100, "c": 1, "p": 1}) is None  # a new, plain time series
    assert guard.check({"t": 0, "c": 0}) is None
    refusal = guard.expect({"t": 10, "c": 2, "z": 5})
    assert refusal is not None and "(c: 2, z: 5)" in refusal


def test_pycromanager_hook_never_blocks_acquisition(core, caplog):
    """No daemon listening: the hook says so once, drops and counts every frame (none pile up
    in the acquisition's memory), and the acquisition runs to its end."""
    from pycromanager import multi_d_acquisition_events

    hook = pycromanager_image_process_fn(f"tcp://127.0.0.1:{free_port()}", hwm=2)
    assert any("no daemon answered" in r.getMessage() for r in caplog.records)
    n = 80
    acq = run_pycromanager(core, hook, multi_d_acquisition_events(num_time_points=n))
    hook.sender.close()
    assert (hook.sender.sent, hook.sender.dropped) == (0, n)
    assert len([r for r in caplog.records if "are being dropped" in r.getMessage()]) == 1
    assert len(hook.sender.dropped_seqs) == hook.sender.dropped
    last = acq.get_dataset().read_image(time=n - 1)  # the acquisition ran to its last frame
    assert last.shape == (core.getImageHeight(), core.getImageWidth())


def test_pycromanager_backend_is_one_at_a_time(core):
    from live._mmcore import pycromanager_backend

    with pycromanager_backend(core) as snake:
        assert snake.get_camera_device() == core.getCameraDevice()
        assert snake.get_xy_stage_device() == ""  # getXYStageDevice: mmpycorex's renaming
        with pytest.raises(RuntimeError, match="already active"), pycromanager_backend(core):
            pass
    with pycromanager_backend(core):  # released: a new block may start
        pass


def test_snake_case_core_names_the_missing_method(core):
    from live._mmcore import SnakeCaseCore

    snake = SnakeCaseCore(core)
    assert snake.get_image_width() == SHAPE[1]
    assert snake.getImageHeight() == SHAPE[0]  # camelCase passes through
    with pytest.raises(AttributeError, match="no_such_method"):
        snake.no_such_method()


# ---------------------------------------------------------------------- pymmcore-plus


def test_pymmcore_plus_time_series_carries_the_stage_focus_and_its_gaps(pull):
    """A plain time series has no z in its plan: the focus is the stage's, recorded with each
    frame (a focus lock needs it). A time point the camera failed to snap is a seq gap."""
    from useq import MDASequence

    from live._mmcore import make_simulated_core

    calls = [0]

    def flaky(index: int, focus_um: float = 0.0) -> np.ndarray:
        calls[0] += 1
        if calls[0] == 3:  # a real camera's failed snap
            raise RuntimeError("camera timeout")
        return pattern(index, focus_um)

    core = make_simulated_core(flaky, SHAPE, rate_hz=None)
    try:
        sock, endpoint = pull
        core.setPosition(2.5)
        sender = attach_to_pymmcore_plus(core, endpoint)
        core.mda.run(MDASequence(time_plan={"interval": 0.01, "loops": 5}))
        sender.close()
        msgs = receive(sock, 4)
        assert [m.header.seq for m in msgs] == [0, 1, 3, 4]  # t 2 was lost: a gap
        assert [m.header.focus_um for m in msgs] == [2.5] * 4
    finally:
        core.unloadAllDevices()


def test_pymmcore_plus_mda_frame_ready(core, pull, caplog):
    from useq import MDASequence

    sock, endpoint = pull
    sender = attach_to_pymmcore_plus(core, endpoint)
    n = 50
    core.mda.run(MDASequence(time_plan={"interval": 0, "loops": n}))
    core.mda.run(MDASequence(z_plan={"range": 2.0, "step": 1.0}))  # refused: a z stack
    core.mda.run(
        MDASequence(
            time_plan={"interval": 0, "loops": 2}, z_plan={"above": 0, "below": 0, "step": 1}
        )
    )
    sender.close()
    core.mda.run(MDASequence(time_plan={"interval": 0, "loops": 3}))  # disconnected: not sent
    msgs = receive(sock, n + 2)
    assert sock.poll(200) == 0
    assert [m.header.seq for m in msgs] == list(range(n + 2))
    first = int(msgs[0].array[0, 0])
    for i, m in enumerate(msgs[:n]):
        np.testing.assert_array_equal(m.array, pattern(first + i))
    assert [m.header.focus_um for m in msgs[n:]] == [0.0, 0.0]  # one z plane is a time series
    assert (sender.sent, sender.dropped, sender.refused) == (n + 2, 0, 3)
    assert sender.refusal is not None and "(z: 3)" in sender.refusal
    assert len([r for r in caplog.records if "multi-dimensional" in r.getMessage()]) == 1


def test_one_hook_serves_time_series_in_other_channels_each_on_its_own_clock(pull):
    """A reused hook (review 76): a time series in another channel is the next acquisition,
    not a second channel of the first (refused); each acquisition's ElapsedTime-ms counts
    from its own start, so its frames are anchored afresh, not on the first one's clock; and
    frames without a time axis after a lost time point are numbered on after the last sent,
    not by the hook's own count (a duplicate seq the daemon refuses)."""
    sock, endpoint = pull
    hook = pycromanager_image_process_fn(endpoint)
    frame = np.zeros((8, 8), np.uint16)
    for channel in ("GFP", "RFP"):
        for t in range(3):
            meta = {"Axes": {"time": t, "channel": channel}, "ElapsedTime-ms": 100.0 * t}
            hook(frame, meta)
        time.sleep(0.5)
    hook(frame, {"Axes": {"time": 0}})
    hook(frame, {"Axes": {"time": 2}})  # time point 1 lost: a gap
    hook(frame, {})
    hook(frame, {})
    hook.sender.close()
    msgs = receive(sock, 10)
    assert [m.header.seq for m in msgs] == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert hook.sender.refused == 0
    stamps = [m.header.timestamp_s for m in msgs[:6]]
    # the second acquisition's time 0 is anchored when it came, 0.5 s on (it was time 0's)
    assert stamps[3] - stamps[0] >= 0.45
    assert np.allclose(np.diff(stamps[3:6]), 0.1) and np.allclose(np.diff(stamps[:3]), 0.1)
