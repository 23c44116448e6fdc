"""The two errors of offline refocusing: a refusal to start, a failed chunk task."""

from __future__ import annotations


class RefocusError(ValueError):
    """Refocusing cannot start: a bad input, model, plan or output. The message says which."""


class RefocusTaskError(RuntimeError):
    """A chunk task failed: its raw frames cannot be read. The message names chunk and seqs.

    Raised in the task, wherever it runs, so it is one picklable message.
    """
