"""TensorRT's whole-refocus engines: only the few most recently used plans keep theirs.

No GPU or TensorRT needed: where tensorrt is not installed, `engine.runtime._tensorrt` is
imported against a stand-in module (only its import-time names are touched) and forgotten
after each test, and the engines are fakes that record when they are made and closed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest

from engine.dpm import VolumePlan

SHAPE = (8, 8)


@pytest.fixture
def trt_mod(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """`engine.runtime._tensorrt`, imported against a stand-in tensorrt when none is installed."""
    import engine.runtime

    before = set(sys.modules)
    if importlib.util.find_spec("tensorrt") is None:
        monkeypatch.setitem(sys.modules, "tensorrt", MagicMock(name="tensorrt"))
    yield importlib.import_module("engine.runtime._tensorrt")
    if "tensorrt" not in before:  # nothing imported against the stand-in outlives the test
        for name in [n for n in sys.modules if n not in before]:
            if name.startswith("engine.runtime._t"):
                del sys.modules[name]
                if hasattr(engine.runtime, name.rsplit(".", 1)[1]):
                    delattr(engine.runtime, name.rsplit(".", 1)[1])


class _Engine:
    """A stand-in engine: says when it is made and closed, into a shared event list."""

    def __init__(self, key: Any, events: list[tuple[str, Any]]) -> None:
        self.key, self.events, self.closed = key, events, False
        events.append(("made", key))

    def close(self) -> None:
        assert not self.closed, f"{self.key} closed twice"
        self.closed = True
        self.events.append(("closed", self.key))


def test_the_least_recently_used_value_is_closed_before_a_new_one_is_made(
    trt_mod: ModuleType,
) -> None:
    events: list[tuple[str, Any]] = []
    kept = trt_mod._Recent(3)
    made = {k: kept.get(k, lambda k=k: _Engine(k, events)) for k in "abc"}
    assert kept.get("a", lambda: pytest.fail("a is kept: not made again")) is made["a"]
    kept.get("d", lambda: _Engine("d", events))  # b is now the least recently used
    assert kept.keys() == ["c", "a", "d"] and made["b"].closed
    assert events[-2:] == [("closed", "b"), ("made", "d")]  # never more than 3 alive at once

    def fails() -> _Engine:
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        kept.get("e", fails)
    assert "e" not in kept.keys() and len(kept) <= 3
    kept.clear()
    assert len(kept) == 0
    alive = [e for e in made.values() if not e.closed]
    assert not alive, alive
    assert [k for what, k in events if what == "made"] == sorted(
        k for what, k in events if what == "closed"
    )  # every engine made was closed exactly once (close asserts "once")


def test_an_engine_that_fails_to_close_is_said_not_blamed_on_the_new_plan(
    trt_mod: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    """Freeing the oldest engine's buffers fails (a CUDA error): the new engine is made all
    the same and the failure is one warning, not the new plan's error."""

    class _Stuck(_Engine):
        def close(self) -> None:
            raise RuntimeError("CUDA error 700 freeing buffers")

    events: list[tuple[str, Any]] = []
    kept = trt_mod._Recent(1)
    kept.get("old", lambda: _Stuck("old", events))
    with caplog.at_level("WARNING"):
        new = kept.get("new", lambda: _Engine("new", events))
    assert kept.keys() == ["new"] and new.key == "new"
    assert any("CUDA error 700" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="limit"):
        trt_mod._Recent(0)


def _backend(trt_mod: ModuleType) -> Any:
    """A TensorRTBackend with only what `refocus` reads for a volume model's uniform planes."""
    backend = trt_mod.TensorRTBackend.__new__(trt_mod.TensorRTBackend)
    backend.metadata = SimpleNamespace(volume=SimpleNamespace(depth_um=[-2.0, -1.0, 0.0, 1.0, 2.0]))
    backend.options = SimpleNamespace(point_fit=None, cache_dir=None)
    backend.precision = "fp32"
    backend._network_onnx = Path("network.onnx")
    backend._psf = np.zeros((9, 3, 3), np.float32)
    backend._planes = trt_mod._Recent(trt_mod.PLANES_ENGINES_KEPT)
    backend._planes_failed = set()
    # each engine call makes the backend's GPU current in the calling thread (no GPU here)
    backend._device_index = 0
    backend._rt = SimpleNamespace(cudaSetDevice=lambda index: (0,))
    backend._check = lambda result: None
    return backend


def test_a_daemon_retuning_its_planes_keeps_only_the_latest_few_engines(
    trt_mod: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven plans in turn, then the latest again: at most `PLANES_ENGINES_KEPT` engines are
    alive (the others closed: their GPU memory freed), the latest is reused, each frame comes
    out of its own plan's engine, and a plan whose build failed runs on the host for good."""
    events: list[tuple[str, Any]] = []

    class FakePlanesEngine(_Engine):
        def __init__(
            self,
            network_onnx: Path,
            metadata: Any,
            psf: np.ndarray,
            shape: tuple[int, int],
            z_um: tuple[float, ...],
            *,
            precision: str,
            cache_dir: Path | None,
        ) -> None:
            if z_um == (2.0,):
                events.append(("tried", z_um))
                raise RuntimeError("out of GPU memory while building")
            if z_um == (-2.0, 2.0):  # a frame so large its graph passes protobuf's limit
                events.append(("tried", z_um))
                raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
            super().__init__(z_um, events)
            self.z_um = z_um

        def run(self, frame: np.ndarray) -> np.ndarray:
            return np.stack([frame + np.float32(z) for z in self.z_um])

    host: list[tuple[float, ...] | None] = []

    def host_refocus(self: Any, frames: np.ndarray, plan: VolumePlan, *_: Any) -> np.ndarray:
        host.append(plan.z_um)
        return np.zeros((1, len(plan), *SHAPE), np.float32)

    monkeypatch.setattr(trt_mod, "PlanesEngine", FakePlanesEngine)
    monkeypatch.setattr(trt_mod.BaseBackend, "refocus", host_refocus)
    backend = _backend(trt_mod)
    frame = np.arange(64, dtype=np.float32).reshape(SHAPE)
    plans = [(-2.0,), (-1.0,), (0.0,), (1.0,), (-1.0, 1.0), (-2.0, 0.0), (0.0, 1.0)]
    for z in plans:
        out = backend.refocus(frame, VolumePlan.from_z(z, SHAPE))
        np.testing.assert_array_equal(out[0], np.stack([frame + z_i for z_i in z]))
    kept = trt_mod.PLANES_ENGINES_KEPT
    alive = [k for what, k in events if what == "made"]
    for what, k in events:
        if what == "closed":
            alive.remove(k)
    assert alive == plans[-kept:] == [k[1] for k in backend._planes.keys()]
    backend.refocus(frame, VolumePlan.from_z(plans[-1], SHAPE))  # kept: not made again
    assert sum(what == "made" for what, _ in events) == len(plans)

    for _ in range(2):  # a failed build is tried once, its plan then runs on the host
        backend.refocus(frame, VolumePlan.from_z([2.0], SHAPE))
    assert host == [(2.0,), (2.0,)] and events.count(("tried", (2.0,))) == 1
    # the oldest engine was closed before the build (room for it on the GPU), none since
    assert len(backend._planes) == kept - 1 and events[-2] == ("closed", plans[-kept])
    for _ in range(2):  # so is a graph onnx will not save
        backend.refocus(frame, VolumePlan.from_z([-2.0, 2.0], SHAPE))
    assert host[2:] == [(-2.0, 2.0)] * 2 and events.count(("tried", (-2.0, 2.0))) == 1

    backend._planes.clear()  # what `close` does with them
    assert sum(what == "closed" for what, _ in events) == len(plans)
