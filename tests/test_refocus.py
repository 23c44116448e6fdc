"""live.refocus: the live run's stacks, a Dask LocalCluster, resume, fill-gaps, bad inputs.

Small on purpose (64² frames, a handful of them, the shipped slim model on one ONNX Runtime
thread): the whole file runs in well under a minute on two shared cores.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from engine.metadata import file_sha256
from engine.runtime import DEFAULT_MODEL, load_backend
from live.protocol import decode, encode_frame, encode_stack
from live.recorder import Recorder
from live.refocus import (
    MANIFEST,
    RefocusError,
    clear_backends,
    main,
    open_input,
    refocus_recording,
)
from tests.live_helpers import run_array

SIDE = 64
PLANES = [-2.0, 0.0, 2.0]
ORT = {"backend": "onnxruntime", "intra_op_threads": 1}


def _frames(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, 1000, (n, SIDE, SIDE), dtype=np.uint16)


def _record(
    path: Path,
    raw_seqs: list[int],
    stack_seqs: list[int] = (),
    fill: float = 7.0,
    **recorder: Any,
) -> np.ndarray:
    """A run store made by the project's Recorder: raw frames at `raw_seqs` and constant
    stacks (value `fill`, easy to tell apart) at `stack_seqs`; `recorder` are more of its
    keyword arguments."""
    frames = _frames(max(raw_seqs) + 1)
    rec = Recorder(
        path,
        frame_shape=(SIDE, SIDE),
        pixel_size_um=0.3,
        rate_hz=2.0,
        planes_um=PLANES,
        **recorder,
    )
    for seq in raw_seqs:
        rec.put_frame(decode(encode_frame(frames[seq], seq=seq, timestamp_s=time.time())))
    for seq in stack_seqs:
        stack = np.full((len(PLANES), SIDE, SIDE), fill, np.float32)
        parts = encode_stack(stack, seq=seq, timestamp_s=0.0, focus_um=0.0, latency_ms=0.0)
        rec.put_stack(decode(parts))
    rec.close()
    return frames


def _reference(frames: np.ndarray) -> np.ndarray:
    """Refocus each frame in this process exactly as the live worker does."""
    backend = load_backend(DEFAULT_MODEL, prefer=["onnxruntime"], intra_op_threads=1)
    dpms = np.array(np.broadcast_to(np.float32(PLANES)[:, None, None], (3, SIDE, SIDE)))
    dpms.setflags(write=False)
    return np.stack([backend.infer(f, dpms) for f in frames])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m live.refocus ARGS`` in a fresh interpreter, as a user runs it."""
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "live.refocus", *args]
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)


def _until_all_in(daemon: Any, n: int) -> None:
    """Supervise `daemon` until its router has taken `n` frames: a stop takes only what has
    already arrived, and on a loaded machine a frame may still be on its way after a fixed
    wait."""
    deadline = time.monotonic() + 60
    while daemon.metrics.snapshot(advance=False).frames_in < n:
        assert time.monotonic() < deadline, daemon.metrics.snapshot(advance=False)
        daemon.supervise(0.1, quiet=True)


def _read(store: Path | str, path: str) -> np.ndarray:
    """Read ``NAME/0`` of a store: NAME an image's name (its group from ``deepz.images``)."""
    name, _, rest = path.partition("/")
    return np.asarray(zarr.open_array(store=str(store), path=f"{_group(store, name)}/{rest}")[...])


def _assert_collection(store: Path, images: dict[str, str]) -> None:
    """The store is one OME-Zarr 0.5 collection of exactly `images` (name: group), in order:
    in ``deepz.images``, ``OME/series`` and METADATA.ome.xml alike, so yaozarrs validates it
    and ome-zarr-py's finder (image i is group i) lists each image under its name."""
    from ome_zarr.utils import find_multiscales

    from live.store import image_groups

    root = zarr.open_group(str(store), mode="r")
    assert image_groups(dict(root.attrs["deepz"])) == images
    assert root["OME"].attrs["ome"]["series"] == list(images.values())
    found = [(Path(path).name, name) for path, name, _ in find_multiscales(store)]
    assert found == [(group, name) for name, group in images.items()]
    yaozarrs = pytest.importorskip("yaozarrs", reason="the OME-Zarr validator is not installed")
    yaozarrs.validate_zarr_store(str(store))


def _group(store: Path | str, name: str) -> str:
    """The group of image `name` in a store (offline images take numbered groups)."""
    from live.store import image_groups

    deepz = dict(zarr.open_group(str(store), mode="r").attrs.get("deepz", {}))
    return image_groups(deepz).get(name, name)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """A real dask.distributed LocalCluster: 2 worker processes of 1 thread each."""
    distributed = pytest.importorskip(
        "distributed", reason="a dask cluster needs the dist extra: pip install '.[dist]'"
    )
    cluster = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(autouse=True, scope="module")
def _forget_backends() -> Iterator[None]:
    yield
    clear_backends()


# ------------------------------------------------------------------ same stacks as live


def test_offline_stacks_equal_the_live_run(tmp_path: Path) -> None:
    """Record with the real daemon, refocus offline with the run's own settings, compare."""
    from live.run import Daemon
    from tests.live_helpers import live_config, push_frames

    config = live_config(tmp_path, DEFAULT_MODEL, planes=PLANES)
    store = tmp_path / "run.ome.zarr"
    daemon = Daemon(config, output=store, source=None, preflight_check=False)
    try:
        daemon.start()
        deadline = time.monotonic() + 120  # generous: a loaded CI machine is slow
        while not daemon.ledger.ready_workers():  # frames sent before it loads may be skipped
            assert time.monotonic() < deadline
            daemon.supervise(0.1, quiet=True)
        push_frames(config.endpoints.frames, list(range(6)), rate_hz=10.0)
        _until_all_in(daemon, 6)
    finally:
        live = daemon.stop()
    assert live.stacks_written == 6
    summary = refocus_recording(store, scheduler="sync", intra_op_threads=1)  # the run's model,
    # backend and planes, from the config stored in the run
    assert (summary.frames_done, summary.backend) == (6, "onnxruntime")
    assert summary.model["sha256"] and summary.model["name"]
    offline, live_stacks = _read(store, "stacks_offline/0"), run_array(store, "stacks")[...]
    assert offline.shape == live_stacks.shape == (6, 3, SIDE, SIDE)
    assert offline.dtype == np.float32 and config.recorder.stack_dtype == "float16"
    # The live stacks travelled (and are stored) as float16: rounded by at most 2^-11.
    scale = float(np.abs(live_stacks).max())
    np.testing.assert_allclose(offline, live_stacks, rtol=2.0**-11 + 1e-5, atol=1e-5 * scale)
    attrs = zarr.open_group(str(store), mode="r")[_group(store, "stacks_offline")].attrs
    # the offline image is one more image of the run's collection, found the way the live
    # ones are (OME/series, OME/METADATA.ome.xml, deepz.images), in the next numbered group
    _assert_collection(store, {"raw": "0", "stacks": "1", "stacks_offline": "2"})
    assert attrs["deepz"]["plan_from"] == "the recording's config"
    assert attrs["deepz"]["complete"] is True and attrs["deepz"]["present"] == [[0, 6]]
    scale_t = attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert scale_t[0]["scale"][:2] == [1 / 20.0, 2.0] and scale_t[1]["translation"][1] == -2.0


def test_a_focus_locked_run_refocuses_offline_onto_its_live_planes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Planes that followed the stage focus live follow the recorded focus offline.

    Each frame's DPMs were shifted by its focus change (`engine.dpm.FocusLock`); offline
    refocusing rebuilds the same lock from the run's config and the focus recorded per frame,
    so the stacks match the live ones, and differ from planes at a fixed focus.
    """
    from live.config import validate_config
    from live.run import Daemon
    from tests.live_helpers import live_config, push_frames

    focus = [0.0, 0.5, -1.0, 1.5, 3.0, -2.5, 20.0]  # the last beyond the lock's reach
    data = live_config(tmp_path, DEFAULT_MODEL, planes=PLANES).model_dump(mode="json")
    data["planes"]["focus_lock_um"] = 0.0
    config = validate_config(data, source="test config")
    assert config.planes.focus_lock_um == 0.0 and config.planes.z_um == PLANES
    store = tmp_path / "locked.ome.zarr"
    daemon = Daemon(config, output=store, source=None, preflight_check=False)
    try:
        daemon.start()
        deadline = time.monotonic() + 120  # generous: a loaded CI machine is slow
        while not daemon.ledger.ready_workers():
            assert time.monotonic() < deadline
            daemon.supervise(0.1, quiet=True)
        push_frames(config.endpoints.frames, list(range(7)), rate_hz=10.0, focus_um=focus)
        _until_all_in(daemon, 7)
    finally:
        live = daemon.stop()
    assert live.stacks_written == 7
    # planes ±2 µm in a ±10 µm model: the lock shifts at most 8 µm, so 20 µm is clamped
    assert list(live.focus_clamped) == [6]  # each frame named (review 84), in the store too
    assert any(line.startswith("  focus clamped     1 frames (seqs 6:") for line in live.lines())
    stored = zarr.open_group(str(store), mode="r").attrs["deepz"]["run_summary"]
    assert stored["focus_clamped"] == [[6, 7]]
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        summary = refocus_recording(store, scheduler="sync", intra_op_threads=1)
    assert summary.frames_done == 7
    # said offline as live (review 84: the excess was dropped unsaid): 20 µm, 8 reachable
    assert "1 frames (time points 6) were taken up to 12.00 µm beyond" in caplog.text
    offline, live_stacks = _read(store, "stacks_offline/0"), run_array(store, "stacks")[...]
    scale = float(np.abs(live_stacks).max())
    np.testing.assert_allclose(offline, live_stacks, rtol=2.0**-11 + 1e-5, atol=1e-5 * scale)
    attrs = zarr.open_group(str(store), mode="r")[_group(store, "stacks_offline")].attrs["deepz"]
    assert attrs["focus_lock"] == {"reference_um": 0.0, "stage_z_sign": 1.0}
    # The same frames on fixed planes: equal where the focus stayed at the reference only.
    fixed = refocus_recording(
        store, planes=PLANES, name="fixed", scheduler="sync", intra_op_threads=1
    )
    assert fixed.frames_done == 7
    unlocked = _read(store, "fixed/0")
    np.testing.assert_allclose(unlocked[0], offline[0], rtol=1e-6, atol=1e-6 * scale)
    for t in range(1, 6):
        assert not np.allclose(unlocked[t], offline[t], rtol=1e-3, atol=1e-3 * scale), t


def test_a_run_that_allowed_extrapolation_refocuses_offline_with_its_own_planes(
    tmp_path: Path,
) -> None:
    """The recording's config said engine.allow_extrapolation: its planes beyond the model's
    trained range are taken offline as they were live (other recordings refuse them)."""
    far = {"planes": {"z_um": [-2.0, 50.0]}, "engine": {"allow_extrapolation": True}}
    store = tmp_path / "far.ome.zarr"
    _record(store, [0, 1], config=far)
    summary = refocus_recording(store, scheduler="sync", **ORT)
    assert summary.frames_done == 2 and len(summary.planes) == 2
    offline = _read(store, "stacks_offline/0")
    assert offline.shape == (2, 2, SIDE, SIDE) and np.isfinite(offline).all()
    strict = tmp_path / "strict.ome.zarr"
    _record(strict, [0, 1], config={**far, "engine": {"allow_extrapolation": False}})
    with pytest.raises(RefocusError, match="outside the model's trained range"):
        refocus_recording(strict, scheduler="sync", **ORT)


def test_float16_output_is_the_float32_output_rounded_and_resumes_as_such(tmp_path: Path) -> None:
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1, 2])
    full = refocus_recording(store, planes=PLANES, name="f32", scheduler="sync", **ORT)
    half = refocus_recording(
        store, planes=PLANES, name="f16", scheduler="sync", stack_dtype="float16", **ORT
    )
    assert (full.frames_done, half.frames_done) == (3, 3)
    f32, f16 = _read(store, "f32/0"), _read(store, "f16/0")
    assert f32.dtype == np.float32 and f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))
    again = refocus_recording(
        store, planes=PLANES, name="f16", scheduler="sync", stack_dtype="float16", **ORT
    )
    assert again.frames_skipped == 3  # verified by the CRC of the stored float16 values
    with pytest.raises(RefocusError, match=r"exists from another refocusing .*dtype"):
        refocus_recording(store, planes=PLANES, name="f16", scheduler="sync", **ORT)
    with pytest.raises(RefocusError, match="--dtype must be one of"):
        refocus_recording(store, planes=PLANES, scheduler="sync", stack_dtype="int8", **ORT)


def test_the_default_chunk_holds_about_4_mib_of_stacks(tmp_path: Path) -> None:
    """Small stacks share a chunk (a task and its store round trips per chunk, not per frame);
    a stack beyond 4 MiB is a chunk of its own; an explicit chunk is kept."""
    from live.refocus import auto_chunk

    assert auto_chunk(9 * 256 * 256 * 2) == 4  # 9 planes of 256², float16: 1.2 MB
    assert auto_chunk(41 * 512 * 512 * 2) == 1
    assert auto_chunk(100) == 16
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1, 2, 3, 4])
    s = refocus_recording(store, planes=PLANES, name="auto", scheduler="sync", **ORT)
    assert (s.frames_done, s.chunks_done) == (5, 1)
    s = refocus_recording(store, planes=PLANES, name="two", scheduler="sync", chunk=2, **ORT)
    assert (s.frames_done, s.chunks_done) == (5, 3)
    assert _read(store, "two/0").shape[0] == 5
    np.testing.assert_array_equal(_read(store, "two/0"), _read(store, "auto/0"))


# ------------------------------------------------------------------ a real LocalCluster


def test_cluster_output_equals_local_and_resumes_only_damaged_chunks(
    tmp_path: Path, client: Any
) -> None:
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, [0, 1, 2, 4, 5])  # seq 3 lost by the camera
    local = refocus_recording(store, planes=PLANES, out=tmp_path / "a.ome.zarr", **ORT)
    # one frame per chunk here, so a lost and a damaged chunk below cost a frame each (the
    # local run's default puts all 5 in one chunk: the values are the same)
    dist = refocus_recording(
        store, planes=PLANES, out=tmp_path / "b.ome.zarr", scheduler=client, chunk=1, **ORT
    )
    assert (local.frames_done, dist.frames_done, dist.frames_wanted) == (5, 5, 5)
    assert dist.dashboard is not None and "distributed" in dist.scheduler
    a, b = _read(tmp_path / "a.ome.zarr", "stacks/0"), _read(tmp_path / "b.ome.zarr", "stacks/0")
    np.testing.assert_array_equal(a, b)
    expected = _reference(frames[[0, 1, 2, 4, 5]])
    np.testing.assert_allclose(b[[0, 1, 2, 4, 5]], expected, rtol=1e-5, atol=1e-3)
    assert not b[3].any()  # the lost frame stays a visible gap

    again = refocus_recording(  # no chunk given: the image keeps its own
        store, planes=PLANES, out=tmp_path / "b.ome.zarr", scheduler=client, **ORT
    )
    assert (again.frames_done, again.frames_skipped, again.chunks_skipped) == (0, 5, 5)

    chunks = tmp_path / "b.ome.zarr" / _group(tmp_path / "b.ome.zarr", "stacks") / "0" / "c"
    (chunks / "1" / "0" / "0" / "0").unlink()  # a chunk lost
    (chunks / "4" / "0" / "0" / "0").write_bytes(b"not zstd at all")  # a chunk damaged
    fixed = refocus_recording(
        store, planes=PLANES, out=tmp_path / "b.ome.zarr", scheduler=client, **ORT
    )
    assert (fixed.frames_done, fixed.frames_skipped, fixed.chunks_done) == (2, 3, 2)
    np.testing.assert_array_equal(_read(tmp_path / "b.ome.zarr", "stacks/0"), a)
    manifest = _read(tmp_path / "b.ome.zarr", f"stacks/{MANIFEST}")
    assert manifest[3] == -1 and (manifest[[0, 1, 2, 4, 5]] >= 0).all()


def _cli_args(store: Path, name: str) -> list[str]:
    """The command line refocusing `store` onto PLANES into image `name`, a chunk a frame."""
    planes = [str(z) for z in PLANES]
    return [str(store), "--planes", *planes, "--name", name, "--chunk", "1", "--no-progress"]


def test_the_command_line_runs_on_a_process_pool(tmp_path: Path) -> None:
    """``python -m live.refocus --scheduler processes``: the tasks go to the pool by reference
    to the importable module (run as ``__main__`` they were pickled by value with the module's
    locks: "TypeError: cannot pickle '_thread.lock' object")."""
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, [0, 1, 2])
    ort = ["--backend", "onnxruntime", "--threads", "1"]
    done = _cli(*_cli_args(store, "procs"), *ort, "--scheduler", "processes", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "refocused 3 frames (3 chunks)" in done.stdout and "[dask processes" in done.stdout
    np.testing.assert_allclose(_read(store, "procs/0"), _reference(frames), rtol=1e-5, atol=1e-3)


def test_the_command_line_runs_on_a_dask_cluster(tmp_path: Path, client: Any) -> None:
    """``python -m live.refocus --scheduler tcp://...``: the model is loaded on each worker and
    the chunks run there, sent as on the process pool (they failed to pickle alike)."""
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, [0, 1, 2])
    ort = ["--backend", "onnxruntime", "--threads", "1"]
    done = _cli(*_cli_args(store, "dist"), *ort, "--scheduler", client.scheduler.address)
    assert done.returncode == 0, done.stderr
    assert "refocused 3 frames (3 chunks)" in done.stdout and "dask.distributed" in done.stdout
    np.testing.assert_allclose(_read(store, "dist/0"), _reference(frames), rtol=1e-5, atol=1e-3)


def test_fill_gaps_on_the_cluster_computes_only_the_missing_stacks(
    tmp_path: Path, client: Any
) -> None:
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, list(range(6)), stack_seqs=[0, 2], fill=7.0)  # live skipped 1, 3-5
    summary = refocus_recording(store, fill_gaps=True, scheduler=client, **ORT)
    assert (summary.frames_wanted, summary.frames_done) == (4, 4)
    assert summary.image == "1/0"  # the run's own stacks image (live.store layout)
    stacks = run_array(store, "stacks")[...]
    assert stacks.shape == (6, 3, SIDE, SIDE)  # grown from the live run's 3 time points
    assert (stacks[[0, 2]] == 7.0).all()  # the live stacks are untouched
    np.testing.assert_allclose(stacks[[1, 3, 4, 5]], _reference(frames[[1, 3, 4, 5]]), atol=1e-3)
    deepz = zarr.open_group(str(store), mode="r").attrs["deepz"]
    assert deepz["stacks_present"] == [[0, 6]] and deepz["summary"]["stacks_gaps"] == []
    assert deepz["filled_offline"][0]["seqs"] == [[1, 2], [3, 6]]
    again = refocus_recording(store, fill_gaps=True, scheduler=client, **ORT)
    assert (again.frames_wanted, again.frames_done) == (0, 0)
    with pytest.raises(RefocusError, match="needs the live run's planes"):
        refocus_recording(store, fill_gaps=True, planes=[-3.0, 0.0, 3.0], **ORT)


def test_fill_gaps_into_float16_shards_rounds_like_the_recorder_and_resumes(
    tmp_path: Path,
) -> None:
    # Live stacks stored as float16 in shards of 4 (2 s at 2 Hz): the filled rows are rounded
    # to float16, merged into the shards beside the live rows, and a rerun that finds their
    # manifest marks verifies them (the CRC is of the values as stored) instead of redoing them.
    store = tmp_path / "run.ome.zarr"
    frames = _record(
        store, list(range(6)), stack_seqs=[0, 2], fill=7.0, stack_dtype="float16", shard_s=2.0
    )
    before = dict(zarr.open_group(str(store), mode="r").attrs["deepz"])
    summary = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    assert (summary.frames_wanted, summary.frames_done) == (4, 4)
    stacks = run_array(store, "stacks")
    assert stacks.dtype == np.float16 and stacks.shards == (4, 3, SIDE, SIDE)
    assert (stacks[[0, 2]] == 7.0).all()  # the live rows of the same shard are untouched
    expected = _reference(frames[[1, 3, 4, 5]])
    np.testing.assert_allclose(stacks[[1, 3, 4, 5]], expected, rtol=2.0**-11, atol=1e-6)
    assert not np.array_equal(stacks[[1, 3, 4, 5]], expected)  # really rounded

    zarr.open_group(str(store), mode="r+").attrs["deepz"] = before  # as if cut off before
    again = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    assert (again.frames_wanted, again.frames_done, again.frames_skipped) == (4, 0, 4)


def test_an_interrupted_fill_resumes_only_with_the_model_that_began_it(tmp_path: Path) -> None:
    """A fill cut off before it recorded its seqs left rows and manifest marks made by one
    model: a rerun with another model is refused (it used to keep the first model's rows and
    record its own name), --overwrite computes them again with it, and each fill lists the
    model that made its rows."""
    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, list(range(4)), stack_seqs=[0, 2])
    before = dict(zarr.open_group(str(store), mode="r").attrs["deepz"])
    first = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    assert first.frames_done == 2
    [entry] = zarr.open_group(str(store), mode="r").attrs["deepz"]["filled_offline"]
    assert entry["seqs"] == [[1, 2], [3, 4]] and entry["model"] == first.model
    zarr.open_group(str(store), mode="r+").attrs["deepz"] = before  # as if cut off before
    with pytest.raises(RefocusError, match=r"seqs 1, 3 with another model .*model_sha256"):
        refocus_recording(store, fill_gaps=True, model=volume, scheduler="sync", **ORT)
    second = refocus_recording(
        store, fill_gaps=True, model=volume, overwrite=True, scheduler="sync", **ORT
    )
    assert (second.frames_done, second.frames_skipped) == (2, 0)
    served = load_backend(volume, prefer=["onnxruntime"], intra_op_threads=1)
    dpms = np.array(np.broadcast_to(np.float32(PLANES)[:, None, None], (3, SIDE, SIDE)))
    expected = np.stack([served.infer(f, dpms) for f in frames[[1, 3]]])
    np.testing.assert_allclose(run_array(store, "stacks")[[1, 3]], expected, rtol=1e-5, atol=1e-3)
    [entry] = zarr.open_group(str(store), mode="r").attrs["deepz"]["filled_offline"]
    assert entry["model"]["sha256"] == second.model["sha256"] != first.model["sha256"]


def test_fill_gaps_never_swaps_the_runs_model_silently(tmp_path: Path) -> None:
    """--fill-gaps writes beside the live stacks: a run whose model file is gone (the shipped
    model filled it, under a warning) or changed since (only said) is refused with one line
    naming --model, and nothing is written; --model fills with the model chosen."""
    gone = tmp_path / "run-gone.ome.zarr"
    _record(gone, [0, 1], stack_seqs=[0], config={"engine": {"model_path": str(tmp_path / "x")}})
    with pytest.raises(RefocusError, match=r"the recording's model is not here.*pass --model"):
        refocus_recording(gone, fill_gaps=True, scheduler="sync", **ORT)
    changed = tmp_path / "run-changed.ome.zarr"
    files = {"model": {"path": str(DEFAULT_MODEL), "sha256": "0" * 64}}
    engine = {"engine": {"model_path": str(DEFAULT_MODEL)}}
    _record(changed, [0, 1], stack_seqs=[0], config=engine, engine_files=files)
    with pytest.raises(RefocusError, match=r"changed since the run .*pass --model"):
        refocus_recording(changed, fill_gaps=True, scheduler="sync", **ORT)
    for store in (gone, changed):
        deepz = zarr.open_group(str(store), mode="r").attrs["deepz"]
        assert deepz["stacks_present"] == [[0, 1]] and "filled_offline" not in deepz
    chosen = refocus_recording(
        changed, fill_gaps=True, model=DEFAULT_MODEL, scheduler="sync", **ORT
    )
    assert chosen.frames_done == 1


def test_fill_gaps_through_a_scope_config_never_swaps_the_runs_model_silently(
    tmp_path: Path,
) -> None:
    """A scope config names its model by path: --fill-gaps --scope compares it with the model
    the live stacks came from by its hash, wherever either lies (review 74: the volume model
    filled a slim model's run without a word); --model chooses one deliberately."""
    from engine.metadata import file_sha256

    store = tmp_path / "run.ome.zarr"
    files = {"model": {"path": str(DEFAULT_MODEL), "sha256": file_sha256(DEFAULT_MODEL)}}
    config = {"engine": {"model_path": str(DEFAULT_MODEL)}, "planes": {"z_um": PLANES}}
    _record(store, [0, 1], stack_seqs=[0], config=config, engine_files=files)
    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"
    scope = tmp_path / "scope.toml"
    scope.write_text(f'[engine]\nmodel_path = "{volume}"\n[planes]\nz_um = {PLANES}\n')
    kw: dict[str, Any] = {"fill_gaps": True, "scope": scope, "scheduler": "sync", **ORT}
    with pytest.raises(RefocusError, match=r"not the one the live stacks came from.*--model"):
        refocus_recording(store, **kw)
    assert "filled_offline" not in zarr.open_group(str(store), mode="r").attrs["deepz"]
    assert refocus_recording(store, model=DEFAULT_MODEL, **kw).frames_done == 1


def test_fill_gaps_refuses_planes_or_a_focus_lock_other_than_the_live_runs(
    tmp_path: Path,
) -> None:
    """Every DPM value is compared with the run's (a surface run filled onto a flat plane of
    the same shape was accepted), and the focus lock (a locked run filled onto fixed planes
    was accepted); the run's own plan still fills."""
    from live.config import PlanesConfig

    frames = _frames(3)
    tilted = {"surfaces": [{"name": "tilt", "kind": "tilted", "slope_x": 0.1}]}
    locked = {"z_um": PLANES, "focus_lock_um": 0.0}
    for name, planes, wrong, refused in (
        ("surface", tilted, [0.0], r"onto tilt, but this plan is z=\+0um"),
        ("locked", locked, PLANES, "had planes locked to the stage focus .* fixed planes"),
    ):
        plan = PlanesConfig.model_validate(planes).build((SIDE, SIDE), 0.3)
        store = tmp_path / f"{name}.ome.zarr"
        kind: dict[str, Any] = (
            {"planes_um": PLANES}
            if plan.z_um is not None
            else {"surfaces": list(plan.labels), "dpms_um": plan.dpms_um}
        )
        rec = Recorder(
            store,
            frame_shape=(SIDE, SIDE),
            pixel_size_um=0.3,
            rate_hz=2.0,
            config={"planes": planes},
            **kind,
        )
        for seq in range(3):
            parts = encode_frame(frames[seq], seq=seq, timestamp_s=time.time(), focus_um=0.5)
            rec.put_frame(decode(parts))
        stack = np.full((len(plan), SIDE, SIDE), 7.0, np.float32)
        rec.put_stack(
            decode(encode_stack(stack, seq=0, timestamp_s=0.0, focus_um=0.5, latency_ms=0.0))
        )
        rec.close()
        with pytest.raises(RefocusError, match=f"{refused}.*needs the live run's planes"):
            refocus_recording(store, fill_gaps=True, planes=wrong, scheduler="sync", **ORT)
        # review 84: --extrapolate widened the lock's range, so filled stacks sat elsewhere
        with pytest.raises(RefocusError, match=r"did not extrapolate .* drop --extrapolate"):
            refocus_recording(
                store, fill_gaps=True, allow_extrapolation=True, scheduler="sync", **ORT
            )
        own = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
        assert (own.frames_done, own.planes) == (2, plan.labels)


def test_a_broken_stored_planes_config_is_said_once_in_a_fill(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose stored ``[planes]`` config does not validate: --fill-gaps falls back to the
    planes the run recorded and says so once (the plan and the fill check each validated it,
    saying it twice)."""
    store = tmp_path / "run.ome.zarr"
    broken = {"planes": {"z_um": "not planes"}}
    frames = _record(store, list(range(3)), stack_seqs=[0], config=broken)
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        summary = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "stored planes cannot be rebuilt" in m]) == 1, said
    assert summary.frames_done == 2 and summary.planes == ("z=-2um", "z=+0um", "z=+2um")
    stacks = run_array(store, "stacks")[[1, 2]]
    np.testing.assert_allclose(stacks, _reference(frames[[1, 2]]), rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------ inputs and errors


def test_fill_gaps_on_a_run_that_kept_no_stacks_adds_them_to_its_collection(
    tmp_path: Path,
) -> None:
    """A run that kept raw frames only: --fill-gaps makes its stacks image as the recorder
    would have, in the next numbered group, listed where readers look (before, an unlisted
    group ``stacks`` that `live.store.array_path` and every OME-Zarr reader missed)."""
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, list(range(3)), keep_stacks=False)
    summary = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    assert summary.frames_done == 3 and summary.image == "1/0" and summary.name == "stacks"
    _assert_collection(store, {"raw": "0", "stacks": "1"})
    np.testing.assert_allclose(run_array(store, "stacks")[...], _reference(frames), rtol=1e-5)


def test_a_surface_run_refocuses_offline_onto_the_surfaces_it_recorded(tmp_path: Path) -> None:
    """A run onto a surface from a file: offline refocusing takes the DPMs the run stored
    beside its stacks, not the file as it is now (rewritten since, it gave other stacks and
    still said "the recording's config")."""
    import tifffile

    surface = tmp_path / "surface.tif"
    tifffile.imwrite(surface, np.full((SIDE, SIDE), 2.0, np.float32))
    planes = {"surfaces": [{"name": "s", "kind": "file", "path": str(surface)}]}
    store = tmp_path / "run.ome.zarr"
    frames = _frames(2)
    rec = Recorder(
        store,
        frame_shape=(SIDE, SIDE),
        pixel_size_um=0.3,
        rate_hz=2.0,
        surfaces=["s"],
        dpms_um=np.full((1, SIDE, SIDE), 2.0, np.float32),
        config={"planes": planes},
    )
    for seq in range(2):
        rec.put_frame(decode(encode_frame(frames[seq], seq=seq, timestamp_s=time.time())))
    rec.close()
    tifffile.imwrite(surface, np.full((SIDE, SIDE), -5.0, np.float32))  # the file changed since
    summary = refocus_recording(store, scheduler="sync", **ORT)
    assert summary.frames_done == 2
    backend = load_backend(DEFAULT_MODEL, prefer=["onnxruntime"], intra_op_threads=1)
    live_dpm = np.full((1, SIDE, SIDE), 2.0, np.float32)
    expected = np.stack([backend.infer(f, live_dpm) for f in frames])
    np.testing.assert_allclose(_read(store, "stacks_offline/0"), expected, rtol=1e-5, atol=1e-4)


def test_a_focus_locked_frame_without_a_focus_costs_that_frame_offline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame the scope sent without a stage focus: live, the focus lock rejected it; offline,
    its planes are left NaN with a warning and every other frame is refocused (before, one
    such frame refused the whole job)."""
    store = tmp_path / "run.ome.zarr"
    frames = _frames(3)
    rec = Recorder(
        store,
        frame_shape=(SIDE, SIDE),
        pixel_size_um=0.3,
        rate_hz=2.0,
        planes_um=PLANES,
        config={"planes": {"z_um": PLANES, "focus_lock_um": 0.0}},
    )
    for seq, focus in enumerate((0.0, None, 1.0)):
        parts = encode_frame(frames[seq], seq=seq, timestamp_s=time.time(), focus_um=focus)
        rec.put_frame(decode(parts))
    rec.close()
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        summary = refocus_recording(store, scheduler="sync", **ORT)
    assert summary.frames_done == 2  # the frame with no focus is not done
    assert any("1 frames (1) have no recorded focus" in r.getMessage() for r in caplog.records)
    stacks = _read(store, "stacks_offline/0")
    assert np.isnan(stacks[1]).all() and np.isfinite(stacks[[0, 2]]).all()
    np.testing.assert_allclose(stacks[0], _reference(frames[:1])[0], rtol=1e-5, atol=1e-4)


def test_tiff_and_ngff_inputs_and_non_uniform_planes(tmp_path: Path) -> None:
    import tifffile

    frames = _frames(3, seed=1)
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    ngff = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=3)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]
    axes += [{"name": a, "type": "space"} for a in "zyx"]
    ngff.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": axes, "datasets": [{"path": "0"}]}],
    }
    ngff.create_array("0", data=frames[:, None, None], chunks=(1, 1, 1, SIDE, SIDE))
    planes = [-3.0, 0.0, 1.0]  # not evenly spaced: the plane list lives in the attributes
    for src, out in (("movie.tif", "t.ome.zarr"), ("img.ome.zarr", "n.ome.zarr")):
        s = refocus_recording(
            tmp_path / src, planes=planes, out=tmp_path / out, scheduler="sync", **ORT
        )
        assert s.frames_done == 3
    t, n = _read(tmp_path / "t.ome.zarr", "stacks/0"), _read(tmp_path / "n.ome.zarr", "stacks/0")
    np.testing.assert_array_equal(t, n)
    out = tmp_path / "t.ome.zarr"
    attrs = zarr.open_group(str(out), mode="r")[_group(out, "stacks")].attrs
    assert attrs["deepz"]["planes_um"] == planes and attrs["deepz"]["uniform_planes"] is False
    multiscale = attrs["ome"]["multiscales"][0]
    transforms = multiscale["datasets"][0]["coordinateTransformations"]
    assert transforms == [{"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}]
    # uneven planes are indices along a custom axis, as the live recorder writes them: no z
    # positions a reader would place 0, 1, 2 µm apart
    assert multiscale["axes"][1] == {"name": "plane", "type": "plane"}
    _assert_collection(out, {"stacks": "0"})


def test_a_frame_with_nan_pixels_costs_that_frame_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A float recording with a NaN pixel: that frame's planes are NaN (no value, and the
    chunk is never counted as done), a warning names it, every other frame is refocused."""
    import tifffile

    frames = _frames(3).astype(np.float32)
    frames[1, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    out = tmp_path / "out.ome.zarr"
    with caplog.at_level("WARNING", logger="live.refocus"):
        summary = refocus_recording(
            tmp_path / "movie.tif", planes=PLANES, out=out, scheduler="sync", **ORT
        )
    assert summary.frames_done == 2  # the NaN frame is not done, nor the image complete
    group = zarr.open_group(str(out), mode="r")[_group(out, "stacks")]
    assert group.attrs["deepz"]["present"] == [[0, 1], [2, 3]]
    assert group.attrs["deepz"]["complete"] is False
    assert any("frame 1 holds NaN or infinite pixels" in r.getMessage() for r in caplog.records)
    stacks = _read(out, "stacks/0")
    assert np.isnan(stacks[1]).all()
    good = _reference(frames[[0, 2]])
    np.testing.assert_allclose(stacks[[0, 2]], good.reshape(stacks[[0, 2]].shape), atol=1e-2)


def test_bad_inputs_each_give_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tifffile

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    volume = zarr.open_group(str(tmp_path / "vol.ome.zarr"), mode="w", zarr_format=3)
    volume.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": [{"name": a} for a in "tzyx"], "datasets": [{"path": "0"}]}],
    }
    volume.create_array("0", shape=(2, 3, 8, 8), dtype="uint16")
    zarr.create_array(str(tmp_path / "line.zarr"), shape=(10,), dtype="uint16")
    odd_ngff = {  # the store's metadata is input too: any key missing or of another kind
        "no-datasets": [{"axes": [{"name": "t"}]}],
        "empty-datasets": [{"datasets": []}],
        "nameless-axis": [{"axes": [{"unit": "second"}], "datasets": [{"path": "0"}]}],
        "a-dict": {"datasets": [{"path": "0"}]},
    }
    odd_run = tmp_path / "odd-run.ome.zarr"  # a run of this project, its attributes broken
    _record(odd_run, [0, 1])
    group = zarr.open_group(str(odd_run), mode="r+")
    group.attrs["deepz"] = {**dict(group.attrs["deepz"]), "raw_present": [[0]], "rate_hz": "x"}
    for name, multiscales in odd_ngff.items():
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
        group.create_array("0", shape=(2, 8, 8), dtype="uint16")
    tifffile.imwrite(tmp_path / "movie.tif", _frames(2), photometric="minisblack")
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1])
    locked = tmp_path / "locked.toml"  # the shipped config with its planes locked to the focus
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "config.toml").read_text(encoding="utf-8")
    text = text.replace('"engine/weights/', f'"{repo}/engine/weights/')  # read from tmp_path
    locked.write_text(text.replace("# focus_lock_um = 1250.0", "focus_lock_um = 0.0"), "utf-8")
    cases = [
        (tmp_path / "nope.ome.zarr", {}, "no such recording"),
        (tmp_path / "empty.zarr", {}, "no raw image"),
        (tmp_path / "vol.ome.zarr", {}, "every axis other than t, y and x must have size 1"),
        (tmp_path / "line.zarr", {}, "refocusing needs frames (t, y, x)"),
        *(
            (tmp_path / f"{name}.zarr", {}, "malformed NGFF 'multiscales' metadata")
            for name in odd_ngff
        ),
        (odd_run, {}, "malformed run metadata"),
        (store, {"model": tmp_path / "missing.onnx"}, "model file not found"),
        (store, {"backend": "nonsense"}, "prefer must list backends"),
        (store, {"planes": [50.0]}, "outside the model's trained range"),
        (tmp_path / "movie.tif", {"fill_gaps": True}, "--fill-gaps needs a run of this project"),
        (tmp_path / "movie.tif", {"planes": None, "scope": locked}, "holds no focus per frame"),
    ]
    for source, kwargs, message in cases:
        with pytest.raises(RefocusError, match=message.replace("(", r"\(").replace(")", r"\)")):
            refocus_recording(source, scheduler="sync", **{"planes": PLANES, **kwargs})
    refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    with pytest.raises(RefocusError, match=r"exists from another refocusing .*plan_sha256"):
        refocus_recording(store, planes=[-1.0, 1.0], scheduler="sync", **ORT)
    assert main([str(tmp_path / "nope.ome.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no such recording" in err[0]


def test_stores_of_the_earlier_layout_and_of_the_collection_layout_both_open(
    tmp_path: Path,
) -> None:
    """A layout-1 run store (raw/0, stacks/0 at the root) still opens; the names of either
    layout's own data are refused as an offline image name."""
    frames = _frames(4)
    legacy = zarr.open_group(str(tmp_path / "old.ome.zarr"), mode="w", zarr_format=3)
    legacy.create_group("raw").create_array("0", data=frames, chunks=(1, SIDE, SIDE))
    legacy.attrs["deepz"] = {"raw_present": [[0, 2], [3, 4]], "rate_hz": 4.0, "pixel_size_um": 0.3}
    old = open_input(tmp_path / "old.ome.zarr")
    assert (old.spec.array_path, old.present, old.rate_hz) == ("raw/0", (0, 1, 3), 4.0)

    store = tmp_path / "new.ome.zarr"
    _record(store, [0, 1, 3])
    new = open_input(store)
    assert (new.spec.array_path, new.present, new.pixel_size_um) == ("0/0", (0, 1, 3), 0.3)
    for name in ("raw", "stacks", "frames", "OME"):
        with pytest.raises(RefocusError, match="would overwrite the run's own data"):
            refocus_recording(store, planes=PLANES, name=name, scheduler="sync", **ORT)
    for name in ("0", "1"):  # the run's own groups: a number is no image name at all
        with pytest.raises(RefocusError, match=f"--name '{name}' is not an image name"):
            refocus_recording(store, planes=PLANES, name=name, scheduler="sync", **ORT)

    stacks_only = tmp_path / "stacks_only.ome.zarr"
    rec = Recorder(
        stacks_only,
        frame_shape=(SIDE, SIDE),
        pixel_size_um=0.3,
        rate_hz=2.0,
        planes_um=PLANES,
        keep_raw=False,
    )
    rec.admit_frame(decode(encode_frame(frames[0], seq=0, timestamp_s=0.0)))
    rec.close()
    with pytest.raises(RefocusError, match="kept no raw frames"):
        open_input(stacks_only)


def test_out_into_another_run_never_takes_its_own_images(tmp_path: Path) -> None:
    """``--out OTHER_RUN`` keeps that run's own images as the source run's are kept (with
    --overwrite it used to replace the other run's live stacks)."""
    source, other = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    _record(source, [0, 1])
    _record(other, [0, 1], stack_seqs=[0, 1])
    for name in ("stacks", "raw", "frames"):
        with pytest.raises(RefocusError, match=r"would overwrite the run's own data in .*b\.ome"):
            refocus_recording(source, planes=PLANES, out=other, name=name, overwrite=True, **ORT)
    for name in ("0", "1"):  # its own groups: a number is no image name at all
        with pytest.raises(RefocusError, match=f"--name '{name}' is not an image name"):
            refocus_recording(source, planes=PLANES, out=other, name=name, overwrite=True, **ORT)
    assert (run_array(other, "stacks")[...] == 7.0).all()
    _assert_collection(other, {"raw": "0", "stacks": "1"})


def test_no_image_list_or_group_name_turns_overwrite_onto_data_that_is_not_ours(
    tmp_path: Path,
) -> None:
    """--overwrite replaces only an image this project's refocusing made (review 74): a run's
    image list forged to put the offline image on the raw frames' group, and a foreign store
    whose group is called ``stacks`` (the --out image's default name), are both refused, the
    data left as it was."""
    source = tmp_path / "a.ome.zarr"
    frames = _record(source, [0, 1])
    root = zarr.open_group(str(source), mode="r+")
    deepz = dict(root.attrs["deepz"])
    root.attrs["deepz"] = {**deepz, "images": {**deepz["images"], "stacks_offline": "0"}}
    for overwrite in (False, True):
        with pytest.raises(RefocusError, match="which holds the run's own data"):
            refocus_recording(source, planes=PLANES, overwrite=overwrite, **ORT)
    assert (run_array(source, "raw")[...] == frames[:2]).all()

    foreign = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w", zarr_format=3)
    foreign.create_group("stacks").create_array("data", shape=(4,), dtype="int32")[:] = 5
    root.attrs["deepz"] = deepz  # the source as it was recorded
    for overwrite in (False, True):
        with pytest.raises(RefocusError, match="is not an image of this project's refocusing"):
            refocus_recording(
                source, planes=PLANES, out=tmp_path / "theirs.zarr", overwrite=overwrite, **ORT
            )
    assert list(foreign["stacks"].keys()) == ["data"]
    assert (foreign["stacks"]["data"][...] == 5).all()


def test_a_chunk_written_while_frames_were_absent_is_redone_once_they_are_present(
    tmp_path: Path,
) -> None:
    """A chunk's completion mark covers the seqs it refocused (review 74): written while
    seqs 2-3 were left out of raw_present (as a damaged-shard message advises), it read back
    with its mark and a rerun with them restored skipped them, leaving zero stacks."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1, 2, 3])
    root = zarr.open_group(str(store), mode="r+")
    deepz = dict(root.attrs["deepz"])
    root.attrs["deepz"] = {**deepz, "raw_present": [[0, 2]]}
    first = refocus_recording(store, planes=PLANES, **ORT)
    assert first.frames_done == 2
    root.attrs["deepz"] = {**deepz, "raw_present": [[0, 4]]}
    second = refocus_recording(store, planes=PLANES, **ORT)
    assert second.frames_done == 4 and second.frames_skipped == 0
    stacks = _read(store, "stacks_offline/0")
    assert all(np.abs(stacks[t]).max() > 0 for t in range(4))


def test_a_refused_scheduler_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    """The scheduler is checked before the output is made: --workers 0 or an unknown scheduler
    used to leave an empty image registered in the run's collection."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1])
    for kwargs, message in (
        ({"workers": 0}, "--workers must be >= 1"),
        ({"scheduler": "nonsense"}, "scheduler must be one of|needs dask.distributed"),
    ):
        with pytest.raises(RefocusError, match=message):
            refocus_recording(store, planes=PLANES, **kwargs, **ORT)
    _assert_collection(store, {"raw": "0", "stacks": "1"})


def test_cli_overwrites_and_fills_nothing_on_a_complete_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1, 2], stack_seqs=[0, 1, 2])
    args = [str(store), "--planes", "-1", "1", "--backend", "onnxruntime", "--threads", "1"]
    assert main([*args, "--no-progress", "--chunk", "2"]) == 0
    assert "refocused 3 frames (2 chunks)" in capsys.readouterr().out
    assert main([*args, "--no-progress", "--planes", "0", "--overwrite"]) == 0
    assert _read(store, "stacks_offline/0").shape == (3, 1, SIDE, SIDE)
    assert main([str(store), "--fill-gaps", "--no-progress", "--backend", "onnxruntime"]) == 0
    assert "refocused 0 frames" in capsys.readouterr().out


def test_benchmark_runs_and_writes_its_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from benchmarks import refocus as bench

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    argv = ["--frames", "3", "--side", "64", "--planes", "3", "--backend", "onnxruntime"]
    assert bench.main([*argv, "--threads", "1", "--skip-cluster"]) == 0
    record = json.loads((tmp_path / "refocus.json").read_text())
    assert record["cpu"] and len(record["rows"]) == 3
    assert all(r["frames_per_s"] > 0 for r in record["rows"])
    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"  # the daemon's model, into another file
    out = tmp_path / "volume.json"
    argv += ["--threads", "1", "--skip-cluster", "--model", str(volume), "--results", str(out)]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["model"] == str(volume) and len(record["rows"]) == 3


def test_output_through_an_fsspec_url_resumes_like_a_directory(tmp_path: Path) -> None:
    """memory:// goes through zarr's fsspec store, as s3:// or gs:// would (one process)."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1, 2])
    url = f"memory://refocus-test-{tmp_path.name}/out.ome.zarr"
    first = refocus_recording(store, planes=PLANES, out=url, scheduler="sync", **ORT)
    again = refocus_recording(store, planes=PLANES, out=url, scheduler="sync", **ORT)
    assert (first.frames_done, again.frames_skipped, again.store) == (3, 3, url)
    refocus_recording(store, planes=PLANES, out=tmp_path / "o.zarr", scheduler="sync", **ORT)
    np.testing.assert_array_equal(_read(url, "stacks/0"), _read(tmp_path / "o.zarr", "stacks/0"))
    # the bioformats2raw layout's XML lists the image behind the URL as it does on disk
    import fsspec

    with fsspec.open(f"{url}/OME/METADATA.ome.xml", "rb") as f:
        remote = f.read()
    assert remote == (tmp_path / "o.zarr" / "OME" / "METADATA.ome.xml").read_bytes()
    assert b'ID="Image:0"' in remote


def test_a_scope_config_asking_for_confocal_planes_gets_them_offline(tmp_path: Path) -> None:
    """`[engine] render_modality = "confocal"` reaches offline refocusing as it reaches the
    daemon: the volume model's density, rendered through the confocal PSF bank."""
    import tifffile

    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"
    frames = _frames(2, seed=3)
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    scope = tmp_path / "scope.toml"
    text = f'[engine]\nrender_modality = "confocal"\n[planes]\nz_um = {PLANES}\n'
    scope.write_text(text, encoding="utf-8")
    kw: dict[str, Any] = {"model": volume, "scope": scope, "scheduler": "sync", **ORT}
    s = refocus_recording(tmp_path / "movie.tif", out=tmp_path / "c.ome.zarr", **kw)
    assert s.frames_done == 2 and s.model["render_modality"] == "confocal"
    confocal = load_backend(volume, prefer=["onnxruntime"], render_modality="confocal")
    dpms = np.array(np.broadcast_to(np.float32(PLANES)[:, None, None], (3, SIDE, SIDE)))
    expected = np.stack([confocal.infer(f, dpms) for f in frames])
    np.testing.assert_allclose(_read(tmp_path / "c.ome.zarr", "stacks/0"), expected, rtol=1e-5)
    # an image written before the job recorded its modality still resumes (its model says it)
    out = tmp_path / "c.ome.zarr"
    group = zarr.open_group(str(out), mode="r+")[_group(out, "stacks")]
    deepz = dict(group.attrs["deepz"])
    deepz["job"] = {k: v for k, v in deepz["job"].items() if k != "render_modality"}
    group.attrs["deepz"] = deepz
    again = refocus_recording(tmp_path / "movie.tif", out=tmp_path / "c.ome.zarr", **kw)
    assert again.frames_skipped == 2


def test_a_runs_psf_bank_changed_since_the_run_is_refused_unless_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon records its model's and bank's hashes beside the config (paths only); a
    refocus that takes the run's own bank refuses one changed since, with one line naming
    --psf-bank, which takes it as it is now. Records that are not what the daemon writes
    (older runs, hostile attrs) are ignored, never fatal."""
    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"
    bank = tmp_path / "scope.npy"
    own = np.load(volume.parent / "deepz-volume.psf.npy")
    np.save(bank, ((own + np.roll(own, 1, axis=2) + np.roll(own, -1, axis=2)) / 3))
    files = {"psf_bank": {"path": str(bank), "sha256": file_sha256(bank)}}
    store = tmp_path / "run.ome.zarr"
    config = {"engine": {"model_path": str(volume), "psf_bank": str(bank)}}
    _record(store, [0, 1], config=config, engine_files=files)
    kw: dict[str, Any] = {"planes": PLANES, "scheduler": "sync", **ORT}
    first = refocus_recording(store, out=tmp_path / "a.ome.zarr", **kw)
    assert first.frames_done == 2 and first.model["psf_bank_sha256"] == files["psf_bank"]["sha256"]
    np.save(bank, own)  # the file replaced after the run: another PSF at the same path
    with pytest.raises(RefocusError, match=r"scope.npy: this PSF bank changed since the run"):
        refocus_recording(store, out=tmp_path / "b.ome.zarr", **kw)
    named = refocus_recording(store, out=tmp_path / "b.ome.zarr", psf_bank=bank, **kw)
    assert named.model["psf_bank_sha256"] == file_sha256(bank)
    root = zarr.open_group(str(store), mode="r+")
    other = "0" * 64
    for i, hostile in enumerate(
        [
            "text",
            ["psf_bank"],
            {"psf_bank": "text"},
            {"psf_bank": {"path": 3, "sha256": []}},
            {"psf_bank": {"path": str(bank), "sha256": "not a hash"}},
            {"psf_bank": {"path": str(tmp_path / "elsewhere.npy"), "sha256": other}},
        ]
    ):
        root.attrs["deepz"] = {**dict(root.attrs["deepz"]), "engine_files": hostile}
        again = refocus_recording(store, out=tmp_path / f"h{i}.ome.zarr", **kw)
        assert again.frames_done == 2
    # a model changed at the recorded path is a deliberate choice: said, not refused
    root.attrs["deepz"] = {
        **dict(root.attrs["deepz"]),
        "engine_files": {"model": {"path": str(volume), "sha256": other}},
    }
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        assert refocus_recording(store, out=tmp_path / "m.ome.zarr", **kw).frames_done == 2
    assert "changed since the run was recorded with it" in caplog.text


def test_a_measured_psf_bank_reaches_offline_refocusing_and_its_identity(tmp_path: Path) -> None:
    """`--psf-bank` (or `[engine] psf_bank`) renders the recording through a measured PSF, as
    the daemon does; the bank's hash joins the output's identity, so a resume with another
    bank is refused rather than mixing planes of two PSFs."""
    import tifffile

    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"
    own = np.load(volume.parent / "deepz-volume.psf.npy")
    blurred = (own + np.roll(own, 1, axis=2) + np.roll(own, -1, axis=2)) / 3  # a wider "scope"
    np.save(tmp_path / "scope.npy", blurred.astype(np.float32))
    frames = _frames(2, seed=4)
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    out = tmp_path / "m.ome.zarr"
    kw: dict[str, Any] = {"model": volume, "planes": PLANES, "scheduler": "sync", **ORT}
    s = refocus_recording(tmp_path / "movie.tif", out=out, psf_bank=tmp_path / "scope.npy", **kw)
    assert s.frames_done == 2 and s.model["psf_bank_sha256"]
    served = load_backend(volume, prefer=["onnxruntime"], psf_bank=tmp_path / "scope.npy")
    dpms = np.array(np.broadcast_to(np.float32(PLANES)[:, None, None], (3, SIDE, SIDE)))
    expected = np.stack([served.infer(f, dpms) for f in frames])
    np.testing.assert_allclose(_read(out, "stacks/0"), expected, rtol=1e-5)
    with pytest.raises(RefocusError, match="differs in psf_bank_sha256"):  # its own bank
        refocus_recording(tmp_path / "movie.tif", out=out, **kw)
    with pytest.raises(RefocusError, match="PSF bank file not found"):
        refocus_recording(tmp_path / "movie.tif", out=tmp_path / "n.zarr", psf_bank="no.npy", **kw)


def test_the_point_fit_reaches_offline_refocusing_and_its_identity(tmp_path: Path) -> None:
    """`--point-fit` serves the recording as `load_backend(point_fit=...)` does, and the fit
    joins the output's identity: a resume without it is refused, not mixed."""
    import tifffile

    from engine.point_fit import PointFit

    volume = DEFAULT_MODEL.parent / "deepz-volume.onnx"
    frames = _frames(2, seed=5)
    tifffile.imwrite(tmp_path / "movie.tif", frames, photometric="minisblack")
    out = tmp_path / "p.ome.zarr"
    kw: dict[str, Any] = {"model": volume, "planes": PLANES, "scheduler": "sync", **ORT}
    s = refocus_recording(tmp_path / "movie.tif", out=out, point_fit=True, **kw)
    # the linear fit's identity is as before `lateral` existed: older outputs still resume
    assert s.frames_done == 2 and s.model["point_fit"] == (
        "PointFit(max_sd_px=1.3, max_sd_slices=2.0, min_core=0.5, min_peak_sigma=6.0, "
        "depth_search_slices=2.0, passes=2)"
    )
    served = load_backend(volume, prefer=["onnxruntime"], point_fit=PointFit())
    dpms = np.array(np.broadcast_to(np.float32(PLANES)[:, None, None], (3, SIDE, SIDE)))
    expected = np.stack([served.infer(f, dpms) for f in frames])
    np.testing.assert_allclose(_read(out, "stacks/0"), expected, rtol=1e-5, atol=1e-3)
    with pytest.raises(RefocusError, match="differs in point_fit"):
        refocus_recording(tmp_path / "movie.tif", out=out, **kw)
    # the spline convention is another fit: served as load_backend serves it, another identity
    with pytest.raises(RefocusError, match="differs in point_fit"):
        refocus_recording(
            tmp_path / "movie.tif", out=out, point_fit=True, point_fit_lateral="spline", **kw
        )
    with pytest.raises(SystemExit) as exit_info:  # a flag that would be ignored
        main([str(tmp_path / "movie.tif"), "--point-fit-lateral", "spline"])
    assert exit_info.value.code == 2
    spline = tmp_path / "s.ome.zarr"
    refocus_recording(
        tmp_path / "movie.tif", out=spline, point_fit=True, point_fit_lateral="spline", **kw
    )
    served = load_backend(volume, prefer=["onnxruntime"], point_fit=PointFit(lateral="spline"))
    expected = np.stack([served.infer(f, dpms) for f in frames])
    np.testing.assert_allclose(_read(spline, "stacks/0"), expected, rtol=1e-5, atol=1e-3)
