"""Training samples: simulated frames and their densities, fed in batches."""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from engine.metadata import normalize_images
from engine.optics import SampleKind
from engine.train_volume.config import VolumeTrainConfig

if TYPE_CHECKING:
    from engine.optics import CameraConfig, OpticsConfig, VolumePair


def draw_imaging(
    cfg: VolumeTrainConfig, seed: int, kind_weights: Sequence[float]
) -> tuple[SampleKind, OpticsConfig, CameraConfig, np.ndarray]:
    """Draw what a training sample of `seed` is imaged with: kind, optics, camera, focus (µm).

    The config's ranges (brightness log-uniform, background uniform, the index-mismatch depth
    and PSF model from their lists, focus on the 0.5 µm lattice within the half range); one
    home for these draws, so a sample of a seed is the same wherever it is made.
    """
    from engine.optics import CameraConfig, OpticsConfig

    rng = np.random.default_rng(seed)
    d = cfg.data
    w = np.asarray(kind_weights, dtype=np.float64)
    kind = d.kinds[int(rng.choice(len(d.kinds), p=w / w.sum()))]
    lo, hi = d.peak_photons
    camera = CameraConfig(
        **{
            "peak_photons": float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
            "background_photons": float(rng.uniform(*d.background_photons)),
            **cfg.camera,
        }
    )
    models = d.psf_models  # no draw for one model: earlier recipes' samples unchanged
    drawn: dict[str, Any] = {
        "particle_depth_um": float(rng.choice(d.particle_depths_um)),
        "psf_model": models[int(rng.integers(len(models)))] if len(models) > 1 else models[0],
    }
    optics = OpticsConfig(**{**drawn, **cfg.optics})
    n = round(d.focus_half_range_um / 0.5)
    focus = rng.integers(-n, n + 1, d.frames_per_sample) * 0.5
    return kind, optics, camera, focus


class Sample:
    """One simulated sample: normalised frames and their density targets (same units)."""

    def __init__(self, cfg: VolumeTrainConfig, seed: int, kind_weights: Sequence[float]) -> None:
        from engine.optics import simulate_volume_pair

        kind, optics, camera, focus = draw_imaging(cfg, seed, kind_weights)
        d = cfg.data
        pair = simulate_volume_pair(
            kind,
            shape=d.stack_shape,
            focus_um=focus,
            depth_um=cfg.depth_um,
            optics=optics,
            camera=camera,
            seed=seed,
            worm=d.worm,
            body_glow=cfg.body,
            frame_points=d.frame_points,
        )
        x, _, std = normalize_images(pair.frames)
        self.kind = kind
        self.optics = optics
        self.inputs = x.astype(np.float32)
        self.targets = (pair.objects_counts / std[:, :, :, None]).astype(np.float32)
        per_photon = camera.quantum_efficiency * camera.gain_counts_per_e
        self.sources = point_sources(pair, optics.pixel_size_um, per_photon / std.ravel(), cfg)
        # the truth's objects and the frames' focus (validation reads beads from them); not
        # the pair itself, whose density duplicates `targets` (it doubled what a worker sends)
        self.objects = pair.objects
        self.focus_um = pair.focus_um
        # the body's glow alone (F, H, W), in the frames' normalised units: a body model's
        # second target
        self.body = (
            None if pair.body_counts is None else (pair.body_counts / std).astype(np.float32)
        )
        self._tensors: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._body: dict[torch.device, torch.Tensor] = {}

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Return inputs and targets on `device`, copied there once (CPU: shared, no copy).

        A GPU batch is then cropped and turned where it is trained: copying 32 patches of
        41 planes from the host each step cost a GPU step four times its own work.
        """
        if device not in self._tensors:
            self._tensors[device] = (
                torch.from_numpy(self.inputs).to(device),
                torch.from_numpy(self.targets).to(device),
            )
        return self._tensors[device]

    def body_tensor(self, device: torch.device) -> torch.Tensor | None:
        """Return the body's glow on `device` (copied there once), or None without it."""
        if self.body is None:
            return None
        if device not in self._body:
            self._body[device] = torch.from_numpy(self.body).to(device)
        return self._body[device]

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to and from `SampleFeed`'s workers) without its device copies."""
        return {**self.__dict__, "_tensors": {}, "_body": {}}


class SampleFeed:
    """Simulates the pool's samples: in the loop, or ahead of it in worker processes.

    With ``workers = 0`` a sample is simulated when the loop asks for it (the 2-core default:
    a second process would only take the training's core). With workers, the samples of the
    next refresh are submitted one refresh early and are ready when the loop reaches it, so a
    GPU is not left waiting ~0.9 s per sample. Either way a sample depends only on its seed and
    kind weights, so the run sees the same samples in the same slots.
    """

    def __init__(self, cfg: VolumeTrainConfig) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._cfg = cfg
        # spawn, not fork: the parent holds torch's threads (and maybe a CUDA context), which a
        # forked child would inherit half-initialised
        ctx = multiprocessing.get_context("spawn")
        workers = cfg.data.workers
        self._pool = ProcessPoolExecutor(workers, mp_context=ctx) if workers else None

    def submit(self, seed: int, kind_weights: Sequence[float]) -> Callable[[], Sample]:
        """Start simulating one sample (with workers); return the call that hands it over."""
        weights = [float(w) for w in kind_weights]
        if self._pool is None:
            return functools.partial(Sample, self._cfg, seed, weights)
        return self._pool.submit(Sample, self._cfg, seed, weights).result

    def close(self) -> None:
        """Stop the workers, dropping samples no one will ask for."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> SampleFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def point_sources(
    pair: VolumePair, pixel_size_um: float, units_per_photon: np.ndarray, cfg: VolumeTrainConfig
) -> list[np.ndarray]:
    """Return the detection head's truth: per frame, the beads in the depth grid, (M, 4).

    Each row is x, y (frame pixels, pixel centres at integers), depth (µm from the frame's
    focus) and brightness: the bead's density total in the frame's normalised units
    (`units_per_photon[f]` per photon), over ``brightness_scale``. Beads are the simulator's
    points (splatted sub-voxel); nuclei and the worm body stay the density channels' work.
    """
    o = pair.objects
    bead = o.kind == "bead"
    first, last = float(cfg.depth_um[0]), float(cfg.depth_um[-1])
    out = []
    for f, focus in enumerate(pair.focus_um):
        z = o.z_um[bead] - focus
        keep = (z >= first) & (z <= last)
        rows = np.stack(
            [
                o.x_um[bead][keep] / pixel_size_um,
                o.y_um[bead][keep] / pixel_size_um,
                z[keep],
                o.intensity[bead][keep] * units_per_photon[f] / cfg.brightness_scale,
            ],
            axis=1,
        )
        out.append(rows.astype(np.float32).reshape(-1, 4))
    return out


def kind_weights_at(cfg: VolumeTrainConfig, progress: float) -> list[float]:
    """Curriculum: start weights moving linearly to the final ones over curriculum_fraction."""
    d = cfg.data
    t = 1.0 if d.curriculum_fraction == 0 else min(progress / d.curriculum_fraction, 1.0)
    return [a + (b - a) * t for a, b in zip(d.start_kind_weights, d.kind_weights, strict=True)]


class VolumeBatch(NamedTuple):
    """A training batch: patches, their densities and their beads.

    Inputs (N, 1, P, P), densities (N, D, P, P), the beads as (N, M, 4) source rows (x, y in
    patch pixels, depth, brightness; `point_sources`) and an (N, M) mask of the real rows;
    for a body model, the body's glow alone (N, 1, P, P).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    sources: torch.Tensor
    mask: torch.Tensor
    body: torch.Tensor | None = None


def _turn(patch: torch.Tensor, t: int) -> torch.Tensor:
    """Return a (C, P, P) patch turned by copy `t` of 8 of the square's symmetries.

    rot90 ``t % 4`` times, then (t >= 4) an x flip; `_turn_points` moves points the same way.
    """
    turned = torch.rot90(patch, t % 4, dims=(1, 2))
    return turned.flip(2) if t >= 4 else turned


def _turn_points(rows: np.ndarray, turns: int, flip: bool, size: int) -> np.ndarray:
    """Source rows moved as `np.rot90(patch, turns, axes=(1, 2))` then an x flip move pixels."""
    rows = rows.copy()
    for _ in range(turns):  # rot90 once: new[i, j] = old[j, size - 1 - i]
        rows[:, 0], rows[:, 1] = rows[:, 1].copy(), size - 1 - rows[:, 0]
    if flip:
        rows[:, 0] = size - 1 - rows[:, 0]
    return rows


def sample_batch(
    rng: np.random.Generator,
    pool: Sequence[Sample],
    cfg: VolumeTrainConfig,
    device: torch.device | None = None,
    whole: bool = False,
) -> VolumeBatch:
    """Draw a batch of patches, randomly cropped and turned, with their beads (`VolumeBatch`).

    Patches are cut and turned on `device` (default the CPU) from the samples' copies there;
    the beads' rows stay small host arrays. With `whole`, the batch is
    ``data.frames_per_batch`` whole frames of ``data.frame_kinds`` (`frame_batches`).
    """
    dev = torch.device("cpu") if device is None else device
    size, count = cfg.patch_size, cfg.batch_size
    if whole:
        size, count = cfg.data.stack_shape[0], cfg.data.frames_per_batch
        framed = [s for s in pool if s.kind in cfg.data.frame_kinds]
        pool = framed or pool  # (none of those kinds in the pool now: a frame of any kind)
    xs, ys, points, bodies = [], [], [], []
    for _ in range(count):
        s = pool[int(rng.integers(len(pool)))]
        inputs, targets = s.tensors(dev)
        glow = s.body_tensor(dev)
        f = int(rng.integers(s.inputs.shape[0]))
        h, w = s.inputs.shape[-2:]
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        rows = s.sources[f] - np.array([x0, y0, 0, 0], dtype=np.float32)
        inside = (rows[:, :2] >= -0.5).all(1) & (rows[:, :2] < size - 0.5).all(1)
        t = int(rng.integers(8))  # the PSF is rotationally symmetric: 8 free copies
        xs.append(_turn(inputs[f, None, y0 : y0 + size, x0 : x0 + size], t))
        ys.append(_turn(targets[f, :, y0 : y0 + size, x0 : x0 + size], t))
        if glow is not None:
            bodies.append(_turn(glow[f, None, y0 : y0 + size, x0 : x0 + size], t))
        points.append(_turn_points(rows[inside], t % 4, t >= 4, size))
    m = max(1, max(len(p) for p in points))
    sources = np.zeros((len(points), m, 4), dtype=np.float32)
    mask = np.zeros((len(points), m), dtype=np.float32)
    for i, p in enumerate(points):
        sources[i, : len(p)] = p
        mask[i, : len(p)] = 1.0
    return VolumeBatch(
        torch.stack(xs),
        torch.stack(ys),
        _to_device(sources, dev),
        _to_device(mask, dev),
        torch.stack(bodies) if len(bodies) == len(xs) else None,
    )


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Return a small host array on `device`, without waiting for the GPU where there is one.

    A copy from ordinary (pageable) host memory waits for every kernel queued before it; from
    pinned memory it is queued like one (torch's pinned allocator keeps the buffer until done).
    """
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
