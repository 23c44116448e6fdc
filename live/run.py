"""The live daemon: ``python -m live.run --scope config.toml [--duration S] [--output PATH]``.

Validates the config, picks the backend and says why others were skipped, runs a measured
pre-flight (does rate × planes fit?), then wires source → router → worker(s) → collector →
recorder / display, supervises them (a crashed worker is restarted, its frames counted as lost
by seq; a daemon thread that fails stops the run with exit code 1 and the store marked
incomplete, see `live.supervisor`), prints one status line per second, and on the end of
`--duration`, the end of the source, SIGINT or SIGTERM shuts down in order and prints a
summary. Never imports torch.

Before anything starts, `Daemon.check` refuses, with one line and exit code 2, a config the
daemon cannot serve safely: an endpoint beyond loopback without CURVE keys (`live.security`),
an output store that already exists. Frames are admitted through the recording's integrity
checks (`live.recorder.SeqGate`): a duplicate seq, a seq beyond ``recorder.seq_window`` or a
frame of the wrong shape or dtype is counted by kind and goes nowhere.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from engine.metadata import file_sha256
from live.addresses import connect_address
from live.config import ConfigError, check_optics, resolve_geometry
from live.metrics import (
    WORKER_STAGES,
    Metrics,
    RunState,
    SeqRuns,
    Snapshot,
    StageTimes,
    StatusPublisher,
    format_ranges,
    format_seqs,
    format_stage_times,
)
from live.protocol import WORKER_PREFETCH, Message, max_part_bytes
from live.recorder import (
    Recorder,
    RecorderSummary,
    SeqGate,
    format_rejections,
    low_space_stops,
    store_path,
)
from live.router import (
    DISPLAY_HWM,
    FRAMES_RCVHWM,
    RAW_REPUBLISH_HWM,
    WORKER_HWM,
    Collector,
    Ledger,
    Router,
)
from live.security import Gatekeeper, ServerKeys, server_keys
from live.sources import replay_rate_hz
from live.store_lock import StoreLocked
from live.supervisor import Failure, Supervisor, make_ipc_dir, remove_stale_ipc_dirs
from live.worker import WorkerSpec, build_plan, focus_lock, open_backend, worker_main

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.synchronize import Event as MpEvent

    from engine.dpm import VolumePlan
    from live.config import ScopeConfig

__all__ = [
    "Daemon",
    "Edge",
    "FinishReason",
    "Preflight",
    "RunSummary",
    "compose",
    "main",
    "preflight",
]

log = logging.getLogger("live.run")

EXIT_BAD_CONFIG = 2
EXIT_NO_FIT = 3
EXIT_FAILED = 1
EXIT_INCOMPLETE = 4
"""The run ended but its recording lacks admitted frames or stacks: a full or failed disk, a
backlog the disk could not take (`RunSummary.recording_incomplete` says which)."""
_READY_TIMEOUT_S = 120.0
MAX_WORKERS = 64
"""Most worker processes `--workers` may ask for (each loads the model; 2 fill these 2 cores)."""
RESTART_BACKOFF_S = (0.0, 1.0, 5.0, 30.0)
"""Wait before restarting a worker that died, by how many times in a row it died within
`_STABLE_S` of its start: at once the first time, then longer, so a worker that cannot run
(or a stream that kills it) is not respawned twenty times a second."""
_STABLE_S = 60.0
_PREFLIGHT_CALLS = 3
_PRINTED_RANGES = 200
"""The printed summary names up to this many ranges of skipped / lost seqs; the store's run
summary (``attrs["deepz"]["summary"]``) keeps every one."""
_SOURCE_HWM = 2000
"""Frames the daemon's own source may queue towards the router before it drops (and counts)."""


class FinishReason(StrEnum):
    """Why a run ended (`RunSummary.finish_reason`; its detail says more)."""

    DURATION = "duration reached"
    SOURCE_FINISHED = "source finished"
    SIGINT = "SIGINT"
    SIGTERM = "SIGTERM"
    NO_FIT = "pre-flight: does not fit"
    REFUSED = "refused"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Edge:
    """One connection of the daemon's graph: who sends what to whom, its bound and policy.

    `bound` is the most messages the edge holds before its `policy` acts, or the bytes, as
    "N MB" (None: unbounded, watched as a gauge instead); `policy` says what happens then,
    and who counts it.
    """

    source: str
    target: str
    what: str
    transport: str
    bound: int | str | None
    policy: str


def compose(config: ScopeConfig, workers: int) -> tuple[Edge, ...]:
    """Return the daemon's wiring, in one place: every edge with its bound and overflow policy.

    Nodes: ``source`` (the configured camera, simulator or replay, in-process) or an
    external ``hook`` (Micro-Manager), ``router`` (decode, admit, route; its inference queue
    applies `config.overload` and is the only place frames are skipped), ``worker[i]``
    processes (inference; they take frames by credit), ``collector``, ``recorder`` (OME-Zarr
    writer thread), ``display`` and ``status`` subscribers. `Daemon.start` builds the nodes
    with these bounds; ``python -m live.run --scope config.toml --wiring`` prints the table.
    """
    ov = config.overload
    waiting = (
        "a new frame replaces the waiting one, which is skipped (counted)"
        if ov.policy == "latest"
        else "the new frame is skipped (counted)"
    )
    edges = [
        Edge("source", "router", "frames", "inproc", _SOURCE_HWM, "source drops and counts"),
        Edge(
            "hook",
            "router",
            "frames",
            config.endpoints.frames,
            FRAMES_RCVHWM,
            "hook drops and counts",
        ),
        Edge(
            "router",
            "recorder",
            "raw frames",
            "in-process queue",
            f"{config.recorder.max_backlog_mb} MB",
            "past it a frame is not recorded (counted); shown and refocused still",
        ),
        Edge(
            "router",
            "raw subscribers",
            "raw frames",
            config.endpoints.recorder,
            RAW_REPUBLISH_HWM,
            "a slow subscriber misses frames",
        ),
        Edge(
            "router",
            "inference queue",
            "frames",
            f"router ({ov.policy})",
            1 if ov.policy == "latest" else ov.max_queue_frames,
            waiting,
        ),
    ]
    for i in range(workers):
        edges += [
            Edge(
                "inference queue",
                f"worker[{i}]",
                "frames",
                "ipc",
                WORKER_PREFETCH + 1,
                "by credit: sent only when the worker has room (never full)",
            ),
            Edge(
                f"worker[{i}]",
                "collector",
                "stacks, events",
                "ipc",
                None,
                "wait (the collector always drains)",
            ),
            Edge(f"worker[{i}]", "router", "credits", "ipc", None, "wait (the router drains)"),
        ]
    edges += [
        Edge(
            "collector",
            "recorder",
            "stacks",
            "in-process queue",
            f"{config.recorder.max_backlog_mb // 2} MB",
            "past half the backlog a stack is not recorded (counted); shown still",
        ),
        Edge(
            "collector",
            "display",
            "stacks",
            config.endpoints.stacks,
            DISPLAY_HWM,
            "a slow display misses stacks",
        ),
        Edge(
            "daemon",
            "status readers",
            "snapshot / s",
            config.endpoints.status,
            10,
            "a slow reader misses snapshots",
        ),
    ]
    return tuple(edges)


@dataclass(frozen=True)
class Preflight:
    """The measured pre-flight: time per frame for the planned planes, and what fits."""

    backend: str
    device: str
    frame_shape: tuple[int, int]
    n_planes: int
    seconds_per_frame: float
    workers: int
    rate_hz: float

    @property
    def max_rate_hz(self) -> float:
        """Highest frame rate the workers sustain at this plane count."""
        return self.workers / self.seconds_per_frame

    @property
    def fits(self) -> bool:
        """Whether the requested rate × planes fits the measured throughput."""
        return self.rate_hz <= self.max_rate_hz

    def max_planes(self) -> int:
        """Planes per frame that would fit at the requested rate (linear in planes)."""
        per_plane_s = self.seconds_per_frame / self.n_planes
        return int(self.workers / (self.rate_hz * per_plane_s))

    def line(self) -> str:
        """Say plainly whether it fits and what would."""
        h, w = self.frame_shape
        head = (
            f"pre-flight: {self.backend} on {self.device}: {self.n_planes} planes of {h}×{w} take "
            f"{self.seconds_per_frame * 1e3:.1f} ms per frame → at most {self.max_rate_hz:.1f} Hz "
            f"with {self.workers} worker(s); requested {self.rate_hz:g} Hz"
        )
        if self.fits:
            return f"{head}: FITS ({self.rate_hz / self.max_rate_hz:.0%} of capacity)"
        return (
            f"{head}: DOES NOT FIT. At {self.rate_hz:g} Hz at most {self.max_planes()} planes fit; "
            f"at {self.n_planes} planes at most {self.max_rate_hz:.1f} Hz. The overload policy "
            "will skip frames (counted and named)."
        )


_WORKER_COUNTS = ("stack_values_saturated",)
"""Counts each worker reports with "done" that the summary adds up and prints when not 0."""


@dataclass(frozen=True)
class RunSummary:
    """What a run did: counts, losses by seq, latency, backend and where the data went.

    Built once, when the run has ended (`Daemon.stop`), and never changed afterwards.
    """

    frames_acquired: int | None
    frames_in: int
    raw_recorded: int
    stacks_written: int
    skipped: SeqRuns
    lost: SeqRuns
    malformed: int
    worker_restarts: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    backend: str
    output: str | None
    source: dict[str, Any] = field(default_factory=dict)
    recorder: dict[str, Any] = field(default_factory=dict)
    finish_reason: FinishReason = FinishReason.STOPPED
    finish_detail: str = ""
    """What the reason does not say: the duration, the failing thread and its error, ..."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Frames refused by the integrity checks, by kind (not recorded, refocused or republished)."""
    failures: list[str] = field(default_factory=list)
    """Daemon threads that failed (`live.supervisor`); any makes the exit code non-zero."""
    auth_denied: int = 0
    """CURVE connection attempts refused for an unknown client key."""
    preview: str | None = None
    """The run's picture (``RUN.preview.png``: last frame and stack, latency, counts)."""
    stacks_refocused: int = 0
    """Stacks the workers returned (`Snapshot.stacks_out`), recorded or not: with recording
    off, ``keep_stacks = false`` or a stopped recorder `stacks_written` is fewer."""
    worker_times: list[dict[str, Any]] = field(default_factory=list)
    """Per worker that finished, from its "done" event (`live.metrics.StageTimes`): refocus
    (network and rendering) and send p50 / p99 ms, its busy share, and its counts
    (`_WORKER_COUNTS`: stack values saturated)."""
    focus_clamped: SeqRuns = field(default_factory=SeqRuns)
    """Frames refocused with the focus lock clamped (the stage beyond its range): each worker
    says each one as it happens, so a worker that died later keeps them (review 84)."""

    def worker_count(self, key: str) -> int:
        """Sum one of `_WORKER_COUNTS` over the workers that finished."""
        return sum(int(t.get(key) or 0) for t in self.worker_times)

    @property
    def rejected_total(self) -> int:
        """Frames refused by the integrity checks, all kinds together."""
        return sum(self.rejected.values())

    @property
    def recording_incomplete(self) -> str | None:
        """Why the recording lacks items it was given, or None (kept everything, or off).

        The recorder's own account (`live.recorder.RecorderSummary`): it stopped (a full or
        failed disk), it stopped the stacks alone, or its backlog refused items.
        """
        rec = self.recorder
        if rec.get("error"):
            return f"the recorder stopped: {rec['error']}"
        if rec.get("stacks_error"):
            return f"the stacks stopped: {rec['stacks_error']}"
        if rec.get("unrecorded"):
            return f"{rec['unrecorded']} admitted items not recorded (the disk fell behind)"
        return None

    def lines(self) -> list[str]:
        """Render the human summary printed at shutdown.

        The counts add up: frames received = admitted + rejected, and admitted frames are
        raw frames recorded (when raw frames are kept and the recorder did not stop) and
        stacks refocused + skipped + lost (stacks written when every stack is recorded).
        """
        lat = (
            f"{self.latency_p50_ms:.1f} / {self.latency_p99_ms:.1f} ms"
            if self.latency_p50_ms is not None and self.latency_p99_ms is not None
            else "n/a"
        )
        acquired = "?" if self.frames_acquired is None else str(self.frames_acquired)
        rejected = format_rejections({"frames": self.rejected}).removeprefix("frames ")
        why = f"{self.finish_reason}: {self.finish_detail}" if self.finish_detail else ""
        lines = [
            f"summary ({why or self.finish_reason}):",
            f"  frames acquired   {acquired}"
            f" (received {self.frames_in}, malformed {self.malformed})",
            f"  rejected          {self.rejected_total}"
            + (f" ({rejected})" if self.rejected_total else "")
            + f"; admitted {self.frames_in - self.rejected_total}",
            f"  raw frames recorded {self.raw_recorded}",
            f"  stacks written    {self.stacks_written} (refocused {self.stacks_refocused})",
            f"  skipped           {len(self.skipped)} "
            f"(seqs: {format_ranges(self.skipped.runs, limit=_PRINTED_RANGES)})",
            f"  lost              {len(self.lost)} "
            f"(seqs: {format_ranges(self.lost.runs, limit=_PRINTED_RANGES)}; "
            f"worker restarts {self.worker_restarts})",
            f"  latency p50/p99   {lat}",
            *(
                f"  worker {t['worker']} time     {format_stage_times(t)}"
                for t in self.worker_times
            ),
            f"  backend           {self.backend}",
            f"  output            {self.output or 'not recorded'}",
        ]
        if self.focus_clamped:
            lines.append(
                f"  focus clamped     {len(self.focus_clamped)} frames (seqs "
                f"{format_ranges(self.focus_clamped.runs, limit=_PRINTED_RANGES)}: the stage "
                "beyond the focus lock's range, planes held at the model's trained depths)"
            )
        if saturated := self.worker_count("stack_values_saturated"):
            lines.append(
                f"  saturated         {saturated} stack values (beyond ±65504: "
                "recorder.stack_dtype = 'float32' keeps them)"
            )
        if self.preview:
            lines.append(f"  preview           {self.preview}")
        if self.auth_denied:
            lines.append(f"  refused clients   {self.auth_denied} (unknown CURVE key)")
        if why_incomplete := self.recording_incomplete:
            lines.append(f"  INCOMPLETE        {why_incomplete}")
        if self.failures:
            lines.append(f"  FAILED            {'; '.join(self.failures)}")
        return lines


def preflight(
    backend: Any,
    plan: VolumePlan,
    frame_shape: tuple[int, int],
    rate_hz: float,
    workers: int,
    stack_dtype: str = "float16",
) -> Preflight:
    """Check the backend can take the plan at all, then time it (`Backend.time_call`).

    Timed as the worker runs it: `refocus` onto the plan, planes in `stack_dtype`. A shape
    the backend cannot serve (e.g. beyond a TensorRT engine's profile,
    `Backend.shape_problem`) is a `ConfigError`, raised before the store exists.
    """
    n_planes = len(plan)
    problem = backend.shape_problem(frame_shape, n_planes)
    if problem:
        raise ConfigError(f"engine: {problem}")
    seconds = backend.time_call(
        frame_shape,
        n_planes,
        repeats=_PREFLIGHT_CALLS,
        plan=plan,
        dtype=np.dtype(stack_dtype).type,
    )
    return Preflight(
        backend=backend.name,
        device=str(getattr(backend, "device", "?")),
        frame_shape=frame_shape,
        n_planes=n_planes,
        seconds_per_frame=seconds,
        workers=workers,
        rate_hz=rate_hz,
    )


class Daemon:
    """One live run: build, start, supervise and stop every part, in that order.

    `source` is ``"config"`` (``live.sources.make_source(cfg)``) or None, for frames pushed
    from outside to ``endpoints.frames`` (an external Micro-Manager hook, or a test).
    With `require_fit`, a pre-flight that says the rate does not fit ends the run before the
    store, the workers or the camera start (`FinishReason.NO_FIT`).
    """

    def __init__(
        self,
        config: ScopeConfig,
        *,
        output: str | Path | None = None,
        workers: int = 1,
        source: str | None = "config",
        preflight_check: bool = True,
        require_fit: bool = False,
    ) -> None:
        self.config = config
        self.output = output
        self.n_workers = workers
        self.source_mode = source
        self.preflight_check = preflight_check
        self.require_fit = require_fit
        self.metrics = Metrics()
        self.ledger = Ledger(workers)
        self.stop_requested = threading.Event()
        self.finish_reason = FinishReason.STOPPED
        self.finish_detail = ""
        self.edges = compose(config, workers)
        self.backend_name = "?"
        self.preflight_result: Preflight | None = None
        self.recorder: Recorder | None = None
        self.failure: Failure | None = None
        self.supervisor = Supervisor(on_failure=self._on_failure)
        self.store: Path | None = (
            store_path(config.recorder.path, output) if config.recorder.enabled else None
        )
        self.metrics.set_run_info(state=RunState.STARTING, output=self.store)
        self._keys: ServerKeys | None = None
        self._checked = False
        self._n_planes = 0
        self._plan_sha256: str | None = None  # the recorded plan's, set by start()
        self._gatekeeper: Gatekeeper | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._tmp = make_ipc_dir()
        self._source_endpoint = f"inproc://deepz-source-{id(self)}"
        self._mp = mp.get_context("spawn")
        self._worker_stop: MpEvent = self._mp.Event()
        self._procs: list[SpawnProcess | None] = [None] * workers
        self._spawned_s = [0.0] * workers  # monotonic s each worker was last started
        self._quick_deaths = [0] * workers  # deaths in a row within _STABLE_S of a start
        self._respawn_at: list[float | None] = [None] * workers  # a dead worker's restart time
        self._source_thread: threading.Thread | None = None
        self.source_hung = False
        """The source thread outlived `stop`'s join: a read that never returns (a hung mount
        under a replayed recording) holds a zarr I/O thread Python joins at exit."""
        self._source: Any = None  # a replay's source, opened by `check` (see there)
        self._source_stop = threading.Event()
        self._source_summary: Any = None
        self._sender: Any = None
        self._started_s = 0.0  # monotonic s when start() started the source
        self._running_since: float | None = None  # monotonic s when acquisition began
        self._display: subprocess.Popen[bytes] | None = None
        self._display_ended = False  # said once (`_check_display`)
        self._status: StatusPublisher | None = None
        self._summary: RunSummary | None = None

    # -- start -------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse a run the daemon cannot serve safely, before anything starts (idempotent).

        Raises `ConfigError` with one line: an endpoint the daemon cannot bind
        (`_check_endpoints_free`, first), an endpoint that uses CURVE (beyond loopback, or
        ``security.curve = "required"``) without keys or with unreadable ones, an output
        store that already exists or a folder that cannot take it (`_check_recording_folder`),
        ``--output`` with recording off, or a recording to replay that cannot be. Loads the CURVE
        keys and opens the replay's recording for `start`.
        """
        if self._checked:
            return
        # first: a mistyped host is told it does not resolve, not to make keys for it
        _check_endpoints_free(self.config)
        self._keys = server_keys(self.config)
        if self.output is not None and not self.config.recorder.enabled:
            raise ConfigError(
                f"--output {self.output}: recording is off (recorder.enabled = false); drop "
                "--output or turn recording on"
            )
        if self.store is not None and self.store.exists():
            raise ConfigError(
                f"the output store {self.store} already exists: give another --output or "
                "move it away (a run never overwrites a recording)"
            )
        if self.store is not None:
            self._check_recording_folder(self.store.parent)
        # the workers' ipc sockets live in a folder of the temp dir: too deep a TMPDIR would
        # fail their bind in start(), where the error would seem to be a configured endpoint's
        longest = f"{self._tmp.name}/frames-{self.n_workers - 1}"  # the longest ipc path
        if len(os.fsencode(longest)) > _IPC_PATH_MAX:  # the OS counts bytes
            raise ConfigError(
                f"the daemon's ipc socket folder {self._tmp.name} is too deep for a socket path "
                f"({len(os.fsencode(longest))} bytes, at most {_IPC_PATH_MAX}): set TMPDIR to a "
                "shorter folder"
            )
        self.config = resolve_geometry(self.config)  # own Micro-Manager core: its geometry
        if self.source_mode is not None:
            from live.sources import make_source

            # the source is made now, not once the workers are up: a recording that cannot
            # be replayed (truncated, another frame shape, no frames), or the simulated
            # scope without the `sim` extra (review 81: refused after the store was made),
            # is refused before anything starts; the constructors read no frame
            try:
                self._source = make_source(self.config)
            except ConfigError:
                raise
            except (OSError, ValueError) as err:
                where = "source.replay.path" if self.config.source.kind == "replay" else "source"
                raise ConfigError(f"{where}: {_one_line(err)}") from err
        self._checked = True

    def _check_recording_folder(self, folder: Path) -> None:
        """Make the store's folder and refuse one that cannot take it, naming its key.

        Before the model loads: a folder that is a file, cannot be made or written, or a disk
        already below ``recorder.min_free_mb`` (nothing would be recorded) is said in one line.
        """
        rc = self.config.recorder
        what = f"recorder.path {rc.path}" if self.output is None else f"--output {self.output}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free_mb = shutil.disk_usage(folder).free / 2**20
        except OSError as err:
            raise ConfigError(
                f"{what}: cannot make or use the recordings folder {folder}: {err.strerror or err}"
            ) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{what}: this user cannot write in {folder}")
        if free_mb < rc.min_free_mb:
            stops = low_space_stops(keep_raw=self.config.records_raw, keep_stacks=rc.keep_stacks)
            raise ConfigError(
                f"only {free_mb:.0f} MB free on {folder}, below recorder.min_free_mb = "
                f"{rc.min_free_mb}, where {stops} (free space, lower recorder.min_free_mb, "
                "or run with recorder.enabled = false)"
            )

    def start(self) -> None:
        """Check, pick the backend, pre-flight, then start recorder, threads, workers, source.

        Returns early, having started nothing, when the run was asked to stop meanwhile (a
        signal while a Micro-Manager core or the pre-flight loaded) or the pre-flight does not
        fit under `require_fit`.
        """
        self.check()
        if self.stop_requested.is_set():
            return
        remove_stale_ipc_dirs()  # left by daemons that were killed (their pid is gone)
        cfg = self.config
        try:
            plan = build_plan(cfg)
        except ValueError as err:  # a surface that cannot be built for these frames (a DPM
            # file of another shape): the config's, one line (DPMError is a ValueError)
            raise ConfigError(f"planes: {_one_line(err)}") from err
        self._plan_sha256 = plan.digest()  # each worker builds it again and must match
        self._choose_backend(plan)
        result = self.preflight_result
        if self.require_fit and result is not None and not result.fits:
            self.finish(FinishReason.NO_FIT, "--require-fit: nothing was started")
        if self.stop_requested.is_set():  # no store, no workers, no camera
            return
        if self._keys is not None:
            # Before any socket binds: a CURVE server with no ZAP handler lets in any key.
            self._gatekeeper = Gatekeeper(self._ctx, self._keys.allowed)
        curve = cfg.curve_endpoints()

        def keys_for(name: str) -> ServerKeys | None:
            return self._keys if name in curve else None

        self._start_recorder(plan)
        frame_shape = (int(cfg.source.frame_shape[0]), int(cfg.source.frame_shape[1]))
        n_planes = self._n_planes = int(plan.dpms_um.shape[0])
        ipc = Path(self._tmp.name)
        self._worker_endpoints = [f"ipc://{ipc}/frames-{i}" for i in range(self.n_workers)]
        self._stacks_in, self._events = f"ipc://{ipc}/stacks", f"ipc://{ipc}/events"
        self._credits = f"ipc://{ipc}/credits"
        stacks = f"the collector's sockets (endpoints.stacks = {cfg.endpoints.stacks!r})"
        with _binding(stacks):
            self.collector = Collector(
                self._ctx,
                stacks_in_endpoint=self._stacks_in,
                events_endpoint=self._events,
                stacks_pub_endpoint=cfg.endpoints.stacks,
                ledger=self.ledger,
                metrics=self.metrics,
                recorder=self.recorder,
                max_stack_bytes=max_part_bytes((n_planes, *frame_shape), cfg.recorder.stack_dtype),
                stacks_keys=keys_for("stacks"),
                supervisor=self.supervisor,
                display_hwm=self._bound("collector", "display") or DISPLAY_HWM,
            )
        router = (
            f"the router's sockets (endpoints.frames = {cfg.endpoints.frames!r}, "
            f"endpoints.recorder = {cfg.endpoints.recorder!r})"
        )
        with _binding(router):
            self.router = Router(
                self._ctx,
                frames_endpoint=cfg.endpoints.frames,
                worker_endpoints=self._worker_endpoints,
                ledger=self.ledger,
                metrics=self.metrics,
                admit=self._admission(frame_shape),
                raw_endpoint=cfg.endpoints.recorder,
                source_endpoint=self._source_endpoint if self.source_mode else None,
                credits_endpoint=self._credits,
                policy=cfg.overload.policy,
                max_queue_frames=cfg.overload.max_queue_frames,
                max_frame_bytes=max_part_bytes(frame_shape),
                max_part_bytes=max_part_bytes(frame_shape),
                frames_keys=keys_for("frames"),
                raw_keys=keys_for("recorder"),
                supervisor=self.supervisor,
                worker_hwm=WORKER_HWM,
                raw_hwm=self._bound("router", "raw subscribers") or RAW_REPUBLISH_HWM,
            )
        with _binding(f"endpoints.status = {cfg.endpoints.status!r}"):
            self._status = StatusPublisher(self._ctx, cfg.endpoints.status, keys_for("status"))
        self.collector.start()
        self.router.start()
        for i in range(self.n_workers):
            self._spawn(i)
        self._wait_ready()
        if self.stop_requested.is_set():  # stopped while the models loaded: nothing to show
            return
        self._start_display()
        self._start_source()
        self._started_s = time.monotonic()
        self._mark_running()

    def _bound(self, source: str, target: str) -> int | None:
        """Return the bound in messages `compose` gives the edge from `source` to `target`."""
        bound = next(e.bound for e in self.edges if (e.source, e.target) == (source, target))
        if isinstance(bound, str):  # a bound in bytes is the recorder's, from its config
            raise TypeError(f"the edge {source} -> {target} is bounded in bytes ({bound})")
        return bound

    def _choose_backend(self, plan: VolumePlan) -> None:
        """Say which backend runs and why others were skipped; run the measured pre-flight."""
        from engine.runtime import BackendError, select

        cfg, engine = self.config, self.config.engine
        try:
            spec, reasons = select(engine.backends)
        except BackendError as err:  # none of those listed runs here: a config matter
            raise ConfigError(f"engine.backends = {list(engine.backends)}: {err}") from None
        skipped = "; ".join(f"{n} skipped: {why}" for n, why in reasons.items()) or "none skipped"
        print(f"backend: {spec.name} chosen (first available of {engine.backends}); {skipped}")
        if engine.psf_bank is not None:  # planes unlike the model's own: say so where rates are
            print(f"planes rendered through the measured PSF bank {engine.psf_bank}")
        self.backend_name = spec.name
        self.metrics.set_run_info(backend=self.backend_name)
        if not self.preflight_check:
            return
        backend = _open_checked(cfg)
        try:
            _check_planes(cfg, backend, plan)
            _check_optics(cfg, backend)
            self.backend_name = f"{backend.name} on {backend.device}"
            self.metrics.set_run_info(backend=self.backend_name)
            frame_shape = (int(cfg.source.frame_shape[0]), int(cfg.source.frame_shape[1]))
            self.preflight_result = preflight(
                backend,
                plan,
                frame_shape,
                replay_rate_hz(cfg),
                self.n_workers,
                cfg.recorder.stack_dtype,
            )
        finally:
            backend.close()
        print(self.preflight_result.line(), flush=True)

    def _admission(self, frame_shape: tuple[int, int]) -> Callable[[Message], str | None]:
        """Return the router's admission check: the recorder's, or a gate of its own.

        Either way the same rules (`SeqGate`) decide, so what is refocused and republished
        is exactly what the store takes (or would take, when raw frames are not recorded).
        """
        if self.recorder is not None:
            return self.recorder.admit_frame
        gate = SeqGate("raw", frame_shape, np.dtype(np.uint16), self.config.recorder.seq_window)
        return lambda message: gate.admit(message)[1]

    def _engine_files(self) -> dict[str, dict[str, str]]:
        """Path and SHA-256 of the model and measured PSF bank the stacks are made with.

        Recorded beside the config (which holds only paths): refocusing the run later through
        a bank that changed since would mix two PSFs' planes, so `live.refocus` checks it.
        """
        engine = self.config.engine
        files = {"model": engine.resolved_model_path()}
        if engine.psf_bank is not None:
            files["psf_bank"] = engine.psf_bank
        out: dict[str, dict[str, str]] = {}
        for role, path in files.items():
            try:
                out[role] = {"path": str(path), "sha256": file_sha256(path)}
            except OSError as exc:  # loaded a moment ago; the recording matters more than this
                log.warning("cannot hash the %s %s for the run's record: %s", role, path, exc)
        return out

    def _open_recorder(self, plan: VolumePlan, surfaces: Any) -> Recorder:
        """Make the run's `Recorder` (it creates the store and holds its lock while it records)."""
        rc, src = self.config.recorder, self.config.source
        assert self.store is not None  # _start_recorder returns first without one
        return Recorder(
            self.store,
            frame_shape=(int(src.frame_shape[0]), int(src.frame_shape[1])),
            pixel_size_um=float(src.pixel_size_um),
            rate_hz=replay_rate_hz(self.config),
            planes_um=None if plan.z_um is None else list(plan.z_um),
            surfaces=None if plan.z_um is not None else [s.name for s in surfaces or []],
            dpms_um=None if plan.z_um is not None else plan.dpms_um,
            config=self.config.model_dump(mode="json"),
            engine_files=self._engine_files(),
            keep_raw=self.config.records_raw,
            keep_stacks=rc.keep_stacks,
            frames_per_chunk=rc.frames_per_chunk,
            stack_dtype=rc.stack_dtype,
            shard_s=rc.shard_s,
            compression=rc.compression,
            min_free_mb=rc.min_free_mb,
            max_backlog_mb=rc.max_backlog_mb,
            seq_window=rc.seq_window,
            supervisor=self.supervisor,
        )

    def _start_recorder(self, plan: VolumePlan) -> None:
        """Open the run's OME-Zarr store (when recording is enabled)."""
        rc = self.config.recorder
        if not rc.enabled or self.store is None:
            return
        surfaces = self.config.planes.surfaces  # a surface plan is recorded as surfaces + DPMs
        try:
            self.recorder = self._open_recorder(plan, surfaces)
        except StoreLocked as exc:  # an offline job writing a store at the output's path
            raise ConfigError(str(exc)) from None
        except OSError as exc:  # a disk too full for the store's first files (and its reserve)
            raise ConfigError(
                f"cannot create the store {self.store}: {exc.strerror or exc} (nothing was "
                "left there; free space, or another recorder.path)"
            ) from None
        print(f"recording to {self.recorder.path}", flush=True)
        free_mb = self.recorder.free_mb()
        if free_mb is None:  # just created and already unreadable: its first write will say why
            return
        stops = low_space_stops(keep_raw=self.config.records_raw, keep_stacks=rc.keep_stacks)
        if free_mb < rc.min_free_mb:
            log.warning(
                "only %.0f MB free on %s, below recorder.min_free_mb = %d: %s (free space, or "
                "lower recorder.min_free_mb)",
                free_mb,
                self.recorder.path,
                rc.min_free_mb,
                stops,
            )
        elif _disk_low(free_mb, rc.min_free_mb):
            log.warning(
                "only %.0f MB free on %s, near recorder.min_free_mb = %d: %s",
                free_mb,
                self.recorder.path,
                rc.min_free_mb,
                stops,
            )

    def _spawn(self, i: int) -> None:
        """Start worker `i` (its "ready" event marks it in the ledger)."""
        spec = WorkerSpec(
            worker_id=i,
            frames_endpoint=self._worker_endpoints[i],
            stacks_endpoint=self._stacks_in,
            events_endpoint=self._events,
            credits_endpoint=self._credits,
            config=self.config.model_dump(mode="json"),
            plan_sha256=self._plan_sha256,
        )
        proc = self._mp.Process(
            target=worker_main, args=(spec, self._worker_stop), name=f"deepz-worker-{i}"
        )
        proc.start()
        self._procs[i] = proc
        self._spawned_s[i] = time.monotonic()

    def _wait_ready(self) -> None:
        """Wait until every worker has loaded its backend; fail if one dies first.

        A stop asked for meanwhile (Ctrl-C while a model loads) ends the wait at once.
        """
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(self.ledger.ready_workers()) < self.n_workers:
            with self.collector.event_arrived:  # a worker that failed says why before it exits
                failed = [e for e in self.collector.events if e.get("event") == "error"]
            if failed:
                raise RuntimeError(
                    f"worker {failed[0]['worker']} failed while starting: "
                    f"{failed[0].get('message')}"
                )
            for i, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive():
                    raise RuntimeError(f"worker {i} exited (code {proc.exitcode}) while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {_READY_TIMEOUT_S:.0f} s")
            if self.stop_requested.wait(0.05):
                return

    def _start_display(self) -> None:
        """Start the optional viewer as its own process (it may drop stacks)."""
        if not self.config.display.enabled:
            return
        cfg = self.config
        try:  # bound to a wildcard, the viewer connects to loopback (review 73: it exited)
            endpoint = connect_address(cfg.endpoints.stacks)
        except ValueError as exc:
            log.error("the viewer (live.display) is not started: %s", exc)
            return
        shape = (self._n_planes, *cfg.source.frame_shape)
        command = [
            sys.executable,
            "-m",
            "live.display",
            "--endpoint",
            endpoint,
            "--max-fps",
            str(cfg.display.max_fps),
            "--max-message-bytes",
            str(max_part_bytes(shape, cfg.recorder.stack_dtype)),
        ]
        sec = cfg.security
        if "stacks" in cfg.curve_endpoints() and sec.client_key and sec.server_public_key:
            command += ["--client-key", str(sec.client_key)]
            command += ["--server-key", str(sec.server_public_key)]
        self._display = subprocess.Popen(command)

    def _check_display(self) -> None:
        """Say once when the viewer's process has ended on its own (the run goes on without it).

        A viewer that cannot open a window (no display on a headless machine, napari missing)
        ends at once; its own lines say why, and the daemon's log says that it happened.
        """
        if self._display is None or self._display_ended:
            return
        code = self._display.poll()
        if code is not None:
            self._display_ended = True
            (log.info if code == 0 else log.error)(
                "the viewer (live.display) ended with exit code %d; the run goes on without it "
                "(recording is unaffected)",
                code,
            )

    def _start_source(self) -> None:
        """Start the configured source on its own thread, sending to the router in-process.

        The source's frames take an inproc socket to the router (no TCP hop, no keys: it is
        this process), and its `live.protocol.END_OF_FRAMES` after the last frame tells the
        router that everything it sent has arrived.
        """
        if self.source_mode is None:
            return
        from live.hook import FrameSender
        from live.sources import SourceFailed, make_source

        source = self._source if self._source is not None else make_source(self.config)
        hwm = self._bound("source", "router") or 1
        self._sender = FrameSender(self._source_endpoint, context=self._ctx, hwm=hwm)

        def run_source() -> None:
            with self.supervisor.watch("source"):
                try:
                    self._source_summary = source.run(self._sender, self._source_stop)
                except SourceFailed as err:  # what it sent and dropped up to then still counts
                    self._source_summary = err.summary
                    raise

        self._source_thread = threading.Thread(target=run_source, name="source", daemon=True)
        self._source_thread.start()

    # -- supervise ---------------------------------------------------------------------

    def _mark_running(self) -> None:
        """Enter RUNNING once acquisition begins: the run clock starts then, not before.

        The daemon's own source sets `FrameSender.acquiring` when its set-up (pre-rendering
        simulator frames, loading a Micro-Manager configuration) is done; a daemon that only
        listens for a hook is acquiring as soon as it listens. A source still setting up after
        `_READY_TIMEOUT_S` starts the clock anyway, with a warning, so ``--duration`` ends.
        """
        if self._running_since is not None:
            return
        now = time.monotonic()
        if self._sender is not None and not self._sender.acquiring.is_set():
            if now - self._started_s < _READY_TIMEOUT_S:
                return
            log.warning(
                "the source has not begun acquiring after %.0f s of set-up; the run clock "
                "starts now",
                _READY_TIMEOUT_S,
            )
        self._running_since = now
        self.metrics.set_run_info(state=RunState.RUNNING)

    def supervise(self, duration_s: float | None = None, *, quiet: bool = False) -> None:
        """Print status each second and restart dead workers until duration, source end or stop.

        `duration_s` counts from now, or from when acquisition begins if the source is still
        setting up (its set-up is not part of the run's duration).
        """
        t_end: float | None = None
        next_status = time.monotonic() + 1.0
        running = self._running_since is not None
        while not self.stop_requested.is_set():
            self._mark_running()
            if not running and self._running_since is not None:  # acquisition began just now
                running, next_status = True, self._running_since + 1.0
            if t_end is None and duration_s is not None and running:
                t_end = time.monotonic() + duration_s
            if t_end is not None and time.monotonic() >= t_end:
                if self.finish_reason is FinishReason.STOPPED:  # a failure or signal keeps its own
                    self.finish_reason = FinishReason.DURATION
                    self.finish_detail = f"{duration_s:g} s"
                break
            if self._source_thread is not None and not self._source_thread.is_alive():
                if self.finish_reason is FinishReason.STOPPED:
                    self.finish_reason = FinishReason.SOURCE_FINISHED
                break
            self.check_workers()
            self._check_display()
            if (now := time.monotonic()) >= next_status:
                # on the second's grid, but never a burst to catch up after a stall (a slow
                # check_workers): rates over a few ms would spike in the status
                next_status = max(next_status + 1.0, now + 0.5)
                with self.supervisor.watch("status publisher"):
                    snap = self._snapshot()
                    if self._status is not None:
                        self._status.publish(snap)
                    if not quiet and self._running_since is not None:  # not while setting up
                        print(snap.status_line(), flush=True)
            self.stop_requested.wait(0.05)

    def finish(self, reason: FinishReason, detail: str = "") -> None:
        """Record why the run ends (the first reason given wins) and ask it to stop."""
        if self.finish_reason is FinishReason.STOPPED:
            self.finish_reason, self.finish_detail = reason, detail
        self.stop_requested.set()

    def _on_failure(self, failure: Failure) -> None:
        """Supervisor hook (the failing thread): stop the run, mark the store incomplete."""
        if self.failure is None:
            self.failure = failure
            self.finish_reason, self.finish_detail = FinishReason.FAILED, failure.reason()
        if self.recorder is not None:
            self.recorder.mark_incomplete(failure.reason())
        self.stop_requested.set()

    def fail(self, reason: FinishReason, detail: str) -> None:
        """Record that the run failed or was refused outside the supervised threads."""
        self.finish_reason, self.finish_detail = reason, detail
        if self.recorder is not None:
            self.recorder.mark_incomplete(f"{reason}: {detail}")

    def check_workers(self) -> None:
        """Restart any worker that died, counting the frames it held as lost.

        A worker that dies again soon after its start is restarted after a wait that grows
        (`RESTART_BACKOFF_S`); meanwhile the router skips frames for want of its credits.
        """
        now = time.monotonic()
        for i, proc in enumerate(self._procs):
            if proc is None or proc.is_alive() or self._worker_stop.is_set():
                continue
            if self._respawn_at[i] is None:  # found dead just now
                self.ledger.set_ready(i, False)
                lost = self.ledger.take(i)
                self.metrics.lose(lost)
                quick = now - self._spawned_s[i] < _STABLE_S
                self._quick_deaths[i] = self._quick_deaths[i] + 1 if quick else 1
                steps = RESTART_BACKOFF_S
                wait = steps[min(self._quick_deaths[i] - 1, len(steps) - 1)]
                self._respawn_at[i] = now + wait
                log.error(
                    "worker %d died (exit code %s); %d frames lost (seqs %s); restarting it%s",
                    i,
                    proc.exitcode,
                    len(lost),
                    format_seqs(lost),
                    f" in {wait:g} s (it died {self._quick_deaths[i]} times in a row)"
                    if wait
                    else "",
                )
            respawn_at = self._respawn_at[i]
            if respawn_at is not None and now >= respawn_at:
                self.metrics.restart()
                self._respawn_at[i] = None
                self._spawn(i)

    def _snapshot(self) -> Snapshot:
        """Sample gauges into the metrics and take a snapshot."""
        rec = self.recorder
        raw, stacks = rec.counts() if rec is not None else (0, 0)
        free_mb = rec.free_mb() if rec is not None else None
        self.metrics.set_gauges(
            queue_depth=self.ledger.outstanding() + self._router_waiting(),
            recorder_backlog=rec.backlog if rec is not None else 0,
            raw_recorded=raw,
            stacks_recorded=stacks,
            disk_free_mb=free_mb,
            disk_low=free_mb is not None and _disk_low(free_mb, self.config.recorder.min_free_mb),
        )
        return self.metrics.snapshot()

    def _router_waiting(self) -> int:
        """Frames in the router's inference queue (0 before the router exists)."""
        return self.router.waiting if hasattr(self, "router") else 0

    def worker_pids(self) -> list[int | None]:
        """Return the process ids of the workers (for supervision tests)."""
        return [p.pid if p is not None else None for p in self._procs]

    # -- stop --------------------------------------------------------------------------

    def stop(self, worker_timeout_s: float = 60.0) -> RunSummary:
        """Stop in order, each part after the end marker of the one before it.

        Source (joined; its end marker follows its last frame) → router (drains up to the
        marker, then queues the marker behind each worker's last frame) → workers (refocus
        what they hold, then send "done" and their end marker; joined) → collector (ends on
        the markers of the workers that exited cleanly) → recorder (drains and finalises).
        No sleeps: every wait is a join or a marker, with a timeout that is logged.
        """
        if self._summary is not None:
            return self._summary
        self.stop_requested.set()  # (a duration or a source's end breaks the loop without it)
        self.metrics.set_run_info(state=RunState.STOPPING)
        self._source_stop.set()
        if self._source_thread is not None:
            self._source_thread.join(10.0)
            if self._source_thread.is_alive():
                log.error("the source did not stop within 10 s; ending without its last frames")
                self.source_hung = True
        mmcore = sys.modules.get("live._mmcore")  # loaded only when a core was
        if mmcore is not None and self.config.source.kind == "micromanager":
            mm = self.config.source.micromanager  # its core, loaded for the geometry, unclaimed
            mmcore.release_parked(mm.config_file, mm.camera)
        if self._sender is not None:
            router_alive = hasattr(self, "router") and self.router.is_alive()
            if router_alive and not self._sender.end_stream():
                log.error("the source's end-of-frames marker could not be queued")
                self.router.source_ended.set()
            self._sender.close()
        elif hasattr(self, "router"):
            self.router.source_ended.set()  # no own source (external hook, or start failed)
        router_done = self._stop_router()
        # a start that failed part way may have made the router or collector and not started
        # it: such a thread is not joined, and its sockets go with the context (`_finish`)
        router_ran = hasattr(self, "router") and self.router.ident is not None
        if router_done and router_ran:
            gone = [i for i, p in enumerate(self._procs) if p is None or not p.is_alive()]
            unreachable = self.router.end_workers(skip=gone)
            if unreachable:  # those end once their pipe is empty (see live.worker)
                log.error("workers %s did not take the end-of-frames marker", unreachable)
                self._worker_stop.set()
        else:
            self._worker_stop.set()
        clean = set()
        deadline = time.monotonic() + worker_timeout_s  # one wait for all: not N in a row
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %d did not finish in %.0f s: killing it", i, worker_timeout_s)
                proc.kill()  # (workers ignore SIGTERM: see live.worker.worker_main)
                proc.join(5.0)
            elif proc.exitcode == 0:
                clean.add(i)
            else:  # killed (OOM, SIGKILL) or failed while draining: its frames are lost below
                log.error("worker %d ended with exit code %s while draining", i, proc.exitcode)
        self._worker_stop.set()
        if router_done and router_ran:  # a running router owns its sockets
            self.router.close_worker_sockets()
        if hasattr(self, "collector") and self.collector.ident is not None:
            self.collector.finish(clean)
            self.collector.join(30.0)
            if self.collector.missing:
                log.error("no end marker from workers %s", self.collector.missing)
        for i in range(self.n_workers):
            unfinished = self.ledger.take(i)
            if unfinished:
                log.error(
                    "%d frames unfinished at shutdown (seqs %s)",
                    len(unfinished),
                    format_seqs(unfinished),
                )
                self.metrics.lose(unfinished)
        self._summary = self._finish()
        return self._summary

    def _stop_router(self, limit_s: float = 600.0) -> bool:
        """Stop the router and wait while it refocuses what waits; True once it has ended.

        Frames already admitted keep their workers busy for a while under ``every_frame``
        (up to ``max_queue_frames`` inferences): the wait is a join per second, marking dead
        workers not ready so the router skips instead of waiting for their credits (it also
        gives up on waiting frames after `live.router.STALL_S` without a credit).
        """
        if not hasattr(self, "router"):
            return True
        self.router.stop_event.set()
        deadline = time.monotonic() + limit_s
        while self.router.is_alive() and time.monotonic() < deadline:
            self.router.join(1.0)
            for i, proc in enumerate(self._procs):
                if proc is not None and not proc.is_alive():
                    self.ledger.set_ready(i, False)
        if self.router.is_alive():
            log.error("the router did not stop within %.0f s; its sockets are left open", limit_s)
            return False
        return True

    def _served_by(self) -> str:
        """Return the backend the workers loaded, as their "ready" events said it.

        Else the one chosen at start: without the pre-flight that is only the first installed
        of ``engine.backends``, which a worker may have failed to load and fallen back from.
        """
        if hasattr(self, "collector"):
            ready = {
                f"{e.get('backend')} on {e.get('device')}"
                for e in self.collector.events
                if e.get("event") == "ready"
            }
            if ready:
                return "; ".join(sorted(ready))
        return self.backend_name

    def _worker_times(self) -> list[dict[str, Any]]:
        """Return what each worker reported with "done" (its last one): stage times and counts."""
        if not hasattr(self, "collector"):
            return []
        keys = [*StageTimes.field_names(WORKER_STAGES), *_WORKER_COUNTS]
        last: dict[int, dict[str, Any]] = {}
        for event in self.collector.events:
            if event.get("event") == "done":
                last[int(event["worker"])] = {
                    "worker": int(event["worker"]),
                    **{k: event.get(k) for k in keys},
                }
        return [last[w] for w in sorted(last)]

    def _finish(self) -> RunSummary:
        """Publish the last status, close the recorder, display and sockets; build the summary."""
        snap = self._snapshot()
        if self._status is not None:
            with self.supervisor.watch("status publisher"):  # before the store is finalised
                self._status.publish(snap)
        rec: RecorderSummary | None = None
        if self.recorder is not None:  # the store stays the recorder's until the summary is in
            rec = self.recorder.close(keep_lock=True, stall_s=self.config.recorder.stall_s)
        source = _as_dict(self._source_summary)
        summary = RunSummary(
            frames_acquired=_frames_acquired(source, snap.frames_in + snap.malformed),
            frames_in=snap.frames_in,
            raw_recorded=rec.raw_frames if rec is not None else 0,
            stacks_written=rec.stacks if rec is not None else 0,
            skipped=self.metrics.skipped_seqs(),
            lost=self.metrics.lost_seqs(),
            focus_clamped=self.metrics.clamped_seqs(),
            malformed=snap.malformed,
            worker_restarts=snap.worker_restarts,
            latency_p50_ms=snap.latency_p50_ms,
            latency_p99_ms=snap.latency_p99_ms,
            backend=self._served_by(),
            output=str(self.recorder.path) if self.recorder is not None else None,
            source=source,
            recorder=asdict(rec) if rec is not None else {},
            finish_reason=self.finish_reason,
            finish_detail=self.finish_detail,
            rejected=snap.rejected,
            failures=[f.reason() for f in self.supervisor.failures],
            auth_denied=self._gatekeeper.denied if self._gatekeeper is not None else 0,
            stacks_refocused=snap.stacks_out,
            worker_times=self._worker_times(),
        )
        if self.recorder is not None and self.recorder.stuck:  # its disk would hang these too
            log.error("run summary and preview not written: the recorder's disk is not answering")
        elif self.recorder is not None:
            try:
                preview = _write_preview_png(self.recorder.path, self.metrics, summary)
                summary = replace(summary, preview=str(preview) if preview else None)
                self.recorder.add_run_summary(_jsonable(asdict(summary)))
            finally:
                self.recorder.release()
        if self._display is not None:
            self._display.terminate()
        self.metrics.set_run_info(state=RunState.FINISHED)
        if self._status is not None:
            with self.supervisor.watch("status publisher"):
                self._status.publish(self._snapshot())
            self._status.close(linger_ms=200)  # so status readers hear "finished"
        if self._gatekeeper is not None:
            self._gatekeeper.stop()
        started = all(
            hasattr(self, name) and getattr(self, name).ident is not None
            for name in ("router", "collector")
        )
        if not started or self.router.is_alive():
            # a stuck router thread, or sockets of a start that failed part way (made and
            # never run), must not hold the exit: term() would wait for them for ever
            self._ctx.destroy(linger=0)
        else:
            self._ctx.term()
        self._tmp.cleanup()
        return summary


_IPC_PATH_MAX: int = getattr(zmq, "IPC_PATH_MAX_LEN", 107)
"""Longest ipc socket path the OS takes (Linux: 107 characters, ``sockaddr_un.sun_path``)."""


@contextmanager
def _binding(what: str) -> Iterator[None]:
    """Turn a socket that cannot bind into a one-line config error naming `what`.

    A port in use or a missing ipc folder: `what` names the endpoints the daemon was asked to
    bind, so the user sees which config key to change.
    """
    try:
        yield
    except zmq.ZMQError as err:
        raise ConfigError(f"cannot bind {what}: {err}") from err


def format_wiring(edges: tuple[Edge, ...]) -> str:
    """Render `compose`'s edges as an aligned text table."""
    rows = [("from", "to", "what", "transport", "bound", "when full")]
    rows += [
        (e.source, e.target, e.what, e.transport, str(e.bound or "-"), e.policy) for e in edges
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
        for r in rows
    )


def _write_preview_png(store: Path, metrics: Metrics, summary: RunSummary) -> Path | None:
    """Write ``RUN.preview.png`` beside the store; a failure is one warning, never the run's."""
    try:
        from live.preview import write_preview

        return write_preview(store, latency=metrics.latency_series(), summary_lines=summary.lines())
    except Exception as err:  # a missing matplotlib or a drawing bug never fails the run
        log.warning("no run preview: %s", _one_line(err))
        return None


def _as_dict(value: Any) -> dict[str, Any]:
    """Return a source summary as a plain dict (dataclass, pydantic model, dict or None)."""
    if value is None:
        return {}
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    elif hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, dict):
        result: dict[str, Any] = _jsonable(value)
        return result
    return {"summary": repr(value)}


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON (paths and odd types become strings, `SeqRuns` their runs)."""

    def default(v: Any) -> Any:
        return [list(r) for r in v.runs] if isinstance(v, SeqRuns) else str(v)

    return json.loads(json.dumps(value, default=default))


def _frames_acquired(source: dict[str, Any], received: int) -> int | None:
    """Frames the source acquired, from its summary when it says, else what arrived.

    A source that only listened for a hook's frames (``external``) acquired none itself: the
    frames that arrived are what is known of the acquisition.
    """
    if source.get("external"):
        return received
    if isinstance(source.get("frames_sent"), int):
        return int(source["frames_sent"]) + int(source.get("frames_dropped") or 0)
    return received if not source else None


def _open_checked(config: ScopeConfig) -> Any:
    """Open the configured backend; a model that cannot be loaded is a one-line `ConfigError`."""
    try:
        return open_backend(config)
    except Exception as err:  # any loader's error: a corrupt file, a wrong format, ...
        path = config.engine.resolved_model_path()
        why = _one_line(err)
        why = why if len(why) <= 600 else why[:599] + "…"  # every backend's reason, joined
        raise ConfigError(f"engine.model_path {path}: the model cannot be loaded: {why}") from err


def _check_planes(config: ScopeConfig, backend: Any, plan: VolumePlan) -> None:
    """Refuse planes (the run's `plan`) the model cannot serve, before anything starts.

    Every DPM must be finite. A per-plane model's planes must lie in its trained dz range
    unless ``engine.allow_extrapolation``; a volume model's within its depth grid, always: it
    renders only there, so the flag cannot widen it (before, the flag skipped the check and
    the pre-flight's first call died with a traceback).
    """
    metadata = getattr(backend, "metadata", None)
    if metadata is None:
        return
    from engine.dpm import DPMError
    from engine.runtime import depth_limits

    frame_shape = (int(config.source.frame_shape[0]), int(config.source.frame_shape[1]))
    volume = metadata.volume is not None
    # extrapolating, a per-plane model's range is the runtime's to refuse, frame by frame
    allow = config.engine.allow_extrapolation and not volume
    hint = (
        " (a volume model renders only within its depth grid)"
        if volume
        else " (engine.allow_extrapolation in the config)"
    )
    try:
        plan.validate(frame_shape, depth_limits(metadata), allow_extrapolation=allow)
    except DPMError as err:
        raise ConfigError(f"planes: {_one_line(err)}{hint}") from None
    try:  # built here as each worker builds it: a lock it cannot make would end every worker
        focus_lock(config, plan, backend)
    except DPMError as err:
        raise ConfigError(f"planes.focus_lock_um: {_one_line(err)}") from None


def _check_endpoints_free(config: ScopeConfig) -> None:
    """Refuse, before anything is created, an endpoint the daemon could not bind.

    Each tcp port is bound and released once with a plain socket (closed synchronously, unlike
    a ZeroMQ socket, so the daemon's own bind right after cannot race it): "address in use"
    (typically a second daemon with the same config), an address that is not this machine's,
    or a host that neither resolves nor names a network interface (ZeroMQ binds to interface
    names too) becomes one `ConfigError` naming the key. An ipc endpoint needs its folder, must
    not be a folder itself, and fits a Unix socket's path (`_IPC_PATH_MAX`). Found here, the
    store is never created for a run that cannot start (review 87: an empty store and the
    error twice).
    """
    for name, address in config.endpoints.items():
        problem = _tcp_problem(address) if address.startswith("tcp://") else None
        if address.startswith("ipc://"):
            problem = _ipc_problem(Path(address[len("ipc://") :]))
        if problem is not None:
            raise ConfigError(f"endpoints.{name} = {address!r} cannot be bound: {problem}")


def _tcp_problem(address: str) -> str | None:
    """Return why a tcp endpoint cannot be bound here, or None (see `_check_endpoints_free`)."""
    host, _, port = address[len("tcp://") :].rpartition(":")
    v6 = host.startswith("[")  # ZeroMQ binds IPv4 unless the host is an IPv6 literal
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    family = socket.AF_INET6 if v6 else socket.AF_INET
    try:
        where = socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM)[0][4]
    except ValueError:  # a port that is not a number (ZeroMQ's "*"): nothing to probe
        return None
    except OSError:
        if host in {interface for _, interface in socket.if_nameindex()}:
            return None  # an interface name: ZeroMQ binds to its address
        return f"the host {host!r} does not resolve and is no network interface of this machine"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ does
            probe.bind(where)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return (
                f"{err.strerror}: another daemon may be running with this config; stop it or "
                "choose other endpoints"
            )
        if err.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine"
        return str(err.strerror or err)
    return None


def _ipc_problem(path: Path) -> str | None:
    """Return why an ipc endpoint's socket file cannot be made at `path`, or None."""
    if len(os.fsencode(path)) > _IPC_PATH_MAX:  # the OS counts bytes
        return f"the path is {len(os.fsencode(path))} bytes, over a Unix socket's {_IPC_PATH_MAX}"
    if path.is_dir():
        return "the path is a folder"
    if not path.parent.is_dir():
        return f"its folder {str(path.parent)!r} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"its folder {str(path.parent)!r} is not writable"
    return None


def _check_optics(config: ScopeConfig, backend: Any) -> None:
    """Refuse (or warn about, by ``engine.optics_check``) a model trained at other optics."""
    metadata = getattr(backend, "metadata", None)
    message = check_optics(config, metadata) if metadata is not None else None
    if message is None:
        return
    if config.engine.optics_check == "refuse":
        raise ConfigError(message)
    log.warning("%s", message)


def _disk_low(free_mb: float, min_free_mb: float) -> bool:
    """Whether free space is below twice ``recorder.min_free_mb`` (warned about, and shown)."""
    return min_free_mb > 0 and free_mb < 2 * min_free_mb


def _one_line(err: BaseException) -> str:
    """Collapse an exception message to one line."""
    return " ".join(str(err).split())


_EXAMPLES = """\
examples:
  python -m live.run --scope config.toml --duration 20     simulated scope, 20 s, then a summary
  python -m live.run --scope config.toml --output runs/a.ome.zarr
  python -m live.run --scope config.toml --wiring          the edges, bounds and overflow policies
  python -m live.status_client --scope config.toml         a running daemon's status, each second

exit codes: 0 done, 1 a part failed (the store says why), 2 refused at start (one line),
3 --require-fit and the pre-flight says rate x planes does not fit, 4 the run ended but its
recording is incomplete (a full or failed disk; the summary and the store say why).
"""


def main(argv: list[str] | None = None) -> int:
    """Run the daemon from the command line; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m live.run",
        description="Run the live Deep-Z daemon: frames in, virtual volumes out, both recorded.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scope", required=True, type=Path, help="the run's config.toml")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds to run (default: until the source ends or SIGINT/SIGTERM)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="OME-Zarr store (*.zarr) or a folder for one (default recorder.path)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--wiring",
        action="store_true",
        help="print the daemon's edges (bounds and overflow policies) for this config and exit",
    )
    parser.add_argument(
        "--require-fit",
        action="store_true",
        help="exit with code 3 when the pre-flight says rate × planes does not fit",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # a library that lowers the root level later
        handler.setLevel(logging.INFO)  # (pymmcore-plus does) must not flood the console
    # pymmcore-plus sets its own logger to DEBUG; its device chatter drowns the status lines.
    logging.getLogger("pymmcore-plus").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font search chatter (preview)
    # the daemon says once which backend runs and why (its "backend:" and pre-flight lines)
    logging.getLogger("engine.runtime").setLevel(logging.WARNING)
    try:
        from live.config import load_config

        config = load_config(args.scope)
    except (OSError, ValueError) as err:
        # ConfigError already names the file; several problems come one per line
        text = str(err) if isinstance(err, ConfigError) else f"{args.scope}: {_one_line(err)}"
        print(f"error: bad config: {text}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"error: --workers must be 1 … {MAX_WORKERS}, got {args.workers}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        print(
            f"error: --duration must be a number of seconds > 0, got {args.duration}",
            file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
    if args.wiring:
        print(format_wiring(compose(config, args.workers)))
        return 0
    return run(
        config,
        duration_s=args.duration,
        output=args.output,
        workers=args.workers,
        require_fit=args.require_fit,
    )


def run(
    config: ScopeConfig,
    *,
    duration_s: float | None,
    output: Path | None,
    workers: int,
    require_fit: bool = False,
) -> int:
    """Run one daemon with SIGINT/SIGTERM wired to a clean stop; print the summary.

    The first signal stops the run in order: frames already admitted are refocused and
    recorded. A signal while it stops puts the default handlers back, so one more ends the
    process at once (what was still draining is lost; the store says it is incomplete).
    Exit codes: 0 done, `EXIT_FAILED` a part failed, `EXIT_BAD_CONFIG` refused at start,
    `EXIT_NO_FIT` the pre-flight does not fit under `require_fit`, `EXIT_INCOMPLETE` the
    run ended but its recording did not keep everything (the summary and the store say why).
    """
    daemon = Daemon(config, output=output, workers=workers, require_fit=require_fit)
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if daemon.stop_requested.is_set():  # impatient: the next signal is not handled
            for s in signals:
                signal.signal(s, signal.SIG_DFL)
            log.warning(
                "%s while stopping: the run still stops in order (it refocuses and records "
                "what was admitted); signal once more to end at once and lose that",
                name,
            )
            return
        daemon.finish(FinishReason(name))

    # before check(): loading a Micro-Manager core there can take a while, and a Ctrl-C then
    # must stop the run, not raise KeyboardInterrupt past stop() (which removes the ipc folder)
    previous = {s: signal.signal(s, on_signal) for s in signals}
    code = 0
    try:
        try:
            daemon.check()
        except ConfigError as err:  # refused before anything started: one line, nothing to stop
            print(f"error: {_one_line(err)}", file=sys.stderr)
            daemon.stop()
            return EXIT_BAD_CONFIG
        except BaseException:
            daemon.stop()
            raise
        try:
            daemon.start()
            if daemon.finish_reason is FinishReason.NO_FIT:
                code = EXIT_NO_FIT
            else:
                daemon.supervise(duration_s)
        except ConfigError as err:  # found while starting (e.g. the model): one line
            print(f"error: {_one_line(err)}", file=sys.stderr)
            daemon.fail(FinishReason.REFUSED, _one_line(err))
            code = EXIT_BAD_CONFIG
        except Exception as err:
            log.exception("daemon failed")
            daemon.fail(FinishReason.FAILED, _one_line(err))
            code = EXIT_FAILED
        finally:
            summary = daemon.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if (daemon.failure is not None or daemon.source_hung) and code == 0:
        code = EXIT_FAILED
    if code == 0 and summary.recording_incomplete:
        code = EXIT_INCOMPLETE
    if code != EXIT_BAD_CONFIG:
        print("\n".join(summary.lines()), flush=True)
    exit_if_hung(daemon.recorder, code, source_hung=daemon.source_hung)
    return code


def exit_if_hung(recorder: Recorder | None, code: int, *, source_hung: bool = False) -> None:
    """End the process now, with `code`, when a disk never answered (a write or a read).

    The recorder's write (`Recorder.stuck`) or the source's read (`Daemon.source_hung`): such a
    call holds one of zarr's I/O threads, and Python joins those at exit: the process
    would never end. Everything worth saying has been said (the summary is printed first).
    """
    if recorder is not None and recorder.stuck:
        log.error("exiting now: the recorder's disk is not answering (a write never returned)")
    elif source_hung:
        log.error("exiting now: the source is stuck in a read that never returned (a hung disk?)")
    else:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
