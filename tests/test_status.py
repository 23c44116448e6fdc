"""Status and counters: seqs kept as ranges, a status message of bounded size, a short line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from live.metrics import (
    LATENCY_WINDOW,
    MAX_STATUS_BYTES,
    MAX_STATUS_RANGES,
    Metrics,
    RunState,
    SeqRuns,
    SeqSet,
    Snapshot,
    StageTimes,
    StatusPublisher,
    StatusReader,
)
from live.run import RunSummary
from tests.live_helpers import free_port


def test_seq_set_merges_ranges_in_any_order_and_counts_each_seq_once() -> None:
    seqs = SeqSet()
    order = np.random.default_rng(0).permutation(200)
    for seq in [*order[order % 7 != 3].tolist(), 5, 5, 11]:
        seqs.add(int(seq))
    expected = sorted(s for s in range(200) if s % 7 != 3)
    assert list(seqs.frozen()) == expected and seqs.count == len(expected)
    assert seqs.ranges()[:2] == [(0, 3), (4, 10)]
    assert seqs.ranges(last=1) == [(193, 199)]  # 199 % 7 == 3


def test_seq_set_add_discard_membership_and_overlap_behave_like_a_set() -> None:
    rng = np.random.default_rng(1)
    seqs, model = SeqSet(), set()
    for _ in range(3000):
        seq = int(rng.integers(0, 80))
        if rng.random() < 0.55:
            seqs.add(seq)
            model.add(seq)
        else:
            assert seqs.discard(seq) == (seq in model)
            model.discard(seq)
        assert seqs.count == len(model) == len(seqs)
        probe = int(rng.integers(-2, 82))
        assert (probe in seqs) == (probe in model) == (np.int64(probe) in seqs)
        stop = probe + int(rng.integers(1, 6))
        assert seqs.intersects(probe, stop) == any(s in model for s in range(probe, stop))
        assert seqs.last == max(model, default=-1)
    assert list(seqs.frozen()) == sorted(model)
    starts = [a for a, _ in seqs.ranges()]
    stops = [b for _, b in seqs.ranges()]
    assert all(b < a for a, b in zip(starts[1:], stops[:-1], strict=True))  # merged, apart


def test_a_stack_read_after_its_worker_was_counted_dead_is_not_lost() -> None:
    metrics = Metrics()
    metrics.lose([7, 8, 9])  # the daemon took them from a worker that died
    assert metrics.late_stack(8) and list(metrics.lost_seqs()) == [7, 9]
    # the other order: the stack arrives between the ledger's take and the daemon's lose
    assert not metrics.late_stack(10)
    metrics.lose([10, 11])
    assert list(metrics.lost_seqs()) == [7, 9, 11] and metrics.snapshot().lost == 3


def test_status_message_carries_capped_ranges_however_many_frames_are_lost() -> None:
    metrics = Metrics()
    metrics.skip(list(range(0, 1_000_000)))  # a million in a row: one range
    metrics.lose(list(range(0, 20_000, 2)))  # ten thousand scattered: capped
    snap = metrics.snapshot()
    assert snap.skipped == 1_000_000 and snap.skipped_ranges == [(0, 1_000_000)]
    assert snap.lost == 10_000 and len(snap.lost_ranges) == MAX_STATUS_RANGES
    assert snap.lost_ranges[-1] == (19_998, 19_999)  # the newest ones
    size = len(snap.to_json())
    assert size < MAX_STATUS_BYTES  # what a status reader takes
    metrics.lose(list(range(100_001, 140_001, 2)))  # twenty thousand more: the same size
    assert abs(len(metrics.snapshot().to_json()) - size) < 2 * MAX_STATUS_RANGES * 4
    assert len(metrics.lost_seqs()) == 30_000  # the summary still names every one


def test_the_summary_holds_a_million_skipped_seqs_as_one_run_and_stores_them_as_ranges() -> None:
    """Session 44's Known gap: the summary listed every skipped and lost seq (1.8 s and
    121 MiB for a million); it holds their runs, prints them and stores them as ranges."""
    metrics = Metrics()
    metrics.skip(list(range(1_000_000)))
    metrics.lose([3_000_000, 3_000_002, 3_000_003])
    skipped, lost = metrics.skipped_seqs(), metrics.lost_seqs()
    assert skipped.runs == ((0, 1_000_000),) and len(skipped) == 1_000_000 and skipped
    assert lost.runs == ((3_000_000, 3_000_001), (3_000_002, 3_000_004)) and len(lost) == 3
    inside = [s in skipped for s in (-1, 0, 999_999, 1_000_000, "0")]
    assert inside == [False, True, True, False, False]
    assert [s in lost for s in (3_000_001, 3_000_003, np.int64(3_000_003), 3_000_004)] == [
        False, True, True, False,
    ]  # fmt: skip
    assert list(lost) == [3_000_000, 3_000_002, 3_000_003] and not SeqRuns()
    summary = RunSummary(
        frames_acquired=None, frames_in=1_000_003, raw_recorded=0, stacks_written=0,
        skipped=skipped, lost=lost, malformed=0, worker_restarts=0, latency_p50_ms=None,
        latency_p99_ms=None, backend="onnxruntime", output=None,
    )  # fmt: skip
    text = "\n".join(summary.lines())  # the store's copy: tests/test_run.py (overload)
    assert "skipped           1000000 (seqs: 0-999999)" in text
    assert "lost              3 (seqs: 3000000, 3000002-3000003;" in text


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
        "state": RunState.RUNNING,
        "backend": "tensorrt on NVIDIA H100 80GB HBM3 (fp16)",
        "output": "/data/very/long/path/to/runs/20261125-101010.ome.zarr",
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
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
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


@pytest.mark.parametrize(
    "payload",
    [b"\xff not json", json.dumps([1, 2]).encode(), b"[" * 5_000],  # the last: too deep to parse
)
def test_status_reader_ignores_what_is_not_a_snapshot(payload: bytes) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    reader = StatusReader(f"tcp://127.0.0.1:{port}", ctx)
    try:
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
        status = None
        while status is None:  # PUB drops until the subscription has arrived: send again
            assert time.monotonic() < deadline, "nothing arrived"
            pub.send(payload)  # each time behind the bad payload, which must be ignored
            pub.send(b'{"frames_in": 3}')
            status = reader.latest(100)
        assert status == {"frames_in": 3}
    finally:
        reader.close()
        pub.close()
        ctx.term()


def test_run_info_travels_in_the_snapshot_and_its_json() -> None:
    metrics = Metrics()
    assert metrics.snapshot().state == RunState.STARTING and metrics.snapshot().backend is None
    metrics.set_run_info(state="running", backend="openvino on CPU", output=Path("runs/a.ome.zarr"))
    metrics.set_run_info(state=RunState.STOPPING)  # what is not given stays as it was
    status = json.loads(metrics.snapshot().to_json())
    assert status["state"] == "stopping" and status["backend"] == "openvino on CPU"
    assert status["output"] == str(Path("runs/a.ome.zarr"))
    with pytest.raises(ValueError, match="run state 'paused' is not one of: starting, running"):
        metrics.set_run_info(state="paused")
    assert metrics.snapshot().state == RunState.STOPPING


def test_latency_series_is_the_latency_window_with_arrival_times() -> None:
    metrics = Metrics()
    times, latency = metrics.latency_series()
    assert times.shape == latency.shape == (0,)
    for i in range(LATENCY_WINDOW + 5):
        metrics.stack_out(float(i))
    times, latency = metrics.latency_series()
    assert latency.shape == times.shape == (LATENCY_WINDOW,)
    assert latency[0] == 5.0 and latency[-1] == LATENCY_WINDOW + 4  # the newest ones
    assert np.all(np.diff(times) >= 0) and times[0] >= 0
    snap = metrics.snapshot()
    assert snap.latency_p50_ms == pytest.approx(np.percentile(latency, 50))


def test_the_final_snapshot_reaches_a_reader_when_the_publisher_lingers() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = StatusPublisher(ctx, endpoint)
    reader = StatusReader(endpoint)
    metrics = Metrics()
    try:
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
        while reader.latest(100) is None:  # until the subscription has arrived
            assert time.monotonic() < deadline, "status never arrived"
            publisher.publish(metrics.snapshot())
        metrics.set_run_info(state=RunState.FINISHED)
        publisher.publish(metrics.snapshot())
        publisher.close(linger_ms=10_000)  # generous: sent at once, unless the machine stalls
        final = reader.latest(30_000)
        while final is not None and final["state"] != "finished":
            final = reader.latest(30_000)
        assert final is not None and final["state"] == "finished"
    finally:
        reader.close()
        ctx.term()


def test_stage_times_give_percentiles_per_stage_and_the_busy_share() -> None:
    """Two frames a second apart, each 100 ms of refocus and 10 ms of send: p50s are those
    durations, and the worker was busy 220 ms of the 1.11 s from first start to last end."""
    times = StageTimes(("refocus", "send"))
    assert times.fields()["busy"] is None and times.fields()["refocus_p50_ms"] is None
    for start in (0.0, 1.0):
        times.add("refocus", start, start + 0.1)
        times.add("send", start + 0.1, start + 0.11)
    fields = times.fields()
    assert fields["refocus_p50_ms"] == pytest.approx(100.0)
    assert fields["send_p99_ms"] == pytest.approx(10.0)
    assert fields["busy"] == pytest.approx(0.22 / 1.11, abs=1e-3)
    assert json.loads(json.dumps(fields)) == fields  # flat and JSON-able: a "done" event's fields
    assert tuple(fields) == StageTimes.field_names(("refocus", "send"))
