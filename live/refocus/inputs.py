"""Recordings to refocus, opened: run stores, NGFF images, Zarr arrays, TIFF stacks."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

import numpy as np

from live.protocol import MAX_FRAME_BYTES
from live.refocus.errors import RefocusError

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        # a forged array shape would otherwise be allocated by the first plan (review 74: a
        # (1, 1e6, 1e6) array asked for 3.6 TiB); no camera's frame is larger than the wire's
        h, w = self.frame_shape
        if h < 1 or w < 1 or h * w * 2 > MAX_FRAME_BYTES:
            raise RefocusError(
                f"{self.spec.path}: frames of {h} x {w} pixels: not a camera's frame (at most "
                f"{MAX_FRAME_BYTES >> 20} MiB of 16-bit counts, as the daemon takes them)"
            )

    @property
    def is_run(self) -> bool:
        """Whether this is a run store of the live daemon (raw + presence attributes)."""
        return self.run is not None


def is_url(path: str) -> bool:
    """Whether `path` is a URL (``s3://``, ``gs://``, ``memory://`` ...) rather than a path."""
    return "://" in path


def local_path(path: str | Path) -> str:
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
    text = local_path(path)
    if not is_url(text):
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
    if is_run_attrs(deepz):
        with malformed(text, "run metadata ('deepz' attributes)"):
            return _run_input(text, node, deepz)
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        raise RefocusError(
            f"{text}: no raw image: a Zarr group that is neither a run of this project nor "
            "an NGFF image ('multiscales' metadata); for another OME-Zarr collection, give "
            "the image inside it (e.g. STORE/0)"
        )
    with malformed(text, "NGFF 'multiscales' metadata"):
        return _ngff_input(text, node, multiscales)


def is_run_attrs(deepz: Any) -> TypeGuard[dict[str, Any]]:
    """Whether a store's root ``deepz`` attribute is a live run's (raw frames and presence)."""
    return isinstance(deepz, dict) and "raw_present" in deepz


@contextlib.contextmanager
def malformed(text: str, what: str) -> Iterator[None]:
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


def live_stacks_present(deepz: Any, n_t: int, text: str) -> set[int]:
    """Return the seqs a run's live stacks hold (``stacks_present``), clipped to its frames.

    Read from the store, so checked as `live.store.present_runs` checks ``raw_present``: a
    forged list is one `RefocusError` line, and a run far past the frames costs nothing.
    """
    from live.store import present_runs

    with malformed(text, "run metadata ('deepz' stacks_present)"):
        runs = present_runs(deepz.get("stacks_present", []), n_t)
    return {t for start, stop in runs for t in range(start, stop)}


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

    from live.store import array_path, frame_metadata, present_runs

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
    # (a forged attribute: runs overlapping, repeated or far past the array, review 67)
    with malformed(text, "run metadata ('deepz' raw_present)"):
        runs = present_runs(deepz.get("raw_present", []), inp.n_t)
    present = tuple(t for start, stop in runs for t in range(start, stop))
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
        frame_metadata(root, "focus_um", inp.n_t),
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
    # any one axis of frames is time, Z included: ImageJ calls a plain stack of frames
    # "slices" (ZYX) unless its hyperstack properties say frames, and most movies are saved so
    named = ["y" if a == "Y" else "x" if a == "X" else "t" for a in axes.upper()]
    if len(shape) >= 3 and sum(1 for n in shape[:-2] if n > 1) > 1:
        raise RefocusError(
            f"{path}: TIFF image has shape {list(shape)}, axes {axes}; refocusing needs frames "
            "(t, y, x): every axis other than t, y and x must have size 1"
        )
    t_axis = _t_axis(shape, named, str(path))
    n_t = shape[t_axis] if len(shape) > 2 else 1
    interval = _finite_positive(ij.get("finterval"))  # the file's: a forged one is no rate
    spec = InputSpec(str(path), "tiff", "", t_axis, len(shape))
    return RawInput(
        spec,
        n_t,
        (shape[-2], shape[-1]),
        tuple(range(n_t)),
        1.0 / interval if interval else None,
    )


def _finite_positive(value: Any) -> float | None:
    """`value` as a float when it is a finite positive number, else None (metadata is input)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number > 0 else None


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


FINGERPRINT_WINDOW_BYTES = 64 * 2**10
"""Bytes of a TIFF read at its start, middle and end for its fingerprint (`frames_sha256`)."""


def frames_sha256(raw: RawInput) -> str | None:
    """Return a fingerprint of a recording: what tells it from another of its shape, cheaply.

    SHA-256 over the time length and frame shape, and
    - a TIFF: its size and its bytes at the start, middle and end (`FINGERPRINT_WINDOW_BYTES`
      each; nothing decoded, so a compressed stack is not read whole here);
    - a run store: its first present frame (written once, never again; which frames are
      listed as present grows while the run records, so later ones would not stay put);
    - another Zarr array: its first, middle and last frames.
    A recording moved or copied elsewhere keeps it; another recording, or the same path
    rewritten with other frames, does not. None when those bytes cannot be read now: the job
    is then known by its path alone, and the task that needs a damaged frame says so.
    """
    digest = hashlib.sha256(f"{raw.n_t} {raw.frame_shape}".encode())
    try:
        if raw.spec.kind == "tiff":
            with open(raw.spec.path, "rb") as f:
                size = f.seek(0, 2)
                digest.update(f"{size}".encode())
                for at in (0, size // 2, size - FINGERPRINT_WINDOW_BYTES):
                    f.seek(max(at, 0))
                    digest.update(f.read(FINGERPRINT_WINDOW_BYTES))
            return digest.hexdigest()
        present = raw.present
        middle_last = () if raw.is_run else (present[len(present) // 2], present[-1])
        reader = _Frames(raw.spec)
        for t in sorted({present[0], *middle_last}):
            frame = np.ascontiguousarray(reader.read(t, t + 1))
            digest.update(f"{t} {frame.dtype.str}".encode())
            digest.update(frame.tobytes())
    except Exception:  # zarr and the OS raise many types for damaged or unreachable data
        return None
    return digest.hexdigest()


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


def kept_open(key: tuple[str, str, str], make: Callable[[], Any]) -> Any:
    """Return what `make` opens for `key`, once per process (the oldest dropped beyond a few)."""
    with _OPENED_LOCK:
        value = _OPENED.get(key)
        if value is None:
            if len(_OPENED) >= _MAX_OPENED:
                _OPENED.pop(next(iter(_OPENED)))
            value = _OPENED[key] = make()
        return value


def clear_opened() -> None:
    """Forget every store array this process keeps open (`kept_open`)."""
    with _OPENED_LOCK:
        _OPENED.clear()


_TIFFS: dict[tuple[str, int], _Frames] = {}
_TIFFS_LOCK = threading.Lock()


def frame_reader(spec: InputSpec, token: str) -> _Frames:
    """Return a frame reader for `spec`: Zarr once per job (`token`), TIFFs kept per process."""
    if spec.kind == "zarr":
        opened = (token, spec.path, f"frames:{spec.array_path}")
        frames: _Frames = kept_open(opened, lambda: _Frames(spec))
        return frames
    key = (spec.path, Path(spec.path).stat().st_mtime_ns)
    with _TIFFS_LOCK:
        reader = _TIFFS.get(key)
        if reader is None:
            for old in [k for k in _TIFFS if k[0] == spec.path]:
                _TIFFS.pop(old).close()
            reader = _TIFFS[key] = _Frames(spec)
        return reader
