"""Worker: the overload policies of its queue, and a real worker process over real sockets."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from live.protocol import (
    WORKER_PREFETCH,
    ProtocolError,
    decode,
    encode_frame,
    parse_credit,
    parse_end_of_stacks,
)
from live.worker import END_OF_FRAMES, FrameQueue, WorkerSpec, build_plan, worker_main
from tests.live_helpers import free_ports, live_config


def _message(seq: int):
    return decode(encode_frame(np.full((4, 4), seq, np.uint16), seq=seq, timestamp_s=0.0))


def test_frame_queue_is_a_fifo_that_reports_refused_frames() -> None:
    queue = FrameQueue()
    for seq in range(3):
        queue.put(_message(seq))
    queue.refuse(7)
    assert len(queue) == 3
    assert [queue.get(1.0).header.seq for _ in range(3)] == [0, 1, 2]  # type: ignore[union-attr]
    assert queue.get(0.01) is None
    assert queue.take_refused() == [7] and queue.take_refused() == []


class _Harness:
    """The daemon's side of one worker: PUSH frames, PULL stacks and events, on loopback tcp.

    With `in_process` the worker runs in a thread of this process (so a test can monkeypatch
    it); `errors` then collects what `worker_main` raised.
    """

    def __init__(self, config, *, in_process: bool = False, plan_sha256: str | None = None) -> None:
        self.ctx = zmq.Context()
        ports = free_ports(4)
        self.frames = self._bind(zmq.PUSH, ports[0])
        self.frames.sndhwm = 1000
        self.stacks = self._bind(zmq.PULL, ports[1])
        self.events = self._bind(zmq.PULL, ports[2])
        self.credits = self._bind(zmq.PULL, ports[3])
        self.spec = WorkerSpec(
            worker_id=0,
            frames_endpoint=f"tcp://127.0.0.1:{ports[0]}",
            stacks_endpoint=f"tcp://127.0.0.1:{ports[1]}",
            events_endpoint=f"tcp://127.0.0.1:{ports[2]}",
            credits_endpoint=f"tcp://127.0.0.1:{ports[3]}",
            config=config.model_dump(mode="json"),
            plan_sha256=plan_sha256,
        )
        self.errors: list[BaseException] = []
        spawn = mp.get_context("spawn")
        self.stop: Any = threading.Event() if in_process else spawn.Event()
        target = self._run_in_thread if in_process else worker_main
        self.proc: Any = (threading.Thread if in_process else spawn.Process)(
            target=target, args=(self.spec, self.stop)
        )
        self.proc.start()

    def _run_in_thread(self, spec: WorkerSpec, stop: threading.Event) -> None:
        try:
            worker_main(spec, stop)  # type: ignore[arg-type]
        except Exception as err:  # the process would exit non-zero with it
            self.errors.append(err)

    def _bind(self, kind: int, port: int) -> zmq.Socket:
        socket = self.ctx.socket(kind)
        socket.linger = 0
        socket.bind(f"tcp://127.0.0.1:{port}")
        return socket

    def event(self, timeout_ms: int = 60_000) -> dict:
        assert self.events.poll(timeout_ms), "no event from the worker"
        return json.loads(self.events.recv())

    def close(self) -> None:
        self.stop.set()
        self.proc.join(30)
        if self.proc.is_alive() and hasattr(self.proc, "kill"):
            self.proc.kill()
        for s in (self.frames, self.stacks, self.events, self.credits):
            s.close()
        self.ctx.term()


def test_worker_process_refocuses_every_frame(tmp_path: Path, tiny_model_files) -> None:
    from engine.runtime import load_backend

    config = live_config(tmp_path, tiny_model_files["onnx"], planes=[-3.0, 0.0, 3.0])
    harness = _Harness(config)
    try:
        ready = harness.event()
        assert ready["event"] == "ready" and ready["backend"] == "onnxruntime"
        rng = np.random.default_rng(1)
        frames = [rng.integers(100, 3000, (64, 64), dtype=np.uint16) for _ in range(6)]
        for seq, frame in enumerate(frames):
            harness.frames.send_multipart(
                encode_frame(frame, seq=seq, timestamp_s=time.time(), focus_um=1.5)
            )
        reference = load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"])
        dpms = build_plan(config).dpms_um
        for seq, frame in enumerate(frames):
            assert harness.stacks.poll(30_000)
            msg = decode(harness.stacks.recv_multipart(copy=False))
            assert msg.header.kind == "stack" and msg.header.seq == seq
            assert msg.header.planes_um == (-3.0, 0.0, 3.0) and msg.header.focus_um == 1.5
            assert msg.header.latency_ms is not None and msg.header.latency_ms >= 0
            np.testing.assert_allclose(
                msg.array, reference.infer(frame, dpms), rtol=2.0**-11 + 1e-4, atol=1e-2
            )
        harness.frames.send(END_OF_FRAMES)
        done = harness.event()
        assert done["event"] == "done" and done["stacks"] == 6
        # where its time went: both stages timed for every frame, busy a share of the run
        assert 0 < done["refocus_p50_ms"] <= done["refocus_p99_ms"]
        assert 0 < done["send_p50_ms"] <= done["send_p99_ms"]
        assert 0 < done["busy"] <= 1
        harness.proc.join(30)
        assert harness.proc.exitcode == 0
    finally:
        harness.close()


def test_worker_credits_one_frame_at_start_and_one_per_stack(
    tmp_path: Path, tiny_model_files
) -> None:
    planes = [float(z) for z in range(-8, 9)]
    config = live_config(tmp_path, tiny_model_files["onnx"], planes=planes)
    harness = _Harness(config)
    try:
        assert harness.event()["event"] == "ready"
        assert harness.credits.poll(30_000)
        assert parse_credit(harness.credits.recv()) == (0, WORKER_PREFETCH + 1, True)
        sent = 5
        for seq in range(sent):  # more than it asked for: it still refocuses them all, in order
            frame = np.full((64, 64), 500 + seq, np.uint16)
            harness.frames.send_multipart(encode_frame(frame, seq=seq, timestamp_s=time.time()))
        processed = []
        for _ in range(sent):
            assert harness.stacks.poll(30_000)
            processed.append(decode(harness.stacks.recv_multipart(copy=False)).header.seq)
            assert harness.credits.poll(30_000)
            assert parse_credit(harness.credits.recv()) == (0, 1, False)
        harness.frames.send(END_OF_FRAMES)
        while (event := harness.event())["event"] != "done":
            assert event["event"] != "skipped"  # skipping is the router's, never the worker's
        assert harness.stacks.poll(30_000)
        assert parse_end_of_stacks(harness.stacks.recv()) == 0  # behind the last stack
        assert processed == list(range(sent)) and event["stacks"] == sent
    finally:
        harness.close()


def test_worker_refuses_a_wrong_shape_frame_and_carries_on(
    tmp_path: Path, tiny_model_files
) -> None:
    config = live_config(tmp_path, tiny_model_files["onnx"])
    harness = _Harness(config)
    try:
        assert harness.event()["event"] == "ready"
        harness.frames.send_multipart(
            encode_frame(np.ones((32, 64), np.uint16), seq=0, timestamp_s=0.0)
        )
        harness.frames.send_multipart(
            encode_frame(np.ones((64, 64), np.uint16), seq=1, timestamp_s=0.0)
        )
        harness.frames.send(END_OF_FRAMES)
        events = []
        while (event := harness.event())["event"] != "done":
            events.append(event)
        assert [(e["event"], e["seqs"]) for e in events] == [("rejected", [0])]
        assert "not a frame of shape [64, 64]" in events[0]["message"]
        assert event["stacks"] == 1
        assert harness.stacks.poll(30_000)  # the stack travels apart from the "done" event
        assert decode(harness.stacks.recv_multipart(copy=False)).header.seq == 1
        harness.proc.join(30)
        assert harness.proc.exitcode == 0
    finally:
        harness.close()


def test_a_frame_from_a_far_away_clock_still_gives_its_stack(
    tmp_path: Path, tiny_model_files
) -> None:
    """A timestamp any finite number (the protocol allows it) gives a finite latency, capped,
    rather than an infinite one that no stack can carry: the frame is refocused, the worker
    carries on."""
    from live.worker import MAX_LATENCY_MS

    config = live_config(tmp_path, tiny_model_files["onnx"])
    harness = _Harness(config)
    try:
        assert harness.event()["event"] == "ready"
        for seq, stamp in enumerate((-1e308, 1e308, time.time())):
            frame = np.full((64, 64), 500, np.uint16)
            harness.frames.send_multipart(encode_frame(frame, seq=seq, timestamp_s=stamp))
        latencies = []
        for seq in range(3):
            assert harness.stacks.poll(30_000)
            msg = decode(harness.stacks.recv_multipart(copy=False))
            assert msg.header.seq == seq
            latencies.append(msg.header.latency_ms)
        assert latencies[0] == MAX_LATENCY_MS and latencies[1] == 0.0
        assert 0.0 <= latencies[2] < MAX_LATENCY_MS
        harness.frames.send(END_OF_FRAMES)
        while (event := harness.event())["event"] != "done":
            assert event["event"] != "rejected"
        assert event["stacks"] == 3
    finally:
        harness.close()


def test_a_frame_that_makes_no_stack_costs_that_frame_only(
    tmp_path: Path, tiny_model_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a frame's stack cannot be encoded, the frame is reported rejected and credited back;
    the worker does not die with the frames it holds."""
    import live.worker as W

    real = W.encode_stack

    def refuse_seq_1(*args: Any, **kwargs: Any) -> Any:
        if kwargs["seq"] == 1:
            raise ProtocolError("injected: this frame's header makes no stack")
        return real(*args, **kwargs)

    monkeypatch.setattr(W, "encode_stack", refuse_seq_1)
    config = live_config(tmp_path, tiny_model_files["onnx"])
    harness = _Harness(config, in_process=True)
    try:
        assert harness.event()["event"] == "ready"
        for seq in range(3):
            frame = np.full((64, 64), 500 + seq, np.uint16)
            harness.frames.send_multipart(encode_frame(frame, seq=seq, timestamp_s=time.time()))
        harness.frames.send(END_OF_FRAMES)
        events = []
        while (event := harness.event())["event"] != "done":
            events.append(event)
        assert [(e["event"], e["seqs"]) for e in events] == [("rejected", [1])]
        assert "injected" in events[0]["message"]
        assert event["stacks"] == 2
        seqs = []
        for _ in range(2):
            assert harness.stacks.poll(30_000)
            seqs.append(decode(harness.stacks.recv_multipart(copy=False)).header.seq)
        assert seqs == [0, 2]
        credits = []
        while harness.credits.poll(1000):
            credits.append(parse_credit(harness.credits.recv()))
        assert sum(n for _, n, reset in credits if not reset) == 3  # every frame credited back
        harness.proc.join(30)
        assert not harness.errors
    finally:
        harness.close()


def test_a_failing_receive_thread_fails_the_worker_loudly(
    tmp_path: Path, tiny_model_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    def injected(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr("live.worker.decode", injected)
    harness = _Harness(live_config(tmp_path, tiny_model_files["onnx"]), in_process=True)
    try:
        assert harness.event()["event"] == "ready"
        harness.frames.send_multipart(
            encode_frame(np.ones((64, 64), np.uint16), seq=0, timestamp_s=0.0)
        )
        event = harness.event()
        assert event["event"] == "error"
        assert (
            event["message"] == "RuntimeError: receive thread failed: RuntimeError: injected fault"
        )
        harness.proc.join(30)
        assert not harness.proc.is_alive() and len(harness.errors) == 1  # a non-zero exit
    finally:
        harness.close()


def test_a_worker_whose_warm_up_fails_says_so_and_ends(
    tmp_path: Path, tiny_model_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 81: its stacks and credits sockets were made before the try that closes them,
    so after its "error" event the context's term() waited for them for ever: a hung worker
    the daemon could neither restart nor join (a GPU out of memory at warm-up, say)."""

    def injected(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected warm-up failure")

    monkeypatch.setattr("live.worker.warm_up", injected)
    harness = _Harness(live_config(tmp_path, tiny_model_files["onnx"]), in_process=True)
    try:
        event = harness.event()
        assert event["event"] == "error"
        assert event["message"] == "RuntimeError: injected warm-up failure"
        harness.proc.join(60)  # ends: without the fix it never does
        assert not harness.proc.is_alive() and len(harness.errors) == 1  # a non-zero exit
    finally:
        harness.close()


def test_a_worker_refuses_a_plan_other_than_the_daemons(tmp_path: Path, tiny_model_files) -> None:
    """A worker builds the plan again from the config; planes other than those the daemon
    recorded (a surface's DPM file rewritten since) end it with one line, before serving."""
    config = live_config(tmp_path, tiny_model_files["onnx"], planes=[-3.0, 0.0, 3.0])
    recorded = build_plan(config).digest()
    assert build_plan(config).digest() == recorded  # a rebuild of the same config matches
    other = live_config(tmp_path, tiny_model_files["onnx"], planes=[-3.0, 0.0, 2.5])
    assert build_plan(other).digest() != recorded
    harness = _Harness(other, in_process=True, plan_sha256=recorded)
    try:
        event = harness.event()
        assert event["event"] == "error"
        assert "the planes changed since the daemon started" in event["message"]
        harness.proc.join(30)
        assert not harness.proc.is_alive() and len(harness.errors) == 1
    finally:
        harness.close()


def test_a_worker_whose_daemon_is_gone_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receive loop ends (and so the worker) once the daemon is gone (reparented).

    Tested on `_receive` itself over a real socket. Later calls return a pid other than the
    first one (not 1: a test run started under nohup already has init as its parent).
    """
    from live.worker import FrameQueue, _receive

    real = os.getppid()
    seen: set[int] = set()

    def getppid() -> int:  # each thread's first call sees the daemon, later ones another pid
        me = threading.get_ident()
        if me in seen:
            return real + 1
        seen.add(me)
        return real

    monkeypatch.setattr("live.worker.os.getppid", getppid)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    port = push.bind_to_random_port("tcp://127.0.0.1")
    receiving, thread_stop, stop = threading.Event(), threading.Event(), threading.Event()
    receiving.set()
    failure: list[BaseException] = []
    thread = threading.Thread(
        target=_receive,
        args=(ctx, f"tcp://127.0.0.1:{port}", (64, 64), FrameQueue()),
        kwargs={
            "stop": stop,
            "thread_stop": thread_stop,
            "receiving": receiving,
            "failure": failure,
        },
    )
    try:
        thread.start()
        thread.join(30)
        assert not thread.is_alive() and not receiving.is_set() and failure == []
    finally:
        thread_stop.set()
        thread.join(5)
        push.close()
        ctx.term()


def test_focus_lock_keeps_the_planes_fixed_in_the_sample(tmp_path: Path, tiny_model_files) -> None:
    from engine.runtime import load_backend

    planes = [-2.0, 0.0, 2.0]
    from live.config import validate_config

    data = live_config(tmp_path, tiny_model_files["onnx"], planes=planes).model_dump(mode="json")
    data["planes"].update(focus_lock_um=100.0, stage_z_sign=-1)
    config = validate_config(data, source="test config")
    harness = _Harness(config)
    try:
        assert harness.event()["event"] == "ready"
        frame = np.random.default_rng(3).integers(100, 3000, (64, 64), dtype=np.uint16)
        # the stage moved 1.5 um up (sign -1: a larger position is shallower): the planes
        # move 1.5 um shallower relative to this frame's focus, to stay put in the sample
        focus = {0: 100.0, 1: 101.5, 2: 1e4}
        for seq, focus_um in focus.items():
            harness.frames.send_multipart(
                encode_frame(frame, seq=seq, timestamp_s=time.time(), focus_um=focus_um)
            )
        reference = load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"])
        dpms = build_plan(config).dpms_um
        limit = reference.metadata.dz_range_um[1] - max(planes)  # the most the lock may shift
        for seq, offset in ((0, 0.0), (1, 1.5), (2, limit)):
            assert harness.stacks.poll(30_000)
            msg = decode(harness.stacks.recv_multipart(copy=False))
            assert msg.header.seq == seq and msg.header.planes_um == tuple(planes)
            expected = reference.infer(frame, dpms + np.float32(offset))
            np.testing.assert_allclose(msg.array, expected, rtol=2.0**-11 + 1e-4, atol=1e-2)
        # a frame whose header holds no focus: the lock cannot place its planes, so that frame
        # is rejected (reported, credited back), not refocused as if the stage were at 0 µm
        harness.frames.send_multipart(
            encode_frame(frame, seq=3, timestamp_s=time.time(), focus_um=None)
        )
        seen = [harness.event()]
        while seen[-1]["event"] != "rejected":
            seen.append(harness.event())
        assert seen[-1]["seqs"] == [3] and "no stage focus" in seen[-1]["message"]
        harness.frames.send(END_OF_FRAMES)
        while seen[-1]["event"] != "done":
            seen.append(harness.event())
        # frame 2's focus was beyond the model's range: said as it happened (review 84: a
        # count sent with "done" alone was lost with a worker that died)
        clamped = [e for e in seen if e["event"] == "clamped"]
        assert [e["seqs"] for e in clamped] == [[2]] and clamped[0]["excess_um"] != 0
    finally:
        harness.close()


def test_warm_up_refocuses_frames_of_the_run_onto_its_plan(
    tmp_path: Path, tiny_model_files
) -> None:
    from engine.runtime import load_backend
    from live.worker import WARMUP_CALLS, warm_up

    class Counting:  # a real backend, its calls recorded
        def __init__(self) -> None:
            self.backend = load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"])
            self.calls: list[tuple[tuple[int, ...], np.dtype[Any], Any]] = []

        def refocus(self, frame: np.ndarray, plan: Any) -> np.ndarray:
            self.calls.append((frame.shape, frame.dtype, plan))
            out: np.ndarray = self.backend.refocus(frame, plan)
            return out

    plan = build_plan(live_config(tmp_path, tiny_model_files["onnx"], planes=[-2.0, 2.0]))
    counting = Counting()
    shape = plan.dpms_um.shape[-2:]  # the config's frame shape
    warm_up(counting, shape, plan)
    assert len(counting.calls) == WARMUP_CALLS >= 1
    assert all(
        s == shape and dtype == np.uint16 and called is plan for s, dtype, called in counting.calls
    )
