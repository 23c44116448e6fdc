"""Helpers shared by the live-service tests: configs on free ports, frame pushing, stores."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zmq

from live.config import ScopeConfig, validate_config
from live.protocol import encode_frame
from live.store import array_path
from live.store_lock import lock_path

SIDE = 64


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    All sockets stay bound until every port is drawn: asking the kernel for one port at a
    time may hand back the same port twice once the first socket is closed (a CI run hit
    exactly that: two endpoints on one port).
    """
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def live_config(
    tmp_path: Path,
    model: Path,
    *,
    rate_hz: float = 20.0,
    planes: list[float] | None = None,
    policy: str = "every_frame",
    max_queue_frames: int = 64,
    frame_count: int | None = None,
    side: int = SIDE,
    **sections: dict[str, Any],
) -> ScopeConfig:
    """A small CPU config: `side`² simulated frames, the given model, free ports, records to tmp."""
    data: dict[str, Any] = {
        "source": {
            "kind": "simulated",
            "frame_shape": [side, side],
            "rate_hz": rate_hz,
            "exposure_ms": 5.0,
            **({"frame_count": frame_count} if frame_count is not None else {}),
        },
        "engine": {"model_path": str(model), "backends": ["onnxruntime"], "intra_op_threads": 1},
        "planes": {"z_um": planes or [-2.0, 0.0, 2.0]},
        "endpoints": {
            name: f"tcp://127.0.0.1:{port}"
            for name, port in zip(
                ("frames", "stacks", "recorder", "status"), free_ports(4), strict=True
            )
        },
        "recorder": {"path": str(tmp_path / "runs"), "compression": "lz4"},
        "overload": {"policy": policy, "max_queue_frames": max_queue_frames},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return validate_config(data, source="test config")


def push_frames(
    endpoint: str,
    seqs: list[int],
    *,
    side: int = SIDE,
    rate_hz: float | None = None,
    inject: dict[int, list[bytes]] | None = None,
    stop: threading.Event | None = None,
    sent: list[int] | None = None,
    focus_um: list[float] | None = None,
) -> None:
    """PUSH frames with the given seqs (blocking sends), paced at `rate_hz` if given.

    `inject` maps a position in `seqs` to a raw (malformed) message sent just before it;
    `stop` ends early; `sent` collects the seqs sent; `focus_um` gives each frame's focus
    (header ``focus_um``, 0 if not given).
    """
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 5000
    push.connect(endpoint)
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for i, seq in enumerate(seqs):
        if stop is not None and stop.is_set():
            break
        if inject and i in inject:
            push.send_multipart(inject[i])
        if rate_hz:
            time.sleep(max(0.0, t0 + i / rate_hz - time.monotonic()))
        frame = rng.integers(100, 1000, (side, side), dtype=np.uint16)
        focus = 0.0 if focus_um is None else focus_um[i]
        parts = encode_frame(frame, seq=seq, timestamp_s=time.time(), focus_um=focus)
        push.send_multipart(parts, copy=False)
        if sent is not None:
            sent.append(seq)
    push.close()
    ctx.term()


def run_array(store: Path | str, role: str) -> zarr.Array:
    """Open image `role` ("raw" or "stacks") of a run store, wherever its layout keeps it."""
    root = zarr.open_group(str(store), mode="r")
    path = array_path(root.attrs["deepz"], role)
    assert path is not None, f"the run kept no {role} image"
    array = root[path]
    assert isinstance(array, zarr.Array)
    return array


HOST = platform.node()
"""This machine's name, as store lock files name it."""


def dead_pid() -> int:
    """A pid of this machine whose process has ended."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def leave_lock(store: Path, pid: int, host: str = HOST) -> None:
    """Leave `store`'s lock file as a writer killed before it removed its own would."""
    text = json.dumps({"pid": pid, "host": host, "started": "2026-01-01T00:00:00+00:00"})
    lock_path(store).write_text(text, encoding="utf-8")
