"""Live counters of the daemon: frames in, stacks out, skipped, lost, malformed, latency, rates.

One `Metrics` object is shared by the daemon's threads (every method takes its lock). It keeps
the sequence numbers of skipped and lost frames, so losses are data, not just counts, and it
renders one status line per second and a JSON snapshot for the status endpoint.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zmq

__all__ = [
    "LATENCY_WINDOW",
    "Metrics",
    "Snapshot",
    "StatusPublisher",
    "format_seqs",
    "seq_ranges",
    "summary_dict",
]

LATENCY_WINDOW = 10_000
"""Latency percentiles are over the most recent this-many stacks."""


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
    skipped_seqs: list[int] = field(default_factory=list)
    lost_seqs: list[int] = field(default_factory=list)

    def status_line(self) -> str:
        """Render the one-line live status printed once per second."""
        lat = (
            f"{self.latency_p50_ms:.1f}/{self.latency_p99_ms:.1f} ms"
            if self.latency_p50_ms is not None and self.latency_p99_ms is not None
            else "-"
        )
        return (
            f"[{self.elapsed_s:6.1f} s] in {self.frames_in} ({self.frames_per_s:.1f}/s) | "
            f"stacks {self.stacks_out} ({self.stacks_per_s:.1f}/s) | skipped {self.skipped} | "
            f"lost {self.lost} | malformed {self.malformed} | p50/p99 {lat} | "
            f"queue {self.queue_depth} | rec backlog {self.recorder_backlog}"
        )

    def to_json(self) -> bytes:
        """Serialise for the status endpoint."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()


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
        self._skipped: list[int] = []
        self._lost: list[int] = []
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
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

    def stack_out(self, latency_ms: float) -> None:
        """Count one stack received from a worker and record its latency."""
        with self._lock:
            self.stacks_out += 1
            self._latency_ms.append(latency_ms)

    def skip(self, seqs: list[int]) -> None:
        """Record frames that the overload policy did not refocus (by seq)."""
        with self._lock:
            self._skipped.extend(seqs)

    def lose(self, seqs: list[int]) -> None:
        """Record frames lost to a crashed worker or unfinished at shutdown (by seq)."""
        with self._lock:
            self._lost.extend(seqs)

    def restart(self) -> None:
        """Count one worker restart."""
        with self._lock:
            self.worker_restarts += 1

    def set_gauges(
        self, *, queue_depth: int, recorder_backlog: int, raw_recorded: int, stacks_recorded: int
    ) -> None:
        """Update the values sampled from other components (queues, recorder)."""
        with self._lock:
            self.queue_depth = queue_depth
            self.recorder_backlog = recorder_backlog
            self.raw_recorded = raw_recorded
            self.stacks_recorded = stacks_recorded

    def snapshot(self, *, advance: bool = True) -> Snapshot:
        """Take a consistent snapshot; with `advance`, the rate window restarts here."""
        with self._lock:
            now = time.monotonic()
            t_last, f_last, s_last = self._last
            dt = max(now - t_last, 1e-9)
            if advance:
                self._last = (now, self.frames_in, self.stacks_out)
            p50, p99 = _percentiles(self._latency_ms)
            return Snapshot(
                elapsed_s=now - self._t0,
                frames_in=self.frames_in,
                frames_routed=self.frames_routed,
                stacks_out=self.stacks_out,
                skipped=len(self._skipped),
                lost=len(self._lost),
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
                skipped_seqs=sorted(self._skipped),
                lost_seqs=sorted(self._lost),
            )


def _percentiles(values: deque[float]) -> tuple[float | None, float | None]:
    """Return the p50 and p99 of `values`, or (None, None) when empty."""
    if not values:
        return None, None
    p50, p99 = np.percentile(np.fromiter(values, float, len(values)), [50, 99])
    return float(p50), float(p99)


def format_seqs(seqs: list[int], limit: int = 20) -> str:
    """Write sorted seqs as compact ranges, e.g. ``3-7, 9, 12-13``, eliding after `limit` ranges."""
    ranges: list[str] = []
    for start, stop in seq_ranges(seqs):
        ranges.append(str(start) if stop == start + 1 else f"{start}-{stop - 1}")
    if len(ranges) > limit:
        return ", ".join(ranges[:limit]) + f", … ({len(ranges) - limit} more ranges)"
    return ", ".join(ranges) if ranges else "none"


def seq_ranges(seqs: list[int]) -> list[tuple[int, int]]:
    """Collapse seqs into sorted half-open ``(start, stop)`` runs."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], s + 1)
        else:
            runs.append((s, s + 1))
    return runs


class StatusPublisher:
    """PUB socket on ``endpoints.status`` that publishes each snapshot as JSON (topic-less)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        self._socket = ctx.socket(zmq.PUB)
        self._socket.linger = 0
        self._socket.sndhwm = 10
        self._socket.bind(endpoint)

    def publish(self, snapshot: Snapshot) -> None:
        """Publish without blocking; a slow subscriber just misses updates."""
        try:
            self._socket.send(snapshot.to_json(), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()


def summary_dict(snapshot: Snapshot, **extra: Any) -> dict[str, Any]:
    """Return the snapshot as a plain dict with `extra` fields (backend, output path, ...)."""
    return {**asdict(snapshot), **extra}
