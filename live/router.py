"""The daemon's two I/O threads and the ledger that makes every frame's fate countable.

`Router`: PULL frames from the sources, decode (a malformed message is counted and logged, never
fatal), admit each frame through the integrity checks (`live.recorder.SeqGate`: shape, dtype,
seq window, each seq once; the recorder queues it), then forward the received buffers unchanged
(zero-copy) to a ready worker with a non-blocking PUSH and to the raw republish socket; when
every worker would block, the frame is skipped and named. A rejected frame goes nowhere and is
counted by kind. `Collector`: PULL stacks from the workers into the recorder and the display
PUB, and read the workers' JSON events. `Ledger` knows which seqs each worker holds, so a
crashed worker's frames are counted as lost by seq.

Every receiving socket has ``zmq.MAXMSGSIZE`` set (`live.protocol.max_part_bytes`), so ZeroMQ
drops an oversized message part, and disconnects its sender, before buffering it. Sockets on
endpoints that use CURVE (`live.security`) are CURVE servers. Both threads run under the
daemon's `live.supervisor.Supervisor`: an unexpected exception stops the run, not only the
thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from live.metrics import Metrics, format_seqs
from live.protocol import (
    END_OF_FRAMES,
    MAX_EVENT_BYTES,
    MAX_FRAME_BYTES,
    Message,
    ProtocolError,
    decode,
    decode_event,
)
from live.security import ServerKeys, serve_curve
from live.supervisor import Supervisor

if TYPE_CHECKING:
    from live.recorder import Recorder

__all__ = ["END_OF_FRAMES", "Admit", "Collector", "Ledger", "Router"]

log = logging.getLogger(__name__)

Admit = Callable[[Message], str | None]
"""Admission of one raw frame: None if admitted, else the rejection kind (already counted)."""

_POLL_MS = 50
_WORKER_HWM = 2
_LOGGED_MALFORMED = 100


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
        admit: Admit,
        raw_endpoint: str | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_part_bytes: int = MAX_FRAME_BYTES,
        frames_keys: ServerKeys | None = None,
        raw_keys: ServerKeys | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """Bind the sockets (the thread starts with `start`).

        `admit` decides which decoded frames go on (`live.recorder.Recorder.admit_frame` or
        a `live.recorder.SeqGate`); `max_frame_bytes` is the largest pixel buffer `decode`
        accepts and `max_part_bytes` the frames socket's ``zmq.MAXMSGSIZE`` (the daemon sizes
        both from the frame shape, `live.protocol.max_part_bytes`);
        `frames_keys` / `raw_keys` make the frames / raw republish socket a CURVE server.
        """
        super().__init__(name="router", daemon=True)
        self.stop_event = threading.Event()
        self.last_receive = time.monotonic()
        self._ctx, self._ledger, self._metrics, self._admit = ctx, ledger, metrics, admit
        self._max_frame_bytes = max_frame_bytes
        self._supervisor = supervisor or Supervisor()
        self._pull = ctx.socket(zmq.PULL)
        self._pull.linger = 0
        self._pull.maxmsgsize = max_part_bytes
        serve_curve(self._pull, frames_keys)
        self._pull.bind(frames_endpoint)
        self._pushes = [self._bound(zmq.PUSH, ep, _WORKER_HWM) for ep in worker_endpoints]
        self._raw_pub = self._bound(zmq.PUB, raw_endpoint, 100, raw_keys) if raw_endpoint else None
        self._next = 0
        self._malformed_logged = 0

    def _bound(
        self, kind: int, endpoint: str, hwm: int, keys: ServerKeys | None = None
    ) -> zmq.Socket[bytes]:
        """Return a socket of `kind` bound to `endpoint`, with a small send high-water mark."""
        socket = self._ctx.socket(kind)
        socket.linger = 0
        socket.sndhwm = hwm
        serve_curve(socket, keys)
        socket.bind(endpoint)
        return socket

    def run(self) -> None:
        """Route until `stop_event` is set (sources are stopped first, so the pipe is drained)."""
        with self._supervisor.watch("router"):
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
            message = decode(parts, max_bytes=self._max_frame_bytes)
            if message.header.kind != "frame":
                raise ProtocolError("expected kind 'frame' on the frames endpoint, got 'stack'")
        except ProtocolError as err:
            self._metrics.malformed_in()
            self._malformed_logged += 1
            if self._malformed_logged <= _LOGGED_MALFORMED:
                log.warning(
                    "malformed message dropped (%d so far): %s", self._malformed_logged, err
                )
            return
        self._metrics.frame_in()
        rejection = self._admit(message)  # the recorder queues an admitted frame here
        if rejection is not None:  # counted and logged by the gate; not refocused, not republished
            self._metrics.reject(rejection)
            return
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
        max_stack_bytes: int = MAX_FRAME_BYTES,
        stacks_keys: ServerKeys | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """Bind the sockets (the thread starts with `start`).

        `max_stack_bytes` is the stacks socket's ``zmq.MAXMSGSIZE``; `stacks_keys`
        makes the stacks PUB a CURVE server.
        """
        super().__init__(name="collector", daemon=True)
        self.stop_event = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.event_arrived = threading.Condition()
        self._ledger, self._metrics, self._recorder = ledger, metrics, recorder
        self._supervisor = supervisor or Supervisor()
        self._pull = _bind(ctx, zmq.PULL, stacks_in_endpoint, max_stack_bytes)
        self._events = _bind(ctx, zmq.PULL, events_endpoint, MAX_EVENT_BYTES)
        self._pub = (
            _bind(ctx, zmq.PUB, stacks_pub_endpoint, keys=stacks_keys)
            if stacks_pub_endpoint
            else None
        )
        if self._pub is not None:
            self._pub.sndhwm = 10

    def run(self) -> None:
        """Collect until `stop_event` is set and nothing more is waiting."""
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        with self._supervisor.watch("collector"):
            try:
                while True:
                    ready = dict(poller.poll(_POLL_MS))
                    if not ready and self.stop_event.is_set():
                        break
                    if self._pull in ready:
                        self._collect(self._pull.recv_multipart(copy=False))
                    if self._events in ready:
                        self._event(self._events.recv(copy=False))
            finally:
                for socket in (self._pull, self._events, self._pub):
                    if socket is not None:
                        socket.close()

    def _collect(self, parts: list[zmq.Frame]) -> None:
        """Record one stack, settle its seq and republish it (unless the recorder refused it)."""
        try:
            message = decode(parts)
        except ProtocolError as err:
            self._metrics.malformed_in()
            log.error("malformed stack from a worker dropped: %s", err)
            return
        self._ledger.settle([message.header.seq])
        self._metrics.stack_out(message.header.latency_ms or 0.0)
        if self._recorder is not None and not self._recorder.put_stack(message):
            if self._recorder.keeps_stacks:
                return  # refused (duplicate, wrong shape...): counted by the recorder
        if self._pub is not None:
            _send_nowait(self._pub, parts)

    def _event(self, raw: zmq.Frame) -> None:
        """Apply one worker event (ready, skipped, rejected, done, error) and keep it."""
        try:
            event = decode_event(raw)
        except ProtocolError as err:
            self._metrics.malformed_in()
            log.error("malformed event from a worker dropped: %s", err)
            return
        worker = int(event["worker"])
        kind = event["event"]
        if kind == "ready":
            self._ledger.set_ready(worker, True)
            log.info(
                "worker %d ready (%s on %s)", worker, event.get("backend"), event.get("device")
            )
        elif kind == "skipped":
            seqs = [int(s) for s in event.get("seqs", [])]
            self._ledger.settle(seqs)
            self._metrics.skip(seqs)
        elif kind == "rejected":  # the router admits only frames a worker can take: a bug
            seqs = [int(s) for s in event.get("seqs", [])]
            self._ledger.settle(seqs)
            self._metrics.lose(seqs)
            log.error(
                "worker %d refused frames %s: %s", worker, format_seqs(seqs), event.get("message")
            )
        elif kind == "error":
            log.error("worker %d failed: %s", worker, event.get("message"))
        with self.event_arrived:
            self.events.append(event)
            self.event_arrived.notify_all()


def _bind(
    ctx: zmq.Context[zmq.Socket[bytes]],
    kind: int,
    endpoint: str,
    max_message_bytes: int = -1,
    keys: ServerKeys | None = None,
) -> zmq.Socket[bytes]:
    """Return a socket of `kind` bound to `endpoint` with linger 0.

    `max_message_bytes` is its ``zmq.MAXMSGSIZE`` (-1: none); `keys` make it a CURVE server.
    """
    socket = ctx.socket(kind)
    socket.linger = 0
    socket.maxmsgsize = max_message_bytes
    serve_curve(socket, keys)
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
