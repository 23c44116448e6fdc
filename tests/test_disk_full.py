"""A full disk stops the recording, never the run, and the store says exactly what it holds.

The disk is a real one: a small tmpfs mounted for the test (needs root, or CAP_SYS_ADMIN; the
tests skip, saying so, where mounting is not permitted). Writes fail with the kernel's own
``ENOSPC``; the store must still end with ``error`` naming the cause, ``complete: false``, time
axes that end at the last frame on disk, presence runs and frame metadata that match the
pixels, and the recorder's reserve file gone. One test also runs where no tmpfs can be
mounted: a quota on the zarr store's own write function (the file-system boundary every chunk
and metadata write goes through) raises ``ENOSPC`` the same way.
"""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.storage._local as zarr_local

from live.protocol import Message, decode, encode_frame, encode_stack
from live.recorder import RESERVE_MB, RESERVE_NAME, Recorder, missing_seqs
from live.run import EXIT_INCOMPLETE, Daemon, run
from live.store import OME_GROUP
from tests.live_helpers import SIDE, live_config, push_frames, run_array
from tests.test_recorder import PLANES, SHAPE, _validate

MIB = 2**20


def _mount_tmpfs(where: Path, size_mb: int) -> None:
    """Mount a tmpfs of `size_mb` at `where`, or skip the test saying why it cannot."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small disk to fill")
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"mounting a {size_mb} MB tmpfs is not permitted here (needs root or "
            f"CAP_SYS_ADMIN): {result.stderr.strip()}"
        )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MB file system (tmpfs), unmounted afterwards."""
    where = tmp_path / "disk"
    _mount_tmpfs(where, 6)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _noise_frame(seq: int) -> Message:
    """An incompressible raw frame whose pixels follow from its seq."""
    image = np.random.default_rng(seq).integers(0, 2**16, SHAPE, dtype=np.uint16)
    return decode(encode_frame(image, seq=seq, timestamp_s=500.0 + seq / 4, focus_um=seq / 8))


def _noise_stack(seq: int) -> Message:
    planes = np.random.default_rng(10_000 + seq).random((len(PLANES), *SHAPE), np.float32)
    parts = encode_stack(planes, seq=seq, timestamp_s=500.0 + seq / 4, focus_um=0.0, latency_ms=1.0)
    return decode(parts)


def _present(runs: list[list[int]]) -> list[int]:
    return [s for start, stop in runs for s in range(start, stop)]


def _fill(path: Path, n: int, **kwargs: Any) -> tuple[Recorder, list[int]]:
    """Record `n` noise frames and stacks (a gap at seq 3) into `path`; return the seqs put."""
    rec = Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=0.5,
        rate_hz=4.0,
        planes_um=PLANES,
        compression="none",
        config={"source": {"kind": "test"}},
        **kwargs,
    )
    seqs = [s for s in range(n) if s != 3]
    for seq in seqs:
        assert rec.put_frame(_noise_frame(seq))
        assert rec.put_stack(_noise_stack(seq))
    return rec, seqs


def _assert_truthful(path: Path, summary: Any, seqs: list[int]) -> None:
    """The store says exactly what is on disk, and every frame it lists is the one sent."""
    root = zarr.open_group(path, mode="r")
    deepz = root.attrs["deepz"]
    assert deepz["complete"] is False
    assert deepz["error"] == summary.error and "No space left on device" in summary.error
    raw_seqs, stack_seqs = _present(deepz["raw_present"]), _present(deepz["stacks_present"])
    assert summary.raw_frames == len(raw_seqs) > 0 and summary.stacks == len(stack_seqs)
    assert set(raw_seqs) < set(seqs)  # some, not all, frames made it
    # Time axes end exactly at the last item on disk: no rows that were never written.
    raw, stacks = run_array(path, "raw"), run_array(path, "stacks")
    assert raw.shape[0] == raw_seqs[-1] + 1
    assert stacks.shape[0] == (stack_seqs[-1] + 1 if stack_seqs else 0)
    for seq in raw_seqs:
        assert raw[seq].tobytes() == _noise_frame(seq).array.tobytes()
    for seq in stack_seqs:
        assert stacks[seq].tobytes() == _noise_stack(seq).array.tobytes()
    # Gaps are the real ones (seq 3) plus nothing else before the last frame on disk.
    gaps = deepz["summary"]["raw_gaps"]
    assert [s for a, b in gaps for s in range(a, b)] == missing_seqs(deepz["raw_present"])
    assert deepz["summary"]["raw_gaps"] == ([[3, 4]] if raw_seqs[-1] > 3 else [])
    # Every admitted item is either on disk or counted as not recorded.
    assert summary.unrecorded == 2 * len(seqs) - len(raw_seqs) - len(stack_seqs)
    assert deepz["summary"]["unrecorded"] == summary.unrecorded
    # Frame metadata: known for every frame on disk, never for one that is not.
    stamps = root["frames/timestamp_s"][:]
    assert len(stamps) <= raw.shape[0]
    for seq in range(len(stamps)):
        expected = 500.0 + seq / 4 if seq in raw_seqs else np.nan
        np.testing.assert_equal(stamps[seq], expected)
    assert not (path / OME_GROUP / RESERVE_NAME).exists()


@pytest.mark.parametrize("frames_per_chunk", [1, 4])
def test_a_disk_filled_to_zero_bytes_leaves_a_truthful_store(
    small_disk: Path, frames_per_chunk: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = small_disk / "run.ome.zarr"
    with caplog.at_level(logging.ERROR, logger="live.recorder"):
        rec, seqs = _fill(path, 120, frames_per_chunk=frames_per_chunk)  # ~9 MB for 6 MB
        summary = rec.close(timeout_s=60)

    assert summary.error is not None and summary.error.startswith("writing ")
    assert [r.message.startswith("RECORDER STOPPED") for r in caplog.records] == [True]
    _assert_truthful(path, summary, seqs)
    # The disk really was full: what is free now is the reserve the recorder gave back.
    assert shutil.disk_usage(small_disk).free < (RESERVE_MB + 0.5) * MIB
    _validate(path)  # and the store is still valid OME-Zarr 0.5


def test_the_failure_is_on_disk_before_close(small_disk: Path) -> None:
    # A daemon killed after the disk filled up (no close) still leaves an error, not null.
    path = small_disk / "run.ome.zarr"
    rec, _ = _fill(path, 120)
    deadline = time.monotonic() + 60
    while zarr.open_group(path, mode="r").attrs["deepz"]["error"] is None:
        assert time.monotonic() < deadline, "the failure never reached the store"
        time.sleep(0.05)
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert rec.error is not None and deepz["error"] == rec.error
    assert "No space left on device" in rec.error and deepz["complete"] is False
    assert run_array(path, "raw").shape[0] == _present(deepz["raw_present"])[-1] + 1
    rec.close(timeout_s=60)


def test_enospc_at_the_store_boundary_without_a_small_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where no tmpfs can be mounted: every zarr write goes through zarr's LocalStore `_put`;
    # a quota there counts the store's bytes on disk (the reserve file included) and raises
    # the kernel's ENOSPC once a write would pass it.
    path = tmp_path / "run.ome.zarr"
    quota = 5 * MIB
    put = zarr_local._put

    def bytes_on_disk() -> int:
        # zarr writes on several threads, each to a temporary file it then renames: one
        # listed here may be gone (renamed) by the time it is measured
        used = 0
        for f in path.rglob("*"):
            try:
                used += f.stat().st_size if f.is_file() else 0
            except FileNotFoundError:
                continue
        return used

    def put_with_quota(file: Path, value: Any, exclusive: bool = False) -> int:
        used = bytes_on_disk()
        if used + len(value.as_buffer_like()) > quota:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return put(file, value, exclusive)

    monkeypatch.setattr(zarr_local, "_put", put_with_quota)
    rec, seqs = _fill(path, 60)
    summary = rec.close(timeout_s=60)
    monkeypatch.undo()

    _assert_truthful(path, summary, seqs)


def test_the_daemon_keeps_running_when_its_disk_fills(small_disk: Path, tiny_model_files) -> None:
    config = live_config(
        small_disk.parent,
        tiny_model_files["onnx"],
        recorder={"compression": "none", "min_free_mb": 0},  # no early stop: fill it
    )
    store = small_disk / "run.ome.zarr"
    daemon = Daemon(config, output=store, source=None, preflight_check=False)
    n = 200  # 64² frames + 3-plane stacks: about 10 MB, for a 6 MB disk
    try:
        daemon.start()
        push_frames(config.endpoints.frames, list(range(n)), rate_hz=40.0)
        deadline = time.monotonic() + 120
        while (snap := daemon.metrics.snapshot(advance=False)).stacks_out + snap.skipped < n:
            assert time.monotonic() < deadline, snap
            daemon.supervise(0.2, quiet=True)
    finally:
        summary = daemon.stop()

    assert summary.failures == [] and summary.frames_in == n  # the run went on to the end
    assert snap.stacks_out + snap.skipped == n and summary.stacks_written < snap.stacks_out
    assert summary.stacks_refocused == snap.stacks_out  # refocused, if not all recorded
    rec = summary.recorder
    assert rec["error"] is not None and "No space left on device" in rec["error"]
    assert summary.recording_incomplete == f"the recorder stopped: {rec['error']}"
    assert f"  INCOMPLETE        the recorder stopped: {rec['error']}" in summary.lines()
    deepz = zarr.open_group(store, mode="r").attrs["deepz"]
    assert deepz["complete"] is False and deepz["error"] == rec["error"]
    raw_seqs = _present(deepz["raw_present"])
    assert len(raw_seqs) == summary.raw_recorded < n
    assert raw_seqs == list(range(len(raw_seqs)))  # frames arrived in order: no holes
    assert run_array(store, "raw").shape == (len(raw_seqs), SIDE, SIDE)
    stacked = _present(deepz["stacks_present"])
    assert run_array(store, "stacks").shape[0] == (stacked[-1] + 1 if stacked else 0)
    unrecorded = (n - summary.raw_recorded) + (snap.stacks_out - summary.stacks_written)
    assert rec["unrecorded"] == unrecorded
    assert deepz["run_summary"]["frames_in"] == n  # the daemon's summary made it too


def test_a_run_whose_disk_filled_exits_4(
    small_disk: Path, tiny_model_files: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run goes on to its end, but a script must be able to tell that its recording is
    incomplete: exit code 4 (`EXIT_INCOMPLETE`; review 82: it was 0)."""
    config = live_config(
        small_disk.parent,
        tiny_model_files["onnx"],
        rate_hz=40.0,
        frame_count=200,  # about 10 MB of frames and stacks for a 6 MB disk
        recorder={"compression": "none", "min_free_mb": 0},  # no early stop: fill it
    )
    code = run(config, duration_s=120.0, output=small_disk / "run.ome.zarr", workers=1)
    out = capsys.readouterr().out
    assert code == EXIT_INCOMPLETE, out
    assert "summary (source finished)" in out
    assert "INCOMPLETE        the recorder stopped:" in out and "No space left on device" in out


def test_a_store_folder_that_cannot_say_its_free_space_stops_the_recording_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk unplugged or a stale network mount: ``disk_usage`` raises. The writer thread
    stops recording in one line naming why and lives on; the status reads no figure (None)
    rather than raising, as the daemon's status step and its finish both ask for it (either
    raising stopped the run, or left the store unfinalised)."""
    from live.supervisor import Supervisor

    supervisor = Supervisor()
    rec, seqs = _fill(tmp_path / "run.ome.zarr", 8, min_free_mb=1, supervisor=supervisor)
    deadline = time.monotonic() + 30
    while rec.counts()[0] < len(seqs):  # written while the folder still answers
        assert time.monotonic() < deadline, "the first frames were never written"
        time.sleep(0.05)

    def stale(path: Any) -> Any:
        raise OSError(errno.ESTALE, "Stale file handle", str(path))

    monkeypatch.setattr("live.recorder.shutil.disk_usage", stale)
    assert rec.free_mb() is not None  # as the writer last read it: asking never touches the disk
    seq, deadline = len(seqs), time.monotonic() + 60  # read once a second, failed twice
    while rec.error is None:
        assert time.monotonic() < deadline, "the unreadable free space never stopped recording"
        seq += 1
        rec.put_frame(_noise_frame(seq))
        time.sleep(0.1)
    assert "cannot read the free space" in rec.error
    assert rec.free_mb() is None  # the writer could not read it: the status shows no figure
    monkeypatch.undo()  # the mount answers again: the status shows the disk again
    deadline = time.monotonic() + 30
    while rec.free_mb() is None:
        assert time.monotonic() < deadline, "the free space was never read again"
        time.sleep(0.1)
    assert "Stale file handle" in rec.error
    summary = rec.close(timeout_s=60)
    assert summary.raw_frames >= len(seqs) and supervisor.failures == []
    assert zarr.open_group(tmp_path / "run.ome.zarr", mode="r").attrs["deepz"]["error"] == rec.error


# ------------------------------------------------------- a disk slower than the data, or stalled


def _blocked_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Make the writer thread's item writes wait for a go (a disk that stopped answering).

    Returns (entered, go): `entered` is set once the writer is inside its first write.
    """
    entered, go = threading.Event(), threading.Event()
    put_item = Recorder._put_item

    def blocked(self: Recorder, role: str, seq: int, item: np.ndarray) -> None:
        entered.set()
        go.wait()
        put_item(self, role, seq, item)

    monkeypatch.setattr(Recorder, "_put_item", blocked)
    return entered, go


def test_a_disk_slower_than_the_data_bounds_the_backlog_stacks_first_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's queue holds at most ``max_backlog_mb``: past half of it new stacks are not
    recorded, past all of it new raw frames neither, each counted (unrecorded, and by image)
    and said; the frames it took are written whole once the disk answers (the queue had no
    bound: a slow disk grew the daemon's memory until it was killed, every frame lost)."""
    entered, go = _blocked_writes(monkeypatch)
    path = tmp_path / "run.ome.zarr"
    rec, _ = _fill(path, 0, max_backlog_mb=0.2, stack_dtype="float32")  # 64x80: 10 / 60 kB
    assert rec.put_frame(_noise_frame(0))
    assert entered.wait(30)  # the writer holds frame 0 and waits: all else queues
    n = 40
    for seq in range(1, n + 1):
        rec.put_frame(_noise_frame(seq))
        rec.put_stack(_noise_stack(seq))
    go.set()
    summary = rec.close(timeout_s=60)

    dropped = summary.backlog_dropped
    assert dropped["stacks"] > dropped["raw"] > 0  # derived data goes first
    assert summary.raw_frames + dropped["raw"] == n + 1
    assert summary.stacks + dropped["stacks"] == n
    assert summary.error is None and summary.unrecorded == dropped["raw"] + dropped["stacks"]
    assert "backlog full" in summary.line()
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["summary"]["backlog_dropped"] == dropped
    assert deepz["complete"] is False  # frames admitted and not on disk (review 77: said True)
    raw_seqs = _present(deepz["raw_present"])
    assert raw_seqs == list(range(summary.raw_frames))  # the first ones, while there was room
    raw = run_array(path, "raw")
    for seq in raw_seqs:
        assert np.array_equal(raw[seq], _noise_frame(seq).array)
    # a frame not recorded keeps its time and focus: its stack may be in the store
    stamps = zarr.open_group(path, mode="r")["frames/timestamp_s"][:]
    np.testing.assert_array_equal(stamps[: n + 1], [500.0 + s / 4 for s in range(n + 1)])


def _hung_raw_writes() -> tuple[Any, threading.Event, threading.Event]:
    """zarr's file write made to block on raw chunks until `go` (a disk that stopped answering).

    Returns (the write to put in place of ``zarr.storage._local._put``, `entered`, set once a
    raw chunk's write has begun, `go`). The hang is below the recorder, where the kernel's is.
    """
    put, entered, go = zarr_local._put, threading.Event(), threading.Event()

    def hung(file: Path, value: Any, exclusive: bool = False) -> int:
        if "/0/0/c/" in str(file).replace("\\", "/"):  # a raw chunk: the disk stops here
            entered.set()
            go.wait()
        return put(file, value, exclusive)

    return hung, entered, go


def test_close_gives_up_on_a_disk_that_stopped_answering_and_still_returns_a_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write the disk never answers (a hung network mount; here zarr's own file write
    blocks): close stops waiting once no write has finished for ``stall_s``, fails the
    recorder naming it and returns a summary from memory, asking nothing of the disk (close
    waited for ever: the daemon never ended), and leaves the lock file for the next writer.
    When the disk answers again the writer, the store's one writer, cuts it to what it holds:
    no row claimed that is not on disk."""
    from live.store_lock import lock_path

    hung, entered, go = _hung_raw_writes()
    monkeypatch.setattr(zarr_local, "_put", hung)
    path = tmp_path / "run.ome.zarr"
    rec, _ = _fill(path, 0)
    assert rec.put_frame(_noise_frame(0)) and rec.put_frame(_noise_frame(1))
    assert entered.wait(30)
    try:
        summary = rec.close(stall_s=1.0)
        rec.release()
        assert rec.stuck and summary.error is not None
        assert "the disk stopped answering" in summary.error and summary.unrecorded == 2
        assert lock_path(path).exists()
    finally:
        go.set()
    rec._thread.join(30)  # the disk answers again: the writer finishes what it was doing
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["error"] == summary.error and deepz["complete"] is False
    present = _present(deepz["raw_present"])
    assert run_array(path, "raw").shape[0] == (present[-1] + 1 if present else 0)


def test_a_passing_write_fault_is_tried_again_and_recording_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One EIO on a stacks write (a flaky disk or network mount) is tried once more: every
    frame and stack is recorded and the store is complete (one failed write stopped all
    recording, raw frames included, for the rest of the run)."""
    put, failed = zarr_local._put, []

    def flaky(file: Path, value: Any, exclusive: bool = False) -> int:
        if not failed and "/1/0/c/" in str(file).replace("\\", "/"):  # the first stack chunk
            failed.append(file)
            raise OSError(errno.EIO, "Input/output error", str(file))
        return put(file, value, exclusive)

    monkeypatch.setattr(zarr_local, "_put", flaky)
    path = tmp_path / "run.ome.zarr"
    with caplog.at_level(logging.WARNING, logger="live.recorder"):
        rec, seqs = _fill(path, 12)
        summary = rec.close(timeout_s=60)
    assert failed and "trying once more" in caplog.text
    assert summary.error is None and summary.unrecorded == 0
    assert (summary.raw_frames, summary.stacks) == (len(seqs), len(seqs))
    assert zarr.open_group(path, mode="r").attrs["deepz"]["complete"] is True


def test_a_process_whose_recorder_disk_hung_still_ends(tmp_path: Path) -> None:
    """With a write the disk never answers, zarr's I/O thread stays blocked and Python joins
    it at exit: the daemon printed its summary and then never ended. `exit_if_hung`
    ends it with its exit code (a process of its own here, as the daemon is)."""
    script = f"""
import zarr.storage._local as zl
from live.run import exit_if_hung
from tests.test_disk_full import _fill, _hung_raw_writes, _noise_frame
zl._put, entered, _ = _hung_raw_writes()  # never let go
rec, _ = _fill({str(tmp_path / "run.ome.zarr")!r}, 0)
rec.put_frame(_noise_frame(0))
entered.wait(30)
rec.close(stall_s=1.0)
exit_if_hung(rec, 3)
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the disk is not answering" in done.stderr or "not answering" in done.stderr


def test_the_daemon_ends_with_its_summary_when_its_disk_stops_answering(
    tmp_path: Path, tiny_model_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung mount under a running daemon: raw writes never return. The run goes on, and at
    its end the daemon stops waiting for the recorder after ``recorder.stall_s``, asks nothing
    more of that disk (no run summary, no preview, the lock file left) and returns its
    summary with the recorder's error (it waited for ever)."""
    from live.store_lock import lock_path

    hung, entered, go = _hung_raw_writes()
    config = live_config(
        tmp_path, tiny_model_files["onnx"], recorder={"compression": "none", "stall_s": 1.0}
    )
    store = tmp_path / "run.ome.zarr"
    daemon = Daemon(config, output=store, source=None, preflight_check=False)
    n = 20
    monkeypatch.setattr(zarr_local, "_put", hung)
    try:
        try:
            daemon.start()
            push_frames(config.endpoints.frames, list(range(n)), rate_hz=40.0)
            deadline = time.monotonic() + 120
            while (snap := daemon.metrics.snapshot(advance=False)).stacks_out + snap.skipped < n:
                assert time.monotonic() < deadline, snap
                daemon.supervise(0.2, quiet=True)
        finally:
            summary = daemon.stop()
        assert entered.is_set() and summary.failures == [] and summary.frames_in == n
        assert daemon.recorder is not None and daemon.recorder.stuck
        assert "the disk stopped answering" in summary.recorder["error"]
        assert summary.preview is None and lock_path(store).exists()
    finally:
        go.set()
        if daemon.recorder is not None:
            daemon.recorder._thread.join(30)
    assert "run_summary" not in zarr.open_group(store, mode="r").attrs["deepz"]


def test_one_unreadable_free_space_is_read_again_and_recording_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passing fault reading the free space (the writer reads it every second, for the
    status) is read again a second later; only two in a row stop the recording."""
    failures: list[str] = []
    disk_usage = shutil.disk_usage

    def once(path: Any) -> Any:
        if not failures:
            failures.append(str(path))
            raise OSError(errno.EIO, "Input/output error", str(path))
        return disk_usage(path)

    rec, seqs = _fill(tmp_path / "run.ome.zarr", 6)
    monkeypatch.setattr("live.recorder.shutil.disk_usage", once)
    deadline = time.monotonic() + 30
    while len(failures) == 0 or rec.free_mb() is None:  # failed once, then read again
        assert time.monotonic() < deadline, "the free space was not read again"
        time.sleep(0.1)
    summary = rec.close(timeout_s=60)
    assert summary.error is None and summary.raw_frames == len(seqs)


def test_a_hung_disk_bounds_even_the_frames_time_and_focus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames refused for a full backlog keep their time and focus, as items of their own:
    those are bounded too (a sixteenth of the limit), or a disk that stopped answering
    mid-run let them pile up for the rest of the run."""
    entered, go = _blocked_writes(monkeypatch)
    rec, _ = _fill(tmp_path / "run.ome.zarr", 0, max_backlog_mb=0.05, keep_stacks=False)
    assert rec.put_frame(_noise_frame(0))
    assert entered.wait(30)
    try:
        for seq in range(1, 500):
            rec.put_frame(_noise_frame(seq))
        # 0.05 MB: five 10 kB frames, and 3.2 kB of time and focus at 256 B an item
        assert rec.backlog <= 5 + 13
    finally:
        go.set()
    summary = rec.close(timeout_s=60)
    assert summary.raw_frames + summary.backlog_dropped["raw"] == 500
    assert summary.backlog_dropped["metadata"] > 0


def test_a_process_whose_source_read_hung_still_ends() -> None:
    """A replayed recording on a hung mount: the source's read never returns and holds a
    thread Python joins at exit (review 67: the summary printed, the process never ended).
    `exit_if_hung` with `Daemon.source_hung` ends it with its exit code."""
    script = """
import threading
from live.run import exit_if_hung
threading.Thread(target=threading.Event().wait).start()  # as zarr's I/O thread, stuck
exit_if_hung(None, 4, source_hung=True)
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 4, done.stderr[-2000:]
    assert "the source is stuck in a read" in done.stderr
