"""engine.probes on small frames with the shipped volume model (a few seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

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
    bins = record["column_mass"]
    assert [(b["from_um"], b["to_um"]) for b in bins] == list(
        zip(probes.DISTANCE_BINS_UM, probes.DISTANCE_BINS_UM[1:], strict=False)
    )
    assert bins[0]["column_mass_vs_in_focus"] == 1.0  # the reference bin
    for b in bins:
        if b["beads"]:
            assert b["column_mass_vs_in_focus"] >= 0 and 0 <= b["share_within_1um_of_depth"] <= 1
