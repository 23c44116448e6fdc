"""A lab's stack file: its planes, and what it records, checked before they are used.

Focus-scanned stacks are trained on (`engine.train.read_lab_stack`, both trainers) and
measured for a PSF bank (`engine.psf_calibration`); both read them here (`read_stack`) and
check them here, once.

- **The planes.** `read_stack` reads .npy, TIFF (OME or ImageJ) and OME-Zarr / Zarr as one
  (focus, height, width) array of numbers; anything else, or any reader's failure, is a
  `LabFileError` naming the file and why, in one line.

- **The focus step.** The stack is read at the step its config or command line gives; a wrong
  step teaches or measures the wrong defocus for every plane, unsaid. Where the file records its
  own step (OME-TIFF ``PhysicalSizeZ``, ImageJ ``spacing``, an OME-Zarr image's z scale) the
  two are compared. The recorded step has no sign (the scan's direction is the user's to give),
  so only sizes are; a file that records nothing is taken at the user's word.
- **The camera's full scale.** A clipped pixel is no measurement: a bead's peak at the
  camera's ceiling is a flat top, and trained on as a target it teaches that in-focus beads are
  flat. `full_scale` says where a stack clips (the dtype's maximum, or the lower full scale of a
  12-bit camera stored as uint16, in the low bits or shifted into the top ones),
  `saturated_mask` where it did.

Standard library and NumPy only (TIFF and Zarr readers are imported when a file needs them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FULL_SCALE_EVIDENCE_PX",
    "Z_STEP_REL_TOL",
    "LabFileError",
    "focus_step_problem",
    "full_scale",
    "ngff_image",
    "ngff_level0_path",
    "read_stack",
    "recorded_focus_step_um",
    "saturated_mask",
]

Z_STEP_REL_TOL = 0.01
"""A lab stack's given focus step may differ this much (relative) from the one its file
records: stage steps are written rounded, a wrong step is usually 2x, 10x or a unit off."""

_UM_PER_UNIT = {
    "micron": 1.0, "microns": 1.0, "um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
}  # fmt: skip

FULL_SCALE_EVIDENCE_PX = 3
"""Pixels that must sit exactly at an inferred 2**k - 1 full scale before it counts as one: a
bright unclipped bead's single brightest pixel lands on 8191 about once in 5,000 stacks
(review 86), a clipped bead's flat top holds several."""


class LabFileError(ValueError):
    """A stack file that cannot be read as (focus, height, width) numbers; one line says why."""


def read_stack(path: Path) -> np.ndarray:
    """Read a focus-scanned stack (Z, H, W) from .npy, .tif/.tiff or an OME-Zarr / Zarr array.

    An OME-Zarr image gives its full-resolution level (`ngff_level0_path`). A file of more than
    three axes has its length-1 ones dropped (time, channel, a trailing sample axis:
    Micro-Manager writes Z, C, Y, X); anything else that is not 3-D numbers of at least two
    planes is refused, naming the file's shape. The array keeps the file's dtype: `full_scale`
    reads the camera's counts as they were written.
    """
    if not path.exists():
        raise LabFileError(f"{path}: no such stack file ({_READABLE})")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".tif", ".tiff") and not path.is_dir():
        raise LabFileError(f"{path}: not a stack file this reads ({_READABLE})")
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(path)
        else:
            import zarr

            node = zarr.open(str(path), mode="r")
            if isinstance(node, zarr.Group):  # OME-Zarr image: its full-resolution level
                level = ngff_level0_path(dict(node.attrs))
                if ngff_image(dict(node.attrs)) is None and level not in node:
                    raise LabFileError(f"{path}: a Zarr group holding no OME-Zarr image")
                node = node[level]
            if not isinstance(node, zarr.Array):
                raise LabFileError(f"{path}: level 0 of the OME-Zarr image is not an array")
            data = node[...]
    except LabFileError:
        raise
    except Exception as exc:  # any reader's failure (format, codec, I/O) is one line for the user
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise LabFileError(f"{path}: cannot read a stack ({why})") from exc
    data = np.asarray(data)
    shape = data.shape
    if data.ndim > 3:
        data = data.reshape(tuple(n for n in shape if n != 1))
    if data.ndim != 3 or data.dtype.kind not in "iuf":
        raise LabFileError(
            f"{path}: a stack must be (focus, height, width) numbers, got "
            f"{_shape_text(shape)} {data.dtype}"
        )
    if data.shape[0] < 2 or data.size == 0:
        raise LabFileError(
            f"{path}: a focus scan needs at least 2 planes of at least 1 pixel, got "
            f"{_shape_text(shape)}"
        )
    out: np.ndarray = data
    return out


_READABLE = "expected .npy, .tif/.tiff or an OME-Zarr folder"


def _shape_text(shape: tuple[int, ...]) -> str:
    """Return a shape as "3x40x40" ("a scalar" for none)."""
    return "x".join(map(str, shape)) or "a scalar"


def _unit_key(unit: Any) -> str:
    """Return a unit's lookup key: lower case, ImageJ's ASCII-escaped µ (backslash-u00B5) undone."""
    text = str(unit).strip()
    if "\\u" in text:  # ImageJ writes µ as the six characters \u00B5; tifffile keeps them
        text = text.encode("ascii", "backslashreplace").decode("unicode_escape")
    return text.lower()


def _step_um(value: Any, unit: Any) -> float | None:
    """Return a recorded step in µm; None unless it is a finite positive length, known unit."""
    try:
        step = abs(float(value)) * _UM_PER_UNIT[_unit_key(unit)]
    except (TypeError, ValueError, KeyError, UnicodeError):
        return None
    return step if math.isfinite(step) and step > 0 else None


def _ome_z_step_um(xml: str) -> float | None:
    """Return the first image's ``PhysicalSizeZ`` in µm (OME's default unit when none is given).

    The first ``Image/Pixels`` element only, size and unit from that one element: it is the
    series ``tifffile.imread`` reads, and another series' calibration says nothing of it.
    """
    from xml.etree import ElementTree

    root = ElementTree.fromstring(xml)
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeZ" not in pixels.attrib:
        return None
    return _step_um(pixels.attrib["PhysicalSizeZ"], pixels.attrib.get("PhysicalSizeZUnit", "µm"))


def _tiff_z_step_um(tif: Any) -> tuple[float, str] | None:
    """Return the focus step a TIFF records (OME ``PhysicalSizeZ``, ImageJ ``spacing``)."""
    if tif.is_ome and tif.ome_metadata and (step := _ome_z_step_um(tif.ome_metadata)):
        return step, "OME PhysicalSizeZ"
    meta = tif.imagej_metadata or {}
    unit = meta.get("zunit", meta.get("unit"))  # ImageJ adds zunit when z's unit differs
    if "spacing" in meta and unit is not None and (step := _step_um(meta["spacing"], unit)):
        return step, "ImageJ spacing"
    return None


def _ngff_z_step_um(attrs: dict[str, Any]) -> tuple[float, str] | None:
    """Return the focus step an OME-Zarr image records: its "z" axis' scale, in its unit.

    The first dataset's scale times the multiscale's own (NGFF lets both scale); None without
    a unit on the z axis (ome-zarr-py writes scale 1 with no unit by default: no calibration).
    """
    image = ngff_image(attrs)
    if image is None:
        return None
    try:
        axes = image["axes"]
        names = [a["name"] if isinstance(a, dict) else a for a in axes]
        i = names.index("z")
        if not isinstance(axes[i], dict) or "unit" not in axes[i]:
            return None
        scale = 1.0
        for transforms in (
            image["datasets"][0].get("coordinateTransformations", []),
            image.get("coordinateTransformations", []),
        ):
            for transform in transforms:
                if transform.get("type") == "scale":
                    scale *= float(transform["scale"][i])
        step = _step_um(scale, axes[i]["unit"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None  # no readable z scale: nothing to compare
    return (step, "NGFF z scale") if step else None


def ngff_image(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """Return an OME-Zarr group's first multiscale image (NGFF 0.4 or 0.5), or None."""
    ome = attrs.get("ome", attrs)  # NGFF 0.5 nests the metadata under "ome"
    try:
        image = ome["multiscales"][0]
    except (KeyError, IndexError, TypeError):
        return None
    return image if isinstance(image, dict) else None


def ngff_level0_path(attrs: dict[str, Any]) -> str:
    """Return the path of an OME-Zarr image's full-resolution level ("0" when none is named).

    ome-zarr-py names its levels "s0", "s1", ...; this project's recorder "0".
    """
    image = ngff_image(attrs)
    try:
        path = image["datasets"][0]["path"] if image is not None else "0"
    except (KeyError, IndexError, TypeError):
        return "0"
    return str(path)


def recorded_focus_step_um(path: Path) -> tuple[float, str] | None:
    """Return the focus step (µm) `path` records and where it says so, or None.

    None for a file that records no step, a step in no known length unit (ImageJ's
    uncalibrated "pixel", an NGFF axis without a unit), or metadata that cannot be read.
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
    """Return how `step_um` disagrees with the step `path` records (one clause), or None.

    The caller adds its remedy (its own way to set the step, or to skip this check for a file
    whose calibration is wrong).
    """
    recorded = recorded_focus_step_um(path)
    if recorded is None or math.isclose(abs(step_um), recorded[0], rel_tol=Z_STEP_REL_TOL):
        return None
    step, where = recorded
    return f"the file records a focus step of {step:g} µm ({where})"


def full_scale(stack: np.ndarray) -> float:
    """Return the value the camera of `stack` saturates at (inf for floats).

    The dtype's maximum, or a lower full scale the stack reaches exactly in at least
    `FULL_SCALE_EVIDENCE_PX` pixels: a 12-bit camera stored as uint16 clips at 4095 (2**k - 1
    for k of 8 to 15), which the dtype's 65535 never caught (review 85: 18 clipped beads kept,
    the in-focus peak at half its value); stored shifted into the top bits (every value a
    multiple of 2**s, s of 1 to 8) it clips at the dtype's maximum + 1 - 2**s, 65520 for 12
    bits in uint16.
    """
    if not np.issubdtype(stack.dtype, np.integer):
        return float("inf")
    top = int(np.iinfo(stack.dtype).max)
    reached = max(int(np.asarray(stack[k]).max()) for k in range(stack.shape[0]))
    if reached >= top or reached < 255:
        return float(top)
    low_bits = (reached + 1) & reached == 0  # 2**k - 1: a camera's scale in the low bits?
    shift = top + 1 - reached  # 2**s: one shifted into the top bits?
    high_bits = shift & (shift - 1) == 0 and shift <= 256 and _multiples_of(stack, shift)
    if low_bits or high_bits:
        at = sum(int(np.count_nonzero(np.asarray(stack[k]) == reached)) for k in range(len(stack)))
        if at >= FULL_SCALE_EVIDENCE_PX:
            return float(reached)
    return float(top)


def _multiples_of(stack: np.ndarray, step: int) -> bool:
    """Return whether every value of the integer `stack` is a multiple of `step` (a power of 2)."""
    mask = step - 1
    return all(not np.any(np.asarray(plane) & mask) for plane in stack)


def saturated_mask(stack: np.ndarray, top: float | None = None) -> np.ndarray:
    """Return (H, W) bool: where any plane of the (Z, H, W) camera `stack` is at full scale.

    `top` is `full_scale(stack)` when the caller has it already (it reads the whole stack).
    """
    top = full_scale(stack) if top is None else top
    mask = np.zeros(stack.shape[1:], dtype=bool)
    if np.isfinite(top):
        for plane in stack:  # plane by plane: no (Z, H, W) bool copy of a large stack
            mask |= plane >= top
    return mask
