"""What a lab's stack file records, checked before its planes are used: focus step, full scale.

Focus-scanned stacks are trained on (`engine.train.read_lab_stack`, both trainers) and
measured for a PSF bank (`engine.psf_calibration`); both readers check them here, once.

- **The focus step.** The stack is read at the step its config or command line gives; a wrong
  step teaches or measures the wrong defocus for every plane, unsaid. Where the file records its
  own step (OME-TIFF ``PhysicalSizeZ``, ImageJ ``spacing``, an OME-Zarr image's z scale) the
  two are compared. The recorded step has no sign (the scan's direction is the user's to give),
  so only sizes are; a file that records nothing is taken at the user's word.
- **The camera's full scale.** A clipped pixel is no measurement: a bead's peak at the
  camera's ceiling is a flat top, and trained on as a target it teaches that in-focus beads are
  flat. `full_scale` says where a stack clips (the dtype's maximum, or the lower full scale of a
  12-bit camera stored as uint16), `saturated_mask` where it did.

Standard library and NumPy only (TIFF and Zarr readers are imported when a file needs them).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Z_STEP_REL_TOL",
    "focus_step_problem",
    "full_scale",
    "recorded_focus_step_um",
    "saturated_mask",
]

Z_STEP_REL_TOL = 0.01
"""A lab stack's given focus step may differ this much (relative) from the one its file
records: stage steps are written rounded, a wrong step is usually 2x, 10x or a unit off."""

_UM_PER_UNIT = {
    "micron": 1.0, "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micrometer": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3,
}  # fmt: skip


def _step_um(value: Any, unit: Any) -> float | None:
    """Return a recorded step in µm; None unless it is a finite positive length, known unit."""
    try:
        step = abs(float(value)) * _UM_PER_UNIT[str(unit).strip().lower()]
    except (TypeError, ValueError, KeyError):
        return None
    return step if math.isfinite(step) and step > 0 else None


def _tiff_z_step_um(tif: Any) -> tuple[float, str] | None:
    """Return the focus step a TIFF records (OME ``PhysicalSizeZ``, ImageJ ``spacing``)."""
    if tif.is_ome and tif.ome_metadata:
        found = re.search(r'PhysicalSizeZ="([^"]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeZUnit="([^"]+)"', tif.ome_metadata)
        if found and (step := _step_um(found.group(1), unit.group(1) if unit else "µm")):
            return step, "OME PhysicalSizeZ"
    meta = tif.imagej_metadata or {}
    if "spacing" in meta and (step := _step_um(meta["spacing"], meta.get("unit", "micron"))):
        return step, "ImageJ spacing"
    return None


def _ngff_z_step_um(attrs: dict[str, Any]) -> tuple[float, str] | None:
    """Return the focus step an OME-Zarr image records (its "z" axis' first scale)."""
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests the metadata under "ome"
    try:
        image = ome["multiscales"][0]
        names = [a["name"] if isinstance(a, dict) else a for a in image["axes"]]
        i = names.index("z")
        axis = image["axes"][i]
        unit = axis.get("unit", "micrometer") if isinstance(axis, dict) else "micrometer"
        for transform in image["datasets"][0]["coordinateTransformations"]:
            if transform.get("type") == "scale":
                step = _step_um(transform["scale"][i], unit)
                return (step, "NGFF z scale") if step else None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None  # no readable z scale: nothing to compare
    return None


def recorded_focus_step_um(path: Path) -> tuple[float, str] | None:
    """Return the focus step (µm) `path` records and where it says so, or None.

    None for a file that records no step, a step in no known length unit (ImageJ's
    uncalibrated "pixel"), or metadata that cannot be read: this is a cross-check, never a
    reason a readable stack is refused.
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                return _tiff_z_step_um(tif)
        if path.is_dir():
            import zarr

            node = zarr.open(str(path), mode="r")
            return _ngff_z_step_um(dict(node.attrs)) if isinstance(node, zarr.Group) else None
    except Exception:  # the stack's reader reports an unreadable file, not this check
        return None
    return None


def focus_step_problem(path: Path, step_um: float) -> str | None:
    """Return why `step_um` disagrees with the step `path` records (one clause), or None."""
    recorded = recorded_focus_step_um(path)
    if recorded is None or math.isclose(abs(step_um), recorded[0], rel_tol=Z_STEP_REL_TOL):
        return None
    step, where = recorded
    return (
        f"the file records a focus step of {step:g} µm ({where}); give the file's step (its "
        "sign says the scan's direction), or correct the file"
    )


def full_scale(stack: np.ndarray) -> float:
    """Return the value the camera of `stack` saturates at (inf for floats).

    The dtype's maximum, or a lower full scale the stack reaches exactly: a 12-bit camera
    stored as uint16 clips at 4095 (2**k - 1 for k of 8 to 15), which the dtype's 65535
    never caught (review 85: 18 clipped beads kept, the in-focus peak at half its value).
    """
    if not np.issubdtype(stack.dtype, np.integer):
        return float("inf")
    top = int(np.iinfo(stack.dtype).max)
    reached = max(int(np.asarray(stack[k]).max()) for k in range(stack.shape[0]))
    if reached >= 255 and (reached + 1) & reached == 0:  # 2**k - 1: a camera's full scale
        return float(min(reached, top))
    return float(top)


def saturated_mask(stack: np.ndarray) -> np.ndarray:
    """Return (H, W) bool: where any plane of the (Z, H, W) camera `stack` is at full scale."""
    top = full_scale(stack)
    mask = np.zeros(stack.shape[1:], dtype=bool)
    if np.isfinite(top):
        for plane in stack:  # plane by plane: no (Z, H, W) bool copy of a large stack
            mask |= plane >= top
    return mask
