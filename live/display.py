"""Optional viewer client: subscribe to stacks, keep only the newest volume, show it.

`LatestStack` is the GUI-free part (SUB on ``endpoints.stacks``, drain everything waiting and
keep the newest, count the stacks that arrived but were not shown, compute slices and a max
projection); the napari window (``pip install 'deepz-live[view]'``) is built on it by `main`.
The display may drop stacks; the recorder never does. Run with ``python -m live.display
--endpoint tcp://...`` (``--client-key`` / ``--server-key`` give CURVE key files, and
``--max-message-bytes`` the largest stack accepted), or ``python -m live.display --scope
config.toml`` to take the endpoint, the CURVE client keys when it uses CURVE, and the largest
stack from the config (those flags are then refused: the config says it).
The SUB socket drops any message part larger than the limit (``zmq.MAXMSGSIZE``), and `decode`
refuses a stack declared larger. Stacks arrive in ``recorder.stack_dtype`` (float16 by
default); a `View` holds float32, which every napari layer and colormap handles (float16
textures are not supported everywhere). The window's contrast follows the stacks shown until
the user sets it by hand (`AutoContrast`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from live.protocol import MAX_FRAME_BYTES, Message, ProtocolError, decode

if TYPE_CHECKING:
    from live.config import ScopeConfig
    from live.security import ClientKeys

__all__ = [
    "LATE_MESSAGES",
    "RATE_WINDOW_S",
    "AutoContrast",
    "LatestStack",
    "View",
    "main",
    "refresh_interval_ms",
    "stack_bytes",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_FPS = 20.0
"""Screen refreshes a second at most, unless ``--max-fps`` says otherwise."""
_LOGGED_MALFORMED = 10
"""Malformed stacks logged one by one; later ones are counted (`LatestStack.malformed`)."""
RATE_WINDOW_S = 2.0
"""`View.stacks_per_s` is the arrival rate over about the last this-many seconds."""
IDLE_TITLE_S = 2.0
"""The window's title says how long no stack has come once it is this many seconds."""
LATE_MESSAGES = 64
"""Most messages `LatestStack.poll` reads once its timeout has passed (16 times the socket's
receive high-water mark of 4 stacks)."""


@dataclass(frozen=True)
class View:
    """What the viewer shows for one stack: the volume (float32), its max projection, counts.

    ``stacks_per_s`` is the rate stacks reached the viewer (every one received, shown or not);
    ``not_shown`` is how many received stacks a newer one replaced before the screen refreshed.
    Stacks lost before they reached the viewer (ZeroMQ's high-water marks drop them unseen,
    and skipped frames never make one) are in neither.
    """

    seq: int
    volume: np.ndarray
    max_projection: np.ndarray
    planes_um: tuple[float, ...] | None
    latency_ms: float | None
    stacks_per_s: float
    not_shown: int


class LatestStack:
    """SUB client that keeps only the newest stack (older waiting ones are counted, not shown).

    `max_message_bytes` is the socket's ``zmq.MAXMSGSIZE`` and the largest pixel buffer
    `decode` accepts (a stack's size from `live.protocol.max_part_bytes`; default the
    protocol's `MAX_FRAME_BYTES`); `keys` are the CURVE client keys when the stacks endpoint
    uses CURVE. Raises `zmq.ZMQError` when `endpoint` cannot be connected to (not a ZeroMQ
    address, ``tcp://*:5556``), after closing the socket (and a context it made).
    """

    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        *,
        max_message_bytes: int = MAX_FRAME_BYTES,
        keys: ClientKeys | None = None,
    ) -> None:
        from live.security import subscriber

        self._own_ctx = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = ctx or zmq.Context()
        try:  # keep only a few stacks: the newest is what is shown
            self._sub = subscriber(
                self._ctx, endpoint, keys, max_message_bytes=max_message_bytes, rcvhwm=4
            )
        except BaseException:
            if self._own_ctx:
                self._ctx.term()
            raise
        self._max_bytes = max_message_bytes
        self.received = 0
        """Stacks received (each valid stack message that reached the viewer)."""
        self.shown = 0
        """Views returned by `poll` (one per poll that received a stack)."""
        self.malformed = 0
        self.stacks_per_s = 0.0
        """The arrival rate as the last `poll` saw it (it falls to 0 once stacks stop)."""
        self._last_stack = time.monotonic()
        # (monotonic time of a poll, stacks it received): the arrival rate's window
        self._polls: deque[tuple[float, int]] = deque()

    @property
    def idle_s(self) -> float:
        """Seconds since a stack last arrived (since this client started, before the first)."""
        return time.monotonic() - self._last_stack

    @property
    def not_shown(self) -> int:
        """Stacks received but replaced by a newer one before a `poll` returned them."""
        return self.received - self.shown

    def poll(self, timeout_ms: int = 0) -> View | None:
        """Drain the waiting stacks and return a `View` of the newest, or None if none came.

        Waits up to `timeout_ms` in all for a stack (malformed messages do not restart the
        wait); past that, at most `LATE_MESSAGES` more waiting messages are read, so a flood
        cannot hold the screen's refresh (the rest wait for the next poll).
        """
        newest: Message | None = None
        got = late = 0
        deadline = time.monotonic() + timeout_ms / 1000
        while late < LATE_MESSAGES:
            left_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if not self._sub.poll(left_ms if newest is None and left_ms > 0 else 0):
                break
            if left_ms <= 0:
                late += 1
            try:
                message = decode(self._sub.recv_multipart(copy=False), max_bytes=self._max_bytes)
                if message.header.kind != "stack":  # a frame on the stacks endpoint
                    raise ProtocolError(f"expected a stack, got a {message.header.kind}")
            except ProtocolError as err:
                self.malformed += 1
                if self.malformed <= _LOGGED_MALFORMED:  # a flood must not flood the log
                    more = " (further ones are only counted)" * (
                        self.malformed == _LOGGED_MALFORMED
                    )
                    log.warning("malformed stack ignored: %s%s", err, more)
                continue
            got += 1
            newest = message
        self.received += got
        rate = self.stacks_per_s = self._arrival_rate(got)
        if newest is None:
            return None
        self._last_stack = time.monotonic()
        self.shown += 1
        # Own the pixels (the message's buffer is ZeroMQ's), as float32 whatever the wire's.
        volume = np.array(newest.array, dtype=np.float32)
        return View(
            seq=newest.header.seq,
            volume=volume,
            # fmax: a NaN on one plane does not blank that pixel's projection (review 73)
            max_projection=np.fmax.reduce(volume, axis=0),
            planes_um=newest.header.planes_um,
            latency_ms=newest.header.latency_ms,
            stacks_per_s=rate,
            not_shown=self.not_shown,
        )

    def _arrival_rate(self, got: int) -> float:
        """Record that this poll received `got` stacks; return stacks/s over `RATE_WINDOW_S`.

        A stack received now arrived after the previous poll, so the rate is what the polls
        since the oldest one kept received, over the time since it: polls within the window,
        and always the previous one (after a long pause the rate is over the pause).
        """
        now = time.monotonic()
        self._polls.append((now, got))
        while len(self._polls) > 2 and now - self._polls[0][0] > RATE_WINDOW_S:
            self._polls.popleft()
        since = self._polls[0][0]
        arrived = sum(n for _, n in self._polls) - self._polls[0][1]
        return arrived / (now - since) if now > since else 0.0

    def close(self) -> None:
        """Close the socket (and the context if this object made it)."""
        self._sub.close()
        if self._own_ctx:
            self._ctx.term()


class AutoContrast:
    """Keeps a live napari image layer's contrast on the data it shows, until the user sets it.

    napari (0.9) keeps an image layer's contrast limits and their slider range at the first
    data's when ``layer.data`` is replaced, so a stack brighter than the first one shows
    saturated for good. `update`, called after each new data, sets the limits to the data's
    display window (`live.store.WindowSampler`: the 0.1–99.9 percentiles of a subsample of
    about `PIXELS` values, cheap at any stack size) and the range to the sampled min … max, but
    only when an end moved by more than `TOLERANCE` of the shown span, so the picture does
    not flicker with the noise. Limits the user set by hand (they differ from what `update`
    set last) are kept from then on; the range only widens to take in new data.
    """

    PIXELS = 65536
    TOLERANCE = 0.1

    def __init__(self) -> None:
        self._set: tuple[float, float] | None = None

    def update(self, layer: Any, data: np.ndarray) -> None:
        """Follow `data` (now `layer`'s) with `layer`'s contrast limits, unless set by hand."""
        from live.store import WindowSampler

        sampler = WindowSampler(data.dtype, first=0, last=1, pixels=self.PIXELS)
        sampler.add(data)
        window = sampler.window()
        start, end, low, high = (window[k] for k in ("start", "end", "min", "max"))
        current = _pair(layer.contrast_limits)
        shown_low, shown_high = _pair(layer.contrast_limits_range)
        if self._set is not None and not np.allclose(current, self._set):  # set by hand
            wider = (min(shown_low, low), max(shown_high, high))
            if wider != (shown_low, shown_high):
                layer.contrast_limits_range = wider
            return
        tolerance = self.TOLERANCE * (current[1] - current[0])
        if (
            self._set is None
            or abs(start - current[0]) > tolerance
            or abs(end - current[1]) > tolerance
        ):
            layer.contrast_limits_range = (low, high)
            layer.contrast_limits = (start, end)
        self._set = _pair(layer.contrast_limits)


def _pair(values: Any) -> tuple[float, float]:
    """Return a napari (low, high) pair (a list or tuple) as two floats."""
    low, high = values
    return float(low), float(high)


class _Screen:
    """The napari side of `main`: a viewer's volume and projection layers, and its title."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self.layers: dict[str, Any] = {}
        self._contrast: dict[str, AutoContrast] = {}
        self._shown: View | None = None

    def show(self, view: View) -> None:
        """Put `view` on the screen: new layer data, its contrast, and the counts as title."""
        for name, data in (("volume", view.volume), ("max projection", view.max_projection)):
            if name in self.layers:
                self.layers[name].data = data
            else:
                self.layers[name] = self.viewer.add_image(data, name=name)
                self._contrast[name] = AutoContrast()
            self._contrast[name].update(self.layers[name], data)
        self._shown = view
        self.viewer.title = window_title(view, view.stacks_per_s, view.not_shown, idle_s=0.0)

    def wait(self, client: LatestStack) -> None:
        """No new stack this refresh: keep the title's rate and idle time current."""
        if self._shown is not None:
            self.viewer.title = window_title(
                self._shown, client.stacks_per_s, client.not_shown, idle_s=client.idle_s
            )


def window_title(view: View, stacks_per_s: float, not_shown: int, *, idle_s: float) -> str:
    """Return the viewer's title: the stack shown, the arrival rate now, and any silence.

    The rate and the count not shown are the client's now, not the shown stack's: once the
    stacks stop, the title says so (the rate falls to 0, ``no stack for N s``) rather than
    keep the last rate.
    """
    title = (
        f"deepz-live seq {view.seq} | {stacks_per_s:.1f} stacks/s received | "
        f"latency {view.latency_ms or 0:.1f} ms | not shown {not_shown}"
    )
    if idle_s >= IDLE_TITLE_S:
        title += f" | no stack for {idle_s:.0f} s"
    return title


def refresh_interval_ms(max_fps: float) -> int:
    """Return the screen timer's interval for at most `max_fps` refreshes a second (>= 1 ms)."""
    return max(1, round(1000 / max_fps))


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
    where.add_argument(
        "--scope", type=Path, help="the daemon's config (endpoint, keys and stack size)"
    )
    parser.add_argument("--client-key", type=Path, help="CURVE client secret certificate")
    parser.add_argument("--server-key", type=Path, help="the daemon's CURVE public certificate")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        help="largest message part accepted with --endpoint (default: the protocol's 1 GiB)",
    )
    parser.add_argument(
        "--max-fps", type=float, help=f"screen refresh limit (default {DEFAULT_MAX_FPS:g})"
    )
    args = parser.parse_args(argv)
    if args.max_message_bytes is not None and not 1 <= args.max_message_bytes < 2**63:
        parser.error(f"--max-message-bytes must be >= 1 and < 2**63, not {args.max_message_bytes}")
    max_fps = DEFAULT_MAX_FPS if args.max_fps is None else args.max_fps
    if not (math.isfinite(max_fps) and 0 < max_fps <= 1000):
        parser.error(f"--max-fps must be a number of frames a second in (0, 1000], not {max_fps}")
    if (args.recording is None) == (args.endpoint is None and args.scope is None):
        parser.error("give a recording, or --endpoint / --scope of a running daemon")
    keys_and_size = [
        flag
        for flag, value in (
            ("--client-key", args.client_key),
            ("--server-key", args.server_key),
            ("--max-message-bytes", args.max_message_bytes),
        )
        if value is not None
    ]
    if args.recording is not None:
        daemon_only = keys_and_size + (["--max-fps"] if args.max_fps is not None else [])
        if daemon_only:
            parser.error(f"{' / '.join(daemon_only)}: for a running daemon, not a recording")
        from live.recording_view import show

        return show(args.recording)
    if args.scope is not None and keys_and_size:
        parser.error(
            f"{' / '.join(keys_and_size)}: not with --scope, whose config gives the keys and "
            "the stack size (use --endpoint)"
        )
    try:
        endpoint, keys, max_bytes = _connection(args)
    except ValueError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    try:
        client = LatestStack(endpoint, max_message_bytes=max_bytes, keys=keys)
    except zmq.ZMQError as err:  # not a ZeroMQ address, or a wildcard such as tcp://*:5556
        print(f"error: cannot connect to {endpoint!r}: {err}", file=sys.stderr)
        return 2
    try:
        return _run_window(client, max_fps)
    finally:
        client.close()


def _run_window(client: LatestStack, max_fps: float) -> int:
    """Show `client`'s newest stack in a napari window, at most `max_fps` times a second."""
    try:
        import napari
    except ImportError:
        print(
            "live.display needs napari: pip install 'deepz-live[view]' (running without a "
            "display; the recorder still keeps every stack)",
            file=sys.stderr,
        )
        return 1
    screen = _Screen(napari.Viewer(title="deepz-live"))

    def refresh() -> None:
        view = client.poll(0)
        if view is not None:
            screen.show(view)
        else:
            screen.wait(client)

    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.timeout.connect(refresh)
    timer.start(refresh_interval_ms(max_fps))
    napari.run()
    timer.stop()
    return 0


def _connection(args: argparse.Namespace) -> tuple[str, ClientKeys | None, int]:
    """Return the endpoint, CURVE keys and size limit from the command line or the config."""
    from live.security import client_connection

    if args.scope is None:
        endpoint, keys = client_connection(
            "stacks",
            config=None,
            endpoint=args.endpoint,
            client_key=args.client_key,
            server_key=args.server_key,
        )
        limit = MAX_FRAME_BYTES if args.max_message_bytes is None else args.max_message_bytes
        return endpoint, keys, limit
    from live.config import load_config

    config = load_config(args.scope)
    endpoint, keys = client_connection(
        "stacks", config=config, endpoint=None, client_key=None, server_key=None
    )
    return endpoint, keys, stack_bytes(config)


def stack_bytes(config: ScopeConfig) -> int:
    """Return the largest stack message part a daemon running `config` sends.

    It is the viewer's ``zmq.MAXMSGSIZE`` and `decode`'s limit, in ``recorder.stack_dtype``
    (what the daemon sends). Planes are counted, not built (`PlanesConfig.count`). The frame
    shape is the file's, except where the daemon takes it from its Micro-Manager core
    (``source.frame_shape`` left out or ``"auto"``): only the camera knows it then, so the
    limit is the largest stack any config allows (`MAX_STACK_GIB` in float32).
    """
    from live.config import MAX_STACK_GIB
    from live.protocol import max_part_bytes

    dtype = config.recorder.stack_dtype
    source = config.source
    if source.geometry_from_core and "frame_shape" not in source.model_fields_set:
        float32_pixels = int(MAX_STACK_GIB * 2**30) // np.dtype(np.float32).itemsize
        return max_part_bytes((float32_pixels,), dtype)
    return max_part_bytes((config.planes.count(), *source.frame_shape), dtype)


if __name__ == "__main__":
    sys.exit(main())
