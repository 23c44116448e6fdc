"""Model metadata and the one place where images and DPMs are normalised for the network.

Every model file (PyTorch weights, ONNX, TensorRT plan) carries a `ModelMetadata`: what the
network was trained on and how its inputs are scaled. Training, export and every runtime
backend call `normalize_images`, `normalize_dpms` and `denormalize_images` from here, so the
scaling cannot drift between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

METADATA_VERSION = 1
ONNX_METADATA_KEY = "deepz_metadata"
"""Key of the JSON-encoded `ModelMetadata` inside an ONNX model's `metadata_props`."""


def nonfinite_weights(source: str, weights: Iterable[tuple[str, Any]]) -> str | None:
    """Return the refusal of weights holding NaN or infinite values, else None.

    The one rule for a model file (a run that diverged: every frame would come out NaN),
    whichever form it is read in: a ``.pt`` state_dict's tensors or an ONNX file's
    initializers, as ``(name, array)`` pairs (anything numpy takes; non-float ones pass).
    """
    bad = []
    for name, values in weights:
        array = np.asarray(values)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad.append(name)
    if not bad:
        return None
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{source}: its weights hold NaN or infinite values ({names})"


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes (read in 1 MiB blocks).

    The one home of a file's identity: a model, a PSF bank or an ONNX a TensorRT engine was
    built from, as recorded in metadata, run stores and engine caches.
    """
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelMetadataError(ValueError):
    """A model file's metadata is missing or inconsistent."""


@contextlib.contextmanager
def weights_that_fit(
    what: str, errors: tuple[type[Exception], ...] = (RuntimeError, ValueError, KeyError)
) -> Iterator[None]:
    """Turn weights that do not load into a network (``load_state_dict``) into one line.

    Raises `ModelMetadataError` ``"{what} ({the error's first line})"`` for any of `errors`:
    torch's own message lists every missing and unexpected key, pages long for a network of
    another shape. The one rule for a checkpoint, weights or a head that do not fit.
    """
    try:
        yield
    except errors as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelMetadataError(f"{what} ({first})") from None


Modality = Literal["widefield", "confocal"]
"""What a volume model's rendered planes look like: the wide-field input's own modality, or
confocal (the paper's cross-modality target)."""


class VolumeOutput(BaseModel):
    """How a volume model's output is read: object density on a depth grid (`engine.volume`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    depth_um: tuple[float, ...] = Field(
        description="Depths (µm, relative to the focal plane) of the output channels, even steps."
    )
    psf_file: str = Field(
        description="PSF bank (.npy) beside the model file, used to render planes from the density."
    )
    modality: Modality = Field(
        "widefield", description="What the rendered planes show (the PSF bank's modality)."
    )
    psf_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the PSF bank saved with the model (`engine.volume.model_psf_bank` "
        "checks it): the bank and the model are two files, and an interrupted save or copy can "
        "leave one new beside the other old. None in models saved before it was recorded.",
    )

    @field_validator("psf_file")
    @classmethod
    def _bare_name(cls, name: str) -> str:
        # the bank is read from beside the model and written beside an export: a name with a
        # folder in it ("../b.psf.npy", "/etc/x.npy") from a forged .json would reach outside
        if "/" in name or "\\" in name or not name.endswith(".npy") or name.startswith("."):
            raise ValueError(
                f"volume.psf_file is {name!r}: it must be a bare .npy file name, no folder "
                "(the bank lies beside the model)"
            )
        return name

    @model_validator(mode="after")
    def _check_grid(self) -> VolumeOutput:
        z = np.asarray(self.depth_um)
        if z.size < 2 or not np.allclose(np.diff(z), z[1] - z[0]) or z[1] <= z[0]:
            raise ValueError("volume.depth_um must be >= 2 evenly increasing depths")
        # the renderer's planes sit at whole steps from the focal plane, which the grid holds
        # (a grid of -9.75 ... 9.75 loaded, then refused every plane: review 68)
        steps = z / (z[1] - z[0])
        if not np.allclose(steps, np.round(steps), atol=1e-6) or not z[0] <= 0 <= z[-1]:
            raise ValueError(
                "volume.depth_um must hold the focal plane (0) and lie at whole steps from it"
            )
        return self


def architecture_size_multiple(architecture: dict[str, Any]) -> int | None:
    """Return the frame-side multiple a `DeepZ` architecture needs, or None if it does not say.

    ``2 ** pools`` (one pool per level after the first of ``channels``), and a multiple of the
    matched-filter primer's bin where it has one, as `DeepZ.size_multiple` computes it. None
    where ``channels`` is not a list of at least two widths (nothing to check against).
    """
    channels = architecture.get("channels")
    if not isinstance(channels, list) or len(channels) < 2:
        return None
    primer = architecture.get("primer")
    bin_ = primer.get("bin", 1) if isinstance(primer, dict) else 1
    if type(bin_) is not int or bin_ < 1:
        return None
    return math.lcm(2 ** (len(channels) - 2), bin_)


class ModelMetadata(BaseModel):
    """What a trained Deep-Z model needs at inference time, and how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format_version: Literal[1] = Field(1, description="Metadata schema version.")
    name: str = Field(description="Model name, e.g. 'deepz-slim-sim'.")
    architecture: dict[str, Any] = Field(
        description="Keyword arguments of `engine.model.DeepZ` that rebuild the network."
    )
    size_multiple: int = Field(
        ge=1,
        le=4096,
        description="Frame sides are padded to a multiple of this (2 ** number of pools).",
    )
    dz_range_um: tuple[float, float] = Field(
        description="Axial refocusing distances (µm) seen in training, (min, max)."
    )
    dpm_scale_um: float = Field(
        10.0, ge=1e-3, le=1e4, description="The network's DPM channel is dpm_um / dpm_scale_um."
    )
    image_normalization: Literal["mean_std"] = Field(
        "mean_std",
        description="Per-frame (x - mean) / std; outputs are mapped back with the input's stats.",
    )
    pixel_size_um: float = Field(gt=0, le=1e3, description="Pixel size at the sample (µm).")
    na: float = Field(gt=0, le=1.7, description="Numerical aperture of the objective.")
    wavelength_um: float = Field(gt=0, le=100, description="Emission wavelength (µm).")
    immersion_index: float = Field(
        1.0, ge=1.0, le=5.0, description="Immersion medium refractive index."
    )
    sample_index: float = Field(1.33, ge=1.0, le=5.0, description="Sample refractive index.")
    trained_on: str = Field("", description="What data the model saw.")
    training_command: str = Field("", description="The command that trained it.")
    commit: str = Field("", description="Source commit the model was trained from.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Free-form notes.")
    volume: VolumeOutput | None = Field(
        None, description="Set for volume models (one frame in, a density on depths out)."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelMetadata:
        lo, hi = self.dz_range_um
        if not lo < hi:
            raise ValueError(f"dz_range_um must be (min, max) with min < max, not {(lo, hi)}")
        need = architecture_size_multiple(self.architecture)
        if need is not None and self.size_multiple != need:
            # a wrong multiple pads frames to sides the network cannot take: the engines then
            # fail deep inside (onnxruntime: mismatched Concat dimensions) on every frame
            raise ValueError(
                f"size_multiple {self.size_multiple} does not match the architecture, whose "
                f"frame sides must be multiples of {need}"
            )
        return self

    def optics_mismatch(
        self,
        *,
        pixel_size_um: float,
        na: float | None = None,
        wavelength_um: float | None = None,
        rel_tol: float = 0.1,
    ) -> list[str]:
        """Say how a scope's optics differ from those this model was trained at.

        A network learns the point-spread function of its training data: the same sample
        imaged at another pixel size, NA or wavelength blurs differently, and the model then
        refocuses it to wrong depths without any error. Each quantity given is compared with
        the model's; values differing by more than `rel_tol` of the larger count. Returns one
        reason per mismatched quantity (e.g. ``"model trained at 0.3 µm pixels, scope has
        0.1 µm"``), in the order pixel size, NA, wavelength; empty when they agree. `na` and
        `wavelength_um` None are not compared (the scope does not say).
        """
        reasons: list[str] = []
        if not math.isclose(pixel_size_um, self.pixel_size_um, rel_tol=rel_tol):
            reasons.append(
                f"model trained at {self.pixel_size_um:g} µm pixels, scope has {pixel_size_um:g} µm"
            )
        if na is not None and not math.isclose(na, self.na, rel_tol=rel_tol):
            reasons.append(f"model trained at NA {self.na:g}, scope has NA {na:g}")
        if wavelength_um is not None and not math.isclose(
            wavelength_um, self.wavelength_um, rel_tol=rel_tol
        ):
            reasons.append(
                f"model trained at {self.wavelength_um:g} µm emission, scope has "
                f"{wavelength_um:g} µm"
            )
        return reasons

    @property
    def training_optics(self) -> dict[str, Any] | None:
        """The optics settings the model trained with, or None where none are recorded.

        They are `extra.train_config.optics`: fields of `engine.optics.OpticsConfig`, where {}
        means its defaults.
        """
        train_config = self.extra.get("train_config")
        optics = train_config.get("optics") if isinstance(train_config, dict) else None
        return optics if isinstance(optics, dict) else None

    def to_json(self) -> str:
        """Serialise to a JSON string (for side files and ONNX metadata_props)."""
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "model") -> ModelMetadata:
        """Parse JSON metadata, raising `ModelMetadataError` that names `source` on any problem."""
        try:
            return cls.model_validate(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ModelMetadataError(f"{source}: invalid Deep-Z metadata: {exc}") from exc
        except ValidationError as exc:  # one line: each field and what is wrong with it
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or 'metadata'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ModelMetadataError(f"{source}: invalid Deep-Z metadata: {problems}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> ModelMetadata:
        """Read a metadata JSON file; a missing file is a `ModelMetadataError`."""
        path = Path(path)
        if not path.is_file():
            raise ModelMetadataError(f"{path}: metadata file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelMetadataError(f"{path}: cannot read the metadata JSON ({exc})") from exc
        return cls.from_json(text, source=str(path))


def normalize_images(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each frame of (N, H, W) camera counts to zero mean and unit std.

    Returns the float32 normalised frames and the per-frame mean and std, shaped (N, 1, 1),
    which `denormalize_images` needs to bring network outputs back to camera counts.
    """
    x = np.asarray(images, dtype=np.float32)
    mean = x.mean(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
    std = x.std(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
    std = np.maximum(std, np.float32(1e-6))
    return (x - mean) / std, mean, std


def denormalize_images(
    planes: np.ndarray, mean: np.ndarray, std: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Map normalised network outputs back to the input's intensity scale (float32).

    With `out` (float32, the planes' shape) the result is written there with no temporary:
    the same float32 multiply then add, so the values are identical.
    """
    planes = np.asarray(planes, dtype=np.float32)
    if out is None:
        result: np.ndarray = (planes * std + mean).astype(np.float32)
        return result
    np.multiply(planes, std, out=out)
    np.add(out, mean, out=out)
    return out


def normalize_dpms(dpms_um: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """Convert DPMs in µm to the network's DPM channel (float32)."""
    return (np.asarray(dpms_um, dtype=np.float32) / np.float32(metadata.dpm_scale_um)).astype(
        np.float32, copy=False
    )


def padded_shape(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Smallest (H, W) at least as large as the frame whose sides are multiples of `multiple`."""
    return (-(-height // multiple) * multiple, -(-width // multiple) * multiple)


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the last two axes up to a multiple of `multiple` (no copy when already fine)."""
    h, w = x.shape[-2:]
    ph, pw = padded_shape(h, w, multiple)
    if (ph, pw) == (h, w):
        return x
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph - h), (0, pw - w)]
    if ph - h < h and pw - w < w:
        return np.pad(x, pad, mode="reflect")
    return np.pad(x, pad, mode="edge")


def broadcast_count(images: np.ndarray, dpms_um: np.ndarray) -> int:
    """Pairs that (N, H, W) frames and (N, H, W) DPMs make (one of either broadcasts), checked.

    Raises `ValueError` naming the problem when the frame shapes differ or the counts do not
    broadcast (neither 1 nor equal).
    """
    if images.shape[-2:] != dpms_um.shape[-2:]:
        raise ValueError(
            f"frame shape {images.shape[-2:]} does not match DPM shape {dpms_um.shape[-2:]}"
        )
    n = max(images.shape[0], dpms_um.shape[0])
    if images.shape[0] not in (1, n) or dpms_um.shape[0] not in (1, n):
        raise ValueError(
            f"batch sizes do not broadcast: {images.shape[0]} images, {dpms_um.shape[0]} DPMs"
        )
    return int(n)


def prepare_inputs(
    images: np.ndarray,
    dpms_um: np.ndarray,
    metadata: ModelMetadata,
    out: np.ndarray | None = None,
    dpms_in_out: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build the network input (N, 2, H', W') float32 from raw frames and DPMs in µm.

    `images` is (H, W) or (N, H, W) and is broadcast against `dpms_um` (N, H, W), so one frame
    with N plane DPMs is the common live case. Returns the input and the per-frame mean and std.
    `out`, a reusable (N, 2, H, W) float32 buffer, saves an allocation (and its page faults)
    per call when the frame needs no padding; the values are the same either way. With
    `dpms_in_out`, `out[:, 1]` already holds these DPMs (normalised by an earlier call) and only
    the image channel is written.
    """
    images = np.asarray(images)
    dpms_um = np.asarray(dpms_um)
    if images.ndim == 2:
        images = images[None]
    if dpms_um.ndim == 2:
        dpms_um = dpms_um[None]
    if images.ndim != 3 or dpms_um.ndim != 3:
        raise ValueError(
            f"images and dpms_um must be (N, H, W); got {images.shape} and {dpms_um.shape}"
        )
    n = broadcast_count(images, dpms_um)
    if not np.issubdtype(images.dtype, np.number) or np.iscomplexobj(images):
        raise ValueError(f"images must be real numeric, got dtype {images.dtype}")
    norm, mean, std = normalize_images(images)
    h, w = norm.shape[-2:]
    if out is not None and (out.shape != (n, 2, h, w) or out.dtype != np.float32):
        raise ValueError(f"out must be float32 {(n, 2, h, w)}, got {out.dtype} {out.shape}")
    x = out if out is not None else np.empty((n, 2, h, w), dtype=np.float32)
    x[:, 0] = norm
    if out is None or not dpms_in_out:
        if dpms_um.dtype == np.float32:  # straight into the buffer, no temporary
            np.divide(dpms_um, np.float32(metadata.dpm_scale_um), out=x[:, 1])
        else:
            x[:, 1] = normalize_dpms(dpms_um, metadata)
    x = pad_to_multiple(x, metadata.size_multiple)
    mean = np.broadcast_to(mean, (n, 1, 1))
    std = np.broadcast_to(std, (n, 1, 1))
    return np.ascontiguousarray(x), mean, std
