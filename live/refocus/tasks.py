"""The chunk tasks: one output chunk each, run wherever the scheduler puts them."""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.dpm import VolumePlan
from engine.metadata import Modality, file_sha256
from engine.point_fit import PointFit
from engine.runtime import DEFAULT_MAX_BATCH, BackendError, Precision, load_backend
from live.refocus.errors import RefocusTaskError
from live.refocus.inputs import InputSpec, clear_opened, frame_reader, kept_open

if TYPE_CHECKING:
    from engine.optics import Lateral
    from engine.runtime import Backend


log = logging.getLogger(__name__)


MANIFEST = "refocus_done"
"""Per-chunk completion array inside the output image group: CRC-32 of the chunk, or -1."""
NOT_DONE = -1

# ----------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class EngineSpec:
    """How each process loads the backend: the cache key of `cached_backend`.

    It holds the model file's path and content (its SHA-256, and the PSF bank's), so a
    model replaced at the same path is loaded again in a long-lived process rather than
    served from the cache.
    """

    model: str
    prefer: tuple[str, ...] | None
    precision: Precision = "fp32"
    intra_op_threads: int | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    render_modality: Modality | None = None
    psf_bank: str | None = None
    point_fit: Lateral | None = None
    """The point fit's lateral convention (`PointFit.lateral`), None: no fit."""
    model_sha256: str = ""
    psf_bank_sha256: str | None = None


_BACKENDS: dict[EngineSpec, tuple[Backend, threading.Lock]] = {}
_BACKENDS_LOCK = threading.Lock()


def cached_backend(spec: EngineSpec) -> tuple[Backend, threading.Lock]:
    """Load the backend of `spec` once per process; return it with the lock that serialises it.

    A `Backend` is called from one thread at a time, so threads of one process share one
    backend (one copy of the weights and buffers) and take turns under the lock.
    """
    with _BACKENDS_LOCK:
        entry = _BACKENDS.get(spec)
        if entry is None:
            backend = load_backend(
                spec.model,
                prefer=list(spec.prefer) if spec.prefer else None,
                precision=spec.precision,
                intra_op_threads=spec.intra_op_threads,
                max_batch=spec.max_batch,
                render_modality=spec.render_modality,
                psf_bank=spec.psf_bank,
                point_fit=None if spec.point_fit is None else PointFit(lateral=spec.point_fit),
            )
            entry = _BACKENDS[spec] = (backend, threading.Lock())
        return entry


def alias_backend(engine: EngineSpec, loaded: EngineSpec) -> None:
    """Let the backend loaded for `loaded` serve `engine` too (the same model, as chosen).

    The driver loads the backend by what it was asked for, then names it exactly as chosen
    (backend, precision) for the workers: in its own process the two keys share one backend.
    """
    with _BACKENDS_LOCK:
        _BACKENDS.setdefault(engine, _BACKENDS[loaded])


def clear_backends() -> None:
    """Close and forget every backend, opened array and frozen plan this process has cached."""
    clear_opened()
    with _PLANS_LOCK:  # up to a few plans' DPMs (GBs for 41 x 2048²) in a long-lived process
        _PLANS.clear()
    with _BACKENDS_LOCK:
        # one backend may be kept under two keys (asked for by name and as chosen): closed once
        unique = {id(backend): (backend, lock) for backend, lock in _BACKENDS.values()}
        for backend, lock in unique.values():
            with lock:
                backend.close()
        _BACKENDS.clear()


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file (cached on path, modification time and size)."""
    return file_sha256(path)


def cached_sha256(path: Path) -> str:
    """SHA-256 of a model or PSF bank file: its identity in the output metadata and resume check."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_mtime_ns, st.st_size)


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Job:
    """Everything a chunk task needs (picklable); each process gets the plan's DPMs once.

    Threads share the driver's job. A process pool's tasks each get `without_plan`: the pool's
    scheduler pickles a task's inputs with every task, and the DPMs are the bulk of a job (41
    planes of 2048² are 690 MB, uniform planes included), so they reach each pool process once,
    as it starts (`install_plan`). A cluster's workers get the whole job once each (scattered).
    """

    source: InputSpec
    engine: EngineSpec
    plan: VolumePlan | None
    """The DPMs; None in a process pool's tasks, whose process holds them (`install_plan`)."""
    plan_token: str
    """The plan's digest: the key under which each process keeps it frozen (`_frozen_plan`)."""
    store: str
    array_path: str
    manifest_path: str
    rows_only: bool
    """Write only the computed rows (fill-gaps: never touch the live stacks around them)."""
    token: str
    """Unique per job: the key under which each process keeps this job's opened arrays, and
    what the store's lock file names while the job holds it (`live.store_lock.held_by`)."""
    locked: bool = True
    """Whether the store has a lock file to check (a store behind a URL has none)."""

    def without_plan(self) -> Job:
        """Return this job without its DPMs: about 1 kB whatever the plan (`Job`, why)."""
        return replace(self, plan=None)


@dataclass(frozen=True)
class Block:
    """One output chunk: time points ``t0 .. t1 - 1`` and the seqs to compute in it."""

    index: int
    t0: int
    t1: int
    seqs: tuple[int, ...]
    offsets_um: tuple[float, ...] | None = None
    """Focus-locked runs: each seq's DPM offset (`engine.dpm.FocusLock`), µm; else None."""


@dataclass(frozen=True)
class BlockResult:
    """What a chunk task did."""

    index: int
    seqs: tuple[int, ...]
    skipped: bool
    seconds: float
    worker: str


_PLANS: dict[str, VolumePlan] = {}
_PLANS_LOCK = threading.Lock()


def _frozen_plan(job: Job) -> VolumePlan:
    """Return the job's plan with read-only DPMs owning their data (as the live worker's).

    Kept per process under the plan's token, so backends normalise a per-plane model's DPM
    channel once per process instead of once per frame; a job sent without its plan
    (`Job.without_plan`) finds it there, installed when its pool process started.
    """
    with _PLANS_LOCK:
        plan = _PLANS.get(job.plan_token)
        if plan is None:
            if job.plan is None:  # a pool whose processes did not run `install_plan`
                raise RuntimeError(
                    f"chunk task in process {os.getpid()} without the plan's DPMs: this "
                    "process was not given them when it started"
                )
            plan = _keep_plan(job.plan_token, job.plan)
        return plan


def _keep_plan(token: str, plan: VolumePlan) -> VolumePlan:
    """Keep `plan` frozen under `token` (the oldest of a few dropped); call under the lock."""
    if len(_PLANS) >= 4:
        _PLANS.pop(next(iter(_PLANS)))
    frozen = _PLANS[token] = plan.frozen()
    return frozen


def install_plan(token: str, box: list[VolumePlan]) -> None:
    """Keep a job's plan in this process before it runs any task (a process pool's initializer).

    Its arguments are pickled once per pool process (or inherited, forked), not per task. The
    plan comes in a one-item list that this empties: the pool keeps its initializer's
    arguments for the process's life, and would otherwise hold a second copy of the DPMs
    beside the frozen one (twice the plan in every process).
    """
    plan = box.pop()
    with _PLANS_LOCK:
        if token not in _PLANS:
            _keep_plan(token, plan)


def _crc(rows: np.ndarray, seqs: Sequence[int]) -> int:
    """CRC-32 of a block's values as float32 bytes and of its seqs: the mark a rerun verifies.

    `rows` are the values as stored (float16 stacks widen exactly), so a block reads back
    with the CRC it was written with, whatever the stored dtype. The seqs refocused are part
    of the mark: a block written while some frames were absent (zero rows) is not done once
    they are present (a raw_present restored, a late shard), though its values read back.
    """
    head = zlib.crc32(np.asarray(seqs, dtype=np.int64).tobytes())
    return zlib.crc32(np.ascontiguousarray(rows, dtype=np.float32).data, head)


def _open_out(store: str, path: str, token: str) -> Any:
    """Open an array of the output store for writing, once per job and process.

    Opening reads the array's zarr.json: one more store round trip per task, about 2 ms on a
    local disk and more on object storage. A job's arrays do not change shape while its tasks
    run (the driver sizes them first), so each process keeps them under the job's `token`.
    """
    import zarr

    return kept_open(
        (token, store, path), lambda: zarr.open_array(store=store, path=path, mode="r+")
    )


def manifest_entry(manifest: Any, index: int) -> int:
    """Return chunk `index`'s manifest entry: its CRC, or `NOT_DONE` when unset or unreadable.

    An entry that does not decode (a truncated or emptied object) says nothing about the chunk,
    so the chunk is recomputed, and its entry written again, like one never done.
    """
    try:
        return int(manifest[index])
    except Exception:  # zarr raises several types for an object that does not decode
        return NOT_DONE


def _read_frames(job: Job, block: Block) -> np.ndarray:
    """Read a block's raw frames, or raise `RefocusTaskError` naming the chunk and its seqs.

    A damaged input (a raw chunk that fails its checksum, a truncated TIFF) fails in the task
    that reads it, wherever that runs: the error says where, in one line, not as a traceback.
    """
    from live.metrics import format_seqs

    try:
        return frame_reader(job.source, job.token).read(block.t0, block.t1)
    except Exception as exc:  # zarr and tifffile raise many types for damaged data
        raise RefocusTaskError(
            f"{job.source.path}: cannot read the raw frames of chunk {block.index} (seqs "
            f"{format_seqs(list(block.seqs))}): {type(exc).__name__}: {exc}"
        ) from None


def _verified(job: Job, block: Block, out: Any, mark: int) -> bool:
    """Whether the chunk's data reads back, is finite and has the manifest's CRC."""
    if mark == NOT_DONE:
        return False
    try:
        data = np.asarray(out[block.t0 : block.t1])
    except Exception:  # a damaged chunk object: decode errors of any kind mean "recompute"
        return False
    if job.rows_only:
        data = data[[s - block.t0 for s in block.seqs]]
    return bool(np.isfinite(data).all()) and _crc(data, block.seqs) == mark


def refocus_block(job: Job, block: Block) -> BlockResult:
    """Refocus one output chunk unless it is already written and verified (a Dask task).

    Reads the chunk's raw frames, runs ``backend.refocus(frame, plan, offset, dtype)`` per
    present frame (the live worker's call: planes made in the output's dtype; a live run's
    stacks may be float16, `live.store.as_stack_dtype`, values beyond its range saturated and
    logged),
    writes the chunk (or only its rows, for fill-gaps, one write per run of consecutive seqs:
    a sharded array rewrites its shard for each) and then its CRC into the manifest, so a
    chunk counts as done only once its data is on the store.
    """
    from live.store import as_stack_dtype
    from live.store_lock import held_by

    t_start = time.perf_counter()
    worker = f"{host_name()}:{os.getpid()}"
    out = _open_out(job.store, job.array_path, job.token)
    manifest = _open_out(job.store, job.manifest_path, job.token)
    if _verified(job, block, out, manifest_entry(manifest, block.index)):
        return BlockResult(block.index, block.seqs, True, time.perf_counter() - t_start, worker)
    frames = _read_frames(job, block)
    backend, lock = cached_backend(job.engine)
    plan = _frozen_plan(job)
    dtype = np.dtype(out.dtype).type
    planes = np.zeros((block.t1 - block.t0, *plan.dpms_um.shape), dtype=dtype)
    offsets = block.offsets_um or (0.0,) * len(block.seqs)
    unfinished: set[int] = set()
    with lock:
        for seq, offset in zip(block.seqs, offsets, strict=True):
            frame = frames[seq - block.t0]
            if not math.isfinite(offset):  # no recorded focus for a focus lock (said once)
                planes[seq - block.t0] = np.nan
                unfinished.add(seq)
                continue
            if frame.dtype.kind == "f" and not np.isfinite(frame).all():
                # no stack from a frame with NaN or infinite pixels (the network would spread
                # them over every plane): its planes stay NaN, which `_verified` never counts
                # as done, so each run says so again rather than the store hiding it
                log.warning("frame %d holds NaN or infinite pixels: its planes are left NaN", seq)
                planes[seq - block.t0] = np.nan
                unfinished.add(seq)
                continue
            try:
                one = backend.refocus(frame, plan, np.array([offset]), dtype=dtype)
            except (ValueError, BackendError) as exc:  # this frame cannot be refocused (a
                # pixel beyond what the backend takes ...): it costs this frame, as live
                # (`live.worker`), left NaN and not done, not the job
                log.warning("frame %d cannot be refocused (%s): its planes are left NaN", seq, exc)
                planes[seq - block.t0] = np.nan
                unfinished.add(seq)
                continue
            planes[seq - block.t0] = one[0]
    planes, clipped = as_stack_dtype(planes, out.dtype, saturate_same=True)
    if clipped:
        log.warning(
            "%d values of frames %d-%d beyond the %s range: saturated",
            clipped,
            block.t0,
            block.t1 - 1,
            out.dtype,
        )
    if job.locked and not held_by(job.store, job.token):
        # its job has ended (a failed chunk, Ctrl-C) and let the store go, perhaps to another
        # job: a task its driver could not stop writes nothing
        raise RefocusTaskError(
            f"chunk {block.index} ({job.store}): its job has ended and let the store go; "
            "not written"
        )
    if job.rows_only:
        rows = planes[[s - block.t0 for s in block.seqs]]
        for start, stop in seq_runs(block.seqs):
            out[start:stop] = planes[start - block.t0 : stop - block.t0]
        mark = _crc(rows, block.seqs)
    else:
        out[block.t0 : block.t1] = planes
        mark = _crc(planes, block.seqs)
    manifest[block.index] = mark
    # frames left NaN (no focus for the lock, NaN pixels, refused by the backend) are not
    # done: not present in a filled run, and the image not complete
    refocused = tuple(s for s in block.seqs if s not in unfinished)
    return BlockResult(block.index, refocused, False, time.perf_counter() - t_start, worker)


def warm_worker(engine: EngineSpec) -> str:
    """Load (and cache) the backend in this process; return its name and device."""
    backend, _ = cached_backend(engine)
    return f"{backend.name} on {backend.device}"


def host_name() -> str:
    """Return the name of this machine, as task results name their worker."""
    return platform.node()


def seq_runs(seqs: Iterable[int]) -> list[list[int]]:
    """Half-open [start, stop) runs of `seqs` as JSON lists (`live.metrics.seq_ranges`)."""
    from live.metrics import seq_ranges  # zmq and the status socket stay out of Dask workers

    return [list(r) for r in seq_ranges(seqs)]
