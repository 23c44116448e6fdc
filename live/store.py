"""The layout of a run store: one OME-Zarr 0.5 collection of NGFF images per run.

This module says where everything is in a run store and builds its metadata; `live.recorder`
writes the store live and `live.refocus` reads it. Layout (zarr v3)::

    /                 attrs["ome"]: {"version": "0.5", "bioformats2raw.layout": 3};
                      attrs["deepz"]: run config, which group holds which image (``images``),
                      the stack axis, the seqs present per image, the summary
    /OME              attrs["ome"]["series"]: the image groups in order; METADATA.ome.xml
                      (OME-XML, one <Image> per group, names "raw" / "stacks")
    /0                NGFF image "raw" (t, y, x) uint16, with an omero display window
    /1                NGFF image "stacks" (t, z, y, x) float16 or float32 (`STACK_DTYPES`),
                      camera counts: z in µm relative to focus (uniform planes), or
                      (t, plane | surface, y, x) with no physical scale
    /1/dpms_um        surfaces only: the DPMs (P, H, W) float32, µm from the focal plane
    /frames           per-seq frame metadata, 1-D float64 arrays indexed like t:
                      timestamp_s (camera clock) and focus_um (stage z); NaN where no frame

When raw frames are not kept, the stacks image is ``/0``; ``attrs["deepz"]["images"]`` always
names the group of each image (`image_groups`). Images added after the run (offline refocusing,
``--fill-gaps`` of a run that kept no stacks) take the next numbered group and are listed there,
in ``OME/series`` and in METADATA.ome.xml (`register_image`). Stores written before this
layout (images at ``/raw`` and ``/stacks``, no ``images`` key) are read through the same
function.

Why this layout: the OME-Zarr 0.5 specification keeps several images in one store only as a
``bioformats2raw.layout`` collection (section "bioformats2raw.layout (transitional)"): without
an ``OME/series`` list the images MUST be in groups numbered from 0, and readers MAY use the
list. Numbered groups *and* the list therefore reach every conforming reader: yaozarrs'
validator and ngff-zarr follow ``series``; ome-zarr-py (``ome_zarr.utils.find_multiscales``,
behind ``ome_zarr finder``) and napari-ome-zarr's collection reader take the images from
``OME/METADATA.ome.xml`` (image *i* is group *i*, or the group named by its ``Image:<path>``
ID); tools that only look for ``/0`` find the raw frames. The spec lets readers ignore other
groups under the root, which is where ``/frames`` lives.

The stacks' dtype is ``recorder.stack_dtype``. float16 halves the bytes of every stack on the
wire and on disk (at 100 Hz, 41 planes of 512², 2.2 GB/s instead of 4.3) for a rounding error of
at most 2^-11 (4.9e-4) of each value, 8 to 11 times below the shot noise of even a pixel at
65504 counts (0.4 to 0.55 % at 1 to 2 counts per electron); `as_stack_dtype` saturates values
beyond ±65504 counts (overexposed frames can refocus above the camera's range) instead of
letting them become infinite, and counts them. OME-XML has no half-float pixel type, so
METADATA.ome.xml calls such an image ``float``: the array's own ``data_type`` says float16, and
that is what readers load.

Each array is a zarr v3 array whose time axis is cut into shards (one file per shard holding
several frames' chunks, `shard_frames`), so a fast run does not make a file per frame.

The stack axis is honest: evenly spaced planes are a ``space`` axis ``z`` in micrometres with
the first plane as its translation (so ome-zarr-py places the planes at −8 … +8 µm, not
0 … 16; napari-ome-zarr 0.9 and later read only the scale, README "Known gaps"); uneven plane
lists and surfaces get a custom axis (``plane`` / ``surface``) with scale 1 and no unit, their
z values or DPMs in the attributes and arrays beside them, never invented z positions.
"""

from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.files import atomic_write_bytes

__all__ = [
    "DPMS_ARRAY",
    "FLOAT16_MAX",
    "FRAMES_GROUP",
    "FRAME_FIELDS",
    "LAYOUT_VERSION",
    "OME_GROUP",
    "ROLES",
    "STACK_DTYPES",
    "StackAxis",
    "WindowSampler",
    "XmlImage",
    "array_path",
    "as_stack_dtype",
    "collection_attrs",
    "frame_metadata",
    "image_axes",
    "image_group",
    "image_groups",
    "ngff_image",
    "ome_xml",
    "omero",
    "present_runs",
    "register_image",
    "reserved_names",
    "series_attrs",
    "shard_frames",
    "write_atomic",
    "write_ome_xml",
]

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2
"""``attrs["deepz"]["layout"]`` of this layout (stores without the key are layout 1)."""
ROLES = ("raw", "stacks")
"""The images of a run store, in the order their groups are numbered."""
OME_GROUP = "OME"
"""The collection's metadata group (``series`` list and METADATA.ome.xml)."""
FRAMES_GROUP = "frames"
"""Group of the per-seq frame metadata arrays."""
FRAME_FIELDS = {
    "timestamp_s": "camera timestamp of the frame, s (the source's clock, from the frame header)",
    "focus_um": "focus (stage z) position of the frame, µm (from the frame header)",
}
"""The per-seq frame metadata arrays in `FRAMES_GROUP` and what each holds."""
DPMS_ARRAY = "dpms_um"
"""Array of the surfaces' DPMs (P, H, W) µm inside the stacks image group (surfaces only)."""
_LEGACY_GROUPS = {"raw": "raw", "stacks": "stacks"}
"""Where layout 1 kept the images."""
_SPACE = {"type": "space", "unit": "micrometer"}
_TIME = {"name": "t", "type": "time", "unit": "second"}
_LABELS = {"raw": "raw frames", "stacks": "refocused stacks"}
_OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
_XML_TYPES = {"uint16": "uint16", "float32": "float", "float16": "float"}
"""OME-XML pixel types; OME-XML has no half float (see the module docstring)."""
STACK_DTYPES = ("float16", "float32")
"""The dtypes stacks may travel and be stored in (``recorder.stack_dtype``)."""
FLOAT16_MAX = float(np.finfo(np.float16).max)
"""The largest finite float16, 65504: float16 stacks saturate at ± this many camera counts."""
_INF_BITS = {n: int(np.array(np.inf, f"f{n}").view(f"u{n}")) for n in (2, 4, 8)}
"""The bit pattern of +inf per float size in bytes (NaNs lie above it)."""


def as_stack_dtype(
    stack: np.ndarray, dtype: str | np.dtype[Any], *, saturate_same: bool = False
) -> tuple[np.ndarray, int]:
    """Return `stack` as `dtype` (C-contiguous) and how many values were saturated.

    Values round to the nearest `dtype` value. One whose magnitude rounds past the largest
    finite one (float16: 65504 counts) is saturated to it with its sign, not made infinite,
    and counted, as is an input that is already infinite: a viewer's window and a later
    analysis see a bright pixel, not ``inf``. NaN stays NaN. The cast is the one pass over
    the data; the overflow check reads the (narrower) result.

    Parameters
    ----------
    stack : numpy array
        Planes of any real dtype, e.g. a backend's (P, H, W) float32.
    dtype : str or numpy dtype
        A floating dtype, one of `STACK_DTYPES`.
    saturate_same : bool
        Also saturate (and count) infinite values when `stack` already has `dtype`: planes a
        backend rendered straight into float16 (`Backend.refocus(..., dtype=)`), whose cast
        happened there; they are saturated in place. Otherwise such a stack is returned as
        it is.
    """
    target = np.dtype(dtype)
    if not np.issubdtype(target, np.floating):
        raise ValueError(f"stacks are stored as floats ({STACK_DTYPES}), not {target}")
    if stack.dtype == target:
        out = np.ascontiguousarray(stack)
        if not saturate_same:
            return out, 0
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.array(stack, dtype=target, order="C")  # a new array: ours to change
    if not out.size or _largest_bits(out) < _INF_BITS[target.itemsize]:
        return out, 0  # the common case, decided on integer bits: no inf (and no NaN)
    infinite = np.isinf(out)
    clipped = int(np.count_nonzero(infinite))
    if clipped:
        out[infinite] = np.copysign(np.finfo(target).max, out[infinite])
    return out, clipped


def _largest_bits(values: np.ndarray) -> int:
    """Return the largest magnitude bit pattern of a float array (sign bit masked off).

    Integer SIMD is several times faster than `np.isinf` on float16, which numpy emulates; a
    result at or above the dtype's infinity pattern means an inf or a NaN is present.
    """
    size = values.dtype.itemsize
    bits = values.view(f"u{size}")
    return int(np.bitwise_and(bits, (1 << (8 * size - 1)) - 1).max())


def shard_frames(
    item_shape: Sequence[int],
    dtype: str | np.dtype[Any],
    *,
    rate_hz: float,
    shard_s: float,
    max_mb: float,
    chunk: int = 1,
) -> int:
    """Return how many time points one shard of an image holds (a multiple of `chunk`).

    About `shard_s` seconds of items at `rate_hz`, but at most `max_mb` MB uncompressed (the
    recorder holds a shard in memory until it is full), and at least one chunk. A result
    equal to `chunk` means no sharding (one file per chunk), as does ``shard_s = 0``.
    """
    if shard_s <= 0:
        return chunk
    item_mb = float(np.prod(item_shape)) * np.dtype(dtype).itemsize / 2**20
    frames = min(rate_hz * shard_s, max_mb / max(item_mb, 1e-12))
    return chunk * max(1, int(frames // chunk))


def image_groups(deepz: Mapping[str, Any]) -> dict[str, str]:
    """Return ``{role: group path}`` of a run store's images from its ``attrs["deepz"]``.

    Layout 2 lists them in ``images`` (only the images the run kept); a layout 1 store (no
    ``images`` key) kept them at ``raw`` and ``stacks``. The caller checks that a group exists.
    """
    images = deepz.get("images")
    if isinstance(images, Mapping):
        return {str(role): str(path) for role, path in images.items()}
    return dict(_LEGACY_GROUPS)


def array_path(deepz: Mapping[str, Any], role: str) -> str | None:
    """Return the full-resolution array of image `role` (e.g. ``"0/0"``), or None if not kept."""
    group = image_groups(deepz).get(role)
    return None if group is None else f"{group}/0"


def frame_metadata(root: Any, name: str, count: int | None = None) -> np.ndarray | None:
    """Read one per-seq frame metadata array of a run store (`FRAME_FIELDS`), None if absent.

    Indexed like the images' t axis (the camera sequence number); NaN where no frame. With
    `count` (the image's time points), only its first `count` values are read: a store is
    input, and a forged array far longer than the image is not read whole (review 67). One
    that is not 1-D is treated as absent.
    """
    if name not in FRAME_FIELDS:
        raise ValueError(f"{name!r} is not a frame field; known: {sorted(FRAME_FIELDS)}")
    key = f"{FRAMES_GROUP}/{name}"
    if key not in root:
        return None
    values = root[key]
    if len(values.shape) != 1:
        return None
    return np.asarray(values[: count if count is not None else None], dtype=np.float64)


def present_runs(present: object, n: int) -> list[tuple[int, int]]:
    """Return a run store's presence runs (``raw_present``) clipped to [0, n), sorted, merged.

    The attribute is input: a forged one may hold runs out of order, overlapping, repeated or
    far past the array (review 67). The runs come back disjoint and in order, so each time
    point is read once, and a run past the array costs nothing.

    Raises
    ------
    ValueError
        `present` is not a list of ``[start, stop)`` integer pairs.
    """
    if not isinstance(present, list | tuple):
        raise ValueError(
            f"presence runs must be a list of [start, stop) pairs, not {present!r:.60}"
        )
    runs = []
    for run in present:
        if not (
            isinstance(run, list | tuple) and len(run) == 2 and all(type(v) is int for v in run)
        ):
            raise ValueError(f"a presence run must be [start, stop) integers, not {run!r:.60}")
        runs.append((max(run[0], 0), min(run[1], n)))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(runs):
        if a >= b:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def reserved_names(deepz: Mapping[str, Any]) -> set[str]:
    """Return the root names a run store's own data uses (other images must not take them).

    The run's own images (``raw``, ``stacks``), not the offline ones listed beside them: a
    rerun of an offline image finds and resumes it.
    """
    groups = image_groups(deepz)
    own = {groups[role] for role in ROLES if role in groups}
    return {*own, *ROLES, *_LEGACY_GROUPS.values(), OME_GROUP, FRAMES_GROUP}


def collection_attrs() -> dict[str, Any]:
    """Return the root ``ome`` attribute of the collection (bioformats2raw.layout 3)."""
    return {"version": "0.5", "bioformats2raw.layout": 3}


def series_attrs(groups: Sequence[str]) -> dict[str, Any]:
    """Return the ``ome`` attribute of the OME group: the image groups in order."""
    return {"version": "0.5", "series": list(groups)}


@dataclass(frozen=True)
class StackAxis:
    """What the second axis of the stacks is: planes at z offsets, or named surfaces (DPMs).

    Attributes
    ----------
    planes_um
        Offsets of the planes from the focal plane, µm, evenly spaced or not (None for
        surfaces).
    surfaces
        Names of the surfaces (None for planes).
    dpms_um
        The surfaces' DPMs (P, H, W) float32 µm (surfaces only); recorded beside the stacks.
    """

    planes_um: tuple[float, ...] | None = None
    surfaces: tuple[str, ...] | None = None
    dpms_um: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.planes_um is None) == (self.surfaces is None):
            raise ValueError("a stack axis is either planes_um or surfaces, exactly one")
        if self.planes_um is not None and not self.planes_um:
            raise ValueError("a stack axis needs at least one plane")
        if self.surfaces is not None:
            if self.dpms_um is None or self.dpms_um.ndim != 3:
                raise ValueError("surfaces need their DPMs (P, H, W) in µm")
            if self.dpms_um.shape[0] != len(self.surfaces):
                raise ValueError(
                    f"{len(self.surfaces)} surface names for {self.dpms_um.shape[0]} DPMs"
                )

    def __len__(self) -> int:
        return len(self.planes_um if self.planes_um is not None else self.surfaces or ())

    @property
    def uniform(self) -> bool:
        """Whether the planes are evenly spaced and increasing (one plane counts), so z is µm."""
        if self.planes_um is None:
            return False
        steps = np.diff(np.asarray(self.planes_um, dtype=np.float64))
        return steps.size == 0 or bool(steps[0] > 0 and np.allclose(steps, steps[0], atol=1e-6))

    @property
    def name(self) -> str:
        """The NGFF axis name: ``z`` (uniform planes), ``plane`` (uneven list) or ``surface``."""
        if self.surfaces is not None:
            return "surface"
        return "z" if self.uniform else "plane"

    def ngff_axis(self) -> dict[str, str]:
        """Return the NGFF axis: space in µm for uniform planes, else a custom unitless type."""
        if self.name == "z":
            return {"name": "z", **_SPACE}
        return {"name": self.name, "type": self.name}

    def scale_translation(self) -> tuple[float, float]:
        """Return (scale, translation) of the axis: (step, first z) in µm, or (1, 0) indices."""
        if not self.uniform or self.planes_um is None:
            return 1.0, 0.0
        step = self.planes_um[1] - self.planes_um[0] if len(self.planes_um) > 1 else 1.0
        return float(step), float(self.planes_um[0])

    @classmethod
    def from_plan(
        cls, z_um: Sequence[float] | None, labels: Sequence[str], dpms_um: np.ndarray
    ) -> StackAxis:
        """Return the axis of stacks refocused onto a plan: its planes' z, or its surfaces."""
        if z_um is not None:
            return cls(planes_um=tuple(float(z) for z in z_um))
        return cls(
            surfaces=tuple(str(label) for label in labels),
            dpms_um=np.asarray(dpms_um, dtype=np.float32),
        )

    def transform(self, interval_s: float, pixel_size_um: float) -> tuple[list[float], list[float]]:
        """Return (scale, translation) of a (t, this axis, y, x) stacks image."""
        z_scale, z0 = self.scale_translation()
        px = float(pixel_size_um)
        return [float(interval_s), z_scale, px, px], [0.0, z0, 0.0, 0.0]

    def attrs(self) -> dict[str, Any]:
        """Return the stack axis for ``attrs["deepz"]``: what each index along it is."""
        return {
            "stack_axis": self.name,
            "planes_um": None if self.planes_um is None else list(self.planes_um),
            "uniform_planes": self.uniform,
            "surfaces": None if self.surfaces is None else list(self.surfaces),
            "dpms": DPMS_ARRAY if self.surfaces is not None else None,
        }


def ngff_image(
    name: str,
    axes: Sequence[Mapping[str, str]],
    scale: Sequence[float],
    translation: Sequence[float] | None = None,
    window: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Return the NGFF 0.5 ``ome`` attribute of a one-level image whose array is ``"0"``.

    The translation follows the scale in the dataset's transforms (the spec's order); the
    ``omero`` block carries the display window when one is given.
    """
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if translation is not None and any(translation):
        transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
    ome: dict[str, Any] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [dict(a) for a in axes],
                "datasets": [{"path": "0", "coordinateTransformations": transforms}],
            }
        ],
    }
    if window is not None:
        ome["omero"] = omero(_LABELS.get(name, name), window)
    return ome


def image_axes(role: str, stack_axis: StackAxis | None = None) -> list[dict[str, str]]:
    """Return the NGFF axes of image `role`: (t, y, x) raw, (t, <stack axis>, y, x) stacks."""
    middle = [] if role == "raw" or stack_axis is None else [stack_axis.ngff_axis()]
    return [dict(_TIME), *middle, {"name": "y", **_SPACE}, {"name": "x", **_SPACE}]


def omero(label: str, window: Mapping[str, float]) -> dict[str, Any]:
    """Return the transitional ``omero`` block of a one-channel greyscale image."""
    return {
        "channels": [
            {
                "label": label,
                "color": "FFFFFF",
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {k: float(window[k]) for k in ("min", "max", "start", "end")},
            }
        ],
        "rdefs": {"model": "greyscale", "defaultT": 0},
    }


class WindowSampler:
    """Keeps a few subsampled items of one image and derives a display window from them.

    The window is the 0.1–99.9 percentile range of the samples (a few hot pixels do not
    flatten the picture), within ``min``/``max``: the dtype's range for integers, the sampled
    range for floats. The first `first` items are kept for good, then a rolling `last`: the
    window of the first frames is there early and the one written at close sees the end too.
    Each item (a frame, or a whole stack) is subsampled to about `pixels` values, so adding one
    costs a small strided copy, not a pass over the data, and the samples stay under 2 MB.
    """

    LOW, HIGH = 0.1, 99.9

    def __init__(
        self, dtype: np.dtype[Any], *, first: int = 8, last: int = 32, pixels: int = 4096
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.first, self.pixels = first, pixels
        self._first: list[np.ndarray] = []
        self._last: deque[np.ndarray] = deque(maxlen=last)
        self._lock = threading.Lock()  # added on the writer thread, read at close

    def add(self, item: np.ndarray) -> None:
        """Keep a strided subsample of about `pixels` values of `item` (last two axes y, x)."""
        step = max(1, int(np.ceil(np.sqrt(item.size / self.pixels))))
        sample = np.array(item[..., ::step, ::step], dtype=np.float64).ravel()
        with self._lock:
            (self._first if len(self._first) < self.first else self._last).append(sample)

    def __len__(self) -> int:
        with self._lock:
            return len(self._first) + len(self._last)

    def window(self) -> dict[str, float]:
        """Return ``{"min", "max", "start", "end"}``; the full range before any sample."""
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            lo, hi = float(info.min), float(info.max)
        else:
            lo, hi = 0.0, 1.0
        with self._lock:
            samples = [*self._first, *self._last]
        if not samples:
            return {"min": lo, "max": hi, "start": lo, "end": hi}
        values = np.concatenate(samples)
        values = values[np.isfinite(values)]
        if not values.size:
            return {"min": lo, "max": hi, "start": lo, "end": hi}
        start, end = (float(v) for v in np.percentile(values, [self.LOW, self.HIGH]))
        if not np.issubdtype(self.dtype, np.integer):
            lo, hi = float(values.min()), float(values.max())
        if end <= start:  # a flat image: a window one unit wide still shows it (wider where
            end = start + max(1.0, abs(start) * 1e-6)  # one unit is below float64's step)
            hi = max(hi, end)
        return {"min": lo, "max": hi, "start": start, "end": end}


@dataclass(frozen=True)
class XmlImage:
    """What METADATA.ome.xml says about one image of the collection."""

    name: str
    dtype: str
    size_t: int
    size_z: int
    size_y: int
    size_x: int
    pixel_size_um: float
    interval_s: float
    z_step_um: float | None = None


def ome_xml(images: Sequence[XmlImage]) -> str:
    """Return the collection's OME-XML: one ``<Image>`` per group, in group order, no pixels.

    Image *i* has ID ``Image:i`` (its group) and its role as Name; ``<MetadataOnly/>`` as the
    bioformats2raw layout requires.
    """
    ET.register_namespace("", _OME_NS)
    root = ET.Element(f"{{{_OME_NS}}}OME", {"Creator": "deepz-live"})
    for i, image in enumerate(images):
        root.append(_xml_element(str(i), image))
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def _xml_element(group: str, image: XmlImage) -> ET.Element:
    """Return the ``<Image>`` element of `image`, stored in group `group` (ID ``Image:group``)."""
    node = ET.Element(f"{{{_OME_NS}}}Image", {"ID": f"Image:{group}", "Name": image.name})
    pixels: dict[str, str] = {
        "ID": f"Pixels:{group}",
        "DimensionOrder": "XYZCT",
        "Type": _XML_TYPES[image.dtype],
        "SizeX": str(image.size_x),
        "SizeY": str(image.size_y),
        "SizeZ": str(image.size_z),
        "SizeC": "1",
        "SizeT": str(max(1, image.size_t)),
        "PhysicalSizeX": repr(image.pixel_size_um),
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": repr(image.pixel_size_um),
        "PhysicalSizeYUnit": "µm",
        "TimeIncrement": repr(image.interval_s),
        "TimeIncrementUnit": "s",
    }
    if image.z_step_um is not None:
        pixels |= {"PhysicalSizeZ": repr(image.z_step_um), "PhysicalSizeZUnit": "µm"}
    px = ET.SubElement(node, f"{{{_OME_NS}}}Pixels", pixels)
    ET.SubElement(
        px,
        f"{{{_OME_NS}}}Channel",
        {
            "ID": f"Channel:{group}:0",
            "Name": _LABELS.get(image.name, image.name),
            "SamplesPerPixel": "1",
        },
    )
    ET.SubElement(px, f"{{{_OME_NS}}}MetadataOnly")
    return node


def _listed_images(root: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Return a store's ``deepz`` attributes and its images (role -> group) as listed."""
    deepz = dict(root.attrs.get("deepz", {}))
    if isinstance(deepz.get("images"), Mapping):
        return deepz, image_groups(deepz)
    # layout 1, or a new store: only the groups that exist
    return deepz, {r: g for r, g in image_groups(deepz).items() if g in root}


def image_group(root: Any, role: str) -> str:
    """Return the group image `role` has in a store's collection, or the one it would get.

    Reads only: a caller creates the group (and its array) first and then lists it with
    `register_image`, so that a job cut off in between leaves no listed image without its
    data (the collection would no longer validate). A new image gets the next free numbered
    group; a group of that name from before images were registered (an older offline image)
    is its own. A role that is a number is refused (numbered groups are the collection's).
    """
    deepz, images = _listed_images(root)
    group = images.get(role)
    if group is not None:
        return group
    if role.isdecimal():
        raise ValueError(f"image name {role!r} is a number, which names the store's groups")
    if role in root and role not in reserved_names(deepz) and role not in images.values():
        return role  # an offline image written before images were registered
    n = 0
    while str(n) in root or str(n) in images.values():
        n += 1
    return str(n)


def register_image(
    root: Any, store: Path | str | None, role: str, image: XmlImage, group: str | None = None
) -> str:
    """Add image `role` to a store's collection; return its group path.

    For images added after the run (offline refocusing, ``--fill-gaps``): the image gets its
    group (`group`, from `image_group`, once it is written; None: `image_group` now) and is
    listed in ``attrs["deepz"]["images"]``, in ``OME/series`` and in ``OME/METADATA.ome.xml``
    of `store` (a local folder, or an fsspec URL such as ``s3://…``, whose file is one object
    written whole; None: no XML), in the same order, as the bioformats2raw layout asks ("every
    multiscales group MUST represent exactly one OME-XML Image in the same order as either the
    series index or the group numbers"). A role already listed keeps its group (its XML entry
    is rewritten: `image` may have changed). `root` is the store's root zarr group, opened for
    writing; a store that is not yet a collection (a new ``--out`` store) becomes one.
    """
    deepz, images = _listed_images(root)
    if group is None:
        group = image_group(root, role)
    listed = {r for r, g in images.items() if g == group}
    if listed - {role}:
        other = sorted(listed - {role})[0]
        raise ValueError(f"group {group!r} is already image {other!r}, not {role!r}")
    if images.get(role) != group:
        images[role] = group
        deepz["images"] = images
        root.attrs["deepz"] = deepz
    if "ome" not in root.attrs:
        root.attrs["ome"] = collection_attrs()
    ome_group = root.require_group(OME_GROUP)
    ome = dict(ome_group.attrs.get("ome", {}))
    # a store with images but no series yet (layout 1): the images it has come first
    series = list(ome.get("series", [g for g in images.values() if g != group and g in root]))
    if group not in series:
        series.append(group)
        ome_group.attrs["ome"] = series_attrs(series)
    if store is not None:
        _put_xml_image(store, group, image, fresh=series == [group])
    return group


def _put_xml_image(store: Path | str, group: str, image: XmlImage, *, fresh: bool) -> None:
    """Replace or append the ``<Image>`` of `group` in a store's METADATA.ome.xml.

    ``fresh``: the image is the collection's only one, so a missing file is made anew; else
    a missing or unreadable file is left so (one XML image paired with another group's place
    in the series would mislabel it) and said. A local store's file is replaced atomically; a
    URL's through fsspec (an object store writes an object whole).
    """
    ET.register_namespace("", _OME_NS)
    path: Path | str
    if isinstance(store, str) and "://" in store:
        path = f"{store.rstrip('/')}/{OME_GROUP}/METADATA.ome.xml"
    else:  # a local folder, however spelled
        path = Path(store) / OME_GROUP / "METADATA.ome.xml"
    try:
        root = ET.fromstring(_read_bytes(path))
    except (OSError, ET.ParseError) as err:
        if not fresh:
            log.warning("%s cannot be read (%s): %s is not added to it", path, err, image.name)
            return
        root = ET.Element(f"{{{_OME_NS}}}OME", {"Creator": "deepz-live"})
    node = _xml_element(group, image)
    for i, child in enumerate(list(root)):
        if child.tag.endswith("Image") and child.get("ID") == f"Image:{group}":
            root.remove(child)
            root.insert(i, node)
            break
    else:
        images = [i for i, c in enumerate(root) if c.tag.endswith("Image")]
        root.insert(images[-1] + 1 if images else 0, node)  # after the images, before anything else
    text = ET.tostring(root, encoding="unicode", xml_declaration=True)
    if isinstance(path, Path):
        write_atomic(path, text)
    else:
        import fsspec

        with fsspec.open(path, "wb") as f:
            f.write(text.encode("utf-8"))


def _read_bytes(path: Path | str) -> bytes:
    """Read a local file, or an fsspec URL's object (its missing object: FileNotFoundError)."""
    if isinstance(path, Path):
        return path.read_bytes()
    import fsspec

    with fsspec.open(path, "rb") as f:
        data: bytes = f.read()
    return data


def write_ome_xml(store: Path, images: Sequence[XmlImage]) -> None:
    """Write ``OME/METADATA.ome.xml`` of a local store atomically (a reader never sees half)."""
    write_atomic(store / OME_GROUP / "METADATA.ome.xml", ome_xml(images))


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write `content` (text as UTF-8) to one of the store's side files, atomically for readers.

    `engine.files.atomic_write_bytes` (a reader sees the old file or the whole new one, with
    the mode a plain ``open(path, "w")`` gives) without its fsyncs: the recorder's writer thread
    rewrites METADATA.ome.xml every few seconds, and a flush to the disk there can wait behind
    the shards' dirty pages, which are not flushed either (the store as a whole is not).
    """
    data = content.encode("utf-8") if isinstance(content, str) else content
    atomic_write_bytes(path, data, durable=False)
