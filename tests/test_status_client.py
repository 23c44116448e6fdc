"""``deepz-live status``: the client against a real StatusPublisher on loopback ZeroMQ."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import zmq

from live.cli import main as cli_main
from live.config import load_config
from live.keys import make_keys
from live.metrics import Metrics, RunState, StatusPublisher, StatusReader
from live.security import Gatekeeper, ServerKeys, server_keys
from live.status_client import human_line, main
from tests.live_helpers import free_port

OUTPUT = "runs/20261125-101010.ome.zarr"


@contextmanager
def _publishing(
    endpoint: str, metrics: Metrics, keys: ServerKeys | None = None
) -> Iterator[threading.Event]:
    """Publish `metrics` every 50 ms (PUB drops until a subscriber has joined); yield stop."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    gatekeeper = Gatekeeper(ctx, keys.allowed) if keys is not None else None
    publisher = StatusPublisher(ctx, endpoint, keys)
    stop = threading.Event()

    def publish() -> None:
        while not stop.wait(0.05):
            publisher.publish(metrics.snapshot())

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
        publisher.close()
        if gatekeeper is not None:
            gatekeeper.stop()
        ctx.term()


def _running() -> Metrics:
    metrics = Metrics()
    metrics.frame_in()
    metrics.stack_out(42.0)
    metrics.set_run_info(state=RunState.RUNNING, backend="onnxruntime on CPU", output=OUTPUT)
    return metrics


def test_once_json_prints_the_daemons_state_backend_and_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with _publishing(endpoint, _running()):
        code = main(["--endpoint", endpoint, "--once", "--json", "--timeout", "60"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 1
    status = json.loads(out[0])
    assert status["state"] == "running" and status["backend"] == "onnxruntime on CPU"
    assert status["output"] == OUTPUT and status["frames_in"] == 1


def test_the_human_line_follows_a_scope_config_and_stops_when_the_run_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    scope = tmp_path / "scope.toml"
    scope.write_text(f'[endpoints]\nstatus = "{endpoint}"\n')
    metrics = _running()
    metrics.set_run_info(state=RunState.FINISHED)
    with _publishing(endpoint, metrics):
        code = cli_main(["status", "--scope", str(scope), "--timeout", "60"])  # no --once
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 1
    assert out[0].startswith("finished | onnxruntime on CPU | [") and out[0].endswith(OUTPUT)
    assert "in 1 " in out[0] and "stacks 1 " in out[0] and "42/42 ms" in out[0]


def test_curve_keys_come_from_the_config_when_the_endpoint_requires_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keydir = tmp_path / "keys"
    make_keys(keydir, ["client"])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    scope = tmp_path / "scope.toml"
    scope.write_text(
        f'[endpoints]\nstatus = "{endpoint}"\n\n[security]\ncurve = "required"\n'
        'server_key = "keys/server.key_secret"\nclient_keys = "keys/clients"\n'
        'client_key = "keys/client.key_secret"\nserver_public_key = "keys/server.key"\n'
    )
    keys = server_keys(load_config(scope))
    assert keys is not None
    with _publishing(endpoint, _running(), keys):
        assert main(["--scope", str(scope), "--once", "--json", "--timeout", "60"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "running"
        # The same endpoint without keys hears nothing: the handshake fails.
        assert main(["--endpoint", endpoint, "--once", "--timeout", "0.5"]) == 1


def test_no_status_within_the_timeout_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody publishes here
    assert main(["--endpoint", endpoint, "--timeout", "0.3"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"no status from {endpoint} within 0.3 s (is the daemon running?)"
    ]


def test_a_bad_config_or_endpoint_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[endpoints]\nstatus = 5558\n")
    assert main(["--scope", str(bad), "--once"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: bad config {bad}:") and "status" in err[0]
    assert main(["--scope", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["--endpoint", "not-an-address", "--once"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot connect to 'not-an-address'")
    with pytest.raises(SystemExit) as exc:
        main(["--endpoint", "tcp://127.0.0.1:1", "--timeout", "0"])
    assert exc.value.code == 2 and "must be > 0 and at most" in capsys.readouterr().err
    for endless in ("inf", "3e6", "nan"):  # zmq's poll takes a C int of ms: refused here
        with pytest.raises(SystemExit) as exc:
            main(["--endpoint", "tcp://127.0.0.1:1", "--timeout", endless])
        assert exc.value.code == 2 and "--timeout" in capsys.readouterr().err


def test_help_shows_examples_and_odd_snapshots_are_shown_not_dropped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "deepz-live status --scope config.toml --once" in out
    assert human_line({"frames_in": "many"}).startswith("status not understood (no 'elapsed_s')")
    # a field of another kind anywhere in a full snapshot: shown as not understood, naming it,
    # never drawn as if it were a count (nor raised)
    full = json.loads(Metrics().snapshot().to_json())
    assert human_line(full).startswith("starting | ? | [")  # the snapshot itself reads
    odd_values = (
        ("rejected", 5),
        ("rejected", {"x": -3, "y": 3}),
        ("elapsed_s", None),
        ("elapsed_s", 1e300),
        ("frames_in", "lots"),
        ("frames_in", True),
        ("frames_in", 2.0),
        ("queue_depth", [1, 2]),
        ("skipped", -5),
        ("frames_per_s", float("nan")),
        ("lost_ranges", [[1, "2"]]),
        ("state", "sleeping"),
        ("backend", 7),
    )
    for field, odd in odd_values:
        line = human_line({**full, field: odd})
        assert line.startswith(f"status not understood ('{field}' "), (field, odd, line)
        assert len(line) < 500


def test_strings_off_the_socket_cannot_drive_the_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = json.loads(Metrics().snapshot().to_json())
    hostile = {**full, "backend": "\ud800 lone", "output": "\x1b]0;owned\x07\x1b[2J"}
    line = human_line(json.loads(json.dumps(hostile)))  # as it comes off the wire
    assert "\x1b" not in line and "\x07" not in line and "\ud800" not in line
    assert "\\ud800 lone" in line and "\\x1b]0;owned\\x07" in line
    print(line)  # a lone surrogate made print raise
    assert "lone" in capsys.readouterr().out


@pytest.mark.parametrize(
    "junk_parts",
    [
        [b"not json"],
        [b'{"hello":1}'],  # a JSON object, not a snapshot
        [b"x", json.dumps({**asdict(Metrics().snapshot()), "state": "finished"}).encode()],
    ],
    ids=["not-json", "not-a-snapshot", "snapshot-as-second-part"],
)
def test_junk_on_the_endpoint_does_not_hold_off_the_timeout(
    capsys: pytest.CaptureFixture[str], junk_parts: list[bytes]
) -> None:
    # A publisher sending what is not a snapshot, without pause: --timeout still ends the wait.
    # A snapshot is one part: one riding behind another part is not read as one.
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    stop, ran_out = threading.Event(), threading.Event()

    def junk() -> None:
        for _ in range(3000):  # 30 s or more: far past the 0.3 s timeout, however slow
            if stop.wait(0.01):
                return
            pub.send_multipart(junk_parts)
        ran_out.set()

    thread = threading.Thread(target=junk, daemon=True)
    thread.start()
    try:
        code = main(["--endpoint", f"tcp://127.0.0.1:{port}", "--once", "--timeout", "0.3"])
        assert not ran_out.is_set(), "the client waited until the junk stopped"
    finally:
        stop.set()
        thread.join(30)
        pub.close()
        ctx.term()
    out, err = capsys.readouterr()
    assert code == 1 and out == ""  # nothing on stdout: no snapshot was read
    assert err.splitlines()[-1].startswith("no status from tcp://127.0.0.1:")
    assert all(line.startswith("status not understood") for line in err.splitlines()[:-1])


def test_a_reader_that_cannot_connect_closes_its_socket(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with pytest.raises(zmq.ZMQError) as failed:
        StatusReader("tcp://*:5558", ctx)  # a wildcard is for bind, not connect
    # The error's traceback holds the half-made object, as a logged or kept error would: the
    # socket must be closed by then, not left to the garbage collector.
    terminated = threading.Thread(target=ctx.term, daemon=True)  # blocks on an open socket
    terminated.start()
    terminated.join(30)  # generous: it returns at once when the socket was closed
    assert not terminated.is_alive(), "the socket of the failed connect was left open"
    assert failed.traceback  # (kept alive until here)
    assert main(["--endpoint", "tcp://*:5558", "--once"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot connect to 'tcp://*:5558': ")


@pytest.mark.parametrize(
    "flags", [["--client-key", "c.key_secret", "--server-key", "s.key"], ["--client-key", "c"]]
)
def test_key_files_are_refused_beside_a_scope_that_gives_the_keys(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--scope", "missing.toml", *flags])  # refused before the file is read
    err = capsys.readouterr().err.splitlines()[-1]
    assert exc.value.code == 2 and "--client-key / --server-key go with --endpoint" in err
