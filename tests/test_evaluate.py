"""Tests of engine.metrics against hand-computed values, engine.evaluate, and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.evaluate import EvalSettings, evaluate, refocus, wiener_refocus
from engine.metadata import ModelMetadata
from engine.metrics import fwhm_1d, gaussian_fwhm_2d, pearson, psnr, ssim
from engine.model import DeepZ, load_model, save_model, untrained_metadata

SHIPPED = Path(__file__).resolve().parents[1] / "engine" / "weights" / "deepz-slim.pt"


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def test_psnr_hand_computed() -> None:
    truth = np.zeros((4, 4))
    truth[0, 0] = 10.0  # data range 10
    pred = truth + 1.0  # MSE 1
    assert psnr(pred, truth) == pytest.approx(20.0)
    assert psnr(pred, truth, data_range=100.0) == pytest.approx(40.0)
    assert psnr(truth, truth) == float("inf")
    with pytest.raises(ValueError, match="one shape"):
        psnr(np.zeros((2, 2)), np.zeros((3, 3)))


def test_ssim_hand_computed() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32))
    assert ssim(a, a) == pytest.approx(1.0)
    # constant images: mu terms only; SSIM = (2*m1*m2 + c1) / (m1^2 + m2^2 + c1) with L = 1
    c1 = (0.01 * 1.0) ** 2
    expect = (2 * 1.0 * 2.0 + c1) / (1.0 + 4.0 + c1)
    assert ssim(np.ones((24, 24)), 2 * np.ones((24, 24)), data_range=1.0) == pytest.approx(expect)
    b = rng.normal(size=(32, 32))
    assert abs(ssim(b, a)) < 0.2  # independent noise: no structure in common


def test_pearson_hand_computed() -> None:
    a = np.arange(12, dtype=float).reshape(3, 4)
    assert pearson(3 * a + 7, a) == pytest.approx(1.0)
    assert pearson(-a, a) == pytest.approx(-1.0)
    b = np.array([[1.0, 2.0], [3.0, 4.0]])
    c = np.array([[2.0, 1.0], [4.0, 3.0]])  # r = 0.6 by hand
    assert pearson(b, c) == pytest.approx(0.6)


def test_fwhm_of_triangle_and_gaussian() -> None:
    tri = np.array([0, 0, 1, 2, 3, 4, 3, 2, 1, 0, 0], dtype=float)
    assert fwhm_1d(tri) == pytest.approx(4.0)  # half max 2 at x = 3 and x = 7
    x = np.arange(-30, 31, dtype=float)
    g = np.exp(-(x**2) / (2 * 4.0**2))
    assert fwhm_1d(g, spacing=0.5) == pytest.approx(2.3548 * 4.0 * 0.5, rel=0.01)
    yy, xx = np.mgrid[-10:11, -10:11]
    spot = 50 * np.exp(-(xx**2 + yy**2) / (2 * 1.7**2)) + 5
    assert gaussian_fwhm_2d(spot, spacing=0.3) == pytest.approx(2.3548 * 1.7 * 0.3, rel=1e-3)


def test_centred_spot_fit_ignores_noise_and_refuses_no_spot() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[-6:7, -6:7]
    spot = 40 * np.exp(-(xx**2 + yy**2) / (2 * 0.7**2)) + 10 + rng.normal(0, 1.0, xx.shape)
    spot[1, 11] += 60  # a hot pixel brighter than the bead, away from the centre
    # the free fit starts at the hot pixel and measures it; the centred fit finds the bead
    assert gaussian_fwhm_2d(spot, spacing=1.0) < 2.3548 * 0.5
    assert gaussian_fwhm_2d(spot, spacing=1.0, centered=True) == pytest.approx(
        2.3548 * 0.7, rel=0.1
    )
    noise = 10 + rng.normal(0, 1.0, xx.shape)  # a bead blurred into the background
    assert np.isnan(gaussian_fwhm_2d(noise, centered=True, min_snr=3.0))


def _tiny_metadata(model: DeepZ) -> ModelMetadata:
    return untrained_metadata(model, "tiny")


def test_wiener_refocus_keeps_the_in_focus_frame() -> None:
    model = DeepZ(channels=(4, 4, 8))
    meta = _tiny_metadata(model)
    rng = np.random.default_rng(0)
    frame = 100 + rng.poisson(5, size=(64, 64)).astype(np.float32)
    out = wiener_refocus(frame, [0.0, 5.0], meta)
    assert out.shape == (2, 64, 64) and out.dtype == np.float32
    assert pearson(out[0], frame) > 0.9
    assert out[1].std() < out[0].std()  # defocus blurs


def test_evaluate_writes_a_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DeepZ(channels=(4, 4, 8, 16, 32, 64, 128)).eval()
    weights = tmp_path / "tiny.pt"
    save_model(model, _tiny_metadata(model), weights)
    settings = EvalSettings(
        seeds={"mixed": (31,)},
        shape=(64, 64),
        z_half_range_um=10.0,
        input_z_um=(0.0,),
        dz_um=(-4.0, 0.0, 4.0),
        localisation_step_um=1.0,
    )
    result = evaluate(weights, tmp_path / "report", settings)
    for name in ("report.md", "metrics.json", "metric_vs_dz.png", "examples.png"):
        assert (tmp_path / "report" / name).is_file(), name
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(saved["image_metrics"]["per_dz"]) == {"-4", "0", "4"}
    assert result["image_metrics"]["n_pairs"] == 3
    assert "Wiener" in (tmp_path / "report" / "report.md").read_text()


def test_shipped_weights_refocus_better_than_the_input() -> None:
    """The shipped model, on a held-out simulated worm (seed never trained on), beats the input."""
    from engine.optics import simulate_focal_stack

    model, meta = load_model(SHIPPED)
    assert 1_000_000 <= model.count_parameters() <= 3_000_000
    assert meta.dz_range_um == (-10.0, 10.0)
    stack = simulate_focal_stack("worm", shape=(128, 128), z_um=np.array([0.0, -6.0, 6.0]), seed=12)
    frame = stack.images[0]
    out = refocus(model, meta, frame, np.array([-6.0, 6.0], np.float32)[:, None, None] + 0 * frame)
    for k in (0, 1):
        truth = stack.clean[k + 1]
        gain = ssim(out[k], truth) - ssim(frame.astype(np.float32), truth)
        assert gain > 0.03, f"Δz {[-6, 6][k]}: SSIM gain {gain:.3f}"
        assert psnr(out[k], truth) > psnr(frame.astype(np.float32), truth) + 2.0
