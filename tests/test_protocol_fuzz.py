"""Decoding is total: any bytes, any parts, any mutation of a valid header gives a valid
`Message` or a short `ProtocolError`, never another exception (property-based, hypothesis).

Each property runs a bounded number of examples so the file takes a few seconds; the explicit
regression tests below pin every kind of message that once escaped as something else.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import live.protocol
from live.protocol import (
    ALLOWED_DTYPES,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
    decode,
    encode_frame,
    encode_stack,
    parse_header,
)

# No wall-clock limits (a loaded CI machine is slow): no per-example deadline, and no
# "data generation is too slow" health check, which times the first examples' generation.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_ERROR_CHARS = 400
"""No error message may be longer, whatever the message held."""


def decode_or_reject(parts: Any, **kwargs: Any) -> Message | None:
    """Decode `parts`; a `ProtocolError` (short) gives None, any other exception fails the test.

    A returned message must be self-consistent: its array has the declared shape and dtype and
    views exactly the declared number of bytes.
    """
    try:
        message = decode(parts, **kwargs)
    except ProtocolError as err:
        assert len(str(err)) <= MAX_ERROR_CHARS, str(err)[:MAX_ERROR_CHARS]
        return None
    header = message.header
    assert message.array.shape == header.shape
    assert message.array.dtype == np.dtype(header.dtype).newbyteorder("<")
    assert message.array.nbytes == header.nbytes
    assert not message.array.flags.writeable
    return message


def _frame_fields() -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "kind": "frame",
        "seq": 7,
        "timestamp_s": 12.5,
        "shape": [4, 6],
        "dtype": "uint16",
        "focus_um": -1.5,
    }


def _stack_fields() -> dict[str, Any]:
    return {
        "version": PROTOCOL_VERSION,
        "kind": "stack",
        "seq": 7,
        "timestamp_s": 12.5,
        "shape": [2, 4, 6],
        "dtype": "float32",
        "focus_um": 0.0,
        "planes_um": [-1.0, 1.0],
        "latency_ms": 3.0,
    }


def _header_text(fields: dict[str, str]) -> bytes:
    """A JSON object from already-serialised values (so raw tokens like NaN can be inserted)."""
    return ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}").encode()


def _nbytes(fields: dict[str, Any]) -> int:
    return int(np.prod(fields["shape"])) * np.dtype(fields["dtype"]).itemsize


# -- strategies ---------------------------------------------------------------------------

# allow_subnormal=False: training and the torch backend flush denormals process-wide, and
# hypothesis refuses to draw subnormal floats in such a process (tests share one process).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)

hostile_tokens = st.one_of(
    json_values.map(lambda v: json.dumps(v, allow_nan=True)),
    st.integers(min_value=15, max_value=30_000).map(lambda n: "9" * n),  # huge ints
    st.integers(min_value=15, max_value=5_000).map(lambda n: "-" + "9" * n),
    st.integers(min_value=1, max_value=2_000).map(lambda n: "9" * n + ".5"),  # huge floats
    st.integers(min_value=300, max_value=100_000).map(lambda n: f"1e{n}"),
    st.integers(min_value=1, max_value=20_000).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(min_value=1, max_value=10_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e308", "-0", "0.0", "true", "null"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),  # negative and huge seqs
    st.lists(st.integers(min_value=-3, max_value=2**40), max_size=5).map(json.dumps),  # shapes
    st.lists(st.floats(allow_nan=True, allow_subnormal=False), max_size=5).map(
        lambda v: json.dumps(v, allow_nan=True)
    ),
    st.sampled_from([*sorted(ALLOWED_DTYPES), "<u2", "object", "complex64", ""]).map(json.dumps),
)

any_part = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(bytearray),
    st.binary(max_size=300).map(memoryview),
    st.binary(max_size=300).map(zmq.Frame),
    st.integers(min_value=-(2**40), max_value=2**40),  # bytes(2**40) would allocate 1 TiB
    st.text(max_size=20),
    st.none(),
    st.lists(st.integers(), max_size=3),
)


# -- properties -----------------------------------------------------------------------------


@FUZZ
@given(header=st.binary(max_size=2_000), pixels=st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_raise_protocol_error(header: bytes, pixels: bytes) -> None:
    decode_or_reject([header, pixels])


@FUZZ
@given(parts=st.lists(any_part, max_size=4))
def test_arbitrary_parts_decode_or_raise_protocol_error(parts: list[Any]) -> None:
    decode_or_reject(parts)


@FUZZ
@given(
    base=st.sampled_from([_frame_fields, _stack_fields]),
    changes=st.dictionaries(
        st.sampled_from([*_stack_fields(), "surface_id", "colour"]), hostile_tokens, max_size=3
    ),
    dropped=st.sets(st.sampled_from(list(_stack_fields())), max_size=2),
    extra_bytes=st.sampled_from([0, 0, 0, -1, 1, 4096]),
)
def test_mutated_valid_headers_decode_or_raise_protocol_error(
    base: Any, changes: dict[str, str], dropped: set[str], extra_bytes: int
) -> None:
    fields = base()
    size = max(0, _nbytes(fields) + extra_bytes)
    text = {k: json.dumps(v) for k, v in fields.items() if k not in dropped}
    text.update(changes)
    message = decode_or_reject([_header_text(text), bytes(size)])
    if message is not None:  # then every field passed its checks
        assert 0 <= message.header.seq < 2**63
        assert np.isfinite(message.header.timestamp_s)
        focus = message.header.focus_um  # None: the sender gave no focus
        assert focus is None or np.isfinite(focus)


@FUZZ
@given(
    header=st.sampled_from([_frame_fields, _stack_fields]).map(lambda f: json.dumps(f()).encode()),
    cut=st.integers(min_value=0, max_value=200),
    flips=st.lists(st.tuples(st.integers(0, 199), st.integers(0, 255)), max_size=4),
)
def test_truncated_and_bit_flipped_headers_decode_or_raise_protocol_error(
    header: bytes, cut: int, flips: list[tuple[int, int]]
) -> None:
    raw = bytearray(header[:cut] if cut < len(header) else header)
    for index, byte in flips:
        if index < len(raw):
            raw[index] = byte
    decode_or_reject([bytes(raw), bytes(48)])
    decode_or_reject([bytes(raw), bytes(96)])


@FUZZ
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(sorted(ALLOWED_DTYPES)).map(np.dtype),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
        elements={"allow_subnormal": False},
    ),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    timestamp_s=st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False),
)
def test_every_valid_frame_round_trips(array: np.ndarray, seq: int, timestamp_s: float) -> None:
    parts = [bytes(p) for p in encode_frame(array, seq=seq, timestamp_s=timestamp_s)]
    message = decode_or_reject(parts)
    assert message is not None
    assert message.header.seq == seq and message.header.timestamp_s == timestamp_s
    assert (
        message.array.tobytes()
        == np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    )


# -- regressions: each kind of message that once escaped as another exception --------------


def _frame_with(**raw_values: str) -> list[bytes]:
    """A frame message whose header fields are replaced by raw JSON text."""
    fields = {k: json.dumps(v) for k, v in _frame_fields().items()}
    fields.update(raw_values)
    return [_header_text(fields), bytes(48)]


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([b"[" * 50_000, b""], "nests deeper than 8 levels"),  # was RecursionError
        ([b'{"a":' * 13_000, b""], "nests deeper than 8 levels"),
        ([b'["\\\\"' + b"[" * 50_000, b""], "nests deeper"),  # an escaped backslash ends a string
        (_frame_with(seq="1" * 30_000), "integer of 30000 characters"),  # was ValueError
        (_frame_with(timestamp_s="9" * 400), "integer of 400 characters"),  # was OverflowError
        (_frame_with(focus_um="9" * 400), "integer of 400 characters"),  # was OverflowError
        (_frame_with(focus_um="9" * 400 + ".0"), "number of 402 characters"),
        (_frame_with(shape=f"[{'9' * 3000}, {'9' * 3000}]"), "integer of 3000 characters"),
        (_frame_with(timestamp_s="1e400"), "timestamp_s must be a finite number, got inf"),
        (_frame_with(focus_um="-Infinity"), "focus_um must be a finite number"),
        (_frame_with(seq=str(2**63)), "seq must be below 2\\*\\*63"),
        (_frame_with(seq="-1"), "seq must be an integer >= 0"),
        (_frame_with(version="1.0"), "protocol version 1.0 is not supported"),
        (_frame_with(shape="[1000000000, 1000000000]"), "more than the maximum 1073741824 B"),
        (_frame_with(shape=json.dumps([1] * 20_000)), "must have 2 dimensions"),
        ([10**12, b""], "header part is a int, not a byte buffer"),  # bytes(10**12): 1 TB
        ([b"{}", None], "header is missing"),
        ([json.dumps(_frame_fields()).encode(), 5], "pixels part is a int"),
        ([b" " * (MAX_HEADER_BYTES + 1), b""], "longer than 65536 B"),
    ],
)
def test_hostile_message_raises_a_short_protocol_error(parts: list[Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        decode(parts)
    assert len(str(caught.value)) <= MAX_ERROR_CHARS


def test_parse_header_alone_raises_only_protocol_errors() -> None:
    for raw in (b"[" * 50_000, b'{"seq":' + b"1" * 30_000 + b"}", b"\xff", b"{}"):
        with pytest.raises(ProtocolError):
            parse_header(raw)


def test_brackets_inside_strings_are_not_nesting() -> None:
    # A stack whose surface name is full of brackets and escaped quotes is valid: the depth
    # check must skip strings exactly, or it would reject good headers.
    name = "[" * 40 + '\\"{' * 20 + "]]"
    parts = encode_stack(
        np.zeros((1, 2, 2), np.float32),
        seq=1,
        timestamp_s=0.0,
        focus_um=0.0,
        surface_id=name,
        latency_ms=1.0,
    )
    assert decode(parts).header.surface_id == name


def test_max_bytes_bounds_the_frame_size() -> None:
    parts = encode_frame(np.zeros((4, 4), np.uint16), seq=0, timestamp_s=0.0)
    assert decode(parts, max_bytes=32).array.shape == (4, 4)
    with pytest.raises(ProtocolError, match="is 32 B, more than the maximum 31 B"):
        decode(parts, max_bytes=31)
    assert MAX_FRAME_BYTES == 2**30


def test_a_non_contiguous_pixel_buffer_is_refused() -> None:
    header = json.dumps({**_frame_fields(), "shape": [4, 3]}).encode()
    pixels = memoryview(np.zeros((4, 6), np.uint16)[:, ::2])
    with pytest.raises(ProtocolError, match="not a contiguous buffer"):
        decode([header, pixels])


def test_safety_net_turns_an_unforeseen_error_into_a_protocol_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(header: object) -> None:
        raise KeyError("x" * 10_000)

    monkeypatch.setattr(live.protocol, "_check_header", broken)
    with pytest.raises(ProtocolError, match="undecodable message \\(KeyError: ") as caught:
        decode([json.dumps(_frame_fields()).encode(), bytes(48)])
    assert len(str(caught.value)) <= MAX_ERROR_CHARS
