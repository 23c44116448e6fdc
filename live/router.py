"""The daemon's two I/O threads and the ledger that makes every frame's fate countable.

`Router`: PULL frames from the sources, decode (a malformed message is counted and logged, never
fatal), hand every raw frame to the recorder, then forward the received buffers unchanged
(zero-copy) to a ready worker with a non-blocking PUSH; when every worker would block, the
frame is skipped and named. `Collector`: PULL stacks from the workers into the recorder and the
display PUB, and read the workers' JSON events. `Ledger` knows which seqs each worker holds, so
a crashed worker's frames are counted as lost by seq.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from live.metrics import Metrics, format_seqs
from live.protocol import ProtocolError, decode

if TYPE_CHECKING:
    from live.recorder import Recorder

__all__ = ["END_OF_FRAMES", "Collector", "Ledger", "Router"]

log = logging.getLogger(__name__)

_POLL_MS = 50
END_OF_FRAMES = b"end-of-frames"
"""One-part message the router sends a worker after its last frame (not a protocol message)."""
_WORKER_HWM = 2


class Ledger:
    """Which seqs are out at which worker, and which workers are ready (thread-safe)."""

    def __init__(self, n_workers: int) -> None:
        self._lock = threading.Lock()
        self._pending: list[set[int]] = [set() for _ in range(n_workers)]
        self._ready = [False] * n_workers
        self._owner: dict[int, int] = {}

    def set_ready(self, worker: int, ready: bool) -> None:
        """Mark a worker as accepting frames (after its "ready" event) or not (dead)."""
        with self._lock:
            self._ready[worker] = ready

    def ready_workers(self) -> list[int]:
        """Return the workers that currently accept frames."""
        with self._lock:
            return [i for i, ok in enumerate(self._ready) if ok]

    def sent(self, worker: int, seq: int) -> None:
        """Record that `seq` was handed to `worker`."""
        with self._lock:
            self._pending[worker].add(seq)
            self._owner[seq] = worker

    def settle(self, seqs: list[int]) -> None:
        """Forget seqs that came back as stacks or were reported skipped."""
        with self._lock:
            for seq in seqs:
                worker = self._owner.pop(seq, None)
                if worker is not None:
                    self._pending[worker].discard(seq)

    def take(self, worker: int) -> list[int]:
        """Return and forget every seq still out at `worker` (it died, or the run ended)."""
        with self._lock:
            seqs = sorted(self._pending[worker])
            self._pending[worker].clear()
            for seq in seqs:
                self._owner.pop(seq, None)
            return seqs

    def outstanding(self) -> int:
        """Return how many frames are out at workers."""
        with self._lock:
            return len(self._owner)


class Router(threading.Thread):
    """PULL frames → decode → recorder (every frame) → non-blocking PUSH to a ready worker."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        frames_endpoint: str,
        worker_endpoints: list[str],
        ledger: Ledger,
        metrics: Metrics,
        recorder: Recorder | None,
        raw_endpoint: str | None = None,
    ) -> None:
        super().__init__(name="router", daemon=True)
        self.stop_event = threading.Event()
        self.last_receive = time.monotonic()
        self._ctx, self._ledger, self._metrics, self._recorder = ctx, ledger, metrics, recorder
        self._pull = ctx.socket(zmq.PULL)
        self._pull.linger = 0
        self._pull.bind(frames_endpoint)
        self._pushes = [self._bound(zmq.PUSH, ep, _WORKER_HWM) for ep in worker_endpoints]
        self._raw_pub = self._bound(zmq.PUB, raw_endpoint, 100) if raw_endpoint else None
        self._next = 0
        self._malformed_logged = 0

    def _bound(self, kind: int, endpoint: str, hwm: int) -> zmq.Socket[bytes]:
        """Return a socket of `kind` bound to `endpoint`, with a small send high-water mark."""
        socket = self._ctx.socket(kind)
        socket.linger = 0
        socket.sndhwm = hwm
        socket.bind(endpoint)
        return socket

    def run(self) -> None:
        """Route until `stop_event` is set (sources are stopped first, so the pipe is drained)."""
        try:
            while not self.stop_event.is_set() or self._pull.poll(0):
                if self._pull.poll(_POLL_MS):
                    self._route(self._pull.recv_multipart(copy=False))
        finally:
            self._pull.close()
            if self._raw_pub is not None:
                self._raw_pub.close()

    def end_workers(self, timeout_s: float = 10.0) -> list[int]:
        """After the router thread ended: queue `END_OF_FRAMES` behind every worker's frames.

        A worker stops receiving when the marker arrives, so nothing still in the pipe is left
        behind. Returns the workers that could not take the marker within `timeout_s`.
        """
        failed = []
        for i, socket in enumerate(self._pushes):
            socket.sndtimeo = int(timeout_s * 1000)
            try:
                socket.send(END_OF_FRAMES)
            except zmq.Again:
                failed.append(i)
        return failed

    def close_worker_sockets(self) -> None:
        """Close the PUSH sockets to the workers, once the router thread and the workers ended.

        Closing earlier would drop frames still queued for a busy worker.
        """
        for socket in self._pushes:
            socket.close()

    def _route(self, parts: list[zmq.Frame]) -> None:
        """Handle one received message."""
        self.last_receive = time.monotonic()
        try:
            message = decode(parts)
            if message.header.kind != "frame":
                raise ProtocolError("expected kind 'frame' on the frames endpoint, got 'stack'")
        except ProtocolError as err:
            self._metrics.malformed_in()
            self._malformed_logged += 1
            if self._malformed_logged <= 100:
                log.warning(
                    "malformed message dropped (%d so far): %s", self._malformed_logged, err
                )
            return
        self._metrics.frame_in()
        if self._recorder is not None:
            self._recorder.put_frame(message)
        if self._raw_pub is not None:
            _send_nowait(self._raw_pub, parts)
        seq = message.header.seq
        for worker in self._rotation():
            self._ledger.sent(worker, seq)  # before the send: a fast reply must find it
            if _send_nowait(self._pushes[worker], parts):
                self._metrics.frame_routed()
                return
            self._ledger.settle([seq])
        self._metrics.skip([seq])

    def _rotation(self) -> list[int]:
        """Return the ready workers, starting after the last one used (round robin)."""
        ready = self._ledger.ready_workers()
        if not ready:
            return []
        self._next = (self._next + 1) % len(ready)
        return ready[self._next :] + ready[: self._next]


class Collector(threading.Thread):
    """PULL stacks → recorder (every stack) + PUB to displays (may drop); read worker events."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        stacks_in_endpoint: str,
        events_endpoint: str,
        stacks_pub_endpoint: str | None,
        ledger: Ledger,
        metrics: Metrics,
        recorder: Recorder | None,
    ) -> None:
        super().__init__(name="collector", daemon=True)
        self.stop_event = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.event_arrived = threading.Condition()
        self._ledger, self._metrics, self._recorder = ledger, metrics, recorder
        self._pull = _bind(ctx, zmq.PULL, stacks_in_endpoint)
        self._events = _bind(ctx, zmq.PULL, events_endpoint)
        self._pub = _bind(ctx, zmq.PUB, stacks_pub_endpoint) if stacks_pub_endpoint else None
        if self._pub is not None:
            self._pub.sndhwm = 10

    def run(self) -> None:
        """Collect until `stop_event` is set and nothing more is waiting."""
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll(_POLL_MS))
                if not ready and self.stop_event.is_set():
                    break
                if self._pull in ready:
                    self._collect(self._pull.recv_multipart(copy=False))
                if self._events in ready:
                    self._event(json.loads(self._events.recv()))
        finally:
            for socket in (self._pull, self._events, self._pub):
                if socket is not None:
                    socket.close()

    def _collect(self, parts: list[zmq.Frame]) -> None:
        """Record one stack, settle its seq and republish it."""
        try:
            message = decode(parts)
        except ProtocolError as err:
            self._metrics.malformed_in()
            log.error("malformed stack from a worker dropped: %s", err)
            return
        self._ledger.settle([message.header.seq])
        self._metrics.stack_out(message.header.latency_ms or 0.0)
        if self._recorder is not None:
            self._recorder.put_stack(message)
        if self._pub is not None:
            _send_nowait(self._pub, parts)

    def _event(self, event: dict[str, Any]) -> None:
        """Apply one worker event (ready, skipped, done, error) and keep it for the supervisor."""
        worker = int(event.get("worker", -1))
        kind = event.get("event")
        if kind == "ready":
            self._ledger.set_ready(worker, True)
            log.info(
                "worker %d ready (%s on %s)", worker, event.get("backend"), event.get("device")
            )
        elif kind == "skipped":
            seqs = [int(s) for s in event.get("seqs", [])]
            self._ledger.settle(seqs)
            self._metrics.skip(seqs)
        elif kind == "error":
            log.error("worker %d failed: %s", worker, event.get("message"))
        with self.event_arrived:
            self.events.append(event)
            self.event_arrived.notify_all()


def _bind(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str) -> zmq.Socket[bytes]:
    """Return a socket of `kind` bound to `endpoint` with linger 0."""
    socket = ctx.socket(kind)
    socket.linger = 0
    socket.bind(endpoint)
    return socket


def _send_nowait(socket: zmq.Socket[bytes], parts: list[zmq.Frame]) -> bool:
    """Send the received parts again (zero-copy) without blocking; False if it would block."""
    try:
        socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True


def describe_skips(seqs: list[int]) -> str:
    """Return skipped seqs as compact ranges for log lines."""
    return format_seqs(seqs)
