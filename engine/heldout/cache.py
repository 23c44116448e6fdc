"""A disk cache of held-out samples, so a second judgement does not image the same sets again.

Imaging the fresh or sealed sets through the pupil-function PSF with beads at their own depth
(`engine.fidelity --fresh --pupil --own-depth-points`) takes about 25 of a judgement's 40
minutes on 2 cores, and every candidate model is judged on exactly the same samples. A sample
is a pure function of its kind, seed, frame shape, optics and camera, and of the code and
libraries that image it; the cache key holds all of these, so a change to `engine.heldout`'s
imaging code, or a new numpy, scipy or psfmodels, misses and images afresh rather than serving
a stale sample.

Files are plain ``.npz`` (no pickle: `numpy.load(allow_pickle=False)`), written to a temporary
name and renamed, so an interrupted run leaves no half file under the real name; a file that
cannot be read back (truncated, from another layout) is imaged again and replaced, said on
stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import astuple, fields
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np

from engine.heldout.imaging import independent_sample
from engine.heldout.optics import IndependentOptics
from engine.heldout.samples import (
    HeldoutCamera,
    HeldoutObjects,
    IndependentSample,
    SampleKind,
    TiltedPlane,
)

_IMAGING_MODULES = ("imaging.py", "optics.py", "samples.py", "cache.py")
"""The sources a sample depends on (this package's), hashed into every key."""
_LIBRARIES = ("numpy", "scipy", "psfmodels")
"""The libraries whose versions are in every key: their random streams and PSFs make samples."""
_OPTIONAL = ("tilt", "dpm_um", "in_focus")
"""Fields of `IndependentSample` that only a "tilted" sample holds (None otherwise)."""


@cache
def code_fingerprint() -> str:
    """Hash of the imaging code and library versions a sample is made with (hex, 16 digits)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _IMAGING_MODULES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    for lib in _LIBRARIES:
        h.update(f"{lib}=={metadata.version(lib)}".encode())
    return h.hexdigest()[:16]


def sample_key(
    kind: str,
    seed: int,
    shape: tuple[int, int],
    optics: IndependentOptics,
    camera: HeldoutCamera,
) -> str:
    """Return one sample's cache key: everything it is a function of (hex, 24 digits)."""
    spec = {
        "kind": kind,
        "seed": int(seed),
        "shape": [int(shape[0]), int(shape[1])],
        "optics": repr(optics),  # frozen dataclasses: every field, in order
        "camera": repr(camera),
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _pack(sample: IndependentSample) -> dict[str, np.ndarray]:
    """Flatten a sample into named arrays (the objects' columns as ``objects.<name>``)."""
    out: dict[str, np.ndarray] = {}
    for f in fields(IndependentSample):
        value = getattr(sample, f.name)
        if value is None:
            continue  # absent in the file means None
        if isinstance(value, HeldoutObjects):
            for g in fields(HeldoutObjects):
                out[f"objects.{g.name}"] = np.asarray(getattr(value, g.name))
        elif isinstance(value, TiltedPlane):
            out[f.name] = np.asarray(astuple(value), dtype=np.float64)
        else:
            out[f.name] = np.asarray(value)
    return out


def _unpack(arrays: dict[str, np.ndarray]) -> IndependentSample:
    """Rebuild a sample from `_pack`'s arrays; KeyError or ValueError if one is missing."""
    columns = {g.name: arrays[f"objects.{g.name}"] for g in fields(HeldoutObjects)}
    objects = HeldoutObjects(**columns)
    tilt = TiltedPlane(*(float(v) for v in arrays["tilt"])) if "tilt" in arrays else None
    return IndependentSample(
        kind=str(arrays["kind"]),
        seed=int(arrays["seed"]),
        frame=arrays["frame"],
        planes=arrays["planes"],
        dz_um=arrays["dz_um"],
        objects=objects,
        pixel_size_um=float(arrays["pixel_size_um"]),
        background=arrays["background"],
        noise_sigma=float(arrays["noise_sigma"]),
        tilt=tilt,
        dpm_um=arrays.get("dpm_um"),
        in_focus=arrays.get("in_focus"),
    )


def cached_sample(
    folder: Path | None,
    kind: SampleKind,
    seed: int,
    shape: tuple[int, int] = (256, 256),
    *,
    optics: IndependentOptics | None = None,
    camera: HeldoutCamera | None = None,
) -> IndependentSample:
    """`independent_sample(kind, seed, shape, optics=, camera=)`, kept in `folder` once made.

    `folder` None: no cache, the sample is imaged (the same as calling `independent_sample`).
    A sample read back is equal array for array to the one imaged (`tests/test_heldout_cache`).
    """
    optics = optics or IndependentOptics()
    camera = camera or HeldoutCamera()
    if folder is None:
        return independent_sample(kind, seed, shape, optics=optics, camera=camera)
    path = folder / f"{kind}-{int(seed)}-{sample_key(kind, seed, shape, optics, camera)}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return _unpack({name: npz[name] for name in npz.files})
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            print(f"note: held-out cache {path} unreadable ({exc}); imaging again", file=sys.stderr)
    sample = independent_sample(kind, seed, shape, optics=optics, camera=camera)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **cast(dict[str, Any], _pack(sample)))  # (mypy: a name could be a flag)
    os.replace(tmp, path)  # atomic on one filesystem: a reader sees the whole file or none
    return sample
