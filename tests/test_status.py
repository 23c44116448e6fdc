"""Status and counters: seqs kept as ranges, a status message of bounded size, a short line."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq

from live.metrics import MAX_STATUS_RANGES, Metrics, SeqSet, Snapshot, StatusPublisher, StatusReader
from tests.live_helpers import free_port


def test_seq_set_merges_ranges_in_any_order_and_counts_each_seq_once() -> None:
    seqs = SeqSet()
    order = np.random.default_rng(0).permutation(200)
    for seq in [*order[order % 7 != 3].tolist(), 5, 5, 11]:
        seqs.add(int(seq))
    expected = sorted(s for s in range(200) if s % 7 != 3)
    assert seqs.seqs() == expected and seqs.count == len(expected)
    assert seqs.ranges()[:2] == [(0, 3), (4, 10)]
    assert seqs.ranges(last=1) == [(193, 199)]  # 199 % 7 == 3


def test_status_message_carries_capped_ranges_however_many_frames_are_lost() -> None:
    metrics = Metrics()
    metrics.skip(list(range(0, 1_000_000)))  # a million in a row: one range
    metrics.lose(list(range(0, 20_000, 2)))  # ten thousand scattered: capped
    snap = metrics.snapshot()
    assert snap.skipped == 1_000_000 and snap.skipped_ranges == [(0, 1_000_000)]
    assert snap.lost == 10_000 and len(snap.lost_ranges) == MAX_STATUS_RANGES
    assert snap.lost_ranges[-1] == (19_998, 19_999)  # the newest ones
    assert len(snap.to_json()) < 8000
    assert len(metrics.lost_seqs()) == 10_000  # the summary still names every one


def _snapshot(**changes: object) -> Snapshot:
    values: dict[str, object] = {
        "elapsed_s": 3600.0,
        "frames_in": 36_000,
        "frames_routed": 35_990,
        "stacks_out": 35_990,
        "skipped": 1_234,
        "lost": 0,
        "malformed": 0,
        "raw_recorded": 35_990,
        "stacks_recorded": 35_990,
        "worker_restarts": 0,
        "frames_per_s": 10.0,
        "stacks_per_s": 9.97,
        "latency_p50_ms": 123.4,
        "latency_p99_ms": 456.7,
        "queue_depth": 2,
        "recorder_backlog": 0,
        "rejected": {"duplicate": 12},
        "disk_free_mb": 612.0,
        "disk_low": True,
    }
    values.update(changes)
    return Snapshot(**values)  # type: ignore[arg-type]


def test_status_line_is_short_and_shows_rejections_and_low_disk() -> None:
    line = _snapshot().status_line()
    assert len(line) < 100, line
    assert "rej 12" in line and "skip 1234" in line and "disk 612 MB!" in line
    quiet = _snapshot(skipped=0, rejected={}, disk_low=False).status_line()
    assert "no loss" in quiet and "disk" not in quiet and len(quiet) < 80


def test_status_reader_gets_the_newest_snapshot_over_a_real_socket() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = StatusPublisher(ctx, endpoint)
    reader = StatusReader(endpoint)
    try:
        metrics = Metrics()
        metrics.reject("duplicate")
        deadline = time.monotonic() + 10
        status = None
        while status is None:  # PUB drops until the subscription has arrived
            assert time.monotonic() < deadline, "status never arrived"
            publisher.publish(metrics.snapshot())
            status = reader.latest(100)
        assert status["rejected"] == {"duplicate": 1} and status["frames_in"] == 0
    finally:
        reader.close()
        publisher.close()
        ctx.term()


@pytest.mark.parametrize("payload", [b"\xff not json", json.dumps([1, 2]).encode()])
def test_status_reader_ignores_what_is_not_a_snapshot(payload: bytes) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    reader = StatusReader(f"tcp://127.0.0.1:{port}", ctx)
    try:
        time.sleep(0.3)  # let the subscription arrive (PUB drops before it)
        pub.send(payload)
        pub.send(b'{"frames_in": 3}')
        deadline = time.monotonic() + 5
        status = reader.latest(100)
        while status is None and time.monotonic() < deadline:
            status = reader.latest(100)
        assert status == {"frames_in": 3}
    finally:
        reader.close()
        pub.close()
        ctx.term()
