"""Helpers shared by the volume-model tests (no live-service imports: the GPU call runs
`tests/test_volume.py` without conftest and without pyzmq)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_onnx_serves_like_torch(
    weights: Path, onnx_path: Path, frame: np.ndarray | None = None
) -> None:
    """Export `weights` to `onnx_path` (parity-checked) and check ONNX Runtime's planes for
    three DPMs (-3, 0, 1.5 µm) against torch's on `frame` (default: a 64² Poisson frame)."""
    from engine.runtime import load_backend
    from export import export_weights

    if frame is None:
        frame = np.random.default_rng(1).poisson(50, (64, 64)).astype(np.uint16)
    dpms = np.stack([np.full(frame.shape, z, np.float32) for z in (-3.0, 0.0, 1.5)])
    assert export_weights(weights, onnx_path).ok
    ort = load_backend(onnx_path, prefer=["onnxruntime"])
    pt = load_backend(weights, prefer=["torch"])
    np.testing.assert_allclose(ort.infer(frame, dpms), pt.infer(frame, dpms), rtol=1e-3, atol=1e-2)
