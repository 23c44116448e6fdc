"""A disk cache of held-out samples, so a second judgement does not image the same sets again.

Imaging the fresh or sealed sets through the pupil-function PSF with beads at their own depth
(`engine.fidelity --fresh --pupil --subpixel-points --own-depth-points`) took 33 of a
judgement's 57 minutes on 2 cores in session 48, and every candidate model is judged on exactly
the same samples. A sample is a pure function of its kind, seed, frame shape, optics and
camera, and of the code and libraries that image it; the cache key holds all of these, so a
change to `engine.heldout`'s imaging code, or a new numpy, scipy or psfmodels, misses and
images afresh rather than serving a stale sample. (Not the machine: two CPUs may differ in the
last bits of an FFT, which matters only if a folder is copied between machines.)

Files are plain ``.npz`` (no pickle: `numpy.load(allow_pickle=False)`), written to a temporary
file and renamed, so an interrupted run leaves no half file under the real name; a file that
cannot be read back, or holds another sample than its name says, is imaged again and
replaced, said on stderr. A file that cannot be written is said and skipped: the cache never
costs the judgement that imaged the sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import astuple, fields
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

_IMAGING_MODULES = ("imaging.py", "optics.py", "samples.py")
"""The sources a sample depends on, hashed into every key: they import no other module of the
project (`tests/test_heldout_cache.py` checks). This file is not among them: what it reads
back is checked field by field against the dataclasses `samples.py` defines."""
_LIBRARIES = ("numpy", "scipy", "psfmodels")
"""The libraries whose versions are in every key: their random streams and PSFs make samples."""
_OPTIONAL = ("tilt", "dpm_um", "in_focus")
"""Fields of `IndependentSample` that only a "tilted" sample holds (None otherwise)."""


def _fingerprint() -> str:
    """Hash the imaging code's files and the library versions (hex, 16 digits)."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _IMAGING_MODULES:
        h.update(name.encode())
        h.update((here / name).read_bytes())
    for lib in _LIBRARIES:
        h.update(f"{lib}=={metadata.version(lib)}".encode())
    return h.hexdigest()[:16]


_FINGERPRINT = _fingerprint()
"""Taken at import, just after the imaging modules were imported: the code in memory. (Taken
at the first sample instead, an edit to those files during a long judgement would store the
samples of the code in memory under the edited code's key, served as current ever after.)"""


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
        "code": _FINGERPRINT,
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
    """Rebuild a sample from `_pack`'s arrays (KeyError, TypeError or ValueError if unfit)."""
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
    if folder is None or len(shape) != 2:  # (a bad shape: `independent_sample` says so)
        return independent_sample(kind, seed, shape, optics=optics, camera=camera)
    path = folder / f"{kind}-{int(seed)}-{sample_key(kind, seed, shape, optics, camera)}.npz"
    if path.is_file():
        try:
            return _read(path, kind, int(seed), (int(shape[0]), int(shape[1])))
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            print(f"note: held-out cache {path} unreadable ({exc}); imaging again", file=sys.stderr)
    sample = independent_sample(kind, seed, shape, optics=optics, camera=camera)
    _write(path, sample)
    return sample


def _read(path: Path, kind: str, seed: int, shape: tuple[int, int]) -> IndependentSample:
    """Read a cached sample back, checked to be the one asked for (ValueError if not)."""
    with np.load(path, allow_pickle=False) as npz:
        sample = _unpack({name: npz[name] for name in npz.files})
    d = sample.dz_um.size
    if (
        sample.kind != kind
        or sample.seed != seed
        or sample.frame.shape != shape
        or sample.planes.shape != (d, *shape)
        or sample.background.shape != shape
    ):
        raise ValueError(
            f"holds {sample.kind} {sample.seed} of {sample.frame.shape}, "
            f"not {kind} {seed} of {shape}"
        )
    return sample


def _write(path: Path, sample: IndependentSample) -> None:
    """Write a sample whole under `path` or not at all; a failure is said, not raised.

    A temporary file of its own in the same folder, renamed over `path` once written: a reader
    sees the whole file or none, and two writers of one key each rename a whole file. A full
    disk or a read-only folder costs the cache, not the judgement that imaged the sample.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.npz", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **cast(dict[str, Any], _pack(sample)))  # (mypy: a name could be a flag)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"note: held-out cache {path} not written ({exc}); going on", file=sys.stderr)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
