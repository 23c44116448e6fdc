"""No thread dies silently: the daemon's long-lived threads run under a `Supervisor`.

A Python thread that raises prints a traceback to stderr and is gone; nothing else notices,
and a daemon whose router thread died would go on to the end of its run and call the
recording complete. Each long-lived thread of the daemon (router, collector, recorder writer,
status publisher, source) therefore runs its body inside `Supervisor.watch`, which logs an
unexpected exception with the component's name and traceback, counts it and calls the
daemon's ``on_failure`` hook: the daemon stops the run, exits non-zero and marks the store
incomplete with the reason. (Worker processes are supervised by the daemon itself: a dead
worker is restarted and its frames counted as lost; a worker's own receive thread that fails
takes its process down with it, so the same restart applies.)

A process that is SIGKILLed runs no cleanup at all, so the daemon's private ipc directory
(its worker sockets) would stay in the temp folder for good. `make_ipc_dir` therefore names the
directory after its owner, ``deepz-<pid>-<start>-<random>`` (``start``: the process's start time
in clock ticks since boot, so a recycled pid is not taken for the owner), and
`remove_stale_ipc_dirs` deletes the ones whose owner is gone; the daemon calls it when it starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "IPC_PREFIX",
    "Failure",
    "IpcDir",
    "Supervisor",
    "make_ipc_dir",
    "process_exists",
    "process_start_ticks",
    "remove_stale_ipc_dirs",
]

IPC_PREFIX = "deepz-"
"""Start of the name of every ipc directory the daemon makes in the temp folder."""
_IPC_NAME = re.compile(r"deepz-(\d{1,10})-(\d{1,20})-[a-z0-9_]{8}")
"""A directory made by `make_ipc_dir` (``tempfile.mkdtemp``'s 8 random characters at the end)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """One unexpected exception of a supervised component."""

    component: str
    error: str
    """``"TypeName: message"`` on one line."""

    def reason(self) -> str:
        """Say what failed, in one line (the store's ``run_error`` and the finish reason)."""
        return f"{self.component} thread failed: {self.error}"


class Supervisor:
    """Collects the failures of supervised threads and tells the daemon about the first.

    Parameters
    ----------
    on_failure : callable, optional
        Called with each `Failure`, from the failing thread, after it is logged and counted
        (the daemon's hook stops the run; it must not block).
    """

    def __init__(self, on_failure: Callable[[Failure], None] | None = None) -> None:
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._failures: list[Failure] = []

    @property
    def failures(self) -> list[Failure]:
        """Every failure so far, in order."""
        with self._lock:
            return list(self._failures)

    @contextmanager
    def watch(self, component: str) -> Iterator[None]:
        """Run the body of a long-lived thread; report any exception instead of dying silently.

        The exception is not re-raised: the thread ends, its ``finally`` blocks having run,
        and the daemon decides what happens next (see `report`).
        """
        try:
            yield
        except Exception as err:  # deliberately broad: anything unexpected ends up here
            self.report(component, err)

    def report(self, component: str, err: BaseException) -> Failure:
        """Log `err` with its traceback and the component's name, count it, call the hook."""
        failure = Failure(component, " ".join(f"{type(err).__name__}: {err}".split()))
        log.error("%s thread failed unexpectedly: %s", component, failure.error, exc_info=err)
        with self._lock:
            self._failures.append(failure)
        if self._on_failure is not None:
            self._on_failure(failure)
        return failure


@dataclass(frozen=True)
class IpcDir:
    """A private directory for the daemon's ipc sockets, named after its owner process.

    Used like `tempfile.TemporaryDirectory`: `name` is the path as a string, `cleanup`
    removes it (idempotent), and ``with`` removes it at the end of the block.
    """

    path: Path

    @property
    def name(self) -> str:
        """The directory's path as a string (for ``ipc://`` endpoints)."""
        return str(self.path)

    def cleanup(self) -> None:
        """Remove the directory and the sockets in it (nothing happens if it is gone)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> IpcDir:
        return self

    def __exit__(self, *_: object) -> None:
        self.cleanup()


def process_start_ticks(pid: int) -> int | None:
    """Return when process `pid` started, in clock ticks since boot, or None if unknown.

    Read from ``/proc/<pid>/stat`` (field 22; the command name before it may hold spaces and
    parentheses, so the fields are counted after its last ``)``). None where there is no
    ``/proc`` or no such process.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; the fields after the name start at field 3
    except (IndexError, ValueError):
        return None


def make_ipc_dir(base: str | Path | None = None) -> IpcDir:
    """Create ``deepz-<pid>-<start>-<random>`` (mode 0700) in `base` (the temp folder).

    `remove_stale_ipc_dirs` can then tell from the name alone whether its owner still runs.
    """
    pid = os.getpid()
    prefix = f"{IPC_PREFIX}{pid}-{process_start_ticks(pid) or 0}-"
    return IpcDir(Path(tempfile.mkdtemp(prefix=prefix, dir=base)))


def remove_stale_ipc_dirs(base: str | Path | None = None) -> list[Path]:
    """Delete the ipc directories of `make_ipc_dir` whose owner process is gone; return them.

    Only directories in `base` (default: ``tempfile.gettempdir()``) whose name matches
    `make_ipc_dir`'s exactly, that are real directories (not links) and belong to this user
    are considered; one is stale when no process has its pid, or the process with that pid
    started at another time (the pid was reused). Anything else is left alone, including the
    ``deepz-<random>`` directories of older versions, which carry no owner.
    """
    folder = Path(base if base is not None else tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _IPC_NAME.fullmatch(entry.name)
        if match is None or not _own_directory(entry):
            continue
        if _alive(int(match.group(1)), int(match.group(2))):
            continue
        path = Path(entry.path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            log.info(
                "removed the ipc directory %s of a daemon that is gone (pid %s)",
                path,
                match.group(1),
            )
    return removed


def _own_directory(entry: os.DirEntry[str]) -> bool:
    """Whether `entry` is a directory (not a link to one) that belongs to this user."""
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def process_exists(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user's counts).

    On Windows ``os.kill`` would end the process, not probe it: there any pid counts as
    running. A pid no process can have (zero, negative, beyond what the OS holds) does not.
    """
    if os.name == "nt":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, OSError):  # a pid beyond what the OS can hold: no process has it
        return False
    return True


def _alive(pid: int, start_ticks: int) -> bool:
    """Whether process `pid` exists and (when both are known) started at `start_ticks`."""
    if not process_exists(pid):
        return False
    now = process_start_ticks(pid)
    return start_ticks == 0 or now is None or now == start_ticks
