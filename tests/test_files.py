"""engine.files: a file written atomically is whole or as it was, whoever else writes it."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from engine import files
from engine.files import atomic_write, atomic_write_bytes, atomic_write_text


def test_the_content_is_written_and_the_writers_result_returned(tmp_path: Path) -> None:
    text, data, made = tmp_path / "a.json", tmp_path / "b.plan", tmp_path / "c.bin"
    atomic_write_text(text, '{"µm": 1}\n')
    atomic_write_bytes(data, b"\x00plan")
    atomic_write_bytes(data, b"\x00new plan")  # over an existing file

    def write(tmp: Path) -> int:
        with tmp.open("wb") as f:  # the temporary exists already: opened by name, truncated
            return f.write(b"by a writer")

    assert atomic_write(made, write) == len(b"by a writer")
    assert text.read_bytes() == '{"µm": 1}\n'.encode()  # UTF-8, no newline translation
    assert data.read_bytes() == b"\x00new plan" and made.read_bytes() == b"by a writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.plan", "c.bin"]


def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"old weights")
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # the temporary was beside the target (one file system: a rename, never a copy), hidden
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".weights.pt.")


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")

    def fail(src: object, dst: object) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(files.os, "replace", fail)
    with pytest.raises(PermissionError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_two_threads_writing_one_file_at_once_both_succeed_and_one_version_wins_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "timing.cache"
    versions = [bytes([i]) * (1 << 20) for i in (1, 2)]
    both_writing = threading.Barrier(2, timeout=10)  # each holds its temporary open at once
    errors: list[BaseException] = []

    def write_version(data: bytes) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                f.write(data[: len(data) // 2])
                both_writing.wait()
                f.write(data[len(data) // 2 :])

        try:
            atomic_write(path, write)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write_version, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert path.read_bytes() in versions
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_file_is_flushed_renamed_and_its_directory_entry_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Durable: the file's data reach the disk before the rename, the rename after it."""
    path = tmp_path / "checkpoint.pt"
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def logged_replace(src: str | Path, dst: str | Path) -> None:
        events.append("replace")
        replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", logged_fsync)
    monkeypatch.setattr(files.os, "replace", logged_replace)
    atomic_write_bytes(path, b"state")
    assert events == ["fsync file", "replace", "fsync folder"]
    assert path.name in os.listdir(tmp_path) and path.read_bytes() == b"state"
    events.clear()
    atomic_write_bytes(path, b"metadata", durable=False)  # atomic for readers alone
    assert events == ["replace"] and path.read_bytes() == b"metadata"


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_file_has_the_mode_of_a_plain_open(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "preview.png"
    previous = os.umask(umask)
    try:
        atomic_write(path, lambda tmp: tmp.write_bytes(b"png"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_an_npy_is_written_under_its_own_name_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PSF banks go through `atomic_save_npy`: under exactly the name asked for (np.save
    appends ``.npy`` to a name without it), and a write that fails half way (a full disk
    during a bank copy) leaves the bank there was, which loaders still read (review 55: a
    truncated bank beside a new model, and no model that loaded)."""
    import numpy as np

    from engine.files import atomic_save_npy

    path = tmp_path / "model.psf.npy"
    old = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_save_npy(path, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.psf.npy"]
    np.testing.assert_array_equal(np.load(path), old)

    def full_disk(f: object, array: object) -> None:
        f.write(b"\x93NUMPY half")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_save_npy(path, np.zeros((3, 4), np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.psf.npy"]
