"""engine.train_volume's config and command line refuse, before training starts, what would
crash it at the start (review 58): primer depths off the depth grid, a primer kernel that is
even or too large, an output folder that is a file. No training run: the checks come first."""

from __future__ import annotations

import math
from pathlib import Path

import pydantic
import pytest

from engine.train import TrainConfigError
from engine.train_volume import main
from engine.train_volume.config import VolumeTrainConfig, load_config
from engine.volume import MAX_PSF_SIDE_PX


@pytest.mark.parametrize(
    ("depths", "said"),
    [
        ([math.nan, 1e300], "primer_depths_um.0"),  # passed, then make_psf's traceback
        ([math.inf], "finite number"),
        ([1e300], r"1e\+300 µm is outside the depth grid"),  # trained without complaint
        ([-3.0, 10.5], "10.5 µm is outside the depth grid"),
    ],
)
def test_primer_depths_are_finite_and_on_the_depth_grid(depths: list[float], said: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=said):
        VolumeTrainConfig.model_validate({"primer_depths_um": depths})


def test_primer_depths_may_reach_the_grid_ends() -> None:
    """The shipped primed recipes put channels at ±10 µm on a ±10 µm grid; a wider grid
    takes depths out to its own ends."""
    assert VolumeTrainConfig(primer_depths_um=[-10.0, 10.0]).primer_depths_um == [-10.0, 10.0]
    wide = VolumeTrainConfig.model_validate(
        {"depth_half_range_um": 12.0, "primer_depths_um": [-12.0, 11.5]}
    )
    assert wide.primer_depths_um == [-12.0, 11.5]


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"primer_kernel": 4}, "must be odd"),  # a ValueError traceback in the model, once
        ({"primer_kernel": 100001}, f"less than or equal to {MAX_PSF_SIDE_PX}"),  # 40 GB
        ({"primer_bin": 4, "primer_kernel": 129}, "4 x 129 = 516 px of PSF"),
    ],
)
def test_the_primer_kernel_is_odd_and_no_larger_than_a_psf(
    settings: dict[str, int], said: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match=said):
        VolumeTrainConfig.model_validate({"primer_depths_um": [5.0], **settings})


def test_a_primer_kernel_up_to_a_psfs_side_is_taken() -> None:
    cfg = VolumeTrainConfig(primer_depths_um=[5.0], primer_bin=1, primer_kernel=MAX_PSF_SIDE_PX)
    assert cfg.primer_kernel == MAX_PSF_SIDE_PX
    assert VolumeTrainConfig().primer_kernel * VolumeTrainConfig().primer_bin <= MAX_PSF_SIDE_PX


def test_a_config_file_with_bad_primer_depths_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("primer_depths_um = [nan, 1e300]\n")
    with pytest.raises(TrainConfigError, match=r"bad\.toml: primer_depths_um\.0 = nan"):
        load_config(bad)


def test_the_command_line_refuses_an_output_folder_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--out`` (or the config's out_dir) naming a file, or a folder under one, is one line
    naming it and exit 2, the file as it was and nothing made (it was a FileExistsError
    traceback once the network had been built)."""
    config = tmp_path / "volume.toml"
    config.write_text("steps = 1\n")
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder\n")
    cases = [
        (["--out", str(taken)], f"error: --out: {taken} is a file, not a folder"),
        (["--out", str(taken / "run")], f"{taken / 'run'}: {taken} is a file, not a folder"),
    ]
    for args, said in cases:
        assert main(["--config", str(config), *args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err, err
    config.write_text(f'steps = 1\nout_dir = "{taken.as_posix()}"\n')
    assert main(["--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: out_dir: {taken} is a file, not a folder", err
    assert taken.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt", "volume.toml"]


def test_the_command_line_refuses_bad_primer_settings_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "volume.toml"
    for text, said in [
        ("primer_depths_um = [1e300]\n", "primer_depths_um = [1e+300]"),
        ("primer_depths_um = [5.0]\nprimer_kernel = 4\n", "primer_kernel = 4"),
    ]:
        config.write_text(f'{text}out_dir = "{(tmp_path / "run").as_posix()}"\n')
        assert main(["--config", str(config), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {config}: {said}") and "\n" not in err, err
    assert not (tmp_path / "run").exists()
