"""The wire format of deepz-live: two ZeroMQ frames per message, a JSON header and the pixels.

A message is ``[header, buffer]``. The header is a small UTF-8 JSON object (protocol version,
kind, camera sequence number and timestamp, shape, dtype, focus, and for stacks the plane
list or surface id and the engine latency); the buffer is the C-ordered, little-endian pixel
data, sent zero-copy. `decode` validates every header field and the buffer length before it
makes an array, and raises `ProtocolError` naming the problem; callers count and log it and
carry on. Nothing is ever pickled.

Send with ``socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)`` and receive with
``socket.recv_multipart(copy=False)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import zmq

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Header",
    "Kind",
    "Message",
    "ProtocolError",
    "decode",
    "encode_frame",
    "encode_stack",
]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change of the header or the buffer layout."""

Kind = Literal["frame", "stack"]

ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64"}
)
"""Pixel types a message may carry (numpy names; the buffer is always little-endian)."""

MAX_HEADER_BYTES = 65536
"""A header longer than this is rejected before JSON parsing (it cannot be one of ours)."""

_NDIM: dict[str, int] = {"frame": 2, "stack": 3}
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {n: np.dtype(n).newbyteorder("<") for n in ALLOWED_DTYPES}
_REQUIRED = ("version", "kind", "seq", "timestamp_s", "shape", "dtype")
_OPTIONAL = ("focus_um", "planes_um", "surface_id", "latency_ms")
_KNOWN = frozenset(_REQUIRED + _OPTIONAL)
_REQUIRED_SET = frozenset(_REQUIRED)

Part = bytes | memoryview | zmq.Frame


class ProtocolError(ValueError):
    """A message that does not follow the wire format; the text names the field and the problem."""


@dataclass(frozen=True, slots=True)
class Header:
    """The metadata of one message: what the buffer holds and which camera frame it came from.

    Attributes
    ----------
    version : int
        Protocol version, `PROTOCOL_VERSION`.
    kind : {"frame", "stack"}
        A raw camera frame (H, W) or a refocused virtual stack (P, H, W).
    seq : int
        Sequence number of the camera frame (>= 0); a stack carries the seq of its frame.
    timestamp_s : float
        Camera timestamp of the frame, seconds (``time.time()`` clock for the simulated scope).
    shape, dtype
        Array shape and numpy dtype name of the buffer (one of `ALLOWED_DTYPES`).
    focus_um : float
        Focus (stage z) position of the frame, µm.
    planes_um : tuple of float or None
        Stacks only: the axial distance of each plane from the focal plane, µm.
    surface_id : str or None
        Stacks only: the name of a non-planar DPM surface, if the stack is not uniform planes.
    latency_ms : float or None
        Stacks only: camera timestamp to stack ready, ms.
    """

    version: int
    kind: Kind
    seq: int
    timestamp_s: float
    shape: tuple[int, ...]
    dtype: str
    focus_um: float = 0.0
    planes_um: tuple[float, ...] | None = None
    surface_id: str | None = None
    latency_ms: float | None = None

    def to_json(self) -> bytes:
        """Serialise to the compact UTF-8 JSON header frame."""
        fields: dict[str, Any] = {
            "version": self.version,
            "kind": self.kind,
            "seq": self.seq,
            "timestamp_s": self.timestamp_s,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "focus_um": self.focus_um,
        }
        if self.planes_um is not None:
            fields["planes_um"] = list(self.planes_um)
        if self.surface_id is not None:
            fields["surface_id"] = self.surface_id
        if self.latency_ms is not None:
            fields["latency_ms"] = self.latency_ms
        return json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()

    @property
    def nbytes(self) -> int:
        """Length in bytes that the pixel buffer must have."""
        return math.prod(self.shape) * _WIRE_DTYPES[self.dtype].itemsize


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: its header and a read-only array viewing the received buffer."""

    header: Header
    array: np.ndarray


def encode_frame(
    array: np.ndarray, *, seq: int, timestamp_s: float, focus_um: float = 0.0
) -> list[bytes | memoryview]:
    """Encode one raw camera frame (H, W) as ``[header, pixels]``; the pixels are not copied.

    The caller must not modify `array` until the send has completed (ZeroMQ holds the buffer
    when sent with ``copy=False``). Non-contiguous or big-endian arrays are copied once.
    """
    array = _as_wire_array(array, "frame")
    header = Header(
        PROTOCOL_VERSION,
        "frame",
        seq,
        timestamp_s,
        tuple(array.shape),
        array.dtype.name,
        focus_um=focus_um,
    )
    _check_header(header)
    return [header.to_json(), _buffer(array)]


def encode_stack(
    array: np.ndarray,
    *,
    seq: int,
    timestamp_s: float,
    focus_um: float,
    planes_um: Sequence[float] | None = None,
    surface_id: str | None = None,
    latency_ms: float,
) -> list[bytes | memoryview]:
    """Encode one virtual stack (P, H, W) as ``[header, pixels]``, zero-copy like `encode_frame`.

    `seq` and `timestamp_s` are those of the camera frame the stack was refocused from.
    """
    array = _as_wire_array(array, "stack")
    header = Header(
        PROTOCOL_VERSION,
        "stack",
        seq,
        timestamp_s,
        tuple(array.shape),
        array.dtype.name,
        focus_um=focus_um,
        planes_um=None if planes_um is None else tuple(float(p) for p in planes_um),
        surface_id=surface_id,
        latency_ms=latency_ms,
    )
    _check_header(header)
    return [header.to_json(), _buffer(array)]


def decode(frames: Sequence[Part]) -> Message:
    """Validate a received ``[header, pixels]`` message and view its pixels as an array.

    Raises
    ------
    ProtocolError
        Wrong number of parts, unreadable or oversized header, wrong version, unknown kind or
        dtype, bad field values, or a buffer whose length is not ``prod(shape) * itemsize``.
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 message parts [header, pixels], got {len(frames)}")
    header = parse_header(_header_bytes(frames[0]))
    buffer = _buffer_view(frames[1])
    if buffer.nbytes != header.nbytes:
        raise ProtocolError(
            f"buffer length {buffer.nbytes} B does not match shape {list(header.shape)} of "
            f"{header.dtype} ({header.nbytes} B) for seq {header.seq}"
        )
    array = np.frombuffer(buffer, dtype=_WIRE_DTYPES[header.dtype]).reshape(header.shape)
    array.flags.writeable = False  # a view of the received buffer: consumers must copy to edit
    return Message(header, array)


def parse_header(raw: bytes) -> Header:
    """Parse and validate a header frame; raises `ProtocolError` naming the bad field."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header is {len(raw)} B, longer than {MAX_HEADER_BYTES} B")
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"header is not valid UTF-8 JSON: {err}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(fields).__name__}")
    if not _KNOWN.issuperset(fields) or not fields.keys() >= _REQUIRED_SET:
        missing = [k for k in _REQUIRED if k not in fields]
        if missing:
            raise ProtocolError(f"header is missing {missing}")
        unknown = sorted(set(fields) - _KNOWN)
        raise ProtocolError(f"header has unknown fields {unknown}; allowed: {sorted(_KNOWN)}")
    if fields["version"] != PROTOCOL_VERSION or isinstance(fields["version"], bool):
        raise ProtocolError(
            f"protocol version {fields['version']!r} is not supported (this is version "
            f"{PROTOCOL_VERSION})"
        )
    shape = fields["shape"]
    if not isinstance(shape, list) or not all(_is_int(n) for n in shape):
        raise ProtocolError(f"shape must be a list of integers, got {shape!r}")
    planes = fields.get("planes_um")
    if planes is not None and (
        not isinstance(planes, list) or not all(_is_number(p) for p in planes)
    ):
        raise ProtocolError(f"planes_um must be a list of numbers or null, got {planes!r}")
    header = Header(
        version=PROTOCOL_VERSION,
        kind=fields["kind"],
        seq=fields["seq"],
        timestamp_s=fields["timestamp_s"],
        shape=tuple(shape),
        dtype=fields["dtype"],
        focus_um=fields.get("focus_um", 0.0),
        planes_um=None if planes is None else tuple(float(p) for p in planes),
        surface_id=fields.get("surface_id"),
        latency_ms=fields.get("latency_ms"),
    )
    _check_header(header)
    return header


def _check_header(h: Header) -> None:
    """Check every field's type and range; raise `ProtocolError` naming the first bad one."""
    if not isinstance(h.kind, str) or h.kind not in _NDIM:
        raise ProtocolError(f"kind must be 'frame' or 'stack', got {h.kind!r}")
    if not _is_int(h.seq) or h.seq < 0:
        raise ProtocolError(f"seq must be an integer >= 0, got {h.seq!r}")
    if not _is_number(h.timestamp_s):
        raise ProtocolError(f"timestamp_s must be a finite number, got {h.timestamp_s!r}")
    if len(h.shape) != _NDIM[h.kind] or any(n < 1 for n in h.shape):
        raise ProtocolError(
            f"a {h.kind} must have {_NDIM[h.kind]} dimensions of size >= 1, got shape "
            f"{list(h.shape)}"
        )
    if not isinstance(h.dtype, str) or h.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {h.dtype!r} is not allowed; allowed: {sorted(ALLOWED_DTYPES)}")
    if not _is_number(h.focus_um):
        raise ProtocolError(f"focus_um must be a finite number, got {h.focus_um!r}")
    if h.kind == "frame" and (h.planes_um, h.surface_id, h.latency_ms) != (None, None, None):
        raise ProtocolError("a frame must not carry planes_um, surface_id or latency_ms")
    if h.kind == "stack":
        _check_stack_fields(h)


def _check_stack_fields(h: Header) -> None:
    """Check the stack-only fields: plane list length, surface id and latency."""
    if h.planes_um is not None and len(h.planes_um) != h.shape[0]:
        raise ProtocolError(
            f"planes_um has {len(h.planes_um)} entries but the stack has {h.shape[0]} planes"
        )
    if h.planes_um is not None and not all(_is_number(p) for p in h.planes_um):
        raise ProtocolError(f"planes_um must be finite numbers, got {list(h.planes_um)}")
    if h.surface_id is not None and not isinstance(h.surface_id, str):
        raise ProtocolError(f"surface_id must be a string or null, got {h.surface_id!r}")
    if h.latency_ms is None or not _is_number(h.latency_ms) or h.latency_ms < 0:
        raise ProtocolError(f"a stack needs latency_ms >= 0, got {h.latency_ms!r}")


def _is_int(value: object) -> bool:
    """Whether `value` is a JSON integer (bool excluded)."""
    kind = type(value)
    return kind is int or (kind is not bool and isinstance(value, int | np.integer))


def _is_number(value: object) -> bool:
    """Whether `value` is a finite real number (bool excluded)."""
    kind = type(value)
    if kind is float or kind is int:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind is bool or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return math.isfinite(float(value))


def _as_wire_array(array: np.ndarray, kind: Kind) -> np.ndarray:
    """Return `array` as C-contiguous little-endian data, copying only if it is not already."""
    if not isinstance(array, np.ndarray):
        raise ProtocolError(f"a {kind} must be a numpy array, got {type(array).__name__}")
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and not _LITTLE):
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def _buffer(array: np.ndarray) -> memoryview:
    """Return a flat byte view of a C-contiguous array (no copy)."""
    return array.data.cast("B")


def _header_bytes(part: Part) -> bytes:
    """Return the header frame as bytes, whatever container it arrived in."""
    if isinstance(part, zmq.Frame):
        return part.bytes
    return bytes(part)


def _buffer_view(part: Part) -> memoryview:
    """Return a flat byte view of the pixel frame, without copying."""
    view = part.buffer if isinstance(part, zmq.Frame) else memoryview(part)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


_LITTLE = np.little_endian
