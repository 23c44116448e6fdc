"""Start-up refusals and warnings: one line and exit code 2 before anything is written, and a
low-disk warning at start and in the status line."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from live.config import ConfigError, ScopeConfig
from live.run import EXIT_BAD_CONFIG, Daemon, _check_planes, run
from live.worker import build_plan, open_backend
from tests.live_helpers import live_config


def _refused(
    capsys: pytest.CaptureFixture[str], config: ScopeConfig, output: Path
) -> tuple[str, str]:
    """Run `config` and return stdout and the one line on stderr of its refusal."""
    code = run(config, duration_s=5.0, output=output, workers=1)
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_CONFIG, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return out, lines[0]


def test_an_existing_store_is_refused_naming_it_before_the_preflight(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "run.ome.zarr"
    store.mkdir()
    (store / "keep.txt").write_text("an earlier recording")
    out, line = _refused(capsys, live_config(tmp_path, tiny_model_files["onnx"]), store)
    assert line == (
        f"error: the output store {store} already exists: give another --output or move it "
        "away (a run never overwrites a recording)"
    )
    assert "pre-flight" not in out and "backend" not in out  # refused before anything
    assert (store / "keep.txt").read_text() == "an earlier recording"


def test_an_endpoint_in_use_is_refused_naming_the_key_before_anything(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    config = live_config(tmp_path, tiny_model_files["onnx"])
    host, port = config.endpoints.stacks[len("tcp://") :].rsplit(":", 1)
    with socket.socket() as other:  # another daemon's listener on the stacks port
        other.bind((host, int(port)))
        other.listen()
        out, line = _refused(capsys, config, tmp_path / "run.ome.zarr")
    assert line.startswith(f"error: endpoints.stacks = {config.endpoints.stacks!r} cannot be bound")
    assert "another daemon" in line and "backend" not in out
    assert not (tmp_path / "run.ome.zarr").exists()  # nothing created


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("ipc://{tmp}/no-such-folder/frames", "its folder '{tmp}/no-such-folder' does not exist"),
        ("ipc://{tmp}", "the path is a folder"),
        ("ipc://{tmp}/" + "s" * 120, "bytes, over a Unix socket's 107"),
        (
            "tcp://no-such-host.invalid:6655",
            "does not resolve and is no network interface of this machine",
        ),
        ("tcp://192.0.2.1:6655", "192.0.2.1 is not an address of this machine"),
    ],
)
def test_an_endpoint_that_cannot_be_bound_is_refused_before_the_store_exists(
    tmp_path: Path,
    tiny_model_files,
    capsys: pytest.CaptureFixture[str],
    address: str,
    why: str,
) -> None:
    """Review 87: these failed only at bind, after the store was made (left empty, the error
    said twice); one line naming the key and why, and nothing created. A tcp host beyond
    loopback is refused for what is wrong with it, not told first to make CURVE keys for it."""
    bad = address.format(tmp=tmp_path)
    sections: dict[str, Any] = {"endpoints": {"frames": bad}}
    config = live_config(tmp_path, tiny_model_files["onnx"], **sections)
    _, line = _refused(capsys, config, tmp_path / "run.ome.zarr")
    assert line.startswith(f"error: endpoints.frames = {bad!r} cannot be bound: ")
    assert line.endswith(why.format(tmp=tmp_path))
    assert not (tmp_path / "run.ome.zarr").exists()


def test_an_empty_model_file_is_named_as_empty(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review 87: an empty .onnx parsed as an empty model and was sent to export metadata."""
    empty = tmp_path / "deepz-volume.onnx"
    empty.touch()
    _, line = _refused(capsys, live_config(tmp_path, empty), tmp_path / "run.ome.zarr")
    assert line.startswith(f"error: engine.model_path {empty}: the model cannot be loaded: ")
    assert "the file is empty (0 bytes)" in line and "metadata" not in line


def test_a_corrupt_model_is_one_line_and_exit_2(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a model " * 100)
    config = live_config(tmp_path, corrupt)
    _, line = _refused(capsys, config, tmp_path / "run.ome.zarr")
    assert line.startswith(f"error: engine.model_path {corrupt}: the model cannot be loaded: ")
    assert not (tmp_path / "run.ome.zarr").exists()


def test_planes_beyond_the_trained_range_are_refused_unless_extrapolation_is_allowed(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    config = live_config(tmp_path, tiny_model_files["onnx"], planes=[-20.0, 0.0, 20.0])
    assert config.engine.allow_extrapolation is False
    _, line = _refused(capsys, config, tmp_path / "run.ome.zarr")
    assert "outside the model's trained range [-10, 10]" in line
    assert "engine.allow_extrapolation" in line and "'z=-20um'" in line
    allowed = live_config(
        tmp_path,
        tiny_model_files["onnx"],
        planes=[-20.0, 0.0, 20.0],
        engine={"allow_extrapolation": True},
    )
    backend = open_backend(allowed)
    try:
        _check_planes(allowed, backend, build_plan(allowed))  # no refusal
    finally:
        backend.close()


def test_a_volume_model_is_held_to_its_depth_grid_even_when_extrapolation_is_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A volume model renders only within its depth grid (±10 µm): allow_extrapolation
    cannot widen that. Before, the flag skipped the check and the pre-flight's first call died
    with a traceback (exit 1); now one config line, exit 2, before the store is made."""
    volume = Path(__file__).resolve().parents[1] / "engine" / "weights" / "deepz-volume.onnx"
    config = live_config(tmp_path, volume, planes=[0.0, 12.0], engine={"allow_extrapolation": True})
    store = tmp_path / "run.ome.zarr"
    _, line = _refused(capsys, config, store)
    assert line.startswith("error: planes: ") and "renders only within its depth grid" in line
    assert not store.exists()


def test_min_free_mb_beyond_the_disk_is_refused_before_anything_starts(
    tmp_path: Path, tiny_model_files
) -> None:
    config = live_config(tmp_path, tiny_model_files["onnx"], recorder={"min_free_mb": 10**9})
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", source=None, preflight_check=False)
    try:
        with pytest.raises(
            ConfigError, match=r"below recorder.min_free_mb = 1000000000, where the stacks stop"
        ):
            daemon.check()
    finally:
        daemon.stop()
    assert not (tmp_path / "run.ome.zarr").exists()


def test_a_disk_near_min_free_mb_shows_in_the_status(tmp_path: Path, tiny_model_files) -> None:
    near = int(shutil.disk_usage(tmp_path).free / 2**20 / 1.5)  # free < 2 × min: "low"
    config = live_config(tmp_path, tiny_model_files["onnx"], recorder={"min_free_mb": near})
    daemon = Daemon(config, output=tmp_path / "run.ome.zarr", source=None, preflight_check=False)
    try:
        daemon.check()
        daemon._start_recorder(build_plan(config))
        snap = daemon._snapshot()
    finally:
        daemon.stop()
    assert snap.disk_low and snap.disk_free_mb is not None
    assert f"| disk {snap.disk_free_mb:.0f} MB!" in snap.status_line()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_recordings_folder_that_cannot_be_is_one_line_naming_its_key(
    tmp_path: Path, tiny_model_files, where: str
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    path = blocker if where == "a file" else blocker / "runs"
    config = live_config(tmp_path, tiny_model_files["onnx"], recorder={"path": str(path)})
    daemon = Daemon(config, source=None, preflight_check=False)
    try:
        with pytest.raises(ConfigError, match=r"^recorder.path .*cannot make or use the"):
            daemon.check()
    finally:
        daemon.stop()


def test_output_with_recording_off_is_refused_not_ignored(tmp_path: Path, tiny_model_files):
    config = live_config(tmp_path, tiny_model_files["onnx"], recorder={"enabled": False})
    daemon = Daemon(config, output=tmp_path / "x.ome.zarr", source=None, preflight_check=False)
    try:
        with pytest.raises(ConfigError, match=r"--output .*recording is off"):
            daemon.check()
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--duration", "nan"], "--duration must be a number of seconds > 0, got nan"),
        (["--duration", "-5"], "--duration must be a number of seconds > 0, got -5.0"),
        (["--workers", "0"], "--workers must be 1 … 64, got 0"),
        (["--workers", "100000"], "--workers must be 1 … 64, got 100000"),
    ],
)
def test_bad_command_line_numbers_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """Before anything starts: a NaN duration never ends a run, a negative one starts it all to
    stop at once, 100,000 workers would each load the model."""
    from live.run import main

    scope = tmp_path / "scope.toml"
    scope.write_text('[source]\nkind = "simulated"\n')  # the defaults otherwise: valid
    assert main(["--scope", str(scope), *flags]) == EXIT_BAD_CONFIG
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_dpm_file_of_another_shape_is_one_config_line(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    """A surface read from a DPM file that does not match the frames is the config's problem,
    said in one line before anything starts (not a traceback and exit 1)."""
    import numpy as np
    import tifffile

    from live.config import validate_config

    tifffile.imwrite(tmp_path / "dpm.tif", np.zeros((32, 48), np.float32))
    base = live_config(tmp_path, tiny_model_files["onnx"]).model_dump(mode="json")
    surfaces = [{"name": "measured", "kind": "file", "path": str(tmp_path / "dpm.tif")}]
    config = validate_config({**base, "planes": {"surfaces": surfaces}}, source="test config")
    _, line = _refused(capsys, config, tmp_path / "run.ome.zarr")
    assert line.startswith("error: planes: ") and "(32, 48)" in line, line


def test_a_viewer_that_ends_on_its_own_is_said_once(
    tmp_path: Path, tiny_model_files, caplog: pytest.LogCaptureFixture
) -> None:
    # as a viewer on a headless machine does: it cannot open a window and exits at once
    config = live_config(tmp_path, tiny_model_files["onnx"])
    daemon = Daemon(config, source=None, preflight_check=False)
    try:
        daemon._display = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        daemon._display.wait(60)
        with caplog.at_level("INFO", logger="live.run"):
            daemon._check_display()
            daemon._check_display()
    finally:
        daemon.stop()
    said = [r for r in caplog.records if "the viewer (live.display) ended" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "ERROR" and "exit code 3" in said[0].message


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here: it runs"
)
def test_backends_none_of_which_runs_here_are_one_line(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str]
) -> None:
    # review 80: a BackendError from the selection was a traceback after the config loaded
    config = live_config(tmp_path, tiny_model_files["onnx"], engine={"backends": ["tensorrt"]})
    store = tmp_path / "run.ome.zarr"
    _, line = _refused(capsys, config, store)
    assert line.startswith("error: engine.backends = ['tensorrt']: no inference backend")
    assert not store.exists()


def test_a_disk_too_full_for_the_new_store_is_one_line_and_leaves_no_store(
    tmp_path: Path, tiny_model_files, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    # review 77: free space above min_free_mb but not enough for the store's reserve was a
    # traceback, and the half-made store then refused the next run as "already exists"
    import errno

    def full(path: Path, nbytes: int, *, append: bool = False) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("live.recorder._hold_space", full)
    store = tmp_path / "run.ome.zarr"
    _, line = _refused(capsys, live_config(tmp_path, tiny_model_files["onnx"]), store)
    assert line.startswith(f"error: cannot create the store {store}: No space left on device")
    assert not store.exists() and not list(tmp_path.glob("run.ome.zarr*"))
