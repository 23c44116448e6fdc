"""engine.runtime: the Backend protocol on every backend installed here, selection, bad files,
and the TensorRT engine cache."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine.metadata import ONNX_METADATA_KEY, ModelMetadata
from engine.runtime import (
    BACKENDS,
    DEFAULT_MODEL,
    Backend,
    BackendError,
    EngineCache,
    EngineKey,
    available_backends,
    default_cache_dir,
    load_backend,
    make_profile,
    onnx_metadata,
    plan_psf_beside,
    read_plan_info,
    select,
)

REPO = Path(__file__).resolve().parent.parent
AVAILABLE = available_backends()


def _frame(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 4000, size=shape, dtype=np.uint16)


def _tolerance(backend: Backend) -> float:
    """Allowed error as a fraction of max |output|: float32 on CPU, TF32 kernels on GPUs."""
    return 2e-5 if backend.device.startswith("cpu") else 2e-3


def _dpms(n: int, shape: tuple[int, int]) -> np.ndarray:
    dz = np.linspace(-8.0, 8.0, n, dtype=np.float32)
    return np.ascontiguousarray(np.broadcast_to(dz[:, None, None], (n, *shape)))


@pytest.fixture(scope="module")
def reference(tiny_model_files: dict[str, object]) -> Backend:
    """The torch backend on the tiny model: the ground truth of every parity test."""
    return load_backend(tiny_model_files["onnx"], prefer=["torch"], device="cpu")  # type: ignore[arg-type]


class BackendTests:
    """Contract tests every backend must pass; subclasses set `backend_name`."""

    backend_name = ""

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls, tiny_model_files: dict[str, object]) -> Backend:
        options = {"frame_shape": (64, 96)} if cls.backend_name == "tensorrt" else {}
        return load_backend(
            tiny_model_files["onnx"],  # type: ignore[arg-type]
            prefer=[cls.backend_name],
            max_batch=8,
            **options,
        )

    def test_attributes(self, backend: Backend, tiny_model_files: dict[str, object]) -> None:
        assert isinstance(backend, Backend)
        assert backend.name == self.backend_name
        assert backend.metadata == tiny_model_files["metadata"]
        assert backend.precision == "fp32"
        assert isinstance(backend.device, str) and backend.device

    @pytest.mark.parametrize(
        ("n_images", "n_planes", "shape"),
        [(1, 5, (64, 96)), (3, 3, (50, 70)), (1, 1, (64, 96)), (2, 2, (33, 64))],
    )
    def test_parity_with_torch(
        self,
        backend: Backend,
        reference: Backend,
        n_images: int,
        n_planes: int,
        shape: tuple[int, int],
    ) -> None:
        images = np.stack([_frame(shape, seed=i) for i in range(n_images)])
        dpms = _dpms(n_planes, shape)
        got = backend.infer(images, dpms)
        want = reference.infer(images, dpms)
        assert got.shape == (n_planes, *shape)
        assert got.dtype == np.float32
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(backend) * scale)

    def test_output_follows_input_intensity_scale(self, backend: Backend) -> None:
        frame = _frame((64, 96)).astype(np.float32)
        dpms = _dpms(3, (64, 96))
        planes = backend.infer(frame, dpms)
        scaled = backend.infer(frame * 10.0 + 500.0, dpms)
        np.testing.assert_allclose(scaled, planes * 10.0 + 500.0, rtol=1e-4, atol=1e-2)
        assert not np.allclose(planes[0], planes[-1])

    def test_any_numeric_dtype(self, backend: Backend) -> None:
        frame = _frame((32, 32))
        dpms = _dpms(2, (32, 32))
        base = backend.infer(frame, dpms)
        for dtype in (np.uint8, np.int32, np.float64):
            got = backend.infer(frame.astype(dtype) if dtype != np.uint8 else frame // 16, dpms)
            assert got.shape == base.shape and got.dtype == np.float32
        np.testing.assert_allclose(
            backend.infer(frame.astype(np.float64), dpms), base, rtol=0, atol=1e-3
        )

    def test_reused_buffers_carry_nothing_between_calls(self, backend: Backend) -> None:
        shape = (64, 96)
        first, second = _frame(shape, seed=1), _frame(shape, seed=2)
        dpms, other_dpms = _dpms(3, shape), _dpms(3, shape)[::-1].copy()
        expected = backend.infer(second, dpms).copy()
        a = backend.infer(first, other_dpms)
        b = backend.infer(second, dpms)  # same shape: the input buffer is reused
        np.testing.assert_array_equal(b, expected)
        assert not np.shares_memory(a, b)  # each call returns a new array the caller owns
        unpadded = backend.infer(_frame((50, 70)), _dpms(3, (50, 70)))  # padded path between
        assert unpadded.shape == (3, 50, 70)
        np.testing.assert_array_equal(backend.infer(second, dpms), expected)

    def test_frozen_dpms_are_normalised_once_and_changes_are_seen(self, backend: Backend) -> None:
        shape = (64, 96)
        frame, other = _frame(shape, seed=4), _frame(shape, seed=5)
        dpms = _dpms(3, shape)
        expected = backend.infer(frame, dpms).copy()
        frozen = dpms.copy()
        frozen.setflags(write=False)
        backend.infer(other, frozen)
        np.testing.assert_array_equal(backend.infer(frame, frozen), expected)  # reused channel
        flipped = np.array(frozen[::-1])
        flipped.setflags(write=False)
        got = backend.infer(frame, flipped)  # new frozen DPMs, same shape: channel rewritten
        np.testing.assert_allclose(got, expected[::-1], rtol=0, atol=1e-5 * np.abs(got).max())
        writable = dpms.copy()
        backend.infer(frame, writable)
        writable[:] = flipped  # changed in place: a writable array is never trusted
        np.testing.assert_array_equal(backend.infer(frame, writable), backend.infer(frame, flipped))
        # nor one frozen, served, then made writeable and changed (review 36: its old check and
        # channel were reused, so NaN DPMs went through as the old planes)
        thawed = dpms.copy()
        thawed.setflags(write=False)
        backend.infer(frame, thawed)
        thawed.setflags(write=True)
        thawed[:] = flipped
        np.testing.assert_array_equal(backend.infer(frame, thawed), backend.infer(frame, flipped))
        thawed[0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            backend.infer(frame, thawed)

    def test_splits_batches_larger_than_max_batch(
        self, backend: Backend, reference: Backend
    ) -> None:
        frame = _frame((32, 32))
        dpms = _dpms(19, (32, 32))
        got = backend.infer(frame, dpms)
        np.testing.assert_allclose(
            got, reference.infer(frame, dpms), rtol=0, atol=_tolerance(backend) * np.abs(got).max()
        )

    @pytest.mark.parametrize(
        ("images", "dpms", "message"),
        [
            (np.zeros((8, 8), bool), np.zeros((1, 8, 8), np.float32), "dtype bool"),
            (np.zeros((8, 8), complex), np.zeros((1, 8, 8), np.float32), "real"),
            (np.zeros((1, 1, 8, 8)), np.zeros((1, 8, 8), np.float32), "(N, H, W)"),
            (np.zeros((8, 8)), np.zeros((1, 8, 9), np.float32), "does not match"),
            (np.zeros((2, 8, 8)), np.zeros((3, 8, 8), np.float32), "broadcast"),
            (np.zeros((8, 8)), np.full((1, 8, 8), np.nan, np.float32), "NaN"),
            (np.zeros((8, 8)), np.array(["a"] * 64).reshape(1, 8, 8), "dpms_um"),
            # one bad pixel would make every output value NaN: refused, not served
            (np.where(np.eye(8) > 0, np.inf, 0.0), np.zeros((1, 8, 8)), "images holds 8 NaN"),
            (np.zeros((8, 8)), np.full((1, 8, 8), 1e300), "beyond"),  # inf as float32
            # finite, but beyond what a camera counts (near 1e38 the float32 render overflows)
            (np.where(np.eye(8) > 0, 1e38, 0.0), np.zeros((1, 8, 8)), "images holds values"),
            (np.full((8, 8), -(2**62), np.int64), np.zeros((1, 8, 8)), "not camera counts"),
        ],
    )
    def test_bad_input_is_a_clear_value_error(
        self, backend: Backend, images: np.ndarray, dpms: np.ndarray, message: str
    ) -> None:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            backend.infer(images, dpms)

    def test_an_engine_failure_is_one_backend_error(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`infer` raises `ValueError` or `BackendError` only (the live worker counts those
        against one frame); an engine's own failure (onnxruntime raises a bare RuntimeError)
        becomes one line naming the backend and the input it failed on."""

        def fail(x: np.ndarray) -> np.ndarray:
            raise RuntimeError("Concat node: mismatched dimensions")

        monkeypatch.setattr(backend, "_run", fail)
        frame, dpms = np.zeros((32, 32)), np.zeros((2, 32, 32), np.float32)
        with pytest.raises(BackendError, match=rf"^{backend.name}: the network failed on input"):
            backend.infer(frame, dpms)

    def test_rate_check(self, backend: Backend) -> None:
        assert backend.is_incompatible((32, 32), 2, rate_hz=1e-3) is False
        reason = backend.is_incompatible((32, 32), 2, rate_hz=1e9)
        assert isinstance(reason, str) and "Hz" in reason
        assert "invalid" in str(backend.is_incompatible((0, 32), 2, rate_hz=1.0))


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="onnxruntime is not installed")
class TestOnnxRuntime(BackendTests):
    backend_name = "onnxruntime"


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="openvino is not installed")
class TestOpenVino(BackendTests):
    backend_name = "openvino"


@pytest.mark.skipif("torch" not in AVAILABLE, reason="torch is not installed")
class TestTorch(BackendTests):
    backend_name = "torch"

    @pytest.mark.skip(
        reason="the torch backend is the parity reference itself; its agreement with ONNX "
        "Runtime and OpenVINO is what their classes check"
    )
    def test_parity_with_torch(self) -> None:  # type: ignore[override]
        raise AssertionError("skipped")


@pytest.mark.gpu
class TestTensorRT(BackendTests):
    backend_name = "tensorrt"


def test_registry_order_and_names() -> None:
    assert [spec.name for spec in BACKENDS] == ["tensorrt", "openvino", "onnxruntime", "torch"]
    libraries = {"tensorrt": "tensorrt", "openvino": "openvino", "onnxruntime": "onnxruntime"}
    for spec in BACKENDS:
        library = libraries.get(spec.name, "torch")
        # offered only where its library is installed (TensorRT also needs a CUDA device)
        assert spec.is_available() <= (importlib.util.find_spec(library) is not None)
        if spec.name != "tensorrt":
            assert spec.is_available() == (importlib.util.find_spec(library) is not None)


def test_select_falls_back_and_says_why() -> None:
    spec, reasons = select(["tensorrt", "onnxruntime", "torch"])
    if "tensorrt" in AVAILABLE:
        assert spec.name == "tensorrt" and not reasons
    else:
        assert spec.name == "onnxruntime"
        assert "tensorrt" in reasons["tensorrt"] and "pip install" in reasons["tensorrt"]
    assert select(["torch"])[0].name == "torch"
    with pytest.raises(ValueError, match="prefer must list backends"):
        select(["tensorflow"])


def test_load_backend_falls_back_past_a_backend_that_cannot_load(
    tiny_model_files: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """A backend that is installed and fails on this model is said as a warning (the daemon
    logs warnings only: a model served by another backend was silent); one not installed
    stays a quiet note."""
    pt = tiny_model_files["pt"]
    with caplog.at_level(logging.INFO, logger="engine.runtime"):
        backend = load_backend(pt, prefer=["onnxruntime", "torch"])  # type: ignore[arg-type]
    assert backend.name == "torch"
    skipped = [r for r in caplog.records if "backend onnxruntime skipped" in r.getMessage()]
    assert [r.levelname for r in skipped] == ["WARNING"]
    with pytest.raises(BackendError, match=r"onnxruntime: .*needs an \.onnx model"):
        load_backend(pt, prefer=["onnxruntime"])  # type: ignore[arg-type]


def test_unsupported_precision_is_skipped(tiny_model_files: dict[str, object]) -> None:
    with pytest.raises(BackendError, match="supports precision"):
        load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"], precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):  # measured, not offered
        load_backend(tiny_model_files["onnx"], precision="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        load_backend(tiny_model_files["onnx"], precision="fp8")  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"nope\.onnx: model file not found"):
        load_backend(tmp_path / "nope.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(BackendError, match=r"folder\.onnx: is a folder, not a model file"):
        load_backend(tmp_path / "folder.onnx")


ONNX_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} missing"))
    for name in ("openvino", "onnxruntime")
]
"""The backends that read .onnx files directly; each must reject bad files the same way."""


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_corrupt_file_names_file_and_problem(tmp_path: Path, name: str) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    with pytest.raises(BackendError, match=r"corrupt\.onnx.*not a loadable ONNX model"):
        load_backend(bad, prefer=[name])


def _save(graph_model: onnx.ModelProto, path: Path, metadata: ModelMetadata | None) -> Path:
    if metadata is not None:
        graph_model.metadata_props.add(key=ONNX_METADATA_KEY, value=metadata.to_json())
    onnx.save_model(graph_model, str(path))
    return path


def _identity_model(in_channels: int, out_channels: int) -> onnx.ModelProto:
    """A valid ONNX graph that is not a Deep-Z model: a 1x1 conv with the given channels."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", in_channels, "h", "w"])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", out_channels, "h", "w"])
    weight = helper.make_tensor(
        "w",
        TensorProto.FLOAT,
        [out_channels, in_channels, 1, 1],
        [1.0] * in_channels * out_channels,
    )
    node = helper.make_node("Conv", ["input", "w"], ["output"])
    graph = helper.make_graph([node], "not-deepz", [x], [y], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_a_graph_the_runtime_cannot_build_is_one_line(tmp_path: Path, name: str) -> None:
    """An operator the runtime does not know: its own report (OpenVINO's C++ checks run to
    eight lines) is folded into one BackendError line naming the file."""
    model = _identity_model(2, 1)
    model.graph.node[0].op_type = "NoSuchOperator"
    path = _save(model, tmp_path / "unknown.onnx", onnx_metadata(DEFAULT_MODEL))
    with pytest.raises(BackendError, match=r"unknown\.onnx") as err:
        load_backend(path, prefer=[name])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_model_without_metadata(tmp_path: Path, name: str) -> None:
    path = _save(_identity_model(2, 1), tmp_path / "nometa.onnx", None)
    with pytest.raises(
        BackendError, match=rf"nometa\.onnx: no Deep-Z metadata.*{ONNX_METADATA_KEY}"
    ):
        load_backend(path, prefer=[name])


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_model_with_wrong_inputs(
    tmp_path: Path, tiny_model_files: dict[str, object], name: str
) -> None:
    metadata = tiny_model_files["metadata"]
    path = _save(_identity_model(3, 1), tmp_path / "wrong.onnx", metadata)  # type: ignore[arg-type]
    with pytest.raises(BackendError, match=r"wrong\.onnx: input 'input' must be \(N, 2, H, W\)"):
        load_backend(path, prefer=[name])


@pytest.mark.parametrize("name", ONNX_BACKENDS)
def test_model_with_bad_metadata(tmp_path: Path, name: str) -> None:
    model = _identity_model(2, 1)
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps({"name": "x"}))
    path = tmp_path / "badmeta.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(BackendError, match=r"badmeta\.onnx: invalid Deep-Z metadata"):
        load_backend(path, prefer=[name])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dpm_scale_um", float("inf")),  # every plane the same: DPM / inf is 0
        ("dpm_scale_um", 1e-300),  # every plane NaN
        ("dz_range_um", [float("-inf"), float("inf")]),
        ("pixel_size_um", float("inf")),
        ("wavelength_um", 1e300),
    ],
)
def test_metadata_out_of_any_microscopes_range_is_refused_at_load(
    tmp_path: Path, key: str, value: object
) -> None:
    """Infinite or degenerate optics in a model's metadata are refused when it loads, in one
    line naming the field (they loaded, and served identical or NaN planes)."""
    shipped = json.loads(onnx_metadata(DEFAULT_MODEL).model_dump_json())
    model = onnx.load(str(DEFAULT_MODEL))
    del model.metadata_props[:]
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps({**shipped, key: value}))
    path = tmp_path / "odd.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(BackendError, match=rf"odd\.onnx: invalid Deep-Z metadata.*{key}") as err:
        load_backend(path, prefer=["onnxruntime"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ONNX_BACKENDS)
@pytest.mark.parametrize(
    ("architecture", "volume", "message"),
    [
        ({"in_channels": None}, False, "in_channels / out_channels must be whole numbers"),
        ({"out_channels": "x"}, False, "in_channels / out_channels must be whole numbers"),
        ({}, True, "a volume model takes 1 channel"),  # a per-plane net said to be a volume one
    ],
)
def test_metadata_that_contradicts_the_network_is_one_backend_error(
    tmp_path: Path,
    tiny_model_files: dict[str, object],
    name: str,
    architecture: dict[str, object],
    volume: bool,
    message: str,
) -> None:
    from engine.metadata import VolumeOutput

    metadata = tiny_model_files["metadata"]
    assert isinstance(metadata, ModelMetadata)
    update: dict[str, object] = {"architecture": {**metadata.architecture, **architecture}}
    if volume:
        update["volume"] = VolumeOutput(depth_um=[-1.0, -0.5, 0.0, 0.5, 1.0], psf_file="psf.npy")
    path = _save(_identity_model(2, 1), tmp_path / "odd.onnx", metadata.model_copy(update=update))
    with pytest.raises(BackendError, match=message):
        load_backend(path, prefer=[name])


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="openvino is not installed")
def test_openvino_refuses_gpu_devices_and_non_onnx_files(
    tiny_model_files: dict[str, object],
) -> None:
    with pytest.raises(BackendError, match="openvino runs on the CPU here"):
        load_backend(tiny_model_files["onnx"], prefer=["openvino"], device="cuda")  # type: ignore[arg-type]
    with pytest.raises(BackendError, match=r"openvino needs an \.onnx model"):
        load_backend(tiny_model_files["pt"], prefer=["openvino"])  # type: ignore[arg-type]


def test_runtime_never_imports_torch(tiny_model_files: dict[str, object]) -> None:
    code = (
        "import sys, numpy as np\n"
        "from engine.runtime import load_backend\n"
        f"b = load_backend({str(tiny_model_files['onnx'])!r}, prefer=['tensorrt', 'onnxruntime'])\n"
        "b.infer(np.ones((16, 16), np.uint16), np.zeros((2, 16, 16), np.float32))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(b.name)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("onnxruntime", "tensorrt")


def test_shipped_model_loads_without_side_files() -> None:
    backend = load_backend(prefer=["onnxruntime"])
    assert backend.metadata.size_multiple >= 1
    planes = backend.infer(_frame((64, 64)), _dpms(2, (64, 64)))
    assert planes.shape == (2, 64, 64) and np.isfinite(planes).all()


def test_shipped_onnx_matches_shipped_weights() -> None:
    """The committed ONNX was exported from the committed weights (not stale)."""
    onnx_backend = load_backend(prefer=["onnxruntime"], device="cpu")
    torch_backend = load_backend(prefer=["torch"], device="cpu")
    assert onnx_backend.metadata == torch_backend.metadata
    frame, dpms = _frame((64, 64)), _dpms(3, (64, 64))
    want = torch_backend.infer(frame, dpms)
    got = onnx_backend.infer(frame, dpms)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


# the TensorRT engine cache (no tensorrt needed)


def _sha256(path: object) -> str:
    return hashlib.sha256(Path(str(path)).read_bytes()).hexdigest()


def _key(**changes: object) -> EngineKey:
    fields: dict[str, object] = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "tensorrt": "10.9.0",
        "onnx_sha256": "ab" * 32,
        "precision": "fp16",
        "min_shape": (1, 2, 256, 256),
        "opt_shape": (41, 2, 512, 512),
        "max_shape": (64, 2, 1024, 1024),
    }
    fields.update(changes)
    return EngineKey(**fields)  # type: ignore[arg-type]


def test_engine_key_changes_with_every_field() -> None:
    base = _key()
    assert base.digest() == _key().digest()
    for change in (
        {"gpu": "NVIDIA A100"},
        {"tensorrt": "10.10.0"},
        {"onnx_sha256": "cd" * 32},
        {"precision": "fp32"},
        {"max_shape": (41, 2, 1024, 1024)},
    ):
        assert _key(**change).digest() != base.digest(), change
    assert "/" not in base.file_stem("deepz slim/v1")


def test_engine_cache_store_lookup_and_plan_info(
    tmp_path: Path, tiny_model_files: dict[str, object]
) -> None:
    metadata = tiny_model_files["metadata"]
    cache = EngineCache(tmp_path / "engines")
    key = _key(onnx_sha256=_sha256(tiny_model_files["onnx"]))  # type: ignore[arg-type]
    assert cache.lookup(key, metadata.name) is None  # type: ignore[attr-defined]
    entry = cache.store(key, metadata, b"plan bytes", tiny_model_files["onnx"])  # type: ignore[arg-type]
    assert cache.lookup(key, metadata.name) == entry  # type: ignore[attr-defined]
    assert entry.plan.read_bytes() == b"plan bytes"
    assert read_plan_info(entry.plan) == (key, metadata)
    assert cache.lookup(_key(precision="fp32"), metadata.name) is None  # type: ignore[attr-defined]
    assert "H100" in cache.timing_cache(key.gpu, key.tensorrt).name
    # a side file that is not a plan's metadata is one ValueError naming it (review 36: a
    # JSON list escaped as TypeError, past the loader, which catches its own errors only)
    side = entry.plan.with_suffix(".json")
    good = json.loads(side.read_text())
    for text in ("[1]", "not json", "{}", json.dumps({**good, "key": {"gpu": 1}}), "\udc80"):
        side.write_text(text, encoding="utf-8", errors="surrogateescape")
        with pytest.raises(ValueError, match=rf"{side.name}: not a cached plan's metadata"):
            read_plan_info(entry.plan)


def test_a_cached_plan_alone_finds_its_volume_bank_beside_the_onnx_it_was_built_from(
    tmp_path: Path, tiny_model_files: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 75: a volume model loaded from its cached `.plan` alone looked for its PSF bank
    beside the plan, in the engine cache, where there is none: the side file records the ONNX
    and the bank beside it is the one (a bank copied beside the plan is taken first)."""
    import shutil

    shipped = Path("engine/weights/deepz-volume.onnx")
    volume = onnx_metadata(shipped)
    assert volume.volume is not None
    cache = EngineCache(tmp_path / "engines")
    entry = cache.store(_key(onnx_sha256=_sha256(shipped)), volume, b"plan bytes", shipped)
    monkeypatch.chdir(tmp_path)  # the plan loaded from another folder than it was built in
    assert plan_psf_beside(entry.plan, volume) == REPO / shipped
    monkeypatch.chdir(REPO)
    assert (shipped.parent / volume.volume.psf_file).is_file()
    per_plane = tiny_model_files["metadata"]
    assert plan_psf_beside(entry.plan, per_plane) == entry.plan  # type: ignore[arg-type]
    shutil.copy(shipped.parent / volume.volume.psf_file, entry.plan.parent)
    assert plan_psf_beside(entry.plan, volume) == entry.plan
    (entry.plan.parent / volume.volume.psf_file).unlink()
    entry.plan.with_suffix(".json").write_text("not json")  # read_plan_info says so, not this
    assert plan_psf_beside(entry.plan, volume) == entry.plan


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEEPZ_ENGINE_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DEEPZ_ENGINE_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "deepz-live", "engines")


def test_profile_covers_padded_frames_and_batches(tiny_model_files: dict[str, object]) -> None:
    metadata = tiny_model_files["metadata"]
    profile = make_profile(metadata, [(510, 510), (250, 1030)], max_batch=64)  # type: ignore[arg-type]
    # sides padded up to the tiny model's size_multiple of 4 (510 -> 512, 250 -> 252,
    # 1030 -> 1032); the first shape at OPT_BATCH (41, the live plan's planes) is the optimum
    assert metadata.size_multiple == 4  # type: ignore[attr-defined]
    assert profile.min_shape == (1, 2, 252, 512)
    assert profile.opt_shape == (41, 2, 512, 512)
    assert profile.max_shape == (64, 2, 512, 1032)
    assert profile.covers(41, 512, 512) and not profile.covers(65, 512, 512)
    assert make_profile(metadata, [(256, 256)], max_batch=8).opt_shape == (8, 2, 256, 256)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame shapes"):
        make_profile(metadata, [(0, 5)])  # type: ignore[arg-type]
    # a volume model's batch is frames of 41 depths each: capped, not sized for 64 frames
    from engine.runtime import onnx_metadata

    volume = onnx_metadata(DEFAULT_MODEL.parent / "deepz-volume.onnx")
    capped = make_profile(volume, [(2048, 2048)], max_batch=64)
    assert capped.max_shape[0] == 4 and capped.opt_shape[0] == 4


def test_profile_of_a_volume_model_takes_the_image_alone() -> None:
    from engine.runtime import onnx_metadata

    shipped = Path(__file__).resolve().parents[1] / "engine" / "weights" / "deepz-volume.onnx"
    metadata = onnx_metadata(shipped)
    assert metadata.volume is not None
    profile = make_profile(metadata, [(256, 256)], max_batch=4)
    assert profile.min_shape[1] == profile.opt_shape[1] == profile.max_shape[1] == 1
    assert profile.max_shape == (4, 1, 256, 256)


@pytest.mark.parametrize("name", [*ONNX_BACKENDS, "torch"])
def test_weights_holding_nan_are_refused_at_load(
    tmp_path: Path, tiny_model_files: dict[str, object], name: str
) -> None:
    """A training run that diverged exports NaN weights: refused when the model loads, in one
    line naming the file (they loaded, and every frame came out NaN, or finite and wrong)."""
    from onnx import numpy_helper

    if name == "torch":
        import torch

        from engine.model import load_model, save_model

        model, metadata = load_model(tiny_model_files["pt"])  # type: ignore[arg-type]
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        path = tmp_path / "nan.pt"
        save_model(model, metadata, path)
    else:
        proto = onnx.load(str(tiny_model_files["onnx"]))
        first = next(t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT)
        values = numpy_helper.to_array(first).copy()
        values.flat[0] = np.nan
        first.CopyFrom(numpy_helper.from_array(values, first.name))
        path = tmp_path / "nan.onnx"
        onnx.save_model(proto, str(path))
    with pytest.raises(BackendError, match=r"nan\.(onnx|pt): .*NaN or infinite values"):
        load_backend(path, prefer=[name])


def test_refocus_refuses_a_stack_dtype_it_would_truncate_into() -> None:
    """Stacks are float16 or float32: an integer dtype truncated the per-plane model's planes
    and raised numpy's own error for a volume model (review 55); the next call still works."""
    from engine.dpm import VolumePlan

    backend = load_backend(DEFAULT_MODEL, prefer=["onnxruntime"], intra_op_threads=1)
    frame = np.full((64, 64), 500, np.uint16)
    plan = VolumePlan.from_z([0.0, 2.0], (64, 64))
    with pytest.raises(ValueError, match="stacks are float16 or float32, not int16"):
        backend.refocus(frame, plan, dtype=np.int16)  # type: ignore[arg-type]
    assert backend.refocus(frame, plan, dtype=np.float16).dtype == np.float16


def test_onnxruntime_gives_its_cuda_provider_the_device_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ "cuda:N" reaches ONNX Runtime as the provider's device_id (it ran on GPU 0 whatever N
    said, review 75); a device it cannot name is refused in one line. The provider list is
    what ONNX Runtime is handed; the session on a real GPU is `test_onnxruntime_runs_on_the_
    cuda_device_named`."""
    from engine.runtime import _onnxruntime

    monkeypatch.setattr(
        _onnxruntime.ort,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    cpu = "CPUExecutionProvider"
    assert _onnxruntime._providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), cpu]
    assert _onnxruntime._providers("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), cpu]
    assert _onnxruntime._providers(None) == [("CUDAExecutionProvider", {"device_id": 0}), cpu]
    assert _onnxruntime._providers("cpu") == [cpu]
    for bad in ("cuda:x", "gpu", "cuda:"):
        with pytest.raises(BackendError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
            _onnxruntime._providers(bad)
    with pytest.raises(BackendError, match=r"device must be 'cpu', 'cuda' or 'cuda:N'"):
        _onnxruntime._providers("cuda:\u00b2")  # a digit to isdigit, not to int
    monkeypatch.setattr(_onnxruntime.ort, "get_available_providers", lambda: [cpu])
    with pytest.raises(BackendError, match="no CUDA provider here"):
        _onnxruntime._providers("cuda:1")
    assert _onnxruntime._providers(None) == [cpu]


def test_onnxruntime_never_runs_a_named_cuda_device_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tiny_model_files: dict[str, object]
) -> None:
    """Review 89: ONNX Runtime's own fallback went on on the CPU (a banner on stdout) when the
    CUDA provider could not start, e.g. "cuda:1" past the GPUs present. Here the provider is
    said to exist where it does not (this CPU build of ONNX Runtime skips it): a named device
    is refused in one line, no device named runs on the CPU."""
    from engine.runtime import _onnxruntime

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(_onnxruntime.ort, "get_available_providers", lambda: providers)
    with pytest.raises(BackendError, match=r"'cuda:1' asked, the session runs on CPUExecution"):
        load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"], device="cuda:1")  # type: ignore[arg-type]
    backend = load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"])  # type: ignore[arg-type]
    assert backend.device.startswith("cpu")


def test_onnxruntime_runs_on_the_cuda_device_named(tiny_model_files: dict[str, object]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)")
    backend = load_backend(tiny_model_files["onnx"], prefer=["onnxruntime"], device="cuda:0")  # type: ignore[arg-type]
    assert backend.device == "cuda:0 (CUDAExecutionProvider)"
    x = np.zeros((1, 1, 32, 32), dtype=np.float32)
    assert np.isfinite(backend.infer(x, np.zeros_like(x))).all()
