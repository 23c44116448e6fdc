"""Display client: keeps only the newest stack from a real PUB socket and counts the rest."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zmq

from live.display import RATE_WINDOW_S, LatestStack, View
from live.protocol import MAX_FRAME_BYTES, decode, encode_frame, encode_stack, max_part_bytes


def test_latest_stack_keeps_newest_and_counts_drops() -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    # inproc, not tcp: once the subscription is through, a sent message is already in the
    # subscriber's pipe, so the test never bets on how fast a loaded machine moves it
    pub.bind("inproc://display-test")
    client = LatestStack("inproc://display-test", ctx)
    try:
        probe = np.zeros((2, 16, 16), np.float32)
        # PUB drops until the subscription has propagated: send probes until one arrives.
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
        while client.poll(50) is None:
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.send_multipart(
                encode_stack(probe, seq=0, timestamp_s=0.0, focus_um=0.0, latency_ms=0.0)
            )
        client.poll(100)  # drain late probes (already in the pipe)
        not_shown_before = client.not_shown
        for seq in range(1, 4):
            stack = np.full((2, 16, 16), seq, np.float32)
            stack[1, 3, 3] = 10 * seq
            pub.send_multipart(
                encode_stack(
                    stack,
                    seq=seq,
                    timestamp_s=1.0,
                    focus_um=0.0,
                    planes_um=[-1.0, 1.0],
                    latency_ms=2.5,
                ),
                copy=False,
            )
        # all three are already waiting at the subscriber
        view = client.poll(1000)
        assert view is not None
        assert view.seq == 3 and view.planes_um == (-1.0, 1.0) and view.latency_ms == 2.5
        assert client.not_shown - not_shown_before == 2
        assert view.max_projection.shape == (16, 16) and view.max_projection[3, 3] == 30
        assert view.volume.flags.writeable
        pub.send_multipart([b"{}", b""])
        assert client.poll(500) is None and client.malformed == 1
        frame = encode_frame(np.zeros((16, 16), np.uint16), seq=9, timestamp_s=0.0)
        pub.send_multipart(frame)  # a camera frame on the stacks endpoint: not a stack
        assert client.poll(500) is None and client.malformed == 2
    finally:
        client.close()
        pub.close()
        ctx.term()


def test_float16_stacks_are_shown_as_float32_with_their_values() -> None:
    # Stacks travel as float16 (recorder.stack_dtype); the view widens them exactly.
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    shape = (3, 16, 16)
    client = LatestStack(
        f"tcp://127.0.0.1:{port}", ctx, max_message_bytes=max_part_bytes(shape, "float16")
    )
    stack = np.full(shape, 140.2, np.float16)
    stack[2, 5, 5] = 65504.0  # a saturated pixel
    stack[1, 6, 6] = np.nan  # a pixel not a number on one plane: the others project
    try:
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
        view = None
        while view is None:  # PUB drops until the subscription has propagated
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.send_multipart(
                encode_stack(stack, seq=7, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0)
            )
            view = client.poll(50)
        assert view.volume.dtype == np.float32 and view.max_projection.dtype == np.float32
        np.testing.assert_array_equal(view.volume, stack.astype(np.float32))
        assert view.max_projection[6, 6] == 140.25
        # 140.2 as float16 is 140.25 (steps of 1/8 there); 65504 is float16's largest value
        assert view.volume[0, 0, 0] == 140.25 and view.max_projection[5, 5] == 65504.0
        assert client.malformed == 0
    finally:
        client.close()
        pub.close()
        ctx.term()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-message-bytes", "-5"], "--max-message-bytes must be >= 1"),
        (["--max-fps", "nan"], "--max-fps must be a number of frames a second"),
        (["--max-fps", "0"], "--max-fps must be a number of frames a second"),
        (["--max-message-bytes", str(10**20)], "--max-message-bytes must be >= 1 and < 2**63"),
    ],
)
def test_the_viewers_limits_are_checked(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from live.display import main

    with pytest.raises(SystemExit) as exc:
        main(["--endpoint", "tcp://127.0.0.1:5999", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def _stacks_pair(
    ctx: zmq.Context[zmq.Socket[bytes]], name: str, **kwargs: Any
) -> tuple[zmq.Socket[bytes], LatestStack]:
    """A PUB on inproc `name` and a `LatestStack` on it whose subscription has arrived."""
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind(f"inproc://{name}")
    client = LatestStack(f"inproc://{name}", ctx, **kwargs)
    probe = encode_stack(
        np.zeros((1, 4, 4), np.float32), seq=0, timestamp_s=0.0, focus_um=0.0, latency_ms=0.0
    )
    deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
    while client.poll(50) is None:  # PUB drops until the subscription has propagated
        assert time.monotonic() < deadline, "subscriber never connected"
        pub.send_multipart(probe)
    client.poll(100)  # late probes, already in the pipe
    return pub, client


def test_the_rate_counts_every_stack_that_arrived_not_the_screen_refreshes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, client = _stacks_pair(ctx, "display-rate")
    clock = [time.monotonic() + 1000.0]  # past every poll of the connection's
    monkeypatch.setattr("live.display.time", SimpleNamespace(monotonic=lambda: clock[0]))
    try:
        assert client.poll(0) is None  # the screen refreshes: nothing new
        for seq in range(1, 11):  # ten stacks arrive within one refresh interval
            pub.send_multipart(
                encode_stack(
                    np.full((1, 4, 4), seq, np.float32),
                    seq=seq,
                    timestamp_s=0.0,
                    focus_um=0.0,
                    latency_ms=0.0,
                )
            )
        clock[0] += 1.0  # a second later, the next refresh
        shown, received = client.shown, client.received
        view = client.poll(1000)
        assert view is not None and view.seq == 10
        assert view.stacks_per_s == pytest.approx(10.0)  # ten arrived in that second
        assert client.received - received == 10 and client.shown - shown == 1
        assert view.not_shown == client.not_shown == client.received - client.shown
    finally:
        client.close()
        pub.close()
        ctx.term()


def test_the_socket_limit_is_also_the_decode_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The config allows stacks past the protocol's 1 GiB default (MAX_STACK_GIB): the viewer
    # must decode up to what its socket lets through, not refuse it as oversized.
    import live.display

    limits: list[int] = []

    def spy(parts: Any, *, max_bytes: int = MAX_FRAME_BYTES) -> Any:
        limits.append(max_bytes)
        return decode(parts, max_bytes=max_bytes)

    monkeypatch.setattr(live.display, "decode", spy)
    big = 3 * 2**30
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, client = _stacks_pair(ctx, "display-limit", max_message_bytes=big)
    try:
        assert limits and set(limits) == {big}
    finally:
        client.close()
        pub.close()
        ctx.term()


def test_an_endpoint_it_cannot_connect_to_closes_the_socket_and_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from live.display import main

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with pytest.raises(zmq.ZMQError) as failed:
        LatestStack("tcp://*:5556", ctx)  # a wildcard is for bind, not connect
    # The error's traceback holds the half-made object, as a logged or kept error would: the
    # socket must be closed by then, not left to the garbage collector.
    terminated = threading.Thread(target=ctx.term, daemon=True)  # blocks on an open socket
    terminated.start()
    terminated.join(30)  # generous: it returns at once when the socket was closed
    assert not terminated.is_alive(), "the socket of the failed connect was left open"
    assert failed.traceback  # (kept alive until here)
    assert main(["--endpoint", "tcp://*:5556"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot connect to 'tcp://*:5556': ")


def test_the_scope_gives_the_stack_size_even_when_the_camera_gives_the_frame_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from live.config import ScopeConfig, load_config
    from live.display import stack_bytes

    def no_dpms(self: ScopeConfig) -> None:
        raise AssertionError("the planes were built (41 DPMs of the frame) just to count them")

    monkeypatch.setattr(ScopeConfig, "volume_plan", no_dpms)
    planes = "[planes]\nz_min_um = -10.0\nz_max_um = 10.0\nstep_um = 0.5\n"  # 41 planes
    fixed = tmp_path / "fixed.toml"
    fixed.write_text(f"[source]\nframe_shape = [512, 640]\n{planes}")
    assert stack_bytes(load_config(fixed)) == max_part_bytes((41, 512, 640), "float16")
    camera = tmp_path / "camera.toml"  # the daemon asks its Micro-Manager core for the shape
    camera.write_text(
        f'[source]\nkind = "micromanager"\nframe_shape = "auto"\npixel_size_um = 0.3\n{planes}'
        '[recorder]\nstack_dtype = "float32"\n'
    )
    # a 4096² camera: 2.6 GiB of float32 a stack, which the config allows (MAX_STACK_GIB)
    assert stack_bytes(load_config(camera)) >= max_part_bytes((41, 4096, 4096), "float32")


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-message-bytes", "5000"],
        ["--client-key", "c.key_secret", "--server-key", "s.key"],
        ["--server-key", "s.key"],
    ],
)
def test_flags_the_scope_would_override_are_refused_with_it(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from live.display import main

    with pytest.raises(SystemExit) as exc:
        main(["--scope", "missing.toml", *flags])  # refused before the file is read
    err = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2
    assert err.endswith(
        ": not with --scope, whose config gives the keys and the stack size (use --endpoint)"
    )
    assert flags[0] in err


def test_the_screen_refreshes_at_the_requested_rate_below_one_a_second() -> None:
    from live.display import refresh_interval_ms

    assert refresh_interval_ms(0.5) == 2000 and refresh_interval_ms(0.1) == 10_000
    assert refresh_interval_ms(20.0) == 50 and refresh_interval_ms(1000.0) == 1


def _view(low: float, high: float, shape: tuple[int, ...] = (3, 8, 8)) -> View:
    volume = np.zeros(shape, np.float32) + np.linspace(low, high, shape[-1], dtype=np.float32)
    return View(
        seq=1,
        volume=volume,
        max_projection=volume.max(axis=0),
        planes_um=None,
        latency_ms=1.0,
        stacks_per_s=2.0,
        not_shown=3,
    )


def test_the_contrast_follows_the_stacks_until_the_user_sets_it() -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no Qt app here may reach for one
    napari = pytest.importorskip("napari", reason="napari is not installed: pip install '.[view]'")
    from live.display import _Screen

    screen = _Screen(napari.components.ViewerModel())
    screen.show(_view(0.0, 1.0))
    volume = screen.layers["volume"]
    screen.show(_view(100.0, 1000.0))  # brighter stacks: napari alone kept 0 … 1
    assert tuple(volume.contrast_limits) == pytest.approx((100.0, 1000.0))
    assert tuple(screen.layers["max projection"].contrast_limits) == pytest.approx((100, 1000))
    assert "not shown 3" in screen.viewer.title and "2.0 stacks/s received" in screen.viewer.title
    screen.show(_view(101.0, 1001.0))  # within a tenth of the span: left as it was
    assert tuple(volume.contrast_limits) == pytest.approx((100.0, 1000.0))
    volume.contrast_limits = (200.0, 300.0)  # the user's choice
    screen.show(_view(2000.0, 3000.0, (5, 16, 16)))
    assert tuple(volume.contrast_limits) == pytest.approx((200.0, 300.0))
    assert volume.contrast_limits_range[1] >= 3000.0  # the slider reaches the new data


def test_a_flood_of_malformed_messages_cannot_hold_a_refresh_nor_flood_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from live.display import LATE_MESSAGES

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, client = _stacks_pair(ctx, "display-flood")
    try:
        malformed = client.malformed
        for _ in range(3 * LATE_MESSAGES):  # all already in the inproc pipe (high-water 1004)
            pub.send_multipart([b"{}", b""])
        with caplog.at_level(logging.WARNING, logger="live.display"):
            assert client.poll(0) is None
            assert client.malformed - malformed == LATE_MESSAGES  # the rest wait for the next
            assert client.poll(0) is None and client.malformed - malformed == 2 * LATE_MESSAGES
        logged = [r for r in caplog.records if "malformed stack ignored" in r.getMessage()]
        assert len(logged) == 10 - malformed  # the first ten, all told; then only counted
        assert "further ones are only counted" in logged[-1].getMessage()
    finally:
        client.close()
        pub.close()
        ctx.term()


def test_a_refresh_limit_for_a_recording_is_refused_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from live.display import main

    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "run.ome.zarr"), "--max-fps", "5"])
    assert exc.value.code == 2
    assert "--max-fps: for a running daemon, not a recording" in capsys.readouterr().err


def test_the_title_says_when_the_stacks_stopped() -> None:
    # The rate shown is the client's now: once stacks stop it falls, and the silence is said.
    from live.display import IDLE_TITLE_S, window_title

    view = _view(0.0, 1.0)
    assert window_title(view, 10.4, 3, idle_s=0.0).endswith(
        "10.4 stacks/s received | latency 1.0 ms | not shown 3"
    )
    stale = window_title(view, 0.0, 3, idle_s=IDLE_TITLE_S + 3)
    assert "0.0 stacks/s received" in stale and stale.endswith("| no stack for 5 s")


def test_the_clients_rate_falls_to_zero_once_the_stacks_stop() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub, client = _stacks_pair(ctx, "rate-falls")
    try:
        stack = np.zeros((2, 4, 4), np.float32)
        for seq in range(1, 6):
            pub.send_multipart(
                encode_stack(stack, seq=seq, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0)
            )
        view = None
        while view is None:
            view = client.poll(1000)
        assert client.stacks_per_s > 0 and client.idle_s < RATE_WINDOW_S
        time.sleep(RATE_WINDOW_S * 1.1)  # no stack for longer than the rate's window
        assert client.poll(0) is None
        assert client.stacks_per_s == 0.0 and client.idle_s >= RATE_WINDOW_S
    finally:
        client.close()
        pub.close()
        ctx.term()
