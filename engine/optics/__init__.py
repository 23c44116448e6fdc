"""Wide-field fluorescence microscope simulator: PSFs, samples, focal stacks, time series.

Training, evaluation and the simulated scope need images with known ground truth, since no
real data can be downloaded here. Coordinates are in µm at the sample: x along columns and y
along rows from the centre of the frame's top-left pixel; z along the optical axis, positive =
deeper (further from the objective). A focal stack's `z_um` are focus positions relative to
the sample's reference plane, as a focus drive reports them, so the plane d µm deeper than
plane i is at ``z_um[i] + d`` and a Deep-Z training pair (input plane i, target plane j) has
the DPM ``z_um[j] - z_um[i]``. With the default air objective on a watery sample, the
refractive-index mismatch is in the PSF model (Gibson-Lanni, asymmetric about focus).

The settings models (`OpticsConfig`, `CameraConfig`, `WormConfig`) import at once; the
simulator itself (scipy, psfmodels) loads on first use, so configuration code stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.optics._config import CameraConfig, OpticsConfig, SampleKind, WormConfig

if TYPE_CHECKING:
    from engine.optics._imaging import (
        SLICE_UM,
        FocalStack,
        VolumePair,
        camera_counts,
        default_z_um,
        expected_counts,
        simulate_focal_stack,
        simulate_volume_pair,
    )
    from engine.optics._psf import make_psf
    from engine.optics._samples import (
        SPLINE_TAPS,
        Lateral,
        ObjectTable,
        deposit_point,
        lateral_weights,
        spline_taps,
    )
    from engine.optics._timeseries import WormTimeSeries

_LAZY = {
    "SLICE_UM": "engine.optics._imaging",
    "FocalStack": "engine.optics._imaging",
    "VolumePair": "engine.optics._imaging",
    "simulate_volume_pair": "engine.optics._imaging",
    "camera_counts": "engine.optics._imaging",
    "default_z_um": "engine.optics._imaging",
    "expected_counts": "engine.optics._imaging",
    "simulate_focal_stack": "engine.optics._imaging",
    "make_psf": "engine.optics._psf",
    "ObjectTable": "engine.optics._samples",
    "deposit_point": "engine.optics._samples",
    "spline_taps": "engine.optics._samples",
    "lateral_weights": "engine.optics._samples",
    "SPLINE_TAPS": "engine.optics._samples",
    "Lateral": "engine.optics._samples",
    "WormTimeSeries": "engine.optics._timeseries",
}

__all__ = [
    "SLICE_UM",
    "SPLINE_TAPS",
    "CameraConfig",
    "FocalStack",
    "Lateral",
    "ObjectTable",
    "OpticsConfig",
    "SampleKind",
    "VolumePair",
    "WormConfig",
    "WormTimeSeries",
    "camera_counts",
    "default_z_um",
    "deposit_point",
    "expected_counts",
    "lateral_weights",
    "make_psf",
    "simulate_focal_stack",
    "simulate_volume_pair",
    "spline_taps",
]


def __getattr__(name: str) -> Any:
    """Import the simulator's parts on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine.optics' has no attribute {name!r}")
