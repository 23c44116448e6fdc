"""`refocus_recording`: a job from input to summary, its chunk tasks sent to a scheduler."""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.dpm import DPMError
from engine.point_fit import PointFit
from engine.runtime import BackendError, depth_limits
from live.refocus.errors import RefocusError
from live.refocus.inputs import is_url, live_stacks_present, malformed, open_input
from live.refocus.outputs import (
    finish_output,
    job_identity,
    output_lock,
    output_store,
    prepare_output,
    utc_now,
)
from live.refocus.plans import (
    check_fill_files,
    check_fill_plan,
    check_recorded,
    engine_choice,
    load_scope,
    lock_attrs,
    lock_offsets,
    plan_from_planes,
    stored_planes,
)
from live.refocus.tasks import (
    Block,
    BlockResult,
    EngineSpec,
    Job,
    alias_backend,
    cached_backend,
    cached_sha256,
    install_plan,
    refocus_block,
    warm_worker,
)

if TYPE_CHECKING:
    from engine.optics import Lateral


log = logging.getLogger(__name__)


LOCAL_SCHEDULERS = ("threads", "processes", "sync")
"""Schedulers that run on this machine; anything else is a dask.distributed address."""
CHUNK_TARGET_BYTES = 4 * 2**20
"""Stack bytes per output chunk when ``chunk`` is not given (`auto_chunk`)."""
MAX_AUTO_CHUNK = 16


def auto_chunk(stack_bytes: int) -> int:
    """Time points per output chunk when not given: about `CHUNK_TARGET_BYTES` of stacks.

    Each chunk costs a task and four store round trips (manifest check, raw read, chunk write,
    CRC write), 2-5 ms each on a local disk and more on object storage, whatever its size: with
    one 9 x 256² float16 stack (1.2 MB) per chunk they were a tenth of the volume model's time
    per frame. Four such stacks per chunk share them; a 41 x 512² stack (21 MB) is a chunk of
    its own. At most `MAX_AUTO_CHUNK`, so a viewer reading one time point reads little more.
    """
    return max(1, min(MAX_AUTO_CHUNK, round(CHUNK_TARGET_BYTES / max(stack_bytes, 1))))


# ----------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class RefocusSummary:
    """What a refocusing run did.

    Attributes
    ----------
    store, image, name
        Where the stacks are: the store, the image's array path (e.g. ``2/0``: offline images
        take the next numbered group of the store's collection) and the image's name (e.g.
        ``stacks_offline``; the store's ``deepz.images`` maps names to groups).
    frames_wanted
        Frames this run was asked for (present raw frames, or for fill-gaps the missing stacks).
    frames_done, frames_skipped
        Refocused now; already written and verified by an earlier run.
    chunks_done, chunks_skipped
        The same, in output chunks (tasks).
    seconds
        Wall time of the chunk tasks: after the model was loaded on a cluster's workers
        (warmed first); with the "processes" scheduler each pool process loads it in its
        first task, which this includes.
    setup_seconds
        Opening, checking, loading the model in this process and on the workers.
    """

    source: str
    store: str
    image: str
    frames_wanted: int
    frames_done: int
    frames_skipped: int
    chunks_done: int
    chunks_skipped: int
    seconds: float
    setup_seconds: float
    backend: str
    device: str
    model: dict[str, str]
    planes: tuple[str, ...]
    scheduler: str
    dashboard: str | None = None
    name: str = ""

    @property
    def frames_left(self) -> int:
        """Wanted frames neither refocused nor already done: left NaN.

        The warnings say why: no stage focus for a lock, NaN pixels, a frame the backend
        refused.
        """
        return self.frames_wanted - self.frames_done - self.frames_skipped

    @property
    def frames_per_s(self) -> float:
        """Frames refocused per second of task wall time (0 when none was computed)."""
        return self.frames_done / self.seconds if self.frames_done and self.seconds > 0 else 0.0

    def line(self) -> str:
        """One human line: where, how many done and skipped, time and rate."""
        return (
            f"refocused {self.frames_done} frames ({self.chunks_done} chunks), skipped "
            f"{self.frames_skipped} already done, of {self.frames_wanted} wanted, in "
            f"{self.seconds:.1f} s ({self.frames_per_s:.2f} frames/s; setup "
            f"{self.setup_seconds:.1f} s) with {self.model['name']} on {self.backend} "
            f"[{self.scheduler}] -> {self.store}/{self.image} ({self.name})"
            + (f"; {self.frames_left} left NaN (see the warnings)" if self.frames_left else "")
        )


# ----------------------------------------------------------------------------- driver


def _blocks(wanted: Sequence[int], chunk: int, offsets_um: np.ndarray | None = None) -> list[Block]:
    """Group wanted time indices into output chunks of `chunk` time points.

    Each block carries its seqs' focus-lock offsets when the plan follows the stage focus.
    """
    by_block: dict[int, list[int]] = {}
    for t in wanted:
        by_block.setdefault(t // chunk, []).append(t)
    return [
        Block(
            b,
            b * chunk,
            (b + 1) * chunk,
            tuple(seqs),
            None if offsets_um is None else tuple(float(offsets_um[t]) for t in seqs),
        )
        for b, seqs in sorted(by_block.items())
    ]


def _clip_blocks(blocks: list[Block], n_t: int) -> list[Block]:
    """Clip the last block to the time axis."""
    return [replace(b, t1=min(b.t1, n_t)) for b in blocks]


def refocus_recording(
    source: str | Path,
    *,
    model: str | Path | None = None,
    planes: Sequence[float] | None = None,
    scope: str | Path | None = None,
    out: str | Path | None = None,
    name: str | None = None,
    fill_gaps: bool = False,
    scheduler: Any = "threads",
    workers: int | None = None,
    chunk: int | None = None,
    backend: str | None = None,
    intra_op_threads: int | None = None,
    allow_extrapolation: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    stack_dtype: str = "float32",
    psf_bank: str | Path | None = None,
    point_fit: bool = False,
    point_fit_lateral: Lateral = "linear",
) -> RefocusSummary:
    """Refocus a recording's raw frames chunk by chunk and write an NGFF stacks image.

    Parameters
    ----------
    source
        A run store of this project, an NGFF (t, y, x) image, a Zarr (T, H, W) array or a
        TIFF stack (a path, or a URL zarr opens through fsspec).
    model
        Model file (default: the scope config's, else the run's own, else the shipped model).
    psf_bank
        Volume models: a measured PSF bank to render the planes through (default: the scope
        config's, else the run's own, else the model's own bank; `engine.psf_calibration`).
    point_fit
        Volume models: refit each frame's beads to the frame through that bank before the
        planes are rendered (`engine.point_fit`): sharper, better-placed beads, at about a
        second a frame on one core (the live daemon does not; offline it can).
    point_fit_lateral
        How the fit holds a bead between pixels (`PointFit.lateral`): "spline" renders beads
        as a camera images them (serve it through a bank measured with ``--lateral spline``).
    planes, scope
        Plane offsets in µm, or a scope config whose ``[planes]`` (and ``[engine]``) to use;
        default: the run's own planes.
    out
        A new (or resumed) store for the stacks; default: beside ``raw`` in the run store.
    name
        Image name in the output store (default ``stacks_offline`` in a run store, ``stacks``
        in a new one).
    fill_gaps
        Compute only the seqs present in raw but missing from the live ``stacks`` image, into
        that image, and update the run's presence attributes (each fill listed with its model
        in ``filled_offline``). Only onto the live run's planes and focus lock; the run's
        model file gone or changed since is refused rather than replaced (give `model`).
    scheduler
        ``"threads"``, ``"processes"``, ``"sync"``, a ``dask.distributed`` scheduler address, or
        a ``distributed.Client``.
    workers
        Local threads or processes (default 2 threads, or one process per core).
    chunk
        Time points per output chunk (= per task) for a new image; default `auto_chunk` (an
        image being resumed keeps its own).
    backend
        Backend name ("openvino", "onnxruntime", ...); default: the config's order, else auto.
    intra_op_threads
        CPU threads per backend (default: the backend's; use 1 with one worker per core).
    allow_extrapolation
        Accept planes outside the model's trained range (also when the scope config or the
        recording's config says ``engine.allow_extrapolation``, as its live run did). Refused
        with `fill_gaps` when the live run did not: its stacks' depths would differ.
    overwrite
        Replace an existing output image made with another model, plan or source (for
        `fill_gaps`: compute again the stacks an interrupted fill with another model, bank,
        plan or backend wrote, instead of refusing to resume it).
    progress
        Show a progress bar on stderr.
    stack_dtype
        ``"float32"`` or ``"float16"`` (as the live recorder stores stacks: half the bytes to
        compress and write, values rounded by at most 2^-11 and saturated beyond ±65504) for a
        new image; fill-gaps keeps the live image's dtype.

    Raises
    ------
    RefocusError
        Bad input, plan, model, backend or output; the message says which and what to do.
    RefocusTaskError
        A chunk task could not read its raw frames (a damaged file); the chunks done are kept.
    """
    from live.store import STACK_DTYPES, StackAxis

    t_setup = time.perf_counter()
    if chunk is not None and chunk < 1:
        raise RefocusError(f"--chunk must be >= 1, got {chunk}")
    if stack_dtype not in STACK_DTYPES:
        raise RefocusError(f"--dtype must be one of {', '.join(STACK_DTYPES)}, got {stack_dtype!r}")
    if planes is not None and scope is not None:
        raise RefocusError("give --planes or --scope, not both")
    if fill_gaps and out is not None:
        raise RefocusError("--fill-gaps writes into the run's own stacks image: drop --out")
    raw = open_input(source)
    if raw.n_t == 0 or not raw.present:
        raise RefocusError(f"{raw.spec.path}: the recording holds no frames")
    if fill_gaps and not raw.is_run:
        raise RefocusError(
            f"{raw.spec.path}: --fill-gaps needs a run of this project (raw and stacks with "
            "their presence in the root attributes)"
        )
    scope_cfg = load_scope(scope) if scope is not None else None
    # the run's stored [planes], validated once: the plan and the fill check both need it
    own = fill_gaps or (planes is None and scope_cfg is None)
    stored = stored_planes(raw) if own else None
    try:
        chosen = plan_from_planes(planes, scope_cfg, raw, stored)
    except DPMError as exc:
        raise RefocusError(f"planes: {exc}") from None
    plan, plan_from = chosen.plan, chosen.source
    wanted = list(raw.present)
    if fill_gaps:
        check_fill_plan(raw, chosen, stored)
        if allow_extrapolation and not chosen.allow_extrapolation:
            # the focus lock's range follows it (`depth_limits`): filled stacks would sit on
            # other depths than the live ones beside them (review 84: 1 µm apart, unsaid)
            raise RefocusError(
                f"{raw.spec.path}: the live run did not extrapolate (engine.allow_extrapolation "
                "off), so --fill-gaps does not either: drop --extrapolate"
            )
        run = raw.run or {}
        if run.get("summary") is None:
            log.warning("the run was not closed (still recording, or it crashed)")
        have = live_stacks_present(run, raw.n_t, raw.spec.path)
        wanted = [t for t in raw.present if t not in have]
    with malformed(raw.spec.path, "run metadata (its recorded [engine] config)"):
        model_path, prefer, max_batch, precision, modality, bank = engine_choice(
            model, backend, scope_cfg, raw, psf_bank, fill_gaps
        )
    if not model_path.is_file():
        raise RefocusError(f"{model_path}: model file not found")
    if bank is not None and not bank.is_file():
        raise RefocusError(
            f"{bank}: PSF bank file not found (the planes were to go through it: pass "
            "--psf-bank with its copy; a run's own bank is not swapped for the model's silently)"
        )
    if scope_cfg is None:  # the run's own files: are they as recorded?
        own_bank = bank if psf_bank is None else None
        check_recorded(raw, model_path if model is None else None, own_bank, fill_gaps)
    elif fill_gaps:  # the scope config's files, unless chosen: are they the run's own?
        unchosen: dict[str, Path | None] = {}
        if model is None:
            unchosen["model"] = model_path
        if psf_bank is None:
            unchosen["psf_bank"] = bank
        check_fill_files(raw, unchosen)
    bank_str = str(bank.resolve()) if bank is not None else None
    threads = intra_op_threads
    if threads is None and scope_cfg is not None:
        threads = scope_cfg.engine.intra_op_threads
    try:
        spec = EngineSpec(
            str(model_path.resolve()),
            prefer,
            precision,
            threads,
            max_batch,
            modality,
            bank_str,
            point_fit_lateral if point_fit else None,
            model_sha256=cached_sha256(model_path),
            psf_bank_sha256=cached_sha256(bank) if bank is not None else None,
        )
        driver_backend, _ = cached_backend(spec)
    except (BackendError, ValueError, OSError) as exc:
        raise RefocusError(f"model {model_path}: {exc}") from None
    meta = driver_backend.metadata
    allow_extrapolation = allow_extrapolation or chosen.allow_extrapolation
    try:  # as the live daemon checks its planes (`live.run`): the same limits
        plan.validate(
            raw.frame_shape,
            depth_limits(meta),
            allow_extrapolation and meta.volume is None,
        )
    except DPMError as exc:
        raise RefocusError(f"{exc} (planes from {plan_from})") from None
    try:  # the focus lock's own limits (a plan spanning more than the lock can clamp)
        offsets = lock_offsets(chosen, raw, depth_limits(meta, allow_extrapolation))
    except DPMError as exc:
        raise RefocusError(f"{exc} (the focus lock of {plan_from})") from None
    # Workers load exactly the backend (and precision) chosen here: every chunk alike.
    engine = replace(spec, prefer=(driver_backend.name,), precision=driver_backend.precision)
    alias_backend(engine, spec)
    model_id = {"name": meta.name, "file": str(model_path), "sha256": spec.model_sha256}
    if meta.volume is not None:  # what the stacks show: wide-field or confocal-like planes
        model_id["render_modality"] = meta.volume.modality
    if bank is not None:  # through a measured PSF: other planes, so another identity to resume
        model_id["psf_bank"] = str(bank)
        model_id["psf_bank_sha256"] = spec.psf_bank_sha256 or cached_sha256(bank)
    if point_fit:  # other planes again: beads refitted (the fit's settings, to resume alike)
        # the linear fit's identity as it was before `lateral` existed: its outputs resume
        fit = repr(PointFit(lateral=point_fit_lateral))
        model_id["point_fit"] = fit.replace(", lateral='linear'", "")
    chunk_given = chunk is not None
    if chunk is None:
        itemsize = np.dtype(stack_dtype).itemsize
        chunk = auto_chunk(len(plan) * math.prod(raw.frame_shape) * itemsize)
    store = output_store(raw, out)
    identity = job_identity(
        raw, plan, model_id, driver_backend.name, chunk, chosen.focus_lock, store
    )
    if stack_dtype != "float32" and not fill_gaps:  # only then: older images still resume
        identity["dtype"] = stack_dtype
    if driver_backend.precision != "fp32":  # bf16 on one machine, fp32 on another: not mixed
        identity["precision"] = driver_backend.precision
    deepz = {
        "source": raw.spec.path,
        "source_image": raw.spec.array_path,
        "time_index": "the source's time index (camera sequence number for runs)",
        "planes_um": list(plan.z_um) if plan.z_um is not None else None,
        "labels": list(plan.labels),
        "uniform_planes": StackAxis.from_plan(plan.z_um, plan.labels, plan.dpms_um).uniform,
        "plan_from": plan_from,
        "focus_lock": lock_attrs(chosen.focus_lock),
        "model": model_id,
        "backend": driver_backend.name,
        "created": utc_now(),
    }
    # The scheduler is checked (and a cluster reached) before the output is touched: a
    # refusal here leaves no empty image registered in the store's collection.
    runner = _Runner(scheduler, workers, progress)
    token = uuid.uuid4().hex  # the job's: its lock file names it, its tasks check it
    try:
        with output_lock(store, token):
            output = prepare_output(
                raw,
                plan,
                store=store,
                out=out,
                name=name,
                fill_gaps=fill_gaps,
                chunk=chunk,
                overwrite=overwrite,
                identity=identity,
                stack_dtype=stack_dtype,
                deepz=deepz,
                chunk_given=chunk_given,
                wanted=wanted,
            )
            blocks = _clip_blocks(_blocks(wanted, output.chunk, offsets), raw.n_t)
            job = Job(
                raw.spec,
                engine,
                plan,
                identity["plan_sha256"],
                output.store,
                output.array_path,
                output.manifest_path,
                output.fill,
                token,
                locked=not is_url(output.store),
            )
            results, task_s = runner(job, blocks, len(wanted))
            done = {s for r in results for s in r.seqs}
            finish_output(output, raw, done, set(wanted), model_id)
    finally:
        runner.close()
    computed = [r for r in results if not r.skipped]
    skipped = [r for r in results if r.skipped]
    summary = RefocusSummary(
        source=raw.spec.path,
        store=output.store,
        image=output.array_path,
        name=output.name,
        frames_wanted=len(wanted),
        frames_done=sum(len(r.seqs) for r in computed),
        frames_skipped=sum(len(r.seqs) for r in skipped),
        chunks_done=len(computed),
        chunks_skipped=len(skipped),
        seconds=task_s,
        setup_seconds=time.perf_counter() - t_setup - task_s,
        backend=driver_backend.name,
        device=str(driver_backend.device),
        model=model_id,
        planes=plan.labels,
        scheduler=runner.description,
        dashboard=runner.dashboard,
    )
    log.info(summary.line())
    return summary


class _Runner:
    """Runs chunk tasks on the chosen scheduler and collects their results."""

    def __init__(self, scheduler: Any, workers: int | None, progress: bool) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self.progress = progress
        self.dashboard: str | None = None
        self.description = str(scheduler)
        self._client: Any = None
        self._own_client = False
        if isinstance(scheduler, str) and scheduler in LOCAL_SCHEDULERS:
            if workers is not None and workers < 1:
                raise RefocusError(f"--workers must be >= 1, got {workers}")
            return
        try:
            distributed: Any = importlib.import_module("distributed")
        except ImportError:
            raise RefocusError(
                f"scheduler {scheduler!r} needs dask.distributed: pip install 'deepz-live[dist]' "
                f"(local schedulers: {', '.join(LOCAL_SCHEDULERS)})"
            ) from None
        if isinstance(scheduler, distributed.Client):
            self._client = scheduler
        elif isinstance(scheduler, str) and "://" in scheduler:
            try:
                self._client = distributed.Client(scheduler, timeout="20s")
            except OSError as exc:
                raise RefocusError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
            self._own_client = True
        else:
            raise RefocusError(
                f"scheduler must be one of {', '.join(LOCAL_SCHEDULERS)} or a dask.distributed "
                f"address such as tcp://host:8786, not {scheduler!r}"
            )
        self.dashboard = str(self._client.dashboard_link)
        n = len(self._client.scheduler_info().get("workers", {}))
        where = self._client.scheduler.address
        self.description = f"dask.distributed {where} ({n} worker{'s' if n != 1 else ''})"

    def __call__(
        self, job: Job, blocks: list[Block], frames: int
    ) -> tuple[list[BlockResult], float]:
        """Run every block; return the results and the seconds the tasks took."""
        from tqdm import tqdm

        bar = tqdm(
            total=frames, unit="frame", disable=not self.progress, file=sys.stderr, smoothing=0.1
        )
        try:
            if self._client is not None:
                return self._distributed(job, blocks, bar.update)
            return self._local(job, blocks, bar.update)
        finally:
            bar.close()

    def _local(
        self, job: Job, blocks: list[Block], tick: Callable[[int], Any]
    ) -> tuple[list[BlockResult], float]:
        """Dask's local threaded / multiprocessing / synchronous scheduler (or a plain loop)."""
        try:
            dask: Any = importlib.import_module("dask")
            callbacks: Any = importlib.import_module("dask.callbacks")
        except ImportError:
            log.info("dask is not installed: refocusing chunk by chunk in this thread")
            t0 = time.perf_counter()
            results = []
            for block in blocks:
                results.append(refocus_block(job, block))
                tick(len(block.seqs))
            self.description = "plain loop (dask not installed)"
            return results, time.perf_counter() - t0
        kind = str(self.scheduler)
        n = self.workers or (2 if kind == "threads" else os.cpu_count() or 1)
        n = 1 if kind == "sync" else n
        self.description = f"dask {kind}, {n} worker{'s' if n > 1 else ''}"
        run_id = uuid.uuid4().hex[:8]
        options: dict[str, Any] = {}
        configured = dask.config.get("pool", None) or dask.config.get(
            "multiprocessing.initializer", None
        )
        if kind == "processes" and job.plan is not None and not configured:
            # dask's process pool pickles each task with the values of its inputs, the job
            # among them: the DPMs go to each pool process once, as it starts, instead (with
            # a pool or initializer of the user's dask config, each task gets the whole job)
            options["initializer"] = functools.partial(install_plan, job.plan_token, [job.plan])
            job = job.without_plan()
        # The threads are this job's own, shut down with a wait before the job lets its store
        # go: when one chunk fails (or Ctrl-C), dask.compute raises at once while the others
        # still run on dask's shared pool, and a store let go then could be written by them
        # and by the next job at once. (dask shuts the process pool it makes down with a wait.)
        pool: concurrent.futures.ThreadPoolExecutor | None = None
        if kind == "threads" and not configured:
            pool = options["pool"] = concurrent.futures.ThreadPoolExecutor(n)
        job_d = dask.delayed(job, name=f"refocus-job-{run_id}", traverse=False)
        tasks = [
            dask.delayed(refocus_block, pure=False)(
                job_d, block, dask_key_name=f"refocus-{run_id}-{block.index}"
            )
            for block in blocks
        ]

        def posttask(key: Any, result: Any, *_: Any) -> None:
            if isinstance(result, BlockResult):
                tick(len(result.seqs))

        t0 = time.perf_counter()
        try:
            with callbacks.Callback(posttask=posttask):
                results = list(dask.compute(*tasks, scheduler=kind, num_workers=n, **options))
        finally:
            if pool is not None:  # the chunks still running finish (or fail) first
                pool.shutdown(wait=True, cancel_futures=True)
        return results, time.perf_counter() - t0

    def _distributed(
        self, job: Job, blocks: list[Block], tick: Callable[[int], Any]
    ) -> tuple[list[BlockResult], float]:
        """Run on a dask.distributed cluster: load the model on every worker, then the chunks."""
        distributed: Any = importlib.import_module("distributed")

        client = self._client
        print(f"dask dashboard: {self.dashboard}", file=sys.stderr, flush=True)
        loaded = client.run(warm_worker, job.engine)  # each worker loads the model once
        for address, what in sorted(loaded.items()):
            log.info("worker %s: %s", address, what)
        run_id = uuid.uuid4().hex[:8]
        [job_future] = client.scatter([job], broadcast=True, hash=False)
        t0 = time.perf_counter()
        futures = [
            client.submit(refocus_block, job_future, block, key=f"refocus-{run_id}-{block.index}")
            for block in blocks
        ]
        results: list[BlockResult] = []
        try:
            for future in distributed.as_completed(futures):
                result = future.result()
                results.append(result)
                tick(len(result.seqs))
        except BaseException:
            self._drain(futures)
            raise
        finally:
            for future in futures:
                future.release()
        return results, time.perf_counter() - t0

    def _drain(self, futures: list[Any]) -> None:
        """After a failure: cancel the chunks no worker has yet, wait for those it has.

        A running task cannot be stopped, and cancelling one only makes the scheduler forget
        it while its worker runs it on. Best effort (a task can reach a worker between the
        question and the cancel); what makes a late task harmless is its own check of the
        store's lock before it writes (`live.store_lock.held_by`).
        """
        distributed: Any = importlib.import_module("distributed")
        assert self._client is not None
        left = [f for f in futures if not f.done()]
        if not left:
            return
        try:
            assigned = {key for keys in self._client.processing().values() for key in keys}
        except Exception as exc:  # the scheduler gone: nothing more can be known or waited for
            log.warning("cannot ask the scheduler which chunks still run: %s", exc)
            return
        running = [f for f in left if f.key in assigned]
        self._client.cancel([f for f in left if f.key not in assigned])
        if running:
            log.warning(
                "waiting for %d chunk tasks already on workers before the store is let go",
                len(running),
            )
            distributed.wait(running)

    def close(self) -> None:
        """Close a client this runner opened (never the cluster)."""
        if self._own_client and self._client is not None:
            self._client.close()
