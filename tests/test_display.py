"""Display client: keeps only the newest stack from a real PUB socket and counts the drops."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from live.display import LatestStack
from live.protocol import encode_frame, encode_stack, max_part_bytes


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
        dropped_before = client.dropped
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
        assert client.dropped - dropped_before == 2
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
    ],
)
def test_the_viewers_limits_are_checked(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from live.display import main

    with pytest.raises(SystemExit) as exc:
        main(["--endpoint", "tcp://127.0.0.1:5999", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err
