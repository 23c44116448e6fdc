"""A PSF bank measured from bead stacks (`engine.psf_calibration`) and served in its model's place.

The measurement is checked two ways: on stacks made by the renderer's own convention from a
known astigmatic bank (it must come back), and on the hold-out's simulated bead slide, against
the hold-out's PSF and against the tilted-plane ceiling the model's own bank cannot reach.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import heldout as H
from engine import psf_calibration as C
from engine.runtime import BackendError, load_backend
from engine.volume import load_psf_bank

MODEL = Path("engine/weights/deepz-volume.onnx")
SIDE = 31
N_DEPTHS = 9  # ±4 µm of defocus at 0.5 µm: a small bank, quick stacks
STEP = 0.5


def astigmatic_bank(n_depths: int = N_DEPTHS, side: int = SIDE) -> np.ndarray:
    """A known bank unlike a round PSF: Gaussians stretched along x before focus, y after."""
    d = (np.arange(2 * n_depths - 1) - (n_depths - 1)) * STEP
    yy, xx = np.indices((side, side)) - side // 2
    sx = 0.9 * np.sqrt(1 + ((d - 0.6) / 1.5) ** 2)
    sy = 0.9 * np.sqrt(1 + ((d + 0.6) / 1.5) ** 2)
    sx, sy = sx[:, None, None], sy[:, None, None]
    bank = np.exp(-(xx[None] ** 2) / (2 * sx**2) - yy[None] ** 2 / (2 * sy**2))
    out: np.ndarray = (bank / bank.sum(axis=(1, 2), keepdims=True)).astype(np.float32)
    return out


def stack_of_beads(
    bank: np.ndarray,
    beads: list[tuple[float, float, float]],
    frames: int,
    shape: tuple[int, int] = (200, 200),
    signal: float = 5e4,
    noise: bool = False,
) -> np.ndarray:
    """Frames at focus index 0..frames-1 of beads (row, col, frame-unit depth), by the model's
    convention: each bead split bilinearly between pixels and linearly between depth slices,
    every part imaged through the bank (a plane per step of defocus)."""
    n = (bank.shape[0] + 1) // 2
    half = bank.shape[-1] // 2
    out = np.full((frames, *shape), 100.0)
    for row, col, z in beads:
        r0, c0, z0 = int(np.floor(row)), int(np.floor(col)), int(np.floor(z))
        fy, fx, fz = row - r0, col - c0, z - z0
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    for j in range(frames):
                        k = j - (z0 + dz) + (n - 1)  # defocus = focus - slice, in steps
                        if 0 <= k < bank.shape[0]:
                            r, c = r0 + dy, c0 + dx
                            out[j, r - half : r + half + 1, c - half : c + half + 1] += (
                                signal * wz * wy * wx * bank[k]
                            )
    if noise:
        out = np.random.default_rng(0).poisson(out).astype(np.float64)
    return np.clip(np.round(out), 0, 65535).astype(np.uint16)  # a 16-bit camera saturates


BEADS = [(40.3, 45.7, 14.2), (45.6, 150.2, 13.5), (150.8, 42.4, 14.8), (155.1, 160.9, 13.9)]
"""Four beads 100+ px apart, at sub-pixel and sub-step offsets, near the middle of 32 frames."""
FRAMES = 32
"""Each bead's focus ±13 frames: the bank's ±8 steps plus the 5 that undoing the split needs."""


def test_a_known_bank_comes_back_from_its_own_beads() -> None:
    bank = astigmatic_bank()
    focus = np.arange(FRAMES) * STEP
    stack = stack_of_beads(bank, BEADS, FRAMES)
    m = C.measure_psf_bank([stack], focus, n_depths=N_DEPTHS, step_um=STEP, side_px=SIDE)
    assert m.beads == 4 and m.measured.all() and m.method == "split"
    np.testing.assert_allclose(m.bank.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    l1 = np.abs(m.bank - bank).sum(axis=(1, 2))
    assert l1.max() < 0.02, l1  # every plane, the astigmatism's turn included
    centre = N_DEPTHS - 1
    assert abs(m.bank[centre].max() / bank[centre].max() - 1) < 0.03
    # the beads' focus is read to a fraction of a step
    true_focus = sorted(b[2] * STEP for b in BEADS)
    np.testing.assert_allclose(sorted(m.bead_focus_um), true_focus, atol=0.06)


def test_a_defocused_beads_light_at_the_rim_is_not_taken_for_background() -> None:
    """Far from focus a bead's own light reaches the crop's rim (here 5.7 % of the outermost
    planes' light lies in it). A background read per plane from the rim took part of that
    light with it (these far planes came back 0.12 off in L1, session 34's optics review);
    one background per bead, read at the rim near its focus, leaves them whole."""
    d = (np.arange(2 * N_DEPTHS - 1) - (N_DEPTHS - 1)) * STEP
    yy, xx = np.indices((SIDE, SIDE)) - SIDE // 2
    sigma = (0.9 * np.sqrt(1 + (d / 0.6) ** 2))[:, None, None]  # 6 px at ±4 µm
    bank = np.exp(-(xx[None] ** 2 + yy[None] ** 2) / (2 * sigma**2))
    bank = (bank / bank.sum(axis=(1, 2), keepdims=True)).astype(np.float32)
    rim = np.maximum(np.abs(yy), np.abs(xx)) > SIDE // 2 - C.RIM_PX
    assert bank[0][rim].sum() > 0.05  # the far planes do reach the rim
    stack = stack_of_beads(bank, BEADS, FRAMES)  # on a flat background of 100 counts
    focus = np.arange(FRAMES) * STEP
    m = C.measure_psf_bank([stack], focus, n_depths=N_DEPTHS, step_um=STEP, side_px=SIDE)
    l1 = np.abs(m.bank - bank).sum(axis=(1, 2))
    assert m.beads == 4 and l1.max() < 0.04, l1


def test_a_scan_off_the_banks_step_is_read_between_frames() -> None:
    bank = astigmatic_bank()
    focus = np.arange(FRAMES) * STEP
    stack = stack_of_beads(bank, BEADS, FRAMES)
    # every other frame: a 1 µm scan for a 0.5 µm bank, read between frames
    m = C.measure_psf_bank([stack[::2]], focus[::2], n_depths=N_DEPTHS, step_um=STEP, side_px=SIDE)
    assert m.measured.all() and m.method == "interpolated"
    assert np.abs(m.bank - bank).sum(axis=(1, 2)).max() < 0.25


def test_a_short_scan_takes_the_rest_from_a_reference_or_is_refused() -> None:
    bank = astigmatic_bank()
    stack = stack_of_beads(bank, BEADS, FRAMES)[8:21]  # focus ±3 frames around the beads
    focus = np.arange(8, 21) * STEP
    with pytest.raises(C.CalibrationError, match=r"scan .* too, or give a reference bank"):
        C.measure_psf_bank([stack], focus, n_depths=N_DEPTHS, step_um=STEP, side_px=SIDE)
    reference = np.full_like(bank, 1.0 / SIDE**2)
    m = C.measure_psf_bank(
        [stack], focus, n_depths=N_DEPTHS, step_um=STEP, side_px=SIDE, reference=reference
    )
    assert 0 < m.measured.sum() < m.measured.size
    np.testing.assert_allclose(m.bank[~m.measured], reference[~m.measured])
    assert m.measured[N_DEPTHS - 1]  # focus itself is measured


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, f: ([s[:, :20, :20]], f), "smaller than"),
        (lambda s, f: ([s[:-1]], f), "one frame per focus"),
        (lambda s, f: ([s], f * f), "equal steps"),
        (lambda s, f: ([s], f[:2]), "at least 3"),
        (lambda s, f: ([], f), "no stacks"),
        (lambda s, f: ([s.astype(np.complex64)], f), "real numbers"),
        (lambda s, f: ([np.where(s > 1000, np.nan, s.astype(np.float32))], f), "NaN"),
        (lambda s, f: ([np.full_like(s, 100)], f), r"found 0 usable bead"),
        (
            lambda s, f: ([np.random.default_rng(1).poisson(100, s.shape).astype(np.uint16)], f),
            r"found 0 usable bead",
        ),
    ],
)
def test_bad_stacks_get_one_line_naming_the_problem(change, message) -> None:  # type: ignore[no-untyped-def]
    stack = stack_of_beads(astigmatic_bank(), BEADS, FRAMES)
    stacks, focus = change(stack, np.arange(FRAMES) * STEP)
    with pytest.raises(C.CalibrationError, match=message) as info:
        C.measure_psf_bank(stacks, focus, n_depths=N_DEPTHS, step_um=STEP, side_px=SIDE)
    assert "\n" not in str(info.value)


def test_a_bead_the_scan_does_not_reach_past_is_left_out_of_the_split() -> None:
    bank = astigmatic_bank()
    beads = [*BEADS[:3], (155.1, 160.9, 9.0)]  # its focus 9 frames in: 4 short of the split's 13
    m = C.measure_psf_bank(
        [stack_of_beads(bank, beads, FRAMES)],
        np.arange(FRAMES) * STEP,
        n_depths=N_DEPTHS,
        step_um=STEP,
        side_px=SIDE,
    )
    assert m.method == "split" and m.beads == 3
    assert m.rejected["scan short of the depth split around it"] == 1


def test_saturated_and_crowded_beads_are_left_out() -> None:
    bank = astigmatic_bank()
    beads = [*BEADS, (48.0, 52.0, 14.0)]  # a fifth bead 10 px from the first
    stack = stack_of_beads(bank, beads, FRAMES)
    sites, why = C.find_beads(stack, SIDE)
    assert len(sites) == 3 and why["near another bead"] == 2
    bright = stack_of_beads(bank, BEADS, FRAMES, signal=2e6)  # the in-focus peak clips at 65535
    sites, why = C.find_beads(bright, SIDE)
    assert sites == [] and why["saturated"] == 4


def test_a_12_bit_camera_a_hot_pixel_and_a_dim_neighbour_are_left_out() -> None:
    """Review 85: beads clipped at a 12-bit camera's 4095 in a uint16 stack were kept (only
    65535 counted); a hot pixel passed for a bead; a neighbour under a tenth of the brightest
    was averaged into a bead's crop."""
    bank = astigmatic_bank()
    twelve = np.minimum(stack_of_beads(bank, BEADS, FRAMES, signal=2e5), 4095).astype(np.uint16)
    sites, why = C.find_beads(twelve, SIDE)
    assert sites == [] and why["saturated"] == 4
    stack = stack_of_beads(bank, BEADS, FRAMES)
    hot = stack.copy()
    hot[:, 100, 100] += 30000  # a stuck pixel far from every bead, in every frame
    sites, why = C.find_beads(hot, SIDE)
    assert len(sites) == 4 and why["a hot pixel"] == 1
    faint = stack_of_beads(bank, [(52.0, 57.0, 14.0)], FRAMES, signal=0.08 * 5e4)  # 12 px off
    dim = (stack.astype(np.int64) + faint - 100).clip(0, 65535).astype(np.uint16)
    sites, why = C.find_beads(dim, SIDE)
    assert len(sites) == 3 and why["near another bead"] >= 1


def test_beads_imaged_as_a_camera_images_them_give_the_bank_back_in_the_spline_convention() -> None:
    """Beads whose images are the bank moved to them by cubic-spline interpolation (a camera's
    pixels off a bead's centre, `engine.optics.spline_taps`): measured with ``lateral =
    "spline"`` the bank comes back, as the split's own stacks do in the linear convention;
    undoing a split that is not there leaves a bank sharper than the beads' PSF."""
    from scipy import ndimage

    bank = astigmatic_bank()
    n, half = N_DEPTHS, SIDE // 2
    stack = np.full((FRAMES, 200, 200), 100.0)
    for row, col, z in BEADS:
        r0, c0, z0 = int(np.floor(row)), int(np.floor(col)), int(np.floor(z))
        for dz, wz in ((0, 1 - (z - z0)), (1, z - z0)):
            for j in range(FRAMES):
                k = j - (z0 + dz) + (n - 1)
                if 0 <= k < bank.shape[0]:
                    moved = ndimage.shift(bank[k], (row - r0, col - c0), order=3, mode="constant")
                    stack[j, r0 - half : r0 + half + 1, c0 - half : c0 + half + 1] += (
                        5e4 * wz * moved
                    )
    stack = np.clip(np.round(stack), 0, 65535).astype(np.uint16)
    focus = np.arange(FRAMES) * STEP
    kwargs = {"n_depths": N_DEPTHS, "step_um": STEP, "side_px": SIDE}
    spline = C.measure_psf_bank([stack], focus, lateral="spline", **kwargs)
    linear = C.measure_psf_bank([stack], focus, **kwargs)
    assert spline.lateral == "spline" and spline.summary(0.3)["lateral"] == "spline"
    l1_spline = np.abs(spline.bank - bank).sum(axis=(1, 2))
    l1_linear = np.abs(linear.bank - bank).sum(axis=(1, 2))
    assert l1_spline.max() < 0.01, l1_spline  # measured: 0.004 at most (linear: to 0.1)
    assert l1_spline.mean() < 0.5 * l1_linear.mean(), (l1_spline, l1_linear)


def test_a_slide_of_the_holdout_gives_its_psf_better_than_the_training_bank() -> None:
    """The hold-out's bead slide through the vectorial PSF: the measured bank is nearer the
    set's PSF than the model's own near focus, where a refocused bead's peak is decided."""
    optics = H.IndependentOptics()
    m = C.slide_bank(optics, n_depths=41, step_um=STEP, fields=4)
    assert m.beads >= 9 and m.measured.all()
    truth = np.asarray(optics.psf(m.defocus_um, 0.0, 127))
    own = load_psf_bank(MODEL.parent / "deepz-volume.psf.npy", 41)
    near = slice(40 - 4, 40 + 5)  # ±2 µm
    measured_l1 = np.abs(m.bank[near] - truth[near]).sum(axis=(1, 2))
    own_l1 = np.abs(own[near] - truth[near]).sum(axis=(1, 2))
    assert measured_l1.mean() < 0.7 * own_l1.mean(), (measured_l1, own_l1)
    assert abs(m.bank[40].max() / truth[40].max() - 1) < 0.1  # the in-focus peak
    assert abs(C.in_focus_fwhm_um(m.bank, 0.3) / C.in_focus_fwhm_um(truth, 0.3) - 1) < 0.06


def test_the_measured_bank_lifts_the_tilted_plane_ceiling_on_the_pupil_set() -> None:
    """The true beads as points, rendered through the model's own bank, peak ~38 % above the
    pupil set's truth: none of a tilted plane's beads in focus. Through the bank measured from
    the pupil set's slide, nearly all are (measured: 0 % -> 99-100 %)."""
    from engine import probes

    optics = H.IndependentOptics(psf_model="pupil")
    measured = C.slide_bank(optics, n_depths=41, step_um=STEP, fields=4).bank
    own = load_psf_bank(MODEL.parent / "deepz-volume.psf.npy", 41)
    backend = load_backend(MODEL, prefer=["onnxruntime"])
    samples = [H.independent_sample("tilted", s, optics=optics) for s in (201, 202)]
    with_own = probes.tilted_split(backend, own, samples)["truth_points"]
    with_measured = probes.tilted_split(backend, measured, samples)["truth_points"]
    assert with_own["too_bright"] > 0.9
    assert with_measured["in_focus"] > 0.9


def test_the_runtime_renders_through_a_measured_bank_and_refuses_a_bad_one(
    tmp_path: Path,
) -> None:
    own = load_psf_bank(MODEL.parent / "deepz-volume.psf.npy", 41)
    wider = np.stack([np.roll(p, 0) for p in own])
    wider = (wider + np.roll(wider, 1, axis=2) + np.roll(wider, -1, axis=2)) / 3  # blurred in x
    np.save(tmp_path / "wide.npy", wider.astype(np.float32))
    frame = H.independent_sample("beads", 101, (64, 64)).frame
    dpm = np.zeros((64, 64), dtype=np.float32)
    plain = load_backend(MODEL, prefer=["onnxruntime"]).infer(frame, dpm)
    served = load_backend(MODEL, prefer=["onnxruntime"], psf_bank=tmp_path / "wide.npy")
    through = served.infer(frame, dpm)
    assert through.max() < plain.max()  # the same density, a wider PSF: dimmer peaks
    np.testing.assert_allclose(through.sum(), plain.sum(), rtol=2e-3)  # the same light
    bad = {
        "shape.npy": own[:10],
        "negative.npy": own - 1e-3,
        "unnormalised.npy": own * 2,
    }
    for name, bank in bad.items():
        np.save(tmp_path / name, bank.astype(np.float32))
        with pytest.raises(BackendError, match="PSF bank") as info:
            load_backend(MODEL, prefer=["onnxruntime"], psf_bank=tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot render confocal"):
        load_backend(MODEL, psf_bank=tmp_path / "wide.npy", render_modality="confocal")
    slim = MODEL.parent / "deepz-slim.onnx"  # a per-plane model has no bank to swap
    with pytest.raises(BackendError, match="per-plane model"):
        load_backend(slim, prefer=["onnxruntime"], psf_bank=tmp_path / "wide.npy")
    with pytest.raises(BackendError, match=r"render_modality 'confocal'.*per-plane model"):
        load_backend(slim, prefer=["onnxruntime"], render_modality="confocal")  # not ignored
    plain = load_backend(slim, prefer=["onnxruntime"], render_modality="widefield")  # its own
    assert plain.metadata.volume is None
    assert served.metadata.volume is not None and served.metadata.volume.modality == "widefield"


def test_the_command_measures_a_slide_and_writes_bank_json_and_picture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "psf.npy"
    assert C.main(["--slide", "vectorial", "--fields", "3", "--out", str(out)]) == 0
    bank = np.load(out)
    assert bank.shape == (81, 127, 127)
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["beads"] >= 6 and summary["filled_from_reference"] == 0
    assert summary["method"] == "split"  # the slide steps as the bank and reaches past it
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "beads averaged" in capsys.readouterr().out
    # a stack that is not a bead stack: one line, exit 2
    np.save(tmp_path / "flat.npy", np.full((30, 200, 200), 100, dtype=np.uint16))
    assert C.main([str(tmp_path / "flat.npy"), "--step-um", "0.5", "--out", str(out)]) == 2
    assert "usable bead" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        C.main([str(tmp_path / "flat.npy")])  # no --step-um
    import tifffile

    slide = tmp_path / "slide.tif"  # its ImageJ header says 0.25 µm a plane
    tifffile.imwrite(
        slide,
        np.full((30, 200, 200), 100, dtype=np.uint16),
        imagej=True,
        metadata={"spacing": 0.25, "unit": "micron"},
    )
    with pytest.raises(SystemExit):  # refused before any work: the bank would be 2x off in depth
        C.main([str(slide), "--step-um", "0.5", "--out", str(out)])
    assert "records a focus step of 0.25 µm (ImageJ spacing)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # seeds are a stream from 0: a negative one is no field
        C.main(["--slide", "vectorial", "--first-seed", "-1"])
    assert exc.value.code == 2 and "--first-seed must be >= 0" in capsys.readouterr().err


def test_a_bank_measured_for_the_other_point_convention_is_named_when_the_fit_serves_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The calibration's JSON records its lateral convention; a point fit holding points the
    other way is told in one warning (its beads would come out too sharp or too soft)."""
    import shutil

    from engine.point_fit import PointFit

    bank = tmp_path / "psf.npy"
    shutil.copy(MODEL.parent / "deepz-volume.psf.npy", bank)
    bank.with_suffix(".json").write_text(json.dumps({"lateral": "linear"}))
    with caplog.at_level("WARNING", logger="engine.runtime"):
        load_backend(MODEL, prefer=["onnxruntime"], psf_bank=bank, point_fit=PointFit())
        assert not [r for r in caplog.records if "measured for" in r.getMessage()]
        load_backend(
            MODEL, prefer=["onnxruntime"], psf_bank=bank, point_fit=PointFit(lateral="spline")
        )
    warned = [r.getMessage() for r in caplog.records if "measured for" in r.getMessage()]
    assert len(warned) == 1 and "--lateral spline" in warned[0] and "too sharp" in warned[0]
