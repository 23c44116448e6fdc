"""Tests of engine.model: shapes, presets, gradients, overfitting, save/load checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.metadata import ModelMetadata, ModelMetadataError
from engine.model import (
    PRESETS,
    DeepZ,
    Discriminator,
    build_model,
    load_model,
    save_model,
    untrained_metadata,
)

TINY = {"channels": (4, 4, 8, 16), "global_skip": True}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _metadata(model: DeepZ) -> ModelMetadata:
    return untrained_metadata(model, "tiny")


@pytest.mark.parametrize("shape", [(1, 2, 32, 32), (3, 2, 64, 48), (2, 2, 16, 128)])
def test_forward_shape_and_dtype(shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    model = DeepZ(**TINY)
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 1, shape[2], shape[3])
    assert out.dtype == torch.float32
    assert model.size_multiple == 4


def test_slim_preset_fits_real_time_budget() -> None:
    model = build_model("slim")
    params = model.count_parameters()
    gflop_256 = model.flops_per_pixel() * 256 * 256 / 1e9
    assert 1_000_000 <= params <= 3_000_000
    assert gflop_256 <= 3.0
    assert model.size_multiple == 2 ** (len(PRESETS["slim"]["channels"]) - 2)
    out = model(torch.zeros(1, 2, 64, 96))
    assert out.shape == (1, 1, 64, 96)


def test_paper_preset_matches_released_layout() -> None:
    model = build_model("paper")
    assert model.size_multiple == 32
    assert 77e6 < model.count_parameters() < 79e6


def test_architecture_rebuilds_the_same_model() -> None:
    model = build_model("slim", channels=(4, 4, 8), global_skip=False)
    clone = DeepZ(**model.architecture)
    assert clone.architecture == model.architecture
    clone.load_state_dict(model.state_dict())


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="channels"):
        DeepZ(channels=(8,))
    with pytest.raises(ValueError, match="must not decrease"):
        DeepZ(channels=(8, 16, 8))
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DeepZ((4, 4, 8))  # type: ignore[misc]


def test_gradient_reaches_every_layer() -> None:
    torch.manual_seed(0)
    model = DeepZ(**TINY)
    model(torch.randn(2, 2, 16, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert float(p.grad.abs().sum()) > 0, name


def test_global_skip_makes_a_zero_head_the_identity() -> None:
    model = DeepZ(**TINY)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(model(x), x[:, :1])


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = DeepZ(channels=(8, 8, 16), global_skip=False)
    x = torch.randn(2, 2, 16, 16)
    y = torch.nn.functional.avg_pool2d(x[:, :1], 3, 1, 1) * 2 + x[:, 1:] * 0.5
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    first = torch.nn.functional.l1_loss(model(x), y).item()
    for _ in range(120):
        loss = torch.nn.functional.l1_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_discriminator_scores_each_sample() -> None:
    d = Discriminator(channels=(4, 8))
    assert d(torch.randn(3, 1, 32, 32)).shape == (3,)


def test_save_and_load_round_trip(tmp_path) -> None:
    model = DeepZ(**TINY).eval()
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    loaded, meta = load_model(path)
    assert meta.architecture == model.architecture
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))


def test_load_refuses_missing_metadata(tmp_path) -> None:
    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelMetadataError, match="metadata file not found"):
        load_model(path)


def test_metadata_that_is_not_utf8_or_pads_absurdly_is_a_metadata_error(tmp_path) -> None:
    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    meta_path = path.with_suffix(".json")
    good = meta_path.read_bytes()
    meta_path.write_bytes(b"\xff\xfe" + good)  # not UTF-8
    with pytest.raises(ModelMetadataError, match="cannot read the metadata JSON"):
        ModelMetadata.from_file(meta_path)
    meta = json.loads(good)
    meta["size_multiple"] = 2**40  # frames padded to a terabyte a side
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelMetadataError, match="size_multiple"):
        ModelMetadata.from_file(meta_path)


def test_a_weights_file_torch_cannot_read_is_a_metadata_error_and_exit_2(tmp_path, capsys) -> None:
    """Truncated or foreign .pt files: one line naming the file, from the loader and the CLIs
    that take a .pt (`python -m engine.evaluate`), not torch's traceback."""
    from engine.evaluate import main as evaluate_main

    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    good = path.read_bytes()
    for content in (b"not weights at all", good[: len(good) // 2]):
        path.write_bytes(content)
        with pytest.raises(ModelMetadataError, match=r"m\.pt: not a loadable PyTorch weights"):
            load_model(path)
    assert evaluate_main(["--weights", str(path), "--quick", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {path}: not a loadable")
    assert not (tmp_path / "r").exists()


def test_load_refuses_architecture_that_does_not_match_weights(tmp_path) -> None:
    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["architecture"]["channels"] = [4, 4, 8, 32]
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelMetadataError, match="do not match the architecture"):
        load_model(path)


def test_load_refuses_inconsistent_size_multiple(tmp_path) -> None:
    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["size_multiple"] = 32
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelMetadataError, match="size_multiple"):
        load_model(path)


def test_metadata_whose_size_multiple_the_architecture_contradicts_is_refused() -> None:
    """Any loader (ONNX, OpenVINO, TensorRT side files, not only torch's) refuses a
    `size_multiple` the network cannot take: frames padded to it fail deep inside the engine
    on every call (review 36: onnxruntime's "mismatched dimensions" from a Concat node)."""
    from engine.metadata import architecture_size_multiple

    model = DeepZ(**TINY)
    meta = json.loads(_metadata(model).to_json())
    assert architecture_size_multiple(meta["architecture"]) == model.size_multiple
    assert architecture_size_multiple({"channels": [8, 8, 16, 32, 64, 128, 256]}) == 32
    primed = {"channels": [8, 8, 16], "primer": {"bin": 3}}  # 2 ** 1 pools, a bin of 3
    assert architecture_size_multiple(primed) == 6
    assert architecture_size_multiple({}) is None  # nothing to check against
    meta["size_multiple"] = model.size_multiple * 2
    with pytest.raises(ModelMetadataError, match="does not match the architecture, whose frame"):
        ModelMetadata.from_json(json.dumps(meta))


def test_load_refuses_unbuildable_architecture(tmp_path) -> None:
    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["architecture"]["depth"] = 3
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelMetadataError, match="does not build"):
        load_model(path)


def test_a_primer_travels_in_the_weights_and_sets_the_size_multiple(tmp_path) -> None:
    """The primer's kernels are a buffer: saved and loaded with the weights, no optics needed."""
    primer = {"depths_um": [-4.0, 4.0], "bin": 8, "kernel": 5}
    model = DeepZ(**{**TINY, "in_channels": 1, "global_skip": False, "primer": primer}).eval()
    assert model.size_multiple == 8  # lcm(2 ** 2 pools, bin 8)
    assert model.stem.in_channels == 3  # the frame + 2 primer channels
    assert model.architecture["primer"] == primer
    assert model.primer is not None
    model.primer.kernels.normal_()
    path = tmp_path / "primed.pt"
    save_model(model, _metadata(model), path)
    loaded, _ = load_model(path)
    x = torch.randn(1, 1, 32, 40)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.primer is not None
    torch.testing.assert_close(loaded.primer.kernels, model.primer.kernels)


@pytest.mark.parametrize(
    "primer",
    [
        {"depths_um": [], "bin": 4, "kernel": 5},
        {"depths_um": [3.0], "bin": 4, "kernel": 4},
        {"x": 1},
    ],
)
def test_a_bad_primer_is_named(primer: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="primer"):
        DeepZ(**{**TINY, "primer": primer})


def test_a_saved_pair_names_its_weights_and_loads_with_the_metadata_given(tmp_path) -> None:
    """Both files written atomically (no temporary left), the JSON naming the weights' SHA-256;
    `load_model` gives back the metadata as saved, without that key."""
    from engine.metadata import file_sha256
    from engine.model import WEIGHTS_SHA256

    model = DeepZ(**TINY)
    path = tmp_path / "sub" / "m.pt"
    metadata = _metadata(model)
    meta_path = save_model(model, metadata, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json", "m.pt"]
    assert json.loads(meta_path.read_text())["extra"] == {WEIGHTS_SHA256: file_sha256(path)}
    assert load_model(path)[1] == metadata


def test_a_save_cut_between_weights_and_metadata_is_refused_at_load(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights are replaced first and the JSON last: a crash between the two (here, the
    JSON's write failing) leaves new weights beside the old JSON, whole, which names the old
    weights, and loading refuses rather than reading them as the old model; a first save cut
    there leaves no JSON, refused too. Saved again, the pair loads."""
    import engine.model

    path = tmp_path / "m.pt"
    old = DeepZ(**TINY)
    save_model(old, _metadata(old), path)
    old_json = path.with_suffix(".json").read_bytes()
    torch.manual_seed(1)
    new = DeepZ(**TINY)  # the same architecture: its weights would load beside the old JSON

    def crash(*_: object, **__: object) -> None:
        raise OSError("killed between the two files")

    monkeypatch.setattr(engine.model, "atomic_write_text", crash)
    with pytest.raises(OSError, match="killed"):
        save_model(new, untrained_metadata(new, "retrained"), path)
    assert path.with_suffix(".json").read_bytes() == old_json
    with pytest.raises(ModelMetadataError, match=r"m\.pt: these weights .* are not the ones"):
        load_model(path)
    first = tmp_path / "first.pt"
    with pytest.raises(OSError, match="killed"):
        save_model(new, _metadata(new), first)
    with pytest.raises(ModelMetadataError, match="metadata file not found"):
        load_model(first)
    monkeypatch.undo()
    save_model(new, untrained_metadata(new, "retrained"), path)
    loaded, meta = load_model(path)
    assert meta.name == "retrained"
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), new.eval()(x))


def test_metadata_from_before_the_weights_were_named_still_loads(tmp_path) -> None:
    from engine.model import WEIGHTS_SHA256

    model = DeepZ(**TINY)
    path = tmp_path / "m.pt"
    save_model(model, _metadata(model), path)
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["extra"][WEIGHTS_SHA256]
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert load_model(path)[1] == _metadata(model)


@pytest.mark.parametrize("name", ["deepz-slim", "deepz-volume"])
def test_the_shipped_metadata_names_its_weights(name: str) -> None:
    """Each shipped JSON names the SHA-256 of the weights beside it, so `load_model` refuses
    other weights put in their place (review 55: an all-zero state_dict loaded silently)."""
    import json

    from engine.metadata import file_sha256
    from engine.model import WEIGHTS_SHA256

    weights = Path(__file__).resolve().parents[1] / "engine" / "weights" / f"{name}.pt"
    recorded = json.loads(weights.with_suffix(".json").read_text())["extra"][WEIGHTS_SHA256]
    assert recorded == file_sha256(weights)
