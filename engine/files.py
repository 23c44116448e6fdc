"""Write a file atomically: a reader, a crash or a power loss leaves the old file or the new one.

The one home of the pattern the weights, checkpoints, exported models, TensorRT caches and the
recording's metadata all use: write a temporary file beside the target, flush it to the disk,
rename it over the target in one step (`os.replace`), then flush the directory entry. A
temporary name is new on every call, so threads and processes writing the same target at once
never share one and the last rename wins whole; a writer that raises removes its temporary and
leaves the target as it was. Standard library only: `live` imports this beside its recorder.

Also the one home of the check every command line makes of its output paths before its work
(`out_dir_problem`): a run that learns only at its end that it cannot write its report, or
that stops with a traceback, has spent its minutes for nothing.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "out_dir_problem",
]

T = TypeVar("T")


def _temporary_path(path: Path) -> Path:
    """Return a fresh temporary name beside `path`: hidden, ending ``.tmp``, 64 random bits.

    Beside, so that the rename stays on one file system (never a copy); hidden and ending
    ``.tmp``, so that it reads as no model or cache entry to anyone listing the folder (and
    ``onnx.save_model`` infers no other format from its suffix).
    """
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], T], *, durable: bool = True
) -> T:
    """Call ``write(tmp)`` to fill a temporary file beside `path`, then move it over `path`.

    `write` is given the path of a new, empty file (mode 0o666 less the umask, as a plain
    ``open(path, "w")`` would make it, not ``mkstemp``'s owner-only 0o600) and may open it by
    name or replace it (``torch.save``, ``onnx.save_model``, ``Path.write_bytes``); what it
    returns is returned. When `write` or the rename raises, the temporary is removed, `path`
    is left as it was and the error propagates. The parent folder must exist.

    ``durable`` (the default) fsyncs the file before the rename and the folder after it, where
    the OS allows a folder to be opened: without that a power loss can leave an empty file
    under the new name on some file systems. ``False`` keeps the all-or-nothing view for
    readers and processes that die, without the flush to the disk (which can stall a thread
    for seconds behind a recorder's other dirty pages).
    """
    target = Path(path)
    tmp = _temporary_path(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # claims the name
    try:
        result = write(tmp)
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(target.parent)
    return result


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            f.write(data)

    atomic_write(path, write, durable=durable)


def atomic_save_npy(path: str | os.PathLike[str], array: Any, *, durable: bool = True) -> None:
    """Write `array` to `path` as .npy atomically (see `atomic_write`).

    ``np.save`` writes into the file it is handed: given the temporary's name, which does
    not end in ``.npy``, it would write another file.
    """
    import numpy as np

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    atomic_write(path, write, durable=durable)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", durable: bool = True
) -> None:
    """Write `text` to `path` atomically, encoded as is (newlines are not translated)."""
    atomic_write_bytes(path, text.encode(encoding), durable=durable)


def out_dir_problem(out_dir: str | os.PathLike[str], files: Iterable[str] = ()) -> str | None:
    """Say why a command could not make `out_dir` and write `files` in it (None: it can).

    Checked before the work, so that a run refuses at once in one line what would otherwise
    be a FileExistsError or IsADirectoryError traceback once the work is done. The nearest
    existing folder on the way must be a folder this process may write: a file there (an
    ``--out`` naming the config, say) cannot be made into a folder. Each of `files` (names in
    `out_dir`) must not be a folder, and one that exists must be writable. A single output
    file is ``out_dir_problem(path.parent, [path.name])``.
    """
    out = Path(out_dir)
    for path in (out, *out.absolute().parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "" if path == out else f"{out}: "
            return f"{where}{path} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{out}: cannot write in {path}"
        break
    for name in files:
        target = out / name
        if target.is_dir():
            return f"{target} is a folder, not a file"
        if target.exists() and not os.access(target, os.W_OK):
            return f"{target}: cannot write it"
    return None


def _fsync_file(path: Path) -> None:
    """Flush the file at `path` to the disk (Windows flushes only a handle open for writing)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Flush `folder`'s entries (the rename) to the disk, where the OS lets a folder be opened.

    Windows cannot open a folder this way, and some file systems refuse to fsync one; the
    rename has happened either way, so neither is an error.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
