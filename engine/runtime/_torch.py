"""Torch backend: the reference, eager PyTorch on the trained weights.

It is the slowest backend and the ground truth for parity checks; it is the only runtime
module that imports torch, and only when it is chosen.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from engine.metadata import ModelMetadataError
from engine.model import load_model
from engine.runtime._base import BackendOptions, BaseBackend
from engine.runtime._protocol import BACKEND_PRECISIONS, BackendError

log = logging.getLogger(__name__)


def weights_for(model_path: Path) -> Path:
    """Return the `.pt` weights for `model_path`: itself, or the `.pt` beside an `.onnx`."""
    if model_path.suffix == ".pt":
        return model_path
    weights = model_path.with_suffix(".pt")
    if not weights.is_file():
        raise BackendError(
            f"{model_path}: torch needs the .pt weights, and {weights.name} is not beside it"
        )
    return weights


class TorchBackend(BaseBackend):
    """Runs `engine.model.DeepZ` eagerly under `torch.inference_mode` (CPU or CUDA)."""

    name = "torch"
    supported_precisions = BACKEND_PRECISIONS["torch"]

    def __init__(self, model_path: Path, options: BackendOptions) -> None:
        weights = weights_for(model_path)
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"torch has no CUDA device here (asked for {device!r})")
        if options.precision == "fp16" and not device.startswith("cuda"):
            raise BackendError("torch runs fp16 on CUDA only; use precision='fp32' on CPU")
        try:
            model, metadata = load_model(weights, device=device)
        except (ModelMetadataError, FileNotFoundError, RuntimeError, OSError) as exc:
            raise BackendError(f"{weights}: cannot load torch weights: {exc}") from exc
        except Exception as exc:  # unpickling errors of a corrupt file
            raise BackendError(f"{weights}: not a torch state_dict: {exc}") from exc
        super().__init__(weights, metadata, options)
        if options.intra_op_threads is not None:
            torch.set_num_threads(options.intra_op_threads)
        # as training and the onnxruntime backend do: trained weights produce denormal
        # activations, which are ~100x slower on x86 (process-wide, harmless at 1e-38)
        torch.set_flush_denormal(True)
        self._dtype = torch.float16 if options.precision == "fp16" else torch.float32
        self._model = model.to(self._dtype)
        self._torch_device = torch.device(device)
        self.device = device if device != "cpu" else f"cpu ({torch.get_num_threads()} threads)"
        log.info("torch: %s on %s", weights, self.device)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Run the module on `x` and return float32 numpy."""
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self._torch_device, self._dtype)
            y = self._model(t)
            out: np.ndarray = y.float().cpu().numpy()
        return out

    def close(self) -> None:
        """Drop the module (frees CUDA memory once collected)."""
        super().close()
        del self._model
