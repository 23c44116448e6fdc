"""The TensorRT engine cache: one plan per (GPU model, TensorRT version, ONNX hash, build options).

An engine is only valid for the GPU model and TensorRT version that built it, and takes minutes
to build, so the daemon builds once and reuses. Each plan has a `.json` beside it with its key
and the model metadata, so a plan can be loaded without the ONNX. No tensorrt import here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.metadata import ModelMetadata

CACHE_ENV = "DEEPZ_ENGINE_CACHE"
"""Environment variable that overrides the default cache directory."""


def default_cache_dir() -> Path:
    """Return `$DEEPZ_ENGINE_CACHE`, else `~/.cache/deepz-live/engines`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "deepz-live" / "engines"


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _slug(text: str) -> str:
    """Make `text` safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; equal keys mean the cached plan can be reused."""

    gpu: str
    tensorrt: str
    onnx_sha256: str
    precision: str
    min_shape: tuple[int, int, int, int]
    opt_shape: tuple[int, int, int, int]
    max_shape: tuple[int, int, int, int]

    def digest(self) -> str:
        """Return a short stable hash of the key."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def file_stem(self, model_name: str) -> str:
        """Return a readable, unique file stem for the plan."""
        return f"{_slug(model_name)}-{self.precision}-{_slug(self.gpu)}-{self.digest()}"


@dataclass(frozen=True)
class CacheEntry:
    """A cached plan and its side file."""

    plan: Path
    info: Path


class EngineCache:
    """Directory of `<stem>.plan` + `<stem>.json` files, looked up by `EngineKey`."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, key: EngineKey, model_name: str) -> CacheEntry:
        """Return the paths a plan for `key` has (whether or not it exists yet)."""
        stem = key.file_stem(model_name)
        return CacheEntry(self.root / f"{stem}.plan", self.root / f"{stem}.json")

    def lookup(self, key: EngineKey, model_name: str) -> CacheEntry | None:
        """Return the cached entry for `key` when its plan and side file both exist."""
        entry = self.entry(key, model_name)
        if entry.plan.is_file() and entry.info.is_file():
            return entry
        return None

    def store(
        self, key: EngineKey, metadata: ModelMetadata, plan: bytes, onnx_path: Path
    ) -> CacheEntry:
        """Write `plan` and its side file atomically (a crash never leaves half a plan)."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.entry(key, metadata.name)
        tmp = entry.plan.with_suffix(".plan.tmp")
        tmp.write_bytes(plan)
        tmp.replace(entry.plan)
        info = {"key": asdict(key), "onnx": str(onnx_path), "metadata": metadata.model_dump()}
        entry.info.write_text(json.dumps(info, indent=2) + "\n")
        return entry

    def timing_cache(self, gpu: str, tensorrt: str) -> Path:
        """Return the timing-cache file shared by all builds on this GPU model and version."""
        return self.root / f"timing-{_slug(gpu)}-trt{_slug(tensorrt)}.cache"


def read_plan_info(plan: str | Path) -> tuple[EngineKey, ModelMetadata]:
    """Read the key and metadata stored beside a cached plan (`x.plan` -> `x.json`)."""
    info_path = Path(plan).with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"{plan}: its metadata file {info_path.name} is missing")
    info = json.loads(info_path.read_text())
    raw: dict[str, Any] = dict(info["key"])
    key = EngineKey(
        gpu=str(raw["gpu"]),
        tensorrt=str(raw["tensorrt"]),
        onnx_sha256=str(raw["onnx_sha256"]),
        precision=str(raw["precision"]),
        min_shape=_shape4(raw["min_shape"]),
        opt_shape=_shape4(raw["opt_shape"]),
        max_shape=_shape4(raw["max_shape"]),
    )
    return key, ModelMetadata.model_validate(info["metadata"])


def _shape4(value: Any) -> tuple[int, int, int, int]:
    """Convert a JSON list of four ints into a shape tuple."""
    a, b, c, d = (int(v) for v in value)
    return (a, b, c, d)
