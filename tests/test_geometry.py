"""Frame geometry from the Micro-Manager core: `live.config.resolve_geometry` and the source.

Each test writes a real Micro-Manager configuration file that loads a Python camera (this
module's `GeometryCamera`, a `live._mmcore.SimulatedCamera`) into a real pymmcore-plus
`UniMMCore`, with a pixel size calibration and binning as a scope's file has them. The
daemon's path is driven end to end: `validate_config` → `resolve_geometry` → `make_source` →
frames over a real ZeroMQ socket.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymmcore_plus", reason="the Micro-Manager core needs the mm extra")

from live._mmcore import SimulatedCamera, core_geometry, make_simulated_core
from live.config import (
    ConfigError,
    ScopeConfig,
    load_config,
    resolve_geometry,
    validate_config,
)
from live.hook import FrameSender
from live.protocol import decode
from live.sources import MicroManagerSource, make_source

SENSOR = (64, 96)


def pattern(index: int, focus_um: float = 0.0) -> np.ndarray:
    ramp = np.arange(SENSOR[0] * SENSOR[1], dtype=np.uint32).reshape(SENSOR)
    return ((ramp * 3 + 101 * index) % 4000).astype(np.uint16)


class GeometryCamera(SimulatedCamera):
    """A no-argument camera that a configuration file can load; counts its instances."""

    instances = 0
    last: GeometryCamera | None = None

    def __init__(self) -> None:
        super().__init__(pattern, SENSOR)
        type(self).instances += 1
        GeometryCamera.last = self


class ByteCamera(GeometryCamera):
    """The same camera with 8-bit pixels."""

    def dtype(self) -> type[np.uint8]:  # type: ignore[override]
        return np.uint8


def write_cfg(tmp_path: Path, *, camera: str = "GeometryCamera", extra: str = "") -> Path:
    """A Micro-Manager .cfg: one Python camera, a 0.325 µm pixel size calibration."""
    text = (
        f"#py pyDevice,Cam,tests.test_geometry,{camera}\n"
        "Property,Core,Initialize,1\n"
        "#py Property,Core,Camera,Cam\n"
        "ConfigPixelSize,Res20x,Core,TimeoutMs,5000\n"
        "PixelSize_um,Res20x,0.325\n"
        f"{extra}"
    )
    path = tmp_path / "scope.cfg"
    path.write_text(text)
    return path


def mm_config(cfg_file: Path | None, **source: object) -> ScopeConfig:
    mm = {"config_file": str(cfg_file)} if cfg_file is not None else {}
    return validate_config({"source": {"kind": "micromanager", "micromanager": mm, **source}})


def test_geometry_comes_from_the_core_and_the_core_is_loaded_once(tmp_path, pull):
    sock, endpoint = pull
    cfg_file = write_cfg(tmp_path)
    config = mm_config(cfg_file, frame_count=6)
    before = GeometryCamera.instances
    resolved = resolve_geometry(config)
    assert resolved.source.frame_shape == SENSOR
    assert resolved.source.pixel_size_um == pytest.approx(0.325)
    assert config.source.frame_shape == (256, 256)  # the input is left as it was
    # what is saved with a recording validates back to the resolved geometry
    assert ScopeConfig.model_validate(resolved.model_dump(mode="json")) == resolved
    source = make_source(resolved)
    assert isinstance(source, MicroManagerSource) and source.acquisition == "core"
    with FrameSender(endpoint) as sender:
        summary = source.run(sender, threading.Event())
    msgs = [decode(sock.recv_multipart(copy=False)) for _ in range(6)]
    assert summary.frames_sent == 6
    assert all(m.array.shape == SENSOR for m in msgs)
    np.testing.assert_array_equal(msgs[0].array, pattern(int(msgs[0].header.seq)))
    assert GeometryCamera.instances == before + 1  # resolve_geometry's core ran the source


def test_a_core_loaded_for_the_geometry_and_never_claimed_is_released(tmp_path):
    """A daemon whose start fails after the geometry loaded the hardware never runs its
    source: its stop unloads the parked core (`live._mmcore.release_parked`)."""
    from live._mmcore import _PARKED, release_parked

    cfg_file = write_cfg(tmp_path)
    resolve_geometry(mm_config(cfg_file, frame_count=6))
    parked = list(_PARKED.values())
    assert len(parked) == 1 and "Cam" in parked[0].getLoadedDevices()
    assert not release_parked(tmp_path / "other.cfg", None)  # another daemon's: left parked
    assert release_parked(cfg_file, None)
    assert not _PARKED and "Cam" not in parked[0].getLoadedDevices()
    assert not release_parked(cfg_file, None)


def test_a_parked_core_that_fails_to_unload_is_logged_not_raised(tmp_path, caplog):
    """Unloading is part of a daemon's stop: a device's error there must not end the stop."""
    from live._mmcore import _PARKED, release_parked

    cfg_file = write_cfg(tmp_path)
    resolve_geometry(mm_config(cfg_file, frame_count=6))
    (core,) = _PARKED.values()
    real = core.unloadAllDevices

    def failing() -> None:
        raise RuntimeError('Error in device "Stage": serial port lost')

    core.unloadAllDevices = failing  # type: ignore[method-assign]
    try:
        assert release_parked(cfg_file, None)
    finally:
        real()
    assert any("serial port lost" in r.getMessage() for r in caplog.records)


def test_binning_in_the_file_shrinks_frames_and_grows_pixels(tmp_path, pull):
    sock, endpoint = pull
    cfg_file = write_cfg(tmp_path, extra="#py Property,Cam,Binning,2\n")
    resolved = resolve_geometry(mm_config(cfg_file, frame_count=2))
    assert resolved.source.frame_shape == (SENSOR[0] // 2, SENSOR[1] // 2)
    assert resolved.source.pixel_size_um == pytest.approx(0.65)
    with FrameSender(endpoint) as sender:
        make_source(resolved).run(sender, threading.Event())
    msg = decode(sock.recv_multipart(copy=False))
    # a binned pixel is the sum of its 2 × 2 block of the sensor's frame
    full = pattern(msg.header.seq).astype(np.uint32)
    np.testing.assert_array_equal(msg.array, full.reshape(32, 2, 48, 2).sum(axis=(1, 3)))


def test_core_geometry_reads_roi_and_binning():
    core = make_simulated_core(pattern, SENSOR, pixel_size_um=0.3)
    try:
        core.setProperty(core.getCameraDevice(), "Binning", 2)
        core.setROI(4, 2, 20, 10)
        geometry = core_geometry(core)
        assert geometry.frame_shape == (10, 20)
        assert geometry.roi == (4, 2, 20, 10)
        assert geometry.binning == "2"
        assert geometry.pixel_size_um == pytest.approx(0.6)
        assert (geometry.bytes_per_pixel, geometry.components) == (2, 1)
        core.snapImage()
        assert core.getImage().shape == (10, 20)
    finally:
        core.unloadAllDevices()


def test_typed_values_that_agree_pass_and_auto_means_ask_the_core(tmp_path):
    cfg_file = write_cfg(tmp_path)
    agreed = resolve_geometry(mm_config(cfg_file, frame_shape=list(SENSOR), pixel_size_um=0.325))
    assert (agreed.source.frame_shape, agreed.source.pixel_size_um) == (SENSOR, 0.325)
    toml = tmp_path / "scope.toml"
    toml.write_text(
        '[source]\nkind = "micromanager"\nframe_shape = "auto"\npixel_size_um = "auto"\n'
        '[source.micromanager]\nconfig_file = "scope.cfg"\n'
    )
    resolved = resolve_geometry(load_config(toml))
    assert resolved.source.frame_shape == SENSOR
    assert resolved.source.pixel_size_um == pytest.approx(0.325)


def test_typed_values_that_disagree_name_the_key_and_the_core_value(tmp_path):
    cfg_file = write_cfg(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_geometry(mm_config(cfg_file, frame_shape=[256, 256]))
    msg = str(err.value)
    assert msg.startswith("source.frame_shape = [256, 256] differs from the Micro-Manager")
    assert "64×96" in msg and "binning 1" in msg and "\n" not in msg
    with pytest.raises(ConfigError) as err:
        resolve_geometry(mm_config(cfg_file, pixel_size_um=0.3))
    msg = str(err.value)
    assert msg.startswith("source.pixel_size_um = 0.3 differs from the Micro-Manager core's")
    assert "0.325 µm" in msg and "'Res20x'" in msg


def test_without_pixel_calibration_the_typed_pixel_size_is_needed(tmp_path):
    cfg_file = tmp_path / "nopixel.cfg"
    cfg_file.write_text(
        "#py pyDevice,Cam,tests.test_geometry,GeometryCamera\n"
        "Property,Core,Initialize,1\n#py Property,Core,Camera,Cam\n"
    )
    with pytest.raises(ConfigError, match=r"no pixel size calibration .*source.pixel_size_um"):
        resolve_geometry(mm_config(cfg_file))
    typed = resolve_geometry(mm_config(cfg_file, pixel_size_um=0.2))
    assert (typed.source.frame_shape, typed.source.pixel_size_um) == (SENSOR, 0.2)


def test_unusable_cameras_are_refused_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"gives 8-bit pixels .* 16-bit grey frames"):
        resolve_geometry(mm_config(write_cfg(tmp_path, camera="ByteCamera")))
    # Micro-Manager's "Multi Camera" (C++ only): each of its cameras numbers its own frames,
    # which would arrive as repeated seqs (review 76); the geometry read says two cameras here
    import dataclasses

    import live._mmcore

    read = live._mmcore.core_geometry
    with monkeypatch.context() as patched:
        two = lambda core: dataclasses.replace(read(core), camera_channels=2)  # noqa: E731
        patched.setattr(live._mmcore, "core_geometry", two)
        with pytest.raises(ConfigError, match=r"delivers 2 cameras' frames .* Core-Camera"):
            resolve_geometry(mm_config(write_cfg(tmp_path)))
    assert core_geometry(make_simulated_core(pattern, SENSOR)).camera_channels == 1
    cfg_file = write_cfg(tmp_path)
    config = validate_config(
        {
            "source": {
                "kind": "micromanager",
                "micromanager": {"config_file": str(cfg_file), "camera": "Nope"},
            }
        }
    )
    with pytest.raises(ConfigError, match=r"camera = 'Nope' is not a camera of .*\['Cam'\]"):
        resolve_geometry(config)
    broken = tmp_path / "broken.cfg"
    broken.write_text("Device,Cam,NoSuchAdapterLibrary,NoCamera\n")
    with pytest.raises(ConfigError, match=r"config_file: .*broken.cfg did not load: "):
        resolve_geometry(mm_config(broken))


def test_no_config_file_loads_micromanagers_demo_configuration():
    from pymmcore_plus import find_micromanager

    config = mm_config(None)
    assert config.source.micromanager.config_file is None
    if find_micromanager() is None:  # this build machine: no Micro-Manager installation
        with pytest.raises(ConfigError) as err:
            resolve_geometry(config)
        msg = str(err.value)
        assert "config_file is not set" in msg and "MMConfig_demo.cfg" in msg
        assert "mmcore install" in msg
    else:  # the demo camera, switched to 16-bit
        resolved = resolve_geometry(config)
        assert resolved.source.frame_shape == (512, 512)
        assert resolved.source.pixel_size_um > 0


def test_other_sources_keep_their_typed_geometry():
    config = validate_config({"source": {"frame_shape": [64, 64], "pixel_size_um": 0.5}})
    assert resolve_geometry(config) is config
    hook = validate_config(
        {
            "source": {
                "kind": "micromanager",
                "frame_shape": [64, 64],
                "pixel_size_um": 0.5,
                "micromanager": {"acquisition": "hook"},
            }
        }
    )
    assert resolve_geometry(hook) is hook


def test_hook_and_auto_rules_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'hook' needs source.frame_shape and source.pixel"):
        validate_config(
            {"source": {"kind": "micromanager", "micromanager": {"acquisition": "hook"}}}
        )
    with pytest.raises(ConfigError, match=r"config_file is used only with acquisition = 'core'"):
        validate_config(
            {
                "source": {
                    "kind": "micromanager",
                    "frame_shape": [64, 64],
                    "pixel_size_um": 0.5,
                    "micromanager": {
                        "acquisition": "hook",
                        "config_file": str(write_cfg(tmp_path)),
                    },
                }
            }
        )
    with pytest.raises(ConfigError, match=r'source.frame_shape = "auto" needs source.kind'):
        validate_config({"source": {"frame_shape": "auto"}})
    with pytest.raises(ConfigError, match=r"acquisition = 'camera': .* 'core' or 'hook'"):
        validate_config({"source": {"micromanager": {"acquisition": "camera"}}})


@pytest.mark.parametrize("exposure_ms", [None, 42.0, 900.0])
def test_the_configs_exposure_is_set_on_the_camera_and_a_slow_one_said(
    tmp_path, pull, caplog, exposure_ms
):
    sock, endpoint = pull
    given = {} if exposure_ms is None else {"exposure_ms": exposure_ms}
    config = resolve_geometry(mm_config(write_cfg(tmp_path), frame_count=2, rate_hz=2.0, **given))
    source = make_source(config)
    assert GeometryCamera.last is not None  # loaded by resolve_geometry, parked for the source
    GeometryCamera.last.set_exposure(25.0)  # as its .cfg would leave it
    with caplog.at_level("INFO", logger="live.sources"), FrameSender(endpoint) as sender:
        assert source.run(sender, threading.Event()).frames_sent == 2
    camera = GeometryCamera.last
    assert camera is not None
    own = 25.0  # the camera's own, kept when the config names none
    assert camera.get_exposure() == (own if exposure_ms is None else exposure_ms)
    assert f"exposure {camera.get_exposure():.4g} ms" in caplog.text
    slow = "longer than a frame at source.rate_hz = 2 (500 ms): it cannot keep that rate"
    assert (slow in caplog.text) == (exposure_ms == 900.0)
    for _ in range(2):
        sock.recv_multipart()
