"""The model ↔ scope optics check: `ModelMetadata.optics_mismatch` and `live.config.check_optics`.

Every test reads the shipped models' real metadata files (pixel 0.3 µm, NA 0.75, 0.52 µm).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from engine.metadata import ModelMetadata
from live.config import ConfigError, check_optics, load_config, validate_config

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "engine" / "weights"
SHIPPED = [WEIGHTS / "deepz-volume.json", WEIGHTS / "deepz-slim.json"]


@pytest.fixture(params=SHIPPED, ids=lambda p: p.stem)
def shipped(request: pytest.FixtureRequest) -> ModelMetadata:
    return ModelMetadata.from_file(request.param)


def scope_configs() -> list[Path]:
    """The shipped config.toml and every scope config (a [source] table) under configs/."""
    found = [REPO / "config.toml"]
    for path in sorted((REPO / "configs").glob("*.toml")):
        if "source" in tomllib.loads(path.read_text(encoding="utf-8")):
            found.append(path)
    return found


def test_the_shipped_models_were_trained_at_the_shipped_scopes_optics(shipped):
    assert (shipped.pixel_size_um, shipped.na, shipped.wavelength_um) == (0.3, 0.75, 0.52)
    assert shipped.optics_mismatch(pixel_size_um=0.3, na=0.75, wavelength_um=0.52) == []
    assert shipped.optics_mismatch(pixel_size_um=0.3) == []  # NA, wavelength unknown: not compared


def test_each_mismatched_quantity_gives_one_reason(shipped):
    assert shipped.optics_mismatch(pixel_size_um=0.1) == [
        "model trained at 0.3 µm pixels, scope has 0.1 µm"
    ]
    reasons = shipped.optics_mismatch(pixel_size_um=0.1, na=1.4, wavelength_um=0.67)
    assert reasons == [
        "model trained at 0.3 µm pixels, scope has 0.1 µm",
        "model trained at NA 0.75, scope has NA 1.4",
        "model trained at 0.52 µm emission, scope has 0.67 µm",
    ]
    assert shipped.optics_mismatch(pixel_size_um=0.3, na=0.75, wavelength_um=0.67) == [
        "model trained at 0.52 µm emission, scope has 0.67 µm"
    ]


def test_the_tolerance_is_relative(shipped):
    # a 6.5 µm camera pixel behind a 20x objective: 0.325 µm, 8 % from 0.3
    assert shipped.optics_mismatch(pixel_size_um=0.325) == []
    assert shipped.optics_mismatch(pixel_size_um=0.325, rel_tol=0.05) != []
    assert shipped.optics_mismatch(pixel_size_um=0.34) != []  # 12 %


@pytest.mark.parametrize("path", scope_configs(), ids=lambda p: p.name)
def test_shipped_scope_configs_pass_with_the_shipped_models(path, shipped):
    config = load_config(path)
    assert config.engine.optics_check == "refuse"
    assert check_optics(config, shipped) is None


def test_a_scope_at_other_optics_is_refused_in_one_line_naming_the_keys(shipped):
    config = validate_config(
        {
            "source": {
                "kind": "micromanager",
                "frame_shape": [256, 256],
                "pixel_size_um": 0.1,
                "objective_na": 1.4,
                "micromanager": {"acquisition": "hook"},
            }
        }
    )
    message = check_optics(config, shipped)
    assert message is not None and "\n" not in message
    assert "model trained at 0.3 µm pixels, scope has 0.1 µm" in message
    assert "model trained at NA 0.75, scope has NA 1.4" in message
    assert "source.pixel_size_um, source.objective_na;" in message  # wavelength unset: unchecked
    assert "emission_wavelength_um" not in message
    assert "engine.optics_check = 'warn' to run anyway" in message
    config.engine.optics_check = "warn"
    warned = check_optics(config, shipped)
    assert warned is not None and "running anyway (engine.optics_check = 'warn')" in warned
    config.engine.optics_check = "off"
    assert check_optics(config, shipped) is None


def test_a_simulated_scope_compares_the_simulators_optics(shipped):
    config = validate_config({"source": {"simulator": {"optics": {"na": 1.0}}}})
    message = check_optics(config, shipped)
    assert message is not None
    assert "model trained at NA 0.75, scope has NA 1" in message
    assert "source.simulator.optics.na" in message
    with pytest.raises(ConfigError, match=r"source.objective_na = 1.2 differs from the simulated"):
        validate_config({"source": {"objective_na": 1.2}})


def test_a_core_scope_is_checked_after_its_geometry_is_resolved(shipped):
    config = validate_config({"source": {"kind": "micromanager"}})
    with pytest.raises(ValueError, match="call resolve_geometry first"):
        check_optics(config, shipped)


def test_policy_and_tolerance_are_validated_config_keys(tmp_path):
    path = tmp_path / "scope.toml"
    path.write_text('[engine]\noptics_check = "ignore"\n')
    with pytest.raises(ConfigError, match=r"engine.optics_check = 'ignore': .*'refuse', 'warn'"):
        load_config(path)
    path.write_text("[engine]\noptics_rel_tol = 0\n")
    with pytest.raises(ConfigError, match=r"engine.optics_rel_tol = 0: .*greater than 0"):
        load_config(path)
    path.write_text("[source]\nobjective_na = 2.0\n")
    with pytest.raises(ConfigError, match=r"source.objective_na = 2.0: .*less than or equal"):
        load_config(path)
