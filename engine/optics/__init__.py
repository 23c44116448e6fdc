"""Wide-field fluorescence microscope simulator: PSFs, samples, focal stacks, time series.

Training, evaluation and the simulated scope need images with known ground truth. Coordinates
are in µm at the sample; z is along the optical axis, positive = deeper (further from the
objective), and a focal stack's `z_um` are focal positions relative to the sample's reference
plane, so the plane d µm deeper than plane i of a stack is at ``z_um[i] + d``.
"""

from engine.optics._config import CameraConfig, OpticsConfig
from engine.optics._imaging import (
    FocalStack,
    camera_counts,
    default_z_um,
    expected_counts,
    simulate_focal_stack,
)
from engine.optics._psf import make_psf
from engine.optics._samples import ObjectTable
from engine.optics._timeseries import WormTimeSeries

__all__ = [
    "CameraConfig",
    "FocalStack",
    "ObjectTable",
    "OpticsConfig",
    "WormTimeSeries",
    "camera_counts",
    "default_z_um",
    "expected_counts",
    "make_psf",
    "simulate_focal_stack",
]
