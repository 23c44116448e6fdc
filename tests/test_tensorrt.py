"""TensorRT: engine build, cache reuse, plan loading, FP32/FP16 parity and CUDA graphs (GPU only).

Every test here is marked `gpu`; on a machine without TensorRT or a CUDA device they are skipped
with the reason (see conftest). The backend's contract tests run in test_runtime.TestTensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.runtime import Backend, load_backend

pytestmark = pytest.mark.gpu

SHAPE = (64, 96)


def _inputs(n: int, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    frame = rng.integers(100, 4000, size=shape, dtype=np.uint16)
    dz = np.linspace(-8.0, 8.0, n, dtype=np.float32)
    return frame, np.ascontiguousarray(np.broadcast_to(dz[:, None, None], (n, *shape)))


@pytest.fixture(scope="module")
def onnx_reference(tiny_model_files: dict[str, object]) -> Backend:
    return load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"], device="cpu")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engines")


def _trt(files: dict[str, object], cache_dir: Path, **kw: object) -> Backend:
    return load_backend(
        files["onnx"],  # type: ignore[arg-type]
        prefer=["tensorrt"],
        frame_shape=SHAPE,
        max_batch=8,
        cache_dir=cache_dir,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 2e-3), ("fp16", 3e-2)])
def test_parity_with_onnxruntime(
    tiny_model_files: dict[str, object],
    onnx_reference: Backend,
    cache_dir: Path,
    precision: str,
    tolerance: float,
) -> None:
    backend = _trt(tiny_model_files, cache_dir, precision=precision)
    assert backend.name == "tensorrt" and backend.precision == precision
    assert backend.device.startswith("cuda:0")
    frame, dpms = _inputs(11)  # more than max_batch: split in two calls
    got = backend.infer(frame, dpms)
    want = onnx_reference.infer(frame, dpms)
    # TF32 (fp32 builds) and FP16 kernels: relative to the output's spread
    spread = float(want.std())
    assert np.abs(got - want).max() <= tolerance * spread * 10
    assert np.abs(got - want).mean() <= tolerance * spread
    backend.close()


def test_engine_is_cached_and_plan_loads_alone(
    tiny_model_files: dict[str, object], cache_dir: Path
) -> None:
    from engine.runtime import build_tensorrt_engine, onnx_metadata

    metadata = onnx_metadata(tiny_model_files["onnx"])  # type: ignore[arg-type]
    kwargs = {"precision": "fp16", "frame_shapes": [SHAPE], "max_batch": 8, "cache_dir": cache_dir}
    first, key, _ = build_tensorrt_engine(tiny_model_files["onnx"], metadata, **kwargs)  # type: ignore[arg-type]
    again, key2, built = build_tensorrt_engine(tiny_model_files["onnx"], metadata, **kwargs)  # type: ignore[arg-type]
    assert not built and again == first and key2 == key
    assert cache_dir / first.plan.name == first.plan
    assert any(p.name.startswith("timing-") for p in cache_dir.iterdir())
    plan_backend = load_backend(first.plan, prefer=["tensorrt"])
    assert plan_backend.metadata == metadata
    frame, dpms = _inputs(3)
    assert plan_backend.infer(frame, dpms).shape == (3, *SHAPE)


def test_cuda_graph_matches_plain_run(tiny_model_files: dict[str, object], cache_dir: Path) -> None:
    plain = _trt(tiny_model_files, cache_dir, precision="fp16")
    graphed = _trt(tiny_model_files, cache_dir, precision="fp16", cuda_graph=True)
    frame, dpms = _inputs(5)
    want = plain.infer(frame, dpms)
    for _ in range(3):  # capture on the first call, replay afterwards
        np.testing.assert_array_equal(graphed.infer(frame, dpms), want)


def test_padded_frames_with_a_frozen_plan_match_onnxruntime_frame_after_frame(
    tiny_model_files: dict[str, object], onnx_reference: Backend, cache_dir: Path
) -> None:
    """A frame the network must see padded, served with the live worker's frozen DPMs: the
    DPMs are written once and reused, so they must not sit in the pinned buffer the padded
    input is copied over (review 36: from the second frame on the network read the previous
    frame's padded input as its DPMs)."""
    backend = _trt(tiny_model_files, cache_dir, precision="fp32")
    shape = (SHAPE[0] - 14, SHAPE[1] - 6)  # padded back to SHAPE
    frame, dpms = _inputs(3, shape)
    dpms.flags.writeable = False  # a frozen plan, as `VolumePlan.frozen` hands the worker
    spread = float(onnx_reference.infer(frame, dpms).std())
    for k in range(3):
        moved = np.roll(frame, 7 * k, axis=1)
        got, want = backend.infer(moved, dpms), onnx_reference.infer(moved, dpms)
        assert np.abs(got - want).max() <= 2e-3 * spread * 10, f"frame {k}"
    backend.close()


def test_frames_outside_the_profile_are_refused(
    tiny_model_files: dict[str, object], cache_dir: Path
) -> None:
    backend = _trt(tiny_model_files, cache_dir, precision="fp16")
    reason = backend.is_incompatible((512, 512), 41, rate_hz=1.0)
    assert isinstance(reason, str) and "profile" in reason and "--frame-shape 512 512" in reason
    frame, dpms = _inputs(2, (128, 128))
    with pytest.raises(ValueError, match="outside the TensorRT profile"):
        backend.infer(frame, dpms)
    assert backend.is_incompatible(SHAPE, 8, rate_hz=1.0) is False


def test_planes_engine_refocuses_as_the_host_path(cache_dir: Path) -> None:
    """The shipped volume model's whole refocus as one engine (`_trt_planes.PlanesEngine`:
    network and render on the GPU) gives the CPU host path's planes; drift takes the shared
    path (network on the GPU, render on the host) and agrees too."""
    from engine.dpm import VolumePlan

    model = Path(__file__).parents[1] / "engine" / "weights" / "deepz-volume.onnx"
    plan = VolumePlan.from_z([-8.0, -2.5, 0.0, 4.0], SHAPE)
    cpu = load_backend(model, prefer=["onnxruntime"], device="cpu")
    gpu = load_backend(
        model, prefer=["tensorrt"], frame_shape=SHAPE, cache_dir=cache_dir, precision="fp32"
    )
    frame, _ = _inputs(1)
    want = cpu.refocus(frame, plan)
    got = gpu.refocus(frame, plan)  # builds the whole-refocus engine (minutes), then runs it
    peak = float(np.abs(want).max())
    assert got.shape == want.shape == (1, 4, *SHAPE)
    assert np.abs(got - want).max() <= 1e-2 * peak  # TF32 matrix products
    assert any(p.name.startswith("planes-") for p in cache_dir.iterdir())  # the graph, cached
    drift = np.array([0.5])
    np.testing.assert_allclose(
        gpu.refocus(frame, plan, drift), cpu.refocus(frame, plan, drift), atol=1e-2 * peak
    )
    gpu.close()


def test_a_cached_plan_cut_short_is_rebuilt_once(
    tiny_model_files: dict[str, object],
    onnx_reference: Backend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plan the cache holds but TensorRT cannot read (a power loss before the disk had it
    all) is built anew with one warning; before, TensorRT was skipped at every start."""
    first = _trt(tiny_model_files, tmp_path)
    first.close()
    (plan,) = tmp_path.glob("*.plan")
    plan.write_bytes(plan.read_bytes()[:1000])
    with caplog.at_level("WARNING", logger="engine.runtime"):
        backend = _trt(tiny_model_files, tmp_path)
    assert backend.name == "tensorrt"
    assert any("cannot be read; rebuilding" in r.getMessage() for r in caplog.records)
    frame, dpms = _inputs(3)
    want = onnx_reference.infer(frame, dpms)
    assert np.abs(backend.infer(frame, dpms) - want).max() <= 2e-2 * float(want.std()) * 10
    backend.close()
