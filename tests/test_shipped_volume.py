"""The shipped volume model recovers depth: beads localised from one frame, tilted beads sharpened.

Small held-out frames (seeds the training never drew), served through `engine.runtime` the way
the daemon serves them; a few seconds on the CPU. Tolerances sit between what the shipped model
measures here (see `docs/evaluation/report.md`) and what the unrefocused input gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import heldout as ho

WEIGHTS = Path(__file__).resolve().parents[1] / "engine" / "weights" / "deepz-volume.onnx"
SHAPE = (128, 128)


@pytest.fixture(scope="module")
def backend():  # type: ignore[no-untyped-def]
    from engine.runtime import load_backend

    if not WEIGHTS.is_file():
        pytest.fail(f"{WEIGHTS} is not shipped")
    return load_backend(WEIGHTS, prefer=["openvino", "onnxruntime"])


def _planes_fn(backend):  # type: ignore[no-untyped-def]
    def planes(frame: np.ndarray, dz_um: np.ndarray) -> np.ndarray:
        dz = np.asarray(dz_um, dtype=np.float32)
        return backend.infer(frame, np.broadcast_to(dz[:, None, None], (dz.size, *frame.shape)))

    return planes


def test_beads_localised_in_depth_from_one_frame(backend):
    """Found beads sit within 0.75 µm (median) of their depth; many more within 1 µm than input.

    Measured on these four 128² frames (2026-11-25): found beads 0.33 µm median, 35 % of all
    beads within 1 µm (input 12 %); beads far from focus are still often missed (see
    docs/evaluation/volume.md), so the median over all beads is not asserted.
    """
    from engine.fidelity import simulator_sample

    samples = [simulator_sample("beads", s, SHAPE) for s in (24, 25, 26, 27)]
    errors = np.concatenate([ho.bead_depth_errors(_planes_fn(backend), s) for s in samples])
    base = np.concatenate([ho.bead_depth_errors(ho.input_planes_fn, s) for s in samples])
    model, inp = ho.summarise(errors), ho.summarise(base)
    assert model["count"] >= 50
    assert model["median_found_um"] <= FOUND_MEDIAN_TOLERANCE_UM, model
    assert model["within_1um"] >= inp["within_1um"] + 0.15, (model, inp)


def test_tilted_dpm_sharpens_tilted_beads(backend):
    sample = ho.independent_sample("tilted", 204, SHAPE)

    def surface(frame: np.ndarray, dpm: np.ndarray) -> np.ndarray:
        out: np.ndarray = backend.infer(frame, dpm.astype(np.float32)[None])[0]
        return out

    model = ho.tilted_in_focus(surface, sample)
    inp = ho.tilted_in_focus(ho.input_surface_fn, sample)
    assert model.pearson > inp.pearson, (model.pearson, inp.pearson)
    assert model.fraction > inp.fraction, (model.fraction, inp.fraction)


FOUND_MEDIAN_TOLERANCE_UM = 0.75


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros(64), r"images must be \(H, W\) or \(N, H, W\)"),
        (np.zeros((1, 1, 64, 64)), r"images must be \(H, W\) or \(N, H, W\)"),
        (np.zeros((0, 64, 64)), "non-empty"),
        (np.array([["a"] * 64] * 64), "real numeric"),
        (np.where(np.eye(64) > 0, np.nan, 100.0), "images holds 64 NaN"),
    ],
)
def test_the_volume_call_refuses_bad_frames_with_one_line(backend, frames, message) -> None:
    """`volume` checks its frames as `infer` does: no unpacking error, no silent empty or
    all-NaN density."""
    with pytest.raises(ValueError, match=message):
        backend.volume(frames)


def test_cross_modality_confocal_render_beats_the_wide_field_input() -> None:
    """Wide-field in, confocal-like out: the density rendered confocally is closer to the truth.

    `engine.fidelity.cross_modality` on a held-out simulator sample and on an independent one
    whose confocal truth is made another way (vectorial PSF, 1 AU pinhole); the shipped model
    never trained on confocal targets, so this checks that its density holds the sample, not
    the wide-field blur.
    """
    from engine.fidelity import CEILING, cross_modality

    r = cross_modality([WEIGHTS], {"beads": (41,), "worm": (43,)}, {"beads": (101,)})
    label = "deepz-volume-sim (weights/deepz-volume.onnx)"
    assert r["trained_modality"] == {label: "widefield"}
    assert r["samples"] == {"simulator": ["beads 41", "worm 43"], "independent": ["beads 101"]}
    for which, planes in (("simulator", 22), ("independent", 11)):
        model = r[which][f"{label}: density, confocal render"]
        baseline = r[which]["unrefocused input (wide-field)"]
        assert model["planes"] == baseline["planes"] == planes
        # simulator: Pearson 0.23 for the input on these two samples; recipe 10 (session 8)
        # 0.31, recipe 12 (shipped in session 10, placing density more narrowly in depth) 0.27.
        # independent (session 13): the input 0.02 / SSIM 0.88, recipe 12 0.44 / 0.99
        assert model["pearson_median"] > baseline["pearson_median"] + 0.02, which
        assert model["ssim_median"] > baseline["ssim_median"] + 0.05, which
    # the true beads as points through the same render: what a perfect density would score
    # against the independent confocal truth (measured 0.97; recipe 12 0.39 on beads 101-102)
    ceiling = r["independent"][CEILING]
    assert ceiling["pearson_median"] > 0.9
    assert (
        ceiling["pearson_median"]
        > r["independent"][f"{label}: density, confocal render"]["pearson_median"]
    )


def test_bf16_on_openvino_keeps_fp32s_density_and_bead_depths() -> None:
    """bfloat16 inference (AVX-512-BF16 / AMX) gives float32's density to about 1 % and the same
    bead depths; on a CPU without it, asking for bf16 is one clear error, not a silent fallback.

    Measured on five simulator frames (2026-12-04, AMD EPYC): the density's relative L1
    difference 0.8-1.1 % for recipe 12's weights and 1.0-1.2 % for recipe 31's (bfloat16 keeps
    8 bits of mantissa, 0.4 % an operation), the largest voxel's 0.7-1.7 %; the beads found and
    their depths the same to 0.05 µm. The L1 bound is 1.5 %: 1 % sat inside both models' spread.
    """
    pytest.importorskip("openvino", reason="openvino is not installed")
    import openvino as ov

    from engine.fidelity import simulator_sample
    from engine.runtime import BackendError, load_backend

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(BackendError, match="no bfloat16 instructions"):
            load_backend(WEIGHTS, prefer=["openvino"], precision="bf16")
        return
    frame = simulator_sample("mixed", 28, SHAPE).frame
    fp32_backend = load_backend(WEIGHTS, prefer=["openvino"])
    fp32 = fp32_backend.volume(frame[None])
    bf16_backend = load_backend(WEIGHTS, prefer=["openvino"], precision="bf16")
    assert bf16_backend.precision == "bf16" and "bf16" in bf16_backend.device
    bf16 = bf16_backend.volume(frame[None])
    assert np.abs(bf16 - fp32).sum() <= 0.015 * np.abs(fp32).sum()
    assert np.abs(bf16 - fp32).max() <= 0.03 * np.abs(fp32).max()
    beads = simulator_sample("beads", 24, SHAPE)
    e32 = ho.bead_depth_errors(_planes_fn(fp32_backend), beads)
    e16 = ho.bead_depth_errors(_planes_fn(bf16_backend), beads)
    assert np.isfinite(e32).sum() >= 5
    np.testing.assert_array_equal(np.isfinite(e16), np.isfinite(e32))
    found = np.isfinite(e32)
    assert np.abs(e16[found] - e32[found]).max() <= 0.25  # half a depth step


def test_auto_precision_is_bf16_where_openvino_can_and_fp32_elsewhere() -> None:
    pytest.importorskip("openvino", reason="openvino is not installed")
    import openvino as ov

    from engine.runtime import load_backend

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    openvino = load_backend(WEIGHTS, prefer=["openvino"], precision="auto")
    assert openvino.precision == ("bf16" if has_bf16 else "fp32")
    onnxruntime = load_backend(WEIGHTS, prefer=["onnxruntime"], precision="auto")
    assert onnxruntime.precision == "fp32"


def test_the_committed_checkpoint_is_the_shipped_model_and_resumable() -> None:
    """`--resume` on a fresh machine continues the shipped model, not some other run."""
    torch = pytest.importorskip("torch", reason="training extra not installed")
    from engine.train_volume import VolumeTrainConfig

    weights = WEIGHTS.with_suffix(".pt")
    ck = torch.load(WEIGHTS.with_suffix(".ckpt.pt"), map_location="cpu", weights_only=False)
    shipped = torch.load(weights, map_location="cpu", weights_only=True)
    assert set(ck["model"]) == set(shipped)
    assert all(torch.equal(ck["model"][k], v) for k, v in shipped.items())
    cfg = VolumeTrainConfig.model_validate(ck["config"])  # its recipe still validates
    assert cfg.portable_checkpoint is not None and ck["step"] > 0 and ck["opt"]["state"]


def test_the_same_density_renders_confocal_planes_when_asked() -> None:
    """Cross-modality at serving time: `render_modality="confocal"` renders the shipped
    wide-field model's density through the confocal PSF bank its training optics make."""
    from engine.optics import OpticsConfig, simulate_volume_pair
    from engine.runtime import load_backend
    from engine.volume import Renderer, psf_bank

    prefer = ["openvino", "onnxruntime"]
    wide = load_backend(WEIGHTS, prefer=prefer)
    same = load_backend(WEIGHTS, prefer=prefer, render_modality="widefield")
    conf = load_backend(WEIGHTS, prefer=prefer, render_modality="confocal")
    assert wide.metadata.volume is not None and conf.metadata.volume is not None
    assert (wide.metadata.volume.modality, conf.metadata.volume.modality) == (
        "widefield",
        "confocal",
    )
    depth = np.asarray(wide.metadata.volume.depth_um)
    frame = simulate_volume_pair("beads", shape=(96, 96), depth_um=depth, seed=41).frames[0]
    dpms = np.array([[[0.0]], [[4.0]]], dtype=np.float32) * np.ones((1, 96, 96), np.float32)
    np.testing.assert_array_equal(wide.infer(frame, dpms), same.infer(frame, dpms))
    planes = conf.infer(frame, dpms)
    # the training optics of the shipped model are the defaults (its train_config's {})
    expected = Renderer(psf_bank(OpticsConfig(), depth, modality="confocal"), depth, (96, 96))
    density = conf.volume(frame)[0]
    np.testing.assert_allclose(
        planes, expected.planes(density, frame, np.array([0.0, 4.0])), rtol=1e-4, atol=1e-2
    )
    assert not np.allclose(planes, wide.infer(frame, dpms), rtol=0.05)


def test_a_model_without_training_optics_cannot_render_another_modality(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the .pt backend needs torch (the training extra)")
    import json
    import shutil

    from engine.runtime import BackendError, load_backend

    src = WEIGHTS.with_suffix(".pt")
    for suffix in (".pt", ".psf.npy"):
        shutil.copy(WEIGHTS.parent / f"deepz-volume{suffix}", tmp_path / f"m{suffix}")
    meta = json.loads(src.with_suffix(".json").read_text())
    meta["extra"].pop("train_config")
    meta["volume"]["psf_file"] = "m.psf.npy"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert load_backend(tmp_path / "m.pt", prefer=["torch"]).metadata.volume is not None
    with pytest.raises(BackendError, match="records no training optics"):
        load_backend(tmp_path / "m.pt", prefer=["torch"], render_modality="confocal")


def test_a_dpm_beyond_the_depth_grid_is_named_with_its_span(backend) -> None:
    """A surface past ±10 µm is refused naming its span and the grid's, not a dump of the
    lattice planes it would have needed."""
    frame = np.full((64, 64), 100, np.uint16)
    tilted = np.linspace(0.0, 30.0, 64 * 64).reshape(1, 64, 64)
    with pytest.raises(ValueError, match="dpms_um spans 0 … 30 µm; this volume model renders"):
        backend.infer(frame, tilted)


def test_the_shipped_onnx_is_the_shipped_weights() -> None:
    """The ONNX the daemon serves was exported from the committed .pt (not stale): the same
    density from both, ONNX Runtime against torch, on a held-out frame."""
    pytest.importorskip("torch", reason="the .pt backend needs torch (the training extra)")
    from engine.runtime import load_backend

    onnx_backend = load_backend(WEIGHTS, prefer=["onnxruntime"], device="cpu")
    torch_backend = load_backend(WEIGHTS.with_suffix(".pt"), prefer=["torch"], device="cpu")
    assert onnx_backend.metadata == torch_backend.metadata
    frame = ho.independent_sample("beads", 301, SHAPE).frame[None]
    want = torch_backend.volume(frame)
    got = onnx_backend.volume(frame)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def test_closing_a_backend_stops_its_render_threads() -> None:
    """`close()` releases a volume model's renderers (review 36: their threads and FFT grids,
    hundreds of MB at 1024², lived on until the backend was collected)."""
    import threading

    from engine.runtime import load_backend

    def render_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("render")}

    before = render_threads()  # other tests' backends may hold (and drop) some meanwhile
    backend = load_backend(WEIGHTS, prefer=["onnxruntime"], intra_op_threads=2)
    frame = np.full(SHAPE, 500, dtype=np.uint16)
    backend.infer(frame, np.zeros((2, *SHAPE), dtype=np.float32))  # a renderer, 2 threads
    started = render_threads() - before
    assert started
    backend.close()
    assert not any(t.is_alive() for t in started)


def test_a_models_own_bank_holding_negative_light_is_refused_at_load(tmp_path: Path) -> None:
    """A model's own bank need not sum to 1 per plane (a confocal one dims off focus), but it
    must be light: a negated bank loaded and rendered negative planes (review 36)."""
    from engine.runtime import BackendError, load_backend

    onnx = pytest.importorskip("onnx", reason="the export extra is not installed")
    from engine.metadata import ONNX_METADATA_KEY, ModelMetadata, file_sha256

    bank = np.load(WEIGHTS.with_suffix(".psf.npy"))
    np.save(tmp_path / "deepz-volume.psf.npy", -bank)
    # the model's metadata names the negated bank's hash (as a model saved with it would), so
    # the bank's own check is what refuses it, not the hash that ties model and bank together
    proto = onnx.load_model(str(WEIGHTS))
    props = {p.key: p for p in proto.metadata_props}
    meta = ModelMetadata.from_json(props[ONNX_METADATA_KEY].value)
    assert meta.volume is not None
    volume = meta.volume.model_copy(
        update={"psf_sha256": file_sha256(tmp_path / "deepz-volume.psf.npy")}
    )
    props[ONNX_METADATA_KEY].value = meta.model_copy(update={"volume": volume}).to_json()
    model = tmp_path / WEIGHTS.name
    onnx.save_model(proto, str(model))
    with pytest.raises(BackendError, match="must be non-negative"):
        load_backend(model, prefer=["onnxruntime"])
