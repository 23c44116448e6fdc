"""The acquisition hook: camera frames → ZeroMQ, without ever blocking acquisition.

`FrameSender` owns one PUSH socket that connects to the daemon's ``endpoints.frames`` and
sends each frame as a `live.protocol` message with a non-blocking, zero-copy send under a
bounded high-water mark. A frame that cannot be sent at once (no receiver, a stalled one,
a full queue) is dropped, counted and its sequence number remembered: acquisition never
waits for the analysis.

Two adapters put it into Micro-Manager acquisitions:

- `pycromanager_image_process_fn` is a pycromanager ``image_process_fn`` (the
  ``(image, metadata)`` form). It returns the image and metadata unchanged, so Micro-Manager
  still stores every frame. In a user's script (Micro-Manager running with its ZMQ server
  on, or pycromanager's Python backend)::

      from pycromanager import Acquisition, multi_d_acquisition_events
      from live.hook import pycromanager_image_process_fn

      hook = pycromanager_image_process_fn("tcp://127.0.0.1:5555")  # endpoints.frames
      with Acquisition(directory="D:/data", name="worm", image_process_fn=hook) as acq:
          acq.acquire(multi_d_acquisition_events(num_time_points=6000))
      hook.sender.close()
      print(hook.sender.sent, hook.sender.dropped)

- `attach_to_pymmcore_plus` connects a sender to ``core.mda.events.frameReady``.

Both take a time series of one channel at one z and one position: the daemon records frames
by time point. A multi-dimensional acquisition (several channels, z planes, positions) is
refused with one logged error, and its frames are not sent (Micro-Manager still saves them):
a pymmcore-plus MDA when it starts (its ``MDASequence.sizes``), a pycromanager acquisition at
the first frame whose ``Axes`` tag shows a second value of an axis other than time (the frames
before it went out). ``sender.refused`` counts the frames not sent, ``sender.refusal`` says
why. Use one hook per acquisition.

When the daemon's frames endpoint uses CURVE (it is reachable beyond loopback, or
``security.curve = "required"``), the sender needs the client keys from the config:
``FrameSender.for_config(load_config("config.toml"))`` or ``keys=client_keys(config,
"frames")`` (`live.security`). A sender without the right keys never gets a frame through.

Micro-Manager's Java application cannot be installed on the machine this project is built
and tested on; the tests therefore run a real pycromanager `Acquisition` on its Python
backend and a real pymmcore-plus MDA, both on a real MMCore (`pymmcore_plus` `UniMMCore`)
with a simulated camera written in Python (`live._mmcore`). The hook itself is the
standard ``image_process_fn`` and works the same with the Java backend.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from live.protocol import END_OF_FRAMES, MAX_SEQ, encode_frame

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

    from live.config import ScopeConfig
    from live.security import ClientKeys

__all__ = [
    "AxisGuard",
    "FrameSender",
    "PycromanagerHook",
    "attach_to_pymmcore_plus",
    "frame_number",
    "metadata_float",
    "pycromanager_image_process_fn",
]

log = logging.getLogger(__name__)

MAX_DROPPED_SEQS = 100_000
"""`FrameSender.dropped_seqs` keeps the first this many dropped seqs; `dropped` counts all."""

_TIME_AXES = frozenset({"time", "t"})
"""Axis names of time: pycromanager's ``Axes`` tag, useq's ``MDAEvent.index``."""
_ELAPSED_KEYS = ("ElapsedTime-ms",)
_FOCUS_KEYS = ("ZPosition_um", "ZPosition_um_Intended", "DeepZ-Focus-um")
_TIMESTAMP_KEYS = ("DeepZ-Timestamp-s",)


class FrameSender:
    """One non-blocking PUSH socket that sends camera frames and counts the ones it could not.

    Parameters
    ----------
    endpoint : str
        The daemon's frame endpoint (``endpoints.frames``), e.g. ``"tcp://127.0.0.1:5555"``;
        the sender connects, the daemon binds.
    hwm : int
        Send high-water mark in messages: how many frames ZeroMQ may queue for a slow or
        absent receiver before sends fail (and frames are dropped).
    context : zmq.Context, optional
        Context to make the socket in; the process-wide instance by default.
    linger_ms : int
        How long `close` waits for queued frames to leave.
    keys : live.security.ClientKeys, optional
        CURVE client keys, needed when the daemon's frames endpoint uses CURVE.

    Notes
    -----
    `send` never blocks and never raises for transport reasons. `sent` counts frames handed
    to ZeroMQ, `dropped` those it refused; the receiver's sequence numbers show anything lost
    after that (e.g. frames still queued when `close`'s linger ran out). `refused` counts
    frames a hook did not offer because their acquisition was refused (`refusal` says why;
    see `refuse`). `acquiring` is set by a source once its set-up (rendering frames, loading
    a core) is done and acquisition begins: the daemon's run clock (elapsed time, rates,
    ``--duration``) starts then. One thread should own a sender; a lock makes occasional use
    from another thread safe.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int = 2000,
        context: zmq.Context[Any] | None = None,
        linger_ms: int = 2000,
        keys: ClientKeys | None = None,
    ) -> None:
        from live.security import connect_curve

        if hwm < 1:
            raise ValueError(f"hwm must be >= 1 message, got {hwm}")
        self.endpoint = endpoint
        self.sent = 0
        self.dropped = 0
        self.dropped_seqs: list[int] = []
        self.refused = 0
        self.refusal: str | None = None
        self.acquiring = threading.Event()
        self._next_seq = 0
        self._linger_ms = linger_ms
        self._lock = threading.Lock()
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, linger_ms)
        connect_curve(self._socket, keys)
        self._socket.connect(endpoint)

    @classmethod
    def for_config(cls, config: ScopeConfig, **kwargs: Any) -> FrameSender:
        """Make a sender to the config's ``endpoints.frames``, with its CURVE keys if needed.

        `kwargs` go to the constructor (``hwm``, ``context``, ``linger_ms``).
        """
        from live.security import client_keys

        keys = client_keys(config, "frames")
        return cls(config.endpoints.frames, keys=keys, **kwargs)

    def send(
        self,
        image: np.ndarray,
        *,
        seq: int | None = None,
        timestamp_s: float | None = None,
        focus_um: float | None = None,
    ) -> bool:
        """Send one (H, W) frame now or drop it; return whether ZeroMQ took it.

        `seq` defaults to one more than the last frame's (starting at 0) and `timestamp_s`
        to the current ``time.time()``. The image is sent zero-copy: do not modify it after.
        A frame the protocol refuses (wrong shape or dtype) is dropped and logged too.
        """
        with self._lock:
            seq = self._next_seq if seq is None else int(seq)
            self._next_seq = seq + 1
            stamp = time.time() if timestamp_s is None else float(timestamp_s)
            try:
                parts = encode_frame(
                    image,
                    seq=seq,
                    timestamp_s=stamp,
                    focus_um=None if focus_um is None else float(focus_um),
                )
                self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._drop(seq)
                return False
            except (zmq.ZMQError, ValueError) as err:
                self._drop(seq)
                log.error("frame seq %d not sent: %s", seq, err)
                return False
            self.sent += 1
            return True

    def refuse(self, reason: str) -> None:
        """Count one frame not sent because its acquisition was refused; log each reason once.

        Refused frames take no sequence number: they are not part of the time series.
        """
        with self._lock:
            self.refused += 1
            if reason == self.refusal:
                return
            self.refusal = reason
        log.error("%s", reason)

    def _drop(self, seq: int) -> None:
        """Count a frame that was not sent and remember its seq (up to `MAX_DROPPED_SEQS`)."""
        self.dropped += 1
        if len(self.dropped_seqs) < MAX_DROPPED_SEQS:
            self.dropped_seqs.append(seq)

    def end_stream(self, timeout_s: float = 10.0) -> bool:
        """Send `live.protocol.END_OF_FRAMES` behind the frames already queued (may block).

        Used by the daemon's own in-process source, whose router takes the marker as "all
        this source sent has arrived"; on the public frames endpoint it is just a malformed
        message. Returns False when it could not be queued within `timeout_s`.
        """
        with self._lock:
            if self._closed:
                return False
            self._socket.sndtimeo = round(timeout_s * 1000)
            try:
                self._socket.send(END_OF_FRAMES)
            except zmq.ZMQError:  # Again after the timeout, or a context being torn down
                return False
            return True

    def close(self) -> None:
        """Close the socket, waiting up to ``linger_ms`` for queued frames to leave."""
        while self._on_close:
            self._on_close.pop()()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._socket.close(linger=self._linger_ms)
        if self.dropped:
            log.warning(
                "frame sender to %s: %d sent, %d dropped (not sent without blocking)",
                self.endpoint,
                self.sent,
                self.dropped,
            )

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def metadata_float(metadata: Mapping[str, Any], keys: tuple[str, ...]) -> float | None:
    """Return the first of `keys` in `metadata` that parses as a finite float, else None.

    Micro-Manager's metadata is text a device adapter wrote: "NaN" or "inf" there is no value
    (one NaN elapsed time would fix the hook's clock offset at NaN for the whole run).
    """
    for key in keys:
        value = metadata.get(key)
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(number):
            return number
    return None


def frame_number(value: object) -> int | None:
    """`value` as a frame number (a whole number 0 … `MAX_SEQ`, or text of one), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value)  # exact, however large (a float would round past 2**53)
    else:
        try:
            as_float = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return None
        if not math.isfinite(as_float) or not as_float.is_integer():
            return None
        number = int(as_float)
    return number if 0 <= number <= MAX_SEQ else None


def _refusal(detail: str) -> str:
    """Return the one-line message that refuses a multi-dimensional acquisition."""
    return (
        f"deepz hook: refusing a multi-dimensional acquisition ({detail}): live Deep-Z takes "
        "a time series of one channel at one z and one position, and would record these "
        "frames as consecutive time points; its frames are not sent (Micro-Manager still "
        "saves them)"
    )


class AxisGuard:
    """Refuse an acquisition whose frames vary along an axis other than time.

    `check` takes a frame's axis positions (pycromanager's ``Axes`` tag, useq's
    ``MDAEvent.index``) and remembers the first value of every axis other than time; the
    first frame with another value refuses the acquisition for good. `expect` refuses up front
    from an acquisition's axis sizes. `refusal` is the message, None while the acquisition
    is a plain time series.
    """

    def __init__(self) -> None:
        self.refusal: str | None = None
        self._first: dict[str, Any] = {}

    def expect(self, sizes: Mapping[str, int]) -> str | None:
        """Start a new acquisition with these axis sizes; return the refusal, if any."""
        self._first.clear()
        varying = {k: int(n) for k, n in sizes.items() if k not in _TIME_AXES and int(n) > 1}
        detail = ", ".join(f"{k}: {n}" for k, n in varying.items())
        self.refusal = _refusal(detail) if varying else None
        return self.refusal

    def check(self, axes: Mapping[str, Any]) -> str | None:
        """Return the refusal if this frame (or an earlier one) leaves the time series."""
        if self.refusal is None:
            for name, value in axes.items():
                first = self._first.setdefault(str(name), value)
                if name not in _TIME_AXES and value != first:
                    self.refusal = _refusal(f"{name} {first!r}, then {value!r}")
                    break
        return self.refusal


class PycromanagerHook:
    """A pycromanager ``image_process_fn`` that sends each frame and hands it back unchanged.

    Seq: ``int(metadata[seq_key])`` when `seq_key` is given, else this hook's own counter
    (0, 1, 2, ... in the order pycromanager delivers images). Timestamp: the simulated
    camera's ``DeepZ-Timestamp-s`` if present, else the acquisition's ``ElapsedTime-ms``
    anchored to the wall clock at the first frame, else the arrival time. Focus: the
    ``ZPosition_um`` tag if present, else 0. A frame whose ``Axes`` tag leaves the time series
    (`AxisGuard`) refuses the acquisition: it and every later frame are counted in
    ``sender.refused`` and not sent.
    """

    def __init__(self, sender: FrameSender, *, seq_key: str | None = None) -> None:
        self.sender = sender
        self.seq_key = seq_key
        self.guard = AxisGuard()
        self._count = 0
        self._clock_offset_s: float | None = None

    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, Any]:
        """Send `image` (never blocking, never raising) and return ``(image, metadata)``."""
        try:
            axes = metadata.get("Axes")
            refusal = self.guard.check(axes if isinstance(axes, Mapping) else {})
            if refusal is not None:
                self.sender.refuse(refusal)
                return image, metadata
            seq = self._seq(metadata)
            if seq is None:
                self.sender.refuse(
                    f"deepz hook: metadata {self.seq_key!r} does not hold a frame number (a whole "
                    "number >= 0): such frames are not sent, counted as refused"
                )
                return image, metadata
            self.sender.send(
                image,
                seq=seq,
                timestamp_s=self._timestamp(metadata),
                focus_um=metadata_float(metadata, _FOCUS_KEYS),  # None: the scope did not say
            )
        except Exception:  # a hook that raises aborts the user's acquisition: never do that
            log.exception("deepz hook failed on a frame; acquisition continues")
        self._count += 1
        return image, metadata

    def _seq(self, metadata: Mapping[str, Any]) -> int | None:
        """Return the frame's sequence number (see the class docstring); None if unreadable."""
        if self.seq_key is not None and self.seq_key in metadata:
            return frame_number(metadata[self.seq_key])
        return self._count

    def _timestamp(self, metadata: Mapping[str, Any]) -> float:
        """Return the frame's wall-clock time (see the class docstring)."""
        stamp = metadata_float(metadata, _TIMESTAMP_KEYS)
        if stamp is not None:
            return stamp
        elapsed_ms = metadata_float(metadata, _ELAPSED_KEYS)
        if elapsed_ms is None:
            return time.time()
        if self._clock_offset_s is None:
            self._clock_offset_s = time.time() - elapsed_ms / 1000.0
        return self._clock_offset_s + elapsed_ms / 1000.0


def pycromanager_image_process_fn(
    endpoint: str,
    *,
    hwm: int = 2000,
    seq_key: str | None = None,
    context: zmq.Context[Any] | None = None,
    keys: ClientKeys | None = None,
) -> PycromanagerHook:
    """Make a pycromanager ``image_process_fn`` that pushes frames to `endpoint`.

    Pass it as ``Acquisition(..., image_process_fn=hook)``; it returns ``(image, metadata)``
    so Micro-Manager still stores the data. ``hook.sender`` holds the counts; close it after
    the acquisition. See the module docstring for a complete example. `keys`: CURVE client
    keys when the endpoint uses CURVE (see the module docstring).
    """
    sender = FrameSender(endpoint, hwm=hwm, context=context, keys=keys)
    return PycromanagerHook(sender, seq_key=seq_key)


def attach_to_pymmcore_plus(
    core: CMMCorePlus,
    endpoint: str,
    *,
    hwm: int = 2000,
    context: zmq.Context[Any] | None = None,
    keys: ClientKeys | None = None,
) -> FrameSender:
    """Send every frame of the core's MDA runs to `endpoint` (``mda.events.frameReady``).

    Seq counts frames from 0 across runs; the timestamp is the simulated camera's
    ``DeepZ-Timestamp-s`` or the arrival time; focus is the event's ``z_pos`` (or none). A run
    with more than one channel, z plane, position or grid tile (``MDASequence.sizes``, or
    the events' ``index`` as they come) is refused (`AxisGuard`): its frames are counted in
    ``sender.refused`` and not sent.
    Disconnect by closing the returned sender (``sender.close()``). `keys`: CURVE client
    keys when the endpoint uses CURVE (see the module docstring).
    """
    sender = FrameSender(endpoint, hwm=hwm, context=context, keys=keys)
    guard = AxisGuard()

    def on_start(sequence: Any, *_: Any) -> None:
        """Check a new run's axis sizes before its first frame (`refuse` logs at that frame)."""
        sizes = getattr(sequence, "sizes", None)
        guard.expect(sizes if isinstance(sizes, Mapping) else {})

    def on_frame(image: np.ndarray, event: Any, meta: Mapping[str, Any]) -> None:
        """Send one MDA frame; runs on the MDA runner's thread."""
        index = getattr(event, "index", None)
        refusal = guard.check(index if isinstance(index, Mapping) else {})
        if refusal is not None:
            sender.refuse(refusal)
            return
        camera_meta = meta.get("camera_metadata") or {}
        z_um = getattr(event, "z_pos", None)
        sender.send(
            image,
            timestamp_s=metadata_float(camera_meta, _TIMESTAMP_KEYS),
            focus_um=float(z_um) if z_um is not None else None,  # None: no z in the plan
        )

    events = core.mda.events
    events.sequenceStarted.connect(on_start)
    events.frameReady.connect(on_frame)
    sender._on_close.append(lambda: events.frameReady.disconnect(on_frame))
    sender._on_close.append(lambda: events.sequenceStarted.disconnect(on_start))
    return sender
