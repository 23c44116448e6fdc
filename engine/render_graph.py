"""The volume model's whole refocus as one ONNX graph: camera frame in, virtual planes out.

`engine.volume.Renderer` renders planes from the network's density with FFTs on the host
(scipy). That is the fastest way on a CPU, but on a GPU it would put 82 FFTs of every frame on
the host, cap the rate there and copy the 41-plane density back and forth. Neither TensorRT
nor ONNX Runtime's CUDA provider runs ONNX's DFT operator, so this module writes the render
as what every engine runs fast: matrix products. For a frame of H x W on the renderer's grid
of G0 x G1 (frame plus one PSF radius, `Renderer.grid`), each step is a dense DFT:

1. along x, real to half-spectrum: (D, H, W) @ (W, 2 * (G1 // 2 + 1)) -> real and imaginary
   parts side by side;
2. along y, complex: a (2 G0, 2 H) real block matrix [[Re, -Im], [Im, Re]] on the stacked
   parts;
3. along depth, the Toeplitz sum over depths ``Σ_d O[d] · OTF(Δz_p - depth_d)`` as a
   circular convolution of length 2D - 1 (exact for planes inside the depth grid, as in
   `Renderer._convolve_depth`): a forward DFT over the D depths, a product with the bank's
   transform along depth, and an inverse DFT to the P planes only;
4. back along y to the H frame rows only, then half-spectrum to real along x, W columns only.

The zero margins of the FFT grid never appear: the DFT matrices take H x W pixels in and give
H x W pixels out. The residual the density does not explain (the frame minus the rendered plane
at focus) is low-passed by the renderer's Gaussian, which is separable, so it is two H x H and
W x W matrices, divided by the low-passed frame support (normalised convolution). At 512² with
41 planes the render is about 90 GFLOP a frame (9 TFLOP/s at 100 Hz, a few percent of a
datacentre GPU's matrix throughput); on 2 CPU cores the host FFTs stay faster (session 9:
OpenVINO ran this graph 1.7x slower than `Renderer` at 256², and its own RDFT ops 12x slower).

`planes_model` wraps the exported network: frame (1, 1, H, W) float32 counts in; normalise
(`engine.metadata.normalize_images`), pad to the size multiple as `pad_to_multiple` does,
network, crop, back to counts (`std`), render, add the residual; planes (1, P, H, W) float32
counts out. One graph per frame shape and plane set (the DFT matrices depend on both), built
when a backend sees them; parity with the host path is tested on ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.metadata import padded_shape
from engine.volume import RESIDUAL_SIGMA_PX, Renderer, defocus_index

__all__ = ["FRAME_NAME", "PLANES_NAME", "planes_model", "render_matrices"]

FRAME_NAME = "frame"
"""Input of a `planes_model`: one frame (1, 1, H, W) float32 camera counts."""
PLANES_NAME = "planes"
"""Output of a `planes_model`: (1, P, H, W) float32 counts at the plan's Δz."""


def render_matrices(
    psf: np.ndarray,
    depth_um: np.ndarray,
    shape: tuple[int, int],
    dz_um: Sequence[float] | np.ndarray,
) -> dict[str, np.ndarray]:
    """Return the render's constant matrices, float32, named as `planes_model` uses them.

    ``dx`` (W, 2R) and ``dy`` (2 G0, 2 H): forward DFTs; ``df`` (2L, 2D) and ``di`` (2Q, 2L):
    forward and inverse DFTs along depth (Q = P planes plus the plane at focus); ``kr``,
    ``ki`` (L, G0 * R): the bank's transform along depth; ``iy`` (2 H, 2 G0) and ``ix``
    (2R, W): inverse DFTs onto the frame; ``ly`` (H, H), ``lx`` (W, W) and ``support`` (H, W):
    the residual's low-pass. R = G1 // 2 + 1, L = 2D - 1.
    """
    depth = np.asarray(depth_um, dtype=np.float64)
    h, w = shape
    r = Renderer(psf, depth, shape, threads=1)
    g0, g1 = r.grid
    half = g1 // 2 + 1
    n_depth = depth.size
    n_bank = 2 * n_depth - 1
    dz = np.append(np.asarray(dz_um, dtype=np.float64), 0.0)  # the last: the plane at focus
    rows = defocus_index(dz, depth)[:, 0]  # bank row of depth 0 for each plane
    kernel = np.fft.fft(r.otf.astype(np.complex128), axis=0)  # (L, G0, R), along depth

    def block(a: np.ndarray) -> np.ndarray:  # complex matrix -> real [[Re, -Im], [Im, Re]]
        return np.block([[a.real, -a.imag], [a.imag, a.real]])

    xs, ys, kx, ky = np.arange(w), np.arange(h), np.arange(half), np.arange(g0)
    ax = -2j * np.pi * np.outer(xs, kx) / g1
    n = np.arange(n_bank)
    # half-spectrum back to real: the bins other than 0 (and G1/2) stand for their mirror too
    weight = np.full(half, 2.0)
    weight[0] = 1.0
    if g1 % 2 == 0:
        weight[-1] = 1.0
    back_x = np.exp(2j * np.pi * np.outer(kx, xs) / g1) * weight[:, None] / g1
    # the residual's Gaussian low-pass on the grid, cropped to the frame: separable
    s = RESIDUAL_SIGMA_PX

    def lowpass(size: int, grid: int) -> np.ndarray:
        f = np.fft.fftfreq(grid)
        g = np.exp(-2 * (np.pi * s * f) ** 2)
        dft = np.exp(-2j * np.pi * np.outer(f * grid, np.arange(size)) / grid)  # (grid, size)
        out: np.ndarray = (dft.conj().T * g) @ dft / grid  # (size, size), real
        return out.real

    ly, lx = lowpass(h, g0), lowpass(w, g1)
    support = ly @ np.ones((h, w)) @ lx.T
    mats = {
        "dx": np.concatenate([np.exp(ax).real, np.exp(ax).imag], axis=1),
        "dy": block(np.exp(-2j * np.pi * np.outer(ky, ys) / g0)),
        "df": block(np.exp(-2j * np.pi * np.outer(n, np.arange(n_depth)) / n_bank)),
        "kr": kernel.real.reshape(n_bank, -1),
        "ki": kernel.imag.reshape(n_bank, -1),
        "di": block(np.exp(2j * np.pi * np.outer(rows, n) / n_bank) / n_bank),
        "iy": block(np.exp(2j * np.pi * np.outer(ys, ky) / g0) / g0),
        "ix": np.concatenate([back_x.real, -back_x.imag], axis=0),
        "ly": ly,
        "lx": lx.T,
        "support": support,
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in mats.items()}


def planes_model(
    network: onnx.ModelProto,
    psf: np.ndarray,
    depth_um: np.ndarray,
    shape: tuple[int, int],
    dz_um: Sequence[float] | np.ndarray,
    size_multiple: int,
) -> onnx.ModelProto:
    """Wrap an exported volume network into frame (1, 1, H, W) -> planes (1, P, H, W) counts.

    `network` is the exported ONNX (one input (N, 1, H', W') normalised, one output
    (N, D, H', W') normalised density; opset >= 18), unchanged; the new nodes are prefixed
    ``rg_``.
    `dz_um` are the planes, on the model's depth lattice within its grid (`defocus_index`).
    """
    opset = max((o.version for o in network.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 18:  # ReduceMean takes its axes as an input from opset 18
        raise ValueError(
            f"the whole-refocus graph needs an ONNX opset >= 18; the model has {opset}"
        )
    net_in, net_out = network.graph.input[0].name, network.graph.output[0].name
    h, w = shape
    ph, pw = padded_shape(h, w, size_multiple)
    m = render_matrices(psf, depth_um, shape, dz_um)
    n_depth = int(np.asarray(depth_um).size)
    n_bank = 2 * n_depth - 1
    n_out = len(dz_um) + 1  # the planes and the plane at focus
    g0 = m["dy"].shape[0] // 2
    half = m["dx"].shape[1] // 2
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(v, f"rg_{k}") for k, v in m.items()]

    def const(name: str, values: Sequence[float], dtype: type = np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), f"rg_{name}"))
        return f"rg_{name}"

    def op(kind: str, inputs: Sequence[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, list(inputs), [f"rg_{out}"], **attrs))
        return f"rg_{out}"

    def reshape(x: str, dims: Sequence[int], out: str) -> str:
        return op("Reshape", [x, const(f"{out}_shape", dims)], out)

    # normalise as normalize_images: per-frame mean and (population) std, std >= 1e-6
    hw = const("hw_axes", [2, 3])
    mean = op("ReduceMean", [FRAME_NAME, hw], "mean", keepdims=1)
    centred = op("Sub", [FRAME_NAME, mean], "centred")
    var = op("ReduceMean", [op("Mul", [centred, centred], "sq"), hw], "var", keepdims=1)
    std = op("Max", [op("Sqrt", [var], "sd"), const("eps", [1e-6], np.float32)], "std")
    x = op("Div", [centred, std], "normalised")
    if (ph, pw) != (h, w):  # as pad_to_multiple: reflect, or edge when the pad is that large
        mode = "reflect" if ph - h < h and pw - w < w else "edge"
        x = op("Pad", [x, const("pads", [0, 0, 0, 0, 0, 0, ph - h, pw - w])], "padded", mode=mode)
    nodes.append(helper.make_node("Identity", [x], [net_in]))
    # the network's nodes go here (below); its output is cropped and scaled back to counts
    crop = op(
        "Slice",
        [net_out, const("crop_start", [0, 0]), const("crop_end", [h, w]), hw],
        "density_n",
    )
    density = reshape(op("Mul", [crop, std], "density_1"), [n_depth, h, w], "density")
    # 1-2: lateral DFTs (real and imaginary parts stacked along the last, then the rows axis)
    t = op("MatMul", [density, "rg_dx"], "fx")  # (D, H, 2R)
    t = reshape(t, [n_depth, h, 2, half], "fx4")
    t = op("Transpose", [t], "fx_t", perm=[0, 2, 1, 3])  # (D, 2, H, R)
    t = reshape(t, [n_depth, 2 * h, half], "fx_rows")
    t = op("MatMul", ["rg_dy", t], "fxy")  # (D, 2 G0, R) = [Re; Im]
    t = reshape(t, [n_depth, 2, g0 * half], "fxy3")
    t = op("Transpose", [t], "fxy_t", perm=[1, 0, 2])
    t = reshape(t, [2 * n_depth, g0 * half], "spec")  # [Re of D depths; Im of D depths]
    # 3: along depth, DFT, times the bank's transform, inverse DFT onto the planes
    z = op("MatMul", ["rg_df", t], "zdft")  # (2L, F)
    zr = op("Slice", [z, const("zr0", [0]), const("zr1", [n_bank]), const("ax0", [0])], "zr")
    zi = op("Slice", [z, const("zi0", [n_bank]), const("zi1", [2 * n_bank]), "rg_ax0"], "zi")
    pr = op(
        "Sub",
        [op("Mul", [zr, "rg_kr"], "zr_kr"), op("Mul", [zi, "rg_ki"], "zi_ki")],
        "pr",
    )
    pi = op(
        "Add",
        [op("Mul", [zr, "rg_ki"], "zr_ki"), op("Mul", [zi, "rg_kr"], "zi_kr")],
        "pi",
    )
    u = op("MatMul", ["rg_di", op("Concat", [pr, pi], "prod", axis=0)], "planes_spec")
    # 4: back onto the frame
    u = reshape(u, [2, n_out, g0, half], "u4")
    u = op("Transpose", [u], "u_t", perm=[1, 0, 2, 3])
    u = reshape(u, [n_out, 2 * g0, half], "u_rows")
    v = op("MatMul", ["rg_iy", u], "iy_out")  # (Q, 2H, R)
    v = reshape(v, [n_out, 2, h, half], "v4")
    v = op("Transpose", [v], "v_t", perm=[0, 2, 1, 3])
    v = reshape(v, [n_out, h, 2 * half], "v_cols")
    rendered = op("MatMul", [v, "rg_ix"], "rendered")  # (Q, H, W)
    # the residual: the frame minus the plane at focus, low-passed inside the frame
    focus = op(
        "Slice",
        [rendered, const("f0", [n_out - 1]), const("f1", [n_out]), "rg_ax0"],
        "focus",
    )
    frame = reshape(FRAME_NAME, [1, h, w], "frame3")
    resid = op("Sub", [frame, focus], "residual")
    low = op("MatMul", [op("MatMul", ["rg_ly", resid], "ly_r"), "rg_lx"], "low_raw")
    low = op("Div", [low, "rg_support"], "low")
    planes = op(
        "Slice",
        [rendered, const("p0", [0]), const("p1", [n_out - 1]), "rg_ax0"],
        "planes3",
    )
    out = op("Add", [planes, low], "planes_counts")
    nodes.append(
        helper.make_node("Reshape", [out, const("out_shape", [1, n_out - 1, h, w])], [PLANES_NAME])
    )

    split = next(i for i, n in enumerate(nodes) if n.output[0] == net_in) + 1
    net = network.graph
    graph = helper.make_graph(
        nodes[:split] + list(net.node) + nodes[split:],
        f"{net.name or 'deepz'}_planes",
        [helper.make_tensor_value_info(FRAME_NAME, TensorProto.FLOAT, [1, 1, h, w])],
        [helper.make_tensor_value_info(PLANES_NAME, TensorProto.FLOAT, [1, n_out - 1, h, w])],
        initializer=list(net.initializer) + inits,
    )
    model = helper.make_model(graph, opset_imports=list(network.opset_import))
    model.ir_version = network.ir_version
    model.metadata_props.extend(network.metadata_props)
    return model
