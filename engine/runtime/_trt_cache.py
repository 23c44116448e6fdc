"""The TensorRT engine cache: one plan per (GPU model, TensorRT version, ONNX hash, build options).

An engine is only valid for the GPU model and TensorRT version that built it, and takes minutes
to build, so the daemon builds once and reuses. Each plan has a `.json` beside it with its key
and the model metadata, so a plan can be loaded without the ONNX. No tensorrt import here:
`engine.runtime` re-exports this module, and machines without TensorRT import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.files import atomic_write_bytes, atomic_write_text
from engine.metadata import ModelMetadata, padded_shape
from engine.runtime._base import DEFAULT_MAX_BATCH, io_channels

DEFAULT_FRAME_SHAPES: tuple[tuple[int, int], ...] = ((256, 256), (512, 512), (1024, 1024))
"""Frame sizes an engine covers when none are given (the benchmark sizes)."""
OPT_BATCH = 41
"""Plane batch the kernels are tuned for: the paper's 41-plane stack."""
CACHE_ENV = "DEEPZ_ENGINE_CACHE"
"""Environment variable that overrides the default cache directory."""


def default_cache_dir() -> Path:
    """Return `$DEEPZ_ENGINE_CACHE`, else `~/.cache/deepz-live/engines`."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "deepz-live" / "engines"


def _slug(text: str) -> str:
    """Make `text` safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile for the network input (N, C, H, W).

    C is 2 (image + DPM) for per-plane models and 1 (the image) for volume models.
    """

    min_shape: tuple[int, int, int, int]
    opt_shape: tuple[int, int, int, int]
    max_shape: tuple[int, int, int, int]

    def covers(self, n: int, height: int, width: int) -> bool:
        """Say whether a padded input (n, C, height, width) fits the profile."""
        lo, hi = self.min_shape, self.max_shape
        return lo[0] <= n <= hi[0] and lo[2] <= height <= hi[2] and lo[3] <= width <= hi[3]


def serving_frame_shapes(
    metadata: ModelMetadata, frame_shape: tuple[int, int] | None
) -> list[tuple[int, int]] | None:
    """Frame shapes the TensorRT backend builds for a camera frame (None: the defaults).

    Tuned at the camera's frame, accepting anything from one pad block up to it. One home:
    the backend and ``python -m export tensorrt --scope`` both ask for this, so an engine
    built ahead of time is the cached one the daemon finds.
    """
    if frame_shape is None:
        return None
    m = metadata.size_multiple
    return [(int(frame_shape[0]), int(frame_shape[1])), (m, m)]


VOLUME_MAX_FRAMES = 4
"""Most frames one call of a volume model's engine takes (the daemon and offline refocusing
send one; `BaseBackend.volume` splits larger calls into batches of this many)."""


def make_profile(
    metadata: ModelMetadata,
    frame_shapes: Sequence[tuple[int, int]] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> ShapeProfile:
    """Build a profile covering 1 … `max_batch` planes and the padded `frame_shapes`.

    The first frame shape and `min(OPT_BATCH, max_batch)` planes are the optimum the kernels
    are timed at; the smallest and largest shapes bound H and W. A volume model's batch is
    frames, each giving every depth: at most `VOLUME_MAX_FRAMES` (the engine's buffers hold
    the largest batch, 41 depths each: 64 frames of 2048² would be 41 GiB on the GPU and as
    much pinned on the host; review 75).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, not {max_batch}")
    if metadata.volume is not None:
        max_batch = min(max_batch, VOLUME_MAX_FRAMES)
    shapes = list(frame_shapes or DEFAULT_FRAME_SHAPES)
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"frame shapes must be (height, width) >= 1, got {shapes}")
    m = metadata.size_multiple
    padded = [padded_shape(h, w, m) for h, w in shapes]
    opt_n = min(OPT_BATCH, max_batch)
    c = io_channels(metadata)[0]
    return ShapeProfile(
        min_shape=(1, c, min(h for h, _ in padded), min(w for _, w in padded)),
        opt_shape=(opt_n, c, *padded[0]),
        max_shape=(max_batch, c, max(h for h, _ in padded), max(w for _, w in padded)),
    )


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
        # workers starting together build and store the same key: each write has its own
        # temporary; both are flushed to the disk (minutes of build survive a power loss)
        atomic_write_bytes(entry.plan, plan)
        # absolute: a plan loaded alone finds the ONNX's PSF bank from any folder
        onnx = str(Path(onnx_path).resolve())
        info = {"key": asdict(key), "onnx": onnx, "metadata": metadata.model_dump()}
        atomic_write_text(entry.info, json.dumps(info, indent=2) + "\n")
        return entry

    def timing_cache(self, gpu: str, tensorrt: str) -> Path:
        """Return the timing-cache file shared by all builds on this GPU model and version."""
        return self.root / f"timing-{_slug(gpu)}-trt{_slug(tensorrt)}.cache"


def read_plan_info(plan: str | Path) -> tuple[EngineKey, ModelMetadata]:
    """Read the key and metadata stored beside a cached plan (`x.plan` -> `x.json`).

    A missing file is `FileNotFoundError`; anything else wrong with it (not JSON, a list, a
    missing or malformed field) one `ValueError` naming the file.
    """
    info_path = Path(plan).with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"{plan}: its metadata file {info_path.name} is missing")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
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
    except (OSError, KeyError, TypeError, ValueError) as exc:  # ValueError: JSON, pydantic
        raise ValueError(
            f"{info_path}: not a cached plan's metadata ({type(exc).__name__}: {exc})"
        ) from exc


def plan_psf_beside(plan: str | Path, metadata: ModelMetadata) -> Path:
    """Return the file beside which a cached plan's volume model keeps its PSF bank.

    A plan in the engine cache has no bank beside it: the bank sits beside the ONNX the plan
    was built from, which the side file records (`EngineCache.store`). A bank copied beside
    the plan is taken first; the bank's own checks (`engine.volume.model_psf_bank`: its depth
    grid, its sha256 where the model recorded it) still decide whether it is the model's.
    """
    plan = Path(plan)
    if metadata.volume is None or (plan.parent / metadata.volume.psf_file).is_file():
        return plan
    try:
        onnx = json.loads(plan.with_suffix(".json").read_text(encoding="utf-8"))["onnx"]
    except (OSError, KeyError, TypeError, ValueError):  # read_plan_info has said what is wrong
        return plan
    if not isinstance(onnx, str) or not Path(onnx).is_absolute():  # before session 47: as given
        return plan
    return Path(onnx)


def _shape4(value: Any) -> tuple[int, int, int, int]:
    """Convert a JSON list of four ints into a shape tuple."""
    a, b, c, d = (int(v) for v in value)
    return (a, b, c, d)
