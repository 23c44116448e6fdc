"""live.preview: a real run store written by the Recorder, drawn into a PNG and read back."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from live.metrics import Metrics
from live.preview import FIGSIZE_IN, NOTHING_RECORDED, PANELS, PREVIEW_DPI, write_preview
from live.protocol import decode, encode_frame, encode_stack
from live.recorder import Recorder

Image = pytest.importorskip("PIL.Image", reason="Pillow (matplotlib's dependency) not installed")

SHAPE = (48, 64)
PLANES = [-2.0, 0.0, 2.0, 4.0]


def _store(path: Path, n: int, *, keep_raw: bool = True, keep_stacks: bool = True) -> Path:
    """Record `n` noisy frames and their stacks with the real Recorder, then close it."""
    rng = np.random.default_rng(1)
    recorder = Recorder(
        path,
        frame_shape=SHAPE,
        pixel_size_um=0.5,
        rate_hz=10.0,
        planes_um=PLANES,
        config={"source": {"kind": "test"}},
        keep_raw=keep_raw,
        keep_stacks=keep_stacks,
    )
    for seq in range(n):
        frame = rng.integers(100, 4000, SHAPE, dtype=np.uint16)
        stack = rng.random((len(PLANES), *SHAPE), dtype=np.float32)
        stamp = 50.0 + seq / 10
        recorder.put_frame(decode(encode_frame(frame, seq=seq, timestamp_s=stamp)))
        recorder.put_stack(
            decode(encode_stack(stack, seq=seq, timestamp_s=stamp, focus_um=0.0, latency_ms=9.0))
        )
    recorder.close()
    return path


def _panel(png: np.ndarray, name: str) -> np.ndarray:
    """Crop the middle of a panel's picture, clear of any centred message.

    Pictures sit at the bottom of their panel, the flat side view at its top.
    """
    left, bottom, width, height = PANELS[name]
    low, high = (0.7, 0.95) if name == "side" else (0.05, 0.35)
    rows, cols = png.shape[:2]
    y0, y1 = (1 - bottom - high * height) * rows, (1 - bottom - low * height) * rows
    x0, x1 = (left + 0.3 * width) * cols, (left + 0.7 * width) * cols
    return png[int(y0) : int(y1), int(x0) : int(x1), :3].astype(np.float64)


def _read(path: Path) -> tuple[np.ndarray, str]:
    """Decode the PNG: its pixels and the counts it carries in its Description field."""
    with Image.open(path) as image:
        return np.asarray(image), image.text["Description"]


def _expected_shape() -> tuple[int, int]:
    return round(FIGSIZE_IN[1] * PREVIEW_DPI), round(FIGSIZE_IN[0] * PREVIEW_DPI)


def test_preview_shows_the_last_frame_stack_and_latency_beside_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path / "20260101-120000.ome.zarr", 5)
    metrics = Metrics()
    for ms in (12.0, 15.0, 11.0):
        metrics.stack_out(ms)
    out = write_preview(
        store, latency=metrics.latency_series(), summary_lines=["summary (source finished):"]
    )
    assert out == tmp_path / "20260101-120000.preview.png"
    png, text = _read(out)
    assert png.shape[:2] == _expected_shape()
    for name in ("raw", "projection", "side", "latency"):
        assert _panel(png, name).var() > 0, name
    assert "raw frames: 5 recorded" in text and "stacks: 5 recorded" in text
    assert "planes: 4 (-2 … 4 µm)" in text and text.endswith("summary (source finished):")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_a_store_without_stacks_still_previews_its_raw_frames(tmp_path: Path) -> None:
    store = _store(tmp_path / "run.ome.zarr", 3, keep_stacks=False)
    out = write_preview(store, tmp_path / "pictures" / "p.png")
    png, text = _read(out)
    assert png.shape[:2] == _expected_shape()
    assert _panel(png, "raw").var() > 0
    assert _panel(png, "projection").var() == 0 and _panel(png, "side").var() == 0
    assert "raw frames: 3 recorded" in text and "stacks: not kept" in text


def test_a_store_without_raw_frames_previews_its_stacks(tmp_path: Path) -> None:
    store = _store(tmp_path / "run.ome.zarr", 2, keep_raw=False)
    png, text = _read(write_preview(store))
    assert _panel(png, "projection").var() > 0 and _panel(png, "side").var() > 0
    assert _panel(png, "raw").var() == 0
    assert "raw frames: not kept" in text and "stacks: 2 recorded" in text


def test_an_empty_store_gives_a_png_that_says_nothing_was_recorded(tmp_path: Path) -> None:
    store = _store(tmp_path / "empty.ome.zarr", 0)
    png, text = _read(write_preview(store))
    assert png.shape[:2] == _expected_shape()
    assert NOTHING_RECORDED in text and "raw frames: 0 recorded" in text
    for name in ("raw", "projection", "side", "latency"):
        assert _panel(png, name).var() == 0, name


def test_bad_input_and_a_missing_matplotlib_are_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match="no OME-Zarr run store at"):
        write_preview(tmp_path / "nothing.ome.zarr")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"needs matplotlib \(pip install matplotlib\)") as err:
        write_preview(tmp_path / "nothing.ome.zarr")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
def test_the_preview_gets_the_mode_of_a_plain_file_not_owner_only(tmp_path: Path) -> None:
    store = _store(tmp_path / "run.ome.zarr", 1)
    previous = os.umask(0o022)
    try:
        out = write_preview(store)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # readable like the store beside it


def test_the_preview_says_why_a_store_is_not_complete_or_that_it_is_not_finished(
    tmp_path: Path,
) -> None:
    import zarr

    store = _store(tmp_path / "run.ome.zarr", 3)
    root = zarr.open_group(store, mode="r+")
    deepz = dict(root.attrs["deepz"])
    for changes, expected in (
        ({}, "complete: yes"),
        # as a running recorder leaves it (and a killed one): no error named
        ({"complete": False}, "complete: not yet (still being written, or the run ended"),
        (
            {"complete": False, "stacks_error": "writing stacks seq 4 failed: OSError: EIO"},
            "complete: NO (stacks_error: writing stacks seq 4 failed: OSError: EIO)",
        ),
    ):
        root.attrs["deepz"] = {**deepz, **changes}
        _, text = _read(write_preview(store))
        assert expected in text, text
