"""The engine's command lines refuse bad input before their work (review 62): one line naming
the flag, key or file, exit 2, nothing written, and output paths checked before the work
(`engine.files.out_dir_problem`). Each case stops at its check: no training, evaluation or
measurement runs here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.files import out_dir_problem

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "engine" / "weights"
VOLUME_PT = WEIGHTS / "deepz-volume.pt"
VOLUME_ONNX = WEIGHTS / "deepz-volume.onnx"

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _refused(
    main: Callable[[Sequence[str]], int],
    argv: Sequence[str],
    said: str,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """Run `main`, which must exit 2 (returned or argparse's SystemExit) saying `said` in one
    line: its own, or argparse's after the usage. Return that line."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    line = err.splitlines()[-1] if err else ""
    assert said in line, (said, err)
    assert "Traceback" not in err and (err.startswith("usage:") or "\n" not in err), err
    return line


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    """A plain file where the commands are asked to make a folder."""
    path = tmp_path / "afile"
    path.write_text("not a folder\n")
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- the helper


def test_out_dir_problem_names_what_is_in_the_way(tmp_path: Path, afile: Path) -> None:
    """A file on the way, a folder where a file will be written: each named in one line;
    a folder to be made below a writable one, or one that exists, is fine."""
    assert out_dir_problem(tmp_path / "new" / "deeper", ["a.json"]) is None
    assert out_dir_problem(tmp_path, ["afile"]) is None  # an existing file is replaced
    assert out_dir_problem(afile) == f"{afile} is a file, not a folder"
    assert out_dir_problem(afile / "run") == f"{afile / 'run'}: {afile} is a file, not a folder"
    (tmp_path / "report.md").mkdir()
    said = out_dir_problem(tmp_path, ["metrics.json", "report.md"])
    assert said == f"{tmp_path / 'report.md'} is a folder, not a file"
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- psf_calibration


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """The shipped volume model's metadata beside an .onnx name (never loaded: the checks
    come before the bank is read)."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(WEIGHTS / "deepz-volume.json", folder / "deepz-volume.json")
    return folder / "deepz-volume.onnx"


def test_psf_calibration_never_writes_over_the_models_metadata_or_another_json(
    tmp_path: Path, model_copy: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out deepz-volume.npy`` beside ``deepz-volume.onnx`` wrote its summary over the
    model's metadata (the model then no longer loaded): refused, as is any JSON there that
    is no earlier calibration's summary, the model's own bank, a stack measured, an --out
    that is a folder or lies under a file, and a .npy or .png there beside no earlier
    calibration's summary (the figure was drawn over). Nothing is written."""
    from engine.psf_calibration import main

    stack = tmp_path / "beads.npy"
    np.save(stack, np.zeros((3, 8, 8), dtype=np.float32))
    metadata = model_copy.with_suffix(".json").read_bytes()
    other = tmp_path / "other.json"
    other.write_text('{"mine": 1}\n')
    (tmp_path / "folder.npy").mkdir()
    figure = tmp_path / "figure.png"  # someone's figure, beside no calibration's summary
    figure.write_bytes(b"png")
    (tmp_path / "array.npy").write_bytes(b"npy")
    cases = [
        (tmp_path / "figure.npy", f"would write over {figure}, which is no earlier calibration"),
        (tmp_path / "array.npy", "array.npy, which is no earlier calibration's"),
        (model_copy.with_suffix(".npy"), f"{model_copy.with_suffix('.json')}, the metadata of"),
        (tmp_path / "other.npy", "which is no earlier calibration's summary"),
        (model_copy.parent / "deepz-volume.psf.npy", "is the model's own PSF bank"),
        (stack, "is one of the stacks measured"),
        (tmp_path / "folder.npy", f"{tmp_path / 'folder.npy'} is a folder, not a file"),
        (afile / "psf.npy", f"{afile} is a file, not a folder"),
    ]
    before = _listing(tmp_path)
    for out, said in cases:
        argv = [str(stack), "--step-um", "0.5", "--model", str(model_copy), "--out", str(out)]
        line = _refused(main, argv, said, capsys)
        assert "--out" in line, line
    assert model_copy.with_suffix(".json").read_bytes() == metadata
    assert other.read_text() == '{"mine": 1}\n' and figure.read_bytes() == b"png"
    assert _listing(tmp_path) == before


def test_an_earlier_calibrations_summary_is_told_from_other_json(tmp_path: Path) -> None:
    """What may be replaced: a summary this command wrote (the shipped ones in docs, from
    before `lateral` was recorded, too), never a model's metadata or a foreign JSON."""
    from engine.psf_calibration import SUMMARY_KEYS, is_calibration_summary

    shipped = sorted((REPO / "docs" / "evaluation" / "psf_calibration").glob("*.json"))
    assert shipped and all(is_calibration_summary(p) for p in shipped)
    assert not is_calibration_summary(WEIGHTS / "deepz-volume.json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(dict.fromkeys(SUMMARY_KEYS[:-1], 1)))
    assert not is_calibration_summary(partial)
    partial.write_text("[1, 2]")
    assert not is_calibration_summary(partial)
    assert not is_calibration_summary(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_a_volume_model_and_an_out_in_the_way(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.evaluate import main

    out = tmp_path / "report"
    argv = ["--weights", str(VOLUME_PT), "--out", str(out)]
    _refused(main, argv, f"{VOLUME_PT}: a volume model; evaluate it with", capsys)
    assert not out.exists()
    _refused(main, ["--out", str(afile / "report")], f"error: --out: {afile / 'report'}", capsys)


# ----------------------------------------------------------------------------- oracle_fit


def test_oracle_fit_refuses_a_body_model_and_an_out_before_fitting(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.oracle_fit import main

    out = tmp_path / "fits"
    argv = ["--body", "model", "--body-model", str(tmp_path / "nope.onnx"), "--out", str(out)]
    _refused(main, argv, f"--body-model: {tmp_path / 'nope.onnx'}: model file not found", capsys)
    _refused(main, [*argv[:3], str(tmp_path), *argv[4:]], "is a folder, not a model file", capsys)
    _refused(main, ["--out", str(afile)], f"--out: {afile} is a file, not a folder", capsys)
    (out / "oracle_fit_vectorial.json").mkdir(parents=True)
    _refused(main, ["--out", str(out)], "oracle_fit_vectorial.json is a folder", capsys)


# ----------------------------------------------------------------------------- train


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY = (
    'name = "t"\nsteps = 2\nbatch_size = 1\npatch_size = 32\nthreads = 1\n'
    "validation_samples = 1\n[model]\nchannels = [8, 8, 16]\n"
    "[data]\nstack_shape = [32, 32]\npool_size = 1\nrefresh_count = 0\n"
)


def test_train_refuses_bad_values_and_outputs_before_making_its_folder(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Infinite learning rate, clip or loss weight; a misspelt optics key; an out_dir or
    weights_out in a file's way: one line naming the key or flag, exit 2, no folder made."""
    from engine.train import main

    run = tmp_path / "run"
    head = f'out_dir = "{run.as_posix()}"\n'
    cases = [
        ("lr = inf\n" + TINY, "lr = inf: Input should be a finite number"),
        ("grad_clip = inf\n" + TINY, "grad_clip = inf: Input should be a finite number"),
        (TINY + "[loss]\npixel_weight = inf\n", "loss.pixel_weight = inf"),
        (TINY + "[optics]\nnaa = 1.2\n", "optics.naa = 1.2: Extra inputs are not permitted"),
        (
            f'weights_out = "{(afile / "w.pt").as_posix()}"\n' + TINY,
            f"weights_out: {afile} is a file, not a folder",
        ),
    ]
    for text, said in cases:
        config = _write(tmp_path / "t.toml", head + text)
        _refused(main, ["--config", str(config), "--no-progress"], said, capsys)
    config = _write(tmp_path / "t.toml", head + TINY)
    argv = ["--config", str(config), "--out", str(afile), "--no-progress"]
    _refused(main, argv, f"error: --out: {afile} is a file, not a folder", capsys)
    assert not run.exists()


def test_train_refuses_what_its_files_are_before_making_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing lab stack (found once the simulated pool was built), a volume model as
    init_weights, a plain state_dict as the checkpoint to resume: one line naming the file,
    exit 2, and out_dir neither made nor written (no config.json)."""
    from engine.train import main

    run = tmp_path / "run"
    head = f'out_dir = "{run.as_posix()}"\n'
    lab = tmp_path / "nolab.tif"
    with_lab = TINY + f'lab_fraction = 0.5\n[[data.lab_stacks]]\npath = "{lab.as_posix()}"\n'
    cases = [
        (with_lab + "z_step_um = 0.5\n", f"data.lab_stacks: {lab}"),
        (f'init_weights = "{VOLUME_PT.as_posix()}"\n' + TINY, "(a volume model's)"),
    ]
    for text, said in cases:
        config = _write(tmp_path / "t.toml", head + text)
        _refused(main, ["--config", str(config), "--no-progress"], said, capsys)
        assert not run.exists()
    run.mkdir()
    torch.save({"stem.weight": torch.zeros(1)}, run / "checkpoint.pt")
    config = _write(tmp_path / "t.toml", head + TINY)
    argv = ["--config", str(config), "--resume", "--no-progress"]
    said = f"--resume: {run / 'checkpoint.pt'} is not a checkpoint of engine.train (no model"
    _refused(main, argv, said, capsys)
    assert _listing(run) == ["checkpoint.pt"]


def test_the_shipped_training_configs_load_with_finite_values_required() -> None:
    """`allow_inf_nan=False` on the trainers' configs refuses none of the shipped recipes."""
    from engine.train import load_config
    from engine.train_volume.config import load_config as load_volume_config

    configs = sorted((REPO / "configs").glob("*.toml"))
    assert len(configs) > 10
    for path in configs:
        load = load_config if path.name.startswith("train_") and "volume" not in path.name else None
        (load or load_volume_config)(path)


# ----------------------------------------------------------------------------- train_volume


def test_train_volume_refuses_a_file_that_is_no_checkpoint_and_outputs_in_the_way(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.train_volume import main

    config = _write(
        tmp_path / "v.toml", f'steps = 1\nout_dir = "{(tmp_path / "run").as_posix()}"\n'
    )
    plain = tmp_path / "plain.pt"
    torch.save({"stem.weight": torch.zeros(1)}, plain)
    base = ["--config", str(config), "--weights-from-checkpoint", str(plain)]
    _refused(main, base, f"{config}: no weights_out to write", capsys)
    weights = tmp_path / "out" / "w.pt"
    said = f"{plain}: not a volume training checkpoint (no model, step, history, config)"
    _refused(main, [*base, "--weights-out", str(weights)], said, capsys)
    said = f"error: --weights-out: {afile} is a file, not a folder"
    _refused(main, [*base, "--weights-out", str(afile / "w.pt")], said, capsys)
    argv = ["--config", str(config), "--weights-out", str(afile / "w.pt"), "--no-progress"]
    _refused(main, argv, said, capsys)  # training: checked before, written at the run's end
    assert _listing(tmp_path) == ["afile", "plain.pt", "v.toml"]


# ----------------------------------------------------------------------------- fidelity


def test_fidelity_refuses_what_is_no_model_and_makes_no_folder(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing, truncated or folder --models value, a PSF bank or a checkpoint given as a
    model: one line naming it, exit 2, and no report folder made."""
    from engine.fidelity import main

    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(VOLUME_PT.read_bytes()[:4096])
    bank = tmp_path / "bank.psf.npy"
    np.save(bank, np.zeros((3, 5, 5), dtype=np.float32))
    out = tmp_path / "report"
    cases = [
        (tmp_path / "nope.onnx", "model file not found"),
        (tmp_path, "is a folder, not a model file"),
        (truncated, "no backend could load this model"),
        (bank, "no backend could load this model"),
    ]
    for model, said in cases:
        argv = ["--quick", "--models", str(model), "--out", str(out)]
        line = _refused(main, argv, said, capsys)
        assert str(model) in line, line
    assert not out.exists()
    argv = ["--quick", "--models", str(VOLUME_PT), "--out", str(afile)]
    _refused(main, argv, f"--out: {afile} is a file, not a folder", capsys)


def test_fidelity_refuses_a_precision_that_serves_a_model_at_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--models X.pt --precisions bf16`` served no model and said nothing."""
    from engine.fidelity import main

    out = tmp_path / "report"
    for precisions in (["bf16"], ["auto", "bf16"]):
        argv = ["--quick", "--models", str(VOLUME_PT), "--precisions", *precisions]
        said = f"{VOLUME_PT} would be served at none"
        _refused(main, [*argv, "--out", str(out)], said, capsys)
    assert not out.exists()


def test_fidelity_says_a_pt_model_is_served_at_fp32_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--precisions fp32 bf16`` with a .pt served it at fp32 and said nothing of bf16."""
    import engine.fidelity as fidelity

    def stop(*args: object, **kwargs: object) -> dict[str, object]:
        raise OSError("stop here: no sample is made in this test")

    monkeypatch.setattr(fidelity, "compare", stop)
    argv = ["--quick", "--models", str(VOLUME_PT), "--precisions", "fp32", "bf16"]
    assert fidelity.main([*argv, "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"note: {VOLUME_PT} is served at fp32 only (bf16: ONNX models only)" in err


def test_a_fresh_report_compares_modalities_on_fresh_seeds_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cross-modality section ran on the development seeds even in a ``--fresh`` report
    (review 65); its seeds are the fresh ones now, and no other set's."""
    import engine.fidelity as fidelity

    asked: list[tuple[object, ...]] = []

    def recorded(*args: object) -> dict[str, object]:
        asked.append(args)
        raise OSError("stop here: no sample is made in this test")

    monkeypatch.setattr(fidelity, "compare", lambda *a, **k: {})
    monkeypatch.setattr(fidelity, "cross_modality", recorded)
    argv = ["--fresh", "--models", str(VOLUME_ONNX), "--out", str(tmp_path / "r")]
    assert fidelity.main(argv) == 2
    assert asked and asked[0][1:] == fidelity.FRESH_CROSS_MODALITY
    fresh = {s for seeds in fidelity.FRESH_CROSS_MODALITY for v in seeds.values() for s in v}
    for simulator, independent in fidelity.SEED_SETS.values():  # used by no other set
        for seeds in (*simulator.values(), *independent.values()):
            assert not set(seeds) & fresh


# ----------------------------------------------------------------------------- depth_bound


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_depth_bound_needs_a_finite_positive_separation(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.depth_bound import main

    argv = ["--optics", "independent", "--min-separation-um", value, "--out", str(tmp_path / "o")]
    said = f"--min-separation-um must be a finite number > 0, not {float(value)}"
    _refused(main, argv, said, capsys)
    assert not (tmp_path / "o").exists()


def test_depth_bound_names_a_bad_particle_depth_and_an_out_in_the_way(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.depth_bound import main

    model = ["--model", str(VOLUME_ONNX)]
    argv = [*model, "--particle-depth-um", "-5", "--out", str(tmp_path / "o")]
    _refused(main, argv, "--particle-depth-um -5.0: Input should be greater than", capsys)
    _refused(main, ["--optics", "independent", "--out", str(afile)], f"--out: {afile}", capsys)
    assert _listing(tmp_path) == ["afile"]


# ----------------------------------------------------------------------------- probes


def test_probes_refuse_a_sample_count_a_model_and_an_out_before_probing(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.probes import main

    out = ["--out", str(tmp_path / "probes.json")]
    for n in ("-1", "0"):
        _refused(main, ["--samples", n, *out], f"--samples must be >= 1, not {n}", capsys)
    missing = tmp_path / "nope.onnx"
    _refused(main, ["--model", str(missing), *out], f"--model: {missing}: model file", capsys)
    _refused(main, ["--model", str(tmp_path), *out], "is a folder, not a model file", capsys)
    argv = ["--model", str(VOLUME_ONNX), "--out", str(afile / "p.json")]
    _refused(main, argv, f"--out: {afile} is a file, not a folder", capsys)
    assert _listing(tmp_path) == ["afile"]


# ----------------------------------------------------------------------------- body_probe


def test_body_probe_says_a_bad_head_or_config_in_one_line(
    tmp_path: Path, afile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.body_probe import main

    truncated = tmp_path / "head.pt"
    truncated.write_bytes(b"PK\x03\x04 a truncated zip")
    out = tmp_path / "out"
    argv = ["glow", "--head", str(truncated), "--out", str(out)]
    _refused(main, argv, f"error: {truncated}: not a loadable PyTorch weights file", capsys)
    plain = tmp_path / "plain.pt"
    torch.save({"stem.weight": torch.zeros(1)}, plain)
    argv = ["glow", "--head", str(plain), "--out", str(out)]
    _refused(main, argv, f"{plain}: not a probe head's checkpoint (no head,", capsys)
    _refused(main, ["glow", "--head", str(plain), "--out", str(afile)], "--out: ", capsys)
    config = _write(tmp_path / "typo.toml", "stepz = 3\n")
    argv = ["train", "--weights", str(VOLUME_PT), "--config", str(config), "--out", str(out)]
    _refused(main, [*argv, "--samples", "2"], f"{config}: stepz = 3: Extra inputs", capsys)
    assert not out.exists()
