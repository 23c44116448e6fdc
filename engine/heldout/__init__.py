"""Independent held-out evaluation set and object-level read-outs for Deep-Z refocusing.

A Deep-Z model is easy to overrate on data made by the simulator it was trained on: it can
learn the simulator's quirks rather than the optics. This package makes held-out data another
way, with the same nominal microscope (20x/0.75 NA air objective, watery sample n = 1.33,
0.52 µm emission, 0.3 µm pixels), and judges a refocusing method by what it does to objects
(bead depth, bead width, a tilted bead plane) rather than by pixel scores alone.

How the set differs from the training simulator (`engine.optics`):

* **PSF model.** psfmodels' *vectorial* model (Aguet et al. 2009) instead of the scalar
  Gibson-Lanni model, with its own best-focus search (a coarse scan of the on-axis intensity
  refined by Brent's method, instead of a fixed 0.1 / 0.01 µm grid search). With
  ``IndependentOptics(psf_model="pupil")`` the same kinds and camera are imaged through a
  third model, a scalar pupil-function PSF computed here by FFT with the objective's own
  astigmatism, coma and spherical aberration (`engine.fidelity --pupil`, on seeds of its
  own): still independent for a model trained on psfmodels' vectorial PSF as well as the
  scalar one.
* **Depth-dependent aberration.** A source at depth z (µm, + deeper, relative to the frame's
  focal plane) sees the index-mismatch aberration of particle depth
  ``pz = base_depth_um + z`` (base 12 µm, so 2-22 µm over ±10 µm, quantised to 1 µm; the
  PSF changes by about 1.8 % per µm of pz, so the quantisation costs < 1 %), and defocus is
  counted from *its own* best focus. The training simulator gives all sources of a sample one
  depth, drawn per sample by the volume recipes from 2, 5, 10 or 15 µm
  (`data.particle_depths_um`), so the set's 12 µm focal depth lies inside the trained range;
  what differs is the aberration changing with each source's own depth. Defocus follows
  `engine.optics`: PSF index ``d = z_focus - z_object`` (positive when the focal plane is
  deeper than the point), 0 = brightest on-axis peak, every plane normalised to unit sum.
* **Image formation.** Objects are rendered one by one: a point is split between the two
  0.5 µm depth-lattice slices around it and placed with bilinear weights in real space; a
  filled sphere is voxelised exactly (the chord of the sphere through each 0.5 µm slab,
  averaged over 4x4 sub-pixels) and convolved with each slice's depth-specific PSF on its own
  small FFT canvas. No grid-wide z-convolution, no shared PSF transform cache.
* **Samples.** "spheres": 10-40 filled spheres of 1-5 µm diameter, brightness over a 10x
  range; "beads": 20-80 sub-resolution points per 256² frame at uniform depth in ±10 µm,
  brightness over 5x (log-uniform); "tilted": beads on a tilted plane with 6-14 µm of depth
  excursion across the frame; "ganglion": a worm's head lying in the frame, a dim body
  autofluorescence (a tube 14-20 µm thick, in any direction, its axis tilted in depth) with
  40-90 spherical nuclei of 1.5-4 µm clustered in 2-4 ganglia along it (the crowded neurons of
  live C. elegans imaging). The training set has worms with 2-3 µm ellipsoidal nuclei spread
  evenly through a tube 22-28 µm thick along x at z = 0, 30-60 beads with 3x brightness
  spread, and no tilted layers; but since recipe 44 it also has a "nuclei" kind (10-40
  spheres of 1-4 µm, uniform depth in ±10 µm, 0.3 µm apart) drawn after these "spheres" were
  looked at, with nearly their statistics (review 83). The isolated-nuclei figures of models
  trained on it (recipes 44, 47 and later) are therefore in-distribution for the sample
  statistics: only the PSF, the camera and the image formation differ there. Likewise a
  model trained with the "surface" kind (recipe 55 on: beads on one tilted, curved layer, 40-120
  a frame, 2-16 µm of tilt and ±3 µm of sag) has met beads on one layer, so its "tilted"
  figures share that statistic (a flat plane here, brightness over 5x, other PSFs and camera).
  "ganglion" (crowded nuclei in a body) keeps statistics no training kind copies.
* **Camera and background.** Poisson shot noise plus Gaussian read noise (2.0 e⁻) at gain
  0.8 counts/e⁻ and offset 400 counts, a per-pixel offset pattern, and a weak smooth
  non-uniform background (8-16 e⁻ with a gradient and a broad blob), unlike the training
  camera (gain 2, offset 100, read noise 1.5 e⁻, QE 0.7, uniform background of 30 photons).

Coordinates follow `engine.optics`: x along columns and y along rows (µm) from the centre of
the top-left pixel, z along the optical axis (+ deeper). Each sample holds one camera frame at
focus 0 and the noise-free wide-field planes at focus -10 ... +10 µm (0.5 µm steps), the
"truth" a refocused plane is compared with. With `IndependentOptics(pinhole_au=...)` the same
objects are imaged confocally instead (vectorial excitation × detection through a finite
pinhole): the cross-modality truth, made unlike the simulator's scalar point-pinhole one.

The read-outs take a refocusing *function*, not a model (`PlanesFn`, `SurfaceFn`), so a
network, the unrefocused input (`input_planes_fn`) or the noise-free truth itself
(`truth_planes_fn`, a check that the read-outs are right) go through the same code. The
classical matched-filter depth read-out (`matched_filter_depth`) is the bar a network has to
clear. numpy / scipy / psfmodels only (the training simulator's PSF is imported lazily, for
the matched filter's default PSF bank).

Where each part lives:

- `engine.heldout.optics`: the held-out microscope (`IndependentOptics`), its PSFs at each
  defocus and source depth (vectorial, pupil-function, confocal), the truth planes' focus grid.
- `engine.heldout.samples`: what a sample holds (`HeldoutObjects`, `TiltedPlane`), the camera
  (`HeldoutCamera`), and how objects are drawn for each kind.
- `engine.heldout.imaging`: rendering each object through its depth's PSF, and the samples and
  bead slides made so (`independent_sample`, `bead_slide`, `point_images`).
- `engine.heldout.cache`: samples kept on disk once imaged (`cached_sample`), keyed by
  everything they are made from, code included.
- `engine.heldout.refocusers`: the refocusing functions the read-outs take (`PlanesFn`,
  `SurfaceFn`): the input, its background, a backend, the truth.
- `engine.heldout.readouts`: object-level read-outs (bead depth and width, the tilted plane,
  nuclei depth, invented spots, pixel scores) and their binning by distance from focus and SNR.
- `engine.heldout.matched_filter`: the classical depth read-out, the bar a network must clear.
- `engine.heldout.stats`: summaries, Wilson intervals and paired sign tests.
"""

from __future__ import annotations

from engine.heldout.cache import cached_sample
from engine.heldout.imaging import (
    BeadSlide,
    PsfModel,
    bead_slide,
    independent_sample,
    point_images,
    render_objects,
    sphere_image,
)
from engine.heldout.matched_filter import (
    matched_filter_bead_depths,
    matched_filter_depth,
    own_psf_bead_depths,
)
from engine.heldout.optics import (
    FOCUS_HALF_RANGE_UM,
    PSF_SIZE_PX,
    SLICE_UM,
    IndependentOptics,
    pinhole_disc,
    truth_dz_um,
)
from engine.heldout.readouts import (
    CROWDED_MIN_GAP_UM,
    DISTANCE_BINS_UM,
    FWHM_TOLERANCE,
    IN_FOCUS_TOLERANCE,
    INVENTED_MIN_SIGMA,
    SNR_BINS,
    SUPPORT_FRACTION,
    BeadDepths,
    BeadFwhm,
    InventedSpots,
    TiltedFocus,
    bead_depth_errors,
    bead_depths,
    bead_fwhm,
    bead_fwhm_ratios,
    bead_grid_positions,
    bead_sites,
    bead_snr,
    by_distance,
    by_snr,
    invented_spots,
    nucleus_depths,
    plane_metrics,
    point_density,
    scored_nuclei,
    tilted_in_focus,
    tilted_in_focus_fraction,
)
from engine.heldout.refocusers import (
    PlanesFn,
    SurfaceFn,
    background_planes_fn,
    background_surface_fn,
    input_planes_fn,
    input_surface_fn,
    refocus_fns,
    surface_from_planes,
    truth_planes_fn,
)
from engine.heldout.samples import (
    HeldoutCamera,
    HeldoutObjects,
    IndependentSample,
    SampleKind,
    TiltedPlane,
    sphere_signal_e,
)
from engine.heldout.stats import (
    RANGES_UM,
    paired_hits,
    sign_test,
    summarise,
    summarise_ratios,
    wilson_interval,
    within_range,
)

__all__ = [
    "CROWDED_MIN_GAP_UM",
    "DISTANCE_BINS_UM",
    "FOCUS_HALF_RANGE_UM",
    "FWHM_TOLERANCE",
    "INVENTED_MIN_SIGMA",
    "IN_FOCUS_TOLERANCE",
    "PSF_SIZE_PX",
    "RANGES_UM",
    "SLICE_UM",
    "SNR_BINS",
    "SUPPORT_FRACTION",
    "BeadDepths",
    "BeadFwhm",
    "BeadSlide",
    "HeldoutCamera",
    "HeldoutObjects",
    "IndependentOptics",
    "IndependentSample",
    "InventedSpots",
    "PlanesFn",
    "PsfModel",
    "SampleKind",
    "SurfaceFn",
    "TiltedFocus",
    "TiltedPlane",
    "background_planes_fn",
    "background_surface_fn",
    "bead_depth_errors",
    "bead_depths",
    "bead_fwhm",
    "bead_fwhm_ratios",
    "bead_grid_positions",
    "bead_sites",
    "bead_slide",
    "bead_snr",
    "by_distance",
    "by_snr",
    "cached_sample",
    "independent_sample",
    "input_planes_fn",
    "input_surface_fn",
    "invented_spots",
    "matched_filter_bead_depths",
    "matched_filter_depth",
    "nucleus_depths",
    "own_psf_bead_depths",
    "paired_hits",
    "pinhole_disc",
    "plane_metrics",
    "point_density",
    "point_images",
    "refocus_fns",
    "render_objects",
    "scored_nuclei",
    "sign_test",
    "sphere_image",
    "sphere_signal_e",
    "summarise",
    "summarise_ratios",
    "surface_from_planes",
    "tilted_in_focus",
    "tilted_in_focus_fraction",
    "truth_dz_um",
    "truth_planes_fn",
    "wilson_interval",
    "within_range",
]
