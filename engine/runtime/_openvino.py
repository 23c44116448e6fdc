"""OpenVINO backend: the faster CPU engine (1.1-1.9x ONNX Runtime here, see benchmarks/engine.py).

It compiles the exported ONNX once for the CPU with dynamic planes/height/width, one inference
stream and a fixed thread count (latency, not throughput: the live worker sends one frame at a
time). OpenVINO does not carry the ONNX `metadata_props` over, so the Deep-Z metadata is read
from the file by `onnx_metadata` (weights left on disk).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import openvino as ov

from engine.runtime._base import (
    BackendOptions,
    BaseBackend,
    check_io_shapes,
    check_onnx_weights,
    default_threads,
    onnx_metadata,
    require_onnx,
)
from engine.runtime._protocol import BACKEND_PRECISIONS, BackendError

log = logging.getLogger(__name__)


def compile_options(threads: int, precision: str = "fp32") -> dict[str, object]:
    """CPU plugin settings for one caller streaming same-shaped batches on `threads` cores.

    ``precision`` "bf16" runs convolutions in bfloat16 (AVX-512-BF16 / AMX): measured on 2
    EPYC cores for the volume model, 1.7x (256²) to 1.9x (512²) faster than float32, with
    a density about 1 % from float32's (relative L1 0.8-1.2 %, the largest voxel 0.7-1.7 %;
    bead depths the same: tests/test_shipped_volume.py; trained under bfloat16 autocast).
    """
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        # as the other backends do: trained weights make denormal activations, ~100x slower
        "CPU_DENORMALS_OPTIMIZATION": True,
        # the worker shares its cores with the hook, recorder and display: do not pin threads
        "ENABLE_CPU_PINNING": False,
    }


def _cuda_for_onnxruntime() -> bool:
    """Whether onnxruntime here has its CUDA provider (then the GPU beats this CPU backend)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _dims(partial_shape: ov.PartialShape) -> list[int | str | None]:
    """Return an OpenVINO (possibly dynamic) shape as a list, None for dynamic dimensions."""
    return [d.get_length() if d.is_static else None for d in partial_shape]


class OpenVinoBackend(BaseBackend):
    """Runs an exported Deep-Z ONNX model with OpenVINO on the CPU, in float32 or bfloat16."""

    name = "openvino"
    supported_precisions = BACKEND_PRECISIONS["openvino"]

    def __init__(self, model_path: Path, options: BackendOptions) -> None:
        require_onnx(model_path, self.name)
        if options.device not in (None, "cpu"):
            raise BackendError(f"openvino runs on the CPU here, not on {options.device!r}")
        if options.device is None and _cuda_for_onnxruntime():
            raise BackendError(
                "a CUDA device is available to onnxruntime, which runs faster there "
                "(pass device='cpu' to use openvino anyway)"
            )
        source = str(model_path)
        metadata = onnx_metadata(model_path)
        check_onnx_weights(model_path)
        threads = options.intra_op_threads or default_threads()
        core = ov.Core()
        has_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if options.precision == "auto":
            options = replace(options, precision="bf16" if has_bf16 else "fp32")
        if options.precision == "bf16" and not has_bf16:
            raise BackendError(
                "this CPU has no bfloat16 instructions (AVX-512-BF16 or AMX): use precision 'fp32'"
            )
        try:
            model = core.read_model(source)
            compiled = core.compile_model(model, "CPU", compile_options(threads, options.precision))
        except RuntimeError as exc:
            raise BackendError(f"{model_path}: openvino cannot compile this model: {exc}") from exc
        check_io_shapes(
            [(i.get_any_name(), _dims(i.get_partial_shape())) for i in compiled.inputs],
            [(o.get_any_name(), _dims(o.get_partial_shape())) for o in compiled.outputs],
            source,
            metadata,
        )
        super().__init__(model_path, metadata, options)
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.device = f"cpu ({threads} threads{', bf16' if self.precision == 'bf16' else ''})"
        log.info("openvino %s: %s on %s", ov.__version__, model_path, self.device)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Run one synchronous inference and return a view of the request's output buffer.

        The view is valid until the next call, as `BaseBackend.infer` needs (it reads each chunk
        out before running the next), the same contract as the onnxruntime backend's buffers.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._request.infer({0: x}, share_inputs=True)
        out: np.ndarray = self._request.get_output_tensor(0).data
        return out

    def close(self) -> None:
        """Drop the infer request and the compiled model."""
        super().close()
        del self._request
        del self._compiled
