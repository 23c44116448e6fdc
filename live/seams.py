"""The `Source` seam: anything that feeds camera frames to the daemon through a `FrameSender`.

A source runs on its own thread (the daemon's ``source`` thread), sends every frame it
acquires or reads with ``sender.send`` (which never blocks), and returns a `SourceSummary`
when it ends: `stop` was set, its frame count was reached, or its data ran out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from live.hook import FrameSender

__all__ = ["Source", "SourceSummary"]


@dataclass(frozen=True)
class SourceSummary:
    """What a source did: frames handed to ZeroMQ, frames dropped (and which), time and rate.

    Attributes
    ----------
    name : str
        The source's name (``"simulated"``, ``"replay"``, ``"micromanager"``).
    frames_sent : int
        Frames the sender handed to ZeroMQ during this run.
    frames_dropped : int
        Frames the sender could not send without blocking (the receiver was absent or full).
    dropped_seqs : tuple of int
        Sequence numbers of the dropped frames (the first `live.hook.MAX_DROPPED_SEQS`).
    duration_s : float
        Wall-clock time from the first frame due to the end of the run.
    achieved_rate_hz : float
        ``(frames_sent + frames_dropped) / duration_s``: the rate frames were produced at.
    external : bool
        The frames came from outside the daemon (a Micro-Manager hook pushing to
        ``endpoints.frames``): this source only listened, so what was acquired is not known
        here (the frames that arrived and their seqs' gaps say it).
    """

    name: str
    frames_sent: int
    frames_dropped: int
    dropped_seqs: tuple[int, ...]
    duration_s: float
    achieved_rate_hz: float
    external: bool = False


@runtime_checkable
class Source(Protocol):
    """A frame source; `run` is called once, on the daemon's source thread."""

    name: str

    def run(self, sender: FrameSender, stop: threading.Event) -> SourceSummary:
        """Send frames until `stop` is set, the frame count is reached or the data ends.

        Frames go out through ``sender.send`` (never blocking); the caller owns and closes
        the sender. Returns what was sent and dropped. An exception means the source failed:
        frames sent before it are valid, and their seqs say which ones they were.
        """
        ...
