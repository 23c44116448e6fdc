"""TensorRT backend: a cached engine on one CUDA stream, buffers bound once, pinned host memory.

Given an `.onnx`, the engine comes from the cache of `_trt_cache` (built by `_trt_build` on
first use, which takes minutes); given a cached `.plan`, it is loaded with the metadata beside
it. Device buffers are sized for the profile's largest input and bound once; each call copies
into pinned host memory, runs `execute_async_v3`, and copies back on the same stream. With
`cuda_graph=True` a call is captured as a CUDA graph once its input shape repeats, and replayed
while it stays.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import tensorrt as trt

from engine.dpm import VolumePlan
from engine.metadata import padded_shape
from engine.runtime._base import (
    INPUT_NAME,
    OUTPUT_NAME,
    BackendOptions,
    BaseBackend,
    _check_array,
    check_io_shapes,
    check_onnx_weights,
    cuda_index,
    io_channels,
    onnx_metadata,
)
from engine.runtime._protocol import BACKEND_PRECISIONS, BackendError
from engine.runtime._trt_build import (
    build_tensorrt_engine,
    cuda_check,
    cudart,
    gpu_name,
    native_handle,
)
from engine.runtime._trt_cache import plan_psf_beside, read_plan_info, serving_frame_shapes
from engine.runtime._trt_planes import PlanesEngine
from engine.volume import defocus_index

log = logging.getLogger(__name__)

_LOGGER = trt.Logger(trt.Logger.WARNING)

PLANES_ENGINES_KEPT = 4
"""Whole-refocus engines (`PlanesEngine`) a backend keeps: the most recently used.

Each holds GPU memory of its own (its activations, frame and planes: the planes of 41 × 2048²
alone are 690 MB), so a daemon whose planes are retuned through a day would otherwise hold one
per plan it ever ran until the GPU is full. Four let a user go back and forth between a few
plans without waiting; a plan pushed out comes back from the engine cache on disk (loaded in
seconds, not built again).
"""


class _Closable(Protocol):
    """Something holding resources until its `close` (a `PlanesEngine`: GPU memory)."""

    def close(self) -> None:
        """Free what it holds; it is not used again."""


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V", bound=_Closable)


_PlanesKey = tuple[tuple[int, int], tuple[float, ...]]
"""A whole-refocus engine's key: (frame shape, plane offsets µm)."""


class _UnreadablePlan(BackendError):
    """A plan file TensorRT cannot deserialize (cut short, or from another TensorRT)."""


def _host_array(ptr: int, count: int) -> np.ndarray:
    """Wrap `count` float32 values of pinned host memory at `ptr` as a numpy array (no copy)."""
    c_ptr = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(c_ptr, shape=(count,))


def _on_lattice(z_um: tuple[float, ...], depth_um: list[float] | tuple[float, ...]) -> bool:
    """Whether every plane lies on the model's depth lattice within its grid (else: host)."""
    try:
        defocus_index(np.asarray(z_um, dtype=np.float64), np.asarray(depth_um))
    except ValueError:
        return False
    return True


class _Recent(Generic[_K, _V]):
    """The `limit` most recently used values by key; a value pushed out is closed at once.

    The oldest is closed before a new value is made, so no more than `limit` values hold GPU
    memory at any time (a new engine is not allocated beside the one it replaces). Called from
    the backend's one calling thread (`Backend`), so unlocked.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self._values: OrderedDict[_K, _V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[_K]:
        """Return the kept keys, least recently used first."""
        return list(self._values)

    def get(self, key: _K, make: Callable[[], _V]) -> _V:
        """Return `key`'s value, made by `make` when not kept; a failing `make` keeps nothing."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        while len(self._values) >= self.limit:
            _, old = self._values.popitem(last=False)
            _close_quietly(old)
        value = self._values[key] = make()
        return value

    def clear(self) -> None:
        """Close every value, oldest first, and forget them."""
        while self._values:
            _, old = self._values.popitem(last=False)
            _close_quietly(old)


def _close_quietly(value: Any) -> None:
    """Close a value pushed out; its failure is said, not raised into the call that made room.

    A make that then fails has already cost the value it replaced: the rule that no more than
    `limit` hold GPU memory at once comes first.
    """
    try:
        value.close()
    except Exception as exc:  # a CUDA error freeing old buffers is not the new plan's failure
        log.warning("closing a TensorRT whole-refocus engine failed: %s", exc)


class TensorRTBackend(BaseBackend):
    """Runs a TensorRT engine built from the exported ONNX (FP16 or FP32) on one CUDA device."""

    name = "tensorrt"
    supported_precisions = BACKEND_PRECISIONS["tensorrt"]

    def __init__(self, model_path: Path, options: BackendOptions) -> None:
        self._rt = cudart()
        self._check = cuda_check
        self._device_index = self._select_device(options.device)
        if options.precision == "auto":  # fp16 changes results more than 1 %: asked for, not auto
            options = replace(options, precision="fp32")
        if options.precision not in self.supported_precisions:  # skipped, not a crash
            raise BackendError(
                f"tensorrt supports precision {self.supported_precisions}, "
                f"not {options.precision!r}"
            )
        rebuild: Callable[[bool], tuple[Path, bool]] | None = None  # for a cached plan
        psf_beside = model_path
        if model_path.suffix == ".onnx":
            metadata = onnx_metadata(model_path)
            check_onnx_weights(model_path)  # as every CPU backend: not minutes of build first
            frames = serving_frame_shapes(metadata, options.frame_shape)

            def build(rebuild: bool) -> tuple[Path, bool]:
                try:
                    entry, _, built = build_tensorrt_engine(
                        model_path,
                        metadata,
                        precision=options.precision,
                        frame_shapes=frames,
                        max_batch=options.max_batch,
                        cache_dir=options.cache_dir,
                        rebuild=rebuild,
                    )
                except RuntimeError as exc:
                    raise BackendError(str(exc)) from exc
                log.info("tensorrt engine %s (%s)", entry.plan, "built now" if built else "cached")
                return entry.plan, built

            plan_path, built = build(rebuild=False)
            if not built:
                rebuild = build
        elif model_path.suffix in (".plan", ".engine"):
            try:
                _, metadata = read_plan_info(model_path)
            except (FileNotFoundError, ValueError, KeyError) as exc:
                raise BackendError(f"{model_path}: cannot read engine metadata: {exc}") from exc
            plan_path = model_path
            psf_beside = plan_psf_beside(model_path, metadata)  # beside the ONNX it came from
        else:
            raise BackendError(f"{model_path}: tensorrt needs an .onnx or a cached .plan")
        # the served plan sits in the engine cache; a volume model's PSF bank beside its ONNX
        super().__init__(plan_path, metadata, options, psf_beside=psf_beside)
        # a volume model given as ONNX can also be built whole (network + render) per plan
        self._network_onnx = model_path if model_path.suffix == ".onnx" else None
        # whole-refocus engines per (frame shape, planes), the few most recently used, and
        # the keys whose engine failed to build (a few floats each: kept, never retried)
        self._planes: _Recent[_PlanesKey, PlanesEngine] = _Recent(PLANES_ENGINES_KEPT)
        self._planes_failed: set[_PlanesKey] = set()
        try:
            self._setup_engine(plan_path)
        except _UnreadablePlan:
            if rebuild is None:
                raise
            # a cached plan cut short (a power loss before the disk had it all) would turn
            # TensorRT off for good, the cache serving it again at every start: built anew once
            log.warning("%s: cached TensorRT plan cannot be read; rebuilding it", plan_path)
            plan_path, _ = rebuild(True)
            self._setup_engine(plan_path)

    def refocus(
        self,
        frames: np.ndarray,
        plan: VolumePlan,
        offsets_um: np.ndarray | None = None,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> np.ndarray:
        """`Backend.refocus`; a volume model's uniform planes run as one whole-refocus engine.

        For a plan of uniform planes without drift offsets, the frame goes in and the planes
        come out of one engine (`PlanesEngine`, built per frame shape and plan on first use);
        the density never leaves the GPU. The `PLANES_ENGINES_KEPT` most recently used plans
        keep their engines; an older one's is closed, its GPU memory freed. Anything else
        (surfaces, drift, a model loaded from a .plan without its ONNX, the point fit) takes
        the shared path: network here, render on the host.
        """
        if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.float32)):
            return super().refocus(frames, plan, offsets_um, dtype)  # its checks say why
        off = None if offsets_um is None else np.asarray(offsets_um, dtype=np.float64)
        n_frames = 1 if np.ndim(frames) == 2 else int(np.shape(frames)[0])
        if off is not None and off.shape != (n_frames,):
            return super().refocus(frames, plan, offsets_um, dtype)  # its checks say why
        whole = (
            self.metadata.volume is not None
            and plan.z_um is not None
            and self._network_onnx is not None
            and self._psf is not None
            and (off is None or not off.any())
            and self.options.point_fit is None  # the fit runs on the host, between the two
            # float16 kernels would overflow on raw counts (their variance, the DFT sums)
            and self.precision == "fp32"
            and _on_lattice(plan.z_um, self.metadata.volume.depth_um)
        )
        if not whole:
            return super().refocus(frames, plan, offsets_um, dtype)
        frames = _check_array("frames", frames)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.shape[1:] != plan.frame_shape:
            return super().refocus(frames, plan, offsets_um, dtype)  # its check says why
        assert plan.z_um is not None and self._network_onnx is not None and self._psf is not None
        key = (plan.frame_shape, plan.z_um)
        if key in self._planes_failed:
            return super().refocus(frames, plan, offsets_um, dtype)
        make = functools.partial(
            PlanesEngine,
            self._network_onnx,
            self.metadata,
            self._psf,
            plan.frame_shape,
            plan.z_um,
            precision=self.precision,
            cache_dir=self.options.cache_dir,
        )
        try:
            engine = self._planes.get(key, make)
        except (RuntimeError, ValueError, MemoryError) as exc:
            # remembered: not a minutes-long build tried again on every frame; the shared
            # path (network here, render on the host) serves this plan instead. ValueError:
            # onnx refuses to save a graph over protobuf's 2 GB (the PSF bank's transform is
            # a constant of it: frames above about 2300² pass that, review 68)
            log.warning("tensorrt whole-refocus engine failed (%s); using the host render", exc)
            self._planes_failed.add(key)
            return super().refocus(frames, plan, offsets_um, dtype)
        # copied out of the engine's buffer: the caller may still be sending the last result
        # (the worker's zero-copy send) when the next frame runs
        out = np.empty((frames.shape[0], len(plan), *plan.frame_shape), dtype=dtype)
        with np.errstate(over="ignore"):  # float16: beyond its range becomes inf
            for i, frame in enumerate(frames):
                out[i] = self._engine_call(engine.run, frame)
        return out

    def _select_device(self, device: str | None) -> int:
        """Make the CUDA device named by `device` ("cuda", "cuda:N", None) current."""
        index = cuda_index(device or "cuda")
        if index is None:
            raise BackendError(f"tensorrt runs on CUDA only, not device {device!r}")
        try:
            count = self._check(self._rt.cudaGetDeviceCount())
        except RuntimeError as exc:
            raise BackendError(f"tensorrt: no usable CUDA device ({exc})") from exc
        if index >= count:
            raise BackendError(f"tensorrt: CUDA device {index} requested, {count} present")
        self._check(self._rt.cudaSetDevice(index))
        return index

    def _setup_engine(self, plan_path: Path) -> None:
        """Deserialize the plan, allocate max-size buffers once and bind them."""
        self._runtime = trt.Runtime(_LOGGER)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise _UnreadablePlan(f"{plan_path}: TensorRT cannot deserialize this engine")
        self._bind(plan_path)

    def _bind(self, plan_path: Path) -> None:
        """Check the engine's tensors, make its context, allocate max-size buffers, bind them.

        What was allocated is freed again if a later step fails (the backend is then skipped
        and the next one tried: a volume model's buffers can be gigabytes).
        """
        rt = self._rt
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if sorted(names) != sorted([INPUT_NAME, OUTPUT_NAME]):
            raise BackendError(f"{plan_path}: engine tensors are {names}, need input and output")

        # the buffers below are sized from the metadata's channels: an engine whose own
        # channels differ (a plan beside another model's side file) would write past them
        def dims(name: str) -> list[int | str | None]:
            return [int(d) if d >= 0 else None for d in self._engine.get_tensor_shape(name)]

        check_io_shapes(
            [(INPUT_NAME, dims(INPUT_NAME))],
            [(OUTPUT_NAME, dims(OUTPUT_NAME))],
            str(plan_path),
            self.metadata,
        )
        dtypes = [self._engine.get_tensor_dtype(n) for n in names]
        if any(d != trt.DataType.FLOAT for d in dtypes):  # the buffers below are float32
            raise BackendError(f"{plan_path}: engine tensors {names} are {dtypes}, need float32")
        lo, _, hi = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.min_shape = tuple(int(v) for v in lo)
        self.max_shape = tuple(int(v) for v in hi)
        self.max_batch = min(self.max_batch, self.max_shape[0])
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{plan_path}: TensorRT cannot create an execution context")
        # per-plane models: (N, 2, H, W) in, (N, 1, H, W) out; volume models: 1 in, D out
        self._cin, self._cout = io_channels(self.metadata)
        in_count = int(np.prod(self.max_shape))
        out_count = in_count // self._cin * self._cout
        made: list[tuple[Callable[[Any], Any], Any]] = []  # (free, handle), to undo on failure
        try:
            self._d_in = self._check(rt.cudaMalloc(in_count * 4))
            made.append((rt.cudaFree, self._d_in))
            self._d_out = self._check(rt.cudaMalloc(out_count * 4))
            made.append((rt.cudaFree, self._d_out))
            self._h_in_ptr = self._check(rt.cudaMallocHost(in_count * 4))
            made.append((rt.cudaFreeHost, self._h_in_ptr))
            self._h_out_ptr = self._check(rt.cudaMallocHost(out_count * 4))
            made.append((rt.cudaFreeHost, self._h_out_ptr))
            self._stream = self._check(rt.cudaStreamCreate())
        except BaseException:
            for free, handle in reversed(made):
                free(handle)
            raise
        self._h_in = _host_array(self._h_in_ptr, in_count)
        self._h_out = _host_array(self._h_out_ptr, out_count)
        self._stream_handle = native_handle(self._stream)
        self._context.set_tensor_address(INPUT_NAME, int(self._d_in))
        self._context.set_tensor_address(OUTPUT_NAME, int(self._d_out))
        # one graph, for the current input shape: a graph replays the context state it was
        # captured in, and set_input_shape changes that state (NVIDIA/TensorRT#3798)
        self._graph: Any | None = None
        self._use_graphs = self.options.cuda_graph
        self._shape: tuple[int, ...] | None = None
        self._ran_plain = False  # a plain run at self._shape since it was set
        self.device = f"cuda:{self._device_index} {gpu_name(self._device_index)}"

    def shape_problem(self, frame_shape: tuple[int, int], n_planes: int) -> str | None:
        """Say why `frame_shape` lies outside the engine's profile (planes are split, so fit)."""
        h, w = padded_shape(*frame_shape, self.metadata.size_multiple)
        lo, hi = self.min_shape, self.max_shape
        if not (lo[2] <= h <= hi[2] and lo[3] <= w <= hi[3]):
            return (
                f"frame {frame_shape} (padded {h}×{w}) is outside the TensorRT engine's profile "
                f"{lo[2]}×{lo[3]} … {hi[2]}×{hi[3]}; rebuild with "
                f"`python -m export tensorrt --frame-shape {frame_shape[0]} {frame_shape[1]}`"
            )
        return None

    def _input_buffer(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """Let `infer` prepare the input straight in pinned host memory when one call takes it.

        That saves a host copy of the whole input per frame (86 MB for 41 × 512²); `_run` sees
        the input already at the pinned buffer's start and only queues the upload. Not for a
        frame that must be padded: `infer` then runs a padded copy, which `_run` writes over
        the pinned buffer, and a frozen plan's DPMs, written once and reused from the buffer
        `infer` was given, would be read back as the last frame's padded input.
        """
        count = int(np.prod(shape))
        unpadded = padded_shape(*shape[2:], self.metadata.size_multiple) == shape[2:]
        if unpadded and shape[0] <= self.max_batch and count <= self._h_in.size:
            return self._h_in[:count].reshape(shape)
        return super()._input_buffer(shape)

    def _enqueue(self, nbytes_in: int, nbytes_out: int) -> None:
        """Queue copy-in, execute and copy-out on the stream."""
        rt = self._rt
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(rt.cudaMemcpyAsync(self._d_in, self._h_in_ptr, nbytes_in, h2d, self._stream))
        if not self._context.execute_async_v3(self._stream_handle):
            raise BackendError("tensorrt: execute_async_v3 failed")
        self._check(rt.cudaMemcpyAsync(self._h_out_ptr, self._d_out, nbytes_out, d2h, self._stream))

    def _capture(self, nbytes_in: int, nbytes_out: int) -> Any | None:
        """Capture one call as an instantiated CUDA graph; None (graphs off) if capture fails."""
        rt = self._rt
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        graph = None
        try:
            self._check(rt.cudaStreamBeginCapture(self._stream, mode))
            try:
                self._enqueue(nbytes_in, nbytes_out)
            finally:  # always leave capture mode, or the stream stays unusable
                graph = self._check(rt.cudaStreamEndCapture(self._stream))
            return self._check(rt.cudaGraphInstantiate(graph, 0))  # CUDA 12: (graph, flags)
        except RuntimeError as exc:  # CUDA errors and BackendError from the enqueue
            log.warning("CUDA graph capture failed, running without graphs: %s", exc)
            self._use_graphs = False
            return None
        finally:
            if graph is not None:
                rt.cudaGraphDestroy(graph)

    def _drop_graph(self) -> None:
        """Destroy the captured graph (its shape or context state no longer holds)."""
        if self._graph is not None:
            self._rt.cudaGraphExecDestroy(self._graph)
            self._graph = None

    def _engine_call(self, run: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """`BaseBackend._engine_call`, on this backend's GPU whichever thread calls.

        The CUDA runtime's current device is per thread: offline refocusing shares one backend
        between dask threads (under a lock), whose current device is 0 unless set (review 75).
        """
        self._check(self._rt.cudaSetDevice(self._device_index))
        return super()._engine_call(run, x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Upload `x` (from pinned memory), run (or replay the graph) and return the output."""
        n, _, h, w = x.shape
        if not (self.min_shape[2] <= h <= self.max_shape[2]) or not (
            self.min_shape[3] <= w <= self.max_shape[3]
        ):
            raise ValueError(
                f"padded frame {h}×{w} is outside the TensorRT profile "
                f"{self.min_shape[2:]} … {self.max_shape[2:]}"
            )
        shape = tuple(x.shape)
        if shape != self._shape:
            self._drop_graph()
            self._ran_plain = False
            if not self._context.set_input_shape(INPUT_NAME, shape):
                self._shape = None
                raise BackendError(f"tensorrt: input shape {shape} rejected by the engine")
            self._shape = shape
        if x.ctypes.data != self._h_in_ptr:  # not prepared in place (padded or split)
            self._h_in[: x.size] = x.ravel()
        nbytes_in, nbytes_out = x.nbytes, x.nbytes // self._cin * self._cout
        # TensorRT needs one plain run after a shape change before capture; alternating
        # shapes (a remainder chunk) therefore run plain instead of recapturing every call
        if self._use_graphs and self._graph is None and self._ran_plain:
            self._graph = self._capture(nbytes_in, nbytes_out)
        if self._graph is not None:
            self._check(self._rt.cudaGraphLaunch(self._graph, self._stream))
        else:
            self._enqueue(nbytes_in, nbytes_out)
        self._check(self._rt.cudaStreamSynchronize(self._stream))
        self._ran_plain = True
        return self._h_out[: n * self._cout * h * w].reshape(n, self._cout, h, w)

    def close(self) -> None:
        """Free the graph, buffers and the stream (after its pending work); drop the engine."""
        super().close()
        self._planes.clear()  # closes each whole-refocus engine
        rt = self._rt
        rt.cudaStreamSynchronize(self._stream)  # a failed call may have left copies queued
        self._drop_graph()
        rt.cudaStreamDestroy(self._stream)
        rt.cudaFree(self._d_in)
        rt.cudaFree(self._d_out)
        rt.cudaFreeHost(self._h_in_ptr)
        rt.cudaFreeHost(self._h_out_ptr)
        del self._context, self._engine, self._runtime
