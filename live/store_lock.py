"""One writer a store: the lock file a writer of a run's store holds while it writes it.

Two writers of one OME-Zarr store at once would interleave chunks and completion marks and
each rewrite the store's image list: two offline refocusing jobs, or one beside the live
recorder still writing the run. So each holds ``<store>.writer.lock`` (beside the store, not
in it: zarr would list a foreign file in the hierarchy) while it writes: the live recorder from
opening the run's store until it has finalised it, an offline job's driver from before it opens
its output until it has written its presence (its chunk tasks, in whatever process or
cluster, only read it: `held_by`, before each write). The file names the holder: what it is,
its pid, host, start time and, for a job, its token.

How a second job is refused, and when a lock left behind is taken over:

- Where the file system has the kernel's ``flock`` (Linux, macOS, most local disks), the
  kernel lock decides: held means another job runs (refused, naming it); free means nobody on
  this machine holds it, so a file left by a killed job is taken over, said. A file naming
  another host is refused, naming the file to delete: a network file system's locks may be
  local only, so the other job cannot be checked from here.
- Without it (Windows, some network or FUSE mounts) the file's existence is the lock: it is
  created exclusively, and one left behind is taken over only when it names a process of this
  machine that has ended (never on Windows, where no process can be probed without side
  effects); otherwise the refusal names the file to delete.

A store behind a URL (object stores have no locks) is not guarded; the caller says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from live.supervisor import process_exists

__all__ = [
    "LOCK_SUFFIX",
    "RECORDER_ROLE",
    "REFOCUS_ROLE",
    "StoreLocked",
    "held_by",
    "lock_path",
    "write_lock",
]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".writer.lock"
"""Appended to a store's path to name its lock file (``run.ome.zarr.writer.lock``)."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
"""Open flag refusing a symbolic link (0 where the OS has none: Windows)."""
_TRIES = 5
"""Attempts to take a lock file that another job removes or creates as this one opens it."""


class StoreLocked(Exception):
    """Another job writes the store, or may: one line naming it and what to do."""


@dataclass(frozen=True)
class _Holder:
    """Who holds a store's lock, as its lock file says."""

    pid: int
    host: str
    started: str
    role: str = "another job"
    """What holds it, as a refusal names it ("the live recorder", "another refocusing job")."""

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


def lock_path(store: str | os.PathLike[str]) -> Path:
    """Return the lock file of a local `store`: beside it, its name plus `LOCK_SUFFIX`."""
    path = Path(store)
    return path.with_name(path.name + LOCK_SUFFIX)


REFOCUS_ROLE = "another refocusing job"
"""How a refusal names an offline refocusing job holding the lock (`write_lock`'s default)."""
RECORDER_ROLE = "the live recorder"
"""How a refusal names the daemon's recorder holding the lock of the run it records."""


@contextlib.contextmanager
def write_lock(
    store: str | os.PathLike[str], role: str = REFOCUS_ROLE, job: str | None = None
) -> Iterator[None]:
    """Hold `store`'s lock file for the block, or raise `StoreLocked` naming its holder.

    `role` is what this writer is, as another's refusal will name it; `job`, a token the
    file records, lets the writer's own tasks check that it still holds the store
    (`held_by`). The store need not exist yet; its parent folder is made if missing.
    Released (the file removed) however the block ends.
    """
    path = lock_path(store)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreLocked(f"{store}: cannot make the folder of its lock file: {exc}") from None
    fd, kernel = _acquire(str(store), path, role, job)
    try:
        yield
    finally:
        _release(fd, path, kernel)


def _acquire(store: str, path: Path, role: str, job: str | None) -> tuple[int, bool]:
    """Open, lock and claim `path`; return its descriptor and whether the kernel locks it."""
    for _ in range(_TRIES):
        try:  # created here: nobody held it; else opened as it stands
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:  # never through a link: the holder's JSON would be written over its target
                fd, created = os.open(path, os.O_RDWR | _NOFOLLOW), False
            except FileNotFoundError:  # its holder removed it as we looked: look again
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                    raise StoreLocked(
                        f"{store}: its lock file {path} is a symbolic link: move it away"
                    ) from None
                raise StoreLocked(f"{store}: cannot open its lock file {path}: {exc}") from None
            plain = stat.S_ISREG(os.fstat(fd).st_mode)
            if not plain:
                os.close(fd)
                raise StoreLocked(
                    f"{store}: its lock file {path} is not a plain file (a folder or device): "
                    "move it away"
                ) from None
        except OSError as exc:
            raise StoreLocked(f"{store}: cannot create its lock file {path}: {exc}") from None
        try:
            kernel = _flock(fd)
            if kernel is False:
                raise _busy(store, path, _read_holder(fd), checked=True)
            if not _same_file(fd, path):  # removed or replaced since we opened it: again
                os.close(fd)
                continue
            if not created:
                holder = _read_holder(fd)
                _check_stale(store, path, holder, kernel is True)
                if kernel is not True:  # nothing makes taking it over exclusive: set it aside
                    stale = os.fstat(fd)
                    os.close(fd)
                    if _set_aside(path, stale):
                        _said_taken(store, holder)
                    continue  # and create it anew: one job's exclusive create wins
                _said_taken(store, holder)
            _write_holder(fd, role, job)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return fd, kernel is True
    raise StoreLocked(f"{store}: its lock file {path} keeps changing: is another job starting?")


def _release(fd: int, path: Path, kernel: bool) -> None:
    """Remove our lock file and close it; a failure to remove is said, never raised.

    Under the kernel's lock the file is removed before it is closed: a job that opened it
    meanwhile gets the lock only after the close, sees the file gone and tries again. Windows
    cannot remove a file that is open, so there it is closed first.
    """
    try:
        ours = _same_file(fd, path)
        if not kernel:
            os.close(fd)
        if ours:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove the lock file %s: %s (delete it by hand)", path, exc)
    finally:
        if kernel:
            with contextlib.suppress(OSError):
                os.close(fd)


def _check_stale(store: str, path: Path, holder: _Holder | None, kernel_free: bool) -> None:
    """Refuse a lock file that names a job that may still run; return if it is stale.

    `kernel_free`: the kernel's lock on the file was free, so no process of this machine
    holds it (whatever its pid means now: pids are reused).
    """
    if holder is not None and holder.host != _host():
        raise _busy(store, path, holder, checked=False)
    if kernel_free or (holder is not None and not process_exists(holder.pid)):
        return
    raise _busy(store, path, holder, checked=holder is not None and os.name != "nt")


def _set_aside(path: Path, stale: os.stat_result) -> bool:
    """Move a stale lock file out of the way; False if another job got there first.

    Without the kernel's lock two jobs may both find the same stale file; renaming it is
    atomic, so one of them moves it. A job that finds it moved a file that is not the one it
    read (another job's fresh lock, made since) puts it back.
    """
    aside = path.with_name(f"{path.name}.{secrets.token_hex(8)}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = os.stat(aside)
    if (moved.st_dev, moved.st_ino) != (stale.st_dev, stale.st_ino):
        with contextlib.suppress(OSError):  # Windows: a newer lock there already stays
            os.rename(aside, path)
        return False
    with contextlib.suppress(OSError):
        aside.unlink()
    return True


def _said_taken(store: str, holder: _Holder | None) -> None:
    """Say that a lock left by a job that ended is taken over."""
    log.warning(
        "%s: taking over the lock of %s that ended without removing it (%s)",
        store,
        holder.role if holder is not None else "a job",
        holder or "it had not said who it was",
    )


def _busy(store: str, path: Path, holder: _Holder | None, *, checked: bool) -> StoreLocked:
    """Return the refusal of a store another job writes, naming it and what to do.

    `checked`: that job is known to run (the kernel's lock, or its pid alive here); else it
    cannot be checked from here, and the file to delete once it has ended is named.
    """
    role = holder.role if holder is not None else "another job"
    who = holder or "one that has not said who it is yet"
    if checked:
        return StoreLocked(f"{store} is being written by {role} ({who}): wait for it to end")
    return StoreLocked(
        f"{store} is locked by {role} that cannot be checked from here ({who}): if it has "
        f"ended, delete {path}"
    )


def _flock(fd: int) -> bool | None:
    """Take the kernel's exclusive lock on `fd` without waiting: True, False (held), None.

    None: the OS has no ``flock`` (Windows) or the file system refuses it (some network or
    FUSE mounts).
    """
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since)."""
    try:
        here, there = os.fstat(fd), path.stat()
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> _Holder | None:
    """Return the holder a lock file names, or None when it is empty or not one of ours."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"null")
        if not isinstance(data, dict):
            return None
        # written by whoever could write the folder: each field one short line, not a page
        role = _one_line(data.get("role", "another job"))
        host, started = _one_line(data["host"]), _one_line(data["started"])
        return _Holder(int(data["pid"]), host, started, role)
    except (OSError, ValueError, TypeError, KeyError):  # empty, cut short or hostile
        return None


def held_by(store: str | os.PathLike[str], job: str) -> bool:
    """Whether `store`'s lock file still names `job` (a task checks before it writes).

    A job's chunk tasks run on threads, processes or a cluster that its driver cannot stop:
    one still running when its job has ended (a failed chunk, Ctrl-C) must not write into a
    store another job now holds. Read only, from any process that sees the store's folder.
    """
    try:
        data = json.loads(lock_path(store).read_bytes()[:4096] or b"null")
    except (OSError, ValueError):  # gone (released), or cut short
        return False
    return isinstance(data, dict) and data.get("job") == job


def _one_line(value: object) -> str:
    """Return a lock file's field as at most 80 printable characters."""
    return "".join(c if c.isprintable() else "?" for c in str(value))[:80]


def _write_holder(fd: int, role: str, job: str | None) -> None:
    """Write this process into its lock file, on disk (hosts sharing the store read it)."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    holder = {"pid": os.getpid(), "host": _host(), "started": started, "role": role}
    text = json.dumps(holder if job is None else {**holder, "job": job})
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())
    os.fsync(fd)


def _host() -> str:
    """Return the name of this machine, as lock files name it."""
    return platform.node()
