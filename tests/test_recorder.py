"""Recorder: a real OME-Zarr store written on the background thread, read back independently."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from live.protocol import Message, decode, encode_frame, encode_stack
from live.recorder import Recorder, missing_seqs, store_path

SHAPE = (64, 80)
PLANES = [-2.0, 0.0, 2.0]


def _frame(seq: int) -> Message:
    image = np.full(SHAPE, seq, np.uint16)
    image[0, 0] = 1000 + seq
    return decode(encode_frame(image, seq=seq, timestamp_s=100.0 + seq, focus_um=0.0))


def _stack(seq: int) -> Message:
    planes = np.stack([np.full(SHAPE, seq + p, np.float32) for p in PLANES])
    return decode(
        encode_stack(
            planes,
            seq=seq,
            timestamp_s=100.0 + seq,
            focus_um=0.0,
            planes_um=PLANES,
            latency_ms=1.0,
        )
    )


def _recorder(path: Path, **kwargs: object) -> Recorder:
    return Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=0.5,
        rate_hz=20.0,
        planes_um=PLANES,
        config={"source": {"kind": "test"}},
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("frames_per_chunk", [1, 4])
def test_store_holds_every_frame_and_names_the_gaps(tmp_path: Path, frames_per_chunk: int) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, frames_per_chunk=frames_per_chunk)
    raw_seqs = [s for s in range(23) if s not in (5, 17)]
    stack_seqs = [s for s in range(23) if s not in (2, 5, 17, 22)]
    for seq in reversed(raw_seqs):  # out of order on purpose
        rec.put_frame(_frame(seq))
    for seq in stack_seqs:
        rec.put_stack(_stack(seq))
    summary = rec.close(timeout_s=30)
    assert summary.error is None
    assert (summary.raw_frames, summary.stacks) == (21, 19)
    assert summary.raw_missing == [5, 17]
    assert summary.stacks_missing == [2, 5, 17]  # 22 is after the last stack: not a gap
    assert "raw gaps: 5, 17" in summary.line()

    root = zarr.open_group(path, mode="r")
    raw, stacks = root["raw/0"], root["stacks/0"]
    assert raw.shape == (23, *SHAPE) and raw.chunks == (frames_per_chunk, *SHAPE)
    assert stacks.shape == (22, 3, *SHAPE) and stacks.chunks == (1, 3, *SHAPE)
    for seq in raw_seqs:
        assert raw[seq, 0, 0] == 1000 + seq and raw[seq, 5, 5] == seq
    assert not raw[5].any() and not raw[17].any()
    np.testing.assert_array_equal(stacks[7, :, 3, 3], [5.0, 7.0, 9.0])
    deepz = root.attrs["deepz"]
    assert deepz["complete"] is True
    assert deepz["config"] == {"source": {"kind": "test"}}
    assert deepz["planes_um"] == PLANES
    assert missing_seqs(deepz["raw_present"]) == [5, 17]
    assert deepz["summary"]["stacks_missing"] == [2, 5, 17]


def test_ome_zarr_py_reads_both_images_with_scales(tmp_path: Path) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path)
    for seq in range(6):
        rec.put_frame(_frame(seq))
        rec.put_stack(_stack(seq))
    rec.close(timeout_s=30)

    raw_node = next(iter(Reader(parse_url(str(path / "raw")))()))
    assert [a["name"] for a in raw_node.metadata["axes"]] == ["t", "y", "x"]
    assert raw_node.metadata["axes"][0]["unit"] == "second"
    assert raw_node.metadata["coordinateTransformations"][0][0]["scale"] == [0.05, 0.5, 0.5]
    raw = np.asarray(raw_node.data[0])
    assert raw.shape == (6, *SHAPE) and raw[4, 1, 1] == 4

    stack_node = next(iter(Reader(parse_url(str(path / "stacks")))()))
    axes = stack_node.metadata["axes"]
    assert [(a["name"], a["type"], a["unit"]) for a in axes][1] == ("z", "space", "micrometer")
    transforms = stack_node.metadata["coordinateTransformations"][0]
    assert transforms[0]["scale"] == [0.05, 2.0, 0.5, 0.5]
    assert transforms[1]["translation"] == [0.0, -2.0, 0.0, 0.0]
    np.testing.assert_array_equal(np.asarray(stack_node.data[0])[3, :, 0, 0], [1.0, 3.0, 5.0])


def test_disk_below_min_free_stops_recording_keeps_data_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path, min_free_mb=1e12)  # more than any disk: the first check fails
    with caplog.at_level(logging.ERROR, logger="live.recorder"):
        for seq in range(5):
            rec.put_frame(_frame(seq))
        summary = rec.close(timeout_s=30)
    assert summary.error is not None and "below recorder.min_free_mb" in summary.error
    assert summary.unrecorded == 5 and summary.raw_frames == 0
    assert "RECORDER STOPPED" in caplog.text
    root = zarr.open_group(path, mode="r")  # the store is still consistent and readable
    assert root.attrs["deepz"]["complete"] is False
    assert "min_free_mb" in root.attrs["deepz"]["error"]


def test_write_error_is_logged_and_later_items_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A storage fault on seq 1 (injected; a wrong-shape frame is rejected on its own instead,
    # see test_recorder_integrity.py) stops recording; what was written stays.
    write = zarr.Array.__setitem__

    def failing_write(array: zarr.Array, selection: object, value: object) -> None:
        if isinstance(selection, int) and selection == 1:
            raise OSError("injected write fault")
        write(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_write)
    path = tmp_path / "run.ome.zarr"
    rec = _recorder(path)
    for seq in range(3):
        rec.put_frame(_frame(seq))
    summary = rec.close(timeout_s=30)
    assert summary.raw_frames == 1
    assert summary.unrecorded == 2
    assert summary.error == "writing raw seq 1 failed: OSError: injected write fault"
    assert zarr.open_group(path, mode="r")["raw/0"][0, 0, 0] == 1000
    assert zarr.open_group(path, mode="r").attrs["deepz"]["complete"] is False


def test_store_path_and_bad_settings(tmp_path: Path) -> None:
    assert store_path(tmp_path, tmp_path / "x.ome.zarr") == tmp_path / "x.ome.zarr"
    made = store_path(tmp_path)
    assert made.parent == tmp_path and made.name.endswith(".ome.zarr")
    with pytest.raises(ValueError, match="compression 'lzma' is not supported"):
        _recorder(tmp_path / "a.ome.zarr", compression="lzma")
    with pytest.raises(ValueError, match="frames_per_chunk must be >= 1"):
        _recorder(tmp_path / "b.ome.zarr", frames_per_chunk=0)
