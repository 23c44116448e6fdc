"""A picture of what a run recorded: ``RUN.preview.png`` beside ``RUN.ome.zarr``.

A run otherwise leaves only text; the preview shows at a glance whether the recording holds
what was meant: the last raw frame, the max projection over the stack axis of the last
stack with an x–z max projection below it (a side view, in µm from the store's NGFF scale
and translation), the latency of the stacks over the run when the daemon passes it
(`live.metrics.Metrics.latency_series`) and the counts as text. The same text goes into
the PNG's ``Description`` field, so a script can read the counts without looking.

The store is read with zarr through the layout `live.store` defines (`live.store.image_groups`
finds each image; ``/frames/timestamp_s`` dates the frames). A store without raw frames or
without stacks (``recorder.keep_raw`` / ``keep_stacks`` false) gives a preview of what it has;
an empty one gives a PNG that says "no frames recorded". matplotlib is optional: it is
imported only here, with its Agg canvas and no pyplot (no global backend, no window), and a
missing matplotlib is an `ImportError` whose message is one line the caller can log.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from live.store import FRAMES_GROUP, image_groups, write_atomic

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["FIGSIZE_IN", "PANELS", "PREVIEW_DPI", "preview_path", "write_preview"]

FIGSIZE_IN = (12.0, 8.0)
"""Size of the preview figure, inches (width, height)."""
PREVIEW_DPI = 100
"""Pixels per inch of the PNG: it is 1200 × 800 pixels."""
PANELS: dict[str, tuple[float, float, float, float]] = {
    "raw": (0.05, 0.40, 0.28, 0.52),
    "projection": (0.39, 0.40, 0.28, 0.52),
    "side": (0.39, 0.05, 0.28, 0.27),
    "latency": (0.06, 0.08, 0.27, 0.22),
    "text": (0.70, 0.05, 0.29, 0.90),
}
"""Where each panel sits, as matplotlib figure fractions (left, bottom, width, height)."""
NOTHING_RECORDED = "no frames recorded"
"""What the preview of an empty store says."""


@dataclass(frozen=True)
class _Image:
    """The newest item of one image of the store and how to place it in µm."""

    data: np.ndarray
    """The last recorded item: (y, x) raw frame or (z, y, x) stack."""
    seq: int
    t_s: float | None
    """Camera time of the item since the first recorded frame, s (None if not recorded)."""
    count: int
    """Items recorded (from the store's presence runs; the time axis length if absent)."""
    scale: list[float]
    translation: list[float]
    axes: list[dict[str, str]]


def preview_path(store: Path) -> Path:
    """Return ``RUN.preview.png`` beside a store ``RUN.ome.zarr`` (or ``RUN.zarr``)."""
    stem = store.name.removesuffix(".zarr").removesuffix(".ome")
    return store.with_name(f"{stem}.preview.png")


def write_preview(
    store: Path,
    out: Path | None = None,
    *,
    latency: tuple[np.ndarray, np.ndarray] | None = None,
    summary_lines: Sequence[str] = (),
) -> Path:
    """Draw the run store `store` into a PNG and return its path (`preview_path` by default).

    Parameters
    ----------
    store : Path
        The run's OME-Zarr store (closed by the recorder, or still being written).
    out : Path, optional
        Where to write the PNG; it is replaced atomically, so a reader never sees half.
    latency : tuple of numpy.ndarray, optional
        (seconds since start, latency ms) of the stacks, as `Metrics.latency_series` gives.
    summary_lines : sequence of str
        Text shown under the counts read from the store (e.g. the daemon's summary lines).

    Raises
    ------
    ImportError
        matplotlib is not installed (one line, with the install hint).
    FileNotFoundError
        `store` is not a run store.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "the run preview needs matplotlib (pip install matplotlib); the recording is complete"
        ) from err
    store = Path(store)
    root = _open(store)
    deepz = _as_dict(root.attrs.get("deepz"))
    images = {role: _last_item(root, deepz, role) for role in ("raw", "stacks")}
    text = _counts(store, deepz, images) + [str(line) for line in summary_lines]
    fig = Figure(figsize=FIGSIZE_IN, dpi=PREVIEW_DPI)
    nothing = all(image is None for image in images.values())
    title = f"deepz-live run {store.name}" + (f": {NOTHING_RECORDED}" if nothing else "")
    fig.suptitle(title, fontsize=11)
    _draw_frame(_axes(fig, "raw"), images["raw"], deepz)
    _draw_stack(_axes(fig, "projection"), _axes(fig, "side"), images["stacks"], deepz)
    _draw_latency(_axes(fig, "latency"), latency)
    _draw_text(_axes(fig, "text"), text)
    return _save(fig, out or preview_path(store), "\n".join(text))


def _open(store: Path) -> zarr.Group:
    """Open a run store read-only; anything else is a one-line FileNotFoundError."""
    if not (store / "zarr.json").is_file():
        raise FileNotFoundError(f"no OME-Zarr run store at {store}")
    return zarr.open_group(store, mode="r", zarr_format=3)


def _last_item(root: zarr.Group, deepz: dict[str, Any], role: str) -> _Image | None:
    """Read the newest item of image `role`, or None when the run kept or wrote none.

    The time axis ends exactly at the highest seq written (`live.recorder`), so its last
    row is the newest item even in a store cut off before its attributes were updated.
    """
    group_path = image_groups(deepz).get(role)
    if group_path is None or group_path not in root:
        return None
    group = root[group_path]
    array = group.get("0") if isinstance(group, zarr.Group) else None
    if not isinstance(array, zarr.Array) or array.shape[0] == 0:
        return None
    scale, translation, axes = _geometry(_as_dict(group.attrs.get("ome")), array.ndim)
    present = deepz.get(f"{role}_present") or []
    seq = array.shape[0] - 1
    return _Image(
        data=np.asarray(array[seq]),
        seq=seq,
        t_s=_since_first(root, seq),
        count=sum(stop - start for start, stop in present) if present else array.shape[0],
        scale=scale,
        translation=translation,
        axes=axes,
    )


def _geometry(ome: dict[str, Any], ndim: int) -> tuple[list[float], list[float], list[Any]]:
    """Return (scale, translation, axes) of an NGFF image's full-resolution dataset.

    Unit scale and zero translation stand in for what the metadata does not say.
    """
    multiscale: dict[str, Any] = (ome.get("multiscales") or [{}])[0]
    dataset: dict[str, Any] = (multiscale.get("datasets") or [{}])[0]
    by_type = {t.get("type"): t for t in dataset.get("coordinateTransformations", [])}
    scale = [float(v) for v in by_type.get("scale", {}).get("scale", [1.0] * ndim)]
    shift = [float(v) for v in by_type.get("translation", {}).get("translation", [0.0] * ndim)]
    return scale, shift, list(multiscale.get("axes", []))


def _as_dict(value: object) -> dict[str, Any]:
    """Return a JSON attribute as a dict (an empty one when it is missing or not an object)."""
    return dict(value) if isinstance(value, dict) else {}


def _counts(store: Path, deepz: dict[str, Any], images: dict[str, _Image | None]) -> list[str]:
    """Return the counts read from the store itself, as short lines."""
    kept = image_groups(deepz)
    lines = [f"store {store.name}"]
    for role, label in (("raw", "raw frames"), ("stacks", "stacks")):
        image = images[role]
        if role not in kept:
            lines.append(f"{label}: not kept")
        else:
            lines.append(f"{label}: {image.count if image else 0} recorded")
    if all(image is None for image in images.values()):
        lines.append(NOTHING_RECORDED)
    planes = deepz.get("planes_um")
    if planes:
        lines.append(f"planes: {len(planes)} ({planes[0]:g} … {planes[-1]:g} µm)")
    elif deepz.get("surfaces"):
        lines.append(f"surfaces: {', '.join(map(str, deepz['surfaces']))}")
    if "complete" in deepz:
        lines.append("complete: " + _completeness(deepz))
    return lines


def _completeness(deepz: dict[str, Any]) -> str:
    """Say whether the store was finished, and if not, what its attributes name as why."""
    if deepz["complete"] is True:
        return "yes"
    why = [f"{key}: {deepz[key]}" for key in _FAILURES if deepz.get(key)]
    if why:
        return f"NO ({'; '.join(why)})"[:300]
    return "not yet (still being written, or the run ended without finishing it)"


_FAILURES = ("error", "stacks_error", "run_error")
"""The store attributes that name why a recording is not complete (`live.recorder`)."""


def _axes(fig: Figure, panel: str) -> Axes:
    """Add the axes of `panel` at its place in `PANELS`."""
    return fig.add_axes(PANELS[panel])


def _draw_frame(ax: Axes, image: _Image | None, deepz: dict[str, Any]) -> None:
    """Show the last raw frame with x and y in µm."""
    if image is None:
        kept = "raw" in image_groups(deepz)
        _empty(ax, "raw frames not kept" if not kept else "no raw frames recorded")
        return
    _show_yx(ax, image.data, image.scale[-2:], image.translation[-2:])
    ax.set_title(f"last raw frame ({_when(image)})", fontsize=9)
    ax.set_anchor("S")  # level with the stack's projection


def _draw_stack(ax: Axes, side: Axes, image: _Image | None, deepz: dict[str, Any]) -> None:
    """Show the last stack's max projection over its stack axis, and its x–z side view."""
    if image is None:
        kept = "stacks" in image_groups(deepz)
        for axes in (ax, side):
            _empty(axes, "stacks not kept" if not kept else "no stacks recorded")
        return
    stack = np.nan_to_num(image.data.astype(np.float32, copy=False))
    _show_yx(ax, stack.max(axis=0), image.scale[-2:], image.translation[-2:])
    ax.set_title(f"last stack ({_when(image)}): max over {_axis_name(image)}", fontsize=9)
    ax.set_anchor("S")
    _show_side(side, stack.max(axis=1), image)


def _show_yx(ax: Axes, plane: np.ndarray, scale: list[float], origin: list[float]) -> None:
    """Show a (y, x) plane in µm, contrast from its 0.5–99.8 percentiles."""
    (sy, sx), (ty, tx) = scale, origin
    h, w = plane.shape
    extent = (tx - sx / 2, tx + (w - 0.5) * sx, ty + (h - 0.5) * sy, ty - sy / 2)
    lo, hi = _limits(plane)
    ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
    ax.set_xlabel("x (µm)", fontsize=8)
    ax.set_ylabel("y (µm)", fontsize=8)
    ax.tick_params(labelsize=7)


def _show_side(ax: Axes, xz: np.ndarray, image: _Image) -> None:
    """Show the x–z max projection (over y): µm both ways when the stack axis is ``z``."""
    sz, sx = image.scale[1], image.scale[-1]
    tz, tx = image.translation[1], image.translation[-1]
    n_z, w = xz.shape
    extent = (tx - sx / 2, tx + (w - 0.5) * sx, tz - sz / 2, tz + (n_z - 0.5) * sz)
    physical = _axis_name(image) == "z"
    lo, hi = _limits(xz)
    ax.imshow(
        xz,
        cmap="gray",
        vmin=lo,
        vmax=hi,
        extent=extent,
        interpolation="nearest",
        origin="lower",  # z up, as on the microscope
        aspect="equal" if physical else "auto",
    )
    ax.set_anchor("N")  # just under the projection, however flat the stack is
    ax.set_xlabel("x (µm)", fontsize=8)
    ax.set_ylabel("z (µm)" if physical else f"{_axis_name(image)} index", fontsize=8)
    if not physical:
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("side view: max over y", fontsize=9)
    ax.tick_params(labelsize=7)


def _draw_latency(ax: Axes, latency: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Plot latency (ms) against time since the run started (s)."""
    if latency is None or len(latency[0]) == 0:
        _empty(ax, "no latency recorded")
        return
    t_s, ms = (np.asarray(a, dtype=np.float64) for a in latency)
    ax.plot(t_s, ms, ".", markersize=2, color="tab:blue")
    ax.axhline(float(np.median(ms)), color="tab:orange", linewidth=1, label="median")
    ax.set_xlabel("time since start (s)", fontsize=8)
    ax.set_ylabel("latency (ms)", fontsize=8)
    ax.set_title(f"latency of {len(ms)} stacks", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.tick_params(labelsize=7)


def _draw_text(ax: Axes, lines: list[str]) -> None:
    """Write the counts and summary lines, monospace, top-left."""
    ax.axis("off")
    ax.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, wrap=True)


def _empty(ax: Axes, message: str) -> None:
    """Mark a panel that has nothing to show, saying why."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def _axis_name(image: _Image) -> str:
    """Return the name of a stack's second axis (``z``, ``plane`` or ``surface``)."""
    return image.axes[1].get("name", "z") if len(image.axes) > 1 else "z"


def _when(image: _Image) -> str:
    """Return ``"seq 41, 20.5 s"``: the item's seq and camera time into the run, if known."""
    return f"seq {image.seq}" + (f", {image.t_s:.1f} s" if image.t_s is not None else "")


def _since_first(root: zarr.Group, seq: int) -> float | None:
    """Return the camera time of frame `seq` since the first recorded frame, s, or None.

    From ``/frames/timestamp_s`` (NaN where no frame was recorded); None when the store has
    no such array or no timestamp for `seq`.
    """
    array = root.get(f"{FRAMES_GROUP}/timestamp_s")
    if not isinstance(array, zarr.Array) or seq >= array.shape[0]:
        return None
    stamps = np.asarray(array[:], dtype=np.float64)
    if not np.isfinite(stamps[seq]):
        return None
    return float(stamps[seq] - np.nanmin(stamps))


def _limits(image: np.ndarray) -> tuple[float, float]:
    """Return a display range from the finite values' 0.5 and 99.8 percentiles."""
    finite = image[np.isfinite(image)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.8]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _save(fig: Figure, out: Path, description: str) -> Path:
    """Write the PNG atomically (`live.store.write_atomic`) with `description` in its metadata."""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(
        png,
        format="png",
        dpi=PREVIEW_DPI,
        metadata={"Title": out.stem, "Description": description, "Software": "deepz-live"},
    )
    write_atomic(out, png.getvalue())
    return out
