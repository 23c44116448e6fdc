"""Digital Propagation Matrices (DPMs): per-pixel refocusing distances in µm.

A DPM is a float32 (H, W) array, the frame's shape, whose value at a pixel is the axial
distance (µm) from the frame's focal plane to the wanted surface there. The sign follows the
optics simulator's z axis (`engine.optics`): a DPM of +d asks for the plane whose focal
position is ``z + d`` in a focal stack's `z_um` order (positive = deeper, further from the
objective). A `VolumePlan` is an ordered list of DPMs with labels: the virtual stack the
engine computes for each frame. Scaling µm to the network's input happens only in
`normalize_dpms` (re-exported from `engine.metadata`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.metadata import normalize_dpms

__all__ = [
    "DPMError",
    "FocusLock",
    "VolumePlan",
    "from_image",
    "normalize_dpms",
    "polynomial",
    "tilted",
    "uniform",
    "validate_dpm",
    "with_drift",
]


class DPMError(ValueError):
    """A DPM or volume plan is unusable: wrong shape, not finite, or outside the model's range."""


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Validate a frame shape (H, W) of positive ints."""
    if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
        raise DPMError(f"DPM shape must be (H, W) with positive integer sides, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _coords_um(
    shape: tuple[int, int], pixel_size_um: float, center: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Return x (1, W) and y (H, 1) offsets in µm of pixel centres from `center` (row, col)."""
    h, w = _check_shape(shape)
    if not pixel_size_um > 0:
        raise DPMError(f"pixel_size_um must be > 0, got {pixel_size_um}")
    cy, cx = ((h - 1) / 2, (w - 1) / 2) if center is None else center
    x = (np.arange(w, dtype=np.float64) - cx)[None, :] * pixel_size_um
    y = (np.arange(h, dtype=np.float64) - cy)[:, None] * pixel_size_um
    return x, y


def uniform(shape: tuple[int, int], z_um: float) -> np.ndarray:
    """Build a flat DPM: refocus the whole frame by `z_um`."""
    if not np.isfinite(z_um):
        raise DPMError(f"z_um must be finite, got {z_um}")
    return np.full(_check_shape(shape), z_um, dtype=np.float32)


def tilted(
    shape: tuple[int, int],
    z0_um: float,
    slope_x: float,
    slope_y: float,
    *,
    pixel_size_um: float,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """Build a tilted plane ``z0 + slope_x·x + slope_y·y`` (slopes in µm per µm).

    x, y are µm from `center` (row, col in pixels; default the frame centre), x along columns
    and y along rows, so `z0_um` is the value at the centre.
    """
    x, y = _coords_um(shape, pixel_size_um, center)
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, by name
        out: np.ndarray = (z0_um + slope_x * x + slope_y * y).astype(np.float32)
    return _finite(out, f"tilted plane (z0 {z0_um}, slopes {slope_x}, {slope_y})")


def polynomial(
    shape: tuple[int, int],
    coefficients: Sequence[float],
    *,
    pixel_size_um: float,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """Build a rotationally symmetric surface ``c0 + c1·r² + c2·r⁴ + …`` (r in µm from `center`).

    With ``(z0, a)`` this is the usual field-curvature model; `center` is (row, col) in pixels,
    the frame centre by default.
    """
    coeffs = [float(c) for c in coefficients]
    if not coeffs or not all(np.isfinite(coeffs)):
        raise DPMError(
            f"coefficients must be a non-empty list of finite numbers, got {coefficients!r}"
        )
    x, y = _coords_um(shape, pixel_size_um, center)
    r2 = x**2 + y**2
    out = np.zeros(r2.shape)
    with np.errstate(over="ignore", invalid="ignore"):  # refused below, by name
        for c in reversed(coeffs):
            out = out * r2 + c
        result: np.ndarray = out.astype(np.float32)
    return _finite(result, f"polynomial surface {coeffs}")


def _finite(dpm: np.ndarray, what: str) -> np.ndarray:
    """Return `dpm`, or raise `DPMError` when a value is NaN or beyond float32 (infinite)."""
    if not np.isfinite(dpm).all():
        raise DPMError(f"{what} gives values that are not finite µm over this frame")
    return dpm


def with_drift(dpm_um: np.ndarray, offset_um: float) -> np.ndarray:
    """Return the DPM shifted by a per-frame axial offset (µm, + deeper).

    To follow a focus that drifted by d µm, the offset is ``-stage_z_sign * d`` (what
    `FocusLock.offset_um` computes), not d itself: the planes move against the focal plane.
    """
    if not np.isfinite(offset_um):
        raise DPMError(f"offset_um must be finite, got {offset_um}")
    out: np.ndarray = (np.asarray(dpm_um, dtype=np.float32) + np.float32(offset_um)).astype(
        np.float32, copy=False
    )
    return out


def from_image(path: str | Path) -> np.ndarray:
    """Read a DPM (µm) from a single-plane TIFF image."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise DPMError(f"DPM file not found: {path}")
    try:
        data = tifffile.imread(path)
    except Exception as exc:
        raise DPMError(f"{path}: cannot read DPM as TIFF: {exc}") from exc
    data = np.squeeze(np.asarray(data))
    if data.ndim != 2:
        raise DPMError(f"{path}: a DPM image must be 2-D (H, W), got shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise DPMError(f"{path}: DPM must be real numeric, got dtype {data.dtype}")
    out: np.ndarray = data.astype(np.float32)
    if not np.isfinite(out).all():  # NaN, or beyond float32's range once cast
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise DPMError(f"{path}: the DPM holds {bad} NaN or infinite value(s)")
    return out


def validate_dpm(
    dpm_um: np.ndarray,
    frame_shape: tuple[int, int],
    dz_range_um: tuple[float, float],
    *,
    allow_extrapolation: bool = False,
) -> np.ndarray:
    """Check a DPM against a frame and a model's trained range; return it as float32.

    Raises `DPMError` when the shape differs from the frame, a value is not finite, or (unless
    `allow_extrapolation`) a value lies outside `dz_range_um`, naming the offending range.
    """
    arr = np.asarray(dpm_um)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise DPMError(f"DPM must be real numeric, got dtype {arr.dtype}")
    if arr.shape != tuple(frame_shape):
        raise DPMError(f"DPM shape {arr.shape} does not match the frame shape {tuple(frame_shape)}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise DPMError(f"DPM has {int(np.sum(~np.isfinite(arr)))} non-finite values (NaN or inf)")
    lo, hi = dz_range_um
    vmin, vmax = float(arr.min()), float(arr.max())
    if not allow_extrapolation and (vmin < lo or vmax > hi):
        raise DPMError(
            f"DPM values span [{vmin:g}, {vmax:g}] µm, outside the model's trained range "
            f"[{lo:g}, {hi:g}] µm; set allow_extrapolation to refocus beyond it"
        )
    return arr


def _z_label(z: float) -> str:
    """Label of a uniform plane to 1e-6 µm, e.g. ``z=+2.5um``.

    Fixed-point to the config's plane rounding (`live.config` rounds planes to 1e-6 µm), so
    two planes a config can tell apart never share a label (``:g``'s 6 significant digits
    merged 12.345671 with 12.34567).
    """
    text = f"{z:+.6f}".rstrip("0").rstrip(".")
    return f"z={'+0' if text == '-0' else text}um"  # a negative zero, or -4e-7, is plane 0


@dataclass(frozen=True)
class VolumePlan:
    """An ordered list of DPMs (P, H, W) float32 in µm with a label each.

    `z_um` holds the plane offsets when every DPM is uniform (from `from_z`), else None.
    """

    dpms_um: np.ndarray
    labels: tuple[str, ...]
    z_um: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        d = self.dpms_um
        if not isinstance(d, np.ndarray) or d.ndim != 3 or d.dtype != np.float32:
            got = getattr(d, "shape", type(d).__name__), getattr(d, "dtype", None)
            raise DPMError(f"VolumePlan.dpms_um must be a (P, H, W) float32 array, got {got}")
        if d.shape[0] == 0:
            raise DPMError("a VolumePlan needs at least one DPM")
        if len(self.labels) != d.shape[0]:
            raise DPMError(f"{len(self.labels)} labels for {d.shape[0]} DPMs")
        if len(set(self.labels)) != len(self.labels):
            raise DPMError(f"VolumePlan labels must be unique, got {self.labels}")
        if self.z_um is not None and len(self.z_um) != d.shape[0]:
            raise DPMError(f"{len(self.z_um)} z values for {d.shape[0]} DPMs")

    def __len__(self) -> int:
        return int(self.dpms_um.shape[0])

    def frozen(self) -> VolumePlan:
        """Return this plan with its DPMs copied read-only (C order, owning their data).

        Backends recognise such DPMs and normalise a per-plane model's DPM channel once,
        not per frame (the live worker and offline refocusing hold their plan this way).
        """
        dpms = np.array(self.dpms_um, dtype=np.float32, order="C", copy=True)
        dpms.setflags(write=False)
        return VolumePlan(dpms, self.labels, self.z_um)

    def digest(self) -> str:
        """SHA-256 (hex) of the plan: its labels, offsets and every DPM value.

        Two builds of one config give the same digest unless a surface's DPM file changed in
        between (the daemon's workers build their plan again and compare it with this).
        """
        h = hashlib.sha256(json.dumps([self.labels, self.z_um]).encode())
        h.update(np.ascontiguousarray(self.dpms_um, dtype=np.float32).tobytes())
        h.update(repr(self.dpms_um.shape).encode())
        return h.hexdigest()

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(H, W) of the DPMs."""
        return int(self.dpms_um.shape[1]), int(self.dpms_um.shape[2])

    @classmethod
    def from_z(cls, z_values: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> VolumePlan:
        """Build a plan of uniform planes at `z_values` (µm), labelled ``z=+2um`` etc."""
        zs = tuple(float(z) for z in np.asarray(z_values, dtype=np.float64).reshape(-1))
        labels = tuple(_z_label(z) for z in zs)
        seen: dict[str, float] = {}
        for z, label in zip(zs, labels, strict=True):
            if not math.isfinite(z):
                raise DPMError(f"z = {z} µm is not a depth")
            if label in seen:  # a plane asked twice, or two closer than a label tells apart
                other = seen[label]
                what = f"z = {z:g} µm is asked twice"
                if z != other:
                    what = f"z = {other!r} and {z!r} µm are one plane at 1e-6 µm"
                raise DPMError(f"{what}; each plane needs its own depth (and label)")
            seen[label] = z
        dpms = (
            np.stack([uniform(shape, z) for z in zs]) if zs else np.zeros((0, *shape), np.float32)
        )
        return cls(dpms.astype(np.float32, copy=False), labels, zs)

    @classmethod
    def from_dpms(cls, dpms_um: Sequence[np.ndarray], labels: Sequence[str]) -> VolumePlan:
        """Build a plan of arbitrary DPMs (each (H, W), same shape) with their labels."""
        arrays = [np.asarray(d, dtype=np.float32) for d in dpms_um]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DPMError(f"all DPMs of a plan must have the same shape, got {sorted(shapes)}")
        return cls(np.stack(arrays) if arrays else np.zeros((0, 1, 1), np.float32), tuple(labels))

    def validate(
        self,
        frame_shape: tuple[int, int],
        dz_range_um: tuple[float, float],
        allow_extrapolation: bool = False,
    ) -> None:
        """Check every DPM with `validate_dpm`; the error names the failing plane's label."""
        for label, dpm in zip(self.labels, self.dpms_um, strict=True):
            try:
                validate_dpm(dpm, frame_shape, dz_range_um, allow_extrapolation=allow_extrapolation)
            except DPMError as exc:
                raise DPMError(f"plane {label!r}: {exc}") from exc


@dataclass(frozen=True)
class FocusLock:
    """Keep a plan's planes at fixed depths in the sample while the stage focus moves.

    The paper's drift correction, live: a frame taken with the stage at `focus_um` is refocused
    onto the plan's DPMs shifted by ``-sign · (focus_um - reference_um)``, so a plane defined
    ``d`` µm from the reference focus stays ``d`` µm from it in the sample. `sign` is +1 when a
    larger stage position focuses deeper into the sample (the DPM's + direction), -1 when it
    focuses shallower. The shift is clamped to [`min_offset_um`, `max_offset_um`], the range
    that keeps every DPM inside the model's trained depths (`for_plan`); a clamped frame's planes
    are then off by the excess, which `offset_um` reports.
    """

    reference_um: float
    sign: float = 1.0
    min_offset_um: float = -np.inf
    max_offset_um: float = np.inf

    @classmethod
    def for_plan(
        cls,
        plan: VolumePlan,
        reference_um: float,
        sign: float = 1.0,
        dz_range_um: tuple[float, float] | None = None,
    ) -> FocusLock:
        """Build the lock for `plan`, clamped so its DPMs stay within `dz_range_um` (if given)."""
        if not np.isfinite(reference_um) or sign not in (1.0, -1.0):
            raise DPMError(
                f"focus lock needs a finite reference and sign ±1, got {reference_um}, {sign}"
            )
        if dz_range_um is None:
            return cls(float(reference_um), float(sign))
        lo, hi = float(plan.dpms_um.min()), float(plan.dpms_um.max())
        if hi - lo > dz_range_um[1] - dz_range_um[0]:
            raise DPMError(
                f"the planes span {lo:g} … {hi:g} µm, wider than the depths the focus lock may "
                f"shift them within ({dz_range_um[0]:g} … {dz_range_um[1]:g} µm)"
            )
        return cls(float(reference_um), float(sign), dz_range_um[0] - lo, dz_range_um[1] - hi)

    def offset_um(self, focus_um: float) -> tuple[float, float]:
        """Return (DPM offset µm, excess µm clamped away) for a frame taken at `focus_um`."""
        try:  # any real number; NumPy's isfinite refuses ints beyond 64 bits with TypeError
            finite = math.isfinite(focus_um)
        except (TypeError, OverflowError):
            finite = False
        if not finite:
            raise DPMError(f"focus_um must be a finite number, got {focus_um!r:.40}")
        wanted = -self.sign * (float(focus_um) - self.reference_um)
        offset = min(max(wanted, self.min_offset_um), self.max_offset_um)
        if not np.isfinite(offset):  # a focus so far off that even the difference overflows
            offset = 0.0
        return offset, wanted - offset
