"""Tests of engine.train: config validation, pair sampling, registration, lab stacks, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
import tifffile
import torch
import zarr

from engine.lab_files import LabFileError, recorded_focus_step_um
from engine.metadata import normalize_images
from engine.model import load_model
from engine.train import (
    LabStackConfig,
    TrainConfig,
    TrainConfigError,
    _generator_loss,
    _stack_from_planes,
    _validation_set,
    load_config,
    load_lab_stack,
    phase_correlation_shift,
    read_lab_stack,
    register_stack,
    sample_batch,
    train,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _blob_stack(n_z: int = 9, size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic focal stack: Gaussian spots whose width grows with |z - z_spot|."""
    rng = np.random.default_rng(seed)
    z = np.arange(n_z, dtype=np.float64) - n_z // 2
    yy, xx = np.mgrid[0:size, 0:size]
    stack = np.full((n_z, size, size), 100.0, dtype=np.float32)
    for _ in range(6):
        y0, x0, z0 = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(-2, 2)
        for i, zi in enumerate(z):
            s = 1.5 + 0.8 * abs(zi - z0)
            stack[i] += 2000 / s**2 * np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * s * s))
    return z, stack


def _tiny_config(tmp_path: Path, **changes: object) -> TrainConfig:
    base: dict[str, object] = {
        "steps": 40,
        "batch_size": 4,
        "patch_size": 32,
        "lr": 1e-2,
        "warmup_steps": 2,
        "threads": 1,
        "checkpoint_every": 20,
        "validation_samples": 4,
        "out_dir": str(tmp_path / "run"),
        "model": {"preset": "slim", "channels": [8, 8, 16]},
        "loss": {"ssim_scales": 1},
        "data": {
            "kinds": ["beads"],
            "stack_shape": [48, 48],
            "z_step_um": 1.0,
            "z_half_range_um": 4.0,
            "input_half_range_um": 1.0,
            "dz_range_um": [-3.0, 3.0],
            "pool_size": 2,
            "refresh_every": 20,
            "refresh_count": 1,
        },
    }
    data = {**base["data"], **changes.pop("data", {})}  # type: ignore[dict-item]
    base.update(changes)
    base["data"] = data
    return TrainConfig.model_validate(base)


def test_shipped_config_loads() -> None:
    cfg = load_config(REPO / "configs" / "train_slim.toml")
    assert cfg.model.preset == "slim"
    assert cfg.data.dz_range_um == (-10.0, 10.0)
    load_config(REPO / "configs" / "train_gan.toml")


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = 10\nbatch_sise = 4\n")
    with pytest.raises(TrainConfigError, match=r"bad\.toml: batch_sise = 4: Extra inputs"):
        load_config(bad)
    with pytest.raises(pydantic.ValidationError, match="size_multiple"):
        TrainConfig.model_validate({"patch_size": 100})
    with pytest.raises(pydantic.ValidationError, match="dz_range_um"):
        TrainConfig.model_validate({"data": {"dz_range_um": [5, -5]}})
    # lab stacks listed but never drawn (review 36: loaded and named in the metadata, unused)
    with pytest.raises(pydantic.ValidationError, match=r"data\.lab_fraction is 0"):
        TrainConfig.model_validate({"data": {"lab_stacks": [{"path": "x.tif", "z_step_um": 1}]}})
    with pytest.raises(TrainConfigError, match=r"missing\.toml: cannot read the training config"):
        load_config(tmp_path / "missing.toml")


def test_the_training_clis_say_a_bad_config_or_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both training commands: a TOML that does not parse, a key of the wrong type, a refused
    override, a truncated checkpoint to resume from — one line naming the file, exit 2, and
    nothing trained. A checkpoint is read as tensors and plain values only (never code)."""
    from engine.train import main as train_main
    from engine.train_volume import main as volume_main

    (tmp_path / "syntax.toml").write_text("steps = = 3\n")
    (tmp_path / "wrong.toml").write_text('steps = "many"\n')
    (tmp_path / "camera.toml").write_text("[camera]\nread_noise = 1.0\n")  # not a key of it
    ok = tmp_path / "ok.toml"
    ok.write_text(f'out_dir = "{(tmp_path / "run").as_posix()}"\nsteps = 2\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"PK\x03\x04 a truncated zip")
    cases = [
        (["--config", str(tmp_path / "syntax.toml")], "syntax.toml: not a TOML file"),
        (["--config", str(tmp_path / "wrong.toml")], "wrong.toml: steps = 'many'"),
        (["--config", str(tmp_path / "camera.toml")], "camera.read_noise = 1.0: Extra inputs"),
        (["--config", str(ok), "--steps", "-1"], "ok.toml: steps = -1"),
        (["--config", str(ok), "--resume"], "checkpoint.pt: not a loadable PyTorch weights"),
    ]
    for main in (train_main, volume_main):
        for args, message in cases:
            assert main([*args, "--no-progress"]) == 2, args
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_uniform_pairs_use_the_input_frames_statistics(tmp_path: Path) -> None:
    z, clean = _blob_stack()
    frames = np.random.default_rng(1).poisson(clean).astype(np.uint16)
    stack = _stack_from_planes(z, clean, frames, input_half_range_um=1.0)
    cfg = _tiny_config(tmp_path, data={"surface_fraction": 0.0, "dz_range_um": [-3, 3]})
    cfg.patch_size = 48
    x, y = sample_batch(np.random.default_rng(0), [stack], [], cfg, n=6)
    assert x.shape == (6, 2, 48, 48) and y.shape == (6, 1, 48, 48)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    for b in range(6):
        dz = float(x[b, 1, 0, 0]) * cfg.dpm_scale_um
        assert torch.all(x[b, 1] == x[b, 1, 0, 0])
        assert -3 - 1e-5 <= dz <= 3 + 1e-5
        # undo the random rotation/flip by matching against all candidate input planes
        matched = False
        for _k, i in enumerate(stack.input_index):
            _norm, mean, std = normalize_images(frames[i][None])
            j = int(np.argmin(np.abs(z - (z[i] + dz))))
            target = (clean[j] - mean[0]) / std[0]
            for t in range(8):
                a = np.rot90(target, t % 4)
                a = a[:, ::-1] if t >= 4 else a
                if np.allclose(y[b, 0].numpy(), a, atol=1e-4):
                    matched = True
        assert matched, f"sample {b}: target is not the plane Δz away in input-frame units"


def test_surface_pairs_interpolate_between_planes(tmp_path: Path) -> None:
    z, clean = _blob_stack()
    stack = _stack_from_planes(z, clean, clean.astype(np.uint16), input_half_range_um=0.0)
    cfg = _tiny_config(tmp_path, data={"surface_fraction": 1.0, "dz_range_um": [-3, 3]})
    x, y = sample_batch(np.random.default_rng(3), [stack], [], cfg, n=4)
    dpm = x[:, 1] * cfg.dpm_scale_um
    assert float(dpm.amax()) <= 3 + 1e-5 and float(dpm.amin()) >= -3 - 1e-5
    assert any(float(d.max() - d.min()) > 0.1 for d in dpm)
    assert torch.isfinite(y).all()


def test_same_seed_same_batch(tmp_path: Path) -> None:
    z, clean = _blob_stack()
    stack = _stack_from_planes(z, clean, clean.astype(np.uint16), input_half_range_um=1.0)
    cfg = _tiny_config(tmp_path)
    a = sample_batch(np.random.default_rng([0, 5]), [stack], [], cfg)
    b = sample_batch(np.random.default_rng([0, 5]), [stack], [], cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_phase_correlation_finds_a_known_shift() -> None:
    _, stack = _blob_stack(n_z=1, size=64)
    moved = np.roll(stack[0], (3, -5), axis=(0, 1))
    dy, dx = phase_correlation_shift(stack[0], moved)
    assert abs(dy + 3) < 0.2 and abs(dx - 5) < 0.2


def test_register_stack_removes_drift() -> None:
    _, stack = _blob_stack(n_z=5, size=64)
    drifted = np.stack([np.roll(p, (i, -i), axis=(0, 1)) for i, p in enumerate(stack)])
    out, shifts = register_stack(drifted)
    rel = shifts - shifts[2]
    np.testing.assert_allclose(rel[:, 0], -(np.arange(5) - 2), atol=0.3)
    np.testing.assert_allclose(rel[:, 1], np.arange(5) - 2, atol=0.3)
    assert out.shape == stack.shape and out.dtype == np.float32


def test_lab_stack_from_tiff_and_zarr(tmp_path: Path) -> None:
    import zarr

    _, stack = _blob_stack(n_z=7)
    tif = tmp_path / "scan.tif"
    tifffile.imwrite(tif, stack.astype(np.uint16))
    s = load_lab_stack(LabStackConfig(path=tif, z_step_um=1.0), input_half_range_um=1.0)
    assert s.target.shape == (7, 48, 48)
    np.testing.assert_allclose(s.z_um, np.arange(7) - 3.0)
    assert list(s.input_index) == [2, 3, 4]
    root = zarr.open_group(str(tmp_path / "scan.ome.zarr"), mode="w")
    root.create_array("0", data=stack[None].astype(np.uint16))
    spec = LabStackConfig(path=tmp_path / "scan.ome.zarr", z_step_um=0.5, register_planes=False)
    s2 = load_lab_stack(spec, input_half_range_um=10.0)
    assert s2.inputs.shape == (7, 48, 48)
    with pytest.raises(LabFileError, match="nope: no such stack file"):
        load_lab_stack(LabStackConfig(path=tmp_path / "nope", z_step_um=1), 1.0)


def test_a_failed_plane_match_adds_no_shift_and_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Review 85: plane-to-plane matches chained from the middle threw far planes of a still,
    sparse stack tens of pixels off; a step beyond `MAX_STEP_SHIFT_PX` is a failed match."""
    import engine.train as T

    _, stack = _blob_stack(n_z=5, size=48)
    steps = iter([(0.5, 0.0), (40.0, -60.0), (0.0, 0.25), (0.0, 0.0)])
    monkeypatch.setattr(T, "phase_correlation_shift", lambda a, b: next(steps))
    with caplog.at_level("WARNING", logger="engine.train"):
        _, shifts = register_stack(stack)
    # outwards from plane 2: planes 3, 4 (0.5 then the failed one), then 1, 0
    np.testing.assert_allclose(shifts, [[0, 0.25], [0, 0.25], [0, 0], [0.5, 0], [0.5, 0]])
    assert "1 of 4 steps matched beyond 1.5 px (planes 4)" in caplog.text


def test_a_lab_stack_scanned_deep_to_shallow_not_finite_or_too_small_is_said(
    tmp_path: Path,
) -> None:
    """Review 85: a scan from deep to shallow trained mirrored (a negative step now reads it
    in reverse); one NaN made every pixel NaN and the weights with it; planes smaller than
    the patch failed at the first lab step: each is one line at load now."""
    _, stack = _blob_stack(n_z=7)
    tif = tmp_path / "scan.tif"
    tifffile.imwrite(tif, stack.astype(np.uint16))
    up = load_lab_stack(LabStackConfig(path=tif, z_step_um=1.0, register_planes=False), 1.0)
    rev = tmp_path / "reversed.tif"
    tifffile.imwrite(rev, stack[::-1].astype(np.uint16))
    down = load_lab_stack(LabStackConfig(path=rev, z_step_um=-1.0, register_planes=False), 1.0)
    np.testing.assert_array_equal(down.target, up.target)
    np.testing.assert_array_equal(down.z_um, up.z_um)
    with pytest.raises(pydantic.ValidationError, match="non-zero focus step"):
        LabStackConfig(path=tif, z_step_um=0.0)
    with pytest.raises(ValueError, match="48x48 are smaller than patch_size 64"):
        load_lab_stack(LabStackConfig(path=tif, z_step_um=1.0), 1.0, min_side_px=64)
    bad = stack.copy()
    bad[3, 5, 5] = np.nan
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, bad)
    with pytest.raises(ValueError, match="1 pixels are NaN or infinite"):
        load_lab_stack(LabStackConfig(path=nan, z_step_um=1.0), 1.0)


def test_lab_stack_step_must_match_the_step_its_file_records(tmp_path: Path) -> None:
    """A lab stack trained at the wrong focus step learns the wrong defocus for every plane;
    where the file records its step (ImageJ ``spacing``, OME ``PhysicalSizeZ``, the NGFF z
    scale, in any of their units) a given step that differs is one line at load."""
    _, stack = _blob_stack(n_z=5)
    counts = stack.astype(np.uint16)
    imagej = tmp_path / "imagej.tif"
    tifffile.imwrite(imagej, counts, imagej=True, metadata={"spacing": 0.5, "unit": "micron"})
    ome = tmp_path / "ome.tif"
    tifffile.imwrite(
        ome, counts, ome=True, metadata={"PhysicalSizeZ": 500, "PhysicalSizeZUnit": "nm"}
    )
    ngff = tmp_path / "stack.ome.zarr"
    group = zarr.open_group(str(ngff), mode="w")
    group.create_array("0", data=counts)
    axes = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    scale = {"type": "scale", "scale": [0.5, 0.1, 0.1]}
    datasets = [{"path": "0", "coordinateTransformations": [scale]}]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, counts)
    for path, where in ((imagej, "ImageJ spacing"), (ome, "OME PhysicalSizeZ"), (ngff, "NGFF")):
        for step in (0.5, -0.5, 0.502):  # the scan's direction is the config's to say
            z = read_lab_stack(
                LabStackConfig(path=path, z_step_um=step, register_planes=False)
            ).z_um
            assert z[1] - z[0] == pytest.approx(abs(step))
        with pytest.raises(ValueError, match=rf"z_step_um = 1 but .* 0.5 µm \({where}"):
            read_lab_stack(LabStackConfig(path=path, z_step_um=1.0, register_planes=False))
    z = read_lab_stack(LabStackConfig(path=plain, z_step_um=1.0, register_planes=False)).z_um
    assert z[1] - z[0] == 1.0  # a file that records nothing is taken at its word
    unchecked = LabStackConfig(path=imagej, z_step_um=1.0, register_planes=False)
    z = read_lab_stack(unchecked.model_copy(update={"check_file_step": False})).z_um
    assert z[1] - z[0] == 1.0  # told the file's calibration is wrong: the given step


def test_the_focus_step_is_read_as_imagej_ome_and_ngff_writers_record_it(tmp_path: Path) -> None:
    """Review 86: ImageJ's zunit, its ASCII-escaped µ, a second OME series' calibration, an
    NGFF axis without a unit (ome-zarr-py's default scale 1) and a multiscale-level scale were
    misread, refusing correct steps or missing wrong ones."""
    counts = np.zeros((5, 16, 16), dtype=np.uint16)

    def imagej(name: str, lines: str) -> Path:
        path = tmp_path / name  # the description as ImageJ's FileSaver writes it
        header = f"ImageJ=1.54f\nimages=5\nslices=5\n{lines}loop=false\n"
        tifffile.imwrite(path, counts, description=header, metadata=None)
        return path

    zunit = imagej("zunit.tif", "unit=micron\nzunit=nm\nspacing=500\n")
    escaped = imagej("escaped.tif", "unit=\\u00B5m\nspacing=0.5\n")
    pixels = imagej("pixels.tif", "unit=pixel\nspacing=1\n")  # uncalibrated
    series = tmp_path / "series.ome.tif"
    with tifffile.TiffWriter(series, ome=True) as tw:
        tw.write(counts, metadata={"axes": "ZYX", "PhysicalSizeZ": 0.5})  # the one read
        tw.write(counts, metadata={"axes": "ZYX", "PhysicalSizeZ": 500, "PhysicalSizeZUnit": "nm"})
    assert recorded_focus_step_um(zunit) == (0.5, "ImageJ spacing")
    assert recorded_focus_step_um(escaped) == (0.5, "ImageJ spacing")
    assert recorded_focus_step_um(pixels) is None
    assert recorded_focus_step_um(series) == (0.5, "OME PhysicalSizeZ")

    def ngff(name: str, axes: list[object], scale: list[float], top: list[float] | None) -> Path:
        group = zarr.open_group(str(tmp_path / name), mode="w")
        group.create_array("s0", data=counts)  # ome-zarr-py names its levels s0, s1, ...
        dataset = {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        image: dict[str, object] = {"axes": axes, "datasets": [dataset]}
        if top is not None:
            image["coordinateTransformations"] = [{"type": "scale", "scale": top}]
        group.attrs["ome"] = {"version": "0.5", "multiscales": [image]}
        return tmp_path / name

    bare = [{"name": n, "type": "space"} for n in "zyx"]
    unitless = ngff("unitless.ome.zarr", bare, [1.0, 1.0, 1.0], None)
    assert recorded_focus_step_um(unitless) is None  # no unit: no calibration
    nested = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    both = ngff("both.ome.zarr", nested, [2.0, 0.1, 0.1], [0.25, 1.0, 1.0])
    assert recorded_focus_step_um(both) == (0.5, "NGFF z scale")
    lab = read_lab_stack(LabStackConfig(path=both, z_step_um=0.5, register_planes=False))
    assert lab.planes.shape == (5, 16, 16)  # read from its level "s0"


def test_patches_of_a_lab_stack_hold_no_saturated_pixel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review 85 left clipped pixels used as targets: a 12-bit camera's bead at 4095 taught a
    flat top. Both trainers now draw only patches that hold none, said at load; a stack with
    no such patch is refused."""
    _, stack = _blob_stack(n_z=5, size=64)
    counts = np.minimum(stack, 4000).astype(np.uint16)
    counts[2, 10:13, 40:43] = 4095  # one bead clipped at a 12-bit camera's full scale
    tif = tmp_path / "clipped.tif"
    tifffile.imwrite(tif, counts)
    spec = LabStackConfig(path=tif, z_step_um=1.0, register_planes=False)
    with caplog.at_level("WARNING", logger="engine.train"):
        lab = read_lab_stack(spec, min_side_px=32)
    assert "9 pixels reach the camera's full scale (4095)" in caplog.text
    assert 0 < lab.origins.share < 1
    registered = read_lab_stack(LabStackConfig(path=tif, z_step_um=1.0), min_side_px=32)
    assert registered.origins.share <= lab.origins.share  # the mask widened by the shifts
    rng = np.random.default_rng(0)
    for origins in (lab.origins, registered.origins):
        for _ in range(300):
            y0, x0 = origins.draw(rng, 32)
            assert not (counts[2, y0 : y0 + 32, x0 : x0 + 32] == 4095).any()
    per_plane = load_lab_stack(spec, input_half_range_um=2.0, min_side_px=32)
    assert per_plane.origins is not None and per_plane.origins.share == lab.origins.share
    unclipped = tmp_path / "unclipped.tif"
    tifffile.imwrite(unclipped, np.minimum(stack, 4000).astype(np.uint16))
    assert read_lab_stack(LabStackConfig(path=unclipped, z_step_um=1.0), 32).origins.flat is None
    bright = np.minimum(stack, 4000).astype(np.uint16)
    bright[2, 20, 20] = 8191  # one unclipped pixel landing on 2**13 - 1: no camera's ceiling
    lone = tmp_path / "lone.tif"
    tifffile.imwrite(lone, bright)
    assert read_lab_stack(LabStackConfig(path=lone, z_step_um=1.0), 32).origins.flat is None
    everywhere = counts.copy()
    everywhere[0, ::16, ::16] = 4095  # a clipped pixel in every 32 px patch
    bad = tmp_path / "everywhere.tif"
    tifffile.imwrite(bad, everywhere)
    with pytest.raises(ValueError, match="every 32 px patch holds a saturated pixel"):
        read_lab_stack(LabStackConfig(path=bad, z_step_um=1.0, register_planes=False), 32)


def test_clipped_pixels_stay_out_of_patches_when_the_planes_drift_diagonally(
    tmp_path: Path,
) -> None:
    """Review 86: registration moves a clipped pixel with its plane; the mask widened along
    the axes only (a diamond) let a diagonal drift carry it into allowed patches."""
    rng = np.random.default_rng(0)
    from scipy import ndimage

    base = ndimage.gaussian_filter(rng.random((96, 96)), 2)
    base = 500 + 3000 * (base - base.min()) / np.ptp(base)
    counts = np.stack([np.roll(base, (k, k), axis=(0, 1)) for k in range(9)]).round()
    counts = counts.astype(np.uint16)
    counts[0, 39:42, 39:42] = 4095  # a bead's top clipped in the first plane (12-bit camera)
    path = tmp_path / "drift.tif"
    tifffile.imwrite(path, counts)
    lab = read_lab_stack(LabStackConfig(path=path, z_step_um=1.0), min_side_px=16)
    _, shifts = register_stack(counts.astype(np.float32) - np.float32(np.percentile(counts, 1)))
    assert np.abs(shifts).max() > 2  # the planes were moved, diagonally
    carried = np.zeros((96, 96), dtype=np.float32)
    carried[39:42, 39:42] = 1
    touched = ndimage.shift(carried, shifts[0], order=1, mode="nearest") > 0
    assert lab.origins.flat is not None
    for flat in lab.origins.flat:
        y0, x0 = divmod(int(flat), 96 - 16 + 1)
        assert not touched[y0 : y0 + 16, x0 : x0 + 16].any()


def test_few_steps_lower_the_loss_and_write_artefacts(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path, weights_out=str(tmp_path / "w" / "tiny.pt"))
    torch.manual_seed(cfg.seed)
    initial = cfg.model.build()
    model = train(cfg, progress=False)
    x, y = _validation_set(cfg)
    with torch.no_grad():
        before, _ = _generator_loss(cfg, initial(x), y)
        after, _ = _generator_loss(cfg, model(x), y)
    assert float(after) < 0.9 * float(before)
    out = cfg.out_dir
    for name in ("checkpoint.pt", "loss_curve.png", "samples.png", "config.json"):
        assert (out / name).is_file(), name
    _loaded, meta = load_model(tmp_path / "w" / "tiny.pt")
    assert meta.architecture == model.architecture
    assert meta.extra["steps"] == 40
    assert meta.dz_range_um == (-3.0, 3.0)
    assert json.loads((tmp_path / "w" / "tiny.json").read_text())["name"] == cfg.name


def test_same_seed_same_run_and_resume(tmp_path: Path) -> None:
    a = train(_tiny_config(tmp_path / "a", steps=6, checkpoint_every=3), progress=False)
    b = train(_tiny_config(tmp_path / "b", steps=6, checkpoint_every=3), progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    cfg = _tiny_config(tmp_path / "a", steps=8, checkpoint_every=3)
    train(cfg, resume=True, progress=False)
    ck = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 8
    assert [h["step"] for h in ck["history"]] == list(range(1, 9))


def test_gan_steps_and_fine_tune_from_weights(tmp_path: Path) -> None:
    first = _tiny_config(tmp_path / "a", steps=3, checkpoint_every=3)
    first.weights_out = tmp_path / "a" / "w.pt"
    base = train(first, progress=False)
    cfg = _tiny_config(
        tmp_path / "b",
        steps=3,
        checkpoint_every=3,
        init_weights=str(tmp_path / "a" / "w.pt"),
        loss={"ssim_scales": 1, "adversarial_weight": 0.3, "adversarial_start_step": 1},
    )
    train(cfg, progress=False)
    history = torch.load(cfg.out_dir / "checkpoint.pt", weights_only=False)["history"]
    assert "d" not in history[0] and "d" in history[1] and "adv" in history[2]
    wrong = _tiny_config(tmp_path / "c", init_weights=str(tmp_path / "a" / "w.pt"))
    wrong.model.channels = [4, 4, 8]
    with pytest.raises(ValueError, match="init_weights"):
        train(wrong, progress=False)
    assert base.architecture["channels"] == [8, 8, 16]
