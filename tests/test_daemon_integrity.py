"""The running daemon refuses forged and broken frames: not recorded, not refocused, not
republished, counted by kind, and the counts add up (real sockets, a real worker, a real store)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zarr
import zmq

from live.protocol import decode, encode_frame
from live.run import Daemon
from tests.live_helpers import SIDE, live_config, push_frames, run_array


def _parts(image: np.ndarray, seq: int) -> list[bytes]:
    return [bytes(p) for p in encode_frame(image, seq=seq, timestamp_s=time.time())]


def test_forged_and_broken_frames_are_rejected_by_kind_and_go_nowhere(
    tmp_path: Path, tiny_model_files
) -> None:
    config = live_config(tmp_path, tiny_model_files["onnx"], recorder={"seq_window": 50})
    store = tmp_path / "run.ome.zarr"
    daemon = Daemon(config, output=store, source=None, preflight_check=False)
    forged = np.full((SIDE, SIDE), 7, np.uint16)
    inject = {
        10: _parts(forged, 5),  # a duplicate of a genuine frame already received
        12: _parts(forged, 10_000),  # far beyond the window of 50
        14: _parts(np.zeros((SIDE // 2, SIDE), np.uint16), 30),  # wrong shape
        16: _parts(np.full((SIDE, SIDE), 1e9, np.float32), 31),  # would wrap into uint16
        18: _parts(np.full((SIDE, SIDE), -5, np.int32), 32),  # would wrap too
    }
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    raw_sub = ctx.socket(zmq.SUB)  # what the daemon republishes on endpoints.recorder
    raw_sub.linger = 0
    raw_sub.setsockopt(zmq.SUBSCRIBE, b"")
    raw_sub.connect(config.endpoints.recorder)
    try:
        daemon.start()
        time.sleep(0.3)  # let the subscription reach the daemon's PUB
        push_frames(config.endpoints.frames, list(range(30)), inject=inject, rate_hz=30.0)
        deadline = time.monotonic() + 60
        while (snap := daemon.metrics.snapshot(advance=False)).stacks_out + snap.skipped < 30:
            assert time.monotonic() < deadline, snap  # every admitted frame's fate is known
            daemon.supervise(0.2, quiet=True)
        line = daemon.metrics.snapshot().status_line()
    finally:
        summary = daemon.stop()
    republished = []
    while raw_sub.poll(200):
        republished.append(decode(raw_sub.recv_multipart(copy=False)))
    raw_sub.close()
    ctx.term()

    assert summary.frames_in == 35 and summary.malformed == 0
    assert summary.rejected == {
        "duplicate": 1,
        "beyond_window": 1,
        "wrong_shape": 1,
        "wrong_dtype": 2,
    }
    # The counts add up: received = admitted + rejected; admitted = recorded = refocused.
    assert summary.frames_in - summary.rejected_total == summary.raw_recorded == 30
    assert summary.stacks_written + len(summary.skipped) + len(summary.lost) == 30
    assert summary.lost == [] and set(summary.skipped) <= set(range(30))
    assert "rej 5" in line and len(line) < 100
    text = "\n".join(summary.lines())
    assert (
        "rejected          5 (1 duplicate, 1 beyond_window, 1 wrong_shape, 2 wrong_dtype)" in text
    )
    assert "admitted 30" in text
    # Republished: genuine frames only (PUB may drop, never forge).
    seqs = [m.header.seq for m in republished]
    assert len(seqs) == len(set(seqs)) and set(seqs) <= set(range(30))
    assert all(not (m.array == 7).all() for m in republished)
    # The store: the first frame of seq 5 kept bit-identical, truthful presence, complete.
    root = zarr.open_group(store, mode="r")
    attrs = root.attrs["deepz"]
    assert attrs["complete"] is True and attrs["raw_present"] == [[0, 30]]
    assert run_array(store, "raw").shape[0] == 30
    stacked = {s for start, stop in attrs["stacks_present"] for s in range(start, stop)}
    assert stacked == set(range(30)) - set(summary.skipped)  # no forged frame was refocused
    assert not (np.asarray(run_array(store, "raw")[5]) == 7).all()
    assert attrs["rejected"]["raw"]["duplicate"] == 1
