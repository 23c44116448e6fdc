"""Open a recording in napari with its axes lined up and its planes at their true depth.

napari-ome-zarr opens a run store at its root (the store is plain OME-Zarr 0.5), but two things
are lost on the way today, both kept as strict xfails in ``tests/test_napari.py``:

- napari-ome-zarr 0.9 and later apply only a dataset's first coordinate transform (the scale)
  and drop the NGFF translation, so the stacks show z = 0 … 16 µm instead of −8 … +8 µm
  (0.7 and 0.8 applied it but give the layers no axis names);
- napari lines layers up by their trailing axes, so the raw (t, y, x) frames land on the
  stacks' (z, y, x) and raw's time steps share the z slider with the planes.

No valid OME-Zarr 0.5 metadata fixes either (a translation before the scale is invalid, and
nothing in the spec aligns images of different dimensionality). So ``deepz-live view RUN``
reads the same store and hands napari what is true: raw frames as (t, z, y, x) with one plane
at z = 0 µm (the focal plane, which is what a raw frame is; at the plane nearest it where the
planes skip 0; the z axis is the live stacks', or
when the run kept none the first other image's, such as the ``stacks_offline`` that
``live.refocus RUN`` writes), the stacks at their z offsets from focus, each with the store's
own scale, units, axis names and display window. A store whose values napari would refuse (a
scale that is not finite and > 0, one that does not match the array's axes, an empty display
window, a dataset path naming a group) is a one-line `RecordingError` before any window
opens. `layer_specs` is the napari-free part (the tests check it without napari);
`open_recording` adds the layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from live.store import image_groups

__all__ = ["LayerSpec", "RecordingError", "layer_specs", "open_recording"]


class RecordingError(ValueError):
    """The path is not a run store this module can show (one line, naming the path)."""


@dataclass(frozen=True)
class LayerSpec:
    """One napari image layer of a recording: the array and where its pixels sit.

    ``array`` is the store's own (lazy) zarr array; when ``insert_axis`` is set, a length-1
    axis goes in at that position before it is shown (raw frames get the stacks' z axis).
    ``scale``, ``translate``, ``axis_labels`` and ``units`` are for the shown array.
    """

    role: str
    name: str
    array: Any
    insert_axis: int | None
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    axis_labels: tuple[str, ...]
    units: tuple[str | None, ...]
    contrast_limits: tuple[float, float] | None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape napari sees (with the inserted axis)."""
        shape = list(self.array.shape)
        if self.insert_axis is not None:
            shape.insert(self.insert_axis, 1)
        return tuple(shape)


def _ome(node: Any, key: str = "ome") -> Any:
    """Return a node's JSON attribute `key` (Any: the store's JSON is checked where used)."""
    return node.attrs[key]


def _transforms(multiscale: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """Scale and translation of a one-level NGFF image (translation zeros when absent)."""
    scale: list[float] | None = None
    translation: list[float] | None = None
    for t in multiscale["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    if scale is None:
        scale = [1.0] * len(multiscale["axes"])
    return scale, translation or [0.0] * len(scale)


@dataclass(frozen=True)
class _Image:
    """One image of the store, checked: its array, axes, placement and display window."""

    array: Any
    axes: list[dict[str, Any]]
    scale: list[float]
    translation: list[float]
    window: tuple[float, float] | None
    label: str
    deepz: dict[str, Any]
    """The image group's own ``attrs["deepz"]`` (a stacks image's ``planes_um``), or {}."""


def _image(root: Any, group: str, role: str) -> _Image:
    """Read and check image `group`: every value napari would refuse is a one-line ValueError.

    The array must be an array (not a group); axes, scale and translation one per array axis;
    scale finite and > 0, translation finite; the display window finite with start < end.
    """
    node = root[group]
    ome = _ome(node)
    ms = ome["multiscales"][0]
    axes = [dict(a) for a in ms["axes"]]
    path = f"{group}/{ms['datasets'][0]['path']}"
    array = root[path]
    if not isinstance(array, zarr.Array):
        raise ValueError(f"image {group!r}: dataset {path!r} is not an array")
    scale, translation = _transforms(ms)
    ndim = array.ndim
    for what, values in (("axes", axes), ("scale", scale), ("translation", translation)):
        if len(values) != ndim:
            raise ValueError(
                f"image {group!r}: {what} has {len(values)} entries for a {ndim}-D array"
            )
    if not all(math.isfinite(v) and v > 0 for v in scale):
        raise ValueError(f"image {group!r}: scale {scale} is not all finite and > 0")
    if not all(math.isfinite(v) for v in translation):
        raise ValueError(f"image {group!r}: translation {translation} is not all finite")
    channel = ome.get("omero", {}).get("channels", [{}])[0]
    window = channel.get("window")
    limits = None if window is None else (float(window["start"]), float(window["end"]))
    if limits is not None and not (all(map(math.isfinite, limits)) and limits[0] < limits[1]):
        raise ValueError(
            f"image {group!r}: display window {list(limits)} is not finite start < end"
        )
    own = node.attrs.get("deepz", {})
    return _Image(
        array=array,
        axes=axes,
        scale=scale,
        translation=translation,
        window=limits,
        label=str(channel.get("label", role)),
        deepz=dict(own) if isinstance(own, Mapping) else {},
    )


def _focal_index(planes: Any) -> int:
    """Index of the plane nearest the focal plane (0 µm) on a non-metric stack axis.

    Uneven plane lists: the plane nearest 0 µm (raw frames show there). Surfaces have no
    plane at focus: the first one.
    """
    if isinstance(planes, list) and planes:
        return int(np.argmin(np.abs(np.asarray(planes, dtype=np.float64))))
    return 0


def layer_specs(path: str | Path) -> list[LayerSpec]:
    """Read a run store's images as napari layers: raw at the focal plane, stacks at depth.

    Raises `RecordingError` (one line, naming the path) when the store cannot be opened or holds
    no image.
    """
    path = Path(path)
    try:
        return _layer_specs(path)
    except (
        OSError,  # unreadable, or gone (FileNotFoundError)
        KeyError,
        IndexError,
        ValueError,
        TypeError,
        AttributeError,
        ArithmeticError,  # OverflowError: an integer too large for a float
        RecursionError,  # JSON nested past the parser's stack
    ) as err:
        # (the store's attributes are input: a value of another kind anywhere in them)
        raise RecordingError(
            f"{path}: not a deepz-live recording ({type(err).__name__}: {err})"
        ) from None


def _layer_specs(path: Path) -> list[LayerSpec]:
    """`layer_specs` without the error wrapping (a malformed store raises what it raises)."""
    root = zarr.open_group(str(path), mode="r")
    deepz: dict[str, Any] = dict(_ome(root, "deepz"))
    groups = {role: group for role, group in image_groups(deepz).items() if group in root}
    if not groups:
        raise ValueError("the recording holds no image")
    images = {role: _image(root, group, role) for role, group in groups.items()}
    # Raw frames take the z axis of the live stacks, else of the first other image (the
    # offline stacks `live.refocus RUN` writes when the run kept none).
    z_role = "stacks" if "stacks" in images else next((r for r in images if r != "raw"), None)
    specs = []
    for role, image in images.items():
        axes, scale, translation = image.axes, list(image.scale), list(image.translation)
        insert = None
        z_image = images[z_role] if z_role is not None else None
        if role == "raw" and z_image is not None and len(axes) == 3 and len(z_image.axes) == 4:
            # A raw frame is the focal plane: z = 0 µm (or the plane nearest it), or the 0 µm
            # entry of a plane list.
            insert = 1
            z_axis, z_scale, z_translate = z_image.axes[1], z_image.scale[1], z_image.translation[1]
            axes = [axes[0], z_axis, *axes[1:]]
            scale.insert(1, z_scale)
            on_z = z_axis.get("name") == "z"
            planes = z_image.deepz.get("planes_um", deepz.get("planes_um"))
            if on_z:  # the grid's plane nearest 0 µm: napari shows a layer only on its slider
                # steps, and raw put at 0 between two planes showed on both (review 73)
                focus = z_translate + round(-z_translate / z_scale) * z_scale
            else:
                focus = z_translate + _focal_index(planes) * z_scale
            translation.insert(1, focus)
        specs.append(
            LayerSpec(
                role=role,
                name=f"{role}: {image.label}",
                array=image.array,
                insert_axis=insert,
                scale=tuple(scale),
                translate=tuple(translation),
                axis_labels=tuple(str(a["name"]) for a in axes),
                units=tuple(a.get("unit") for a in axes),
                contrast_limits=image.window,
            )
        )
    return specs


def open_recording(viewer: Any, path: str | Path) -> list[Any]:
    """Add a recording's layers to a napari viewer (or `ViewerModel`); return the layers.

    Raises `RecordingError` (one line) when the store is not a recording `layer_specs` reads.
    """
    return _add_layers(viewer, layer_specs(path))


MAX_LAYER_CHUNKS = 100_000
"""Most dask chunks a layer is read in: a task graph costs about 1 kB a chunk, so a raw array
stored a frame a chunk (10^6 frames in 3 h at 100 Hz) took 1 GB before the window opened,
and a forged shape any amount (review 73). Above it, chunks hold several time points."""


def _layer_chunks(array: Any) -> tuple[int, ...]:
    """Return the array's own chunks, with enough time points a chunk for `MAX_LAYER_CHUNKS`."""
    shape, chunks = tuple(array.shape), tuple(array.chunks)
    if not shape:
        return chunks
    others = math.prod(math.ceil(n / c) for n, c in zip(shape[1:], chunks[1:], strict=True))
    per_chunk = max(chunks[0], math.ceil(shape[0] * others / MAX_LAYER_CHUNKS))
    return (per_chunk, *chunks[1:])


def _add_layers(viewer: Any, specs: list[LayerSpec]) -> list[Any]:
    """Add one napari image layer per spec (lazy: dask reads the chunks napari shows)."""
    import dask.array as da  # napari depends on dask: present wherever napari is

    layers = []
    for spec in specs:
        data = da.from_zarr(spec.array, chunks=_layer_chunks(spec.array))  # type: ignore[no-untyped-call]
        if spec.insert_axis is not None:
            data = da.expand_dims(data, spec.insert_axis)
        units = tuple(u if u is not None else "pixel" for u in spec.units)
        layers.append(
            viewer.add_image(
                data,
                name=spec.name,
                scale=spec.scale,
                translate=spec.translate,
                axis_labels=spec.axis_labels,
                units=units,
                contrast_limits=spec.contrast_limits,
            )
        )
    return layers


def show(path: str | Path) -> int:
    """Open a napari window on a recording (``deepz-live view RUN.ome.zarr``); exit status.

    A store that is not a recording, or whose pixels cannot be read when its layers are added
    (napari reads the shown planes then: a corrupt chunk), is one line on stderr and exit 2.
    """
    import sys

    try:
        specs = layer_specs(path)
    except RecordingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        import napari
    except ImportError:
        print("viewing a recording needs napari: pip install 'deepz-live[view]'", file=sys.stderr)
        return 1
    viewer = napari.Viewer(title=f"deepz-live: {Path(path).name}")
    try:
        _add_layers(viewer, specs)
    except Exception as err:  # the store's bytes are input: a codec, zarr or napari error
        viewer.close()
        print(f"error: {_cannot_show(path, err)}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{s.role} {s.shape}" for s in specs)
    print(f"opened {path}: {shapes}")
    napari.run()
    return 0


def _cannot_show(path: str | Path, err: Exception) -> str:
    """One line saying why the layers of recording `path` could not be shown."""
    return " ".join(f"{path}: cannot show the recording ({type(err).__name__}: {err})".split())
