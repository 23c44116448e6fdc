"""``deepz-live status``: read a running daemon's status endpoint and print it.

The daemon publishes a JSON snapshot on ``endpoints.status`` once per second
(`live.metrics.StatusPublisher`); this client subscribes with `live.metrics.StatusReader` and
prints one line per snapshot: run state, backend, the daemon's own status line (elapsed,
frames in and stacks out with their rates, losses, latency p50/p99, queue) and the output
store. ``--json`` prints each snapshot as one JSON object per line instead, for scripts;
``--once`` prints the first one and exits. The client stops by itself once the daemon says
``finished``, and exits 1 with one line when no snapshot arrives for ``--timeout`` seconds
(whatever else does: a message that is not a snapshot does not restart the wait).

With ``--scope`` the endpoint, and the CURVE client keys when the status endpoint uses CURVE
(`live.security.client_keys`), come from the daemon's config; ``--endpoint`` with
``--client-key`` / ``--server-key`` gives them directly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from live.metrics import RunState, Snapshot, StatusReader

if TYPE_CHECKING:
    from collections.abc import Sequence

    from live.security import ClientKeys

__all__ = [
    "EXIT_BAD_CONFIG",
    "EXIT_NO_STATUS",
    "human_line",
    "main",
]

EXIT_NO_STATUS = 1
"""Exit status when no snapshot arrived within ``--timeout``."""
EXIT_BAD_CONFIG = 2
"""Exit status for a bad config, unreadable keys or bad arguments."""

_EXAMPLES = """\
examples:
  deepz-live status --scope config.toml             one line per second until the run ends
  deepz-live status --scope config.toml --once      one line, then exit
  deepz-live status --endpoint tcp://127.0.0.1:5558 --json --once
"""


def human_line(status: dict[str, Any]) -> str:
    """Render one snapshot as ``state | backend | <daemon status line> | output``.

    The middle is `live.metrics.Snapshot.status_line`, so the client and the daemon's console
    say the same thing the same way. A snapshot this version cannot read (another version's
    fields, wrong types) is shown as its JSON rather than dropped.
    """
    try:
        snapshot = Snapshot.from_dict(status)
    except ValueError as err:  # a field missing or of the wrong kind (hostile, other version)
        shown = json.dumps(status, separators=(",", ":"))[:300]  # ASCII: escapes included
        return f"status not understood ({err}): {shown}"
    state = snapshot.state if "state" in status else "?"  # a daemon older than run states
    output = _printable(snapshot.output or "not recorded")
    return f"{state} | {_printable(snapshot.backend or '?')} | {snapshot.status_line()} | {output}"


def _printable(text: str) -> str:
    r"""Escape what a terminal would act on or cannot print (control codes, lone surrogates).

    The backend and output strings come off a socket: ``\x1b]0;...`` would retitle the
    terminal, a lone surrogate would stop ``print``.
    """
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _parser() -> argparse.ArgumentParser:
    """Build the command line: where to connect, what to print, how long to wait."""
    parser = argparse.ArgumentParser(
        prog="deepz-live status",
        description="Print a running daemon's status: run state, backend, rates, losses,\n"
        "latency and output store, one line per second (stops when the run finishes).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--scope",
        type=Path,
        metavar="CONFIG",
        help="the daemon's config.toml (endpoints.status and its keys)",
    )
    where.add_argument(
        "--endpoint", metavar="URL", help="the status endpoint, e.g. tcp://127.0.0.1:5558"
    )
    parser.add_argument(
        "--client-key", type=Path, metavar="FILE", help="CURVE client secret certificate"
    )
    parser.add_argument(
        "--server-key", type=Path, metavar="FILE", help="the daemon's CURVE public certificate"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--once", action="store_true", help="print one status and exit")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="S",
        help="give up when no status arrives for S seconds (default 5)",
    )
    return parser


_MAX_TIMEOUT_S = 1e6
"""The longest ``--timeout`` (some 11 days; ZeroMQ's poll waits at most 25)."""


def _positive_seconds(text: str) -> float:
    """Parse ``--timeout``: a positive number of seconds, at most `_MAX_TIMEOUT_S`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= _MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"must be > 0 and at most {_MAX_TIMEOUT_S:g} seconds, got {text}"
        )
    return value


def _connection(args: argparse.Namespace) -> tuple[str, ClientKeys | None]:
    """Return the status endpoint and CURVE keys from the config or the command line.

    `live.security.client_connection` does it (as for ``deepz-live view``). Raises ValueError
    (``live.config.ConfigError`` is one) with one line when the config or the keys cannot be
    read.
    """
    from live.security import client_connection

    config = None
    if args.scope is not None:
        from live.config import load_config

        config = load_config(args.scope)
    return client_connection(
        "status",
        config=config,
        endpoint=args.endpoint,
        client_key=args.client_key,
        server_key=args.server_key,
    )


def _watch(reader: StatusReader, args: argparse.Namespace, endpoint: str) -> int:
    """Print each snapshot as it arrives until --once, ``finished`` or --timeout without one.

    Only a snapshot this version reads (`Snapshot.from_dict`) restarts the wait and counts for
    --once: another JSON object is shown as not understood, but a publisher sending such
    objects cannot keep the client waiting past --timeout.
    """
    deadline = time.monotonic() + args.timeout
    while True:
        left_ms = math.ceil((deadline - time.monotonic()) * 1000)
        status = reader.latest(left_ms) if left_ms > 0 else None
        if status is None:
            print(
                f"no status from {endpoint} within {args.timeout:g} s (is the daemon running?)",
                file=sys.stderr,
            )
            return EXIT_NO_STATUS
        try:
            snapshot: Snapshot | None = Snapshot.from_dict(status)
        except ValueError:
            snapshot = None
        if args.json and snapshot is not None:
            print(json.dumps(status, separators=(",", ":")), flush=True)
        else:
            print(human_line(status), flush=True, file=sys.stdout if snapshot else sys.stderr)
        if snapshot is None:
            continue
        deadline = time.monotonic() + args.timeout
        if args.once or snapshot.state == RunState.FINISHED:
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``deepz-live status``; returns 0, 1 (no status in time) or 2 (bad config)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.scope is not None and (args.client_key or args.server_key):
        parser.error(
            "--client-key / --server-key go with --endpoint; with --scope the keys "
            "come from the config's [security]"
        )
    try:
        endpoint, keys = _connection(args)
    except ValueError as err:
        where = f"bad config {args.scope}: " if args.scope is not None else ""
        print(f"error: {where}{' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        reader = StatusReader(endpoint, keys=keys)
    except zmq.ZMQError as err:  # e.g. not a ZeroMQ address
        print(f"error: cannot connect to {endpoint!r}: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        return _watch(reader, args, endpoint)
    except KeyboardInterrupt:  # Ctrl-C is how a watcher normally stops
        return 0
    finally:
        reader.close()


if __name__ == "__main__":
    sys.exit(main())
