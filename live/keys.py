"""Make CURVE keys for a daemon whose endpoints leave loopback: ``python -m live.keys KEYDIR``.

Writes, with pyzmq's `zmq.auth.create_certificates`::

    KEYDIR/server.key            the daemon's public certificate (give it to clients)
    KEYDIR/server.key_secret     the daemon's secret certificate (stays with the daemon)
    KEYDIR/clients/NAME.key      each client's public certificate: the daemon's allow-list
    KEYDIR/NAME.key_secret       each client's secret certificate (copy to that client only)

and prints the ``[security]`` lines for the config. Secret files are made readable by their
owner only. Existing keys are never overwritten. Add a client later by running it again with
``--client NAME`` on the same KEYDIR (the server keys are then kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import zmq.auth

__all__ = ["SERVER_NAME", "main", "make_keys"]

SERVER_NAME = "server"
"""Base name of the daemon's certificate files."""


def make_keys(directory: Path, clients: list[str]) -> list[Path]:
    """Create the server keys (unless present) and one key pair per client; return new files.

    Raises `FileExistsError` if a client's files already exist.
    """
    directory.mkdir(parents=True, exist_ok=True)
    allowed = directory / "clients"
    allowed.mkdir(exist_ok=True)
    made: list[Path] = []
    if not (directory / f"{SERVER_NAME}.key_secret").exists():
        made += _create(directory, SERVER_NAME)
    for name in clients:
        public, secret = allowed / f"{name}.key", directory / f"{name}.key_secret"
        if public.exists() or secret.exists() or (directory / f"{name}.key").exists():
            raise FileExistsError(f"keys for client {name!r} already exist in {directory}")
        created = _create(directory, name)
        shutil.move(directory / f"{name}.key", public)
        made += [public, created[1]]
    return made


def _create(directory: Path, name: str) -> list[Path]:
    """Create NAME.key and NAME.key_secret in `directory`; the secret becomes owner-only."""
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return [Path(public), Path(secret)]


def main(argv: list[str] | None = None) -> int:
    """Make keys and print the config lines; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m live.keys", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="folder for the key files (created)")
    parser.add_argument(
        "--client",
        action="append",
        default=None,
        help="client name (repeatable; default: one client called 'client')",
    )
    args = parser.parse_args(argv)
    clients = args.client or ["client"]
    try:
        made = make_keys(args.directory, clients)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in made:
        print(f"wrote {path}")
    keydir = args.directory.resolve()
    print(
        "\nAdd to the config (the same [security] table serves the daemon and its clients):\n"
        "[security]\n"
        "# the daemon's side (keep the secret on the daemon's machine)\n"
        f'server_key = "{keydir / f"{SERVER_NAME}.key_secret"}"\n'
        f'client_keys = "{keydir / "clients"}"\n'
        "# a client's side: the hook, display and status reader (copy its secret to it only)\n"
        f'client_key = "{keydir / f"{clients[0]}.key_secret"}"\n'
        f'server_public_key = "{keydir / f"{SERVER_NAME}.key"}"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
