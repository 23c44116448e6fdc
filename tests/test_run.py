"""The live daemon end to end: real sockets, a real worker process, a real OME-Zarr store."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.utils import find_multiscales

from engine.metadata import file_sha256
from live.config import validate_config
from live.recorder import missing_seqs
from live.run import EXIT_NO_FIT, Daemon, run
from live.worker import build_plan
from tests.live_helpers import live_config, push_frames

REPO = Path(__file__).resolve().parents[1]


def _read_store(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read raw and stacks with ome-zarr-py (independent reader: it finds the images from the
    collection's root) and the attrs with zarr."""
    images = {name: image for image, name, _ in find_multiscales(Path(path))}
    raw = np.asarray(next(iter(Reader(parse_url(str(images["raw"])))())).data[0])
    stacks = np.asarray(next(iter(Reader(parse_url(str(images["stacks"])))())).data[0])
    return raw, stacks, dict(zarr.open_group(path, mode="r").attrs["deepz"])


def test_import_live_run_does_not_import_torch() -> None:
    code = "import sys, live.run, live.worker, live.recorder; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_pipeline_in_process_on_the_simulated_scope(tmp_path: Path, tiny_model_files) -> None:
    config = live_config(tmp_path, tiny_model_files["onnx"], rate_hz=20.0, frame_count=30)
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr")
    try:
        daemon.start()
        daemon.supervise(60.0, quiet=True)  # ends when the source has sent its 30 frames
    finally:
        summary = daemon.stop()
    assert summary.finish_reason == "source finished"
    assert summary.frames_acquired == 30 and summary.frames_in == 30
    assert (summary.raw_recorded, summary.stacks_written) == (30, 30)
    assert not summary.skipped and not summary.lost and summary.malformed == 0
    (times,) = summary.worker_times  # one worker, its stage times from its "done" event
    assert times["worker"] == 0 and 0 < times["refocus_p50_ms"] <= times["refocus_p99_ms"]
    assert any(line.startswith("  worker 0 time") for line in summary.lines())
    raw, stacks, attrs = _read_store(str(tmp_path / "run.ome.zarr"))
    assert raw.shape == (30, 64, 64) and stacks.shape == (30, 3, 64, 64)
    assert attrs["raw_present"] == [[0, 30]] and attrs["stacks_present"] == [[0, 30]]
    assert attrs["complete"] is True and attrs["config"]["source"]["frame_count"] == 30
    assert attrs["run_summary"]["stacks_written"] == 30
    model = attrs["engine_files"]["model"]  # the config holds a path; this, what was in it
    assert model["path"] == str(tiny_model_files["onnx"])
    assert model["sha256"] == file_sha256(tiny_model_files["onnx"])
    assert "psf_bank" not in attrs["engine_files"]
    assert all(frame.any() for frame in raw)  # every time point holds a real frame


class _SlowSetUpSource:
    """A source whose set-up (a camera warming up) lasts until released, then 3 frames."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.acquiring_at: float | None = None

    def run(self, sender: Any, stop: threading.Event) -> None:
        self.release.wait(60)
        self.acquiring_at = time.monotonic()
        sender.acquiring.set()  # what every source does when its set-up is done
        for seq in range(3):
            sender.send(np.full((64, 64), 100 + seq, np.uint16), seq=seq)


def test_the_run_clock_starts_when_the_source_begins_acquiring(
    tmp_path: Path, tiny_model_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's set-up is not part of the run: no RUNNING state, status line or
    --duration before it begins acquiring (issue 13: warm-up not counted in --duration)."""
    import live.sources

    source = _SlowSetUpSource()
    monkeypatch.setattr(live.sources, "make_source", lambda config: source)
    config = live_config(tmp_path, tiny_model_files["onnx"], rate_hz=20.0)
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr")
    try:
        daemon.start()
        assert daemon.metrics.snapshot().state == "starting"
        loops = [0]
        check_workers = daemon.check_workers

        def counted() -> None:  # once per supervise loop, each of which waits 0.05 s
            loops[0] += 1
            check_workers()

        monkeypatch.setattr(daemon, "check_workers", counted)
        supervising = threading.Thread(target=daemon.supervise, args=(0.05,), kwargs={"quiet": 1})
        supervising.start()
        deadline = time.monotonic() + 60
        while loops[0] < 20:  # 20 loops: over 1 s, twenty durations counted from start()
            assert time.monotonic() < deadline and supervising.is_alive()
            time.sleep(0.01)
        assert supervising.is_alive() and daemon.metrics.snapshot().state == "starting"
        source.release.set()
        supervising.join(60)
        assert not supervising.is_alive()
        assert daemon.metrics.snapshot().state == "running"
        assert source.acquiring_at is not None and daemon._running_since is not None
        assert daemon._running_since >= source.acquiring_at
    finally:
        source.release.set()
        summary = daemon.stop()
    assert summary.finish_reason in ("duration reached", "source finished")


def test_a_surface_plan_is_recorded_as_surfaces_with_its_dpms(
    tmp_path: Path, tiny_model_files
) -> None:
    data = live_config(tmp_path, tiny_model_files["onnx"], frame_count=4).model_dump(mode="json")
    data["planes"] = {
        "surfaces": [
            {"name": "tilted", "kind": "tilted", "z0_um": 1.0, "slope_x": 0.05},
            {"name": "flat", "z0_um": -1.0},
        ]
    }
    config = validate_config(data, source="test config")
    store = tmp_path / "run.ome.zarr"
    daemon = Daemon(config, output=store)
    try:
        daemon.start()
        daemon.supervise(60.0, quiet=True)  # ends when the source has sent its 4 frames
    finally:
        summary = daemon.stop()
    assert (summary.raw_recorded, summary.stacks_written) == (4, 4)
    _, stacks, attrs = _read_store(str(store))
    assert stacks.shape == (4, 2, 64, 64)
    assert attrs["stack_axis"] == "surface" and attrs["surfaces"] == ["tilted", "flat"]
    assert attrs["uniform_planes"] is False and attrs["planes_um"] is None  # no fake z
    dpms = zarr.open_group(str(store), mode="r")[f"{attrs['images']['stacks']}/dpms_um"][...]
    np.testing.assert_array_equal(dpms, build_plan(config).dpms_um)
    timestamps = zarr.open_group(str(store), mode="r")["frames/timestamp_s"][...]
    assert timestamps.shape == (4,) and np.all(np.diff(timestamps) > 0)  # the camera's clock


def test_overload_latest_policy_counts_exactly_and_malformed_are_logged(
    tmp_path: Path, tiny_model_files, caplog: pytest.LogCaptureFixture
) -> None:
    planes = [float(z) for z in range(-10, 11)]
    config = live_config(tmp_path, tiny_model_files["onnx"], planes=planes, policy="latest")
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", source=None, preflight_check=False)
    bad = {
        10: [b"only one part"],
        20: [b"{not json", b"\x00" * 8],
        30: [
            json.dumps(
                {
                    "version": 1,
                    "kind": "frame",
                    "seq": 5,
                    "timestamp_s": 0.0,
                    "shape": [64, 64],
                    "dtype": "uint16",
                }
            ).encode(),
            b"\x00" * 10,
        ],
    }
    try:
        daemon.start()
        _wait_until(daemon, lambda: bool(daemon.ledger.ready_workers()), "the worker is ready")
        (pid,) = daemon.worker_pids()
        assert pid is not None
        # Overload for certain: a stopped worker takes at most one frame while 120 arrive.
        os.kill(pid, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="live.router"):
                push_frames(config.endpoints.frames, list(range(120)), inject=bad)
                _wait_until(
                    daemon,
                    lambda: daemon.metrics.snapshot(advance=False).frames_in == 120,
                    "all 120 frames are in",
                )
        finally:
            os.kill(pid, signal.SIGCONT)
    finally:
        summary = daemon.stop()
    assert summary.malformed == 3
    assert caplog.text.count("malformed message dropped") == 3
    assert "buffer length 10 B does not match shape [64, 64]" in caplog.text
    assert summary.frames_in == 120 and summary.raw_recorded == 120 and not summary.lost
    assert len(summary.skipped) >= 117  # 'latest' keeps one waiting; the stopped worker held one
    assert len(summary.skipped) + summary.stacks_written == 120
    _, _, attrs = _read_store(str(tmp_path / "run.ome.zarr"))
    stacked = (
        set(range(120))
        - set(missing_seqs(attrs["stacks_present"]))
        - set(range(attrs["stacks_present"][-1][1], 120))
    )
    assert sorted(stacked | set(summary.skipped)) == list(range(120))  # each seq exactly once
    assert not stacked & set(summary.skipped)
    assert attrs["run_summary"]["skipped"] == [list(r) for r in summary.skipped.runs]  # ranges


def _wait_until(daemon: Daemon, condition: Callable[[], bool], what: str) -> None:
    """Supervise the daemon until `condition` holds (a generous deadline: CI machines are slow)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        daemon.supervise(0.05, quiet=True)


def _stop_holding_a_frame(daemon: Daemon, pid: int) -> list[int]:
    """SIGSTOP worker 0 at a moment it holds a frame; return the seqs it holds.

    A fast worker is idle most of the time, so a SIGKILL at a random moment may cost nothing.
    A stopped worker cannot return what it holds: once the stacks it sent before the stop are
    settled, whatever is still out at it is held for good (the same seqs, checked twice). If it
    was stopped between sending a stack and its next credit, it holds nothing and gets no
    frame, so it is resumed and tried again.
    """
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        daemon.supervise(0.4, quiet=True)  # the collector settles stacks sent before the stop
        held = daemon.ledger.pending(0)
        daemon.supervise(0.4, quiet=True)
        if held and daemon.ledger.pending(0) == held:
            return held
        os.kill(pid, signal.SIGCONT)
        daemon.supervise(0.1, quiet=True)
    raise AssertionError("the stopped worker never held a frame in 50 tries")


@pytest.mark.parametrize("endpoint", ["frames", "stacks", "status"])
def test_an_endpoint_that_cannot_bind_is_one_line_and_the_store_is_finished(
    tmp_path: Path,
    tiny_model_files,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    endpoint: str,
) -> None:
    """A start that fails part way (here a socket that cannot bind, after the recorder has
    opened its store and, for the status endpoint, after the router and collector were made)
    gives one line naming the endpoint, exits as a config error and still closes the store:
    no thread that never started is joined, no socket left open holds the exit. The check
    before the store refuses a missing ipc folder (test_startup); here the folder is taken to
    vanish between that check and the bind."""
    import live.run
    from live.run import EXIT_BAD_CONFIG, run

    monkeypatch.setattr(live.run, "_ipc_problem", lambda path: None)

    bad = f"ipc://{tmp_path}/no-such-folder/{endpoint}"
    config = live_config(tmp_path, tiny_model_files["onnx"], endpoints={endpoint: bad})
    store = tmp_path / "run.ome.zarr"
    code = run(config, duration_s=1.0, output=store, workers=1)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_CONFIG
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"endpoints.{endpoint} = {bad!r}" in lines[0], err
    assert "Traceback" not in err
    attrs = dict(zarr.open_group(str(store), mode="r").attrs["deepz"])
    assert attrs["complete"] is False and attrs["run_error"].startswith("refused: cannot bind")
    assert attrs["run_summary"]["finish_reason"] == "refused"


def test_a_temp_folder_too_deep_for_ipc_sockets_is_one_line_before_anything_starts(
    tmp_path: Path,
    tiny_model_files,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The workers' ipc sockets live under TMPDIR; a path past the OS's 107 characters failed
    their bind, reported as the configured endpoints' fault. Now refused at check, no store."""
    import tempfile

    from live.run import EXIT_BAD_CONFIG, run

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    store = tmp_path / "run.ome.zarr"
    config = live_config(tmp_path, tiny_model_files["onnx"])
    code = run(config, duration_s=1.0, output=store, workers=1)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == EXIT_BAD_CONFIG and len(lines) == 1, err
    assert "too deep for a socket path" in lines[0] and "set TMPDIR" in lines[0]
    assert not store.exists() and not list(deep.iterdir())  # nothing made, nothing left


def test_a_stop_asked_for_while_the_workers_load_ends_the_start(
    tmp_path: Path, tiny_model_files
) -> None:
    """Ctrl-C while the models load: the start does not wait for the workers to be ready and
    the camera is never started; the run ends as asked, its store closed."""
    from live.run import FinishReason

    config = live_config(tmp_path, tiny_model_files["onnx"])
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", preflight_check=False)
    daemon.finish(FinishReason.SIGINT)  # before start: as if the signal came while it loads
    try:
        daemon.start()
        assert daemon._source_thread is None  # no frame was acquired
    finally:
        summary = daemon.stop()
    assert summary.finish_reason == FinishReason.SIGINT
    assert summary.frames_in == 0 and not summary.lost


def test_a_worker_that_keeps_dying_is_restarted_ever_later(
    tmp_path: Path, tiny_model_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies soon after each start (a model that cannot run, a stream that kills
    it) is restarted at once the first time, then after `RESTART_BACKOFF_S`, not every 50 ms."""
    from live.run import RESTART_BACKOFF_S

    config = live_config(tmp_path, tiny_model_files["onnx"])
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", source=None, preflight_check=False)
    clock = [1000.0]
    monkeypatch.setattr("live.run.time.monotonic", lambda: clock[0])

    class Dead:
        exitcode = 1

        def is_alive(self) -> bool:
            return False

    spawned: list[float] = []

    def spawn(i: int) -> None:
        spawned.append(clock[0])
        daemon._procs[i] = Dead()  # type: ignore[assignment]
        daemon._spawned_s[i] = clock[0]

    monkeypatch.setattr(daemon, "_spawn", spawn)
    try:
        spawn(0)
        spawned.clear()
        for _ in range(400):  # 40 s of the daemon's checks, 0.1 s apart
            daemon.check_workers()
            clock[0] += 0.1
        starts = np.round(np.array(spawned) - 1000.0, 1)
        waits = np.diff(np.concatenate([[0.0], starts]))
        # each restart waits the next step of the back-off (the first at once)
        expected = [
            RESTART_BACKOFF_S[min(k, len(RESTART_BACKOFF_S) - 1)] for k in range(len(waits))
        ]
        np.testing.assert_allclose(waits, expected, atol=0.25)  # within a check or two
        assert len(spawned) == 4  # 0, 1, 5 and 30 s on: not 400
        assert daemon.metrics.snapshot(advance=False).worker_restarts == len(spawned)
    finally:
        daemon._ctx.term()
        daemon._tmp.cleanup()


def test_killed_worker_is_restarted_and_its_losses_counted(
    tmp_path: Path, tiny_model_files
) -> None:
    config = live_config(
        tmp_path, tiny_model_files["onnx"], planes=[float(z) for z in range(-6, 7)]
    )
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", source=None, preflight_check=False)
    stop, sent = threading.Event(), []
    pusher = threading.Thread(
        target=push_frames,
        args=(config.endpoints.frames, list(range(100_000))),
        kwargs={"rate_hz": 30.0, "stop": stop, "sent": sent},
    )
    try:
        daemon.start()
        pusher.start()
        # Not a fixed sleep: stopping a worker that is still starting (a spawned process
        # importing and loading its model, slow on a loaded machine) finds it holding nothing
        # in every try. Wait until it is ready and refocusing.
        _wait_until(daemon, lambda: bool(daemon.ledger.ready_workers()), "the worker is ready")
        _wait_until(
            daemon,
            lambda: daemon.metrics.snapshot(advance=False).stacks_out > 0,
            "the first stacks",
        )
        (pid,) = daemon.worker_pids()
        assert pid is not None
        held = _stop_holding_a_frame(daemon, pid)
        stacks_before = daemon.metrics.snapshot(advance=False).stacks_out
        os.kill(pid, signal.SIGKILL)
        _wait_until(daemon, lambda: daemon.worker_pids()[0] not in (pid, None), "a restart")
        _wait_until(daemon, lambda: bool(daemon.ledger.ready_workers()), "the new worker")
        restarted_at = len(sent)
        _wait_until(
            daemon,
            lambda: daemon.metrics.snapshot(advance=False).stacks_out > stacks_before + 5,
            "stacks from the new worker",
        )
        stop.set()
        pusher.join()
        _wait_until(
            daemon,
            lambda: daemon.metrics.snapshot(advance=False).frames_in == len(sent),
            "every frame sent is in",
        )
    finally:
        stop.set()
        summary = daemon.stop()
    n = len(sent)
    assert summary.worker_restarts == 1
    assert summary.frames_in == n and summary.raw_recorded == n
    assert summary.stacks_written + len(summary.skipped) + len(summary.lost) == n
    _, _, attrs = _read_store(str(tmp_path / "run.ome.zarr"))
    stacked = {s for start, stop in attrs["stacks_present"] for s in range(start, stop)}
    assert held and not set(summary.lost) & stacked  # each seq one fate
    # what the killed worker held is named lost (or, had its stack been in flight, stacked)
    assert set(held) <= set(summary.lost) | stacked
    assert attrs["raw_present"] == [[0, n]]
    last_stack = attrs["stacks_present"][-1][1] - 1
    assert last_stack >= restarted_at  # the new worker took over


def _write_toml(path: Path, data: dict[str, Any]) -> None:
    """Write a nested dict of scalars and lists as TOML (enough for our configs)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items() if v is not None)
        for k, v in table.items():
            if isinstance(v, dict):
                emit(v, f"{prefix}.{k}" if prefix else k)

    emit(data, "")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM to the process group"])
def test_python_m_live_run_subprocess_stopped_by_a_signal(
    tmp_path: Path, tiny_model_files: Any, how: str
) -> None:
    """Ctrl-C (SIGINT to the daemon), and `systemctl stop` or ``kill -TERM -PGID`` (SIGTERM to
    every process of the group: the workers too) both stop the run in order, every frame
    refocused. Workers that died of the group's SIGTERM lost their frames (review 67).

    The queue holds more frames than the 60 s run can send (900), so no frame is skipped
    however slowly a starved CI machine refocuses (session 43: with the default 64, a worker
    stalled beside a training run and the router skipped 47 frames, as the policy says)."""
    config = live_config(tmp_path, tiny_model_files["onnx"], rate_hz=15.0, max_queue_frames=1000)
    data = config.model_dump(mode="json")
    data["source"].pop("simulator")  # defaults, keeps the TOML small
    scope = tmp_path / "scope.toml"
    _write_toml(scope, data)
    out_path = tmp_path / "cli.ome.zarr"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "live.run",
            "--scope",
            str(scope),
            "--duration",
            "60",
            "--output",
            str(out_path),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a service has
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if (
            "stacks" in line
            and line.startswith("[")
            and " in 0 " not in line
            and len([x for x in lines if x.startswith("[")]) >= 3
        ):
            break
    if how == "SIGINT":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "backend: onnxruntime chosen" in text
    assert "pre-flight: onnxruntime" in text and ("FITS" in text or "DOES NOT FIT" in text)
    assert f"summary ({how.split()[0]})" in text
    assert "lost              0 " in text and "exit code" not in text
    raw, stacks, attrs = _read_store(str(out_path))
    n = attrs["run_summary"]["frames_in"]
    assert n > 0 and raw.shape[0] == n and attrs["raw_present"] == [[0, n]]
    assert attrs["run_summary"]["skipped"] == [], text
    assert attrs["stacks_present"] == [[0, n]] and stacks.shape == (n, 3, 64, 64)
    assert attrs["complete"] is True
    assert f"raw frames recorded {n}" in text and f"stacks written    {n}" in text


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    scope = tmp_path / "bad.toml"
    scope.write_text('[source]\nrate_hz = "fast"\n')
    out = subprocess.run(
        [sys.executable, "-m", "live.run", "--scope", str(scope)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "source.rate_hz" in err[0] and err[0].startswith("error: bad config")


def test_require_fit_starts_nothing_when_the_rate_does_not_fit(
    tmp_path: Path, tiny_model_files: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review 82: the verdict was read after the store, the workers and the camera had
    started (a real acquisition on a Micro-Manager scope), and the store left behind made a
    retry with the same --output refused."""
    config = live_config(
        tmp_path, tiny_model_files["onnx"], rate_hz=10000.0, side=256, source={"exposure_ms": 0.05}
    )
    store = tmp_path / "run.ome.zarr"
    spawned: list[int] = []
    original = Daemon._spawn

    def spawn(self: Daemon, i: int) -> None:
        spawned.append(i)
        original(self, i)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Daemon, "_spawn", spawn)
        code = run(config, duration_s=60.0, output=store, workers=1, require_fit=True)
    out = capsys.readouterr().out
    assert code == EXIT_NO_FIT, out
    assert "DOES NOT FIT" in out
    assert "summary (pre-flight: does not fit: --require-fit: nothing was started)" in out
    assert spawned == [] and not store.exists()  # the same --output can be used again


def _signal_scenario(
    name: str, config: Any, store: Path, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run `tests.signal_scenarios` NAME in a fresh interpreter: a signal raised inside the
    pytest process reached what the tests before had left there, and CI's run of session 44
    died of a segmentation fault at this point of this file (faulthandler says where now)."""
    config_json = tmp_path / "scope.json"
    config_json.write_text(json.dumps(config.model_dump(mode="json")))
    args = [str(config_json), str(store)]
    out = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "tests.signal_scenarios", name, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("scenario: ")]
    assert len(lines) == 1, out.stdout + out.stderr
    return out, json.loads(lines[0].removeprefix("scenario: "))


def test_a_signal_during_the_checks_stops_the_run_before_anything_starts(
    tmp_path: Path, tiny_model_files: Any
) -> None:
    """Review 82: the handlers were installed after `check` (where a Micro-Manager core can
    take seconds to load), so a Ctrl-C there raised KeyboardInterrupt past the cleanup."""
    config = live_config(tmp_path, tiny_model_files["onnx"], frame_count=20)
    store = tmp_path / "run.ome.zarr"
    out, facts = _signal_scenario("during_the_checks", config, store, tmp_path)
    assert out.returncode == 0 and "summary (SIGINT)" in out.stdout, out.stdout + out.stderr
    assert "frames acquired   0 (received 0" in out.stdout
    assert facts == {"store_exists": False} and not store.exists()


def test_a_signal_while_stopping_lets_the_next_one_end_the_process(
    tmp_path: Path, tiny_model_files: Any
) -> None:
    """The first signal stops the run in order; a signal while it stops (draining can take a
    while under every_frame) puts the default handlers back, so a third ends the process at
    once (review 82: every further signal was ignored). Handlers are restored after the run."""
    config = live_config(tmp_path, tiny_model_files["onnx"], frame_count=5)
    out, facts = _signal_scenario("while_stopping", config, tmp_path / "run.ome.zarr", tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "summary (source finished)" in out.stdout, text  # first stands
    assert "stacks written    5 (refocused 5)" in out.stdout, text
    assert "SIGTERM while stopping" in out.stderr, text
    assert facts == {"default_while_stopping": True, "restored_after": True}, text
