"""The body-glow probe (`engine.body_probe`): can the body's glow be read from a network?"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.body_probe import BodyHead, glow_error, main, measure, predict_glow, train
from engine.model import load_model


def test_the_glow_error_forgives_what_a_fit_absorbs_and_nothing_else():
    """Raw RMS counts every e⁻; the scaled RMS forgives a brightness, the surface RMS also a
    quadratic background (both free in `engine.oracle_fit`); a wrong shape is never forgiven."""
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    truth = 30.0 * np.exp(-((yy - 0.5) ** 2) / 0.02)  # a body crossing the frame
    exact = glow_error(truth, truth)
    assert exact["rms_e"] == pytest.approx(0.0, abs=1e-9) and exact["scale"] == pytest.approx(1.0)
    dim = glow_error(0.5 * truth, truth)
    assert dim["rms_e"] > 5.0 and dim["scaled_rms_e"] == pytest.approx(0.0, abs=1e-9)
    tilted = glow_error(0.5 * truth + 4.0 * xx + 2.0 * yy**2, truth)
    assert tilted["scaled_rms_e"] > 0.5 and tilted["surface_rms_e"] == pytest.approx(0.0, abs=1e-6)
    shifted = glow_error(np.roll(truth, 8, axis=0), truth)
    assert shifted["surface_rms_e"] > 3.0 and shifted["truth_mean_e"] == pytest.approx(truth.mean())


def test_the_head_trains_on_frozen_features_and_resumes(tmp_path):
    """A few steps on two simulated samples: the head's checkpoint is written, the network's
    weights are untouched, a second call resumes the step count, and the head gives one glow
    image per frame in counts."""
    weights = "engine/weights/deepz-volume.pt"
    before = {k: v.clone() for k, v in load_model(weights)[0].state_dict().items()}
    path = train(weights, "configs/train_volume_v31.toml", 2, 0.05, tmp_path)
    first = torch.load(path, weights_only=False)
    assert first["step"] > 0 and first["history"]
    assert np.isfinite(first["history"][-1]["held_rms_e"])
    again = torch.load(
        train(weights, "configs/train_volume_v31.toml", 2, 0.02, tmp_path), weights_only=False
    )
    assert again["step"] > first["step"]
    model, _ = load_model(weights)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    head = BodyHead(first["features"])
    head.load_state_dict(again["head"])
    frame = np.full((64, 64), 200, dtype=np.uint16)
    frame[20:30, 20:30] = 900
    glow = predict_glow(model.eval(), head.eval(), frame)
    assert glow.shape == (64, 64) and np.isfinite(glow).all()


def test_the_command_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    """Bad counts, a missing network or head: one line naming the problem, nothing trained."""
    cases = (
        (["train", "--samples", "1"], "--samples must be >= 2"),
        (["train", "--weights", str(tmp_path / "none.pt")], "not found"),
        (["glow", "--head", str(tmp_path / "none.pt")], "--head"),
    )
    for argv, message in cases:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_the_measure_writes_what_the_oracle_fit_reads(tmp_path):
    """`glow`: a (briefly trained) head scored on a ganglion frame and on the simulator's own
    worms, beside the model's faint density, in e⁻ per pixel; the frame's glow is written under
    the key `engine.oracle_fit --body-glow` reads (seed_<n>, the frame's shape), with a JSON
    and a picture."""
    pytest.importorskip("psfmodels", reason="the hold-out's PSF needs the sim extra (psfmodels)")
    head = train(
        "engine/weights/deepz-volume.pt", "configs/train_volume_v31.toml", 2, 0.03, tmp_path
    )
    record = measure(head, "vectorial", [1], tmp_path, "engine/weights/deepz-volume.onnx", 1)
    with np.load(tmp_path / "body_glow_vectorial.npz") as f:
        assert f.files == ["seed_1"] and f["seed_1"].shape == (256, 256)
    for who in ("head", "model_density"):
        scores = record["frames"][0][who]
        assert scores["truth_mean_e"] > 1.0 and scores["surface_rms_e"] <= scores["rms_e"]
        assert np.isfinite(record["simulator"][who]["surface_rms_e"])
    assert (tmp_path / "body_glow_vectorial.png").stat().st_size > 0
