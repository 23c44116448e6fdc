"""The Deep-Z worker process: PULL frames, refocus them with `engine.runtime`, PUSH stacks back.

Started by `live.run` with multiprocessing's 'spawn' context (one process per worker, so the
network runs beside, not inside, the daemon's I/O threads). A receive thread PULLs frames into
a `FrameQueue`; the main thread builds the volume plan once from the config, runs one frame at a
time through the backend and PUSHes each stack (same seq, camera timestamp, latency stamp).
The worker takes frames by credit (`live.protocol.credit`): it tells the router it has room
for ``WORKER_PREFETCH + 1`` frames when it starts and for one more after each stack, so it
never holds more than that and never skips; the router owns the overload policy. Events
(ready, refused seqs, done, fatal error) go back as small JSON messages
(`live.protocol.encode_event`); nothing is pickled on the wire.

A frame that is not the configured shape is refused on its own (reported as a "rejected"
event; the daemon counts it as lost) and the worker carries on. The frames socket drops any
message part bigger than a frame (``zmq.MAXMSGSIZE``). If the receive thread fails, the
worker process exits non-zero after refocusing what it holds, so the daemon restarts it and
counts its frames as lost; if the daemon itself disappears, the worker stops too. With
``planes.focus_lock_um`` each frame's planes follow the stage focus in its header
(`engine.dpm.FocusLock`), so they stay at fixed depths in the sample.

Shutdown follows markers, not timers: the router queues `END_OF_FRAMES` behind a worker's last
frame; the worker refocuses everything before it, reports, sends "done" and then its
end-of-stacks marker behind its last stack, so the collector knows nothing of this worker is
still on the way. Only when the marker cannot be delivered does the daemon set `stop`, and the
worker ends once its pipe is empty.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from engine.dpm import FocusLock, VolumePlan
from engine.runtime import BackendError
from live.metrics import WORKER_STAGES, StageTimes
from live.protocol import (
    END_OF_FRAMES,
    MAX_EVENT_SEQS,
    WORKER_PREFETCH,
    Message,
    ProtocolError,
    credit,
    decode,
    encode_event,
    encode_stack,
    end_of_stacks,
    max_part_bytes,
)

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event as MpEvent

__all__ = [
    "END_OF_FRAMES",
    "FrameQueue",
    "WorkerSpec",
    "build_plan",
    "worker_main",
]

log = logging.getLogger(__name__)

_POLL_MS = 100
WARMUP_CALLS = 2
"""Synthetic frames each worker refocuses before it says it is ready (`warm_up`)."""
MAX_LATENCY_MS = 86_400_000.0
"""A stack's reported latency is capped at a day (`_send_stack`): beyond it the camera's clock
is not this machine's, and the number only has to stay finite."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; passed once through 'spawn' at process start."""

    worker_id: int
    frames_endpoint: str
    """The router's PUSH endpoint for this worker (the worker connects its PULL)."""
    stacks_endpoint: str
    """The collector's PULL endpoint (the worker connects its PUSH)."""
    events_endpoint: str
    """The collector's event PULL endpoint (JSON events)."""
    credits_endpoint: str
    """The router's credit PULL endpoint (the worker connects a PUSH)."""
    config: dict[str, Any]
    """The run's `ScopeConfig.model_dump(mode="json")`; the worker validates it again."""
    plan_sha256: str | None = None
    """`VolumePlan.digest()` of the plan the daemon recorded; the worker builds its own from
    the config and refuses to serve another (a surface's DPM file changed since). None: not
    checked."""


def build_plan(config: Any) -> VolumePlan:
    """Build the volume plan once from a `ScopeConfig` (``config.planes.build``), frozen.

    Its DPMs are read-only, so backends normalise them once, not per frame. Uniform planes
    label stacks with their offsets (``plan.z_um``), surfaces with their comma-joined labels.
    """
    plan: VolumePlan = config.volume_plan()
    return plan.frozen()


def warm_up(backend: Any, frame_shape: tuple[int, int], plan: VolumePlan) -> None:
    """Refocus `WARMUP_CALLS` synthetic frames of the run's shape onto the plan, results unused.

    A backend's first calls for a shape compile kernels, plan FFTs, compute the renderer's PSF
    transforms and allocate buffers: about half a second for 41 planes of 256² on 2 cores.
    Done here, before the worker says it is ready (the camera starts only then), that time is
    not spent while the first frames queue behind it: it was the whole of the live run's p99
    latency (about 500 ms in the first 2 s, at most 155 ms after).
    """
    rng = np.random.default_rng(0)
    for _ in range(WARMUP_CALLS):
        frame = rng.integers(100, 1000, frame_shape, dtype=np.uint16)  # noise: every depth
        backend.refocus(frame, plan)


def focus_lock(config: Any, plan: VolumePlan, backend: Any) -> FocusLock | None:
    """Return the plan's `engine.dpm.FocusLock` when ``planes.focus_lock_um`` is set, else None.

    Clamped to the model's trained depths, or with ``engine.allow_extrapolation`` to the
    DPMs the runtime takes (±`engine.runtime.MAX_DPM_UM`); a volume model's always to its
    depth grid (it renders nowhere else: an unclamped lock failed every frame).
    """
    from engine.runtime import MAX_DPM_UM, depth_limits

    planes = config.planes
    if planes.focus_lock_um is None:
        return None
    metadata = getattr(backend, "metadata", None)
    dz_range = (
        (-MAX_DPM_UM, MAX_DPM_UM)
        if metadata is None
        else depth_limits(metadata, config.engine.allow_extrapolation)
    )
    return FocusLock.for_plan(plan, planes.focus_lock_um, float(planes.stage_z_sign), dz_range)


def open_backend(config: Any) -> Any:
    """Load the inference backend a `ScopeConfig` asks for (the pre-flight and every worker)."""
    from engine.runtime import load_backend

    engine = config.engine
    return load_backend(
        engine.model_path,
        prefer=engine.backends,
        precision=engine.precision,
        intra_op_threads=engine.intra_op_threads,
        max_batch=engine.max_batch,
        frame_shape=(int(config.source.frame_shape[0]), int(config.source.frame_shape[1])),
        render_modality=engine.render_modality,
        psf_bank=engine.psf_bank,
    )


class FrameQueue:
    """Hand-off from the receive thread to the inference thread (FIFO).

    Credits bound it: the router sends at most ``WORKER_PREFETCH`` frames beyond the one being
    refocused, so it never holds more and needs no policy of its own.
    """

    def __init__(self) -> None:
        self._items: deque[tuple[Message, float]] = deque()
        self._refused: list[int] = []
        self._dropped = 0
        self._cond = threading.Condition()
        self.received_s = 0.0
        """Wall-clock time the frame last returned by `get` arrived at this worker."""

    def put(self, message: Message) -> None:
        """Queue a frame (never waits), stamped with its arrival time."""
        with self._cond:
            self._items.append((message, time.time()))
            self._cond.notify_all()

    def get(self, timeout_s: float) -> Message | None:
        """Take the oldest queued frame, or None after `timeout_s`."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)
            if not self._items:
                return None
            message, self.received_s = self._items.popleft()
            return message

    def refuse(self, seq: int) -> None:
        """Record a frame that cannot be refocused (wrong shape); it is reported, not queued."""
        with self._cond:
            self._refused.append(seq)

    def take_refused(self) -> list[int]:
        """Return and forget the seqs refused since the last call."""
        with self._cond:
            refused, self._refused = self._refused, []
            return refused

    def dropped(self) -> None:
        """Record a message that was not a frame at all (no seq): only its credit is owed."""
        with self._cond:
            self._dropped += 1

    def take_dropped(self) -> int:
        """Return and forget how many messages were dropped since the last call."""
        with self._cond:
            dropped, self._dropped = self._dropped, 0
            return dropped

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


def worker_main(spec: WorkerSpec, stop: MpEvent) -> None:
    """Run one worker until `stop` is set and its queue is drained (process entry point)."""
    # Ctrl-C reaches the whole process group, and so does `systemctl stop` (SIGTERM to the
    # service's control group) or `kill -TERM -PGID`: the daemon drives a worker's shutdown
    # (end marker, then "done"), so the worker must not die of either first, its frames lost
    # mid-refocus (review 67). The daemon ends a stuck worker with SIGKILL; a worker whose
    # daemon is gone ends on its own (`_serve` watches the parent).
    if threading.current_thread() is threading.main_thread():  # (tests run it in a thread)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"worker {spec.worker_id}: %(message)s")
    logging.getLogger("engine.runtime").setLevel(logging.WARNING)  # its "ready" event says it
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    events = _socket(ctx, zmq.PUSH, spec.events_endpoint)
    try:
        _serve(spec, stop, ctx, events)
    except Exception as err:
        _event(events, spec.worker_id, "error", message=f"{type(err).__name__}: {err}")
        raise
    finally:
        events.close(linger=1000)
        ctx.term()


def _serve(
    spec: WorkerSpec, stop: MpEvent, ctx: zmq.Context[zmq.Socket[bytes]], events: zmq.Socket[bytes]
) -> None:
    """Load the plan and backend, then receive, refocus and send until stopped and drained."""
    from live.config import ScopeConfig

    config = ScopeConfig.model_validate(spec.config)
    plan = build_plan(config)
    if spec.plan_sha256 is not None and plan.digest() != spec.plan_sha256:
        # the stacks would not be the planes the store records beside them
        raise RuntimeError(
            "the planes changed since the daemon started (a surface's DPM file was rewritten): "
            "restart the daemon"
        )
    backend = open_backend(config)
    # Everything made from here on is closed in the `finally` below, a failed warm-up too: a
    # socket left open would make `worker_main`'s ctx.term() wait for ever after its "error"
    # event, a hung worker the daemon could neither restart nor join (review 81).
    stacks: zmq.Socket[bytes] | None = None
    credits: zmq.Socket[bytes] | None = None
    receiving = threading.Event()
    receiving.set()
    thread_stop = threading.Event()
    receiver: threading.Thread | None = None
    try:
        queue = FrameQueue()
        stacks = _socket(ctx, zmq.PUSH, spec.stacks_endpoint)
        credits = _socket(ctx, zmq.PUSH, spec.credits_endpoint)
        frame_shape = (int(config.source.frame_shape[0]), int(config.source.frame_shape[1]))
        lock = focus_lock(config, plan, backend)
        clamped = saturated = 0
        stages = StageTimes(WORKER_STAGES)  # reported with "done": where the time went
        # planes come out of the backend in the recorded dtype: no cast of the whole stack here
        stack_dtype = np.dtype(config.recorder.stack_dtype).type
        live_clock = config.source.kind != "replay"  # a replay's timestamps are the recording's
        failure: list[BaseException] = []  # the receive thread's exception, if it fails
        warm_up(backend, frame_shape, plan)
        receiver = threading.Thread(
            target=_receive,
            args=(ctx, spec.frames_endpoint, frame_shape, queue, stop, thread_stop, receiving),
            kwargs={"failure": failure},
            name="receive",
            daemon=True,
        )
        receiver.start()
        _event(events, spec.worker_id, "ready", backend=backend.name, device=backend.device)
        credits.send(credit(spec.worker_id, WORKER_PREFETCH + 1, reset=True))
        done = 0
        while receiving.is_set() or len(queue):
            message = queue.get(0.1)
            _report(events, credits, spec.worker_id, queue, frame_shape)
            if message is not None:
                offset = 0.0
                t0 = time.perf_counter()
                try:
                    if lock is not None:  # planes fixed in the sample: follow the stage's focus
                        if message.header.focus_um is None:
                            raise ValueError(
                                "no stage focus in its header: the focus lock cannot place "
                                "its planes"
                            )
                        offset, excess = lock.offset_um(message.header.focus_um)
                        if excess:  # said as it happens: a worker that dies keeps no count
                            _event(
                                events,
                                spec.worker_id,
                                "clamped",
                                seqs=[message.header.seq],
                                excess_um=excess,
                            )
                            clamped += 1
                            if clamped == 1:
                                log.warning(
                                    "focus %.2f µm is %.2f µm beyond the focus lock's range: "
                                    "planes clamped to the model's trained depths (each "
                                    "such frame named in the summary)",
                                    message.header.focus_um,
                                    excess,
                                )
                    t0 = time.perf_counter()
                    planes = backend.refocus(
                        message.array, plan, np.array([offset]), dtype=stack_dtype
                    )[0]
                except (ValueError, BackendError) as err:  # this frame cannot be refocused
                    # (a DPM the model refuses): it costs this frame, reported and credited
                    # back, not the worker and the frames it holds (the pre-flight refuses a
                    # plan that fails every frame)
                    why = f"cannot be refocused: {err}"
                    _event(
                        events, spec.worker_id, "rejected", seqs=[message.header.seq], message=why
                    )
                    credits.send(credit(spec.worker_id, 1))
                    continue
                t1 = time.perf_counter()
                try:
                    clipped = _send_stack(
                        stacks,
                        planes,
                        message,
                        plan,
                        None if live_clock else queue.received_s,
                        config.recorder.stack_dtype,
                    )
                except ProtocolError as err:  # this frame's header makes no stack: it costs
                    # this frame only (reported and credited back), not the worker and the
                    # frames it holds
                    why = f"no stack could be made: {err}"
                    _event(
                        events, spec.worker_id, "rejected", seqs=[message.header.seq], message=why
                    )
                    credits.send(credit(spec.worker_id, 1))
                    continue
                stages.add("refocus", t0, t1)
                stages.add("send", t1, time.perf_counter())
                if clipped and not saturated:
                    log.warning(
                        "stack values beyond ±65504 saturated in %s (seq %d): an overexposed "
                        "frame; recorder.stack_dtype = 'float32' keeps them",
                        config.recorder.stack_dtype,
                        message.header.seq,
                    )
                saturated += clipped
                credits.send(credit(spec.worker_id, 1))
                done += 1
        _report(events, credits, spec.worker_id, queue, frame_shape)
        if failure:  # exit non-zero: the daemon restarts this worker and counts what it held
            raise RuntimeError(
                f"receive thread failed: {type(failure[0]).__name__}: {failure[0]}"
            ) from failure[0]
        _event(
            events,
            spec.worker_id,
            "done",
            stacks=done,
            stack_values_saturated=saturated,
            **stages.fields(),
        )
        stacks.send(end_of_stacks(spec.worker_id))  # behind the last stack, same socket
    finally:
        thread_stop.set()
        if receiver is not None:
            receiver.join(2.0)
        if stacks is not None:
            stacks.close(linger=2000)
        if credits is not None:
            credits.close()
        backend.close()


def _report(
    events: zmq.Socket[bytes],
    credits: zmq.Socket[bytes],
    worker_id: int,
    queue: FrameQueue,
    frame_shape: tuple[int, int],
) -> None:
    """Report the seqs refused since the last call, and credit them back (main thread)."""
    refused = queue.take_refused()
    owed = len(refused) + queue.take_dropped()
    if owed:
        credits.send(credit(worker_id, owed))
    for i in range(0, len(refused), MAX_EVENT_SEQS):
        why = f"not a frame of shape {list(frame_shape)}"
        _event(events, worker_id, "rejected", seqs=refused[i : i + MAX_EVENT_SEQS], message=why)


def _receive(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    frame_shape: tuple[int, int],
    queue: FrameQueue,
    stop: MpEvent,
    thread_stop: threading.Event,
    receiving: threading.Event,
    *,
    failure: list[BaseException],
) -> None:
    """PULL frames into `queue` until the end marker, or `stop` and an empty pipe (fallback).

    Also ends when the daemon process is gone (this worker would otherwise be orphaned). An
    unexpected exception is logged and put in `failure` for the main thread, which then
    makes the process exit non-zero (so the daemon restarts it).
    """
    daemon_pid = os.getppid()
    pull: zmq.Socket[bytes] | None = None
    try:
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        pull.rcvhwm = 2
        pull.maxmsgsize = max_part_bytes(frame_shape)  # ZeroMQ drops anything bigger
        pull.connect(endpoint)
        while not thread_stop.is_set():
            if not pull.poll(_POLL_MS):
                if os.getppid() != daemon_pid:
                    log.error("the daemon (pid %d) is gone: stopping", daemon_pid)
                    break
                if stop.is_set():  # set only when the end marker could not be delivered
                    break
                continue
            parts = pull.recv_multipart(copy=False)
            if len(parts) == 1 and parts[0].bytes == END_OF_FRAMES:
                break
            try:
                message = decode(parts)
            except ProtocolError as err:  # the router validated it: this is a bug upstream
                log.error("dropped malformed frame from the router: %s", err)
                queue.dropped()  # its credit goes back, or the router would wait for it
                continue
            if message.array.shape != frame_shape:  # the backend would fail on it: refuse it
                log.error(
                    "refused frame seq %d of shape %s (frames are %s)",
                    message.header.seq,
                    list(message.array.shape),
                    list(frame_shape),
                )
                queue.refuse(message.header.seq)
                continue
            queue.put(message)
    except Exception as err:  # deliberately broad: handed to the main thread (see above)
        log.exception("receive thread failed")
        failure.append(err)
    finally:
        if pull is not None:
            pull.close()
        receiving.clear()


def _send_stack(
    socket: zmq.Socket[bytes],
    planes: np.ndarray,
    frame: Message,
    plan: VolumePlan,
    received_s: float | None,
    stack_dtype: str = "float16",
) -> int:
    """Encode and PUSH one stack as `stack_dtype` (blocking: the collector always drains).

    The planes arrive in ``recorder.stack_dtype`` (the backend rendered them in it) or are
    cast here (`live.store.as_stack_dtype`), so the stack travels to the collector, the
    recorder and the display at that size; values beyond the float16 range saturate at
    ±65504 counts. Returns how many did, for the caller to count and report. Latency is
    from the camera's timestamp, or with `received_s` (a replay, whose timestamps are the
    recording's) from the frame's arrival at this worker.
    """
    from live.store import as_stack_dtype

    header = frame.header
    stack, clipped = as_stack_dtype(planes, stack_dtype, saturate_same=True)
    start = header.timestamp_s if received_s is None else received_s
    # a camera clock far from this one (or a forged timestamp) gives a latency that means
    # nothing, but it must stay a finite number or the stack could not be encoded
    latency_ms = min(max(0.0, (time.time() - start) * 1e3), MAX_LATENCY_MS)
    parts = encode_stack(
        stack,
        seq=header.seq,
        timestamp_s=header.timestamp_s,
        focus_um=header.focus_um,
        planes_um=None if plan.z_um is None else list(plan.z_um),
        surface_id=None if plan.z_um is not None else ",".join(plan.labels),
        latency_ms=latency_ms,
    )
    socket.send_multipart(parts, copy=False)
    return clipped


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str) -> zmq.Socket[bytes]:
    """Return a connected socket with linger 0 (sends are flushed explicitly at close)."""
    socket = ctx.socket(kind)
    socket.linger = 0
    socket.connect(endpoint)
    return socket


def _event(socket: zmq.Socket[bytes], worker_id: int, event: str, **fields: Any) -> None:
    """Send one JSON event to the daemon (`live.protocol.encode_event`)."""
    socket.send(encode_event(event, worker_id, **fields))
