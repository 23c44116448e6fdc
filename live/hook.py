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
why.

A frame's seq is its time index (pycromanager's ``Axes`` tag, useq's ``MDAEvent.index``), so
a time point Micro-Manager lost is a gap the daemon counts. The daemon records a seq once:
a second acquisition into the same daemon run continues the numbering: `attach_to_pymmcore_plus`
and a reused pycromanager hook do so by themselves, a new pycromanager hook takes
``first_seq`` (``first_seq=hook.sender.next_seq`` of the previous one).

The hooks' senders queue frames only to a daemon that is connected (ZeroMQ's
``IMMEDIATE``): with none listening, frames are dropped and counted (one warning says so)
instead of piling up in the acquisition's memory.

When the daemon's frames endpoint uses CURVE (it is reachable beyond loopback, or
``security.curve = "required"``), the sender needs the client keys from the config:
``FrameSender.for_config(load_config("config.toml"), endpoint="tcp://scope-pc:5555")`` or
``keys=client_keys(config, "frames")`` (`live.security`). A sender without the right keys
never gets a frame through.

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
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from live.addresses import is_wildcard
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
    "frame_time_s",
    "metadata_float",
    "pycromanager_image_process_fn",
]

log = logging.getLogger(__name__)

MAX_DROPPED_SEQS = 100_000
"""`FrameSender.dropped_seqs` keeps the first this many dropped seqs; `dropped` counts all."""

_LOGGED_LOST = 10
"""Lost frames a sender logs one by one (`FrameSender.lose`); the rest are counted."""
_TIME_AXES = frozenset({"time", "t"})
"""Axis names of time: pycromanager's ``Axes`` tag, useq's ``MDAEvent.index``."""
_ELAPSED_KEYS = ("ElapsedTime-ms",)
_FOCUS_KEYS = ("ZPosition_um", "ZPosition_um_Intended", "DeepZ-Focus-um")
_TIMESTAMP_KEYS = ("DeepZ-Timestamp-s",)
_RECEIVED_KEY = "TimeReceivedByCore"
"""MMCore's per-frame wall-clock time (local, ``2026-12-05 21:44:23.260571``)."""
CONNECT_TIMEOUT_S = 2.0
"""How long a hook's sender waits for the daemon when it is made (then it warns)."""


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
        How long queued frames may still leave after `close` (ZeroMQ's linger: `close` itself
        returns at once; the context sends them in the background for up to this long).
    keys : live.security.ClientKeys, optional
        CURVE client keys, needed when the daemon's frames endpoint uses CURVE.
    immediate : bool
        Queue frames only to a connected daemon (ZeroMQ's ``IMMEDIATE``): with none, a send
        drops the frame (counted) instead of holding up to `hwm` frames in memory. Then the
        constructor waits up to `connect_timeout_s` for the daemon's handshake and logs one
        warning without it. The hooks set it; the daemon's own in-process source does not.

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
        immediate: bool = False,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        from live.security import connect_curve

        if hwm < 1:
            raise ValueError(f"hwm must be >= 1 message, got {hwm}")
        _refuse_bind_address(endpoint)
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
        self._warned_drop = False
        self._lost_logged = 0  # frames logged by `_say_lost`
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUSH)
        try:
            self._socket.setsockopt(zmq.SNDHWM, hwm)
            self._socket.setsockopt(zmq.LINGER, linger_ms)
            self._socket.setsockopt(zmq.IMMEDIATE, int(immediate))
            connect_curve(self._socket, keys)
            # watched from before connect, so a handshake that completes at once is seen
            monitor = (
                self._socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                if immediate
                else None
            )
            self._socket.connect(endpoint)
        except zmq.ZMQError as err:
            self._socket.close(linger=0)
            raise ValueError(f"frames endpoint {endpoint!r}: {err}") from None
        if monitor is not None:
            try:
                if not monitor.poll(round(connect_timeout_s * 1000)):
                    log.warning(
                        "no daemon answered at %s within %g s (not running, another address, "
                        "or CURVE keys it refuses): frames are dropped, and counted, until one "
                        "does",
                        endpoint,
                        connect_timeout_s,
                    )
            finally:
                self._socket.disable_monitor()
                monitor.close(linger=0)

    @classmethod
    def for_config(
        cls, config: ScopeConfig, endpoint: str | None = None, **kwargs: Any
    ) -> FrameSender:
        """Make a sender to the config's ``endpoints.frames``, with its CURVE keys if needed.

        `endpoint` is the daemon's address as this machine reaches it, where the config's is
        an address the daemon binds (``tcp://*:5555``, ``tcp://0.0.0.0:5555``: refused, with
        one line asking for it). `kwargs` go to the constructor (``hwm``, ``context``,
        ``linger_ms``, ``immediate``).
        """
        from live.security import client_keys

        keys = client_keys(config, "frames")
        try:
            return cls(endpoint or config.endpoints.frames, keys=keys, **kwargs)
        except ValueError as err:
            if endpoint is None:
                raise ValueError(f"endpoints.frames: {err}") from None
            raise

    @property
    def next_seq(self) -> int:
        """The seq the next frame gets when `send` is not given one."""
        with self._lock:
            return self._next_seq

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
                if not self._warned_drop:  # once: a drop per frame would flood the log
                    self._warned_drop = True
                    log.warning(
                        "frames to %s are being dropped (counted): the daemon is not "
                        "receiving them (not connected, or not keeping up); first seq %d",
                        self.endpoint,
                        seq,
                    )
                return False
            except (zmq.ZMQError, ValueError) as err:
                self._drop(seq)
                self._say_lost(seq, f"not sent: {err}")
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

    def lose(self, seq: int | None, why: str) -> None:
        """Count a frame the source had and could not send; log the first few.

        An unreadable frame of a recording, a frame left in the camera's buffer that fails,
        or one the protocol refuses: with its seq when it has one (else the next).
        """
        with self._lock:
            if seq is None:
                seq = self._next_seq
                self._next_seq += 1
            self._drop(seq)
        self._say_lost(seq, why)

    def _say_lost(self, seq: int, why: str) -> None:
        """Log a lost frame: the first `_LOGGED_LOST`, then only a count at close."""
        self._lost_logged += 1
        if self._lost_logged <= _LOGGED_LOST:
            more = " (further ones are only counted)" if self._lost_logged == _LOGGED_LOST else ""
            log.error("frame seq %d lost: %s%s", seq, why, more)

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
        """Close the socket; frames still queued may leave for up to ``linger_ms`` after."""
        while self._on_close:
            self._on_close.pop()()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._socket.close(linger=self._linger_ms)
        if self.dropped:
            log.warning(
                "frame sender to %s: %d sent, %d dropped (not sent: see the lines above)",
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
        value = metadata.get(key, None)  # pymmcore-plus's Metadata raises without a default
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            continue
        if math.isfinite(number):
            return number
    return None


def frame_time_s(metadata: Mapping[str, Any], *, now: float | None = None) -> float | None:
    """Return a frame's wall-clock time (s since the epoch) from its metadata, else None.

    The simulated camera's ``DeepZ-Timestamp-s`` (exact), else MMCore's per-frame
    ``TimeReceivedByCore`` (local time; when the frame reached the core's buffer). Not
    ``ElapsedTime-ms`` first: pycromanager's engine writes one value per acquisition event,
    so a hardware-sequenced time series would have one time for all its frames.

    Local time names the hour the clocks go back twice; of its two readings the one nearest
    `now` (default: the current time) is the frame's, which the hook sees seconds after it
    was taken (review 76: the second pass read an hour early, time running backwards).
    """
    stamp = metadata_float(metadata, _TIMESTAMP_KEYS)
    if stamp is not None:
        return stamp
    text = metadata.get(_RECEIVED_KEY, None)
    if isinstance(text, str):
        try:
            local = datetime.fromisoformat(text.strip())
            if local.tzinfo is not None:
                return local.timestamp()
            reference = time.time() if now is None else now
            readings = [local.replace(fold=fold).timestamp() for fold in (0, 1)]
            return min(readings, key=lambda t: abs(t - reference))
        except (ValueError, OverflowError, OSError):
            return None
    return None


def frame_number(value: object) -> int | None:
    """`value` as a frame number (a whole number 0 … `MAX_SEQ`, or text of one), else None."""
    if isinstance(value, bool):
        return None
    text = value.strip() if isinstance(value, str) else ""
    digits = text[1:] if text.startswith("+") else text
    if isinstance(value, str) and not value.isascii():
        return None  # "٣" or "５": digits to float() and int(), not to a camera's metadata
    if isinstance(value, int | np.integer):
        number = int(value)
    elif digits.isascii() and digits.isdigit():  # not "²" or "++5", which int() refuses
        number = int(digits)  # exact, however large (a float would round past 2**53)
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

    Seq: ``int(metadata[seq_key])`` when `seq_key` is given, else `first_seq` plus the frame's
    time index (the ``Axes`` tag's ``time``: a time point lost is a gap; a time index below
    the last one seen, or the same one at the acquisition's first other axes, starts a new
    acquisition, numbered on after the last frame sent, so one hook serves several
    acquisitions into one daemon run, in any channel each), else the seq after the last frame
    sent. Timestamp: `frame_time_s` (the simulated camera's tag, else the core's
    ``TimeReceivedByCore``), else the acquisition's ``ElapsedTime-ms`` anchored to the wall
    clock at its first frame, else the arrival time. Focus: the first
    finite of ``ZPosition_um``, ``ZPosition_um_Intended``, ``DeepZ-Focus-um``, else none (the
    scope did not say; never 0). A frame whose ``Axes`` tag leaves the time series
    (`AxisGuard`) refuses the acquisition: it and every later frame of it are counted in
    ``sender.refused`` and not sent; the next acquisition through the same hook starts
    afresh (`_follow_acquisition`).
    """

    def __init__(
        self, sender: FrameSender, *, seq_key: str | None = None, first_seq: int = 0
    ) -> None:
        if not 0 <= first_seq <= MAX_SEQ:
            raise ValueError(f"first_seq must be 0 … {MAX_SEQ}, got {first_seq}")
        self.sender = sender
        self.seq_key = seq_key
        self.first_seq = first_seq
        self.guard = AxisGuard()
        self._count = 0
        self._clock_offset_s: float | None = None
        self._base = first_seq  # the seq of time point 0 of the acquisition under way
        self._last_t: int | None = None  # the last time index sent
        self._seen_t: int | None = None  # the last time index seen, sent or refused
        self._rebase = False  # the next frame with a time index begins a new acquisition
        self._first_others: dict[str, Any] | None = None  # non-time axes of its first frame

    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, Any]:
        """Send `image` (never blocking, never raising) and return ``(image, metadata)``."""
        try:
            tag = metadata.get("Axes")
            axes: Mapping[str, Any] = tag if isinstance(tag, Mapping) else {}
            self._follow_acquisition(axes)
            refusal = self.guard.check(axes)
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

    def _follow_acquisition(self, axes: Mapping[str, Any]) -> None:
        """Start afresh (guard, clock, numbering) when this frame begins the next acquisition.

        A hook serves one acquisition after another, and pycromanager says nothing when one
        begins. A time index below the last one seen is the next acquisition's first frame,
        whatever its other axes (a time series in another channel, review 76); the same time
        index again is one too when its other axes are those of the acquisition's first frame
        (or it has none), and otherwise a second position of a multi-dimensional acquisition,
        which the guard refuses, with every later frame of it. A refused acquisition then
        costs only itself. Each acquisition's ``ElapsedTime-ms`` counts from its own start, so
        the clock is anchored afresh too.
        """
        others = {str(k): v for k, v in axes.items() if k not in _TIME_AXES}
        t = _time_index(axes)
        seen, self._seen_t = self._seen_t, (t if t is not None else self._seen_t)
        if self._first_others is None:
            self._first_others = others
            return
        if t is None or seen is None:
            return
        if t < seen or (t == seen and (not others or others == self._first_others)):
            self.guard = AxisGuard()
            self._first_others = others
            self._clock_offset_s = None
            self._rebase = True

    def _seq(self, metadata: Mapping[str, Any]) -> int | None:
        """Return the frame's sequence number (see the class docstring); None if unreadable."""
        if self.seq_key is not None and self.seq_key in metadata:
            return frame_number(metadata[self.seq_key])
        axes = metadata.get("Axes")
        t = _time_index(axes) if isinstance(axes, Mapping) else None
        after_last = max(self.first_seq, self.sender.next_seq)  # refused frames take no seq
        if t is None:
            seq = after_last
        else:
            if self._rebase or (self._last_t is None and self._count > 0):
                # a new acquisition, or frames without a time axis came first: numbered on
                # after the last frame sent, not from the start again (duplicates)
                self._base = after_last - t
                self._rebase = False
            self._last_t = t
            seq = self._base + t
        return seq if 0 <= seq <= MAX_SEQ else None

    def _timestamp(self, metadata: Mapping[str, Any]) -> float:
        """Return the frame's wall-clock time (see the class docstring)."""
        stamp = frame_time_s(metadata)
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
    first_seq: int = 0,
) -> PycromanagerHook:
    """Make a pycromanager ``image_process_fn`` that pushes frames to `endpoint`.

    Pass it as ``Acquisition(..., image_process_fn=hook)``; it returns ``(image, metadata)``
    so Micro-Manager still stores the data. ``hook.sender`` holds the counts; close it after
    the acquisition. See the module docstring for a complete example. `keys`: CURVE client
    keys when the endpoint uses CURVE (see the module docstring). `first_seq`: the seq of
    time point 0 (a second acquisition into the same daemon run starts past the first's).
    """
    sender = FrameSender(endpoint, hwm=hwm, context=context, keys=keys, immediate=True)
    return PycromanagerHook(sender, seq_key=seq_key, first_seq=first_seq)


def attach_to_pymmcore_plus(
    core: CMMCorePlus,
    endpoint: str,
    *,
    hwm: int = 2000,
    context: zmq.Context[Any] | None = None,
    keys: ClientKeys | None = None,
) -> FrameSender:
    """Send every frame of the core's MDA runs to `endpoint` (``mda.events.frameReady``).

    Seq: the event's time index (``index["t"]``, so a lost time point is a gap) after the
    last seq of the previous runs (numbering continues from run to run), else the sender's
    count. Timestamp: `frame_time_s` of the camera's metadata, else the arrival time. Focus:
    the event's ``z_pos``, else the stage position pymmcore-plus recorded with the frame
    (``position["z"]``), else the camera's focus tag, else none. A run with more than one
    channel, z plane, position or grid tile (``MDASequence.sizes``, or the events' ``index``
    as they come) is refused (`AxisGuard`): its frames are counted in ``sender.refused`` and
    not sent.
    Disconnect by closing the returned sender (``sender.close()``). `keys`: CURVE client
    keys when the endpoint uses CURVE (see the module docstring).
    """
    sender = FrameSender(endpoint, hwm=hwm, context=context, keys=keys, immediate=True)
    guard = AxisGuard()
    run_first_seq = [0]  # the seq of this run's time point 0

    def on_start(sequence: Any, *_: Any) -> None:
        """Check a new run's axis sizes before its first frame (`refuse` logs at that frame)."""
        sizes = getattr(sequence, "sizes", None)
        guard.expect(sizes if isinstance(sizes, Mapping) else {})
        run_first_seq[0] = sender.next_seq

    def on_frame(image: np.ndarray, event: Any, meta: Mapping[str, Any]) -> None:
        """Send one MDA frame; runs on the MDA runner's thread."""
        index = getattr(event, "index", None)
        refusal = guard.check(index if isinstance(index, Mapping) else {})
        if refusal is not None:
            sender.refuse(refusal)
            return
        camera_meta = meta.get("camera_metadata") or {}
        t = _time_index(index) if isinstance(index, Mapping) else None
        sender.send(
            image,
            seq=None if t is None else run_first_seq[0] + t,
            timestamp_s=frame_time_s(camera_meta),
            focus_um=_mda_focus(event, meta, camera_meta),
        )

    events = core.mda.events
    events.sequenceStarted.connect(on_start)
    events.frameReady.connect(on_frame)
    sender._on_close.append(lambda: events.frameReady.disconnect(on_frame))
    sender._on_close.append(lambda: events.sequenceStarted.disconnect(on_start))
    return sender


def _time_index(axes: Mapping[str, Any]) -> int | None:
    """Return the time index of a frame's axes (``time`` or ``t``) if it is a frame number."""
    for name in _TIME_AXES:
        if name in axes:
            return frame_number(axes[name])
    return None


def _mda_focus(event: Any, meta: Mapping[str, Any], camera_meta: Mapping[str, Any]) -> float | None:
    """Return a pymmcore-plus frame's focus (µm): the stage's, the plan's z, the camera's tag.

    The stage position pymmcore-plus records with each snapped frame (``meta["position"]
    ["z"]``) comes first: it is where the focus was, and it follows what the plan did not
    command (an autofocus, a hand on the knob), which a focus lock must follow (review 84: the
    plan's intended z came first; the tag path already preferred the measured position). A
    hardware-sequenced frame has no position: the plan's ``event.z_pos``, else the camera's
    tag (the simulated one tags its frames).
    """
    position = meta.get("position")
    for value in (
        position.get("z") if isinstance(position, Mapping) else None,
        getattr(event, "z_pos", None),
    ):
        number = metadata_float({"z": value}, ("z",))
        if number is not None:
            return number
    return metadata_float(camera_meta, _FOCUS_KEYS)


def _refuse_bind_address(endpoint: str) -> None:
    """Refuse an address a daemon binds but a sender cannot reach: a wildcard host."""
    if is_wildcard(endpoint):
        raise ValueError(
            f"{endpoint!r} is an address the daemon binds (every interface), not one to send "
            "to: give the daemon's host, e.g. tcp://scope-pc:5555 (FrameSender.for_config's "
            "endpoint)"
        )
