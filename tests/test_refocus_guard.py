"""live.refocus: one job writes a store at a time (its lock file), and a moved store resumes.

Small on purpose, as tests/test_refocus.py (whose recordings these are: the project's
Recorder, 64² frames, the shipped slim model on one ONNX Runtime thread).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from live.recorder import RESERVE_NAME
from live.refocus import (
    MANIFEST,
    RefocusError,
    RefocusTaskError,
    main,
    refocus_recording,
)
from live.refocus.driver import _Runner
from live.store import OME_GROUP, image_groups
from live.store_lock import lock_path
from tests.live_helpers import HOST, dead_pid, leave_lock
from tests.test_refocus import ORT, PLANES, _frames, _group, _read, _record, _reference


def _images(store: Path) -> dict[str, str]:
    """The images a store lists (name: group)."""
    return image_groups(dict(zarr.open_group(str(store), mode="r").attrs["deepz"]))


# ------------------------------------------------------------------ one writer per store


def test_a_second_job_on_a_store_being_written_is_refused_naming_the_holder(
    tmp_path: Path, lock_holder: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process writing the run store: a job into it (its offline image or its gaps)
    is refused in one line naming the store and that process, and touches nothing; a job
    that only reads it, into another store, runs; once the holder ends, the job runs."""
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, [0, 1, 2], stack_seqs=[0])
    before = dict(zarr.open_group(str(store), mode="r").attrs["deepz"])
    proc = lock_holder(store)
    said = re.escape(f"{store} is being written by another refocusing job (pid {proc.pid} on ")
    for kwargs in ({"planes": PLANES}, {"fill_gaps": True}):
        with pytest.raises(RefocusError, match=said + re.escape(HOST)):
            refocus_recording(store, scheduler="sync", **kwargs, **ORT)
    argv = [str(store), "--planes", "0", "--backend", "onnxruntime", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match("error: " + said, err[0]), err
    assert dict(zarr.open_group(str(store), mode="r").attrs["deepz"]) == before
    elsewhere = refocus_recording(
        store, planes=PLANES, out=tmp_path / "o.ome.zarr", scheduler="sync", **ORT
    )
    assert elsewhere.frames_done == 3

    proc.communicate(timeout=60)
    assert not lock_path(store).exists()
    done = refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert done.frames_done == 3
    np.testing.assert_allclose(_read(store, "stacks_offline/0"), _reference(frames), atol=1e-3)


def test_a_lock_left_by_a_killed_job_is_taken_over_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job killed on this machine left its lock file: the next job takes it over with a
    warning naming it; one left by a job on another host, which cannot be checked from here,
    is refused naming the file to delete. A live recorder killed before its close left its
    disk reserve too: the next job into the store removes it, said."""
    store = tmp_path / "run.ome.zarr"
    _record(store, [0, 1])
    dead = dead_pid()
    leave_lock(store, dead)
    reserve = store / OME_GROUP / RESERVE_NAME
    assert reserve.parent.is_dir() and not reserve.exists()  # the recorder's close removed it
    reserve.write_bytes(bytes(2**20))  # as a killed recorder leaves it
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        summary = refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert summary.frames_done == 2
    taken = [r.getMessage() for r in caplog.records if "taking over the lock" in r.getMessage()]
    assert len(taken) == 1 and f"pid {dead} on {HOST}" in taken[0], caplog.text
    assert not lock_path(store).exists()
    assert not reserve.exists() and "removed the 1.0 MB reserve file left by a live" in caplog.text

    leave_lock(store, dead, host="another-host.invalid")
    message = f"{store} is locked by another job that cannot be checked from here (pid {dead}"
    with pytest.raises(RefocusError, match=re.escape(message) + ".*delete .*writer.lock"):
        refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert lock_path(store).exists()  # not ours to remove


def test_the_driver_holds_the_lock_for_the_job_and_removes_it_however_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the chunk tasks run (here on a process pool) the lock file names the driver; it
    is gone after a job that finished, one refused while preparing its output, and one whose
    task failed. A store behind a URL is not locked, said once."""
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(4)))
    seen: list[dict[str, Any]] = []
    run_tasks = _Runner.__call__

    def watched(self: Any, job: Any, blocks: Any, frames: int) -> Any:
        seen.append(json.loads(lock_path(job.store).read_text(encoding="utf-8")))
        return run_tasks(self, job, blocks, frames)

    monkeypatch.setattr(_Runner, "__call__", watched)
    kw: dict[str, Any] = {"planes": PLANES, "chunk": 2, **ORT}
    done = refocus_recording(store, scheduler="processes", workers=2, **kw)
    assert done.frames_done == 4 and "processes" in done.scheduler
    assert [(s["pid"], s["host"]) for s in seen] == [(os.getpid(), HOST)]
    assert not lock_path(store).exists()
    monkeypatch.undo()

    with pytest.raises(RefocusError, match="exists from another refocusing"):
        refocus_recording(store, planes=[0.0], chunk=2, scheduler="sync", **ORT)
    assert not lock_path(store).exists()

    url = f"memory://refocus-guard-{tmp_path.name}/out.ome.zarr"
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        refocus_recording(store, out=url, scheduler="sync", **kw)
    said = [r.getMessage() for r in caplog.records if "cannot be locked" in r.getMessage()]
    assert said == [
        f"{url}: a store behind a URL cannot be locked: another job writing it is not refused"
    ]

    (store / "0" / "0" / "c" / "1" / "0" / "0").write_bytes(b"not a shard at all")
    with pytest.raises(RefocusTaskError, match="cannot read the raw frames of chunk 1"):
        refocus_recording(store, name="again", scheduler="sync", **kw)
    assert not lock_path(store).exists()


def test_a_failed_job_lets_its_store_go_only_once_its_other_chunks_have_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dask.compute raises at the first failed chunk while the others still run: had the lock
    gone then, the next job and this one's late chunk would write one image at once (review
    61: the late chunk landed in an --overwrite job's image, which said it was complete)."""
    import live.refocus.driver as driver

    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(4)))
    refocus = driver.refocus_block
    late_chunk_ended = threading.Event()

    def one_fails_one_is_slow(job: Any, block: Any) -> Any:
        if block.index == 0:
            raise RuntimeError("chunk 0 failed")
        late_chunk_ended.wait(0.8)  # still running when chunk 0 has failed
        try:
            return refocus(job, block)
        finally:
            late_chunk_ended.set()

    monkeypatch.setattr(driver, "refocus_block", one_fails_one_is_slow)
    with pytest.raises(RuntimeError, match="chunk 0 failed"):
        refocus_recording(store, planes=PLANES, chunk=2, scheduler="threads", workers=2, **ORT)
    assert late_chunk_ended.is_set(), "the store was let go while a chunk still ran"
    assert not lock_path(store).exists()


def test_a_chunk_whose_job_has_let_the_store_go_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task its driver could not stop (a cluster forgets a cancelled task while its worker
    runs it on) checks the lock file before it writes: once the store is another job's, the
    chunk is not written (review 61)."""
    import live.refocus.driver as driver

    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(4)))
    refocus = driver.refocus_block

    def store_taken_meanwhile(job: Any, block: Any) -> Any:
        if block.index == 1:  # as if this job had ended and another had taken the store
            holder = json.loads(lock_path(store).read_text(encoding="utf-8"))
            lock_path(store).write_text(json.dumps({**holder, "job": "another"}))
        return refocus(job, block)

    monkeypatch.setattr(driver, "refocus_block", store_taken_meanwhile)
    with pytest.raises(RefocusTaskError, match=r"chunk 1 .*its job has ended .* not written"):
        refocus_recording(store, planes=PLANES, chunk=2, scheduler="sync", **ORT)
    assert not _read(store, "stacks_offline/0")[2:].any()  # chunk 1's frames: not written


def test_a_job_cut_off_while_it_creates_its_image_leaves_a_valid_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is listed only once its group and array are written: a full disk (or a
    kill) in between left a listed image without data, which no reader accepts (review 61)."""
    import live.refocus.outputs as outputs

    yaozarrs = pytest.importorskip("yaozarrs", reason="validates OME-Zarr: the dev extra")
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(3)))
    before = dict(zarr.open_group(store, mode="r").attrs["deepz"]["images"])

    def disk_full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "_create_manifest", disk_full)
    with pytest.raises(RefocusError, match=r"cannot write the output image: OSError") as err:
        refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert dict(zarr.open_group(store, mode="r").attrs["deepz"]["images"]) == before
    yaozarrs.validate_zarr_store(str(store))  # the collection still validates
    done = refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)  # and a rerun works
    assert done.frames_done == 3
    yaozarrs.validate_zarr_store(str(store))


def test_someone_elses_data_at_the_output_name_is_refused_and_left_as_it_is(
    tmp_path: Path,
) -> None:
    """An --out store holding another tool's array under the image's name: refused in one
    line, the array and the store's attributes untouched (--overwrite once replaced it)."""
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(2)))
    analysis = tmp_path / "analysis.zarr"
    root = zarr.open_group(analysis, mode="w", zarr_format=3)
    root.attrs["owner"] = "another tool"
    root.create_array("results", shape=(3,), dtype="i4")[:] = [1, 2, 3]
    for overwrite in (False, True):
        with pytest.raises(RefocusError, match=r"results exists and is not an image of this"):
            refocus_recording(
                store,
                out=str(analysis),
                name="results",
                overwrite=overwrite,
                planes=PLANES,
                scheduler="sync",
                **ORT,
            )
    root = zarr.open_group(analysis, mode="r")
    assert dict(root.attrs) == {"owner": "another tool"}
    assert list(root["results"][:]) == [1, 2, 3]


def test_the_live_recorder_holds_its_runs_store_until_the_run_is_finalised(
    tmp_path: Path,
) -> None:
    """While the recorder writes a run (frames in, not yet closed), an offline job into that
    store, its gaps or an offline image, is refused naming the recorder (it would rewrite the
    image list the recorder rewrites); reading the run into another store is allowed; once
    the recorder has closed, the job runs."""
    from live.protocol import decode, encode_frame
    from live.recorder import Recorder
    from tests.test_refocus import SIDE

    store = tmp_path / "run.ome.zarr"
    _record(tmp_path / "done.ome.zarr", [0])  # a closed recorder leaves no lock behind
    assert not lock_path(tmp_path / "done.ome.zarr").exists()
    frames = _frames(2)
    rec = Recorder(
        store, frame_shape=(SIDE, SIDE), pixel_size_um=0.3, rate_hz=2.0, planes_um=PLANES
    )
    try:
        for seq in range(2):
            rec.put_frame(decode(encode_frame(frames[seq], seq=seq, timestamp_s=0.0)))
        for _ in range(600):  # until the writer thread has put them in the store's attributes
            if zarr.open_group(str(store), mode="r").attrs["deepz"]["raw_present"]:
                break
            threading.Event().wait(0.05)
        said = re.escape(f"{store} is being written by the live recorder (pid {os.getpid()} on ")
        for kwargs in ({"planes": PLANES}, {"fill_gaps": True}):
            with pytest.raises(RefocusError, match=said):
                refocus_recording(store, scheduler="sync", **kwargs, **ORT)
        rec.close(keep_lock=True)  # finalised, the daemon still adding its summary
        with pytest.raises(RefocusError, match=said):
            refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    finally:
        rec.close()
    assert not lock_path(store).exists()
    done = refocus_recording(store, fill_gaps=True, scheduler="sync", **ORT)
    assert done.frames_done == 2


# ------------------------------------------------------------------ a moved store resumes


def test_a_moved_run_store_resumes_its_offline_job_and_its_fill(tmp_path: Path) -> None:
    """A job's identity names an input that is the output store itself as that store, not by
    its path: a run store renamed or copied whole resumes its offline image and an
    interrupted fill (both were refused, "differs in source"). An image written before, whose
    identity holds the store's path, resumes where it is and is then recorded as such."""
    store = tmp_path / "run.ome.zarr"
    frames = _record(store, list(range(4)), stack_seqs=[0])
    first = refocus_recording(store, planes=PLANES, chunk=1, scheduler="sync", **ORT)
    assert first.frames_done == 4
    group = zarr.open_group(str(store), mode="r+")[_group(store, "stacks_offline")]
    deepz = dict(group.attrs["deepz"])
    group.attrs["deepz"] = {**deepz, "job": {**deepz["job"], "source": str(store.resolve())}}
    legacy = refocus_recording(store, planes=PLANES, scheduler="sync", **ORT)
    assert (legacy.frames_done, legacy.frames_skipped) == (0, 4)
    group = zarr.open_group(str(store), mode="r+")[_group(store, "stacks_offline")]
    assert group.attrs["deepz"]["job"]["source"] == "."

    group[MANIFEST][2:] = -1  # as if cut off after two chunks
    moved = tmp_path / "elsewhere" / "renamed.ome.zarr"
    moved.parent.mkdir()
    store.rename(moved)
    again = refocus_recording(moved, planes=PLANES, scheduler="sync", **ORT)
    assert (again.frames_done, again.frames_skipped) == (2, 2)
    np.testing.assert_allclose(_read(moved, "stacks_offline/0"), _reference(frames), atol=1e-3)

    before = dict(zarr.open_group(str(moved), mode="r").attrs["deepz"])
    fill = refocus_recording(moved, fill_gaps=True, scheduler="sync", **ORT)
    assert fill.frames_done == 3
    zarr.open_group(str(moved), mode="r+").attrs["deepz"] = before  # cut off before its seqs
    copy = tmp_path / "copy.ome.zarr"
    shutil.copytree(moved, copy)
    resumed = refocus_recording(copy, fill_gaps=True, scheduler="sync", **ORT)
    assert (resumed.frames_wanted, resumed.frames_done, resumed.frames_skipped) == (3, 0, 3)


def test_a_moved_tiff_input_resumes_and_one_rewritten_in_place_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An external input is known by its path and a fingerprint of its frames: moved, its
    interrupted job resumes (said, and the new path recorded); the same path holding other
    frames of the same shape is refused, where the path alone let it resume. An image begun
    before the fingerprint resumes at the same path and is recorded with it."""
    import tifffile

    frames = _frames(4, seed=3)
    movie = tmp_path / "movie.tif"
    tifffile.imwrite(movie, frames, photometric="minisblack")
    out = tmp_path / "movie.ome.zarr"
    kw: dict[str, Any] = {"planes": PLANES, "chunk": 1, "scheduler": "sync", "out": out, **ORT}
    assert refocus_recording(movie, **kw).frames_done == 4
    group = zarr.open_group(str(out), mode="r+")[_group(out, "stacks")]
    job = dict(group.attrs["deepz"]["job"])
    assert job["source"] == str(movie.resolve()) and len(job["source_frames_sha256"]) == 64

    legacy = {k: v for k, v in job.items() if k != "source_frames_sha256"}
    group.attrs["deepz"] = {**group.attrs["deepz"], "job": legacy}  # begun before the key
    group[MANIFEST][2:] = -1  # as if cut off after two chunks
    resumed = refocus_recording(movie, **kw)
    assert (resumed.frames_done, resumed.frames_skipped) == (2, 2)
    assert zarr.open_group(str(out), mode="r")[_group(out, "stacks")].attrs["deepz"]["job"] == job

    group = zarr.open_group(str(out), mode="r+")[_group(out, "stacks")]
    group[MANIFEST][3:] = -1
    moved = tmp_path / "archive" / "movie-renamed.tif"
    moved.parent.mkdir()
    movie.rename(moved)
    with caplog.at_level(logging.WARNING, logger="live.refocus"):
        again = refocus_recording(moved, **kw)
    assert (again.frames_done, again.frames_skipped) == (1, 3)
    assert "the same recording" in caplog.text and str(movie.resolve()) in caplog.text
    np.testing.assert_allclose(_read(out, "stacks/0"), _reference(frames), atol=1e-3)
    job = zarr.open_group(str(out), mode="r")[_group(out, "stacks")].attrs["deepz"]["job"]
    assert job["source"] == str(moved.resolve())

    tifffile.imwrite(moved, _frames(4, seed=4), photometric="minisblack")  # same shape, new frames
    with pytest.raises(RefocusError, match=r"differs in source_frames_sha256\)"):
        refocus_recording(moved, **kw)


def test_a_run_input_resumes_after_a_damaged_frame_is_restored_or_more_are_listed(
    tmp_path: Path,
) -> None:
    """A run store read into another store is known by its first present frame: a chunk
    that could not be read when the job began (the fingerprint left out, the path alone
    compared) resumes once restored, and frames the run lists as present later (its presence
    catching up with its raw array) do not make it another recording. Both were refused as
    "differs in source_frames_sha256" when the fingerprint read the last present frame and
    counted unreadable frames in."""
    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(8)))
    shard = store / "0" / "0" / "c" / "0" / "0" / "0"  # seqs 0-1
    good = shard.read_bytes()
    shard.write_bytes(b"not a shard at all")
    out = tmp_path / "out.ome.zarr"
    kw: dict[str, Any] = {"planes": PLANES, "out": out, "chunk": 2, "scheduler": "sync", **ORT}
    with pytest.raises(RefocusTaskError, match="chunk 0"):
        refocus_recording(store, **kw)
    shard.write_bytes(good)
    resumed = refocus_recording(store, **kw)
    assert (resumed.frames_done, resumed.frames_skipped) == (2, 6)

    root = zarr.open_group(str(store), mode="r+")
    full = dict(root.attrs["deepz"])
    root.attrs["deepz"] = {**full, "raw_present": [[0, 6]]}  # the listing behind the array
    late = tmp_path / "late.ome.zarr"
    first = refocus_recording(store, **{**kw, "out": late})
    assert first.frames_done == 6
    group = zarr.open_group(str(late), mode="r+")[_group(late, "stacks")]
    group[MANIFEST][1:] = -1  # cut off after its first chunk
    root.attrs["deepz"] = full  # the run closed: seqs 6-7 listed, n_t unchanged
    again = refocus_recording(store, **{**kw, "out": late})
    assert (again.frames_done, again.frames_skipped) == (6, 2)


def test_another_input_into_a_moved_output_is_still_refused(tmp_path: Path) -> None:
    """Another recording into an existing image is refused, the store's own image included;
    an output store moved away from its external input still resumes (the input's path)."""
    import tifffile

    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(3)))
    tifffile.imwrite(tmp_path / "other.tif", _frames(3, seed=9), photometric="minisblack")
    kw: dict[str, Any] = {"planes": PLANES, "scheduler": "sync", **ORT}
    refocus_recording(store, **kw)
    out = tmp_path / "out.ome.zarr"
    refocus_recording(store, out=out, **kw)
    for target, name in ((store, "stacks_offline"), (out, "stacks")):
        with pytest.raises(
            RefocusError, match=r"exists from another refocusing \(differs in source\b"
        ):
            refocus_recording(tmp_path / "other.tif", out=target, name=name, **kw)
    out.rename(tmp_path / "out-moved.ome.zarr")
    again = refocus_recording(store, out=tmp_path / "out-moved.ome.zarr", **kw)
    assert (again.frames_done, again.frames_skipped) == (0, 3)


def test_a_model_replaced_at_the_same_path_is_loaded_again(
    tmp_path: Path, tiny_model_files: dict[str, Any]
) -> None:
    """The backend cache is keyed by the model file's content, not only its path: a model
    re-exported over the same file is loaded again in the same process (it served the old
    model's planes under the new model's SHA-256)."""
    from engine.metadata import file_sha256
    from engine.runtime import DEFAULT_MODEL

    store = tmp_path / "run.ome.zarr"
    _record(store, list(range(3)))
    model = tmp_path / "model.onnx"
    kw: dict[str, Any] = {"planes": PLANES, "scheduler": "sync", "model": model, **ORT}
    shutil.copyfile(DEFAULT_MODEL, model)
    refocus_recording(store, out=tmp_path / "a.ome.zarr", **kw)
    shutil.copyfile(tiny_model_files["onnx"], model)  # another network, the same path
    refocus_recording(store, out=tmp_path / "b.ome.zarr", **kw)
    a, b = _read(tmp_path / "a.ome.zarr", "stacks/0"), _read(tmp_path / "b.ome.zarr", "stacks/0")
    assert not np.allclose(a, b)
    group = zarr.open_group(str(tmp_path / "b.ome.zarr"), mode="r")[
        _group(tmp_path / "b.ome.zarr", "stacks")
    ]
    assert group.attrs["deepz"]["model"]["sha256"] == file_sha256(model)
