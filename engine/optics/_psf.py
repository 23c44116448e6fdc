"""Wide-field point spread functions (via `psfmodels`: scalar Gibson-Lanni or vectorial), cached.

The PSF is indexed by defocus ``d = z_focus - z_object`` (µm): the axial distance from the point
source to the focal plane, positive when the focal plane lies deeper (further from the
objective) than the point. Each plane is normalised to unit sum (a thin plane of the wide-field
PSF carries all the light of the point), so blurring conserves energy per plane. The
refractive-index mismatch (air objective, watery sample) makes the PSF asymmetric about focus.
`OpticsConfig.psf_model` picks psfmodels' scalar Gibson-Lanni model (the default, and what a
volume model's PSF bank is made of) or its vectorial model (Aguet et al. 2009; polarisation and
high-angle effects), so training data can come from both; 'measured' reads the planes of a
bank measured from a microscope's bead slide (`engine.psf_calibration`), so a model can be
trained through the microscope it will serve.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import numpy as np
import psfmodels

from engine.optics._config import OpticsConfig

_OpticsKey = tuple[float, float, float, float, float, float, Literal["scalar", "vectorial"]]


def _key(optics: OpticsConfig) -> _OpticsKey:
    """Hashable tuple of the fields that shape a psfmodels PSF (not a measured bank's)."""
    if optics.psf_model == "measured":
        raise ValueError("a measured PSF bank is read from its file, not made by psfmodels")
    return (
        optics.na,
        optics.wavelength_um,
        optics.immersion_index,
        optics.sample_index,
        optics.pixel_size_um,
        optics.particle_depth_um,
        "vectorial" if optics.psf_model == "vectorial" else "scalar",
    )


def _raw_psf(key: _OpticsKey, z_stage_um: np.ndarray, size_px: int) -> np.ndarray:
    """Call psfmodels' scalar or vectorial model at nominal focus positions (float64)."""
    na, wvl, ni, ns, dxy, pz, model = key
    psf: np.ndarray = psfmodels.make_psf(
        [float(z) for z in z_stage_um],
        size_px,
        dxy=dxy,
        pz=pz,
        NA=na,
        wvl=wvl,
        ns=ns,
        ni=ni,
        ni0=ni,
        model=model,
        normalize=False,
    )
    return psf


@functools.lru_cache(maxsize=1024)  # one float per aberration depth: depth-dependent imaging
def _best_focus_um(key: _OpticsKey) -> float:
    """Nominal focus position (psfmodels coordinates) where the PSF peak is brightest."""
    pz = float(key[5])
    coarse = pz + np.arange(-4.0, 4.0001, 0.1)
    peaks = _raw_psf(key, coarse, 17)[:, 8, 8]
    best = float(coarse[int(np.argmax(peaks))])
    fine = best + np.arange(-0.1, 0.1001, 0.01)
    peaks = _raw_psf(key, fine, 17)[:, 8, 8]
    return float(fine[int(np.argmax(peaks))])


@functools.lru_cache(maxsize=8)
def _psf_cached(key: _OpticsKey, defocus_um: tuple[float, ...], size_px: int) -> np.ndarray:
    """Unit-sum PSF planes at the given defocus values (read-only float32)."""
    z_stage = _best_focus_um(key) + np.asarray(defocus_um, dtype=np.float64)
    psf = _raw_psf(key, z_stage, size_px)
    psf /= psf.sum(axis=(1, 2), keepdims=True)
    out = psf.astype(np.float32)
    out.flags.writeable = False
    return out


def make_psf(optics: OpticsConfig, z_um: np.ndarray, size_px: int = 127) -> np.ndarray:
    """Wide-field PSF (Z, size_px, size_px) float32 at defocus values `z_um` (µm).

    ``z_um = z_focus - z_object``; 0 is best focus (brightest peak). The point sits at the
    centre pixel ``size_px // 2`` (use an odd size). Every plane sums to 1. Results are cached,
    so repeated calls with the same arguments are free; the returned array is read-only.
    """
    z = np.atleast_1d(np.asarray(z_um, dtype=np.float64))
    if z.ndim != 1 or not np.all(np.isfinite(z)):
        raise ValueError(f"z_um must be a 1-D array of finite defocus values, got {z_um!r}")
    if size_px < 3:
        raise ValueError(f"size_px must be >= 3, got {size_px}")
    key = tuple(round(float(v), 6) for v in z)
    if optics.psf_model == "measured":
        assert optics.psf_bank is not None  # OpticsConfig's validator: measured needs a bank
        return _measured_cached(optics, _bank_identity(optics.psf_bank), key, int(size_px))
    return _psf_cached(_key(optics), key, int(size_px))


@functools.lru_cache(maxsize=2)
def _bank(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Read a measured bank, checked by `engine.volume.load_psf_bank` (their one home).

    Cached on the resolved path, modification time and size: a bank measured again to the
    same file is read again.
    """
    from engine.volume import load_psf_bank

    return load_psf_bank(path, None, measured=True)


def _bank_identity(path: str) -> tuple[str, int, int]:
    """Return a bank file's (resolved path, mtime_ns, size): what its planes are cached on."""
    resolved = Path(path).resolve()
    try:
        st = resolved.stat()
    except OSError:
        raise FileNotFoundError(f"{path}: PSF bank not found") from None
    return str(resolved), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _measured_cached(
    optics: OpticsConfig,
    identity: tuple[str, int, int],
    defocus_um: tuple[float, ...],
    size_px: int,
) -> np.ndarray:
    """Unit-sum planes of `optics.psf_bank` at the given defocus values (read-only float32).

    Each defocus must sit on the bank's step; beyond its planes (a lab's slide is scanned over
    a finite range) the scalar model of the same optics stands in, as the far, faint wings of
    a sample matter little. The bank is cropped or zero-padded to `size_px` and renormalised.
    """
    bank = _bank(*identity)
    half = (bank.shape[0] - 1) // 2
    steps = np.asarray(defocus_um) / optics.psf_bank_step_um
    index = np.round(steps).astype(np.int64)
    if not np.allclose(steps, index, atol=1e-4):
        raise ValueError(
            f"defocus {defocus_um} is not on the measured bank's {optics.psf_bank_step_um} µm step"
        )
    side = bank.shape[-1]
    out = np.zeros((len(defocus_um), size_px, size_px), dtype=np.float32)
    c, r = size_px // 2, side // 2
    keep = min((size_px - 1) // 2, r)  # half-side copied: the bank cropped or padded
    inside = np.abs(index) <= half
    planes = bank[index[inside] + half, r - keep : r + keep + 1, r - keep : r + keep + 1]
    out[inside, c - keep : c + keep + 1, c - keep : c + keep + 1] = planes
    if not inside.all():
        scalar = optics.model_copy(update={"psf_model": "scalar", "psf_bank": None})
        out[~inside] = make_psf(scalar, np.asarray(defocus_um)[~inside], size_px)
    out /= out.sum(axis=(1, 2), keepdims=True)
    out.flags.writeable = False
    return out
