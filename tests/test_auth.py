"""Authentication off loopback: CURVE keys, the ZAP allow-list, and the refusal to start without
them. Real ZeroMQ sockets on 127.0.0.1 with CURVE forced on (``security.curve = "required"``)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from live.config import ConfigError, ScopeConfig, check_serving, validate_config
from live.display import LatestStack
from live.hook import FrameSender
from live.keys import make_keys
from live.metrics import Metrics, StatusPublisher, StatusReader
from live.protocol import decode, max_part_bytes
from live.recorder import SeqGate
from live.router import Ledger, Router
from live.run import Daemon, FinishReason
from live.security import (
    ClientKeys,
    Gatekeeper,
    client_keys,
    connect_curve,
    read_client_keys,
    server_keys,
)
from live.supervisor import Supervisor
from tests.live_helpers import SIDE, free_port, free_ports, live_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    """Server keys and two allowed clients, made like ``python -m live.keys``."""
    make_keys(tmp_path / "keys", ["client", "scope2"])
    return tmp_path / "keys"


def _secured(
    tmp_path: Path, keydir: Path, model: Path | None = None, **sections: Any
) -> ScopeConfig:
    """A loopback config with CURVE required and the keys of `keydir`."""
    security = {
        "curve": "required",
        "server_key": str(keydir / "server.key_secret"),
        "client_keys": str(keydir / "clients"),
        "client_key": str(keydir / "client.key_secret"),
        "server_public_key": str(keydir / "server.key"),
    }
    if model is None:
        names = ("frames", "stacks", "recorder", "status")
        endpoints = {
            n: f"tcp://127.0.0.1:{port}" for n, port in zip(names, free_ports(4), strict=True)
        }
        return validate_config({"endpoints": endpoints, "security": security})
    return live_config(tmp_path, model, security=security, **sections)


def _server_config(keydir: Path) -> ScopeConfig:
    """A config with CURVE required: the daemon's secret key and the allow-list of `keydir`."""
    return validate_config(
        {
            "security": {
                "curve": "required",
                "server_key": str(keydir / "server.key_secret"),
                "client_keys": str(keydir / "clients"),
            }
        }
    )


def _wrong_keys(config: ScopeConfig) -> ClientKeys:
    """A well-formed client key pair that is not on the daemon's allow-list."""
    good = client_keys(config, "frames")
    assert good is not None
    public, secret = zmq.curve_keypair()
    return ClientKeys(public, secret, good.server_public)


class _SecuredRouter:
    """The daemon's frames and raw-republish sockets as CURVE servers behind a Gatekeeper."""

    def __init__(self, config: ScopeConfig) -> None:
        keys = server_keys(config)
        assert keys is not None
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.gatekeeper = Gatekeeper(self.ctx, keys.allowed)
        self.metrics = Metrics()
        gate = SeqGate("raw", (SIDE, SIDE), np.dtype(np.uint16), 1000)
        self.router = Router(
            self.ctx,
            frames_endpoint=config.endpoints.frames,
            worker_endpoints=[],
            ledger=Ledger(0),
            metrics=self.metrics,
            admit=lambda message: gate.admit(message)[1],
            raw_endpoint=config.endpoints.recorder,
            max_part_bytes=max_part_bytes((SIDE, SIDE)),
            frames_keys=keys,
            raw_keys=keys,
            supervisor=Supervisor(),
        )
        self.router.start()

    def close(self) -> None:
        self.router.stop_event.set()
        self.router.join(10)
        self.router.close_worker_sockets()
        self.gatekeeper.stop()
        self.ctx.term()


def _send(sender: FrameSender, seqs: range) -> None:
    for seq in seqs:
        sender.send(np.full((SIDE, SIDE), seq, np.uint16), seq=seq)


def _frames_in_after(metrics: Metrics, expected: int, timeout_s: float) -> int:
    """Wait up to `timeout_s` for `expected` frames; return how many arrived."""
    deadline = time.monotonic() + timeout_s
    while metrics.snapshot(advance=False).frames_in < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return metrics.snapshot(advance=False).frames_in


def test_only_a_client_with_an_allowed_key_gets_frames_in(tmp_path: Path, keydir: Path) -> None:
    config = _secured(tmp_path, keydir)
    served = _SecuredRouter(config)
    senders = {
        "no keys": FrameSender(config.endpoints.frames, linger_ms=0),
        "wrong key": FrameSender(config.endpoints.frames, linger_ms=0, keys=_wrong_keys(config)),
    }
    try:
        _send(senders["no keys"], range(0, 5))
        _send(senders["wrong key"], range(5, 10))
        assert _frames_in_after(served.metrics, 1, 2.0) == 0  # nothing got through
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
        while served.gatekeeper.denied < 1:  # the wrong key is refused by ZAP
            assert time.monotonic() < deadline, "ZAP never refused the wrong key"
            time.sleep(0.05)
        with FrameSender.for_config(config) as good:  # the config's client key
            _send(good, range(10, 15))
            assert _frames_in_after(served.metrics, 5, 60.0) == 5
        # A second allowed client (from the same clients/ folder) works too.
        scope2 = read_client_keys(keydir / "scope2.key_secret", keydir / "server.key")
        with FrameSender(config.endpoints.frames, keys=scope2) as second:
            _send(second, range(15, 17))
            assert _frames_in_after(served.metrics, 7, 60.0) == 7
        assert _frames_in_after(served.metrics, 8, 0.5) == 7  # still none of the refused ones
    finally:
        for sender in senders.values():
            sender.close()
        served.close()


def test_published_frames_and_status_reach_only_allowed_clients(
    tmp_path: Path, keydir: Path
) -> None:
    config = _secured(tmp_path, keydir)
    served = _SecuredRouter(config)
    good_keys = client_keys(config, "status")
    status = StatusPublisher(served.ctx, config.endpoints.status, server_keys(config))
    readers = {
        "good": StatusReader(config.endpoints.status, keys=good_keys),
        "none": StatusReader(config.endpoints.status),
        "wrong": StatusReader(config.endpoints.status, keys=_wrong_keys(config)),
    }
    raw_subs: dict[str, zmq.Socket[bytes]] = {}
    sub_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    for name, keys in (("good", good_keys), ("none", None), ("wrong", _wrong_keys(config))):
        sub = sub_ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        connect_curve(sub, keys)
        sub.connect(config.endpoints.recorder)
        raw_subs[name] = sub
    try:
        got: dict[str, Any] = {}
        deadline = time.monotonic() + 60  # generous: a loaded CI machine is slow
        while "good" not in got:  # PUB drops until the subscription has arrived
            assert time.monotonic() < deadline, "the allowed status reader never got a status"
            status.publish(served.metrics.snapshot())
            for name, reader in readers.items():
                if (value := reader.latest(50)) is not None:
                    got[name] = value
        with FrameSender.for_config(config) as sender:
            # PUB drops until the CURVE handshake and the subscription are through: probe
            # with fresh seqs until one is republished, then send three more
            probe = 0
            while not raw_subs["good"].poll(200):
                assert time.monotonic() < deadline + 60, "the allowed raw subscriber got nothing"
                _send(sender, range(probe, probe + 1))
                probe += 1
            _send(sender, range(100, 103))
            received = []
            while len(received) < 3 and raw_subs["good"].poll(30_000):
                seq = decode(raw_subs["good"].recv_multipart()).header.seq
                if seq >= 100:  # a late probe is not one of the three
                    received.append(seq)
        assert received == [100, 101, 102]
        assert set(got) == {"good"}
        assert not raw_subs["none"].poll(300) and not raw_subs["wrong"].poll(300)
    finally:
        for reader in readers.values():
            reader.close()
        for sub in raw_subs.values():
            sub.close()
        sub_ctx.term()
        status.close()
        served.close()


def test_a_daemon_with_curve_required_runs_its_own_source_and_serves_allowed_viewers(
    tmp_path: Path, keydir: Path, tiny_model_files
) -> None:
    config = _secured(tmp_path, keydir, tiny_model_files["onnx"], source={"rate_hz": 20.0})
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", preflight_check=False)
    viewer = LatestStack(config.endpoints.stacks, keys=client_keys(config, "stacks"))
    stranger = LatestStack(config.endpoints.stacks)
    try:
        daemon.start()
        seen = None
        deadline = time.monotonic() + 60
        while seen is None:
            assert time.monotonic() < deadline, "the allowed viewer never got a stack"
            daemon.supervise(0.2, quiet=True)
            seen = viewer.poll(0)
        daemon.supervise(0.5, quiet=True)  # a few more stacks the stranger must not get
        daemon.finish(FinishReason.STOPPED)
        assert stranger.poll(100) is None and stranger.received == 0
    finally:
        summary = daemon.stop()
        viewer.close()
        stranger.close()
    n = summary.frames_acquired
    assert summary.failures == [] and n > 0
    assert summary.frames_in == n and summary.raw_recorded == n  # the daemon's own key works


def test_no_keys_no_start_one_line_naming_the_endpoint(tmp_path: Path) -> None:
    scope = tmp_path / "scope.toml"
    scope.write_text(
        f'[endpoints]\nframes = "tcp://0.0.0.0:{free_port()}"\n'
        f'[recorder]\npath = "{tmp_path / "runs"}"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "live.run", "--scope", str(scope)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, err
    assert "endpoints.frames = 'tcp://0.0.0.0:" in err[0] and "python -m live.keys" in err[0]
    assert out.stdout == "" and not (tmp_path / "runs").exists()  # refused before anything


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "eth0", "192.168.1.20", "scope-pc"])
def test_every_non_loopback_bind_needs_keys_and_loopback_does_not(host: str) -> None:
    config = validate_config({"endpoints": {"status": f"tcp://{host}:5999"}})
    assert config.curve_endpoints() == {"status": f"tcp://{host}:5999"}
    with pytest.raises(ConfigError, match=r"endpoints\.status = .* reachable beyond loopback"):
        check_serving(config)
    check_serving(validate_config({}))  # the loopback default needs no keys


def test_curve_required_covers_loopback_and_clients_need_their_keys(tmp_path: Path) -> None:
    config = validate_config({"security": {"curve": "required"}})
    assert list(config.curve_endpoints()) == ["frames", "stacks", "recorder", "status"]
    with pytest.raises(ConfigError, match=r"security\.curve = 'required'"):
        check_serving(config)
    with pytest.raises(ConfigError, match=r"a client needs security\.client_key"):
        client_keys(config, "frames")
    assert client_keys(validate_config({}), "frames") is None


def test_key_files_are_checked(tmp_path: Path, keydir: Path) -> None:
    base = {
        "curve": "required",
        "server_key": str(keydir / "server.key"),  # the public file, not the secret one
        "client_keys": str(keydir / "clients"),
    }
    with pytest.raises(ConfigError, match="holds no secret key"):
        server_keys(validate_config({"security": base}))
    (tmp_path / "empty").mkdir()
    base.update(server_key=str(keydir / "server.key_secret"), client_keys=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"no public certificates \(\*\.key\)"):
        server_keys(validate_config({"security": base}))
    garbage = tmp_path / "garbage.key"
    garbage.write_text('curve\n    public-key = "short"\n')
    base.update(client_keys=[str(garbage)])
    with pytest.raises(ConfigError, match="40-character Z85"):
        server_keys(validate_config({"security": base}))
    # 40 characters that are not Z85 passed a length check, to fail at bind as "Invalid argument"
    for text in ("~" * 40, "#" * 40):  # a foreign character; Z85 whose groups overflow 32 bits
        garbage.write_text(f'curve\n    public-key = "{text}"\n')
        with pytest.raises(ConfigError, match=r"garbage\.key does not hold a valid CURVE key"):
            server_keys(validate_config({"security": base}))
    # a secret file whose public line is another key's
    text = (keydir / "client.key_secret").read_text()
    other = (keydir / "clients" / "scope2.key").read_text().split('public-key = "')[1][:40]
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(text.replace(text.split('public-key = "')[1][:40], other))
    mixed.chmod(0o600)
    with pytest.raises(ConfigError, match="the public one made from the secret one"):
        read_client_keys(mixed, keydir / "server.key")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_a_secret_key_others_can_read_is_refused(
    keydir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As ssh refuses a private key anyone can read: one line naming the file and the fix. A
    key its group can read (root:deepz 0640, a shared service account) is said, not refused."""
    secret = keydir / "client.key_secret"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"can be read by every user \(mode 0644\).*chmod 600"):
        read_client_keys(secret, keydir / "server.key")
    secret.chmod(0o640)
    with caplog.at_level("WARNING", logger="live.security"):
        read_client_keys(secret, keydir / "server.key")
    assert any("can be read by its group (mode 0640)" in r.getMessage() for r in caplog.records)
    secret.chmod(0o600)
    keys = read_client_keys(secret, keydir / "server.key")
    assert keys.secret.decode() not in repr(keys)  # never in a log line or a traceback


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_keys_every_user_can_write_are_refused(
    keydir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever can write the allow-list lets in their own key; whoever can write the server's
    public key a client trusts can swap it: refused, naming the file (group: said)."""
    config = _server_config(keydir)
    clients = keydir / "clients"
    for writable, mode in ((clients, 0o777), (clients / "scope2.key", 0o666)):
        old = stat.S_IMODE(writable.stat().st_mode)
        writable.chmod(mode)
        with pytest.raises(ConfigError, match=rf"{writable.name} can be written by every user"):
            server_keys(config)
        writable.chmod(old)
    (clients / "scope2.key").chmod(0o664)
    with caplog.at_level("WARNING", logger="live.security"):
        assert server_keys(config) is not None
    assert any("can be written by its group" in r.getMessage() for r in caplog.records)
    (keydir / "server.key").chmod(0o646)
    with pytest.raises(ConfigError, match=r"server\.key can be written by every user"):
        read_client_keys(keydir / "client.key_secret", keydir / "server.key")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_an_allow_list_others_can_add_to_or_own_is_refused_and_a_fifo_never_read(
    tmp_path: Path, keydir: Path
) -> None:
    """Review 82: a sticky world-writable allow-list (mode 1777) let any user add their key;
    a key line without "=" was an IndexError traceback; a FIFO named ``*.key`` blocked the
    start for ever. Each is one line now."""
    config = _server_config(keydir)
    clients = keydir / "clients"
    clients.chmod(0o1777)
    with pytest.raises(ConfigError, match=r"clients can be written by every user \(mode 1777\)"):
        server_keys(config)
    clients.chmod(0o755)
    fifo = clients / "blocking.key"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"blocking\.key is not a regular file"):
        server_keys(config)  # returns: the FIFO is never opened
    fifo.unlink()
    broken = tmp_path / "broken.key"
    broken.write_text("curve\n    public-key\n")  # no "=": pyzmq's IndexError
    with pytest.raises(ConfigError, match=r"cannot read CURVE certificate .*broken\.key"):
        read_client_keys(keydir / "client.key_secret", broken)


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() != 0,
    reason="only root can give a file to another user",
)
def test_a_key_file_another_user_owns_is_refused(keydir: Path) -> None:
    """Its owner could rewrite it, or make it writable, and let another key in (review 82)."""
    config = _server_config(keydir)
    foreign = keydir / "clients" / "scope2.key"
    os.chown(foreign, 65534, -1)  # nobody's: they could rewrite it, or let another key in
    with pytest.raises(ConfigError, match=r"scope2\.key is owned by user id 65534"):
        server_keys(config)
    os.chown(foreign, 0, -1)
    assert server_keys(config) is not None


def test_make_keys_checks_everything_before_writing(tmp_path: Path) -> None:
    keydir = tmp_path / "k"
    for bad in ("../escaped", "a/b", "server", ""):
        with pytest.raises(ValueError, match="client name"):
            make_keys(keydir, ["ok", bad])
        assert not keydir.exists()  # nothing written, not even the server keys
    made = make_keys(keydir, ["scope"])
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in made} == {
        "server.key": 0o644,
        "server.key_secret": 0o600,
        "scope.key": 0o644,
        "scope.key_secret": 0o600,
    }
    (keydir / "server.key_secret").unlink()  # the public one is left: clients hold a copy
    before = (keydir / "server.key").read_bytes()
    with pytest.raises(FileExistsError, match="exists without its secret"):
        make_keys(keydir, ["other"])
    assert (keydir / "server.key").read_bytes() == before
    assert not (keydir / "other.key_secret").exists()


def test_python_m_live_keys_makes_usable_keys_and_never_overwrites(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "live.keys", str(tmp_path / "k")]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("server.key", "server.key_secret", "clients/client.key", "client.key_secret"):
        assert (tmp_path / "k" / name).is_file()
    for name in ("server.key_secret", "client.key_secret"):
        assert stat.S_IMODE((tmp_path / "k" / name).stat().st_mode) == 0o600
    assert "[security]" in out.stdout and "server_key = " in out.stdout
    assert f'client_keys = "{tmp_path / "k" / "clients"}"' in out.stdout
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr


def test_the_printed_config_lines_parse_as_toml_whatever_the_folder_is_called(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from live.keys import main as keys_main

    keydir = tmp_path / 'old\\bkeys "lab"\\tµ'  # a backslash, quotes, a TOML escape, UTF-8
    assert keys_main([str(keydir)]) == 0
    lines = capsys.readouterr().out.split("Add to the config", 1)[1].split("\n", 1)[1]
    security = tomllib.loads(lines)["security"]
    assert security["server_key"] == str(keydir.resolve() / "server.key_secret")
    assert security["client_keys"] == str(keydir.resolve() / "clients")
    assert Path(security["client_key"]).is_file() and Path(security["server_public_key"]).is_file()


def test_keys_no_endpoint_uses_are_said_not_silently_dropped(
    keydir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = validate_config(
        {
            "security": {
                "server_key": str(keydir / "server.key_secret"),
                "client_keys": str(keydir / "clients"),
            }
        }
    )
    with caplog.at_level("WARNING", logger="live.security"):
        assert server_keys(config) is None  # every endpoint loopback, curve "auto"
    assert any(
        "keys are given but no endpoint uses CURVE" in r.getMessage() for r in caplog.records
    )


def test_a_client_connects_to_a_wildcard_bind_on_loopback(keydir: Path) -> None:
    """A stacks endpoint bound to every address (how stacks are served beyond loopback) is
    connected to on loopback by the daemon's viewer and `view --scope` (review 73: both
    were handed the wildcard, which cannot be connected to, and exited)."""
    import socket

    from live.addresses import connect_address
    from live.security import client_connection

    assert connect_address("tcp://*:5556") == "tcp://127.0.0.1:5556"
    assert connect_address("tcp://0.0.0.0:5556") == "tcp://127.0.0.1:5556"
    assert connect_address("tcp://[::]:5556") == "tcp://[::1]:5556"
    for same in ("tcp://127.0.0.1:5556", "tcp://scope-pc:5556", "ipc:///tmp/s"):
        assert connect_address(same) == same
    nic = socket.if_nameindex()[0][1]  # "lo" at least
    with pytest.raises(ValueError, match=f"binds to interface {nic}'s address"):
        connect_address(f"tcp://{nic}:5556")
    keys = {
        "server_key": str(keydir / "server.key_secret"),
        "client_keys": str(keydir / "clients"),
        "client_key": str(keydir / "client.key_secret"),
        "server_public_key": str(keydir / "server.key"),
    }
    config = validate_config({"endpoints": {"stacks": "tcp://*:5999"}, "security": keys})
    address, client = client_connection(
        "stacks", config=config, endpoint=None, client_key=None, server_key=None
    )
    assert client is not None  # served beyond loopback: with CURVE
    assert address == "tcp://127.0.0.1:5999"
    # and it reaches a real wildcard bind
    ctx = zmq.Context()
    try:
        server, client = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        port = server.bind_to_random_port("tcp://*")
        client.connect(connect_address(f"tcp://*:{port}"))
        client.send(b"stack")
        assert server.poll(5000) and server.recv() == b"stack"
    finally:
        ctx.destroy(linger=0)


def test_wildcard_hosts_have_one_meaning_for_binders_and_senders() -> None:
    """The hook refuses to send to exactly the hosts a client is sent to loopback for, and a
    wildcard bind collides with every other host on its port (config's distinct-endpoints rule)."""
    from live.addresses import connect_address, is_wildcard, same_bind_address

    for wild in ("tcp://*:5599", "tcp://0.0.0.0:5599", "tcp://[::]:5599"):
        assert is_wildcard(wild)
        assert connect_address(wild) != wild
        with pytest.raises(ValueError, match="the daemon binds"):
            FrameSender(wild)
        assert same_bind_address(wild, "tcp://127.0.0.1:5599")
        assert not same_bind_address(wild, "tcp://127.0.0.1:5600")
    for plain in ("tcp://127.0.0.1:5599", "tcp://scope-pc:5599", "ipc:///tmp/x"):
        assert not is_wildcard(plain)
        assert connect_address(plain) == plain
