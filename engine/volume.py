"""Volume Deep-Z: one network pass gives the sample on a depth grid; planes are rendered from it.

The per-plane Deep-Z network takes (frame, DPM) and returns one plane, so a 41-plane stack costs
41 passes, and nothing forces the planes to agree with each other or with the optics. The volume
model instead localises: from one frame it predicts the non-negative fluorophore density
``O[d]`` at fixed depths ``depth_um[d]`` relative to the focal plane (in camera counts). A
wide-field plane refocused by Δz is then what the microscope would see of that density,

    plane(Δz) = Σ_d O[d] ⊛ PSF(Δz - depth_um[d])  +  background,

with the model's own PSF (computed from its optics when it was trained and shipped beside it).
So every plane is physically consistent, an object is sharp exactly at the depth where the
network put it, and any DPM (tilted, curved, measured, drifting) is a per-pixel interpolation
between rendered grid planes. Whatever the density does not explain at Δz = 0 (camera offset,
diffuse background, objects outside the depth grid) is low-passed and added to every plane.

This module is numpy only: the runtime uses it; training has its torch twin of `render` (same
PSF bank, same indexing) in `engine.train_volume`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from engine.files import atomic_save_npy
from engine.metadata import Modality, VolumeOutput, file_sha256

__all__ = [
    "DEPTH_STEP_UM",
    "Modality",
    "Renderer",
    "defocus_index",
    "depth_grid",
    "load_psf_bank",
    "model_psf_bank",
    "psf_bank",
    "save_psf_bank",
]

DEPTH_STEP_UM = 0.5
"""Spacing of the depth grid and of renderable planes (µm): the simulator's slice lattice."""
EMPTY_DEPTH = 1e-6
"""A depth whose density peaks below this fraction of the volume's peak is not rendered."""
RANGE_TOLERANCE_UM = 1e-6
"""How far beyond the depth grid's ends a requested plane or DPM may lie (float rounding of a
tilted or shifted plan): served as the end plane. `BaseBackend.infer` accepts the same."""
RESIDUAL_SIGMA_PX = 4.0
"""Gaussian low-pass (px) of the unexplained part of the frame that is added to every plane."""
DEPTH_FFT_MIN_PRODUCTS = 450
"""Render by convolution along depth (FFTs over the depth axis) when planes x active depths is
at least this; below it, the direct sum of products is cheaper. Measured on 2 AMX Xeon cores,
256², 41 active depths, with the blocked depth convolution (session 9): 1 plane (and the one at
focus) direct 11.6 ms against 23.0; 9 planes 22.8 against 23.4; 17 planes 33.9 against 26.5.
The convolution costs about the same whatever the number of planes."""
DEPTH_BLOCK_ROWS = 8
"""Frequency rows per block of the depth convolution (`Renderer._convolve_depth`): its
transform, product and inverse then fit in a core's cache (81 x 8 x 289 complex64 = 1.5 MB at
512²); 4-16 rows measured alike."""
DEPTH_FFT_MAX_BYTES = 512 * 2**20
"""The depth convolution keeps the bank's transform along depth beside the bank itself (133 MB
for 512² frames, 430 MB for 1024²); larger frames sum directly instead."""


def depth_grid(half_range_um: float = 10.0, step_um: float = DEPTH_STEP_UM) -> np.ndarray:
    """Depths ``-half_range ... +half_range`` (µm) in `step_um` steps, float64."""
    n = round(half_range_um / step_um)
    if n < 1 or not np.isclose(n * step_um, half_range_um):
        raise ValueError(f"half range {half_range_um} µm is not a multiple of {step_um} µm")
    out: np.ndarray = np.round(np.arange(-n, n + 1) * step_um, 6)
    return out


def defocus_index(dz_um: np.ndarray, depth_um: np.ndarray) -> np.ndarray:
    """Index into a PSF bank for rendering planes `dz_um` from object depths `depth_um`.

    The bank of a D-depth grid holds defocus ``(j - (D - 1)) · step`` for j < 2D - 1, so
    plane Δz sees depth d through ``PSF(Δz - depth_d)``. Returns (P, D) int64.
    """
    depth = np.asarray(depth_um, dtype=np.float64)
    step = float(depth[1] - depth[0])
    rel = (np.asarray(dz_um, dtype=np.float64)[:, None] - depth[None, :]) / step
    j = np.round(rel).astype(np.int64) + depth.size - 1
    outside = j.min() < 0 or j.max() > 2 * depth.size - 2  # the bank holds 2D - 1 defocus
    if not np.allclose(rel, np.round(rel), atol=1e-4) or outside:
        dz = np.atleast_1d(np.asarray(dz_um, dtype=np.float64))
        raise ValueError(
            f"planes {dz.min():g} … {dz.max():g} µm ({dz.size}) are not all on the {step:g} µm "
            f"depth lattice within {depth[0]:g} … {depth[-1]:g} µm"
        )
    return j


def matched_filter_kernels(
    optics: object, depths_um: Sequence[float], bin: int, kernel: int
) -> np.ndarray:
    """(D, 1, kernel, kernel) float32 kernels of a `engine.model.MatchedFilterPrimer` (simulator).

    Kernel d is the wide-field PSF a frame at focus 0 sees an object at depth d through,
    ``PSF(-d)``, binned ``bin`` x ``bin`` as the primer bins the frame, then made zero-mean (a
    flat or linear background gives no response) and unit-norm (responses compare across
    depths).
    """
    from engine.optics import OpticsConfig, make_psf

    if not isinstance(optics, OpticsConfig):
        raise TypeError(f"optics must be an engine.optics.OpticsConfig, got {type(optics)}")
    side = bin * kernel
    psf = np.asarray(
        make_psf(optics, -np.asarray(depths_um, dtype=np.float64), side - 1 + side % 2)
    )
    psf = np.pad(psf, ((0, 0), (0, side - psf.shape[-2]), (0, side - psf.shape[-1])))
    binned = psf.reshape(len(psf), kernel, bin, kernel, bin).sum(axis=(2, 4))
    binned -= binned.mean(axis=(1, 2), keepdims=True)
    binned /= np.sqrt((binned**2).sum(axis=(1, 2), keepdims=True))
    out: np.ndarray = binned[:, None].astype(np.float32)
    return out


EXCITATION_UM = 0.488
"""Confocal excitation wavelength (µm): the 488 nm line for GFP / GCaMP."""


def psf_bank(
    optics: object,
    depth_um: np.ndarray,
    size_px: int = 127,
    modality: Modality = "widefield",
) -> np.ndarray:
    """PSF planes (2D-1, size, size) float32 at every defocus a D-depth grid needs (simulator).

    Wide-field planes each sum to 1 (a plane of the PSF carries all of a point's light). The
    confocal PSF is the excitation PSF (488 nm) times the detection PSF (a point pinhole), the
    cross-modality target of the paper (wide-field in, confocal-like out); it is normalised so
    the in-focus plane sums to 1, and its planes dim away from focus (optical sectioning).
    """
    from engine.optics import OpticsConfig, make_psf

    if not isinstance(optics, OpticsConfig):
        raise TypeError(f"optics must be an engine.optics.OpticsConfig, got {type(optics)}")
    depth = np.asarray(depth_um, dtype=np.float64)
    step = float(depth[1] - depth[0])
    defocus = (np.arange(2 * depth.size - 1) - (depth.size - 1)) * step
    detection = np.array(make_psf(optics, defocus, size_px), dtype=np.float32)
    if modality == "widefield":
        return detection
    if modality != "confocal":
        raise ValueError(f"modality must be 'widefield' or 'confocal', not {modality!r}")
    if optics.psf_model == "measured":  # one emission PSF: no excitation PSF to multiply
        raise ValueError(
            "a confocal PSF bank is made from a PSF model; a measured wide-field bank has no "
            "excitation PSF to make one from"
        )
    excitation = make_psf(
        optics.model_copy(update={"wavelength_um": EXCITATION_UM}), defocus, size_px
    )
    conf = detection * excitation
    out: np.ndarray = (conf / conf[depth.size - 1].sum()).astype(np.float32)
    return out


def save_psf_bank(psf: np.ndarray, path: str | Path) -> Path:
    """Write a PSF bank as float32 .npy (beside the model it belongs to)."""
    path = Path(path)
    atomic_save_npy(path, np.asarray(psf, dtype=np.float32))  # never half a bank beside a model
    return path


def model_psf_bank(model_path: str | Path, volume: VolumeOutput) -> np.ndarray:
    """Read the PSF bank a volume model was saved with, from beside its file `model_path`.

    The bank is checked to fit the model's depth grid (`load_psf_bank`) and, where the model
    recorded it (``volume.psf_sha256``), to be the very bank saved with it: the weights and
    the bank are two files, and a save or copy interrupted between them would otherwise serve
    the network through another model's PSF without a word. Raises ValueError (one line) for
    a bank that is not the model's, FileNotFoundError for a missing one.
    """
    path = Path(model_path).parent / volume.psf_file
    if volume.psf_sha256 is not None and path.is_file():
        actual = file_sha256(path)
        if actual != volume.psf_sha256:
            raise ValueError(
                f"{path} (sha256 {actual[:12]}…) is not the PSF bank saved with the model "
                f"(sha256 {volume.psf_sha256[:12]}…): a save or copy was interrupted between "
                "the two files; copy the model's files together, or export it again"
            )
    return load_psf_bank(path, len(volume.depth_um))


MAX_PSF_SIDE_PX = 511
"""Largest PSF bank side accepted (px): 77 µm at 0.15 µm pixels; the shipped bank is 127."""
MAX_PSF_PLANES = 1023
"""Most planes a PSF bank may hold (2·D - 1 for a depth grid of D; the shipped one has 81)."""


def load_psf_bank(path: str | Path, n_depths: int | None, *, measured: bool = False) -> np.ndarray:
    """Read a PSF bank and check it fits an `n_depths` grid: (2·n_depths - 1, S, S), S odd.

    `n_depths` None checks all but the grid (an odd number of planes): what a scope config can
    check before the model is loaded.

    Every bank must be float, non-negative, and a PSF normalised as `psf_bank` makes it: the
    in-focus (middle) plane sums to 1 and none sums to more (a bank scaled or emptied by
    mistake renders planes off by that factor, or the bare frame). With `measured` (a
    microscope's bank, `engine.psf_calibration`, not one a model shipped with) it must also
    be a wide-field PSF: planes that each sum to 1 (a model's own confocal bank dims off
    focus). Any file that is not such a bank raises ValueError (FileNotFoundError when
    missing) with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PSF bank not found")
    try:
        # mapped, not read: the header's shape is checked before any data is (a forged header
        # could ask for terabytes), and a file shorter than its header says is refused here
        psf = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a .npy PSF bank ({exc})") from exc
    if not isinstance(psf, np.ndarray) or psf.dtype.kind != "f":
        kind = psf.dtype if isinstance(psf, np.ndarray) else type(psf).__name__
        raise ValueError(f"{path}: a PSF bank must be one floating-point .npy array, not {kind}")
    planes = 2 * n_depths - 1 if n_depths is not None else None
    if (
        psf.ndim != 3
        or psf.shape[1] != psf.shape[2]
        or (psf.shape[0] != planes if planes is not None else psf.shape[0] % 2 == 0)
    ):
        fits = f"{n_depths} depths" if n_depths is not None else "any depth grid (2D - 1 planes)"
        raise ValueError(f"{path}: PSF bank shape {psf.shape} does not fit {fits}")
    if psf.shape[0] > MAX_PSF_PLANES:
        raise ValueError(f"{path}: PSF bank of {psf.shape[0]} planes (at most {MAX_PSF_PLANES})")
    if psf.shape[1] % 2 == 0 or psf.shape[1] > MAX_PSF_SIDE_PX or not np.all(np.isfinite(psf)):
        raise ValueError(
            f"{path}: PSF bank must have odd sides up to {MAX_PSF_SIDE_PX} px and finite values"
        )
    out = np.array(psf, dtype=np.float32, order="C")  # read into memory (a copy of the map)
    if out.min() < 0:  # light: a model's own bank too (a confocal one's planes sum below 1)
        raise ValueError(f"{path}: a PSF bank's planes must be non-negative (min {out.min():.3g})")
    sums = out.sum(axis=(1, 2), dtype=np.float64)
    if measured:
        if not np.allclose(sums, 1.0, atol=1e-3):  # non-negative: checked above
            raise ValueError(
                f"{path}: a PSF bank's planes must be non-negative and each sum to 1 (sums "
                f"{sums.min():.4g} … {sums.max():.4g}); write it with python -m "
                "engine.psf_calibration"
            )
        return out
    focus = sums[sums.size // 2]
    if not (abs(focus - 1.0) <= 1e-3 and sums.max() <= 1.0 + 1e-3):
        raise ValueError(
            f"{path}: not a normalised PSF bank: its in-focus plane sums to {focus:.4g} and "
            f"its planes to at most {sums.max():.4g} (1 and 1 expected)"
        )
    return out


class Renderer:
    """Render wide-field planes and surfaces from object volumes, for one frame shape.

    The PSF transforms for the frame shape (plus a PSF-radius margin, so nothing wraps around)
    are computed once here and reused for every frame, as are the padded grids of its threads
    (one each): one renderer serves one caller at a time (a backend is called from one thread
    at a time too); its own threads split each call's planes and frequency rows.
    """

    def __init__(
        self, psf: np.ndarray, depth_um: np.ndarray, shape: tuple[int, int], threads: int = 2
    ) -> None:
        import scipy.fft

        self._fft = scipy.fft
        self.threads = max(1, int(threads))
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="render")
            if self.threads > 1
            else None
        )
        self.depth_um = np.asarray(depth_um, dtype=np.float64)
        self.step_um = float(self.depth_um[1] - self.depth_um[0])
        self.shape = (int(shape[0]), int(shape[1]))
        size = psf.shape[-1]
        self.margin = size // 2
        h, w = self.shape
        # The frame sits at the grid's origin with one PSF radius of zeros after it: light
        # spread past an edge wraps around into those zeros and never onto the frame, so the
        # circular convolution is the linear one on the frame (a margin on both sides, as
        # before, was 1.4x the FFT area at 256²).
        # (and at least the PSF's size, which a frame smaller than a PSF radius needs)
        self.grid = (
            scipy.fft.next_fast_len(max(h + self.margin, size), real=True),
            scipy.fft.next_fast_len(max(w + self.margin, size), real=True),
        )
        emb = np.zeros((psf.shape[0], *self.grid), dtype=np.float32)
        emb[:, :size, :size] = psf
        emb = np.roll(emb, (-(size // 2), -(size // 2)), axis=(1, 2))
        self.otf = scipy.fft.rfft2(emb, workers=2).astype(np.complex64, copy=False)
        del emb  # (the embedded bank is as large as the frame's grid x depths: freed now)
        yy = np.fft.fftfreq(self.grid[0])[:, None]
        xx = np.fft.rfftfreq(self.grid[1])[None, :]
        s = RESIDUAL_SIGMA_PX
        self._lowpass = np.exp(-2 * (np.pi * s) ** 2 * (yy**2 + xx**2)).astype(np.float32)
        # Normalised convolution: the residual is low-passed inside the frame only (the grid
        # around it is zero), so divide by the low-passed frame support; otherwise the
        # residual (camera offset, background) would fade towards the frame's edges.
        self._pads = [np.zeros(self.grid, dtype=np.float32) for _ in range(self.threads)]
        self._depth_kernel: np.ndarray | None = None
        ones = np.ones((1, *self.shape), dtype=np.float32)
        self._support = self._back(self._spectra(ones) * self._lowpass)[0]

    def close(self) -> None:
        """Stop the render threads (idle between calls); the renderer is not used after."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _each(self, work: Callable[[int, int], None], n: int) -> None:
        """Run ``work(first, stride)`` over n items on the renderer's threads (or inline)."""
        if self._pool is None or n < 2:
            work(0, 1)
            return
        jobs = [self._pool.submit(work, k, self.threads) for k in range(self.threads)]
        for job in jobs:
            job.result()

    def _spectra(
        self, objects: np.ndarray, which: np.ndarray | None = None, scale: float = 1.0
    ) -> np.ndarray:
        """rfft2 of `scale` x (D, H, W) objects (those at `which`), zero-padded into the grid.

        One plane at a time per thread, through that thread's padded grid (kept between
        calls: its margins stay zero), so no padded copy of the whole stack is made.
        """
        h, w = self.shape
        index = np.arange(objects.shape[0]) if which is None else which
        n = index.size
        out = np.empty((n, self.grid[0], self.grid[1] // 2 + 1), dtype=np.complex64)

        def work(first: int, stride: int) -> None:
            pad = self._pads[first]
            for i in range(first, n, stride):
                np.multiply(objects[index[i]], scale, out=pad[:h, :w])
                out[i] = self._fft.rfft2(pad, workers=1)

        self._each(work, n)
        return out

    def _convolve_depth(self, spec: np.ndarray, active: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sum over depths of spec[d] · OTF(j - d) at bank rows `rows`, by FFTs along depth.

        Plane p sees depth d through bank entry ``j = rows[p] - d`` (the Toeplitz structure of
        a lattice), so the sum is a convolution along the depth axis. With the L = 2D - 1
        entries of the bank, a circular convolution of length L is exact for every row in
        [D - 1, L - 1] (the planes within the depth grid): no index wraps around there.

        Done in blocks of `DEPTH_BLOCK_ROWS` frequency rows, the renderer's threads taking
        alternate blocks: a block's transform, product and inverse stay in cache, where the
        whole-array passes were bound by memory bandwidth (512²: 81 -> 50 ms on 2 cores).
        """
        n_bank = self.otf.shape[0]
        if self._depth_kernel is None:  # computed on first use: as large as the OTF bank
            self._depth_kernel = self._fft.fft(self.otf, axis=0, workers=self.threads).astype(
                np.complex64
            )
        kernel = self._depth_kernel
        idle = np.setdiff1d(np.arange(n_bank), active)  # depths without density: zeros
        out = np.empty((rows.size, *spec.shape[1:]), dtype=np.complex64)
        n_rows, block = spec.shape[1], DEPTH_BLOCK_ROWS

        def work(first: int, stride: int) -> None:
            buf = np.empty((n_bank, block, spec.shape[2]), dtype=np.complex64)
            for y0 in range(first * block, n_rows, stride * block):
                y1 = min(y0 + block, n_rows)
                b = buf[:, : y1 - y0]
                b[active] = spec[:, y0:y1]
                b[idle] = 0
                f = self._fft.fft(b, axis=0, workers=1, overwrite_x=True)
                f *= kernel[:, y0:y1]
                out[:, y0:y1] = self._fft.ifft(f, axis=0, workers=1, overwrite_x=True)[rows]

        self._each(work, n_rows)
        return out

    def _back(
        self,
        spectra: np.ndarray,
        add: np.ndarray | None = None,
        dtype: type[np.floating[Any]] = np.float32,
        skip: int | None = None,
    ) -> np.ndarray:
        """Inverse of `_spectra`: (P, grid) spectra to (P, H, W) images (+ `add`) of `dtype`.

        One plane at a time per thread: each is cropped (and `add`, an (H, W) image, added)
        straight from its inverse transform, with no grid-sized copy of the whole stack, and
        written in `dtype` (float16 halves what is written; beyond its range: inf). Plane
        `skip` is left unwritten (the caller has it already).
        """
        h, w = self.shape
        n = spectra.shape[0]
        out = np.empty((n, h, w), dtype=dtype)

        def work(first: int, stride: int) -> None:
            with np.errstate(over="ignore"):  # float16 overflow: saturated by the caller
                for p in range(first, n, stride):
                    if p == skip:
                        continue
                    img = self._fft.irfft2(spectra[p], s=self.grid, workers=1)
                    if add is None:
                        out[p] = img[:h, :w]
                    else:
                        np.add(img[:h, :w], add, out=out[p])

        self._each(work, n)
        return out

    def render(self, objects: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        """Render the density's own light (P, H, W) float32 at defocus `dz_um` (lattice values)."""
        spec = self._rendered_spectra(objects, dz_um)
        if spec is None:
            n = np.atleast_1d(np.asarray(dz_um)).size
            return np.zeros((n, *self.shape), dtype=np.float32)
        return self._back(spec)

    def _rendered_spectra(
        self, objects: np.ndarray, dz_um: np.ndarray, scale: float = 1.0
    ) -> np.ndarray | None:
        """Spectra (P, grid) of `render`'s planes of `scale` x `objects`; None when empty.

        Depths whose density is empty (below 1e-6 of the peak) are skipped: sparse samples
        occupy few of the 41 depths, and each one costs an FFT and P products. Many planes from
        many depths are one convolution along depth (`_convolve_depth`, exact to float32
        rounding); few are summed directly, the planes shared among the renderer's threads.
        """
        objects = np.asarray(objects, dtype=np.float32)
        j = defocus_index(np.atleast_1d(np.asarray(dz_um, dtype=np.float64)), self.depth_um)
        # |density|: a depth of negative density (a model not held non-negative) still counts
        peaks = np.abs(objects).max(axis=(1, 2))  # (a view's reshape would copy)
        active = np.flatnonzero(peaks > EMPTY_DEPTH * max(float(peaks.max()), 1e-30))
        if active.size == 0:
            return None
        spec = self._spectra(objects, active, scale)
        # defocus_index keeps every plane within the depth grid, where the circular
        # convolution along depth is exact; it pays for many planes from many depths
        if (
            j.shape[0] * active.size >= DEPTH_FFT_MIN_PRODUCTS
            and self.otf.nbytes <= DEPTH_FFT_MAX_BYTES
        ):
            return self._convolve_depth(spec, active, j[:, 0])
        acc = np.empty((j.shape[0], *spec.shape[1:]), dtype=np.complex64)
        jj = j[:, active]

        def accumulate(planes: range) -> None:
            # acc[p] = sum over depths k of spec[k] * OTF(plane p - depth k): memory-bound
            # numpy passes, which release the GIL, so threads over planes use idle cores
            tmp = np.empty(spec.shape[1:], dtype=np.complex64)
            for p in planes:
                np.multiply(spec[0], self.otf[jj[p, 0]], out=acc[p])
                for k in range(1, active.size):
                    np.multiply(spec[k], self.otf[jj[p, k]], out=tmp)
                    acc[p] += tmp

        n = j.shape[0]
        if self._pool is None or n < 2:
            accumulate(range(n))
        else:
            chunks = [range(i, n, self.threads) for i in range(self.threads)]
            for future in [self._pool.submit(accumulate, c) for c in chunks]:
                future.result()
        return acc

    def planes(
        self,
        objects: np.ndarray,
        frame: np.ndarray,
        dz_um: np.ndarray,
        dtype: type[np.floating[Any]] = np.float32,
        scale: float = 1.0,
    ) -> np.ndarray:
        """Planes (P, H, W) counts at uniform defocus `dz_um` (within the depth grid).

        `objects` times `scale` is the (D, H, W) density in counts (a backend passes its
        network's normalised output and the frame's std: the product is formed as each depth
        is copied into the FFT grid, not as a pass of its own); `frame` the (H, W) input it came
        from, whose unexplained low-frequency part (offset, background, far objects) is added
        back.
        The planes are written in `dtype` as they are made (float16: what the daemon records,
        without a cast of the whole stack afterwards; values beyond its range become inf).
        Planes off the depth lattice are the linear blend of their two lattice neighbours:
        the lattice planes around all of them are rendered once (exact on the lattice).
        """
        dz = self._onto_range(np.atleast_1d(np.asarray(dz_um, dtype=np.float64)))
        lo = np.floor(np.round(dz / self.step_um, 6)).astype(np.int64)
        frac = np.clip(dz / self.step_um - lo, 0.0, 1.0).astype(np.float32)
        between = frac >= 1e-6  # off the lattice: the next plane up is needed too
        grid = np.unique(np.concatenate([lo, lo[between] + 1]))
        if not between.any() and np.array_equal(grid, lo):  # the usual plan: rendered as is
            return self._lattice_planes(objects, frame, dz, dtype, scale)
        planes = self._lattice_planes(objects, frame, grid * self.step_um, np.float32, scale)
        k0 = np.searchsorted(grid, lo)
        out = np.empty((dz.size, *planes.shape[1:]), dtype=dtype)
        with np.errstate(over="ignore"):  # float16: beyond its range becomes inf, as above
            for p, (a0, t) in enumerate(zip(k0, frac, strict=True)):
                out[p] = planes[a0] if t < 1e-6 else planes[a0] * (1 - t) + planes[a0 + 1] * t
        return out

    def _lattice_planes(
        self,
        objects: np.ndarray,
        frame: np.ndarray,
        dz: np.ndarray,
        dtype: type[np.floating[Any]],
        scale: float,
    ) -> np.ndarray:
        """`planes` for `dz` on the depth lattice: the density's light plus the residual."""
        at_focus = np.flatnonzero(np.abs(dz) < 1e-9)  # the plane at focus, if asked for
        spec = self._rendered_spectra(objects, dz if at_focus.size else np.append(dz, 0.0), scale)
        f = int(at_focus[0]) if at_focus.size else dz.size
        frame = np.asarray(frame, dtype=np.float32)
        if spec is None:  # no density: every plane is the low-passed frame
            low = self._back(self._spectra(frame[None]) * self._lowpass)[0] / self._support
            with np.errstate(over="ignore"):
                return np.repeat(low[None], dz.size, axis=0).astype(dtype)
        focus = self._back(spec[f : f + 1])[0]  # the density's light at focus, in float32
        low = self._back(self._spectra((frame - focus)[None]) * self._lowpass)[0] / self._support
        # the residual added as each plane is cut; the focus plane, if asked for, is not
        # transformed a second time
        asked = f if f < dz.size else None
        out = self._back(spec[: dz.size], add=low, dtype=dtype, skip=asked)
        if asked is not None:
            with np.errstate(over="ignore"):
                np.add(focus, low, out=out[asked], casting="unsafe")
        return out

    def _onto_range(self, dz: np.ndarray) -> np.ndarray:
        """`dz` with values at most `RANGE_TOLERANCE_UM` beyond the grid's ends put on them.

        A float64 tilted plan from -10 to 10 µm ends at 10.000000000000002: without this it
        asked for a plane past the grid and was refused with a message about the lattice.
        Values further out are left for the lattice check to refuse.
        """
        ends = np.clip(dz, self.depth_um[0], self.depth_um[-1])
        out: np.ndarray = np.where(np.abs(dz - ends) <= RANGE_TOLERANCE_UM, ends, dz)
        return out

    def surface(self, objects: np.ndarray, frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
        """Render the (H, W) image on a DPM surface: grid planes, interpolated per pixel.

        Raises
        ------
        ValueError
            A DPM not of the frame's shape or not finite (a backend checks both before; this
            says so to callers that render directly).
        """
        dpm = np.asarray(dpm_um, dtype=np.float64)
        if dpm.shape != self.shape:
            raise ValueError(f"DPM shape {dpm.shape} is not the frame's {self.shape}")
        if not np.isfinite(dpm).all():
            raise ValueError("DPM holds NaN or infinite depths")
        dpm = self._onto_range(dpm)
        lo = np.floor(np.round(dpm.min() / self.step_um, 6)) * self.step_um
        hi = np.ceil(np.round(dpm.max() / self.step_um, 6)) * self.step_um
        z = np.round(np.arange(lo, hi + self.step_um / 2, self.step_um), 6)
        stack = self.planes(objects, frame, z)
        if z.size == 1:
            return np.asarray(stack[0])
        pos = np.clip((dpm - lo) / self.step_um, 0, z.size - 1)
        i0 = np.minimum(np.floor(pos).astype(np.int64), z.size - 2)
        frac = (pos - i0).astype(np.float32)
        rows, cols = np.indices(dpm.shape)
        out = stack[i0, rows, cols] * (1 - frac) + stack[i0 + 1, rows, cols] * frac
        return np.asarray(out, dtype=np.float32)
