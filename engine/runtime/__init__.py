"""Inference backends behind one `Backend` protocol, `load_backend` which picks one, engine cache.

Importing this package imports numpy and pydantic only: tensorrt, openvino, onnxruntime and
torch are imported by the one module of the backend that is actually built, so the live daemon
never pulls torch in. The TensorRT engine cache (`EngineCache`, `read_plan_info`) lives here
too, beside the backend that loads its plans; `session_options` (onnxruntime) and
`build_tensorrt_engine` (tensorrt) import their library on first access (PEP 562).

Examples
--------
>>> from engine.runtime import load_backend
>>> backend = load_backend()  # shipped model, fastest backend available here
>>> planes = backend.infer(frame, dpms_um)  # (H, W) counts, (N, H, W) µm -> (N, H, W) float32
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.metadata import Modality
from engine.point_fit import PointFit
from engine.runtime._base import (
    DEFAULT_MAX_BATCH,
    INPUT_NAME,
    MAX_DPM_UM,
    OUTPUT_NAME,
    BackendOptions,
    BaseBackend,
    depth_limits,
    onnx_metadata,
)
from engine.runtime._protocol import BACKEND_PRECISIONS, Backend, BackendError, Precision
from engine.runtime._trt_cache import (
    CacheEntry,
    EngineCache,
    EngineKey,
    ShapeProfile,
    default_cache_dir,
    make_profile,
    plan_psf_beside,
    read_plan_info,
    serving_frame_shapes,
)

if TYPE_CHECKING:
    from engine.runtime._onnxruntime import session_options
    from engine.runtime._trt_build import build_tensorrt_engine

_LAZY = {
    "session_options": "engine.runtime._onnxruntime",
    "build_tensorrt_engine": "engine.runtime._trt_build",
}
"""Public names whose module imports a heavy library, imported on first access."""

__all__ = [
    "BACKENDS",
    "BACKEND_PRECISIONS",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MODEL",
    "INPUT_NAME",
    "MAX_DPM_UM",
    "OUTPUT_NAME",
    "Backend",
    "BackendError",
    "BackendName",
    "BackendOptions",
    "BackendSpec",
    "BaseBackend",
    "CacheEntry",
    "EngineCache",
    "EngineKey",
    "Precision",
    "ShapeProfile",
    "available_backends",
    "build_tensorrt_engine",
    "default_cache_dir",
    "depth_limits",
    "load_backend",
    "make_profile",
    "onnx_metadata",
    "plan_psf_beside",
    "read_plan_info",
    "select",
    "serving_frame_shapes",
    "session_options",
]

log = logging.getLogger(__name__)

BackendName = Literal["tensorrt", "openvino", "onnxruntime", "torch"]
"""The backends of `BACKENDS`, by name (config files choose among these)."""

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "deepz-slim.onnx"
"""The shipped model, used when `load_backend` is given none."""


def _installed(*modules: str) -> Callable[[], bool]:
    """Return a check that all `modules` can be found (without importing them)."""

    def check() -> bool:
        return all(importlib.util.find_spec(m) is not None for m in modules)

    return check


@dataclass(frozen=True)
class BackendSpec:
    """One registry row: a backend's name, where its class lives and whether it can load here."""

    name: str
    module: str
    class_name: str
    is_available: Callable[[], bool]
    install_hint: str

    def load_class(self) -> Callable[[Path, BackendOptions], Backend]:
        """Import the backend's module (and its heavy library) and return its class."""
        cls: Callable[[Path, BackendOptions], Backend] = getattr(
            importlib.import_module(self.module), self.class_name
        )
        return cls


# ORDER MATTERS FOR "auto" SELECTION: fastest first.
BACKENDS: list[BackendSpec] = [
    BackendSpec(
        "tensorrt",
        "engine.runtime._tensorrt",
        "TensorRTBackend",
        _installed("tensorrt", "cuda"),
        "tensorrt or cuda-python is not installed (pip install 'deepz-live[gpu]' on CUDA)",
    ),
    BackendSpec(
        "openvino",
        "engine.runtime._openvino",
        "OpenVinoBackend",
        _installed("openvino", "onnx"),
        "openvino is not installed (pip install 'deepz-live[openvino]')",
    ),
    BackendSpec(
        "onnxruntime",
        "engine.runtime._onnxruntime",
        "OnnxRuntimeBackend",
        _installed("onnxruntime"),
        "onnxruntime is not installed (pip install onnxruntime)",
    ),
    BackendSpec(
        "torch",
        "engine.runtime._torch",
        "TorchBackend",
        _installed("torch"),
        "torch is not installed (pip install 'deepz-live[train]')",
    ),
]


def available_backends() -> list[str]:
    """Names of the backends whose libraries are installed here, in selection order."""
    return [spec.name for spec in BACKENDS if spec.is_available()]


def _ordered(prefer: Sequence[str] | None) -> list[BackendSpec]:
    """Registry rows in the order `prefer` gives (all of them, in registry order, for None)."""
    by_name = {spec.name: spec for spec in BACKENDS}
    if prefer is None:
        return list(BACKENDS)
    if isinstance(prefer, str):
        prefer = [prefer]
    unknown = [p for p in prefer if p not in by_name]
    if unknown or not prefer:
        raise ValueError(f"prefer must list backends from {list(by_name)}, got {list(prefer)}")
    return [by_name[p] for p in prefer]


def select(prefer: Sequence[str] | None = None) -> tuple[BackendSpec, dict[str, str]]:
    """Pick the first backend of `prefer` (default: all, fastest first) installed here.

    Returns the chosen spec and, for each backend passed over, why. Raises `BackendError`
    when none is installed.
    """
    reasons: dict[str, str] = {}
    for spec in _ordered(prefer):
        if spec.is_available():
            return spec, reasons
        reasons[spec.name] = spec.install_hint
    raise BackendError(f"no inference backend available: {reasons}")


def load_backend(
    model: str | Path | None = None,
    prefer: Sequence[str] | None = None,
    *,
    precision: Precision = "fp32",
    intra_op_threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    device: str | None = None,
    frame_shape: tuple[int, int] | None = None,
    cache_dir: str | Path | None = None,
    cuda_graph: bool = False,
    render_modality: Modality | None = None,
    psf_bank: str | Path | None = None,
    point_fit: PointFit | None = None,
) -> Backend:
    """Build the first backend of `prefer` that works here on `model`, logging why others didn't.

    Parameters
    ----------
    model
        An exported `.onnx` (all backends; torch uses the `.pt` beside it), a `.pt` (torch) or a
        TensorRT `.plan`/`.engine` with its `.json` metadata beside it. None: the shipped model.
    prefer
        Backend names to try, in order; None tries all, fastest first.
    precision
        "fp32"; "bf16" (OpenVINO on CPUs with AVX-512-BF16 / AMX); "fp16" (TensorRT, torch on a
        GPU); "auto": each backend's fastest about 1 % from fp32 (bf16 where OpenVINO can,
        else fp32). A backend that cannot honour the precision is skipped.
    intra_op_threads
        CPU threads for onnxruntime and torch (None: all cores this process may use).
    max_batch
        Planes per network call (larger requests are split); the TensorRT profile's maximum.
    device
        "cpu", "cuda" or "cuda:N"; None picks the best one each backend has.
    frame_shape
        The camera's (height, width): TensorRT tunes its kernels for it and accepts frames up
        to it (None: a profile from 256² to 1024²).
    cache_dir
        Where TensorRT engines are cached (default `~/.cache/deepz-live/engines`).
    cuda_graph
        TensorRT: capture each input shape once as a CUDA graph and replay it.
    render_modality
        Volume models: "widefield" or "confocal" planes (cross-modality: wide-field in,
        confocal-like out) from the same density; None: the model's own PSF bank.
    psf_bank
        Volume models: render the planes through this measured PSF bank (.npy, written by
        `python -m engine.psf_calibration` from a bead slide) instead of the model's own: the
        density is the network's, the PSF the microscope's. Wide-field only.
    point_fit
        Volume models: refit the density's point-like blobs (beads) to the frame through that
        bank before rendering (`engine.point_fit`; ``PointFit()`` for its defaults): beads
        sharper and better placed, at about a second per 256² frame — offline refocusing
        and evaluation, not the live path. Wide-field only.

    Raises
    ------
    BackendError
        No backend could load `model`; the message gives each one's reason.
    """
    path = Path(model) if model is not None else DEFAULT_MODEL
    try:
        if path.is_dir():
            raise BackendError(f"{path}: is a folder, not a model file")
        if not path.is_file():
            raise BackendError(f"{path}: model file not found")
    except OSError as exc:  # a folder on the way that this user may not enter
        raise BackendError(f"{path}: cannot read the model file: {exc.strerror or exc}") from None
    options = BackendOptions(
        precision=precision,
        intra_op_threads=intra_op_threads,
        max_batch=max_batch,
        device=device,
        frame_shape=frame_shape,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        cuda_graph=cuda_graph,
        render_modality=render_modality,
        psf_bank=Path(psf_bank) if psf_bank is not None else None,
        point_fit=point_fit,
    )
    reasons: dict[str, str] = {}
    failed: set[str] = set()  # installed, and could not load this model: said as a warning
    for spec in _ordered(prefer):
        if not spec.is_available():
            reasons[spec.name] = spec.install_hint
            continue
        failed.add(spec.name)
        try:
            backend = spec.load_class()(path, options)
        except BackendError as exc:
            reasons[spec.name] = str(exc)
            continue
        except ImportError as exc:
            reasons[spec.name] = f"import failed: {exc}"
            continue
        except OSError as exc:  # a shared library missing, or a cache folder not writable
            reasons[spec.name] = f"{type(exc).__name__}: {exc}"
            continue
        except RuntimeError as exc:  # a CUDA / driver fault while building
            reasons[spec.name] = f"{type(exc).__name__}: {exc}"
            continue
        for name, why in reasons.items():
            # a backend that is not installed is a choice; one that failed on this model
            # is news: the model is served by another than the one asked for first
            level = logging.WARNING if name in failed else logging.INFO
            log.log(level, "backend %s skipped: %s", name, why)
        log.info("backend %s chosen: %r", spec.name, backend)
        return backend
    details = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    raise BackendError(f"{path}: no backend could load this model ({details})")


def __getattr__(name: str) -> Any:
    """Import `session_options` or `build_tensorrt_engine` on first use (PEP 562).

    Raises
    ------
    ImportError
        The name's library (onnxruntime, tensorrt) is not installed here.
    AttributeError
        The package has no attribute `name`.
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine.runtime' has no attribute {name!r}")
