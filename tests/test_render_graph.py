"""The whole refocus of the volume model as one ONNX graph (`engine.render_graph`), for GPUs.

It must give what the host path gives (`Backend.infer`: normalise, network, render with host
FFTs, residual) on the shipped model, for a frame that needs padding and for planes off the
frame's own grid, and refuse planes off the model's depth lattice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed (extras openvino / export)")

from engine.optics import simulate_focal_stack  # noqa: E402
from engine.render_graph import FRAME_NAME, PLANES_NAME, planes_model  # noqa: E402
from engine.runtime import load_backend  # noqa: E402
from engine.volume import load_psf_bank  # noqa: E402

MODEL = Path(__file__).parents[1] / "engine" / "weights" / "deepz-volume.onnx"


@pytest.mark.parametrize("shape", [(64, 64), (48, 80)])  # (48, 80): padded to (64, 96)
def test_the_graph_refocuses_as_the_host_path(shape: tuple[int, int]) -> None:
    import onnxruntime as ort

    backend = load_backend(MODEL, prefer=["onnxruntime"], intra_op_threads=1)
    meta = backend.metadata
    assert meta.volume is not None
    depth = np.asarray(meta.volume.depth_um)
    psf = load_psf_bank(MODEL.parent / meta.volume.psf_file, depth.size)
    dz = np.array([-10.0, -3.5, 0.0, 2.0, 9.5])
    model = planes_model(onnx.load(str(MODEL)), psf, depth, shape, dz, meta.size_multiple)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    stack = simulate_focal_stack("beads", shape=shape, z_um=[0.0], seed=5)
    frame = stack.images[0].astype(np.float32)
    (planes,) = session.run([PLANES_NAME], {FRAME_NAME: frame[None, None]})
    dpms = np.broadcast_to(dz.astype(np.float32)[:, None, None], (dz.size, *shape))
    host = backend.infer(frame, dpms)
    assert planes.shape == (1, dz.size, *shape)
    peak = float(np.abs(host).max())
    assert np.abs(planes[0] - host).max() < 1e-4 * peak  # float32 rounding, not a model change
    assert planes[0, 0].std() < planes[0, 2].std()  # and it is a refocus: far planes are smoother


def test_planes_off_the_depth_lattice_and_old_opsets_are_refused() -> None:
    backend = load_backend(MODEL, prefer=["onnxruntime"], intra_op_threads=1)
    meta = backend.metadata
    assert meta.volume is not None
    depth = np.asarray(meta.volume.depth_um)
    psf = load_psf_bank(MODEL.parent / meta.volume.psf_file, depth.size)
    with pytest.raises(ValueError, match="depth lattice"):
        planes_model(onnx.load(str(MODEL)), psf, depth, (64, 64), [0.25], meta.size_multiple)
    old = onnx.load(str(MODEL))
    old.opset_import[0].version = 17  # ReduceMean's axes as an input need opset 18
    with pytest.raises(ValueError, match="opset >= 18"):
        planes_model(old, psf, depth, (64, 64), [0.0], meta.size_multiple)
