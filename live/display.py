"""Optional viewer client: subscribe to stacks, keep only the newest volume, show it.

`LatestStack` is the GUI-free part (SUB on ``endpoints.stacks``, drain everything waiting and
keep the newest, count what was dropped, compute slices and a max projection); the napari
window (``pip install 'deepz-live[view]'``) is built on it by `main`. The display may drop
stacks; the recorder never does. Run with ``python -m live.display --endpoint tcp://...``, or
``python -m live.display --scope config.toml`` to take the endpoint and, when it uses CURVE,
the client keys from the config (``--client-key`` / ``--server-key`` give key files directly).
The SUB socket drops any message part larger than ``--max-message-bytes`` (``zmq.MAXMSGSIZE``).
Stacks arrive in ``recorder.stack_dtype`` (float16 by default); a `View` holds float32, which
every napari layer and colormap handles (float16 textures are not supported everywhere).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zmq

from live.protocol import MAX_FRAME_BYTES, Message, ProtocolError, decode

if TYPE_CHECKING:
    from live.security import ClientKeys

__all__ = ["LatestStack", "View", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class View:
    """What the viewer shows for one stack: the volume (float32), its max projection, rates."""

    seq: int
    volume: np.ndarray
    max_projection: np.ndarray
    planes_um: tuple[float, ...] | None
    latency_ms: float | None
    stacks_per_s: float
    dropped: int


class LatestStack:
    """SUB client that keeps only the newest stack (older waiting ones are dropped, counted).

    `max_message_bytes` is the socket's ``zmq.MAXMSGSIZE`` (a stack's size from
    `live.protocol.max_part_bytes`; default the protocol's `MAX_FRAME_BYTES`); `keys` are the
    CURVE client keys when the stacks endpoint uses CURVE.
    """

    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        *,
        max_message_bytes: int = MAX_FRAME_BYTES,
        keys: ClientKeys | None = None,
    ) -> None:
        from live.security import connect_curve

        self._own_ctx = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.linger = 0
        self._sub.rcvhwm = 4
        self._sub.maxmsgsize = max_message_bytes
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        connect_curve(self._sub, keys)
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
                if message.header.kind != "stack":  # a frame on the stacks endpoint
                    raise ProtocolError(f"expected a stack, got a {message.header.kind}")
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
        # Own the pixels (the message's buffer is ZeroMQ's), as float32 whatever the wire's.
        volume = np.array(newest.array, dtype=np.float32)
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
    """Open a napari window on a running daemon's newest stack, or on a recording."""
    parser = argparse.ArgumentParser(
        prog="python -m live.display",
        description="Open a napari window on a running daemon's stacks (--endpoint / --scope)\n"
        "or on a recording (RUN.ome.zarr: raw frames at the focal plane, stacks at their depth).",
        epilog="examples:\n  deepz-live view --scope config.toml\n"
        "  deepz-live view runs/RUN.ome.zarr",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recording", nargs="?", type=Path, help="a run store to open")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--endpoint", help="stacks PUB endpoint of the daemon")
    where.add_argument("--scope", type=Path, help="the daemon's config (endpoint and keys)")
    parser.add_argument("--client-key", type=Path, help="CURVE client secret certificate")
    parser.add_argument("--server-key", type=Path, help="the daemon's CURVE public certificate")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=MAX_FRAME_BYTES,
        help="largest message part accepted (default: the protocol's 1 GiB)",
    )
    parser.add_argument("--max-fps", type=float, default=20.0, help="screen refresh limit")
    args = parser.parse_args(argv)
    if args.max_message_bytes < 1:
        parser.error(f"--max-message-bytes must be >= 1, not {args.max_message_bytes}")
    if not (math.isfinite(args.max_fps) and 0 < args.max_fps <= 1000):
        parser.error(
            f"--max-fps must be a number of frames a second in (0, 1000], not {args.max_fps}"
        )
    if (args.recording is None) == (args.endpoint is None and args.scope is None):
        parser.error("give a recording, or --endpoint / --scope of a running daemon")
    if args.recording is not None:
        if args.client_key or args.server_key:
            parser.error("--client-key / --server-key are for a running daemon, not a recording")
        from live.recording_view import show

        return show(args.recording)
    try:
        endpoint, keys, max_bytes = _connection(args)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        import napari
    except ImportError:
        print(
            "live.display needs napari: pip install 'deepz-live[view]' (running without a "
            "display; the recorder still keeps every stack)",
            file=sys.stderr,
        )
        return 1
    client = LatestStack(endpoint, max_message_bytes=max_bytes, keys=keys)
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


def _connection(args: argparse.Namespace) -> tuple[str, ClientKeys | None, int]:
    """Return the endpoint, CURVE keys and size limit from the command line or the config."""
    from live.config import load_config
    from live.protocol import max_part_bytes
    from live.security import client_keys, read_client_keys

    if args.scope is not None:
        config = load_config(args.scope)
        plan_planes = len(config.volume_plan())
        shape = (plan_planes, *config.source.frame_shape)
        return config.endpoints.stacks, client_keys(config, "stacks"), max_part_bytes(shape)
    if (args.client_key is None) != (args.server_key is None):
        raise ValueError("give both --client-key and --server-key, or neither")
    keys = None
    if args.client_key is not None:
        keys = read_client_keys(args.client_key, args.server_key)
    return args.endpoint, keys, args.max_message_bytes


if __name__ == "__main__":
    sys.exit(main())
