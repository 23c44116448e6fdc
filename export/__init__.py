"""Export trained Deep-Z weights to ONNX, with a parity check against torch.

Run as ``python -m export onnx ...`` or ``python -m export tensorrt ...``; the second builds a
cached TensorRT engine through `engine.runtime.build_tensorrt_engine`, which owns the engine
cache (this package never builds or caches engines itself). Importing this package imports
nothing heavy: the names below load torch and onnx on first access (PEP 562).

Examples
--------
>>> from export import export_weights
>>> report = export_weights("engine/weights/deepz-slim.pt", "runs/deepz-slim.onnx")
>>> report.ok
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export._onnx import (
        EXPORT_INFO_KEY,
        ParityError,
        ParityReport,
        check_parity,
        export_onnx,
        export_weights,
        random_inputs,
    )

_LAZY = {
    "EXPORT_INFO_KEY": "export._onnx",
    "ParityError": "export._onnx",
    "ParityReport": "export._onnx",
    "check_parity": "export._onnx",
    "export_onnx": "export._onnx",
    "export_weights": "export._onnx",
    "random_inputs": "export._onnx",
}
"""Public names, each with the module (importing torch) that defines it."""

__all__ = [
    "EXPORT_INFO_KEY",
    "ParityError",
    "ParityReport",
    "check_parity",
    "export_onnx",
    "export_weights",
    "random_inputs",
]


def __getattr__(name: str) -> Any:
    """Import the exporter (torch, onnx, onnxruntime) on first use of one of its names.

    Raises
    ------
    AttributeError
        The package has no attribute `name`.
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'export' has no attribute {name!r}")
