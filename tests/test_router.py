"""Router and collector over real loopback sockets: size limits, admission, worker events."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import zmq

from live.metrics import Metrics
from live.protocol import (
    END_OF_FRAMES,
    MAX_EVENT_BYTES,
    MAX_EVENT_SEQS,
    MAX_HEADER_BYTES,
    ProtocolError,
    credit,
    decode,
    decode_event,
    encode_event,
    encode_frame,
    encode_stack,
    max_part_bytes,
)
from live.recorder import SeqGate
from live.router import Collector, Ledger, Router
from live.supervisor import Supervisor
from tests.live_helpers import SIDE, free_ports


def _endpoints(count: int) -> list[str]:
    return [f"tcp://127.0.0.1:{port}" for port in free_ports(count)]


def _endpoint() -> str:
    return _endpoints(1)[0]


def _wait(condition, timeout_s: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    """Wait for `condition`, with a generous deadline (a loaded CI machine is slow)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class _Routed:
    """A router with no workers (admitted frames are skipped) and its own admission gate."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.endpoint = _endpoint()
        self.metrics = Metrics()
        self.gate = SeqGate("raw", (SIDE, SIDE), np.dtype(np.uint16), 100)
        self.router = Router(
            self.ctx,
            frames_endpoint=self.endpoint,
            worker_endpoints=[],
            ledger=Ledger(0),
            metrics=self.metrics,
            admit=lambda message: self.gate.admit(message)[1],
            max_frame_bytes=SIDE * SIDE * 8,
            max_part_bytes=max_part_bytes((SIDE, SIDE)),
            supervisor=Supervisor(),
        )
        self.router.start()

    def push(self) -> zmq.Socket[bytes]:
        socket = self.ctx.socket(zmq.PUSH)
        socket.linger = 1000
        socket.connect(self.endpoint)
        return socket

    def close(self) -> None:
        self.router.stop_event.set()
        self.router.join(10)
        self.router.close_worker_sockets()
        self.ctx.term()


def _frame(seq: int) -> list[bytes | memoryview]:
    return encode_frame(np.full((SIDE, SIDE), seq, np.uint16), seq=seq, timestamp_s=1.0)


def test_an_oversized_message_is_dropped_by_zeromq_before_it_is_buffered() -> None:
    routed = _Routed()
    hostile, genuine = routed.push(), routed.push()
    try:
        limit = max_part_bytes((SIDE, SIDE))
        assert limit == max(SIDE * SIDE * 8, MAX_HEADER_BYTES)
        hostile.send_multipart([b"{}", b"\x00" * (limit + 1)])  # one part over the limit
        hostile.send_multipart([b"x" * (8 * 2**20)])  # and 8 MiB in one part
        for seq in range(3):
            genuine.send_multipart(_frame(seq), copy=False)
        # frame_in() is counted before the frame is skipped (in the router thread): wait for
        # both, or a snapshot taken between the two would see a skip missing
        assert _wait(
            lambda: (
                (snap := routed.metrics.snapshot(advance=False)).frames_in == 3
                and snap.skipped == 3
            )
        )
        hostile.send_multipart(_frame(3), copy=False)  # the hostile peer may reconnect, fairly
        assert _wait(lambda: routed.metrics.snapshot(advance=False).frames_in == 4)
        # Frame 3 came after the oversized messages on the same peer, so any of them the router
        # had counted would show by now (no timed wait): ZeroMQ cut them off, never received.
        assert routed.metrics.snapshot(advance=False).malformed == 0
    finally:
        hostile.close()
        genuine.close()
        routed.close()


def test_without_a_recorder_the_router_still_refuses_duplicates_and_far_seqs() -> None:
    routed = _Routed()
    push = routed.push()
    try:
        for seq in (0, 1, 1, 5000, 2):
            push.send_multipart(_frame(seq), copy=False)
        push.send_multipart(encode_frame(np.ones((SIDE, 3), np.uint16), seq=3, timestamp_s=1.0))
        # each frame is counted in before it is rejected or skipped: wait until all six
        # have a fate, or a snapshot taken in between would miss the last one's
        assert _wait(
            lambda: (
                (s := routed.metrics.snapshot(advance=False)).frames_in == 6
                and s.skipped + s.rejected_total == 6
            )
        )
        snap = routed.metrics.snapshot(advance=False)
        assert snap.rejected == {"duplicate": 1, "beyond_window": 1, "wrong_shape": 1}
        assert snap.skipped == 3 and snap.skipped_ranges == [(0, 3)]  # only admitted frames
    finally:
        push.close()
        routed.close()


def test_the_collector_survives_malformed_events_and_applies_good_ones() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stacks, events = _endpoints(2)
    metrics, ledger = Metrics(), Ledger(1)
    ledger.sent(0, 7)
    ledger.sent(0, 8)
    supervisor = Supervisor()
    collector = Collector(
        ctx,
        stacks_in_endpoint=stacks,
        events_endpoint=events,
        stacks_pub_endpoint=None,
        ledger=ledger,
        metrics=metrics,
        recorder=None,
        supervisor=supervisor,
    )
    collector.start()
    push = ctx.socket(zmq.PUSH)
    push.linger = 1000
    push.connect(events)
    try:
        for garbage in (b"[" * 50_000, b"{}", b'{"event": "ready", "worker": "x"}', b"\xff"):
            push.send(garbage)
        push.send(encode_event("ready", 5))  # well formed, but this run has one worker
        push.send(b'{"event": "skipped", "worker": 0, "seqs": [7]}')  # no longer an event
        push.send(encode_event("rejected", 0, seqs=[7, 8], message="not a frame of shape [64, 64]"))
        assert _wait(lambda: metrics.snapshot(advance=False).lost == 2)
        snap = metrics.snapshot(advance=False)
        assert (snap.malformed, snap.skipped, snap.lost) == (6, 0, 2)
        assert ledger.outstanding() == 0 and collector.is_alive()
        assert supervisor.failures == []
        # counted, not kept: one a frame would grow without bound (review 82)
        assert all(e["event"] != "rejected" for e in collector.events)
    finally:
        collector.stop_event.set()
        collector.join(10)
        push.close()
        ctx.term()


def test_the_collector_decodes_stacks_up_to_the_runs_size_not_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The config allows stacks up to 4 GiB (41 planes of 4096² float16 are 1.3 GiB): the
    collector must not hold them to the protocol's 1 GiB default, or it refuses every one."""
    import live.router

    limits: list[int] = []

    def spy(parts: Any, *, max_bytes: int = live.router.MAX_FRAME_BYTES) -> Any:
        limits.append(max_bytes)
        return decode(parts, max_bytes=max_bytes)

    monkeypatch.setattr(live.router, "decode", spy)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stacks, events = _endpoints(2)
    metrics, ledger = Metrics(), Ledger(1)
    ledger.sent(0, 4)
    limit = max_part_bytes((41, 4096, 4096), "float16")
    assert limit > live.router.MAX_FRAME_BYTES
    collector = Collector(
        ctx,
        stacks_in_endpoint=stacks,
        events_endpoint=events,
        stacks_pub_endpoint=None,
        ledger=ledger,
        metrics=metrics,
        recorder=None,
        max_stack_bytes=limit,
    )
    collector.start()
    push = ctx.socket(zmq.PUSH)
    push.linger = 1000
    push.connect(stacks)
    try:
        planes = np.zeros((2, 8, 8), np.float16)
        stack = encode_stack(
            planes, seq=4, timestamp_s=0.0, focus_um=None, planes_um=(0.0, 1.0), latency_ms=1.0
        )
        push.send_multipart(stack)
        assert _wait(lambda: ledger.outstanding() == 0)
        assert limits == [limit] and metrics.snapshot(advance=False).malformed == 0
    finally:
        collector.stop_event.set()
        collector.join(10)
        push.close()
        ctx.term()


def test_events_round_trip_and_anything_else_is_a_protocol_error() -> None:
    raw = encode_event("rejected", 2, seqs=list(range(MAX_EVENT_SEQS)))
    assert len(raw) < MAX_EVENT_BYTES
    assert decode_event(raw) == {"event": "rejected", "worker": 2, "seqs": list(range(1000))}
    assert decode_event(encode_event("error", 0, message="x" * 10_000))["message"] == "x" * 2000
    bad = [
        b"",
        b"null",
        b"[1]",
        b'{"event": "hello", "worker": 0}',
        b'{"event": "done", "worker": -1}',
        b'{"event": "done", "worker": true}',
        b'{"event": "skipped", "worker": 0, "seqs": [1]}',  # not a worker event any more
        b'{"event": "rejected", "worker": 0, "seqs": [-1]}',
        b'{"event": "rejected", "worker": 0, "seqs": "1,2"}',
        json.dumps({"event": "rejected", "worker": 0, "seqs": list(range(1001))}).encode(),
        b'{"event": "done", "worker": 0, "extra": {"a": 1}}',
        b'{"event": "done", "worker": 0, "stacks": 1' + b"0" * 30 + b"}",
        b"[" * 50_000,
        b"x" * (MAX_EVENT_BYTES + 1),
    ]
    for raw in bad:
        with pytest.raises(ProtocolError):
            decode_event(raw)
    with pytest.raises(ProtocolError, match="unknown event"):
        encode_event("hello", 0)


class _Credited:
    """A router with one worker that the test plays: it PULLs frames and sends credits."""

    def __init__(self, policy: str, max_queue_frames: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.endpoint, worker, credits = _endpoints(3)
        self.metrics, self.ledger = Metrics(), Ledger(1)
        self.ledger.set_ready(0, True)
        self.gate = SeqGate("raw", (SIDE, SIDE), np.dtype(np.uint16), 1000)
        self.router = Router(
            self.ctx,
            frames_endpoint=self.endpoint,
            worker_endpoints=[worker],
            ledger=self.ledger,
            metrics=self.metrics,
            admit=lambda message: self.gate.admit(message)[1],
            credits_endpoint=credits,
            policy=policy,  # type: ignore[arg-type]
            max_queue_frames=max_queue_frames,
            supervisor=Supervisor(),
        )
        self.router.start()
        self.worker = self.ctx.socket(zmq.PULL)
        self.worker.linger = 0
        self.worker.connect(worker)
        self.credits = self.ctx.socket(zmq.PUSH)
        self.credits.linger = 1000
        self.credits.connect(credits)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.linger = 1000
        self.push.connect(self.endpoint)

    def take(self) -> int:
        """Receive the one frame the router sends against one credit; return its seq."""
        assert self.worker.poll(10_000), "no frame for the credit"
        return decode(self.worker.recv_multipart(copy=False)).header.seq

    def close(self) -> None:
        for socket in (self.worker, self.credits, self.push):
            socket.close()
        self.router.stop_event.set()
        self.router.join(10)
        self.router.close_worker_sockets()
        self.ctx.term()


@pytest.mark.parametrize("policy", ["latest", "every_frame"])
def test_the_router_alone_applies_the_overload_policy_by_credit(policy: str) -> None:
    routed = _Credited(policy, max_queue_frames=3)
    try:
        for seq in range(6):  # no credit yet: every frame waits in the router's queue
            routed.push.send_multipart(_frame(seq), copy=False)
        assert _wait(lambda: routed.metrics.snapshot(advance=False).frames_in == 6)
        assert not routed.worker.poll(200)  # nothing is sent without a credit
        routed.credits.send(credit(0, 1, reset=True))
        if policy == "latest":  # only the newest waited; the five it replaced are named
            assert routed.take() == 5
            assert list(routed.metrics.skipped_seqs()) == [0, 1, 2, 3, 4]
        else:  # the first three waited, oldest first; the three beyond the bound are named
            got = [routed.take()]
            for _ in range(2):
                routed.credits.send(credit(0, 1))
                got.append(routed.take())
            assert got == [0, 1, 2] and list(routed.metrics.skipped_seqs()) == [3, 4, 5]
        assert not routed.worker.poll(200) and routed.router.waiting == 0
        assert routed.ledger.outstanding() == (1 if policy == "latest" else 3)
    finally:
        routed.close()


def test_the_end_marker_goes_to_running_workers_under_one_deadline() -> None:
    """`Router.end_workers` (review 67): workers not running (`skip`) are not waited for, a
    worker that is connected takes the marker, and the unconnected ones share one deadline:
    they waited 10 s each, one after another (64 workers: over ten minutes)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    endpoints = _endpoints(4)
    router = Router(
        ctx,
        frames_endpoint=_endpoint(),
        worker_endpoints=endpoints,
        ledger=Ledger(4),
        metrics=Metrics(),
        admit=lambda message: None,
        max_frame_bytes=SIDE * SIDE * 8,
        max_part_bytes=max_part_bytes((SIDE, SIDE)),
        supervisor=Supervisor(),
    )
    worker = ctx.socket(zmq.PULL)  # worker 1 is running; 0 is dead, 2 and 3 never connected
    worker.linger = 0
    worker.connect(endpoints[1])
    try:
        assert router.end_workers(timeout_s=0.0, skip=[3, 1, 0, 2]) == [0, 1, 2, 3]
        unreachable = router.end_workers(timeout_s=2.0, skip=[0])
        assert unreachable == [0, 2, 3]
        assert worker.poll(10_000) and worker.recv() == END_OF_FRAMES
        # the first unconnected worker spent the deadline: the last was not waited for
        assert router._pushes[3].sndtimeo == 0
    finally:
        worker.close()
        ctx.destroy(linger=0)  # (the router's own sockets: it never ran to close them)
