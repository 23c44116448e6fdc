"""Refocusing functions the read-outs take: the input and background baselines, adapters."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
from scipy import ndimage

from engine.heldout.imaging import interp_planes
from engine.heldout.optics import SLICE_UM
from engine.heldout.samples import IndependentSample

PlanesFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(frame (H, W) uint16, dz_um (P,) float) -> (P, H, W) float32 refocused planes in counts."""
SurfaceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(frame (H, W) uint16, dpm (H, W) µm) -> (H, W) float32 image refocused onto the DPM."""


def input_planes_fn(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
    """Return the frame itself (float32) for every Δz: the 'unrefocused input' baseline."""
    dz = np.atleast_1d(np.asarray(dz_um))
    img = np.asarray(frame, dtype=np.float32)
    out: np.ndarray = np.repeat(img[None], dz.size, axis=0)
    return out


def input_surface_fn(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
    """Return the frame itself (float32) on any surface: the 'unrefocused input' baseline."""
    out: np.ndarray = np.asarray(frame, dtype=np.float32).copy()
    return out


def background_planes_fn(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
    """Return the frame's smooth background for every Δz: a refocusing with no objects at all.

    The pixel targets' floor: on sparse frames most pixels are background, so this scores a
    median SSIM near 0.98 and beats the input's PSNR at most Δz (review 36); a pixel figure
    says something about refocusing only where it beats this row.
    """
    dz = np.atleast_1d(np.asarray(dz_um))
    out: np.ndarray = np.repeat(background_surface_fn(frame, dz)[None], dz.size, axis=0)
    return out


def background_surface_fn(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
    """Return the frame's smooth background on any surface (`background_planes_fn`)."""
    out: np.ndarray = smooth_background(np.asarray(frame, dtype=np.float32)).astype(np.float32)
    return out


class _Refocuser(Protocol):
    """What `refocus_fns` needs of a model: `engine.runtime.Backend.infer`."""

    def infer(self, images: np.ndarray, dpms_um: np.ndarray, /) -> np.ndarray: ...


def refocus_fns(backend: _Refocuser) -> tuple[PlanesFn, SurfaceFn]:
    """Return a model's refocusing as the read-outs take it: uniform planes, one DPM surface.

    `backend` is anything with `infer(frame, dpms (N, H, W) µm) -> (N, H, W)`, as every
    `engine.runtime` backend has; one home for how a model is scored, so every report and
    probe scores it the same way.
    """

    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        dz = np.asarray(dz_um, dtype=np.float32)
        dpms = np.broadcast_to(dz[:, None, None], (dz.size, *frame.shape))
        return backend.infer(frame, dpms)

    def surface(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
        out: np.ndarray = backend.infer(frame, np.asarray(dpm_um, dtype=np.float32)[None])[0]
        return out

    return planes, surface


def truth_planes_fn(sample: IndependentSample) -> PlanesFn:
    """Return a 'perfect refocus' for `sample`: its truth planes, linearly interpolated in Δz.

    The check that the read-outs are right: fed to them, it must score (nearly) perfectly.
    """

    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        dz = np.atleast_1d(np.asarray(dz_um, dtype=np.float64))
        h, w = sample.frame.shape
        return np.stack(
            [interp_planes(sample.planes, sample.dz_um, np.full((h, w), d)) for d in dz]
        )

    return planes


def surface_from_planes(planes_fn: PlanesFn, step_um: float = SLICE_UM) -> SurfaceFn:
    """Turn a `PlanesFn` into a `SurfaceFn`, as a volume model serves any DPM.

    Planes on a `step_um` grid over the DPM's range are interpolated linearly per pixel.
    """

    def surface(frame: np.ndarray, dpm_um: np.ndarray) -> np.ndarray:
        dpm = np.asarray(dpm_um, dtype=np.float64)
        lo = math.floor(float(dpm.min()) / step_um) * step_um
        hi = math.ceil(float(dpm.max()) / step_um) * step_um
        z = np.round(np.arange(lo, hi + step_um / 2, step_um), 6)
        if z.size == 1:
            z = np.array([lo, lo + step_um])
        stack = np.asarray(planes_fn(frame, z), dtype=np.float32)
        return interp_planes(stack, z, dpm)

    return surface


def smooth_background(img: np.ndarray, block: int = 8, size: int = 7) -> np.ndarray:
    """Robust smooth background: medians of 8x8 blocks, a 7-block median filter, upsampled."""
    h, w = img.shape
    hb, wb = -(-h // block), -(-w // block)
    pad = np.pad(img, ((0, hb * block - h), (0, wb * block - w)), mode="edge")
    med = np.median(
        pad.reshape(hb, block, wb, block).transpose(0, 2, 1, 3).reshape(hb, wb, -1), axis=2
    )
    med = ndimage.median_filter(med, size=size, mode="nearest")
    ys = (np.arange(h) + 0.5) / block - 0.5
    xs = (np.arange(w) + 0.5) / block - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out: np.ndarray = ndimage.map_coordinates(med, [yy, xx], order=1, mode="nearest")
    return out
