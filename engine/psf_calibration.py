"""Measure a microscope's PSF bank from focus-scanned bead stacks, to render a model's planes.

    python -m engine.psf_calibration STACK [STACK ...] --step-um 0.5 [--model M.onnx]
                                     [--out runs/psf-measured/psf.npy]
    python -m engine.psf_calibration --slide pupil [--fields 6] [--out DIR/psf.npy]

A volume model predicts where the light comes from (its density) and renders the planes it is
asked for through a PSF bank: one plane per defocus ``focus - source`` on its depth grid's step,
from -(D-1) to +(D-1) steps, each summing to 1 (`engine.volume.psf_bank`). The bank that ships
with a model is its training simulator's (scalar, index mismatch at one depth). A real
objective's PSF differs, and planes rendered through the wrong bank are wrong even where every
bead is placed exactly: on the hold-out's pupil-function PSF (astigmatism, coma, spherical
aberration) the true beads as points, rendered through the shipped bank, peak 38 % above the
truth on the tilted plane, every one outside the read-out's 20 % band (`engine.probes`'
tilted-plane ceiling; 94 % inside it on the vectorial set). The density is the network's; the
PSF is the microscope's. So the microscope's is measured, as a lab measures it for
deconvolution: a slide of sparse sub-resolution beads imaged through focus, the beads found,
centred to a fraction of a pixel, aligned on their own best focus and averaged. The bank this
writes is served with ``load_backend(model, psf_bank=...)`` (the daemon: ``[engine] psf_bank``),
and `engine.fidelity --measured-psf` scores models rendered through a bank measured from a
simulated slide of each independent set's optics (`engine.heldout.bead_slide`: its beads, not
the set's PSF function).

How a bank is measured (`measure_psf_bank`), each step a choice a newcomer can check:

1. **Find beads**: local maxima of the stacks' background-free maximum projection brighter than
   a tenth of the brightest and 8 robust SDs above its median; a bead is kept when no other
   maximum lies within a crop's side, its crop (the bank's side, 127 px) lies inside the
   frame, and no pixel of it saturates.
2. **Per bead**: the background is the median of the crop's rim medians (3 px) over the half
   of the frames nearest its focus (far from focus the bead's own light reaches the rim); the best
   focus is the peak of the 3x3 sum over the stack, refined by a parabola; the lateral centre
   is the centroid of 11x11 pixels at that focus; the brightness is the median of its planes'
   sums (91-95 % of its light is in the crop at 20 µm of defocus, all of it to 15 µm).
3. **Average, undoing the split**: a volume model's density holds a point the way its
   training targets do, split bilinearly between the pixels and linearly between the depth
   slices around it, and its bank is what that split, rendered, turns into the point's image.
   So each bead's frames are that bank times its own split (known from its centre and focus),
   and the bank is the least-squares solution over all beads, frequency by frequency
   (`_split_bank`; beads at different fractions of a pixel or step fill in each other's
   nulls). For a real bead the split is a model convention, not its optics; the same solution
   then is the beads' shift-and-average, read in the model's convention. This needs a scan
   that steps as the bank and reaches Z_PAD + 1 steps past its range around each bead used
   (beads short of that are left out, counted); a scan that does not, or too few such beads,
   is read between frames instead (`_interpolated_bank`: the lateral split undone, the depth
   one not). `PsfMeasurement.method` says which.
4. **Clean**: each plane's noise is shrunk by a Wiener filter on rings of spatial frequency
   (noise power from the rim, where no light is), the pixels where its light is are kept
   (those a 2-px Gaussian lifts above 3 noise SDs, grown by 3 px), negatives set to zero, and
   every plane scaled to sum 1. Without the cleaning the noise of 18 beads, clipped, took a
   fifth of the in-focus peak. Defocus the stacks do not cover are taken from a reference
   bank (the model's own) and reported, or refused without one.

A measured bank is one PSF for every depth, as the model's own is: it carries the aberration at
the slide's depth, so a lab images its slide at the depth it will image at.

A bank can also be trained through: ``[optics] psf_model = "measured"``, ``psf_bank = ...`` in
a volume training config images the simulated training frames through it and makes it the
model's own bank (`engine.optics.OpticsConfig`; `configs/train_volume_v37.toml`), so the
network learns that microscope's defocus, as Deep-Z itself was trained per microscope. Measure
that bank from other slide fields than the ones a model is judged with (``--first-seed``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage as ndi

from engine.files import atomic_save_npy, atomic_write_text, out_dir_problem
from engine.lab_files import LabFileError, focus_step_problem, full_scale, read_stack

if TYPE_CHECKING:
    from engine.heldout import IndependentOptics
    from engine.metadata import ModelMetadata
    from engine.optics import Lateral

__all__ = [
    "CalibrationError",
    "PsfMeasurement",
    "find_beads",
    "in_focus_fwhm_um",
    "main",
    "measure_psf_bank",
    "plane_fwhm_um",
    "slide_bank",
    "slide_bank_for",
]

RIM_PX = 3
"""Width of a crop's rim whose median is a plane's background."""
BRIGHT_FRACTION = 0.1
NOISE_SD = 8.0
"""A maximum of the projection is a bead when it is a tenth of the brightest or more and
above the projection's median by 8 robust SDs (so a stack of noise has none)."""
NEIGHBOUR_FRACTION = 0.02
"""A maximum this bright (of the brightest) or more, above the same noise floor, is a neighbour
that spoils a bead's crop: one at 8 % put 5-7 % of each plane's light into a false copy beside
the bead when only beads at a tenth counted (review 85)."""
HOT_PIXEL_SHARE = 0.7
"""A candidate whose brightest pixel holds this share of its 3x3 sum in every frame is a hot
pixel, not a bead (an in-focus bead's centre holds about a third; review 85: a hot pixel was
taken for a bead focused at -5.6 µm and raised a plane's centre by half)."""
SUPPORT_SIGMA_PX = 2.0
SUPPORT_NOISE_SD = 3.0
SUPPORT_GROW_PX = 3
"""Step 4: the Gaussian, threshold (rim noise SDs) and growth that decide where light is."""
CENTROID_HALF_PX = 5
"""Half side of the window whose centroid is a bead's sub-pixel centre (11x11 px)."""
Z_PAD = 4
"""Frames past the bank's range each side that a scan must reach to undo the depth split."""
SPLIT_FLOOR = 0.005
"""Step 3's floor on the beads' summed split power, as a share of their summed brightness."""


class CalibrationError(ValueError):
    """A stack that cannot give a PSF bank; the message names why, in one line."""


@dataclass(frozen=True)
class PsfMeasurement:
    """A PSF bank measured from bead stacks and how it was measured.

    Attributes
    ----------
    bank : (2D-1, S, S) float32, defocus ``(k - (D-1))·step`` µm per plane, each summing to 1.
    defocus_um : (2D-1,) the defocus of each plane.
    measured : (2D-1,) True where the plane is measured, False where it came from the
        reference bank (the stacks did not reach that defocus).
    beads : beads averaged.
    method : "split": the scan stepped as the bank and reached past it around each bead, and
        the beads' split between depth slices was undone too (`_split_bank`); "interpolated":
        each defocus read between frames (`_interpolated_bank`).
    rejected : why the other maxima were left out (reason -> count).
    bead_focus_um : each averaged bead's best focus in the stacks' focus coordinates.
    """

    bank: np.ndarray
    defocus_um: np.ndarray
    measured: np.ndarray
    beads: int
    method: Literal["split", "interpolated"]
    rejected: dict[str, int] = field(default_factory=dict)
    bead_focus_um: list[float] = field(default_factory=list)
    lateral: Lateral = "linear"
    """How the bank's user holds a point between pixels (`measure_psf_bank`'s `lateral`)."""

    def summary(self, pixel_size_um: float, reference: np.ndarray | None = None) -> dict[str, Any]:
        """Summarise for JSON: beads, measured range, in-focus FWHM and peak, beside a reference."""
        centre = (self.bank.shape[0] - 1) // 2
        out: dict[str, Any] = {
            "beads": self.beads,
            "method": self.method,
            "lateral": self.lateral,
            "rejected": self.rejected,
            "planes": int(self.bank.shape[0]),
            "side_px": int(self.bank.shape[-1]),
            "measured_defocus_um": _span(self.defocus_um[self.measured]),
            "filled_from_reference": int((~self.measured).sum()),
            "in_focus_fwhm_um": in_focus_fwhm_um(self.bank, pixel_size_um),
            "in_focus_peak": float(self.bank[centre].max()),
            "bead_focus_um": [round(z, 3) for z in self.bead_focus_um],
        }
        if reference is not None:
            out["reference_in_focus_fwhm_um"] = in_focus_fwhm_um(reference, pixel_size_um)
            out["reference_in_focus_peak"] = float(reference[centre].max())
        return out


def _span(values: np.ndarray) -> list[float] | None:
    """[min, max] of `values`, or None when empty."""
    return [float(values.min()), float(values.max())] if values.size else None


def plane_fwhm_um(bank: np.ndarray, index: int, pixel_size_um: float) -> float:
    """Lateral FWHM (µm) of plane `index` of a PSF bank: a Gaussian fitted to its central 13x13."""
    from engine.metrics import gaussian_fwhm_2d

    c = bank.shape[-1] // 2
    window = bank[index, c - 6 : c + 7, c - 6 : c + 7]
    return float(gaussian_fwhm_2d(window, pixel_size_um, centered=True))


def in_focus_fwhm_um(bank: np.ndarray, pixel_size_um: float) -> float:
    """Lateral FWHM (µm) of a bank's in-focus plane (`plane_fwhm_um` at defocus 0)."""
    return plane_fwhm_um(bank, (bank.shape[0] - 1) // 2, pixel_size_um)


def find_beads(stack: np.ndarray, side_px: int) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Return the (row, col) of the beads to average in one stack, and why others were left.

    Step 1 of the module docstring: maxima of the background-free maximum projection at a
    tenth of the brightest or more, kept when isolated, inside the frame and unsaturated.
    """
    f, h, w = stack.shape
    proj = np.full((h, w), -np.inf, dtype=np.float32)
    for k in range(f):  # one plane at a time: a float copy of the stack is not needed
        plane = np.asarray(stack[k], dtype=np.float32)
        np.maximum(proj, plane - np.float32(np.median(plane)), out=proj)
    proj = ndi.gaussian_filter(proj, 1.0)
    level = float(np.median(proj))
    noise = 1.4826 * float(np.median(np.abs(proj - level)))
    noise_floor = level + NOISE_SD * noise
    floor = max(BRIGHT_FRACTION * float(proj.max()), noise_floor)
    maxima = proj == ndi.maximum_filter(proj, size=5)
    peaks = maxima & (proj > floor)
    rows, cols = np.nonzero(peaks)
    half = side_px // 2
    saturated = full_scale(stack)
    kept: list[tuple[int, int]] = []
    rejected = {
        "near another bead": 0,
        "crop leaves the frame": 0,
        "saturated": 0,
        "a hot pixel": 0,
    }
    if rows.size == 0:
        return kept, rejected
    from scipy.spatial import cKDTree

    # neighbours: fainter maxima count too, down to `NEIGHBOUR_FRACTION`, above the noise
    dim_floor = max(NEIGHBOUR_FRACTION * float(proj.max()), noise_floor)
    tree = cKDTree(np.column_stack(np.nonzero(maxima & (proj > dim_floor))))
    neighbours = tree.query_ball_point(np.column_stack([rows, cols]), r=side_px, return_length=True)
    for r, c, near in zip(rows.tolist(), cols.tolist(), neighbours.tolist(), strict=True):
        if near > 1:
            rejected["near another bead"] += 1
        elif not (half <= r < h - half and half <= c < w - half):
            rejected["crop leaves the frame"] += 1
        elif stack[:, r - 2 : r + 3, c - 2 : c + 3].max() >= saturated:
            rejected["saturated"] += 1
        elif _hot_pixel(stack[:, r - 2 : r + 3, c - 2 : c + 3]):
            rejected["a hot pixel"] += 1
        else:
            kept.append((r, c))
    return kept, rejected


def _hot_pixel(window: np.ndarray) -> bool:
    """Whether a candidate's (F, 5, 5) window is one bright pixel in every frame, not a spot.

    Each frame less the median of the window's 16 border pixels; the centre's share of the
    inner 3x3 light: about a quarter for a bead in focus (less out of it), about 1 for a hot
    pixel, whatever the focus.
    """
    w = np.asarray(window, dtype=np.float64)
    border = np.ones((5, 5), dtype=bool)
    border[1:4, 1:4] = False
    inner = np.clip(w[:, 1:4, 1:4] - np.median(w[:, border], axis=1)[:, None, None], 0, None)
    total = inner.sum(axis=(1, 2))
    lit = total > 0
    share = inner[:, 1, 1][lit] / total[lit]
    return bool(lit.any()) and bool(np.all(share >= HOT_PIXEL_SHARE))


def _parabola_peak(values: np.ndarray, k: int) -> float:
    """Sub-sample position of the maximum at index k of `values` (a parabola through 3)."""
    if k <= 0 or k >= values.size - 1:
        return float(k)
    a, b, c = values[k - 1], values[k], values[k + 1]
    den = a - 2 * b + c
    return float(k + 0.5 * (a - c) / den) if den < 0 else float(k)


def _rim(side_px: int) -> np.ndarray:
    """Mask (S, S) of a crop's outer `RIM_PX` pixels: where a bead's light does not reach."""
    half = side_px // 2
    yy, xx = np.indices((side_px, side_px)) - half
    out: np.ndarray = np.maximum(np.abs(yy), np.abs(xx)) > half - RIM_PX
    return out


def _bead_crop(stack: np.ndarray, row: int, col: int, side_px: int) -> np.ndarray:
    """Cut a bead's (F, S, S) crop less its background, read at the rim near its focus.

    One background for the bead's whole stack, the median of its rim medians over the half of
    the frames nearest its focus (its brightest centre): a slide's background does not change
    with focus, but a bead's own light reaches the rim far from focus (20 µm of defocus
    spreads 5-9 % of it beyond a 127-px crop), where a median per plane took 21-40 % of the
    bead's light with it (session 34's optics review). Not the least rim median: with noise
    that reads low, and the pedestal left over the whole crop outweighs a bead.
    """
    half = side_px // 2
    crop = np.asarray(
        stack[:, row - half : row + half + 1, col - half : col + half + 1], dtype=np.float64
    )
    rims = np.median(crop[:, _rim(side_px)], axis=1)
    focus = int(np.argmax(crop[:, half - 1 : half + 2, half - 1 : half + 2].sum(axis=(1, 2))))
    near = np.abs(np.arange(rims.size) - focus) <= max(1, rims.size // 4)
    crop -= float(np.median(rims[near]))
    return crop


def _bead_fit(crop: np.ndarray) -> tuple[float, float, float, float] | None:
    """Step 2's read-out of one bead's crop: (best-focus frame index, dy, dx, brightness).

    dy, dx: the bead's offset (px) from the crop's centre pixel. None when the centroid is not
    within a pixel of the maximum the bead was found at (a blend, not a bead) or the light or
    brightness is not positive.
    """
    side = crop.shape[-1]
    half = side // 2
    core = crop[:, half - 1 : half + 2, half - 1 : half + 2].sum(axis=(1, 2))
    k = int(np.argmax(core))
    focus_index = _parabola_peak(core, k)
    # The centroid over a window wide enough to hold the spot's tails: the split a density
    # holds a point with keeps the centroid, so this is the split's own offset (a centroid
    # over 5x5 pulled it a sixth of the way to the middle, a Gaussian fit a tenth).
    w = CENTROID_HALF_PX
    patch = crop[k, half - w : half + w + 1, half - w : half + w + 1]
    total = float(patch.sum())
    if total <= 0:
        return None
    offsets = np.arange(-w, w + 1, dtype=np.float64)
    dy = float((patch.sum(axis=1) * offsets).sum() / total)
    dx = float((patch.sum(axis=0) * offsets).sum() / total)
    brightness = float(np.median(crop.sum(axis=(1, 2))))
    if max(abs(dy), abs(dx)) > 1.0 or brightness <= 0:
        return None
    return focus_index, dy, dx, brightness


def _splat_transfer(dy: float, dx: float, side_px: int, lateral: Lateral = "linear") -> np.ndarray:
    """Transfer function (S, S) of a point `dy, dx` px from the centre pixel, as held.

    A volume model's density holds a point as its training targets do: split over the pixels
    around it with bilinear weights. The bank is what that split, convolved with it, turns
    into the bead's image; so each bead's image is undone by this split, not by an exact shift
    (the two agree for a bead on a pixel's centre). With `lateral` "spline" the point is held
    on `engine.optics.spline_taps` instead (the convention of a point fit that renders
    camera-like beads, `PointFit.lateral`): the bank is then the pixel PSF those taps move.
    """
    from engine.optics import lateral_weights

    k = np.fft.fftfreq(side_px)

    def axis(d: float) -> np.ndarray:
        first = int(np.floor(d))
        offset, weights = lateral_weights(d - first, lateral)
        at = first + offset + np.arange(weights.size)
        out: np.ndarray = (weights[:, None] * np.exp(-2j * np.pi * np.outer(at, k))).sum(0)
        return out

    transfer: np.ndarray = axis(dy)[:, None] * axis(dx)[None, :]
    return transfer


def _clean(plane: np.ndarray) -> np.ndarray:
    """Step 4 for one averaged plane: shrink its noise, keep the pixels where its light is.

    The noise is shrunk by a Wiener filter on rings of spatial frequency: the rim's variance
    (where no light reaches) is the noise's power at every frequency, the plane's ring-averaged
    power is signal plus noise, and each ring keeps the signal's share. Far from focus, where a
    bead's light is spread over thousands of pixels, that is most of the cleaning.
    """
    side = plane.shape[-1]
    rim = _rim(side)
    noise = float(np.var(plane[rim]))
    spectrum = np.fft.fft2(plane)
    k = np.fft.fftfreq(side)
    ring = np.minimum(np.rint(np.hypot(k[:, None], k[None, :]) * side).astype(np.int64), side)
    power = np.abs(spectrum) ** 2
    mean_power = np.bincount(ring.ravel(), power.ravel()) / np.maximum(np.bincount(ring.ravel()), 1)
    noise_power = noise * plane.size  # white noise's |FFT|² per frequency
    keep = np.clip(1.0 - noise_power / np.maximum(mean_power, 1e-30), 0.0, 1.0)
    shrunk = np.fft.ifft2(spectrum * keep[ring]).real
    smooth = ndi.gaussian_filter(shrunk, SUPPORT_SIGMA_PX)
    noise_smooth = np.sqrt(noise) / (2 * np.sqrt(np.pi) * SUPPORT_SIGMA_PX)  # white, through it
    support = ndi.binary_dilation(
        smooth > SUPPORT_NOISE_SD * noise_smooth, iterations=SUPPORT_GROW_PX
    )
    out: np.ndarray = np.where(support, np.clip(shrunk, 0.0, None), 0.0)
    return out


def measure_psf_bank(
    stacks: Sequence[np.ndarray],
    focus_um: np.ndarray,
    *,
    n_depths: int,
    step_um: float,
    side_px: int = 127,
    reference: np.ndarray | None = None,
    min_beads: int = 3,
    lateral: Lateral = "linear",
) -> PsfMeasurement:
    """Measure a (2·n_depths - 1, side, side) PSF bank from focus-scanned bead stacks.

    Parameters
    ----------
    stacks : (F, H, W) camera frames, one stack per field of the slide, all at `focus_um`.
    focus_um : (F,) focus positions (µm, + deeper: the focal plane moving into the sample),
        uniformly spaced.
    n_depths, step_um : the model's depth grid (`metadata.volume.depth_um`): the bank holds
        defocus -(n_depths - 1)·step … +(n_depths - 1)·step.
    side_px : the bank's side (odd): the model's own bank's, so a bead's light to the largest
        defocus stays in the crop.
    reference : a bank of the same shape to take the defocus the stacks do not reach from
        (the model's own); None refuses such stacks.
    min_beads : fewer beads than this is refused (a bank of one bead is that bead's noise).
    lateral : how the bank's user holds a point between pixels (`_splat_transfer`): "linear"
        for a model's density as it comes, "spline" for a point fit with ``lateral="spline"``.

    Raises
    ------
    CalibrationError
        The stacks or focus positions are malformed, too few beads are found, or the stacks do
        not reach the defocus the bank needs and no reference is given; one line says which.
    """
    focus = np.asarray(focus_um, dtype=np.float64)
    least = 2 * CENTROID_HALF_PX + 1
    if not (n_depths >= 2 and np.isfinite(step_um) and step_um > 0) or not (
        side_px >= least and side_px % 2 == 1
    ):
        raise CalibrationError(
            f"need n_depths >= 2, a finite step_um > 0 and an odd side_px >= {least}, got "
            f"{n_depths}, {step_um}, {side_px}"
        )
    if focus.ndim != 1 or focus.size < 3 or not np.all(np.isfinite(focus)):
        raise CalibrationError("focus positions must be a 1-D list of at least 3 finite values")
    steps = np.diff(focus)
    if not np.all(steps > 0) or not np.allclose(steps, steps[0], rtol=1e-3, atol=1e-6):
        raise CalibrationError(
            "focus positions must rise in equal steps, got steps from "
            f"{steps.min():.4g} to {steps.max():.4g} µm"
        )
    if not stacks:
        raise CalibrationError("no stacks given")
    stacks = [np.asarray(s) for s in stacks]
    for i, s in enumerate(stacks):
        if s.dtype.kind not in "iuf":
            raise CalibrationError(f"stack {i} is {s.dtype}; camera frames are real numbers")
        if s.ndim != 3 or s.shape[0] != focus.size:
            raise CalibrationError(
                f"stack {i} is {s.shape}; it must be ({focus.size}, H, W), one frame per focus"
            )
        if np.issubdtype(s.dtype, np.floating) and not np.all(np.isfinite(s)):
            raise CalibrationError(f"stack {i} holds NaN or infinite values")
        if min(s.shape[1:]) < side_px:
            raise CalibrationError(
                f"stack {i}'s frames ({s.shape[1]}x{s.shape[2]}) are smaller than the "
                f"{side_px}-px crop a bead's light to the largest defocus needs"
            )
    planes = 2 * n_depths - 1
    defocus = (np.arange(planes) - (n_depths - 1)) * float(step_um)
    if reference is not None and reference.shape != (planes, side_px, side_px):
        raise CalibrationError(
            f"the reference bank is {reference.shape}, not ({planes}, {side_px}, {side_px})"
        )
    f_step = float(steps.mean())
    rejected: dict[str, int] = {}
    # stack, row, col and the fit: the crops are cut again where they are summed, so only one
    # bead's (F, S, S) float64 crop is held at a time (about 11 MB for a 97-frame scan)
    found: list[tuple[int, int, int, float, float, float, float]] = []
    for i, stack in enumerate(stacks):
        sites, why = find_beads(stack, side_px)
        for reason, n in why.items():
            rejected[reason] = rejected.get(reason, 0) + n
        for row, col in sites:
            fit = _bead_fit(_bead_crop(stack, row, col, side_px))
            if fit is None:
                rejected["not a single bead"] = rejected.get("not a single bead", 0) + 1
                continue
            found.append((i, row, col, *fit))
    if len(found) < min_beads:
        raise CalibrationError(
            f"found {len(found)} usable bead(s) (need {min_beads}); left out: "
            + (", ".join(f"{n} {r}" for r, n in rejected.items() if n) or "none")
            + ". Image sparser or more fields, keep the beads off the frame's edges and below "
            "saturation"
        )
    # Undo the depth split too when the scan steps as the bank does and reaches past the bank's
    # range around a bead (Z_PAD frames more each side, where the circular transform's wrap
    # lands): with enough such beads, those alone; otherwise read each defocus between frames.
    reach = (n_depths - 1 + Z_PAD + 1) * step_um
    reaching = [
        b for b in found if focus[0] + reach <= focus[0] + b[3] * f_step <= focus[-1] - reach
    ]
    method: Literal["split", "interpolated"] = "interpolated"
    if abs(f_step - step_um) <= 1e-3 * step_um and len(reaching) >= min_beads:
        method = "split"
        if len(reaching) < len(found):
            rejected["scan short of the depth split around it"] = len(found) - len(reaching)
        found = reaching
        bank, measured = _split_bank(stacks, found, n_depths, side_px, lateral)
    else:
        bank, measured = _interpolated_bank(stacks, found, focus, defocus, side_px, lateral)
    bead_focus = [float(focus[0] + b[3] * f_step) for b in found]
    if not measured.all():
        missing = defocus[~measured]
        if reference is None:
            raise CalibrationError(
                f"the stacks reach defocus {_span(defocus[measured])} µm around the beads' "
                f"focus; the bank needs ±{defocus[-1]:g} µm: scan {missing.min():g} … "
                f"{missing.max():g} µm too, or give a reference bank (--model) to take them from"
            )
        bank[~measured] = reference[~measured]
    sums = bank.sum(axis=(1, 2), keepdims=True)
    if not np.all(sums > 0):  # NaN too
        raise CalibrationError("a measured plane holds no light; image brighter beads")
    out = (bank / sums).astype(np.float32)
    return PsfMeasurement(out, defocus, measured, len(found), method, rejected, bead_focus, lateral)


def _split_bank(
    stacks: Sequence[np.ndarray],
    found: Sequence[tuple[int, int, int, float, float, float, float]],
    n_depths: int,
    side_px: int,
    lateral: Lateral = "linear",
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 where the scan steps as the bank: least squares in 3-D, every plane measured.

    A volume model's density holds a point between two depth slices with linear weights, as
    laterally between pixels; so each bead's frames, indexed by the bank's defocus from the
    slice just above its focus, are the bank convolved with a 2-tap split along depth and the
    bilinear split laterally (`_splat_transfer`). Summed over beads and divided per frequency,
    as in 2-D: beads at different fractions of a step fill in each other's nulls.
    """
    planes = 2 * n_depths - 1
    length = planes + 2 * Z_PAD
    num = np.zeros((length, side_px, side_px), dtype=np.complex128)
    den = np.zeros((length, side_px, side_px), dtype=np.float64)
    total = 0.0
    kz = np.fft.fftfreq(length)[:, None, None]
    for i, row, col, focus_index, dy, dx, brightness in found:
        crop = _bead_crop(stacks[i], row, col, side_px)
        j0 = int(np.floor(focus_index))
        t = focus_index - j0
        # padded plane p holds defocus (p - Z_PAD - (n_depths - 1)) steps from frame j0
        frames = j0 + np.arange(length) - Z_PAD - (n_depths - 1)
        hz = (1 - t) + t * np.exp(-2j * np.pi * kz)
        h = hz * _splat_transfer(dy, dx, side_px, lateral)[None]
        num += np.conj(h) * np.fft.fftn(crop[frames])
        den += brightness * np.abs(h) ** 2
        total += brightness
    spectrum = num / (den + SPLIT_FLOOR * total)
    volume = np.fft.ifftn(spectrum).real[Z_PAD : Z_PAD + planes]
    bank = np.stack([_clean(plane) for plane in volume])
    return bank, np.ones(planes, dtype=bool)


def _interpolated_bank(
    stacks: Sequence[np.ndarray],
    found: Sequence[tuple[int, int, int, float, float, float, float]],
    focus: np.ndarray,
    defocus: np.ndarray,
    side_px: int,
    lateral: Lateral = "linear",
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 for any other scan: each defocus read between frames, least squares in 2-D.

    Each bead's planes are read (linearly between frames) at its best focus plus each defocus
    of the bank; laterally the bilinear split is undone as in `_split_bank`. Defocus a bead's
    scan does not reach gets nothing from it; a defocus no bead reaches is left unmeasured.
    """
    planes = defocus.size
    num = np.zeros((planes, side_px, side_px), dtype=np.complex128)
    den = np.zeros((planes, side_px, side_px), dtype=np.float64)
    weight = np.zeros(planes, dtype=np.float64)
    f_step = float(focus[1] - focus[0])
    for i, row, col, focus_index, dy, dx, brightness in found:
        crop = _bead_crop(stacks[i], row, col, side_px)
        pos = focus_index + defocus / f_step  # fractional frame of each defocus
        inside = (pos >= 0) & (pos <= focus.size - 1)
        i0 = np.minimum(np.floor(pos[inside]).astype(np.int64), focus.size - 2)
        frac = (pos[inside] - i0)[:, None, None]
        resampled = crop[i0] * (1 - frac) + crop[i0 + 1] * frac
        h = _splat_transfer(dy, dx, side_px, lateral)
        num[inside] += np.conj(h)[None] * np.fft.fft2(resampled)
        den[inside] += brightness * (np.abs(h) ** 2)[None]
        weight[inside] += brightness
    measured = weight > 0
    bank = np.zeros((planes, side_px, side_px), dtype=np.float64)
    for k in np.nonzero(measured)[0]:
        bank[k] = _clean(np.fft.ifft2(num[k] / (den[k] + SPLIT_FLOOR * weight[k])).real)
    return bank, measured


def slide_bank(
    optics: IndependentOptics,
    *,
    n_depths: int,
    step_um: float,
    side_px: int = 127,
    fields: int = 6,
    first_seed: int = 0,
    lateral: Lateral = "linear",
) -> PsfMeasurement:
    """Measure a bank from a simulated bead slide of a held-out set's `optics`.

    `fields` fields of `engine.heldout.bead_slide` (about 3 beads each), measured as a lab's
    stacks are: only the slide's frames reach `measure_psf_bank`, not the optics' PSF.
    `lateral`: `measure_psf_bank`'s.
    """
    from engine import heldout as ho

    slides = [ho.bead_slide(first_seed + i, optics=optics) for i in range(fields)]
    return measure_psf_bank(
        [s.stack for s in slides],
        slides[0].focus_um,
        n_depths=n_depths,
        step_um=step_um,
        side_px=side_px,
        lateral=lateral,
    )


def slide_bank_for(
    model: Path,
    metadata: ModelMetadata,
    optics: IndependentOptics,
    *,
    fields: int = 6,
    lateral: Lateral = "linear",
) -> PsfMeasurement:
    """`slide_bank` shaped as volume `model`'s own bank: its depth grid and its bank's side.

    What `engine.fidelity --measured-psf` and `engine.probes --measured-psf` serve a model
    through on a held-out set (`optics`), so both measure it alike.
    """
    from engine.volume import model_psf_bank

    if metadata.volume is None:
        raise CalibrationError(f"{model}: a per-plane model has no PSF bank to measure")
    depth = np.asarray(metadata.volume.depth_um, dtype=np.float64)
    own = model_psf_bank(model, metadata.volume)
    return slide_bank(
        optics,
        n_depths=depth.size,
        step_um=float(depth[1] - depth[0]),
        side_px=int(own.shape[-1]),
        fields=fields,
        lateral=lateral,
    )


def _figure(measurement: PsfMeasurement, reference: np.ndarray | None, path: Path) -> None:
    """XZ sections and in-focus planes of the measured bank beside the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    banks = [("measured", measurement.bank)]
    if reference is not None:
        banks.append(("model's own", reference))
    fig, axes = plt.subplots(len(banks), 2, figsize=(9, 3.2 * len(banks)), squeeze=False)
    c = measurement.bank.shape[-1] // 2
    d = measurement.defocus_um
    for (label, bank), row in zip(banks, axes, strict=True):
        xz = bank[:, c, :] / np.maximum(bank[:, c, :].max(axis=1, keepdims=True), 1e-12)
        row[0].imshow(xz.T, aspect="auto", cmap="magma", extent=(d[0], d[-1], -c, c))
        row[0].set(
            xlabel="defocus (µm)", ylabel="x (px)", title=f"{label}: XZ, each defocus to its peak"
        )
        row[1].imshow(bank[(bank.shape[0] - 1) // 2, c - 8 : c + 9, c - 8 : c + 9], cmap="magma")
        row[1].set(title=f"{label}: in focus, peak {bank[(bank.shape[0] - 1) // 2].max():.3f}")
        row[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SUMMARY_KEYS = (
    "model",
    "source",
    "beads",
    "planes",
    "side_px",
    "filled_from_reference",
    "in_focus_fwhm_um",
)
"""Keys every summary JSON `main` has written holds (`PsfMeasurement.summary` and its own):
how an earlier calibration's summary is told from any other JSON at the same name."""


def is_calibration_summary(path: Path) -> bool:
    """Say whether `path` holds a summary JSON this module wrote (`SUMMARY_KEYS`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in SUMMARY_KEYS)


def _out_problem(out: Path, model: Path, bank: Path, stacks: Sequence[Path]) -> str | None:
    """Say why the command may not replace `out` and its .json (None: it may).

    The companions are named after `out`, beside it: with `out` beside the model
    (``deepz-volume.npy`` by ``deepz-volume.onnx``) the .json is the model's metadata, and
    overwriting it left a model that no longer loads. So an existing .json is replaced only
    when it is an earlier calibration's summary, and an existing bank or .png only beside
    such a summary (they are that calibration's); `out` is neither the model's own bank nor
    one of the stacks measured.
    """
    companion = out.with_suffix(".json")
    if companion.resolve() == model.with_suffix(".json").resolve():
        return f"{out} would write its summary over {companion}, the metadata of {model}"
    earlier = companion.exists() and is_calibration_summary(companion)
    if companion.exists() and not earlier:
        return (
            f"{out} would write its summary over {companion}, which is no earlier "
            "calibration's summary: name another --out"
        )
    if out.resolve() == bank.resolve():
        return f"{out} is the model's own PSF bank: name another --out"
    if any(out.resolve() == p.resolve() for p in stacks):
        return f"{out} is one of the stacks measured: name another --out"
    for mine in (out, out.with_suffix(".png")):
        if mine.exists() and not earlier:
            return (
                f"{out} would write over {mine}, which is no earlier calibration's "
                "(no summary of one beside it): name another --out"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Measure a bank from stacks (or a simulated slide), write it, its JSON and a picture."""
    parser = argparse.ArgumentParser(prog="python -m engine.psf_calibration", description=__doc__)
    parser.add_argument("stacks", nargs="*", type=Path, help="focus-scanned bead stacks")
    parser.add_argument(
        "--step-um",
        type=float,
        help="focus step of the stacks (µm): positive when the first frame is the shallowest, "
        "negative when the scan ran from deep to shallow; checked against the step a file "
        "records (ImageJ spacing, OME PhysicalSizeZ, an OME-Zarr z scale)",
    )
    parser.add_argument(
        "--ignore-file-step",
        action="store_true",
        help="do not compare --step-um with the step the files record (a wrong calibration)",
    )
    parser.add_argument(
        "--start-um",
        type=float,
        default=None,
        help="focus of the first frame (µm; default: the stack centred on 0)",
    )
    parser.add_argument(
        "--slide",
        choices=("vectorial", "pupil"),
        help="measure from a simulated bead slide of a held-out set's optics instead of stacks",
    )
    parser.add_argument("--fields", type=int, default=6, help="--slide: fields imaged")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="--slide: seed of the first field (the evaluation's banks use 0 onwards; a bank to "
        "train through is measured from other fields)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=Path("engine/weights/deepz-volume.onnx"),
        help="the volume model the bank is for (its depth grid and own bank)",
    )
    parser.add_argument(
        "--lateral",
        choices=("linear", "spline"),
        default="linear",
        help="how the bank's user holds a point between pixels: 'linear' for a model's density "
        "(default), 'spline' for a point fit that renders camera-like beads (PointFit.lateral)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/psf-measured/psf.npy"))
    args = parser.parse_args(argv)
    if bool(args.stacks) == bool(args.slide):
        parser.error("give stacks or --slide, not both and not neither")
    if args.stacks and (args.step_um is None or args.step_um == 0):
        parser.error(
            "stacks need --step-um, their focus step (µm; negative when the first frame is "
            "the deepest)"
        )
    for path in [] if args.ignore_file_step else args.stacks:  # a wrong step: every depth wrong
        problem = focus_step_problem(path, args.step_um)
        if problem is not None:
            parser.error(
                f"{path}: --step-um {args.step_um:g} but {problem}; give the file's step, or "
                "--ignore-file-step if its calibration is wrong"
            )
    if args.fields < 1:
        parser.error(f"--fields must be >= 1, not {args.fields}")
    if args.first_seed < 0:
        parser.error(f"--first-seed must be >= 0, not {args.first_seed}")
    if args.out.suffix != ".npy":
        parser.error(f"--out must name a .npy file, not {args.out}")
    out_names = [args.out.name, f"{args.out.stem}.json", f"{args.out.stem}.png"]
    problem = out_dir_problem(args.out.parent, out_names)  # before the work: it was after
    if problem is not None:
        parser.error(f"--out: {problem}")
    from engine.metadata import ModelMetadata
    from engine.volume import model_psf_bank

    try:
        meta = ModelMetadata.from_file(args.model.with_suffix(".json"))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if meta.volume is None:
        print(
            f"error: {args.model} is a per-plane model; a PSF bank is for volume models",
            file=sys.stderr,
        )
        return 2
    own_bank = args.model.parent / meta.volume.psf_file
    problem = _out_problem(args.out, args.model, own_bank, args.stacks)
    if problem is not None:
        parser.error(f"--out: {problem}")
    depth = np.asarray(meta.volume.depth_um, dtype=np.float64)
    n, step = depth.size, float(depth[1] - depth[0])
    try:
        reference = model_psf_bank(args.model, meta.volume)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    side = int(reference.shape[-1])
    try:
        if args.slide:
            from engine.heldout import IndependentOptics

            result = slide_bank(
                IndependentOptics(psf_model=args.slide),
                n_depths=n,
                step_um=step,
                side_px=side,
                fields=args.fields,
                first_seed=args.first_seed,
                lateral=args.lateral,
            )
        else:
            stacks = [read_stack(p) for p in args.stacks]
            f, step_um = stacks[0].shape[0], float(args.step_um)
            start = -(f - 1) * step_um / 2 if args.start_um is None else args.start_um
            if step_um < 0:  # scanned deep to shallow: read shallowest first (review 85: the
                # bank's lateral drift came out mirrored, unsaid)
                stacks = [s[::-1] for s in stacks]
                start, step_um = start + step_um * (f - 1), -step_um
            focus = start + step_um * np.arange(f)
            result = measure_psf_bank(
                stacks,
                focus,
                n_depths=n,
                step_um=step,
                side_px=side,
                reference=reference,
                lateral=args.lateral,
            )
    except (CalibrationError, LabFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(args.out, result.bank)
    summary = {
        "model": str(args.model),
        "source": f"simulated {args.slide} slide, {args.fields} fields from seed {args.first_seed}"
        if args.slide
        else [str(p) for p in args.stacks],
        **result.summary(meta.pixel_size_um, reference),
    }
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    _figure(result, reference, args.out.with_suffix(".png"))
    left_out = ", ".join(f"{v} {k}" for k, v in result.rejected.items() if v)
    print(
        f"{result.beads} beads averaged ({left_out or 'none left out'}; depth split "
        f"{'undone' if result.method == 'split' else 'not undone: read between frames'}); "
        f"in focus FWHM {summary['in_focus_fwhm_um']:.3f} µm, peak {summary['in_focus_peak']:.4f} "
        f"(the model's own {summary['reference_in_focus_fwhm_um']:.3f} µm, "
        f"{summary['reference_in_focus_peak']:.4f}); "
        f"{summary['filled_from_reference']} planes from the model's own bank"
    )
    print(
        f"wrote {args.out} (+ .json, .png); serve it with load_backend(model, psf_bank=...) "
        "or [engine] psf_bank in the scope config"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
