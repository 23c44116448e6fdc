"""A volume model's whole refocus on the GPU: one TensorRT engine from frame to planes.

The TensorRT backend runs the volume network on the GPU, but the planes are rendered from its
41-depth density on the host (`engine.volume.Renderer`, FFTs): the density comes back over
PCIe (43 MB a 512² frame) and 82 host FFTs cap the rate. For a frame shape and a plan of
uniform planes, `PlanesEngine` instead builds `engine.render_graph.planes_model` (normalise,
network, render as matrix products, residual) into one engine: the host copies the frame in
(1 MB at 512²) and the planes out, nothing else. Built on first use (minutes) and cached like
the network's engines (`EngineCache`, keyed by the composed graph's SHA-256).

Written against the same TensorRT 10 / cuda-python calls as `_tensorrt`, and **not yet run**:
no GPU has been lent to this project since it was written (see the README's known gaps). Its
test is `tests/test_tensorrt.py::test_planes_engine_refocuses_as_the_host_path`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorrt as trt

from engine.files import atomic_write
from engine.metadata import ModelMetadata, file_sha256
from engine.runtime._trt_build import cached_engine, cuda_check, cudart, native_handle
from engine.runtime._trt_cache import EngineCache, ShapeProfile

_LOGGER = trt.Logger(trt.Logger.WARNING)


def planes_onnx(
    network_onnx: Path,
    metadata: ModelMetadata,
    psf: np.ndarray,
    shape: tuple[int, int],
    z_um: tuple[float, ...],
    cache: EngineCache,
) -> Path:
    """Write (once) the whole-refocus graph for `shape` and planes `z_um` into the cache."""
    import onnx

    from engine import render_graph, volume
    from engine.render_graph import planes_model

    assert metadata.volume is not None
    # everything the graph's constants come from: network, PSF bank, depths, padding, planes,
    # and the code that builds it (the graph and the host renderer whose constants it takes:
    # a cached graph from older code would be served beside a host render that changed)
    psf_sha = hashlib.sha256(np.ascontiguousarray(psf, dtype=np.float32).tobytes()).hexdigest()
    code = "-".join(file_sha256(str(m.__file__))[:16] for m in (render_graph, volume))
    tag = (
        f"{file_sha256(network_onnx)}-{psf_sha}-{list(metadata.volume.depth_um)}-"
        f"{metadata.size_multiple}-{shape}-{z_um}-{code}"
    ).encode()
    path = cache.root / f"planes-{hashlib.sha256(tag).hexdigest()[:16]}.onnx"
    if not path.is_file():
        model = planes_model(
            onnx.load(str(network_onnx)),
            psf,
            np.asarray(metadata.volume.depth_um),
            shape,
            z_um,
            metadata.size_multiple,
        )
        cache.root.mkdir(parents=True, exist_ok=True)
        # workers may build at once: each writes its own temporary; under 2 GB, so one file
        # (about 130 MB at 512²)
        atomic_write(path, lambda tmp: onnx.save_model(model, str(tmp)))
    return path


class PlanesEngine:
    """One frame (H, W) in, its planes (P, H, W) float32 counts out, on one CUDA stream."""

    def __init__(
        self,
        network_onnx: Path,
        metadata: ModelMetadata,
        psf: np.ndarray,
        shape: tuple[int, int],
        z_um: tuple[float, ...],
        *,
        precision: str,
        cache_dir: str | Path | None = None,
    ) -> None:
        from engine.render_graph import FRAME_NAME, PLANES_NAME

        cache = EngineCache(cache_dir)
        onnx_path = planes_onnx(network_onnx, metadata, psf, shape, z_um, cache)
        static = (1, 1, int(shape[0]), int(shape[1]))
        entry, _, _ = cached_engine(
            onnx_path,
            metadata.model_copy(update={"name": f"{metadata.name}-planes"}),
            ShapeProfile(static, static, static),
            precision,
            cache,
            input_name=FRAME_NAME,
        )
        self._rt = cudart()
        self._runtime = trt.Runtime(_LOGGER)
        self._engine = self._runtime.deserialize_cuda_engine(entry.plan.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"{entry.plan}: TensorRT cannot deserialize this engine")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeError(f"{entry.plan}: TensorRT cannot create an execution context")
        self.shape = (int(shape[0]), int(shape[1]))
        self.n_planes = len(z_um)
        h, w = self.shape
        self._in = np.empty((h, w), np.float32)
        self._out = np.empty((self.n_planes, h, w), np.float32)
        rt = self._rt
        self._d_in = cuda_check(rt.cudaMalloc(self._in.nbytes))
        try:  # freed again if a later step fails: the caller falls back and carries on
            self._d_out = cuda_check(rt.cudaMalloc(self._out.nbytes))
            try:
                self._stream = cuda_check(rt.cudaStreamCreate())
            except BaseException:
                rt.cudaFree(self._d_out)
                raise
        except BaseException:
            rt.cudaFree(self._d_in)
            raise
        self._stream_handle = native_handle(self._stream)
        self._context.set_tensor_address(FRAME_NAME, int(self._d_in))
        self._context.set_tensor_address(PLANES_NAME, int(self._d_out))

    def run(self, frame: np.ndarray) -> np.ndarray:
        """Refocus one (H, W) frame; returns this engine's output array (valid until next)."""
        rt = self._rt
        np.copyto(self._in, frame, casting="unsafe")  # uint16 counts -> float32
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(
            rt.cudaMemcpyAsync(self._d_in, self._in.ctypes.data, self._in.nbytes, h2d, self._stream)
        )
        if not self._context.execute_async_v3(self._stream_handle):
            raise RuntimeError("tensorrt: execute_async_v3 failed (whole-refocus engine)")
        cuda_check(
            rt.cudaMemcpyAsync(
                self._out.ctypes.data, self._d_out, self._out.nbytes, d2h, self._stream
            )
        )
        cuda_check(rt.cudaStreamSynchronize(self._stream))
        return self._out

    def close(self) -> None:
        """Free the buffers and the stream; drop the engine."""
        rt = self._rt
        rt.cudaStreamSynchronize(self._stream)
        rt.cudaStreamDestroy(self._stream)
        rt.cudaFree(self._d_in)
        rt.cudaFree(self._d_out)
        del self._context, self._engine, self._runtime
