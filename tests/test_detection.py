"""The DECODE-style detection head: splat, likelihood, batches of beads, training and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training extra not installed")

from engine.detection import (  # noqa: E402
    Detections,
    count_term,
    decode,
    detection_loss,
    gmm_term,
    localise,
    splat,
)
from engine.volume import depth_grid  # noqa: E402
from tests.test_volume import _tiny_config  # noqa: E402
from tests.volume_helpers import assert_onnx_serves_like_torch  # noqa: E402

H = W = 24
DEPTHS = depth_grid()


def _one_source(p_where: tuple[int, int], x: float, y: float, z: float, n: float) -> Detections:
    """Detections with p = 1 at one pixel (offsets x, y; depth z; brightness n), 0 elsewhere."""
    p = torch.zeros(1, 1, H, W)
    p[0, 0, p_where[0], p_where[1]] = 1.0
    full = torch.ones(1, 1, H, W)
    return Detections(
        p=p, x=full * x, y=full * y, z=full * z, n=full * n, sigma=torch.full((1, 4, H, W), 0.2)
    )


def test_splat_puts_a_detections_light_at_its_sub_voxel_position():
    det = _one_source((10, 12), x=0.3, y=-0.2, z=1.25, n=2.0)
    vol = splat(det, float(DEPTHS[0]), 0.5, DEPTHS.size, brightness_scale=100.0)[0].numpy()
    assert vol.shape == (DEPTHS.size, H, W)
    assert vol.sum() == pytest.approx(200.0, rel=1e-5)  # p * n * scale, all of it
    d, r, c = np.indices(vol.shape)
    centre = [(vol * a).sum() / vol.sum() for a in (d, r, c)]
    np.testing.assert_allclose(centre, [(1.25 + 10) / 0.5, 9.8, 12.3], atol=1e-5)
    assert (vol > 0).sum() == 8  # tri-linear: the 8 voxels around it, no more


def test_splat_loses_only_what_falls_off_the_frame():
    det = _one_source((0, 5), x=0.0, y=-0.5, z=0.0, n=1.0)
    vol = splat(det, float(DEPTHS[0]), 0.5, DEPTHS.size, brightness_scale=1.0)
    assert float(vol.sum()) == pytest.approx(0.5, rel=1e-5)


def test_splat_serves_only_the_sure_detections():
    """With min_p, the low p every pixel keeps (here 0.01) gives no light away from a source."""
    det = _one_source((10, 12), x=0.0, y=0.0, z=1.0, n=1.0)
    p = det.p * 0.9 + 0.01  # a sure source at (10, 12) on a haze of 0.01
    det = Detections(p=p, x=det.x, y=det.y, z=det.z, n=det.n, sigma=det.sigma)
    every = splat(det, float(DEPTHS[0]), 0.5, DEPTHS.size, brightness_scale=1.0)[0]
    sure = splat(det, float(DEPTHS[0]), 0.5, DEPTHS.size, brightness_scale=1.0, min_p=0.5)[0]
    assert float(every.sum()) == pytest.approx(0.9 + 0.01 * H * W, rel=1e-5)
    # kept: the source's pixel and the haze of the pixels whose 3 x 3 neighbourhood holds it
    assert float(sure.sum()) == pytest.approx(0.91 + 8 * 0.01, rel=1e-5)
    assert float(sure[:, :8].sum()) == 0 and float(sure[:, :, :10].sum()) == 0


def test_decode_keeps_offsets_depths_and_sigmas_in_range():
    raw = torch.randn(2, 9, 8, 8, generator=torch.Generator().manual_seed(0)) * 20
    det = decode(raw, -10.0, 10.0)
    assert float(det.x.abs().max()) <= 1 and float(det.y.abs().max()) <= 1
    assert float(det.z.min()) >= -10 and float(det.z.max()) <= 10
    assert float(det.sigma.min()) >= 0.01 - 1e-6 and float(det.n.min()) >= 0
    assert float(det.p.min()) >= 0 and float(det.p.max()) <= 1


def test_the_likelihood_prefers_the_true_depth_and_the_count_the_true_number():
    sources = torch.tensor([[[12.3, 9.8, 1.25, 2.0]]])
    mask = torch.ones(1, 1)
    nll = {
        dz: float(gmm_term(_one_source((10, 12), 0.3, -0.2, 1.25 + dz, 2.0), sources, mask)[0])
        for dz in (0.0, 0.25, 1.0)
    }
    assert nll[0.0] < nll[0.25] < nll[1.0]
    # sigma 0.2 µm: a quarter micron off costs (0.25 / 0.2)^2 / 2 nats more, exactly
    assert nll[0.25] - nll[0.0] == pytest.approx(0.78125, rel=1e-4)
    det = _one_source((10, 12), 0.3, -0.2, 1.25, 2.0)
    one, three = (float(count_term(det, torch.tensor([c]))[0]) for c in (1.0, 3.0))
    assert one < three


def test_localise_reads_a_source_spread_over_pixels_as_one():
    """p shared by four pixels whose offsets all point at one place: one source, there."""
    p = torch.zeros(1, 1, H, W)
    p[0, 0, 5:7, 8:10] = torch.tensor([[0.4, 0.2], [0.2, 0.1]])
    xs = torch.arange(W, dtype=torch.float32).expand(H, W)
    ys = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    x = (8.3 - xs).clamp(-1, 1)[None, None]  # every pixel near it points at (8.3, 5.4)
    y = (5.4 - ys).clamp(-1, 1)[None, None]
    z = torch.full((1, 1, H, W), -3.0)
    z[0, 0, 5, 8] = -2.0  # the most likely pixel says -2, the others -3: weighted -2.44
    n = torch.full((1, 1, H, W), 1.5)
    det = Detections(p=p, x=x, y=y, z=z, n=n, sigma=torch.ones(1, 4, H, W))
    (found,) = localise(det)
    assert found.shape == (1, 5)
    np.testing.assert_allclose(found[0], [8.3, 5.4, -3 + 0.4 / 0.9, 1.5, 0.9], atol=1e-5)
    assert localise(det, threshold=0.95)[0].shape == (0, 5)


def test_padding_rows_cost_nothing():
    det = _one_source((10, 12), 0.3, -0.2, 1.25, 2.0)
    real = torch.tensor([[[12.3, 9.8, 1.25, 2.0]]])
    padded = torch.tensor([[[12.3, 9.8, 1.25, 2.0], [0.0, 0.0, 0.0, 0.0]]])
    a, _ = detection_loss(det, real, torch.ones(1, 1))
    b, _ = detection_loss(det, padded, torch.tensor([[1.0, 0.0]]))
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def _config(tmp_path: Path):  # type: ignore[no-untyped-def]
    """test_volume's tiny config with the head on and two frames per sample."""
    cfg = _tiny_config(tmp_path)
    return cfg.model_copy(
        update={
            "detection": True,
            "loss": cfg.loss.model_copy(update={"detection_weight": 0.05}),
            "data": cfg.data.model_copy(update={"frames_per_sample": 2}),
        }
    )


def test_a_batchs_beads_follow_its_patches_crop_and_turns(tmp_path: Path):
    """Every bead row of a batch sits where its patch's density holds that bead's light."""
    from engine.train_volume import Sample, sample_batch

    cfg = _config(tmp_path)
    pool = [Sample(cfg, 2_000_000 + i, [1.0, 0.0, 0.0]) for i in range(2)]
    checked = 0
    for seed in range(6):  # 48 patches: every one of the 8 turns many times over
        b = sample_batch(np.random.default_rng(seed), pool, cfg)
        for i in range(cfg.batch_size):
            for x, y, z, n in b.sources[i][b.mask[i] > 0].tolist():
                r, c = round(y), round(x)
                if not (1 <= r < cfg.patch_size - 1 and 1 <= c < cfg.patch_size - 1):
                    continue  # part of its light is outside the patch
                k = int(np.floor((z - DEPTHS[0]) / 0.5))
                light = float(b.targets[i, k : k + 2, r - 1 : r + 2, c - 1 : c + 2].sum())
                # other beads may add to a 2 x 3 x 3 box, never take away
                assert light >= 0.99 * n * cfg.brightness_scale
                checked += 1
    assert checked > 50


def test_the_head_probe_refuses_a_model_without_a_head():
    from engine import heldout as ho
    from engine import probes
    from engine.runtime import DEFAULT_MODEL

    weights = DEFAULT_MODEL.parent / "deepz-volume.pt"
    with pytest.raises(ValueError, match="no detection head"):
        probes.head_localisations(weights, [ho.independent_sample("beads", 0, (64, 64))])


def test_the_weight_needs_the_head(tmp_path: Path):
    from engine.train_volume import VolumeTrainConfig

    with pytest.raises(ValueError, match="needs detection = true"):
        VolumeTrainConfig.model_validate({"loss": {"detection_weight": 0.1}})


def test_a_detection_model_trains_starts_near_its_density_and_exports(tmp_path: Path):
    """Training with the head runs and logs its terms; a fresh head adds next to nothing to
    the density; the served model (density + splat) exports to ONNX with the same planes."""
    pytest.importorskip("onnx", reason="export extra not installed")
    from engine import heldout as ho
    from engine import probes
    from engine.model import load_model
    from engine.train_volume import train

    cfg = _config(tmp_path)
    model = train(cfg, progress=False)
    assert model.detect_head is not None
    samples = [ho.independent_sample("beads", 0, (64, 64))]
    head = probes.head_localisations(cfg.weights_out, samples)  # type: ignore[arg-type]
    assert head["beads"] >= 1 and 0 <= head["found"] <= 1 and head["false_per_frame"] >= 0
    assert sum(r["beads"] for r in head["by_distance"]) == head["beads"]
    history = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["history"]
    assert {"count", "gmm"} <= set(history[0])
    loaded, meta = load_model(cfg.weights_out)  # type: ignore[arg-type]
    assert meta.architecture["detection"]["brightness_scale"] == cfg.brightness_scale
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        served, det = loaded.detect(x)
        density = torch.relu(loaded.head(loaded._features(x)))
    assert det is not None
    extra = served - density  # the splat: p stays near its start of 3e-4 after 3 steps
    assert float(extra.min()) >= 0
    assert float(extra.sum()) < 0.01 * 64 * 64 * cfg.brightness_scale
    assert_onnx_serves_like_torch(cfg.weights_out, tmp_path / "det.onnx")


def test_a_frozen_network_trains_its_head_alone_and_serves_only_sure_detections(tmp_path: Path):
    """freeze_trunk: the density layers stay the init's exactly, only the detection loss is
    logged; serve_min_p travels in the metadata, and a head still near p = 3e-4 everywhere
    adds nothing at all to the served density (training mode still splats every pixel)."""
    from engine.model import load_model
    from engine.train_volume import VolumeTrainConfig, train

    base = _tiny_config(tmp_path / "base")
    train(base, progress=False)
    cfg = _config(tmp_path).model_copy(
        update={"init_from": base.weights_out, "freeze_trunk": True, "detection_serve_min_p": 0.5}
    )
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"detection_weight": 1.0})})
    train(cfg, progress=False)
    init, _ = load_model(base.weights_out)  # type: ignore[arg-type]
    model, meta = load_model(cfg.weights_out)  # type: ignore[arg-type]
    assert meta.architecture["detection"]["serve_min_p"] == 0.5
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("detect_head.")}
    assert trunk.keys() == init.state_dict().keys()
    for k, v in init.state_dict().items():
        assert torch.equal(trunk[k], v), k
    history = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["history"]
    assert {"count", "gmm"} <= set(history[-1]) and "object" not in history[-1]
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        served = model(x)
        density = torch.relu(model.head(model._features(x)))
        assert torch.equal(served, density)
        model.train()
        assert float((model(x) - density).sum()) > 0  # training splats every pixel's p * N
    with pytest.raises(ValueError, match="freeze_trunk trains the detection head alone"):
        VolumeTrainConfig.model_validate({"freeze_trunk": True})
