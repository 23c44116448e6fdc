"""The daemon's two I/O threads and the ledger that makes every frame's fate countable.

`Router`: PULL frames from the sources (the public frames endpoint, and an inproc socket for the
daemon's own source, which needs no TCP hop), decode (a malformed message is counted and logged,
never fatal), admit each frame through the integrity checks (`live.recorder.SeqGate`: shape, dtype,
seq window, each seq once; the recorder queues it), republish it raw, and queue it for
inference. A rejected frame goes nowhere and is counted by kind.

The router is the one place that skips frames. Workers take frames by credit: each says how many
it has room for (`live.protocol.credit`: one at start, one per stack), and the router sends a
worker a frame (the received buffers, zero-copy) only against a credit, so a send never blocks
and a worker never drops. Frames waiting for a credit sit in the router's queue under the
overload policy: ``every_frame`` keeps up to ``max_queue_frames`` and skips frames beyond it,
``latest`` keeps one and skips the frame it replaces. Every skip is named by seq.

`Collector`: PULL stacks from the workers into the recorder and the display PUB, and read the
workers' JSON events. `Ledger` knows which seqs each worker holds, so a
crashed worker's frames are counted as lost by seq.

Both threads end by markers (`live.protocol`), not by quiet windows: the router once it is
told to stop and its own source's `END_OF_FRAMES` has arrived (everything that source sent came
before it), the collector once every worker that finished cleanly has sent "done" and
`END_OF_STACKS` (each behind that worker's last event and stack).

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
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import zmq

from live.config import POLICIES, Policy
from live.metrics import Metrics, format_seqs
from live.protocol import (
    END_OF_FRAMES,
    MAX_EVENT_BYTES,
    MAX_FRAME_BYTES,
    Message,
    ProtocolError,
    decode,
    decode_event,
    parse_credit,
    parse_end_of_stacks,
)
from live.security import ServerKeys, publisher, serve_curve
from live.supervisor import Supervisor

if TYPE_CHECKING:
    from live.recorder import Recorder

__all__ = ["END_OF_FRAMES", "POLICIES", "Admit", "Collector", "Ledger", "Policy", "Router"]

log = logging.getLogger(__name__)

Admit = Callable[[Message], str | None]
"""Admission of one raw frame: None if admitted, else the rejection kind (already counted)."""

_POLL_MS = 50
WORKER_HWM = 4
"""Send high-water mark towards one worker; credits keep at most ``WORKER_PREFETCH + 1`` there."""
RAW_REPUBLISH_HWM = 100
"""Raw frames queued for a slow subscriber of the raw republish socket before it misses some."""
FRAMES_RCVHWM = 100
"""Messages the public frames socket queues per connected sender before ZeroMQ pushes back on
it (1 s at 100 Hz; the router takes each in well under a millisecond). The mark is per
connection and each part may be as large as a frame's largest size, so it bounds one sender,
not many: a local user may open many connections to an endpoint without CURVE (README, Known
gaps; with ``security.curve = "required"`` only allowed keys connect)."""
DISPLAY_HWM = 10
"""Stacks queued for a slow display before it misses some (a display keeps up or skips)."""
_LOGGED_MALFORMED = 100
STALL_S = 10.0
"""At stop, waiting frames are skipped once no worker has sent a credit for this long (a hung
or killed worker must not hold the daemon open)."""
_LOGGED_REFUSALS = 10
"""Frames a worker refused that are logged one by one; the rest are counted (lost)."""
_DRAIN_AFTER_STOP = 10_000
"""Most messages still queued on the public frames endpoint that the router takes after stop
(a sender that keeps flooding cannot hold the daemon open)."""


class Ledger:
    """Which seqs are out at which worker, and which workers are ready (thread-safe)."""

    def __init__(self, n_workers: int) -> None:
        self.n_workers = n_workers
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

    def settle(self, seqs: list[int]) -> list[int]:
        """Forget seqs that came back as stacks or were refused; return those that were out.

        A seq that was not out was already taken from a worker that died (or never sent).
        """
        owned = []
        with self._lock:
            for seq in seqs:
                worker = self._owner.pop(seq, None)
                if worker is not None:
                    self._pending[worker].discard(seq)
                    owned.append(seq)
        return owned

    def take(self, worker: int) -> list[int]:
        """Return and forget every seq still out at `worker` (it died, or the run ended)."""
        with self._lock:
            seqs = sorted(self._pending[worker])
            self._pending[worker].clear()
            for seq in seqs:
                self._owner.pop(seq, None)
            return seqs

    def pending(self, worker: int) -> list[int]:
        """Return the seqs out at `worker` now, sorted."""
        with self._lock:
            return sorted(self._pending[worker])

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
        source_endpoint: str | None = None,
        credits_endpoint: str | None = None,
        policy: Policy = "every_frame",
        max_queue_frames: int = 256,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_part_bytes: int = MAX_FRAME_BYTES,
        frames_keys: ServerKeys | None = None,
        raw_keys: ServerKeys | None = None,
        supervisor: Supervisor | None = None,
        worker_hwm: int = WORKER_HWM,
        raw_hwm: int = RAW_REPUBLISH_HWM,
    ) -> None:
        """Bind the sockets (the thread starts with `start`).

        `admit` decides which decoded frames go on (`live.recorder.Recorder.admit_frame` or
        a `live.recorder.SeqGate`); `max_frame_bytes` is the largest pixel buffer `decode`
        accepts and `max_part_bytes` the frames socket's ``zmq.MAXMSGSIZE`` (the daemon sizes
        both from the frame shape, `live.protocol.max_part_bytes`);
        `frames_keys` / `raw_keys` make the frames / raw republish socket a CURVE server.
        `source_endpoint` (``inproc://…``, same context) is where the daemon's own source
        sends; its `END_OF_FRAMES` tells the router that source is done. `credits_endpoint`
        (ipc) is where workers send credits; `policy` and `max_queue_frames` govern the frames
        waiting for one. `worker_hwm` and `raw_hwm` are the bounds of the outgoing edges.
        """
        super().__init__(name="router", daemon=True)
        self.stop_event = threading.Event()
        self.source_ended = threading.Event()
        self._ctx, self._ledger, self._metrics, self._admit = ctx, ledger, metrics, admit
        self._max_frame_bytes = max_frame_bytes
        self._supervisor = supervisor or Supervisor()
        self._pull = ctx.socket(zmq.PULL)
        self._pull.linger = 0
        self._pull.maxmsgsize = max_part_bytes
        # bounds the whole messages a flooding sender can park in memory (not the parts of one
        # that never ends: only CURVE keeps such a peer out, see live.security.publisher)
        self._pull.rcvhwm = FRAMES_RCVHWM
        serve_curve(self._pull, frames_keys)
        self._pull.bind(frames_endpoint)
        self._source: zmq.Socket[bytes] | None = None
        if source_endpoint is not None:
            self._source = ctx.socket(zmq.PULL)
            self._source.linger = 0
            self._source.bind(source_endpoint)
        else:
            self.source_ended.set()  # no own source: nothing to wait for
        self._pushes = [self._bound(zmq.PUSH, ep, worker_hwm) for ep in worker_endpoints]
        self._raw_pub = (
            publisher(ctx, raw_endpoint, raw_keys, sndhwm=raw_hwm) if raw_endpoint else None
        )
        if policy not in POLICIES:
            raise ValueError(f"overload.policy {policy!r} is not one of {POLICIES}")
        self._policy = policy
        self._max_waiting = 1 if policy == "latest" else max(1, max_queue_frames)
        self._waiting: deque[tuple[int, list[zmq.Frame]]] = deque()
        self._credit = [0] * len(worker_endpoints)
        self._credits: zmq.Socket[bytes] | None = None
        if credits_endpoint is not None:
            self._credits = _bind(ctx, zmq.PULL, credits_endpoint, 64)
        self._next = 0
        self._malformed_logged = 0

    @property
    def waiting(self) -> int:
        """Frames admitted and waiting for a worker's credit (a gauge: read from any thread)."""
        return len(self._waiting)

    def _bound(self, kind: int, endpoint: str, hwm: int) -> zmq.Socket[bytes]:
        """Return a socket of `kind` bound to `endpoint`, with a small send high-water mark."""
        socket = self._ctx.socket(kind)
        socket.linger = 0
        socket.sndhwm = hwm
        socket.bind(endpoint)
        return socket

    def run(self) -> None:
        """Route until stopped and the own source's end marker has come; then drain and end.

        After `stop_event` the router still takes what is already queued on the public
        endpoint (at most `_DRAIN_AFTER_STOP` messages) and everything the own source sent
        before its `END_OF_FRAMES`.
        """
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        if self._source is not None:
            poller.register(self._source, zmq.POLLIN)
        if self._credits is not None:
            poller.register(self._credits, zmq.POLLIN)
        drained = 0
        last_credit = time.monotonic()
        with self._supervisor.watch("router"):
            try:
                while True:
                    stopping = self.stop_event.is_set()
                    ready = dict(poller.poll(0 if stopping and not self._waiting else _POLL_MS))
                    handled = False
                    if self._credits is not None and self._credits in ready:
                        self._take_credit(self._credits.recv())
                        handled = True
                        last_credit = time.monotonic()
                    if self._source is not None and self._source in ready:
                        self._from_source(self._source.recv_multipart(copy=False))
                        handled = True
                    if self._pull in ready:
                        self._route(self._pull.recv_multipart(copy=False))
                        drained += stopping
                        handled = True
                        if drained >= _DRAIN_AFTER_STOP:  # a sender still flooding: stop taking
                            poller.unregister(self._pull)
                    self._dispatch()
                    if stopping and not handled:
                        stalled = time.monotonic() - last_credit > STALL_S
                        if self._waiting and self._ledger.ready_workers() and not stalled:
                            continue  # frames still wait for credits: refocus them first
                        if self.source_ended.is_set():
                            break
                        self.source_ended.wait(_POLL_MS / 1000)  # the own source's marker
                if self._waiting:
                    left = [seq for seq, _ in self._waiting]
                    self._waiting.clear()
                    log.error(
                        "%d frames still waited at stop with no worker taking them (none ready, "
                        "or no credit for %.0f s): skipped",
                        len(left),
                        STALL_S,
                    )
                    self._metrics.skip(left)
            finally:
                for socket in (self._pull, self._source, self._raw_pub, self._credits):
                    if socket is not None:
                        socket.close()

    def _from_source(self, parts: list[zmq.Frame]) -> None:
        """Handle one message of the daemon's own source: a frame, or its end marker."""
        if len(parts) == 1 and parts[0].bytes == END_OF_FRAMES:
            self.source_ended.set()
            return
        self._route(parts)

    def end_workers(self, timeout_s: float = 10.0, skip: Collection[int] = ()) -> list[int]:
        """After the router thread ended: queue `END_OF_FRAMES` behind every worker's frames.

        A worker stops receiving when the marker arrives, so nothing still in the pipe is left
        behind. Returns the workers that could not take the marker within `timeout_s`, all
        together (a worker never connected, still loading or dead, waited 10 s each, one after
        another: review 67), and those in `skip` (not running: no one to take it).
        """
        failed = sorted(set(skip))
        deadline = time.monotonic() + timeout_s
        for i, socket in enumerate(self._pushes):
            if i in failed:
                continue
            socket.sndtimeo = max(int((deadline - time.monotonic()) * 1000), 0)
            try:
                socket.send(END_OF_FRAMES)
            except zmq.Again:
                failed.append(i)
        return sorted(failed)

    def close_worker_sockets(self) -> None:
        """Close the PUSH sockets to the workers, once the router thread and the workers ended.

        Closing earlier would drop frames still queued for a busy worker.
        """
        for socket in self._pushes:
            socket.close()

    def _route(self, parts: list[zmq.Frame]) -> None:
        """Handle one received message."""
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
        self._enqueue(message.header.seq, parts)

    def _enqueue(self, seq: int, parts: list[zmq.Frame]) -> None:
        """Queue an admitted frame for inference under the overload policy (skips named)."""
        if not self._pushes:  # no workers at all: nothing will ever take it
            self._metrics.skip([seq])
            return
        if self._policy == "latest" and self._waiting:
            replaced = [s for s, _ in self._waiting]
            self._waiting.clear()
            self._metrics.skip(replaced)
        elif len(self._waiting) >= self._max_waiting:
            self._metrics.skip([seq])
            return
        self._waiting.append((seq, parts))
        self._dispatch()

    def _take_credit(self, raw: bytes) -> None:
        """Apply one worker credit (a malformed one is logged: workers are this program)."""
        parsed = parse_credit(raw)
        if parsed is None or parsed[0] >= len(self._credit):
            log.error("malformed credit from a worker dropped: %r", raw[:40])
            return
        worker, frames, reset = parsed
        self._credit[worker] = frames if reset else self._credit[worker] + frames

    def _dispatch(self) -> None:
        """Send waiting frames, oldest first, to ready workers that have credit (round robin)."""
        busy: set[int] = set()
        while self._waiting:
            worker = self._next_worker(busy)
            if worker is None:
                return
            seq, parts = self._waiting.popleft()
            self._ledger.sent(worker, seq)  # before the send: a fast reply must find it
            if _send_nowait(self._pushes[worker], parts):
                self._credit[worker] -= 1
                self._metrics.frame_routed()
            else:  # no pipe yet (a restarted worker still connecting): keep its credit, retry
                self._ledger.settle([seq])
                busy.add(worker)
                self._waiting.appendleft((seq, parts))

    def _next_worker(self, exclude: set[int]) -> int | None:
        """Return the next ready worker with credit, after the last one used; None if none."""
        ready = [
            w for w in self._ledger.ready_workers() if self._credit[w] > 0 and w not in exclude
        ]
        if not ready:
            return None
        self._next = (self._next + 1) % len(self._credit)
        later = [w for w in ready if w >= self._next]
        worker = later[0] if later else ready[0]
        self._next = worker
        return worker


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
        display_hwm: int = DISPLAY_HWM,
    ) -> None:
        """Bind the sockets (the thread starts with `start`).

        `max_stack_bytes` is the stacks socket's ``zmq.MAXMSGSIZE`` and the largest stack
        `decode` takes (the run's, which may pass the protocol's 1 GiB default); `stacks_keys`
        makes the stacks PUB a CURVE server; `display_hwm` bounds its queue per display.
        """
        super().__init__(name="collector", daemon=True)
        self.stop_event = threading.Event()
        self._expected: set[int] = set()
        self._ended: set[int] = set()  # workers whose end-of-stacks marker arrived
        self._done: set[int] = set()  # workers whose "done" event arrived
        self._refusals = 0  # "rejected" events from workers (logged up to _LOGGED_REFUSALS)
        self._deadline = float("inf")
        self.missing: list[int] = []
        """Workers whose end markers had not arrived by the `finish` deadline."""
        self.events: list[dict[str, Any]] = []
        """Workers' events but "rejected" ones (a handful a worker start: ready, done, error)."""
        self.event_arrived = threading.Condition()
        self._ledger, self._metrics, self._recorder = ledger, metrics, recorder
        self._supervisor = supervisor or Supervisor()
        self._max_stack_bytes = max_stack_bytes  # the config allows stacks over 1 GiB
        self._pull = _bind(ctx, zmq.PULL, stacks_in_endpoint, max_stack_bytes)
        self._events = _bind(ctx, zmq.PULL, events_endpoint, MAX_EVENT_BYTES)
        self._pub = (
            publisher(ctx, stacks_pub_endpoint, stacks_keys, sndhwm=display_hwm)
            if stacks_pub_endpoint
            else None
        )

    def finish(self, workers: set[int], timeout_s: float = 10.0) -> None:
        """End once every worker in `workers` has sent "done" and `END_OF_STACKS`.

        Called after the workers exited: `workers` are the ones that exited cleanly (a killed
        worker sends no markers; its frames are counted as lost from the ledger). Whatever
        arrives before the markers is collected. After `timeout_s` the collector ends anyway
        and names the workers whose markers are `missing`.
        """
        self._expected = set(workers)
        self._deadline = time.monotonic() + timeout_s
        self.stop_event.set()

    def _finished(self) -> bool:
        """Whether `finish` was called and every expected worker's markers arrived (or time)."""
        if not self.stop_event.is_set():
            return False
        waiting = self._expected - (self._ended & self._done)
        if waiting and time.monotonic() < self._deadline:
            return False
        self.missing = sorted(waiting)
        return True

    def run(self) -> None:
        """Collect until `finish` (or `stop_event`) and the workers' end markers arrived."""
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        with self._supervisor.watch("collector"):
            try:
                while True:
                    ready = dict(poller.poll(_POLL_MS))
                    if not ready and self._finished():
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
        if len(parts) == 1 and (worker := parse_end_of_stacks(parts[0].bytes)) is not None:
            self._ended.add(worker)
            return
        try:
            message = decode(parts, max_bytes=self._max_stack_bytes)
        except ProtocolError as err:
            self._metrics.malformed_in()
            log.error("malformed stack from a worker dropped: %s", err)
            return
        seq = message.header.seq
        if not self._ledger.settle([seq]) and self._metrics.late_stack(seq):
            # sent just before its worker died, read after the daemon counted it lost
            log.info("stack %d arrived after its worker died: recorded, not lost", seq)
        self._metrics.stack_out(message.header.latency_ms or 0.0)
        if self._recorder is not None and not self._recorder.put_stack(message):
            if self._recorder.keeps_stacks:
                return  # refused (duplicate, wrong shape...): counted by the recorder
        if self._pub is not None:
            _send_nowait(self._pub, parts)

    def _event(self, raw: zmq.Frame) -> None:
        """Apply one worker event (ready, rejected, done, error) and keep it."""
        try:
            event = decode_event(raw)
        except ProtocolError as err:
            self._metrics.malformed_in()
            log.error("malformed event from a worker dropped: %s", err)
            return
        worker = int(event["worker"])
        if worker >= self._ledger.n_workers:  # well formed, but no worker of this run
            self._metrics.malformed_in()
            log.error(
                "event from worker %d dropped: this run has %d workers",
                worker,
                self._ledger.n_workers,
            )
            return
        kind = event["event"]
        if kind == "ready":
            self._ended.discard(worker)  # a restarted worker: its markers are still to come
            self._done.discard(worker)
            self._ledger.set_ready(worker, True)
            log.info(
                "worker %d ready (%s on %s)", worker, event.get("backend"), event.get("device")
            )
        elif kind == "rejected":  # a frame a worker could not refocus (no focus for a lock)
            seqs = [int(s) for s in event.get("seqs", [])]
            self._ledger.settle(seqs)
            self._metrics.lose(seqs)
            self._refusals += 1
            if self._refusals <= _LOGGED_REFUSALS:  # at frame rate, a log line each would flood
                more = (
                    " (further ones are only counted)" if self._refusals == _LOGGED_REFUSALS else ""
                )
                log.error(
                    "worker %d refused frames %s: %s%s",
                    worker,
                    format_seqs(seqs),
                    event.get("message"),
                    more,
                )
        elif kind == "clamped":  # refocused at the lock's edge: named in the summary and store
            self._metrics.clamp([int(s) for s in event.get("seqs", [])])
        elif kind == "done":
            self._done.add(worker)
        elif kind == "error":
            log.error("worker %d failed: %s", worker, event.get("message"))
        if kind in ("rejected", "clamped"):  # counted above; kept, one a frame, they would
            return  # grow without bound when every frame is refused or clamped (review 82)
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
