"""ONNX Runtime backend: the CPU engine here, and the CUDA execution provider where present.

The session is tuned for one caller streaming same-shaped batches: all graph optimisations
(conv + activation fusion, NCHWc layouts on x86), sequential execution, a fixed intra-op
thread count, and I/O binding into output buffers kept per shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.runtime._base import (
    MAX_CACHED_SHAPES,
    BackendOptions,
    BaseBackend,
    check_io_shapes,
    check_onnx_weights,
    cuda_index,
    default_threads,
    io_channels,
    metadata_from_props,
    require_onnx,
)
from engine.runtime._protocol import BACKEND_PRECISIONS, BackendError

log = logging.getLogger(__name__)

_GPU_PROVIDERS = ("CUDAExecutionProvider",)
"""GPU providers used when present. ORT's TensorRT provider is left out on purpose: it rebuilds
engines per input shape unless configured; the `tensorrt` backend is the TensorRT path."""


def session_options(threads: int) -> ort.SessionOptions:
    """Session options for low-latency streaming inference with `threads` intra-op threads."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # trained weights make tiny activations; denormal arithmetic is ~100x slower on x86
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    # no busy-waiting between ops: the worker shares its cores with the hook, recorder and
    # display, and spinning threads lose time slices to them (measured 10-20 % slower here)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _providers(device: str | None) -> list[str | tuple[str, dict[str, int]]]:
    """Choose execution providers for `device` ("cpu", "cuda", "cuda:N"; None: best here).

    A GPU provider is given the device's index (`device_id`): without it ONNX Runtime runs on
    GPU 0 whatever "cuda:N" says.
    """
    available = ort.get_available_providers()
    index = cuda_index(device) if device is not None else 0
    if device is not None and device != "cpu" and index is None:
        raise BackendError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if device != "cpu":
        gpu = [p for p in _GPU_PROVIDERS if p in available]
        if gpu:
            return [*((p, {"device_id": index or 0}) for p in gpu), "CPUExecutionProvider"]
        if device is not None:
            raise BackendError(
                f"onnxruntime has no CUDA provider here (available: {available}); "
                "install onnxruntime-gpu or use device='cpu'"
            )
    return ["CPUExecutionProvider"]


def _session(
    model_path: Path,
    threads: int,
    providers: list[str | tuple[str, dict[str, int]]],
    device: str | None,
) -> ort.InferenceSession:
    """Start a session on `providers`; one `BackendError` line when it cannot start.

    ONNX Runtime's own fallback is off: it prints to stdout and goes on on the CPU, so a
    "cuda:1" past the GPUs present ran on the CPU unsaid. A named CUDA device that cannot start
    is refused; with no device named, the CPU is taken instead, said as a warning.
    """
    try:  # ORT raises its own Fail/InvalidProtobuf/... types
        return ort.InferenceSession(
            str(model_path),
            sess_options=session_options(threads),
            providers=providers,
            enable_fallback=0,
        )
    except Exception as exc:
        why = " ".join(str(exc).split())
        if len(providers) == 1:  # the CPU alone
            raise BackendError(f"{model_path}: not a loadable ONNX model: {why}") from exc
        if device is not None:
            raise BackendError(f"onnxruntime cannot run on {device!r}: {why}") from exc
        log.warning("onnxruntime: the CUDA provider did not start (%s); the CPU instead", why)
        return _session(model_path, threads, ["CPUExecutionProvider"], None)


class OnnxRuntimeBackend(BaseBackend):
    """Runs an exported Deep-Z ONNX model with ONNX Runtime; metadata comes from the file."""

    name = "onnxruntime"
    supported_precisions = BACKEND_PRECISIONS["onnxruntime"]

    def __init__(self, model_path: Path, options: BackendOptions) -> None:
        require_onnx(model_path, self.name)
        threads = options.intra_op_threads or default_threads()
        session = _session(model_path, threads, _providers(options.device), options.device)
        check_onnx_weights(model_path)
        source = str(model_path)
        metadata = metadata_from_props(session.get_modelmeta().custom_metadata_map, source)
        check_io_shapes(
            [(i.name, list(i.shape)) for i in session.get_inputs()],
            [(o.name, list(o.shape)) for o in session.get_outputs()],
            source,
            metadata,
        )
        super().__init__(model_path, metadata, options)
        self._session = session
        self._input = session.get_inputs()[0]
        self._output = session.get_outputs()[0]
        if self._input.type != "tensor(float)" or self._output.type != "tensor(float)":
            raise BackendError(
                f"{source}: input and output must be float32, they are "
                f"{self._input.type} and {self._output.type}"
            )
        used = session.get_providers()[0]
        on_gpu = used in _GPU_PROVIDERS
        if options.device not in (None, "cpu") and not on_gpu:  # never silently on the CPU
            raise BackendError(f"onnxruntime: {options.device!r} asked, the session runs on {used}")
        self._gpu_index = int(session.get_provider_options()[used]["device_id"]) if on_gpu else 0
        self.device = f"cuda:{self._gpu_index} ({used})" if on_gpu else f"cpu ({threads} threads)"
        self._on_gpu = on_gpu
        self._binding = session.io_binding()
        self._out_channels = io_channels(metadata)[1]
        self._outputs: dict[tuple[int, ...], np.ndarray] = {}
        log.info("onnxruntime: %s on %s", model_path, self.device)

    def _output_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """Return the reusable output array for input `shape` (a few kept, oldest dropped)."""
        buf = self._outputs.get(shape)
        if buf is None:
            if len(self._outputs) >= MAX_CACHED_SHAPES:
                self._outputs.pop(next(iter(self._outputs)))
            buf = np.empty((shape[0], self._out_channels, *shape[2:]), dtype=np.float32)
            self._outputs[shape] = buf
        return buf

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Bind `x` in place and the cached output buffer, run, return the output."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        binding = self._binding
        if self._on_gpu:
            binding.bind_cpu_input(self._input.name, x)
            binding.bind_output(self._output.name, "cuda", self._gpu_index)
            self._session.run_with_iobinding(binding)
            out: np.ndarray = binding.copy_outputs_to_cpu()[0]
            return out
        y = self._output_buffer(x.shape)
        binding.bind_input(self._input.name, "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
        binding.bind_output(self._output.name, "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
        self._session.run_with_iobinding(binding)
        return y

    def close(self) -> None:
        """Drop the session and the buffers."""
        super().close()
        self._outputs.clear()
        del self._binding
        del self._session
