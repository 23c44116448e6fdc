"""The scope configuration: one validated pydantic tree, read from a TOML file.

`load_config("config.toml")` returns a `ScopeConfig` or raises `ConfigError` with one message
that names each bad key (dotted path), its value and what is allowed. Units are in field names
(`rate_hz`, `pixel_size_um`). Relative paths in the file are resolved against the file's
folder, and referenced files (model, replay recording, Micro-Manager config, DPM images) must
exist. `config.model_dump(mode="json")` is saved with every recording.

Two checks need more than the file: `resolve_geometry` takes the frame shape and pixel size
from the daemon's own Micro-Manager core (and refuses values the file gives that the core
contradicts), and `check_optics` compares the scope's optics with those a model was trained at.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.dpm import DPMError, VolumePlan, from_image, polynomial, tilted, uniform
from engine.optics import CameraConfig, OpticsConfig
from engine.runtime import (
    BACKEND_PRECISIONS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MODEL,
    BackendName,
    BackendOptions,
    Precision,
)
from live.addresses import host_port, is_loopback, same_bind_address

if TYPE_CHECKING:
    from engine.metadata import ModelMetadata
    from live._mmcore import CoreGeometry

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_MODEL_PATH",
    "SIMULATED_EXPOSURE_MS",
    "ConfigError",
    "DisplayConfig",
    "EndpointsConfig",
    "EngineConfig",
    "MicroManagerConfig",
    "OverloadConfig",
    "PlanesConfig",
    "RecorderConfig",
    "ReplayConfig",
    "ScopeConfig",
    "SecurityConfig",
    "SimulatorConfig",
    "SourceConfig",
    "SurfaceConfig",
    "check_optics",
    "check_serving",
    "load_config",
    "resolve_geometry",
    "validate_config",
]

DEFAULT_MODEL_PATH = DEFAULT_MODEL
"""The shipped model, used when `engine.model_path` is not set (`engine.runtime.DEFAULT_MODEL`)."""
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "config.toml"
"""The shipped scope file (simulated scope, shipped model, CPU backend)."""
MAX_PLANES = 1000
"""Most planes a volume plan may have (a guard against typos such as step_um = 0.0001)."""
MAX_STACK_GIB = 4.0
"""Largest virtual stack in float32 (planes × frame): the plan's DPMs alone are that size, and
each worker renders one (41 planes of 2048² are 0.69 GB)."""
MAX_QUEUE_GIB = 8.0
"""Most frames the router may hold waiting (``overload.max_queue_frames`` × a uint16 frame)."""


class ConfigError(ValueError):
    """The scope configuration is unusable; the message names the key, value and what is allowed."""


class _BaseModel(BaseModel):
    """Base of every config section: unknown keys are errors and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _resolve(path: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve a path: ``~`` as the user's home, a relative one against the config's folder.

    The folder is ``context["base_dir"]``. ``$VARS`` are not expanded (a TOML file is no shell).
    """
    if path is None:
        return path
    path = path.expanduser()  # "~/runs" made a folder named "~" beside the config
    if path.is_absolute():
        return path
    ctx = info.context if isinstance(info.context, dict) else {}
    base = ctx.get("base_dir")
    return (Path(base) / path).resolve() if base is not None else path


def _existing_file(path: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve `path` and require that it is an existing file."""
    path = _resolve(path, info)
    if path is not None and path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if path is not None and not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


SIMULATED_EXPOSURE_MS = 10.0
"""The simulated scope's exposure when ``source.exposure_ms`` is not given (metadata only)."""

FrameSide = Annotated[int, Field(ge=8, le=16384)]


class SimulatorConfig(_BaseModel):
    """The simulated scope: optics, camera and sample of `engine.optics.WormTimeSeries`."""

    optics: OpticsConfig = Field(
        default_factory=OpticsConfig,
        description="Objective and indices (its pixel_size_um follows source.pixel_size_um).",
    )
    camera: CameraConfig = Field(default_factory=CameraConfig, description="sCMOS camera model.")
    sample: Literal["worm"] = Field(
        "worm", description="What the simulated scope sees (the live simulator has a worm only)."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Random seed of the sample and noise.")

    @field_validator("optics")
    @classmethod
    def _measured_bank(cls, optics: OpticsConfig, info: ValidationInfo) -> OpticsConfig:
        """Resolve a measured PSF bank against the config's folder and read it now.

        Read at load, a missing or malformed bank is one line before anything starts, not
        an error on the source's thread once the workers are up.
        """
        if optics.psf_bank is None:
            return optics
        from engine.volume import load_psf_bank

        path = _resolve(Path(optics.psf_bank), info)
        assert path is not None
        try:
            load_psf_bank(path, None, measured=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"source.simulator.optics.psf_bank: {err}") from None
        return optics.model_copy(update={"psf_bank": str(path)})


class ReplayConfig(_BaseModel):
    """Replay of a recorded run (OME-Zarr store or TIFF stack) as if it came from a camera."""

    path: Path | None = Field(None, description="Recording to replay (file or .zarr folder).")
    rate_hz: float | None = Field(
        None, gt=0, le=10000, description="Replay rate (Hz); None = the recording's own rate."
    )
    loop: bool = Field(False, description="Start again at the end instead of stopping.")
    record_raw: bool = Field(
        False,
        description="Record the replayed raw frames again (they are in the recording already); "
        "stacks are recorded either way.",
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        v = _resolve(v, info)
        if v is not None and not v.exists():
            raise ValueError(f"recording not found: {v}")
        return v


class MicroManagerConfig(_BaseModel):
    """A Micro-Manager camera: run by the daemon's own core, or pushed from an acquisition.

    With ``acquisition = "core"`` the daemon loads `config_file` (Micro-Manager's demo
    configuration when unset, as pymmcore-plus' ``loadSystemConfiguration()`` does) into a
    pymmcore-plus core, reads the frame geometry from it (`resolve_geometry`) and runs the
    camera's sequence acquisition. With ``"hook"`` a Micro-Manager acquisition elsewhere (the
    desktop application with pycromanager, a pymmcore-plus script) pushes frames to
    ``endpoints.frames`` through `live.hook` and the daemon only listens.
    """

    acquisition: Literal["core", "hook"] = Field(
        "core",
        description=(
            "core: the daemon loads config_file into its own core and runs the camera; "
            "hook: an acquisition elsewhere pushes frames through live.hook"
        ),
    )
    config_file: Path | None = Field(
        None,
        description=(
            "Micro-Manager hardware configuration (.cfg) for acquisition = 'core'; "
            "None = Micro-Manager's demo configuration (MMConfig_demo.cfg)."
        ),
    )
    camera: str | None = Field(None, description="Camera device label; None = the core camera.")

    @field_validator("config_file")
    @classmethod
    def _cfg_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(v, info)

    @model_validator(mode="after")
    def _core_only(self) -> MicroManagerConfig:
        if self.acquisition == "hook":
            for key, value in (("config_file", self.config_file), ("camera", self.camera)):
                if value is not None:
                    raise ValueError(
                        f"source.micromanager.{key} is used only with acquisition = 'core'; "
                        "with 'hook' the acquisition pushing the frames has its own "
                        "configuration"
                    )
        return self


AUTO = "auto"
"""Value of ``source.frame_shape`` / ``source.pixel_size_um`` that means "ask the core"."""
_GEOMETRY_KEYS = ("frame_shape", "pixel_size_um")


class SourceConfig(_BaseModel):
    """Where frames come from, and their geometry and timing."""

    kind: Literal["simulated", "micromanager", "replay"] = Field(
        "simulated", description="Frame source."
    )
    frame_shape: tuple[FrameSide, FrameSide] = Field(
        (256, 256), description="Frame size (height, width) in pixels."
    )
    pixel_size_um: float = Field(0.3, gt=0, le=100, description="Pixel size at the sample (µm).")
    objective_na: float | None = Field(
        None,
        gt=0,
        le=1.7,
        description=(
            "Objective NA of a Micro-Manager or replayed scope, compared with the model's; "
            "None = not checked (the simulated scope's is source.simulator.optics.na)."
        ),
    )
    emission_wavelength_um: float | None = Field(
        None,
        gt=0.2,
        le=2.0,
        description=(
            "Emission wavelength (µm), compared with the model's; None = not checked "
            "(the simulated scope's is source.simulator.optics.wavelength_um)."
        ),
    )
    rate_hz: float = Field(2.0, gt=0, le=10000, description="Camera frame rate (Hz).")
    exposure_ms: float | None = Field(
        None,
        gt=0,
        le=60000,
        description=(
            "Exposure time per frame (ms). Given, it is set on the Micro-Manager camera the "
            "daemon runs (acquisition = 'core'); None: that camera keeps its own. The "
            f"simulated scope records it only ({SIMULATED_EXPOSURE_MS:g} ms when None; its "
            "brightness comes from its optics)."
        ),
    )
    frame_count: int | None = Field(
        None, ge=1, description="Stop after this many frames; None = run until stopped."
    )
    simulator: SimulatorConfig = Field(
        default_factory=SimulatorConfig, description="Settings of the simulated scope."
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay settings.")
    micromanager: MicroManagerConfig = Field(
        default_factory=MicroManagerConfig, description="Micro-Manager settings."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SourceConfig:
        optics = self.simulator.optics
        if self.kind != "simulated":
            pass  # the simulator's optics are not used: a real scope's pixels may be past them
        elif "pixel_size_um" not in optics.model_fields_set:
            if optics.pixel_size_um != self.pixel_size_um:
                # validated, not copied: the optics' own bounds hold for the value it inherits
                fields = optics.model_dump(exclude_unset=True)
                try:
                    self.simulator.optics = OpticsConfig.model_validate(
                        {**fields, "pixel_size_um": self.pixel_size_um}
                    )
                except ValidationError as err:
                    why = err.errors()[0]["msg"]
                    raise ValueError(
                        f"source.pixel_size_um = {self.pixel_size_um} does not fit the simulator's "
                        f"optics: {why}"
                    ) from None
        elif optics.pixel_size_um != self.pixel_size_um:
            raise ValueError(
                f"source.simulator.optics.pixel_size_um = {optics.pixel_size_um} differs from "
                f"source.pixel_size_um = {self.pixel_size_um}; set only source.pixel_size_um"
            )
        if self.kind == "replay" and self.replay.path is None:
            raise ValueError("source.kind = 'replay' needs source.replay.path (the recording)")
        if self.kind == "micromanager" and self.micromanager.acquisition == "hook":
            for key in ("frame_count", "exposure_ms"):  # the daemon does not run that camera
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"source.{key} is not used with source.micromanager.acquisition = "
                        "'hook': the acquisition pushing the frames sets its own (remove it)"
                    )
            missing = [f"source.{k}" for k in _GEOMETRY_KEYS if k not in self.model_fields_set]
            if missing:
                raise ValueError(
                    f"source.micromanager.acquisition = 'hook' needs {' and '.join(missing)}: "
                    "the daemon cannot ask a core in another process"
                )
        if self.kind == "simulated":
            pairs = (("objective_na", "na"), ("emission_wavelength_um", "wavelength_um"))
            for key, sim_key in pairs:
                value, sim = getattr(self, key), getattr(self.simulator.optics, sim_key)
                if value is not None and value != sim:
                    raise ValueError(
                        f"source.{key} = {value} differs from the simulated scope's "
                        f"source.simulator.optics.{sim_key} = {sim}; set only the latter"
                    )
        return self

    @property
    def geometry_from_core(self) -> bool:
        """Whether frame shape and pixel size come from the daemon's Micro-Manager core."""
        return self.kind == "micromanager" and self.micromanager.acquisition == "core"


Backend = BackendName


def _default_backends() -> list[Backend]:
    """TensorRT where it is available, else OpenVINO (when installed), else ONNX Runtime."""
    return ["tensorrt", "openvino", "onnxruntime"]


class EngineConfig(_BaseModel):
    """The Deep-Z model and how it runs."""

    model_path: Path | None = Field(
        None, description="Model file (.onnx, .pt or TensorRT plan); None = the shipped model."
    )
    backends: list[Backend] = Field(
        default_factory=_default_backends,
        min_length=1,
        description="Backends to try, in order of preference; the first available one runs.",
    )
    precision: Precision = Field(
        "fp32", description="Inference precision (bf16: OpenVINO on AVX-512-BF16 / AMX CPUs)."
    )
    max_batch: int = Field(
        DEFAULT_MAX_BATCH, ge=1, le=1024, description="Most (frame, DPM) pairs per call."
    )
    intra_op_threads: int | None = Field(
        None, ge=1, le=1024, description="CPU threads for inference; None = backend default."
    )
    allow_extrapolation: bool = Field(
        False, description="Allow DPMs outside the model's trained range (less accurate)."
    )
    render_modality: Literal["widefield", "confocal"] | None = Field(
        None,
        description=(
            "Volume models: render the virtual planes wide-field or confocal-like (the paper's "
            "cross-modality output) from the same density; None = the model's own PSF bank."
        ),
    )
    psf_bank: Path | None = Field(
        None,
        description=(
            "Volume models: render the planes through this PSF bank (.npy), your microscope's "
            "measured from a bead slide (python -m engine.psf_calibration), instead of the "
            "model's own; None = the model's own. Wide-field only."
        ),
    )
    optics_check: Literal["refuse", "warn", "off"] = Field(
        "refuse",
        description=(
            "When the model's pixel size, NA or wavelength differ from the scope's: refuse to "
            "start, warn and run, or do not compare (check_optics)."
        ),
    )
    optics_rel_tol: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Relative difference of pixel size, NA or wavelength that is a mismatch.",
    )

    @field_validator("model_path")
    @classmethod
    def _model_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(v, info)

    @field_validator("psf_bank")
    @classmethod
    def _psf_bank_is_a_bank(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        path = _existing_file(v, info)
        if path is not None:  # all but the depth grid, which the model's load checks
            from engine.volume import load_psf_bank

            load_psf_bank(path, None, measured=True)
        return path

    @model_validator(mode="after")
    def _backend_options_agree(self) -> EngineConfig:
        # the runtime's own rule (a measured bank is wide-field), checked at load, not at start
        BackendOptions(render_modality=self.render_modality, psf_bank=self.psf_bank)
        if self.precision != "auto" and not any(
            self.precision in BACKEND_PRECISIONS[name] for name in self.backends
        ):
            runs = {name: BACKEND_PRECISIONS[name] for name in self.backends}
            raise ValueError(
                f"engine.precision = {self.precision!r} is run by none of engine.backends "
                f"{self.backends} (they run {runs})"
            )
        return self

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[Backend]) -> list[Backend]:
        if len(set(v)) != len(v):
            raise ValueError(f"backends must not repeat, got {v}")
        return v

    def resolved_model_path(self) -> Path:
        """Return the model file to load: `model_path`, or the shipped model."""
        return self.model_path if self.model_path is not None else DEFAULT_MODEL_PATH


class SurfaceConfig(_BaseModel):
    """A named surface to refocus onto (one DPM of the volume plan)."""

    name: str = Field(min_length=1, max_length=64, description="Label of the plane in outputs.")
    kind: Literal["plane", "tilted", "polynomial", "file"] = Field(
        "plane", description="Surface type."
    )
    z0_um: float = Field(0.0, ge=-1000, le=1000, description="Offset at the frame centre (µm).")
    slope_x: float = Field(0.0, ge=-10, le=10, description="Tilt along x (µm per µm).")
    slope_y: float = Field(0.0, ge=-10, le=10, description="Tilt along y (µm per µm).")
    coefficients: list[FiniteFloat] | None = Field(
        None,
        min_length=1,
        description="Polynomial c0 + c1·r² + c2·r⁴ + … (µm, r in µm from the centre).",
    )
    path: Path | None = Field(None, description="Single-plane TIFF DPM in µm (kind = 'file').")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(v, info)

    @model_validator(mode="after")
    def _needs(self) -> SurfaceConfig:
        if self.kind == "polynomial" and self.coefficients is None:
            raise ValueError(f"surface {self.name!r} of kind 'polynomial' needs coefficients")
        if self.kind == "file" and self.path is None:
            raise ValueError(f"surface {self.name!r} of kind 'file' needs path")
        # a setting its kind does not use would be dropped without a word (a tilt given
        # without kind = "tilted" refocused onto a flat plane)
        uses = {
            "plane": {"z0_um"},
            "tilted": {"z0_um", "slope_x", "slope_y"},
            "polynomial": {"coefficients"},
            "file": {"path"},
        }[self.kind]
        defaults = {
            "z0_um": 0.0,
            "slope_x": 0.0,
            "slope_y": 0.0,
            "coefficients": None,
            "path": None,
        }
        # values, not keys given: a config written out whole (model_dump) names every key
        unused = sorted(k for k, v in defaults.items() if k not in uses and getattr(self, k) != v)
        if unused:
            raise ValueError(
                f"surface {self.name!r} of kind {self.kind!r} does not use {', '.join(unused)}"
                + (" (kind = 'tilted' for a tilt)" if {"slope_x", "slope_y"} & set(unused) else "")
            )
        return self

    def build(self, frame_shape: tuple[int, int], pixel_size_um: float) -> np.ndarray:
        """Build the surface's DPM (H, W) float32 in µm."""
        if self.kind == "plane":
            return uniform(frame_shape, self.z0_um)
        if self.kind == "tilted":
            return tilted(
                frame_shape, self.z0_um, self.slope_x, self.slope_y, pixel_size_um=pixel_size_um
            )
        if self.kind == "polynomial":
            return polynomial(frame_shape, self.coefficients or [0.0], pixel_size_um=pixel_size_um)
        dpm = from_image(self.path or Path())
        if dpm.shape != tuple(frame_shape):
            raise DPMError(
                f"surface {self.name!r}: DPM image {self.path} is {dpm.shape}, "
                f"the frames are {tuple(frame_shape)}"
            )
        return dpm


class PlanesConfig(_BaseModel):
    """The virtual stack: exactly one of a z range, a list of z values, or named surfaces."""

    z_min_um: float | None = Field(None, ge=-1000, le=1000, description="First plane (µm).")
    z_max_um: float | None = Field(None, ge=-1000, le=1000, description="Last plane (µm).")
    step_um: float | None = Field(None, gt=0, le=1000, description="Plane spacing (µm).")
    z_um: list[Annotated[float, Field(ge=-1000, le=1000)]] | None = Field(
        None, min_length=1, max_length=MAX_PLANES, description="Explicit plane offsets (µm)."
    )
    surfaces: list[SurfaceConfig] | None = Field(
        None, min_length=1, max_length=MAX_PLANES, description="Named surfaces (DPMs)."
    )
    focus_lock_um: float | None = Field(
        None,
        ge=-100_000,
        le=100_000,
        description="Stage focus (µm) the planes are defined at. When set, each frame's planes "
        "shift by its focus change from this value (frame header focus_um), so they stay at "
        "fixed depths in the sample while the stage moves (drift correction); off when unset.",
    )
    stage_z_sign: Literal[1, -1] = Field(
        1,
        description="+1 when a larger stage focus position is deeper into the sample, -1 when "
        "it is shallower (used by focus_lock_um).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> PlanesConfig:
        range_keys = [self.z_min_um, self.z_max_um, self.step_um]
        given = [
            name
            for name, present in (
                ("z_min_um/z_max_um/step_um", any(v is not None for v in range_keys)),
                ("z_um", self.z_um is not None),
                ("surfaces", self.surfaces is not None),
            )
            if present
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of z_min_um/z_max_um/step_um, z_um or surfaces; "
                f"got {' and '.join(given) if given else 'none'}"
            )
        if given[0].startswith("z_min"):
            if any(v is None for v in range_keys):
                raise ValueError("a z range needs all of z_min_um, z_max_um and step_um")
            lo, hi, step = typing.cast(tuple[float, float, float], tuple(range_keys))
            if lo > hi:
                raise ValueError(f"z_min_um = {lo} must be <= z_max_um = {hi}")
            if (hi - lo) / step + 1 > MAX_PLANES:
                raise ValueError(f"the z range gives more than {MAX_PLANES} planes; raise step_um")
        if self.surfaces is not None:
            names = [s.name for s in self.surfaces]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"surface names must be unique; given more than once: {twice}")
        zs = self.plane_z_um()
        if zs is not None and len(set(zs)) != len(zs):
            twice_z = sorted({z for z in zs if zs.count(z) > 1})[:10]
            if given[0] == "z_um":
                raise ValueError(f"each plane once: z_um given more than once: {twice_z}")
            raise ValueError(  # planes are rounded to 1e-6 µm, below which steps coincide
                f"step_um = {self.step_um} gives the same plane twice at the planes' 1e-6 µm "
                f"rounding ({twice_z}); raise step_um"
            )
        return self

    def plane_z_um(self) -> list[float] | None:
        """Return the uniform plane offsets (µm), or None when the plan is made of surfaces."""
        if self.z_um is not None:
            return [float(z) for z in self.z_um]
        if self.z_min_um is not None and self.z_max_um is not None and self.step_um is not None:
            n = int(np.floor((self.z_max_um - self.z_min_um) / self.step_um + 1e-9)) + 1
            return [round(self.z_min_um + i * self.step_um, 6) for i in range(n)]
        return None

    def count(self) -> int:
        """Return how many planes a stack holds, without building any DPM."""
        zs = self.plane_z_um()
        return len(zs) if zs is not None else len(self.surfaces or [])

    def build(self, frame_shape: tuple[int, int], pixel_size_um: float) -> VolumePlan:
        """Build the volume plan (DPMs in µm, labels) for frames of `frame_shape`."""
        shape = (int(frame_shape[0]), int(frame_shape[1]))
        zs = self.plane_z_um()
        if zs is not None:
            return VolumePlan.from_z(zs, shape)
        surfaces = self.surfaces or []
        return VolumePlan.from_dpms(
            [s.build(shape, pixel_size_um) for s in surfaces], [s.name for s in surfaces]
        )


def _zmq_address(v: str) -> str:
    """Require an endpoint other processes can reach: ``tcp://host:port`` or ``ipc:///path``.

    A tcp port is a fixed number 1–65535 (clients must know where to connect: not ``*`` or
    0, ZeroMQ's "any free port"). Not ``inproc://`` (this process only: the hook, viewer and
    status reader are other processes), and not an IPv6 address (the daemon's sockets do not
    turn on ZeroMQ's IPv6 option, so it could never bind).
    """
    scheme, sep, rest = v.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ValueError(f"not a ZeroMQ address (tcp://host:port, ipc:///path): {v!r}")
    if scheme == "inproc":
        raise ValueError(
            f"{v!r} reaches only this process; the daemon's clients are other processes: "
            "use tcp://127.0.0.1:PORT or ipc:///path"
        )
    if scheme == "ipc" and not rest.startswith(("/", "@")):  # "@": Linux's abstract sockets
        raise ValueError(
            f"{v!r}: an ipc path must be absolute (ipc:///path): a relative one is found from "
            "each process's working folder, so a client started elsewhere misses it"
        )
    if scheme == "tcp":
        host, port = host_port(v)
        if not host:
            raise ValueError(f"{v!r} names no port: tcp://host:port, e.g. tcp://127.0.0.1:5558")
        if host.startswith("[") or host.count(":"):
            raise ValueError(f"{v!r}: IPv6 endpoints are not supported; use an IPv4 address")
        if not (port.isdecimal() and port.isascii() and 1 <= int(port) <= 65535):
            raise ValueError(
                f"{v!r}: the port must be a number 1-65535 (not {port!r}): clients must know "
                "where to connect"
            )
    return v


class EndpointsConfig(_BaseModel):
    """ZeroMQ addresses of the pipeline; loopback by default (nothing listens on the network).

    An endpoint that is not loopback (see `is_loopback`) needs CURVE keys (`SecurityConfig`).
    """

    frames: str = Field("tcp://127.0.0.1:5555", description="Camera frames (PUSH → PULL).")
    stacks: str = Field("tcp://127.0.0.1:5556", description="Refocused stacks (PUB → SUB).")
    recorder: str = Field(
        "tcp://127.0.0.1:5557", description="Raw frames republished to outside subscribers (PUB)."
    )
    status: str = Field("tcp://127.0.0.1:5558", description="Status and metrics (PUB).")

    @field_validator("frames", "stacks", "recorder", "status")
    @classmethod
    def _address(cls, v: str) -> str:
        return _zmq_address(v)

    @model_validator(mode="after")
    def _distinct(self) -> EndpointsConfig:
        named = self.items()
        for i, (name_a, a) in enumerate(named):
            for name_b, b in named[i + 1 :]:
                if same_bind_address(a, b):
                    raise ValueError(
                        f"endpoints must be distinct: endpoints.{name_a} = {a!r} and "
                        f"endpoints.{name_b} = {b!r} take the same address"
                    )
        return self

    def items(self) -> list[tuple[str, str]]:
        """Return ``(name, address)`` of every endpoint."""
        return [(name, getattr(self, name)) for name in ("frames", "stacks", "recorder", "status")]


class RecorderConfig(_BaseModel):
    """What is saved (OME-Zarr) and where."""

    enabled: bool = Field(True, description="Record the run.")
    path: Path = Field(Path("runs"), description="Folder that receives one store per run.")
    keep_raw: bool = Field(True, description="Save the raw camera frames.")
    keep_stacks: bool = Field(True, description="Save the refocused stacks.")
    frames_per_chunk: int = Field(1, ge=1, le=10000, description="Frames per Zarr chunk.")
    shard_s: float = Field(
        1.0,
        ge=0.0,
        le=3600.0,
        description=(
            "Seconds of frames (at the source rate) per zarr v3 shard file, at most 128 MB "
            "each. A shard is held in memory until full, at most max(2 s, 2 × shard_s): a "
            "crash loses that, what is queued for the disk (recorder.max_backlog_mb) and up "
            "to 2 s of presence not yet written. 0: one file per chunk, written at once."
        ),
    )
    stack_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description=(
            "Dtype of the stacks (camera counts) sent to the recorder and display and stored. "
            "float16: half the bytes, rounding error at most 2^-11 (0.05 %) of each value, "
            "values beyond ±65504 saturated and counted; float32: exact."
        ),
    )
    compression: Literal["none", "zstd", "lz4"] = Field("lz4", description="Chunk compression.")
    min_free_mb: int = Field(
        500,
        ge=0,
        le=10**9,
        description=(
            "Free disk space, MB, below which a run does not start and a running one stops "
            "recording stacks (they can be made again from the raw frames offline); the raw "
            "frames stop at half of it, those held in memory for their shard written first. "
            "0: record until the disk is full."
        ),
    )
    stall_s: float = Field(
        120.0,
        ge=1.0,
        le=3600.0,
        description=(
            "At the run's end, a recorder that finishes no write for this long is on a disk "
            "that stopped answering (an unplugged disk, a hung network mount): the run ends "
            "without it, its store keeping what was last written. Above the longest healthy "
            "write (a full shard at the disk's slowest)."
        ),
    )
    max_backlog_mb: int = Field(
        2048,
        ge=1,
        le=10**7,
        description=(
            "Memory the recorder's queue may hold for the disk (MB). When the disk is slower "
            "than the data: past half of it new stacks are not recorded, past all of it new "
            "raw frames are not either; each is counted as unrecorded and said, and the live "
            "pipeline and display go on (the daemon's memory stays bounded)."
        ),
    )
    seq_window: int = Field(
        10_000,
        ge=1,
        le=10**9,
        description=(
            "Refuse a frame whose seq is more than this past the highest one received "
            "(a forged or corrupt seq, not a gap)."
        ),
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, v: Path, info: ValidationInfo) -> Path:
        return _resolve(v, info) or v


def _keys_location(v: Path | list[Path] | None, info: ValidationInfo) -> Path | list[Path] | None:
    """Resolve a folder of public certificates, or a list of certificate files, and check it."""
    if v is None:
        return None
    if isinstance(v, list):
        return [typing.cast(Path, _existing_file(p, info)) for p in v]
    folder = typing.cast(Path, _resolve(v, info))
    if not folder.is_dir():
        raise ValueError(f"folder not found: {folder}")
    return folder


class SecurityConfig(_BaseModel):
    """Who may talk to the daemon: ZeroMQ CURVE encryption and client keys (ZAP).

    Endpoints beyond loopback always use CURVE, and the daemon refuses to start without keys;
    loopback endpoints use it only with ``curve = "required"``. Make keys with
    ``python -m live.keys KEYDIR``. The daemon needs `server_key` and `client_keys`; a client
    (hook, display, status reader) needs `client_key` and `server_public_key`.
    """

    curve: Literal["auto", "required"] = Field(
        "auto",
        description=("auto: CURVE on endpoints beyond loopback only; required: on every endpoint."),
    )
    server_key: Path | None = Field(
        None, description="The daemon's secret certificate (KEYDIR/server.key_secret)."
    )
    client_keys: Path | list[Path] | None = Field(
        None,
        description="Clients let in: a folder of public certificates (*.key) or a list of them.",
    )
    client_key: Path | None = Field(
        None, description="This client's secret certificate (KEYDIR/client.key_secret)."
    )
    server_public_key: Path | None = Field(
        None, description="The daemon's public certificate, for clients (KEYDIR/server.key)."
    )

    @field_validator("server_key", "client_key", "server_public_key")
    @classmethod
    def _key_exists(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(v, info)

    @field_validator("client_keys")
    @classmethod
    def _keys_exist(
        cls, v: Path | list[Path] | None, info: ValidationInfo
    ) -> Path | list[Path] | None:
        return _keys_location(v, info)


class DisplayConfig(_BaseModel):
    """The live viewer."""

    enabled: bool = Field(False, description="Open a viewer window on the refocused stacks.")
    max_fps: float = Field(10.0, gt=0, le=240, description="Most screen updates per second.")


Policy = Literal["every_frame", "latest"]
POLICIES: tuple[Policy, ...] = typing.get_args(Policy)
"""Overload policies: keep every frame up to a bound (latency grows), or only the newest."""


class OverloadConfig(_BaseModel):
    """What happens when inference cannot keep up with the camera."""

    policy: Policy = Field(
        "every_frame",
        description="every_frame: refocus all, latency grows; latest: skip to the newest frame.",
    )
    max_queue_frames: int = Field(
        256,
        ge=1,
        le=100000,
        description="every_frame: frames waiting for inference before the policy acts "
        "(latest keeps one, the newest).",
    )


def _default_planes() -> PlanesConfig:
    """Nine planes from -8 to +8 µm."""
    return PlanesConfig(z_min_um=-8.0, z_max_um=8.0, step_um=2.0)


class ScopeConfig(_BaseModel):
    """The whole scope file (`config.toml`), version 1."""

    version: Literal[1] = Field(1, description="Config schema version.")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Frame source.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Model and backend.")
    planes: PlanesConfig = Field(default_factory=_default_planes, description="Virtual stack.")
    endpoints: EndpointsConfig = Field(
        default_factory=EndpointsConfig, description="ZeroMQ addresses."
    )
    recorder: RecorderConfig = Field(default_factory=RecorderConfig, description="Recording.")
    display: DisplayConfig = Field(default_factory=DisplayConfig, description="Viewer.")
    overload: OverloadConfig = Field(default_factory=OverloadConfig, description="Overload policy.")
    security: SecurityConfig = Field(
        default_factory=SecurityConfig, description="CURVE keys for endpoints off loopback."
    )

    @property
    def records_raw(self) -> bool:
        """Whether the recorder keeps raw frames: a replay's only with ``record_raw``."""
        rc, src = self.recorder, self.source
        return rc.enabled and rc.keep_raw and (src.kind != "replay" or src.replay.record_raw)

    @model_validator(mode="after")
    def _fits_in_memory(self) -> ScopeConfig:
        h, w = self.source.frame_shape
        n = self.planes.count()
        stack_gib = n * h * w * 4 / 2**30
        if stack_gib > MAX_STACK_GIB:
            raise ValueError(
                f"{n} planes of {h}x{w} px make {stack_gib:.1f} GiB a stack (at most "
                f"{MAX_STACK_GIB:g}): fewer planes or a smaller source.frame_shape"
            )
        queue_gib = self.overload.max_queue_frames * h * w * 2 / 2**30
        if queue_gib > MAX_QUEUE_GIB:
            raise ValueError(
                f"overload.max_queue_frames = {self.overload.max_queue_frames} frames of {h}x{w} "
                f"px could hold {queue_gib:.1f} GiB (at most {MAX_QUEUE_GIB:g}): fewer frames"
            )
        rc = self.recorder
        if rc.enabled and not (self.records_raw or rc.keep_stacks):  # a collection of none
            raise ValueError(
                "recorder.keep_raw and recorder.keep_stacks are both false: a store with no "
                "image is no OME-Zarr; set recorder.enabled = false to record nothing"
                if not rc.keep_raw
                else "recorder.keep_stacks = false with a replay whose raw frames are not "
                "recorded again (source.replay.record_raw = false): a store with no image is "
                "no OME-Zarr; keep the stacks, record the raw frames, or set "
                "recorder.enabled = false"
            )
        if rc.enabled and not (
            self.source.geometry_from_core and "frame_shape" not in (self.source.model_fields_set)
        ):  # (a frame shape the camera gives is known only at start)
            stack_mb = n * h * w * np.dtype(rc.stack_dtype).itemsize / 2**20
            frame_mb = h * w * 2 / 2**20
            if rc.keep_stacks and stack_mb > rc.max_backlog_mb / 2:
                raise ValueError(
                    f"recorder.max_backlog_mb = {rc.max_backlog_mb} holds no stack: stacks are "
                    f"queued within half of it and one is {stack_mb:.1f} MB ({n} planes of "
                    f"{h}x{w} px, {rc.stack_dtype}); raise it"
                )
            if rc.keep_raw and frame_mb > rc.max_backlog_mb:
                raise ValueError(
                    f"recorder.max_backlog_mb = {rc.max_backlog_mb} holds no raw frame of "
                    f"{h}x{w} px ({frame_mb:.1f} MB); raise it"
                )
            # a shard is assembled whole in memory: one chunk must fit what the recorder holds
            chunk_mb = rc.frames_per_chunk * max(
                frame_mb if rc.keep_raw else 0.0, stack_mb if rc.keep_stacks else 0.0
            )
            if chunk_mb > rc.max_backlog_mb:
                raise ValueError(
                    f"recorder.frames_per_chunk = {rc.frames_per_chunk} makes chunks of "
                    f"{chunk_mb:.0f} MB ({h}x{w} px), more than recorder.max_backlog_mb = "
                    f"{rc.max_backlog_mb}: fewer frames per chunk"
                )
        return self

    def volume_plan(self) -> VolumePlan:
        """Build the planes' `VolumePlan` for this source's frame shape and pixel size."""
        return self.planes.build(self.source.frame_shape, self.source.pixel_size_um)

    def curve_endpoints(self) -> dict[str, str]:
        """Return the endpoints (name → address) that use CURVE, in `EndpointsConfig` order.

        Those beyond loopback, or every one with ``security.curve = "required"``.
        """
        required = self.security.curve == "required"
        return {
            name: address
            for name, address in self.endpoints.items()
            if required or not is_loopback(address)
        }


_MAKE_KEYS = "make keys with `python -m live.keys KEYDIR`"


def check_serving(config: ScopeConfig) -> None:
    """Raise `ConfigError` (one line) if the daemon cannot serve `config`'s endpoints safely.

    Every CURVE endpoint (`ScopeConfig.curve_endpoints`) needs ``security.server_key`` and
    ``security.client_keys``; the viewer the daemon starts also needs the client keys. The
    check is separate from `validate_config` because clients read the same file and hold
    only their own keys.
    """
    curve = config.curve_endpoints()
    if not curve:
        return
    sec = config.security
    missing = [
        f"security.{key}" for key in ("server_key", "client_keys") if getattr(sec, key) is None
    ]
    if missing:
        where = ", ".join(f"endpoints.{name} = {address!r}" for name, address in curve.items())
        if sec.curve == "required":
            why = "must use CURVE keys (security.curve = 'required')"
        elif len(curve) == 1:
            why = "is reachable beyond loopback and needs CURVE keys"
        else:
            why = "are reachable beyond loopback and need CURVE keys"
        raise ConfigError(
            f"{where} {why}, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: {_MAKE_KEYS} and add the "
            "[security] lines it prints to the config"
        )
    if config.display.enabled and "stacks" in curve:
        for key in ("client_key", "server_public_key"):
            if getattr(sec, key) is None:
                raise ConfigError(
                    f"display.enabled = true and endpoints.stacks uses CURVE, so the viewer "
                    f"needs security.{key}: {_MAKE_KEYS}"
                )


# -- geometry from the Micro-Manager core, and the model's optics ----------------------------


def resolve_geometry(config: ScopeConfig) -> ScopeConfig:
    """Return `config` with the frame geometry of the daemon's own Micro-Manager core.

    Call it once, before anything else starts. For ``source.kind = "micromanager"`` with
    ``acquisition = "core"`` it loads ``source.micromanager.config_file`` (the demo
    configuration when unset), reads the camera's frame shape after ROI and binning and the
    core's pixel size (binning and magnifiers included), and returns a copy whose
    ``source.frame_shape`` and ``source.pixel_size_um`` are those. A value the file gives
    that the core contradicts is a `ConfigError` saying which; a core without pixel size
    calibration keeps the file's ``pixel_size_um``. The loaded core is parked for the source
    (`live._mmcore.park_core`), so the hardware is initialised once. Any other source: `config`
    itself.
    """
    src = config.source
    if not src.geometry_from_core:
        return config
    try:
        from live._mmcore import core_geometry, load_core, park_core
    except ImportError:
        raise ConfigError(
            "source.kind = 'micromanager' needs pymmcore-plus: pip install 'deepz-live[mm]'"
        ) from None
    mm = src.micromanager
    try:
        core = load_core(mm.config_file, mm.camera)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        shape, pixel_size_um = _core_values(src, core_geometry(core))
        resolved = config.model_copy(deep=True)
        resolved.source.frame_shape = shape
        resolved.source.pixel_size_um = pixel_size_um
        # validated whole again: the checks across sections (a stack or a queue too large for
        # memory) saw the default frame shape, not the camera's
        resolved = type(config).model_validate(resolved.model_dump(mode="json"))
    except (ValueError, ValidationError) as err:
        core.unloadAllDevices()
        raise ConfigError(_one_line(err)) from None
    park_core(core, mm.config_file, mm.camera)
    return resolved


def _one_line(err: Exception) -> str:
    """Return an error's message (a validation error's first error) on one line."""
    if isinstance(err, ValidationError):
        return _describe(err.errors(include_url=False)[0])
    return " ".join(str(err).split())


def _core_values(src: SourceConfig, core: CoreGeometry) -> tuple[tuple[int, int], float]:
    """Return the core's (frame_shape, pixel_size_um), checked against the file's values.

    Raises `ConfigError` (one line) when the file contradicts the core or the camera's pixels
    are not 16-bit grey.
    """
    where = f"the Micro-Manager camera {core.camera!r}"
    if core.camera_channels != 1:  # each camera numbers its own frames: seqs would repeat
        raise ConfigError(
            f"{where} delivers {core.camera_channels} cameras' frames (a Multi Camera device); "
            "the daemon takes one camera's time series: set Core-Camera to one camera in "
            "source.micromanager.config_file"
        )
    if (core.bytes_per_pixel, core.components) != (2, 1):
        raise ConfigError(
            f"{where} gives {8 * core.bytes_per_pixel}-bit pixels with {core.components} "
            "component(s); the daemon takes 16-bit grey frames: set the camera's PixelType "
            "(or bit depth) in source.micromanager.config_file"
        )
    shape = (int(core.frame_shape[0]), int(core.frame_shape[1]))
    optics = f"ROI {list(core.roi)}, binning {core.binning}"
    if "frame_shape" in src.model_fields_set and tuple(src.frame_shape) != shape:
        raise ConfigError(
            f"source.frame_shape = {list(src.frame_shape)} differs from {where}, which gives "
            f'{shape[0]}×{shape[1]} frames ({optics}): remove the key (or set "auto") to use '
            "the camera's, or change the camera's ROI / binning"
        )
    typed = "pixel_size_um" in src.model_fields_set
    if core.pixel_size_um is None:
        if typed:
            return shape, float(src.pixel_size_um)
        raise ConfigError(
            f"the Micro-Manager core has no pixel size calibration for its current state "
            f"(camera {core.camera!r}): define a pixel size configuration in "
            "source.micromanager.config_file, or set source.pixel_size_um"
        )
    pixel = float(core.pixel_size_um)
    if typed and not math.isclose(src.pixel_size_um, pixel, rel_tol=1e-3):
        raise ConfigError(
            f"source.pixel_size_um = {src.pixel_size_um:g} differs from the Micro-Manager "
            f"core's {pixel:g} µm (pixel size configuration {core.pixel_config!r}, {optics}): "
            'remove the key (or set "auto") to use the core\'s, or fix the calibration'
        )
    return shape, pixel


def _scope_optics(config: ScopeConfig) -> list[tuple[str, float | None]]:
    """Return the scope's (config key, value) of pixel size, NA and emission wavelength."""
    src = config.source
    if src.kind == "simulated":
        optics = src.simulator.optics
        return [
            ("source.pixel_size_um", src.pixel_size_um),
            ("source.simulator.optics.na", optics.na),
            ("source.simulator.optics.wavelength_um", optics.wavelength_um),
        ]
    return [
        ("source.pixel_size_um", src.pixel_size_um),
        ("source.objective_na", src.objective_na),
        ("source.emission_wavelength_um", src.emission_wavelength_um),
    ]


def check_optics(config: ScopeConfig, metadata: ModelMetadata) -> str | None:
    """Say, in one line, how the model's optics differ from the scope's; None if they agree.

    Compares the pixel size, NA and emission wavelength the model was trained at (its
    metadata) with the scope's (`source.pixel_size_um`, and the objective NA and wavelength:
    the simulator's optics for a simulated scope, ``source.objective_na`` and
    ``source.emission_wavelength_um`` otherwise, not compared while unset) within
    ``engine.optics_rel_tol``. Returns None with ``engine.optics_check = "off"``. The caller
    acts on the policy: ``"refuse"`` raises `ConfigError` with the line before anything
    starts, ``"warn"`` logs it. Call `resolve_geometry` first: for a Micro-Manager core the
    pixel size is the core's.
    """
    engine = config.engine
    if engine.optics_check == "off":
        return None
    src = config.source
    if src.geometry_from_core and "pixel_size_um" not in src.model_fields_set:
        raise ValueError("check_optics needs the core's pixel size: call resolve_geometry first")
    scope = _scope_optics(config)
    reasons = metadata.optics_mismatch(
        pixel_size_um=float(src.pixel_size_um),
        na=scope[1][1],
        wavelength_um=scope[2][1],
        rel_tol=engine.optics_rel_tol,
    )
    if not reasons:
        return None
    keys = ", ".join(key for key, value in scope if value is not None)
    then = (
        "running anyway (engine.optics_check = 'warn')"
        if engine.optics_check == "warn"
        else "use a model trained for this scope, or set engine.optics_check = 'warn' to run anyway"
    )
    return (
        f"engine.model_path {engine.resolved_model_path().name} ({metadata.name}) does not fit "
        f"the scope: {'; '.join(reasons)} (scope from {keys}; tolerance "
        f"engine.optics_rel_tol = {engine.optics_rel_tol:g}): its refocusing would be wrong; "
        f"{then}"
    )


# -- loading and error messages ---------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """Find the pydantic model inside an annotation such as ``list[X] | None``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, tuple, Annotated):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _section(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Find the config model at `loc` (a path of keys from the root)."""
    model: type[BaseModel] | None = ScopeConfig
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
    return model


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("planes", "surfaces", 0, "kind")`` -> ``planes.surfaces[0].kind``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any) -> str:
    """Return the repr of a value, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(err: Any) -> str:
    """One line for one pydantic error: key, value and what is allowed."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # Literal/strict-type errors put the type name last in loc; drop tags that are not keys.
    parent = _section(loc[:-1]) if loc else None
    key = _dotted(loc)
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(parent.model_fields) if parent is not None else "?"
        return f"unknown key {key} = {_short(err['input'])}; allowed keys here: {allowed}"
    if err["type"] == "missing":
        if loc and isinstance(loc[-1], int):
            return f"{_dotted(loc[:-1])}: too few items (item [{loc[-1]}] is missing)"
        return f"{key}: required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = err.get("input")
    if isinstance(value, float) and not math.isfinite(value) and err["type"] != "finite_number":
        msg = "must be a finite number"  # pydantic says "less than or equal to 10000" for nan
    if not loc:
        return msg
    model = _section(loc[:-1]) if loc and isinstance(loc[-1], str) else None
    field = model.model_fields.get(str(loc[-1])) if model is not None and loc else None
    hint = f" ({field.description})" if field is not None and field.description else ""
    return f"{key} = {_short(err['input'])}: {msg}{hint}"


def _format(exc: ValidationError, source: str) -> str:
    """One message listing every error of a validation."""
    lines = [_describe(e) for e in exc.errors(include_url=False)]
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems:\n  - " + "\n  - ".join(lines)


def _drop_auto(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Remove ``"auto"`` geometry values from `data` (they stay unset); return their keys."""
    src = data.get("source")
    if not isinstance(src, dict):
        return data, []
    auto = [k for k in _GEOMETRY_KEYS if src.get(k) == AUTO]
    if not auto:
        return data, []
    kept = {k: v for k, v in src.items() if k not in auto}
    return {**data, "source": kept}, [f"source.{k}" for k in auto]


def validate_config(
    data: dict[str, Any], *, base_dir: Path | None = None, source: str = "config"
) -> ScopeConfig:
    """Validate a parsed TOML table strictly (no "5" for 5), raising `ConfigError`.

    The table goes through JSON so that TOML arrays become tuples and strings become paths
    while strict mode still refuses a string where a number belongs. ``source.frame_shape``
    and ``source.pixel_size_um`` may say ``"auto"`` (the same as leaving them out) where the
    daemon's own Micro-Manager core gives them (`resolve_geometry`).
    """
    data, auto = _drop_auto(data)
    try:
        text = json.dumps(data, default=str)
        config = ScopeConfig.model_validate_json(
            text, strict=True, context={"base_dir": base_dir} if base_dir is not None else None
        )
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    recorder = config.recorder
    if base_dir is not None and "path" not in recorder.model_fields_set:
        # relative paths are relative to the config's folder: the default ``runs`` too, not
        # the folder the daemon happens to start in (a default is not validated, so not
        # resolved by RecorderConfig's own validator)
        beside = (base_dir / recorder.path).resolve()
        config = config.model_copy(
            update={"recorder": recorder.model_copy(update={"path": beside})}
        )
    if auto and not config.source.geometry_from_core:
        raise ConfigError(
            f'{source}: {auto[0]} = "auto" needs source.kind = "micromanager" with '
            'source.micromanager.acquisition = "core" (a core the daemon can ask); give the value'
        )
    return config


def load_config(path: str | Path) -> ScopeConfig:
    """Read and validate a scope TOML file; any problem is one `ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:  # utf-8-sig: a byte-order mark (Windows editors write one) is not TOML, but harmless
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not data:  # a failed save or a truncated copy would otherwise start a run on defaults
        raise ConfigError(
            f"{path}: the file holds no settings (empty, or comments only); a scope config "
            "names at least its source (see config.toml)"
        )
    return validate_config(data, base_dir=path.resolve().parent, source=str(path))
