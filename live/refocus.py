"""Offline refocusing of recordings: raw frames in, an NGFF stacks image out, by Dask chunks.

The raw frames of a run are the experiment; the virtual stacks are derived data. This module
recomputes them after the fact, with another model, onto other planes or surfaces, to fill the
stacks a live run skipped (``--fill-gaps``), or for a recording that was never refocused::

    python -m live.refocus RUN.ome.zarr [--model PATH] [--planes Z1 Z2 ... | --scope config.toml]
        [--out PATH] [--name IMAGE] [--fill-gaps] [--scheduler threads|processes|sync|tcp://...]
        [--workers N] [--chunk N] [--backend NAME] [--threads N] [--overwrite]
        [--dtype float32|float16]

or from Python, `refocus_recording(...)`, which returns a `RefocusSummary`.

Input: this project's run store (its raw image (t, y, x), ``0/0`` or in stores from before
the collection layout ``raw/0``, with the present seqs from the root attributes; see
`live.store`),
any NGFF image whose axes are (t, y, x) (other axes of size 1 allowed), a plain Zarr array
(T, H, W), or a TIFF stack. Output: an NGFF 0.5 image (t, z, y, x) float32 (``--dtype float16``:
as the live recorder stores stacks) on zarr v3, indexed
like the input's time axis (the camera sequence number for our runs), with the planes' z in its
axis transforms (uniform planes) or in its attributes (any other plan), and the model's name,
file and sha256 in ``attrs["deepz"]["model"]``. It goes beside ``raw`` in the same run store
(``stacks_offline`` by default), into the live ``stacks`` image (``fill_gaps``), or into a new
store (``out``).

How it runs: one task per output chunk (``chunk`` time points; by default about 4 MiB of stacks,
`auto_chunk`), so no two tasks ever write the same chunk object. A task reads its raw
frames, refocuses each present one with ``Backend.infer(frame, dpms)`` exactly as the live
worker does (same DPMs, one frame per call, so the same model and backend give the same
stacks; a run whose planes followed the stage
focus (``planes.focus_lock_um``) has each frame's DPMs shifted by the same `FocusLock` offset,
computed from the focus recorded with the frame), writes the chunk, and then writes the
chunk's CRC-32 into a small manifest array (``<image>/refocus_done``, one element per chunk,
one object each). A rerun verifies each chunk the manifest names (it reads back, is finite and
has that CRC) and skips it; a missing or damaged chunk is recomputed. Backends are loaded once
per process and kept in a module-level cache keyed by model file and backend options; the
plan's DPMs reach each process once too, not with every task (`Job`).

One job writes a store at a time: from before it opens its output until it has written its
presence, the driver holds the store's lock file (`live.store_lock`: ``<store>.writer.lock``
beside a local output store, its pid and host), and a second job there is refused naming the
first; the lock of a job killed on this machine is taken over, said. A store behind a URL is
not locked (said).

Schedulers: ``"threads"`` (default: a Dask thread pool of `workers` threads sharing one backend
under a lock, so reading, compressing and writing overlap with inference), ``"processes"`` (a
Dask process pool, one backend per process), ``"sync"`` (one thread, for debugging), or the
address of a running ``dask.distributed`` scheduler (``tcp://host:8786``) or a
``distributed.Client``: each worker loads the model once (before timing starts) and the driver
prints the dashboard address. Every worker must see the input and output paths (a shared file
system, or a URL that zarr opens through fsspec, e.g. ``s3://bucket/run.ome.zarr``).

dask is imported only here and only when refocusing runs (extra ``dist``); without it the local
schedulers fall back to a plain loop over the same chunk tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import itertools
import logging
import math
import os
import platform
import re
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import numpy as np

from engine.dpm import DPMError, FocusLock, VolumePlan
from engine.metadata import Modality, file_sha256
from engine.point_fit import PointFit
from engine.runtime import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MODEL,
    BackendError,
    Precision,
    depth_limits,
    load_backend,
)
from live.store_lock import StoreLocked, write_lock

if TYPE_CHECKING:
    from engine.optics import Lateral
    from engine.runtime import Backend
    from live.store import XmlImage

__all__ = [
    "DEFAULT_IMAGE",
    "LOCAL_SCHEDULERS",
    "MANIFEST",
    "RawInput",
    "RefocusError",
    "RefocusSummary",
    "RefocusTaskError",
    "clear_backends",
    "main",
    "open_input",
    "refocus_recording",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "stacks_offline"
"""Name of the offline stacks image written beside ``raw`` in a run store."""
FILL_IMAGE = "stacks"
"""Group of the live stacks image in stores before the collection layout, and where
``fill_gaps`` creates one when the run kept no stacks (otherwise it completes the run's own
stacks image, wherever `live.store.image_groups` says it is)."""
OUT_IMAGE = "stacks"
"""Name of the stacks image in a new store (``out``)."""
MANIFEST = "refocus_done"
"""Per-chunk completion array inside the output image group: CRC-32 of the chunk, or -1."""
LOCAL_SCHEDULERS = ("threads", "processes", "sync")
"""Schedulers that run on this machine; anything else is a dask.distributed address."""
_NOT_DONE = -1
CHUNK_TARGET_BYTES = 4 * 2**20
"""Stack bytes per output chunk when ``chunk`` is not given (`auto_chunk`)."""
MAX_AUTO_CHUNK = 16


def auto_chunk(stack_bytes: int) -> int:
    """Time points per output chunk when not given: about `CHUNK_TARGET_BYTES` of stacks.

    Each chunk costs a task and four store round trips (manifest check, raw read, chunk write,
    CRC write), 2-5 ms each on a local disk and more on object storage, whatever its size: with
    one 9 x 256² float16 stack (1.2 MB) per chunk they were a tenth of the volume model's time
    per frame. Four such stacks per chunk share them; a 41 x 512² stack (21 MB) is a chunk of
    its own. At most `MAX_AUTO_CHUNK`, so a viewer reading one time point reads little more.
    """
    return max(1, min(MAX_AUTO_CHUNK, round(CHUNK_TARGET_BYTES / max(stack_bytes, 1))))


class RefocusError(ValueError):
    """Refocusing cannot start: a bad input, model, plan or output. The message says which."""


class RefocusTaskError(RuntimeError):
    """A chunk task failed: its raw frames cannot be read. The message names chunk and seqs.

    Raised in the task, wherever it runs, so it is one picklable message.
    """


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    """Where a task reads raw frames: a picklable description reopened in each process.

    Attributes
    ----------
    path
        Store directory, URL (zarr opens it through fsspec) or TIFF file.
    kind
        ``"zarr"`` or ``"tiff"``.
    array_path
        The (t, y, x) array inside the store ("" for a store that is one array).
    t_axis
        Index of the time axis; every other axis except the last two has size 1.
    ndim
        Number of axes of the stored array (2 for a single frame).
    """

    path: str
    kind: Literal["zarr", "tiff"]
    array_path: str = ""
    t_axis: int = 0
    ndim: int = 3


@dataclass(frozen=True)
class RawInput:
    """An opened recording: where its frames are and what is known about them.

    Attributes
    ----------
    spec
        How tasks read frames (`InputSpec`).
    n_t
        Length of the time axis (for our runs: last sequence number + 1).
    frame_shape
        (H, W) of a frame.
    present
        The time indices that hold frames, ascending (all of them except our runs' gaps).
    rate_hz, pixel_size_um
        From the store's metadata, when it says.
    run
        ``attrs["deepz"]`` of this project's run store, else None.
    focus_um
        Each time point's recorded focus (run stores: ``frames/focus_um``, NaN where no
        frame), else None.
    """

    spec: InputSpec
    n_t: int
    frame_shape: tuple[int, int]
    present: tuple[int, ...]
    rate_hz: float | None = None
    pixel_size_um: float | None = None
    run: dict[str, Any] | None = None
    focus_um: np.ndarray | None = None

    @property
    def is_run(self) -> bool:
        """Whether this is a run store of the live daemon (raw + presence attributes)."""
        return self.run is not None


def _is_url(path: str) -> bool:
    """Whether `path` is a URL (``s3://``, ``gs://``, ``memory://`` ...) rather than a path."""
    return "://" in path


def _local(path: str | Path) -> str:
    """Return a ``file://`` URL as a plain path (zarr makes local directories; fsspec not)."""
    text = str(path)
    return text.removeprefix("file://") if text.startswith("file://") else text


def open_input(path: str | Path) -> RawInput:
    """Open a recording to refocus: our run store, an NGFF (t, y, x) image, a Zarr array or TIFF.

    Raises
    ------
    RefocusError
        The path does not exist, is not one of those formats, has no raw image, or its image
        is not (t, y, x) with any other axis of size 1.
    """
    text = _local(path)
    if not _is_url(text):
        p = Path(text)
        if not p.exists():
            raise RefocusError(f"{text}: no such recording (file or directory not found)")
        p = p.resolve()  # one spelling: it names an input, or tells one that is its own output
        text = str(p)
        if p.suffix.lower() in (".tif", ".tiff"):
            return _open_tiff_input(p)
        if not p.is_dir():
            raise RefocusError(
                f"{text}: cannot refocus this file: expected an OME-Zarr store (a directory), "
                "a Zarr array or a .tif/.tiff stack"
            )
    import zarr

    try:
        node = zarr.open(store=text, mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise RefocusError(f"{text}: not a Zarr store ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        return _zarr_input(text, "", node, None)
    attrs = dict(node.attrs)
    deepz = attrs.get("deepz")
    if _is_run(deepz):
        with _malformed(text, "run metadata ('deepz' attributes)"):
            return _run_input(text, node, deepz)
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        raise RefocusError(
            f"{text}: no raw image: a Zarr group that is neither a run of this project nor "
            "an NGFF image ('multiscales' metadata); for another OME-Zarr collection, give "
            "the image inside it (e.g. STORE/0)"
        )
    with _malformed(text, "NGFF 'multiscales' metadata"):
        return _ngff_input(text, node, multiscales)


def _is_run(deepz: Any) -> TypeGuard[dict[str, Any]]:
    """Whether a store's root ``deepz`` attribute is a live run's (raw frames and presence)."""
    return isinstance(deepz, dict) and "raw_present" in deepz


@contextlib.contextmanager
def _malformed(text: str, what: str) -> Iterator[None]:
    """Turn a store's metadata that is not what it should be into one `RefocusError` line.

    The metadata is the store's, as hostile as any input: a missing key or a value of another
    kind anywhere in it (`what` names which part) is refused naming the store.
    """
    try:
        yield
    except RefocusError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise RefocusError(f"{text}: malformed {what} ({type(exc).__name__}: {exc})") from None


def _ngff_input(text: str, node: Any, multiscales: Any) -> RawInput:
    """Open the first image an NGFF group's 'multiscales' metadata names (see `open_input`)."""
    import zarr

    image = multiscales[0]
    array_path = str(image["datasets"][0]["path"])
    array: Any = node.get(array_path)
    if not isinstance(array, zarr.Array):
        raise RefocusError(
            f"{text}: its NGFF metadata names array {array_path!r}, which is missing"
        )
    # an axis of NGFF type "time" is the frames' axis whatever its name ("t", "time", ...)
    axes = [
        "t"
        if isinstance(a, dict) and a.get("type") == "time"
        else (a["name"] if isinstance(a, dict) else str(a))
        for a in image.get("axes", [])
    ]
    inp = _zarr_input(text, array_path, array, axes or None)
    scale = _ngff_scale(image, array.ndim)
    rate = _ngff_rate_hz(image, axes, scale)
    pixel = float(scale[-1]) if scale is not None and scale[-1] > 0 else None
    return RawInput(inp.spec, inp.n_t, inp.frame_shape, inp.present, rate, pixel)


def _run_input(text: str, root: Any, deepz: dict[str, Any]) -> RawInput:
    """Open a live run's store: its raw array and presence runs from the root attributes.

    Where the raw image is comes from `live.store.array_path` (either store layout).
    """
    import zarr

    from live.store import array_path, frame_metadata

    path = array_path(deepz, "raw")
    if path is None:
        raise RefocusError(
            f"{text}: this run kept no raw frames (recorder.keep_raw = false): nothing to refocus"
        )
    try:
        array = root[path]
    except KeyError:
        raise RefocusError(f"{text}: the run store has no raw array {path}") from None
    if not isinstance(array, zarr.Array):
        raise RefocusError(f"{text}: {path} is not an array")
    inp = _zarr_input(text, path, array, ["t", "y", "x"])
    present = tuple(
        t for start, stop in deepz.get("raw_present", []) for t in range(start, stop) if t < inp.n_t
    )
    _check_stored(text, array, present)
    rate = deepz.get("rate_hz")
    pixel = deepz.get("pixel_size_um")
    return RawInput(
        inp.spec,
        inp.n_t,
        inp.frame_shape,
        present,
        float(rate) if rate else None,
        float(pixel) if pixel else None,
        deepz,
        frame_metadata(root, "focus_um"),
    )


def _check_stored(text: str, array: Any, present: Sequence[int]) -> None:
    """Refuse a run whose raw array lacks an object (chunk or shard file) holding present seqs.

    zarr reads a missing object as its fill value, so a deleted or lost file would be
    refocused as zero frames and the output called complete. The recorder writes every object
    (``write_empty_chunks``) and lists a seq as present only once it is on disk, so a missing
    one is damage: refused, naming the seqs, rather than treated as frames the camera lost
    (the run's attributes say they were recorded; which of the two to believe is the user's
    call, not this tool's).
    """
    from zarr.core.sync import sync

    from live.metrics import format_seqs

    store = array.store_path.store
    if not present:
        return
    if not store.supports_listing:  # e.g. plain HTTP: the files cannot be listed, only read
        log.warning("%s: its store cannot list files; missing raw chunks are not checked", text)
        return
    outer = array.shards or array.chunks  # what one file holds
    per_file = int(outer[0])
    grid = [math.ceil(n / c) for n, c in zip(array.shape, outer, strict=True)]
    prefix = f"{array.store_path.path}/" if array.store_path.path else ""

    async def listed() -> set[str]:
        keys = store.list_prefix(prefix)
        return {key.removeprefix(prefix) async for key in keys}

    stored = sync(listed())
    lost = {
        index
        for index in {t // per_file for t in present}
        if not all(
            array.metadata.encode_chunk_key((index, *rest)) in stored
            for rest in itertools.product(*(range(n) for n in grid[1:]))
        )
    }
    missing = [t for t in present if t // per_file in lost]
    if missing:
        raise RefocusError(
            f"{text}: the raw frames of seqs {format_seqs(missing)} are listed as recorded but "
            "their chunk files are missing from the store (damaged or partly copied): restore "
            "them, or refocus a copy whose raw_present leaves them out"
        )


def _zarr_input(text: str, array_path: str, array: Any, axes: list[str] | None) -> RawInput:
    """Describe a Zarr array as frames, or raise `RefocusError` when it is not (t, y, x)."""
    shape = tuple(int(n) for n in array.shape)
    where = f"{text}/{array_path}" if array_path else text
    _check_dtype(array.dtype, where)
    t_axis = _t_axis(shape, axes, where)
    n_t = shape[t_axis] if len(shape) > 2 else 1
    spec = InputSpec(text, "zarr", array_path, t_axis, len(shape))
    return RawInput(spec, n_t, (shape[-2], shape[-1]), tuple(range(n_t)))


def _check_dtype(dtype: Any, where: str) -> None:
    """Refuse an image whose pixels are not real numbers (bool, complex, text ...).

    Checked when the input is opened, Zarr and TIFF alike, so a task never meets pixels the
    backend cannot take.
    """
    kind = np.dtype(dtype)
    if not np.issubdtype(kind, np.number) or np.issubdtype(kind, np.complexfloating):
        raise RefocusError(f"{where}: image dtype {kind} is not a real number type")


def _t_axis(shape: tuple[int, ...], axes: list[str] | None, where: str) -> int:
    """Return the time axis of an image: frames need (t, y, x), other axes of size 1.

    With named axes (NGFF), the frames' axis must be the one named ``t``: a (z, y, x) image
    is one volume, not a time series, and its planes are not frames to refocus.
    """
    described = f"shape {list(shape)}" + (f", axes {''.join(axes)}" if axes else "")
    if len(shape) < 2 or min(shape) < 1:
        raise RefocusError(
            f"{where}: image has {described}; refocusing needs frames (t, y, x) or one (y, x)"
        )
    if (
        axes is not None
        and len(axes) == len(shape)
        and [a.lower() for a in axes[-2:]] != list("yx")
    ):
        raise RefocusError(
            f"{where}: image has {described}; refocusing needs its last two axes to be y, x"
        )
    if len(shape) == 2:
        return 0
    lead = list(range(len(shape) - 2))
    named = axes is not None and len(axes) == len(shape)
    named_t = [i for i in lead if named and axes is not None and axes[i].lower() == "t"]
    big = [i for i in lead if shape[i] > 1]
    t = named_t[0] if named_t else (big[0] if big else 0)
    if any(i != t for i in big):
        raise RefocusError(
            f"{where}: image has {described}; refocusing needs frames (t, y, x): every axis "
            "other than t, y and x must have size 1"
        )
    if named and not named_t and big and axes is not None:
        raise RefocusError(
            f"{where}: image has {described}; its axis {axes[t]!r} is not time: refocusing "
            "needs frames along an axis named t"
        )
    return t


def _open_tiff_input(path: Path) -> RawInput:
    """Describe a TIFF stack (T, H, W) or single frame; the rate from ImageJ's ``finterval``."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape = tuple(int(n) for n in series.shape)
            axes = series.axes
            dtype = series.dtype
            ij = tif.imagej_metadata or {}
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, ...
        raise RefocusError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    _check_dtype(dtype, str(path))
    named = ["y" if a == "Y" else "x" if a == "X" else "t" for a in axes.upper()]
    if len(shape) >= 3 and sum(1 for n in shape[:-2] if n > 1) > 1:
        raise RefocusError(
            f"{path}: TIFF image has shape {list(shape)}, axes {axes}; refocusing needs frames "
            "(t, y, x): every axis other than t, y and x must have size 1"
        )
    t_axis = _t_axis(shape, named, str(path))
    n_t = shape[t_axis] if len(shape) > 2 else 1
    interval = ij.get("finterval")
    spec = InputSpec(str(path), "tiff", "", t_axis, len(shape))
    return RawInput(
        spec,
        n_t,
        (shape[-2], shape[-1]),
        tuple(range(n_t)),
        1.0 / float(interval) if interval else None,
    )


_TIME_UNITS_S = {"second": 1.0, "millisecond": 1e-3, "microsecond": 1e-6, "minute": 60.0}


def _ngff_scale(image: dict[str, Any], ndim: int) -> list[float] | None:
    """Return the first dataset's scale transform, if it has one of the right length."""
    for transform in image["datasets"][0].get("coordinateTransformations", []):
        if transform.get("type") == "scale" and len(transform.get("scale", [])) == ndim:
            return [float(s) for s in transform["scale"]]
    return None


def _ngff_rate_hz(
    image: dict[str, Any], axes: list[str], scale: list[float] | None
) -> float | None:
    """Frame rate from the NGFF time axis' unit and scale, if both are there."""
    if "t" not in axes or scale is None:
        return None
    i = axes.index("t")
    unit = image["axes"][i].get("unit") if isinstance(image["axes"][i], dict) else None
    if unit not in _TIME_UNITS_S or scale[i] <= 0:
        return None
    return 1.0 / (scale[i] * _TIME_UNITS_S[unit])


class _Frames:
    """Reads blocks of frames (n, H, W) from an `InputSpec`, in the process that runs a task.

    A TIFF with a page per frame is read page by page. One whose pages hold several frames
    (an ImageJ hyperstack "truncated" to one IFD, as ImageJ and tifffile write stacks beyond
    4 GB; a volumetric page) is memory-mapped when its pixels lie uncompressed in one run of
    the file, so each block reads its own frames and processes share the page cache. Only
    compressed or scattered data, which cannot be mapped, is read whole, once per process.
    """

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._array: Any = None
        self._tif: Any = None
        self._pages = False
        if spec.kind == "zarr":
            import zarr

            self._array = zarr.open_array(store=spec.path, path=spec.array_path, mode="r")
        else:
            import tifffile

            self._tif = tifffile.TiffFile(spec.path)
            series = self._tif.series[0]
            n_t = int(series.shape[spec.t_axis]) if spec.ndim > 2 else 1
            self._pages = len(series.pages) == n_t and series.keyframe.shape[-2:] == tuple(
                series.shape[-2:]
            )
            if not self._pages:  # one page holds several frames
                self._array = _mapped_or_whole(spec.path, series)

    def read(self, t0: int, t1: int) -> np.ndarray:
        """Return frames ``t0 .. t1 - 1`` as an (n, H, W) array of the stored dtype."""
        spec = self.spec
        if self._array is None:  # a TIFF with one page per frame: read just those pages
            with self._lock:
                data = self._tif.asarray(key=range(t0, t1), series=0)
            return np.asarray(data).reshape(t1 - t0, *data.shape[-2:])
        if spec.ndim == 2:
            return np.asarray(self._array[...])[np.newaxis]
        index: list[Any] = [0] * (spec.ndim - 2) + [slice(None), slice(None)]
        index[spec.t_axis] = slice(t0, t1)
        block = self._array[tuple(index)]
        if isinstance(block, np.memmap):  # read now, in native byte order: no view of the file
            return np.array(block, dtype=block.dtype.newbyteorder("="))
        return np.asarray(block)

    def close(self) -> None:
        """Close a TIFF file handle."""
        if self._tif is not None:
            self._tif.close()


def _mapped_or_whole(path: str, series: Any) -> np.ndarray:
    """Return a TIFF's first series memory-mapped (read-only), or read whole if it cannot be.

    tifffile maps a series whose pixels are uncompressed and contiguous in the file
    (``series.dataoffset``); compressed, tiled or scattered pixels have no such run of bytes,
    so they are decoded into memory at once (`_Frames` keeps them for the process).
    """
    import tifffile

    if series.dataoffset is not None:
        try:
            mapped: np.ndarray = tifffile.memmap(path, series=0, mode="r")
        except (ValueError, OSError):  # e.g. a file cut short of its pixels: read, and fail, whole
            pass
        else:
            return mapped
    return np.asarray(series.asarray())


_OPENED: dict[tuple[str, str, str], Any] = {}
"""Arrays and frame readers a process opened for a job, keyed by (job token, store, path)."""
_OPENED_LOCK = threading.Lock()
_MAX_OPENED = 12


def _kept(key: tuple[str, str, str], make: Callable[[], Any]) -> Any:
    """Return what `make` opens for `key`, once per process (the oldest dropped beyond a few)."""
    with _OPENED_LOCK:
        value = _OPENED.get(key)
        if value is None:
            if len(_OPENED) >= _MAX_OPENED:
                _OPENED.pop(next(iter(_OPENED)))
            value = _OPENED[key] = make()
        return value


_TIFFS: dict[tuple[str, int], _Frames] = {}
_TIFFS_LOCK = threading.Lock()


def _frames(spec: InputSpec, token: str) -> _Frames:
    """Return a frame reader for `spec`: Zarr once per job (`token`), TIFFs kept per process."""
    if spec.kind == "zarr":
        opened = (token, spec.path, f"frames:{spec.array_path}")
        frames: _Frames = _kept(opened, lambda: _Frames(spec))
        return frames
    key = (spec.path, Path(spec.path).stat().st_mtime_ns)
    with _TIFFS_LOCK:
        reader = _TIFFS.get(key)
        if reader is None:
            for old in [k for k in _TIFFS if k[0] == spec.path]:
                _TIFFS.pop(old).close()
            reader = _TIFFS[key] = _Frames(spec)
        return reader


# ----------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class EngineSpec:
    """How each process loads the backend (the cache key, with the model file's path)."""

    model: str
    prefer: tuple[str, ...] | None
    precision: Precision = "fp32"
    intra_op_threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    render_modality: Modality | None = None
    psf_bank: str | None = None
    point_fit: Lateral | None = None
    """The point fit's lateral convention (`PointFit.lateral`), None: no fit."""


_BACKENDS: dict[EngineSpec, tuple[Backend, threading.Lock]] = {}
_BACKENDS_LOCK = threading.Lock()


def _backend(spec: EngineSpec) -> tuple[Backend, threading.Lock]:
    """Load the backend of `spec` once per process; return it with the lock that serialises it.

    A `Backend` is called from one thread at a time, so threads of one process share one
    backend (one copy of the weights and buffers) and take turns under the lock.
    """
    with _BACKENDS_LOCK:
        entry = _BACKENDS.get(spec)
        if entry is None:
            backend = load_backend(
                spec.model,
                prefer=list(spec.prefer) if spec.prefer else None,
                precision=spec.precision,
                intra_op_threads=spec.intra_op_threads,
                max_batch=spec.max_batch,
                render_modality=spec.render_modality,
                psf_bank=spec.psf_bank,
                point_fit=None if spec.point_fit is None else PointFit(lateral=spec.point_fit),
            )
            entry = _BACKENDS[spec] = (backend, threading.Lock())
        return entry


def clear_backends() -> None:
    """Close and forget every backend, opened array and frozen plan this process has cached."""
    with _OPENED_LOCK:
        _OPENED.clear()
    with _PLANS_LOCK:  # up to a few plans' DPMs (GBs for 41 x 2048²) in a long-lived process
        _PLANS.clear()
    with _BACKENDS_LOCK:
        # one backend may be kept under two keys (asked for by name and as chosen): closed once
        unique = {id(backend): (backend, lock) for backend, lock in _BACKENDS.values()}
        for backend, lock in unique.values():
            with lock:
                backend.close()
        _BACKENDS.clear()


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file (cached on path, modification time and size)."""
    return file_sha256(path)


def _sha256(path: Path) -> str:
    """SHA-256 of a model or PSF bank file: its identity in the output metadata and resume check."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Job:
    """Everything a chunk task needs (picklable); each process gets the plan's DPMs once.

    Threads share the driver's job. A process pool's tasks each get `without_plan`: the pool's
    scheduler pickles a task's inputs with every task, and the DPMs are the bulk of a job (41
    planes of 2048² are 690 MB, uniform planes included), so they reach each pool process once,
    as it starts (`_install_plan`). A cluster's workers get the whole job once each (scattered).
    """

    source: InputSpec
    engine: EngineSpec
    plan: VolumePlan | None
    """The DPMs; None in a process pool's tasks, whose process holds them (`_install_plan`)."""
    plan_token: str
    """The plan's digest: the key under which each process keeps it frozen (`_frozen_plan`)."""
    store: str
    array_path: str
    manifest_path: str
    rows_only: bool
    """Write only the computed rows (fill-gaps: never touch the live stacks around them)."""
    token: str
    """Unique per job: the key under which each process keeps this job's opened arrays."""

    def without_plan(self) -> Job:
        """Return this job without its DPMs: about 1 kB whatever the plan (`Job`, why)."""
        return replace(self, plan=None)


@dataclass(frozen=True)
class Block:
    """One output chunk: time points ``t0 .. t1 - 1`` and the seqs to compute in it."""

    index: int
    t0: int
    t1: int
    seqs: tuple[int, ...]
    offsets_um: tuple[float, ...] | None = None
    """Focus-locked runs: each seq's DPM offset (`engine.dpm.FocusLock`), µm; else None."""


@dataclass(frozen=True)
class BlockResult:
    """What a chunk task did."""

    index: int
    seqs: tuple[int, ...]
    skipped: bool
    seconds: float
    worker: str


_PLANS: dict[str, VolumePlan] = {}
_PLANS_LOCK = threading.Lock()


def _frozen_plan(job: Job) -> VolumePlan:
    """Return the job's plan with read-only DPMs owning their data (as the live worker's).

    Kept per process under the plan's token, so backends normalise a per-plane model's DPM
    channel once per process instead of once per frame; a job sent without its plan
    (`Job.without_plan`) finds it there, installed when its pool process started.
    """
    with _PLANS_LOCK:
        plan = _PLANS.get(job.plan_token)
        if plan is None:
            if job.plan is None:  # a pool whose processes did not run `_install_plan`
                raise RuntimeError(
                    f"chunk task in process {os.getpid()} without the plan's DPMs: this "
                    "process was not given them when it started"
                )
            plan = _keep_plan(job.plan_token, job.plan)
        return plan


def _keep_plan(token: str, plan: VolumePlan) -> VolumePlan:
    """Keep `plan` frozen under `token` (the oldest of a few dropped); call under the lock."""
    if len(_PLANS) >= 4:
        _PLANS.pop(next(iter(_PLANS)))
    frozen = _PLANS[token] = plan.frozen()
    return frozen


def _install_plan(token: str, box: list[VolumePlan]) -> None:
    """Keep a job's plan in this process before it runs any task (a process pool's initializer).

    Its arguments are pickled once per pool process (or inherited, forked), not per task. The
    plan comes in a one-item list that this empties: the pool keeps its initializer's
    arguments for the process's life, and would otherwise hold a second copy of the DPMs
    beside the frozen one (twice the plan in every process).
    """
    plan = box.pop()
    with _PLANS_LOCK:
        if token not in _PLANS:
            _keep_plan(token, plan)


def _crc(rows: np.ndarray) -> int:
    """CRC-32 of a block's values as float32 bytes: the completion mark a rerun verifies.

    `rows` are the values as stored (float16 stacks widen exactly), so a block reads back
    with the CRC it was written with, whatever the stored dtype.
    """
    return zlib.crc32(np.ascontiguousarray(rows, dtype=np.float32).data)


def _open_out(store: str, path: str, token: str) -> Any:
    """Open an array of the output store for writing, once per job and process.

    Opening reads the array's zarr.json: one more store round trip per task, about 2 ms on a
    local disk and more on object storage. A job's arrays do not change shape while its tasks
    run (the driver sizes them first), so each process keeps them under the job's `token`.
    """
    import zarr

    return _kept((token, store, path), lambda: zarr.open_array(store=store, path=path, mode="r+"))


def _mark(manifest: Any, index: int) -> int:
    """Return chunk `index`'s manifest entry: its CRC, or `_NOT_DONE` when unset or unreadable.

    An entry that does not decode (a truncated or emptied object) says nothing about the chunk,
    so the chunk is recomputed, and its entry written again, like one never done.
    """
    try:
        return int(manifest[index])
    except Exception:  # zarr raises several types for an object that does not decode
        return _NOT_DONE


def _read_frames(job: Job, block: Block) -> np.ndarray:
    """Read a block's raw frames, or raise `RefocusTaskError` naming the chunk and its seqs.

    A damaged input (a raw chunk that fails its checksum, a truncated TIFF) fails in the task
    that reads it, wherever that runs: the error says where, in one line, not as a traceback.
    """
    from live.metrics import format_seqs

    try:
        return _frames(job.source, job.token).read(block.t0, block.t1)
    except Exception as exc:  # zarr and tifffile raise many types for damaged data
        raise RefocusTaskError(
            f"{job.source.path}: cannot read the raw frames of chunk {block.index} (seqs "
            f"{format_seqs(list(block.seqs))}): {type(exc).__name__}: {exc}"
        ) from None


def _verified(job: Job, block: Block, out: Any, mark: int) -> bool:
    """Whether the chunk's data reads back, is finite and has the manifest's CRC."""
    if mark == _NOT_DONE:
        return False
    try:
        data = np.asarray(out[block.t0 : block.t1])
    except Exception:  # a damaged chunk object: decode errors of any kind mean "recompute"
        return False
    if job.rows_only:
        data = data[[s - block.t0 for s in block.seqs]]
    return bool(np.isfinite(data).all()) and _crc(data) == mark


def refocus_block(job: Job, block: Block) -> BlockResult:
    """Refocus one output chunk unless it is already written and verified (a Dask task).

    Reads the chunk's raw frames, runs ``backend.refocus(frame, plan, offset, dtype)`` per
    present frame (the live worker's call: planes made in the output's dtype; a live run's
    stacks may be float16, `live.store.as_stack_dtype`, values beyond its range saturated and
    logged),
    writes the chunk (or only its rows, for fill-gaps, one write per run of consecutive seqs:
    a sharded array rewrites its shard for each) and then its CRC into the manifest, so a
    chunk counts as done only once its data is on the store.
    """
    from live.store import as_stack_dtype

    t_start = time.perf_counter()
    worker = f"{_host()}:{os.getpid()}"
    out = _open_out(job.store, job.array_path, job.token)
    manifest = _open_out(job.store, job.manifest_path, job.token)
    if _verified(job, block, out, _mark(manifest, block.index)):
        return BlockResult(block.index, block.seqs, True, time.perf_counter() - t_start, worker)
    frames = _read_frames(job, block)
    backend, lock = _backend(job.engine)
    plan = _frozen_plan(job)
    dtype = np.dtype(out.dtype).type
    planes = np.zeros((block.t1 - block.t0, *plan.dpms_um.shape), dtype=dtype)
    offsets = block.offsets_um or (0.0,) * len(block.seqs)
    unfinished: set[int] = set()
    with lock:
        for seq, offset in zip(block.seqs, offsets, strict=True):
            frame = frames[seq - block.t0]
            if not math.isfinite(offset):  # no recorded focus for a focus lock (said once)
                planes[seq - block.t0] = np.nan
                unfinished.add(seq)
                continue
            if frame.dtype.kind == "f" and not np.isfinite(frame).all():
                # no stack from a frame with NaN or infinite pixels (the network would spread
                # them over every plane): its planes stay NaN, which `_verified` never counts
                # as done, so each run says so again rather than the store hiding it
                log.warning("frame %d holds NaN or infinite pixels: its planes are left NaN", seq)
                planes[seq - block.t0] = np.nan
                unfinished.add(seq)
                continue
            try:
                one = backend.refocus(frame, plan, np.array([offset]), dtype=dtype)
            except (ValueError, BackendError) as exc:  # this frame cannot be refocused (a
                # pixel beyond what the backend takes ...): it costs this frame, as live
                # (`live.worker`), left NaN and not done, not the job
                log.warning("frame %d cannot be refocused (%s): its planes are left NaN", seq, exc)
                planes[seq - block.t0] = np.nan
                unfinished.add(seq)
                continue
            planes[seq - block.t0] = one[0]
    planes, clipped = as_stack_dtype(planes, out.dtype, saturate_same=True)
    if clipped:
        log.warning(
            "%d values of frames %d-%d beyond the %s range: saturated",
            clipped,
            block.t0,
            block.t1 - 1,
            out.dtype,
        )
    if job.rows_only:
        rows = planes[[s - block.t0 for s in block.seqs]]
        for start, stop in _runs(block.seqs):
            out[start:stop] = planes[start - block.t0 : stop - block.t0]
        mark = _crc(rows)
    else:
        out[block.t0 : block.t1] = planes
        mark = _crc(planes)
    manifest[block.index] = mark
    # frames left NaN (no focus for the lock, NaN pixels, refused by the backend) are not
    # done: not present in a filled run, and the image not complete
    refocused = tuple(s for s in block.seqs if s not in unfinished)
    return BlockResult(block.index, refocused, False, time.perf_counter() - t_start, worker)


def warm_worker(engine: EngineSpec) -> str:
    """Load (and cache) the backend in this process; return its name and device."""
    backend, _ = _backend(engine)
    return f"{backend.name} on {backend.device}"


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class _Plan:
    """The DPMs to refocus onto, where they came from, and the focus lock they follow, if any."""

    plan: VolumePlan
    source: str
    focus_lock: tuple[float, float] | None = None
    """(reference focus µm, stage z sign) of ``planes.focus_lock_um``, or None."""
    allow_extrapolation: bool = False
    """The config's ``engine.allow_extrapolation``: the live run took the same planes then."""


def _lock_of(planes: Any) -> tuple[float, float] | None:
    """Return the focus lock of a validated `PlanesConfig`, or None when it has none."""
    if planes.focus_lock_um is None:
        return None
    return float(planes.focus_lock_um), float(planes.stage_z_sign)


def _plan_from_planes(
    planes: Sequence[float] | None,
    scope: Any,
    raw: RawInput,
    stored: Any | None = None,
) -> _Plan:
    """Build the plan from --planes, --scope, the run's stored config or its planes; say which.

    `stored` is the run's ``[planes]`` config as `_stored_planes` validated it (validated once
    per job by the caller: a broken one is said once).
    """
    shape = raw.frame_shape
    if planes is not None:
        if len(planes) == 0:
            raise RefocusError("--planes needs at least one z value (µm)")
        return _Plan(VolumePlan.from_z([float(z) for z in planes], shape), "--planes")
    if scope is not None:
        plan = scope.planes.build(shape, float(scope.source.pixel_size_um))
        allow = bool(scope.engine.allow_extrapolation)
        return _Plan(plan, "the scope config", _lock_of(scope.planes), allow)
    run = raw.run or {}
    config = run.get("config")
    if isinstance(config, dict) and stored is not None:
        try:
            pixel = raw.pixel_size_um or float(config.get("source", {}).get("pixel_size_um", 1.0))
            engine = config.get("engine")
            allow = isinstance(engine, dict) and engine.get("allow_extrapolation") is True
            plan = _recorded_surfaces(raw, stored) or stored.build(shape, pixel)
            return _Plan(plan, "the recording's config", _lock_of(stored), allow)
        except (ValueError, OSError) as exc:
            log.warning("the recording's stored planes cannot be rebuilt (%s)", exc)
    if run.get("planes_um"):
        return _Plan(VolumePlan.from_z(run["planes_um"], shape), "the recording's planes")
    raise RefocusError(
        f"{raw.spec.path}: the recording does not say which planes it was refocused onto: "
        "give --planes Z1 Z2 ... (µm) or --scope config.toml"
    )


def _stored_planes(raw: RawInput) -> Any | None:
    """Return the run's stored ``[planes]`` config, validated (a `PlanesConfig`), or None.

    None when the recording stored none (older runs, other stores) or one that does not
    validate (said: the recorded planes are used instead).
    """
    config = (raw.run or {}).get("config")
    if not isinstance(config, dict) or not isinstance(config.get("planes"), dict):
        return None
    from live.config import PlanesConfig

    try:
        return PlanesConfig.model_validate(config["planes"])
    except ValueError as exc:
        log.warning("the recording's stored planes cannot be rebuilt (%s)", exc)
        return None


def _check_fill_plan(raw: RawInput, chosen: _Plan, stored: Any | None) -> None:
    """Refuse a --fill-gaps plan that is not the live run's: other DPMs or another focus lock.

    The filled stacks go into the live image beside the live ones, so they must be the same
    planes: every DPM value is compared with the run's (the DPMs stored beside its stacks for
    surfaces, else its recorded plane offsets; the plan digest the daemon's workers check is
    not stored in the run), and the focus lock with the one in its stored config.
    """
    run = raw.run or {}
    plan, shape = chosen.plan, raw.frame_shape
    live: VolumePlan | None = None
    dpms = _kept_dpms(raw) if isinstance(run.get("surfaces"), list) else None
    if dpms is not None:
        try:
            live = VolumePlan.from_dpms(list(dpms), run["surfaces"])
        except DPMError:
            live = None
    elif isinstance(run.get("planes_um"), list):  # a run records planes_um or surfaces
        with _malformed(raw.spec.path, "run metadata ('deepz' planes_um)"):
            live = VolumePlan.from_z([float(z) for z in run["planes_um"]], shape)
    same = True
    if live is not None:
        same = live.dpms_um.shape == plan.dpms_um.shape and bool(
            np.allclose(live.dpms_um, plan.dpms_um, rtol=0.0, atol=1e-5)
        )
    elif isinstance(run.get("surfaces"), list):  # surfaces whose DPMs the run did not keep
        same = plan.z_um is None and list(plan.labels) == [str(n) for n in run["surfaces"]]
    if not same:
        was = ", ".join(live.labels if live is not None else map(str, run["surfaces"]))
        raise RefocusError(
            f"{raw.spec.path}: the live run refocused onto {was}, but this plan is "
            f"{', '.join(plan.labels)} (from {chosen.source}): --fill-gaps needs the live run's "
            "planes (drop --planes / --scope)"
        )
    lock = _lock_of(stored) if stored is not None else None
    if chosen.focus_lock != lock:
        raise RefocusError(
            f"{raw.spec.path}: the live run had {_lock_said(lock)}, but this plan has "
            f"{_lock_said(chosen.focus_lock)} (from {chosen.source}): --fill-gaps needs the "
            "live run's planes and focus lock (drop --planes / --scope)"
        )


def _lock_said(lock: tuple[float, float] | None) -> str:
    """Say in words whether planes are fixed or follow the stage focus (and from where)."""
    if lock is None:
        return "fixed planes"
    return f"planes locked to the stage focus (reference {lock[0]} µm, stage z sign {lock[1]})"


def _recorded_surfaces(raw: RawInput, stored: Any) -> VolumePlan | None:
    """Return the surfaces a run refocused onto live, as its store holds them (None: not kept).

    A surface from a file is rebuilt from that file only when the run kept no stacks: the
    file may have changed since (the DPMs the live stacks were made with are beside them).
    """
    if stored.surfaces is None:
        return None
    names = [s.name for s in stored.surfaces]
    dpms = _kept_dpms(raw)
    if dpms is None or dpms.shape != (len(names), *raw.frame_shape):
        return None
    return VolumePlan.from_dpms(list(dpms.astype(np.float32)), names)


def _kept_dpms(raw: RawInput) -> np.ndarray | None:
    """Return the DPMs a surface run's live stacks were made with, as its store keeps them.

    None when the run kept no stacks or no DPMs beside them (or they cannot be read).
    """
    import zarr

    from live.store import DPMS_ARRAY, image_groups

    group = image_groups(raw.run or {}).get("stacks")
    if group is None:
        return None
    try:
        path = f"{group}/{DPMS_ARRAY}"
        return np.asarray(zarr.open_array(store=raw.spec.path, path=path, mode="r")[...])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _load_scope(path: str | Path) -> Any:
    """Read a scope config (live.config, imported only for --scope), as `RefocusError`."""
    from live.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise RefocusError(str(exc)) from None


def _engine_choice(
    model: str | Path | None,
    backend: str | None,
    scope: Any,
    raw: RawInput,
    psf_bank: str | Path | None = None,
    fill_gaps: bool = False,
) -> tuple[Path, tuple[str, ...] | None, int, Precision, Modality | None, Path | None]:
    """Model file, backend preference, max_batch, precision, render modality and PSF bank.

    Explicit arguments first, then the scope config, then the run's stored config (so the
    default reproduces the live run's model, backend and measured PSF bank), then the shipped
    model and "auto". A configured model that is not here falls back to the shipped model,
    said, except for `fill_gaps`: its stacks go into the run's live image beside the live
    run's, so another model there is refused (``--model`` chooses one deliberately).
    """
    stored: dict[str, Any] = {}
    run_config = (raw.run or {}).get("config")
    if isinstance(run_config, dict) and isinstance(run_config.get("engine"), dict):
        stored = run_config["engine"]
    if scope is not None:
        stored = scope.engine.model_dump(mode="json")
        stored["model_path"] = str(scope.engine.resolved_model_path())
    path: Path
    if model is not None:
        path = Path(model)
    elif stored.get("model_path"):
        path = Path(stored["model_path"])
        whose = "the scope config's" if scope is not None else "the recording's"
        if not path.is_file() and fill_gaps:
            raise RefocusError(
                f"{path}: {whose} model is not here, and --fill-gaps does not fill the live "
                "stacks with another model silently: pass --model to choose one"
            )
        if not path.is_file():
            log.warning("%s model %s is not here: using the shipped model", whose, path)
            path = DEFAULT_MODEL
    else:
        path = DEFAULT_MODEL
    prefer: tuple[str, ...] | None
    if backend is not None:
        prefer = (backend,)
    elif stored.get("backends"):
        prefer = tuple(str(b) for b in stored["backends"])
    else:
        prefer = None
    precision = stored.get("precision", "fp32")
    if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
        precision = "fp32"
    modality = stored.get("render_modality")
    if modality not in ("widefield", "confocal"):
        modality = None
    bank: Path | None = None
    if psf_bank is not None:
        bank = Path(psf_bank)
    elif isinstance(stored.get("psf_bank"), str):
        bank = Path(stored["psf_bank"])  # a missing one is refused by the caller
    return path, prefer, int(stored.get("max_batch") or 64), precision, modality, bank


def _recorded_sha256(raw: RawInput, role: str, path: Path) -> str | None:
    """Return the SHA-256 the live run recorded for its `role` file at `path` (or None).

    `role` is "model" or "psf_bank"; None when the run recorded none (older runs, other stores)
    or another path. The attrs come from disk, so every level is checked for its type.
    """
    files = (raw.run or {}).get("engine_files")
    entry = files.get(role) if isinstance(files, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None
    if re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is None:  # not a hash: nothing to check
        return None
    if not isinstance(entry.get("path"), str) or Path(entry["path"]) != path:
        return None
    return str(entry["sha256"])


def _check_recorded(
    raw: RawInput, model: Path | None, bank: Path | None, fill_gaps: bool = False
) -> None:
    """Refuse a run's PSF bank that changed since the run; warn of a changed model.

    A bank changed in place would put this refocus's planes through another PSF than the live
    stacks', silently; pass ``--psf-bank`` to mean it. A changed model is a common, deliberate
    choice (a newer model at the same path), so it is only said; but `fill_gaps` writes beside
    the live stacks, which that model did not make, so there it is refused (``--model``).
    """
    if bank is not None and (want := _recorded_sha256(raw, "psf_bank", bank)) is not None:
        have = _sha256(bank)
        if have != want:
            raise RefocusError(
                f"{bank}: this PSF bank changed since the run was recorded through it (sha256 "
                f"{have[:12]}, recorded {want[:12]}); pass --psf-bank {bank} to refocus through "
                "it as it is now"
            )
    if model is not None and (want := _recorded_sha256(raw, "model", model)) is not None:
        have = _sha256(model)
        if have != want and fill_gaps:
            raise RefocusError(
                f"{model}: this model changed since the run was recorded with it (sha256 "
                f"{have[:12]}, recorded {want[:12]}), and --fill-gaps does not fill the live "
                f"stacks with another model silently: pass --model {model} to choose it"
            )
        if have != want:
            log.warning("%s changed since the run was recorded with it: refocusing with it", model)


# ----------------------------------------------------------------------------- output lock


def _host() -> str:
    """Return the name of this machine, as task results name their worker."""
    return platform.node()


@contextlib.contextmanager
def _write_lock(store: str) -> Iterator[None]:
    """Hold the output store's lock (`live.store_lock`) while the job writes it.

    The driver holds it from before the output is opened until its presence is written;
    tasks, in whatever process or cluster, never touch it. A second job is refused in one
    line naming the holder. A store behind a URL has no lock files (object stores have no
    locks): said, and not guarded.
    """
    if _is_url(store):
        log.warning(
            "%s: a store behind a URL cannot be locked: another job writing it is not refused",
            store,
        )
        yield
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(write_lock(store))
        except StoreLocked as exc:
            raise RefocusError(str(exc)) from None
        yield


# ----------------------------------------------------------------------------- outputs


def _runs(seqs: Iterable[int]) -> list[list[int]]:
    """Half-open [start, stop) runs of `seqs` as JSON lists (`live.metrics.seq_ranges`)."""
    from live.metrics import seq_ranges  # zmq and the status socket stay out of Dask workers

    return [list(r) for r in seq_ranges(seqs)]


def _expand(runs: Iterable[Sequence[int]]) -> set[int]:
    """All ints of half-open runs."""
    return {t for start, stop in runs for t in range(int(start), int(stop))}


def _stacks_metadata(
    name: str, plan: VolumePlan, raw: RawInput, dtype: str
) -> tuple[dict[str, Any], list[str], XmlImage]:
    """NGFF ``ome`` attribute, dimension names and OME-XML entry of an offline stacks image.

    Built as the live recorder builds its stacks image (`live.store.StackAxis`): evenly spaced
    planes are a ``z`` axis in µm from the first plane, uneven planes and surfaces a custom
    axis with no unit, never invented z positions. A source without a rate or pixel size (a
    TIFF) gets 1 s and 1 µm, as NGFF's default scale.
    """
    from live.store import StackAxis, XmlImage, image_axes, ngff_image

    axis = StackAxis.from_plan(plan.z_um, plan.labels, plan.dpms_um)
    dt = 1.0 / raw.rate_hz if raw.rate_hz else 1.0
    px = raw.pixel_size_um or 1.0
    axes = image_axes("stacks", axis)
    scale, translation = axis.transform(dt, px)
    xml = XmlImage(
        name=name,
        dtype=dtype,
        size_t=raw.n_t,
        size_z=len(plan),
        size_y=raw.frame_shape[0],
        size_x=raw.frame_shape[1],
        pixel_size_um=px,
        interval_s=dt,
        z_step_um=scale[1] if axis.uniform else None,
    )
    return ngff_image(name, axes, scale, translation), [a["name"] for a in axes], xml


IN_STORE = "."
"""A job identity's ``source`` when the input is the output store itself (`_identity`)."""


def _identity(
    raw: RawInput,
    plan: VolumePlan,
    model: dict[str, str],
    backend: str,
    chunk: int,
    focus_lock: tuple[float, float] | None,
    store: str,
) -> dict[str, Any]:
    """Describe what must match for a rerun to resume an existing output image.

    What defines the stacks: the input, the plan's DPMs, the model's and PSF bank's hashes,
    the backend, the chunking. Not where the directories happen to be: an input that is the
    output `store` itself (a run's offline image, fill-gaps) is `IN_STORE`, so a run store
    moved, renamed or copied whole resumes its jobs. Another input (a TIFF, another store) is
    named by its absolute path: its output store may move, but a moved input is refused as
    another one (its path is all that tells two recordings of one shape apart; --overwrite
    recomputes).
    """
    identity: dict[str, Any] = {
        "source": IN_STORE if raw.spec.path == store else raw.spec.path,
        "source_image": raw.spec.array_path,
        "n_t": raw.n_t,
        "frame_shape": list(raw.frame_shape),
        "plan_sha256": hashlib.sha256(plan.dpms_um.tobytes()).hexdigest(),
        "model_sha256": model["sha256"],
        "backend": backend,
        "chunk_t": chunk,
    }
    if focus_lock is not None:  # only then: images written before the lock existed still resume
        identity["focus_lock"] = _lock_attrs(focus_lock)
    # The same network through another PSF bank makes other planes: a resume must not mix
    # them. Only when not the default, so images written before these keys still resume.
    if model.get("render_modality", "widefield") != "widefield":
        identity["render_modality"] = model["render_modality"]
    if "psf_bank_sha256" in model:
        identity["psf_bank_sha256"] = model["psf_bank_sha256"]
    if "point_fit" in model:  # beads refitted: other planes again
        identity["point_fit"] = model["point_fit"]
    return identity


def _as_now(old: Any, store: str) -> Any:
    """Return a recorded job identity in today's terms, so outputs written before resume.

    Before `IN_STORE`, an input that was the output store itself was named by its absolute
    path: that path, where the store still is, is `IN_STORE` now. Such an output moved since
    is refused (its old path cannot tell its own store from another input): --overwrite.
    """
    if isinstance(old, dict) and old.get("source") == store:
        return {**old, "source": IN_STORE}
    return old


def _differs(old: Any, new: dict[str, Any]) -> list[str]:
    """Return the keys in which a recorded job identity (any JSON, or None) differs from `new`."""
    before: dict[str, Any] = old if isinstance(old, dict) else {}
    return sorted(k for k in set(before) | set(new) if before.get(k) != new.get(k))


def _compressors() -> list[Any]:
    """Output codecs: Blosc-LZ4 with bit shuffle (the shipped config's recorder codec).

    For a 9 × 256² float32 stack it wrote in 2.4 ms and kept 64 % of the bytes, where zstd
    level 1 took 3.8 ms and kept 81 % (measured on the development machine).
    """
    from zarr.codecs import BloscCodec, BloscShuffle

    return [BloscCodec(cname="lz4", clevel=3, shuffle=BloscShuffle.bitshuffle)]


@dataclass
class _Output:
    """The opened output: store, image group name, array and manifest paths, chunk size."""

    store: str
    image: str
    chunk: int
    n_blocks: int
    fill: bool
    group: Any = None
    name: str = ""
    """The image's name (its role in the store's ``deepz.images``); `image` is its group."""

    @property
    def array_path(self) -> str:
        """The (t, z, y, x) array."""
        return f"{self.image}/0"

    @property
    def manifest_path(self) -> str:
        """The per-chunk completion array."""
        return f"{self.image}/{MANIFEST}"


def _create_manifest(group: Any, n_blocks: int) -> None:
    """Create the per-chunk completion array: one int64 per chunk, one object each."""
    group.create_array(
        MANIFEST,
        shape=(n_blocks,),
        chunks=(1,),
        dtype="int64",
        fill_value=_NOT_DONE,
        compressors=None,
        overwrite=True,
    )


def _output_store(raw: RawInput, out: str | Path | None) -> str:
    """Return the store a job writes, one spelling of it: `out`, else the run store itself.

    Raises
    ------
    RefocusError
        The input is not a run of this project and no `out` was given.
    """
    if out is None:
        if not raw.is_run:
            raise RefocusError(
                f"{raw.spec.path} is not a run of this project, so the stacks need their own "
                "store: give --out NEW.ome.zarr"
            )
        return raw.spec.path
    store = _local(out)
    return store if _is_url(store) else str(Path(store).resolve())


def _prepare_output(
    raw: RawInput,
    plan: VolumePlan,
    *,
    store: str,
    out: str | Path | None,
    name: str | None,
    fill_gaps: bool,
    chunk: int,
    overwrite: bool,
    identity: dict[str, Any],
    deepz: dict[str, Any],
    stack_dtype: str = "float32",
    chunk_given: bool = True,
    wanted: Sequence[int] = (),
) -> _Output:
    """Create (or reopen and check, to resume) the stacks image and its manifest.

    Without a given chunk, a resumed image keeps its own (``identity`` is updated), so an
    image written with another default still resumes.
    """
    import zarr

    from live.store import image_groups, register_image, reserved_names

    shape = (raw.n_t, len(plan), *raw.frame_shape)
    root: Any
    if fill_gaps:
        root = zarr.open_group(store=store, mode="r+")
        return _prepare_fill(root, raw, plan, identity, deepz, wanted, overwrite)
    if out is not None:
        try:
            root = zarr.open_group(store=store, mode="a", zarr_format=3)
        except Exception as exc:
            raise RefocusError(f"{store}: cannot open or create the output store: {exc}") from None
        if "deepz" not in root.attrs:
            root.attrs["deepz"] = {
                "source": raw.spec.path,
                "source_image": raw.spec.array_path,
                "time_index": "the source's time index (camera sequence number for runs)",
            }
        name = name or OUT_IMAGE
    else:
        root = zarr.open_group(store=store, mode="r+")
        name = name or DEFAULT_IMAGE
    target = root.attrs.get("deepz")  # any run's store, the source's or another (--out)
    if name == "raw" or (_is_run(target) and name in reserved_names(target)):
        raise RefocusError(
            f"the output image {name!r} would overwrite the run's own data in {store}: choose "
            "another --name"
        )
    ome, dimensions, xml = _stacks_metadata(name, plan, raw, stack_dtype)
    # its group: where a rerun finds it (the images listed in the store, or a group of that
    # name from before images were listed); a new image gets its group when it is created
    known = image_groups(dict(root.attrs.get("deepz", {})))
    image = known.get(name) or (name if name in root and name not in known.values() else None)
    n_blocks = math.ceil(raw.n_t / chunk)
    group: Any
    if image is not None and image in root and not overwrite:
        group = root[image]
        stored = dict(group.attrs.get("deepz", {}))
        old = _as_now(stored.get("job"), store)
        # an image written before the job recorded its render modality: the model's says it
        modality = dict(stored.get("model") or {}).get("render_modality", "widefield")
        if isinstance(old, dict) and "render_modality" not in old and modality != "widefield":
            old = {**old, "render_modality": modality}
        if not chunk_given and isinstance(old, dict) and isinstance(old.get("chunk_t"), int):
            chunk = max(1, old["chunk_t"])
            identity["chunk_t"] = chunk
            n_blocks = math.ceil(raw.n_t / chunk)
        if old != identity:
            raise RefocusError(
                f"{store}/{image} ({name}) exists from another refocusing (differs in "
                f"{', '.join(_differs(old, identity))}): pass --overwrite to replace it, or "
                "--name / --out for a new image"
            )
        if "0" not in group or MANIFEST not in group or group["0"].shape[0] != raw.n_t:
            raise RefocusError(
                f"{store}/{image} ({name}) is incomplete or damaged: pass --overwrite"
            )
        if stored.get("job") != identity:  # recorded in today's terms: it resumes when moved
            group.attrs["deepz"] = {**stored, "job": identity}
        register_image(root, _xml_store(store), name, xml)  # an image from before: listed now
        return _Output(store, image, chunk, n_blocks, False, group, name)
    image = register_image(root, _xml_store(store), name, xml)
    group = root.create_group(image, overwrite=True)
    group.attrs["ome"] = ome
    group.attrs["deepz"] = {**deepz, "job": identity, "present": [], "complete": False}
    group.create_array(
        "0",
        shape=shape,
        chunks=(chunk, *shape[1:]),
        dtype=stack_dtype,
        fill_value=0.0,
        compressors=_compressors(),
        dimension_names=dimensions,
    )
    _create_manifest(group, n_blocks)
    return _Output(store, image, chunk, n_blocks, False, group, name)


def _xml_store(store: str) -> Path | str:
    """Return where an added image's XML entry goes: the local store's folder, or its URL."""
    return store if _is_url(store) else Path(store)


def _prepare_fill(
    root: Any,
    raw: RawInput,
    plan: VolumePlan,
    identity: dict[str, Any],
    deepz: dict[str, Any],
    wanted: Sequence[int],
    overwrite: bool,
) -> _Output:
    """Open (or create) the live stacks image for fill-gaps and check it fits the plan.

    The fill's identity (`_identity`: model, PSF bank, point fit, modality, plan, focus lock,
    backend) is recorded beside its manifest (``fill_job``): a fill resumes only the chunks a
    fill of the same identity marked (`_fill_manifest_resumes`).
    """
    from live.store import image_groups

    shape = (raw.n_t, len(plan), *raw.frame_shape)
    store = raw.spec.path
    image = image_groups(raw.run or {}).get("stacks", FILL_IMAGE)
    group: Any
    if image in root:
        group = root[image]
        array = group["0"]
        if tuple(array.shape[1:]) != shape[1:]:
            raise RefocusError(
                f"{store}/{image}/0 holds stacks of shape {list(array.shape[1:])} (planes, y, x), "
                f"but this plan gives {list(shape[1:])}: --fill-gaps needs the live run's planes"
            )
        # One task per file: a sharded array's tasks must not share a shard (each write
        # rewrites the whole shard file, so two tasks in one shard would lose each other's).
        chunk = int((array.shards or array.chunks)[0])
        identity["chunk_t"] = chunk  # the live image's, whatever was asked
        n_blocks = math.ceil(raw.n_t / chunk)
        resumes = _fill_manifest_resumes(
            group, identity, wanted, n_blocks, overwrite, store, f"{store}/{image}"
        )
        if array.shape[0] < raw.n_t:
            array.resize(shape)
    else:  # the live run kept no stacks: create the image as the recorder would have
        from live.store import register_image

        chunk = 1
        identity["chunk_t"] = chunk
        n_blocks = raw.n_t
        resumes = False
        ome, dimensions, xml = _stacks_metadata("stacks", plan, raw, "float32")
        image = register_image(root, _xml_store(store), "stacks", xml)
        group = root.create_group(image)
        group.attrs["ome"] = ome
        group.create_array(
            "0",
            shape=shape,
            chunks=(1, *shape[1:]),
            dtype="float32",
            fill_value=0.0,
            compressors=_compressors(),
            dimension_names=dimensions,
        )
    if not resumes:
        _create_manifest(group, n_blocks)
    attrs = dict(group.attrs.get("deepz", {}))
    attrs.setdefault("planes_um", list(plan.z_um) if plan.z_um is not None else None)
    attrs["fill_job"] = {**deepz, "job": identity}
    group.attrs["deepz"] = attrs
    return _Output(store, image, chunk, n_blocks, True, group, "stacks")


def _fill_manifest_resumes(
    group: Any,
    identity: dict[str, Any],
    wanted: Sequence[int],
    n_blocks: int,
    overwrite: bool,
    store: str,
    where: str,
) -> bool:
    """Whether an earlier fill's manifest may be resumed (False: it is to be made afresh).

    Its marks are trusted only under the identity recorded beside them (``fill_job``): an
    interrupted fill resumed with another model (or bank, plan, lock ...) would otherwise keep
    the first model's rows and record the second's name. With marks on chunks this fill wants
    that is refused unless `overwrite` (then they are computed again); marks on no wanted
    chunk are dropped, so every mark in the manifest belongs to the recorded identity.
    """
    from live.metrics import format_seqs

    if MANIFEST not in group or group[MANIFEST].shape != (n_blocks,):
        return False
    previous = dict(group.attrs.get("deepz", {})).get("fill_job")
    old = _as_now(previous.get("job") if isinstance(previous, dict) else None, store)
    if old == identity:
        return True
    chunk = int(identity["chunk_t"])
    manifest = group[MANIFEST]
    blocks = {t // chunk for t in wanted}
    marked = {b for b in blocks if _mark(manifest, b) != _NOT_DONE}
    if marked and not overwrite:
        seqs = [t for t in wanted if t // chunk in marked]
        raise RefocusError(
            f"{where}: an earlier --fill-gaps wrote the stacks of seqs {format_seqs(seqs)} "
            f"with another model or plan (differs in {', '.join(_differs(old, identity))}): "
            "pass --overwrite to compute them again with this one"
        )
    return False


def _finish_output(
    output: _Output, raw: RawInput, done: set[int], wanted: set[int], model: dict[str, str]
) -> None:
    """Write presence (and for fill-gaps the run's root attributes) once tasks are over.

    Each fill is listed in the run's ``filled_offline`` with its seqs, date and `model` (the
    identity `refocus_recording` records): the live stacks may then come from two models.
    """
    import zarr

    from live.recorder import gap_ranges

    if output.fill:
        root: Any = zarr.open_group(store=output.store, mode="r+")
        deepz = dict(root.attrs["deepz"])
        present = _expand(deepz.get("stacks_present", [])) | done
        deepz["stacks_present"] = _runs(present)
        if isinstance(deepz.get("summary"), dict):
            summary = dict(deepz["summary"])
            summary["stacks"] = len(present)
            summary["stacks_gaps"] = [list(g) for g in gap_ranges(_runs(present))]
            summary.pop("stacks_missing", None)  # stores before session 33 listed every seq
            deepz["summary"] = summary
        filled = list(deepz.get("filled_offline", []))
        if done:
            filled.append({"seqs": _runs(done), "date": _now(), "model": model})
        deepz["filled_offline"] = filled
        root.attrs["deepz"] = deepz
        return
    group: Any = zarr.open_group(store=output.store, path=output.image, mode="r+")
    attrs = dict(group.attrs["deepz"])
    attrs["present"] = _runs(done)
    attrs["complete"] = wanted <= done
    attrs["updated"] = _now()
    group.attrs["deepz"] = attrs


def _now() -> str:
    """UTC time, ISO 8601, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class RefocusSummary:
    """What a refocusing run did.

    Attributes
    ----------
    store, image, name
        Where the stacks are: the store, the image's array path (e.g. ``2/0``: offline images
        take the next numbered group of the store's collection) and the image's name (e.g.
        ``stacks_offline``; the store's ``deepz.images`` maps names to groups).
    frames_wanted
        Frames this run was asked for (present raw frames, or for fill-gaps the missing stacks).
    frames_done, frames_skipped
        Refocused now; already written and verified by an earlier run.
    chunks_done, chunks_skipped
        The same, in output chunks (tasks).
    seconds
        Wall time of the chunk tasks (after the model was loaded where it runs).
    setup_seconds
        Opening, checking, loading the model in this process and on the workers.
    """

    source: str
    store: str
    image: str
    frames_wanted: int
    frames_done: int
    frames_skipped: int
    chunks_done: int
    chunks_skipped: int
    seconds: float
    setup_seconds: float
    backend: str
    device: str
    model: dict[str, str]
    planes: tuple[str, ...]
    scheduler: str
    dashboard: str | None = None
    name: str = ""

    @property
    def frames_left(self) -> int:
        """Wanted frames neither refocused nor already done: left NaN.

        The warnings say why: no stage focus for a lock, NaN pixels, a frame the backend
        refused.
        """
        return self.frames_wanted - self.frames_done - self.frames_skipped

    @property
    def frames_per_s(self) -> float:
        """Frames refocused per second of task wall time (0 when none was computed)."""
        return self.frames_done / self.seconds if self.frames_done and self.seconds > 0 else 0.0

    def line(self) -> str:
        """One human line: where, how many done and skipped, time and rate."""
        return (
            f"refocused {self.frames_done} frames ({self.chunks_done} chunks), skipped "
            f"{self.frames_skipped} already done, of {self.frames_wanted} wanted, in "
            f"{self.seconds:.1f} s ({self.frames_per_s:.2f} frames/s; setup "
            f"{self.setup_seconds:.1f} s) with {self.model['name']} on {self.backend} "
            f"[{self.scheduler}] -> {self.store}/{self.image} ({self.name})"
            + (f"; {self.frames_left} left NaN (see the warnings)" if self.frames_left else "")
        )


# ----------------------------------------------------------------------------- driver


def _blocks(wanted: Sequence[int], chunk: int, offsets_um: np.ndarray | None = None) -> list[Block]:
    """Group wanted time indices into output chunks of `chunk` time points.

    Each block carries its seqs' focus-lock offsets when the plan follows the stage focus.
    """
    by_block: dict[int, list[int]] = {}
    for t in wanted:
        by_block.setdefault(t // chunk, []).append(t)
    return [
        Block(
            b,
            b * chunk,
            (b + 1) * chunk,
            tuple(seqs),
            None if offsets_um is None else tuple(float(offsets_um[t]) for t in seqs),
        )
        for b, seqs in sorted(by_block.items())
    ]


def _clip_blocks(blocks: list[Block], n_t: int) -> list[Block]:
    """Clip the last block to the time axis."""
    return [replace(b, t1=min(b.t1, n_t)) for b in blocks]


def _lock_offsets(
    chosen: _Plan,
    raw: RawInput,
    limits_um: tuple[float, float],
) -> np.ndarray | None:
    """Each time point's DPM offset (µm) when the plan follows the stage focus, else None.

    The live worker's `engine.dpm.FocusLock`, built the same way (clamped to the DPM values
    the model serves, `engine.runtime.depth_limits`), applied to the focus recorded with each
    frame, so a focus-locked run refocuses offline onto the planes it had live. A frame with
    no recorded focus gets NaN (no planes, as live).
    """
    if chosen.focus_lock is None:
        return None
    if raw.focus_um is None:
        raise RefocusError(
            f"{raw.spec.path}: the planes follow the stage focus (planes.focus_lock_um) but the "
            "recording holds no focus per frame: give --planes Z1 Z2 ... (µm) to refocus "
            "without the lock"
        )
    reference, sign = chosen.focus_lock
    lock = FocusLock.for_plan(chosen.plan, reference, sign, limits_um)
    offsets = np.zeros(raw.n_t, dtype=np.float64)
    unknown = []
    for t in raw.present:
        focus = float(raw.focus_um[t]) if t < raw.focus_um.size else math.nan
        if math.isfinite(focus):
            offsets[t] = lock.offset_um(focus)[0]
        else:  # the scope did not say: no planes for it, as live (the worker rejected it)
            offsets[t] = math.nan
            unknown.append(t)
    if unknown and len(unknown) == len(raw.present):
        raise RefocusError(
            f"{raw.spec.path}: the planes follow the stage focus (planes.focus_lock_um) but no "
            "frame has a recorded focus: give --planes Z1 Z2 ... (µm) to refocus without the lock"
        )
    if unknown:
        from live.metrics import format_seqs

        log.warning(
            "%d frames (%s) have no recorded focus, which focus-locked planes need: their planes "
            "are left NaN (--planes Z1 Z2 ... refocuses without the lock)",
            len(unknown),
            format_seqs(unknown),
        )
    return offsets


def _lock_attrs(lock: tuple[float, float] | None) -> dict[str, float] | None:
    """Return the focus lock as stored in the output's attributes (None: fixed planes)."""
    if lock is None:
        return None
    return {"reference_um": lock[0], "stage_z_sign": lock[1]}


def refocus_recording(
    source: str | Path,
    *,
    model: str | Path | None = None,
    planes: Sequence[float] | None = None,
    scope: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    fill_gaps: bool = False,
    scheduler: Any = "threads",
    workers: int | None = None,
    chunk: int | None = None,
    backend: str | None = None,
    intra_op_threads: int | None = None,
    allow_extrapolation: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    stack_dtype: str = "float32",
    psf_bank: str | Path | None = None,
    point_fit: bool = False,
    point_fit_lateral: Lateral = "linear",
) -> RefocusSummary:
    """Refocus a recording's raw frames chunk by chunk and write an NGFF stacks image.

    Parameters
    ----------
    source
        A run store of this project, an NGFF (t, y, x) image, a Zarr (T, H, W) array or a
        TIFF stack (a path, or a URL zarr opens through fsspec).
    model
        Model file (default: the scope config's, else the run's own, else the shipped model).
    psf_bank
        Volume models: a measured PSF bank to render the planes through (default: the scope
        config's, else the run's own, else the model's own bank; `engine.psf_calibration`).
    point_fit
        Volume models: refit each frame's beads to the frame through that bank before the
        planes are rendered (`engine.point_fit`): sharper, better-placed beads, at about a
        second a frame on one core (the live daemon does not; offline it can).
    point_fit_lateral
        How the fit holds a bead between pixels (`PointFit.lateral`): "spline" renders beads
        as a camera images them (serve it through a bank measured with ``--lateral spline``).
    planes, scope
        Plane offsets in µm, or a scope config whose ``[planes]`` (and ``[engine]``) to use;
        default: the run's own planes.
    out
        A new (or resumed) store for the stacks; default: beside ``raw`` in the run store.
    name
        Image name in the output store (default ``stacks_offline`` in a run store, ``stacks``
        in a new one).
    fill_gaps
        Compute only the seqs present in raw but missing from the live ``stacks`` image, into
        that image, and update the run's presence attributes (each fill listed with its model
        in ``filled_offline``). Only onto the live run's planes and focus lock; the run's
        model file gone or changed since is refused rather than replaced (give `model`).
    scheduler
        ``"threads"``, ``"processes"``, ``"sync"``, a ``dask.distributed`` scheduler address, or
        a ``distributed.Client``.
    workers
        Local threads or processes (default 2 threads, or one process per core).
    chunk
        Time points per output chunk (= per task) for a new image; default `auto_chunk` (an
        image being resumed keeps its own).
    backend
        Backend name ("openvino", "onnxruntime", ...); default: the config's order, else auto.
    intra_op_threads
        CPU threads per backend (default: the backend's; use 1 with one worker per core).
    allow_extrapolation
        Accept planes outside the model's trained range (also when the scope config or the
        recording's config says ``engine.allow_extrapolation``, as its live run did).
    overwrite
        Replace an existing output image made with another model, plan or source (for
        `fill_gaps`: compute again the stacks an interrupted fill with another model, bank,
        plan or backend wrote, instead of refusing to resume it).
    progress
        Show a progress bar on stderr.
    stack_dtype
        ``"float32"`` or ``"float16"`` (as the live recorder stores stacks: half the bytes to
        compress and write, values rounded by at most 2^-11 and saturated beyond ±65504) for a
        new image; fill-gaps keeps the live image's dtype.

    Raises
    ------
    RefocusError
        Bad input, plan, model, backend or output; the message says which and what to do.
    RefocusTaskError
        A chunk task could not read its raw frames (a damaged file); the chunks done are kept.
    """
    from live.store import STACK_DTYPES, StackAxis

    t_setup = time.perf_counter()
    if chunk is not None and chunk < 1:
        raise RefocusError(f"--chunk must be >= 1, got {chunk}")
    if stack_dtype not in STACK_DTYPES:
        raise RefocusError(f"--dtype must be one of {', '.join(STACK_DTYPES)}, got {stack_dtype!r}")
    if planes is not None and scope is not None:
        raise RefocusError("give --planes or --scope, not both")
    if fill_gaps and out is not None:
        raise RefocusError("--fill-gaps writes into the run's own stacks image: drop --out")
    raw = open_input(source)
    if raw.n_t == 0 or not raw.present:
        raise RefocusError(f"{raw.spec.path}: the recording holds no frames")
    if fill_gaps and not raw.is_run:
        raise RefocusError(
            f"{raw.spec.path}: --fill-gaps needs a run of this project (raw and stacks with "
            "their presence in the root attributes)"
        )
    scope_cfg = _load_scope(scope) if scope is not None else None
    # the run's stored [planes], validated once: the plan and the fill check both need it
    own = fill_gaps or (planes is None and scope_cfg is None)
    stored = _stored_planes(raw) if own else None
    try:
        chosen = _plan_from_planes(planes, scope_cfg, raw, stored)
    except DPMError as exc:
        raise RefocusError(f"planes: {exc}") from None
    plan, plan_from = chosen.plan, chosen.source
    wanted = list(raw.present)
    if fill_gaps:
        _check_fill_plan(raw, chosen, stored)
        run = raw.run or {}
        if run.get("summary") is None:
            log.warning("the run was not closed (still recording, or it crashed)")
        have = _expand(run.get("stacks_present", []))
        wanted = [t for t in raw.present if t not in have]
    model_path, prefer, max_batch, precision, modality, bank = _engine_choice(
        model, backend, scope_cfg, raw, psf_bank, fill_gaps
    )
    if not model_path.is_file():
        raise RefocusError(f"{model_path}: model file not found")
    if bank is not None and not bank.is_file():
        raise RefocusError(
            f"{bank}: PSF bank file not found (the planes were to go through it: pass "
            "--psf-bank with its copy; a run's own bank is not swapped for the model's silently)"
        )
    if scope_cfg is None:  # the run's own files: are they as recorded?
        own_bank = bank if psf_bank is None else None
        _check_recorded(raw, model_path if model is None else None, own_bank, fill_gaps)
    bank_str = str(bank.resolve()) if bank is not None else None
    threads = intra_op_threads
    if threads is None and scope_cfg is not None:
        threads = scope_cfg.engine.intra_op_threads
    try:
        spec = EngineSpec(
            str(model_path.resolve()),
            prefer,
            precision,
            threads,
            max_batch,
            modality,
            bank_str,
            point_fit_lateral if point_fit else None,
        )
        driver_backend, _ = _backend(spec)
    except (BackendError, ValueError) as exc:
        raise RefocusError(f"model {model_path}: {exc}") from None
    meta = driver_backend.metadata
    allow_extrapolation = allow_extrapolation or chosen.allow_extrapolation
    try:  # as the live daemon checks its planes (`live.run`): the same limits
        plan.validate(
            raw.frame_shape,
            depth_limits(meta),
            allow_extrapolation and meta.volume is None,
        )
    except DPMError as exc:
        raise RefocusError(f"{exc} (planes from {plan_from})") from None
    offsets = _lock_offsets(chosen, raw, depth_limits(meta, allow_extrapolation))
    # Workers load exactly the backend (and precision) chosen here: every chunk alike.
    engine = EngineSpec(
        spec.model,
        (driver_backend.name,),
        driver_backend.precision,
        threads,
        max_batch,
        modality,
        bank_str,
        point_fit_lateral if point_fit else None,
    )
    with _BACKENDS_LOCK:
        _BACKENDS.setdefault(engine, _BACKENDS[spec])
    model_id = {"name": meta.name, "file": str(model_path), "sha256": _sha256(model_path)}
    if meta.volume is not None:  # what the stacks show: wide-field or confocal-like planes
        model_id["render_modality"] = meta.volume.modality
    if bank is not None:  # through a measured PSF: other planes, so another identity to resume
        model_id["psf_bank"] = str(bank)
        model_id["psf_bank_sha256"] = _sha256(bank)
    if point_fit:  # other planes again: beads refitted (the fit's settings, to resume alike)
        # the linear fit's identity as it was before `lateral` existed: its outputs resume
        fit = repr(PointFit(lateral=point_fit_lateral))
        model_id["point_fit"] = fit.replace(", lateral='linear'", "")
    chunk_given = chunk is not None
    if chunk is None:
        itemsize = np.dtype(stack_dtype).itemsize
        chunk = auto_chunk(len(plan) * math.prod(raw.frame_shape) * itemsize)
    store = _output_store(raw, out)
    identity = _identity(raw, plan, model_id, driver_backend.name, chunk, chosen.focus_lock, store)
    if stack_dtype != "float32" and not fill_gaps:  # only then: older images still resume
        identity["dtype"] = stack_dtype
    deepz = {
        "source": raw.spec.path,
        "source_image": raw.spec.array_path,
        "time_index": "the source's time index (camera sequence number for runs)",
        "planes_um": list(plan.z_um) if plan.z_um is not None else None,
        "labels": list(plan.labels),
        "uniform_planes": StackAxis.from_plan(plan.z_um, plan.labels, plan.dpms_um).uniform,
        "plan_from": plan_from,
        "focus_lock": _lock_attrs(chosen.focus_lock),
        "model": model_id,
        "backend": driver_backend.name,
        "created": _now(),
    }
    # The scheduler is checked (and a cluster reached) before the output is touched: a
    # refusal here leaves no empty image registered in the store's collection.
    runner = _Runner(scheduler, workers, progress)
    try:
        with _write_lock(store):
            output = _prepare_output(
                raw,
                plan,
                store=store,
                out=out,
                name=name,
                fill_gaps=fill_gaps,
                chunk=chunk,
                overwrite=overwrite,
                identity=identity,
                stack_dtype=stack_dtype,
                deepz=deepz,
                chunk_given=chunk_given,
                wanted=wanted,
            )
            blocks = _clip_blocks(_blocks(wanted, output.chunk, offsets), raw.n_t)
            job = Job(
                raw.spec,
                engine,
                plan,
                identity["plan_sha256"],
                output.store,
                output.array_path,
                output.manifest_path,
                output.fill,
                uuid.uuid4().hex,
            )
            results, task_s = runner(job, blocks, len(wanted))
            done = {s for r in results for s in r.seqs}
            _finish_output(output, raw, done, set(wanted), model_id)
    finally:
        runner.close()
    computed = [r for r in results if not r.skipped]
    skipped = [r for r in results if r.skipped]
    summary = RefocusSummary(
        source=raw.spec.path,
        store=output.store,
        image=output.array_path,
        name=output.name,
        frames_wanted=len(wanted),
        frames_done=sum(len(r.seqs) for r in computed),
        frames_skipped=sum(len(r.seqs) for r in skipped),
        chunks_done=len(computed),
        chunks_skipped=len(skipped),
        seconds=task_s,
        setup_seconds=time.perf_counter() - t_setup - task_s,
        backend=driver_backend.name,
        device=str(driver_backend.device),
        model=model_id,
        planes=plan.labels,
        scheduler=runner.description,
        dashboard=runner.dashboard,
    )
    log.info(summary.line())
    return summary


class _Runner:
    """Runs chunk tasks on the chosen scheduler and collects their results."""

    def __init__(self, scheduler: Any, workers: int | None, progress: bool) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.progress = progress
        self.dashboard: str | None = None
        self.description = str(scheduler)
        self._client: Any = None
        self._own_client = False
        if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
            if workers is not None and workers < 1:
                raise RefocusError(f"--workers must be >= 1, got {workers}")
            return
        try:
            distributed: Any = importlib.import_module("distributed")
        except ImportError:
            raise RefocusError(
                f"scheduler {scheduler!r} needs dask.distributed: pip install 'deepz-live[dist]' "
                f"(local schedulers: {', '.join(LOCAL_SCHEDULERS)})"
            ) from None
        if isinstance(scheduler, distributed.Client):
            self._client = scheduler
        elif isinstance(scheduler, str) and "://" in scheduler:
            try:
                self._client = distributed.Client(scheduler, timeout="20s")
            except OSError as exc:
                raise RefocusError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
            self._own_client = True
        else:
            raise RefocusError(
                f"scheduler must be one of {', '.join(LOCAL_SCHEDULERS)} or a dask.distributed "
                f"address such as tcp://host:8786, not {scheduler!r}"
            )
        self.dashboard = str(self._client.dashboard_link)
        n = len(self._client.scheduler_info().get("workers", {}))
        where = self._client.scheduler.address
        self.description = f"dask.distributed {where} ({n} worker{'s' if n != 1 else ''})"

    def __call__(
        self, job: Job, blocks: list[Block], frames: int
    ) -> tuple[list[BlockResult], float]:
        """Run every block; return the results and the seconds the tasks took."""
        from tqdm import tqdm

        bar = tqdm(
            total=frames, unit="frame", disable=not self.progress, file=sys.stderr, smoothing=0.1
        )
        try:
            if self._client is not None:
                return self._distributed(job, blocks, bar.update)
            return self._local(job, blocks, bar.update)
        finally:
            bar.close()

    def _local(
        self, job: Job, blocks: list[Block], tick: Callable[[int], Any]
    ) -> tuple[list[BlockResult], float]:
        """Dask's local threaded / multiprocessing / synchronous scheduler (or a plain loop)."""
        try:
            dask: Any = importlib.import_module("dask")
            callbacks: Any = importlib.import_module("dask.callbacks")
        except ImportError:
            log.info("dask is not installed: refocusing chunk by chunk in this thread")
            t0 = time.perf_counter()
            results = []
            for block in blocks:
                results.append(refocus_block(job, block))
                tick(len(block.seqs))
            self.description = "plain loop (dask not installed)"
            return results, time.perf_counter() - t0
        kind = str(self.scheduler)
        n = self.workers or (2 if kind == "threads" else os.cpu_count() or 1)
        n = 1 if kind == "sync" else n
        self.description = f"dask {kind}, {n} worker{'s' if n > 1 else ''}"
        run_id = uuid.uuid4().hex[:8]
        options: dict[str, Any] = {}
        configured = dask.config.get("pool", None) or dask.config.get(
            "multiprocessing.initializer", None
        )
        if kind == "processes" and job.plan is not None and not configured:
            # dask's process pool pickles each task with the values of its inputs, the job
            # among them: the DPMs go to each pool process once, as it starts, instead (with
            # a pool or initializer of the user's dask config, each task gets the whole job)
            options["initializer"] = functools.partial(_install_plan, job.plan_token, [job.plan])
            job = job.without_plan()
        job_d = dask.delayed(job, name=f"refocus-job-{run_id}", traverse=False)
        tasks = [
            dask.delayed(refocus_block, pure=False)(
                job_d, block, dask_key_name=f"refocus-{run_id}-{block.index}"
            )
            for block in blocks
        ]

        def posttask(key: Any, result: Any, *_: Any) -> None:
            if isinstance(result, BlockResult):
                tick(len(result.seqs))

        t0 = time.perf_counter()
        with callbacks.Callback(posttask=posttask):
            results = list(dask.compute(*tasks, scheduler=kind, num_workers=n, **options))
        return results, time.perf_counter() - t0

    def _distributed(
        self, job: Job, blocks: list[Block], tick: Callable[[int], Any]
    ) -> tuple[list[BlockResult], float]:
        """Run on a dask.distributed cluster: load the model on every worker, then the chunks."""
        distributed: Any = importlib.import_module("distributed")

        client = self._client
        print(f"dask dashboard: {self.dashboard}", file=sys.stderr, flush=True)
        loaded = client.run(warm_worker, job.engine)  # each worker loads the model once
        for address, what in sorted(loaded.items()):
            log.info("worker %s: %s", address, what)
        run_id = uuid.uuid4().hex[:8]
        [job_future] = client.scatter([job], broadcast=True, hash=False)
        t0 = time.perf_counter()
        futures = [
            client.submit(refocus_block, job_future, block, key=f"refocus-{run_id}-{block.index}")
            for block in blocks
        ]
        results: list[BlockResult] = []
        try:
            for future in distributed.as_completed(futures):
                result = future.result()
                results.append(result)
                tick(len(result.seqs))
        finally:
            for future in futures:
                future.release()
        return results, time.perf_counter() - t0

    def close(self) -> None:
        """Close a client this runner opened (never the cluster)."""
        if self._own_client and self._client is not None:
            self._client.close()


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    """Build the command line of ``python -m live.refocus``."""
    p = argparse.ArgumentParser(
        prog="python -m live.refocus",
        description="Refocus a recording's raw frames offline into an NGFF stacks image.",
    )
    p.add_argument("source", help="run store (RUN.ome.zarr), NGFF (t, y, x) image or TIFF stack")
    p.add_argument("--model", help="model file (default: the run's, else the shipped model)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--planes", type=float, nargs="+", metavar="Z", help="plane offsets (µm)")
    which.add_argument("--scope", help="scope config whose [planes] and [engine] to use")
    p.add_argument("--out", help="write into this new store instead of beside raw")
    p.add_argument("--name", help="image name in the output store (default stacks_offline)")
    p.add_argument(
        "--fill-gaps",
        action="store_true",
        help="compute only the stacks the live run skipped or lost, into its stacks image",
    )
    p.add_argument(
        "--scheduler",
        default="threads",
        help="threads (default), processes, sync, or a dask.distributed address tcp://host:port",
    )
    p.add_argument("--workers", type=int, help="local threads or processes")
    p.add_argument(
        "--chunk",
        type=int,
        help="time points per output chunk (task); default about 4 MiB of stacks (at most 16)",
    )
    p.add_argument("--backend", help="inference backend (openvino, onnxruntime, tensorrt, torch)")
    p.add_argument(
        "--psf-bank",
        help="render through this measured PSF bank (.npy, python -m engine.psf_calibration)",
    )
    p.add_argument(
        "--point-fit",
        action="store_true",
        help="refit each frame's beads to it through the PSF bank before rendering "
        "(engine.point_fit; 0.5-2 s a 256² frame)",
    )
    p.add_argument(
        "--point-fit-lateral",
        choices=("linear", "spline"),
        default="linear",
        help="with --point-fit: hold each bead between pixels split (linear) or on a "
        "cubic-spline kernel (spline: beads rendered as a camera images them; measure the "
        "bank with engine.psf_calibration --lateral spline)",
    )
    p.add_argument("--threads", type=int, help="intra-op CPU threads per backend")
    p.add_argument("--extrapolate", action="store_true", help="allow planes beyond the model range")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output image (--fill-gaps: recompute the stacks an "
        "interrupted fill made with another model or plan)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="stacks dtype of a new image (float16: as the live recorder stores them)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; an error prints one line (no traceback) and exits non-zero.

    A refusal (`RefocusError`) exits 2; a failed chunk task (`RefocusTaskError`) exits 1.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.point_fit_lateral != "linear" and not args.point_fit:
        parser.error("--point-fit-lateral is how --point-fit holds beads: give --point-fit too")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = refocus_recording(
            args.source,
            model=args.model,
            planes=args.planes,
            scope=args.scope,
            out=args.out,
            name=args.name,
            fill_gaps=args.fill_gaps,
            scheduler=args.scheduler,
            workers=args.workers,
            chunk=args.chunk,
            backend=args.backend,
            intra_op_threads=args.threads,
            allow_extrapolation=args.extrapolate,
            overwrite=args.overwrite,
            stack_dtype=args.dtype,
            progress=not args.no_progress,
            psf_bank=args.psf_bank,
            point_fit=args.point_fit,
            point_fit_lateral=args.point_fit_lateral,
        )
    except RefocusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RefocusTaskError as exc:  # the chunks done so far are kept: a rerun resumes
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.line())
    # frames left NaN cost those frames (a lock without focus, a frame the backend refuses);
    # a run that made none of its wanted frames failed as a whole
    return 1 if summary.frames_wanted and summary.frames_left == summary.frames_wanted else 0


if __name__ == "__main__":
    # Run the importable module's main, not this copy's: the tasks it sends to other processes
    # (`refocus_block`, `warm_worker`) are then pickled by reference to ``live.refocus``, not
    # by value from ``__main__`` with its module globals (whose locks do not pickle).
    from live.refocus import main as _main

    raise SystemExit(_main())
