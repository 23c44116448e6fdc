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
import json
import os
import re
import shutil
import sys
from pathlib import Path

import zmq.auth

__all__ = ["SERVER_NAME", "main", "make_keys"]

SERVER_NAME = "server"
"""Base name of the daemon's certificate files."""


def make_keys(directory: Path, clients: list[str]) -> list[Path]:
    """Create the server keys (unless present) and one key pair per client; return new files.

    Everything is checked before anything is written: raises `ValueError` for a client name
    that is not a plain file name, and `FileExistsError` if a client's files already exist or
    the server's public certificate is there without its secret (never silently replaced:
    clients hold a copy). The folder is made owner-only and every file is created under a
    umask of 077, so a secret is never readable by others, not even for a moment; the public
    certificates are then opened to reading (they are meant to be copied).
    """
    for name in clients:
        if not _NAME.fullmatch(name) or name == SERVER_NAME:
            raise ValueError(
                f"client name {name!r}: letters, digits, '_', '-' and '.' only, not {SERVER_NAME!r}"
            )
    if len(set(clients)) != len(clients):
        raise ValueError(f"client names given twice: {clients}")
    server_public = directory / f"{SERVER_NAME}.key"
    has_server = (directory / f"{SERVER_NAME}.key_secret").exists()
    if server_public.exists() and not has_server:
        raise FileExistsError(
            f"{server_public} exists without its secret {SERVER_NAME}.key_secret: move it "
            "away to make new server keys (clients hold a copy of the old one)"
        )
    allowed = directory / "clients"
    for name in clients:
        public, secret = allowed / f"{name}.key", directory / f"{name}.key_secret"
        if public.exists() or secret.exists() or (directory / f"{name}.key").exists():
            raise FileExistsError(f"keys for client {name!r} already exist in {directory}")
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    allowed.mkdir(exist_ok=True)
    made: list[Path] = []
    if not has_server:
        made += _create(directory, SERVER_NAME)
    for name in clients:
        created = _create(directory, name)
        public = allowed / f"{name}.key"
        shutil.move(created[0], public)
        made += [public, created[1]]
    return made


_NAME = re.compile(r"[A-Za-z0-9_.-]+")
"""A client name: one plain file name (no folder, no '..' escaping KEYDIR)."""


def _create(directory: Path, name: str) -> list[Path]:
    """Create NAME.key (readable) and NAME.key_secret (owner-only) in `directory`."""
    # pyzmq writes the files under the process umask and has no mode argument: a umask of
    # 077 makes the secret owner-only from its first byte, not after a chmod
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
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
        return 2
    for path in made:
        print(f"wrote {path}")
    keydir = args.directory.resolve()

    def toml(path: Path) -> str:  # a TOML basic string: JSON's escapes are TOML's (but DEL)
        return json.dumps(str(path), ensure_ascii=False).replace("\x7f", "\\u007f")

    print(
        "\nAdd to the config (the same [security] table serves the daemon and its clients):\n"
        "[security]\n"
        "# the daemon's side (keep the secret on the daemon's machine)\n"
        f"server_key = {toml(keydir / f'{SERVER_NAME}.key_secret')}\n"
        f"client_keys = {toml(keydir / 'clients')}\n"
        "# a client's side: the hook, display and status reader (copy its secret to it only)\n"
        f"client_key = {toml(keydir / f'{clients[0]}.key_secret')}\n"
        f"server_public_key = {toml(keydir / f'{SERVER_NAME}.key')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
