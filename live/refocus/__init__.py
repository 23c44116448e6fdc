"""Offline refocusing of recordings: raw frames in, an NGFF stacks image out, by Dask chunks.

The raw frames of a run are the experiment; the virtual stacks are derived data. This package
recomputes them after the fact, with another model, onto other planes or surfaces, to fill the
stacks a live run skipped (``--fill-gaps``), or for a recording that was never refocused::

    python -m live.refocus RUN.ome.zarr [--model PATH] [--planes Z1 Z2 ... | --scope config.toml]
        [--out PATH] [--name IMAGE] [--fill-gaps] [--scheduler threads|processes|sync|tcp://...]
        [--workers N] [--chunk N] [--backend NAME] [--threads N] [--overwrite]
        [--dtype float32|float16]

or from Python, `refocus_recording(...)`, which returns a `RefocusSummary`.

Input: this project's run store (its raw image (t, y, x), ``0/0`` or in stores from before
the collection layout ``raw/0``, with the present seqs from the root attributes; see
`live.store`),
any NGFF image whose axes are (t, y, x) (other axes of size 1 allowed), a plain Zarr array
(T, H, W), or a TIFF stack. Output: an NGFF 0.5 image (t, z, y, x) float32 (``--dtype float16``:
as the live recorder stores stacks) on zarr v3, indexed
like the input's time axis (the camera sequence number for our runs), with the planes' z in its
axis transforms (uniform planes) or in its attributes (any other plan), and the model's name,
file and sha256 in ``attrs["deepz"]["model"]``. It goes beside ``raw`` in the same run store
(``stacks_offline`` by default), into the live ``stacks`` image (``fill_gaps``), or into a new
store (``out``).

How it runs: one task per output chunk (``chunk`` time points; by default about 4 MiB of stacks,
`auto_chunk`), so no two tasks ever write the same chunk object. A task reads its raw
frames, refocuses each present one with ``Backend.refocus(frame, plan, offset, dtype)``
exactly as the live worker does (same DPMs, one frame per call, so the same model and
backend give the same stacks; a run whose planes followed the stage focus
(``planes.focus_lock_um``) has each frame's DPMs shifted by the same `FocusLock` offset,
computed from the focus recorded with the frame), writes the chunk, and then writes the
chunk's CRC-32 into a small manifest array (``<image>/refocus_done``, one element per chunk,
one object each). A rerun verifies each chunk the manifest names (it reads back, is finite and
has that CRC) and skips it; a missing or damaged chunk is recomputed. Backends are loaded once
per process and kept in a module-level cache keyed by model file and backend options; the
plan's DPMs reach each process once too, not with every task (`Job`).

One job writes a store at a time: from before it opens its output until it has written its
presence, the driver holds the store's lock file (`live.store_lock`: ``<store>.writer.lock``
beside a local output store, its pid and host), and a second job there is refused naming the
first; the lock of a job killed on this machine is taken over, said. A store behind a URL is
not locked (said).

Schedulers: ``"threads"`` (default: a Dask thread pool of `workers` threads sharing one backend
under a lock, so reading, compressing and writing overlap with inference), ``"processes"`` (a
Dask process pool, one backend per process), ``"sync"`` (one thread, for debugging), or the
address of a running ``dask.distributed`` scheduler (``tcp://host:8786``) or a
``distributed.Client``: each worker loads the model once (before timing starts) and the driver
prints the dashboard address. Every worker must see the input and output paths (a shared file
system, or a URL that zarr opens through fsspec, e.g. ``s3://bucket/run.ome.zarr``).

dask is imported only here and only when refocusing runs (extra ``dist``); without it the local
schedulers fall back to a plain loop over the same chunk tasks.

Where each part lives, in the order a job meets them:

- `live.refocus.inputs`: the recording opened (`open_input` -> `RawInput`), and how a task
  reads its frames in any process (`InputSpec`, the per-process cache of opened arrays).
- `live.refocus.plans`: the DPMs a job refocuses onto (``--planes``, ``--scope``, the run's own),
  the model and backend it chooses, and the checks against what the live run recorded.
- `live.refocus.outputs`: the output store's lock, image, metadata, job identity, manifest and
  the presence written at the end.
- `live.refocus.tasks`: what one chunk task does (`refocus_block`) and what it is sent (`Job`,
  `Block`), with the per-process caches of backends and plans.
- `live.refocus.driver`: `refocus_recording`, which wires these together and runs the tasks on
  the chosen scheduler; `RefocusSummary`.
- `live.refocus.cli`: the command line (`main`).
"""

from __future__ import annotations

from live.refocus.cli import main
from live.refocus.driver import LOCAL_SCHEDULERS, RefocusSummary, auto_chunk, refocus_recording
from live.refocus.errors import RefocusError, RefocusTaskError
from live.refocus.inputs import RawInput, open_input
from live.refocus.outputs import DEFAULT_IMAGE
from live.refocus.tasks import MANIFEST, clear_backends

__all__ = [
    "DEFAULT_IMAGE",
    "LOCAL_SCHEDULERS",
    "MANIFEST",
    "RawInput",
    "RefocusError",
    "RefocusSummary",
    "RefocusTaskError",
    "auto_chunk",
    "clear_backends",
    "main",
    "open_input",
    "refocus_recording",
]
