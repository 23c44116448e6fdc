"""Shared pytest setup: `gpu`, `cuda` and `slow` markers, and fixtures several test files use."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the dev extra brings it; the fuzz tests skip without it
    pass
else:
    # On CI (`CI=true bash .ci/run`) the property tests draw the same examples every run, so a
    # red run is a change's, not the dice's; locally they keep drawing new ones.
    _hypothesis_settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def _cuda_device_reason() -> str | None:
    """Why GPU tests cannot run here, or None when a CUDA device and TensorRT are present."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'deepz-live[gpu]' on a CUDA machine)"
    if shutil.which("nvidia-smi") is None:
        return "no CUDA device: nvidia-smi not found"
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    if result.returncode != 0 or "GPU" not in result.stdout:
        return "no CUDA device listed by nvidia-smi"
    return None


def _torch_cuda_reason() -> str | None:
    """Why torch cannot run on a CUDA device here, or None when it can."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (the train extra)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_reason = _cuda_device_reason()
    # torch is imported only when a collected test needs the answer
    cuda_reason = _torch_cuda_reason() if any("cuda" in i.keywords for i in items) else None
    run_slow = config.getoption("--run-slow")
    for item in items:
        if gpu_reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if cuda_reason and "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=cuda_reason))
        if not run_slow and "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow test: run with --run-slow"))


TINY_ARCHITECTURE = {"channels": (4, 4, 8, 16), "global_skip": True}
"""A 3-level DeepZ (2 pools, sides multiples of 4): exports and runs in well under a second."""


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A random tiny DeepZ saved as .pt + .json and exported to .onnx (parity-checked) once.

    Returns {"pt": Path, "onnx": Path, "metadata": ModelMetadata}; torch is imported here
    only, when a test asks for the fixture.
    """
    import torch

    from engine.model import DeepZ, save_model, untrained_metadata
    from export import export_onnx

    torch.manual_seed(0)
    model = DeepZ(**TINY_ARCHITECTURE).eval()
    metadata = untrained_metadata(model, "deepz-tiny-test", "nothing: random weights for tests")
    root = tmp_path_factory.mktemp("tiny_model")
    pt = root / "deepz-tiny.pt"
    save_model(model, metadata, pt)
    onnx_path = root / "deepz-tiny.onnx"
    export_onnx(model, metadata, onnx_path, source="tests")
    return {"pt": pt, "onnx": onnx_path, "metadata": metadata}


@pytest.fixture
def pull() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A PULL socket bound to a random loopback port, and its address."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close()


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest on a shared CPU) on one torch thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def lock_holder() -> Iterator[Any]:
    """Start another process that holds a store's lock (`live.store_lock`) until the test ends.

    Yields a function: ``hold(store)`` starts it and returns once the lock is taken.
    """
    started: list[subprocess.Popen[str]] = []
    code = (
        "import sys\n"
        "from live.store_lock import write_lock\n"
        "with write_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )

    def hold(store: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(store)],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in started:
        if proc.poll() is None:
            proc.communicate(timeout=60)  # closes its stdin: it lets the lock go and exits
