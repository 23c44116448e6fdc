"""Frame sources behind one interface: the simulated scope, replay of a recording, Micro-Manager.

Every source implements `Source` (``run(sender, stop) -> SourceSummary``) and is made from the
config by `make_source`:

- `SimulatedScope` (``source.kind = "simulated"``): the optics simulator's moving, firing worm
  (`engine.optics.WormTimeSeries`) as the pixels of a Python camera inside a real
  Micro-Manager core (pymmcore-plus `UniMMCore`), running a sequence acquisition paced at
  ``rate_hz``; each frame carries the time it was exposed.
- `ReplaySource` (``"replay"``): a recorded TIFF or OME-Zarr (this project's recordings, or any
  NGFF image with axes t, y, x) sent at its original rate or a chosen one, optionally looped.
- `MicroManagerSource` (``"micromanager"``): with ``acquisition = "core"`` the daemon runs a
  Micro-Manager hardware configuration itself (``config_file``, or Micro-Manager's demo
  configuration when unset); with ``"hook"`` a Micro-Manager acquisition elsewhere pushes
  frames through `live.hook` and the daemon only listens.

pymmcore-plus is imported only when a Micro-Manager source runs (``pip install
'deepz-live[mm]'``), so importing this module stays light.
"""

from __future__ import annotations

import bisect
import importlib.util
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from live.seams import Source, SourceSummary

if TYPE_CHECKING:
    from live.config import ScopeConfig
    from live.hook import FrameSender

__all__ = [
    "SOURCE_KINDS",
    "STALL_AFTER_S",
    "MicroManagerSource",
    "Recording",
    "ReplayError",
    "ReplaySource",
    "SimulatedScope",
    "Source",
    "SourceFailed",
    "SourceSummary",
    "make_source",
    "open_recording",
    "replay_rate_hz",
]

log = logging.getLogger(__name__)

SOURCE_KINDS = ("simulated", "replay", "micromanager")
"""Accepted values of ``source.kind``."""

BANK_MB = 256.0
"""Memory the simulated scope may spend on pre-rendered frames."""
RING_BUFFER_S = 2.0
"""Seconds of frames the camera's circular buffer holds (`ring_buffer_mb`)."""
RING_MIN_MB = 16
"""The smallest ring buffer (a slow, small camera still bridges a stall of the sender)."""
RING_MAX_MB = 1024
"""The largest ring buffer: Micro-Manager's own default (a shorter bridge at a high rate)."""

_EMPTY_POLL_S = 0.001
"""Sleep between polls of the Micro-Manager core's buffer while it is empty. Each poll is two
calls into the core; at 0.5 ms the source thread took 7 % of a core at 12 Hz (session 9). 1 ms
adds at most 1 ms of latency (a 100 Hz frame period is 10 ms)."""
_ENDLESS = 2**31 - 1
_TIME_UNITS_S = {"second": 1.0, "millisecond": 1e-3, "microsecond": 1e-6, "minute": 60.0}

FrameFn = Callable[[int, float], np.ndarray]


class SourceFailed(RuntimeError):
    """A source that stopped by itself, with `summary`: what it did up to then.

    Its sent and dropped frames, named by seq, belong in the run's summary all the same
    (review 81: they were left out, and the summary said acquired = received).
    """

    def __init__(self, message: str, summary: SourceSummary) -> None:
        super().__init__(message)
        self.summary = summary


STALL_AFTER_S = 2.0
"""A camera that sends no frame for this long, or for ten frame periods and an exposure if
that is longer, is said to have stalled (once, and again when frames come back): a lost
trigger or cable otherwise shows only as 0 Hz in the status line (review 81). The run goes on:
an externally triggered camera may be waiting for its triggers."""


class _Run:
    """Counts one source run against a (possibly shared) sender and makes its summary."""

    def __init__(self, name: str, sender: FrameSender) -> None:
        self.name = name
        self.sender = sender
        self._sent0 = sender.sent
        self._dropped0 = sender.dropped
        self._seqs0 = len(sender.dropped_seqs)
        self.start = time.perf_counter()

    def restart_clock(self) -> None:
        """Start timing now, after any set-up (rendering, opening files, loading a core).

        Also tells the daemon that acquisition begins (`FrameSender.acquiring`), so its run
        clock and ``--duration`` do not count the source's set-up.
        """
        self.start = time.perf_counter()
        self.sender.acquiring.set()

    def summary(self) -> SourceSummary:
        """Return what the sender did since this run began."""
        duration = max(time.perf_counter() - self.start, 1e-9)
        sent = self.sender.sent - self._sent0
        dropped = self.sender.dropped - self._dropped0
        return SourceSummary(
            name=self.name,
            frames_sent=sent,
            frames_dropped=dropped,
            dropped_seqs=tuple(self.sender.dropped_seqs[self._seqs0 :]),
            duration_s=duration,
            achieved_rate_hz=(sent + dropped) / duration,
        )


# ------------------------------------------------------------------ Micro-Manager cores


def ring_buffer_mb(frame_bytes: int, rate_hz: float) -> int:
    """Size of the camera's circular buffer: `RING_BUFFER_S` of frames, within bounds.

    At least `RING_MIN_MB`, at most `RING_MAX_MB` (a mistyped rate must not ask for tens of
    GB). The source pops frames as they arrive, so the buffer only has to bridge a stall of the
    sending thread. Micro-Manager's Python core allocates 1 GiB by default, and its pages are
    touched (resident) as the ring advances: sized here, the daemon's memory is flat after
    the first lap (`benchmarks.soak`).
    """
    needed = RING_BUFFER_S * rate_hz * frame_bytes / 2**20
    return min(RING_MAX_MB, max(RING_MIN_MB, math.ceil(needed)))


def _stream_core(
    run: _Run, core: Any, stop: threading.Event, frame_count: int | None, rate_hz: float
) -> SourceSummary:
    """Run a sequence acquisition on `core` and send every frame until stop or count.

    Frames are popped from the core's circular buffer (`ring_buffer_mb` for `rate_hz`) as
    they arrive. When `stop` is set the camera stops and the frames already in the buffer
    are still sent: acquired frames are never thrown away here.
    """
    from live._mmcore import (
        META_FOCUS_UM,
        META_FRAME_INDEX,
        halt_simulated_camera,
        set_ring_buffer,
    )

    frame_bytes = int(core.getImageBufferSize())
    mb = ring_buffer_mb(frame_bytes, rate_hz)
    set_ring_buffer(core, mb, frame_bytes)
    log.info("camera ring buffer: %d MB (%.0f s of frames at %g Hz)", mb, RING_BUFFER_S, rate_hz)
    run.restart_clock()
    core.startSequenceAcquisition(frame_count or _ENDLESS, 0.0, True)
    keys = (META_FRAME_INDEX, META_FOCUS_UM)
    stall_s = max(STALL_AFTER_S, 10.0 / rate_hz + float(core.getExposure()) / 1000.0)
    last_frame_s, stalled = time.monotonic(), False
    try:
        while not stop.is_set():
            if core.getRemainingImageCount() > 0:
                _send_popped(run.sender, core, keys)
                last_frame_s = time.monotonic()
                if stalled:
                    stalled = False
                    log.warning("the camera %s sends frames again", core.getCameraDevice())
            elif not core.isSequenceRunning():
                break
            else:
                if not stalled and time.monotonic() - last_frame_s > stall_s:
                    stalled = True
                    log.error(
                        "the camera %s has sent no frame for %.1f s (%g Hz asked): a lost "
                        "trigger, a cable? Waiting for it",
                        core.getCameraDevice(),
                        stall_s,
                        rate_hz,
                    )
                time.sleep(_EMPTY_POLL_S)
    finally:
        halt_simulated_camera(core)  # its wait for a far due time would outlast the stop
        core.stopSequenceAcquisition()
        # acquired frames are sent even when the loop failed: each one on its own, so a
        # frame that fails costs that frame (counted), never the ones behind it
        for _ in range(core.getRemainingImageCount()):
            try:
                _send_popped(run.sender, core, keys)
            except Exception as err:  # the core or a device adapter: many types
                run.sender.lose(None, f"a frame left in the camera's buffer: {err}")
    summary = run.summary()
    acquired = summary.frames_sent + summary.frames_dropped
    if not stop.is_set() and (frame_count is None or acquired < frame_count):
        # the camera stopped by itself: its own thread failed (pymmcore-plus only logs that)
        # or the ring overflowed. A failed source, not a finished run: the daemon says so.
        why = (
            "the core's circular buffer overflowed"
            if core.isBufferOverflowed()
            else "the camera failed (its error is logged above)"
        )
        wanted = "" if frame_count is None else f" of {frame_count}"
        raise SourceFailed(
            f"the camera's sequence acquisition stopped by itself after {acquired}{wanted} "
            f"frames: {why}",
            summary,
        )
    return summary


def _send_popped(sender: FrameSender, core: Any, keys: tuple[str, str]) -> None:
    """Pop the oldest frame from the core and send it with its seq, timestamp and focus.

    The timestamp is `live.hook.frame_time_s` (the camera's own, else when the frame reached
    the core), not the time it is popped: frames held in the ring through a stall keep theirs.
    """
    from live.hook import frame_number, frame_time_s, metadata_float

    image, popped = core.popNextImageAndMD()
    # pymmcore-plus's Metadata raises KeyError from get(key) for a tag the adapter did not
    # write (any camera but the simulated one): read it as the plain mapping of text it is
    meta = dict(popped)
    index_key, focus_key = keys
    # the core's metadata is text a device adapter wrote: a value that is not a number is no
    # value (the sender's own count, the arrival time, no focus), never the end of the stream
    seq = meta.get(index_key) or meta.get("ImageNumber")
    sender.send(
        image,
        seq=frame_number(seq) if seq not in (None, "") else None,
        timestamp_s=frame_time_s(meta),
        focus_um=metadata_float(meta, (focus_key,)),  # None: the core did not say
    )


class _FrameBank:
    """Simulator frames at one focus, rendered once each and played in a loop.

    The optics simulator renders a 256² worm frame in about 14 ms on this project's 2-core
    build machine: too slow to feed a 100 Hz camera live. The bank holds `n` consecutive
    frames (n / rate_hz seconds of worm motion and firing) that the camera cycles; `fill`
    renders them all up front (the simulated scope does, before its camera starts), else each
    is rendered on first use. Frames at another focus are rendered live.
    """

    def __init__(self, render: FrameFn, n: int, focus_um: float = 0.0) -> None:
        self._render = render
        self.focus_um = focus_um
        self.frames: list[np.ndarray | None] = [None] * n

    def fill(self) -> None:
        """Render every frame of the bank now."""
        for i in range(len(self.frames)):
            self(i, self.focus_um)

    def __call__(self, index: int, focus_um: float) -> np.ndarray:
        """Return frame `index` (from the bank when at the bank's focus)."""
        if focus_um != self.focus_um:
            return self._render(index, focus_um)
        slot = index % len(self.frames)
        frame = self.frames[slot]
        if frame is None:
            frame = self.frames[slot] = self._render(slot, focus_um)
        return frame


class SimulatedScope:
    """The simulated microscope: a worm imaged by a Python camera in a real Micro-Manager core.

    Parameters
    ----------
    frame_shape : (int, int)
        Camera frame (height, width) in pixels.
    rate_hz : float
        Camera frame rate; frames are due every ``1 / rate_hz`` s and stamped when exposed.
    frame_count : int, optional
        Stop after this many frames (None: until `stop` is set).
    exposure_ms, pixel_size_um : float
        Reported by the core (exposure) and set as its pixel size.
    frame_fn : callable, optional
        ``frame_fn(index, focus_um) -> (H, W) uint16`` instead of the worm simulator (tests).
    simulator : dict, optional
        Keyword arguments of `engine.optics.WormTimeSeries` (``optics``, ``camera``, ``seed``).
    bank_frames : int
        How many consecutive worm frames to pre-render and cycle (capped by `BANK_MB`).
    """

    name = "simulated"

    def __init__(
        self,
        frame_shape: tuple[int, int],
        *,
        rate_hz: float,
        frame_count: int | None = None,
        exposure_ms: float = 10.0,
        pixel_size_um: float = 1.0,
        frame_fn: FrameFn | None = None,
        simulator: dict[str, Any] | None = None,
        bank_frames: int = 100,
    ) -> None:
        _check_shape(frame_shape, "source.frame_shape")
        _check_rate(rate_hz, "source.rate_hz")
        if frame_count is not None and frame_count < 1:
            raise ValueError(f"source.frame_count must be >= 1 or unset, got {frame_count}")
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.rate_hz = float(rate_hz)
        self.frame_count = frame_count
        self.exposure_ms = exposure_ms
        self.pixel_size_um = pixel_size_um
        self.frame_fn = frame_fn
        self.simulator = dict(simulator or {})
        self.bank_frames = bank_frames
        self.core: Any = None

    def _worm_frames(self) -> FrameFn:
        """Build the worm simulator's frame bank, rendered before the camera starts.

        A real camera costs the inference cores nothing; rendering frames during the run
        would (14 ms per 256² frame on 2 cores: 14 % of a core at 10 Hz for the bank's first
        loop), and would make the live benchmarks measure the simulator too.
        """
        from engine.optics import WormTimeSeries

        series = WormTimeSeries(self.frame_shape, rate_hz=self.rate_hz, **self.simulator)
        frame_mb = math.prod(self.frame_shape) * 2 / 2**20
        n = max(1, min(self.bank_frames, int(BANK_MB / frame_mb), self.frame_count or _ENDLESS))
        bank = _FrameBank(series.frame, n)
        started = time.perf_counter()
        bank.fill()
        log.info(
            "simulated scope: %d worm frames pre-rendered in %.1f s (a %.2f s loop at %g Hz)",
            n,
            time.perf_counter() - started,
            n / self.rate_hz,
            self.rate_hz,
        )
        return bank

    def run(self, sender: FrameSender, stop: threading.Event) -> SourceSummary:
        """Acquire frames from the simulated camera at ``rate_hz`` and send each one."""
        from live._mmcore import make_simulated_core

        run = _Run(self.name, sender)
        self.core = make_simulated_core(
            self.frame_fn or self._worm_frames(),
            self.frame_shape,
            rate_hz=self.rate_hz,
            exposure_ms=self.exposure_ms,
            pixel_size_um=self.pixel_size_um,
        )
        return _stream_core(run, self.core, stop, self.frame_count, self.rate_hz)


class MicroManagerSource:
    """Frames from Micro-Manager.

    With ``acquisition="core"`` this source loads `config_file` into a pymmcore-plus core
    (Micro-Manager's demo configuration when None; C++ device adapters come from a
    Micro-Manager installation, ``mmcore install``) and runs the camera's sequence
    acquisition itself. The core `live.config.resolve_geometry` loaded to read the geometry
    is claimed rather than loaded again (`live._mmcore.claim_core`), and its devices are
    unloaded when the run ends. With ``acquisition="hook"`` the daemon only listens: a
    Micro-Manager acquisition elsewhere (the desktop application with pycromanager, or a
    pymmcore-plus script) pushes frames to ``endpoints.frames`` with
    `live.hook.pycromanager_image_process_fn` or `live.hook.attach_to_pymmcore_plus`, and
    `run` just waits for `stop`.
    """

    name = "micromanager"

    def __init__(
        self,
        endpoint: str,
        *,
        acquisition: Literal["core", "hook"] = "core",
        config_file: str | Path | None = None,
        camera: str | None = None,
        frame_count: int | None = None,
        rate_hz: float = 100.0,
        exposure_ms: float | None = None,
    ) -> None:
        if acquisition not in ("core", "hook"):
            raise ValueError(
                f"source.micromanager.acquisition must be 'core' or 'hook', got {acquisition!r}"
            )
        self.endpoint = endpoint
        self.acquisition = acquisition
        self.config_file = Path(config_file) if config_file else None
        self.camera = camera
        self.frame_count = frame_count
        self.rate_hz = rate_hz
        self.exposure_ms = exposure_ms
        """Set on the core's camera before the acquisition; None keeps the camera's own."""
        if self.config_file is not None and not self.config_file.is_file():
            raise FileNotFoundError(
                f"source.micromanager.config_file {str(self.config_file)!r} does not exist"
            )

    def run(self, sender: FrameSender, stop: threading.Event) -> SourceSummary:
        """Run the configured core's camera, or listen for a hooked acquisition."""
        run = _Run(self.name, sender)
        if self.acquisition == "hook":
            log.info(
                "waiting for frames from Micro-Manager on %s: add "
                "image_process_fn=live.hook.pycromanager_image_process_fn(%r) to your "
                "pycromanager Acquisition",
                self.endpoint,
                self.endpoint,
            )
            run.restart_clock()  # the daemon is listening: that is this source's acquisition
            stop.wait()
            return replace(run.summary(), external=True)
        from live._mmcore import claim_core  # ImportError with the install hint without 'mm'

        core = claim_core(self.config_file, self.camera)
        try:
            self._set_exposure(core)
            return _stream_core(run, core, stop, self.frame_count, self.rate_hz)
        finally:
            core.unloadAllDevices()  # release the hardware

    def _set_exposure(self, core: Any) -> None:
        """Give the camera ``source.exposure_ms`` when the config names one; say what it runs.

        A camera that refuses the value runs at its own, said in one error line (the frames
        still come); an exposure longer than the frame interval is said too: the camera
        cannot then keep ``source.rate_hz``.
        """
        if self.exposure_ms is not None:
            try:
                core.setExposure(self.exposure_ms)
            except Exception as err:  # a device error (pymmcore's CMMError and friends)
                log.error(
                    "source.exposure_ms = %g: the camera refused it (%s: %s); it runs at its own",
                    self.exposure_ms,
                    type(err).__name__,
                    " ".join(str(err).split()),
                )
        exposure_ms = float(core.getExposure())
        log.info("camera %s: exposure %.4g ms", core.getCameraDevice(), exposure_ms)
        if exposure_ms > 1000 / self.rate_hz:
            log.warning(
                "the camera's exposure (%.4g ms) is longer than a frame at source.rate_hz = %g "
                "(%.4g ms): it cannot keep that rate",
                exposure_ms,
                self.rate_hz,
                1000 / self.rate_hz,
            )


# ------------------------------------------------------------------------------ replay


@dataclass(frozen=True)
class Recording:
    """Frames of a recording opened for replay.

    Attributes
    ----------
    frames : array-like (T, H, W)
        Indexable by time point; read lazily where the format allows.
    indices : sequence of int
        The time points that hold frames, ascending and each once (all of them, except gaps
        in our recordings).
    rate_hz : float or None
        The original frame rate, when the file says (a finite rate > 0, except a TIFF's
        ``finterval``, which is kept as written so that a bad one is refused naming the file).
    timestamps_s, focus_um : array (T,) float64 or None
        Each time point's camera timestamp and focus as recorded (this project's run stores
        keep them in ``frames/``; NaN where a frame has none), or None when the file has none.
    """

    frames: Any
    indices: Sequence[int]
    rate_hz: float | None
    timestamps_s: np.ndarray | None = None
    focus_um: np.ndarray | None = None

    def stamp(self, t: int) -> tuple[float | None, float | None]:
        """Return the recorded (timestamp_s, focus_um) of time point `t`, None where unknown."""
        return _recorded(self.timestamps_s, t), _recorded(self.focus_um, t)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(H, W) of one frame."""
        return (int(self.frames.shape[-2]), int(self.frames.shape[-1]))


class ReplaySource:
    """Replay a recorded TIFF or OME-Zarr as if a camera were acquiring it.

    Frame ``t`` of the file is sent with the recording's own sequence number, ``seq = t``
    (this project's stores are indexed by seq, so gaps stay gaps), and its own camera
    timestamp and focus where the file has them (a run store's ``frames/timestamp_s`` and
    ``frames/focus_um``); a file without them is stamped with the time each frame is sent and
    sent with no focus. Frames go out at ``start + (seq - first seq) / rate_hz``. The rate is
    `rate_hz` if given, else the file's own (ImageJ ``finterval``, NGFF time scale), else
    `default_rate_hz` (`replay_rate_hz` says which, from a config). Each completed loop adds
    the file's length to the seqs and the recording's duration to the timestamps, so a looped
    replay never repeats a seq (the daemon would refuse it as a duplicate).
    """

    name = "replay"

    def __init__(
        self,
        path: str | Path,
        *,
        rate_hz: float | None = None,
        loop: bool = False,
        frame_count: int | None = None,
        default_rate_hz: float | None = None,
        frame_shape: tuple[int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.recording = open_recording(self.path, frame_shape)
        own = self.recording.rate_hz
        self.rate_hz = _replay_rate_hz(rate_hz, own, default_rate_hz, self.path)
        # a looped replay's timestamps advance by the recording's own duration, at its own
        # rate where that is usable (a chosen rate may stand in for a file's bad one)
        lap_rate = own if own is not None and _is_rate(own) else self.rate_hz
        self._lap_s = int(self.recording.frames.shape[0]) / lap_rate
        self.loop = loop
        self.frame_count = frame_count

    def _schedule(self) -> Any:
        """Yield (seq, index) in replay order, looping if asked, up to frame_count."""
        indices = self.recording.indices  # a range or `_Runs`: not listed (it may be long)
        period = int(self.recording.frames.shape[0])
        sent, lap = 0, 0
        while True:
            for t in indices:
                if self.frame_count is not None and sent >= self.frame_count:
                    return
                yield lap * period + t, t
                sent += 1
            lap += 1
            if not self.loop:
                return

    def run(self, sender: FrameSender, stop: threading.Event) -> SourceSummary:
        """Send the recording's frames at the replay rate until done, count or stop."""
        run = _Run(self.name, sender)
        run.restart_clock()
        period = int(self.recording.frames.shape[0])
        first: int | None = None
        for seq, t in self._schedule():
            first = seq if first is None else first
            try:
                frame = _as_counts(np.ascontiguousarray(self.recording.frames[t]))
            except Exception as err:  # zarr and tifffile raise many types for damaged data
                sender.lose(seq, f"replay frame {t} of {self.name} cannot be read: {err}")
                continue
            due = run.start + (seq - first) / self.rate_hz
            wait = due - time.perf_counter()
            if wait > 0 and stop.wait(wait):
                break
            if stop.is_set():
                break
            stamp, focus = self.recording.stamp(t)
            if stamp is not None:
                stamp += (seq // period) * self._lap_s
            sender.send(frame, seq=seq, timestamp_s=stamp, focus_um=focus)
        return run.summary()


def _as_counts(frame: np.ndarray) -> np.ndarray:
    """Return an integer frame as uint16 when its values are camera counts, else as it is.

    The wire carries no int64 or uint64 (`live.protocol.ALLOWED_DTYPES`), numpy's default
    integers: such a recording passed `_check_counts` and then had every frame dropped by the
    sender (review 81). The cast is exact, so nothing changes for the recorder, which keeps
    uint16; a frame whose values do not fit goes as it is, to be refused and counted.
    """
    if frame.dtype.kind in "iu" and frame.dtype != np.uint16 and frame.size:
        if int(frame.min()) >= 0 and int(frame.max()) <= 65535:
            return frame.astype(np.uint16)
    return frame


def replay_rate_hz(config: ScopeConfig) -> float:
    """Return the rate (Hz) at which the configured source sends frames, for the pre-flight.

    For ``source.kind = "replay"`` the rate `ReplaySource` will use, chosen by the same
    function (`_replay_rate_hz`): ``source.replay.rate_hz``, else the recording's own rate,
    else ``source.rate_hz``; only the recording's metadata is read. For any other source kind,
    ``source.rate_hz``. The pre-flight and the `Recorder` (which divides by it) get this rate.

    Raises
    ------
    ValueError
        The rate that would be used is not a finite number > 0, naming where it came from
        (`ReplayError` for a recording that cannot be read).
    """
    src = config.source
    if src.kind != "replay" or src.replay.path is None:
        return float(src.rate_hz)
    path = Path(src.replay.path)
    own = _recording_rate_hz(path) if src.replay.rate_hz is None else None
    return _replay_rate_hz(src.replay.rate_hz, own, float(src.rate_hz), path)


def _replay_rate_hz(
    chosen: float | None, own: float | None, default: float | None, path: Path
) -> float:
    """Return the rate a replay of `path` sends at: `chosen`, else `own`, else `default`.

    The one place that picks it, for `ReplaySource` and `replay_rate_hz` alike: the source and
    the daemon's pre-flight and recorder must agree. A value that is given is used (None means
    not given; 0 is a bad rate, not a missing one) and must be a finite rate > 0; the error
    names where it came from, since a file's own rate (ImageJ ``finterval``) can be bad.
    """
    if chosen is not None:
        rate, where = chosen, "source.replay.rate_hz"
    elif own is not None:
        rate, where = own, f"the frame rate of {str(path)!r}"
    elif default is not None:
        rate, where = default, "source.rate_hz"
    else:
        raise ValueError(f"{str(path)!r} does not say its frame rate: set source.replay.rate_hz")
    _check_rate(float(rate), where)
    return float(rate)


def _recording_rate_hz(path: Path) -> float | None:
    """Return the frame rate a recording's metadata states (no pixel read), or None."""
    with _reading(path):
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return _tiff_rate_hz(tif)
        return _open_zarr(path, None).rate_hz  # zarr reads lazily: metadata only


def _tiff_rate_hz(tif: Any) -> float | None:
    """Return the frame rate of an open TIFF from ImageJ's ``finterval`` (s), or None."""
    interval = (tif.imagej_metadata or {}).get("finterval")
    return 1.0 / float(interval) if interval else None


def _recorded(values: np.ndarray | None, t: int) -> float | None:
    """Return ``values[t]`` as a float, or None when absent, out of range or NaN."""
    if values is None or values.ndim != 1 or not 0 <= t < values.shape[0]:
        return None
    value = float(values[t])
    return value if math.isfinite(value) else None


class ReplayError(ValueError):
    """A recording that cannot be replayed; the message names the file and why, in one line."""


def open_recording(path: str | Path, frame_shape: Sequence[int] | None = None) -> Recording:
    """Open a TIFF (``.tif``/``.tiff``) or a Zarr / OME-Zarr store for replay.

    `frame_shape`, when given (``source.frame_shape``), is compared with the frames' shape as
    the file's metadata states it, before any pixel is read: the memory replay takes is set
    by the config, not by the file. Then the first frame is read to check its values.

    Raises
    ------
    ReplayError
        The file is not one of those formats, cannot be read, holds no frames, its image is
        not (t, y, x), its frames are not `frame_shape` or its values are not camera counts.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source.replay.path {str(path)!r} does not exist")
    if path.suffix.lower() not in (".tif", ".tiff") and not path.is_dir():
        raise ReplayError(
            f"cannot replay {str(path)!r}: expected a .tif/.tiff file or a Zarr/OME-Zarr directory"
        )
    shape = None if frame_shape is None else (int(frame_shape[0]), int(frame_shape[1]))
    with _reading(path):
        recording = _open_tiff(path, shape) if path.is_file() else _open_zarr(path, shape)
        if not recording.indices:
            raise ReplayError(f"cannot replay {str(path)!r}: it holds no frames")
        first = np.asarray(recording.frames[recording.indices[0]])
    _check_counts(first, path)
    return recording


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn any failure while reading `path` into one `ReplayError` line naming the file.

    The file is input: tifffile, zarr and the attributes' JSON raise many types for a
    damaged or forged one. Our own `ReplayError` (it names the file already) passes as is.
    """
    try:
        yield
    except ReplayError:
        raise
    except Exception as err:
        detail = " ".join(str(err).split())
        raise ReplayError(f"cannot replay {str(path)!r}: {type(err).__name__}: {detail}") from err


def _check_counts(first: np.ndarray, path: Path) -> None:
    """Raise `ReplayError` unless the first frame holds camera counts (whole numbers 0 … 65535).

    The daemon records raw frames as uint16 camera counts and refuses any other value
    (`live.recorder`): a recording of others would replay with nothing recorded. Only a
    numeric frame's range is computed (a string, bool or complex one has none to show).
    """
    if first.dtype.kind not in "uif":
        described = f"{first.dtype} of shape {list(first.shape)}"
    elif first.dtype.kind == "f" and not bool(
        np.all(np.isfinite(first) & (first == np.round(first)))
    ):
        described = f"{first.dtype}, {first.min():g} … {first.max():g}"
    elif first.min() < 0 or first.max() > 65535:
        described = f"{first.dtype}, {first.min():g} … {first.max():g}"
    else:
        return
    raise ReplayError(
        f"cannot replay {str(path)!r}: its frames are not camera counts (whole numbers 0 … 65535; "
        f"the first frame is {described})"
    )


def _open_tiff(path: Path, frame_shape: tuple[int, int] | None) -> Recording:
    """Read a TIFF stack (T, H, W) or single frame; the rate from ImageJ's ``finterval``."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, rate = series.axes, _tiff_rate_hz(tif)
        _time_axis(tuple(series.shape), axes, str(path), frame_shape)  # before pixels are read
        pixels: np.ndarray
        try:  # mapped where the file allows (uncompressed, contiguous): frames read as sent
            pixels = tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or scattered: read whole
            pixels = series.asarray()
    frames = _squeeze_to_tyx(pixels, None, str(path), frame_shape)  # axes checked above
    return Recording(frames, range(frames.shape[0]), rate)


def _open_zarr(path: Path, frame_shape: tuple[int, int] | None) -> Recording:
    """Open our recording's raw image, any NGFF image, or a plain (T, H, W) array.

    A run store names its raw image's group (`live.store.image_groups`); another OME-Zarr
    collection (``bioformats2raw.layout``) is replayed from its first image. Nothing but
    metadata is read here: the frames stay on disk, and a run store's per-frame timestamps
    and focus are read for the image's time points only.
    """
    import zarr

    from live.store import frame_metadata, image_groups, present_runs

    node = root = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        frames = _squeeze_to_tyx(node, None, str(path), frame_shape)
        return Recording(frames, range(frames.shape[0]), None)
    present: Any = None
    deepz: Any = node.attrs.get("deepz")
    raw_group = image_groups(deepz).get("raw") if isinstance(deepz, dict) else None
    if raw_group is not None and raw_group in node:
        present = deepz.get("raw_present")
        node = node[raw_group]
    elif isinstance(deepz, dict) and "raw_present" in deepz:
        raise ReplayError(
            f"cannot replay {str(path)!r}: this run kept no raw frames (recorder.keep_raw = false)"
        )
    elif "bioformats2raw.layout" in _as_dict(node.attrs.get("ome")) and "0" in node:
        node = node["0"]
    ome = node.attrs.get("ome", node.attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        raise ReplayError(
            f"{str(path)!r} is a Zarr group without NGFF 'multiscales' metadata or a raw image"
        )
    image = multiscales[0]
    array = node[image["datasets"][0]["path"]]
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in image.get("axes", [])]
    axis_letters = "".join(a[0].upper() for a in axes) or None
    frames = _squeeze_to_tyx(array, axis_letters, str(path), frame_shape, explicit_axes=True)
    n = int(frames.shape[0])
    indices: Sequence[int] = range(n)
    stamps = focus = None
    if present is not None:  # a run store: the frames it holds, each one's timestamp and focus
        try:
            indices = _Runs(present_runs(present, n))
        except ValueError as err:
            raise ReplayError(f"cannot replay {str(path)!r}: raw_present: {err}") from None
        stamps, focus = (
            frame_metadata(root, "timestamp_s", n),
            frame_metadata(root, "focus_um", n),
        )
    return Recording(frames, indices, _ngff_rate_hz(image, axes), stamps, focus)


class _Runs(Sequence[int]):
    """The time points of sorted, disjoint half-open runs, as a sequence that lists none of them.

    A run store's gaps are few and its runs long: listing every index would take memory in
    proportion to the recording's length (or to a forged attribute's).
    """

    def __init__(self, runs: Sequence[tuple[int, int]]) -> None:
        self.runs = list(runs)
        self._ends = list(itertools.accumulate(b - a for a, b in self.runs))
        """Number of time points up to the end of each run."""

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[int]: ...
    def __getitem__(self, i: int | slice) -> int | Sequence[int]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"index {i} of {n} time points")
        run = bisect.bisect_right(self._ends, j)
        before = self._ends[run - 1] if run else 0
        return self.runs[run][0] + j - before

    def __iter__(self) -> Iterator[int]:
        for a, b in self.runs:
            yield from range(a, b)


def _as_dict(value: Any) -> dict[str, Any]:
    """Return `value` if it is a JSON object, else an empty dict."""
    return value if isinstance(value, dict) else {}


def _ngff_rate_hz(image: dict[str, Any], axes: list[str]) -> float | None:
    """Frame rate from the NGFF time axis' unit and first dataset's scale, if both are there.

    None unless the rate is a finite number > 0: a scale of 0, below 0, or so large or small
    that its rate rounds to 0 or infinity says nothing usable (and a rate of 0 would be
    divided by downstream).
    """
    if "t" not in axes:
        return None
    i = axes.index("t")
    unit = image["axes"][i].get("unit") if isinstance(image["axes"][i], dict) else None
    for transform in image["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale" and unit in _TIME_UNITS_S:
            step_s = float(transform["scale"][i]) * _TIME_UNITS_S[unit]
            rate = 1.0 / step_s if step_s > 0 else None
            return rate if rate is not None and _is_rate(rate) else None
    return None


def _time_axis(
    shape: tuple[int, ...],
    axes: str | None,
    where: str,
    frame_shape: tuple[int, int] | None,
    *,
    explicit_axes: bool = False,
) -> int | None:
    """Return which axis of an image of `shape` is time (None: a single frame), from metadata.

    The image must be frames (y, x last; at most one other axis of size > 1), of pixels, and
    of `frame_shape` when that is given; else `ReplayError` says which and names `where`.
    Images that vary along a depth or channel axis are refused when `explicit_axes` (NGFF's
    named axes), else said in a warning and replayed as time points (a TIFF's guessed axes).
    """
    if len(shape) < 2:
        raise ReplayError(f"cannot replay {where}: its image has shape {list(shape)}, not frames")
    if axes is not None and len(axes) == len(shape) and axes[-2:].upper() != "YX":
        raise ReplayError(
            f"cannot replay {where}: its image has axes {axes} (shape {list(shape)}); "
            "replay needs the last two axes to be y, x (colour images are not supported)"
        )
    extra = [i for i, n in enumerate(shape[:-2]) if n != 1]
    if len(shape) == 3:
        extra = [0]
    if len(extra) > 1:
        raise ReplayError(
            f"cannot replay {where}: its image has shape {list(shape)} (axes {axes or '?'}); "
            "replay needs frames (t, y, x), other axes of size 1"
        )
    if extra and axes is not None and len(axes) == len(shape) and axes[extra[0]].upper() in "ZCS":
        what = (
            f"{where}: its images vary along axis {axes[extra[0]]} (axes {axes}, shape "
            f"{list(shape)}), not time"
        )
        if explicit_axes:  # NGFF names its axes: depth or channels would be replayed as
            # consecutive frames, refocused and recorded so, silently (review 81)
            raise ReplayError(
                f"cannot replay {what}; replay takes frames over time (t, y, x), not a "
                "z-stack or channels"
            )
        # a TIFF's axes are often the writer's guess (tifffile calls a plain ImageJ stack CYX,
        # and many time-lapses are saved as slices): said, and replayed as time points
        log.warning("replaying %s: each image is taken as a time point", what)
    if min(shape[-2:]) < 1:
        raise ReplayError(
            f"cannot replay {where}: its image has shape {list(shape)}, frames of no pixels"
        )
    if frame_shape is not None and tuple(shape[-2:]) != tuple(frame_shape):
        raise ReplayError(
            f"source.frame_shape {list(frame_shape)} does not match the frames of {where!r}, "
            f"which are {list(shape[-2:])}"
        )
    return extra[0] if extra else None


def _squeeze_to_tyx(
    array: Any,
    axes: str | None,
    where: str,
    frame_shape: tuple[int, int] | None = None,
    *,
    explicit_axes: bool = False,
) -> Any:
    """Return `array` as (T, H, W), lazily: 2-D gains a T of 1, extra axes must have size 1.

    Checked by `_time_axis` from the array's shape alone; no pixel is read here.
    """
    shape = tuple(int(n) for n in array.shape)
    t_axis = _time_axis(shape, axes, where, frame_shape, explicit_axes=explicit_axes)
    return array if len(shape) == 3 else _Frames(array, t_axis)


class _Frames:
    """A (T, H, W) view of an array whose other leading axes have size 1 (or of a 2-D frame).

    Read a frame at a time: a reshape would read the whole recording into memory first.
    """

    def __init__(self, array: Any, t_axis: int | None) -> None:
        self.array, self.t_axis = array, t_axis
        t = int(array.shape[t_axis]) if t_axis is not None else 1
        self.shape = (t, int(array.shape[-2]), int(array.shape[-1]))

    def __getitem__(self, t: int) -> np.ndarray:
        index = [0] * (len(self.array.shape) - 2)
        if self.t_axis is not None:
            index[self.t_axis] = t
        elif t != 0:
            raise IndexError(f"time point {t} of a recording of one frame")
        return np.asarray(self.array[tuple(index)])


# ------------------------------------------------------------------------------ config


def _check_shape(shape: Sequence[int], key: str) -> None:
    """Raise ValueError naming `key` unless `shape` is two positive integers."""
    if len(shape) != 2 or min(int(n) for n in shape) < 1:
        raise ValueError(f"{key} must be [height, width] > 0, got {list(shape)}")


def _is_rate(rate_hz: float) -> bool:
    """Whether `rate_hz` is a usable frame rate: a finite number > 0 (one can divide by it)."""
    return math.isfinite(rate_hz) and rate_hz > 0


def _check_rate(rate_hz: float, key: str) -> None:
    """Raise ValueError naming `key` unless `rate_hz` is a positive finite number."""
    if not _is_rate(rate_hz):
        raise ValueError(f"{key} must be a positive number of Hz, got {rate_hz!r}")


def _simulator_kwargs(sim: Any) -> dict[str, Any]:
    """WormTimeSeries keyword arguments from the config's ``source.simulator`` section."""
    kwargs: dict[str, Any] = {}
    for key in ("optics", "camera", "seed"):
        value = getattr(sim, key, None)
        if value is not None:
            kwargs[key] = value
    return kwargs  # (source.simulator.sample is "worm": the config allows nothing else)


def _require(modules: Sequence[str], what: str, extra: str) -> None:
    """Raise `ConfigError` naming the extra to install when any of `modules` is missing."""
    from live.config import ConfigError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{what} needs {', '.join(missing)}, not installed here: "
            f"pip install 'deepz-live[{extra}]'"
        )


def make_source(cfg: ScopeConfig) -> Source:
    """Build the source that ``cfg.source.kind`` names, from the rest of the config.

    Raises `live.config.ConfigError` with the install hint when the packages the source needs
    are missing (the simulated scope needs the ``sim`` extra), before anything is started.
    """
    from live.config import SIMULATED_EXPOSURE_MS

    src = cfg.source
    shape = (int(src.frame_shape[0]), int(src.frame_shape[1]))
    if src.kind == "simulated":
        _require(("psfmodels", "pymmcore_plus"), "source.kind = 'simulated'", "sim")
        return SimulatedScope(
            shape,
            rate_hz=float(src.rate_hz),
            frame_count=src.frame_count,
            exposure_ms=SIMULATED_EXPOSURE_MS if src.exposure_ms is None else src.exposure_ms,
            pixel_size_um=float(src.pixel_size_um),
            simulator=_simulator_kwargs(src.simulator),
        )
    if src.kind == "replay":
        if src.replay.path is None:
            raise ValueError("source.kind = 'replay' needs source.replay.path (the recording)")
        return ReplaySource(
            src.replay.path,
            rate_hz=src.replay.rate_hz,
            loop=bool(src.replay.loop),
            frame_count=src.frame_count,
            default_rate_hz=float(src.rate_hz),
            frame_shape=shape,
        )
    if src.kind == "micromanager":
        mm = src.micromanager
        if mm.acquisition == "core":
            _require(("pymmcore_plus",), "source.micromanager.acquisition = 'core'", "mm")
        return MicroManagerSource(
            cfg.endpoints.frames,
            acquisition=mm.acquisition,
            config_file=mm.config_file,
            camera=mm.camera,
            frame_count=src.frame_count,
            rate_hz=src.rate_hz,
            exposure_ms=src.exposure_ms,
        )
    raise ValueError(f"source.kind {src.kind!r} is not known; allowed: {list(SOURCE_KINDS)}")
