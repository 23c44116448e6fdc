"""The one seam between callers and inference engines: the `Backend` protocol.

The live worker, offline refocusing, the benchmarks and the tests all hold a `Backend` and
never care whether TensorRT, ONNX Runtime or torch runs underneath.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from engine.dpm import VolumePlan
    from engine.metadata import ModelMetadata
    from engine.volume import Renderer

Precision = Literal["auto", "fp32", "bf16", "fp16"]
"""Numeric precision a backend runs the network in: bf16 on CPUs with AVX-512-BF16 or AMX
(OpenVINO), fp16 on GPUs (TensorRT, torch; int8 measured and not offered: it moves beads,
docs/benchmarks.md). "auto" asks each backend for its fastest precision
that stays about 1 % from float32 (bf16: relative L1 0.8-1.2 %, the largest voxel 0.7-1.7 %,
the same bead depths): bf16 where OpenVINO has the instructions, else fp32 (a
backend reports the precision it chose as its `precision`)."""

BACKEND_PRECISIONS: dict[str, tuple[Precision, ...]] = {
    "tensorrt": ("fp32", "fp16"),
    "openvino": ("fp32", "bf16"),
    "onnxruntime": ("fp32",),
    "torch": ("fp32", "fp16"),
}
"""The precisions each backend runs ("auto" is each one's choice among them): its class's
`supported_precisions`, and what the daemon's config checks ``engine.precision`` against."""


class BackendError(RuntimeError):
    """A backend cannot be built here: missing library, no device, or a bad model file.

    The message names the model file (when there is one) and the problem, on one line: the
    runtimes' own messages (OpenVINO's C++ checks run to several lines) are folded into it.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))


@runtime_checkable
class Backend(Protocol):
    """A compiled Deep-Z network that refocuses batches of (image, DPM) pairs.

    Built once from a model file (by `engine.runtime.load_backend`) and then called from one
    thread at a time; the worker owns it for its whole run. Construction fails with
    `BackendError`; after that, `infer` only fails on bad input (`ValueError`) or on a device
    fault (`BackendError`), and a failed call leaves the backend usable.
    """

    name: str
    """Registry name: "tensorrt", "openvino", "onnxruntime" or "torch"."""
    metadata: ModelMetadata
    """What the network was trained on and how its inputs are scaled."""
    precision: Precision
    """Numeric precision the network runs in."""
    device: str
    """Where it runs, in words (e.g. "cpu (2 threads)", "cuda:0 NVIDIA H100")."""

    def infer(self, images: np.ndarray, dpms_um: np.ndarray) -> np.ndarray:
        """Refocus `images` onto the surfaces given by `dpms_um`.

        Parameters
        ----------
        images
            (H, W) or (N, H, W) camera frames of any real numeric dtype; one frame broadcasts
            over N DPMs (the live case: one frame, N planes).
        dpms_um
            (N, H, W) or (H, W) axial distances from the focal plane, in µm.

        Returns
        -------
        numpy.ndarray
            (N, H, W) float32 planes in the input's intensity scale. The inputs are not
            modified; the returned array is new and owned by the caller.
        """
        ...

    def refocus(
        self,
        frames: np.ndarray,
        plan: VolumePlan,
        offsets_um: np.ndarray | None = None,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> np.ndarray:
        """Refocus (N, H, W) frames onto every DPM of `plan` -> (N, P, H, W) of `dtype`.

        `offsets_um` (N,) shifts frame n's DPMs (drift correction). Volume models run the
        network once per frame; per-plane models once per (frame, DPM). `dtype` float16 (what
        the daemon records) makes values beyond its range inf; the caller saturates them.
        """
        ...

    def volume(self, images: np.ndarray) -> np.ndarray:
        """Volume models only: the (N, D, H, W) density of each frame on the model's depths.

        One network pass per frame; `metadata.volume.depth_um` gives the depths (µm, relative
        to the focal plane). Per-plane models raise `BackendError`.
        """
        ...

    def renderer(self, shape: tuple[int, int]) -> Renderer:
        """Volume models only: the renderer of planes and surfaces for one frame shape."""
        ...

    def is_incompatible(
        self, frame_shape: tuple[int, int], n_planes: int, rate_hz: float
    ) -> Literal[False] | str:
        """Say, before acquisition starts, whether this backend can serve the request.

        May run a short timed check (a few calls at `frame_shape` × `n_planes`). Returns False
        when it fits, or a sentence saying why not (shape outside the engine's profile, or the
        measured rate below `rate_hz`), which the daemon prints before refusing to start.
        """
        ...

    def shape_problem(self, frame_shape: tuple[int, int], n_planes: int) -> str | None:
        """Why this backend cannot take `frame_shape` × `n_planes` at all (None: it can).

        No inference runs; the daemon's pre-flight refuses with this sentence before the
        store is created.
        """
        ...

    def time_call(
        self,
        frame_shape: tuple[int, int],
        n_planes: int,
        repeats: int = 3,
        budget_s: float = 2.0,
        dpms_um: np.ndarray | None = None,
        plan: VolumePlan | None = None,
        dtype: type[np.floating[Any]] = np.float32,
    ) -> float:
        """Median seconds of one warmed-up call for a frame (the pre-flight).

        The call is `refocus` onto `plan` in `dtype` when given (what the live worker runs),
        else `infer` with these DPMs.
        """
        ...

    def close(self) -> None:
        """Release device memory and sessions; the backend must not be used afterwards."""
        ...
