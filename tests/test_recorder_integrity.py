"""Integrity of the recording over a real OME-Zarr store: each seq written once (the first valid
item wins), seqs far ahead refused instead of growing the store, wrong shapes and inexact
dtypes refused one by one while recording goes on, and every refusal counted by kind."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live.protocol import MAX_SEQ, Message, decode, encode_frame, encode_stack
from live.recorder import REJECTIONS, SEQ_WINDOW, missing_seqs
from live.store import array_path
from tests.live_helpers import run_array
from tests.test_recorder import PLANES, SHAPE, _frame, _recorder, _stack


def _seqs(gaps: list[tuple[int, int]]) -> list[int]:
    """Every seq of half-open gap ranges, in order."""
    return [s for a, b in gaps for s in range(a, b)]


def _array(root: zarr.Group, role: str) -> zarr.Array:
    """The array of image `role` in an opened run store."""
    array = root[str(array_path(root.attrs["deepz"], role))]
    assert isinstance(array, zarr.Array)
    return array


def _raw(seq: int, image: np.ndarray) -> Message:
    return decode(encode_frame(image, seq=seq, timestamp_s=1.0))


def _noise(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**16, shape, dtype=np.uint16)


def _no_rejections() -> dict[str, dict[str, int]]:
    return {image: dict.fromkeys(REJECTIONS, 0) for image in ("raw", "stacks")}


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("frames_per_chunk", [1, 4])
def test_a_duplicate_seq_is_rejected_and_the_first_frame_kept_bit_identical(
    tmp_path: Path, frames_per_chunk: int
) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, frames_per_chunk=frames_per_chunk)
    genuine = {seq: _noise(seq) for seq in range(6)}
    for seq, image in genuine.items():
        assert rec.put_frame(_raw(seq, image))
        assert rec.put_stack(_stack(seq))
    # Forged copies of seq 2: one right behind the genuine frame (still queued), one later.
    assert not rec.put_frame(_raw(2, _noise(100)))
    assert not rec.put_frame(_raw(2, np.zeros(SHAPE, np.uint16)))
    forged_stack = np.full((len(PLANES), *SHAPE), -1.0, np.float32)
    forged = encode_stack(
        forged_stack, seq=3, timestamp_s=1.0, focus_um=0.0, planes_um=PLANES, latency_ms=1.0
    )
    assert not rec.put_stack(decode(forged))
    summary = rec.close(timeout_s=30)

    assert summary.error is None and (summary.raw_frames, summary.stacks) == (6, 6)
    assert summary.rejected["raw"]["duplicate"] == 2
    assert summary.rejected["stacks"]["duplicate"] == 1
    root = zarr.open_group(path, mode="r")
    for seq, image in genuine.items():
        assert _array(root, "raw")[seq].tobytes() == image.tobytes()
    np.testing.assert_array_equal(_array(root, "stacks")[3, :, 0, 0], [1.0, 3.0, 5.0])
    assert root.attrs["deepz"]["complete"] is True


@pytest.mark.parametrize("forged_seq", [1_000_000, 10**18, MAX_SEQ, 5 + SEQ_WINDOW])
def test_a_seq_far_ahead_is_rejected_and_the_store_does_not_grow(
    tmp_path: Path, forged_seq: int
) -> None:
    control, forged = tmp_path / "control.ome.zarr", tmp_path / "forged.ome.zarr"
    for path in (control, forged):
        rec = _recorder(path)
        for seq in range(5):
            rec.put_frame(_frame(seq))
            rec.put_stack(_stack(seq))
        if path == forged:
            assert not rec.put_frame(_raw(forged_seq, _noise(7)))
            assert not rec.put_stack(_stack(forged_seq))
        summary = rec.close(timeout_s=30)

    assert summary.error is None and (summary.raw_frames, summary.stacks) == (5, 5)
    assert summary.raw_gaps == [] and summary.stacks_gaps == []
    expected = _no_rejections()
    expected["raw"]["beyond_window"] = expected["stacks"]["beyond_window"] = 1
    assert summary.rejected == expected
    root = zarr.open_group(forged, mode="r")
    assert _array(root, "raw").shape == (5, *SHAPE) and _array(root, "stacks").shape[0] == 5
    assert root.attrs["deepz"]["complete"] is True
    assert root.attrs["deepz"]["raw_present"] == [[0, 5]]
    assert _store_bytes(forged) == _store_bytes(control)


def test_the_window_counts_from_the_highest_seq_accepted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = _recorder(tmp_path / "run.ome.zarr", seq_window=10)
    with caplog.at_level("ERROR", logger="live.recorder"):
        assert not rec.put_frame(_frame(10))  # nothing accepted yet: seqs 0..9 are in the window
        assert not rec.put_frame(_frame(11))
    # a stream that starts beyond the window records nothing: one error line says so, and how
    # to change it (not only warnings that stop after a few)
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "starts at seq 10" in line and "recorder.seq_window = 10" in line
    assert rec.put_frame(_frame(9))
    assert rec.put_frame(_frame(19))  # 9 + 10: the edge of the window
    assert not rec.put_frame(_frame(30))
    assert rec.put_frame(_frame(29))
    assert rec.put_frame(_frame(3))  # late frames behind the highest are always welcome
    summary = rec.close(timeout_s=30)
    assert summary.raw_frames == 4
    assert summary.rejected["raw"]["beyond_window"] == 3
    assert _seqs(summary.raw_gaps) == sorted(set(range(29)) - {3, 9, 19})
    with pytest.raises(ValueError, match="seq_window must be >= 1"):
        _recorder(tmp_path / "bad.ome.zarr", seq_window=0)


def test_a_wrong_shape_is_rejected_alone_and_recording_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path)
    assert rec.put_frame(_frame(0))
    # A wrong-shape frame does not claim its seq: the right frame 1 after it is recorded.
    assert not rec.put_frame(_raw(1, np.zeros((8, 8), np.uint16)))
    wrong_planes = np.zeros((2, *SHAPE), np.float32)
    parts = encode_stack(wrong_planes, seq=0, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0)
    assert not rec.put_stack(decode(parts))
    assert not rec.put_stack(_frame(1))  # a raw frame is no stack
    for seq in range(1, 6):
        assert rec.put_frame(_frame(seq))
        assert rec.put_stack(_stack(seq - 1))
    summary = rec.close(timeout_s=30)

    assert summary.error is None and summary.unrecorded == 0
    assert (summary.raw_frames, summary.stacks) == (6, 5)
    assert summary.raw_gaps == [] and summary.stacks_gaps == []
    assert summary.rejected["raw"]["wrong_shape"] == 1
    assert summary.rejected["stacks"]["wrong_shape"] == 2
    root = zarr.open_group(path, mode="r")
    assert _array(root, "raw")[1, 0, 0] == 1001
    assert root.attrs["deepz"]["complete"] is True


def test_raw_frames_that_do_not_convert_exactly_to_uint16_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path)
    big = np.full(SHAPE, 1e9, np.float32)  # astype(uint16) would store 51712
    negative = np.full(SHAPE, -5, np.int32)  # would store 65531
    fraction = np.full(SHAPE, 3.5, np.float32)
    nan = np.full(SHAPE, np.nan, np.float32)
    exact_float = (np.arange(np.prod(SHAPE)) % 65536).astype(np.float32).reshape(SHAPE)
    exact_small = np.full(SHAPE, 200, np.uint8)
    for seq, image in enumerate([big, negative, fraction, nan]):
        assert not rec.put_frame(_raw(seq + 1, image))
    assert rec.put_frame(_raw(5, exact_float))
    assert rec.put_frame(_raw(6, exact_small))
    assert rec.put_frame(_frame(0))
    summary = rec.close(timeout_s=30)

    assert summary.rejected["raw"]["wrong_dtype"] == 4
    assert _seqs(summary.raw_gaps) == [1, 2, 3, 4]  # truthful gaps, not wrapped values
    raw = run_array(path, "raw")
    assert not raw[1:5].any()
    np.testing.assert_array_equal(raw[5], exact_float.astype(np.uint16))
    assert raw[5].dtype == np.uint16 and (raw[6] == 200).all()


def test_rejection_counts_add_up_in_the_summary_the_line_and_the_store(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, seq_window=100)
    items = (
        [_frame(seq) for seq in range(20)]
        + [_frame(seq) for seq in (3, 3, 7)]  # 3 duplicates
        + [_raw(seq, _noise(seq)) for seq in (500, 10**9)]  # 2 beyond the window
        + [_raw(20, np.zeros((3, 3), np.uint16))]  # 1 wrong shape
        + [_raw(21, np.full(SHAPE, -1, np.int8))]  # 1 wrong dtype
    )
    accepted = sum(rec.put_frame(item) for item in items)
    live_counts = rec.rejections()
    summary = rec.close(timeout_s=30)

    expected = _no_rejections()
    expected["raw"].update(duplicate=3, beyond_window=2, wrong_shape=1, wrong_dtype=1)
    assert live_counts == summary.rejected == expected
    assert accepted == summary.raw_frames == 20 and summary.unrecorded == 0
    assert accepted + summary.rejected_total == len(items)
    assert "rejected: raw 3 duplicate, 2 beyond_window, 1 wrong_shape, 1 wrong_dtype" in (
        summary.line()
    )
    deepz = zarr.open_group(path, mode="r").attrs["deepz"]
    assert deepz["rejected"] == deepz["summary"]["rejected"] == expected
    assert deepz["complete"] is True and missing_seqs(deepz["raw_present"]) == []


def test_racing_threads_write_each_seq_exactly_once(tmp_path: Path) -> None:
    # Router-like threads put the same seqs with different pixels at once: exactly one put per
    # seq succeeds, and the store holds exactly that one's pixels.
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path)
    n, won = 60, [dict[int, int](), dict[int, int]()]
    images = [[_noise(1000 * t + s) for s in range(n)] for t in (0, 1)]

    start = threading.Barrier(2)  # both threads in their loops together: a real race

    def put_all(thread: int) -> None:
        start.wait(timeout=60)
        for seq in range(n):
            if rec.put_frame(_raw(seq, images[thread][seq])):
                won[thread][seq] = thread

    threads = [threading.Thread(target=put_all, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = rec.close(timeout_s=30)

    winners = {**won[0], **won[1]}
    assert len(won[0]) + len(won[1]) == len(winners) == n
    assert summary.raw_frames == n and summary.rejected["raw"]["duplicate"] == n
    raw = run_array(path, "raw")
    for seq, thread in winners.items():
        assert raw[seq].tobytes() == images[thread][seq].tobytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    puts=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=40),  # seq
            st.sampled_from(["good", "good", "wrong_shape", "wrong_dtype"]),
            st.integers(min_value=0, max_value=3),  # which pixels
        ),
        max_size=30,
    )
)
def test_the_store_holds_the_first_valid_frame_of_every_seq(
    tmp_path_factory: pytest.TempPathFactory, puts: list[tuple[int, str, int]]
) -> None:
    path = tmp_path_factory.mktemp("prop") / "run.ome.zarr"
    rec = _recorder(path, seq_window=15, frames_per_chunk=3)
    first: dict[int, np.ndarray] = {}
    counts = dict.fromkeys(REJECTIONS, 0)
    for seq, kind, variant in puts:
        image = _noise(100 * seq + variant)
        if kind == "wrong_shape":
            item = _raw(seq, image[:8])
        elif kind == "wrong_dtype":
            item = _raw(seq, image.astype(np.float32) + 0.5)
        else:
            item = _raw(seq, image)
        # The model of the rules: shape, dtype, window (from the highest accepted), first wins.
        if kind != "good":
            expected_kind: str | None = kind
        elif seq > max(first, default=-1) + 15:
            expected_kind = "beyond_window"
        elif seq in first:
            expected_kind = "duplicate"
        else:
            expected_kind, first[seq] = None, image
        if expected_kind is not None:
            counts[expected_kind] += 1
        assert rec.put_frame(item) is (expected_kind is None)
    summary = rec.close(timeout_s=30)

    assert summary.error is None and summary.rejected["raw"] == counts
    assert summary.raw_frames == len(first)
    assert _seqs(summary.raw_gaps) == sorted(set(range(max(first, default=-1) + 1)) - set(first))
    raw = run_array(path, "raw")
    assert raw.shape[0] == max(first, default=-1) + 1
    for seq, image in first.items():
        assert raw[seq].tobytes() == image.tobytes()


def _stack_of(seq: int, planes: np.ndarray) -> Message:
    return decode(encode_stack(planes, seq=seq, timestamp_s=0.0, focus_um=0.0, latency_ms=1.0))


def test_a_float16_store_rounds_stacks_of_any_real_dtype_and_keeps_the_other_rules(
    tmp_path: Path,
) -> None:
    # Stacks are derived data: any real dtype is rounded into float16 (never "wrong_dtype"),
    # but shape, once-only and the seq window still decide, and only admitted values count.
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, stack_dtype="float16", seq_window=10)
    n = len(PLANES) * SHAPE[0] * SHAPE[1]
    wide = np.full((len(PLANES), *SHAPE), 1000.1, np.float64)
    counts = np.full((len(PLANES), *SHAPE), 70_000, np.int32)  # beyond float16: saturated
    assert rec.put_stack(_stack_of(0, wide))
    assert rec.put_stack(_stack_of(1, counts))
    assert rec.put_stack(_stack_of(2, wide.astype(np.float16)))
    assert not rec.put_stack(_stack_of(1, counts))  # duplicate: its values are not counted
    assert not rec.put_stack(_stack_of(50, counts))  # beyond the window
    assert not rec.put_stack(_stack_of(3, counts[:2]))  # wrong shape
    summary = rec.close(timeout_s=30)

    expected = _no_rejections()
    expected["stacks"].update(duplicate=1, beyond_window=1, wrong_shape=1)
    assert summary.rejected == expected and summary.stacks == 3
    assert summary.stack_values_clipped == n
    stacks = run_array(path, "stacks")
    assert stacks.dtype == np.float16
    assert (stacks[0] == np.float16(1000.1)).all() and (stacks[1] == 65504.0).all()
    np.testing.assert_array_equal(stacks[2], stacks[0])
