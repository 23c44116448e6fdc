"""ZeroMQ endpoint addresses: the one home for what a ``tcp://host:port`` host means.

A daemon *binds* its endpoints; the hook, the viewers and the status reader *connect* to them.
A wildcard host (``*``, ``0.0.0.0``, ``[::]``) is something only a binder can use: it listens on
every address of the machine, loopback included, and cannot itself be connected to. Whether an
endpoint is reachable from the network (`is_loopback`), which address a client on the same
machine connects to (`connect_address`), and whether two binds collide (`same_bind_address`)
all follow from that, and are answered here only.

Standard library only, so the acquisition hook, which runs inside Micro-Manager's Python, can
use it without the daemon's configuration stack.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = [
    "WILDCARD_HOSTS",
    "connect_address",
    "host_port",
    "is_loopback",
    "is_wildcard",
    "same_bind_address",
]

WILDCARD_HOSTS = frozenset({"*", "0.0.0.0", "[::]", "::"})
"""Hosts that bind every address: ZeroMQ's ``*``, IPv4's and IPv6's "any" address."""


def host_port(endpoint: str) -> tuple[str, str]:
    """Split a ``tcp://host:port`` endpoint at its last colon (``""`` host: no port given)."""
    host, _, port = endpoint.partition("://")[2].rpartition(":")
    return host, port


def is_wildcard(endpoint: str) -> bool:
    """Whether `endpoint` is a tcp endpoint whose host binds every address (`WILDCARD_HOSTS`)."""
    return endpoint.startswith("tcp://") and host_port(endpoint)[0] in WILDCARD_HOSTS


def is_loopback(endpoint: str) -> bool:
    """Whether binding `endpoint` listens on this machine only (not on any network interface).

    ``ipc://`` and ``inproc://`` are local. A ``tcp://`` endpoint is loopback only when its host
    is ``localhost`` or a loopback address (``127.x.x.x``, ``[::1]``); everything else (a
    wildcard, an interface name such as ``eth0``, a LAN address or a host name) may be
    reachable from the network.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = host_port(endpoint)[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name
        return False


def same_bind_address(a: str, b: str) -> bool:
    """Whether binding endpoints `a` and `b` would take the same address.

    ``localhost`` is 127.0.0.1, and a wildcard host takes its port on every address, so it
    collides with any other host on that port.
    """
    if a == b:
        return True
    if not (a.startswith("tcp://") and b.startswith("tcp://")):
        return False
    (host_a, port_a), (host_b, port_b) = host_port(a), host_port(b)
    if int(port_a) != int(port_b):
        return False
    hosts = {"127.0.0.1" if h == "localhost" else h for h in (host_a, host_b)}
    return len(hosts) == 1 or bool(hosts & WILDCARD_HOSTS)


def connect_address(endpoint: str) -> str:
    """Return the address a client on this machine connects to for the bound `endpoint`.

    An IPv4 wildcard (``*``, ``0.0.0.0``) becomes ``127.0.0.1``, ``[::]`` becomes ``[::1]``: a
    wildcard listens on loopback too. A client on *another* machine must be given the daemon's
    host instead; this function cannot know it. Any other endpoint is its own address.
    Raises `ValueError` (one line) for a host that is one of this machine's network interface
    names (``eth0``): ZeroMQ binds to that interface's address, which the client must be given.
    """
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, port = host_port(endpoint)
    if host in WILDCARD_HOSTS:
        return f"tcp://[::1]:{port}" if ":" in host else f"tcp://127.0.0.1:{port}"
    if host in {name for _, name in socket.if_nameindex()}:
        raise ValueError(
            f"{endpoint} binds to interface {host}'s address: connect to that address "
            f"(tcp://ADDRESS:{port}, e.g. with --endpoint)"
        )
    return endpoint
