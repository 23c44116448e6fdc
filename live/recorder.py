"""The run's recording: one OME-Zarr store (NGFF 0.5 on zarr v3) per run, written off-thread.

The store is ``<recorder.path>/<YYYYmmdd-HHMMSS>.ome.zarr``, an OME-Zarr collection whose layout
`live.store` defines: NGFF image ``/0`` holds the raw frames (t, y, x) uint16 and ``/1`` the
stacks (t, z | plane | surface, y, x) in camera counts as float16 or float32 (``stack_dtype``,
``recorder.stack_dtype``; ``/0`` when raw frames are not kept), each with an ``omero`` display
window; ``/frames`` holds each frame's camera timestamp and focus; the root's ``attrs["deepz"]``
holds the run config, which seqs are present in each image (half-open [start, stop) runs) and
the final summary.

The time index is the camera sequence number, so a missing frame is a visible gap (zeros in the
array, NaN in the frame metadata and a hole in the presence runs). The time axis grows to
the highest seq being written; the presence runs, not the shape, say which rows hold frames (a
store cut off by a crash mid-write may have trailing rows never written, none of them
present). The presence runs, frame metadata and display windows are written every
`_ATTRS_EVERY_S` and at close. Frames and stacks are queued by the daemon's threads and written
by one background thread. The queue holds at most ``max_backlog_mb`` (`MAX_BACKLOG_MB`): a
disk slower than the data fills it, and then new stacks (past half of it) and new raw frames
(past all of it) are not recorded, each counted and said, rather than the daemon's memory
growing until it is killed; the live pipeline and the display go on (a refused frame's time
and focus are still recorded, within a budget of their own). `close` waits while the
writer makes progress, and gives up on a disk that stopped answering (`STALL_S`) rather than
hang the daemon's end.

Files: each array's time axis is cut into zarr v3 shards of about ``shard_s`` seconds of items
at the run's rate (`live.store.shard_frames`; at most ``shard_mb`` MB each, one chunk of
``frames_per_chunk`` raw frames or one stack inside them), so a 100 Hz run writes a few files a
second, not two hundred. zarr rewrites a whole shard for any write into it, so the writer thread
gathers a shard's items in memory and writes the shard once, when it is full. A shard that is
not full after ``hold_s`` (items stopped coming, or come slower than the rate), that lies more
than two shards behind the newest item (its missing items will not come), or that is still open
at close is written with what it has, in one write (its missing rows zeros, not present); a late
item for it is merged in by a later write, which never writes over a present row. What is held
in memory is not yet "present" (below), so a crash loses at most that much and the store never
claims it.

A write error (a full disk: ``ENOSPC``, or any other; an ``OSError`` is tried once more first,
so a passing fault costs nothing) or a disk below ``min_free_mb`` stops writing (below it the
stacks alone when raw frames are kept; below half of it the raw frames too, those held for their
shard written first when they fit), is logged once in plain words, and everything already
written stays readable; the daemon keeps running. The store then says so at once, not only at
close: ``error`` names the cause, ``complete`` is false, and the arrays and presence runs are
cut back to exactly what is on disk. A stacks write that fails when raw frames are kept stops
the stacks alone (``stacks_error``): the raw frames are the recording, and
``python -m live.refocus`` makes the stacks from them afterwards (a full, over-quota or
read-only disk stops both at once). Saying so needs disk space too, so the recorder holds a
`RESERVE_MB` file (``OME/.deepz-reserve``, grown to three times the root metadata as that grows)
from the start and deletes it at the first failure and at close: a disk filled to 0 bytes still
gets its truthful final metadata.

Each seq is written at most once per image, and only items that fit the store are queued.
`put_frame` / `put_stack` check, on the caller's thread and so in arrival order: the shape; the
dtype (a raw value that does not convert exactly to uint16 is never wrapped or rounded into it;
a stack, derived data, is rounded to the stacks' dtype, values beyond the float16 range
saturated and counted, ``stack_values_clipped``, by `live.store.as_stack_dtype`); that the seq
is at most `seq_window` past the highest one accepted (a forged or corrupt seq must not make the
arrays, the presence runs and the gap list grow without bound); and that the seq was not
accepted before (the first item wins, a duplicate never overwrites it). An item that fails is
rejected on its own, logged (the first few of each kind) and counted by kind (`REJECTIONS`) in
`Recorder.rejections`, the summary and the store's attributes; recording goes on for the others.
The rules live in `SeqGate`, one per image; the daemon's router admits raw frames through the
recorder's (`Recorder.admit_frame`), or through a gate of its own when raw frames are not
recorded, so a frame the store would refuse is not refocused or republished either.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, GzipCodec, ZstdCodec

from live.metrics import SeqSet, format_ranges, seq_ranges
from live.store import (
    DPMS_ARRAY,
    FRAME_FIELDS,
    FRAMES_GROUP,
    LAYOUT_VERSION,
    OME_GROUP,
    ROLES,
    STACK_DTYPES,
    StackAxis,
    WindowSampler,
    XmlImage,
    as_stack_dtype,
    collection_attrs,
    image_axes,
    ngff_image,
    series_attrs,
    shard_frames,
    write_ome_xml,
)
from live.store_lock import RECORDER_ROLE, write_lock
from live.supervisor import Supervisor

if TYPE_CHECKING:
    from live.protocol import Message

__all__ = [
    "COMPRESSIONS",
    "REJECTIONS",
    "RESERVE_MB",
    "RESERVE_NAME",
    "SEQ_LIST_KEYS",
    "SEQ_WINDOW",
    "SHARD_MB",
    "SHARD_S",
    "Recorder",
    "RecorderSummary",
    "SeqGate",
    "format_rejections",
    "gap_ranges",
    "missing_seqs",
    "store_path",
]

log = logging.getLogger(__name__)

COMPRESSIONS = ("none", "zstd", "lz4", "blosc-lz4", "blosc-zstd", "gzip")
"""Accepted values of ``recorder.compression`` ("lz4" is Blosc-LZ4 with bit shuffle)."""

SEQ_WINDOW = 10_000
"""Default of `Recorder`'s ``seq_window``: how far past the highest accepted seq an item may be.

At the 2 Hz default rate that is over 80 minutes of frames lost in a row; anything further is
not a gap but a broken or forged seq."""
REJECTIONS = ("duplicate", "beyond_window", "wrong_shape", "wrong_dtype")
"""Why the recorder refuses an item (counted per image, ``"raw"`` and ``"stacks"``)."""
RESERVE_MB = 4.0
"""Default disk space the recorder holds back for its final metadata (see the module docstring).

The final writes are the root attributes (config, presence runs, gaps, summaries: tens of kB,
more for a run with very many gaps), the images' array metadata, METADATA.ome.xml and the last
per-frame metadata chunks; each is written to a new file and then renamed over the old one."""
SHARD_S = 1.0
"""Default of `Recorder`'s ``shard_s``: seconds of items per shard file (0: no shards)."""
SHARD_MB = 128.0
"""Default of `Recorder`'s ``shard_mb``: the largest shard, MB uncompressed.

The writer holds up to about three shards per image in memory (the newest, and older ones a
late item may still fill), so this bounds its memory: 41 planes of 512² float16 are 21 MB a
stack, six stacks a shard."""
MAX_BACKLOG_MB = 2048.0
"""Default of `Recorder`'s ``max_backlog_mb``: the items the writer thread may have queued.

A disk slower than the data (or one that stalls) makes the queue grow; past half of this
new stacks are not recorded, past all of it new raw frames are not either (each counted as
unrecorded and said), so the daemon's memory stays bounded and the live pipeline goes on:
at 100 Hz it is 2.5 s of 2048² raw frames, 160 s of 256² ones."""
STALL_S = 120.0
"""Default of `Recorder.close`'s ``stall_s``: a writer that finishes no write for this long is
stuck on a disk that stopped answering (an unplugged USB disk, a hung network mount). Above
the longest healthy write: a full 128 MB shard (`SHARD_MB`) at 2 MB/s takes 64 s."""
RESERVE_NAME = ".deepz-reserve"
"""Name of the reserve file inside the store's ``OME`` group (deleted at close)."""
SEQ_LIST_KEYS = ("skipped", "lost", "focus_clamped")
"""Seq lists of the daemon's run summary that `Recorder.add_run_summary` stores as ranges (the
recorder's own gaps are ranges already)."""

_IMAGES = ROLES
_RAW_DTYPE = np.dtype(np.uint16)
"""The raw image's dtype (the stacks' is `Recorder`'s ``stack_dtype``)."""
_LOGGED_REJECTIONS = 10
"""Rejections logged per image and kind; the rest are only counted."""
_META_ITEM_BYTES = 256
"""What a metadata-only item (a frame's time and focus) counts in the writer's backlog."""
_LOGGED_DROPS = 10
"""Items not recorded for a full backlog logged per image; the rest are only counted."""
_ATTRS_EVERY_S = 2.0
"""How often the writer thread writes presence runs, frame metadata and display windows."""
_FRAME_CHUNK = 1024
"""Seqs per chunk of the per-frame metadata arrays."""
_STALE_SHARDS = 2
"""A held shard this many shards behind the newest item of its image is written as it is."""
_STOP = object()


@dataclass
class _Shard:
    """One shard's items held by the writer thread until it is full (see the module docstring)."""

    data: np.ndarray
    """The shard's rows, (time points of a shard, *item shape); unfilled rows are zeros."""
    filled: set[int] = field(default_factory=set)
    """The seqs held in `data`."""
    since: float = field(default_factory=time.monotonic)
    """When the first of them arrived (monotonic s)."""


@dataclass
class _Image:
    """One NGFF image of the store as the writer keeps it: group, array, display samples."""

    role: str
    group: zarr.Group
    array: zarr.Array[Any]
    name: str
    axes: list[dict[str, str]]
    scale: list[float]
    translation: list[float] | None
    sampler: WindowSampler
    windowed: bool = False
    xml_t: int = -1


class SeqGate:
    """The integrity rules for the items of one image: shape, dtype, seq window, once only.

    Thread-safe; `admit` decides in arrival order. It claims a seq only for an item that
    passes the shape and dtype checks, so a malformed item never blocks the genuine one.

    Parameters
    ----------
    image : str
        Name used in log lines (``"raw"`` or ``"stacks"``).
    shape : tuple of int
        The shape every item must have.
    dtype : numpy dtype
        The stored dtype; an item must convert to it exactly (see `_exactly_as`), unless
        `exact` is false.
    seq_window : int
        How far past the highest admitted seq an item may be (`SEQ_WINDOW` by default).
    exact : bool
        False for stacks (derived data): an item is rounded to `dtype` instead, values beyond
        its range saturated and counted (`live.store.as_stack_dtype`, `clipped`).
    """

    def __init__(
        self,
        image: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        seq_window: int,
        *,
        exact: bool = True,
    ) -> None:
        if seq_window < 1:
            raise ValueError(f"recorder seq_window must be >= 1, got {seq_window}")
        self.image, self.shape, self.dtype, self.seq_window = image, shape, dtype, seq_window
        self.exact = exact
        self._lock = threading.Lock()
        self._admitted = SeqSet()  # ranges: memory follows the gaps, not the frames
        self._highest = -1
        self._rejected = dict.fromkeys(REJECTIONS, 0)
        self._clipped = 0

    def admit(self, message: Message) -> tuple[np.ndarray, None] | tuple[None, str]:
        """Return ``(array as the stored dtype, None)`` for an admitted item, else ``(None, kind)``.

        `kind` is one of `REJECTIONS`; the rejection is counted and the first few are logged.
        """
        seq, array = message.header.seq, message.array
        if array.shape != self.shape:
            why = f"shape {list(array.shape)}, store expects {list(self.shape)}"
            return None, self._reject("wrong_shape", seq, why)
        clipped = 0
        if self.exact:
            converted = _exactly_as(array, self.dtype)
        else:
            converted, clipped = as_stack_dtype(array, self.dtype)
        if converted is None:
            why = f"{array.dtype} values that do not convert exactly to {self.dtype}"
            return None, self._reject("wrong_dtype", seq, why)
        first_clip = False
        with self._lock:
            highest = self._highest
            fresh = seq not in self._admitted
            admitted = fresh and seq <= highest + self.seq_window
            if admitted:
                self._admitted.add(seq)
                self._highest = max(highest, seq)
                first_clip = clipped > 0 and self._clipped == 0
                self._clipped += clipped
        if admitted:
            if first_clip:
                log.warning(
                    "recorder: %s seq %d had %d values beyond the %s range (±%g): saturated "
                    "there (further ones are only counted)",
                    self.image,
                    seq,
                    clipped,
                    self.dtype,
                    float(np.finfo(self.dtype).max),
                )
            return converted, None
        if fresh and highest < 0:  # nothing recorded yet: the stream itself starts too far
            with self._lock:
                first = self._rejected["beyond_window"] == 0
            if first:  # one clear line, whatever the warnings' count: nothing will be recorded
                log.error(
                    "recorder: the %s stream starts at seq %d, beyond the first "
                    "recorder.seq_window = %d seqs (the store's time index is the seq): "
                    "nothing is recorded until its seqs start near 0 (restart the sender) or "
                    "recorder.seq_window is raised",
                    self.image,
                    seq,
                    self.seq_window,
                )
            why = f"the stream starts beyond the first {self.seq_window} seqs"
            return None, self._reject("beyond_window", seq, why)
        if fresh:
            why = f"more than {self.seq_window} past the highest seq accepted ({highest})"
            return None, self._reject("beyond_window", seq, why)
        return None, self._reject("duplicate", seq, "already recorded; the first one is kept")

    def rejections(self) -> dict[str, int]:
        """Return the items refused so far by kind (every kind of `REJECTIONS`)."""
        with self._lock:
            return dict(self._rejected)

    def admitted(self) -> int:
        """Return how many items were admitted (each seq counts once)."""
        with self._lock:
            return len(self._admitted)

    def clipped(self) -> int:
        """Return how many values of admitted items were saturated (only when not `exact`)."""
        with self._lock:
            return self._clipped

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
    unrecorded: int = 0
    """Items admitted for recording that are not on disk (the recorder stopped first)."""
    error: str | None = None
    rejected: dict[str, dict[str, int]] = field(default_factory=dict)
    stacks_error: str | None = None
    """Why stacks stopped being recorded while raw frames went on (`Recorder.stacks_error`)."""
    run_error: str | None = None
    """Why the run failed outside the recorder (`Recorder.mark_incomplete`), if it did."""
    raw_gaps: list[tuple[int, int]] = field(default_factory=list)
    """Seqs with no raw frame, between 0 and the last one recorded, as half-open ``(start,
    stop)`` ranges (the store's ``raw_gaps``). Ranges only: a list of every missing seq can
    be as long as the seqs are far apart (a forged stream: up to ``seq_window`` a frame)."""
    stacks_gaps: list[tuple[int, int]] = field(default_factory=list)
    """Seqs with no stack, as `raw_gaps` (the store's ``stacks_gaps``)."""
    stack_values_clipped: int = 0
    """Values of recorded stacks saturated at the stacks' dtype's range (float16: ±65504)."""
    backlog_dropped: dict[str, int] = field(default_factory=dict)
    """Items admitted but not queued for the disk, per image: the writer's backlog was full
    (``max_backlog_mb``; a disk slower than the data). Counted in `unrecorded` too."""

    @property
    def rejected_total(self) -> int:
        """Items refused by the integrity checks, all images and kinds together."""
        return sum(sum(kinds.values()) for kinds in self.rejected.values())

    def line(self) -> str:
        """Return one human line: counts, gaps by seq, rejected items by kind and any error."""
        text = (
            f"recording {self.path}: {self.raw_frames} raw frames, {self.stacks} stacks; "
            f"raw gaps: {format_ranges(self.raw_gaps)}; stack gaps: "
            f"{format_ranges(self.stacks_gaps)}"
        )
        if self.rejected_total:
            text += f"; rejected: {format_rejections(self.rejected)}"
        if self.stack_values_clipped:
            text += f"; {self.stack_values_clipped} stack values saturated"
        if any(self.backlog_dropped.values()):
            dropped = ", ".join(f"{n} {image}" for image, n in self.backlog_dropped.items() if n)
            text += f"; NOT RECORDED, the disk too slow (backlog full): {dropped}"
        if self.stacks_error:
            text += f"; STACKS NOT RECORDED after error ({self.stacks_error})"
        if self.error:
            text += f"; NOT RECORDED after error: {self.unrecorded} items ({self.error})"
        elif self.stacks_error:
            text += f"; {self.unrecorded} items not recorded"
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


def low_space_stops(*, keep_raw: bool, keep_stacks: bool) -> str:
    """Say what a disk below ``recorder.min_free_mb`` stops (the policy of `_check_space`)."""
    if keep_raw and keep_stacks:
        return "the stacks stop below it, the raw frames below half of it"
    if keep_raw:
        return "the raw frames stop below half of it"
    return "recording stops below it"


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
    ``reserve_mb`` of disk space is held back for the final metadata (`RESERVE_MB`; 0: none).
    ``stack_dtype`` is the stacks' dtype in the store (one of `live.store.STACK_DTYPES`;
    float32, lossless, unless told: the daemon passes ``recorder.stack_dtype``). ``shard_s``
    and ``shard_mb`` size the shards (`SHARD_S`, `SHARD_MB`; ``shard_s = 0``: one file per
    chunk) and ``hold_s`` is the longest a partial shard is held in memory (default twice
    ``shard_s``, at least `_ATTRS_EVERY_S`); see the module docstring.

    The stacks are either uniform or listed planes (`planes_um`, µm from focus) or named
    `surfaces` with their DPMs `dpms_um` (P, H, W) µm, which are stored beside the stacks;
    give exactly one of the two. ``engine_files`` names the files the stacks came from, each
    ``{"path": ..., "sha256": ...}`` (the daemon's model and measured PSF bank): a config
    holds paths, whose files may change after the run.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        frame_shape: tuple[int, int],
        pixel_size_um: float,
        rate_hz: float,
        planes_um: Sequence[float] | None = None,
        surfaces: Sequence[str] | None = None,
        dpms_um: np.ndarray | None = None,
        config: dict[str, Any] | None = None,
        engine_files: dict[str, dict[str, str]] | None = None,
        keep_raw: bool = True,
        keep_stacks: bool = True,
        frames_per_chunk: int = 1,
        compression: str = "zstd",
        min_free_mb: float = 0.0,
        seq_window: int = SEQ_WINDOW,
        supervisor: Supervisor | None = None,
        reserve_mb: float = RESERVE_MB,
        stack_dtype: str = "float32",
        shard_s: float = SHARD_S,
        shard_mb: float = SHARD_MB,
        hold_s: float | None = None,
        max_backlog_mb: float = MAX_BACKLOG_MB,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"recorder.compression {compression!r} is not supported; allowed: {COMPRESSIONS}"
            )
        if frames_per_chunk < 1:
            raise ValueError(f"recorder.frames_per_chunk must be >= 1, got {frames_per_chunk}")
        if stack_dtype not in STACK_DTYPES:
            raise ValueError(
                f"recorder.stack_dtype {stack_dtype!r} is not supported; allowed: {STACK_DTYPES}"
            )
        if not (shard_s >= 0 and shard_mb > 0):
            raise ValueError(
                f"recorder shard_s must be >= 0 and shard_mb > 0, got {shard_s}, {shard_mb}"
            )
        self.path = Path(path)
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.stack_axis = StackAxis(
            planes_um=None if planes_um is None else tuple(float(p) for p in planes_um),
            surfaces=None if surfaces is None else tuple(str(s) for s in surfaces),
            dpms_um=None if dpms_um is None else np.asarray(dpms_um, dtype=np.float32),
        )
        if (
            self.stack_axis.dpms_um is not None
            and self.stack_axis.dpms_um.shape[1:] != self.frame_shape
        ):
            raise ValueError(
                f"DPMs of shape {list(self.stack_axis.dpms_um.shape[1:])} do not match frames "
                f"of shape {list(self.frame_shape)}"
            )
        self._item_shape = {
            "raw": self.frame_shape,
            "stacks": (len(self.stack_axis), *self.frame_shape),
        }
        self.pixel_size_um, self.rate_hz = float(pixel_size_um), float(rate_hz)
        self.frames_per_chunk = frames_per_chunk
        self.min_free_mb = min_free_mb
        self.seq_window = seq_window
        self.error: str | None = None
        self.run_error: str | None = None
        self.dtypes = {"raw": _RAW_DTYPE, "stacks": np.dtype(stack_dtype)}
        """The dtype of each image's array in the store."""
        chunk_t = {"raw": frames_per_chunk, "stacks": 1}
        self.chunk_t = chunk_t
        """Time points per chunk of each image."""
        self.shard_t = {
            role: shard_frames(
                self._item_shape[role],
                self.dtypes[role],
                rate_hz=self.rate_hz,
                shard_s=shard_s,
                max_mb=shard_mb,
                chunk=chunk_t[role],
            )
            for role in _IMAGES
        }
        """Time points per shard (per file) of each image; equal to `chunk_t`: not sharded."""
        self.hold_s = max(_ATTRS_EVERY_S, 2 * shard_s) if hold_s is None else hold_s
        self._gates = {
            image: SeqGate(
                image,
                self._item_shape[image],
                self.dtypes[image],
                seq_window,
                exact=image == "raw",
            )
            for image in _IMAGES
        }
        # the queue's bound is in bytes, not items (`_queue_for_disk`): stacks may use half
        self._queue: queue.Queue[Any] = queue.Queue()
        self._backlog_bytes = {"images": 0, "metadata": 0}
        limit = max_backlog_mb * 2**20
        self._backlog_limit = {"raw": limit, "stacks": limit / 2, "metadata": limit / 16}
        self._backlog_dropped = dict.fromkeys((*_IMAGES, "metadata"), 0)
        self._beat = time.monotonic()  # the writer's last sign of progress (`close`)
        self._stuck = False  # close gave up on the writer (`close`)
        # read on the caller's thread now (it creates the store there too), then only by the
        # writer: a hung disk then blocks the writer, never the daemon's status or its end
        self._free_mb: float | None = None
        self._space_unread = 0  # free-space reads failed in a row (`_check_space`)
        # on disk, as ranges (`SeqSet`): a per-seq set grew 63 MiB per million frames and its
        # sort stalled the writer for 0.5 s per metadata write after a million
        self._present: dict[str, SeqSet] = {image: SeqSet() for image in _IMAGES}
        self._held: dict[str, dict[int, _Shard]] = {image: {} for image in _IMAGES}
        self._frame_meta: dict[int, tuple[float, float]] = {}  # raw frame queued, not on disk
        self._meta_pending: dict[int, tuple[float, float]] = {}  # on disk, metadata not yet
        self._meta_end = 0  # the frame metadata arrays are written up to here
        self._failure_written = False
        self.stacks_error: str | None = None
        """Why stacks are no longer recorded while raw frames are (`_stop_stacks`), if so."""
        self._lock = threading.Lock()
        self._summary: RecorderSummary | None = None
        # the run's store is this recorder's alone while it records: an offline job into it
        # (its gaps, an offline image) is refused until close() has finalised it
        self._store_lock = contextlib.ExitStack()
        self._store_lock.enter_context(write_lock(self.path, RECORDER_ROLE))
        created = False
        try:
            self._root = zarr.open_group(self.path, mode="w-", zarr_format=3)
            created = True  # "w-": nothing was there, so all of it is this recorder's
            self._root.attrs["ome"] = collection_attrs()
            kept = [role for role, keep in (("raw", keep_raw), ("stacks", keep_stacks)) if keep]
            self._images = {
                role: self._create_image(role, str(i), compression) for i, role in enumerate(kept)
            }
            self._root.create_group(OME_GROUP).attrs["ome"] = series_attrs(
                [image.group.basename for image in self._images.values()]
            )
            self._reserve: Path | None = self.path / OME_GROUP / RESERVE_NAME
            self._reserve_bytes = int(reserve_mb * 2**20)
            _hold_space(self._reserve, self._reserve_bytes)
            self._frames = self._create_frames()
            self._arrays = {role: image.array for role, image in self._images.items()}
            self._raw = self._arrays.get("raw")
            self._stacks = self._arrays.get("stacks")
            self._deepz: dict[str, Any] = {
                "layout": LAYOUT_VERSION,
                "images": {role: image.group.basename for role, image in self._images.items()},
                "frames": FRAMES_GROUP,
                "config": config,
                "engine_files": engine_files or {},
                **self.stack_axis.attrs(),
                "frame_shape": list(self.frame_shape),
                "pixel_size_um": self.pixel_size_um,
                "rate_hz": self.rate_hz,
                "time_index": "camera sequence number",
                "stack_dtype": stack_dtype,
                "raw_present": [],
                "stacks_present": [],
                "complete": False,
            }
            self._write_attrs()
            with contextlib.suppress(OSError):  # unreadable: the writer's check will say why
                self._free_mb = _disk_free_mb(self.path)
            self._last_attrs = time.monotonic()
            self._attrs_every_s = _ATTRS_EVERY_S
            self._supervisor = supervisor or Supervisor()
            self._thread = threading.Thread(target=self._supervised, name="recorder", daemon=True)
            self._thread.start()
        except BaseException:
            if created:  # a nearly full disk: no half-made store left for the next run to trip on
                shutil.rmtree(self.path, ignore_errors=True)
            self._store_lock.close()
            raise

    # -- public, any thread --------------------------------------------------------------

    def put_frame(self, message: Message) -> bool:
        """Queue one raw frame for writing (never blocks on the disk).

        Returns whether it was admitted: False when raw frames are not kept, or when it was
        rejected (counted by kind; see the module docstring). An admitted frame the full
        backlog cannot hold (a disk slower than the data) returns True and is counted in
        ``backlog_dropped``, never written: the router republishes it all the same.
        """
        if self._raw is None:
            return False
        return self._put("raw", message) is None

    def admit_frame(self, message: Message) -> str | None:
        """Check one raw frame against the raw image's rules; queue it (or its metadata).

        Returns None when the frame is admitted, else the rejection kind (one of
        `REJECTIONS`, counted). Unlike `put_frame`, the checks run even when raw frames are
        not kept, so the daemon's router can let through exactly the frames the store takes;
        an admitted frame's timestamp and focus are recorded either way.
        """
        if self._raw is None:
            rejection = self._gates["raw"].admit(message)[1]
            if rejection is None:
                header = message.header
                self._queue_meta(header.seq, header.timestamp_s, header.focus_um)
            return rejection
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
    def stuck(self) -> bool:
        """Whether `close` left the writer still busy (a disk that stopped answering).

        The store then keeps what the writer last wrote; nothing more is asked of it from the
        caller's thread, and its lock file is left for the next writer.
        """
        return self._stuck

    @property
    def backlog(self) -> int:
        """Items queued for the writer thread (not those it holds for a shard, `held`)."""
        return self._queue.qsize()

    @property
    def held(self) -> int:
        """Items the writer thread holds in memory until their shard is full (approximate)."""
        return sum(
            len(s.filled) for shards in list(self._held.values()) for s in list(shards.values())
        )

    def free_mb(self) -> float | None:
        """Return the free disk space where the store is, MB (for warnings and the status).

        As the writer thread last read it (about every second, `_check_space`), so asking
        never touches the disk: on a hung network mount even reading free space blocks.
        None when the file system could not say: the store's folder is gone (a disk
        unplugged or unmounted) or unreachable (a stale mount); the writer's check then
        stops recording, naming why.
        """
        return self._free_mb

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
        """Store the daemon's summary in ``attrs["deepz"]["run_summary"]`` (call after close).

        Its seq lists (`SEQ_LIST_KEYS`: every skipped and lost seq) are stored whole, as
        half-open ``[start, stop]`` ranges like the presence runs: a run that skips a million
        frames in a row costs one range, not a million numbers. The daemon gives them as
        ranges already (`live.metrics.SeqRuns`); a list of seqs is collapsed here.
        """
        if self._stuck:  # the writer may still write the store: it stays the only writer
            log.error("recorder: the run summary is not stored: the disk is not answering")
            return
        stored = dict(run_summary)
        for key in SEQ_LIST_KEYS:
            seqs = stored.get(key)
            if isinstance(seqs, list) and all(type(s) is int for s in seqs):
                stored[key] = [list(r) for r in seq_ranges(seqs)]
        stored["seq_lists"] = "half-open [start, stop] ranges"
        self._deepz["run_summary"] = stored
        self._guarded(lambda: self._write_attrs(final=True), "run summary")

    def close(
        self,
        timeout_s: float | None = None,
        *,
        keep_lock: bool = False,
        stall_s: float = STALL_S,
    ) -> RecorderSummary:
        """Drain the queue, flush partial chunks, write the final metadata; idempotent.

        Waits while the writer makes progress (a long backlog drains at the disk's speed),
        until `timeout_s` if given; a writer that finishes no write for `stall_s` is stuck on
        a disk that stopped answering. Either way, a writer still busy is left to it: the
        recorder fails, naming why, and the summary comes from memory (`stuck`), with nothing
        asked of the disk from this thread; should the writer come back, it cuts the store to
        what it holds and records the failure itself (one thread writes the store, always).
        The store's lock (`live.store_lock`) is then let go, unless `keep_lock`: the daemon
        keeps it while it adds the run summary and preview, then calls `release`.
        """
        if self._summary is not None:
            if not keep_lock:
                self.release()
            return self._summary
        self._queue.put(_STOP)
        started = time.monotonic()
        while self._thread.is_alive():
            # joined in slices only to look at the writer's progress in between
            self._thread.join(min(1.0, stall_s))
            if not self._thread.is_alive():
                break
            now = time.monotonic()
            left = f"{max(self._queue.qsize() - 1, 0)} items queued and {self.held} held"
            if timeout_s is not None and now - started >= timeout_s:
                self._fail(
                    f"close timed out after {timeout_s} s with {left}", release_reserve=False
                )
                break
            if now - self._beat >= stall_s:
                self._fail(
                    f"the disk stopped answering: no write finished in {stall_s:.0f} s, "
                    f"{left} not written",
                    release_reserve=False,
                )
                break
        self._stuck = self._thread.is_alive()
        self._summary = self._summarise() if self._stuck else self._finish()
        if self._stuck:
            log.error(
                "RECORDER: %s keeps what the writer last wrote: %s", self.path, self._summary.line()
            )
        if not keep_lock:
            self.release()
        return self._summary

    def release(self) -> None:
        """Let the store go (its lock file removed): offline jobs may write it now; idempotent.

        Not when the disk stopped answering (`close`): removing the file would hang too; it
        is left for the next writer to take over (its holder, this process, will be gone).
        """
        if self._stuck:
            log.warning("recorder: the disk is not answering: the store's lock file is left")
            return
        self._store_lock.close()

    # -- integrity checks, caller's thread ------------------------------------------------

    def _put(self, image: str, message: Message) -> str | None:
        """Queue `message` for `image` if its gate admits it; return None, or the rejection kind."""
        converted, rejection = self._gates[image].admit(message)
        if converted is not None:
            header = message.header
            if image == "stacks" and self.stacks_error is not None:
                pass  # admitted, and unrecorded: the stacks image stopped (`_stop_stacks`)
            elif self._queue_for_disk(image, header.seq, converted.nbytes):
                item = (image, header.seq, converted, header.timestamp_s, header.focus_um)
                self._queue.put(item)
            elif image == "raw":  # its pixels are not recorded; its time and focus still are
                self._queue_meta(header.seq, header.timestamp_s, header.focus_um)
        return rejection

    def _queue_meta(self, seq: int, timestamp_s: float, focus_um: float | None) -> None:
        """Queue a frame's time and focus alone (raw frames not kept, or not recorded).

        Bounded like the frames (`_META_ITEM_BYTES` each): on a disk that stopped answering
        mid-run even these would otherwise pile up for the rest of the run.
        """
        if self._queue_for_disk("metadata", seq, _META_ITEM_BYTES):
            self._queue.put(("frame", seq, None, timestamp_s, focus_um))

    def _queue_for_disk(self, image: str, seq: int, nbytes: int) -> bool:
        """Whether the backlog has room for `nbytes` more of `image` (then they are counted).

        An item refused here was admitted (it is valid, and the live pipeline refocuses and
        shows it) but is not recorded: counted, the first few logged. Stacks, derived data,
        are refused from half the limit, so raw frames keep the rest. Metadata-only items
        have a budget of their own (a sixteenth of the limit), so a frame refused for a full
        backlog keeps its time and focus.
        """
        pool = "metadata" if image == "metadata" else "images"
        with self._lock:
            if self._backlog_bytes[pool] + nbytes <= self._backlog_limit[image]:
                self._backlog_bytes[pool] += nbytes
                return True
            self._backlog_dropped[image] += 1
            count, queued = self._backlog_dropped[image], self._backlog_bytes[pool]
        if count <= _LOGGED_DROPS:
            more = " (further ones are only counted)" if count == _LOGGED_DROPS else ""
            log.error(
                "recorder backlog full (%.0f MB waiting for the disk, limit %.0f MB for %s): "
                "%s seq %d not recorded; the disk is slower than the data%s",
                queued / 2**20,
                self._backlog_limit[image] / 2**20,
                image,
                image,
                seq,
                more,
            )
        return False

    # -- writer thread -------------------------------------------------------------------

    def _supervised(self) -> None:
        """Run `_run` under the supervisor: an unexpected error stops recording and the run."""
        with self._supervisor.watch("recorder writer"):
            try:
                self._run()
            except Exception as err:
                if self.error is None:  # the supervisor logs it; close() counts what is left
                    self.error = f"the writer thread failed: {type(err).__name__}: {err}"
                    self._record_failure()  # the reserve freed first, as always
                raise

    def _run(self) -> None:
        """Write queued items until the stop marker, then flush what is buffered.

        After a failure the remaining items are taken off the queue unwritten (`close` counts
        them as unrecorded), and the store is told the truth once, at once (`_record_failure`).
        """
        last_space_check = 0.0
        while True:
            try:  # wake up now and then: held shards and metadata are due even without items
                item = self._queue.get(timeout=_ATTRS_EVERY_S / 2)
            except queue.Empty:
                item = None
            self._beat = time.monotonic()
            if item is _STOP:
                break
            if item is not None:  # its bytes leave the backlog
                with self._lock:
                    if item[2] is None:
                        self._backlog_bytes["metadata"] -= _META_ITEM_BYTES
                    else:
                        self._backlog_bytes["images"] -= item[2].nbytes
            now = time.monotonic()
            if now - last_space_check > 1.0:  # after a failure too: the status shows it
                last_space_check = now
                self._check_space()
            if self.error is not None:
                self._record_failure()
                continue
            if item is not None and not (item[0] == "stacks" and self.stacks_error is not None):
                self._write(*item)
            if self.error is None:
                self._write_held(held_since=now - self.hold_s)
            if now - self._last_attrs > self._attrs_every_s:
                began = time.monotonic()
                self._guarded(self._write_attrs, "metadata")
                self._last_attrs = time.monotonic()
                # a run with very many gaps has large presence runs: keep their writing to
                # about 5 % of this thread's time rather than every 2 s whatever they cost
                self._attrs_every_s = max(_ATTRS_EVERY_S, 20 * (self._last_attrs - began))
            self._record_failure()
        if self.error is None:
            self._write_held(held_since=math.inf)
        self._record_failure()

    def _record_failure(self) -> None:
        """Once after a failure: cut the arrays back to what is on disk and write the attributes.

        The reserve was deleted by `_fail`, so this has room even on a full disk; if the daemon
        is killed later, the store already names the error and holds no false rows.
        """
        if self.error is None or self._failure_written:
            return
        self._failure_written = True
        self._release_reserve()  # done by `_fail` unless close gave up on this thread
        self._guarded(self._trim_all, "array shape")
        self._guarded(self._write_attrs, "metadata")

    def _write(
        self,
        kind: str,
        seq: int,
        array: np.ndarray | None,
        timestamp_s: float,
        focus_um: float | None,
    ) -> None:
        """Write one item, turning any exception into the recorder's logged failure."""
        focus_um = math.nan if focus_um is None else focus_um  # NaN: the scope did not say
        if kind == "frame":  # raw frames not kept: only the frame's metadata is recorded
            with self._lock:
                self._meta_pending[seq] = (timestamp_s, focus_um)
            return
        assert array is not None
        what = f"writing {kind} seq {seq}"
        try:
            if kind == "raw":
                with self._lock:
                    self._frame_meta[seq] = (timestamp_s, focus_um)
            self._retried(functools.partial(self._put_item, kind, seq, array), what)
        except Exception as err:  # any storage fault stops recording, not the run
            self._write_failed(kind, f"{what} failed: {type(err).__name__}: {err}", err)
            return
        self._images[kind].sampler.add(array)

    def _put_item(self, role: str, seq: int, item: np.ndarray) -> None:
        """Write one item, or hold it in its shard and write the shard once it is full.

        Held shards more than `_STALE_SHARDS` behind this one are written as they are: the
        items they lack are lost or late beyond use, and holding them would hold the memory.
        """
        n, array = self.shard_t[role], self._arrays[role]
        if n == 1:  # one item per file: write it now
            self._grow(array, seq)
            array[seq] = item
            self._mark(role, seq)
            return
        held, index = self._held[role], seq // n
        shard = held.get(index)
        if shard is None:
            shard = held[index] = _Shard(np.zeros((n, *item.shape), array.dtype))
        shard.data[seq % n] = item
        shard.filled.add(seq)
        if len(shard.filled) == n:
            self._write_shard(role, index)
        for stale in [i for i in held if i < index - _STALE_SHARDS]:
            self._write_shard(role, stale)

    def _write_shard(self, role: str, index: int) -> None:
        """Write the items held for one shard and forget them (raises on a storage error).

        A shard none of whose rows is on disk yet is one write, from its first held item to
        its last, rows not held as zeros (presence, not the values, says which rows hold
        items). A shard file that already holds items (a late item, or one after a stale
        partial write) gets one write per run of consecutive held seqs, which zarr merges into
        the file: an item on disk is never written over. Items count as present once written.
        """
        shard = self._held[role][index]
        array, n = self._arrays[role], self.shard_t[role]
        first, last = min(shard.filled), max(shard.filled)
        self._grow(array, last)
        base = index * n
        with self._lock:
            fresh = not self._present[role].intersects(base, base + n)
        # each write of part of a shard reads, merges and rewrites the whole file: writing a
        # fresh shard run by run rewrote it once per run (n/2 times for every other frame)
        runs = [(first, last + 1)] if fresh else seq_ranges(shard.filled)
        for start, stop in runs:
            array[start:stop] = shard.data[start - base : stop - base]
        for seq in sorted(shard.filled):
            self._mark(role, seq)
        del self._held[role][index]  # only once written: a write tried again finds it

    def _write_held(self, *, held_since: float) -> None:
        """Write every shard held since before `held_since` (monotonic s), oldest first.

        A storage error (once tried again) stops the recorder like any write error; what was
        held and not written stays off the disk and counts as unrecorded.
        """
        for role, held in self._held.items():
            for index in sorted(i for i, shard in held.items() if shard.since < held_since):
                n = self.shard_t[role]
                what = f"writing {role} seqs {index * n}-{(index + 1) * n - 1}"
                try:
                    self._retried(functools.partial(self._write_shard, role, index), what)
                except Exception as err:  # any storage fault stops recording, not the run
                    self._write_failed(role, f"{what} failed: {type(err).__name__}: {err}", err)
                    if self.error is not None:
                        return
                    break  # the stacks stopped (their held shards dropped); raw goes on

    def _write_failed(self, role: str, reason: str, err: BaseException) -> None:
        """Stop the stacks alone, or the recorder, after a write of `role` failed twice.

        The raw frames are the recording (the stacks can be made again from them offline,
        ``python -m live.refocus``), so a stacks fault must not cost them; any other fault,
        a stacks fault with raw frames not kept, or one of the whole disk (full, over quota,
        read-only: raw writes would fail alike) stops recording altogether (`_fail`).
        """
        whole_disk = isinstance(err, OSError) and err.errno in _WHOLE_DISK_ERRNOS
        if role != "stacks" or self._raw is None or whole_disk:
            self._fail(reason)
            return
        self._stop_stacks(reason)

    def _stop_stacks(self, reason: str) -> None:
        """Stop writing stacks, once, raw frames going on (see `_write_failed`)."""
        if self.stacks_error is not None:
            return
        self.stacks_error = reason
        self._held["stacks"].clear()  # not on disk: counted as unrecorded
        log.error(
            "RECORDER STOPPED WRITING STACKS: %s. Stacks written so far are kept in %s; raw "
            "frames are still recorded, and `python -m live.refocus` can make the stacks "
            "from them afterwards.",
            reason,
            self.path,
        )

    @staticmethod
    def _retried(write: Callable[[], None], what: str) -> None:
        """Run one write; an OSError is tried once more before it stops the recorder.

        A passing fault (EIO on a flaky disk or network mount) then costs nothing, where it
        stopped all recording for the rest of the run. Writes are idempotent: the same seqs,
        the same bytes. A full disk fails twice and stops the recorder as before.
        """
        try:
            write()
        except OSError as err:
            log.warning(
                "recorder: %s failed (%s: %s); trying once more", what, type(err).__name__, err
            )
            write()

    def _mark(self, kind: str, seq: int) -> None:
        """Record that `seq` of `kind` is on disk (a raw frame's metadata is then due)."""
        self._beat = time.monotonic()
        with self._lock:
            self._present[kind].add(seq)
            if kind == "raw" and seq in self._frame_meta:
                self._meta_pending[seq] = self._frame_meta.pop(seq)

    # -- metadata and failures -----------------------------------------------------------

    def _create_image(self, role: str, group_path: str, compression: str) -> _Image:
        """Create the NGFF image group of `role` and its empty time axis (grown per write)."""
        group = self._root.create_group(group_path)
        axis = self.stack_axis
        dt, px = 1 / self.rate_hz, self.pixel_size_um
        scale: list[float] = [dt, px, px]
        translation: list[float] | None = None
        if role == "stacks":
            scale, translation = axis.transform(dt, px)
        shape = self._item_shape[role]
        axes = image_axes(role, axis)
        chunk_t, shard_t = self.chunk_t[role], self.shard_t[role]
        image = _Image(
            role=role,
            group=group,
            array=group.create_array(
                "0",
                shape=(0, *shape),
                chunks=(chunk_t, *shape),
                shards=None if shard_t == chunk_t else (shard_t, *shape),
                dtype=self.dtypes[role],
                fill_value=0,
                compressors=_compressors(compression),
                dimension_names=[a["name"] for a in axes],
                # frames and stacks are never all fill value in practice, and which seqs are
                # present is in the attributes: skip zarr's per-chunk emptiness test (a full
                # comparison of every chunk, about 6 % of a core at 12 Hz x 41 x 256²)
                config={"write_empty_chunks": True},
            ),
            name=role,
            axes=axes,
            scale=scale,
            translation=translation,
            sampler=WindowSampler(self.dtypes[role]),
        )
        self._write_image_attrs(image)
        if role == "stacks":
            group.attrs["deepz"] = axis.attrs()
            if axis.dpms_um is not None:
                dpms = group.create_array(
                    DPMS_ARRAY,
                    data=axis.dpms_um,
                    chunks=axis.dpms_um.shape,
                    compressors=_compressors(compression),
                    dimension_names=["surface", "y", "x"],
                )
                dpms.attrs["deepz"] = {
                    "unit": "micrometer",
                    "surfaces": list(axis.surfaces or ()),
                    "meaning": "per-pixel axial distance from the focal plane to the surface "
                    "each stack plane was refocused onto (the Deep-Z DPM)",
                }
        return image

    def _write_image_attrs(self, image: _Image) -> None:
        """Write an image's NGFF metadata with its current display window."""
        image.group.attrs["ome"] = ngff_image(
            image.name, image.axes, image.scale, image.translation, image.sampler.window()
        )

    def _create_frames(self) -> dict[str, zarr.Array[Any]]:
        """Create the per-seq frame metadata arrays (NaN until a frame's metadata is written)."""
        group = self._root.create_group(FRAMES_GROUP)
        group.attrs["deepz"] = {
            "index": "camera sequence number (the t index of the images)",
            "fields": FRAME_FIELDS,
            "missing": "NaN: no frame with that seq reached the recorder (a frame the full "
            "backlog kept off the disk keeps its time and focus here; raw_present says which "
            "are on disk)",
        }
        return {
            name: group.create_array(
                name,
                shape=(0,),
                chunks=(_FRAME_CHUNK,),
                dtype=np.float64,
                fill_value=float("nan"),
                compressors=None,
                dimension_names=["t"],
            )
            for name in FRAME_FIELDS
        }

    def _grow(self, array: zarr.Array[Any], seq: int) -> None:
        """Grow the time axis to end exactly at `seq` (never rows that were not written)."""
        if seq >= array.shape[0]:
            array.resize((seq + 1, *array.shape[1:]))

    def _flush_frame_meta(self) -> None:
        """Write the frame metadata that is due, one read and one write per chunk and field.

        Rows between the due seqs keep what they hold (NaN, or a frame's metadata written
        earlier): each chunk's span is read, filled in and written back whole. One write per
        run of consecutive seqs took 4 s for 140 frames of a run with a gap between each.
        """
        with self._lock:
            pending, self._meta_pending = self._meta_pending, {}
        if not pending:
            return
        try:
            by_chunk: dict[int, list[int]] = {}
            for seq in sorted(pending):
                by_chunk.setdefault(seq // _FRAME_CHUNK, []).append(seq)
            for seqs in by_chunk.values():
                start, stop = seqs[0], seqs[-1] + 1
                due = np.array([pending[s] for s in seqs], dtype=np.float64)
                rows = np.asarray(seqs) - start
                for i, array in enumerate(self._frames.values()):
                    self._grow(array, stop - 1)
                    values = np.asarray(array[start:stop], dtype=np.float64)
                    values[rows] = due[:, i]
                    array[start:stop] = values
                self._meta_end = max(self._meta_end, stop)
        except BaseException:
            with self._lock:  # not written: keep it for the next try
                self._meta_pending = pending | self._meta_pending
            raise

    def _write_attrs(self, *, final: bool = False) -> None:
        """Write presence runs, rejection counts, frame metadata, display windows, OME-XML."""
        with self._lock:
            self._deepz["raw_present"] = [list(r) for r in self._present["raw"].ranges()]
            self._deepz["stacks_present"] = [list(r) for r in self._present["stacks"].ranges()]
        self._deepz["rejected"] = self.rejections()
        self._deepz["stack_values_clipped"] = self._gates["stacks"].clipped()
        # complete: everything admitted is on disk; a frame or stack the backlog refused (a
        # disk slower than the data) is missing from it, said at close in the summary too
        self._deepz["complete"] = (
            final
            and self.error is None
            and self.stacks_error is None
            and self.run_error is None
            and not any(self._backlog_dropped[image] for image in _IMAGES)
        )
        self._deepz["error"] = self.error
        self._deepz["stacks_error"] = self.stacks_error
        self._deepz["run_error"] = self.run_error
        self._flush_frame_meta()
        for image in self._images.values():
            if len(image.sampler) and (final or not image.windowed):
                self._write_image_attrs(image)  # the first frames' window, then the final one
                image.windowed = True
        if any(image.xml_t != image.array.shape[0] for image in self._images.values()):
            write_ome_xml(self.path, [self._xml_image(image) for image in self._images.values()])
            for image in self._images.values():
                image.xml_t = image.array.shape[0]
        self._root.attrs["deepz"] = self._deepz
        if not final:
            self._grow_reserve()

    def _grow_reserve(self) -> None:
        """Hold back three times the root metadata's size if the reserve is smaller.

        The final metadata is about the root attributes again plus the gap lists of the
        summary (no larger than the presence runs): a run with very many gaps outgrows the
        `RESERVE_MB` default, and on a disk that then fills the final write would fail.
        """
        if self._reserve is None or self._reserve_bytes <= 0:  # none asked for
            return
        try:
            wanted = 3 * (self.path / "zarr.json").stat().st_size
            if wanted > self._reserve_bytes:
                _hold_space(self._reserve, wanted - self._reserve_bytes, append=True)
                self._reserve_bytes = wanted
        except OSError as err:  # the space check stops the recorder if the disk is full
            log.warning(
                "recorder: could not grow the reserve %s to hold the metadata (%s); "
                "it stays at %d bytes",
                self._reserve,
                err,
                self._reserve_bytes,
            )
            self._reserve_bytes = 0  # said once; no further tries

    def _xml_image(self, image: _Image) -> XmlImage:
        """Describe one image for METADATA.ome.xml as it is now."""
        z_step = image.scale[1] if image.role == "stacks" and self.stack_axis.uniform else None
        return XmlImage(
            name=image.name,
            dtype=self.dtypes[image.role].name,
            size_t=int(image.array.shape[0]),
            size_z=len(self.stack_axis) if image.role == "stacks" else 1,
            size_y=self.frame_shape[0],
            size_x=self.frame_shape[1],
            pixel_size_um=self.pixel_size_um,
            interval_s=1 / self.rate_hz,
            z_step_um=z_step,
        )

    def _check_space(self) -> None:
        """Read the free space (for the status); stop what ``min_free_mb`` says, or all if unread.

        Below ``min_free_mb`` the stacks stop when raw frames are kept; below half of it (or
        below it, raw frames not kept) the recorder stops, writing what it holds first when
        that fits. After a failure only the figure is read: nothing more is written.
        """
        try:
            free_mb = self._free_mb = _disk_free_mb(self.path)
            self._space_unread = 0
        except OSError as err:  # the folder gone or unreachable: nothing more will be written
            self._free_mb = None
            self._space_unread += 1
            if self._space_unread < 2:  # a passing fault is read again a second later
                log.warning("recorder: cannot read the free space of %s: %s", self.path, err)
                return
            self._fail(
                f"cannot read the free space of {self.path} ({type(err).__name__}: {err}): "
                "the store's folder is gone or unreachable"
            )
            return
        if self.error is not None or self.min_free_mb <= 0 or free_mb >= self.min_free_mb:
            return  # after a failure the freed reserve is for the final metadata alone
        low = f"only {free_mb:.0f} MB free on {self.path}"
        limit = f"recorder.min_free_mb = {self.min_free_mb:.0f}"
        # the raw frames are the recording and a stack is tens of frames' bytes: the stacks
        # stop first (made again offline from the raw frames), the raw frames at half of it
        if self._raw is not None and free_mb >= self.min_free_mb / 2:
            if self._stacks is not None:
                self._stop_stacks(
                    f"{low}, below {limit}; raw frames are recorded down to half of it"
                )
            return
        held_mb = sum(s.data.nbytes for h in self._held.values() for s in h.values()) / 2**20
        if held_mb < free_mb:  # what is held in memory for its shard fits: written first
            self._write_held(held_since=math.inf)
        below = f"half of {limit}" if self._raw is not None else limit
        self._fail(f"{low}, below {below}")

    def _fail(self, reason: str, *, release_reserve: bool = True) -> None:
        """Stop writing and log why, once; free the reserve for the truthful final metadata.

        Not the reserve when the disk stopped answering (`close`): deleting it would hang.
        """
        if self.error is None:
            self.error = reason
            if release_reserve:
                self._release_reserve()
            log.error(
                "RECORDER STOPPED: %s. Data written so far is kept in %s; the run continues "
                "without recording.",
                reason,
                self.path,
            )

    def _release_reserve(self) -> None:
        """Delete the reserve file (idempotent): its space is for the metadata written next."""
        reserve, self._reserve = self._reserve, None
        if reserve is not None:
            try:
                reserve.unlink(missing_ok=True)
            except OSError as err:  # nothing more to free; the metadata writes will say if so
                log.warning("could not delete the recorder's reserve %s: %s", reserve, err)

    def _guarded(self, step: Any, what: str) -> None:
        """Run a metadata/flush step, turning a storage error into the logged failure.

        After the first failure a further one is logged too (once the reserve is spent the
        store may not say everything), but it does not replace the first error.
        """
        try:
            step()
            self._beat = time.monotonic()
        except Exception as err:  # a storage fault must not kill the daemon
            reason = f"writing {what} failed: {type(err).__name__}: {err}"
            if self.error is not None:
                log.error("recorder: %s (after: %s)", reason, self.error)
            self._fail(reason)

    def _trim_all(self) -> None:
        """Cut every time axis back to what is on disk: last present seq, last frame metadata."""
        with self._lock:
            ends = {role: self._present[role].last + 1 for role in _IMAGES}
        for role, image in self._images.items():
            _trim(image.array, ends[role])
        for array in self._frames.values():
            _trim(array, min(self._meta_end, array.shape[0]))

    def _finish(self) -> RecorderSummary:
        """Trim the arrays to what is on disk and write the final metadata and summary.

        Every admitted item of a kept image that is not on disk is counted as unrecorded,
        whatever stopped it (a write error, the writer thread's death, a close timeout, a
        full backlog).
        """
        self._release_reserve()
        self._guarded(self._trim_all, "array shape")
        summary = self._summarise()
        self._deepz["summary"] = {
            "raw_frames": summary.raw_frames,
            "stacks": summary.stacks,
            "raw_gaps": [list(r) for r in summary.raw_gaps],
            "stacks_gaps": [list(r) for r in summary.stacks_gaps],
            "unrecorded": summary.unrecorded,
            "stacks_error": summary.stacks_error,
            "backlog_dropped": summary.backlog_dropped,
            "rejected": summary.rejected,
            "stack_values_clipped": summary.stack_values_clipped,
        }
        self._guarded(lambda: self._write_attrs(final=True), "final metadata")
        log.info(summary.line())
        return summary

    def _summarise(self) -> RecorderSummary:
        """Return what the recording holds and lacks, from memory (nothing written)."""
        with self._lock:
            present = {role: self._present[role].ranges() for role in _IMAGES}
            counts = {role: len(self._present[role]) for role in _IMAGES}
        gaps = {role: gap_ranges(runs) for role, runs in present.items()}
        return RecorderSummary(
            path=str(self.path),
            raw_frames=counts["raw"],
            stacks=counts["stacks"],
            unrecorded=sum(self._gates[role].admitted() - counts[role] for role in self._images),
            error=self.error,
            rejected=self.rejections(),
            stacks_error=self.stacks_error,
            run_error=self.run_error,
            raw_gaps=gaps["raw"],
            stacks_gaps=gaps["stacks"],
            stack_values_clipped=self._gates["stacks"].clipped(),
            backlog_dropped=dict(self._backlog_dropped),
        )


_WHOLE_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""Write errors of the disk, not of one file: every image's writes would fail alike."""


def _disk_free_mb(path: Path) -> float:
    """Free space of the file system holding `path`, MB (raises OSError when it cannot say)."""
    return shutil.disk_usage(path).free / 2**20


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


def _trim(array: zarr.Array[Any], length: int) -> None:
    """Shrink the time axis of `array` to `length` rows (never grow it; no write if not needed)."""
    if array.shape[0] > length:
        array.resize((length, *array.shape[1:]))


def gap_ranges(present: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Return the half-open ranges between 0 and the last present seq that are not present.

    `present` is sorted half-open (start, stop) runs, as a store's ``raw_present`` holds them.
    """
    gaps, previous = [], 0
    for start, stop in present:
        if start > previous:
            gaps.append((previous, start))
        previous = stop
    return gaps


def _hold_space(path: Path, nbytes: int, *, append: bool = False) -> None:
    """Write `nbytes` of incompressible bytes to `path` (or its end), so the space is taken.

    Random bytes rather than zeros or ``fallocate``: a compressing or deduplicating file
    system (btrfs, ZFS) would hold no space for those.
    """
    if nbytes <= 0:
        return
    block = os.urandom(min(nbytes, 2**20))
    # appending never creates the file: a reserve deleted meanwhile (a failure, close) stays so
    flags = os.O_WRONLY | (os.O_APPEND if append else os.O_CREAT | os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o644), "wb") as f:
        for start in range(0, nbytes, len(block)):
            f.write(block[: nbytes - start])


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
