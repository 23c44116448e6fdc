"""The scope configuration: the shipped file, every kind of error, paths and plans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError

from engine.dpm import DPMError
from live.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_MODEL_PATH,
    ConfigError,
    ScopeConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


MINIMAL = '[source]\nkind = "simulated"\n'
"""The least a config file holds (an empty one is refused): everything else its defaults."""


def write(tmp_path: Path, text: str, name: str = "scope.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_loads_and_is_the_embedded_default():
    assert DEFAULT_CONFIG_PATH == REPO / "config.toml"
    cfg = load_config(REPO / "config.toml")
    assert cfg.source.kind == "simulated"
    assert cfg.source.frame_shape == (256, 256)
    # the shipped scope runs the volume model; DEFAULT_MODEL_PATH stays the API's default
    assert cfg.engine.resolved_model_path() == REPO / "engine" / "weights" / "deepz-volume.onnx"
    assert DEFAULT_MODEL_PATH.is_file()
    assert (REPO / "engine" / "weights" / "deepz-volume.psf.npy").is_file()
    assert cfg.engine.backends == ["openvino", "onnxruntime"]
    assert cfg.endpoints.frames.startswith("tcp://127.0.0.1:")
    plan = cfg.planes.build(cfg.source.frame_shape, cfg.source.pixel_size_um)
    assert len(plan) == 9 and plan.z_um == tuple(float(z) for z in range(-8, 9, 2))
    assert cfg.source.simulator.optics.pixel_size_um == cfg.source.pixel_size_um
    assert cfg.recorder.path == REPO / "runs"  # relative to the file's folder
    # saved with recordings: the JSON dump validates back to the same config
    assert ScopeConfig.model_validate(cfg.model_dump(mode="json")) == cfg


def test_a_source_alone_gives_all_defaults_and_an_empty_file_is_refused(tmp_path):
    """Review 87: an empty file (a failed save, a truncated copy) started a run on defaults."""
    for empty in ("", "# comments only\n"):
        with pytest.raises(ConfigError, match=r"the file holds no settings"):
            load_config(write(tmp_path, empty))
    cfg = load_config(write(tmp_path, MINIMAL))
    defaults = ScopeConfig.model_validate({}, context={"base_dir": tmp_path})
    assert cfg.model_copy(update={"recorder": defaults.recorder}) == defaults
    assert cfg.overload.policy == "every_frame"
    # the default recordings folder is beside the config, like any relative path in it
    assert cfg.recorder.path == (tmp_path / "runs").resolve()


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.toml"):
        load_config("nope.toml")


def test_toml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match=r"TOML syntax error.*line 2"):
        load_config(write(tmp_path, "[source]\nrate_hz = = 5\n"))


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "[source]\nrate_hertz = 5\n"))
    msg = str(err.value)
    assert "unknown key source.rate_hertz = 5" in msg
    assert "rate_hz" in msg and "pixel_size_um" in msg
    with pytest.raises(ConfigError, match=r"unknown key cameras"):
        load_config(write(tmp_path, "[cameras]\nx = 1\n"))


def test_wrong_type_is_refused_not_coerced(tmp_path):
    with pytest.raises(ConfigError, match=r"source.rate_hz = '5': Input should be a valid number"):
        load_config(write(tmp_path, '[source]\nrate_hz = "5"\n'))
    with pytest.raises(ConfigError, match=r"recorder.enabled = 'yes'.*valid boolean"):
        load_config(write(tmp_path, '[recorder]\nenabled = "yes"\n'))
    with pytest.raises(ConfigError, match=r"source.frame_shape: too few items"):
        load_config(write(tmp_path, "[source]\nframe_shape = [256]\n"))


def test_out_of_range_names_the_limit(tmp_path):
    with pytest.raises(ConfigError, match=r"source.rate_hz = 0: Input should be greater than 0"):
        load_config(write(tmp_path, "[source]\nrate_hz = 0\n"))
    with pytest.raises(ConfigError, match=r"source.simulator.optics.na = 2.0: .*less than or"):
        load_config(write(tmp_path, "[source.simulator.optics]\nna = 2.0\n"))
    with pytest.raises(ConfigError, match=r"engine.max_batch = 0: .*greater than or equal to 1"):
        load_config(write(tmp_path, "[engine]\nmax_batch = 0\n"))


def test_bad_choice_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"source.kind = 'camera'.*'simulated', 'micromanager'"):
        load_config(write(tmp_path, '[source]\nkind = "camera"\n'))
    with pytest.raises(ConfigError, match=r"engine.backends\[1\] = 'cuda'.*'tensorrt'"):
        load_config(write(tmp_path, '[engine]\nbackends = ["onnxruntime", "cuda"]\n'))
    with pytest.raises(ConfigError, match=r"version = 2: Input should be 1"):
        load_config(write(tmp_path, "version = 2\n"))


def test_render_modality_picks_the_psf_bank_the_planes_go_through(tmp_path):
    from live.worker import open_backend

    assert load_config(write(tmp_path, MINIMAL)).engine.render_modality is None
    with pytest.raises(ConfigError, match=r"engine.render_modality = 'sted'.*'confocal'"):
        load_config(write(tmp_path, '[engine]\nrender_modality = "sted"\n'))
    volume = (REPO / "engine" / "weights" / "deepz-volume.onnx").as_posix()
    text = f'[engine]\nmodel_path = "{volume}"\nrender_modality = "confocal"\n'
    cfg = load_config(write(tmp_path, text))
    assert cfg.engine.render_modality == "confocal"
    backend = open_backend(cfg)  # the same network, confocal-like planes
    assert backend.metadata.volume is not None and backend.metadata.volume.modality == "confocal"


def test_psf_bank_renders_through_a_measured_psf_and_is_checked_at_load(tmp_path):
    from live.worker import open_backend

    assert load_config(write(tmp_path, MINIMAL)).engine.psf_bank is None
    with pytest.raises(ConfigError, match=r"engine\.psf_bank.*file not found"):
        load_config(write(tmp_path, '[engine]\npsf_bank = "nowhere.npy"\n'))
    volume = REPO / "engine" / "weights" / "deepz-volume.onnx"
    own = np.load(volume.parent / "deepz-volume.psf.npy")
    np.save(tmp_path / "scope.npy", own[::-1].copy())  # a "measured" bank: the mirror image
    text = f'[engine]\nmodel_path = "{volume.as_posix()}"\npsf_bank = "scope.npy"\n'
    cfg = load_config(write(tmp_path, text))
    assert cfg.engine.psf_bank == (tmp_path / "scope.npy").resolve()
    backend = open_backend(cfg)
    frame = np.full((64, 64), 500, dtype=np.uint16)
    frame[30:33, 30:33] = 4000
    plane = np.full((64, 64), 3.0, dtype=np.float32)  # 3 µm above: the mirror bank differs
    mirrored = backend.infer(frame, plane)
    plain = open_backend(load_config(write(tmp_path, f'[engine]\nmodel_path = "{volume}"\n')))
    assert not np.allclose(mirrored, plain.infer(frame, plane))
    with pytest.raises(ConfigError, match="cannot render confocal planes"):
        load_config(write(tmp_path, text + 'render_modality = "confocal"\n'))
    np.save(tmp_path / "twice.npy", own * 2)  # not a PSF: planes summing to 2
    np.savez(tmp_path / "bank.npz", own=own)  # not a .npy array at all
    with open(tmp_path / "forged.npy", "wb") as f:  # a header asking for 1.5 TiB, no data
        header = {"descr": "<f4", "fortran_order": False, "shape": (100001, 2001, 2001)}
        np.lib.format.write_array_header_1_0(f, header)
    cases = [("twice.npy", "each sum to 1"), ("bank.npz", "one floating-point .npy array")]
    for name, why in [*cases, ("forged.npy", "not a .npy PSF bank")]:
        bad = f'[engine]\nmodel_path = "{volume.as_posix()}"\npsf_bank = "{name}"\n'
        with pytest.raises(ConfigError, match=rf"engine\.psf_bank.*{why}") as info:
            load_config(write(tmp_path, bad))
        assert "\n" not in str(info.value)


def test_missing_referenced_files(tmp_path):
    with pytest.raises(
        ConfigError, match=r"engine.model_path = 'm.onnx': file not found: .*m.onnx"
    ):
        load_config(write(tmp_path, '[engine]\nmodel_path = "m.onnx"\n'))
    text = '[source]\nkind = "replay"\n[source.replay]\npath = "runs/old.zarr"\n'
    with pytest.raises(ConfigError, match=r"source.replay.path = .*recording not found"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"source.micromanager.config_file = .*file not found"):
        load_config(write(tmp_path, '[source.micromanager]\nconfig_file = "mm.cfg"\n'))
    text = '[planes]\n[[planes.surfaces]]\nname = "s"\nkind = "file"\npath = "s.tif"\n'
    with pytest.raises(ConfigError, match=r"planes.surfaces\[0\].path = 's.tif': file not found"):
        load_config(write(tmp_path, text))


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.onnx").write_bytes(b"onnx")
    (tmp_path / "old.zarr").mkdir()
    text = (
        '[source]\nkind = "replay"\n[source.replay]\npath = "old.zarr"\n'
        '[engine]\nmodel_path = "models/m.onnx"\n[recorder]\npath = "out"\n'
    )
    cfg = load_config(write(tmp_path, text))
    assert cfg.engine.model_path == tmp_path / "models" / "m.onnx"
    assert cfg.engine.resolved_model_path() == tmp_path / "models" / "m.onnx"
    assert cfg.source.replay.path == tmp_path / "old.zarr"
    assert cfg.recorder.path == tmp_path / "out"


def test_replay_needs_a_path_and_other_cross_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"source.kind = 'replay' needs source.replay.path"):
        load_config(write(tmp_path, '[source]\nkind = "replay"\n'))
    text = "[source]\npixel_size_um = 0.3\n[source.simulator.optics]\npixel_size_um = 0.5\n"
    with pytest.raises(ConfigError, match=r"differs from source.pixel_size_um"):
        load_config(write(tmp_path, text))
    text = '[endpoints]\nframes = "tcp://127.0.0.1:6000"\nstacks = "tcp://127.0.0.1:6000"\n'
    with pytest.raises(ConfigError, match="endpoints must be distinct"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"endpoints.status = 'localhost:1'.*ZeroMQ address"):
        load_config(write(tmp_path, '[endpoints]\nstatus = "localhost:1"\n'))


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("tcp://127.0.0.1:1180591620717411303424", "the port must be a number 1-65535"),
        ("tcp://127.0.0.1:99999", "the port must be a number 1-65535"),
        ("tcp://127.0.0.1:-1", "the port must be a number 1-65535"),
        ("tcp://127.0.0.1:*", "clients must know where to connect"),
        ("tcp://127.0.0.1:0", "the port must be a number 1-65535"),
        ("tcp://127.0.0.1", "names no port"),
        ("tcp://[::1]:5558", "IPv6 endpoints are not supported"),
        ("inproc://status", "reaches only this process"),
        ("udp://127.0.0.1:5558", "not a ZeroMQ address"),
    ],
)
def test_an_endpoint_no_client_could_reach_is_refused_naming_its_key(tmp_path, status, message):
    with pytest.raises(ConfigError, match=r"endpoints.status") as err:
        load_config(write(tmp_path, f'[endpoints]\nstatus = "{status}"\n'))
    assert message in str(err.value) and "\n" not in str(err.value).strip()


@pytest.mark.parametrize(
    ("frames", "stacks"),
    [
        ("tcp://127.0.0.1:5555", "tcp://localhost:5555"),
        ("tcp://0.0.0.0:5555", "tcp://127.0.0.1:5555"),
        ("tcp://*:5555", "tcp://192.168.1.7:5555"),
    ],
)
def test_two_spellings_of_one_address_are_not_distinct(tmp_path, frames, stacks):
    text = f'[endpoints]\nframes = "{frames}"\nstacks = "{stacks}"\n'
    with pytest.raises(ConfigError, match=r"endpoints.frames = .* and endpoints.stacks = "):
        load_config(write(tmp_path, text))


def test_several_errors_come_in_one_message(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, '[display]\nmax_fps = -1\n[overload]\npolicy = "drop"\n'))
    msg = str(err.value)
    assert "2 problems" in msg and "display.max_fps = -1" in msg
    assert "overload.policy = 'drop'" in msg and "'every_frame' or 'latest'" in msg


def test_a_value_that_is_not_a_number_is_called_so(tmp_path):
    """Review 87: rate_hz = nan was refused as "less than or equal to 10000"."""
    for key, value in (("rate_hz", "nan"), ("rate_hz", "inf"), ("exposure_ms", "-inf")):
        with pytest.raises(ConfigError, match=rf"source.{key} = {value}: must be a finite number"):
            load_config(write(tmp_path, f"[source]\n{key} = {value}\n"))


def test_polynomial_coefficients_must_be_finite(tmp_path):
    text = '[planes]\nsurfaces = [{name = "p", kind = "polynomial", coefficients = [0.0, nan]}]\n'
    with pytest.raises(ConfigError, match=r"coefficients\[1\] = nan.*finite"):
        load_config(write(tmp_path, text))


def test_a_config_that_cannot_fit_in_memory_or_the_optics_is_one_line(tmp_path):
    """Refused at load, naming the keys, rather than a MemoryError (or a silent bound) at start."""
    huge = "[source]\nframe_shape = [16384, 16384]\n[planes]\n"
    huge += "z_min_um = -10.0\nz_max_um = 10.0\nstep_um = 0.05\n"
    with pytest.raises(ConfigError, match=r"401 planes of 16384x16384 px make 401\.0 GiB a stack"):
        load_config(write(tmp_path, huge))
    queue = "[source]\nframe_shape = [8192, 8192]\n[overload]\nmax_queue_frames = 100000\n"
    with pytest.raises(ConfigError, match=r"max_queue_frames = 100000 .* could hold"):
        load_config(write(tmp_path, queue))
    with pytest.raises(ConfigError, match=r"pixel_size_um = 50\.0 does not fit the simulator"):
        load_config(write(tmp_path, "[source]\npixel_size_um = 50.0\n"))
    # a real scope is not held to the simulator's optics: 13 µm pixels (binned, low power)
    real = '[source]\nkind = "micromanager"\nframe_shape = [512, 512]\npixel_size_um = 13.0\n'
    real += '[source.micromanager]\nacquisition = "hook"\n'
    loaded = load_config(write(tmp_path, real))
    assert loaded.source.pixel_size_um == 13.0
    # ... and it survives the round trip a worker makes (review 80: the worker died on it)
    again = type(loaded).model_validate(loaded.model_dump(mode="json"))
    assert again.source.pixel_size_um == 13.0


def test_planes_need_exactly_one_form(tmp_path):
    with pytest.raises(
        ConfigError, match=r"exactly one of .* got z_min_um/z_max_um/step_um and z_um"
    ):
        load_config(write(tmp_path, "[planes]\nz_um = [0.0]\nstep_um = 1.0\n"))
    with pytest.raises(ConfigError, match=r"exactly one of .* got none"):
        load_config(write(tmp_path, "[planes]\n"))
    with pytest.raises(ConfigError, match="needs all of z_min_um, z_max_um and step_um"):
        load_config(write(tmp_path, "[planes]\nz_min_um = -2.0\nz_max_um = 2.0\n"))
    with pytest.raises(ConfigError, match=r"z_min_um = 3.0 must be <= z_max_um = 1.0"):
        load_config(write(tmp_path, "[planes]\nz_min_um = 3.0\nz_max_um = 1.0\nstep_um = 1\n"))
    text = '[planes]\n[[planes.surfaces]]\nname = "c"\nkind = "polynomial"\n'
    with pytest.raises(ConfigError, match=r"planes.surfaces\[0\].*needs coefficients"):
        load_config(write(tmp_path, text))
    # a setting its kind does not use is refused, not dropped: this tilt made a flat plane
    text = '[planes]\n[[planes.surfaces]]\nname = "t"\nslope_x = 0.5\n'
    with pytest.raises(ConfigError, match=r"kind 'plane' does not use slope_x .*kind = 'tilted'"):
        load_config(write(tmp_path, text))
    # a plane given twice: named once, in one short line (1000 planes gave 10,000 characters)
    with pytest.raises(ConfigError, match=r"z_um given more than once: \[0.0\] "):
        load_config(write(tmp_path, f"[planes]\nz_um = [0.0, {', '.join(['0.0'] * 999)}]\n"))


def test_surfaces_build_a_plan(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.full((32, 48), 1.5, np.float32))
    text = """
[source]
frame_shape = [32, 48]
pixel_size_um = 0.5
[planes]
[[planes.surfaces]]
name = "flat"
z0_um = -2.0
[[planes.surfaces]]
name = "tilt"
kind = "tilted"
slope_x = 0.1
[[planes.surfaces]]
name = "curve"
kind = "polynomial"
coefficients = [1.0, 0.01]
[[planes.surfaces]]
name = "measured"
kind = "file"
path = "s.tif"
"""
    cfg = load_config(write(tmp_path, text))
    plan = cfg.volume_plan()
    assert plan.labels == ("flat", "tilt", "curve", "measured")
    assert plan.dpms_um.shape == (4, 32, 48)
    assert np.all(plan.dpms_um[0] == -2.0)
    assert plan.dpms_um[1, 0, -1] == pytest.approx(0.1 * 23.5 * 0.5)
    assert plan.dpms_um[2].min() == pytest.approx(1.0 + 0.01 * 0.5 * 0.25, abs=1e-3)
    assert np.all(plan.dpms_um[3] == 1.5)
    plan.validate((32, 48), (-10.0, 10.0))
    # written out whole and read back (as workers and the run store do): the same plan
    again = ScopeConfig.model_validate(cfg.model_dump(mode="json")).volume_plan()
    np.testing.assert_array_equal(again.dpms_um, plan.dpms_um)
    # a DPM file with a NaN is refused when the plan is built, naming the file
    tifffile.imwrite(tmp_path / "s.tif", np.full((32, 48), np.nan, np.float32))
    with pytest.raises(DPMError, match=r"s\.tif: the DPM holds 1536 NaN"):
        cfg.volume_plan()


def test_explicit_z_list(tmp_path):
    cfg = load_config(write(tmp_path, "[planes]\nz_um = [-1.0, 0.5, 3]\n"))
    assert cfg.volume_plan().z_um == (-1.0, 0.5, 3.0)


def test_assignment_is_validated():
    cfg = ScopeConfig()
    cfg.source.rate_hz = 20.0
    assert cfg.source.rate_hz == 20.0
    with pytest.raises(ValidationError):
        cfg.source.rate_hz = -1.0


def test_recorder_seq_window_is_validated(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).recorder.seq_window == 10_000
    assert load_config(REPO / "config.toml").recorder.seq_window == 10_000
    assert load_config(write(tmp_path, "[recorder]\nseq_window = 50\n")).recorder.seq_window == 50
    with pytest.raises(
        ConfigError, match=r"recorder\.seq_window = 0: .*greater than or equal to 1"
    ):
        load_config(write(tmp_path, "[recorder]\nseq_window = 0\n"))


def test_security_keys_must_exist_and_default_to_keyless_loopback(tmp_path):
    cfg = load_config(REPO / "config.toml")
    assert cfg.security.curve == "auto" and cfg.curve_endpoints() == {}
    with pytest.raises(ConfigError, match=r"security\.client_keys = .*folder not found"):
        load_config(write(tmp_path, '[security]\nclient_keys = "nowhere"\n'))
    with pytest.raises(ConfigError, match=r"security\.server_key = .*file not found"):
        load_config(write(tmp_path, '[security]\nserver_key = "server.key_secret"\n'))
    with pytest.raises(ConfigError, match=r"security\.curve = 'off'"):
        load_config(write(tmp_path, '[security]\ncurve = "off"\n'))


def test_micromanager_comment_says_what_an_unset_config_file_does(tmp_path):
    text = (REPO / "config.toml").read_text(encoding="utf-8")
    section = text.split("[source.micromanager]")[1].split("\n[")[0]
    assert "# default: Micro-Manager's demo configuration" in section
    assert 'acquisition = "core"' in section
    # the shipped file switched to Micro-Manager: the daemon's own core, demo configuration,
    # geometry from the core ("auto"); test_geometry loads it (or says no installation has it)
    scope = text.replace('kind = "simulated"', 'kind = "micromanager"', 1)
    scope = scope.replace("frame_shape = [256, 256]", 'frame_shape = "auto"', 1)
    scope = scope.replace("pixel_size_um = 0.3 ", 'pixel_size_um = "auto" ', 1)
    (tmp_path / "engine").symlink_to(REPO / "engine")
    cfg = load_config(write(tmp_path, scope))
    mm = cfg.source.micromanager
    assert (mm.acquisition, mm.config_file, cfg.source.geometry_from_core) == ("core", None, True)
    assert "frame_shape" not in cfg.source.model_fields_set
    pytest.importorskip("pymmcore_plus", reason="the Micro-Manager core needs the mm extra")
    from live._mmcore import DEMO_CONFIG

    assert DEMO_CONFIG == "MMConfig_demo.cfg" and DEMO_CONFIG in section


def test_a_real_scope_runs_the_shipped_volume_model_without_the_simulator():
    """What `pip install 'deepz-live[mm]'` gives a real scope: no psfmodels (the `sim` extra)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['psfmodels'] = None\n"
        "import numpy as np\n"
        "from live.config import load_config, check_optics\n"
        "from live.worker import build_plan, open_backend\n"
        "cfg = load_config('config.toml')\n"
        "cfg.engine.backends = ['onnxruntime']\n"
        "cfg.source.frame_shape = (64, 64)\n"
        "backend = open_backend(cfg)\n"
        "planes = backend.infer(np.full((64, 64), 500, np.uint16), build_plan(cfg).dpms_um)\n"
        "print(planes.shape, check_optics(cfg, backend.metadata))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(9, 64, 64) None"


def test_a_precision_no_listed_backend_runs_is_refused_naming_both_keys(tmp_path):
    text = '[engine]\nbackends = ["onnxruntime"]\nprecision = "bf16"\n'
    with pytest.raises(ConfigError, match=r"engine.precision = 'bf16' is run by none of engine"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match="precision"):  # measured and not offered
        load_config(write(tmp_path, '[engine]\nprecision = "int8"\n'))
    text = '[engine]\nbackends = ["onnxruntime", "openvino"]\nprecision = "bf16"\n'
    assert load_config(write(tmp_path, text)).engine.precision == "bf16"


def test_a_recorder_backlog_that_holds_no_stack_is_refused(tmp_path):
    text = "[source]\nframe_shape = [512, 512]\n[recorder]\nmax_backlog_mb = 1\n"
    with pytest.raises(ConfigError, match=r"recorder.max_backlog_mb = 1 holds no stack"):
        load_config(write(tmp_path, text))
    text += "keep_stacks = false\n"  # raw frames of 0.5 MB fit
    assert load_config(write(tmp_path, text)).recorder.max_backlog_mb == 1


def test_a_recorder_that_can_write_nothing_or_no_chunk_is_refused(tmp_path):
    """Review 77: keeping neither image wrote an OME-Zarr collection of no image (invalid), and
    10000 frames of 2048² a chunk asked 78 GiB for the first shard, stopping the recording."""
    text = "[recorder]\nkeep_raw = false\nkeep_stacks = false\n"
    with pytest.raises(ConfigError, match=r"keep_raw and recorder.keep_stacks are both false"):
        load_config(write(tmp_path, text))
    text = "[source]\nframe_shape = [2048, 2048]\n[recorder]\nframes_per_chunk = 10000\n"
    with pytest.raises(ConfigError, match=r"frames_per_chunk = 10000 makes chunks of"):
        load_config(write(tmp_path, text))
    assert load_config(write(tmp_path, text.replace("10000", "4"))).recorder.frames_per_chunk == 4


def test_the_camera_ring_buffer_is_bounded_whatever_the_rate() -> None:
    from live.sources import RING_MAX_MB, RING_MIN_MB, ring_buffer_mb

    assert ring_buffer_mb(256 * 256 * 2, 1.0) == RING_MIN_MB
    assert ring_buffer_mb(512 * 512 * 2, 100.0) == 100  # 2 s of 0.5 MB frames
    assert ring_buffer_mb(2048 * 2048 * 2, 1000.0) == RING_MAX_MB  # a mistyped rate: 16 GB


def test_a_folder_or_a_byte_order_mark_is_handled_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder, not a config file"):
        load_config(tmp_path)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[source]\nrate_hz = 5.0\n")  # as Notepad saves UTF-8
    assert load_config(bom).source.rate_hz == 5.0


def test_settings_that_would_be_ignored_or_fail_later_are_one_line_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 80: each of these loaded, then was dropped, misread or failed once running."""
    hook = '[source]\nkind = "micromanager"\nframe_shape = [64, 64]\npixel_size_um = 0.5\n'
    hook += '{extra}[source.micromanager]\nacquisition = "hook"\n{mm}'
    for extra, key in (("frame_count = 10\n", "frame_count"), ("exposure_ms = 5\n", "exposure")):
        with pytest.raises(ConfigError, match=rf"source.{key}\w* is not used with .*'hook'"):
            load_config(write(tmp_path, hook.format(extra=extra, mm="")))
    with pytest.raises(ConfigError, match=r"micromanager.camera is used only with .*'core'"):
        load_config(write(tmp_path, hook.format(extra="", mm='camera = "Camera"\n')))
    # a replay that records neither its raw frames again nor stacks: a store of no image
    tif = tmp_path / "frames.tif"
    tifffile.imwrite(tif, np.zeros((2, 8, 8), np.uint16))
    replay = f'[source]\nkind = "replay"\n[source.replay]\npath = "{tif}"\n'
    replay += "[recorder]\nkeep_stacks = false\n"
    with pytest.raises(ConfigError, match=r"keep_stacks = false with a replay .*record_raw"):
        load_config(write(tmp_path, replay))
    # a measured PSF bank for the simulated scope is read at load, from the config's folder
    bank = '[source.simulator.optics]\npsf_model = "measured"\npsf_bank = "nope/bank.npy"\n'
    with pytest.raises(ConfigError, match=r"optics.psf_bank: .*nope/bank.npy"):
        load_config(write(tmp_path, bank))
    # a relative ipc endpoint is found from each process's own folder
    with pytest.raises(ConfigError, match=r"an ipc path must be absolute"):
        load_config(write(tmp_path, '[endpoints]\nstatus = "ipc://status.sock"\n'))
    # a tiny step: planes coincide at their rounding (there is no z_um to blame)
    tiny = "[planes]\nz_min_um = 0.0\nz_max_um = 1e-5\nstep_um = 1e-7\n"
    with pytest.raises(ConfigError, match=r"step_um = 1e-07 gives the same plane twice"):
        load_config(write(tmp_path, tiny))
    # a folder as the model, and "~" as the home folder (it made a folder named "~")
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"adir is a folder, not a file"):
        load_config(write(tmp_path, '[engine]\nmodel_path = "adir"\n'))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(write(tmp_path, '[recorder]\npath = "~/runs"\n'))
    assert cfg.recorder.path == tmp_path / "home" / "runs"
