"""ONNX → TensorRT engine builder (TensorRT 10 Python API), with shape profiles and caches.

The engine takes the ONNX model's float32 (N, C, H, W) input with one optimisation profile
spanning the plane batch (1 … max_batch) and the padded frame sizes asked for, FP16 or FP32
kernels, a timing cache shared by all builds on one GPU model, and the engine cache of
`engine.runtime._trt_cache`. It imports tensorrt, so `engine.runtime` reaches it lazily: as
`build_tensorrt_engine`, and from the TensorRT backend. cuda-python is imported on first use.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorrt as trt

from engine.files import atomic_write_bytes
from engine.metadata import ModelMetadata, file_sha256
from engine.runtime._base import DEFAULT_MAX_BATCH, INPUT_NAME
from engine.runtime._trt_cache import (
    CacheEntry,
    EngineCache,
    EngineKey,
    ShapeProfile,
    make_profile,
)

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 4 << 30
_LOGGER = trt.Logger(trt.Logger.WARNING)


@functools.cache
def cudart() -> Any:
    """Return the CUDA runtime bindings of cuda-python (new and old module layouts), once."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6.1 (the only layout from 13.0)
    except ImportError:
        from cuda import cudart as runtime  # type: ignore[no-redef]  # older cuda-python 12.x
    return runtime


def native_handle(obj: Any) -> int:
    """Return the address behind a cuda-python handle (a stream) as TensorRT takes it."""
    try:  # int(handle) is deprecated from cuda-bindings 12.9.1 / 13.0
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def cuda_check(result: Any) -> Any:
    """Unpack a cuda-python `(err, value...)` result, raising `RuntimeError` on a CUDA error."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name(device: int | None = None) -> str:
    """Return the model name of CUDA device `device` (default: current), a cache-key part."""
    rt = cudart()
    index = cuda_check(rt.cudaGetDevice()) if device is None else device
    props = cuda_check(rt.cudaGetDeviceProperties(index))
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).strip("\0 ")


def _load_timing_cache(config: Any, path: Path) -> None:
    """Attach the timing cache at `path` (empty when missing or unreadable) to `config`."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)  # None when the bytes are not a timing cache
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU/TensorRT; starting empty", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=True)


def _save_timing_cache(config: Any, path: Path) -> None:
    """Write the builder's updated timing cache to `path` atomically (workers build at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, bytes(memoryview(config.get_timing_cache().serialize())))


def build_engine(
    onnx_path: str | Path,
    profile: ShapeProfile,
    *,
    fp16: bool,
    timing_cache: Path | None = None,
    workspace_bytes: int = WORKSPACE_BYTES,
    input_name: str = INPUT_NAME,
) -> bytes:
    """Parse the ONNX model and build a serialized engine for `profile` (FP16 if `fp16`).

    The profile is set on `input_name` (the network's input; a whole-refocus graph of
    `engine.render_graph` has its static "frame" input, with min = opt = max).
    """
    onnx_path = Path(onnx_path)
    fp16_flag = getattr(trt.BuilderFlag, "FP16", None)
    if fp16 and fp16_flag is None:  # weakly typed precision flags are gone in TensorRT 11
        raise RuntimeError(
            f"TensorRT {trt.__version__} has no FP16 builder flag (removed in TensorRT 11); "
            "build with precision 'fp32' or install tensorrt 10.x"
        )
    builder = trt.Builder(_LOGGER)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, _LOGGER)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{onnx_path}: TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log.warning("this GPU has no fast FP16; building FP16 anyway")
        config.set_flag(fp16_flag)
    opt = builder.create_optimization_profile()
    opt.set_shape(input_name, profile.min_shape, profile.opt_shape, profile.max_shape)
    config.add_optimization_profile(opt)
    if timing_cache is not None:
        _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the log above)")
    if timing_cache is not None:
        _save_timing_cache(config, timing_cache)
    return bytes(memoryview(serialized))


def build_tensorrt_engine(
    onnx_path: str | Path,
    metadata: ModelMetadata,
    *,
    precision: str = "fp16",
    frame_shapes: Sequence[tuple[int, int]] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
) -> tuple[CacheEntry, EngineKey, bool]:
    """Return the cached engine for these options, building it first when missing (minutes).

    Parameters
    ----------
    onnx_path
        The exported model; its SHA-256 is part of the cache key.
    metadata
        The model's metadata (`onnx_metadata(onnx_path)`), stored beside the plan.
    precision
        "fp16" or "fp32" kernels.
    frame_shapes
        (height, width) frames the profile must cover; the first is the one kernels are tuned
        at (None: `DEFAULT_FRAME_SHAPES`).
    max_batch
        Most planes per call (the profile's batch maximum).
    cache_dir
        Engine cache directory (None: `default_cache_dir()`).
    rebuild
        Build even when the cache holds a plan for this key.

    Returns
    -------
    tuple[CacheEntry, EngineKey, bool]
        The cache entry, its key, and whether it was built now.

    Raises
    ------
    RuntimeError
        TensorRT cannot parse the model or build the engine, or CUDA fails.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"TensorRT precision must be 'fp32' or 'fp16', not {precision!r}")
    profile = make_profile(metadata, frame_shapes, max_batch)
    return cached_engine(
        onnx_path, metadata, profile, precision, EngineCache(cache_dir), rebuild=rebuild
    )


def cached_engine(
    onnx_path: str | Path,
    metadata: ModelMetadata,
    profile: ShapeProfile,
    precision: str,
    cache: EngineCache,
    *,
    input_name: str = INPUT_NAME,
    rebuild: bool = False,
) -> tuple[CacheEntry, EngineKey, bool]:
    """Return the cached engine of (ONNX, GPU, TensorRT, precision, profile), built if missing.

    Returns the cache entry, its key and whether it was built now. The profile is set on
    `input_name` (see `build_engine`).
    """
    onnx_path = Path(onnx_path)
    gpu = gpu_name()
    key = EngineKey(
        gpu=gpu,
        tensorrt=trt.__version__,
        onnx_sha256=file_sha256(onnx_path),
        precision=precision,
        min_shape=profile.min_shape,
        opt_shape=profile.opt_shape,
        max_shape=profile.max_shape,
    )
    found = None if rebuild else cache.lookup(key, metadata.name)
    if found is not None:
        log.info("engine cache hit: %s", found.plan)
        return found, key, False
    log.info("building TensorRT %s engine for %s on %s (minutes)", precision, onnx_path, gpu)
    plan = build_engine(
        onnx_path,
        profile,
        fp16=precision == "fp16",
        timing_cache=cache.timing_cache(gpu, trt.__version__),
        input_name=input_name,
    )
    return cache.store(key, metadata, plan, onnx_path), key, True
