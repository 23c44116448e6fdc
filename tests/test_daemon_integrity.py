"""The running daemon refuses forged and broken frames: not recorded, not refocused, not
republished, counted by kind, and the counts add up (real sockets, a real worker, a real store).
A SIGKILLed daemon's private ipc directory is found and removed by the next one."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
import zmq

from live.protocol import decode, encode_frame
from live.run import Daemon
from live.supervisor import make_ipc_dir, process_start_ticks, remove_stale_ipc_dirs
from tests.live_helpers import SIDE, live_config, push_frames, run_array

REPO = Path(__file__).resolve().parents[1]


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
    joined = raw_sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    raw_sub.connect(config.endpoints.recorder)
    try:
        daemon.start()
        # a SUB joins a PUB asynchronously: what is published before it joined is not sent.
        # Its connection is made once the daemon binds (ZeroMQ reconnects); its subscription
        # follows at once, well within the first of the 30 frames sent over a second.
        assert joined.poll(60_000), "the raw subscriber never connected to the daemon"
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
    raw_sub.disable_monitor()
    joined.close()
    raw_sub.close()
    ctx.term()

    assert summary.frames_in == 35 and summary.malformed == 0
    # the backend the worker loaded, from its "ready" event (not only the one asked for)
    assert summary.backend.startswith("onnxruntime on "), summary.backend
    assert summary.rejected == {
        "duplicate": 1,
        "beyond_window": 1,
        "wrong_shape": 1,
        "wrong_dtype": 2,
    }
    # The counts add up: received = admitted + rejected; admitted = recorded = refocused.
    assert summary.frames_in - summary.rejected_total == summary.raw_recorded == 30
    assert summary.stacks_written + len(summary.skipped) + len(summary.lost) == 30
    assert not summary.lost and set(summary.skipped) <= set(range(30))
    assert "rej 5" in line and len(line) < 100
    text = "\n".join(summary.lines())
    assert (
        "rejected          5 (1 duplicate, 1 beyond_window, 1 wrong_shape, 2 wrong_dtype)" in text
    )
    assert "admitted 30" in text
    # Republished: genuine frames only (PUB may drop, never forge).
    seqs = [m.header.seq for m in republished]
    assert seqs, "nothing republished: the checks below would pass on nothing"
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


_IPC_OWNER = """
import sys, time
from live.supervisor import make_ipc_dir
ipc = make_ipc_dir(sys.argv[1])
(ipc.path / "frames-0").write_bytes(b"")  # stands in for a socket file
print(ipc.name, flush=True)
time.sleep(120)
"""


def test_the_ipc_dir_of_a_sigkilled_daemon_is_removed_and_live_ones_kept(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _IPC_OWNER, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        killed = Path(proc.stdout.readline().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: the pid no longer exists
    assert killed.is_dir() and killed.name.startswith(f"deepz-{proc.pid}-")
    mine = make_ipc_dir(tmp_path)  # this process is alive: kept
    start = process_start_ticks(os.getpid())
    assert start is not None
    reused = tmp_path / f"deepz-{os.getpid()}-{start + 1}-abcd1234"  # same pid, another start
    legacy = tmp_path / "deepz-k2j4h5g6"  # an older daemon's: no owner in the name
    unrelated = tmp_path / f"deepz-{proc.pid}-0-not-ours"
    for folder in (reused, legacy, unrelated):
        folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / f"deepz-{proc.pid}-1-linkdir0"  # a stale-looking name, but a link
    link.symlink_to(elsewhere, target_is_directory=True)

    removed = remove_stale_ipc_dirs(tmp_path)

    assert sorted(removed) == sorted([killed, reused])
    assert not killed.exists() and not reused.exists()
    assert mine.path.is_dir() and legacy.is_dir() and unrelated.is_dir()
    assert link.is_symlink() and elsewhere.is_dir()
    with mine:  # used like tempfile.TemporaryDirectory
        assert Path(mine.name) == mine.path
    assert not mine.path.exists()
    assert remove_stale_ipc_dirs(tmp_path) == []


def test_ipc_dirs_go_to_the_temp_folder_by_default() -> None:
    ipc = make_ipc_dir()
    try:
        assert ipc.path.parent == Path(tempfile.gettempdir())
        assert ipc.path.name.startswith(f"deepz-{os.getpid()}-")
        assert stat.S_IMODE(ipc.path.stat().st_mode) == 0o700
        assert ipc.path not in remove_stale_ipc_dirs()  # its owner (this process) is alive
    finally:
        ipc.cleanup()


def test_the_hostile_benchmark_core_accounts_for_every_fuzzed_message(tmp_path: Path) -> None:
    # benchmarks.hostile at a tiny N: the real daemon (`python -m live.run`, simulated scope,
    # shipped slim model) takes 300 fuzzed messages of every kind while its camera runs.
    from benchmarks.hostile import KINDS, RSS_LIMIT_MB, Setup, hostile_run

    setup = Setup(tmp_path)
    if not setup.model.is_file():
        pytest.skip(f"the shipped model {setup.model} is not here")
    result = hostile_run(setup, 300, oversized_every=100)

    assert result["settled"] and result["daemon_alive_at_end"] and result["exit_code"] == 0
    assert result["accounting_exact"], result["accounting"]  # predicted == daemon's counters
    assert result["messages"] == sum(result["by_kind"].values()) == 300
    assert set(result["by_kind"]) <= set(KINDS) and result["oversized_dropped_by_zmq"] == 3
    assert all(predicted > 0 for predicted, _ in result["accounting"].values())  # every kind
    store = result["store"]
    assert store["every_genuine_frame"] and store["bit_identical"] and store["complete"] is True
    assert store["truthful"] and result["genuine_frames"] > 0
    assert result["rss_mb"]["growth_peak"] < RSS_LIMIT_MB
    assert result["passed"]
