"""live.store_lock: one writer a store, with the kernel's locks and without them."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

import live.store_lock as sl
from live.store_lock import StoreLocked, lock_path, write_lock
from tests.live_helpers import HOST, dead_pid, leave_lock


def test_the_lock_is_beside_the_store_and_names_its_holder_while_held(tmp_path: Path) -> None:
    """Beside the store (zarr lists nothing foreign inside it), made with its parent folder,
    naming this process while held, gone after, also after the block raised."""
    store = tmp_path / "new" / "run.ome.zarr"
    assert lock_path(store) == tmp_path / "new" / "run.ome.zarr.writer.lock"
    with write_lock(store):
        held = json.loads(lock_path(store).read_text(encoding="utf-8"))
        assert (held["pid"], held["host"]) == (os.getpid(), HOST)
        assert not store.exists()  # the lock makes no store
    assert not lock_path(store).exists()
    with pytest.raises(KeyError), write_lock(store):
        raise KeyError("the job failed")
    assert not lock_path(store).exists()


def test_a_store_another_process_holds_is_refused_naming_it(
    tmp_path: Path, lock_holder: Any
) -> None:
    store = tmp_path / "run.ome.zarr"
    proc = lock_holder(store)
    said = f"{store} is being written by another refocusing job (pid {proc.pid} on {HOST}"
    with pytest.raises(StoreLocked, match=re.escape(said)), write_lock(store):
        pass
    proc.communicate(timeout=60)
    assert not lock_path(store).exists()
    with write_lock(store):
        assert lock_path(store).exists()


def test_a_lock_left_behind_is_taken_over_here_and_refused_from_another_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "run.ome.zarr"
    dead = dead_pid()
    leave_lock(store, dead)
    with caplog.at_level(logging.WARNING, logger="live.store_lock"), write_lock(store):
        pass
    taken = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert len(taken) == 1 and f"pid {dead} on {HOST}" in taken[0]
    assert not lock_path(store).exists()
    leave_lock(store, dead, host="another-host.invalid")
    message = f"another job that cannot be checked from here (pid {dead} on another-host.invalid"
    with (
        pytest.raises(StoreLocked, match=re.escape(message) + ".*delete .*writer.lock"),
        write_lock(store),
    ):
        pass
    assert lock_path(store).exists()  # not ours to remove


def test_without_kernel_locks_the_file_is_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``flock`` (Windows, some network mounts): a live process of this machine holds the
    store; a dead one's file is taken over; an empty file (a job that has not written itself
    yet) and a pid no process can have are handled; two jobs never both get the store."""
    monkeypatch.setattr(sl, "_flock", lambda fd: None)
    store = tmp_path / "out.ome.zarr"
    leave_lock(store, os.getpid())
    with (
        pytest.raises(StoreLocked, match=f"being written .*pid {os.getpid()} on {HOST}"),
        write_lock(store),
    ):
        pass
    leave_lock(store, dead_pid())
    with write_lock(store):
        held = json.loads(lock_path(store).read_text(encoding="utf-8"))
        assert held["pid"] == os.getpid()
        # a second job meanwhile, in this very process: its file exists and names us
        with pytest.raises(StoreLocked, match="being written"), write_lock(store):
            pass
    assert not lock_path(store).exists()
    lock_path(store).write_text("", encoding="utf-8")
    with pytest.raises(StoreLocked, match=r"not said who it is yet.*delete"), write_lock(store):
        pass
    for hostile in ("[1, 2]", '"text"', '{"pid": "x"}'):  # not a holder: names no one
        lock_path(store).write_text(hostile, encoding="utf-8")
        with pytest.raises(StoreLocked, match="not said who it is yet"), write_lock(store):
            pass
    leave_lock(store, 2**80)  # hostile: no process can have it (os.kill would overflow)
    with write_lock(store):
        pass

    # two jobs at once: both try to create the file; exactly one gets it
    lock_path(store).unlink(missing_ok=True)
    results: list[str] = []
    barrier = threading.Barrier(2)

    def job() -> None:
        barrier.wait()
        try:
            with write_lock(store):
                results.append("held")
                barrier_inner.wait(timeout=10)
        except StoreLocked:
            results.append("refused")
            barrier_inner.wait(timeout=10)

    barrier_inner = threading.Barrier(2)
    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == ["held", "refused"]


def test_without_kernel_locks_the_file_is_closed_before_it_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows cannot remove an open file: where there is no kernel lock the release closes
    the descriptor first; a removal that fails is said, not raised, and the descriptor is
    closed all the same."""
    monkeypatch.setattr(sl, "_flock", lambda fd: None)
    store = tmp_path / "run.ome.zarr"
    opened: list[int] = []
    real_open = os.open

    def tracking_open(*args: Any, **kwargs: Any) -> int:
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        return fd

    def unlink_refused_while_open(self: Path, missing_ok: bool = False) -> None:
        for fd in opened:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed already, as Windows needs
        raise PermissionError("[WinError 32] in use")

    monkeypatch.setattr(sl.os, "open", tracking_open)
    monkeypatch.setattr(Path, "unlink", unlink_refused_while_open)
    with write_lock(store):
        pass
    monkeypatch.undo()
    assert lock_path(store).exists()  # left, and said: the next job names it


def test_a_store_whose_lock_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    with pytest.raises(StoreLocked, match="cannot make the folder of its lock file") as info:
        with write_lock(blocker / "run.ome.zarr"):
            pass
    assert "\n" not in str(info.value)


def test_without_kernel_locks_one_of_two_jobs_takes_over_a_stale_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two jobs find the same stale lock file at once (each has read its dead holder before
    either acts): setting it aside is atomic, so one job takes the store and the other is
    refused naming it; only the winner says it took the lock over."""
    monkeypatch.setattr(sl, "_flock", lambda fd: None)
    store = tmp_path / "run.ome.zarr"
    leave_lock(store, dead_pid())
    both_read = threading.Barrier(2, timeout=10)
    check = sl._check_stale

    def check_then_wait(*args: Any) -> None:
        check(*args)
        both_read.wait()

    monkeypatch.setattr(sl, "_check_stale", check_then_wait)
    results: list[str] = []
    inside = threading.Barrier(2, timeout=10)

    def job() -> None:
        try:
            with write_lock(store):
                results.append("held")
                inside.wait()
        except StoreLocked:
            results.append("refused")
            inside.wait()

    threads = [threading.Thread(target=job) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="live.store_lock"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert sorted(results) == ["held", "refused"]
    assert sum("taking over" in r.getMessage() for r in caplog.records) == 1
    assert not lock_path(store).exists()
    assert list(tmp_path.glob("*.stale")) == []


def test_a_lock_path_that_is_a_link_or_a_folder_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    # (review 61: the holder's JSON was written over the link's target)
    store = tmp_path / "run.ome.zarr"
    victim = tmp_path / "precious.txt"
    victim.write_text("precious data", encoding="utf-8")
    lock_path(store).symlink_to(victim)
    with pytest.raises(StoreLocked, match=r"is a symbolic link: move it away"), write_lock(store):
        pass
    assert victim.read_text(encoding="utf-8") == "precious data"
    lock_path(store).unlink()
    lock_path(store).mkdir()
    with pytest.raises(StoreLocked, match=r"lock file .* is not a plain file|cannot open"):
        with write_lock(store):
            pass


def test_a_hostile_holder_in_a_lock_file_is_told_in_one_short_line(tmp_path: Path) -> None:
    store = tmp_path / "run.ome.zarr"
    holder = {
        "pid": 1,
        "host": "elsewhere\nTraceback: fake" + "x" * 3000,
        "started": "\x1b[2J",
        "role": "r\nr",
    }
    lock_path(store).write_text(json.dumps(holder), encoding="utf-8")
    with pytest.raises(StoreLocked) as refused, write_lock(store):
        pass
    text = str(refused.value)
    assert "\n" not in text and "\x1b" not in text and len(text) < 600
