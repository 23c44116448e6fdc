"""The held-out sample cache: read back is what was imaged; a bad file costs a re-image."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

import engine.heldout.cache as cache_mod
from engine import heldout as ho

SHAPE = (48, 48)


def _same(a: ho.IndependentSample, b: ho.IndependentSample) -> None:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "objects":
            for g in fields(x):
                np.testing.assert_array_equal(getattr(x, g.name), getattr(y, g.name))
                assert getattr(x, g.name).dtype == getattr(y, g.name).dtype
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype
        else:
            assert x == y, f.name


def test_a_sample_read_back_is_the_sample_imaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imaged = ho.independent_sample("tilted", 7, SHAPE)
    first = ho.cached_sample(tmp_path, "tilted", 7, SHAPE)
    _same(imaged, first)
    assert first.tilt is not None and first.dpm_um is not None
    (file,) = tmp_path.glob("*.npz")
    assert file.name.startswith("tilted-7-")

    def refuse(*args: object, **kwargs: object) -> ho.IndependentSample:
        raise AssertionError("imaged again: the cache was not read")

    monkeypatch.setattr(cache_mod, "independent_sample", refuse)
    _same(imaged, ho.cached_sample(tmp_path, "tilted", 7, SHAPE))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_sample_without_a_tilt_keeps_its_nones(tmp_path: Path) -> None:
    ho.cached_sample(tmp_path, "beads", 3, SHAPE)
    back = ho.cached_sample(tmp_path, "beads", 3, SHAPE)
    assert back.tilt is None and back.dpm_um is None and back.in_focus is None
    _same(ho.independent_sample("beads", 3, SHAPE), back)


def test_the_key_holds_everything_a_sample_is_made_from() -> None:
    optics, camera = ho.IndependentOptics(), ho.HeldoutCamera()
    key = cache_mod.sample_key("beads", 1, SHAPE, optics, camera)
    assert key == cache_mod.sample_key("beads", 1, SHAPE, ho.IndependentOptics(), camera)
    others = {
        cache_mod.sample_key("beads", 2, SHAPE, optics, camera),
        cache_mod.sample_key("spheres", 1, SHAPE, optics, camera),
        cache_mod.sample_key("beads", 1, (48, 64), optics, camera),
        cache_mod.sample_key("beads", 1, SHAPE, ho.IndependentOptics(psf_model="pupil"), camera),
        cache_mod.sample_key("beads", 1, SHAPE, ho.IndependentOptics(point_depth="own"), camera),
        cache_mod.sample_key("beads", 1, SHAPE, optics, ho.HeldoutCamera(read_noise_e=3.0)),
    }
    assert key not in others and len(others) == 6


def test_the_key_changes_with_the_imaging_code(monkeypatch: pytest.MonkeyPatch) -> None:
    optics, camera = ho.IndependentOptics(), ho.HeldoutCamera()
    key = cache_mod.sample_key("beads", 1, SHAPE, optics, camera)
    monkeypatch.setattr(cache_mod, "_FINGERPRINT", "0" * 16)
    assert cache_mod.sample_key("beads", 1, SHAPE, optics, camera) != key


def test_an_unreadable_file_is_imaged_again_and_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ho.cached_sample(tmp_path, "beads", 5, SHAPE)
    (file,) = tmp_path.glob("*.npz")
    file.write_bytes(file.read_bytes()[:1000])  # truncated, as a killed copy would leave it
    back = ho.cached_sample(tmp_path, "beads", 5, SHAPE)
    assert "unreadable" in capsys.readouterr().err
    _same(ho.independent_sample("beads", 5, SHAPE), back)
    _same(back, ho.cached_sample(tmp_path, "beads", 5, SHAPE))  # the file was replaced


def test_no_folder_means_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _same(ho.independent_sample("beads", 4, SHAPE), ho.cached_sample(None, "beads", 4, SHAPE))
    assert not list(tmp_path.iterdir())


def test_a_file_holding_another_sample_is_imaged_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ho.cached_sample(tmp_path, "beads", 5, SHAPE)
    ho.cached_sample(tmp_path, "beads", 6, SHAPE)
    five, six = (next(tmp_path.glob(f"beads-{s}-*.npz")) for s in (5, 6))
    five.write_bytes(six.read_bytes())  # a valid file, of the wrong sample
    back = ho.cached_sample(tmp_path, "beads", 5, SHAPE)
    assert "not beads 5" in capsys.readouterr().err
    _same(ho.independent_sample("beads", 5, SHAPE), back)


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    sample = ho.cached_sample(blocked / "cache", "beads", 5, SHAPE)
    assert "not written" in capsys.readouterr().err
    _same(ho.independent_sample("beads", 5, SHAPE), sample)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temporary file left


def test_a_bad_shape_is_refused_not_served_from_another_key(tmp_path: Path) -> None:
    ho.cached_sample(tmp_path, "beads", 5, SHAPE)
    with pytest.raises(ValueError, match="shape"):
        ho.cached_sample(tmp_path, "beads", 5, (*SHAPE, 1))  # type: ignore[arg-type]


def test_the_hashed_modules_are_all_the_imaging_code() -> None:
    """The key hashes three files; were one of them to import another project module, an edit
    there would change samples without changing their key."""
    here = Path(cache_mod.__file__).parent
    for name in cache_mod._IMAGING_MODULES:
        tree = ast.parse((here / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                if module.split(".")[0] in ("engine", "live", "export"):
                    hashed = module.rsplit(".", 1)[-1] + ".py"
                    assert module.startswith("engine.heldout."), f"{name} imports {module}"
                    assert hashed in cache_mod._IMAGING_MODULES, f"{name} imports {module}"
