"""Live counters of the daemon: frames in, stacks out, skipped, lost, malformed, rejected, rates.

One `Metrics` object is shared by the daemon's threads (every method takes its lock). It keeps
the sequence numbers of skipped and lost frames as ranges (`SeqSet`), so losses are data, not
just counts, and memory follows the number of gaps, not of frames. It renders one short status
line per second and a JSON snapshot for the status endpoint; the snapshot carries at most
`MAX_STATUS_RANGES` ranges of each seq list (the newest), so a status message stays small
whatever a run loses. The snapshot also says where the run is (`RunState`), which backend
refocuses and where the recording goes, so a client (`live.status_client`) needs nothing
else; the latency of the last `LATENCY_WINDOW` stacks is kept with its arrival time for the
end-of-run preview (`live.preview`).

How the counts add up: every message on the frames endpoint is either malformed or a frame
(``frames_in``); a frame is either rejected by the integrity checks (``rejected``, by kind)
or admitted; an admitted frame is routed to a worker or skipped; and a routed frame comes
back as a stack, is skipped by the worker's overload policy or is lost (its worker died).
"""

from __future__ import annotations

import json
import math
import operator
import threading
import time
from bisect import bisect_right
from collections import deque
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from pathlib import Path

    from live.security import ClientKeys, ServerKeys

__all__ = [
    "LATENCY_WINDOW",
    "MAX_STATUS_BYTES",
    "MAX_STATUS_RANGES",
    "WORKER_STAGES",
    "Metrics",
    "RunState",
    "SeqRuns",
    "SeqSet",
    "Snapshot",
    "StageTimes",
    "StatusPublisher",
    "StatusReader",
    "format_ranges",
    "format_seqs",
    "format_stage_times",
    "seq_ranges",
    "summary_dict",
]

LATENCY_WINDOW = 10_000
"""Latency percentiles (and `Metrics.latency_series`) are over the most recent this-many stacks."""
MAX_STATUS_RANGES = 50
"""A status snapshot carries at most this many (the newest) ranges of skipped / lost seqs."""
_MAX_LATE = 10_000
"""Most seqs remembered as arrived-before-lost (a handful at a time: one per dead worker)."""
MAX_STATUS_BYTES = 65536
"""Largest status message a `StatusReader` accepts (a snapshot is well under 8 KB)."""


class RunState(StrEnum):
    """Where a daemon run is; the status snapshot carries it as its string value."""

    STARTING = "starting"
    """Choosing the backend, pre-flight, starting recorder, workers and source."""
    RUNNING = "running"
    """Frames flow; a status line each second."""
    STOPPING = "stopping"
    """Draining the pipeline and closing the recording."""
    FINISHED = "finished"
    """Everything is closed; the snapshot's counts are final."""


class SeqSet:
    """A set of sequence numbers kept as sorted, merged half-open ranges (not thread-safe).

    Adding is O(log r + r) for r ranges and usually O(log r) (seqs mostly arrive in order),
    and memory is O(r): a run that skips a million frames in a row holds one range, and a
    recording of a million frames without a gap holds one range where a `set` held 63 MiB.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self.count = 0

    def add(self, seq: int) -> None:
        """Add one seq (adding one already present changes nothing)."""
        starts, stops = self._starts, self._stops
        i = bisect_right(starts, seq)  # ranges [0, i) start at or before seq
        if i and stops[i - 1] > seq:
            return
        joins_left = bool(i) and stops[i - 1] == seq
        joins_right = i < len(starts) and starts[i] == seq + 1
        if joins_left and joins_right:
            stops[i - 1] = stops[i]
            del starts[i], stops[i]
        elif joins_left:
            stops[i - 1] = seq + 1
        elif joins_right:
            starts[i] = seq
        else:
            starts.insert(i, seq)
            stops.insert(i, seq + 1)
        self.count += 1

    def __contains__(self, seq: object) -> bool:
        try:  # any integer, NumPy's included, as a set of ints would (a set said yes to those)
            seq = operator.index(seq)  # type: ignore[arg-type]
        except TypeError:
            return False
        i = bisect_right(self._starts, seq) - 1  # the range that starts at or before seq
        return i >= 0 and self._stops[i] > seq

    def __len__(self) -> int:
        return self.count

    def intersects(self, start: int, stop: int) -> bool:
        """Whether any seq in ``[start, stop)`` is held."""
        i = bisect_right(self._starts, stop - 1) - 1  # the last range starting before stop
        return i >= 0 and self._stops[i] > start

    @property
    def last(self) -> int:
        """The highest seq held, -1 when empty."""
        return self._stops[-1] - 1 if self._stops else -1

    def discard(self, seq: int) -> bool:
        """Remove one seq; return whether it was there (a range may split in two)."""
        starts, stops = self._starts, self._stops
        i = bisect_right(starts, seq) - 1  # the range that starts at or before seq
        if i < 0 or stops[i] <= seq:
            return False
        start, stop = starts[i], stops[i]
        if start == seq and stop == seq + 1:
            del starts[i], stops[i]
        elif start == seq:
            starts[i] = seq + 1
        elif stop == seq + 1:
            stops[i] = seq
        else:
            stops[i] = seq
            starts.insert(i + 1, seq + 1)
            stops.insert(i + 1, stop)
        self.count -= 1
        return True

    def ranges(self, last: int | None = None) -> list[tuple[int, int]]:
        """Return the ``(start, stop)`` ranges in order, only the `last` ones if given."""
        pairs = list(zip(self._starts, self._stops, strict=True))
        return pairs if last is None else pairs[max(0, len(pairs) - last) :]

    def frozen(self) -> SeqRuns:
        """Return what is held now as an immutable `SeqRuns` (for the end-of-run summary)."""
        return SeqRuns(self.ranges(), self.count)


class SeqRuns:
    """An immutable, sorted set of seqs kept as half-open ``(start, stop)`` runs.

    The end-of-run summary's skipped and lost seqs: a run that skips a million frames in a row
    holds one run, where the list of its seqs took 1.8 s and 121 MiB to build (session 44's
    Known gap). Iterating yields the seqs themselves, in order, one at a time.
    """

    __slots__ = ("_count", "_runs")

    def __init__(self, runs: Iterable[tuple[int, int]] = (), count: int | None = None) -> None:
        self._runs = tuple((int(a), int(b)) for a, b in runs)
        self._count = sum(b - a for a, b in self._runs) if count is None else count

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """The half-open ``(start, stop)`` runs, in order (the store's format)."""
        return self._runs

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __iter__(self) -> Iterator[int]:
        for start, stop in self._runs:
            yield from range(start, stop)

    def __contains__(self, seq: object) -> bool:
        try:
            seq = operator.index(seq)  # type: ignore[arg-type]
        except TypeError:
            return False
        i = bisect_right(self._runs, (seq, math.inf)) - 1  # the run that starts at or before
        return i >= 0 and self._runs[i][1] > seq

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeqRuns) and self._runs == other._runs

    def __hash__(self) -> int:
        return hash(self._runs)

    def __repr__(self) -> str:
        return f"SeqRuns({format_ranges(self._runs, limit=5)}; {self._count} seqs)"


@dataclass(frozen=True)
class Snapshot:
    """Counters at one instant; rates are over the last status interval."""

    elapsed_s: float
    frames_in: int
    frames_routed: int
    stacks_out: int
    skipped: int
    lost: int
    malformed: int
    raw_recorded: int
    stacks_recorded: int
    worker_restarts: int
    frames_per_s: float
    stacks_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    queue_depth: int
    recorder_backlog: int
    rejected: dict[str, int] = field(default_factory=dict)
    """Frames refused by the integrity checks, by kind (`live.recorder.REJECTIONS`)."""
    skipped_ranges: list[tuple[int, int]] = field(default_factory=list)
    """The newest `MAX_STATUS_RANGES` half-open ranges of skipped seqs (all are counted)."""
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)
    """The newest `MAX_STATUS_RANGES` half-open ranges of lost seqs (all are counted)."""
    disk_free_mb: float | None = None
    """Free space where the recording goes, MB (None when not recording)."""
    disk_low: bool = False
    """Whether `disk_free_mb` is below twice ``recorder.min_free_mb`` (shown in the status)."""
    state: RunState = RunState.STARTING
    """Where the run is (`Metrics.set_run_info`); a string value in the JSON."""
    backend: str | None = None
    """The backend refocusing the frames, e.g. ``"openvino on CPU"`` (None until chosen)."""
    output: str | None = None
    """The run's OME-Zarr store (None when nothing is recorded)."""

    @property
    def rejected_total(self) -> int:
        """Frames refused by the integrity checks, all kinds together."""
        return sum(self.rejected.values())

    def status_line(self) -> str:
        """Render the one-line live status printed once per second (short: under 100 characters).

        ``in`` frames and their rate, ``stacks`` out and their rate; then only the non-zero
        ones of ``skip``ped, ``lost``, malformed (``bad``) and ``rej``ected frames (or
        ``no loss``); latency p50/p99; frames out at workers (``q``); the recorder's backlog
        (``rec``) when it has one; and ``disk N MB!`` once free space nears
        ``recorder.min_free_mb``.
        """
        lat = (
            f"{self.latency_p50_ms:.0f}/{self.latency_p99_ms:.0f} ms"
            if self.latency_p50_ms is not None and self.latency_p99_ms is not None
            else "-"
        )
        counts = (
            ("skip", self.skipped),
            ("lost", self.lost),
            ("bad", self.malformed),
            ("rej", self.rejected_total),
        )
        losses = " ".join(f"{name} {n}" for name, n in counts if n) or "no loss"
        line = (
            f"[{self.elapsed_s:4.0f}s] in {self.frames_in} {self.frames_per_s:.3g}/s | "
            f"stacks {self.stacks_out} {self.stacks_per_s:.3g}/s | {losses} | {lat} | "
            f"q {self.queue_depth}"
        )
        if self.recorder_backlog:
            line += f" rec {self.recorder_backlog}"
        if self.disk_low and self.disk_free_mb is not None:
            line += f" | disk {self.disk_free_mb:.0f} MB!"
        return line

    def to_json(self) -> bytes:
        """Serialise for the status endpoint."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, status: dict[str, Any]) -> Snapshot:
        """Rebuild a snapshot from its JSON object, every field's kind and range checked.

        The object came off a socket: a count must be a non-negative integer (not a bool, a
        float or a string), a time or rate a finite non-negative number, the state one of
        `RunState`'s. Fields this version does not know are ignored (a newer daemon).

        Raises
        ------
        ValueError
            One line naming the first field that is missing or of the wrong kind.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in status:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ValueError(f"no {f.name!r}")
                continue
            value = status[f.name]
            if not _SNAPSHOT_CHECKS[f.name](value):
                raise ValueError(f"{f.name!r} is not {_SNAPSHOT_KINDS[f.name]}: {value!r:.60}")
            values[f.name] = value
        if "state" in values:
            values["state"] = RunState(values["state"])
        for name in ("skipped_ranges", "lost_ranges"):
            if name in values:
                values[name] = [(int(a), int(b)) for a, b in values[name]]
        return cls(**values)


class Metrics:
    """Thread-safe counters and latency window of one daemon run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.frames_in = 0
        self.frames_routed = 0
        self.stacks_out = 0
        self.malformed = 0
        self.worker_restarts = 0
        self.raw_recorded = 0
        self.stacks_recorded = 0
        self.queue_depth = 0
        self.recorder_backlog = 0
        self.disk_free_mb: float | None = None
        self.disk_low = False
        self._rejected: dict[str, int] = {}
        self._skipped = SeqSet()
        self._clamped = SeqSet()
        self._lost = SeqSet()
        self._late: set[int] = set()
        self.state = RunState.STARTING
        self.backend: str | None = None
        self.output: str | None = None
        self._latency: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW)
        """(seconds since start, latency ms) of the newest stacks, in arrival order."""
        self._last = (self._t0, 0, 0)

    def frame_in(self) -> None:
        """Count one well-formed frame received by the router."""
        with self._lock:
            self.frames_in += 1

    def frame_routed(self) -> None:
        """Count one frame handed to a worker."""
        with self._lock:
            self.frames_routed += 1

    def malformed_in(self) -> None:
        """Count one message that failed to decode."""
        with self._lock:
            self.malformed += 1

    def reject(self, kind: str) -> None:
        """Count one frame refused by the integrity checks (`live.recorder.REJECTIONS`)."""
        with self._lock:
            self._rejected[kind] = self._rejected.get(kind, 0) + 1

    def stack_out(self, latency_ms: float) -> None:
        """Count one stack received from a worker and record its latency and arrival time."""
        with self._lock:
            self.stacks_out += 1
            self._latency.append((time.monotonic() - self._t0, latency_ms))

    def skip(self, seqs: list[int]) -> None:
        """Record frames that the overload policy did not refocus (by seq)."""
        with self._lock:
            for seq in seqs:
                self._skipped.add(seq)

    def lose(self, seqs: list[int]) -> None:
        """Record frames lost to a crashed worker or unfinished at shutdown (by seq).

        A seq whose stack already arrived after its worker was taken (`late_stack`) is not
        lost: the two calls race between the supervisor and the collector.
        """
        with self._lock:
            for seq in seqs:
                if seq in self._late:
                    self._late.discard(seq)
                else:
                    self._lost.add(seq)

    def late_stack(self, seq: int) -> bool:
        """Record a stack that arrived for a seq no longer out at a worker: it is not lost.

        Its worker sent the stack, then died before the collector read it. If the seq was
        already counted lost it is un-counted (return True); otherwise it is remembered, so the
        supervisor's `lose` of the same seq, coming just after, does not count it.
        """
        with self._lock:
            if self._lost.discard(seq):
                return True
            if len(self._late) < _MAX_LATE:
                self._late.add(seq)
            return False

    def restart(self) -> None:
        """Count one worker restart."""
        with self._lock:
            self.worker_restarts += 1

    def set_gauges(
        self,
        *,
        queue_depth: int,
        recorder_backlog: int,
        raw_recorded: int,
        stacks_recorded: int,
        disk_free_mb: float | None = None,
        disk_low: bool = False,
    ) -> None:
        """Update the values sampled from other components (queues, recorder, disk)."""
        with self._lock:
            self.queue_depth = queue_depth
            self.recorder_backlog = recorder_backlog
            self.raw_recorded = raw_recorded
            self.stacks_recorded = stacks_recorded
            self.disk_free_mb = disk_free_mb
            self.disk_low = disk_low

    def set_run_info(
        self,
        *,
        state: RunState | str | None = None,
        backend: str | None = None,
        output: str | Path | None = None,
    ) -> None:
        """Set where the run is, its backend and its output store (None leaves one unchanged).

        Raises ValueError naming the allowed states for a `state` that is not a `RunState`.
        """
        try:
            new_state = None if state is None else RunState(state)
        except ValueError:
            allowed = ", ".join(s.value for s in RunState)
            raise ValueError(f"run state {state!r} is not one of: {allowed}") from None
        with self._lock:
            if new_state is RunState.RUNNING and self.state is not RunState.RUNNING:
                # the run's clock starts with acquisition, not with the warm-up before it
                # (pre-flight, model loading): elapsed time and rates count from here
                now = time.monotonic()
                self._t0 = now
                self._last = (now, self._last[1], self._last[2])
            if new_state is not None:
                self.state = new_state
            if backend is not None:
                self.backend = backend
            if output is not None:
                self.output = str(output)

    def latency_series(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (seconds since start, latency ms) of the last `LATENCY_WINDOW` stacks.

        Two float64 arrays of equal length in arrival order (empty before any stack), for a
        picture of how latency moved during the run (`live.preview.write_preview`).
        """
        with self._lock:
            pairs = np.array(self._latency, dtype=np.float64).reshape(-1, 2)
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    def clamp(self, seqs: Iterable[int]) -> None:
        """Record frames a worker refocused with its focus lock clamped (`live.worker`)."""
        with self._lock:
            for seq in seqs:
                self._clamped.add(seq)

    def clamped_seqs(self) -> SeqRuns:
        """Return every frame refocused with its focus lock clamped (for the summary)."""
        with self._lock:
            return self._clamped.frozen()

    def skipped_seqs(self) -> SeqRuns:
        """Return every skipped seq (for the summary; the snapshot carries the newest runs)."""
        with self._lock:
            return self._skipped.frozen()

    def lost_seqs(self) -> SeqRuns:
        """Return every lost seq (for the summary; the snapshot carries the newest runs)."""
        with self._lock:
            return self._lost.frozen()

    def snapshot(self, *, advance: bool = True) -> Snapshot:
        """Take a consistent snapshot; with `advance`, the rate window restarts here."""
        with self._lock:
            now = time.monotonic()
            t_last, f_last, s_last = self._last
            dt = max(now - t_last, 1e-9)
            if advance:
                self._last = (now, self.frames_in, self.stacks_out)
            p50, p99 = _percentiles([ms for _, ms in self._latency])
            return Snapshot(
                elapsed_s=now - self._t0,
                frames_in=self.frames_in,
                frames_routed=self.frames_routed,
                stacks_out=self.stacks_out,
                skipped=self._skipped.count,
                lost=self._lost.count,
                malformed=self.malformed,
                raw_recorded=self.raw_recorded,
                stacks_recorded=self.stacks_recorded,
                worker_restarts=self.worker_restarts,
                frames_per_s=(self.frames_in - f_last) / dt,
                stacks_per_s=(self.stacks_out - s_last) / dt,
                latency_p50_ms=p50,
                latency_p99_ms=p99,
                queue_depth=self.queue_depth,
                recorder_backlog=self.recorder_backlog,
                rejected=dict(self._rejected),
                skipped_ranges=self._skipped.ranges(MAX_STATUS_RANGES),
                lost_ranges=self._lost.ranges(MAX_STATUS_RANGES),
                disk_free_mb=self.disk_free_mb,
                disk_low=self.disk_low,
                state=self.state,
                backend=self.backend,
                output=self.output,
            )


WORKER_STAGES = ("refocus", "send")
"""The stages a live worker times per frame: the backend's refocus (network and rendering),
then the cast, encoding and send of the stack."""


class StageTimes:
    """Where a worker's time goes: per-frame durations of its stages, and how busy it was.

    A worker times each frame's stages (the network and rendering, the cast and send) with
    `add`; `fields` gives their p50 / p99 over the last `LATENCY_WINDOW` frames and the busy
    share (time in any stage over the time from the first frame's start to the last one's
    end), flat, for the worker's "done" event. Busy near 100 % means the worker is the
    bottleneck; well below with a high latency means the time goes elsewhere (queues, other
    processes on the same cores). One thread uses it (the worker's main thread).
    """

    def __init__(self, stages: tuple[str, ...]) -> None:
        self._times: dict[str, deque[float]] = {s: deque(maxlen=LATENCY_WINDOW) for s in stages}
        self._busy_s = 0.0
        self._first: float | None = None
        self._last: float | None = None

    def add(self, stage: str, start_s: float, end_s: float) -> None:
        """Count `stage` running from `start_s` to `end_s` (``time.perf_counter`` seconds)."""
        self._times[stage].append((end_s - start_s) * 1e3)
        self._busy_s += end_s - start_s
        self._first = start_s if self._first is None else min(self._first, start_s)
        self._last = end_s if self._last is None else max(self._last, end_s)

    @staticmethod
    def field_names(stages: tuple[str, ...]) -> tuple[str, ...]:
        """Return the names `fields` gives for `stages`, in its order."""
        return (*(f"{s}_{q}_ms" for s in stages for q in ("p50", "p99")), "busy")

    def fields(self) -> dict[str, float | None]:
        """``{stage}_p50_ms``, ``{stage}_p99_ms`` per stage and ``busy`` (0-1; None if idle)."""
        out: dict[str, float | None] = {}
        for stage, times in self._times.items():
            p50, p99 = _percentiles(list(times))
            out[f"{stage}_p50_ms"] = None if p50 is None else round(p50, 2)
            out[f"{stage}_p99_ms"] = None if p99 is None else round(p99, 2)
        span = (
            self._last - self._first if self._first is not None and self._last is not None else 0.0
        )
        out["busy"] = round(min(self._busy_s / span, 1.0), 3) if span > 0 else None
        return out


def format_stage_times(times: dict[str, Any]) -> str:
    """One line of a worker's stage times (`StageTimes.fields`, as its "done" event has them)."""

    def ms(key: str) -> str:
        v = times.get(key)
        return "n/a" if not isinstance(v, int | float) else f"{v:.1f}"

    busy = times.get("busy")
    share = f"{100 * busy:.0f} %" if isinstance(busy, int | float) else "n/a"
    return (
        f"refocus p50/p99 {ms('refocus_p50_ms')} / {ms('refocus_p99_ms')} ms, send "
        f"{ms('send_p50_ms')} / {ms('send_p99_ms')} ms; busy {share}"
    )


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    """Return the p50 and p99 of `values`, or (None, None) when empty."""
    if not values:
        return None, None
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return float(p50), float(p99)


def format_seqs(seqs: list[int], limit: int = 20) -> str:
    """Write sorted seqs as compact ranges, e.g. ``3-7, 9, 12-13``, eliding after `limit` ranges."""
    return format_ranges(seq_ranges(seqs), limit)


def format_ranges(runs: Sequence[tuple[int, int]], limit: int = 20) -> str:
    """Write half-open ``(start, stop)`` runs as `format_seqs` writes their seqs."""
    ranges: list[str] = []
    for start, stop in runs:
        ranges.append(str(start) if stop == start + 1 else f"{start}-{stop - 1}")
    if len(ranges) > limit:
        return ", ".join(ranges[:limit]) + f", … ({len(ranges) - limit} more ranges)"
    return ", ".join(ranges) if ranges else "none"


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Collapse seqs into sorted half-open ``(start, stop)`` runs (a store's presence format)."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


class StatusPublisher:
    """PUB socket on ``endpoints.status`` that publishes each snapshot as JSON (topic-less).

    With `keys` the socket is a CURVE server: only clients the daemon's ZAP handler lets in
    (`live.security.Gatekeeper`) receive anything.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        keys: ServerKeys | None = None,
    ) -> None:
        from live.security import publisher

        self._socket = publisher(ctx, endpoint, keys, sndhwm=10)

    def publish(self, snapshot: Snapshot) -> None:
        """Publish without blocking; a slow subscriber just misses updates."""
        try:
            self._socket.send(snapshot.to_json(), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket, first trying for up to `linger_ms` to send what is queued.

        The default drops unsent snapshots at once; give a linger (e.g. 200 ms) after
        publishing the final snapshot so that readers hear the run has finished.
        """
        self._socket.close(linger=linger_ms)


class StatusReader:
    """SUB client of the daemon's status endpoint: the newest snapshot as a dict.

    Parameters
    ----------
    endpoint : str
        ``endpoints.status`` of the daemon.
    ctx : zmq.Context, optional
        Context for the socket (a new one, closed with the reader, by default).
    keys : live.security.ClientKeys, optional
        CURVE keys when the endpoint uses CURVE (`live.security.client_keys(config,
        "status")`).

    Raises
    ------
    zmq.ZMQError
        `endpoint` cannot be connected to (not a ZeroMQ address, ``tcp://*:5558``); the socket
        is closed (and a context this reader made terminated) first.
    """

    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        *,
        keys: ClientKeys | None = None,
    ) -> None:
        from live.security import subscriber

        self._own_ctx = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context()
        try:
            self._sub = subscriber(self._ctx, endpoint, keys, max_message_bytes=MAX_STATUS_BYTES)
        except BaseException:
            if self._own_ctx:
                self._ctx.term()
            raise

    def latest(self, timeout_ms: int = 0) -> dict[str, Any] | None:
        """Return the newest snapshot that arrives within `timeout_ms`, or None.

        Older waiting snapshots are discarded. The wait is one deadline: messages that are not
        snapshots (more than one part, not JSON, not an object) are skipped without restarting
        it, so a publisher sending junk cannot keep a caller such as ``deepz-live status
        --timeout`` waiting.
        Past the deadline at most `_LATE_MESSAGES` more waiting messages are read, so even a
        flood ends the call.
        """
        timeout_ms = min(timeout_ms, _MAX_POLL_MS)
        deadline = time.monotonic() + timeout_ms / 1000
        newest: dict[str, Any] | None = None
        late = 0
        while late < _LATE_MESSAGES:
            left_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if not self._sub.poll(left_ms if newest is None and left_ms > 0 else 0):
                break
            if left_ms <= 0:
                late += 1
            parts = self._sub.recv_multipart()
            if len(parts) != 1:  # a snapshot is one part: a bad message costs itself only
                continue
            try:
                value = json.loads(parts[0])
            except (ValueError, RecursionError):  # not JSON (or nested past the parser's
                continue  # stack): not from a daemon
            if isinstance(value, dict):
                newest = value
        return newest

    def close(self) -> None:
        """Close the socket (and the context if this reader made it)."""
        self._sub.close()
        if self._own_ctx:
            self._ctx.term()


_MAX_POLL_MS = 2**31 - 1
"""The longest wait ZeroMQ's poll takes (a C int of ms, some 25 days)."""
_LATE_MESSAGES = 1000
"""Most messages `StatusReader.latest` reads once its deadline has passed: as many as a SUB
socket queues by default (ZeroMQ's receive high-water mark), so what waited is drained."""


_MAX_COUNT = 2**63 - 1
_MAX_SECONDS = 1e9  # some 30 years: a larger elapsed time is not a daemon's


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX_COUNT


def _number(value: Any, limit: float = math.inf) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= limit


def _text(value: Any) -> bool:
    return value is None or (type(value) is str and len(value) <= 4096)


_SNAPSHOT_KINDS: dict[str, str] = {
    "elapsed_s": "a number of seconds",
    "frames_per_s": "a rate",
    "stacks_per_s": "a rate",
    "latency_p50_ms": "a latency or null",
    "latency_p99_ms": "a latency or null",
    "rejected": "counts by kind",
    "skipped_ranges": "a list of [start, stop] seq ranges",
    "lost_ranges": "a list of [start, stop] seq ranges",
    "disk_free_mb": "a number of MB or null",
    "disk_low": "true or false",
    "state": f"one of {', '.join(RunState)}",
    "backend": "a string or null",
    "output": "a string or null",
}
"""What `Snapshot.from_dict` expects of each field that is not a count."""

_SNAPSHOT_CHECKS: dict[str, Callable[[Any], bool]] = {
    "elapsed_s": lambda v: _number(v, _MAX_SECONDS),
    "frames_per_s": _number,
    "stacks_per_s": _number,
    "latency_p50_ms": lambda v: v is None or _number(v),
    "latency_p99_ms": lambda v: v is None or _number(v),
    "rejected": lambda v: (
        type(v) is dict and len(v) <= 64 and all(_text(k) and _count(n) for k, n in v.items())
    ),
    "skipped_ranges": lambda v: _seq_ranges(v),
    "lost_ranges": lambda v: _seq_ranges(v),
    "disk_free_mb": lambda v: v is None or _number(v),
    "disk_low": lambda v: type(v) is bool,
    "state": lambda v: v in tuple(RunState),
    "backend": _text,
    "output": _text,
}


def _seq_ranges(value: Any) -> bool:
    return (
        type(value) is list
        and len(value) <= 4 * MAX_STATUS_RANGES
        and all(type(r) is list and len(r) == 2 and all(_count(x) for x in r) for r in value)
    )


for _name in (f.name for f in fields(Snapshot)):  # every other field is a count
    _SNAPSHOT_CHECKS.setdefault(_name, _count)
    _SNAPSHOT_KINDS.setdefault(_name, "a count (a non-negative integer)")


def summary_dict(snapshot: Snapshot, **extra: Any) -> dict[str, Any]:
    """Return the snapshot as a plain dict with `extra` fields (backend, output path, ...)."""
    return {**asdict(snapshot), **extra}
