"""Wire protocol: round trips over real ZeroMQ sockets and every kind of malformed message."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from live.protocol import (
    PROTOCOL_VERSION,
    Header,
    ProtocolError,
    decode,
    encode_frame,
    encode_stack,
)


@pytest.fixture
def push_pull() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(f"tcp://127.0.0.1:{port}")
    pull.rcvtimeo = 5000
    yield push, pull
    push.close()
    pull.close()
    ctx.term()


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float32"])
def test_frame_round_trip_over_zmq(push_pull, dtype: str) -> None:
    push, pull = push_pull
    frame = (np.arange(64 * 96) % 4000).astype(dtype).reshape(64, 96)
    push.send_multipart(encode_frame(frame, seq=7, timestamp_s=12.5, focus_um=-1.5), copy=False)
    msg = decode(pull.recv_multipart(copy=False))
    assert msg.header == Header(PROTOCOL_VERSION, "frame", 7, 12.5, (64, 96), dtype, -1.5)
    np.testing.assert_array_equal(msg.array, frame)
    assert not msg.array.flags.writeable


def test_stack_round_trip_over_zmq(push_pull) -> None:
    push, pull = push_pull
    stack = np.random.default_rng(0).random((5, 32, 48), dtype=np.float32)
    planes = [-4.0, -2.0, 0.0, 2.0, 4.0]
    parts = encode_stack(
        stack, seq=3, timestamp_s=1.25, focus_um=0.5, planes_um=planes, latency_ms=12.0
    )
    push.send_multipart(parts, copy=False)
    msg = decode(pull.recv_multipart(copy=False))
    assert msg.header.kind == "stack"
    assert msg.header.planes_um == tuple(planes)
    assert msg.header.latency_ms == 12.0
    assert msg.header.surface_id is None
    np.testing.assert_array_equal(msg.array, stack)


def test_encode_is_zero_copy_and_handles_odd_layouts() -> None:
    frame = np.zeros((8, 8), np.uint16)
    parts = encode_frame(frame, seq=0, timestamp_s=0.0)
    assert isinstance(parts[1], memoryview)
    assert np.shares_memory(np.frombuffer(parts[1], np.uint16), frame)
    # A transposed big-endian view is copied once to C-ordered little-endian and still decodes.
    odd = np.arange(12, dtype=">u2").reshape(3, 4).T
    msg = decode([bytes(p) for p in encode_frame(odd, seq=1, timestamp_s=0.0)])
    np.testing.assert_array_equal(msg.array, odd)


def test_decode_accepts_bytes_and_memoryviews() -> None:
    frame = np.ones((4, 6), np.uint16)
    header, pixels = encode_frame(frame, seq=2, timestamp_s=3.0)
    msg = decode([bytes(header), memoryview(bytes(pixels))])
    np.testing.assert_array_equal(msg.array, frame)


def _parts(**overrides: object) -> list[bytes]:
    """A valid frame message with header fields replaced (None value removes the field)."""
    fields: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "kind": "frame",
        "seq": 1,
        "timestamp_s": 1.0,
        "shape": [4, 4],
        "dtype": "uint16",
        "focus_um": 0.0,
    }
    for key, value in overrides.items():
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    return [json.dumps(fields).encode(), bytes(32)]


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        (_parts()[:1], "expected 2 message parts"),
        ([*_parts(), b"extra"], "expected 2 message parts"),
        ([b"{not json", bytes(32)], "not valid UTF-8 JSON"),
        ([b"\xff\xfe", bytes(32)], "not valid UTF-8 JSON"),
        ([b"[1, 2]", bytes(32)], "must be a JSON object"),
        ([b" " * 70000, bytes(32)], "longer than"),
        (_parts(version=2), "protocol version 2 is not supported"),
        (_parts(version=True), "protocol version True"),
        (_parts(seq=None), "missing \\['seq'\\]"),
        (_parts(colour="red"), "unknown fields \\['colour'\\]"),
        (_parts(kind="movie"), "kind must be 'frame' or 'stack'"),
        (_parts(kind=["frame"]), "kind must be"),
        (_parts(dtype="complex64"), "dtype 'complex64' is not allowed"),
        (_parts(dtype="object"), "dtype 'object' is not allowed"),
        (_parts(dtype=["u2"]), "is not allowed"),
        (_parts(seq=-1), "seq must be an integer >= 0, got -1"),
        (_parts(seq=1.5), "seq must be an integer"),
        (_parts(seq=True), "seq must be an integer"),
        (_parts(timestamp_s="noon"), "timestamp_s must be a finite number"),
        (_parts(shape=[4]), "must have 2 dimensions"),
        (_parts(shape=[4, 0]), "must have 2 dimensions of size >= 1"),
        (_parts(shape=[4, "4"]), "shape must be a list of integers"),
        (_parts(shape=[2, 4]), "buffer length 32 B does not match shape \\[2, 4\\]"),
        (_parts(dtype="uint32"), "buffer length 32 B does not match .* \\(64 B\\)"),
        (_parts(latency_ms=3.0), "a frame must not carry"),
        (_parts(kind="stack", shape=[1, 4, 4]), "a stack needs latency_ms"),
        (
            _parts(kind="stack", shape=[1, 4, 4], latency_ms=1.0, planes_um=[0.0, 1.0]),
            "planes_um has 2 entries but the stack has 1 planes",
        ),
        (_parts(kind="stack", shape=[1, 4, 4], latency_ms=-1.0), "latency_ms >= 0"),
        (_parts(focus_um="high"), "focus_um must be a finite number"),
    ],
)
def test_malformed_messages_raise_a_named_protocol_error(parts: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(parts)


def test_a_frame_without_a_focus_says_so() -> None:
    """No stage focus is no focus_um in the header, read back as None (it was 0 µm, which a
    focus lock takes for a stage 0 µm from its reference); a focus given is kept, 0 included."""
    frame = np.zeros((4, 4), np.uint16)
    unknown = encode_frame(frame, seq=1, timestamp_s=1.0, focus_um=None)
    assert b"focus_um" not in bytes(unknown[0])
    assert decode(unknown).header.focus_um is None
    assert decode(encode_frame(frame, seq=1, timestamp_s=1.0, focus_um=0.0)).header.focus_um == 0.0
    raw = b'{"version":1,"kind":"frame","seq":1,"timestamp_s":1,"shape":[4,4],"dtype":"uint16",'
    assert decode([raw + b'"focus_um":null}', bytes(32)]).header.focus_um is None


def test_header_numbers_decode_as_floats_that_numpy_and_the_focus_lock_take() -> None:
    """Review 79: a 20-digit focus_um is a finite JSON number, and it decoded as a Python int
    that np.isfinite refuses with TypeError: the focus lock raised it in a worker, which died
    (and every frame it held was lost). Numbers are floats once decoded."""
    from engine.dpm import FocusLock

    raw = (
        b'{"version":1,"kind":"frame","seq":1,"timestamp_s":12345678901234567890,'
        b'"shape":[4,4],"dtype":"uint16","focus_um":99999999999999999999}'
    )
    header = decode([raw, bytes(32)]).header
    assert type(header.focus_um) is float and type(header.timestamp_s) is float
    assert np.isfinite(header.focus_um) and header.focus_um == 1e20
    lock = FocusLock(reference_um=0.0, sign=1.0, min_offset_um=-10.0, max_offset_um=10.0)
    offset, excess = lock.offset_um(header.focus_um)
    assert math.isfinite(offset) and excess != 0.0  # clamped to the model's range, said
    planes = np.zeros((2, 4, 4), np.float32)
    stack = encode_stack(planes, seq=1, timestamp_s=1, focus_um=3, latency_ms=7, planes_um=[0, 1])
    decoded = decode(stack).header
    assert [type(v) for v in (decoded.timestamp_s, decoded.focus_um, decoded.latency_ms)] == [
        float,
        float,
        float,
    ]
    assert decoded.planes_um == (0.0, 1.0)


def test_nan_in_header_is_rejected() -> None:
    raw = b'{"version":1,"kind":"frame","seq":1,"timestamp_s":NaN,"shape":[4,4],"dtype":"uint16"}'
    with pytest.raises(ProtocolError, match="timestamp_s must be a finite number"):
        decode([raw, bytes(32)])


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ProtocolError, match="must have 2 dimensions"):
        encode_frame(np.zeros((2, 2, 2), np.uint16), seq=0, timestamp_s=0.0)
    with pytest.raises(ProtocolError, match="dtype 'complex64' is not allowed"):
        encode_frame(np.zeros((2, 2), np.complex64), seq=0, timestamp_s=0.0)
    with pytest.raises(ProtocolError, match="seq must be an integer >= 0"):
        encode_frame(np.zeros((2, 2), np.uint16), seq=-3, timestamp_s=0.0)
    with pytest.raises(ProtocolError, match="must be a numpy array"):
        encode_frame([[1, 2]], seq=0, timestamp_s=0.0)  # type: ignore[arg-type]


def test_numpy_scalars_in_a_header_encode_as_json_numbers() -> None:
    # the checks take numpy integers and floats (a camera's counter is often one): so must JSON
    frame = np.zeros((4, 4), np.uint16)
    message = decode(
        encode_frame(frame, seq=np.int64(3), timestamp_s=np.float32(1.5), focus_um=np.float64(2))
    )
    assert (message.header.seq, message.header.timestamp_s, message.header.focus_um) == (3, 1.5, 2)
    stack = np.zeros((2, 4, 4), np.float32)
    message = decode(
        encode_stack(
            stack,
            seq=np.uint32(9),
            timestamp_s=0.0,
            focus_um=None,
            latency_ms=np.float32(2.0),
            planes_um=[np.float32(-1.0), np.float64(1.0)],
        )
    )
    assert message.header.seq == 9 and message.header.latency_ms == 2.0
    assert message.header.planes_um == (-1.0, 1.0)
