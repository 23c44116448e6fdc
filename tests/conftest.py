"""Shared pytest setup: the `gpu` and `slow` markers and their skip reasons."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_reason = _cuda_device_reason()
    run_slow = config.getoption("--run-slow")
    for item in items:
        if gpu_reason and "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if not run_slow and "slow" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="slow test: run with --run-slow"))
