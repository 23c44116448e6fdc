"""The volume model's parts: simulated truth, plane rendering, training, runtime and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.optics import OpticsConfig, simulate_focal_stack, simulate_volume_pair
from engine.volume import Renderer, defocus_index, depth_grid, load_psf_bank, psf_bank
from tests.volume_helpers import assert_onnx_serves_like_torch

SHAPE = (96, 96)


@pytest.fixture(scope="module")
def psf() -> np.ndarray:
    return psf_bank(OpticsConfig(), depth_grid())


def test_depth_grid_and_defocus_index():
    z = depth_grid()
    assert z.size == 41 and z[0] == -10.0 and z[-1] == 10.0
    j = defocus_index(np.array([0.0, 2.5]), z)
    # plane 0 sees depth -10 through defocus +10 (index 60 of 81), depth +10 through -10 (20)
    assert j.shape == (2, 41) and j[0, 0] == 60 and j[0, -1] == 20 and j[1, 20] == 45
    with pytest.raises(ValueError, match="lattice"):
        defocus_index(np.array([0.3]), z)


def test_volume_pair_truth_images_to_the_frame(psf):
    """Rendering the true density at Δz reproduces the simulator's own noise-free planes."""
    seed, focus = 4, 0.0
    pair = simulate_volume_pair("beads", shape=SHAPE, focus_um=np.array([focus]), seed=seed)
    stack = simulate_focal_stack("beads", shape=SHAPE, z_um=np.array([0.0, 3.0]), seed=seed)
    assert pair.frames.dtype == np.uint16 and pair.objects_counts.shape == (1, 41, *SHAPE)
    # same seed, same sample: the noisy frame follows the stack's noise-free plane
    assert np.corrcoef(pair.frames[0].ravel(), stack.clean[0].ravel())[0, 1] > 0.8
    r = Renderer(psf, pair.depth_um, SHAPE)
    planes = r.planes(pair.objects_counts[0], stack.clean[0], np.array([0.0, 3.0]))
    inner = (slice(20, -20), slice(20, -20))  # objects outside the frame blur into its edges
    for k in range(2):
        truth = stack.clean[k][inner]
        err = np.abs(planes[k][inner] - truth).max()
        assert err < 0.02 * (truth.max() - truth.min()), (k, err)


def test_surface_interpolates_between_planes(psf):
    pair = simulate_volume_pair("beads", shape=SHAPE, seed=5)
    r = Renderer(psf, pair.depth_um, SHAPE)
    frame = pair.frames[0].astype(np.float32)
    flat = r.surface(pair.objects_counts[0], frame, np.full(SHAPE, 2.0))
    np.testing.assert_allclose(flat, r.planes(pair.objects_counts[0], frame, np.array([2.0]))[0])
    tilt = np.tile(np.linspace(-4.0, 4.0, SHAPE[1]), (SHAPE[0], 1))
    surf = r.surface(pair.objects_counts[0], frame, tilt)
    assert surf.shape == SHAPE and np.isfinite(surf).all()


def test_planes_and_surfaces_a_rounding_past_the_grid_ends_are_served_as_the_ends(psf):
    """A float64 tilted plan from -10 to 10 µm may end at 10.000000000000002, and a shifted
    one 1e-6 µm past the grid: `infer` accepts those (review 36), and the renderer serves them
    as the end planes rather than asking for a plane past the grid. Further out is refused."""
    pair = simulate_volume_pair("beads", shape=SHAPE, seed=5)
    r = Renderer(psf, pair.depth_um, SHAPE)
    frame, dens = pair.frames[0].astype(np.float32), pair.objects_counts[0]
    ends = r.planes(dens, frame, np.array([-10.0, 10.0]))
    np.testing.assert_array_equal(r.planes(dens, frame, np.array([-10 - 8e-7, 10 + 8e-7])), ends)
    tilt = np.tile(np.linspace(-10.0, 10.0, SHAPE[1]), (SHAPE[0], 1))
    tilt[:, -1] = np.nextafter(10.0, 11.0)
    tilt[:, 0] = -10.0 - 9e-7
    surf = r.surface(dens, frame, tilt)
    np.testing.assert_allclose(surf[:, -1], ends[1][:, -1], rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(surf[:, 0], ends[0][:, 0], rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="lattice"):
        r.planes(dens, frame, np.array([10.001]))


def test_a_surface_of_another_shape_or_not_finite_is_refused_and_negative_density_counts(psf):
    """Review 68: `Renderer.surface` rendered a DPM of another shape (a frame of its shape)
    and failed inside numpy on NaN; a depth of negative density was skipped as empty."""
    pair = simulate_volume_pair("beads", shape=SHAPE, seed=5)
    r = Renderer(psf, pair.depth_um, SHAPE)
    frame, dens = pair.frames[0].astype(np.float32), pair.objects_counts[0]
    with pytest.raises(ValueError, match="not the frame's"):
        r.surface(dens, frame, np.zeros((16, 24)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        r.surface(dens, frame, np.full(SHAPE, np.nan))
    dark = dens.copy()
    dark[5] = -5.0  # a model not held non-negative
    assert not np.allclose(
        r.planes(dark, frame, np.array([0.0])), r.planes(dens, frame, np.array([0.0]))
    )


def test_a_volume_grid_off_the_focal_planes_lattice_is_refused():
    """Review 68: a grid of -9.75 ... 9.75 or 2 ... 12 µm loaded, then every plane was
    refused: the renderer's planes lie at whole steps from focus, inside the grid."""
    from engine.metadata import VolumeOutput

    VolumeOutput(depth_um=[-1.0, -0.5, 0.0, 0.5, 1.0], psf_file="b.npy")
    for bad in ([-0.75, -0.25, 0.25, 0.75], [2.0, 2.5, 3.0]):
        with pytest.raises(ValueError, match="focal plane"):
            VolumeOutput(depth_um=bad, psf_file="b.npy")


def test_depth_convolution_and_direct_sums_render_the_same_planes(psf, monkeypatch):
    """The FFT-along-depth path (many planes) equals the direct sum (few), to float32 rounding."""
    import engine.volume as volume

    pair = simulate_volume_pair("mixed", shape=SHAPE, focus_um=[0.0], seed=4)
    dens = pair.objects_counts[0].copy()
    dens[3::4] = 0  # empty depths between occupied ones: they are skipped
    z = depth_grid()
    calls = []
    convolve = volume.Renderer._convolve_depth
    monkeypatch.setattr(
        volume.Renderer,
        "_convolve_depth",
        lambda self, *a: calls.append(1) or convolve(self, *a),
    )
    monkeypatch.setattr(volume, "DEPTH_FFT_MIN_PRODUCTS", 1)
    fast = Renderer(psf, pair.depth_um, SHAPE).render(dens, z)
    assert calls  # the FFT path ran
    monkeypatch.setattr(volume, "DEPTH_FFT_MIN_PRODUCTS", 10**9)
    for threads in (1, 2):
        direct = Renderer(psf, pair.depth_um, SHAPE, threads=threads).render(dens, z)
        np.testing.assert_allclose(fast, direct, atol=2e-5 * float(direct.max()))
    some = z[::5]  # planes on the lattice, not all of them: rows picked from the convolution
    monkeypatch.setattr(volume, "DEPTH_FFT_MIN_PRODUCTS", 1)
    np.testing.assert_allclose(
        Renderer(psf, pair.depth_um, SHAPE).render(dens, some), fast[::5], atol=2e-5 * fast.max()
    )


def test_psf_bank_round_trip_and_bad_files(tmp_path: Path, psf):
    from engine.volume import save_psf_bank

    path = save_psf_bank(psf, tmp_path / "m.psf.npy")
    np.testing.assert_array_equal(load_psf_bank(path, 41), psf)
    with pytest.raises(ValueError, match="does not fit"):
        load_psf_bank(path, 21)
    with pytest.raises(FileNotFoundError, match="PSF bank"):
        load_psf_bank(tmp_path / "missing.npy", 41)
    # a bank saved as integers or scaled, or one emptied, renders planes off by that factor
    # or the bare frame: refused at load (review 55), each in one line
    for name, bank, words in (
        ("ints.npy", (psf * 1e6).astype(np.int64), "floating-point"),
        ("scaled.npy", psf * 2, "in-focus plane sums to 2"),
        ("zeros.npy", np.zeros_like(psf), "in-focus plane sums to 0"),
    ):
        np.save(tmp_path / name, bank)
        with pytest.raises(ValueError, match=words):
            load_psf_bank(tmp_path / name, 41)


def test_torch_renderer_matches_numpy(psf):
    torch = pytest.importorskip("torch", reason="training extra not installed")
    from engine.train_volume import TorchRenderer

    pair = simulate_volume_pair("beads", shape=(64, 64), seed=6)
    dens = pair.objects_counts[0]
    dz = np.array([-4.0, 0.0, 6.5])
    got = TorchRenderer(psf, pair.depth_um, 64).render(torch.from_numpy(dens[None]), dz)[0]
    want = Renderer(psf, pair.depth_um, (64, 64)).render(dens, dz)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3 * float(want.max()))


def test_torch_renderer_light_is_the_mean_of_the_rendered_planes(psf):
    torch = pytest.importorskip("torch", reason="training extra not installed")
    from engine.train_volume import TorchRenderer

    pair = simulate_volume_pair("mixed", shape=(64, 64), seed=7)
    dens = torch.from_numpy(pair.objects_counts[:1])
    dz = np.array([-8.0, 0.5, 5.0])
    renderer = TorchRenderer(psf, pair.depth_um, 64, 31)
    rendered = renderer.render(dens, dz).mean(dim=(2, 3))
    # the light inside the patch, not all of it: beads near the edges lose some
    assert float(rendered.sum()) < float(dens.sum()) * len(dz) / 64**2
    np.testing.assert_allclose(renderer.light(dens, dz).numpy(), rendered.numpy(), rtol=1e-4)


def _tiny_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    from engine.train_volume import VolumeTrainConfig

    return VolumeTrainConfig.model_validate(
        {
            "steps": 3,
            "batch_size": 2,
            "patch_size": 32,
            "channels": [4, 4, 8, 8],
            "threads": 1,
            "bf16": "off",
            "checkpoint_every": 2,
            "warmup_steps": 1,
            "out_dir": str(tmp_path / "run"),
            "weights_out": str(tmp_path / "w" / "vol.pt"),
            "data": {"stack_shape": [64, 64], "pool_size": 2, "frames_per_sample": 1},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="training extra not installed")
    from engine.train_volume import train

    tmp = tmp_path_factory.mktemp("vol")
    cfg = _tiny_config(tmp)
    train(cfg, progress=False)
    return Path(cfg.weights_out)  # type: ignore[arg-type]


def test_training_writes_weights_psf_and_resumes(trained: Path):
    from engine.metadata import ModelMetadata
    from engine.train_volume import load_config, train  # noqa: F401

    meta = ModelMetadata.from_file(trained.with_suffix(".json"))
    assert meta.volume is not None and len(meta.volume.depth_um) == 41
    assert (trained.parent / meta.volume.psf_file).is_file()
    assert meta.architecture["in_channels"] == 1 and meta.architecture["nonnegative"] is True
    val = meta.extra["validation"]
    assert "val_bead_depth_median_um" in val
    assert "val_density_fwhm_um" in val and "val_truth_density_fwhm_um" in val


def test_a_bank_that_is_not_the_models_own_is_refused_by_name(trained: Path, tmp_path: Path):
    """The weights and the PSF bank are two files: an interrupted save or copy can leave a new
    bank beside the old model. The model records its bank's hash, and serving it through any
    other bank is refused with one line, by the runtime and by the exporter alike."""
    import shutil

    from engine.metadata import ModelMetadata
    from engine.runtime import BackendError, load_backend
    from engine.volume import model_psf_bank
    from export import export_weights

    meta = ModelMetadata.from_file(trained.with_suffix(".json"))
    assert meta.volume is not None and meta.volume.psf_sha256 is not None
    for f in trained.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    copy = tmp_path / trained.name
    bank = tmp_path / meta.volume.psf_file
    assert model_psf_bank(copy, meta.volume).shape[0] == 2 * len(meta.volume.depth_um) - 1

    other = np.load(bank)
    other[:, 0, 0] += 1e-6  # still a valid bank, just not this model's
    np.save(bank, other)
    with pytest.raises(ValueError, match="is not the PSF bank saved with the model"):
        model_psf_bank(copy, meta.volume)
    with pytest.raises(BackendError, match="is not the PSF bank saved with the model"):
        load_backend(copy, prefer=["torch"])
    with pytest.raises(ValueError, match="is not the PSF bank saved with the model"):
        export_weights(copy, tmp_path / "out" / "vol.onnx")
    assert not (tmp_path / "out" / "vol.onnx").exists()


def test_validation_reads_a_blurred_density_as_wider_than_the_truth():
    pytest.importorskip("torch", reason="training extra not installed")
    from scipy.ndimage import gaussian_filter

    from engine.optics import simulate_volume_pair
    from engine.train_volume import bead_density_fwhm
    from engine.volume import depth_grid

    depth = depth_grid()
    pair = simulate_volume_pair("beads", shape=(96, 96), depth_um=depth, seed=3)
    truth = pair.objects_counts[0]
    sharp = bead_density_fwhm(truth, depth, pair.objects, 0.0)
    wide = bead_density_fwhm(gaussian_filter(truth, (0, 1.5, 1.5)), depth, pair.objects, 0.0)
    assert np.isfinite(sharp).sum() >= 3
    # tri-linear points are about a pixel (0.3 µm) wide; smoothing by 1.5 px widens them
    assert np.nanmedian(sharp) < 0.35
    assert np.nanmedian(wide) > 2 * np.nanmedian(sharp)


@pytest.mark.cuda
def test_training_on_cuda_writes_a_model_that_runs_on_the_cpu(tmp_path: Path):
    import torch

    from engine.model import load_model
    from engine.train_volume import train

    cfg = _tiny_config(tmp_path).model_copy(update={"device": "cuda", "bf16": "auto"})
    train(cfg, progress=False)
    model, meta = load_model(cfg.weights_out)  # type: ignore[arg-type]
    assert "GPU" in meta.extra["machine"] and "bf16 autocast True" in meta.extra["machine"]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 41, 32, 32)


def test_training_on_cuda_without_a_gpu_is_one_clear_error(tmp_path: Path):
    torch = pytest.importorskip("torch", reason="training extra not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal cannot be seen here")
    from engine.train_volume import train

    cfg = _tiny_config(tmp_path).model_copy(update={"device": "cuda"})
    with pytest.raises(ValueError, match="device = 'cuda' but torch sees no CUDA GPU"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_worker_processes_simulate_what_the_loop_would_and_a_run_uses_them(tmp_path: Path):
    """`SampleFeed` with a worker hands over exactly the sample the loop simulates itself (same
    seed, same weights), a sample travels without its device copies, and a run that refreshes
    its pool every step from a worker trains and writes its weights."""
    pytest.importorskip("torch", reason="training extra not installed")
    import pickle

    import torch

    from engine.train_volume import SampleFeed, train

    cfg = _tiny_config(tmp_path)
    data = cfg.data.model_copy(update={"workers": 1, "refresh_every": 1, "refresh_count": 1})
    ahead_cfg = cfg.model_copy(update={"data": data})
    inline, ahead = SampleFeed(cfg), SampleFeed(ahead_cfg)
    try:
        a = inline.submit(2_000_001, [0.2, 0.5, 0.3])()
        b = ahead.submit(2_000_001, [0.2, 0.5, 0.3])()
    finally:
        ahead.close()
    assert a.kind == b.kind
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)
    for fa, fb in zip(a.sources, b.sources, strict=True):
        np.testing.assert_array_equal(fa, fb)
    x, _ = a.tensors(torch.device("cpu"))
    assert np.shares_memory(x.numpy(), a.inputs)  # the CPU's copy is the array itself
    assert pickle.loads(pickle.dumps(a))._tensors == {}

    train(ahead_cfg, progress=False)  # 3 steps, two refreshes, each from the worker
    assert Path(ahead_cfg.weights_out).is_file()  # type: ignore[arg-type]


def test_training_resume_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import loop, train

    # the loop reads its steps' losses from the device in batches: here every 2 steps, and at
    # each checkpoint (every 5 steps, and a run's last): steps 1-2 are read as a batch, 3 at
    # the first run's end, 4-5 at the resumed run's checkpoint
    monkeypatch.setattr(loop, "READ_EVERY", 2)
    cfg = _tiny_config(tmp_path)
    cfg.weights_out = None
    cfg.checkpoint_every = 5
    train(cfg, progress=False)
    cfg.steps = 5
    train(cfg, resume=True, progress=False)
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5 and len(ck["history"]) == 5
    # every step's row, in order, with its loss and the parts it sums
    assert [h["step"] for h in ck["history"]] == [1, 2, 3, 4, 5]
    for h in ck["history"]:
        assert {"loss", "object", "render", "lr", "wall_s"} <= set(h)
        assert np.isfinite(h["loss"]) and h["loss"] > 0
    # a run stopped early still yields loadable weights from its checkpoint
    from engine.model import load_model
    from engine.train_volume import weights_from_checkpoint

    cfg.weights_out = tmp_path / "early" / "v.pt"
    path = weights_from_checkpoint(cfg, cfg.out_dir / "checkpoint.pt")
    model, meta = load_model(path)
    assert meta.extra["steps"] == 5 and (path.parent / "v.psf.npy").is_file()
    assert model.architecture["out_channels"] == 41
    # the same density served through another microscope's PSF bank (cross-modality)
    cfg.weights_out = tmp_path / "confocal" / "v.pt"
    other = weights_from_checkpoint(cfg, cfg.out_dir / "checkpoint.pt", render_modality="confocal")
    twin, other_meta = load_model(other)
    assert meta.volume is not None and other_meta.volume is not None
    assert (meta.volume.modality, other_meta.volume.modality) == ("widefield", "confocal")
    assert other_meta.extra["train_config"]["target_modality"] == "widefield"
    from engine.optics import OpticsConfig
    from engine.volume import psf_bank

    conf = np.load(other.parent / "v.psf.npy")
    expected = psf_bank(OpticsConfig(**cfg.optics), cfg.depth_um, modality="confocal")
    np.testing.assert_array_equal(conf, expected)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same network, only the rendering differs


def test_a_resumed_run_is_the_run_unbroken(tmp_path: Path):
    """Stopped at a step where the pool refreshes and resumed, a run sees the same samples in
    the same slots and ends with the same weights as one that never stopped (before, the
    rebuilt pool counted the refresh at that step as done and made it again: every resume
    skipped samples and shuffled the slots)."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import train

    def config(name: str, steps: int):  # type: ignore[no-untyped-def]
        cfg = _tiny_config(tmp_path / name)
        cfg.steps, cfg.checkpoint_every, cfg.weights_out = steps, 3, None
        cfg.data.pool_size, cfg.data.refresh_every, cfg.data.refresh_count = 3, 3, 1
        # no curriculum (as the shipped recipes): with one, the rebuilt pool's samples are drawn
        # with the kind weights of the resumed step, not of the steps they were first drawn at
        cfg.data.curriculum_fraction = 0.0
        # all steps in the warm-up, whose learning rate does not depend on `steps` (the
        # cosine after it does: a run of 3 steps decays faster than one of 6)
        cfg.warmup_steps = 10
        return cfg

    straight = config("straight", 6)
    train(straight, progress=False)
    broken = config("broken", 3)
    train(broken, progress=False)
    broken.steps = 6
    train(broken, resume=True, progress=False)
    a = torch.load(straight.out_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(broken.out_dir / "checkpoint.pt", weights_only=False)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_a_checkpoint_that_cannot_be_written_is_a_warning_not_the_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A checkpoint the disk refuses (here the portable copy's path is a folder; a full or
    read-only disk alike) costs a warning: the run goes on and the other checkpoint stands."""
    pytest.importorskip("torch", reason="training extra not installed")
    from engine.train_volume import train

    cfg = _tiny_config(tmp_path)
    cfg.weights_out, cfg.portable_checkpoint = None, tmp_path / "taken"
    (tmp_path / "taken").mkdir()
    train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "taken could not be written" in err and "training goes on" in err
    assert (cfg.out_dir / "checkpoint.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))  # no partial file left behind


def test_resume_refuses_another_recipe_and_falls_back_from_a_broken_checkpoint(tmp_path: Path):
    """--resume continues the same recipe only: another loss is one line (a changed recipe
    starts from the weights); a checkpoint cut short is said and the portable copy used."""
    pytest.importorskip("torch", reason="training extra not installed")
    from engine.metadata import ModelMetadataError
    from engine.train_volume import train

    cfg = _tiny_config(tmp_path)
    cfg.weights_out, cfg.portable_checkpoint = None, tmp_path / "portable.ckpt.pt"
    train(cfg, progress=False)
    cfg.steps = 4
    cfg.loss.source_weight = 1.0
    with pytest.raises(ModelMetadataError, match=r"another loss than this config's.*init_from"):
        train(cfg, resume=True, progress=False)
    cfg.loss.source_weight = 0.0
    cfg.seed = 7  # another seed draws another pool and other batches: not this run
    with pytest.raises(ModelMetadataError, match=r"another seed than this config's"):
        train(cfg, resume=True, progress=False)
    cfg.seed = 0
    full = cfg.out_dir / "checkpoint.pt"
    full.write_bytes(full.read_bytes()[:1000])  # cut short (a power loss, before fsync)
    train(cfg, resume=True, progress=False)  # from the portable copy, with a warning
    import torch

    assert torch.load(full, weights_only=False)["step"] == 4


def test_the_portable_checkpoint_is_slim_and_a_fresh_machine_resumes_from_it(tmp_path: Path):
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import train

    cfg = _tiny_config(tmp_path)
    cfg.weights_out = None
    cfg.portable_checkpoint = tmp_path / "committed" / "v.ckpt.pt"
    train(cfg, progress=False)
    full = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    slim = torch.load(cfg.portable_checkpoint, weights_only=False)
    for k, v in full["model"].items():  # the model exactly
        assert torch.equal(slim["model"][k], v)
    moments = [t for e in slim["opt"]["state"].values() for n, t in e.items() if n != "step"]
    assert moments and all(t.dtype == torch.bfloat16 for t in moments)
    assert [h["step"] for h in slim["history"]] == [2, 3]  # the validation rows (checkpoints)
    # a fresh machine: the run folder is gone, the committed file is there
    (cfg.out_dir / "checkpoint.pt").unlink()
    cfg.steps = 4
    train(cfg, resume=True, progress=False)
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 4
    assert all(t.dtype == torch.float32 for e in ck["opt"]["state"].values() for t in e.values())


def test_weights_without_their_checkpoint_get_one_a_fresh_machine_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A GPU run's weights come back without their checkpoint (a call returns files of at most
    16 MB): `checkpoint_from_weights` writes one holding the weights exactly, with a fresh
    optimiser whose first resumed step is a fresh Adam's, and `--resume` continues from it."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.model import load_model
    from engine.train_volume import checkpoint_from_weights, train

    cfg = _tiny_config(tmp_path)
    train(cfg, progress=False)
    weights = Path(cfg.weights_out)  # type: ignore[arg-type]
    (cfg.out_dir / "checkpoint.pt").unlink()  # only the weights came back
    cfg.portable_checkpoint = tmp_path / "committed" / "v.ckpt.pt"
    checkpoint_from_weights(cfg, weights)
    ck = torch.load(cfg.portable_checkpoint, weights_only=False)
    trained, _ = load_model(weights)
    for k, v in trained.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    moments = [t for e in ck["opt"]["state"].values() for n, t in e.items() if n != "step"]
    assert moments and all(not t.float().any() for t in moments)
    assert ck["step"] == 3 and ck["history"][-1]["step"] == 3
    assert "val_bead_depth_median_um" in ck["history"][-1]
    # and back to weights (its row lacked the wall time: a KeyError, review 72)
    from engine.train_volume import weights_from_checkpoint

    back = weights_from_checkpoint(
        cfg.model_copy(update={"weights_out": str(tmp_path / "back" / "v.pt")}),
        cfg.portable_checkpoint,
    )
    for k, v in trained.state_dict().items():
        assert torch.equal(load_model(back)[0].state_dict()[k], v)
    # the committed checkpoint is read (resume_from), never written: the run writes its own
    committed = cfg.portable_checkpoint
    before = committed.read_bytes()
    cfg.resume_from, cfg.portable_checkpoint = committed, tmp_path / "run" / "v.ckpt.pt"
    cfg.steps = 5
    train(cfg, resume=True, progress=False)
    assert torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["step"] == 5
    assert committed.read_bytes() == before
    assert torch.load(cfg.portable_checkpoint, weights_only=False)["step"] == 5
    # a run's own portable checkpoint outranks resume_from (its full one gone, say)
    (cfg.out_dir / "checkpoint.pt").unlink()
    cfg.steps = 6
    capsys.readouterr()
    train(cfg, resume=True, progress=False)
    assert f"resumed from {cfg.portable_checkpoint} at step 5" in capsys.readouterr().out
    cfg.portable_checkpoint = None
    with pytest.raises(ValueError, match="no portable_checkpoint"):
        checkpoint_from_weights(cfg, weights)


def test_a_weight_average_is_what_the_run_serves_and_it_resumes(tmp_path: Path):
    """With ema_decay the run keeps torch's moving average of its weights beside them: the
    checkpoint holds both, the written weights are the average (from a run and from its
    checkpoint alike), and a resumed run continues the average rather than restarting it."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.model import load_model
    from engine.train_volume import served_state, train, weights_from_checkpoint

    cfg = _tiny_config(tmp_path)
    cfg.ema_decay = 0.5
    cfg.lr = 1e-2  # steps large enough that the average visibly lags the weights
    cfg.portable_checkpoint = tmp_path / "committed" / "v.ckpt.pt"
    served = train(cfg, progress=False)
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    average = served_state(ck)
    assert int(ck["ema"]["n_averaged"]) == 3
    assert set(average) == set(ck["model"])
    assert any(not torch.equal(average[k], v) for k, v in ck["model"].items())
    for k, v in served.state_dict().items():
        assert torch.equal(v.contiguous(), average[k])
    written, _ = load_model(Path(cfg.weights_out))  # type: ignore[arg-type]
    for k, v in written.state_dict().items():
        assert torch.equal(v, average[k])
    cfg.weights_out = tmp_path / "from_ckpt" / "v.pt"
    again, _ = load_model(weights_from_checkpoint(cfg, cfg.out_dir / "checkpoint.pt"))
    for k, v in again.state_dict().items():
        assert torch.equal(v, average[k])
    cfg.weights_out = tmp_path / "raw" / "v.pt"
    raw, raw_meta = load_model(
        weights_from_checkpoint(cfg, cfg.out_dir / "checkpoint.pt", average=False)
    )
    for k, v in raw.state_dict().items():
        assert torch.equal(v, ck["model"][k])
    assert raw_meta.extra["weights"] == "raw" and raw_meta.extra["validation"] == {}
    assert load_model(Path(tmp_path / "from_ckpt" / "v.pt"))[1].extra["weights"] == "average"
    slim = torch.load(cfg.portable_checkpoint, weights_only=False)
    assert all(torch.equal(slim["ema"][k], v) for k, v in ck["ema"].items())
    # resumed: the average goes on counting from where it stopped
    cfg.steps = 5
    cfg.weights_out = None
    train(cfg, resume=True, progress=False)
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5 and int(ck["ema"]["n_averaged"]) == 5


def test_a_run_without_an_average_resumes_into_one(tmp_path: Path):
    """Turning the average on when resuming a run that kept none starts it from the resumed
    weights: after two more steps it has averaged two, and it serves the average."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import served_state, train

    cfg = _tiny_config(tmp_path)
    cfg.weights_out = None
    train(cfg, progress=False)
    assert "ema" not in torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    cfg.ema_decay, cfg.steps = 0.5, 5
    served = train(cfg, resume=True, progress=False)
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 5 and int(ck["ema"]["n_averaged"]) == 2
    for k, v in served.state_dict().items():
        assert torch.equal(v.contiguous(), served_state(ck)[k])


def test_per_sample_normalisation_counts_a_dim_sample_as_much_as_a_bright_one(psf):
    """With 'batch', a sample 10x dimmer weighs 100x less; with 'sample', the same."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    target = torch.zeros(2, 41, 32, 32)
    # one bright and one 10x dimmer sample (in frame-std units, as training sees them)
    for n, scale in enumerate((1000.0, 100.0)):
        for depth, row, col in ((8, 6, 9), (20, 16, 16), (30, 24, 10)):
            target[n, depth, row, col] = scale
    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    dz = np.array([0.0, 2.0])

    def losses(normalise: str, missed: int) -> float:
        cfg = VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"normalise": normalise}}
        )
        pred = target.clone()
        pred[missed] = 0  # the model misses every object of one sample
        return volume_loss(cfg, renderer, pred, target, dz)[1]["object"]

    batch_bright, batch_dim = losses("batch", 0), losses("batch", 1)
    assert batch_bright / batch_dim == pytest.approx(100, rel=1e-3)
    assert losses("sample", 0) == pytest.approx(losses("sample", 1), rel=1e-4)


def test_far_weight_makes_far_misses_cost_more(psf):
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    target = torch.zeros(1, 41, 32, 32)
    target[0, 20, 16, 16] = 1.0  # in focus
    target[0, 4, 10, 10] = 1.0  # 8 µm from focus (away from the grid's end, as smoothing sees it)
    cost = {}
    for far in (0.0, 1.0):
        cfg = VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"far_weight": far}}
        )
        for depth in (4, 20):
            pred = target.clone()
            pred[0, depth] = 0
            cost[far, depth] = volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1][
                "object"
            ]
    assert cost[0.0, 4] == pytest.approx(cost[0.0, 20], rel=1e-3)  # unweighted: equal
    assert cost[1.0, 4] / cost[0.0, 4] == pytest.approx(1.8, rel=1e-3)  # 1 + 8 µm / 10 µm
    assert cost[1.0, 20] / cost[0.0, 20] < 1.05  # in focus: about 1


def test_compressed_terms_cost_a_faint_miss_about_what_a_bright_one_does(psf):
    """Squared error weighs a miss by brightness squared; compressed, by its log (recipe 24)."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, compress, volume_loss

    v = torch.tensor([0.0, 0.01, 100.0])
    assert torch.equal(compress(v, 0.0), v)  # off: the densities themselves
    c = compress(v, 1.0)
    assert c[0] == 0 and c[1] == pytest.approx(0.01, rel=1e-2)  # linear well below the scale
    assert c[2] == pytest.approx(np.log(101.0), rel=1e-6)  # logarithmic well above it

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    target = torch.zeros(1, 41, 32, 32)
    target[0, 12, 8, 8] = 300.0  # a bright bead
    target[0, 28, 22, 22] = 10.0  # a bead 30x fainter
    cost = {}
    for scale in (0.0, 0.1):
        cfg = VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"compress_scale": scale}}
        )
        for depth in (12, 28):
            pred = target.clone()
            pred[0, depth] = 0  # that bead missed
            cost[scale, depth] = volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1][
                "object"
            ]
    assert cost[0.0, 12] / cost[0.0, 28] == pytest.approx(900, rel=1e-3)  # 30 squared
    # compressed (at recipe 24's scale), the bright miss still costs more, but some 20 times
    # (the smoothed bright bead has more voxels above the scale), not 900
    assert 1 < cost[0.1, 12] / cost[0.1, 28] < 30


def test_source_term_costs_a_faint_miss_what_a_bright_one_does_and_ignores_haze(psf):
    """The per-source term (recipe 26) scores each true bead once, whatever its brightness,
    and nothing away from the beads: stray faint mass is the density terms' to price."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"source_weight": 1.0}}
    )
    depth = cfg.depth_um
    renderer = TorchRenderer(psf, depth, 32, 15)
    target = torch.zeros(1, 41, 32, 32)
    target[0, 12, 8, 8] = 300.0  # a bright bead
    target[0, 28, 22, 22] = 10.0  # a bead 30x fainter
    rows = torch.tensor([[[8.0, 8.0, depth[12], 300.0], [22.0, 22.0, depth[28], 10.0]]])
    beads = (rows, torch.ones(1, 2))

    def parts(pred: torch.Tensor) -> dict[str, float]:
        return volume_loss(cfg, renderer, pred, target, np.array([0.0]), beads)[1]

    assert parts(target.clone())["source"] == pytest.approx(0.0, abs=1e-9)
    miss = {}
    for z in (12, 28):
        pred = target.clone()
        pred[0, z] = 0
        miss[z] = parts(pred)
    assert miss[12]["source"] == pytest.approx(miss[28]["source"], rel=1e-4)  # 0.5 each
    assert miss[12]["object"] / miss[28]["object"] == pytest.approx(900, rel=1e-3)
    haze = target.clone()
    haze[0, :, 2, 28] = 1.0  # faint mass in an empty column, far from both beads
    assert parts(haze)["source"] == pytest.approx(0.0, abs=1e-6)
    assert parts(haze)["object"] > 0
    moved = target.clone()
    moved[0, 28], moved[0, 20, 22, 22] = 0, 10.0  # the faint bead put 4 µm off its depth
    assert parts(moved)["source"] > 0.49  # no credit: as good as missed
    # without the batch's beads, or at weight 0, there is no such part
    assert "source" not in volume_loss(cfg, renderer, target, target, np.array([0.0]))[1]
    # a batch with no beads (worm crops: one all-zero padding row) costs exactly nothing,
    # with a gradient of zeros, not NaN
    pred = haze.clone().requires_grad_(True)
    empty = (torch.zeros(1, 1, 4), torch.zeros(1, 1))
    assert volume_loss(cfg, renderer, pred, target, np.array([0.0]), empty)[1]["source"] == 0.0
    source_only = VolumeTrainConfig.model_validate(
        {
            "patch_size": 32,
            "channels": [4, 4, 8, 8],
            "loss": {"source_weight": 1.0, "object_weight": 0.0, "render_weight": 0.0},
        }
    )
    volume_loss(source_only, renderer, pred, target, np.array([0.0]), empty)[0].backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_source_far_weight_makes_a_far_miss_cost_more(psf):
    """With source_far_weight k a bead at depth z weighs 1 + k·|z|/10 µm in the per-source
    term's mean (recipe 40): at k = 2 missing a bead at +10 µm costs three times what missing
    one in focus does; at k = 0 the two cost the same, as before."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    target = torch.zeros(1, 41, 32, 32)
    target[0, 20, 8, 8] = 50.0  # in focus (0 µm)
    target[0, 40, 22, 22] = 50.0  # at the grid's end (+10 µm)
    cost = {}
    for k in (0.0, 2.0):
        cfg = VolumeTrainConfig.model_validate(
            {
                "patch_size": 32,
                "channels": [4, 4, 8, 8],
                "loss": {"source_weight": 1.0, "source_far_weight": k},
            }
        )
        depth = cfg.depth_um
        renderer = TorchRenderer(psf, depth, 32, 15)
        rows = torch.tensor([[[8.0, 8.0, depth[20], 50.0], [22.0, 22.0, depth[40], 50.0]]])
        for z in (20, 40):
            pred = target.clone()
            pred[0, z] = 0
            parts = volume_loss(
                cfg, renderer, pred, target, np.array([0.0]), (rows, torch.ones(1, 2))
            )[1]
            cost[k, z] = float(parts["source"])
    assert cost[0.0, 20] == pytest.approx(cost[0.0, 40], rel=1e-4)  # 0.5 each
    assert cost[2.0, 20] == pytest.approx(0.25, rel=1e-3)  # weights 1 and 3: 1 / 4
    assert cost[2.0, 40] == pytest.approx(0.75, rel=1e-3)  # 3 / 4


def test_render_planes_follow_the_truths_mass_when_asked():
    """With render_at_objects, the render term's planes are drawn mostly where objects are in
    focus; with 0 the draw is uniform and ignores the truth; always distinct depths."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import VolumeTrainConfig, render_depths

    target = torch.zeros(2, 41, 16, 16)
    target[:, 30, 8, 8] = 1.0  # every object at depth index 30 (+5 µm)
    hits = {}
    for share in (0.0, 0.75, 1.0):
        cfg = VolumeTrainConfig.model_validate(
            {
                "patch_size": 32,
                "channels": [4, 4, 8, 8],
                "loss": {"render_planes": 2, "render_at_objects": share},
            }
        )
        rng = np.random.default_rng(0)
        draws = [render_depths(rng, cfg, target) for _ in range(400)]
        assert all(len(set(d.tolist())) == 2 and set(d) <= set(cfg.depth_um) for d in draws)
        hits[share] = np.mean([cfg.depth_um[30] in d for d in draws])
    assert hits[0.0] < 0.1  # 2 of 41 depths: about 5 %
    assert hits[0.75] > 0.85  # 3/4 of each draw on it (plus the uniform share)
    assert hits[1.0] == 1.0
    empty = torch.zeros_like(target)  # nothing in the patch: the draw falls back to uniform
    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"render_at_objects": 1.0}}
    )
    assert len(render_depths(np.random.default_rng(1), cfg, empty)) == cfg.loss.render_planes


def test_a_render_weight_of_zero_logs_the_render_term_and_leaves_it_out(psf):
    """Recipe 23's ablation: at render weight 0 the loss is the density terms alone (and their
    gradient), while the render term is still computed and logged, as at any other weight."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    target = torch.zeros(1, 41, 32, 32)
    target[0, 20, 16, 16] = 1.0
    losses = {}
    for weight in (0.0, 1.0):
        cfg = VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"render_weight": weight}}
        )
        pred = torch.zeros_like(target)
        pred[0, 24, 16, 16] = 1.0  # the bead found 2 µm off
        pred.requires_grad_(True)
        loss, parts = volume_loss(cfg, renderer, pred, target, np.array([0.0, 2.0]))
        loss.backward()
        assert pred.grad is not None
        losses[weight] = (loss.item(), parts, pred.grad.clone())
    off, parts_off, grad_off = losses[0.0]
    on, parts_on, _ = losses[1.0]
    assert parts_off["render"] == pytest.approx(parts_on["render"]) and parts_off["render"] > 0
    assert off == pytest.approx(parts_off["object"])
    assert on == pytest.approx(parts_on["object"] + parts_on["render"])
    only_density = torch.zeros_like(target)
    only_density[0, 24, 16, 16] = 1.0
    only_density.requires_grad_(True)
    from engine.train_volume.losses import _density_term

    lc = cfg.loss
    term = _density_term(cfg, only_density, target, lc.object_sigma_px, lc.object_sigma_slices)
    term.backward()
    assert only_density.grad is not None
    assert torch.allclose(grad_off, only_density.grad)


def test_the_column_term_rewards_finding_an_object_at_any_depth(psf):
    """A far bead put at the wrong depth costs nothing in the column term, a missed one all of
    it; the density term scores the misplaced bead twice as badly as the missed one (a miss
    plus a false bead), which is why, in doubt, it teaches the network to put nothing."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"column_weight": 1.0}}
    )
    target = torch.zeros(1, 41, 32, 32)
    target[0, 20, 16, 16] = 1.0
    target[0, 4, 10, 10] = 1.0  # 8 µm from focus
    missed = target.clone()
    missed[0, 4] = 0
    misplaced = missed.clone()
    misplaced[0, 36, 10, 10] = 1.0  # found, at -8 instead of +8 µm
    parts = {
        name: volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1]
        for name, pred in (("truth", target), ("missed", missed), ("misplaced", misplaced))
    }
    assert parts["truth"]["column"] == pytest.approx(0.0, abs=1e-9)
    assert parts["misplaced"]["column"] == pytest.approx(0.0, abs=1e-9)
    assert parts["missed"]["column"] > 0.1
    assert parts["misplaced"]["object"] == pytest.approx(2 * parts["missed"]["object"], rel=1e-3)


def test_the_excess_term_prices_a_ghost_by_its_light_and_nothing_near_the_truth(psf):
    """A ghost far from every true object costs its share of the truth's light, a faint one
    as much per photon as a bright one (the squared density term prices it at its square);
    density drawn a µm from the truth, or the truth itself, costs nothing here."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"excess_weight": 1.0}}
    )
    target = torch.zeros(1, 41, 32, 32)
    target[0, 8, 10, 10] = 1.0  # a bead 6 µm above focus
    target[0, 20, 22, 22] = 1.0  # and one in focus

    def excess(pred: torch.Tensor) -> float:
        return volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1]["excess"]

    near = target.clone()
    near[0, 8, 10, 10], near[0, 10, 10, 11] = 0.5, 0.5  # half of it 1 µm deeper, a px over
    faint, bright = target.clone(), target.clone()
    faint[0, 32, 10, 10] += 0.1  # mirrored: 6 µm below focus, nothing there
    bright[0, 32, 10, 10] += 1.0
    assert excess(target) == pytest.approx(0.0, abs=1e-9)
    assert excess(near) == pytest.approx(0.0, abs=1e-9)
    assert excess(faint) == pytest.approx(0.1 / 2, rel=1e-4)  # a tenth of one of 2 beads
    assert excess(bright) == pytest.approx(10 * excess(faint), rel=1e-4)
    # the object term (squared) prices the faint ghost at far less than a tenth the bright's
    object_of = {
        name: volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1]["object"]
        for name, pred in (("faint", faint), ("bright", bright))
    }
    assert object_of["faint"] < 0.02 * object_of["bright"]
    plain = VolumeTrainConfig.model_validate({"patch_size": 32, "channels": [4, 4, 8, 8]})
    assert "excess" not in volume_loss(plain, renderer, faint, target, np.array([0.0]))[1]


def test_the_cdf_term_costs_a_guess_by_its_distance_and_less_than_a_miss(psf):
    """The depth-CDF term: a bead placed 1 or 4 slices off costs in proportion, both less than
    missing it; the density term scores every misplacement as worse than the miss."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"cdf_weight": 1.0}}
    )
    target = torch.zeros(1, 41, 32, 32)
    target[0, 4, 10, 10] = 1.0  # 8 µm from focus
    preds = {"truth": target, "missed": torch.zeros_like(target)}
    for off in (1, 4):
        preds[f"off {off}"] = torch.zeros_like(target)
        preds[f"off {off}"][0, 4 + off, 10, 10] = 1.0
    parts = {
        name: volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1]
        for name, pred in preds.items()
    }
    assert parts["truth"]["cdf"] == pytest.approx(0.0, abs=1e-9)
    assert parts["off 4"]["cdf"] == pytest.approx(4 * parts["off 1"]["cdf"], rel=1e-3)
    assert parts["off 4"]["cdf"] < parts["missed"]["cdf"] / 2
    assert parts["off 4"]["object"] > parts["missed"]["object"]


def test_the_depth_likelihood_term_scores_where_not_how_much(psf):
    """The depth-likelihood term: a bead at its depth scores near 0, at the truth's brightness
    or a tenth of it; a broad guess around it costs less than an empty column, which costs less
    than a sharp wrong guess; scaling truth and prediction together changes nothing; and in
    one batch an empty column under a dim bead is pushed as hard as one under a bright bead."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss
    from engine.train_volume.losses import _depth_nll_term

    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"depth_nll_weight": 1.0}}
    )

    def scored(brightness: float) -> dict[str, float]:
        target = torch.zeros(1, 41, 32, 32)
        target[0, 8, 10, 10] = brightness  # 6 µm from focus
        preds = {"empty": torch.zeros_like(target)}
        for name, depths, share in (
            ("right", [8], 1.0),
            ("right, a tenth", [8], 0.1),
            ("broad", range(5, 12), 1 / 7),
            ("wrong", [14], 1.0),
        ):
            preds[name] = torch.zeros_like(target)
            for k in depths:
                preds[name][0, k, 10, 10] = brightness * share
        return {
            name: volume_loss(cfg, renderer, pred, target, np.array([0.0]))[1]["depth_nll"]
            for name, pred in preds.items()
        }

    bright, dim = scored(1.0), scored(1e-3)
    assert bright["right"] < 0.05
    assert bright["right"] < bright["right, a tenth"] < 0.15
    assert bright["right, a tenth"] < bright["broad"] < bright["empty"] < bright["wrong"]
    assert 1.0 < bright["empty"] < np.log(41)  # a uniform guess: log(D) less the truth's entropy
    for name in bright:
        assert dim[name] == pytest.approx(bright[name], rel=1e-3)

    target = torch.zeros(1, 41, 32, 32)
    target[0, 8, 8, 8] = 1.0
    target[0, 30, 24, 24] = 1e-3
    pred = torch.zeros_like(target, requires_grad=True)
    _depth_nll_term(pred, target, 1.0, 0.75).backward()
    push_bright, push_dim = -pred.grad[0, 8, 8, 8], -pred.grad[0, 30, 24, 24]
    assert push_bright > 0 and push_dim == pytest.approx(push_bright.item(), rel=1e-2)


def test_the_coarse_term_gives_partial_credit_for_a_near_miss(psf):
    """Density 2 px and a slice off a bead: the fine term scores it no better than nothing, the
    coarse term as most of the way there (a gradient to follow towards faint objects)."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import TorchRenderer, VolumeTrainConfig, volume_loss

    cfg = VolumeTrainConfig.model_validate(
        {"patch_size": 32, "channels": [4, 4, 8, 8], "loss": {"coarse_weight": 1.0}}
    )
    renderer = TorchRenderer(psf, depth_grid(), 32, 15)
    target = torch.zeros(1, 41, 32, 32)
    target[0, 10, 16, 16] = 1000.0
    near = torch.zeros_like(target)
    near[0, 11, 16, 18] = 1000.0
    dz = np.array([0.0])
    nothing = volume_loss(cfg, renderer, torch.zeros_like(target), target, dz)[1]
    miss = volume_loss(cfg, renderer, near, target, dz)[1]
    assert miss["object"] >= 0.9 * nothing["object"]  # the fine term: no credit
    assert miss["coarse"] <= 0.5 * nothing["coarse"]  # the coarse term: most of the way


def test_a_density_channel_gone_negative_still_learns_in_training():
    """The final ReLU leaks while training (a dead depth channel comes back), not at inference."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.model import build_model

    torch.manual_seed(0)  # the weights and the input below are random: the same each run
    model = build_model("volume", channels=(4, 4, 8), out_channels=3)
    model.train_leak = 0.01  # train_volume sets it from the config
    with torch.no_grad():
        model.head.bias[1] = -100.0  # channel 1 negative everywhere: dead under a plain ReLU
    x = torch.randn(1, 1, 16, 16)
    model.eval()
    assert model(x)[0, 1].abs().max() == 0 and model(x).min() >= 0
    model.train()
    model(x)[0, 1].sum().backward()
    assert model.head.bias.grad is not None and model.head.bias.grad[1] > 0


def test_training_starts_from_given_weights(trained: Path, tmp_path: Path):
    """init_from loads a shipped .pt (or a checkpoint) with a fresh optimiser, at step 0."""
    import torch

    from engine.train_volume import train

    cfg = _tiny_config(tmp_path)
    cfg.steps, cfg.lr, cfg.weights_out = 1, 1e-12, None
    cfg.init_from = trained
    model = train(cfg, progress=False)
    shipped = torch.load(trained, weights_only=True)
    assert all(
        torch.allclose(v, shipped[k], atol=1e-6) for k, v in model.state_dict().items()
    )  # a learning rate of 1e-12 leaves the loaded weights as they were
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 1
    # a wider depth grid (49 depths, ±12 µm): the body is loaded, the head starts fresh
    wide = _tiny_config(tmp_path / "wide")
    wide.steps, wide.lr, wide.weights_out = 1, 1e-12, None
    wide.depth_half_range_um, wide.init_from = 12.0, trained
    widened = train(wide, progress=False)
    assert widened.head.weight.shape[0] == 49
    assert torch.allclose(widened.stem.weight, shipped["stem.weight"], atol=1e-6)
    cfg.init_from, cfg.out_dir = tmp_path / "missing.pt", tmp_path / "refused"
    with pytest.raises(FileNotFoundError, match="init_from"):
        train(cfg, progress=False)
    # weights of another network (here one tensor of it) would pass for a fine-tune
    torch.save({"stem.weight": shipped["stem.weight"]}, tmp_path / "foreign.pt")
    cfg.init_from = tmp_path / "foreign.pt"
    with pytest.raises(ValueError, match=r"fits 1 of this network's \d+ tensors"):
        train(cfg, progress=False)
    assert not cfg.out_dir.exists()  # a run refused at its start leaves no empty folder


def test_lab_loss_scores_the_true_density_above_none_and_a_depth_flipped_one(psf):
    """Render-only supervision from a focal stack, as a lab's stack gives it: the sample's
    true density explains the other planes; no density, or one at mirrored depths, does not."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.metadata import normalize_images
    from engine.optics import CameraConfig
    from engine.train_volume import TorchRenderer, lab_loss

    pair = simulate_volume_pair(
        "beads",
        shape=(64, 64),
        focus_um=[-2.0, 0.0, 2.0],
        seed=3,
        camera=CameraConfig(peak_photons=3000.0, background_photons=10.0),
    )
    frames = pair.frames.astype(np.float32)
    _, _, std = normalize_images(frames[1:2])
    frame = torch.from_numpy(frames[1:2][None] / std[0])
    targets = torch.from_numpy(frames[[0, 2]][None] / std[0])  # the planes 2 µm either side
    truth = torch.from_numpy(pair.objects_counts[1][None] / std[0])
    renderer = TorchRenderer(psf, depth_grid(), 64, 63)
    dz = np.array([-2.0, 2.0])
    true = lab_loss(renderer, truth, frame, targets, dz).item()
    assert true < 0.5 * lab_loss(renderer, torch.zeros_like(truth), frame, targets, dz).item()
    assert true < 0.5 * lab_loss(renderer, truth.flip(1), frame, targets, dz).item()


def test_training_on_a_lab_stack(tmp_path: Path):
    """A lab's focus-scanned TIFF trains the volume model every other step (render loss)."""
    pytest.importorskip("torch", reason="training extra not installed")
    import tifffile

    from engine.train_volume import VolumeTrainConfig, train

    stack = simulate_focal_stack("beads", shape=(64, 64), z_um=np.arange(-3, 3.01, 0.5), seed=9)
    tifffile.imwrite(tmp_path / "lab.tif", stack.images)
    tiny = _tiny_config(tmp_path).model_dump()
    lab = {"lab_stacks": [{"path": tmp_path / "lab.tif", "z_step_um": 0.5}], "lab_every": 2}
    cfg = VolumeTrainConfig.model_validate(
        tiny | {"steps": 4, "weights_out": None, "data": tiny["data"] | lab}
    )
    train(cfg, progress=False)
    import torch

    history = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["history"]
    lab = [h["lab"] for h in history if "lab" in h]
    assert len(lab) == 2 and all(np.isfinite(lab))
    assert all("object" in h for h in history if "lab" not in h)


def test_lab_stacks_must_sit_on_the_depth_grid(tmp_path: Path):
    pytest.importorskip("torch", reason="training extra not installed")
    from pydantic import ValidationError

    from engine.train_volume import VolumeTrainConfig

    base = {"patch_size": 32, "channels": [4, 4, 8, 8]}
    with pytest.raises(ValidationError, match="not a multiple of the depth grid"):
        VolumeTrainConfig.model_validate(
            base | {"data": {"lab_stacks": [{"path": "x.tif", "z_step_um": 0.3}], "lab_every": 2}}
        )
    with pytest.raises(ValidationError, match=r"needs at least one data\.lab_stacks"):
        VolumeTrainConfig.model_validate(base | {"data": {"lab_every": 2}})
    # listed but never trained on (review 36): refused rather than loaded for nothing
    with pytest.raises(ValidationError, match=r"data\.lab_every is 0"):
        VolumeTrainConfig.model_validate(
            base | {"data": {"lab_stacks": [{"path": "x.tif", "z_step_um": 0.5}]}}
        )


def test_matched_filter_kernels_find_a_far_bead_at_its_depth():
    """A bead 6 µm from focus answers most in the 6 µm channels; the kernels ignore a flat
    background (zero mean) and compare across depths (unit norm)."""
    import torch

    from engine.model import MatchedFilterPrimer
    from engine.optics import make_psf
    from engine.volume import matched_filter_kernels

    depths = [-6.0, -3.0, 3.0, 6.0]
    kernels = matched_filter_kernels(OpticsConfig(), depths, bin=4, kernel=17)
    assert kernels.shape == (4, 1, 17, 17)
    np.testing.assert_allclose(kernels.sum(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose((kernels**2).sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    frame = np.zeros((128, 128), np.float32)
    frame[32:95, 32:95] = 5000 * make_psf(OpticsConfig(), np.array([-6.0]), 63)[0]
    frame += np.random.default_rng(0).normal(0.0, 0.01, frame.shape).astype(np.float32) + 7.0
    primer = MatchedFilterPrimer(depths, bin=4, kernel=17)
    primer.kernels.copy_(torch.from_numpy(kernels))
    with torch.no_grad():
        r = primer(torch.from_numpy(frame)[None, None])[0, :, 64, 64].numpy()
    assert max(r[0], r[3]) > 1.2 * max(r[1], r[2])  # measured 1.44 (kernels 3 and 6 µm overlap)


def test_a_primed_model_starts_as_the_old_one_and_exports(trained: Path, tmp_path: Path):
    """Fine-tuning with primer channels starts from the old model exactly (their stem weights
    at zero), and the primed model exports to ONNX with the same planes as torch."""
    pytest.importorskip("onnx", reason="export extra not installed")
    import torch

    from engine.runtime import load_backend
    from engine.train_volume import train

    cfg = _tiny_config(tmp_path)
    cfg.steps, cfg.lr, cfg.init_from = 1, 1e-12, trained
    cfg.primer_depths_um, cfg.primer_kernel = [-6.0, 6.0], 5
    model = train(cfg, progress=False)
    assert model.primer is not None and model.stem.in_channels == 3
    assert float(model.stem.weight[:, 1:].detach().abs().max()) < 1e-6
    frame = simulate_volume_pair("beads", shape=(64, 64), seed=9).frames[0]
    dpms = np.stack([np.full((64, 64), z, np.float32) for z in (-3.0, 0.0, 1.5)])
    old = load_backend(trained, prefer=["torch"]).infer(frame, dpms)
    primed = load_backend(cfg.weights_out, prefer=["torch"])
    np.testing.assert_allclose(primed.infer(frame, dpms), old, rtol=1e-4, atol=1e-3)
    assert_onnx_serves_like_torch(cfg.weights_out, tmp_path / "primed.onnx", frame)
    assert torch.load(cfg.weights_out, weights_only=True)["primer.kernels"].abs().sum() > 0


def test_a_volume_export_without_its_bank_leaves_the_model_it_was_to_replace(
    trained: Path, tmp_path: Path
):
    """The bank is checked before the new ONNX replaces the output (review 36: the ONNX was
    written first, then the bank copy failed, leaving a new model beside no bank)."""
    pytest.importorskip("onnx", reason="export extra not installed")
    import shutil

    from export import export_weights

    weights = tmp_path / "w" / trained.name
    weights.parent.mkdir()
    for f in trained.parent.glob(trained.stem + ".*"):
        shutil.copy(f, weights.parent / f.name)
    bank = next(weights.parent.glob("*.psf.npy"))
    bank.unlink()
    out = tmp_path / "vol.onnx"
    out.write_bytes(b"the model it was to replace")
    with pytest.raises(FileNotFoundError, match="PSF bank not found"):
        export_weights(weights, out)
    assert out.read_bytes() == b"the model it was to replace"
    assert not (tmp_path / bank.name).exists()


def test_backends_serve_volume_models(trained: Path, tmp_path: Path):
    """torch and ONNX Runtime give the same planes through `infer`; ONNX parity holds."""
    pytest.importorskip("onnx", reason="export extra not installed")
    from engine.runtime import load_backend
    from export import export_weights

    onnx_path = tmp_path / "vol.onnx"
    report = export_weights(trained, onnx_path)
    assert report.ok
    frame = simulate_volume_pair("beads", shape=(64, 64), seed=9).frames[0]
    dpms = np.stack([np.full((64, 64), z, np.float32) for z in (-3.0, 0.0, 1.5)])
    tilt = np.tile(np.linspace(-2.0, 2.0, 64, dtype=np.float32), (64, 1))[None]
    results = {}
    for name, path in (("torch", trained), ("onnxruntime", onnx_path)):
        backend = load_backend(path, prefer=[name])
        assert backend.name == name
        results[name] = (backend.infer(frame, dpms), backend.infer(frame, tilt))
        assert results[name][0].shape == (3, 64, 64) and results[name][1].shape == (1, 64, 64)
    for a, b in zip(results["torch"], results["onnxruntime"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2)


def test_volume_backend_without_psf_bank_is_one_clear_error(trained: Path, tmp_path: Path):
    import shutil

    from engine.runtime import BackendError, load_backend

    for name in ("vol.pt", "vol.json"):
        shutil.copy(trained.parent / name, tmp_path / name)
    with pytest.raises(BackendError, match="PSF bank"):
        load_backend(tmp_path / "vol.pt", prefer=["torch"])


def test_confocal_bank_sections_optically():
    """Cross-modality target: excitation x detection PSF, dimmer away from focus than wide-field."""
    z = depth_grid()
    conf = psf_bank(OpticsConfig(), z, modality="confocal")
    wide = psf_bank(OpticsConfig(), z)
    sums = conf.sum(axis=(1, 2))
    assert conf.shape == wide.shape and abs(sums[40] - 1.0) < 1e-5
    assert sums[40 + 8] < 0.5 and sums[40 - 8] < 0.5  # 4 µm out of focus: sectioned
    assert conf[40].max() > wide[40].max()  # narrower in focus (the shorter excitation)


def test_training_to_confocal_targets(tmp_path: Path):
    pytest.importorskip("torch", reason="training extra not installed")
    from engine.metadata import ModelMetadata
    from engine.train_volume import train

    cfg = _tiny_config(tmp_path)
    cfg.target_modality = "confocal"
    train(cfg, progress=False)
    meta = ModelMetadata.from_file(Path(cfg.weights_out).with_suffix(".json"))  # type: ignore[arg-type]
    assert meta.volume is not None and meta.volume.modality == "confocal"
    bank = np.load(Path(cfg.weights_out).parent / meta.volume.psf_file)  # type: ignore[arg-type]
    assert bank[40].sum() == pytest.approx(1.0, abs=1e-4) and bank[0].sum() < 0.2


def test_refocus_frames_onto_a_plan_with_drift(trained: Path):
    """One call per frame stack; a drift offset of +1 µm equals asking for planes 1 µm deeper."""
    from engine.dpm import VolumePlan
    from engine.runtime import load_backend

    backend = load_backend(trained, prefer=["torch"])
    focus = np.array([0.0, 1.0])
    frames = simulate_volume_pair("beads", shape=(64, 64), seed=9, focus_um=focus).frames
    plan = VolumePlan.from_z([-2.0, 0.0, 2.0], (64, 64))
    out = backend.refocus(frames, plan, offsets_um=np.array([0.0, 1.0]))
    assert out.shape == (2, 3, 64, 64)
    deeper = backend.infer(frames[1], VolumePlan.from_z([-1.0, 1.0, 3.0], (64, 64)).dpms_um)
    np.testing.assert_allclose(out[1], deeper, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="offsets_um"):
        backend.refocus(frames, plan, offsets_um=np.array([0.0]))
    # the live worker's call: one frame, a drift between lattice planes; the planes are
    # rendered from the density without reading the DPMs, the same as `infer` with them
    one = backend.refocus(frames[1], plan, offsets_um=np.array([0.3]))
    shifted = backend.infer(frames[1], plan.dpms_um + np.float32(0.3))
    np.testing.assert_allclose(one[0], shifted, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="do not match the plan"):
        backend.refocus(frames[:, :32], plan)
    with pytest.raises(ValueError, match="numeric"):
        backend.refocus(np.full((64, 64), "x"), plan)


def test_uniform_planes_off_the_lattice_are_interpolated(trained: Path):
    """A plane between two depth-grid planes is their linear blend (rendered once, in a batch)."""
    from engine.runtime import load_backend

    backend = load_backend(trained, prefer=["torch"])
    frame = simulate_volume_pair("beads", shape=(64, 64), seed=9).frames[0]
    z = np.array([0.0, 0.25, 0.5, 10.0], np.float32)
    out = backend.infer(frame, np.broadcast_to(z[:, None, None], (4, 64, 64)))
    np.testing.assert_allclose(out[1], 0.5 * (out[0] + out[2]), rtol=1e-5, atol=1e-3)
    assert np.isfinite(out[3]).all()  # the top of the grid needs no plane above it


def test_the_lab_loss_low_pass_is_the_runtimes(psf):
    """The training twin of the runtime's residual low-pass (a normalised convolution inside
    the frame): a frame with an offset and a gradient is low-passed the same way by both, up to
    the edges, so the lab loss scores the planes a user will see."""
    pytest.importorskip("torch", reason="training extra not installed")
    import torch

    from engine.train_volume import lowpass_residual

    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    rng = np.random.default_rng(0)
    frame = 400.0 + 2.0 * xx - yy + rng.normal(0, 5, (64, 64)).astype(np.float32)
    runtime = Renderer(psf, depth_grid(), (64, 64), threads=1).planes(
        np.zeros((41, 64, 64), np.float32), frame, np.array([0.0])
    )[0]
    twin = lowpass_residual(torch.from_numpy(frame)[None, None])[0, 0].numpy()
    assert np.abs(twin - runtime).max() < 0.01 * np.abs(runtime).mean()
    assert np.abs(twin[30:34, 30:34] - frame[30:34, 30:34].mean()).max() < 20.0


def test_a_frame_smaller_than_the_psf_renders_a_point_as_the_psf(psf):
    """A small camera ROI (40 x 40 px, smaller than the 127 px PSF bank's planes) renders: a
    point in focus comes out as the in-focus PSF around it (the FFT grid holds the PSF)."""
    objects = np.zeros((41, 40, 40), np.float32)
    objects[20, 20, 20] = 1.0  # depth 0 (the middle of the 41-depth grid)
    plane = Renderer(psf, depth_grid(), (40, 40), threads=1).render(objects, np.array([0.0]))[0]
    c = psf.shape[-1] // 2
    expected = psf[psf.shape[0] // 2, c - 20 : c + 20, c - 20 : c + 20]
    np.testing.assert_allclose(plane, expected, atol=1e-6 * float(psf.max()) + 1e-7)


def test_planes_rendered_straight_into_float16_are_the_float32_planes_rounded(trained: Path):
    """What the daemon records: `refocus(dtype=np.float16)` writes each plane in float16 as
    it is made; the values are float32's rounded to float16, and beyond its range inf (which
    the worker saturates, `live.store.as_stack_dtype(saturate_same=True)`)."""
    from engine.dpm import VolumePlan
    from engine.runtime import load_backend
    from live.store import as_stack_dtype

    backend = load_backend(trained, prefer=["torch"])
    frame = simulate_volume_pair("beads", shape=(64, 64), seed=9).frames[0]
    plan = VolumePlan.from_z([-2.0, 0.0, 2.0], (64, 64))
    full = backend.refocus(frame, plan)
    half = backend.refocus(frame, plan, dtype=np.float16)
    assert half.dtype == np.float16 and half.shape == full.shape
    np.testing.assert_array_equal(half, full.astype(np.float16))
    drifted = backend.refocus(frame, plan, np.array([0.25]), dtype=np.float16)  # interpolated
    np.testing.assert_array_equal(
        drifted, backend.refocus(frame, plan, np.array([0.25])).astype(np.float16)
    )
    gain = np.float32(2 * 65504 / float(full.max()))  # an overexposed frame: twice the range
    bright = backend.refocus(frame * gain, plan, dtype=np.float16)[0]
    assert np.isinf(bright).any()  # beyond 65504 counts
    assert as_stack_dtype(bright, "float16")[1] == 0  # without: passed on as it is
    infinite = int(np.isinf(bright).sum())
    stack, clipped = as_stack_dtype(bright, "float16", saturate_same=True)  # in place
    assert clipped == infinite > 0 and np.isfinite(stack).all()
    assert float(np.abs(stack).max()) == 65504.0


def test_refocus_of_a_padded_frame_is_infer_on_it(trained: Path):
    """A frame that is not a multiple of the network's 32 px (48 x 80, padded to 64 x 96):
    the fast path crops the network's output as `infer` does."""
    from engine.dpm import VolumePlan
    from engine.runtime import load_backend

    backend = load_backend(trained, prefer=["torch"])
    frame = simulate_volume_pair("beads", shape=(48, 80), seed=4).frames[0]
    plan = VolumePlan.from_z([-3.0, 0.0, 1.5], (48, 80))
    np.testing.assert_allclose(
        backend.refocus(frame, plan)[0], backend.infer(frame, plan.dpms_um), rtol=1e-5, atol=1e-3
    )


def test_the_renderers_threads_and_paths_agree(psf):
    """An odd frame (100 x 50: a grid of 180 rows, not a multiple of the depth blocks): one
    thread and two give the same planes; few planes (summed directly) equal the same planes of
    the depth convolution; an empty density in float16 is the low-passed frame."""
    rng = np.random.default_rng(2)
    objects = np.zeros((41, 100, 50), np.float32)
    objects[rng.integers(41, size=30), rng.integers(100, size=30), rng.integers(50, size=30)] = 50.0
    frame = rng.uniform(90, 110, (100, 50)).astype(np.float32)
    dz = depth_grid()
    one = Renderer(psf, dz, (100, 50), threads=1)
    two = Renderer(psf, dz, (100, 50), threads=2)
    assert one.grid[0] % 8 != 0
    np.testing.assert_array_equal(one.planes(objects, frame, dz), two.planes(objects, frame, dz))
    few = two.render(objects, dz[[3, 20, 37]])  # 3 planes x 30 depths: the direct sum
    np.testing.assert_allclose(few, two.render(objects, dz)[[3, 20, 37]], atol=1e-4 * 50)
    empty = two.planes(np.zeros_like(objects), frame, dz[:2], dtype=np.float16)
    assert empty.dtype == np.float16
    np.testing.assert_allclose(empty[0], empty[1])
    np.testing.assert_allclose(empty[0], frame.mean(), rtol=0.03)  # the noise low-passed


def test_samples_draw_their_psf_model_and_only_the_frames_change(tmp_path: Path):
    pytest.importorskip("torch", reason="training extra not installed")
    from pydantic import ValidationError

    from engine.train_volume import (
        Sample,
        VolumeTrainConfig,
        build_volume_model,
        make_volume_metadata,
    )

    def config(models: list[str]) -> VolumeTrainConfig:
        data = {"stack_shape": [64, 64], "psf_models": models, "kinds": ["beads"]}
        data |= {"kind_weights": [1.0], "start_kind_weights": [1.0]}
        return VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "data": data}
        )

    both = config(["scalar", "vectorial"])
    drawn = [Sample(both, seed, [1.0]).optics.psf_model for seed in range(8)]
    assert set(drawn) == {"scalar", "vectorial"}
    scalar, vectorial = (Sample(config([m]), 3, [1.0]) for m in ("scalar", "vectorial"))
    assert (scalar.optics.psf_model, vectorial.optics.psf_model) == ("scalar", "vectorial")
    for axis in ("x_um", "y_um", "z_um", "intensity"):  # the same sample, other optics
        np.testing.assert_array_equal(
            getattr(scalar.objects, axis), getattr(vectorial.objects, axis)
        )
    assert not np.allclose(scalar.inputs, vectorial.inputs, atol=1e-3)  # other frames
    with pytest.raises(ValidationError, match="lists a model twice"):
        config(["vectorial", "vectorial"])
    with pytest.raises(ValidationError, match="both name the frames' PSF model"):
        VolumeTrainConfig.model_validate(
            {"optics": {"psf_model": "vectorial"}, "data": {"psf_models": ["vectorial"]}}
        )
    meta = make_volume_metadata(both, build_volume_model(both), "psf.npy", {})
    assert "scalar Gibson-Lanni and vectorial PSF" in meta.trained_on


def test_frames_held_on_the_spline_kernel_reach_training_with_the_targets_unchanged() -> None:
    """data.frame_points "spline" (session 36) changes what the network sees, a bead as a
    camera images it, and not what it learns to place: the density targets stay the split's.
    The model's metadata says so; an unknown convention is refused at config time."""
    pytest.importorskip("torch", reason="training extra not installed")
    from pydantic import ValidationError

    from engine.train_volume import (
        Sample,
        VolumeTrainConfig,
        build_volume_model,
        make_volume_metadata,
    )

    def config(points: str) -> VolumeTrainConfig:
        data = {"stack_shape": [64, 64], "kinds": ["beads"], "frame_points": points}
        data |= {"kind_weights": [1.0], "start_kind_weights": [1.0]}
        return VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "data": data}
        )

    split, spline = (Sample(config(p), 3, [1.0]) for p in ("linear", "spline"))
    np.testing.assert_array_equal(split.objects.x_um, spline.objects.x_um)
    # the same density, in each frame's own normalised units (a per-frame scale)
    for f in range(split.targets.shape[0]):
        lit = split.targets[f] > 1e-3
        ratio = spline.targets[f][lit] / split.targets[f][lit]
        assert lit.sum() > 100 and np.ptp(ratio) < 1e-4 * ratio.mean()
        np.testing.assert_array_equal(spline.targets[f][~lit] <= 1e-3, True)
    assert not np.allclose(split.inputs, spline.inputs, atol=1e-3)
    cfg = config("spline")
    meta = make_volume_metadata(cfg, build_volume_model(cfg), "psf.npy", {})
    assert "frames' beads on the spline kernel" in meta.trained_on
    plain = config("linear")
    described = make_volume_metadata(plain, build_volume_model(plain), "psf.npy", {})
    assert "kernel" not in described.trained_on
    with pytest.raises(ValidationError, match="frame_points"):
        config("cubic")


def test_training_through_a_measured_bank_images_renders_and_ships_that_bank(tmp_path: Path):
    """optics psf_model "measured" (session 30): a lab's measured bank is what the frames are
    imaged through, what the render term renders through and the bank the model ships with
    (its planes, where the bank reaches); its metadata names the bank and its hash. A missing
    bank stops the run at its start with one line (the CLI: exit 2), not at the first sample."""
    pytest.importorskip("torch", reason="training extra not installed")
    from pydantic import ValidationError

    from engine.metadata import ModelMetadata
    from engine.optics import OpticsConfig
    from engine.train_volume import Sample, VolumeTrainConfig, main, train
    from engine.volume import load_psf_bank, psf_bank

    cfg = _tiny_config(tmp_path)
    # a "measured" bank: the scalar one made wider (a softer objective), ±5 µm only
    bank = psf_bank(OpticsConfig(), np.arange(-2.5, 2.51, 0.5), size_px=63)
    bank = (bank + np.roll(bank, 1, axis=1) + np.roll(bank, 1, axis=2)) / 3
    path = tmp_path / "measured.npy"
    np.save(path, bank)
    cfg.optics = {"psf_model": "measured", "psf_bank": str(path)}
    measured = Sample(cfg, 4, [0.35, 0.35, 0.30])
    cfg_scalar = _tiny_config(tmp_path)
    scalar = Sample(cfg_scalar, 4, [0.35, 0.35, 0.30])
    for axis in ("x_um", "y_um", "z_um", "intensity"):  # the same sample
        np.testing.assert_array_equal(
            getattr(measured.objects, axis), getattr(scalar.objects, axis)
        )
    assert not np.allclose(measured.inputs, scalar.inputs, atol=1e-3)  # imaged through another PSF
    train(cfg, progress=False)
    meta = ModelMetadata.from_file(Path(str(cfg.weights_out)).with_suffix(".json"))
    assert meta.volume is not None
    served = load_psf_bank(Path(str(cfg.weights_out)).parent / meta.volume.psf_file, 41)
    c = served.shape[-1] // 2
    np.testing.assert_allclose(served[30:51, c - 31 : c + 32, c - 31 : c + 32], bank, atol=1e-6)
    assert f"measured ({path}, sha256 " in meta.trained_on
    # the run's checkpoint knows its bank: a resume through a bank measured again is refused
    np.save(path, np.roll(bank, 1, axis=0))
    from engine.train import TrainConfigError  # one line from the command line (review 72)

    with pytest.raises(TrainConfigError, match="trained through another PSF bank"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"does not divide the simulator's 0\.5 µm slices"):
        train(cfg.model_copy(update={"optics": {**cfg.optics, "psf_bank_step_um": 0.3}}))
    with pytest.raises(ValidationError, match="renders wide-field targets only"):
        VolumeTrainConfig.model_validate({"optics": cfg.optics, "target_modality": "confocal"})
    cfg.optics = {"psf_model": "measured", "psf_bank": str(tmp_path / "gone.npy")}
    with pytest.raises(ValueError, match=r"optics.psf_bank: .*gone.npy: PSF bank not found"):
        train(cfg, progress=False)
    toml = tmp_path / "gone.toml"
    toml.write_text(
        f'out_dir = "{tmp_path / "run2"}"\n[optics]\npsf_model = "measured"\n'
        f'psf_bank = "{tmp_path / "gone.npy"}"\n'
    )
    assert main(["--config", str(toml)]) == 2


def test_a_body_model_learns_the_bodys_glow_beside_its_density_and_serves_the_density(
    tmp_path: Path,
):
    """`body = true` (session 28): the batch's body glow is cut and turned exactly as its
    frame; training logs the body term and validates the glow; the written model rebuilds its
    body head, serves the same density through `forward` and exports to ONNX with planes
    equal to torch's. A head without its term, or the term without the head, is refused."""
    pytest.importorskip("onnx", reason="export extra not installed")
    import torch
    from pydantic import ValidationError

    from engine.model import load_model
    from engine.train_volume import Sample, VolumeTrainConfig, sample_batch, train

    cfg = _tiny_config(tmp_path)
    cfg = VolumeTrainConfig.model_validate(
        cfg.model_dump() | {"body": True, "loss": {"body_weight": 1.0}, "steps": 4}
    )
    # alignment: a sample whose frames are its own body glow gives inputs == body
    worm = Sample(cfg, 5, [0.0, 1.0, 0.0])
    assert worm.kind == "worm" and worm.body is not None and worm.body.max() > 0.1
    worm.inputs = worm.body.copy()
    batch = sample_batch(np.random.default_rng(0), [worm], cfg)
    assert batch.body is not None and batch.body.shape == batch.inputs.shape
    torch.testing.assert_close(batch.body, batch.inputs)

    model = train(cfg, progress=False)
    assert model.body_head is not None
    history = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["history"]
    assert all("body" in row and np.isfinite(row["body"]) for row in history)
    assert np.isfinite(history[-1]["val_body_relative_rms"])
    loaded, meta = load_model(cfg.weights_out)  # type: ignore[arg-type]
    assert meta.architecture["body"] is True and loaded.body_head is not None
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32))
    with torch.no_grad():
        density, _, glow = loaded.eval().outputs(x)
        torch.testing.assert_close(loaded(x), density)
    assert glow is not None and glow.shape == (1, 1, 64, 64)
    frame = np.random.default_rng(1).poisson(50, (64, 64)).astype(np.uint16)
    # the body probe scores a body model's own head: its glow in counts, one per pixel
    from engine.body_probe import predict_glow

    counts = predict_glow(loaded, None, frame)
    assert counts.shape == (64, 64) and np.isfinite(counts).all()
    assert_onnx_serves_like_torch(cfg.weights_out, tmp_path / "body.onnx", frame)

    for bad in ({"body": True}, {"loss": {"body_weight": 1.0}}):
        with pytest.raises(ValidationError, match="go together"):
            VolumeTrainConfig.model_validate(_tiny_config(tmp_path).model_dump() | bad)


def test_every_shipped_volume_config_loads():
    """Each recipe under configs/ (the GPU ones, the body recipe's, the probe's) validates, so
    a command the docs give does not stop at its config."""
    from engine.train_volume import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    paths = [*sorted(configs.glob("train_volume*.toml")), configs / "body_probe_textured.toml"]
    assert configs / "train_volume_v44.toml" in paths  # the shipped model's recipe among them
    body = {p.name for p in paths if load_config(p).body}
    assert body == {"train_volume_v35.toml", "train_volume_gpu_body.toml"}


def test_an_accumulated_step_averages_its_batches_gradients(tmp_path: Path, psf):
    """grad_accumulation = 2: the optimiser sees the mean of two batches' gradients, the first
    batch drawn as a step without accumulation draws it (runs before it stay reproducible)."""
    torch = pytest.importorskip("torch", reason="training extra not installed")
    from engine import train_volume as tv

    base = _tiny_config(tmp_path)
    cfg = base.model_copy(update={"grad_accumulation": 2, "grad_clip": 1e9})
    dev = torch.device("cpu")
    renderer = tv.TorchRenderer(psf, cfg.depth_um, cfg.patch_size, cfg.loss.render_psf_px, dev)
    pool = [tv.Sample(cfg, 9_000 + i, cfg.data.kind_weights) for i in range(2)]

    def fresh():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = tv.build_volume_model(cfg)
        return model, tv.build_optimiser(cfg, model)

    model, opt = fresh()
    values = tv.training_step(cfg, model, opt, renderer, pool, 5, dev, False)
    stepped = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    by_hand, _ = fresh()
    losses = []
    for key in ([cfg.seed, 5], [cfg.seed, 5, 1]):
        loss, _ = tv.batch_loss(
            cfg, by_hand, renderer, pool, 5, dev, False, (), key, lambda _: None
        )
        (loss / 2).backward()
        losses.append(float(loss.detach()))
    expected = [p.grad for p in by_hand.parameters() if p.grad is not None]

    assert len(stepped) == len(expected) > 0
    for a, b in zip(stepped, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert losses[0] != losses[1]  # two different batches
    assert float(values["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)
    # the first batch is the one a step without accumulation draws
    single, _ = tv.batch_loss(
        base, fresh()[0], renderer, pool, 5, dev, False, (), [base.seed, 5], lambda _: None
    )
    assert float(single) == pytest.approx(losses[0], rel=1e-5)


def test_a_step_can_mix_crops_with_whole_frames_of_the_named_kinds(
    tmp_path: Path, psf, monkeypatch: pytest.MonkeyPatch
):
    """data.frame_batches = 1 (session 49): the step's last batch is whole frames of
    data.frame_kinds only, rendered on their own FFT grid exactly as a renderer made for
    their size renders them; the other batches stay crops. Bad settings are refused."""
    torch = pytest.importorskip("torch", reason="training extra not installed")
    from pydantic import ValidationError

    from engine import train_volume as tv

    base = _tiny_config(tmp_path)
    data = base.data.model_dump() | {"frame_batches": 1, "frame_kinds": ["worm"]}
    cfg = tv.VolumeTrainConfig.model_validate(
        base.model_dump() | {"grad_accumulation": 2, "data": data}
    )
    beads = tv.Sample(cfg, 11, [1.0, 0.0, 0.0])
    worm = tv.Sample(cfg, 12, [0.0, 1.0, 0.0])
    assert (beads.kind, worm.kind) == ("beads", "worm")
    rng = np.random.default_rng(0)
    frames = tv.sample_batch(rng, [beads, worm], cfg, whole=True)
    assert frames.inputs.shape == (cfg.data.frames_per_batch, 1, 64, 64)
    for x in frames.inputs:  # a turned copy of the worm's frame, never the beads'
        np.testing.assert_array_equal(np.sort(x.numpy(), None), np.sort(worm.inputs[0], None))
    crops = tv.sample_batch(rng, [beads, worm], cfg)
    assert crops.inputs.shape == (cfg.batch_size, 1, 32, 32)
    # no sample of the frame kinds in the pool: a whole frame of what there is
    assert tv.sample_batch(rng, [beads], cfg, whole=True).inputs.shape[-1] == 64

    # one renderer serves both sizes, each as a renderer made for it would
    dz = np.array([-3.0, 0.0, 4.5])
    mixed = tv.TorchRenderer(psf, cfg.depth_um, 32, 15)
    own = tv.TorchRenderer(psf, cfg.depth_um, 64, 15)
    torch.testing.assert_close(mixed.render(frames.targets, dz), own.render(frames.targets, dz))
    torch.testing.assert_close(mixed.light(frames.targets, dz), own.light(frames.targets, dz))

    from engine.train_volume import loop

    asked: list[bool] = []

    def noted(*args, whole=False, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(whole)
        return tv.sample_batch(*args, whole=whole, **kwargs)

    monkeypatch.setattr(loop, "sample_batch", noted)
    dev = torch.device("cpu")
    for run, expected in (
        (cfg, [False, True]),
        (base.model_copy(update={"grad_accumulation": 2}), [False, False]),
    ):
        asked.clear()
        torch.manual_seed(0)
        model = tv.build_volume_model(run)
        opt = tv.build_optimiser(run, model)
        values = tv.training_step(run, model, opt, mixed, [beads, worm], 3, dev, False)
        assert asked == expected  # the step's last batch is the whole frames
        assert np.isfinite(float(values["loss"]))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    for bad, words in (
        ({"frame_batches": 3}, "more than the step's grad_accumulation"),
        ({"frame_batches": 1, "frame_kinds": ["nuclei"]}, "not in data.kinds"),
        ({"frame_batches": 1, "stack_shape": [64, 96]}, "square frames"),
        ({"frame_batches": 1, "stack_shape": [66, 66]}, "multiple of"),
        (
            {
                "frame_batches": 1,
                "kind_weights": [1.0, 0.0, 1.0],
                "start_kind_weights": [1.0, 0.0, 1.0],
            },
            "no weight",
        ),
        # whole frames described but none asked for: refused, not trained without them
        ({"frame_batches": 0}, r"data\.frame_kinds set but data\.frame_batches is 0"),
        (
            {"frame_batches": 0, "frame_kinds": ["worm", "mixed", "nuclei"], "frames_per_batch": 4},
            r"data\.frames_per_batch set but",
        ),
    ):
        with pytest.raises(ValidationError, match=words):
            tv.VolumeTrainConfig.model_validate(
                base.model_dump() | {"grad_accumulation": 2, "data": data | bad}
            )


def test_validation_reads_the_same_frames_whatever_kinds_a_recipe_trains_on() -> None:
    """A recipe that adds a kind ("nuclei", recipe 43) or drops one validates on the frames
    every other recipe does (two of beads, a worm, worm and beads), so figures compare."""
    pytest.importorskip("torch", reason="training extra not installed")
    from engine.train_volume import VolumeTrainConfig
    from engine.train_volume.validation import Validation

    def frames(kinds: list[str]) -> list[tuple[str, np.ndarray]]:
        data = {"stack_shape": [64, 64], "kinds": kinds}
        data |= {"kind_weights": [1.0] * len(kinds), "start_kind_weights": [1.0] * len(kinds)}
        cfg = VolumeTrainConfig.model_validate(
            {"patch_size": 32, "channels": [4, 4, 8, 8], "data": data}
        )
        return [(s.kind, s.inputs) for s in Validation(cfg).samples]

    usual = frames(["beads", "worm", "mixed"])
    assert [k for k, _ in usual] == ["beads", "beads", "worm", "mixed"]
    for other in (["beads", "worm", "mixed", "nuclei"], ["nuclei"]):
        for (kind, x), (usual_kind, y) in zip(frames(other), usual, strict=True):
            assert kind == usual_kind
            np.testing.assert_array_equal(x, y)


def test_the_first_step_takes_the_schedules_rate_fresh_or_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimiser is built at cfg.lr; the schedule's rate is set before the first step, so
    a fine-tune starts in its warm-up (review 72: its first step took the peak rate) and a run
    resumed from a checkpoint made from weights goes on at the schedule's, not at cfg.lr."""
    pytest.importorskip("torch", reason="training extra not installed")
    from engine.train import _lr_factor
    from engine.train_volume import checkpoint_from_weights, loop, train

    taken: list[float] = []
    step_once = loop.training_step

    def recording(cfg, model, opt, *args, **kwargs):  # type: ignore[no-untyped-def]
        taken.append(opt.param_groups[0]["lr"])
        return step_once(cfg, model, opt, *args, **kwargs)

    monkeypatch.setattr(loop, "training_step", recording)
    cfg = _tiny_config(tmp_path).model_copy(update={"warmup_steps": 10, "lr": 1e-3})
    train(cfg, progress=False)
    assert taken == pytest.approx([1e-3 * (k + 1) / 10 for k in range(3)])
    cfg.portable_checkpoint = tmp_path / "from-weights.ckpt.pt"
    checkpoint_from_weights(cfg, Path(cfg.weights_out))  # type: ignore[arg-type]
    (cfg.out_dir / "checkpoint.pt").unlink()
    taken.clear()
    train(cfg.model_copy(update={"steps": 4}), resume=True, progress=False)
    assert taken[0] == pytest.approx(1e-3 * _lr_factor(cfg, 3))  # type: ignore[arg-type]
    assert taken[0] < 1e-3


def test_kind_weights_that_draw_nothing_are_refused_at_load() -> None:
    from pydantic import ValidationError

    from engine.train_volume import VolumeTrainConfig

    for weights in ([0.0, 0.0, 0.0], [1.0, -1.0, 1.0]):
        with pytest.raises(ValidationError, match="must be >= 0 with a positive sum"):
            VolumeTrainConfig.model_validate({"data": {"kind_weights": weights}})


def test_planes_beyond_the_depth_grid_are_refused_before_the_network_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`refocus` of uniform planes shifted past the grid by a focus offset ran the network,
    then blamed "the lattice", listing planes the renderer adds (review 75): now it says what
    `infer` says of the same DPMs, before any pass."""
    from engine.dpm import VolumePlan
    from engine.runtime import DEFAULT_MODEL, load_backend

    backend = load_backend(
        DEFAULT_MODEL.parent / "deepz-volume.onnx", prefer=["onnxruntime"], intra_op_threads=1
    )
    calls: list[int] = []
    run = backend._run
    monkeypatch.setattr(backend, "_run", lambda x: calls.append(1) or run(x))
    frame = np.random.default_rng(0).poisson(100, (64, 64)).astype(np.uint16)
    plan = VolumePlan.from_z([8.5, 9.5], (64, 64))
    for call in (
        lambda: backend.refocus(frame, plan, offsets_um=np.array([1.5])),
        lambda: backend.infer(frame, plan.dpms_um + np.float32(1.5)),
    ):
        with pytest.raises(ValueError, match=r"dpms_um spans 10 … 11 µm; this volume model"):
            call()
    assert calls == []
    assert backend.refocus(frame, plan, offsets_um=np.array([0.5])).shape == (1, 2, 64, 64)
    assert calls == [1]


def test_the_renderer_in_use_is_kept_when_other_shapes_come_and_go() -> None:
    """The renderers (their PSF transforms) are kept least-recently-used first out: a live
    shape used between two one-off shapes was evicted first-in-first-out (review 75)."""
    from engine.runtime import DEFAULT_MODEL, load_backend

    backend = load_backend(
        DEFAULT_MODEL.parent / "deepz-volume.onnx", prefer=["onnxruntime"], intra_op_threads=1
    )
    live = backend.renderer((64, 64))
    backend.renderer((32, 32))
    assert backend.renderer((64, 64)) is live
    backend.renderer((48, 48))  # a third shape: the least recently used, 32², goes
    assert backend.renderer((64, 64)) is live
