"""The run's recording: one OME-Zarr store (NGFF 0.5 on zarr v3) per run, written off-thread.

Layout of ``<recorder.path>/<YYYYmmdd-HHMMSS>.ome.zarr``::

    /                 plain group; attrs["deepz"]: run config, plane positions, which seqs are
                      present in each image (half-open [start, stop) runs), the final summary
    /raw              NGFF image (t, y, x); array /raw/0 uint16, one chunk per
                      ``frames_per_chunk`` time points
    /stacks           NGFF image (t, z, y, x); array /stacks/0 float32, one chunk per time point

The time index is the camera sequence number, so a missing frame is a visible gap (zeros in
the array and a hole in the presence runs). Frames and stacks are queued by the daemon's
threads and written by one background thread; the queue is unbounded because the recorder
never drops a valid item. A write error or a disk below ``min_free_mb`` stops writing, is
logged once in plain words, and everything already written stays readable; the daemon keeps
running.

Each seq is written at most once per image, and only items that fit the store are queued.
`put_frame` / `put_stack` check, on the caller's thread and so in arrival order: the shape;
the dtype (a value that does not convert exactly to the store's dtype is never wrapped or
rounded into it); that the seq is at most `seq_window` past the highest one accepted (a forged
or corrupt seq must not make the arrays, the presence runs and the gap list grow without
bound); and that the seq was not accepted before (the first item wins, a duplicate never
overwrites it). An item that fails is rejected on its own, logged (the first few of each
kind) and counted by kind (`REJECTIONS`) in `Recorder.rejections`, the summary and the
store's attributes; recording goes on for the others. The rules live in `SeqGate`, one per
image; the daemon's router admits raw frames through the recorder's (`Recorder.admit_frame`),
or through a gate of its own when raw frames are not recorded, so a frame the store would
refuse is not refocused or republished either.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, GzipCodec, ZstdCodec

from live.metrics import format_seqs, seq_ranges
from live.supervisor import Supervisor

if TYPE_CHECKING:
    from live.protocol import Message

__all__ = [
    "COMPRESSIONS",
    "RAW_PATH",
    "REJECTIONS",
    "SEQ_WINDOW",
    "STACKS_PATH",
    "Recorder",
    "RecorderSummary",
    "SeqGate",
    "format_rejections",
    "missing_seqs",
    "store_path",
]

log = logging.getLogger(__name__)

RAW_PATH = "raw/0"
"""Array of raw camera frames (t, y, x) inside the store."""
STACKS_PATH = "stacks/0"
"""Array of refocused stacks (t, z, y, x) inside the store."""
COMPRESSIONS = ("none", "zstd", "lz4", "blosc-lz4", "blosc-zstd", "gzip")
"""Accepted values of ``recorder.compression`` ("lz4" is Blosc-LZ4 with bit shuffle)."""

SEQ_WINDOW = 10_000
"""Default of `Recorder`'s ``seq_window``: how far past the highest accepted seq an item may be.

At the 2 Hz default rate that is over 80 minutes of frames lost in a row; anything further is
not a gap but a broken or forged seq."""
REJECTIONS = ("duplicate", "beyond_window", "wrong_shape", "wrong_dtype")
"""Why the recorder refuses an item (counted per image, ``"raw"`` and ``"stacks"``)."""

_IMAGES = ("raw", "stacks")
_DTYPES: dict[str, np.dtype[Any]] = {"raw": np.dtype(np.uint16), "stacks": np.dtype(np.float32)}
"""The dtype of each image's array in the store."""
_LOGGED_REJECTIONS = 10
"""Rejections logged per image and kind; the rest are only counted."""
_ATTRS_EVERY_S = 2.0
_INITIAL_T = 64
_STOP = object()
_SPACE = ("space", "micrometer")


class SeqGate:
    """The integrity rules for the items of one image: shape, exact dtype, seq window, once only.

    Thread-safe; `admit` decides in arrival order. It claims a seq only for an item that
    passes the shape and dtype checks, so a malformed item never blocks the genuine one.

    Parameters
    ----------
    image : str
        Name used in log lines (``"raw"`` or ``"stacks"``).
    shape : tuple of int
        The shape every item must have.
    dtype : numpy dtype
        The stored dtype; an item must convert to it exactly (see `_exactly_as`).
    seq_window : int
        How far past the highest admitted seq an item may be (`SEQ_WINDOW` by default).
    """

    def __init__(
        self, image: str, shape: tuple[int, ...], dtype: np.dtype[Any], seq_window: int
    ) -> None:
        if seq_window < 1:
            raise ValueError(f"recorder seq_window must be >= 1, got {seq_window}")
        self.image, self.shape, self.dtype, self.seq_window = image, shape, dtype, seq_window
        self._lock = threading.Lock()
        self._admitted: set[int] = set()
        self._highest = -1
        self._rejected = dict.fromkeys(REJECTIONS, 0)

    def admit(self, message: Message) -> tuple[np.ndarray, None] | tuple[None, str]:
        """Return ``(array as the stored dtype, None)`` for an admitted item, else ``(None, kind)``.

        `kind` is one of `REJECTIONS`; the rejection is counted and the first few are logged.
        """
        seq, array = message.header.seq, message.array
        if array.shape != self.shape:
            why = f"shape {list(array.shape)}, store expects {list(self.shape)}"
            return None, self._reject("wrong_shape", seq, why)
        converted = _exactly_as(array, self.dtype)
        if converted is None:
            why = f"{array.dtype} values that do not convert exactly to {self.dtype}"
            return None, self._reject("wrong_dtype", seq, why)
        with self._lock:
            highest = self._highest
            fresh = seq not in self._admitted
            if fresh and seq <= highest + self.seq_window:
                self._admitted.add(seq)
                self._highest = max(highest, seq)
                return converted, None
        if fresh:
            why = f"more than {self.seq_window} past the highest seq accepted ({highest})"
            return None, self._reject("beyond_window", seq, why)
        return None, self._reject("duplicate", seq, "already recorded; the first one is kept")

    def rejections(self) -> dict[str, int]:
        """Return the items refused so far by kind (every kind of `REJECTIONS`)."""
        with self._lock:
            return dict(self._rejected)

    def _reject(self, kind: str, seq: int, why: str) -> str:
        """Count one refused item, log the first few of each kind, and return `kind`."""
        with self._lock:
            self._rejected[kind] += 1
            count = self._rejected[kind]
        if count <= _LOGGED_REJECTIONS:
            more = " (further ones are only counted)" if count == _LOGGED_REJECTIONS else ""
            log.warning("recorder rejected %s seq %d (%s): %s%s", self.image, seq, kind, why, more)
        return kind


@dataclass(frozen=True)
class RecorderSummary:
    """What a closed recording holds and what it lacks."""

    path: str
    raw_frames: int
    stacks: int
    raw_missing: list[int] = field(default_factory=list)
    stacks_missing: list[int] = field(default_factory=list)
    unrecorded: int = 0
    error: str | None = None
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    run_error: str | None = None
    """Why the run failed outside the recorder (`Recorder.mark_incomplete`), if it did."""

    @property
    def rejected_total(self) -> int:
        """Items refused by the integrity checks, all images and kinds together."""
        return sum(sum(kinds.values()) for kinds in self.rejected.values())

    def line(self) -> str:
        """Return one human line: counts, gaps by seq, rejected items by kind and any error."""
        text = (
            f"recording {self.path}: {self.raw_frames} raw frames, {self.stacks} stacks; "
            f"raw gaps: {format_seqs(self.raw_missing)}; stack gaps: "
            f"{format_seqs(self.stacks_missing)}"
        )
        if self.rejected_total:
            text += f"; rejected: {format_rejections(self.rejected)}"
        if self.error:
            text += f"; NOT RECORDED after error: {self.unrecorded} items ({self.error})"
        if self.run_error:
            text += f"; INCOMPLETE: {self.run_error}"
        return text


def store_path(directory: str | Path, output: str | Path | None = None) -> Path:
    """Return the store path: `output` if it ends in ``.zarr``, else a timestamped store in it."""
    if output is not None and str(output).rstrip("/").endswith(".zarr"):
        return Path(output)
    base = Path(output) if output is not None else Path(directory)
    return base / f"{datetime.now():%Y%m%d-%H%M%S}.ome.zarr"


def format_rejections(rejected: dict[str, dict[str, int]]) -> str:
    """Write non-zero rejection counts as e.g. ``raw 2 duplicate, 1 wrong_shape; stacks 1 ...``."""
    parts = []
    for image, kinds in rejected.items():
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n)
        if counts:
            parts.append(f"{image} {counts}")
    return "; ".join(parts) if parts else "none"


def missing_seqs(present: Sequence[tuple[int, int]] | Sequence[Sequence[int]]) -> list[int]:
    """Return the seqs absent between 0 and the last present seq, from presence runs."""
    missing: list[int] = []
    previous = 0
    for start, stop in present:
        missing.extend(range(previous, start))
        previous = stop
    return missing


class Recorder:
    """Writes raw frames and stacks of one run into one OME-Zarr store on a background thread.

    `put_frame` / `put_stack` are called from any thread and never block; `close` (once,
    from the daemon's shutdown, including after SIGINT/SIGTERM) drains the queue, finalises
    the metadata and returns a `RecorderSummary`. ``seq_window`` bounds how far past the
    highest accepted seq an item may be (see the module docstring). The writer thread runs
    under `supervisor` (the daemon's): if it fails unexpectedly the daemon hears of it, the
    store is marked incomplete and what was still queued is counted as unrecorded.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        frame_shape: tuple[int, int],
        pixel_size_um: float,
        rate_hz: float,
        planes_um: Sequence[float],
        config: dict[str, Any] | None = None,
        keep_raw: bool = True,
        keep_stacks: bool = True,
        frames_per_chunk: int = 1,
        compression: str = "zstd",
        min_free_mb: float = 0.0,
        seq_window: int = SEQ_WINDOW,
        supervisor: Supervisor | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"recorder.compression {compression!r} is not supported; allowed: {COMPRESSIONS}"
            )
        if frames_per_chunk < 1:
            raise ValueError(f"recorder.frames_per_chunk must be >= 1, got {frames_per_chunk}")
        self.path = Path(path)
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.planes_um = [float(p) for p in planes_um]
        self._item_shape = {
            "raw": self.frame_shape,
            "stacks": (len(self.planes_um), *self.frame_shape),
        }
        self.frames_per_chunk = frames_per_chunk
        self.min_free_mb = min_free_mb
        self.seq_window = seq_window
        self.error: str | None = None
        self.run_error: str | None = None
        self._gates = {
            image: SeqGate(image, self._item_shape[image], _DTYPES[image], seq_window)
            for image in _IMAGES
        }
        self._queue: queue.Queue[Any] = queue.Queue()
        self._present: dict[str, set[int]] = {image: set() for image in _IMAGES}
        self._blocks: dict[int, tuple[np.ndarray, set[int]]] = {}
        self._unrecorded = 0
        self._lock = threading.Lock()
        self._summary: RecorderSummary | None = None
        self._root = zarr.open_group(self.path, mode="w-", zarr_format=3)
        self._raw = self._create_raw(pixel_size_um, rate_hz, compression) if keep_raw else None
        self._stacks = (
            self._create_stacks(pixel_size_um, rate_hz, compression) if keep_stacks else None
        )
        self._deepz: dict[str, Any] = {
            "config": config,
            "planes_um": self.planes_um,
            "frame_shape": list(self.frame_shape),
            "pixel_size_um": pixel_size_um,
            "rate_hz": rate_hz,
            "time_index": "camera sequence number",
            "raw_present": [],
            "stacks_present": [],
            "complete": False,
        }
        self._write_attrs()
        self._last_attrs = time.monotonic()
        self._supervisor = supervisor or Supervisor()
        self._thread = threading.Thread(target=self._supervised, name="recorder", daemon=True)
        self._thread.start()

    # -- public, any thread --------------------------------------------------------------

    def put_frame(self, message: Message) -> bool:
        """Queue one raw frame for writing (never blocks, never drops a valid one).

        Returns whether it was queued: False when raw frames are not kept, or when it was
        rejected (counted by kind; see the module docstring).
        """
        if self._raw is None:
            return False
        return self._put("raw", message) is None

    def admit_frame(self, message: Message) -> str | None:
        """Check one raw frame against the raw image's rules; queue it if raw frames are kept.

        Returns None when the frame is admitted, else the rejection kind (one of
        `REJECTIONS`, counted). Unlike `put_frame`, the checks run even when raw frames are
        not kept, so the daemon's router can let through exactly the frames the store takes.
        """
        if self._raw is None:
            return self._gates["raw"].admit(message)[1]
        return self._put("raw", message)

    def put_stack(self, message: Message) -> bool:
        """Queue one refocused stack for writing; returns whether it was, like `put_frame`."""
        if self._stacks is None:
            return False
        return self._put("stacks", message) is None

    @property
    def keeps_raw(self) -> bool:
        """Whether raw frames are recorded (``recorder.keep_raw``)."""
        return self._raw is not None

    @property
    def keeps_stacks(self) -> bool:
        """Whether stacks are recorded (``recorder.keep_stacks``)."""
        return self._stacks is not None

    @property
    def backlog(self) -> int:
        """Items queued but not yet written."""
        return self._queue.qsize()

    def free_mb(self) -> float:
        """Return the free disk space where the store is, MB (for warnings and the status)."""
        return shutil.disk_usage(self.path).free / 2**20

    def counts(self) -> tuple[int, int]:
        """Return (raw frames, stacks) written so far."""
        with self._lock:
            return len(self._present["raw"]), len(self._present["stacks"])

    def rejections(self) -> dict[str, dict[str, int]]:
        """Return the items rejected so far, ``{image: {kind: count}}`` over `REJECTIONS`."""
        return {image: gate.rejections() for image, gate in self._gates.items()}

    def mark_incomplete(self, reason: str) -> None:
        """Record that the run failed (`reason`): the store's final metadata says incomplete.

        For failures outside the recorder (a dead daemon thread): what is queued is still
        written, but ``complete`` stays false and ``run_error`` names the reason.
        """
        if self.run_error is None:
            self.run_error = reason

    def add_run_summary(self, run_summary: dict[str, Any]) -> None:
        """Store the daemon's summary in ``attrs["deepz"]["run_summary"]`` (call after close)."""
        self._deepz["run_summary"] = run_summary
        self._guarded(lambda: self._write_attrs(final=True), "run summary")

    def close(self, timeout_s: float | None = None) -> RecorderSummary:
        """Drain the queue, flush partial chunks, write the final metadata; idempotent."""
        if self._summary is not None:
            return self._summary
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            left = self._queue.qsize()
            self._fail(f"close timed out after {timeout_s} s with {left} items still queued")
            self._unrecorded += left
        elif self.error is not None:  # the writer thread died: what it left was never written
            self._unrecorded += self._drain()
        self._summary = self._finish()
        return self._summary

    # -- integrity checks, caller's thread ------------------------------------------------

    def _put(self, image: str, message: Message) -> str | None:
        """Queue `message` for `image` if its gate admits it; return None, or the rejection kind."""
        converted, rejection = self._gates[image].admit(message)
        if converted is not None:
            self._queue.put((image, message.header.seq, converted))
        return rejection

    # -- writer thread -------------------------------------------------------------------

    def _supervised(self) -> None:
        """Run `_run` under the supervisor: an unexpected error stops recording and the run."""
        with self._supervisor.watch("recorder writer"):
            try:
                self._run()
            except Exception as err:
                if self.error is None:  # the supervisor logs it; close() counts what is left
                    self.error = f"the writer thread failed: {type(err).__name__}: {err}"
                raise

    def _drain(self) -> int:
        """Empty the queue (the writer is gone); return how many items it still held."""
        left = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return left
            left += item is not _STOP

    def _run(self) -> None:
        """Write queued items until the stop marker, then flush what is buffered."""
        last_space_check = 0.0
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if self.error is not None:
                self._unrecorded += 1
                continue
            now = time.monotonic()
            if self.min_free_mb > 0 and now - last_space_check > 1.0:
                last_space_check = now
                self._check_space()
                if self.error is not None:
                    self._unrecorded += 1
                    continue
            self._write(*item)
            if now - self._last_attrs > _ATTRS_EVERY_S:
                self._guarded(self._write_attrs, "metadata")
                self._last_attrs = now
        self._guarded(self._flush_blocks, "partial raw chunks")

    def _write(self, kind: str, seq: int, array: np.ndarray) -> None:
        """Write one item, turning any exception into the recorder's logged failure."""
        try:
            if kind == "raw":
                self._write_raw(seq, array)
            else:
                self._write_stack(seq, array)
        except Exception as err:  # any storage fault stops recording, not the run
            self._unrecorded += 1
            self._fail(f"writing {kind} seq {seq} failed: {type(err).__name__}: {err}")

    def _write_raw(self, seq: int, frame: np.ndarray) -> None:
        """Buffer a raw frame into its chunk block; write the block once it is full."""
        assert self._raw is not None
        k = self.frames_per_chunk
        if k == 1:
            self._grow(self._raw, seq)
            self._raw[seq] = frame
            self._mark("raw", seq)
            return
        block_index = seq // k
        block, filled = self._blocks.setdefault(
            block_index, (np.zeros((k, *self.frame_shape), self._raw.dtype), set())
        )
        block[seq % k] = frame
        filled.add(seq)
        if len(filled) == k:
            self._write_block(block_index)
        # Blocks far behind the newest one will not fill any more: write what they have.
        for stale in [b for b in self._blocks if b < block_index - 2]:
            self._write_block(stale)

    def _write_block(self, block_index: int) -> None:
        """Write the present rows of one buffered raw block and forget it."""
        assert self._raw is not None
        block, filled = self._blocks.pop(block_index)
        k = self.frames_per_chunk
        self._grow(self._raw, max(filled))
        if len(filled) == k:
            self._raw[block_index * k : (block_index + 1) * k] = block
        else:
            for seq in sorted(filled):
                self._raw[seq] = block[seq % k]
        for seq in filled:
            self._mark("raw", seq)

    def _flush_blocks(self) -> None:
        """Write every partially filled raw block (at close)."""
        for block_index in sorted(self._blocks):
            self._write_block(block_index)

    def _write_stack(self, seq: int, stack: np.ndarray) -> None:
        """Write one stack as its own chunk."""
        assert self._stacks is not None
        self._grow(self._stacks, seq)
        self._stacks[seq] = stack
        self._mark("stacks", seq)

    def _mark(self, kind: str, seq: int) -> None:
        """Record that `seq` of `kind` is on disk."""
        with self._lock:
            self._present[kind].add(seq)

    # -- metadata and failures -----------------------------------------------------------

    def _create_raw(
        self, pixel_size_um: float, rate_hz: float, compression: str
    ) -> zarr.Array[Any]:
        """Create the /raw NGFF image group and its (t, y, x) uint16 array."""
        group = self._root.create_group("raw")
        scale = [1 / rate_hz, pixel_size_um, pixel_size_um]
        group.attrs["ome"] = _ngff_image("raw", ["t", "y", "x"], scale)
        return group.create_array(
            "0",
            shape=(_INITIAL_T, *self._item_shape["raw"]),
            chunks=(self.frames_per_chunk, *self._item_shape["raw"]),
            dtype=_DTYPES["raw"],
            fill_value=0,
            compressors=_compressors(compression),
            dimension_names=["t", "y", "x"],
        )

    def _create_stacks(
        self, pixel_size_um: float, rate_hz: float, compression: str
    ) -> zarr.Array[Any]:
        """Create the /stacks NGFF image group and its (t, z, y, x) float32 array."""
        group = self._root.create_group("stacks")
        planes = self.planes_um
        dz = float(np.mean(np.diff(planes))) if len(planes) > 1 else 1.0
        uniform = len(planes) < 3 or bool(np.allclose(np.diff(planes), dz, atol=1e-6))
        scale = [1 / rate_hz, dz if uniform and dz > 0 else 1.0, *2 * [pixel_size_um]]
        translation = [0.0, planes[0] if uniform and planes else 0.0, 0.0, 0.0]
        group.attrs["ome"] = _ngff_image("stacks", ["t", "z", "y", "x"], scale, translation)
        group.attrs["deepz"] = {"planes_um": planes, "uniform_planes": uniform}
        return group.create_array(
            "0",
            shape=(_INITIAL_T, *self._item_shape["stacks"]),
            chunks=(1, *self._item_shape["stacks"]),
            dtype=_DTYPES["stacks"],
            fill_value=0.0,
            compressors=_compressors(compression),
            dimension_names=["t", "z", "y", "x"],
        )

    def _grow(self, array: zarr.Array[Any], seq: int) -> None:
        """Make room for time index `seq` (capacity doubles; trimmed at close)."""
        if seq >= array.shape[0]:
            array.resize((max(seq + 1, 2 * array.shape[0]), *array.shape[1:]))

    def _write_attrs(self, *, final: bool = False) -> None:
        """Write presence runs, rejection counts (and at the end, completeness) into the attrs."""
        with self._lock:
            self._deepz["raw_present"] = [list(r) for r in seq_ranges(list(self._present["raw"]))]
            self._deepz["stacks_present"] = [
                list(r) for r in seq_ranges(list(self._present["stacks"]))
            ]
        self._deepz["rejected"] = self.rejections()
        self._deepz["complete"] = final and self.error is None and self.run_error is None
        self._deepz["error"] = self.error
        self._deepz["run_error"] = self.run_error
        self._root.attrs["deepz"] = self._deepz

    def _check_space(self) -> None:
        """Fail the recorder when the disk has less than ``min_free_mb`` free."""
        free_mb = self.free_mb()
        if free_mb < self.min_free_mb:
            self._fail(
                f"only {free_mb:.0f} MB free on {self.path}, below recorder.min_free_mb = "
                f"{self.min_free_mb:.0f}"
            )

    def _fail(self, reason: str) -> None:
        """Stop writing and log why, once; what is already written stays."""
        if self.error is None:
            self.error = reason
            log.error(
                "RECORDER STOPPED: %s. Data written so far is kept in %s; the run continues "
                "without recording.",
                reason,
                self.path,
            )

    def _guarded(self, step: Any, what: str) -> None:
        """Run a metadata/flush step, turning a storage error into the logged failure."""
        try:
            step()
        except Exception as err:  # a storage fault must not kill the daemon
            self._fail(f"writing {what} failed: {type(err).__name__}: {err}")

    def _finish(self) -> RecorderSummary:
        """Trim the arrays to the last seq and write the final metadata and summary."""
        with self._lock:
            raw, stacks = sorted(self._present["raw"]), sorted(self._present["stacks"])
        for array, seqs in ((self._raw, raw), (self._stacks, stacks)):
            if array is not None:
                self._guarded(lambda a=array, s=seqs: _trim(a, s), "array shape")
        summary = RecorderSummary(
            path=str(self.path),
            raw_frames=len(raw),
            stacks=len(stacks),
            raw_missing=missing_seqs(seq_ranges(raw)),
            stacks_missing=missing_seqs(seq_ranges(stacks)),
            unrecorded=self._unrecorded,
            error=self.error,
            rejected=self.rejections(),
            run_error=self.run_error,
        )
        self._deepz["summary"] = {
            "raw_frames": summary.raw_frames,
            "stacks": summary.stacks,
            "raw_missing": summary.raw_missing,
            "stacks_missing": summary.stacks_missing,
            "unrecorded": summary.unrecorded,
            "rejected": summary.rejected,
        }
        self._guarded(lambda: self._write_attrs(final=True), "final metadata")
        log.info(summary.line())
        return summary


def _exactly_as(array: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray | None:
    """Return `array` as `dtype` if every value converts exactly, else None.

    A plain ``astype`` wraps or rounds silently (float32 1e9 becomes uint16 51712, int32 -5
    becomes 65531): the raw frames are the experiment, so a value that does not survive the
    round trip refuses the whole item instead.
    """
    if array.dtype == dtype:
        return array
    with np.errstate(invalid="ignore", over="ignore"):  # out-of-range casts are caught below
        converted = array.astype(dtype)
    return converted if np.array_equal(converted, array) else None


def _trim(array: zarr.Array[Any], seqs: list[int]) -> None:
    """Shrink the time axis of `array` to end at the last present seq."""
    array.resize((seqs[-1] + 1 if seqs else 0, *array.shape[1:]))


def _ngff_image(
    name: str, axes: list[str], scale: list[float], translation: list[float] | None = None
) -> dict[str, Any]:
    """Return the NGFF 0.5 ``ome`` attribute of a single-resolution image whose array is "0"."""
    units = {"t": ("time", "second")}
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if translation is not None and any(translation):
        transforms.append({"type": "translation", "translation": translation})
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    dict(zip(("name", "type", "unit"), (a, *units.get(a, _SPACE)), strict=True))
                    for a in axes
                ],
                "datasets": [{"path": "0", "coordinateTransformations": transforms}],
            }
        ],
    }


def _compressors(name: str) -> list[Any] | None:
    """Map a ``recorder.compression`` name to zarr v3 codecs."""
    if name == "none":
        return None
    if name == "zstd":
        return [ZstdCodec(level=1)]
    if name == "gzip":
        return [GzipCodec(level=1)]
    cname: Literal["lz4", "zstd"] = "zstd" if name == "blosc-zstd" else "lz4"
    return [BloscCodec(cname=cname, clevel=3, shuffle=BloscShuffle.bitshuffle)]
