"""The wire format of deepz-live: two ZeroMQ frames per message, a JSON header and the pixels.

A message is ``[header, buffer]``. The header is a small UTF-8 JSON object (protocol version,
kind, camera sequence number and timestamp, shape, dtype, focus, and for stacks the plane
list or surface id and the engine latency); the buffer is the C-ordered, little-endian pixel
data, sent zero-copy. `decode` validates every header field and the buffer length before it
makes an array, and raises `ProtocolError` naming the problem; callers count and log it and
carry on. Nothing is ever pickled.

Decoding is total: whatever bytes arrive (the frames endpoint may face a hostile or broken
sender), `decode` and `parse_header` return a valid `Message` / `Header` or raise
`ProtocolError`, never anything else, and cost time and memory bounded by the message size:
the header is at most `MAX_HEADER_BYTES` of UTF-8, its JSON nests at most `MAX_JSON_DEPTH`
deep, its numbers have bounded length, every field has a type and a range, and the pixel
buffer is at most `MAX_FRAME_BYTES` (or the caller's ``max_bytes``).

Send with ``socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)`` and receive with
``socket.recv_multipart(copy=False)``.

Besides frames and stacks, control messages travel between the daemon, its workers and its
own source, on private inproc / ipc sockets only: `END_OF_FRAMES` (one part: the daemon's own
source after its last frame, and the router after a worker's last frame), `END_OF_STACKS`
(one part: a worker after its last stack), credits (one part: a worker has room for more
frames, `credit`) and worker events (one part, a small JSON object: `encode_event` /
`decode_event`, as total as `decode`). Shutdown follows these markers: ZeroMQ keeps the order
of messages on one socket, so whatever a marker follows has arrived when the marker does.
`max_part_bytes` gives the largest message part a receiving socket should accept (its
``zmq.MAXMSGSIZE``), so ZeroMQ itself drops anything bigger before it is buffered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import zmq

__all__ = [
    "ALLOWED_DTYPES",
    "CREDIT",
    "END_OF_FRAMES",
    "END_OF_STACKS",
    "EVENTS",
    "MAX_EVENT_BYTES",
    "MAX_EVENT_SEQS",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_SEQ",
    "PROTOCOL_VERSION",
    "WORKER_PREFETCH",
    "Header",
    "Kind",
    "Message",
    "ProtocolError",
    "credit",
    "decode",
    "decode_event",
    "encode_event",
    "encode_frame",
    "encode_stack",
    "end_of_stacks",
    "max_part_bytes",
    "parse_credit",
    "parse_end_of_stacks",
    "parse_header",
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

MAX_JSON_DEPTH = 8
"""Deepest bracket nesting a header may have; ours has 2 (the object, then shape/planes_um).

Checked on the bytes before JSON parsing: the parser recurses once per level, and
``"[" * 50000`` would otherwise raise `RecursionError`."""

MAX_FRAME_BYTES = 2**30
"""Largest pixel buffer `decode` accepts unless told otherwise (1 GiB; a float32 stack of
41 planes of 2048² is 0.69 GB). Checked on the header before the buffer is looked at."""

MAX_SEQ = 2**63 - 1
"""Largest sequence number (fits an int64, as every consumer of seqs may store it)."""

_MAX_INT_DIGITS = 20
"""Longest integer literal a header may hold (2**64 has 20 digits). Bounding it keeps
`int` below Python's int-string limit (4,300 digits: `ValueError`) and every int small enough
to become a float (a 400-digit one would raise `OverflowError`)."""
_MAX_FLOAT_CHARS = 64
"""Longest float literal a header may hold (``repr`` of a float is at most 24 characters)."""
_MAX_SHOWN = 60
"""Error messages show at most this many characters of an offending value."""

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
        Sequence number of the camera frame (0 to `MAX_SEQ`); a stack carries its frame's.
    timestamp_s : float
        Camera timestamp of the frame, seconds (``time.time()`` clock for the simulated scope).
    shape, dtype
        Array shape and numpy dtype name of the buffer (one of `ALLOWED_DTYPES`).
    focus_um : float or None
        Focus (stage z) position of the frame, µm; None when the scope did not say (left out
        of the header; a focus lock cannot place such a frame's planes).
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
    focus_um: float | None = None
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
        }
        if self.focus_um is not None:
            fields["focus_um"] = self.focus_um
        if self.planes_um is not None:
            fields["planes_um"] = list(self.planes_um)
        if self.surface_id is not None:
            fields["surface_id"] = self.surface_id
        if self.latency_ms is not None:
            fields["latency_ms"] = self.latency_ms
        return json.dumps(
            fields, separators=(",", ":"), allow_nan=False, default=_numpy_scalar
        ).encode()

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
    array: np.ndarray, *, seq: int, timestamp_s: float, focus_um: float | None = 0.0
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
    focus_um: float | None,
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


def decode(frames: Sequence[Part], *, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Validate a received ``[header, pixels]`` message and view its pixels as an array.

    Parameters
    ----------
    frames : sequence of bytes, memoryview or zmq.Frame
        The received message parts.
    max_bytes : int
        Largest pixel buffer to accept (default `MAX_FRAME_BYTES`); a header declaring more is
        rejected before the buffer is looked at.

    Raises
    ------
    ProtocolError
        For anything but a valid message, and only this: wrong number or type of parts,
        unreadable, oversized or too deeply nested header, wrong version, unknown kind or
        dtype, bad field values, a frame over `max_bytes`, or a buffer whose length is not
        ``prod(shape) * itemsize``.
    """
    with _only_protocol_errors():
        if len(frames) != 2:
            raise ProtocolError(f"expected 2 message parts [header, pixels], got {len(frames)}")
        header = _parse_header(_part_view(frames[0], "header"))
        if header.nbytes > max_bytes:
            raise ProtocolError(
                f"a {header.kind} of shape {_short(list(header.shape))} {header.dtype} is "
                f"{_short(header.nbytes)} B, more than the maximum {max_bytes} B"
            )
        buffer = _part_view(frames[1], "pixels")
        if buffer.nbytes != header.nbytes:
            raise ProtocolError(
                f"buffer length {buffer.nbytes} B does not match shape {list(header.shape)} of "
                f"{header.dtype} ({header.nbytes} B) for seq {header.seq}"
            )
        if not buffer.c_contiguous:
            raise ProtocolError("the pixels part is not a contiguous buffer")
        if buffer.ndim != 1 or buffer.itemsize != 1:
            buffer = buffer.cast("B")
        array = np.frombuffer(buffer, dtype=_WIRE_DTYPES[header.dtype]).reshape(header.shape)
        array.flags.writeable = False  # a view of the received buffer: consumers must copy to edit
        return Message(header, array)


def parse_header(raw: bytes | memoryview) -> Header:
    """Parse and validate a header frame; raises only `ProtocolError`, naming the bad field."""
    with _only_protocol_errors():
        return _parse_header(raw)


@contextmanager
def _only_protocol_errors() -> Iterator[None]:
    """Turn any exception other than `ProtocolError` into one (the safety net of decoding).

    Every known way a message can be bad is checked and named by the code inside. This net is
    for the ones nobody thought of: a receiving thread that catches `ProtocolError`, counts
    and carries on must never die because a sender found a new kind of garbage.
    """
    try:
        yield
    except ProtocolError:
        raise
    except Exception as err:  # deliberately broad: see above; the cause is kept for debugging
        raise ProtocolError(
            f"undecodable message ({type(err).__name__}: {_cut(str(err))})"
        ) from err


def _parse_header(view: bytes | memoryview) -> Header:
    """Parse and validate a header frame (any exception may escape: see `parse_header`)."""
    size = memoryview(view).nbytes
    if size > MAX_HEADER_BYTES:  # checked before copying it out of a received buffer
        raise ProtocolError(f"header is {size} B, longer than {MAX_HEADER_BYTES} B")
    raw = bytes(view)
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError(f"header is not valid UTF-8 JSON: {_cut(str(err))}") from None
    if _nests_deeper(raw, MAX_JSON_DEPTH):
        raise ProtocolError(f"header JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        fields = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as err:
        raise ProtocolError(f"header is not valid UTF-8 JSON: {_cut(str(err))}") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(fields).__name__}")
    if not _KNOWN.issuperset(fields) or not fields.keys() >= _REQUIRED_SET:
        missing = [k for k in _REQUIRED if k not in fields]
        if missing:
            raise ProtocolError(f"header is missing {missing}")
        unknown = sorted(set(fields) - _KNOWN)
        raise ProtocolError(
            f"header has unknown fields {_short(unknown)}; allowed: {sorted(_KNOWN)}"
        )
    version = fields["version"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {_short(version)} is not supported (this is version "
            f"{PROTOCOL_VERSION})"
        )
    shape = fields["shape"]
    if not isinstance(shape, list):
        raise ProtocolError(f"shape must be a list of integers, got {_short(shape)}")
    planes = fields.get("planes_um")
    if planes is not None and not isinstance(planes, list):
        raise ProtocolError(f"planes_um must be a list of numbers or null, got {_short(planes)}")
    header = Header(
        version=PROTOCOL_VERSION,
        kind=fields["kind"],
        seq=fields["seq"],
        timestamp_s=fields["timestamp_s"],
        shape=tuple(shape),
        dtype=fields["dtype"],
        focus_um=fields.get("focus_um"),
        planes_um=None if planes is None else tuple(planes),
        surface_id=fields.get("surface_id"),
        latency_ms=fields.get("latency_ms"),
    )
    _check_header(header)
    # checked finite numbers; JSON ints become floats here: a 20-digit int is a finite float,
    # but NumPy cannot take it as a number (np.isfinite raised TypeError in a worker)
    return replace(
        header,
        timestamp_s=float(header.timestamp_s),
        focus_um=None if header.focus_um is None else float(header.focus_um),
        planes_um=None if header.planes_um is None else tuple(float(p) for p in header.planes_um),
        latency_ms=None if header.latency_ms is None else float(header.latency_ms),
    )


def _nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether the brackets of JSON text `raw` (UTF-8) nest deeper than `limit`, outside strings.

    Exact on any prefix of valid JSON, which is all a JSON parser recurses into (it stops at
    the first invalid character), so a header that passes cannot make `json.loads` recurse
    deeper than `limit`. Linear time: brackets inside strings are masked with a vectorised
    scan of unescaped quotes (in UTF-8 every byte below 0x80 is the ASCII character itself).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot nest deeper than it has openers: the path every genuine header takes
    text = np.frombuffer(raw, np.uint8)
    index = np.arange(text.size)
    backslash = text == ord("\\")
    # Length of the run of backslashes ending at each byte; a quote after an odd run is escaped.
    run = index - np.maximum.accumulate(np.where(backslash, -1, index))
    escaped = np.concatenate(([False], run[:-1] % 2 == 1))
    quote = (text == ord('"')) & ~escaped
    in_string = np.cumsum(quote) % 2 == 1
    step = np.zeros(text.size, np.int8)
    step[(text == ord("[")) | (text == ord("{"))] = 1
    step[(text == ord("]")) | (text == ord("}"))] = -1
    step[in_string] = 0
    return int(np.cumsum(step).max()) > limit


def _parse_int(literal: str) -> int:
    """`json.loads` hook for integer literals: refuse any longer than `_MAX_INT_DIGITS` digits."""
    if len(literal.lstrip("-")) > _MAX_INT_DIGITS:
        raise ProtocolError(
            f"header has an integer of {len(literal)} characters (at most {_MAX_INT_DIGITS} digits)"
        )
    return int(literal)


def _parse_float(literal: str) -> float:
    """`json.loads` hook for float literals: refuse long ones (a too-large one becomes inf)."""
    if len(literal) > _MAX_FLOAT_CHARS:
        raise ProtocolError(
            f"header has a number of {len(literal)} characters (at most {_MAX_FLOAT_CHARS})"
        )
    return float(literal)


def _check_header(h: Header) -> None:
    """Check every field's type and range; raise `ProtocolError` naming the first bad one."""
    if not isinstance(h.kind, str) or h.kind not in _NDIM:
        raise ProtocolError(f"kind must be 'frame' or 'stack', got {_short(h.kind)}")
    if not _is_int(h.seq) or h.seq < 0:
        raise ProtocolError(f"seq must be an integer >= 0, got {_short(h.seq)}")
    if h.seq > MAX_SEQ:
        raise ProtocolError(f"seq must be below 2**63, got {_short(h.seq)}")
    if not _is_number(h.timestamp_s):
        raise ProtocolError(f"timestamp_s must be a finite number, got {_short(h.timestamp_s)}")
    if not all(_is_int(n) for n in h.shape):
        raise ProtocolError(f"shape must be a list of integers, got {_short(list(h.shape))}")
    if len(h.shape) != _NDIM[h.kind] or any(n < 1 for n in h.shape):
        raise ProtocolError(
            f"a {h.kind} must have {_NDIM[h.kind]} dimensions of size >= 1, got shape "
            f"{_short(list(h.shape))}"
        )
    if not isinstance(h.dtype, str) or h.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(
            f"dtype {_short(h.dtype)} is not allowed; allowed: {sorted(ALLOWED_DTYPES)}"
        )
    if h.focus_um is not None and not _is_number(h.focus_um):
        raise ProtocolError(f"focus_um must be a finite number, got {_short(h.focus_um)}")
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
        raise ProtocolError(f"planes_um must be finite numbers, got {_short(list(h.planes_um))}")
    if h.surface_id is not None and not isinstance(h.surface_id, str):
        raise ProtocolError(f"surface_id must be a string or null, got {_short(h.surface_id)}")
    if h.latency_ms is None or not _is_number(h.latency_ms) or h.latency_ms < 0:
        raise ProtocolError(f"a stack needs latency_ms >= 0, got {_short(h.latency_ms)}")


def _numpy_scalar(value: object) -> int | float:
    """JSON for the numpy integers and floats `_check_header` accepts (as Python's own)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _is_int(value: object) -> bool:
    """Whether `value` is a JSON integer (bool excluded)."""
    kind = type(value)
    return kind is int or (kind is not bool and isinstance(value, int | np.integer))


def _is_number(value: object) -> bool:
    """Whether `value` is a finite real number (bool excluded, and ints too big for a float)."""
    if type(value) is bool or not isinstance(value, int | float | np.integer | np.floating):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _short(value: object) -> str:
    """Return ``repr(value)`` cut to `_MAX_SHOWN` characters, so error messages stay small."""
    try:
        return _cut(repr(value))
    except ValueError:  # an int past Python's int-to-string limit
        return f"<{type(value).__name__} too long to show>"


def _cut(text: str) -> str:
    """Return `text` cut to `_MAX_SHOWN` characters, saying how long it was."""
    if len(text) <= _MAX_SHOWN:
        return text
    return f"{text[:_MAX_SHOWN]}… ({len(text)} characters)"


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


def _part_view(part: Part, what: str) -> memoryview:
    """Return a byte view of one received part (no copy); refuse anything that is not a buffer.

    Checked explicitly because ``bytes(part)`` of an int would allocate that many bytes.
    """
    if isinstance(part, zmq.Frame):
        return part.buffer
    try:
        return memoryview(part)
    except TypeError:
        raise ProtocolError(
            f"the {what} part is a {type(part).__name__}, not a byte buffer"
        ) from None


_LITTLE = np.little_endian


# -- control messages between the daemon and its workers ----------------------------------------

END_OF_FRAMES = b"end-of-frames"
"""One-part message after the last frame: from the daemon's in-process source to the router,
and from the router to each worker. Honoured only on private (inproc / ipc) sockets: on the
public frames endpoint it is a malformed message like any other."""
END_OF_STACKS = b"end-of-stacks"
"""Prefix of the one-part message a worker sends on its stacks socket after its last stack
(`end_of_stacks`)."""


WORKER_PREFETCH = 0
"""Frames a worker holds beyond the one it is refocusing (its first credit is this + 1): none,
so under the ``latest`` policy the frame it takes next is the newest there is; the cost is one
credit round trip on ipc (well under a millisecond) per frame."""
CREDIT = b"credit"
"""Prefix of a worker's credit message (`credit`): room for that many more frames."""


def credit(worker: int, frames: int, *, reset: bool = False) -> bytes:
    """Return a credit message: worker `worker` can take `frames` more frames.

    A worker sends ``reset=True`` with its first credit (a restarted worker holds nothing, so
    whatever its predecessor was owed is void), then one credit per frame it finished.
    """
    return b"%s:%d:%d:%d" % (CREDIT, worker, frames, int(reset))


def parse_credit(raw: bytes) -> tuple[int, int, bool] | None:
    """Return (worker, frames, reset) of a credit message, or None if `raw` is not one."""
    parts = raw.split(b":")
    if len(parts) != 4 or parts[0] != CREDIT:
        return None
    if not all(n.isdigit() and len(n) <= 6 for n in parts[1:]):
        return None
    return int(parts[1]), int(parts[2]), parts[3] == b"1"


def end_of_stacks(worker: int) -> bytes:
    """Return worker `worker`'s end-of-stacks marker, ``b"end-of-stacks:<worker>"``."""
    return b"%s:%d" % (END_OF_STACKS, worker)


def parse_end_of_stacks(raw: bytes) -> int | None:
    """Return the worker id of an end-of-stacks marker, or None if `raw` is not one."""
    head, sep, tail = raw.partition(b":")
    if head != END_OF_STACKS or not sep or not tail.isdigit() or len(tail) > 6:
        return None
    return int(tail)


EVENTS = frozenset({"ready", "rejected", "clamped", "done", "error"})
"""Kinds of worker event: loaded its backend; seqs it refused (not a frame it can refocus);
seqs whose focus lock it clamped (refocused at the trained depths' edge, not where the stage
asked); finished (with a stack count); failed (with a message). Workers never skip: the router
is the one place that does (credit-based routing)."""
MAX_EVENT_SEQS = 1000
"""Most seqs one event carries (`encode_event` callers split longer lists)."""
MAX_EVENT_BYTES = 65536
"""Largest event message (1000 seqs of 19 digits and the other fields fit)."""
_MAX_EVENT_TEXT = 2000
"""Longest text field of an event (an error message is cut to this)."""


def encode_event(event: str, worker: int, **fields: Any) -> bytes:
    """Encode one worker event as compact UTF-8 JSON ``{"event", "worker", **fields}``.

    ``seqs`` (a list of ints, at most `MAX_EVENT_SEQS`) and short text or number fields are
    what `decode_event` accepts; a ``message`` longer than `_MAX_EVENT_TEXT` is cut.
    """
    if event not in EVENTS:
        raise ProtocolError(f"unknown event {event!r}; known: {sorted(EVENTS)}")
    if isinstance(fields.get("message"), str):
        fields["message"] = fields["message"][:_MAX_EVENT_TEXT]
    payload = {"event": event, "worker": worker, **fields}
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def decode_event(raw: bytes | memoryview | zmq.Frame) -> dict[str, Any]:
    """Validate one worker event and return it as a dict; raises only `ProtocolError`.

    The result has ``event`` (one of `EVENTS`), ``worker`` (an int >= 0) and, when present,
    ``seqs`` (ints in 0..`MAX_SEQ`, at most `MAX_EVENT_SEQS`); other fields are short strings,
    numbers, booleans or null.
    """
    with _only_protocol_errors():
        view = _part_view(raw, "event")
        if view.nbytes > MAX_EVENT_BYTES:
            raise ProtocolError(f"event is {view.nbytes} B, longer than {MAX_EVENT_BYTES} B")
        data = bytes(view)
        if _nests_deeper(data, 2):
            raise ProtocolError("event JSON nests deeper than 2 levels")
        fields = json.loads(str(data, "utf-8"), parse_int=_parse_int, parse_float=_parse_float)
        if not isinstance(fields, dict):
            raise ProtocolError(f"an event must be a JSON object, got {type(fields).__name__}")
        if fields.get("event") not in EVENTS:
            raise ProtocolError(f"unknown event {_short(fields.get('event'))}")
        worker = fields.get("worker")
        if type(worker) is not int or worker < 0:
            raise ProtocolError(f"event worker must be an integer >= 0, got {_short(worker)}")
        seqs = fields.get("seqs", [])
        if not isinstance(seqs, list) or len(seqs) > MAX_EVENT_SEQS:
            raise ProtocolError(f"event seqs must be a list of at most {MAX_EVENT_SEQS} seqs")
        if not all(_is_int(seq) and 0 <= seq <= MAX_SEQ for seq in seqs):
            raise ProtocolError(f"event seqs must be integers in 0..2**63-1, got {_short(seqs)}")
        for key, value in fields.items():
            if key == "seqs":
                continue
            if isinstance(value, list | dict) or (
                isinstance(value, str) and len(value) > _MAX_EVENT_TEXT
            ):
                raise ProtocolError(f"event field {_short(key)} is not a short scalar")
        return fields


def max_part_bytes(shape: Sequence[int], dtype: str | None = None) -> int:
    """Largest message part a valid message of `shape` can have: its pixels or its header.

    With `dtype` None the pixels are sized for the widest of `ALLOWED_DTYPES` (8 bytes), so
    any dtype the protocol allows fits. Use it as a receiving socket's ``zmq.MAXMSGSIZE``:
    ZeroMQ then drops (and disconnects) a peer that sends a bigger part before buffering it.
    ZeroMQ applies the limit to each part, so it is the larger of the pixel buffer and
    `MAX_HEADER_BYTES` (a header longer than that is refused by `decode` anyway).
    """
    itemsize = (
        max(dt.itemsize for dt in _WIRE_DTYPES.values())
        if dtype is None
        else _WIRE_DTYPES[dtype].itemsize
    )
    return max(math.prod(int(n) for n in shape) * itemsize, MAX_HEADER_BYTES)
