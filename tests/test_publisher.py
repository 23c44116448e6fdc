"""The daemon's publishers (`live.security.publisher`): subscribers get everything; a
subscription message is bounded, and with CURVE a peer without an allowed key cannot send one
(review 57: ZeroMQ stores every distinct subscription, some 48 bytes per byte sent)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq

from live.security import SUBSCRIPTION_BYTES, Gatekeeper, ServerKeys, publisher


def _rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def _receive_one(pub: zmq.Socket[bytes], sub: zmq.Socket[bytes], message: bytes) -> bytes:
    """Publish `message` until `sub` hears it (its subscription travels first); return it."""
    for _ in range(400):  # 20 s at most: a slow machine joins in far less
        pub.send(message, zmq.NOBLOCK)
        if sub.poll(50):
            return sub.recv()
    raise AssertionError("the subscriber never heard the publisher")


def test_a_subscriber_hears_everything_a_publisher_sends() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = publisher(ctx, "tcp://127.0.0.1:*", None, sndhwm=10)
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    everything, topic = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    everything.setsockopt(zmq.SUBSCRIBE, b"")
    topic.setsockopt(zmq.SUBSCRIBE, b"status")  # a SUB still filters on its side
    for sub in (everything, topic):
        sub.linger = 0
        sub.connect(endpoint)
    try:
        assert _receive_one(pub, everything, b"stack 1") == b"stack 1"
        assert _receive_one(pub, topic, b"status 2") == b"status 2"
        assert not topic.poll(200) or topic.recv().startswith(b"status")
    finally:
        for socket in (everything, topic, pub):
            socket.close()
        ctx.term()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_with_curve_a_flood_of_subscriptions_from_an_unknown_key_costs_nothing() -> None:
    # ZeroMQ keeps every distinct subscription a connected peer sends (600 of 4,000 bytes grew
    # a plain PUB by some 110 MB, a manual XPUB as much): the defence is CURVE, whose handshake
    # ends a peer without an allowed key before its first subscription.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server_public, server_secret = zmq.curve_keypair()
    client_public, _ = zmq.curve_keypair()
    keys = ServerKeys(server_public, server_secret, frozenset({client_public}))
    gatekeeper = Gatekeeper(ctx, keys.allowed)
    pub = publisher(ctx, "tcp://127.0.0.1:*", keys, sndhwm=10)
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    attack = textwrap.dedent(
        f"""
        import time, zmq
        ctx = zmq.Context(); sub = ctx.socket(zmq.SUB)
        sub.curve_publickey, sub.curve_secretkey = zmq.curve_keypair()  # not on the list
        sub.curve_serverkey = {server_public!r}
        sub.connect({endpoint!r})
        for i in range(600):
            sub.setsockopt(zmq.SUBSCRIBE, i.to_bytes(2, "big") + b"z" * 3998)
        print("sent", flush=True)
        time.sleep(30)
        """
    )
    before = peak = _rss_mb()
    attacker = subprocess.Popen([sys.executable, "-c", attack], stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout is not None and attacker.stdout.readline().strip() == "sent"
        deadline = time.monotonic() + 60
        published = 0
        while gatekeeper.denied == 0 or published < 100:  # denied, then a second more
            assert time.monotonic() < deadline, "the unknown key was never denied"
            pub.send(b"status", zmq.NOBLOCK)  # publishing, as the daemon does
            published += gatekeeper.denied > 0
            peak = max(peak, _rss_mb())
            time.sleep(0.01)
        assert peak - before < 20, f"the publisher grew {peak - before:.0f} MB"
    finally:
        attacker.kill()
        attacker.wait(30)
        pub.close()
        gatekeeper.stop()
        ctx.term()


def test_a_subscription_past_the_limit_costs_its_peer_only() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = publisher(ctx, "tcp://127.0.0.1:*", None, sndhwm=10)
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    hostile, good = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
    hostile.setsockopt(zmq.SUBSCRIBE, b"x" * (SUBSCRIPTION_BYTES + 1))
    good.setsockopt(zmq.SUBSCRIBE, b"")
    for sub in (hostile, good):
        sub.linger = 0
        sub.connect(endpoint)
    try:
        assert _receive_one(pub, good, b"stack") == b"stack"
        # the hostile peer was disconnected before its subscription was stored: it hears
        # nothing, even of what matches its prefix
        pub.send(b"x" * (SUBSCRIPTION_BYTES + 8))
        assert not hostile.poll(300)
    finally:
        for socket in (hostile, good, pub):
            socket.close()
        ctx.term()
