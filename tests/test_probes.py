"""engine.probes on small frames with the shipped volume model (a few seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine import heldout as ho
from engine import probes
from engine.runtime import DEFAULT_MODEL, load_backend
from engine.volume import load_psf_bank

VOLUME = DEFAULT_MODEL.parent / "deepz-volume.onnx"


def test_bead_spread_and_focus_response_on_small_frames(tmp_path: Path) -> None:
    backend = load_backend(VOLUME, prefer=["onnxruntime"], intra_op_threads=1)
    volume = backend.metadata.volume
    assert volume is not None
    psf = load_psf_bank(VOLUME.parent / volume.psf_file, len(volume.depth_um))
    samples = [ho.independent_sample("beads", seed, (128, 128)) for seed in range(2)]
    spread = probes.bead_spread(
        np.asarray(volume.depth_um), psf, samples, probes.densities(backend, samples)
    )
    # The model's PSF is sharpest in focus: what makes depth spread widen a rendered bead.
    assert spread["psf_fwhm_um_at_1um"] > 1.5 * spread["psf_fwhm_um_in_focus"] > 0
    assert spread["beads_found"] >= 1
    assert 0 <= spread["depth_sd_um_median"] < 10
    assert math.isfinite(spread["density_fwhm_um_median"])
    response = probes.focus_response(backend, side=96)
    assert [r["shift_um"] for r in response["rows"]] == list(probes.SHIFTS_UM)
    assert response["nuclei"] >= 1
    assert all(np.isfinite(r["centroid_shift_um"]) for r in response["rows"])
    assert all(0 <= r["nuclei_within_1um_of_shift"] <= 1 for r in response["rows"])


def test_cli_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert probes.main(["--model", str(VOLUME), "--samples", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["bead_spread"]["beads_found"] >= 1 and len(record["focus_response"]["rows"]) == 4
    truth = record["bead_spread_truth"]  # the true points: narrower than the model's PSF
    assert 0 < truth["density_fwhm_um_median"] < truth["psf_fwhm_um_in_focus"]
    assert record["fwhm_ceiling"]["subvoxel"]["beads"] >= 1
    bins = record["column_mass"]
    assert [(b["from_um"], b["to_um"]) for b in bins] == list(
        zip(ho.DISTANCE_BINS_UM, ho.DISTANCE_BINS_UM[1:], strict=False)
    )
    assert bins[0]["column_mass_vs_in_focus"] == 1.0  # the reference bin
    for readout in ("tilted_in_focus", "fwhm_within_15pct"):
        assert set(record["placement_bound"][readout]) == {*probes.PLACEMENT_ERRORS, "cramer_rao"}
    for b in bins:
        if b["beads"]:
            assert b["column_mass_vs_in_focus"] >= 0 and 0 <= b["share_within_1um_of_depth"] <= 1


def test_the_true_density_rendered_by_the_model_meets_the_fwhm_target() -> None:
    """The rendering is not what holds bead FWHM back: points placed tri-linearly (as the
    training targets are) and rendered through the shipped model's PSF bank match the held-out
    truth's width; snapping them to the nearest voxel does not (beads are about a pixel wide)."""
    backend = load_backend(VOLUME, prefer=["onnxruntime"], intra_op_threads=1)
    volume = backend.metadata.volume
    assert volume is not None
    depth = np.asarray(volume.depth_um)
    psf = load_psf_bank(VOLUME.parent / volume.psf_file, len(depth))
    samples = [ho.independent_sample("beads", seed, (128, 128)) for seed in range(2)]
    s = samples[0]
    density = ho.point_density(s, depth)
    o, px = s.objects, s.pixel_size_um
    # beads well inside the frame and the depth grid keep all their brightness
    inside = (o.kind == "bead") & (np.abs(o.z_um) <= 9.5)
    inside &= (o.x_um >= px) & (o.x_um < (s.frame.shape[1] - 2) * px)
    inside &= (o.y_um >= px) & (o.y_um < (s.frame.shape[0] - 2) * px)
    assert inside.sum() >= 3
    assert density.sum() >= 0.999 * o.intensity[inside].sum()
    ceiling = probes.fwhm_ceiling(depth, psf, samples)
    assert ceiling["subvoxel"]["beads"] >= 5
    assert ceiling["subvoxel"]["within_15pct"] >= 0.9
    assert abs(ceiling["subvoxel"]["ratio_median"] - 1) < 0.1
    assert ceiling["nearest_voxel"]["within_15pct"] < ceiling["subvoxel"]["within_15pct"]


def test_the_tilted_split_scores_the_true_points_in_focus_and_a_bit_bright() -> None:
    """On a tilted bead plane the truth's own points, rendered by the model's renderer, are in
    focus for most beads, and their peaks sit above the held-out truth's: the model's scalar
    PSF is sharper in focus than the held-out vectorial one, which leaves little headroom for
    a density sharper than the truth. The model's misses split into dim and bright."""
    backend = load_backend(VOLUME, prefer=["onnxruntime"], intra_op_threads=1)
    volume = backend.metadata.volume
    assert volume is not None
    psf = load_psf_bank(VOLUME.parent / volume.psf_file, len(volume.depth_um))
    split = probes.tilted_split(backend, psf, [ho.independent_sample("tilted", 0, (128, 128))])
    truth, model = split["truth_points"], split["model"]
    assert truth["beads"] == model["beads"] >= 5
    assert truth["in_focus"] >= 0.7 and 1.0 < truth["ratio_median"] < 1.3
    for v in (truth, model):
        assert v["in_focus"] + v["too_dim"] + v["too_bright"] == pytest.approx(1.0)


def test_the_placement_bound_says_how_precisely_a_bead_must_be_placed() -> None:
    """The tilted read-out follows a bead's sub-pixel position (its in-focus image spans about a
    pixel): the true beads placed exactly score as the ceilings do, moved 0.3 px they lose a
    clear share, 0.3 µm in depth far less; the FWHM read-out follows it less. The Cramér-Rao
    bound's lateral SD grows with the distance from focus (a defocused ring places its bead
    less well); its draws score the tilted plane between exact and 0.3 px, and leave some
    beads' widths out of the band."""
    backend = load_backend(VOLUME, prefer=["onnxruntime"], intra_op_threads=1)
    volume = backend.metadata.volume
    assert volume is not None
    depth = np.asarray(volume.depth_um)
    psf = load_psf_bank(VOLUME.parent / volume.psf_file, len(depth))
    samples = [
        ho.independent_sample("tilted", 0, (192, 192)),
        ho.independent_sample("beads", 0, (192, 192)),
    ]
    bound = probes.placement_bound(depth, psf, samples, draws=2)
    tilted, fwhm = bound["tilted_in_focus"], bound["fwhm_within_15pct"]
    assert tilted["exact"] >= 0.7 and fwhm["exact"] >= 0.9
    assert tilted["lateral 0.3 px"] <= tilted["exact"] - 0.2
    assert tilted["depth 0.3 µm"] >= tilted["lateral 0.3 px"]
    assert tilted["lateral 0.3 px"] <= tilted["cramer_rao"] <= tilted["exact"]
    # a bead's width is surer than its peak, but a far bead's depth is not: widths drawn at the
    # bound miss where the beads lie far from focus
    assert fwhm["lateral 0.3 px"] > tilted["lateral 0.3 px"]
    assert fwhm["cramer_rao"] < fwhm["exact"]
    rows = [r for r in bound["cramer_rao_by_distance"] if r["beads"]]
    assert len(rows) >= 2 and sum(r["beads"] for r in rows) >= 8
    assert rows[0]["lateral_sd_px_median"] < rows[-1]["lateral_sd_px_median"]


def test_cli_probes_the_pupil_set_through_a_measured_bank(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    argv = ["--model", str(VOLUME), "--samples", "1", "--pupil", "--measured-psf"]
    assert probes.main([*argv, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["samples_psf_model"] == "pupil" and record["psf_bank"] == "measured"
    bank = np.load(tmp_path / "p-psf.npy")  # the bank it measured and rendered through
    assert bank.shape == (81, 127, 127)
    # the true beads as points, through the measured bank: in focus on the tilted plane (through
    # the model's own bank every one is too bright: tests/test_psf_calibration.py)
    assert record["tilted_split"]["truth_points"]["in_focus"] > 0.9


def test_camera_like_beads_need_points_held_on_the_spline_kernel() -> None:
    """Beads imaged as a camera images them (`IndependentOptics(point_render="subpixel")`):
    the true beads as points split between four pixels, rendered through the set's own pixel
    PSF, leave many of a tilted plane's beads too dim (a bead at a pixel corner peaks 25 % low
    in focus); held on the spline kernel they are in focus (session 35)."""
    backend = load_backend(VOLUME, prefer=["onnxruntime"], intra_op_threads=1)
    optics = ho.IndependentOptics(point_render="subpixel")
    bank = np.asarray(optics.psf(np.arange(-40, 41) * 0.5, 0.0, 127), dtype=np.float32)
    samples = [ho.independent_sample("tilted", 0, (128, 128), optics=optics)]
    split = probes.tilted_split(backend, bank, samples)
    linear, spline = split["truth_points"], split["truth_points_spline"]
    assert spline["beads"] == linear["beads"] >= 5
    assert spline["in_focus"] >= 0.8
    assert spline["in_focus"] >= linear["in_focus"] + 0.2
    assert linear["too_dim"] > linear["too_bright"]  # the split's misses are dim beads


def test_flags_the_camera_ceiling_would_ignore_are_refused_and_spline_points_are_subvoxel() -> None:
    with pytest.raises(SystemExit) as exit_info:
        probes.main(["--camera-ceiling", "--subpixel-points"])
    assert exit_info.value.code == 2
    sample = ho.independent_sample("beads", 0, (64, 64))
    with pytest.raises(ValueError, match="subvoxel only"):
        ho.point_density(sample, ho.truth_dz_um(), subvoxel=False, lateral="spline")
