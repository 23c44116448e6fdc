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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Failure", "Supervisor"]

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
