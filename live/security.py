"""Who may talk to the daemon: ZeroMQ CURVE keys on its endpoints and a ZAP allow-list.

CURVE (ZeroMQ's public-key handshake, CurveZMQ) encrypts a connection and proves each side's
key. A daemon endpoint that uses CURVE (`live.config.ScopeConfig.curve_endpoints`: every
endpoint beyond loopback, or every one with ``security.curve = "required"``) is a CURVE
*server* holding the daemon's secret key. A client (the hook's `live.hook.FrameSender`, the
viewer, `live.metrics.StatusReader`) must know the server's public key and present a key pair
of its own; the daemon's ZAP handler (`Gatekeeper`, pyzmq's `ThreadAuthenticator`) then lets
in only the public keys listed in ``security.client_keys``. A client without keys fails the
handshake and one with an unknown key is denied, so nothing either sends is ever delivered
and nothing the daemon publishes reaches them.

Keys are pyzmq certificate files made by ``python -m live.keys KEYDIR`` (`live.keys`).
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from live.addresses import connect_address
from live.config import ConfigError

if TYPE_CHECKING:
    from live.config import ScopeConfig

__all__ = [
    "ClientKeys",
    "Gatekeeper",
    "ServerKeys",
    "client_connection",
    "client_keys",
    "connect_curve",
    "read_client_keys",
    "serve_curve",
    "server_keys",
]

log = logging.getLogger(__name__)

_LOGGED_DENIALS = 10
"""Denied connection attempts logged; the rest are only counted."""


@dataclass(frozen=True)
class ServerKeys:
    """The daemon's CURVE key pair and the client public keys it lets in (all Z85 text)."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback's locals
    allowed: frozenset[bytes]


@dataclass(frozen=True)
class ClientKeys:
    """A client's CURVE key pair and the daemon's public key (all Z85 text)."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes


def _certificate(path: Path, what: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """Read one pyzmq certificate file; any problem is a one-line `ConfigError`."""
    _check_writers(path, what)  # first: a FIFO would block the read below for ever
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError, IndexError) as err:  # IndexError: a key line without "="
        raise ConfigError(f"{what}: cannot read CURVE certificate {path}: {err}") from None
    if secret and secret_key is None:
        raise ConfigError(
            f"{what}: {path} holds no secret key (give the *.key_secret file, not *.key)"
        )
    try:  # a key that is not 32 bytes of Z85 fails only at bind or connect, as "Invalid argument"
        if len(public) != 40 or len(zmq.utils.z85.decode(public)) != 32:
            raise ValueError
        if secret_key is not None and (
            len(secret_key) != 40 or zmq.curve_public(secret_key) != public
        ):
            raise ValueError
    except (ValueError, KeyError, struct.error, zmq.ZMQError):  # z85: KeyError on a foreign
        # character, struct.error on a group of five that overflows 32 bits
        raise ConfigError(
            f"{what}: {path} does not hold a valid CURVE key pair (40-character Z85 keys, "
            "the public one made from the secret one)"
        ) from None
    if secret and os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:  # as ssh refuses a private key anyone can read
            raise ConfigError(
                f"{what}: {path} can be read by every user (mode {mode:04o}); "
                f"make it owner-only: chmod 600 {path}"
            )
        if mode & 0o070:  # a group may be meant to share it (root:deepz 0640): said, not refused
            log.warning("%s: %s can be read by its group (mode %04o)", what, path, mode)
    return public, secret_key


def _check_writers(path: Path, what: str) -> None:
    """Refuse a key file or folder others can write or own, or a FIFO; warn on group-writable.

    A key "file" must be a regular file (a FIFO would block the read for ever). Whoever can
    write the allow-list lets in their own key, and whoever can write the server's public key
    a client trusts can put theirs in its place (ssh's StrictModes refuses such files too).
    For the allow-list folder a sticky bit does not help: adding a file is enough (review 82).
    Whoever owns a file or folder can make it writable: it must be this user's or root's. A
    group may be meant to manage the keys (root:deepz 0664): said, not refused.
    """
    if os.name != "posix":
        return
    try:
        info = path.stat()
    except OSError:  # missing or unreadable: said where the keys are read
        return
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        raise ConfigError(f"{what}: {path} is not a regular file (a FIFO, socket or device)")
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"{what}: {path} is owned by user id {info.st_uid}, not by this user or root, "
            "who could put their own key there"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o002:
        raise ConfigError(
            f"{what}: {path} can be written by every user (mode {mode:04o}), who could put "
            f"their own key there; make it writable by its owner only: chmod go-w {path}"
        )
    if mode & 0o020:
        log.warning("%s: %s can be written by its group (mode %04o)", what, path, mode)


def _public_keys(location: Path | list[Path]) -> frozenset[bytes]:
    """Read the client public keys of a folder (``*.key``) or a list of certificate files."""
    if isinstance(location, Path):
        _check_writers(location, "security.client_keys")
    files = sorted(location.glob("*.key")) if isinstance(location, Path) else location
    keys = frozenset(_certificate(path, "security.client_keys", secret=False)[0] for path in files)
    if not keys:
        raise ConfigError(f"security.client_keys: no public certificates (*.key) in {location}")
    return keys


def server_keys(config: ScopeConfig) -> ServerKeys | None:
    """Load the daemon's keys when any endpoint uses CURVE, else return None.

    Raises `ConfigError` (one line) when keys are needed but not configured or unreadable.
    """
    if not config.curve_endpoints():
        if config.security.server_key is not None or config.security.client_keys is not None:
            log.warning(
                "security: keys are given but no endpoint uses CURVE (all are loopback and "
                'security.curve = "auto"): they are not used; set security.curve = "required" '
                "to use them"
            )
        return None
    from live.config import check_serving

    check_serving(config)
    sec = config.security
    assert sec.server_key is not None and sec.client_keys is not None  # checked just above
    public, secret = _certificate(sec.server_key, "security.server_key", secret=True)
    assert secret is not None
    return ServerKeys(public, secret, _public_keys(sec.client_keys))


def client_keys(config: ScopeConfig, endpoint: str) -> ClientKeys | None:
    """Load a client's keys for endpoint `endpoint` (``"frames"``, ``"stacks"``, ...).

    Returns None when that endpoint does not use CURVE; raises `ConfigError` naming the
    missing key when it does and ``security.client_key`` / ``server_public_key`` are not set.
    """
    if endpoint not in config.curve_endpoints():
        return None
    sec = config.security
    for key in ("client_key", "server_public_key"):
        if getattr(sec, key) is None:
            raise ConfigError(
                f"endpoints.{endpoint} uses CURVE, so a client needs security.{key} "
                "(make keys with `python -m live.keys KEYDIR`)"
            )
    assert sec.client_key is not None and sec.server_public_key is not None
    return read_client_keys(sec.client_key, sec.server_public_key)


def read_client_keys(client_key: Path, server_public_key: Path) -> ClientKeys:
    """Read a client's secret certificate and the daemon's public one (`ConfigError` if bad)."""
    public, secret = _certificate(client_key, "security.client_key", secret=True)
    server_public, _ = _certificate(server_public_key, "security.server_public_key", secret=False)
    assert secret is not None
    return ClientKeys(public, secret, server_public)


def client_connection(
    name: str,
    *,
    config: ScopeConfig | None,
    endpoint: str | None,
    client_key: Path | None,
    server_key: Path | None,
) -> tuple[str, ClientKeys | None]:
    """Return the address and CURVE keys a command-line client connects to endpoint `name` with.

    The one place ``deepz-live view`` and ``deepz-live status`` turn ``--scope`` or
    ``--endpoint`` / ``--client-key`` / ``--server-key`` into a connection. With `config` (a
    loaded ``--scope``) both come from it: ``endpoints.<name>`` and, when that endpoint uses
    CURVE, `client_keys`; the callers refuse key files given beside ``--scope``. Without it,
    `endpoint` with both key files or neither. Raises `ConfigError` (a ValueError) with one line
    when the keys are half given or cannot be read.
    """
    if config is not None:
        try:  # a wildcard is bound to, not connected to: its loopback address
            address = connect_address(str(getattr(config.endpoints, name)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return address, client_keys(config, name)
    if endpoint is None:
        raise ConfigError("give --scope CONFIG or --endpoint URL")
    if (client_key is None) != (server_key is None):
        raise ConfigError("give both --client-key and --server-key, or neither")
    keys = None
    if client_key is not None and server_key is not None:
        keys = read_client_keys(client_key, server_key)
    return endpoint, keys


def serve_curve(socket: zmq.Socket[Any], keys: ServerKeys | None) -> None:
    """Make `socket` a CURVE server (call before `bind`); nothing when `keys` is None."""
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def connect_curve(socket: zmq.Socket[Any], keys: ClientKeys | None) -> None:
    """Make `socket` a CURVE client of the daemon (call before `connect`); None: nothing."""
    if keys is None:
        return
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.server_public


def subscriber(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    keys: ClientKeys | None,
    *,
    max_message_bytes: int,
    rcvhwm: int | None = None,
) -> zmq.Socket[bytes]:
    """Return a SUB socket taking every message the daemon publishes on `endpoint`.

    A CURVE client with `keys` (None: none); linger 0, so a reader's close drops what still
    waits; message parts over `max_message_bytes` dropped by ZeroMQ before they are buffered
    (a hostile publisher cannot fill memory); `rcvhwm` messages queued (None: ZeroMQ's
    default). The viewer's and the status reader's one set-up. Raises `zmq.ZMQError` when
    `endpoint` cannot be connected to (``tcp://*:5556``), after closing the socket.
    """
    sub = ctx.socket(zmq.SUB)
    try:
        sub.linger = 0
        if rcvhwm is not None:
            sub.rcvhwm = rcvhwm
        sub.maxmsgsize = max_message_bytes
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        connect_curve(sub, keys)
        sub.connect(endpoint)
    except BaseException:
        sub.close(linger=0)
        raise
    return sub


SUBSCRIPTION_BYTES = 4096
"""Largest message a daemon publisher takes from a subscriber: its clients subscribe to
everything (a 1-byte message); a peer sending a longer one is disconnected by ZeroMQ. Not
smaller: the limit holds for the CURVE handshake's commands too (INITIATE is some 300 bytes)."""


def publisher(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    keys: ServerKeys | None,
    *,
    sndhwm: int,
) -> zmq.Socket[bytes]:
    """Return the daemon's PUB socket on `endpoint` (stacks, raw frames, status).

    A CURVE server with `keys` (None: none); linger 0; `sndhwm` messages queued per
    subscriber, so a slow one misses messages rather than holding the daemon's memory.

    What a subscriber sends is bounded per message (`SUBSCRIPTION_BYTES`), but ZeroMQ keeps
    every distinct subscription a peer sends for as long as it stays connected, some 48
    bytes of memory per byte sent (a manual XPUB keeps them too: measured). On an endpoint
    without CURVE every local user is such a peer; with CURVE only the allowed keys are (the
    handshake ends any other before its first subscription): a shared machine sets
    ``security.curve = "required"``.
    """
    socket = ctx.socket(zmq.PUB)
    try:
        socket.linger = 0
        socket.sndhwm = sndhwm
        socket.maxmsgsize = SUBSCRIPTION_BYTES
        serve_curve(socket, keys)
        socket.bind(endpoint)
    except BaseException:
        socket.close(linger=0)
        raise
    return socket


class Gatekeeper:
    """The daemon's ZAP handler: lets in CURVE clients whose public key is on the allow-list.

    Runs pyzmq's `ThreadAuthenticator` on the daemon's context (ZAP applies to every socket
    of a context, and a CURVE server with no ZAP handler would let in any key, so it starts
    before any socket binds). Other mechanisms pass through: the daemon's private ipc sockets
    to its workers use none (NULL) and never listen on the network.

    Parameters
    ----------
    ctx : zmq.Context
        The daemon's context.
    allowed : frozenset of bytes
        Z85 public keys of the clients to let in (``security.client_keys``).
    """

    def __init__(self, ctx: zmq.Context[Any], allowed: frozenset[bytes]) -> None:
        self._allowed = set(allowed)
        self._lock = threading.Lock()
        self.denied = 0
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("live.security.zap"))
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def allow(self, public: bytes) -> None:
        """Add one more public key (Z85) to the allow-list."""
        with self._lock:
            self._allowed.add(public)

    def callback(self, domain: str, key: bytes) -> bool:
        """Credentials hook of pyzmq (ZAP thread): whether the Z85 public `key` may connect."""
        with self._lock:
            if key in self._allowed:
                return True
            self.denied += 1
            count = self.denied
        if count <= _LOGGED_DENIALS:
            more = " (further ones are only counted)" if count == _LOGGED_DENIALS else ""
            log.warning("refused a CURVE client with an unknown key %s…%s", key[:8].decode(), more)
        return False

    def stop(self) -> None:
        """Stop the ZAP thread (after the daemon's sockets are closed)."""
        self._auth.stop()
