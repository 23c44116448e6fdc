"""live.refocus: what each chunk task is sent, on a process pool, whatever the plan's size.

dask's process pool pickles every task with the values of its inputs, so a job carrying the
plan's DPMs (690 MB for 41 planes of 2048²) went to the pool once per chunk. The DPMs now reach
each pool process once, as it starts; a task is sent about a kilobyte.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from engine.dpm import VolumePlan, tilted
from engine.runtime import DEFAULT_MODEL, load_backend
from live.protocol import decode, encode_frame
from live.recorder import Recorder
from live.refocus import clear_backends, refocus_recording
from live.refocus.inputs import InputSpec
from live.refocus.tasks import Block, EngineSpec, Job

SIDE = 64
TASK_BYTES = 4096
"""A chunk task's pickled inputs stay under this, whatever the plan (its DPMs stay behind)."""


@pytest.fixture(autouse=True, scope="module")
def _forget_backends() -> Iterator[None]:
    yield
    clear_backends()


def _surface_plan(n: int, side: int) -> VolumePlan:
    """`n` tilted surfaces of side² pixels (a broadcast view: no memory for a large one)."""
    dpm = tilted((side, side), 0.0, 0.01, -0.02, pixel_size_um=0.3)
    dpms = np.broadcast_to(dpm, (n, side, side))
    return VolumePlan(dpms, tuple(f"s{i}" for i in range(n)))


def _job(plan: VolumePlan) -> Job:
    spec = InputSpec("/data/run.ome.zarr", "zarr", "0/0")
    engine = EngineSpec(str(DEFAULT_MODEL), ("onnxruntime",))
    return Job(spec, engine, plan, "a" * 64, spec.path, "1/0", "1/refocus_done", False, "b" * 32)


def test_a_job_without_its_plan_pickles_to_the_same_few_bytes_whatever_the_dpms() -> None:
    """The job as a pool's tasks get it: one 64² surface or 41 of 2048² (690 MB), alike."""
    block = Block(7, 112, 128, tuple(range(112, 128)), tuple(0.1 * i for i in range(16)))
    small, large = _surface_plan(1, SIDE), _surface_plan(41, 2048)
    assert large.dpms_um.nbytes == 41 * 2048 * 2048 * 4
    sizes = [len(pickle.dumps((_job(p).without_plan(), block))) for p in (small, large)]
    assert sizes[0] == sizes[1] < TASK_BYTES
    with_dpms = len(pickle.dumps((_job(small), block)))  # a small plan: cheap to pickle whole
    assert with_dpms > sizes[0] + small.dpms_um.nbytes


def test_a_surface_run_on_a_process_pool_sends_no_dpms_per_task_and_equals_the_reference(
    tmp_path: Path,
) -> None:
    """Nine tilted surfaces (147 kB of DPMs), a chunk a frame, two pool processes: every task
    dask sends (measured as its local scheduler pickles it: the task with its inputs' values)
    stays under `TASK_BYTES`, and the stacks are the live worker's for those DPMs."""
    from dask.callbacks import Callback
    from dask.multiprocessing import _dumps

    names = [f"s{i}" for i in range(9)]
    zs = [float(z) for z in np.linspace(-3.0, 3.0, len(names))]
    surfaces = [
        {"name": n, "kind": "tilted", "z0_um": z, "slope_x": 0.02, "slope_y": -0.01}
        for n, z in zip(names, zs, strict=True)
    ]
    dpms = np.stack([tilted((SIDE, SIDE), z, 0.02, -0.01, pixel_size_um=0.3) for z in zs])
    rng = np.random.default_rng(3)
    frames = rng.integers(100, 1000, (3, SIDE, SIDE), dtype=np.uint16)
    store = tmp_path / "run.ome.zarr"
    rec = Recorder(
        store,
        frame_shape=(SIDE, SIDE),
        pixel_size_um=0.3,
        rate_hz=2.0,
        surfaces=names,
        dpms_um=dpms,
        config={"planes": {"surfaces": surfaces}},
    )
    for seq, frame in enumerate(frames):
        rec.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=time.time())))
    rec.close()

    sent: dict[str, int] = {}

    def measure(key: Any, dsk: Any, state: Any) -> None:
        data = {dep: state["cache"][dep] for dep in state["dependencies"][key]}
        sent[str(key)] = len(_dumps((dsk[key], data)))

    with Callback(pretask=measure):
        summary = refocus_recording(
            store,
            scheduler="processes",
            workers=2,
            chunk=1,
            backend="onnxruntime",
            intra_op_threads=1,
        )
    assert summary.frames_done == 3 and "dask processes" in summary.scheduler
    assert summary.planes == tuple(names)
    chunk_tasks = [k for k in sent if not k.startswith("refocus-job-")]
    assert len(chunk_tasks) == 3, sent
    assert max(sent.values()) < TASK_BYTES < dpms.nbytes, sent

    backend = load_backend(DEFAULT_MODEL, prefer=["onnxruntime"], intra_op_threads=1)
    live = np.array(dpms, dtype=np.float32)
    live.setflags(write=False)
    expected = np.stack([backend.infer(f, live) for f in frames])
    stacks = np.asarray(zarr.open_array(store=summary.store, path=summary.image, mode="r")[...])
    np.testing.assert_allclose(stacks, expected, rtol=1e-5, atol=1e-3)


def test_clear_backends_forgets_the_frozen_plans_too() -> None:
    """A long-lived process (a notebook running many jobs) lets go of the plans' DPMs."""
    from live.refocus import tasks

    tasks.install_plan("c" * 64, [_surface_plan(2, SIDE)])
    assert "c" * 64 in tasks._PLANS
    clear_backends()
    assert tasks._PLANS == {}
