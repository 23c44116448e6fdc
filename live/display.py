"""Optional viewer client: subscribe to stacks, keep only the newest volume, show it.

`LatestStack` is the GUI-free part (SUB on ``endpoints.stacks``, drain everything waiting and
keep the newest, count what was dropped, compute slices and a max projection); the napari
window (``pip install 'deepz-live[view]'``) is built on it by `main`. The display may drop
stacks; the recorder never does. Run with ``python -m live.display --endpoint tcp://...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import zmq

from live.protocol import Message, ProtocolError, decode

__all__ = ["LatestStack", "View", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """What the viewer shows for one stack: the volume, its max projection and live rates."""

    seq: int
    volume: np.ndarray
    max_projection: np.ndarray
    planes_um: tuple[float, ...] | None
    latency_ms: float | None
    stacks_per_s: float
    dropped: int


class LatestStack:
    """SUB client that keeps only the newest stack (older waiting ones are dropped, counted)."""

    def __init__(self, endpoint: str, ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self._own_ctx = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 4
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self.received = 0
        self.dropped = 0
        self.malformed = 0
        self._times: list[float] = []

    def poll(self, timeout_ms: int = 0) -> View | None:
        """Drain every waiting stack and return a `View` of the newest, or None if none came."""
        newest: Message | None = None
        while self._sub.poll(timeout_ms if newest is None else 0):
            try:
                message = decode(self._sub.recv_multipart(copy=False))
            except ProtocolError as err:
                self.malformed += 1
                log.warning("malformed stack ignored: %s", err)
                continue
            self.received += 1
            if newest is not None:
                self.dropped += 1
            newest = message
        if newest is None:
            return None
        now = time.monotonic()
        self._times = [t for t in self._times if now - t < 2.0] + [now]
        rate = (len(self._times) - 1) / max(now - self._times[0], 1e-9)
        volume = np.array(newest.array)  # own the pixels: the view's buffer is ZeroMQ's
        return View(
            seq=newest.header.seq,
            volume=volume,
            max_projection=volume.max(axis=0),
            planes_um=newest.header.planes_um,
            latency_ms=newest.header.latency_ms,
            stacks_per_s=rate,
            dropped=self.dropped,
        )

    def close(self) -> None:
        """Close the socket (and the context if this object made it)."""
        self._sub.close()
        if self._own_ctx:
            self._ctx.term()


def main(argv: list[str] | None = None) -> int:
    """Open a napari window that shows the newest stack and its max projection."""
    parser = argparse.ArgumentParser(prog="python -m live.display", description=__doc__)
    parser.add_argument("--endpoint", required=True, help="stacks PUB endpoint of the daemon")
    parser.add_argument("--max-fps", type=float, default=20.0, help="screen refresh limit")
    args = parser.parse_args(argv)
    try:
        import napari
    except ImportError:
        print(
            "live.display needs napari: pip install 'deepz-live[view]' (running without a "
            "display; the recorder still keeps every stack)",
            file=sys.stderr,
        )
        return 1
    client = LatestStack(args.endpoint)
    viewer = napari.Viewer(title="deepz-live")
    layers: dict[str, object] = {}

    def refresh() -> None:
        view = client.poll(0)
        if view is None:
            return
        for name, data in (("volume", view.volume), ("max projection", view.max_projection)):
            if name in layers:
                layers[name].data = data  # type: ignore[attr-defined]
            else:
                layers[name] = viewer.add_image(data, name=name)
        viewer.title = (
            f"deepz-live seq {view.seq} | {view.stacks_per_s:.1f} stacks/s | "
            f"latency {view.latency_ms or 0:.1f} ms | dropped {view.dropped}"
        )

    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(refresh)
    timer.start(int(1000 / max(args.max_fps, 1.0)))
    napari.run()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
