"""What every backend shares: input checks, normalisation, padding, batching and the rate check.

A backend subclasses `BaseBackend` and implements only `_run` on a ready network input
(N, 2, H', W') float32; the scaling of images and DPMs comes from `engine.metadata` and
nowhere else, so the backends cannot drift apart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from engine.dpm import VolumePlan
from engine.metadata import (
    ONNX_METADATA_KEY,
    Modality,
    ModelMetadata,
    ModelMetadataError,
    broadcast_count,
    denormalize_images,
    nonfinite_weights,
    normalize_images,
    pad_to_multiple,
    prepare_inputs,
)
from engine.point_fit import PointFit, fit_points
from engine.runtime._protocol import BackendError, Precision
from engine.volume import RANGE_TOLERANCE_UM, Renderer, load_psf_bank, model_psf_bank, psf_bank

log = logging.getLogger(__name__)

INPUT_NAME = "input"
"""Name of the network input in exported models: (N, 2, H, W) float32, image and DPM."""
OUTPUT_NAME = "output"
"""Name of the network output in exported models: (N, 1, H, W) float32, the refocused plane."""
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "fp16")
MAX_CACHED_SHAPES = 2
"""Input (and output) buffers a backend keeps: one per recent (planes, height, width); live
calls repeat one shape, and a 41 × 2048² input alone takes 1.4 GB."""
MAX_DPM_UM = 1e4
"""A DPM beyond ±1 cm is not a focal distance (and past float32's range it would become inf)."""
DEFAULT_MAX_BATCH = 64
"""Planes per network call; larger requests are split. 41 planes (the paper's stack) fit."""


def depth_limits(metadata: ModelMetadata, allow_extrapolation: bool = False) -> tuple[float, float]:
    """Return the DPM values (µm) a model serves, lowest and highest.

    A volume model's depth grid, always: it renders nowhere else, so extrapolation cannot
    widen it. A per-plane model's trained dz range, or with `allow_extrapolation` what the
    runtime takes (±`MAX_DPM_UM`). One home for the daemon's start-up check, its workers'
    focus lock and offline refocusing, which must agree.
    """
    if metadata.volume is not None:
        return float(metadata.volume.depth_um[0]), float(metadata.volume.depth_um[-1])
    if allow_extrapolation:
        return -MAX_DPM_UM, MAX_DPM_UM
    return float(metadata.dz_range_um[0]), float(metadata.dz_range_um[1])


@dataclass(frozen=True)
class BackendOptions:
    """Construction options common to all backends (see `engine.runtime.load_backend`)."""

    precision: Precision = "fp32"
    intra_op_threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    device: str | None = None
    frame_shape: tuple[int, int] | None = None
    cache_dir: Path | None = None
    cuda_graph: bool = False
    render_modality: Modality | None = None
    """A volume model's planes: None renders them through its own PSF bank; "widefield" or
    "confocal" through that modality's (`_volume_psf`), the paper's cross-modality output."""
    psf_bank: Path | None = None
    """A volume model's planes rendered through this bank (.npy) instead of its own: the
    microscope's PSF measured from a bead slide (`engine.psf_calibration`); wide-field only."""
    point_fit: PointFit | None = None
    """A volume model's point-like blobs (beads) refitted to the frame through the bank its
    planes are rendered through before they are rendered (`engine.point_fit`): sharper,
    better-placed beads, at 0.3-1 s per 256² frame on one core; offline use, not live."""

    def __post_init__(self) -> None:
        """Reject values no backend could honour, naming the option and what is allowed."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.intra_op_threads is not None and self.intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1 or None, not {self.intra_op_threads}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {self.max_batch}")
        if self.psf_bank is not None and self.render_modality not in (None, "widefield"):
            raise ValueError(
                "psf_bank is a measured wide-field PSF; it cannot render "
                f"{self.render_modality} planes (leave out psf_bank or render_modality)"
            )
        if self.point_fit is not None and self.render_modality == "confocal":
            raise ValueError(
                "point_fit fits the wide-field frame through the bank the planes are rendered "
                "through; it cannot with confocal planes (leave out point_fit or render_modality)"
            )
        if self.frame_shape is not None and (
            len(self.frame_shape) != 2 or min(self.frame_shape) < 1
        ):
            raise ValueError(f"frame_shape must be (height, width) >= 1, not {self.frame_shape}")


def default_threads() -> int:
    """CPU cores this process may use (the intra-op thread count when none is given)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cuda_index(device: str) -> int | None:
    """Return the CUDA device index `device` names ("cuda" is 0, "cuda:N" is N), else None."""
    if device == "cuda":
        return 0
    index = device[5:]
    if device.startswith("cuda:") and index.isascii() and index.isdecimal():
        return int(index)
    return None


def require_onnx(model_path: Path, backend: str) -> None:
    """Raise `BackendError` unless `model_path` is a non-empty .onnx file (what `backend` runs).

    An empty file parses as an empty ONNX model, whose error would send its user to export
    metadata (review 87); a failed copy or a full disk is what made it.
    """
    if model_path.suffix != ".onnx":
        raise BackendError(
            f"{model_path}: {backend} needs an .onnx model; export one with `python -m export onnx`"
        )
    if model_path.is_file() and model_path.stat().st_size == 0:
        raise BackendError(f"{model_path}: the file is empty (0 bytes): copy or export it again")


def metadata_from_props(props: Mapping[str, str], source: str) -> ModelMetadata:
    """Read the Deep-Z metadata from an ONNX model's `metadata_props`, or raise `BackendError`."""
    text = props.get(ONNX_METADATA_KEY)
    if text is None:
        raise BackendError(
            f"{source}: no Deep-Z metadata (metadata_props key {ONNX_METADATA_KEY!r} missing); "
            "export the model with `python -m export onnx`"
        )
    try:
        return ModelMetadata.from_json(text, source=source)
    except ModelMetadataError as exc:
        raise BackendError(str(exc)) from exc


def io_channels(metadata: ModelMetadata) -> tuple[int, int]:
    """Network input and output channels: (2, 1) per-plane models, (1, depths) volume models.

    Raises `BackendError` when the metadata's ``architecture`` gives them as anything but
    whole numbers, or when they disagree with its ``volume`` section (a volume model takes
    the frame alone and returns one channel a depth).
    """
    arch = metadata.architecture
    raw = (arch.get("in_channels", 2), arch.get("out_channels", 1))
    if not all(type(v) is int or (isinstance(v, float) and v.is_integer()) for v in raw):
        raise BackendError(
            f"{metadata.name}: architecture in_channels / out_channels must be whole numbers, "
            f"got {raw[0]!r} / {raw[1]!r}"
        )
    channels = (int(raw[0]), int(raw[1]))
    if metadata.volume is not None and channels != (1, len(metadata.volume.depth_um)):
        raise BackendError(
            f"{metadata.name}: a volume model takes 1 channel and returns one a depth "
            f"({len(metadata.volume.depth_um)}), but its architecture says {channels[0]} in, "
            f"{channels[1]} out"
        )
    return channels


def check_io_shapes(
    inputs: list[tuple[str, list[int | str | None]]],
    outputs: list[tuple[str, list[int | str | None]]],
    source: str,
    metadata: ModelMetadata,
) -> None:
    """Check a model has one (N, C, H, W) input and one output of the metadata's channels.

    Per-plane models take (N, 2, H, W) image + DPM and return (N, 1, H, W); volume models take
    (N, 1, H, W) and return (N, D, H, W) densities. Each entry is (name, shape) with symbolic or
    unknown dimensions as str or None; otherwise `BackendError`.
    """
    cin, cout = io_channels(metadata)
    if len(inputs) != 1 or len(outputs) != 1:
        raise BackendError(
            f"{source}: a Deep-Z model has 1 input and 1 output, this one has "
            f"{[n for n, _ in inputs]} and {[n for n, _ in outputs]}"
        )
    for (name, shape), channels, what in ((inputs[0], cin, "input"), (outputs[0], cout, "output")):
        if len(shape) != 4 or shape[1] != channels:
            raise BackendError(
                f"{source}: {what} {name!r} must be (N, {channels}, H, W), its shape is {shape}"
            )


def onnx_metadata(path: Path) -> ModelMetadata:
    """Read the Deep-Z metadata from an ONNX file's `metadata_props` (onnx, else onnxruntime).

    For backends whose engine does not expose `metadata_props` (TensorRT, OpenVINO); the
    weights are left on disk.
    """
    try:
        import onnx
    except ImportError:
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"{path}: not a loadable ONNX model: {exc}") from exc
        return metadata_from_props(session.get_modelmeta().custom_metadata_map, str(path))
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends for a corrupt file
        raise BackendError(f"{path}: not a loadable ONNX model: {exc}") from exc
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, str(path))


def check_onnx_weights(path: Path) -> None:
    """Refuse an ONNX model whose weights (initializers) hold NaN or infinite values.

    A training run that diverged exports such weights; every frame would then come out NaN
    (or, through another runtime, finite and wrong). Needs the `onnx` package; without it
    (a runtime-only install) the check is skipped.

    Raises
    ------
    BackendError
        One line naming the file and the first weights that are not finite.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return
    try:
        proto = onnx.load_model(str(path))
    except Exception as exc:  # DecodeError and friends for a corrupt file
        raise BackendError(f"{path}: not a loadable ONNX model: {exc}") from exc
    arrays = ((t.name, numpy_helper.to_array(t)) for t in proto.graph.initializer)
    if (refusal := nonfinite_weights(str(path), arrays)) is not None:
        raise BackendError(refusal)


def _volume_psf(
    model_path: Path | None,
    metadata: ModelMetadata,
    modality: Modality | None = None,
    measured: Path | None = None,
) -> np.ndarray:
    """Load a volume model's PSF bank from beside its model file, or raise `BackendError`.

    With `measured`, that bank instead (a microscope's, `engine.psf_calibration`), checked to
    fit the model's depth grid and to be a PSF: non-negative planes of unit sum.

    For another `modality` than the bank's, the bank is made anew with the optics the model
    trained with (`extra.train_config.optics`, `engine.volume.psf_bank`), the same function and
    optics that made the shipped file: the network predicts where the light comes from, and
    only this bank decides whether its planes look wide-field or confocal.
    """
    assert metadata.volume is not None
    if measured is not None:
        return _measured_psf(Path(measured), len(metadata.volume.depth_um))
    if model_path is None:
        raise BackendError(f"{metadata.name}: a volume model needs its file to find its PSF bank")
    path = Path(model_path).parent / metadata.volume.psf_file
    try:
        psf = model_psf_bank(model_path, metadata.volume)
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path}: cannot load the volume model's PSF bank: {exc}") from exc
    if modality is None or modality == metadata.volume.modality:
        return psf
    from engine.optics import OpticsConfig

    recorded = metadata.training_optics
    if recorded is None:
        raise BackendError(
            f"{model_path}: its metadata records no training optics to make a {modality} PSF "
            "bank from; write one with python -m engine.train_volume --weights-from-checkpoint "
            f"CKPT --render-modality {modality}"
        )
    try:
        optics = OpticsConfig(**recorded)
    except ValueError as exc:
        raise BackendError(f"{model_path}: its training optics are not valid: {exc}") from exc
    depth = np.asarray(metadata.volume.depth_um, dtype=np.float64)
    try:
        return psf_bank(optics, depth, size_px=psf.shape[-1], modality=modality)
    except (OSError, ValueError) as exc:
        raise BackendError(f"{model_path}: no {modality} PSF bank: {exc}") from exc


def _measured_psf(path: Path, n_depths: int) -> np.ndarray:
    """Load a measured PSF bank for an `n_depths` model, or raise `BackendError` naming why."""
    try:
        return load_psf_bank(path, n_depths, measured=True)
    except (OSError, ValueError) as exc:
        raise BackendError(f"engine.psf_bank {exc}") from exc


def _warn_lateral(bank: Path, lateral: str) -> None:
    """Log when a measured bank was measured for another point convention than the fit's.

    `engine.psf_calibration` records its ``lateral`` in the JSON beside the bank: a bank
    measured for split points, served to a fit that holds them on the spline kernel (or the
    reverse), renders beads too sharp or too soft. A bank without the record is not judged.
    """
    import json

    try:
        recorded = json.loads(Path(bank).with_suffix(".json").read_text()).get("lateral")
    except (OSError, ValueError, AttributeError):
        return
    if recorded in ("linear", "spline") and recorded != lateral:
        log.warning(
            "PSF bank %s was measured for %s points (engine.psf_calibration --lateral %s) and the "
            "point fit holds them %s: beads come out too %s; measure it again with --lateral %s",
            bank,
            recorded,
            recorded,
            lateral,
            "sharp" if lateral == "spline" else "soft",
            lateral,
        )


MAX_PIXEL = 1e15
"""Largest |value| a frame may hold. The network's normalisation is float64, but a volume
model's planes are rendered in float32 (3.4e38) by FFT sums over the frame: a pixel near 1e38
makes every plane NaN. No camera counts come near 1e15, which leaves a wide margin."""


def _check_array(label: str, arr: np.ndarray, *, finite: bool = True) -> np.ndarray:
    """Validate the dtype and rank of one `infer` input, with an error that names the problem."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{label} must be a real numeric array, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{label} must be real, got complex dtype {arr.dtype}")
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"{label} must be (H, W) or (N, H, W) and non-empty, got {arr.shape}")
    # one NaN or infinite pixel spreads through every convolution to the whole output: refuse
    # it rather than return a stack of NaN; so does one beyond MAX_PIXEL, which overflows the
    # float32 render (8-32-bit integer camera frames can hold neither: no cost)
    if finite and (arr.dtype.kind == "f" or arr.dtype.itemsize > 4):
        lo, hi = float(arr.min()), float(arr.max())
        if not (-MAX_PIXEL <= lo and hi <= MAX_PIXEL):  # NaN fails both comparisons
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                raise ValueError(f"{label} holds {bad} NaN or infinite value(s)")
            raise ValueError(
                f"{label} holds values beyond ±{MAX_PIXEL:g} (min {lo:g}, max {hi:g}): "
                "not camera counts"
            )
    return arr


def _check_arrays(images: np.ndarray, dpms_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate dtypes and ranks of `infer` inputs, with errors that name the problem.

    The DPMs' values are checked by `BaseBackend._dpm_span` (once for a frozen plan).
    """
    images = _check_array("images", images)
    return images, _check_array("dpms_um", dpms_um, finite=False)


def _frozen(a: np.ndarray) -> bool:
    """Whether `a` cannot change: read-only and owning its data (not a view of a writable one).

    Callers that refocus every frame onto the same planes (the live worker) pass such an array,
    so its normalised DPM channel is written once, not per frame. An array made writeable,
    changed and frozen again cannot be told from the one checked before: freeze a new array
    for new planes (as `engine.dpm.VolumePlan.frozen` does), never refreeze one.
    """
    return not a.flags.writeable and a.flags.owndata


class BaseBackend:
    """Shared `Backend` behaviour; subclasses set `name`, the attributes, and implement `_run`."""

    name: ClassVar[str] = "base"
    supported_precisions: ClassVar[tuple[Precision, ...]] = ("fp32",)

    def __init__(
        self,
        model_path: Path | None,
        metadata: ModelMetadata,
        options: BackendOptions,
        *,
        psf_beside: Path | None = None,
    ) -> None:
        """Check the options and load a volume model's PSF bank.

        The bank is the file the metadata names beside `psf_beside` (default `model_path`):
        a backend that serves a compiled copy kept elsewhere (TensorRT's engine cache) names
        the model file the copy was made from.
        """
        if options.precision == "auto":  # a backend with a faster choice resolved it already
            options = replace(options, precision="fp32")
        if options.precision not in self.supported_precisions:
            raise BackendError(
                f"{self.name} supports precision {self.supported_precisions}, "
                f"not {options.precision!r}"
            )
        self.model_path = model_path
        self.metadata = metadata
        self.options = options
        self.precision: Precision = options.precision
        self.max_batch = options.max_batch
        self.device = "cpu"
        self._inputs: dict[tuple[int, int, int, int], np.ndarray] = {}
        self._dpms_in_buffer: tuple[int, tuple[int, ...], np.ndarray] | None = None
        self._span: tuple[np.ndarray, tuple[float, float]] | None = None
        """(frozen DPM array, its `_dpm_span`): the last frozen plan checked."""
        """(buffer address, buffer shape, DPM array) of the last call, when its DPMs were frozen:
        their normalised channel is still in that buffer and the next call may skip it."""
        self._psf: np.ndarray | None = None
        self._fit_memo: tuple[bytes, np.ndarray] | None = None
        """(digest of a frame, its density after the point fit): the last frame fitted."""
        self._renderers: dict[tuple[int, int], Renderer] = {}
        if metadata.volume is None and options.psf_bank is not None:
            raise BackendError(
                f"engine.psf_bank {options.psf_bank}: {metadata.name} is a per-plane model; "
                "a PSF bank is for volume models"
            )
        if metadata.volume is None and options.render_modality not in (None, "widefield"):
            raise BackendError(
                f"engine.render_modality {options.render_modality!r}: {metadata.name} is a "
                "per-plane model, whose planes are the wide-field ones it was trained on; "
                "rendering another modality is for volume models"
            )
        if metadata.volume is None and options.point_fit is not None:
            raise BackendError(
                f"point_fit: {metadata.name} is a per-plane model; the point fit refits a "
                "volume model's density"
            )
        if metadata.volume is not None:
            beside = model_path if psf_beside is None else psf_beside
            self._psf = _volume_psf(beside, metadata, options.render_modality, options.psf_bank)
            if options.psf_bank is not None and options.point_fit is not None:
                _warn_lateral(options.psf_bank, options.point_fit.lateral)
            # what the rendered planes now show (a measured bank is wide-field)
            shown = "widefield" if options.psf_bank is not None else options.render_modality
            if shown is not None:
                volume = metadata.volume.model_copy(update={"modality": shown})
                self.metadata = metadata.model_copy(update={"volume": volume})

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Run the network on (n, 2, H', W') float32, n <= max_batch; return (n, 1, H', W')."""
        raise NotImplementedError

    def _engine_call(self, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """Call an engine on `x`, its own failures re-raised as one `BackendError` line.

        The engine is `_run`, or TensorRT's whole-refocus engine. The runtimes raise their
        own types (onnxruntime a bare RuntimeError, e.g. for a graph that cannot take this
        input size); `infer` promises `ValueError` or `BackendError` only, which is what the
        live worker counts against one frame.
        """
        try:
            return run(x)
        except (ValueError, BackendError):
            raise
        except Exception as exc:  # any engine failure, re-raised as ours
            raise BackendError(
                f"{self.name}: the network failed on input {tuple(x.shape)}: {exc}"
            ) from exc

    def _dpm_span(self, dpms_um: np.ndarray) -> tuple[float, float]:
        """Return the DPMs' (min, max) µm; refuse NaN, infinite or beyond ±`MAX_DPM_UM`.

        Two reductions and no temporary (a float64 1e300 is finite but inf as float32, so the
        bound is checked, not only finiteness). A frozen array (the live worker's plan, the
        same every frame) is checked on its first call only.
        """
        # the same object, still frozen: one made writeable again since may hold anything
        if self._span is not None and self._span[0] is dpms_um and _frozen(dpms_um):
            return self._span[1]
        lo, hi = float(dpms_um.min()), float(dpms_um.max())
        if not (-MAX_DPM_UM <= lo and hi <= MAX_DPM_UM):  # NaN fails both comparisons
            raise ValueError(
                f"dpms_um holds NaN, infinite or values beyond ±{MAX_DPM_UM:g} µm "
                f"(min {lo:g}, max {hi:g})"
            )
        if _frozen(dpms_um):
            self._span = (dpms_um, (lo, hi))
        return lo, hi

    def _check_volume_span(self, lo: float, hi: float) -> None:
        """Refuse planes a volume model cannot render: beyond its depth grid (µm from focus)."""
        assert self.metadata.volume is not None
        grid = self.metadata.volume.depth_um
        if not (grid[0] - RANGE_TOLERANCE_UM <= lo and hi <= grid[-1] + RANGE_TOLERANCE_UM):
            raise ValueError(
                f"dpms_um spans {lo:g} … {hi:g} µm; this volume model renders "
                f"{grid[0]:g} … {grid[-1]:g} µm from the focal plane"
            )

    def infer(self, images: np.ndarray, dpms_um: np.ndarray) -> np.ndarray:
        """Normalise, pad, run in chunks of `max_batch`, crop and map back (see `Backend`)."""
        images, dpms_um = _check_arrays(images, dpms_um)
        lo, hi = self._dpm_span(dpms_um)
        if self.metadata.volume is not None:
            self._check_volume_span(lo, hi)
            return self._infer_volume(images, dpms_um)
        h, w = images.shape[-2:]
        n = max(a.shape[0] if a.ndim == 3 else 1 for a in (images, dpms_um))  # broadcast
        buf = self._input_buffer((n, 2, h, w))
        written = (buf.ctypes.data, buf.shape, dpms_um)
        reuse = (
            self._dpms_in_buffer is not None
            and self._dpms_in_buffer[:2] == written[:2]
            and self._dpms_in_buffer[2] is dpms_um
            and _frozen(dpms_um)
        )
        x, mean, std = prepare_inputs(images, dpms_um, self.metadata, out=buf, dpms_in_out=reuse)
        self._dpms_in_buffer = written if _frozen(dpms_um) else None
        out = np.empty((n, h, w), dtype=np.float32)
        step = self.max_batch
        for start in range(0, n, step):
            stop = min(start + step, n)
            y = self._engine_call(self._run, x[start:stop])
            if y.shape[0] != stop - start or y.ndim != 4:
                raise BackendError(f"{self.name}: network returned shape {y.shape}")
            denormalize_images(
                y[:, 0, :h, :w], mean[start:stop], std[start:stop], out=out[start:stop]
            )
        return out

    def volume(self, images: np.ndarray) -> np.ndarray:
        """Volume models: the density (N, D, H, W) float32 counts of each frame, one pass each.

        The depths are `metadata.volume.depth_um` relative to the frame's focal plane.
        """
        if self.metadata.volume is None:
            raise BackendError(f"{self.metadata.name} is a per-plane model, not a volume model")
        images = _check_array("images", images)
        if images.ndim == 2:
            images = images[None]
        n, h, w = images.shape
        x, _, std = normalize_images(images)
        x = pad_to_multiple(x[:, None], self.metadata.size_multiple)
        out = np.empty((n, len(self.metadata.volume.depth_um), h, w), dtype=np.float32)
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            y = self._run_volume(x[start:stop])
            np.multiply(y[:, :, :h, :w], std[start:stop, :, :, None], out=out[start:stop])
        return out

    def _run_volume(self, x: np.ndarray) -> np.ndarray:
        """Run (n, 1, H', W') normalised frames; the (n, D, H', W') output, its shape checked.

        The result may be the backend's own output buffer: valid until its next call.
        """
        assert self.metadata.volume is not None
        y = self._engine_call(self._run, np.ascontiguousarray(x))
        if y.shape[:2] != (x.shape[0], len(self.metadata.volume.depth_um)) or y.ndim != 4:
            raise BackendError(f"{self.name}: network returned shape {y.shape}")
        return y

    def renderer(self, shape: tuple[int, int]) -> Renderer:
        """Return the plane renderer of a volume model for one frame shape (kept for reuse)."""
        if self._psf is None or self.metadata.volume is None:
            raise BackendError(f"{self.metadata.name} is a per-plane model, not a volume model")
        r = self._renderers.pop(shape, None)
        if r is None:
            if len(self._renderers) >= MAX_CACHED_SHAPES:  # its threads stopped, as in close
                self._renderers.pop(next(iter(self._renderers))).close()
            threads = self.options.intra_op_threads or default_threads()
            r = Renderer(self._psf, np.asarray(self.metadata.volume.depth_um), shape, threads)
        self._renderers[shape] = r  # (re)inserted last: the least recently used goes first
        return r

    def refocus(
        self,
        frames: np.ndarray,
        plan: VolumePlan,
        offsets_um: np.ndarray | None = None,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> np.ndarray:
        """Refocus each frame onto every DPM of `plan`: (N, H, W) -> (N, P, H, W) of `dtype`.

        The frame-level call of the daemon and offline refocusing. `offsets_um` (N,) shifts
        every DPM of frame n by that many µm, e.g. minus the focus drift since the first frame,
        so the virtual planes stay at fixed depths in the sample. A volume model runs its
        network once per frame and renders the plan from the density (a plan of lattice
        planes straight into `dtype`: float16, what the daemon records, saves a cast of the
        whole stack; values beyond its range become inf); a per-plane model runs once per
        (frame, DPM) pair, and its float32 result is cast.
        """
        if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise ValueError(f"stacks are float16 or float32, not {np.dtype(dtype)}")
        frames = _check_array("frames", frames)
        if frames.ndim == 2:
            frames = frames[None]
        n = frames.shape[0]
        off = np.zeros(n) if offsets_um is None else np.asarray(offsets_um, dtype=np.float64)
        if off.shape != (n,) or not np.isfinite(off).all():
            raise ValueError(f"offsets_um must be {n} finite values, got {offsets_um!r}")
        if self.metadata.volume is not None and plan.z_um is not None:
            if frames.shape[1:] != plan.frame_shape:
                raise ValueError(
                    f"frames {frames.shape[1:]} do not match the plan's {plan.frame_shape}"
                )
            # uniform planes: rendered straight from the density, the DPMs never read (their
            # checks and per-plane uniformity test cost 15-25 ms of a 41 x 256² frame)
            z = np.asarray(plan.z_um, dtype=np.float64)
            # before any network pass, and in the words of `infer` (offsets shift the planes)
            self._check_volume_span(float(z.min() + off.min()), float(z.max() + off.max()))
            render = self.renderer(plan.frame_shape)
            stacks = []
            for i in range(n):
                # the network's own output buffer and the frame's std: the renderer scales
                # the density to counts as it copies each depth into its FFT grid
                density, std = self._normalised_density(frames[i])
                if self.options.point_fit is not None:  # the fit works in counts
                    density, std = self._fitted(density * std, frames[i], render), 1.0
                stacks.append(render.planes(density, frames[i], z + off[i], dtype, std))
            # one frame (the live worker's call): the renderer's own new array, no copy
            return stacks[0][None] if n == 1 else np.stack(stacks)
        out = np.empty((n, len(plan), *frames.shape[1:]), dtype=np.float32)
        for i in range(n):
            dpms = plan.dpms_um if off[i] == 0 else plan.dpms_um + np.float32(off[i])
            out[i] = self.infer(frames[i], dpms)
        if out.dtype == dtype:
            return out
        with np.errstate(over="ignore"):  # float16: beyond its range becomes inf, as above
            return out.astype(dtype)

    def _infer_volume(self, images: np.ndarray, dpms_um: np.ndarray) -> np.ndarray:
        """`infer` for volume models: one pass per frame, then each DPM rendered from it.

        Uniform DPMs on the depth lattice are rendered as planes together; any other surface
        is rendered on the grid planes it spans and interpolated per pixel.
        """
        frames = images if images.ndim == 3 else images[None]
        dpms = dpms_um if dpms_um.ndim == 3 else dpms_um[None]
        n = broadcast_count(frames, dpms)
        density = self.volume(frames)
        render = self.renderer((int(frames.shape[1]), int(frames.shape[2])))
        if self.options.point_fit is not None:
            fitted = [self._fitted(v, f, render) for v, f in zip(density, frames, strict=True)]
            density = np.stack(fitted)
        out = np.empty((n, *frames.shape[1:]), dtype=np.float32)
        for f in range(frames.shape[0]):
            which = range(n) if frames.shape[0] == 1 else [f]
            flat: list[int] = []
            for i in which:
                d = dpms[i if dpms.shape[0] > 1 else 0]
                if np.all(d == d.flat[0]):
                    flat.append(i)
                else:
                    out[i] = render.surface(density[f], frames[f], d)
            if flat:
                z = np.array([float(dpms[i if dpms.shape[0] > 1 else 0].flat[0]) for i in flat])
                out[flat] = render.planes(density[f], frames[f], z)
        return out

    def _fitted(self, density: np.ndarray, frame: np.ndarray, render: Renderer) -> np.ndarray:
        """`density` (counts) with its point-like blobs refitted to `frame` (`point_fit`)."""
        if self._psf is None or self.options.point_fit is None:  # not a volume model's call
            return density
        # a report reads one frame several times (planes, depths, surfaces): fit it once
        digest = hashlib.blake2b(np.ascontiguousarray(frame).tobytes(), digest_size=16)
        digest.update(repr(frame.shape).encode())
        key = digest.digest()
        if self._fit_memo is not None and self._fit_memo[0] == key:
            return self._fit_memo[1]
        fitted = fit_points(density, frame, render, self._psf, self.options.point_fit).density
        self._fit_memo = (key, fitted)
        return fitted

    def _normalised_density(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Return one frame's (D, H, W) normalised density and the frame's std.

        The density is a view of the backend's output, valid until its next call; the density
        in counts is the two multiplied.
        """
        h, w = frame.shape
        x, _, std = normalize_images(frame[None])
        y = self._run_volume(pad_to_multiple(x[:, None], self.metadata.size_multiple))
        return y[0, :, :h, :w], float(std[0, 0, 0])

    def _input_buffer(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """Return the reusable network-input buffer for `shape` (a few kept, least used dropped).

        Live calls repeat one shape; reusing its buffer spares a large allocation and its
        page faults per frame (about 10 ms of 41 × 512² on the development machine).
        """
        buf = self._inputs.pop(shape, None)
        if buf is None:
            if len(self._inputs) >= MAX_CACHED_SHAPES:
                self._inputs.pop(next(iter(self._inputs)))
            buf = np.empty(shape, dtype=np.float32)
        self._inputs[shape] = buf  # (re)inserted last: the least recently used goes first
        return buf

    def shape_problem(self, frame_shape: tuple[int, int], n_planes: int) -> str | None:
        """Why this backend cannot take `frame_shape` × `n_planes` at all, or None."""
        return None

    def is_incompatible(
        self, frame_shape: tuple[int, int], n_planes: int, rate_hz: float
    ) -> Literal[False] | str:
        """Check the shape, then time a few calls and compare with the requested rate."""
        if len(frame_shape) != 2 or min(frame_shape) < 1 or n_planes < 1 or rate_hz <= 0:
            return (
                f"invalid request: frame_shape {frame_shape}, n_planes {n_planes}, "
                f"rate_hz {rate_hz} (need positive sizes and rate)"
            )
        problem = self.shape_problem(frame_shape, n_planes)
        if problem:
            return problem
        seconds = self.time_call(frame_shape, n_planes)
        budget = 1.0 / rate_hz
        if seconds > budget:
            return (
                f"{self.name} on {self.device} takes {seconds * 1e3:.1f} ms per frame for "
                f"{n_planes} planes of {frame_shape[0]}×{frame_shape[1]} "
                f"(at most {1 / seconds:.1f} Hz), but {rate_hz:g} Hz needs ≤ {budget * 1e3:.1f} ms"
            )
        return False

    def time_call(
        self,
        frame_shape: tuple[int, int],
        n_planes: int,
        repeats: int = 3,
        budget_s: float = 2.0,
        dpms_um: np.ndarray | None = None,
        plan: VolumePlan | None = None,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> float:
        """Return the median seconds of one call for a frame (warmed up).

        With `plan`, the call is `refocus` onto it in `dtype` (what the live worker runs:
        surfaces cost a volume model more than lattice planes); else `infer` with `dpms_um`,
        or with `n_planes` uniform planes spread over the trained range.
        """
        rng = np.random.default_rng(0)
        image = rng.integers(90, 4000, size=frame_shape, dtype=np.uint16)
        call: Callable[[], object]
        if plan is not None:
            call = partial(self.refocus, image, plan, dtype=dtype)
        else:
            if dpms_um is None:
                lo, hi = self.metadata.dz_range_um
                dz = np.linspace(lo, hi, n_planes, dtype=np.float32)
                dpms: np.ndarray = np.broadcast_to(dz[:, None, None], (n_planes, *frame_shape))
            else:
                dpms = np.asarray(dpms_um, dtype=np.float32)
            call = partial(self.infer, image, dpms)
        call()
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < repeats and (not times or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def close(self) -> None:
        """Release resources: here a volume model's renderers.

        Their threads and FFT grids (hundreds of MB at 1024²); each backend releases its
        engine's own after calling this.
        """
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model_path}, precision={self.precision!r}, "
            f"device={self.device!r})"
        )
