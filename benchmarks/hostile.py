"""Issue 10: the live daemon under hostile input, and killed piece by piece.

``python -m benchmarks.hostile [--messages N] [--kill] [--results PATH]``

The real daemon (``python -m live.run`` in its own process, so its memory is its own) runs the
simulated scope on loopback while this process sends N fuzzed messages to its frames endpoint:
arbitrary bytes, mutated valid headers, the kinds that once escaped the decoder (JSON nested
``[`` × 50,000, 30,000-digit integers, 400-digit timestamps and focus values, 3,000-digit shape
dims), headers with bad fields, frames of the wrong shape or of values that do not fit uint16,
forged duplicates of seqs the daemon already recorded, and seqs far beyond the window. Every
message's fate is predicted here before it is sent (the same `live.protocol.decode` plus the
recorder's rules), and at the end the daemon's own counters (malformed, rejected by kind,
frames in) must match the prediction exactly; the daemon must be alive, every genuine camera
frame must be in the store exactly once and bit-identical to the camera's (the simulated
camera's frames are reproducible by seq: `live.sources.SimulatedScope`'s frame bank is
rendered again here), and the daemon's RSS (``/proc/PID/status`` VmRSS) must grow by less than
`RSS_LIMIT_MB`.

With ``--kill`` three further short runs kill one part each while the fuzzer runs: a worker
process (SIGKILL; the daemon restarts it and counts its frames as lost), the recorder's writer
thread (an injected exception, the only way to kill one thread; the daemon stops with exit 1),
and the daemon itself (SIGKILL). After each, the store is reopened and must say truthfully
whether it is complete and which frames it holds.

A table goes to stdout and JSON to ``benchmarks/results/hostile.json`` (CPU model from lscpu,
date, load average: the figures of a shared machine vary).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zmq

from benchmarks.machine import cpu_model, write_results
from live.protocol import MAX_SEQ, ProtocolError, decode, encode_frame, max_part_bytes

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "hostile.json"
RSS_LIMIT_MB = 50.0
"""Largest growth of the daemon's resident memory the benchmark accepts (peak - start, MiB)."""
KINDS = (
    "random_bytes",
    "mutated_header",
    "deep_nesting",
    "huge_int",
    "long_number",
    "huge_dims",
    "bad_fields",
    "wrong_shape",
    "wrong_dtype",
    "duplicate",
    "far_ahead",
)
"""What the fuzzer sends, in equal shares (duplicates once the daemon has recorded a frame)."""
FAR_AHEAD = 2**40
"""Forged seqs start here: beyond any window of a genuine camera's seqs, so surely refused."""
OUTCOMES = ("malformed", "duplicate", "beyond_window", "wrong_shape", "wrong_dtype")
"""What the daemon must make of a fuzzed message (ZeroMQ-level drops are not sent here)."""
_READY_TIMEOUT_S = 180.0
_SETTLE_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------- messages


def _header(**fields: Any) -> bytes:
    """Return a frame header with `fields` over valid defaults, as compact JSON bytes."""
    base: dict[str, Any] = {
        "version": 1,
        "kind": "frame",
        "seq": FAR_AHEAD,
        "timestamp_s": 1.5,
        "shape": [8, 8],
        "dtype": "uint16",
        "focus_um": 0.0,
    }
    base.update(fields)
    return json.dumps(base, separators=(",", ":")).encode()


def _escaping(side: int) -> dict[str, list[list[bytes]]]:
    """Return the fixed messages that once made decoders raise other errors, by kind."""
    pixels = bytes(2 * side * side)
    seq30k = b"1" * 30_000
    return {
        "deep_nesting": [
            [b"[" * 50_000, pixels],
            [_header().replace(b'"shape":[8,8]', b'"shape":' + b"[" * 50_000), pixels],
            [b'{"a":' * 13_000, pixels],  # within MAXMSGSIZE (65,536 B), like all of these
        ],
        "huge_int": [
            [_header().replace(str(FAR_AHEAD).encode(), seq30k), pixels],
            [_header().replace(str(FAR_AHEAD).encode(), b"-" + seq30k), pixels],
        ],
        "long_number": [
            [_header().replace(b'"timestamp_s":1.5', b'"timestamp_s":' + b"9" * 400), pixels],
            [_header().replace(b'"focus_um":0.0', b'"focus_um":' + b"7" * 399 + b".5"), pixels],
            [_header().replace(b'"timestamp_s":1.5', b'"timestamp_s":1e' + b"9" * 400), pixels],
        ],
        "huge_dims": [
            [
                _header(shape=[side, side]).replace(b"[%d," % side, b"[" + b"3" * 3000 + b","),
                pixels,
            ],
            [_header().replace(b'"shape":[8,8]', b'"shape":[' + b"2" * 3000 + b",1]"), pixels],
        ],
        "bad_fields": [
            [_header(version=2), bytes(128)],
            [_header(dtype="complex64"), bytes(128)],
            [_header(kind="stack"), bytes(128)],
            [_header(seq=-1), bytes(128)],
            [_header(seq=MAX_SEQ + 1), bytes(128)],
            [_header(shape=[0, 8]), b""],
            [_header(extra=1), bytes(128)],
            [_header().replace(b'"timestamp_s":1.5', b'"timestamp_s":NaN'), bytes(128)],
            [_header().replace(b'"dtype":"uint16"', b'"dtype":"uint16\xff"'), bytes(128)],
            [_header(), bytes(127)],  # buffer one byte short
            [_header()],  # one part
            [_header(), bytes(128), b"third part"],
            [b"", b""],
        ],
    }


def classify(
    parts: list[bytes], frame_shape: tuple[int, int], seen: set[int], max_bytes: int
) -> str:
    """Predict what the daemon makes of `parts`: one of `OUTCOMES`, or ``"ambiguous"``.

    The same checks in the same order as the daemon's router and recorder gate: decode (a
    `ProtocolError`, or a stack on the frames endpoint, is malformed), then shape, then exact
    conversion to uint16, then the seq: a seq the daemon already recorded is a duplicate, one
    at or above `FAR_AHEAD` is beyond the window. Any other seq could be admitted and take a
    genuine frame's place: such a message is ``"ambiguous"`` and is not sent.
    """
    try:
        message = decode(parts, max_bytes=max_bytes)
    except ProtocolError:
        return "malformed"
    header = message.header
    if header.kind != "frame":
        return "malformed"
    if message.array.shape != frame_shape:
        return "wrong_shape"
    with np.errstate(invalid="ignore", over="ignore"):
        converted = message.array.astype(np.uint16)
    if not np.array_equal(converted, message.array):
        return "wrong_dtype"
    if header.seq in seen:
        return "duplicate"
    return "beyond_window" if header.seq >= FAR_AHEAD else "ambiguous"


def _mutate(raw: bytes, rng: np.random.Generator) -> bytes:
    """Apply 1-4 random byte edits (flip, insert, delete, swap in a JSON-ish character)."""
    data = bytearray(raw)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(0, max(1, len(data))))
        op = int(rng.integers(0, 4))
        if op == 0 and data:
            data[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            data.insert(i, int(rng.integers(0, 256)))
        elif op == 2 and data:
            del data[i]
        elif data:
            data[i] = b'0123456789[]{}",:-.eE '[int(rng.integers(0, 22))]
    return bytes(data)


@dataclass
class FuzzReport:
    """What the fuzzer sent, by kind and by predicted outcome."""

    sent: int = 0
    seconds: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)
    expected: dict[str, int] = field(default_factory=dict)
    withheld_ambiguous: int = 0
    oversized_dropped_by_zmq: int = 0
    undelivered: bool = False
    """Whether sending stopped early because the daemon took no more messages."""

    @property
    def expected_rejected(self) -> dict[str, int]:
        """Predicted rejections by kind (`live.recorder.REJECTIONS`), zero counts left out."""
        return {k: n for k, n in self.expected.items() if k != "malformed" and n}


class Fuzzer:
    """Sends fuzzed messages to the daemon's frames endpoint and predicts each one's fate.

    It listens to the daemon's raw republish endpoint to learn which seqs the daemon recorded
    (only those are forged as duplicates: a forged seq that the camera has yet to send would
    take the genuine frame's place, which no receiver can tell from the real one).
    """

    def __init__(self, frames: str, raw: str, frame_shape: tuple[int, int], seed: int = 0) -> None:
        self.frame_shape = frame_shape
        self.max_bytes = max_part_bytes(frame_shape)
        self.rng = np.random.default_rng(seed)
        self.seen: set[int] = set()
        self._seen_list: list[int] = []
        self.escaping = _escaping(frame_shape[0])
        self._fixed: dict[tuple[str, int], str] = {}  # outcomes of the fixed messages
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._frames_endpoint = frames
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.sndhwm = 1000
        self._push.sndtimeo = 10_000  # a daemon that stopped reading ends the fuzzing
        self._push.connect(frames)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 100
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(raw)

    def _learn(self) -> None:
        """Take the seqs the daemon republished since last time (its recorded frames)."""
        while self._sub.poll(0):
            seq = decode(self._sub.recv_multipart()).header.seq
            if seq not in self.seen:
                self.seen.add(seq)
                self._seen_list.append(seq)

    def wait_for_genuine(self, count: int = 1, timeout_s: float = 60.0) -> None:
        """Wait until the daemon has republished `count` genuine frames (`TimeoutError` if not).

        Counted in frames rather than waited in seconds: a daemon slow to warm up on a loaded
        machine is still warm (its models loaded, its buffers made) once frames flow.
        """
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the daemon republished {len(self.seen)} genuine frames in {timeout_s:g} s, "
                    f"{count} awaited"
                )
            if self._sub.poll(100):
                self._learn()

    def _make(self, kind: str) -> tuple[list[bytes], str | None]:
        """Build one message of `kind`; its outcome too when it is a fixed one (else None)."""
        if kind in self.escaping:
            options = self.escaping[kind]
            key = (kind, int(self.rng.integers(0, len(options))))
            if key not in self._fixed:
                self._fixed[key] = classify(
                    options[key[1]], self.frame_shape, self.seen, self.max_bytes
                )
            return options[key[1]], self._fixed[key]
        return self._random(kind), None

    def _random(self, kind: str) -> list[bytes]:
        """Build one message of a randomised `kind`."""
        rng, (h, w) = self.rng, self.frame_shape
        if kind == "random_bytes":
            n = int(rng.integers(1, 4))
            return [rng.bytes(int(rng.integers(0, 2049))) for _ in range(n)]
        if kind == "mutated_header":
            if rng.random() < 0.5:
                base = _header()
                pixels = rng.bytes(128)
            else:
                seq = int(rng.integers(FAR_AHEAD, 2**62))
                base = _header(seq=seq, shape=[h, w])
                pixels = rng.bytes(2 * h * w)
            return [_mutate(base, rng), pixels]
        if kind == "wrong_shape":
            shape = [(h // 2, w), (h, w + 1), (1, 1), (w, h + 3)][int(rng.integers(0, 4))]
            image = rng.integers(0, 2**16, shape, dtype=np.uint16)
            return self._encode(image, int(rng.integers(0, 2**31)))
        if kind == "wrong_dtype":
            values = [np.float32(1e9), np.int32(-5), np.float32(0.5)][int(rng.integers(0, 3))]
            return self._encode(np.full((h, w), values), int(rng.integers(0, 2**31)))
        image = rng.integers(0, 2**16, (h, w), dtype=np.uint16)
        if kind == "duplicate":
            seq = self._seen_list[int(rng.integers(0, len(self._seen_list)))]
        else:  # far_ahead
            seq = MAX_SEQ if rng.random() < 0.05 else int(rng.integers(FAR_AHEAD, 2**62))
        return self._encode(image, seq)

    @staticmethod
    def _encode(image: np.ndarray, seq: int) -> list[bytes]:
        return [bytes(p) for p in encode_frame(image, seq=seq, timestamp_s=time.time())]

    def run(self, n: int, *, oversized_every: int = 0) -> FuzzReport:
        """Send `n` messages (plus one oversized part every `oversized_every`; 0: none)."""
        report = FuzzReport(expected=dict.fromkeys(OUTCOMES, 0))
        by_kind: Counter[str] = Counter()
        t0 = time.perf_counter()
        while report.sent < n:
            if report.sent % 64 == 0:
                self._learn()
            kinds = KINDS if self.seen else tuple(k for k in KINDS if k != "duplicate")
            kind = kinds[int(self.rng.integers(0, len(kinds)))]
            parts, outcome = self._make(kind)
            if outcome is None:
                outcome = classify(parts, self.frame_shape, self.seen, self.max_bytes)
            if outcome == "ambiguous":
                report.withheld_ambiguous += 1
                continue
            # ZeroMQ would drop a bigger part unseen: only `_oversized` sends those, uncounted.
            assert max(len(p) for p in parts) <= self.max_bytes, kind
            try:
                self._push.send_multipart(parts)
            except zmq.Again:  # the daemon stopped taking messages (it ended or was killed)
                report.undelivered = True
                break
            report.sent += 1
            by_kind[kind] += 1
            report.expected[outcome] += 1
            if oversized_every and report.sent % oversized_every == 0:
                self._oversized()
                report.oversized_dropped_by_zmq += 1
        report.seconds = time.perf_counter() - t0
        report.by_kind = dict(by_kind)
        return report

    def _oversized(self) -> None:
        """Send one part over the endpoint's MAXMSGSIZE on a throwaway connection.

        ZeroMQ drops it and disconnects that peer before the daemon sees anything, so it is
        counted nowhere; what matters is that the daemon and the other connections go on.
        """
        sock = self._ctx.socket(zmq.PUSH)
        sock.linger = 1000
        sock.connect(self._frames_endpoint)
        sock.send_multipart([_header(), bytes(self.max_bytes + 1)])
        sock.close()

    def close(self, linger_ms: int = 60_000) -> None:
        """Close the sockets, waiting up to `linger_ms` for queued messages to leave."""
        self._push.close(linger=linger_ms)
        self._sub.close()
        self._ctx.term()


# ------------------------------------------------------------------------------- daemon


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Write a nested dict of JSON-like values as TOML (JSON scalars and arrays are TOML)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}{key}"
            lines += ["", f"[{name}]", _toml(value, f"{name}.")]
    return "\n".join(lines)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_config(workdir: Path, *, side: int, rate_hz: float, model: Path) -> dict[str, Any]:
    """The daemon's config: simulated scope, one plane, ONNX Runtime on 1 thread, loopback."""
    return {
        "version": 1,
        "source": {
            "kind": "simulated",
            "frame_shape": [side, side],
            "rate_hz": rate_hz,
            "exposure_ms": 5.0,
        },
        "engine": {
            "model_path": str(model),
            "backends": ["onnxruntime"],
            "intra_op_threads": 1,
        },
        "planes": {"z_um": [0.0]},
        "endpoints": {
            name: f"tcp://127.0.0.1:{_free_port()}"
            for name in ("frames", "stacks", "recorder", "status")
        },
        "recorder": {"path": str(workdir), "compression": "lz4", "min_free_mb": 0},
        "overload": {"policy": "every_frame", "max_queue_frames": 64},
    }


_FAULTY_DAEMON = """
import sys
from live.recorder import Recorder
original, calls = Recorder._write, [0]
def faulty(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > int(sys.argv[1]):
        raise RuntimeError("injected fault (benchmarks.hostile)")
    return original(self, *args, **kwargs)
Recorder._write = faulty
from live.run import main
sys.exit(main(sys.argv[2:]))
"""


class DaemonProcess:
    """``python -m live.run`` in its own process: its output, pid, children and memory."""

    def __init__(self, config: Path, store: Path, *, fault_after: int | None = None) -> None:
        args = ["--scope", str(config), "--output", str(store)]
        if fault_after is None:
            command = [sys.executable, "-m", "live.run", *args]
        else:
            command = [sys.executable, "-c", _FAULTY_DAEMON, str(fault_after), *args]
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("["):  # the first status line: supervising
                self.ready.set()

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.proc.pid

    def wait_ready(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Wait for the daemon's first status line; raise with its output if it never comes."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start:\n" + "\n".join(self.lines[-30:]))

    def workers(self) -> list[int]:
        """Return the pids of the daemon's worker processes (multiprocessing spawn children)."""
        return [
            pid
            for pid in _children(self.pid)
            if "multiprocessing.spawn" in _cmdline(pid) and "resource_tracker" not in _cmdline(pid)
        ]

    def stop(self, timeout_s: float = 180.0) -> int:
        """SIGINT (a clean stop: drain, summary, final metadata); return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout_s)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        """SIGKILL the daemon (no cleanup of any kind) and reap it."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._reader.join(10)


def _children(pid: int) -> list[int]:
    """Return the pids whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def rss_mb(pid: int) -> float | None:
    """Return VmRSS of `pid` in MiB from /proc/PID/status, or None once it is gone.

    The results' keys say ``_mb`` (kept for older results files); the values are MiB.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the daemon's and its workers' RSS every `interval_s` (peak kept)."""

    def __init__(self, daemon: DaemonProcess, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.daemon_process = daemon
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.worker_peak_mb = 0.0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            value = rss_mb(self.daemon_process.pid)
            if value is None:
                return
            self.peak_mb = max(self.peak_mb, value)
            self.samples += 1
            if self.samples % 8 == 1:  # scanning /proc for the workers costs more
                workers = [rss_mb(p) or 0.0 for p in self.daemon_process.workers()]
                self.worker_peak_mb = max([self.worker_peak_mb, *workers])

    def stop(self) -> None:
        """Stop sampling (the thread ends within one interval)."""
        self._halt.set()
        self.join(5)


def _wait_settled(endpoint: str, report: FuzzReport, timeout_s: float) -> dict[str, Any] | None:
    """Wait until the daemon's counters show every fuzzed message; return the last snapshot.

    The counters come from the daemon's status endpoint (one snapshot a second).
    """
    from live.metrics import StatusReader

    reader = StatusReader(endpoint)
    deadline = time.monotonic() + timeout_s
    snap: dict[str, Any] | None = None
    try:
        while time.monotonic() < deadline:
            snap = reader.latest(1500) or snap
            if snap is not None and _settled(snap, report):
                break
    finally:
        reader.close()
    return snap


def _settled(snap: dict[str, Any], report: FuzzReport) -> bool:
    rejected = {k: n for k, n in (snap.get("rejected") or {}).items() if n}
    return bool(
        snap["malformed"] == report.expected["malformed"] and rejected == report.expected_rejected
    )


# ------------------------------------------------------------------------------ checking


def camera_frames(config: dict[str, Any]) -> Callable[[int], np.ndarray]:
    """Return ``frame(seq)``: the simulated camera's frame `seq`, rendered again here.

    The simulated scope's frames come from a bank of worm frames rendered by seq
    (`live.sources.SimulatedScope`, seeded noise): the same config renders the same bank.
    """
    from live.config import validate_config
    from live.sources import SimulatedScope, make_source

    source = make_source(validate_config(config, source="benchmark"))
    assert isinstance(source, SimulatedScope)
    bank = source._worm_frames()  # the very function the daemon's camera draws from
    return lambda seq: bank(seq, 0.0)


def _deepz(store: Path) -> dict[str, Any]:
    """Return a run store's ``attrs["deepz"]`` (this project's metadata) as a plain dict."""
    value: Any = zarr.open_group(str(store), mode="r").attrs["deepz"]
    return dict(value)


def _seqs(runs: list[list[int]]) -> list[int]:
    return [s for start, stop in runs for s in range(start, stop)]


def check_store(
    store: Path,
    frame: Callable[[int], np.ndarray],
    genuine: set[int] | None,
    *,
    closed: bool = True,
) -> dict[str, Any]:
    """Reopen a run store; check its record against its arrays and the camera's frames.

    `genuine` is the set of seqs the camera sent (None when unknown, after a SIGKILL). The
    store is truthful when its presence runs name only rows that hold frames, every frame in
    it is bit-identical to the camera's frame of that seq, it holds no frame the camera did not
    send, and (`closed`, the daemon ended) its time axis ends at the last frame on disk. A
    store cut off by SIGKILL may end in one row that was grown for a frame whose chunk write
    was under way (the recorder grows the axis, then writes): reported, and allowed.
    """
    from live.store import array_path

    root = zarr.open_group(str(store), mode="r")
    deepz = _deepz(store)
    raw = root[str(array_path(deepz, "raw"))]
    assert isinstance(raw, zarr.Array)
    present = _seqs(deepz["raw_present"])
    rows = int(raw.shape[0])
    on_disk = [t for t in range(rows) if np.asarray(raw[t]).any()]
    trailing = rows - (max(on_disk) + 1 if on_disk else 0)
    result: dict[str, Any] = {
        "complete": deepz.get("complete"),
        "error": deepz.get("error"),
        "run_error": deepz.get("run_error"),
        "raw_present": len(present),
        "raw_rows": rows,
        "rows_on_disk": len(on_disk),
        "not_yet_in_presence_record": len(set(on_disk) - set(present)),
        "trailing_unwritten_rows": trailing,
        "stacks_present": len(_seqs(deepz["stacks_present"])),
        "has_summary": "summary" in deepz,
        "unrecorded": deepz.get("summary", {}).get("unrecorded"),
        "bit_identical": all(np.asarray(raw[t]).tobytes() == frame(t).tobytes() for t in on_disk),
        "presence_within_arrays": set(present) <= set(on_disk),
    }
    if genuine is not None:
        result["only_genuine_frames"] = set(on_disk) <= genuine
        result["every_genuine_frame"] = set(present) == genuine
    result["truthful"] = bool(
        result["bit_identical"]
        and result["presence_within_arrays"]
        and result.get("only_genuine_frames", True)
        and trailing <= (0 if closed else 1)
    )
    return result


def _genuine_seqs(source: dict[str, Any]) -> set[int]:
    """The seqs the camera handed to ZeroMQ, from the daemon's source summary."""
    produced = int(source.get("frames_sent", 0)) + int(source.get("frames_dropped", 0))
    return set(range(produced)) - set(source.get("dropped_seqs") or [])


# ---------------------------------------------------------------------------------- runs


@dataclass
class Setup:
    """What every run shares: frame side, camera rate, model, working folder, seed."""

    workdir: Path
    side: int = 64
    rate_hz: float = 5.0
    model: Path = field(default_factory=lambda: REPO / "engine" / "weights" / "deepz-slim.onnx")
    seed: int = 0

    def start(
        self, name: str, fault_after: int | None = None
    ) -> tuple[DaemonProcess, dict[str, Any], Path]:
        """Write the config of run `name` and start its daemon; return it, the config, store."""
        folder = self.workdir / name
        folder.mkdir(parents=True)
        config = daemon_config(folder, side=self.side, rate_hz=self.rate_hz, model=self.model)
        path = folder / "config.toml"
        path.write_text(_toml(config) + "\n")
        store = folder / "run.ome.zarr"
        daemon = DaemonProcess(path, store, fault_after=fault_after)
        daemon.wait_ready()
        return daemon, config, store


_WARM_FRAMES = 10
"""Genuine frames republished before the memory baseline is taken: by then every worker has
refocused and the recorder has written, so their first allocations are in the baseline."""


def hostile_run(setup: Setup, messages: int, *, oversized_every: int = 1000) -> dict[str, Any]:
    """Run the daemon under `messages` fuzzed messages; return the accounting and memory."""
    daemon, config, store = setup.start("fuzz")
    sampler = RssSampler(daemon)
    fuzzer = Fuzzer(
        config["endpoints"]["frames"],
        config["endpoints"]["recorder"],
        (setup.side, setup.side),
        setup.seed,
    )
    try:
        fuzzer.wait_for_genuine(count=_WARM_FRAMES)  # the baseline once the daemon is warm
        start_mb = rss_mb(daemon.pid)
        workers_start = [rss_mb(p) for p in daemon.workers()]
        sampler.start()
        t0 = time.monotonic()
        report = fuzzer.run(messages, oversized_every=oversized_every)
        snap = _wait_settled(
            config["endpoints"]["status"], report, _SETTLE_TIMEOUT_S + messages / 1000
        )
        settle_s = time.monotonic() - t0
        end_mb = rss_mb(daemon.pid)
        alive = daemon.proc.poll() is None
        sampler.stop()
    finally:
        fuzzer.close()
        code = daemon.stop()
    deepz = _deepz(store)
    run = deepz["run_summary"]
    genuine = _genuine_seqs(run["source"])
    store_check = check_store(store, camera_frames(config), genuine)
    rejected = {k: n for k, n in run["rejected"].items() if n}
    accounting = {
        "malformed": [report.expected["malformed"], run["malformed"]],
        **{k: [report.expected.get(k, 0), rejected.get(k, 0)] for k in OUTCOMES[1:]},
        "frames_in": [len(genuine) + sum(report.expected_rejected.values()), run["frames_in"]],
        "raw_recorded": [len(genuine), run["raw_recorded"]],
    }
    peak = max(sampler.peak_mb, end_mb or 0.0, start_mb or 0.0)
    result = {
        "messages": report.sent,
        "send_seconds": round(report.seconds, 2),
        "messages_per_s": round(report.sent / max(report.seconds, 1e-9)),
        "daemon_seconds": round(settle_s, 1),
        "daemon_messages_per_s": round(report.sent / max(settle_s, 1e-9)),
        "by_kind": report.by_kind,
        "withheld_ambiguous": report.withheld_ambiguous,
        "oversized_dropped_by_zmq": report.oversized_dropped_by_zmq,
        "settled": snap is not None and _settled(snap, report),
        "daemon_alive_at_end": alive,
        "exit_code": code,
        "finish_reason": run.get("finish_reason"),
        "failures": run.get("failures"),
        "accounting": accounting,
        "accounting_exact": all(a == b for a, b in accounting.values()),
        "genuine_frames": len(genuine),
        "camera_dropped": int(run["source"].get("frames_dropped", 0)),
        "stacks_written": run["stacks_written"],
        "skipped_ranges": run["skipped"],
        "lost_ranges": run["lost"],
        "store": store_check,
        "undelivered": report.undelivered,
        "rss_mb": {
            "start": _r(start_mb),
            "peak": _r(peak),
            "end": _r(end_mb),
            "growth_peak": _r(peak - (start_mb or 0.0)),
            "workers_start": [_r(w) for w in workers_start],
            "workers_peak": _r(sampler.worker_peak_mb),
            "samples": sampler.samples,
        },
    }
    if code != 0:
        result["daemon_output_tail"] = [
            line for line in daemon.lines if not line.startswith(("WARNING", "DEBUG"))
        ][-40:]
    result["passed"] = bool(
        result["settled"]
        and alive
        and code == 0
        and result["accounting_exact"]
        and store_check["truthful"]
        and store_check["every_genuine_frame"]
        and store_check["complete"] is True
        and (peak - (start_mb or 0.0)) < RSS_LIMIT_MB
    )
    return result


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def kill_run(setup: Setup, target: str, messages: int, settle_s: float = 3.0) -> dict[str, Any]:
    """Kill one part (``worker``, ``recorder``, ``daemon``) under fuzz; check the store.

    ``worker``: SIGKILL of the worker process; the daemon restarts it, records every raw frame
    and counts the killed worker's frames as lost, so stacks + skipped + lost add up to the
    frames admitted, and the store is complete. ``recorder``: the writer thread raises (after
    `rate_hz` × 4 writes); the daemon stops with exit code 1 and the store says incomplete,
    why, and which frames it holds. ``daemon``: SIGKILL of the daemon; the store holds only
    true rows, its workers exit, and its ipc directory is left for `remove_stale_ipc_dirs`.
    """
    before = _ipc_dirs()
    fault_after = int(setup.rate_hz * 4) if target == "recorder" else None
    daemon, config, store = setup.start(f"kill-{target}", fault_after=fault_after)
    fuzzer = Fuzzer(
        config["endpoints"]["frames"],
        config["endpoints"]["recorder"],
        (setup.side, setup.side),
        setup.seed + 1,
    )
    result: dict[str, Any] = {"target": target}
    workers = daemon.workers()
    try:
        fuzzer.wait_for_genuine()
        fuzzer.run(messages // 2)
        if target == "worker":
            os.kill(workers[0], signal.SIGKILL)
            result["killed_pid"] = workers[0]
        elif target == "daemon":
            time.sleep(settle_s)
            daemon.kill()
            result["killed_pid"] = daemon.pid
        if daemon.proc.poll() is None:
            fuzzer.run(messages - messages // 2)
            time.sleep(settle_s)
    finally:
        fuzzer.close(linger_ms=0 if target == "daemon" else 10_000)
    genuine: set[int] | None = None
    if target == "daemon":
        code = daemon.proc.returncode
        deadline = time.monotonic() + 30
        while any(_exists(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        result["orphan_workers_left"] = [p for p in workers if _exists(p)]
        left = _ipc_dirs() - before
        from live.supervisor import remove_stale_ipc_dirs

        removed = set(remove_stale_ipc_dirs())
        result["ipc_dirs_left_by_kill"] = sorted(str(p) for p in left)
        result["ipc_dirs_removed_by_remove_stale"] = sorted(str(p) for p in left & removed)
        result["ipc_dirs_cleaned_by_benchmark"] = _clean_dead_ipc_dirs(left - removed)
    else:
        if target == "recorder":  # the daemon stops itself; a SIGINT now would cut that short
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.proc.wait(120)
        code = daemon.stop()
        run = _deepz(store)["run_summary"]
        genuine = _genuine_seqs(run["source"])
        result["genuine_frames"] = len(genuine)
        result["worker_restarts"] = run["worker_restarts"]
        result["skipped_ranges"], result["lost_ranges"] = run["skipped"], run["lost"]
        result["failures"] = run["failures"]
    result["exit_code"] = code
    store_check = check_store(store, camera_frames(config), genuine, closed=target != "daemon")
    result["store"] = store_check
    expected_complete = target == "worker"
    passed = store_check["truthful"] and store_check["complete"] is expected_complete
    if target == "worker":
        fates = (
            store_check["stacks_present"]
            + len(_seqs(result["skipped_ranges"]))
            + len(_seqs(result["lost_ranges"]))
        )
        result["fates_add_up"] = fates == len(genuine or ())
        passed &= bool(
            code == 0
            and result["worker_restarts"] == 1
            and store_check["every_genuine_frame"]
            and result["fates_add_up"]
        )
    elif target == "recorder":
        passed &= bool(
            code == 1
            and "recorder writer" in (store_check["run_error"] or "")
            and store_check["error"] is not None
        )
    else:
        passed &= not result["orphan_workers_left"]
    result["passed"] = bool(passed)
    return result


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    except OSError:
        pass
    return ""


def _clean_dead_ipc_dirs(folders: set[Path]) -> list[str]:
    """Remove those of `folders` whose sockets no process has bound; return what went.

    For the killed daemon's directory when its name carries no owner (an older ``live.run``):
    other daemons may be running on this machine, so only a directory none of whose socket
    files is listed in ``/proc/net/unix`` (bound, live sockets) is deleted.
    """
    try:
        bound = Path("/proc/net/unix").read_text()
    except OSError:
        return []
    gone = []
    for folder in folders:
        sockets = [str(p) for p in folder.iterdir() if p.is_socket()]
        if sockets and not any(path in bound for path in sockets):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(str(folder))
    return gone


def _ipc_dirs() -> set[Path]:
    """The ``deepz-*`` directories in the temp folder now."""
    return {p for p in Path(tempfile.gettempdir()).glob("deepz-*") if p.is_dir()}


# ---------------------------------------------------------------------------------- main


def _table(main_run: dict[str, Any], kills: list[dict[str, Any]]) -> list[str]:
    """Render the human summary."""
    rss = main_run["rss_mb"]
    lines = [
        f"fuzzed messages: {main_run['messages']:,}, all counted by the daemon within "
        f"{main_run['daemon_seconds']} s of the first (about {main_run['daemon_messages_per_s']:,}"
        f"/s; status read once a second); oversized parts dropped by ZeroMQ: "
        f"{main_run['oversized_dropped_by_zmq']}",
        "",
        f"| {'counter':<14} | {'predicted':>10} | {'daemon':>10} |",
        f"|{'-' * 16}|{'-' * 12}|{'-' * 12}|",
    ]
    for name, (expected, got) in main_run["accounting"].items():
        mark = "" if expected == got else "  <-- MISMATCH"
        lines.append(f"| {name:<14} | {expected:>10,} | {got:>10,} |{mark}")
    store = main_run["store"]
    lines += [
        "",
        f"daemon alive at end: {main_run['daemon_alive_at_end']}; exit code "
        f"{main_run['exit_code']}; genuine frames {main_run['genuine_frames']} recorded "
        f"exactly once: {store.get('every_genuine_frame')}, bit-identical: "
        f"{store['bit_identical']}; store complete: {store['complete']}",
        f"daemon RSS: start {rss['start']} MiB, peak {rss['peak']} MiB, end {rss['end']} MiB "
        f"(growth {rss['growth_peak']} MiB, limit {RSS_LIMIT_MB:g}); worker peak "
        f"{rss['workers_peak']} MiB",
        f"RESULT: {'PASS' if main_run['passed'] else 'FAIL'}",
    ]
    for k in kills:
        s = k["store"]
        lines.append(
            f"kill {k['target']:<8}: exit {k['exit_code']}, complete {s['complete']}, "
            f"frames on disk {s['rows_on_disk']} (presence record {s['raw_present']}, "
            f"{s['not_yet_in_presence_record']} not yet in it), rows {s['raw_rows']} "
            f"({s['trailing_unwritten_rows']} unwritten at the end), "
            f"bit-identical {s['bit_identical']}, error {s['error'] or s['run_error']!s:.60} "
            f"-> {'PASS' if k['passed'] else 'FAIL'}"
        )
        if k["target"] == "daemon":
            lines.append(
                f"  after the daemon's SIGKILL: orphan workers left {k['orphan_workers_left']}; "
                f"ipc dirs left {len(k['ipc_dirs_left_by_kill'])}, removed by "
                f"remove_stale_ipc_dirs {len(k['ipc_dirs_removed_by_remove_stale'])}, by this "
                f"benchmark (no owner in the name) {len(k['ipc_dirs_cleaned_by_benchmark'])}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; exit 1 if any check failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000, help="fuzzed messages")
    parser.add_argument("--kill", action="store_true", help="also kill worker/recorder/daemon")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON to write")
    parser.add_argument("--side", type=int, default=64, help="camera frame side (pixels)")
    parser.add_argument("--rate-hz", type=float, default=5.0, help="camera frame rate")
    parser.add_argument("--seed", type=int, default=0, help="fuzzer seed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deepz-hostile-") as tmp:
        setup = Setup(Path(tmp), side=args.side, rate_hz=args.rate_hz, seed=args.seed)
        main_run = hostile_run(setup, args.messages)
        kills = (
            [kill_run(setup, t, min(args.messages, 2000)) for t in ("worker", "recorder", "daemon")]
            if args.kill
            else []
        )
    lines = _table(main_run, kills)
    print("\n".join(lines))
    record = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        },
        "command": " ".join(["python -m benchmarks.hostile", *(argv or sys.argv[1:])]),
        "settings": {"side": args.side, "rate_hz": args.rate_hz, "seed": args.seed},
        "rss_limit_mb": RSS_LIMIT_MB,
        "fuzz": main_run,
        "kills": kills,
        "passed": main_run["passed"] and all(k["passed"] for k in kills),
    }
    write_results(args.results, record, measured=bool(record["passed"]))
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
