"""Settings of the simulated microscope: objective optics, camera, and the worm it images.

Defaults follow the Deep-Z C. elegans setup (Wu et al. 2019): a 20x/0.75 NA air objective,
GFP emission, about 0.3 µm pixels at the sample, imaged on an sCMOS camera.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SampleKind = Literal["worm", "beads", "mixed", "nuclei", "surface"]
"""What a simulated sample holds: a worm's head ("worm"), beads spread over ±10 µm ("beads"),
both ("mixed"), isolated nuclei of 1-4 µm spread over ±10 µm, no body ("nuclei"), or beads on
one tilted, curved surface, as on a coverslip the stage does not hold level ("surface")."""


class OpticsConfig(BaseModel):
    """Objective, wavelength and refractive indices of the simulated wide-field microscope.

    Frozen (hashable), so PSFs computed from it can be cached.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    na: float = Field(0.75, gt=0.0, le=1.5, description="Numerical aperture of the objective.")
    wavelength_um: float = Field(
        0.52, gt=0.2, le=2.0, description="Emission wavelength (µm); 0.52 = GFP/GCaMP."
    )
    immersion_index: float = Field(
        1.0, ge=1.0, le=2.0, description="Refractive index of the immersion medium (1.0 = air)."
    )
    sample_index: float = Field(
        1.33, ge=1.0, le=2.0, description="Refractive index of the sample (1.33 = water)."
    )
    pixel_size_um: float = Field(
        0.3, gt=0.0, le=10.0, description="Camera pixel size projected to the sample (µm)."
    )
    magnification: float = Field(
        20.0, gt=0.0, le=200.0, description="Objective magnification (informational)."
    )
    particle_depth_um: float = Field(
        5.0,
        ge=0.0,
        le=200.0,
        description="Depth below the coverslip used for the index-mismatch aberration (µm).",
    )
    depth_dependent_aberration: bool = Field(
        False,
        description="Image each source with the index-mismatch aberration of its own depth, "
        "particle_depth_um + z (clipped at the coverslip), as a real thick sample does, "
        "instead of particle_depth_um's for every source; particle_depth_um is then the depth "
        "of z = 0 below the coverslip, and a bead deeper in the sample shows more of the "
        "asymmetry that tells it from its mirror across focus. Image formation only: "
        "`make_psf` (and a volume model's PSF bank) stays particle_depth_um's.",
    )

    psf_model: Literal["scalar", "vectorial", "measured"] = Field(
        "scalar",
        description="The PSF the frames are imaged with: psfmodels' 'scalar' (Gibson-Lanni) "
        "or 'vectorial' (Aguet et al. 2009), or 'measured': the bank in `psf_bank`, measured "
        "from a microscope's bead slide (`engine.psf_calibration`). A volume model's PSF bank "
        "is made from these optics as written in its training config (scalar unless set there).",
    )
    psf_bank: str | None = Field(
        None,
        description="With psf_model 'measured': a measured PSF bank (.npy, (2D-1, S, S), plane "
        "i at defocus (i - D + 1)·psf_bank_step_um, each plane summing to 1), as "
        "`python -m engine.psf_calibration` writes it. Defocus beyond its planes falls back to "
        "the scalar model of these optics. Image formation keeps the planes' transforms per "
        "optics, that is per path: a bank rewritten in place reaches a running process's "
        "frames only after a restart.",
    )
    psf_bank_step_um: float = Field(
        0.5, gt=0.0, le=10.0, description="Defocus step between the planes of psf_bank (µm)."
    )

    @model_validator(mode="after")
    def _check_bank(self) -> OpticsConfig:
        if (self.psf_model == "measured") != (self.psf_bank is not None):
            raise ValueError("optics.psf_bank is needed with psf_model 'measured', and only then")
        if self.psf_model == "measured" and self.depth_dependent_aberration:
            raise ValueError(
                "optics: a measured PSF bank is one PSF for every depth; it cannot be combined "
                "with depth_dependent_aberration"
            )
        return self

    def at_depth(self, z_um: float) -> OpticsConfig:
        """Return the optics a source at depth `z_um` sees (µm, + deeper, from z = 0).

        With `depth_dependent_aberration`, those of particle depth ``particle_depth_um + z``
        (clipped at the coverslip, 0) for that source alone; otherwise these optics.
        """
        if not self.depth_dependent_aberration:
            return self
        depth = max(round(self.particle_depth_um + float(z_um), 6), 0.0)
        return self.model_copy(
            update={"particle_depth_um": depth, "depth_dependent_aberration": False}
        )


class CameraConfig(BaseModel):
    """sCMOS camera model: quantum efficiency, gain, offset, read noise and signal levels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offset_counts: float = Field(100.0, ge=0.0, le=10000.0, description="Dark offset (counts).")
    gain_counts_per_e: float = Field(
        2.0, gt=0.0, le=100.0, description="Conversion gain (counts per photo-electron)."
    )
    read_noise_e: float = Field(
        1.5, ge=0.0, le=100.0, description="RMS read noise per pixel (electrons)."
    )
    quantum_efficiency: float = Field(
        0.7, gt=0.0, le=1.0, description="Fraction of photons converted to electrons."
    )
    peak_photons: float = Field(
        1000.0,
        gt=0.0,
        le=1e6,
        description="Photons per pixel at the centre of a bright in-focus neuron.",
    )
    background_photons: float = Field(
        30.0, ge=0.0, le=1e6, description="Uniform diffuse background (photons per pixel)."
    )


class WormConfig(BaseModel):
    """How the simulator draws a worm's head (samples "worm" and "mixed").

    The defaults are the simulator's original worm, sample for sample: a body 22-28 µm thick
    with its axis at the sample's mid-plane, 100-200 nuclei of 2-3 µm. Issue 9 asks training
    data to span nuclei of 1-4 µm; the independent hold-out's "ganglion" samples (session 25:
    smaller nuclei, a body off the mid-plane) showed the original worm's narrow range misplaces
    small nuclei far from focus.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nucleus_diameter_um: tuple[float, float] | None = Field(
        None,
        description="Range of the nuclei's diameters (µm), drawn uniformly, each nucleus an "
        "ellipsoid within ±10 % of it, centres at least the two drawn radii + 0.3 µm apart. "
        "None: the original 2-3 µm ellipsoids at least 2.8 µm apart centre to centre.",
    )
    axis_depth_um: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="The body's axis lies at a depth drawn uniformly within ±this (µm) of the "
        "sample's mid-plane (0: on it, as originally).",
    )

    body_texture_sd: float = Field(
        0.0,
        ge=0.0,
        le=1.5,
        description="The body's autofluorescence is modulated by a smooth random log-normal "
        "field whose relative SD each worm draws uniformly within [0, this] (0: a uniform "
        "tube, as originally). Real bodies are not uniform (gut granules, pharynx, "
        "cuticle); the independent hold-out's ganglion body is a string of spheres of "
        "different brightness (session 28), which a model trained on uniform tubes reads as "
        "a uniform tube.",
    )
    body_texture_um: tuple[float, float] = Field(
        (2.0, 6.0),
        description="Range of the texture's Gaussian smoothing scale (µm), drawn uniformly "
        "per worm: the size of the body's brighter and dimmer patches.",
    )

    body_brightness: tuple[float, float] = Field(
        (1.0, 1.0),
        description="Range of a factor on the body's autofluorescence, drawn log-uniformly per "
        "worm ((1, 1): none drawn, as originally). The hold-out's ganglion body is about 1.7 "
        "times brighter against its frame than the simulator's (session 28); real bodies "
        "vary with the strain, the gut's granules and the exposure.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> WormConfig:
        d = self.nucleus_diameter_um
        if d is not None and not 0.5 <= d[0] <= d[1] <= 6.0:
            raise ValueError(f"nucleus_diameter_um must be 0.5 <= low <= high <= 6, got {d}")
        b = self.body_brightness
        if not 0.05 <= b[0] <= b[1] <= 20.0:
            raise ValueError(f"body_brightness must be 0.05 <= low <= high <= 20, got {b}")
        t = self.body_texture_um
        if not 0.5 <= t[0] <= t[1] <= 20.0:
            raise ValueError(f"body_texture_um must be 0.5 <= low <= high <= 20, got {t}")
        return self
