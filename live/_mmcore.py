"""A real Micro-Manager core with a simulated camera, and the bridge pycromanager needs.

pymmcore-plus's `UniMMCore` runs the real MMCore (C++) and lets devices be written in
Python. `SimulatedCamera` is such a device (a `SimpleCameraDevice`) whose pixels come
from a frame function, normally the optics simulator's moving, firing worm
(`engine.optics.WormTimeSeries.frame`); `SimulatedFocusStage` is the Z drive it reads.
`make_simulated_core` loads both into a `UniMMCore`, so acquisition code (snaps,
sequence acquisitions, pymmcore-plus MDA, pycromanager's Python backend) runs
unchanged against it.

A scope's own hardware configuration goes through `load_core` (Micro-Manager's demo
configuration when none is given), `core_geometry` reads the frame shape after ROI and
binning and the calibrated pixel size from it, and `park_core` / `claim_core` hand the core
`live.config.resolve_geometry` loaded to the source, so the hardware is initialised once.

pycromanager's Python backend (`Engine`, `PythonBackendAcquisition`) expects the
snake_case core that `mmpycorex` builds from a plain `pymmcore.CMMCore`; `SnakeCaseCore`
maps those calls onto a `CMMCorePlus` (camelCase), and `pycromanager_backend` installs it
as the active Python backend for the duration of a `with` block.

This module imports pymmcore-plus (the ``mm`` extra) at import time; nothing else in
`live` imports it at module level.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from pymmcore_plus import DeviceType
    from pymmcore_plus.experimental.unicore import (
        SimpleCameraDevice,
        StageDevice,
        UniMMCore,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Micro-Manager sources need pymmcore-plus: pip install 'deepz-live[mm]'"
    ) from exc

__all__ = [
    "BINNINGS",
    "DEMO_CONFIG",
    "META_FOCUS_UM",
    "META_FRAME_INDEX",
    "META_TIMESTAMP_S",
    "CoreGeometry",
    "FrameFn",
    "SimulatedCamera",
    "SimulatedFocusStage",
    "SnakeCaseCore",
    "TaggedImage",
    "claim_core",
    "core_geometry",
    "load_core",
    "make_simulated_core",
    "park_core",
    "pycromanager_backend",
    "release_parked",
]

log = logging.getLogger(__name__)

FrameFn = Callable[[int, float], np.ndarray]
"""``frame_fn(index, focus_um) -> (H, W) uint16``: the pixels of camera frame `index`."""

META_TIMESTAMP_S = "DeepZ-Timestamp-s"
"""Image-metadata key: wall-clock time (``time.time()``) at which the frame was exposed."""
META_FRAME_INDEX = "DeepZ-FrameIndex"
"""Image-metadata key: the camera's own running frame counter (never reset by a sequence)."""
META_FOCUS_UM = "DeepZ-Focus-um"
"""Image-metadata key: the Z-drive position (µm) the frame was rendered at."""

MAX_LAG_S = 0.25
"""A paced camera further behind its clock than this restarts the clock (no catch-up burst)."""

CAMERA_LABEL = "DeepZCamera"
FOCUS_LABEL = "DeepZFocus"

BINNINGS = (1, 2, 4)
"""Binning factors `SimulatedCamera` offers (its ``Binning`` property)."""
DEMO_CONFIG = "MMConfig_demo.cfg"
"""Micro-Manager's demo configuration, loaded when ``source.micromanager.config_file`` is unset."""


class SimulatedFocusStage(StageDevice):
    """A Z drive that moves instantly; the simulated camera renders at its position."""

    def __init__(self) -> None:
        super().__init__()
        self._position_um = 0.0

    def set_position_um(self, val: float) -> None:
        """Move to `val` µm (instantly)."""
        self._position_um = float(val)

    def get_position_um(self) -> float:
        """Return the current position in µm."""
        return self._position_um

    def home(self) -> None:
        """Move to 0 µm."""
        self._position_um = 0.0

    def stop(self) -> None:
        """Nothing to stop: moves are instantaneous."""

    def set_origin(self) -> None:
        """Make the current position 0 µm."""
        self._position_um = 0.0


class SimulatedCamera(SimpleCameraDevice):
    """A Micro-Manager camera whose frames come from `frame_fn`, paced like a real camera.

    With `rate_hz` set, frame ``i`` of a sequence is delivered no earlier than
    ``start + i / rate_hz`` (a camera running on its own clock); with ``rate_hz=None``
    frames come as fast as `frame_fn` makes them. Each frame carries its exposure time
    (`META_TIMESTAMP_S`), the camera's running frame index (`META_FRAME_INDEX`) and the
    focus position it was rendered at (`META_FOCUS_UM`) in its image metadata.

    Like a real camera it has a ``Binning`` property (`BINNINGS`): with binning ``b`` a frame
    is the sum of ``b × b`` blocks of `frame_fn`'s (clipped to 16 bits), so the core reports
    a smaller image and a ``b`` times larger pixel; software ROI (`core.setROI`) is counted
    in binned pixels and cleared when the binning changes.
    """

    def __init__(
        self,
        frame_fn: FrameFn,
        frame_shape: tuple[int, int],
        *,
        rate_hz: float | None = None,
        exposure_ms: float = 10.0,
        focus: SimulatedFocusStage | None = None,
    ) -> None:
        super().__init__()
        if len(frame_shape) != 2 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (height, width) > 0, got {frame_shape!r}")
        if rate_hz is not None and not rate_hz > 0:
            raise ValueError(f"rate_hz must be > 0 or None (free-running), got {rate_hz!r}")
        self._frame_fn = frame_fn
        self._shape = (int(frame_shape[0]), int(frame_shape[1]))
        self._exposure_ms = float(exposure_ms)
        self._focus = focus
        self.rate_hz = rate_hz
        self.frame_index = 0
        self.last_metadata: dict[str, str] = {}
        self._next_due = 0.0
        self._binning = 1  # no allowed-values list: .cfg files give "2", scripts give 2
        # set by `halt`: the wait for the next frame's due time ends at once (at 0.3 Hz that
        # wait held the core's stop for its 2 s limit, and its frame came after the drain)
        self._halted = threading.Event()

    def halt(self) -> None:
        """End the wait for the next frame now: the sequence is about to be stopped.

        The frame being waited for is delivered at once, before the core stops the camera
        thread, so the source drains it with the others rather than it landing after.
        """
        self._halted.set()

    def get_binning(self) -> int:
        """Return the binning factor (1 = none)."""
        return self._binning

    def set_binning(self, value: int) -> None:
        """Bin `value` × `value` sensor pixels into one; clears any ROI (it was in old pixels)."""
        value = int(value)
        if value not in BINNINGS or min(self._shape) // value < 1:
            raise ValueError(f"binning {value} not offered by a {self._shape} sensor: {BINNINGS}")
        self._binning = value
        self.clear_roi()

    def get_exposure(self) -> float:
        """Return the exposure time in ms."""
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        """Set the exposure time in ms (metadata only: the simulator sets brightness)."""
        self._exposure_ms = float(exposure)

    def sensor_shape(self) -> tuple[int, int]:
        """Return the sensor shape (height, width) in binned pixels."""
        return (self._shape[0] // self._binning, self._shape[1] // self._binning)

    def dtype(self) -> type[np.uint16]:
        """Return the pixel type: 16-bit camera counts."""
        return np.uint16

    def start_sequence(self, n: int | None, get_buffer: Any) -> Iterator[Mapping[str, str]]:
        """Start a (paced) sequence: the first frame is due now, then one every 1/rate_hz."""
        self._next_due = time.perf_counter()
        self._halted.clear()
        yield from super().start_sequence(n, get_buffer)

    def snap(self, buffer: np.ndarray) -> Mapping[str, str]:
        """Wait for the frame's due time (when paced), render it into `buffer`, tag it."""
        if self.rate_hz is not None:
            self._wait_until_due()
        focus_um = self._focus.get_position_um() if self._focus is not None else 0.0
        index = self.frame_index
        stamp = time.time()
        frame = self._frame_fn(index, focus_um)
        buffer[...] = _bin(frame, self._binning) if self._binning > 1 else frame
        self.frame_index += 1
        self.last_metadata = {
            META_TIMESTAMP_S: repr(stamp),
            META_FRAME_INDEX: str(index),
            META_FOCUS_UM: repr(focus_um),
        }
        return self.last_metadata

    def _wait_until_due(self) -> None:
        """Sleep until the next frame is due on the camera's fixed clock.

        A frame that is late (the process was busy) goes out at once, so the camera keeps
        its average rate; a camera more than `MAX_LAG_S` behind restarts its clock instead
        of bursting to catch up.
        """
        assert self.rate_hz is not None
        now = time.perf_counter()
        if self._next_due > now:
            self._halted.wait(self._next_due - now)  # `halt` ends it at once
        elif now - self._next_due > MAX_LAG_S:
            self._next_due = now
        self._next_due += 1.0 / self.rate_hz


def _bin(frame: np.ndarray, factor: int) -> np.ndarray:
    """Sum `factor` × `factor` blocks of `frame` (edges that do not fill a block are cut)."""
    h, w = frame.shape[0] // factor, frame.shape[1] // factor
    blocks = frame[: h * factor, : w * factor].reshape(h, factor, w, factor)
    binned: np.ndarray = np.minimum(blocks.sum(axis=(1, 3), dtype=np.uint32), 65535)
    return binned.astype(np.uint16)


def make_simulated_core(
    frame_fn: FrameFn,
    frame_shape: tuple[int, int],
    *,
    rate_hz: float | None = None,
    exposure_ms: float = 10.0,
    pixel_size_um: float = 1.0,
) -> UniMMCore:
    """Build a `UniMMCore` with `SimulatedCamera` as Core-Camera and a Z drive as Core-Focus.

    The returned core is a real MMCore: snaps, sequence acquisitions and MDA runs go
    through the C++ core's device bookkeeping, with the camera's pixels made in Python.
    """
    # Point the adapter search path at a folder without C++ adapters: this skips the
    # search for a Micro-Manager installation (none is needed for Python devices).
    core = UniMMCore(mm_path=str(Path(__file__).parent))
    stage = SimulatedFocusStage()
    camera = SimulatedCamera(
        frame_fn, frame_shape, rate_hz=rate_hz, exposure_ms=exposure_ms, focus=stage
    )
    core.loadPyDevice(FOCUS_LABEL, stage)
    core.loadPyDevice(CAMERA_LABEL, camera)
    core.initializeDevice(FOCUS_LABEL)
    core.initializeDevice(CAMERA_LABEL)
    core.setFocusDevice(FOCUS_LABEL)
    core.setCameraDevice(CAMERA_LABEL)
    core.setExposure(exposure_ms)
    core.setAutoShutter(False)  # there is no shutter device to open and close
    core.definePixelSizeConfig("deepz")
    core.setPixelSizeUm("deepz", pixel_size_um)
    core.setPixelSizeConfig("deepz")
    return core


def set_ring_buffer(core: Any, mb: int, frame_bytes: int) -> None:
    """Size `core`'s circular buffer to about `mb` MiB; for a Python camera, whole frames.

    pymmcore-plus 0.18's buffer for Python cameras (`SequenceBuffer`) does not wrap a frame
    that no longer fits at the end of its pool while any frame is still unread: it raises,
    and ``stopOnOverflow`` turns that into a camera stopped "by overflow" at the first lap
    (review 76: 300² frames at 100 Hz stopped after 203 of 300, with one frame waiting). A
    pool of a whole number of frames ends exactly where a frame does. MMCore's own buffer
    (C++ cameras) counts frames and takes whole MiB.
    """
    try:
        python_camera = core._py_camera() is not None  # UniMMCore's; no public getter in 0.18
    except AttributeError:  # a plain CMMCorePlus
        python_camera = False
    if not python_camera:
        core.setCircularBufferMemoryFootprint(mb)
        return
    frames = max(2, mb * 2**20 // frame_bytes)
    # a float of exact bytes (a power-of-two division): the Python buffer takes int(mb·2^20)
    core.setCircularBufferMemoryFootprint(frames * frame_bytes / 2**20)


def halt_simulated_camera(core: Any) -> None:
    """`SimulatedCamera.halt` on `core`'s camera if it is one (any other camera: nothing)."""
    try:
        camera = simulated_camera(core)
    except (AttributeError, KeyError, TypeError):  # a C++ or another Python camera
        return
    camera.halt()


def simulated_camera(core: UniMMCore) -> SimulatedCamera:
    """Return the `SimulatedCamera` loaded by `make_simulated_core` (for pacing changes)."""
    device = core._pydevices[CAMERA_LABEL]  # no public getter in 0.18
    if not isinstance(device, SimulatedCamera):
        raise TypeError(f"{CAMERA_LABEL!r} is a {type(device).__name__}, not a SimulatedCamera")
    return device


# ------------------------------------------------------------- configured cores, geometry


@dataclass(frozen=True)
class CoreGeometry:
    """What a Micro-Manager core says about the frames its camera will deliver.

    Attributes
    ----------
    camera : str
        The core camera's label.
    frame_shape : (int, int)
        Image (height, width) in pixels, after ROI and binning (``getImageHeight/Width``).
    pixel_size_um : float or None
        Pixel size at the sample (µm), binning and magnifiers included (``getPixelSizeUm``);
        None when no pixel size configuration matches the core's state.
    pixel_config : str
        The active pixel size configuration ("" when none).
    binning : str
        The camera's ``Binning`` property ("1" when it has none).
    roi : (int, int, int, int)
        The camera ROI ``(x, y, width, height)``.
    bytes_per_pixel, components : int
        Pixel format: 2 and 1 for the 16-bit grey frames the daemon takes.
    camera_channels : int
        Cameras behind the core camera (``getNumberOfCameraChannels``): 1, unless it is
        Micro-Manager's "Multi Camera", whose cameras each number their own frames.
    """

    camera: str
    frame_shape: tuple[int, int]
    pixel_size_um: float | None
    pixel_config: str
    binning: str
    roi: tuple[int, int, int, int]
    bytes_per_pixel: int
    components: int
    camera_channels: int = 1


def core_geometry(core: Any) -> CoreGeometry:
    """Read the current camera's frame geometry and pixel size from a loaded core."""
    camera = str(core.getCameraDevice())
    if not camera:
        raise ValueError("the Micro-Manager core has no camera (Core-Camera is not set)")
    binning = core.getProperty(camera, "Binning") if core.hasProperty(camera, "Binning") else "1"
    pixel = float(core.getPixelSizeUm())
    x, y, w, h = (int(v) for v in core.getROI())
    return CoreGeometry(
        camera=camera,
        frame_shape=(int(core.getImageHeight()), int(core.getImageWidth())),
        pixel_size_um=pixel if pixel > 0 else None,
        pixel_config=str(core.getCurrentPixelSizeConfig()),
        binning=str(binning),
        roi=(x, y, w, h),
        bytes_per_pixel=int(core.getBytesPerPixel()),
        components=int(core.getNumberOfComponents()),
        camera_channels=int(core.getNumberOfCameraChannels()),
    )


def _describe_config(config_file: Path | None) -> str:
    """Name the configuration in messages."""
    return str(config_file) if config_file is not None else f"Micro-Manager's {DEMO_CONFIG}"


@contextlib.contextmanager
def _quiet_pymmcore_plus() -> Iterator[None]:
    """Hold pymmcore-plus' logger to CRITICAL while a core is made and loaded.

    Its search for a Micro-Manager installation logs an ERROR through its own coloured handler
    and again through the root's (review 87); `load_core` says every failure in one line
    itself, naming the config key.
    """
    logger = logging.getLogger("pymmcore-plus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_core(config_file: Path | None = None, camera: str | None = None) -> UniMMCore:
    """Load `config_file` into a new `UniMMCore` and select `camera`; one-line errors.

    With `config_file` None this loads Micro-Manager's demo configuration (`DEMO_CONFIG`, what
    pymmcore-plus' ``loadSystemConfiguration()`` loads by default) from the Micro-Manager
    installation pymmcore-plus finds (``mmcore install``), and sets the demo camera to 16-bit
    pixels (the daemon takes 16-bit frames). Raises `ValueError` whose message names the config
    key and the problem: no installation, a configuration that fails to load, an unknown camera.
    """
    where = _describe_config(config_file)
    try:
        with _quiet_pymmcore_plus():  # its own ERROR lines (twice, in colour) before ours
            core = UniMMCore()
            if config_file is None:
                core.loadSystemConfiguration(DEMO_CONFIG)
                _demo_camera_16bit(core)
            else:
                core.loadSystemConfiguration(str(config_file))
    except FileNotFoundError:
        if config_file is not None:
            raise ValueError(f"source.micromanager.config_file {where} not found") from None
        raise ValueError(
            f"source.micromanager.config_file is not set, so the daemon loads {where}, but "
            "no Micro-Manager installation with it was found: install one (`mmcore install`) "
            "or set config_file to the scope's .cfg"
        ) from None
    except Exception as err:  # any device or syntax error of the file, from C++ or Python
        text = " ".join(str(err).split())[:300]
        raise ValueError(f"source.micromanager.config_file: {where} did not load: {text}") from None
    if camera:
        cameras = list(core.getLoadedDevicesOfType(DeviceType.Camera))
        if camera not in cameras:
            core.unloadAllDevices()
            raise ValueError(
                f"source.micromanager.camera = {camera!r} is not a camera of {where}; "
                f"its cameras: {cameras}"
            )
        core.setCameraDevice(camera)
    return core


def _demo_camera_16bit(core: Any) -> None:
    """Switch the demo camera to 16-bit pixels when it offers them (its default is 8-bit)."""
    camera = core.getCameraDevice()
    if camera and core.hasProperty(camera, "PixelType"):
        if "16bit" in core.getAllowedPropertyValues(camera, "PixelType"):
            core.setProperty(camera, "PixelType", "16bit")


_PARKED: dict[tuple[str | None, str | None], UniMMCore] = {}
_PARKED_LOCK = threading.Lock()


def _park_key(config_file: Path | None, camera: str | None) -> tuple[str | None, str | None]:
    """Key of a parked core: the resolved configuration file and the camera label."""
    return (str(Path(config_file).resolve()) if config_file is not None else None, camera or None)


def park_core(core: UniMMCore, config_file: Path | None, camera: str | None) -> None:
    """Keep a core that `live.config.resolve_geometry` loaded, for the source to claim.

    Loading a hardware configuration initialises every device (seconds on a real scope, and
    some devices home or reset): the geometry is read from the same core the source then runs,
    so it is loaded once and what was read is what runs. A core parked under the same key
    before is unloaded.
    """
    with _PARKED_LOCK:
        old = _PARKED.pop(_park_key(config_file, camera), None)
        _PARKED[_park_key(config_file, camera)] = core
    if old is not None and old is not core:
        old.unloadAllDevices()


def release_parked(config_file: Path | None, camera: str | None) -> bool:
    """Unload the core parked for `config_file` and `camera` and never claimed; say if one was.

    A daemon whose start fails after `live.config.resolve_geometry` loaded the hardware (a
    pre-flight refusal, a port in use, a model that cannot load) never reaches its source:
    its `stop` releases its own core here rather than at interpreter exit (another daemon's
    in the same process stays parked). A device that fails to unload is logged, not raised:
    the rest of the daemon's shutdown still runs.
    """
    with _PARKED_LOCK:
        core = _PARKED.pop(_park_key(config_file, camera), None)
    if core is None:
        return False
    try:
        core.unloadAllDevices()
    except Exception as exc:  # a device adapter's error (a lost serial link): said, not fatal
        log.error("unloading the Micro-Manager core's devices failed: %s", exc)
    return True


def claim_core(config_file: Path | None, camera: str | None) -> UniMMCore:
    """Take the core parked for `config_file` and `camera`, or load a new one (`load_core`)."""
    with _PARKED_LOCK:
        core = _PARKED.pop(_park_key(config_file, camera), None)
    return core if core is not None else load_core(config_file, camera)


# --------------------------------------------------------------------------- pycromanager


class TaggedImage:
    """The (tags, pixels) pair that pycromanager's acquisition engine passes along."""

    def __init__(self, tags: dict[str, Any] | None, pix: np.ndarray | None) -> None:
        self.tags = tags
        self.pix = pix


_Tagged = TaggedImage


def _camel_to_snake(name: str) -> str:
    """``getXYStageDevice`` -> ``get_xy_stage_device``: mmpycorex's renaming rule."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def _snake_names(cls: type) -> dict[str, str]:
    """Map every snake_case name mmpycorex would give a method of `cls` to its real name."""
    names: dict[str, str] = {}
    for name in dir(cls):
        if not name.startswith("_"):
            names.setdefault(_camel_to_snake(name), name)
    return names


class SnakeCaseCore:
    """The snake_case core API pycromanager's Python backend calls, mapped onto a CMMCorePlus.

    mmpycorex builds that API by renaming a plain `pymmcore.CMMCore`'s methods; here every
    ``snake_case`` attribute resolves to the wrapped core's ``camelCase`` method, so the same
    engine drives a `UniMMCore` with Python devices. The few MMCoreJ-style helpers the
    engine also uses (`TaggedImage`, `get_tagged_image`, `pop_next_tagged_image`) are
    written out below.
    """

    TaggedImage = TaggedImage

    def __init__(self, core: Any, *, empty_wait_s: float = 0.0005) -> None:
        self.core = core
        self._names = _snake_names(type(core))
        self._empty_wait_s = empty_wait_s

    def __getattr__(self, name: str) -> Any:
        """Resolve ``snake_case`` (or already camelCase) names on the wrapped core."""
        if name.startswith("__"):
            raise AttributeError(name)
        target = self._names.get(name, name)
        try:
            return getattr(self.core, target)
        except AttributeError:
            raise AttributeError(
                f"{type(self.core).__name__} has no {target!r} (asked for {name!r})"
            ) from None

    def get_tagged_image(
        self, cam_index: int, camera: str, height: int, width: int, *_: Any
    ) -> _Tagged:
        """Return the last snapped image with the tags the engine reads (as mmpycorex does).

        Like MMCoreJ's tagged images, the tags also carry the focus position and, for a
        Python camera that keeps them (`SimulatedCamera`), the camera's own frame tags.
        """
        pix = self.core.getImage()
        tags: dict[str, Any] = {
            "Camera": camera,
            "Height": height,
            "Width": width,
            "CameraChannelIndex": cam_index,
        }
        if self.core.getFocusDevice():
            tags["ZPosition_um"] = self.core.getPosition()
        is_py_device = getattr(self.core, "isPyDevice", None)
        if is_py_device is not None and is_py_device(camera):
            tags.update(getattr(self.core._pydevices[camera], "last_metadata", {}))
        return _Tagged(tags, pix)

    def prepare_sequence_acquisition(self, camera: str) -> None:
        """Do nothing: a no-op (and deprecated) since MMCore 11.13; the engine still calls it."""

    def pop_next_tagged_image(self) -> _Tagged:
        """Pop the oldest image of a running sequence, or raise IndexError if none is there.

        The engine polls this in a tight loop while it waits; a short sleep when the buffer
        is empty keeps that loop from starving the camera thread of the GIL.
        """
        if self.core.getRemainingImageCount() == 0:
            time.sleep(self._empty_wait_s)
        pix, md = self.core.popNextImageAndMD()
        return _Tagged(dict(md), pix)


_BACKEND_LOCK = threading.Lock()


@contextlib.contextmanager
def pycromanager_backend(core: Any) -> Iterator[SnakeCaseCore]:
    """Make `core` pycromanager's active Python-backend core inside the ``with`` block.

    Does what ``pycromanager.start_headless(python_backend=True)`` does with a core it
    built itself (register it with mmpycorex, start the acquisition `Engine` on it), but
    with our `CMMCorePlus` behind a `SnakeCaseCore`. ``pycromanager.Acquisition(...)`` then
    builds a `PythonBackendAcquisition` on it. On exit the engine is shut down and
    unregistered, so a later block may use another core. One block at a time per process.
    """
    try:
        from mmpycorex import launcher
        from pycromanager.acquisition.acq_eng_py.internal.engine import Engine
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the pycromanager hook needs pycromanager: pip install 'deepz-live[mm]'"
        ) from exc
    if not _BACKEND_LOCK.acquire(blocking=False):
        raise RuntimeError("a pycromanager backend is already active in this process")
    snake = SnakeCaseCore(core)
    try:
        if Engine.get_instance() is not None:
            raise RuntimeError("pycromanager's Engine is already running (start_headless?)")
        launcher._PYMMCORES.append(snake)
        engine = Engine(snake)
        try:
            yield snake
        finally:
            engine.shutdown()
            del Engine.singleton
            launcher._PYMMCORES.remove(snake)
    finally:
        _BACKEND_LOCK.release()


def _measure(frame_shape: tuple[int, int] = (256, 256), n_frames: int = 5000) -> dict[str, float]:
    """Measure snaps/s and streamed frames/s of the simulated camera fed by the worm simulator.

    The camera cycles 32 pre-rendered worm frames (as `live.sources.SimulatedScope` does),
    free-running (no pacing); a sequence acquisition is popped from the core's buffer.
    """
    from engine.optics import WormTimeSeries

    series = WormTimeSeries(frame_shape, rate_hz=100.0)
    bank = [series.frame(i) for i in range(32)]
    started = time.perf_counter()
    core = make_simulated_core(lambda i, _z: bank[i % len(bank)], frame_shape)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(500):
        core.snapImage()
        core.getImage()
    snap_hz = 500 / (time.perf_counter() - started)
    started = time.perf_counter()
    core.startSequenceAcquisition(n_frames, 0.0, True)
    popped = 0
    while popped < n_frames:
        if core.getRemainingImageCount():
            core.popNextImageAndMD()
            popped += 1
        elif not core.isSequenceRunning():
            break
        else:
            time.sleep(0.0002)
    stream_hz = popped / (time.perf_counter() - started)
    core.unloadAllDevices()
    return {"load_s": load_s, "snap_hz": snap_hz, "stream_hz": stream_hz, "frames": popped}


if __name__ == "__main__":
    import sys

    side = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    result = _measure((side, side))
    print(
        f"UniMMCore + SimulatedCamera {side}x{side} uint16: core+devices loaded in "
        f"{result['load_s'] * 1e3:.0f} ms; snapImage+getImage {result['snap_hz']:.0f}/s; "
        f"sequence acquisition streamed {result['frames']:.0f} frames at "
        f"{result['stream_hz']:.0f} frames/s"
    )
